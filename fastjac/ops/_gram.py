"""What every operator on J shares: the weighted Gram matrix and its backward.

All three operators are functions of G = Jᵀ W J (W = diag(w)). If R = f(G) and
Γ = ∂R/∂G is symmetric, then ∂R/∂J = 2 W J Γ and ∂R/∂w_r = J_r Γ J_rᵀ, so each
operator's backward is "compute Γ, then one pass over J". Reference forms here,
in differentiable PyTorch ops (they double as the double-backward path).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything narrower accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def gram(J: Tensor, w: Optional[Tensor]) -> Tensor:
    """G = Jᵀ diag(w) J: (B, D, k), (B, D) -> (B, k, k) in the accumulation dtype."""
    Jc = J.to(accumulation_dtype(J.dtype))
    Jw = Jc if w is None else Jc * w.to(Jc.dtype).unsqueeze(-1)
    return Jc.mT @ Jw


def gram_backward(J: Tensor, w: Optional[Tensor], gamma: Tensor, need_weights: bool = True):
    """(∂R/∂J, ∂R/∂w) from Γ = ∂R/∂G (symmetric, (B, k, k)); ∂R/∂w is None when w is."""
    Jc = J.to(gamma.dtype)
    JG = Jc @ gamma
    wc = None if w is None else w.to(gamma.dtype).unsqueeze(-1)
    grad_J = 2 * JG if wc is None else 2 * wc * JG
    grad_w = (JG * Jc).sum(-1) if (w is not None and need_weights) else None
    return grad_J, grad_w


def block_mask(k: int, block_size: int, *, device, dtype=torch.bool) -> Tensor:
    """(k, k) mask, true where columns i and j lie in the same block of consecutive latents."""
    ids = torch.arange(k, device=device) // block_size
    return (ids[:, None] == ids[None, :]).to(dtype)
