"""Fréchet distances between image sets, on features of a network fastjac trains itself.

This is NOT the Inception FID of the literature: the features come from a small convolutional
classifier trained on the experiment's own training set to tell which of four rotations (0°, 90°,
180°, 270°) was applied to an image — a task that needs no labels, so digits, MNIST and CelebA are
treated alike. Distances compare models within one run, not with published FIDs.
True FID needs the FID Inception-v3 weights given by path (``--inception-weights``; loaded with
``torch.load(weights_only=True)`` into :mod:`.inception`'s network; nothing is downloaded).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .fit import fit
from .inception import fid_inception_v3


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """‖μ_a − μ_b‖² + tr(Σ_a + Σ_b − 2 (Σ_a^½ Σ_b Σ_a^½)^½) of feature sets (N, F) and (M, F).

    Example:
        >>> x = np.random.randn(500, 4)
        >>> frechet_distance(x, x) < 1e-8
        True
    """
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"features must be (N, F) and (M, F) with N, M >= 2, got {a.shape} and {b.shape}")
    a, b = a.astype(np.float64), b.astype(np.float64)
    Sa, Sb = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))  # F = 1 too
    vals, vecs = np.linalg.eigh(Sa)
    root_a = (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T
    cross = np.linalg.eigvalsh(root_a @ Sb @ root_a)
    trace_root = np.sqrt(np.clip(cross, 0, None)).sum()
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(Sa) + np.trace(Sb) - 2 * trace_root)


def rotations(x: Tensor) -> tuple[Tensor, Tensor]:
    """The four rotations of every image (4B, C, H, W) and which one each is (4B,)."""
    rotated = torch.cat([torch.rot90(x, k, dims=(-2, -1)) for k in range(4)])
    return rotated, torch.arange(4, device=x.device).repeat_interleave(len(x))


class FeatureClassifier(nn.Module):
    """Conv net: stride-2 ELU convolutions down to ≤ 4×4, global average pool → features (B, 128),
    then a linear layer to the four rotations. ``loss(x)`` is the rotation task's cross-entropy."""

    def __init__(self, data_shape):
        super().__init__()
        c, h, _ = data_shape
        layers, width = [nn.Conv2d(c, 32, 3, padding=1), nn.ELU()], 32
        for _ in range(max(1, math.ceil(math.log2(h / 4)))):
            out = min(2 * width, 128)
            layers += [nn.Conv2d(width, out, 3, stride=2, padding=1), nn.ELU()]
            width = out
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(width, 4)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))

    def loss(self, x: Tensor) -> Tensor:
        inputs, targets = rotations(x)
        return F.cross_entropy(self(inputs), targets)


def trained_classifier(train, test: Tensor, *, steps: int, seed: int, checkpoint: Path,
                       device: str = "cpu") -> tuple[FeatureClassifier, dict]:
    """Train (or reload) the feature classifier on the source ``train``; returns it in eval mode
    and a record with its rotation accuracy on the held-out images ``test``."""
    torch.manual_seed(seed)
    net = FeatureClassifier(tuple(test.shape[1:]))
    record = fit(net, train, steps=steps, batch_size=64, lr=1e-3, seed=seed, checkpoint=checkpoint,
                 label="feature classifier", device=device)
    net.eval()
    with torch.no_grad():
        inputs, targets = rotations(test)
        predicted = torch.cat([net(c.to(device)).argmax(1).cpu() for c in torch.split(inputs, 500)])
    record["task"] = "rotation (4 classes)"
    record["held_out_accuracy"] = float((predicted == targets).float().mean())
    return net, record


@torch.no_grad()
def features(net, images: Tensor, batch_size: int = 500) -> np.ndarray:
    device = next(net.parameters()).device
    return torch.cat([net.features(c.to(device)).double().cpu() for c in torch.split(images, batch_size)]).numpy()


class InceptionFeatures:
    """pool3 features (2048-d) of the FID Inception-v3 (:mod:`.inception`, pytorch-fid's layout)
    with the user's weights file; nothing is downloaded and torchvision is not needed."""

    def __init__(self, weights: Path, device: str = "cpu"):
        self.net = fid_inception_v3(Path(weights)).to(device)

    def features(self, x: Tensor) -> Tensor:
        return self.net(x)

    def parameters(self):
        return self.net.parameters()
