"""Reference form of the column estimator R = Σ_i s_i log(1 + ‖J_w e_i‖²/β) and its backward.

J holds k columns (B, D, k) — all d for the Hadamard bound (s = 1), or the k drawn
columns of GRAE≈ with s_i = 1/(k p(c_i)). Only the column norms n_i = Σ_r w_r J_ri² are
needed, so Γ = ∂R/∂G is diagonal: Γ_ii = s_i / (β + n_i).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._gram import accumulation_dtype


def _norms(J: Tensor, w: Optional[Tensor]) -> Tensor:
    """n_i = Σ_r w_r J_ri², (B, k). (J*J).sum beats vector_norm over the middle dim 2× on the CPU."""
    Jc = J.to(accumulation_dtype(J.dtype))
    if w is None:
        return (Jc * Jc).sum(1)
    return (w.to(Jc.dtype).unsqueeze(1) @ (Jc * Jc)).squeeze(1)


def forward(J: Tensor, w: Optional[Tensor], beta: Tensor, scale: Optional[Tensor]) -> Tensor:
    n = _norms(J, w)
    terms = torch.log1p(n / beta.to(n.dtype))
    if scale is not None:
        terms = terms * scale.to(n.dtype)
    return terms.sum(-1)


def backward(J, w, beta, scale, grad, needs_input_grad=(True, True, True)):
    n = _norms(J, w)
    beta = beta.to(n.dtype)
    s = grad.to(n.dtype)[:, None] if scale is None else grad.to(n.dtype)[:, None] * scale.to(n.dtype)
    gamma = s / (beta + n)  # (B, k), the diagonal of Γ
    Jc = J.to(n.dtype)
    grad_J = grad_w = grad_beta = None
    if needs_input_grad[0]:
        grad_J = Jc * (2 * gamma).unsqueeze(1)
        if w is not None:
            grad_J = grad_J * w.to(n.dtype).unsqueeze(-1)
    if needs_input_grad[1] and w is not None:
        grad_w = ((Jc * Jc) @ gamma.unsqueeze(-1)).squeeze(-1)
    if needs_input_grad[2]:
        grad_beta = -(gamma * n).sum() / beta
    return grad_J, grad_w, grad_beta
