"""Reference orthogonality penalty and its backward.

P = mean over column pairs i < j in different blocks of cos²(a_i, a_j), a = J_w e,
cos(a, b) = ⟨a, b⟩ / (‖a‖‖b‖ + ε). With C = J_wᵀJ_w, n_i = √C_ii, q_ij = n_i n_j + ε and
S the symmetric off-block mask (N pairs): P = Σ_ij S_ij C_ij² / q_ij² / (2N), so
Γ_ij = S_ij C_ij / (N q_ij²) off the diagonal and Γ_ii = −(1/(N n_i)) Σ_j S_ij C_ij² n_j / q_ij³.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._gram import block_mask, gram, gram_backward


def off_block_mask(k: int, block_size: int, *, device, dtype) -> Tensor:
    """(k, k) symmetric mask of column pairs in different blocks."""
    return 1 - block_mask(k, block_size, device=device, dtype=dtype)


def _parts(J, w, block_size, eps):
    C = gram(J, w)
    k = C.shape[-1]
    S = off_block_mask(k, block_size, device=C.device, dtype=C.dtype)
    n = C.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt()
    q = n.unsqueeze(-1) * n.unsqueeze(-2) + eps
    pairs = S.sum() / 2
    return C, S, n, q, pairs


def forward(J: Tensor, w: Optional[Tensor], block_size: int, eps: float) -> Tensor:
    C, S, n, q, pairs = _parts(J, w, block_size, eps)
    return (S * (C / q) ** 2).sum((-2, -1)) / (2 * pairs)


def backward(J, w, block_size, eps, grad, needs_input_grad=(True, True)):
    C, S, n, q, pairs = _parts(J, w, block_size, eps)
    g = grad.to(C.dtype)[:, None, None] / pairs
    off = g * S * C / q ** 2
    dn = -(g * S * C ** 2 * n.unsqueeze(-2) / q ** 3).sum(-1)  # Γ_ii · n_i
    safe_n = torch.where(n > 0, n, torch.ones_like(n))
    diag = torch.where(n > 0, dn / safe_n, torch.zeros_like(n))
    gamma = off + torch.diag_embed(diag)
    if not needs_input_grad[0] and not needs_input_grad[1]:
        return None, None
    return gram_backward(J, w, gamma, need_weights=needs_input_grad[1])
