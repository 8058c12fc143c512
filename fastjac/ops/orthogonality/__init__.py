"""Orthogonality penalty (§5.3): mean cos² between Jacobian columns in different posterior blocks.

Registered as ``fastjac::orthogonality_penalty``; backward is one pass over J (SPEC §3).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _dispatch
from .._operands import cast_grad
from ... import _validation as check
from .._gram import accumulation_dtype
from . import reference

OP = "orthogonality_penalty"
_dispatch.register(OP, "torch", _dispatch.Implementation(reference.forward, reference.backward))


@torch.library.custom_op("fastjac::orthogonality_penalty", mutates_args=())
def _orthogonality_op(J: Tensor, w: Optional[Tensor], block_size: int, eps: float, backend: str) -> Tensor:
    return _dispatch.implementation(OP, backend).forward(J, w, block_size, eps)


@_orthogonality_op.register_fake
def _(J, w, block_size, eps, backend):
    return J.new_empty(J.shape[0], dtype=accumulation_dtype(J.dtype))


def _setup(ctx, inputs, output):
    J, w, block_size, eps, backend = inputs
    ctx.save_for_backward(J, w)
    ctx.block_size, ctx.eps, ctx.backend = block_size, eps, backend


def _backward(ctx, grad):
    J, w = ctx.saved_tensors
    impl = reference if torch.is_grad_enabled() else _dispatch.implementation(OP, ctx.backend)
    grad_J, grad_w = impl.backward(J, w, ctx.block_size, ctx.eps, grad, ctx.needs_input_grad[:2])
    return cast_grad(grad_J, J), cast_grad(grad_w, w), None, None, None


_orthogonality_op.register_autograd(_backward, setup_context=_setup)


def orthogonality_penalty(J: Tensor, *, block_size: int = 1, weights=None, eps: float = 1e-8,
                          backend: str = "auto") -> Tensor:
    """Mean of cos²(J_w e_i, J_w e_j) over pairs i < j in different blocks: (B, D, k) -> (B,).

    Blocks are ``block_size`` consecutive columns (block_size 1: all pairs). Needs two
    columns in different blocks.

    Example:
        >>> orthogonality_penalty(torch.randn(2, 10, 4), block_size=2).shape
        torch.Size([2])
    """
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
    name = _dispatch.resolve(OP, backend, J, B=B, D=D, d=k)
    return torch.ops.fastjac.orthogonality_penalty(J, w, block_size, float(eps), name)


_dispatch.load_backends(__name__)
