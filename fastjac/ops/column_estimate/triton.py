"""Triton backend of ``column_estimate`` (GRAE≈ and the Hadamard bound).

Only the column norms n_i = Σ_r w_r J_ri² enter, so the forward is one pass over J with
the shared Gram kernel in its diagonal mode (split over D for small batches), then
Σ_i s_i log1p(n_i/β) on the (B, k) norms. The backward recomputes the norms (a second
read of J: the custom op saves only its inputs) and makes one pass writing
∂R/∂J = 2 W J diag(γ), ∂R/∂w_r = Σ_i J_ri² γ_i, with γ_i = grad · s_i/(β + n_i).
Shapes as ``reference``.
"""
from __future__ import annotations

import torch

from .. import _dispatch, _triton
from . import OP


def _terms(J, w, beta, scale, gram=_triton.gram):
    """Norms (B, k), β in fp32 and the per-column weights s (1 when scale is None)."""
    n = gram(J, w, diagonal=True)
    s = torch.ones_like(n) if scale is None else scale.to(n.dtype)
    return n, beta.to(n.dtype), s


def forward(J, w, beta, scale):
    n, beta, s = _terms(J, w, beta, scale)
    return (s * torch.log1p(n / beta)).sum(-1)


def backward(J, w, beta, scale, grad, needs_input_grad=(True, True, True)):
    n, beta, s = _terms(J, w, beta, scale, _triton.gram_op)
    gamma = grad.to(n.dtype)[:, None] * s / (beta + n)
    grad_J, grad_w = _triton.apply_gamma(J, w, gamma, needs_input_grad[0], needs_input_grad[1])
    grad_beta = -(gamma * n).sum() / beta if needs_input_grad[2] else None
    return grad_J, grad_w, grad_beta


_dispatch.register(OP, "triton", _dispatch.Implementation(forward, backward, _triton.unsupported))
