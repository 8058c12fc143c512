"""log det(I + J_wᵀJ_w/β) (exact GRAE regulariser), its Fischer block bound, and Σ* = M⁻¹.

Public functions validate, pick a backend (``backend="auto"|"torch"|"triton"|"cpp"|"cuda"``)
and call the registered custom ops ``fastjac::logdet_gram`` / ``fastjac::posterior_covariance``,
whose backward is SPEC §3.1 (one factorisation, no autograd through the Cholesky).
Twice differentiable: under ``create_graph=True`` the backward re-factorises M with
differentiable ops, so ``gradgradcheck`` holds (at the cost of a second factorisation).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _dispatch
from .._gram import accumulation_dtype
from .._operands import cast_grad, operands
from ... import _validation as check
from . import reference

OP = "logdet_gram"
COVARIANCE_OP = "posterior_covariance"
_dispatch.register(OP, "torch", _dispatch.Implementation(reference.forward, reference.backward))
_dispatch.register(COVARIANCE_OP, "torch", _dispatch.Implementation(
    reference.posterior_covariance, reference.posterior_covariance_backward))


@torch.library.custom_op("fastjac::logdet_gram", mutates_args=())
def _logdet_gram_op(J: Tensor, w: Optional[Tensor], beta: Tensor, block_size: int,
                    backend: str) -> tuple[Tensor, Tensor]:
    logdet, L = _dispatch.implementation(OP, backend).forward(J, w, beta, block_size)
    return logdet, L.contiguous()  # cholesky_ex gives column-major factors; the fake says contiguous


@_logdet_gram_op.register_fake
def _(J, w, beta, block_size, backend):
    B, _, d = J.shape
    acc = accumulation_dtype(J.dtype)
    return J.new_empty(B, dtype=acc), J.new_empty(B, d, d, dtype=acc)


def _logdet_setup(ctx, inputs, output):
    J, w, beta, block_size, backend = inputs
    ctx.save_for_backward(J, w, beta, output[1])
    ctx.block_size, ctx.backend = block_size, backend


def _logdet_backward(ctx, grad_logdet, _grad_L):
    J, w, beta, L = ctx.saved_tensors
    needs = ctx.needs_input_grad[:3]
    if torch.is_grad_enabled():  # create_graph=True: a differentiable factor makes this differentiable
        L = reference.factor(J, w, beta, ctx.block_size)
        grads = reference.backward(J, w, beta, ctx.block_size, L, grad_logdet, needs)
    else:
        grads = _dispatch.implementation(OP, ctx.backend).backward(
            J, w, beta, ctx.block_size, L, grad_logdet, needs)
    return cast_grad(grads[0], J), cast_grad(grads[1], w), cast_grad(grads[2], beta), None, None


_logdet_gram_op.register_autograd(_logdet_backward, setup_context=_logdet_setup)


@torch.library.custom_op("fastjac::posterior_covariance", mutates_args=())
def _posterior_covariance_op(J: Tensor, w: Optional[Tensor], beta: Tensor, backend: str) -> Tensor:
    return _dispatch.implementation(COVARIANCE_OP, backend).forward(J, w, beta).contiguous()


@_posterior_covariance_op.register_fake
def _(J, w, beta, backend):
    B, _, d = J.shape
    return J.new_empty(B, d, d, dtype=accumulation_dtype(J.dtype))


def _covariance_setup(ctx, inputs, output):
    J, w, beta, backend = inputs
    ctx.save_for_backward(J, w, beta, output)
    ctx.backend = backend


def _covariance_backward(ctx, grad):
    J, w, beta, sigma = ctx.saved_tensors
    needs = ctx.needs_input_grad[:3]
    if torch.is_grad_enabled():
        sigma = reference.posterior_covariance(J, w, beta)
        grads = reference.posterior_covariance_backward(J, w, beta, sigma, grad, needs)
    else:
        grads = _dispatch.implementation(COVARIANCE_OP, ctx.backend).backward(J, w, beta, sigma, grad, needs)
    return cast_grad(grads[0], J), cast_grad(grads[1], w), cast_grad(grads[2], beta), None


_posterior_covariance_op.register_autograd(_covariance_backward, setup_context=_covariance_setup)


def _masked_logdet(J, beta, weights, block_size: Optional[int], backend: str) -> Tensor:
    J, w, beta = operands(J, beta, weights)
    B, D, d = J.shape
    block_size = d if block_size is None else min(block_size, d)
    name = _dispatch.resolve(OP, backend, J, B=B, D=D, d=d)
    logdet, _ = torch.ops.fastjac.logdet_gram(J, w, beta, block_size, name)
    if check.values_checked() and not bool(torch.isfinite(logdet).all()):
        raise ValueError(
            f"M = I + JᵀWJ/β is not numerically positive definite in {logdet.dtype} "
            "(J is too large relative to beta); pass J in float64 or rescale")
    return logdet


def logdet_gram(J: Tensor, beta, *, weights=None, backend: str = "auto") -> Tensor:
    """Exact regulariser R = log det(I + J_wᵀJ_w/β), J_w = diag(√w) J (SPEC §3.1).

    Args:
        J: (B, D, d) decoder Jacobians.
        beta: β > 0, a number or 0-d tensor (differentiable).
        weights: observation weights w >= 0, a scalar or (B, D); None means 1.
        backend: "auto", "torch", "triton", "cpp" or "cuda".
    Returns:
        (B,) log-determinants, float32 for float16/bfloat16/float32 inputs, else float64.

    Example:
        >>> J = torch.randn(4, 784, 8)
        >>> logdet_gram(J, 0.5).shape
        torch.Size([4])
    """
    return _masked_logdet(J, beta, weights, None, backend)


def fischer_bound(J: Tensor, beta, *, block_size: int, weights=None, backend: str = "auto") -> Tensor:
    """Fischer bound Σ_blocks log det M_bb over blocks of ``block_size`` consecutive latents.

    R_exact <= R_fischer(b) <= R_hadamard; b = 1 is Hadamard, b >= d is exact. The last
    block is smaller when d is not a multiple of b. Shapes as :func:`logdet_gram`.
    """
    check.positive_int("block_size", block_size)
    return _masked_logdet(J, beta, weights, block_size, backend)


def optimal_posterior_covariance(J: Tensor, beta, *, weights=None, backend: str = "auto") -> Tensor:
    """Σ* = (I + J_wᵀJ_w/β)⁻¹ (Eq. 11): (B, D, d) -> (B, d, d), differentiable."""
    J, w, beta = operands(J, beta, weights)
    B, D, d = J.shape
    name = _dispatch.resolve(COVARIANCE_OP, backend, J, B=B, D=D, d=d)
    return torch.ops.fastjac.posterior_covariance(J, w, beta, name)


_dispatch.load_backends(__name__)
