"""Reference (pure PyTorch) Linear + activation carrying k forward tangents, and its backward.

For a primal input h (N, in), tangents T (k, N, in), weight W (out, in) and bias b (out,):
    a = h Wᵀ + b (pre-activation),   y = σ(a),   V_i = T_i Wᵀ,   U_i = σ′(a) ⊙ V_i.
Backward, from ḡy (N, out) and ḡU (k, N, out):
    ḡV_i = ḡU_i ⊙ σ′(a),   ḡa = ḡy ⊙ σ′(a) + σ″(a) ⊙ Σ_i ḡU_i ⊙ V_i,
    ḡh = ḡa W,   ḡT_i = ḡV_i W,   ḡW = ḡaᵀ h + Σ_i ḡV_iᵀ T_i,   ḡb = Σ_n ḡa.
Written in differentiable ops, so the backward is its own double backward.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

# name -> (σ(a), σ′(a), σ″(a)); ELU has α = 1, softplus β = 1 (torch's defaults).
# identity copies: y and a leave the custom op as separate outputs, which may not alias.
ACTIVATIONS = {
    "identity": (lambda a: a.clone(), lambda a: torch.ones_like(a), lambda a: torch.zeros_like(a)),
    "relu": (F.relu, lambda a: (a > 0).to(a.dtype), lambda a: torch.zeros_like(a)),
    "elu": (F.elu, lambda a: torch.where(a > 0, 1.0, torch.exp(a.clamp_max(0))),
            lambda a: torch.where(a > 0, 0.0, torch.exp(a.clamp_max(0)))),
    "tanh": (torch.tanh, lambda a: 1 - torch.tanh(a) ** 2,
             lambda a: -2 * torch.tanh(a) * (1 - torch.tanh(a) ** 2)),
    "sigmoid": (torch.sigmoid, lambda a: torch.sigmoid(a) * (1 - torch.sigmoid(a)),
                lambda a: torch.sigmoid(a) * (1 - torch.sigmoid(a)) * (1 - 2 * torch.sigmoid(a))),
    "softplus": (F.softplus, torch.sigmoid, lambda a: torch.sigmoid(a) * (1 - torch.sigmoid(a))),
}


def activation(name: str, a: Tensor) -> Tensor:
    return ACTIVATIONS[name][0](a)


def pre_activation(h: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    return F.linear(h, weight, bias)


def forward(h: Tensor, tangents: Tensor, weight: Tensor, bias: Optional[Tensor], name: str):
    """(y (N, out), U (k, N, out), a (N, out)); a is kept for the backward."""
    sigma, d1, _ = ACTIVATIONS[name]
    a = pre_activation(h, weight, bias)
    return sigma(a), d1(a) * (tangents @ weight.mT), a


def backward(h, tangents, weight, bias, name, a, grad_y, grad_U, needs=(True, True, True, True)):
    """(ḡh, ḡT, ḡW, ḡb) from the saved pre-activation a; entries not needed are None."""
    _, d1, d2 = ACTIVATIONS[name]
    s1 = d1(a)
    grad_a = grad_y * s1
    if name not in ("identity", "relu"):  # σ″ = 0 almost everywhere for these
        grad_a = grad_a + d2(a) * (grad_U * (tangents @ weight.mT)).sum(0)
    grad_V = grad_U * s1
    grad_h = grad_a @ weight if needs[0] else None
    grad_T = grad_V @ weight if needs[1] else None
    grad_W = grad_a.mT @ h + (grad_V.mT @ tangents).sum(0) if needs[2] else None
    grad_b = grad_a.sum(0) if (needs[3] and bias is not None) else None
    return grad_h, grad_T, grad_W, grad_b
