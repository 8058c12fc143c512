"""Column estimators: the Hadamard bound (Eq. 14) and GRAE≈'s sampled-column estimate (§5.3).

``fastjac::column_estimate(J, w, β, s)`` computes Σ_i s_i log1p(‖J_w e_i‖²/β) over the k
columns J holds; the backward is one pass over J (Γ diagonal, SPEC §3).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _dispatch
from .._operands import cast_grad, operands
from ... import _validation as check
from .._gram import accumulation_dtype
from . import reference

OP = "column_estimate"
_dispatch.register(OP, "torch", _dispatch.Implementation(reference.forward, reference.backward))


@torch.library.custom_op("fastjac::column_estimate", mutates_args=())
def _column_estimate_op(J: Tensor, w: Optional[Tensor], beta: Tensor, scale: Optional[Tensor],
                        backend: str) -> Tensor:
    return _dispatch.implementation(OP, backend).forward(J, w, beta, scale)


@_column_estimate_op.register_fake
def _(J, w, beta, scale, backend):
    return J.new_empty(J.shape[0], dtype=accumulation_dtype(J.dtype))


def _setup(ctx, inputs, output):
    J, w, beta, scale, backend = inputs
    ctx.save_for_backward(J, w, beta, scale)
    ctx.backend = backend


def _backward(ctx, grad):
    J, w, beta, scale = ctx.saved_tensors
    needs = ctx.needs_input_grad[:3]
    impl = reference if torch.is_grad_enabled() else _dispatch.implementation(OP, ctx.backend)
    grad_J, grad_w, grad_beta = impl.backward(J, w, beta, scale, grad, needs)
    return cast_grad(grad_J, J), cast_grad(grad_w, w), cast_grad(grad_beta, beta), None, None


_column_estimate_op.register_autograd(_backward, setup_context=_setup)


def _call(J, w, beta, scale, backend):
    B, D, k = J.shape
    name = _dispatch.resolve(OP, backend, J, B=B, D=D, d=k)
    return torch.ops.fastjac.column_estimate(J, w, beta, scale, name)


def hadamard_bound(J: Tensor, beta, *, weights=None, backend: str = "auto") -> Tensor:
    """Hadamard bound R_had = Σ_j log(1 + ‖J_w e_j‖²/β) (Eq. 14): (B, D, d) -> (B,).

    R_exact <= R_had, with equality iff J_wᵀJ_w is diagonal.

    Example:
        >>> hadamard_bound(torch.randn(2, 10, 3), 1.0).shape
        torch.Size([2])
    """
    J, w, beta = operands(J, beta, weights)
    return _call(J, w, beta, None, backend)


def column_estimate(J: Tensor, beta, *, probabilities, weights=None, backend: str = "auto") -> Tensor:
    """Sampled-column estimate (1/k) Σ_i log(1 + ‖J_w e_{c_i}‖²/β) / p(c_i) (§5.3, GRAE≈).

    Args:
        J: (B, D, k) the k drawn columns J e_{c_i} of each sample.
        probabilities: p(c_i) in (0, 1]: a number, (k,) or (B, k).
    Returns:
        (B,); unbiased for :func:`hadamard_bound` when the c_i are drawn from p.
    """
    J, w, beta = operands(J, beta, weights)
    B, _, k = J.shape
    if isinstance(probabilities, (int, float)) and not isinstance(probabilities, bool):
        p = torch.full((B, k), float(probabilities), dtype=beta.dtype, device=J.device)
    else:
        check.tensor("probabilities", probabilities, ndim=(0, 1, 2))
        try:
            p = probabilities.to(device=J.device, dtype=beta.dtype).expand(B, k)
        except RuntimeError:
            raise ValueError(f"probabilities must be a number, (k,) = ({k},) or (B, k) = ({B}, {k}); "
                             f"got shape {tuple(probabilities.shape)}") from None
    if check.values_checked() and not bool(((p > 0) & (p <= 1)).all()):
        raise ValueError("probabilities must lie in (0, 1]")
    return _call(J, w, beta, 1.0 / (k * p), backend)


_dispatch.load_backends(__name__)
