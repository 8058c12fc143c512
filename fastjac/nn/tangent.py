"""Decoder layers that carry their own forward tangents through the fused tangent_linear op.

``TangentLinear`` is Linear + activation; ``TangentMLP`` stacks them. Their ``forward`` is
plain PyTorch (so torch.func, brute force and any other tool see an ordinary module), and
their ``tangent_forward(z, tangents)`` pushes the primal and k tangents through
:func:`fastjac.ops.tangent_linear.tangent_linear` layer by layer, which
:func:`fastjac.jacobian_columns` (and so every estimator) uses automatically.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from .. import _validation as check
from ..ops.tangent_linear import ACTIVATIONS, reference, tangent_linear


class TangentLinear(nn.Linear):
    """σ(x Wᵀ + b) with a fused tangent path.

    Example:
        >>> layer = TangentLinear(8, 16, activation="tanh")
        >>> y, U = layer.tangent_forward(torch.randn(4, 8), torch.randn(2, 4, 8))
        >>> U.shape
        torch.Size([2, 4, 16])
    """

    def __init__(self, in_features: int, out_features: int, *, activation: str = "elu",
                 bias: bool = True, backend: str = "auto", device=None, dtype=None):
        check.choice("activation", activation, ACTIVATIONS)
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.activation, self.backend = activation, backend

    def forward(self, x: Tensor) -> Tensor:
        return reference.activation(self.activation, super().forward(x))

    def tangent_forward(self, x: Tensor, tangents: Tensor):
        """(N, in), (k, N, in) -> (N, out), (k, N, out)."""
        return tangent_linear(x, tangents, self.weight, self.bias, activation=self.activation,
                              backend=self.backend)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation}"


class TangentMLP(nn.Module):
    """MLP decoder z (B, widths[0]) -> (B, *out_shape) whose Jacobian columns come from fused kernels.

    Hidden layers use ``activation``, the last layer ``output_activation``.

    Example:
        >>> dec = TangentMLP([8, 64, 784], activation="elu", output_activation="sigmoid", out_shape=(1, 28, 28))
        >>> out, J = fastjac.jacobian_columns(dec, torch.randn(4, 8))   # fused path
        >>> J.shape
        torch.Size([4, 784, 8])
    """

    def __init__(self, widths: Sequence[int], *, activation: str = "elu", output_activation: str = "identity",
                 out_shape: Optional[Sequence[int]] = None, backend: str = "auto", device=None, dtype=None):
        super().__init__()
        widths = list(widths)
        if len(widths) < 2:
            raise ValueError(f"widths must list at least an input and an output size, got {widths}")
        for i, w in enumerate(widths):
            check.positive_int(f"widths[{i}]", w)
        self.out_shape = (widths[-1],) if out_shape is None else tuple(out_shape)
        if math.prod(self.out_shape) != widths[-1]:
            raise ValueError(f"out_shape {self.out_shape} must hold widths[-1] = {widths[-1]} values")
        acts = [activation] * (len(widths) - 2) + [output_activation]
        self.layers = nn.ModuleList(
            TangentLinear(a, b, activation=act, backend=backend, device=device, dtype=dtype)
            for a, b, act in zip(widths[:-1], widths[1:], acts))

    def forward(self, z: Tensor) -> Tensor:
        for layer in self.layers:
            z = layer(z)
        return z.reshape(z.shape[0], *self.out_shape)

    def tangent_forward(self, z: Tensor, tangents: Tensor):
        """(B, d), (k, B, d) -> (B, *out_shape), (k, B, *out_shape)."""
        for layer in self.layers:
            z, tangents = layer.tangent_forward(z, tangents)
        return z.reshape(z.shape[0], *self.out_shape), tangents.reshape(*tangents.shape[:2], *self.out_shape)
