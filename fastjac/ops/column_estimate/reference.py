"""Reference column estimator R = Σ_i s_i log(1 + ‖J_w e_i‖²/β) and the formulas every backend
shares (docs/maths.md#stochastic-column-estimators).

J holds k columns (B, D, k) — all d for the Hadamard bound (s = 1), or the k drawn
columns of GRAE≈ with s_i = 1/(k p(c_i)). Only the column norms n_i = Σ_r w_r J_ri² enter
(a backend's ``forward(J, w)`` computes them), so Γ = ∂R/∂G is diagonal: Γ_ii = s_i / (β + n_i).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._gram import column_norms

forward = column_norms  # the torch backend's n (B, k)


def _log1p_ratio(n: Tensor, beta: Tensor) -> Tensor:
    """log(1 + n/β), also where n/β overflows but n does not. Narrower than float64: the ratio
    in float64, where a finite float32 n over any positive float32 β cannot overflow (4 kernels).
    float64: then log n − log β (the dropped log1p(β/n) is below the dtype's resolution)."""
    if n.dtype != torch.float64:
        return torch.log1p(n.double() / beta.double()).to(n.dtype)
    ratio = n / beta
    large = torch.isinf(ratio) & torch.isfinite(n)
    safe_n = torch.where(large, n, torch.ones_like(n))
    return torch.where(large, torch.log(safe_n) - torch.log(beta), torch.log1p(ratio))


def value(n: Tensor, beta: Tensor, scale: Optional[Tensor]) -> Tensor:
    """R (B,) from the norms n (B, k)."""
    terms = _log1p_ratio(n, beta.to(n.dtype))
    if scale is not None:
        terms = terms * scale.to(n.dtype)
    return terms.sum(-1)


def gamma(n: Tensor, grad: Tensor, beta: Tensor, scale: Optional[Tensor]) -> Tensor:
    """The diagonal of Γ = ∂(Σ_b grad_b R_b)/∂G, (B, k): grad_b s_i / (β + n_i)."""
    s = grad.to(n.dtype)[:, None]
    if scale is not None:
        s = s * scale.to(n.dtype)
    return s / (beta.to(n.dtype) + n)


def beta_gradient(gamma: Tensor, n: Tensor, beta: Tensor) -> Tensor:
    """∂(Σ_b grad_b R_b)/∂β = −Σ γ_i n_i / β, from the diagonal Γ."""
    return -(gamma * n).sum() / beta.to(n.dtype)
