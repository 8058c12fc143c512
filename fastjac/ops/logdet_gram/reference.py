"""Reference (pure PyTorch) log det M, M = I + mask ⊙ (JᵀWJ)/β, and the formulas every
backend shares: Γ = ∂R/∂G and ∂R/∂β from M⁻¹ (docs/maths.md#log-determinant-and-its-gradients),
and the float32 error estimate (docs/maths.md#numerical-error-and-tolerances).

``block_size`` masks G to its diagonal blocks of consecutive latents: block_size >= d
is the exact log-determinant, smaller blocks give the Fischer bound (a block-diagonal
M has log det = Σ_blocks log det M_bb), block_size 1 the Hadamard bound.
Shapes: J (B, D, d), w (B, D) or None, beta 0-d -> logdet (B,), M⁻¹ (B, d, d), diag M (B, d).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor

from .._gram import block_mask, gram, identity

# Largest estimated error of a float32 log det (relative to 1 + |log det|) or of a float32 Σ*
# (relative, Frobenius) that the operators return instead of refusing.
FLOAT32_TOLERANCE = 1e-2


def matrix(J: Tensor, w: Optional[Tensor], beta: Tensor, block_size: int) -> Tensor:
    """M = I + mask ⊙ G / β, (B, d, d), in the accumulation dtype."""
    G = gram(J, w)
    d = G.shape[-1]
    if block_size < d:
        G = G * block_mask(d, block_size, device=G.device, dtype=G.dtype)
    M = G / beta.to(device=G.device, dtype=G.dtype)
    M.diagonal(dim1=-2, dim2=-1).add_(1)
    return M


def forward(J: Tensor, w: Optional[Tensor], beta: Tensor, block_size: int):
    """(log det M (B,), M⁻¹ (B, d, d), diag M (B, d)) by one Cholesky factorisation; non-syncing:
    a failed factorisation shows as a non-finite log det. diag M = 1 + ‖J_w e_i‖²/β is what the
    float32 error estimate needs, returned so that no caller reads J again for it.
    Differentiable (the double-backward path)."""
    M = matrix(J, w, beta, block_size)
    L, _info = torch.linalg.cholesky_ex(M)
    logdet = 2 * L.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    eye = identity(L.shape[-1], device=L.device, dtype=L.dtype).expand_as(L)
    m_inv = torch.cholesky_solve(eye, L)  # cholesky_inverse would raise (and sync) on a failed L
    return logdet, m_inv, M.diagonal(dim1=-2, dim2=-1).contiguous()


def gamma(m_inv: Tensor, grad: Tensor, beta: Tensor) -> Tensor:
    """Γ = ∂(Σ_b grad_b log det M_b)/∂G = M⁻¹ grad_b / β."""
    return m_inv * (grad.to(m_inv.dtype) / beta.to(m_inv.dtype))[:, None, None]


def beta_gradient(m_inv: Tensor, grad: Tensor, beta: Tensor) -> Tensor:
    """∂(Σ_b grad_b log det M_b)/∂β = −Σ_b grad_b (d − tr M_b⁻¹)/β."""
    d = m_inv.shape[-1]
    trace = m_inv.diagonal(dim1=-2, dim2=-1).sum(-1)
    return -(grad.to(m_inv.dtype) * (d - trace)).sum() / beta.to(m_inv.dtype)


def covariance_gamma(sigma: Tensor, grad: Tensor, beta: Tensor) -> Tensor:
    """Γ = ∂⟨grad, Σ⟩/∂G with Σ = M⁻¹: dΣ = −Σ dM Σ, so Γ = −Σ sym(grad) Σ / β."""
    grad = grad.to(sigma.dtype)
    return -(sigma @ ((grad + grad.mT) / 2) @ sigma) / beta.to(sigma.dtype)


def covariance_beta_gradient(sigma: Tensor, grad: Tensor, beta: Tensor) -> Tensor:
    """∂⟨grad, Σ⟩/∂β = ⟨grad, Σ − Σ²⟩/β."""
    return (grad.to(sigma.dtype) * (sigma - sigma @ sigma)).sum() / beta.to(sigma.dtype)


def backward(J, w, beta, m_inv, grad_logdet, grad_sigma, needs, gram_backward: Callable):
    """(∂/∂J, ∂/∂w, ∂/∂β) of ⟨grad_logdet, log det M⟩ + ⟨grad_sigma, M⁻¹⟩ (either grad may be
    None): the Γ formulas above, then ``gram_backward`` (one pass over J, the backend's).
    For log det alone Γ = M⁻¹·(grad/β) reaches the pass as M⁻¹ and a per-sample scale."""
    if grad_sigma is None and grad_logdet is not None:
        scale = grad_logdet.to(m_inv.dtype) / beta.to(m_inv.dtype)
        grad_J, grad_w = gram_backward(J, w, m_inv, needs[0], needs[1], scale=scale)
        return grad_J, grad_w, (beta_gradient(m_inv, grad_logdet, beta) if needs[2] else None)
    total = grad_beta = None
    for grad, gamma_of, beta_gradient_of in ((grad_logdet, gamma, beta_gradient),
                                             (grad_sigma, covariance_gamma, covariance_beta_gradient)):
        if grad is None:
            continue
        term = gamma_of(m_inv, grad, beta)
        total = term if total is None else total + term
        if needs[2]:
            term = beta_gradient_of(m_inv, grad, beta)
            grad_beta = term if grad_beta is None else grad_beta + term
    grad_J = grad_w = None
    if total is not None:
        grad_J, grad_w = gram_backward(J, w, total, needs[0], needs[1])
    return grad_J, grad_w, grad_beta


def _scaled(m_inv: Tensor, m_diag: Tensor) -> Tensor:
    """M⁻¹_ij √(M_ii M_jj) (B, d, d) from diag M (B, d): M⁻¹ in the units of the rounding errors.
    Both the Gram's and the Cholesky's float32 errors are componentwise |δM_ij| <= ε √(M_ii M_jj)
    (Cauchy–Schwarz on the rows of J and of L)."""
    s = torch.sqrt(m_diag.to(m_inv.dtype))
    return m_inv * s[:, :, None] * s[:, None, :]


def unit_error(D: int, d: int, dtype: torch.dtype) -> float:
    """ε of the componentwise error above: u (√D + d + 1), u the unit roundoff; √D is the
    probabilistic growth of a D-term sum's rounding error, d + 1 the Cholesky's."""
    return torch.finfo(dtype).eps / 2 * (math.sqrt(D) + d + 1)


def logdet_accurate(logdet: Tensor, m_inv: Tensor, m_diag: Tensor, D: int) -> Tensor:
    """(B,) bool: the estimated rounding error of log det is within FLOAT32_TOLERANCE (1 + |log det|);
    False also for a non-finite log det. ``m_diag`` is diag M = 1 + ‖J_w e_i‖²/β (B, d), the
    factorisation's third output. δ log det = tr(M⁻¹ δM) = Σ_ij M⁻¹_ij δM_ij; with errors
    of independent signs its size is ε ‖M⁻¹_ij √(M_ii M_jj)‖_F."""
    error = unit_error(D, m_inv.shape[-1], m_inv.dtype) * torch.linalg.matrix_norm(_scaled(m_inv, m_diag))
    return error <= FLOAT32_TOLERANCE * (1 + logdet.abs())


def covariance_accurate(sigma: Tensor, m_diag: Tensor, D: int) -> Tensor:
    """(B,) bool: the estimated relative error of Σ = M⁻¹ is within FLOAT32_TOLERANCE; False also
    for a non-finite Σ. δΣ = −Σ δM Σ; with errors of independent signs
    ‖δΣ‖_F ≈ ε ‖Σ diag(√M_ii)‖_F² (``m_diag`` as in :func:`logdet_accurate`)."""
    s = torch.sqrt(m_diag.to(sigma.dtype))
    spread = (sigma * s[:, None, :]).square().sum((-2, -1))
    error = unit_error(D, sigma.shape[-1], sigma.dtype) * spread
    return error <= FLOAT32_TOLERANCE * torch.linalg.matrix_norm(sigma)
