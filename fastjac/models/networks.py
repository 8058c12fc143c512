"""Encoders and decoders: an MLP and the convolutional architectures of the paper's App. D.

Encoders map x (B, *data_shape) to features (B, F) (``out_features``); a head turns them into
a code (GRAE: ``nn.Linear(F, d)``) or a posterior (β-VAE: :class:`GaussianPosterior`).
Decoders map z (B, d) to (B, *data_shape) in (0, 1) (sigmoid output, as in App. D) and carry
``latent_dim`` and ``data_shape``.

Choices App. D leaves open, made here:
- padding: stride-1 layers keep the size ("same", asymmetric for even kernels); stride-2
  convolutions halve it, stride-2 transposed convolutions double it exactly;
- a stride-1 "ConvT" is a convolution with a flipped kernel, so it is built as one (same size);
- CelebA's decoder starts at 8×8, not the table's 16×16: three stride-2 layers from 16×16
  would give 128×128 images, not 64×64;
- decoder normalisation: BatchNorm (``norm="batch"``; the models take per-sample Jacobians
  through it with the batch statistics held constant, see ``batchnorm.py``) or none
  (``norm="none"``).
``width`` multiplies every channel count (1.0 is the paper's), so tests can shrink the nets.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from .. import _validation as check

# (channels, kernel, stride) of each encoder convolution, App. D.
ENCODER_LAYERS = {
    "mnist": [(64, 4, 1), (128, 4, 2), (256, 4, 2), (512, 4, 2), (512, 4, 1)],
    "celeba": [(128, 5, 1), (256, 5, 2), (512, 5, 2), (1024, 5, 2), (1024, 5, 2)],
}
# Decoder: FC to (channels, size, size), then (channels, kernel, stride, normalised) ConvT
# layers, then a stride-1 convolution to the image channels and a sigmoid.
DECODER_LAYERS = {
    "mnist": dict(start=(256, 7), layers=[(512, 4, 1, True), (256, 4, 1, True), (128, 4, 2, True),
                                          (64, 4, 2, False)], kernel=4),
    "celeba": dict(start=(512, 8), layers=[(1024, 5, 1, True), (512, 5, 2, True), (256, 5, 2, True),
                                           (128, 5, 2, False)], kernel=5),
}
DATA_SHAPES = {"mnist": (1, 28, 28), "celeba": (3, 64, 64)}
NORMS = ("batch", "none")


def _channels(c: int, width: float) -> int:
    return max(1, int(round(c * width)))


def _check_width(width):
    if not (isinstance(width, (int, float)) and math.isfinite(width) and width > 0):
        raise ValueError(f"width must be a finite number > 0, got {width!r}")


def _same_conv(c_in: int, c_out: int, kernel: int) -> nn.Sequential:
    """Stride-1 convolution that keeps the spatial size (asymmetric padding for even kernels)."""
    lo, hi = (kernel - 1) // 2, kernel // 2
    return nn.Sequential(nn.ZeroPad2d((lo, hi, lo, hi)), nn.Conv2d(c_in, c_out, kernel))


def _conv(c_in: int, c_out: int, kernel: int, stride: int, transposed: bool = False) -> nn.Module:
    if stride == 1:
        return _same_conv(c_in, c_out, kernel)
    pad = (kernel - 1) // 2
    if transposed:  # output = 2 · input exactly
        return nn.ConvTranspose2d(c_in, c_out, kernel, stride, pad, output_padding=2 + 2 * pad - kernel)
    return nn.Conv2d(c_in, c_out, kernel, stride, pad)


def _decoder_norm(norm: str, channels: int) -> nn.Module:
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    return nn.Identity()


class ConvEncoder(nn.Sequential):
    """App. D encoder without its final FC: x (B, C, H, W) -> features (B, F).

    Example:
        >>> enc = ConvEncoder("mnist", width=0.125)
        >>> enc(torch.rand(2, 1, 28, 28)).shape[1] == enc.out_features
        True
    """

    def __init__(self, architecture: str = "mnist", *, width: float = 1.0):
        check.choice("architecture", architecture, ENCODER_LAYERS)
        _check_width(width)
        layers, c_in = [], DATA_SHAPES[architecture][0]
        for c, k, s in ENCODER_LAYERS[architecture]:
            c = _channels(c, width)
            layers += [_conv(c_in, c, k, s), nn.BatchNorm2d(c), nn.ELU()]
            c_in = c
        super().__init__(*layers, nn.Flatten())
        self.data_shape = DATA_SHAPES[architecture]
        with torch.no_grad():
            self.out_features = self.eval()(torch.zeros(1, *self.data_shape)).shape[1]
        self.train()


class ConvDecoder(nn.Sequential):
    """App. D decoder: z (B, d) -> images (B, C, H, W) in (0, 1).

    Example:
        >>> dec = ConvDecoder(12, "mnist", width=0.125)
        >>> dec(torch.randn(2, 12)).shape
        torch.Size([2, 1, 28, 28])
    """

    def __init__(self, latent_dim: int, architecture: str = "mnist", *, width: float = 1.0,
                 norm: str = "batch"):
        check.positive_int("latent_dim", latent_dim)
        check.choice("architecture", architecture, DECODER_LAYERS)
        check.choice("norm", norm, NORMS)
        _check_width(width)
        spec = DECODER_LAYERS[architecture]
        c_in, size = spec["start"]
        c_in = _channels(c_in, width)
        layers = [nn.Linear(latent_dim, c_in * size * size), nn.Unflatten(1, (c_in, size, size)),
                  _decoder_norm(norm, c_in), nn.ELU()]
        for c, k, s, normalised in spec["layers"]:
            c = _channels(c, width)
            layers += [_conv(c_in, c, k, s, transposed=True)]
            layers += [_decoder_norm(norm, c)] if normalised else []
            layers += [nn.ELU()]
            c_in = c
        self.data_shape = DATA_SHAPES[architecture]
        layers += [_same_conv(c_in, self.data_shape[0], spec["kernel"]), nn.Sigmoid()]
        super().__init__(*layers)
        self.latent_dim = latent_dim


def _mlp(sizes: Sequence[int]) -> list:
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ELU()]
    return layers


class MLPEncoder(nn.Sequential):
    """x (B, *data_shape) -> features (B, hidden[-1]): flatten, then Linear+ELU layers.

    Example:
        >>> MLPEncoder((1, 8, 8), hidden=(32,))(torch.rand(3, 1, 8, 8)).shape
        torch.Size([3, 32])
    """

    def __init__(self, data_shape: Sequence[int], *, hidden: Sequence[int] = (256, 256)):
        data_shape = tuple(data_shape)
        super().__init__(nn.Flatten(), *_mlp([math.prod(data_shape), *hidden]))
        self.data_shape, self.out_features = data_shape, hidden[-1] if hidden else math.prod(data_shape)


class MLPDecoder(nn.Sequential):
    """z (B, d) -> (B, *data_shape) in (0, 1): Linear+ELU layers, a Linear and a sigmoid.

    Example:
        >>> MLPDecoder(4, (1, 8, 8), hidden=(32,))(torch.randn(3, 4)).shape
        torch.Size([3, 1, 8, 8])
    """

    def __init__(self, latent_dim: int, data_shape: Sequence[int], *, hidden: Sequence[int] = (256, 256)):
        check.positive_int("latent_dim", latent_dim)
        data_shape = tuple(data_shape)
        sizes = [latent_dim, *hidden]
        super().__init__(*_mlp(sizes), nn.Linear(sizes[-1], math.prod(data_shape)),
                         nn.Sigmoid(), nn.Unflatten(1, data_shape))
        self.latent_dim, self.data_shape = latent_dim, data_shape
