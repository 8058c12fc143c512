"""``fastjac train``: train a β-VAE or GRAE from the command line (resumable, DDP under torchrun).

    fastjac train --model grae --dataset digits --beta 0.5 --latent-dim 8 --steps 2000 --out runs/grae
    torchrun --nproc_per_node 4 -m fastjac train --model beta-vae --dataset mnist --data-dir DIR ...

Errors the user can fix (settings, paths, data files, a full disk) reach ``fastjac.cli.main``
as :class:`~fastjac.training.errors.UsageError` and are printed as one line (exit status 2).
"""
from __future__ import annotations

import dataclasses

from ..models import ARCHITECTURES, MODELS
from ..observations import NAMES as OBSERVATIONS
from ..regularizer import ESTIMATORS
from .data import DATASETS
from .trainer import TrainConfig, train

_HELP = {
    "out": "run folder: checkpoint.pt, log.jsonl, grid.png, config.json",
    "model": "objective", "dataset": "data (digits ships with scikit-learn; the others read --data-dir)",
    "data_dir": "folder with MNIST IDX files or CelebA images (nothing is downloaded)",
    "architecture": "network (default: mlp for digits, the App. D conv nets for mnist / celeba)",
    "beta": "β, the KL / regulariser weight", "latent_dim": "latent dimension d",
    "steps": "total Adam steps (a resumed run continues up to this)",
    "batch_size": "global batch size (split over torchrun processes)", "lr": "Adam learning rate",
    "width": "channel / hidden-unit multiplier (1 = the paper's sizes)",
    "norm": "decoder normalisation of the conv nets",
    "block_size": "β-VAE posterior block size (1 mean-field, d full); GRAE: block size of fischer / "
                  "stochastic / orthogonality",
    "estimator": "GRAE regulariser (stochastic = GRAE≈)", "num_columns": "GRAE≈ columns per sample (k)",
    "orthogonality_weight": "GRAE off-block orthogonality penalty weight",
    "observation": "observation model", "sigma": "Gaussian observation noise σ",
    "num_samples": "β-VAE posterior draws per training point",
    "eval_every": "held-out evaluation (β-VAE ± s.e., Taylor, GRAE) and grid every N steps",
    "eval_size": "held-out points evaluated", "eval_samples": "posterior draws for the held-out β-VAE value",
    "checkpoint_every": "atomic checkpoint every N steps", "log_every": "JSON log line every N steps",
    "seed": "seed of initialisation, data order and draws", "device": "auto | cpu | cuda | cuda:N",
    "threads": "CPU threads for torch (default: the idle cores, at most 4; 1 per process under torchrun)",
    "crop": "CelebA center-crop side in pixels (default: the shorter side)",
    "resume": "continue the run in --out exactly where its last checkpoint left it",
    "progress": "no progress line on stderr",
    "ddp_timeout": "seconds a process waits for the others in a collective before it stops (torchrun)",
    "overwrite": "replace the run already in --out (its checkpoint, log, grid and config)",
}
_CHOICES = {"model": MODELS, "dataset": DATASETS, "architecture": ARCHITECTURES, "norm": ("batch", "none"),
            "estimator": tuple(ESTIMATORS), "observation": tuple(OBSERVATIONS)}


def add_arguments(parser) -> None:
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            kind = dict(action="store_true") if not f.default else dict(action="store_false", dest=f.name)
            flag = flag if not f.default else "--no-" + flag[2:]
            parser.add_argument(flag, help=_HELP[f.name], **kind)
            continue
        if f.default is dataclasses.MISSING:
            parser.add_argument(flag, required=True, help=_HELP[f.name])
            continue
        kind = {"int": int, "float": float}.get(str(f.type), str)
        if "Optional[int]" in str(f.type):
            kind = int
        default = "" if f.default is None else f" (default: {f.default})"
        parser.add_argument(flag, type=kind, default=f.default, choices=_CHOICES.get(f.name),
                            help=_HELP[f.name] + default)


def run(args) -> int:
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    summary = train(cfg)
    if summary["rank"] != 0:
        return 0
    if summary["already_finished"]:
        print(f"the run in {summary['out']} is already finished: its checkpoint is at step {summary['step']} "
              f"(--steps {cfg.steps}); pass a larger --steps with --resume to train it further")
        return 0
    if summary["seconds_per_step"] is not None:
        print(f"{cfg.model} on {cfg.dataset}: {summary['step']} steps, "
              f"{summary['seconds_per_step']:.4f} s/step (mean over steps after the first); run in {summary['out']}")
    if summary["eval"]:
        e = summary["eval"]
        print(f"held-out: β-VAE {e['beta_vae']:.4f} ± {e['beta_vae_stderr']:.4f}, Taylor {e['taylor']:.4f}, "
              f"GRAE {e['grae']:.4f}")
    return 0
