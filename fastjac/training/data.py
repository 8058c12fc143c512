"""Data sets for the trainer, as images in [0, 1] shaped (C, H, W). Nothing is downloaded.

- ``digits``: scikit-learn's 8×8 digits (shipped with scikit-learn), 1500 train / 297 held out.
- ``mnist``: IDX files in ``data_dir`` (gzipped or raw): train-images-idx3-ubyte and
  t10k-images-idx3-ubyte (train / held out). With one file alone its images are split in
  halves (for the t10k file: 5 000 / 5 000, as the project does for development).
- ``celeba``: an image folder (searched recursively for .jpg/.jpeg/.png, e.g. CelebA's
  img_align_celeba/), each image center-cropped to a square and resized to 64×64; the last
  min(5 000, N // 10) files in sorted order are held out. Every file's header is checked when the
  data set is built (a format PIL reads, at most ``MAX_IMAGE_PIXELS`` pixels); the pixels are read
  as batches are drawn.

Every file that cannot be decoded raises a :class:`~fastjac.training.errors.DataError` naming it.
"""
from __future__ import annotations

import gzip
import os
import struct
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from .errors import DataError

DATASETS = ("digits", "mnist", "celeba")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
MNIST_FILES = {"train": "train-images-idx3-ubyte", "test": "t10k-images-idx3-ubyte"}
MNIST_LAYOUT = ("MNIST IDX image files: train-images-idx3-ubyte[.gz] and/or t10k-images-idx3-ubyte[.gz] "
                "directly in the folder")
CELEBA_LAYOUT = "a folder of face images (*.jpg, *.jpeg, *.png; e.g. CelebA's img_align_celeba/)"
# Larger images are refused before their pixels are decoded (CelebA's are 178×218 aligned, at most
# a few megapixels in the wild); PIL's own "decompression bomb" limit is above this.
MAX_IMAGE_PIXELS = 64_000_000


class InMemory:
    """Images held in one tensor (N, C, H, W)."""

    def __init__(self, images: Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, indices: Tensor) -> Tensor:
        return self.images[indices]


def _open_image(path: Path):
    """PIL's lazily decoded image of ``path`` (header read, size checked); DataError if unusable."""
    from PIL import Image
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit follows
            image = Image.open(path)
    except Image.DecompressionBombError as e:
        raise DataError(f"image {path} is too large to decode safely: {e}") from None
    except (OSError, ValueError, SyntaxError) as e:  # PIL's errors for files it cannot identify
        raise DataError(f"cannot read image {path}: {e}") from None
    w, h = image.size
    if w * h > MAX_IMAGE_PIXELS:
        image.close()
        raise DataError(f"image {path} has {w}×{h} = {w * h / 1e6:.0f} megapixels, more than the "
                        f"{MAX_IMAGE_PIXELS / 1e6:.0f} this loader decodes; remove or shrink it")
    return image


def _check_image(path: Path) -> Optional[str]:
    """None if ``path`` has a readable header and a size within the limit, else why not."""
    try:
        with _open_image(path) as image:
            image.verify()  # the file's structure (chunk checksums for PNG), without decoding
    except DataError as e:
        return str(e)
    except Exception as e:  # verify() raises whatever its decoder meets in a damaged file
        return f"cannot read image {path}: {e}"
    return None


def check_images(paths: Sequence[Path], *, workers: int = 8) -> None:
    """Refuse a set of image files if any has an unreadable header or too many pixels, naming
    the first few; the headers are read in parallel (files, not pixels: cheap)."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        problems = [p for p in pool.map(_check_image, paths) if p is not None]
    if problems:
        more = f" (and {len(problems) - 3} more bad files)" if len(problems) > 3 else ""
        raise DataError(f"{len(problems)} of {len(paths)} image files cannot be used: "
                        + "; ".join(problems[:3]) + more)


class ImageFiles:
    """Image files read on demand: center crop (side ``crop``, default the shorter side), resize."""

    def __init__(self, paths: Sequence[Path], *, size: int = 64, crop: Optional[int] = None):
        self.paths, self.size, self.crop = list(paths), size, crop

    def __len__(self) -> int:
        return len(self.paths)

    def _load(self, path: Path) -> Tensor:
        from PIL import Image
        try:
            with _open_image(path) as image:
                image = image.convert("RGB")
                w, h = image.size
                side = min(w, h) if self.crop is None else min(self.crop, w, h)
                left, top = (w - side) // 2, (h - side) // 2
                image = image.crop((left, top, left + side, top + side))
                image = image.resize((self.size, self.size), Image.BICUBIC)
                array = np.asarray(image, dtype=np.uint8)
        except DataError:
            raise
        except (OSError, ValueError, SyntaxError) as e:  # a file damaged after the header check
            raise DataError(f"cannot read image {path}: {e}") from None
        return torch.from_numpy(array.copy()).permute(2, 0, 1)

    def batch(self, indices: Tensor) -> Tensor:
        return torch.stack([self._load(self.paths[i]) for i in indices.tolist()]).float() / 255.0


Source = Union[InMemory, ImageFiles]


class Dataset(NamedTuple):
    name: str
    train: Source
    test: Source
    shape: tuple  # (C, H, W)


def _digits() -> Dataset:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("dataset 'digits' needs scikit-learn: pip install scikit-learn "
                         "(or pip install -e '.[experiments]')") from None
    x = torch.tensor(load_digits().data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    return Dataset("digits", InMemory(x[:1500]), InMemory(x[1500:]), (1, 8, 8))


def read_idx_images(path: Path) -> Tensor:
    """IDX3 unsigned-byte images (gzipped or raw) -> (N, 1, H, W) float in [0, 1]."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:
        damaged = isinstance(e, (zlib.error, gzip.BadGzipFile, EOFError))  # a damaged gzip stream
        raise DataError(f"cannot read MNIST file {path}: {'damaged or truncated compressed data: ' if damaged else ''}"
                        f"{e or type(e).__name__}") from None
    if len(data) < 16:
        raise DataError(f"{path} is not an IDX image file: {len(data)} bytes, shorter than its 16-byte header")
    magic, n, rows, cols = struct.unpack(">IIII", data[:16])
    if magic != 0x00000803:
        raise DataError(f"{path} is not an IDX image file (magic {magic:#010x}, expected 0x00000803)")
    if len(data) != 16 + n * rows * cols:
        raise DataError(f"{path} is truncated or malformed: header says {n}×{rows}×{cols} images "
                         f"({16 + n * rows * cols} bytes), the file has {len(data)} bytes")
    images = np.frombuffer(data, dtype=np.uint8, offset=16).reshape(n, 1, rows, cols)
    return torch.from_numpy(images.copy()).float() / 255.0


def _find_idx(folder: Path, stem: str) -> Optional[Path]:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _mnist(data_dir: Path) -> Dataset:
    found = {split: _find_idx(data_dir, stem) for split, stem in MNIST_FILES.items()}
    if found["test"] is None and found["train"] is None:
        raise DataError(f"no MNIST data in {data_dir}: expected {MNIST_LAYOUT}")
    train, test = (read_idx_images(p) if p is not None else None for p in (found["train"], found["test"]))
    if train is None or test is None:  # one file alone: hold out its second half
        x = test if train is None else train
        train, test = x[: len(x) // 2], x[len(x) // 2:]
    if train.shape[1:] != (1, 28, 28):
        raise DataError(f"MNIST images in {data_dir} are {tuple(train.shape[2:])}, expected 28×28")
    return Dataset("mnist", InMemory(train), InMemory(test), (1, 28, 28))


def _celeba(data_dir: Path, crop: Optional[int]) -> Dataset:
    paths = sorted(p for p in data_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if len(paths) < 2:
        raise DataError(f"found {len(paths)} image(s) under {data_dir}: expected {CELEBA_LAYOUT}")
    check_images(paths)
    held = max(1, min(5000, len(paths) // 10))
    return Dataset("celeba", ImageFiles(paths[:-held], crop=crop), ImageFiles(paths[-held:], crop=crop),
                   (3, 64, 64))


def load_dataset(name: str, *, data_dir: Union[str, os.PathLike, None] = None,
                 crop: Optional[int] = None) -> Dataset:
    """The named data set (train and held-out parts).

    Args:
        name: "digits" | "mnist" | "celeba".
        data_dir: folder holding the files (MNIST, CelebA); unused for digits.
        crop: CelebA center-crop side in pixels before resizing (default: the shorter side).

    Example:
        >>> data = load_dataset("mnist", data_dir="DIR")  # DIR: your MNIST IDX files
        >>> data.train.batch(torch.arange(4)).shape
        torch.Size([4, 1, 28, 28])
    """
    if name not in DATASETS:
        raise DataError(f"dataset must be one of {', '.join(map(repr, DATASETS))}; got {name!r}")
    if name == "digits":
        return _digits()
    layout = MNIST_LAYOUT if name == "mnist" else CELEBA_LAYOUT
    if data_dir is None:
        raise DataError(f"dataset {name!r} is read from --data-dir (nothing is downloaded): give a folder "
                         f"with {layout}")
    folder = Path(data_dir).expanduser()
    if not folder.is_dir():
        raise DataError(f"data_dir {folder} is not a folder: expected {layout}")
    return _mnist(folder) if name == "mnist" else _celeba(folder, crop)
