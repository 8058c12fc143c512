"""log det(I + J_wᵀJ_w/β) (exact GRAE regulariser), its Fischer block bound, and Σ* = M⁻¹.

Public functions validate, pick a backend (``backend="auto"|"torch"|"triton"|"cpp"|"cuda"``)
and call the custom op ``fastjac::logdet_gram``, which returns log det M, M⁻¹ and diag M from one
factorisation. A backend supplies only that factorisation (``forward(J, w, β, block_size) ->
(log det, M⁻¹, diag M)``) and its one pass over J (``gram_backward``); the backward is the reference's
Γ formulas on the saved M⁻¹ (docs/maths.md#log-determinant-and-its-gradients), so no backend
writes a gradient formula and none factorises again. Twice differentiable: under
``create_graph=True`` the backward re-factorises M with differentiable reference ops, so
``gradgradcheck`` holds (at the cost of a second factorisation).

float32 inputs are checked (with value checks on, the default) against the float32 error
estimate of ``reference.logdet_accurate`` (docs/maths.md#numerical-error-and-tolerances): an
answer whose estimated error exceeds 1e-2 raises a ValueError that suggests float64. The
estimate needs diag M = 1 + ‖J_w e_i‖²/β, which the factorisation returns (the Gram matrix's
diagonal, already in hand), so J is read once: by the Gram, never again for the check.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _custom, _dispatch
from .._gram import accumulation_dtype, gram_backward
from .._operands import cast_grad, operands
from ... import _validation as check
from . import reference

OP = "logdet_gram"
_dispatch.register(OP, "torch", _dispatch.Implementation(reference.forward, gram_backward=gram_backward))


def _forward(J: Tensor, w: Optional[Tensor], beta: Tensor, block_size: int,
                    backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(log det M (B,), M⁻¹ (B, d, d), diag M (B, d)), M = I + mask ⊙ JᵀWJ/β with blocks of
    ``block_size``; diag M (not differentiable) feeds the float32 error estimate."""
    logdet, m_inv, m_diag = _dispatch.implementation(OP, backend).forward(J, w, beta, block_size)
    return logdet, m_inv.contiguous(), m_diag.contiguous()  # the layout the fake promises


def _fake(J, w, beta, block_size, backend):
    B, _, d = J.shape
    acc = accumulation_dtype(J.dtype)
    return J.new_empty(B, dtype=acc), J.new_empty(B, d, d, dtype=acc), J.new_empty(B, d, dtype=acc)


def _setup(ctx, inputs, output):
    J, w, beta, block_size, backend = inputs
    ctx.save_for_backward(J, w, beta, output[1])
    ctx.block_size, ctx.backend = block_size, backend
    ctx.mark_non_differentiable(output[2])  # diag M: for the error estimate only


def _backward(ctx, grad_logdet, grad_m_inv, _grad_m_diag):
    J, w, beta, m_inv = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: a differentiable M⁻¹ makes this differentiable
        m_inv = reference.forward(J, w, beta, ctx.block_size)[1]
        backend_gram_backward = gram_backward
    else:
        backend_gram_backward = _dispatch.implementation(OP, ctx.backend).gram_backward
    grads = reference.backward(J, w, beta, m_inv, grad_logdet, grad_m_inv, ctx.needs_input_grad[:3],
                               backend_gram_backward)
    return cast_grad(grads[0], J), cast_grad(grads[1], w), cast_grad(grads[2], beta), None, None


_logdet_gram = _custom.operator("fastjac::logdet_gram", _forward, fake=_fake, setup=_setup,
                                backward=_backward)


def _factorised(J, beta, weights, block_size: Optional[int], backend: str):
    """Checked operands, then (log det, M⁻¹, diag M) from the resolved backend, and D."""
    J, w, beta = operands(J, beta, weights)
    B, D, d = J.shape
    block_size = d if block_size is None else min(block_size, d)
    name = _dispatch.resolve(OP, backend, J, B=B, D=D, d=d)
    logdet, m_inv, m_diag = _logdet_gram(J, w, beta, block_size, name)
    return logdet, m_inv, m_diag, D


def _too_inaccurate(what: str, dtype: torch.dtype) -> str:
    return (f"{what}: M = I + JᵀWJ/β is too ill-conditioned for {dtype} (JᵀWJ/β spans too many orders "
            f"of magnitude, or overflows): the estimated rounding error exceeds "
            f"{reference.FLOAT32_TOLERANCE:g} relative; pass J in float64, or use a larger beta "
            "(docs/maths.md#numerical-error-and-tolerances)")


def _check_logdet(what, logdet, m_inv, m_diag, D: int) -> None:
    """Deferred: a finite log det, and for float32 one within the error tolerance (from M⁻¹ and
    diag M: J is not read again)."""
    if not check.values_checked():
        return
    if logdet.dtype == torch.float64:
        check.condition("J", torch.isfinite(logdet), f"{what}: M = I + JᵀWJ/β is not numerically "
                        "positive definite in float64 (J is too large relative to beta); rescale")
        return
    ok = reference.logdet_accurate(logdet, m_inv, m_diag, D)
    check.condition("J", ok, _too_inaccurate(what, logdet.dtype))


def _masked_logdet(what, J, beta, weights, block_size: Optional[int], backend: str) -> Tensor:
    with check.deferred():
        logdet, m_inv, m_diag, D = _factorised(J, beta, weights, block_size, backend)
        _check_logdet(what, logdet, m_inv, m_diag, D)
    return logdet


def logdet_gram(J: Tensor, beta, *, weights=None, backend: str = "auto") -> Tensor:
    """Exact regulariser R = log det(I + J_wᵀJ_w/β), J_w = diag(√w) J
    (docs/maths.md#log-determinant-and-its-gradients).

    Args:
        J: (B, D, d) decoder Jacobians.
        beta: β > 0, a number or 0-d tensor (differentiable).
        weights: observation weights w >= 0, a scalar or (B, D); None means 1.
        backend: "auto", "torch", "triton", "cpp" or "cuda".
    Returns:
        (B,) log-determinants, float32 for float16/bfloat16/float32 inputs, else float64.
    Raises:
        ValueError: bad arguments, or (value checks on) a float32 M too ill-conditioned for
        a log det within 1e-2 of the float64 answer.

    Example:
        >>> J = torch.randn(4, 784, 8)
        >>> logdet_gram(J, 0.5).shape
        torch.Size([4])
    """
    return _masked_logdet("logdet_gram", J, beta, weights, None, backend)


def fischer_bound(J: Tensor, beta, *, block_size: int, weights=None, backend: str = "auto") -> Tensor:
    """Fischer bound Σ_blocks log det M_bb over blocks of ``block_size`` consecutive latents
    (docs/maths.md#bounds-and-identities).

    R_exact <= R_fischer(b) <= R_hadamard; b = 1 is Hadamard, b >= d is exact. The last
    block is smaller when d is not a multiple of b. Shapes as :func:`logdet_gram`.
    """
    check.positive_int("block_size", block_size)
    return _masked_logdet("fischer_bound", J, beta, weights, block_size, backend)


def optimal_posterior_covariance(J: Tensor, beta, *, weights=None, backend: str = "auto") -> Tensor:
    """Σ* = (I + J_wᵀJ_w/β)⁻¹ (docs/maths.md#optimal-posterior-covariance): (B, D, d) -> (B, d, d),
    differentiable. float32 inputs whose Σ* would be off by more than 1e-2 (relative) raise
    a ValueError (value checks on) that suggests float64."""
    with check.deferred():
        _logdet, sigma, m_diag, D = _factorised(J, beta, weights, None, backend)
        if check.values_checked() and sigma.dtype != torch.float64:
            ok = reference.covariance_accurate(sigma, m_diag, D)
            check.condition("J", ok, _too_inaccurate("optimal_posterior_covariance", sigma.dtype))
        elif check.values_checked():
            check.condition("J", torch.isfinite(sigma), "optimal_posterior_covariance: M = I + JᵀWJ/β "
                            "is not numerically positive definite in float64; rescale J or beta")
    return sigma


_dispatch.load_backends(OP, __name__)
