"""What every operator on J shares: the weighted Gram matrix and the one pass that applies Γ.

All operators are functions of G = Jᵀ W J (W = diag(w)). If R = f(G) and Γ = ∂R/∂G is
symmetric, then ∂R/∂J = 2 W J Γ and ∂R/∂w_r = J_r Γ J_rᵀ, so each operator's backward is
"Γ from the operator's own formula (its ``reference`` module), then one pass over J":
:func:`gram_backward` here, or a backend's own version of it with the same signature
(docs/maths.md#operators). Reference forms, in differentiable PyTorch ops (they double as
the double-backward path).
"""
from __future__ import annotations

import functools
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


def gram_backward(J: Tensor, w: Optional[Tensor], gamma: Tensor, need_J: bool = True,
                  need_w: bool = True, scale: Optional[Tensor] = None):
    """(∂R/∂J, ∂R/∂w) = (2 W J Γ, rowsum((J Γ) ⊙ J)) from Γ = ∂R/∂G, which is (B, k, k)
    symmetric or its (B, k) diagonal, times the per-sample ``scale`` (B,) if given (so that
    Γ = M⁻¹·grad/β needs no (B, k, k) temporary); either result is None when not needed
    (∂R/∂w also when w is None). In Γ's dtype."""
    need_w = need_w and w is not None
    if not (need_J or need_w):
        return None, None
    gamma = per_sample_scaled(gamma, scale)
    Jc = J.to(gamma.dtype)

    def times(G):  # J Γ, with Γ diagonal or not
        return Jc * G.unsqueeze(1) if G.dim() == 2 else Jc @ G
    if need_w:
        JG = times(gamma)
        grad_w = (JG * Jc).sum(-1)
        grad_J = 2 * JG if need_J else None
    else:  # the 2 folded into Γ (exact): one pass over J
        grad_J, grad_w = times(2 * gamma), None
    if grad_J is not None and w is not None:
        grad_J = w.to(gamma.dtype).unsqueeze(-1) * grad_J
    return grad_J, grad_w


def per_sample_scaled(gamma: Tensor, scale: Optional[Tensor]) -> Tensor:
    """Γ (B, k, k) or (B, k) times scale (B,) per sample; Γ itself when scale is None."""
    if scale is None:
        return gamma
    return gamma * scale.to(gamma.dtype).reshape((-1,) + (1,) * (gamma.dim() - 1))


def _uncacheable() -> bool:
    """While tracing (fake tensors) or in inference mode (an inference tensor cannot be saved
    for a later backward) constants are made afresh."""
    return (torch.compiler.is_compiling() or torch._guards.detect_fake_mode() is not None
            or torch.is_inference_mode_enabled())


def block_mask(k: int, block_size: int, *, device, dtype=torch.bool) -> Tensor:
    """(k, k) mask, true where columns i and j lie in the same block of consecutive latents.
    Cached per (k, block_size, device, dtype) (callers must not modify it)."""
    make = _block_mask if _uncacheable() else _cached_block_mask
    return make(k, block_size, torch.device(device), dtype)


def identity(k: int, *, device, dtype) -> Tensor:
    """(k, k) identity, cached like :func:`block_mask` (callers must not modify it)."""
    make = _identity if _uncacheable() else _cached_identity
    return make(k, torch.device(device), dtype)


def _block_mask(k: int, block_size: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    ids = torch.arange(k, device=device) // block_size
    return (ids[:, None] == ids[None, :]).to(dtype)


def _identity(k: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    return torch.eye(k, device=device, dtype=dtype)


_cached_block_mask = functools.lru_cache(maxsize=64)(_block_mask)
_cached_identity = functools.lru_cache(maxsize=64)(_identity)


def column_norms(J: Tensor, w: Optional[Tensor]) -> Tensor:
    """n_i = Σ_r w_r J_ri² = diag(G), (B, D, k) -> (B, k) in the accumulation dtype.
    (J*J).sum beats vector_norm over the middle dim 2× on the CPU."""
    Jc = J.to(accumulation_dtype(J.dtype))
    if w is None:
        return (Jc * Jc).sum(1)
    return (w.to(Jc.dtype).unsqueeze(1) @ (Jc * Jc)).squeeze(1)
