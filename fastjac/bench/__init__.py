"""``fastjac bench``: how much faster fastjac is than what you would write, measured here, now.

Every workload is timed beside its baseline in the same run (interleaved, medians of repeats) and
printed as a ratio to what a user writes by hand (:mod:`fastjac.bench.baselines`): the operator
by autograd through ``torch.linalg.cholesky``, the full Jacobian by ``vmap(jacfwd)`` or per-sample
``torch.autograd.functional.jacobian``, or the plain autoencoder step. The ``zoo`` area times
decoder-only GRAE≈ steps on decoders users have (:mod:`fastjac.bench.zoo`: an MLP and, when
diffusers is installed, an ``AutoencoderKL`` decoder) against the plain step and the same step
written by hand with ``torch.func``. On CUDA each operator row also shows its floor (bytes over the measured copy
bandwidth, flops over the measured matmul peak) and the fraction of it reached.

    fastjac bench [--device cpu|cuda] [--quick] [--json FILE]

The harness, shared by ``fastjac bench``, the asv suite (``benchmarks/benchmarks/``) and the studies
in ``benchmarks/``: :mod:`~fastjac.bench.timing` (the one timer), :mod:`~fastjac.bench.baselines`
(the hand-written rivals), :mod:`~fastjac.bench.workloads` (one unit of work per area, the
implementation a parameter), :mod:`~fastjac.bench.suites` (groups of rivals and their targets) and
:mod:`~fastjac.bench.results` (the machine, the command, the atomic JSON write).
"""
from __future__ import annotations

import sys

import torch

from . import report, results, suites, timing


def add_arguments(parser) -> None:
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="where to run (default cpu)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and 3 repeats (a smoke run)")
    parser.add_argument("--json", metavar="FILE", help="also write the results (and the machine) as JSON")
    parser.add_argument("--repeats", type=int, default=None,
                        help="interleaved repeats per rival (default 15; 3 with --quick)")
    parser.add_argument("--areas", default=",".join(suites.AREAS),
                        help=f"comma-separated subset of {','.join(suites.AREAS)}")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's); 1 is steadier on a shared machine")
    parser.add_argument("--budget", type=float, default=30.0,
                        help="seconds of samples after which a slow rival stops repeating (min. 3 repeats)")


def run(args) -> int:
    areas = tuple(a for a in args.areas.split(",") if a)
    unknown = set(areas) - set(suites.AREAS)
    if unknown:
        raise SystemExit(f"fastjac bench: --areas must name {', '.join(suites.AREAS)}; got {sorted(unknown)}")
    repeats = args.repeats or (3 if args.quick else 15)
    if repeats < 1:
        raise SystemExit("fastjac bench: --repeats must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("fastjac bench: --device cuda but torch sees no CUDA device")
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit("fastjac bench: --threads must be >= 1")
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    peaks = timing.measure_peaks(device) if device.type == "cuda" and not args.quick else None
    groups = suites.groups(args.device, quick=args.quick, areas=areas)
    rows, skipped = report.run(groups, repeats=repeats, device=device, peaks=peaks, budget_s=args.budget,
                               min_sample_s=0.0 if args.quick else 0.02,
                               progress=lambda s: print(f"  timing {s}", file=sys.stderr, flush=True))
    result = results.record(report.TOOL, program="fastjac bench", argv=_argv(args), device=device,
                            settings={"quick": args.quick, "repeats": repeats, "areas": list(areas)})
    result.update(peaks=None if peaks is None else {"bandwidth": peaks.bandwidth, "flops": peaks.flops},
                  rows=rows, skipped=skipped)
    print(report.table(result))
    if args.json:
        results.write_json(result, args.json)
    return 0


def _argv(args) -> list[str]:
    """The options of this run, spelled as on the command line (for the results file)."""
    argv = ["--device", args.device] + (["--quick"] if args.quick else [])
    for flag, value in (("--repeats", args.repeats), ("--areas", args.areas), ("--threads", args.threads),
                        ("--json", args.json)):
        if value is not None:
            argv += [flag, str(value)]
    return argv
