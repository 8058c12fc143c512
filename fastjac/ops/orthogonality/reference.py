"""Reference orthogonality penalty and the formulas every backend shares
(docs/maths.md#orthogonality-penalty).

P = mean over column pairs i < j in different blocks of cos²(a_i, a_j), a = J_w e,
cos(a, b) = ⟨a, b⟩ / (‖a‖‖b‖ + ε). With C = J_wᵀJ_w, n_i = √C_ii, q_ij = n_i n_j + ε and
S the symmetric off-block mask (N pairs): P = Σ_ij S_ij C_ij² / q_ij² / (2N), so
Γ_ij = S_ij C_ij / (N q_ij²) off the diagonal and Γ_ii = −(1/(N n_i)) Σ_j S_ij C_ij² n_j / q_ij³.
A backend supplies C (``forward(J, w)``: the full symmetric Gram) and its pass over J.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .._gram import block_mask, gram

forward = gram  # the torch backend's C (B, k, k)


def off_block_mask(k: int, block_size: int, *, device, dtype) -> Tensor:
    """(k, k) symmetric mask of column pairs in different blocks."""
    return 1 - block_mask(k, block_size, device=device, dtype=dtype)


def _parts(C: Tensor, block_size: int, eps: float):
    k = C.shape[-1]
    S = off_block_mask(k, block_size, device=C.device, dtype=C.dtype)
    n = C.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt()
    q = n.unsqueeze(-1) * n.unsqueeze(-2) + eps
    pairs = S.sum() / 2
    return S, n, q, pairs


def penalty(C: Tensor, block_size: int, eps: float) -> Tensor:
    """P (B,) from the Gram matrices C (B, k, k)."""
    S, n, q, pairs = _parts(C, block_size, eps)
    return (S * (C / q) ** 2).sum((-2, -1)) / (2 * pairs)


def gamma(C: Tensor, grad: Tensor, block_size: int, eps: float) -> Tensor:
    """Γ = ∂(Σ_b grad_b P_b)/∂C, (B, k, k) symmetric."""
    S, n, q, pairs = _parts(C, block_size, eps)
    g = grad.to(C.dtype)[:, None, None] / pairs
    off = g * S * C / q ** 2
    dn = -(g * S * C ** 2 * n.unsqueeze(-2) / q ** 3).sum(-1)  # Γ_ii · n_i
    safe_n = torch.where(n > 0, n, torch.ones_like(n))
    diag = torch.where(n > 0, dn / safe_n, torch.zeros_like(n))
    return off + torch.diag_embed(diag)
