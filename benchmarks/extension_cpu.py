"""The host path of fastjac._C ("cpp") against what users write and against our torch reference
(a benchmark, not a test).

logdet_gram forward+backward (∂/∂J and ∂/∂β) per dtype and d, for

- ``naive``: autograd through ``torch.linalg.cholesky(eye + bmm(Jᵀ, J)/β)``,
- ``torch``: fastjac's reference backend (``backend="torch"``),
- ``cpp``: the extension (its per-matrix Cholesky and inverse in C++, the passes over J in
  torch's matmul, which beat the earlier C++ passes at every d measured).

The machine may be shared: the methods run round-robin (one call each per repeat) so load
changes hit them alike, and each time is the median over the repeats. Ratios are against the
baselines measured in the same run. Value checks are off while timing.

    python benchmarks/extension_cpu.py --json benchmarks/results/extension_cpu.json
    python benchmarks/extension_cpu.py --tiny        # seconds: proves it runs
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import fastjac  # noqa: E402
from fastjac.ops.logdet_gram import extension  # noqa: E402,F401  (ImportError: fastjac._C not built)

BETA = 0.5
FULL = dict(dtypes=("float32", "float64"), shapes=[(256, 784, d) for d in (8, 16, 32, 64, 128)]
            + [(1, 64, 4), (16, 784, 2), (16, 784, 16), (16, 784, 256)], reps=15, long_reps=7)
TINY = dict(dtypes=("float32",), shapes=[(4, 50, 3), (4, 50, 70)], reps=3, long_reps=3)
LONG_ROUND_S = 2.0  # a round of all methods slower than this gets long_reps repeats


def naive(J, beta):
    Jr = J.detach().requires_grad_()
    L = torch.linalg.cholesky(torch.eye(J.shape[-1], dtype=J.dtype) + torch.bmm(Jr.mT, Jr) / beta)
    (2 * L.diagonal(dim1=-2, dim2=-1).log().sum(-1)).sum().backward()


def fastjac_call(backend):
    def run(J, beta):
        Jr, b = J.detach().requires_grad_(), beta.detach().requires_grad_()
        fastjac.logdet_gram(Jr, b, backend=backend).sum().backward()
    return run


METHODS = {"naive": naive, "torch": fastjac_call("torch"), "cpp": fastjac_call("cpp")}


def measure(B, D, d, dtype, reps, long_reps):
    g = torch.Generator().manual_seed(0)
    J = torch.randn(B, D, d, generator=g, dtype=dtype) / D ** 0.5
    beta = torch.tensor(BETA, dtype=dtype)
    times = {name: [] for name in METHODS}
    start = time.perf_counter()
    for fn in METHODS.values():
        fn(J, beta)  # warm-up
    if time.perf_counter() - start > LONG_ROUND_S:
        reps = long_reps
    for _ in range(reps):
        for name, fn in METHODS.items():
            start = time.perf_counter()
            fn(J, beta)
            times[name].append(time.perf_counter() - start)
    ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    return {"B": B, "D": D, "d": d, "dtype": str(dtype).replace("torch.", ""), "reps": reps, "ms": ms,
            "speedup_vs_naive": ms["naive"] / ms["cpp"], "speedup_vs_torch": ms["torch"] / ms["cpp"]}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results here (atomically)")
    parser.add_argument("--tiny", action="store_true", help="small shapes, few repeats")
    args = parser.parse_args(argv)
    grid = TINY if args.tiny else FULL
    fastjac.set_checks(False)
    report = {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
              "torch": torch.__version__, "python": platform.python_version(),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "load_average_start": os.getloadavg(),
              "beta": BETA, "results": []}
    print(f"{report['cpu']}, {report['cores']} cores, torch {report['torch']} "
          f"({report['torch_threads']} threads), load {report['load_average_start'][0]:.1f}")
    print(f"{'dtype':8s} {'B':>4s} {'D':>4s} {'d':>4s} " + " ".join(f"{m:>16s}" for m in METHODS)
          + "  cpp vs naive  cpp vs torch  (ms, median)")
    for dtype in grid["dtypes"]:
        for B, D, d in grid["shapes"]:
            r = measure(B, D, d, getattr(torch, dtype), grid["reps"], grid["long_reps"])
            report["results"].append(r)
            print(f"{dtype:8s} {B:4d} {D:4d} {d:4d} " + " ".join(f"{r['ms'][m]:16.2f}" for m in METHODS)
                  + f"  {r['speedup_vs_naive']:11.2f}x  {r['speedup_vs_torch']:11.2f}x", flush=True)
    report["load_average_end"] = os.getloadavg()
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(report, f, indent=1)
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
