"""``fastjac reproduce <experiment> [--quick] [--dataset …] [--data-dir …] --out DIR``.

Each experiment module exposes ``add_arguments(parser)`` and ``run(args) -> int``; the options
every experiment shares are added here. Experiments whose module is absent are not offered.
"""
from __future__ import annotations

import importlib
from pathlib import Path

import torch

EXPERIMENTS = {
    "identifiability": "mean-field posteriors pick the true latent axes (Fig. 1, 5, 6; App. C)",
    "structure": "posterior precision vs decoder JᵀJ block structure (Fig. 2, 7; App. E)",
    "objectives": "β-VAE, Taylor and GRAE objective values against β (Fig. 3; App. F)",
    "samples": "β-VAE vs GRAE≈ samples and a Fréchet distance against β (Fig. 4; App. G)",
}


def _modules():
    found = {}
    for name in EXPERIMENTS:
        try:
            found[name] = importlib.import_module(f"{__package__}.{name}")
        except ModuleNotFoundError as e:
            if e.name and f"{__package__}.{name}".startswith(e.name):
                continue
            raise
    return found


def _common(parser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="folder for results.json and PNGs; "
                        "re-running with the same folder resumes (finished settings are skipped)")
    parser.add_argument("--quick", action="store_true", help="a reduced grid that runs in minutes on a CPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="torch device for training (e.g. cuda)")
    parser.add_argument("--threads", type=int, help="CPU threads for torch during the run (1 is "
                        "fastest for these small networks on a busy machine; default: torch's)")


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="experiment", required=True, metavar="experiment")
    for name, module in _modules().items():
        p = sub.add_parser(name, help=EXPERIMENTS[name], description=EXPERIMENTS[name])
        _common(p)
        module.add_arguments(p)
    parser.set_defaults(_experiments=_modules)


def run(args) -> int:
    module = args._experiments()[args.experiment]
    threads = torch.get_num_threads()
    try:
        if args.threads is not None:
            if args.threads < 1:
                raise ValueError(f"--threads must be >= 1, got {args.threads}")
            torch.set_num_threads(args.threads)
        return int(module.run(args) or 0)
    except ValueError as e:  # bad settings or an incompatible results.json: say so, no traceback
        print(f"fastjac reproduce {args.experiment}: {e}")
        return 2
    finally:
        torch.set_num_threads(threads)
