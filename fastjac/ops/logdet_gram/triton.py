"""Triton backend of ``logdet_gram`` (exact, Fischer) and ``posterior_covariance``.

Forward, three schedules of the same arithmetic (``PATHS``), chosen by :func:`path`:

- ``"fused"``: one program per sample accumulates G = JᵀWJ over D in fp32 and factorises
  M = I + mask ⊙ G/β in registers (right-looking Cholesky, one column per step). One launch,
  but only B programs: right when B fills the GPU and d is small.
- ``"split"``: the shared Gram kernel (split over D and over tiles of G, atomic fp32 adds),
  then the same in-register Cholesky reading G. Fills the GPU for small B.
- ``"cusolver"``: the Gram kernel, then ``torch.linalg.cholesky_ex``. Register Cholesky
  kernels fall behind cuSOLVER beyond a few dozen latents; the thresholds below are where
  ``benchmarks/triton_ops.py`` (which times every path) says to switch.

Backward: Γ = ∂R/∂G = M⁻¹ · grad/β from L (B·d³, negligible next to the pass over J), then the
shared one-pass kernel writing 2 W J Γ and J_r Γ J_rᵀ. Shapes as ``reference``.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .. import _dispatch, _triton
from .._gram import block_mask
from . import COVARIANCE_OP, OP

PATHS = ("fused", "split", "cusolver")
CHOLESKY_MAX_D = 32   # largest d the default schedule factorises in registers
REGISTER_MAX_D = 128  # largest d the register schedules accept at all (so they can be timed)


@triton.jit
def _logdet_kernel(J, w, G, beta, L, logdet, D, k, block_size, s_b, s_r, s_c, s_wb, s_wr,
                   FUSED: tl.constexpr, HAS_W: tl.constexpr, NATIVE: tl.constexpr,
                   PRECISION: tl.constexpr, ROWS: tl.constexpr, BD: tl.constexpr):
    """Program b: L[b] = chol(I + mask ⊙ G[b]/β) and logdet[b] = 2 Σ log L_ii. G is
    accumulated here (FUSED) or read from the lower triangle the Gram kernel wrote."""
    b = tl.program_id(0).to(tl.int64)
    idx = tl.arange(0, BD)
    row = idx[:, None]
    col = idx[None, :]
    inside = (row < k) & (col < k)
    if FUSED:
        A = _triton.gram_tile(J + b * s_b, w + b * s_wb, 0, D, idx, idx, k, s_r, s_c, s_wr,
                              HAS_W, False, NATIVE, PRECISION, ROWS, BD, BD)
    else:
        A = tl.load(G + b * k * k + tl.maximum(row, col) * k + tl.minimum(row, col), mask=inside, other=0.0)
    same_block = (row // block_size) == (col // block_size)
    A = tl.where(same_block & inside, A / tl.load(beta), 0.0) + tl.where(row == col, 1.0, 0.0)
    Lb = tl.zeros((BD, BD), tl.float32)
    log_pivots = tl.zeros((BD,), tl.float32)
    for j in range(0, k):
        a_j = tl.sum(tl.where(col == j, A, 0.0), axis=1)          # column j of the trailing matrix
        pivot = tl.sqrt(tl.sum(tl.where(idx == j, a_j, 0.0), axis=0))
        l_j = tl.where(idx >= j, a_j / pivot, 0.0)
        Lb = tl.where(col == j, l_j[:, None], Lb)
        A = A - l_j[:, None] * l_j[None, :]
        log_pivots = tl.where(idx == j, tl.log(pivot), log_pivots)
    tl.store(L + b * k * k + row * k + col, Lb, mask=inside)
    tl.store(logdet + b, 2 * tl.sum(log_pivots, axis=0))


def path(B: int, D: int, d: int, device: torch.device) -> str:
    """The schedule for this shape (see the module docstring)."""
    if d > CHOLESKY_MAX_D:
        return "cusolver"
    return "fused" if B >= _triton.programs(device) // 2 else "split"


def factorise(J, w, beta, block_size: int, schedule: Optional[str] = None):
    """(logdet (B,), L (B, d, d)) in fp32 by the given schedule (default :func:`path`)."""
    B, D, k = J.shape
    schedule = schedule or path(B, D, k, J.device)
    if schedule not in PATHS:
        raise ValueError(f"schedule must be one of {PATHS}, got {schedule!r}")
    beta = beta.to(device=J.device, dtype=torch.float32).reshape(1)
    if schedule == "cusolver":
        G = _triton.symmetric(_triton.gram(J, w))
        if block_size < k:
            G = G * block_mask(k, block_size, device=G.device, dtype=G.dtype)
        M = G / beta + torch.eye(k, device=G.device, dtype=G.dtype)
        L = torch.linalg.cholesky_ex(M)[0].contiguous()  # cuSOLVER returns column-major
        return 2 * L.diagonal(dim1=-2, dim2=-1).log().sum(-1), L
    if k > REGISTER_MAX_D:
        raise ValueError(f"schedule {schedule!r} factorises in registers, for d <= {REGISTER_MAX_D}; got {k}")
    fused = schedule == "fused"
    G = None if fused else _triton.gram(J, w)
    L = torch.empty(B, k, k, dtype=torch.float32, device=J.device)
    logdet = torch.empty(B, dtype=torch.float32, device=J.device)
    native, precision = _triton.dot_mode(J.dtype, w is not None)
    _logdet_kernel[(B,)](
        J, J if w is None else w, L if G is None else G, beta, L, logdet, D, k, block_size,
        *J.stride(), *((0, 0) if w is None else w.stride()),
        FUSED=fused, HAS_W=w is not None, NATIVE=native, PRECISION=precision,
        ROWS=_triton.step_rows(_triton.pad(k)), BD=_triton.pad(k), num_warps=_triton.warps(_triton.pad(k) ** 2))
    return logdet, L


def forward(J, w, beta, block_size: int):
    return factorise(J, w, beta, block_size)


def backward(J, w, beta, block_size, L, grad, needs_input_grad=(True, True, True)):
    """(∂/∂J, ∂/∂w, ∂/∂β) of Σ_b grad_b log det M_b: Γ = M⁻¹ grad/β, one pass over J."""
    beta = beta.to(L.dtype)
    grad = grad.to(L.dtype)
    m_inv = torch.cholesky_inverse(L)
    grad_J, grad_w = _triton.apply_gamma(J, w, m_inv * (grad / beta)[:, None, None],
                                         needs_input_grad[0], needs_input_grad[1])
    grad_beta = None
    if needs_input_grad[2]:
        d = L.shape[-1]
        grad_beta = -(grad * (d - m_inv.diagonal(dim1=-2, dim2=-1).sum(-1))).sum() / beta
    return grad_J, grad_w, grad_beta


def posterior_covariance(J, w, beta):
    """Σ* = M⁻¹ from the same factorisation."""
    _, L = factorise(J, w, beta, J.shape[-1])
    return torch.cholesky_inverse(L).contiguous()  # the layout register_fake promises


def posterior_covariance_backward(J, w, beta, sigma, grad, needs_input_grad=(True, True, True)):
    """dΣ = −Σ dM Σ: Γ = −Σ sym(grad) Σ/β, one pass over J; ∂Σ/∂β = (Σ − Σ²)/β."""
    beta = beta.to(sigma.dtype)
    grad = grad.to(sigma.dtype)
    sym = (grad + grad.mT) / 2
    grad_J, grad_w = _triton.apply_gamma(J, w, -(sigma @ sym @ sigma) / beta,
                                         needs_input_grad[0], needs_input_grad[1])
    grad_beta = (grad * (sigma - sigma @ sigma)).sum() / beta if needs_input_grad[2] else None
    return grad_J, grad_w, grad_beta


_dispatch.register(OP, "triton", _dispatch.Implementation(forward, backward, _triton.unsupported))
_dispatch.register(COVARIANCE_OP, "triton", _dispatch.Implementation(
    posterior_covariance, posterior_covariance_backward, _triton.unsupported))
