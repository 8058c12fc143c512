"""Data sets of the experiments, as float tensors in [0, 1] shaped (N, C, H, W), with labels.

- ``digits``: scikit-learn's 8×8 digits (1 797 images, ships with scikit-learn; the embedded
  default), split 1 297 train / 500 held out.
- ``mnist``: IDX files (``*-images-idx3-ubyte[.gz]``, ``*-labels-idx1-ubyte[.gz]``) in ``--data-dir``.
  With train and test files: the standard split. With the test files only (t10k, 10 000 images):
  a 5 000 / 5 000 split of them, which every report must say.
- ``celeba``: an image folder (``--data-dir``), centre-cropped to 140×140 and resized to 64×64;
  the last ``HELD_OUT`` files (sorted by name) are held out. No labels.
Nothing is ever downloaded.
"""
from __future__ import annotations

import gzip
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
import torch
from torch import Tensor

DATASETS = ("digits", "mnist", "celeba")
HELD_OUT = 5000


class Split(NamedTuple):
    train: Tensor                   # (N, C, H, W) in [0, 1]
    test: Tensor
    train_labels: Optional[Tensor]  # (N,) int64, None without labels
    test_labels: Optional[Tensor]
    description: str                # what was loaded, for reports


def _idx(path: Path) -> np.ndarray:
    raw = (gzip.open if path.suffix == ".gz" else open)(path, "rb").read()
    dims = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def _find(folder: Path, stem: str) -> Optional[Path]:
    for name in (stem, stem + ".gz"):
        if (folder / name).exists():
            return folder / name
    return None


def _mnist(folder: Path) -> Split:
    files = {k: _find(folder, f"{k}-ubyte") for k in
             ("train-images-idx3", "train-labels-idx1", "t10k-images-idx3", "t10k-labels-idx1")}
    if files["t10k-images-idx3"] is None or files["t10k-labels-idx1"] is None:
        raise ValueError(f"--data-dir {folder} holds no MNIST IDX files (t10k-images-idx3-ubyte[.gz], "
                         "t10k-labels-idx1-ubyte[.gz]); fastjac never downloads data")
    load = lambda k: torch.from_numpy(_idx(files[k]).copy())  # noqa: E731
    images = lambda k: load(k).float().div(255).unsqueeze(1)  # noqa: E731
    test_x, test_y = images("t10k-images-idx3"), load("t10k-labels-idx1").long()
    if files["train-images-idx3"] is not None and files["train-labels-idx1"] is not None:
        return Split(images("train-images-idx3"), test_x, load("train-labels-idx1").long(), test_y,
                     "MNIST, standard 60 000 / 10 000 split")
    half = len(test_x) // 2
    return Split(test_x[:half], test_x[half:], test_y[:half], test_y[half:],
                 f"MNIST test set only: its first {half} images train, the other {len(test_x) - half} "
                 "are held out")


def _celeba(folder: Path) -> Split:
    try:
        from PIL import Image
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError("reading CelebA needs Pillow: pip install pillow") from e
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if len(paths) <= HELD_OUT:
        raise ValueError(f"--data-dir {folder} holds {len(paths)} images; CelebA needs more than "
                         f"{HELD_OUT} (the held-out part)")

    def read(p):
        im = Image.open(p).convert("RGB")
        w, h = im.size
        s = min(140, w, h)
        im = im.crop(((w - s) // 2, (h - s) // 2, (w + s) // 2, (h + s) // 2)).resize((64, 64), Image.BILINEAR)
        return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)

    x = torch.stack([read(p) for p in paths]).float().div(255)
    return Split(x[:-HELD_OUT], x[-HELD_OUT:], None, None,
                 f"CelebA from {folder}: {len(paths) - HELD_OUT} train / {HELD_OUT} held out, 64×64")


def load(dataset: str, data_dir: Optional[Path] = None) -> Split:
    """Load a data set by name (see the module docstring); MNIST and CelebA need ``data_dir``."""
    if dataset not in DATASETS:
        raise ValueError(f"--dataset must be one of {', '.join(DATASETS)}, got {dataset!r}")
    if dataset == "digits":
        from sklearn.datasets import load_digits
        d = load_digits()
        x = torch.tensor(d.data, dtype=torch.float32).div(16).reshape(-1, 1, 8, 8)
        y = torch.tensor(d.target, dtype=torch.long)
        return Split(x[:-500], x[-500:], y[:-500], y[-500:],
                     "scikit-learn digits (8×8): 1 297 train / 500 held out")
    if data_dir is None:
        raise ValueError(f"--dataset {dataset} needs --data-dir (a folder with the files); "
                         "fastjac never downloads data")
    folder = Path(data_dir)
    if not folder.is_dir():
        raise ValueError(f"--data-dir {folder} is not a folder")
    return _mnist(folder) if dataset == "mnist" else _celeba(folder)
