"""A PNG grid of images (rows of originals, reconstructions, samples), written atomically."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from .errors import writing


def image_grid(rows: Sequence[Tensor], *, pad: int = 2, min_size: int = 32) -> np.ndarray:
    """Rows of (n, C, H, W) images in [0, 1] -> one uint8 array (H', W', 3); small images are
    enlarged by an integer factor (nearest neighbour) to at least ``min_size`` pixels."""
    C, H, W = rows[0].shape[1:]
    scale = max(1, -(-min_size // H))
    h, w = H * scale, W * scale
    cols = max(len(r) for r in rows)
    grid = np.full((len(rows) * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i, row in enumerate(rows):
        images = row.detach().float().clamp(0, 1).cpu()
        images = images.expand(-1, 3, -1, -1) if C == 1 else images
        images = images.repeat_interleave(scale, 2).repeat_interleave(scale, 3)
        pixels = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
        for j, image in enumerate(pixels):
            top, left = pad + i * (h + pad), pad + j * (w + pad)
            grid[top: top + h, left: left + w] = image
    return grid


def save_png(array: np.ndarray, path) -> None:
    from PIL import Image
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with writing(path):
            Image.fromarray(array).save(tmp, format="PNG")
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
