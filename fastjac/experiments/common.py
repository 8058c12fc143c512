"""What the trained-model experiments share: data and architecture options, and training (or
reloading) one autoencoder of a grid with the package's trainer (``fastjac.training``), one run
folder per model under ``out/models/<name>/`` (so a finished model is never retrained)."""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from ..training import TrainConfig, load_checkpoint, load_dataset, train
from ..training.data import DATASETS, MNIST_FILES
from ..training.trainer import CHECKPOINT, build_model

ARCHITECTURE_CHOICES = ("auto", "mlp", "mnist", "celeba")
SIGMA = 1.0  # Gaussian observations with σ = 1: the paper's Eq. 13


class Data(NamedTuple):
    train: object     # a source: len() and batch(indices) -> (n, C, H, W) in [0, 1]
    test: object
    shape: tuple      # (C, H, W)
    description: str  # what was loaded, for every report


def add_data_arguments(parser) -> None:
    parser.add_argument("--dataset", choices=DATASETS, default="digits",
                        help="digits ships with scikit-learn; mnist/celeba are read from --data-dir")
    parser.add_argument("--data-dir", type=Path, help="folder with the MNIST IDX files or CelebA images")
    parser.add_argument("--architecture", choices=ARCHITECTURE_CHOICES, default="auto",
                        help="auto: an MLP for digits and for --quick, else the paper's App. D network")
    parser.add_argument("--width", type=float, default=1.0, help="channel/unit multiplier of the network")
    parser.add_argument("--train-steps", type=int, help="Adam steps per model (paper: 20k MNIST, 50k CelebA)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)


def load_data(args) -> Data:
    data = load_dataset(args.dataset, data_dir=args.data_dir)
    n_train, n_test = len(data.train), len(data.test)
    text = f"{args.dataset}: {n_train} train / {n_test} held out"
    if args.dataset == "mnist" and not any((Path(args.data_dir) / (MNIST_FILES["train"] + s)).is_file()
                                           for s in ("", ".gz")):
        text = (f"MNIST test set only (no training file in {args.data_dir}): {n_train} train / "
                f"{n_test} held out")
    return Data(data.train, data.test, tuple(data.shape), text)


def first(source, n: int) -> Tensor:
    """The first min(n, len(source)) images of a source, as one tensor."""
    return source.batch(torch.arange(min(n, len(source))))


def model_config(args, default_steps: int) -> dict:
    """The settings every model of an experiment shares (stored in results.json)."""
    steps = args.train_steps or default_steps
    if steps < 1 or args.batch_size < 1 or not args.lr > 0 or not args.width > 0:
        raise ValueError("--train-steps, --batch-size, --lr and --width must be positive")
    arch = args.architecture
    if arch == "auto":
        arch = "mlp" if args.dataset == "digits" or args.quick else args.dataset
    return dict(dataset=args.dataset, data_dir=str(args.data_dir) if args.data_dir else None,
                architecture=arch, width=args.width, train_steps=steps, batch_size=args.batch_size,
                lr=args.lr, seed=args.seed, sigma=SIGMA)


def trained_autoencoder(kind: str, config: dict, data_shape: tuple, *, out: Path, name: str,
                        device: str = "cpu", eval_size: int = 500, **model_options):
    """Train ``kind`` ("beta-vae" | "grae") with ``fastjac.training.train`` in ``out/models/name``,
    or reload it when that run is finished. Returns (model in eval mode, record).

    ``eval_size``: held-out points of the trainer's own end-of-run evaluation (the record's
    ``held_out``), a cross-check beside the experiment's; fewer keeps it cheap for the App. D nets."""
    run_dir = Path(out) / "models" / name
    steps = config["train_steps"]
    cfg = TrainConfig(out=str(run_dir), model=kind, dataset=config["dataset"], data_dir=config["data_dir"],
                      architecture=config["architecture"], width=config["width"], steps=steps,
                      batch_size=config["batch_size"], lr=config["lr"], seed=config["seed"],
                      sigma=config["sigma"], eval_every=steps, eval_size=eval_size, checkpoint_every=steps,
                      log_every=max(1, steps // 10), device=device,
                      resume=(run_dir / CHECKPOINT).is_file(), **model_options)
    summary = train(cfg)
    state = load_checkpoint(run_dir / CHECKPOINT)
    model = build_model(cfg, data_shape)
    model.load_state_dict(state["model"])
    return model.eval(), {"run": str(run_dir), "seconds_per_step": summary.get("seconds_per_step"),
                          "held_out": summary.get("eval")}
