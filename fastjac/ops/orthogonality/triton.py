"""Triton backend of ``orthogonality_penalty``.

The shared Gram kernel gives C = J_wᵀJ_w (norms and dot products, one pass over J); one
program per sample then forms cos² over the off-block pairs (forward) or
Γ = ∂P/∂C (backward, see ``reference``), and the shared one-pass kernel writes
∂P/∂J = 2 W J Γ and ∂P/∂w. Shapes as ``reference``.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from .. import _dispatch, _triton
from . import OP


@triton.jit
def _cosine_kernel(C, grad, out, k, block_size, eps, pairs, BACKWARD: tl.constexpr, BK: tl.constexpr):
    """Program b: P[b] = Σ_{i<j off-block} cos²_ij / pairs, or Γ[b] = ∂(grad_b P[b])/∂C[b].
    C holds the lower triangle of each (k, k) Gram matrix."""
    b = tl.program_id(0).to(tl.int64)
    idx = tl.arange(0, BK)
    row = idx[:, None]
    col = idx[None, :]
    inside = (row < k) & (col < k)
    Cb = tl.load(C + b * k * k + tl.maximum(row, col) * k + tl.minimum(row, col), mask=inside, other=0.0)
    n = tl.sqrt(tl.maximum(tl.sum(tl.where(row == col, Cb, 0.0), axis=1), 0.0))
    q = n[:, None] * n[None, :] + eps
    off = inside & ((row // block_size) != (col // block_size))
    if BACKWARD:
        g = tl.load(grad + b).to(tl.float32) / pairs
        gamma = tl.where(off, g * Cb / (q * q), 0.0)
        dn = -tl.sum(tl.where(off, g * Cb * Cb * n[None, :] / (q * q * q), 0.0), axis=1)  # Γ_ii n_i
        diag = tl.where(n > 0, dn / tl.where(n > 0, n, 1.0), 0.0)
        gamma += tl.where(row == col, diag[:, None], 0.0)
        tl.store(out + b * k * k + row * k + col, gamma, mask=inside)
    else:
        cos = Cb / q
        tl.store(out + b, tl.sum(tl.sum(tl.where(off, cos * cos, 0.0), axis=1), axis=0) / (2 * pairs))


@torch.library.custom_op("fastjac::triton_orthogonality_cosines", mutates_args=())
def _cosines(C: torch.Tensor, grad: Optional[torch.Tensor], block_size: int, eps: float) -> torch.Tensor:
    """From the lower triangles C (B, k, k): P (B,), or Γ (B, k, k) given grad (B,); fp32.
    A custom op because the backward runs it under AOT autograd's tracing."""
    B, k, _ = C.shape
    pairs = (k * k - (k // block_size) * block_size ** 2 - (k % block_size) ** 2) // 2  # off-block, i < j
    out = torch.empty((B, k, k) if grad is not None else (B,), dtype=torch.float32, device=C.device)
    _cosine_kernel[(B,)](C, C if grad is None else grad.to(torch.float32).contiguous(), out, k, block_size,
                         float(eps), float(pairs), BACKWARD=grad is not None, BK=_triton.pad(k), num_warps=_triton.warps(_triton.pad(k) ** 2))
    return out


@_cosines.register_fake
def _(C, grad, block_size, eps):
    B, k, _ = C.shape
    return C.new_empty((B, k, k) if grad is not None else (B,), dtype=torch.float32)


def forward(J, w, block_size: int, eps: float):
    return _cosines(_triton.gram(J, w), None, block_size, eps)


def backward(J, w, block_size, eps, grad, needs_input_grad=(True, True)):
    gamma = _cosines(_triton.gram_op(J, w, False), grad, block_size, eps)
    return _triton.apply_gamma(J, w, gamma, needs_input_grad[0], needs_input_grad[1])


# One program holds the whole (k, k) cos² tile: beyond 128 columns it spills and takes minutes
# to compile, so larger k stays on the reference.
MAX_COLUMNS = 128
_dispatch.register(OP, "triton", _dispatch.Implementation(
    forward, backward, functools.partial(_triton.unsupported, max_d=MAX_COLUMNS)))
