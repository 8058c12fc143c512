"""What the trained-model experiments share: data and architecture options, and building,
training (or reloading) one autoencoder of a grid."""
from __future__ import annotations

from pathlib import Path

import torch

from ..models import make_autoencoder
from . import data as datasets
from .fit import fit

ARCHITECTURE_CHOICES = ("auto", "mlp", "mnist", "celeba")


def add_data_arguments(parser, *, default_dataset: str = "digits") -> None:
    parser.add_argument("--dataset", choices=datasets.DATASETS, default=default_dataset,
                        help="digits ships with scikit-learn; mnist/celeba are read from --data-dir")
    parser.add_argument("--data-dir", type=Path, help="folder with the MNIST IDX files or CelebA images")
    parser.add_argument("--architecture", choices=ARCHITECTURE_CHOICES, default="auto",
                        help="auto: an MLP for digits and for --quick, else the paper's App. D network")
    parser.add_argument("--width", type=float, default=1.0, help="channel/unit multiplier of the network")
    parser.add_argument("--train-steps", type=int, help="Adam steps per model (paper: 20k MNIST, 50k CelebA)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)


def architecture(args) -> str:
    if args.architecture != "auto":
        return args.architecture
    return "mlp" if args.dataset == "digits" or args.quick else args.dataset


def model_config(args, default_steps: int) -> dict:
    """The settings every model of an experiment shares (stored in results.json)."""
    steps = args.train_steps or default_steps
    if steps < 1 or args.batch_size < 1 or not args.lr > 0 or not args.width > 0:
        raise ValueError("--train-steps, --batch-size, --lr and --width must be positive")
    return dict(dataset=args.dataset, architecture=architecture(args), width=args.width,
                train_steps=steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                observation="gaussian (sigma = 1)")


def trained_autoencoder(kind: str, split: datasets.Split, config: dict, *, out: Path, name: str,
                        device: str = "cpu", **model_options):
    """Build ``kind`` ("beta-vae" | "grae") with ``model_options`` and train it (or reload its
    checkpoint from ``out/models/<name>.pt``). Returns (model in eval mode, fit record)."""
    torch.manual_seed(config["seed"])
    model = make_autoencoder(kind, config["architecture"], data_shape=tuple(split.train.shape[1:]),
                             width=config["width"], observation="gaussian", **model_options)
    record = fit(model, split.train, steps=config["train_steps"], batch_size=config["batch_size"],
                 lr=config["lr"], seed=config["seed"], checkpoint=Path(out) / "models" / f"{name}.pt",
                 label=name, device=device)
    return model.eval(), record
