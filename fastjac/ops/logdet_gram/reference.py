"""Reference (pure PyTorch) forms of log det M, M = I + mask ⊙ (JᵀWJ)/β, and its backward.

``block_size`` masks G to its diagonal blocks of consecutive latents: block_size >= d
is the exact log-determinant, smaller blocks give the Fischer bound (a block-diagonal
M has log det = Σ_blocks log det M_bb), block_size 1 the Hadamard bound.
Shapes: J (B, D, d), w (B, D) or None, beta 0-d -> logdet (B,), L (B, d, d).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._gram import block_mask, gram, gram_backward


def matrix(J: Tensor, w: Optional[Tensor], beta: Tensor, block_size: int) -> Tensor:
    """M = I + mask ⊙ G / β, (B, d, d), in the accumulation dtype."""
    G = gram(J, w)
    d = G.shape[-1]
    if block_size < d:
        G = G * block_mask(d, block_size, device=G.device, dtype=G.dtype)
    eye = torch.eye(d, device=G.device, dtype=G.dtype)
    return G / beta.to(G.dtype) + eye


def factor(J: Tensor, w: Optional[Tensor], beta: Tensor, block_size: int) -> Tensor:
    """Lower Cholesky factor L of M; non-syncing (failures surface as non-finite log det)."""
    L, _info = torch.linalg.cholesky_ex(matrix(J, w, beta, block_size))
    return L


def forward(J: Tensor, w: Optional[Tensor], beta: Tensor, block_size: int):
    L = factor(J, w, beta, block_size)
    logdet = 2 * L.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    return logdet, L


def backward(J, w, beta, block_size, L, grad, needs_input_grad=(True, True, True)):
    """(∂/∂J, ∂/∂w, ∂/∂β) of Σ_b grad_b · log det M_b (SPEC §3.1), from L.

    ∂R/∂J = (2/β) W J M⁻¹, ∂R/∂w_r = (1/β) J_r M⁻¹ J_rᵀ, ∂R/∂β = −(d − tr M⁻¹)/β.
    Written in differentiable ops: given a differentiable L it is its own double backward.
    """
    beta = beta.to(L.dtype)
    m_inv = torch.cholesky_inverse(L)
    grad = grad.to(L.dtype)
    gamma = m_inv * (grad / beta)[:, None, None]
    grad_J = grad_w = grad_beta = None
    if needs_input_grad[0] or needs_input_grad[1]:
        grad_J, grad_w = gram_backward(J, w, gamma, need_weights=needs_input_grad[1])
    if needs_input_grad[2]:
        d = L.shape[-1]
        grad_beta = -(grad * (d - m_inv.diagonal(dim1=-2, dim2=-1).sum(-1))).sum() / beta
    return grad_J, grad_w, grad_beta


def posterior_covariance(J: Tensor, w: Optional[Tensor], beta: Tensor) -> Tensor:
    """Σ* = M⁻¹ (Eq. 11), (B, d, d)."""
    return torch.cholesky_inverse(factor(J, w, beta, J.shape[-1]))


def posterior_covariance_backward(J, w, beta, sigma, grad, needs_input_grad=(True, True, True)):
    """(∂/∂J, ∂/∂w, ∂/∂β) of ⟨grad, Σ⟩ with Σ = M⁻¹: dΣ = −Σ dM Σ, ∂Σ/∂β = (Σ − Σ²)/β."""
    beta = beta.to(sigma.dtype)
    grad = grad.to(sigma.dtype)
    sym = (grad + grad.mT) / 2
    grad_J = grad_w = grad_beta = None
    if needs_input_grad[0] or needs_input_grad[1]:
        gamma = -(sigma @ sym @ sigma) / beta
        grad_J, grad_w = gram_backward(J, w, gamma, need_weights=needs_input_grad[1])
    if needs_input_grad[2]:
        grad_beta = (grad * (sigma - sigma @ sigma)).sum() / beta
    return grad_J, grad_w, grad_beta
