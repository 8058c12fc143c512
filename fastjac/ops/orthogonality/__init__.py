"""Orthogonality penalty: mean cos² between Jacobian columns in different posterior blocks
(docs/maths.md#orthogonality-penalty).

Registered as ``fastjac::orthogonality_penalty``, which returns the penalty and the Gram matrix
C it saves for the backward. A backend supplies C (``forward(J, w)``) and its pass over J
(``gram_backward``); the penalty and Γ = ∂P/∂C are the reference's formulas.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _custom, _dispatch
from .._gram import accumulation_dtype, gram, gram_backward
from .._operands import cast_grad
from ... import _validation as check
from . import reference

OP = "orthogonality_penalty"
_dispatch.register(OP, "torch", _dispatch.Implementation(reference.forward, gram_backward=gram_backward))


def _forward(J: Tensor, w: Optional[Tensor], block_size: int, eps: float,
                      backend: str) -> tuple[Tensor, Tensor]:
    """(P (B,), C = J_wᵀJ_w (B, k, k))."""
    C = _dispatch.implementation(OP, backend).forward(J, w)
    return reference.penalty(C, block_size, eps), C.contiguous()


def _fake(J, w, block_size, eps, backend):
    B, _, k = J.shape
    acc = accumulation_dtype(J.dtype)
    return J.new_empty(B, dtype=acc), J.new_empty(B, k, k, dtype=acc)


def _setup(ctx, inputs, output):
    J, w, block_size, eps, backend = inputs
    ctx.save_for_backward(J, w, output[1])
    ctx.block_size, ctx.eps, ctx.backend = block_size, eps, backend


def _backward(ctx, grad, _grad_C):
    J, w, C = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: a differentiable C, the reference pass
        C, backend_gram_backward = gram(J, w), gram_backward
    else:
        backend_gram_backward = _dispatch.implementation(OP, ctx.backend).gram_backward
    needs = ctx.needs_input_grad[:2]
    grad_J, grad_w = backend_gram_backward(J, w, reference.gamma(C, grad, ctx.block_size, ctx.eps), *needs)
    return cast_grad(grad_J, J), cast_grad(grad_w, w), None, None, None


_orthogonality_penalty = _custom.operator("fastjac::orthogonality_penalty", _forward, fake=_fake, setup=_setup,
                                          backward=_backward)


def _checked(J, block_size, weights, eps):
    J = check.jacobian(J)
    check.positive_int("block_size", block_size)
    B, D, k = J.shape
    if k <= block_size:
        raise ValueError(f"orthogonality_penalty needs columns in at least two blocks: "
                         f"J has k = {k} columns and block_size = {block_size}")
    if not (isinstance(eps, (int, float)) and eps > 0):
        raise ValueError(f"eps must be a positive number, got {eps!r}")
    w = check.weights(weights, J)
    if w is not None and not (isinstance(w, Tensor) and w.dim() == 2):
        w = torch.as_tensor(w, dtype=J.dtype, device=J.device).expand(B, D)
    return J, w


def orthogonality_penalty(J: Tensor, *, block_size: int = 1, weights=None, eps: float = 1e-8,
                          backend: str = "auto") -> Tensor:
    """Mean of cos²(J_w e_i, J_w e_j) over pairs i < j in different blocks: (B, D, k) -> (B,).

    Blocks are ``block_size`` consecutive columns (block_size 1: all pairs). Needs two
    columns in different blocks.

    Example:
        >>> orthogonality_penalty(torch.randn(2, 10, 4), block_size=2).shape
        torch.Size([2])
    """
    with check.deferred():
        J, w = _checked(J, block_size, weights, eps)
        B, D, k = J.shape
        name = _dispatch.resolve(OP, backend, J, B=B, D=D, d=k)
        P, _C = _orthogonality_penalty(J, w, block_size, float(eps), name)
        if check.values_checked():
            check.condition("J", torch.isfinite(P), (
                f"orthogonality_penalty: J_wᵀJ_w overflows {P.dtype} (entries of J around 1e19 or "
                "larger); pass J in float64 or rescale it (cos² does not depend on the scale)"))
    return P


_dispatch.load_backends(OP, __name__)
