"""The encoder/decoder pairs the benchmarks train, from :mod:`fastjac.models`.

"mlp": two hidden layers of 256·width units on 28×28 data; "mlp_fused": the same decoder as a
:class:`fastjac.nn.TangentMLP`, whose Jacobian columns come from the fused tangent_linear op; "mnist" and "celeba": the App. D
conv architectures with every channel count multiplied by ``width`` (1.0 is the paper's).
Decoder BatchNorm runs in eval mode in every benchmark, for every rival alike: the per-sample
Jacobian is exact there (docs/maths.md#batch-coupling), and the baselines' per-sample ``vmap`` cannot run
train-mode BatchNorm.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..models.networks import DATA_SHAPES, ConvDecoder, ConvEncoder, MLPDecoder, MLPEncoder, _channels
from ..nn.tangent import TangentMLP

MODELS = ("mlp", "mlp_fused", "mnist", "celeba")


@dataclass(frozen=True)
class Model:
    encoder: nn.Module       # (B, *x_shape) -> (B, code_dim)
    decoder: nn.Module       # (B, d) -> (B, *x_shape), BatchNorm in eval mode
    x_shape: tuple
    latent_dim: int


def build(name: str, latent_dim: int, *, code_dim: int, width: float = 1.0, device="cpu") -> Model:
    """Model ``name`` ("mlp" | "mnist" | "celeba") on ``device``; its encoder ends in a
    ``code_dim`` linear head (d for a code, 2d for a mean-field posterior)."""
    if name in ("mlp", "mlp_fused"):
        x_shape, hidden = DATA_SHAPES["mnist"], (_channels(256, width),) * 2
        trunk = MLPEncoder(x_shape, hidden=hidden)
        if name == "mlp":
            dec = MLPDecoder(latent_dim, x_shape, hidden=hidden)
        else:
            dec = TangentMLP([latent_dim, *hidden, math.prod(x_shape)], activation="elu",
                             output_activation="sigmoid", out_shape=x_shape)
    elif name in ("mnist", "celeba"):
        x_shape = DATA_SHAPES[name]
        trunk, dec = ConvEncoder(name, width=width), ConvDecoder(latent_dim, name, width=width)
    else:
        raise ValueError(f"model must be one of {', '.join(map(repr, MODELS))}, got {name!r}")
    enc = nn.Sequential(trunk, nn.Linear(trunk.out_features, code_dim)).to(device).train()
    return Model(enc, dec.to(device).eval(), x_shape, latent_dim)


def data(model: Model, batch: int, *, device, generator: torch.Generator) -> torch.Tensor:
    """A fixed batch in [0, 1] shaped like the model's data."""
    return torch.rand((batch, *model.x_shape), generator=generator).to(device)
