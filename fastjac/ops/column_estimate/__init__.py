"""Column estimators: the Hadamard bound and GRAE≈'s sampled-column estimate
(docs/maths.md#stochastic-column-estimators).

``fastjac::column_estimate(J, w, β, s)`` computes Σ_i s_i log1p(‖J_w e_i‖²/β) over the k
columns J holds, and returns the column norms it saves for the backward. A backend supplies
the norms (``forward(J, w) -> n``) and its pass over J (``gram_backward``, Γ diagonal);
the value and Γ are the reference's formulas.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _custom, _dispatch
from .._gram import accumulation_dtype, column_norms, gram_backward
from .._operands import cast_grad, operands
from ... import _validation as check
from . import reference

OP = "column_estimate"
_dispatch.register(OP, "torch", _dispatch.Implementation(reference.forward, gram_backward=gram_backward))


def _forward(J: Tensor, w: Optional[Tensor], beta: Tensor, scale: Optional[Tensor],
             backend: str) -> tuple[Tensor, Tensor]:
    """(R (B,), the column norms n (B, k))."""
    n = _dispatch.implementation(OP, backend).forward(J, w)
    return reference.value(n, beta, scale), n.contiguous()


def _fake(J, w, beta, scale, backend):
    acc = accumulation_dtype(J.dtype)
    return J.new_empty(J.shape[0], dtype=acc), J.new_empty(J.shape[0], J.shape[2], dtype=acc)


def _setup(ctx, inputs, output):
    J, w, beta, scale, backend = inputs
    ctx.save_for_backward(J, w, beta, scale, output[1])
    ctx.backend = backend
    ctx.mark_non_differentiable(output[1])  # the norms: saved for the backward only


def _backward(ctx, grad, _grad_n):
    J, w, beta, scale, n = ctx.saved_tensors
    needs = ctx.needs_input_grad[:3]
    if torch.is_grad_enabled():  # create_graph=True: differentiable norms, reference pass
        n, backend_gram_backward = column_norms(J, w), gram_backward
    else:
        backend_gram_backward = _dispatch.implementation(OP, ctx.backend).gram_backward
    diagonal = reference.gamma(n, grad, beta, scale)
    grad_J, grad_w = backend_gram_backward(J, w, diagonal, needs[0], needs[1])
    grad_beta = reference.beta_gradient(diagonal, n, beta) if needs[2] else None
    return cast_grad(grad_J, J), cast_grad(grad_w, w), cast_grad(grad_beta, beta), None, None


_column_estimate = _custom.operator("fastjac::column_estimate", _forward, fake=_fake, setup=_setup,
                                     backward=_backward)


def _call(what, J, w, beta, scale, backend):
    B, D, k = J.shape
    name = _dispatch.resolve(OP, backend, J, B=B, D=D, d=k)
    value, _n = _column_estimate(J, w, beta, scale, name)
    if check.values_checked():
        check.condition("J", torch.isfinite(value), (
            f"{what}: the column norms ‖J_w e_i‖² overflow {value.dtype} (entries of J around "
            f"1e19 or larger); pass J in float64 or rescale it"))
    return value


def hadamard_bound(J: Tensor, beta, *, weights=None, backend: str = "auto") -> Tensor:
    """Hadamard bound R_had = Σ_j log(1 + ‖J_w e_j‖²/β) (docs/maths.md#bounds-and-identities):
    (B, D, d) -> (B,).

    R_exact <= R_had, with equality iff J_wᵀJ_w is diagonal.

    Example:
        >>> hadamard_bound(torch.randn(2, 10, 3), 1.0).shape
        torch.Size([2])
    """
    with check.deferred():
        J, w, beta = operands(J, beta, weights)
        return _call("hadamard_bound", J, w, beta, None, backend)


def _scale(probabilities, B: int, k: int, like: Tensor) -> Tensor:
    """s_i = 1 / (k p(c_i)), (B, k), from p: a number, (k,) or (B, k) in (0, 1]."""
    if isinstance(probabilities, (int, float)) and not isinstance(probabilities, bool):
        check.condition("probabilities", 0 < probabilities <= 1, "probabilities must lie in (0, 1]")
        return torch.full((B, k), 1.0 / (k * float(probabilities)), dtype=like.dtype, device=like.device)
    check.tensor("probabilities", probabilities, ndim=(0, 1, 2))
    try:
        p = probabilities.to(device=like.device, dtype=like.dtype).expand(B, k)
    except RuntimeError:
        raise ValueError(f"probabilities must be a number, (k,) = ({k},) or (B, k) = ({B}, {k}); "
                         f"got shape {tuple(probabilities.shape)}") from None
    if check.values_checked():
        check.condition("probabilities", (p > 0) & (p <= 1), "probabilities must lie in (0, 1]")
    return 1.0 / (k * p)


def column_estimate(J: Tensor, beta, *, probabilities, weights=None, backend: str = "auto") -> Tensor:
    """Sampled-column estimate (1/k) Σ_i log(1 + ‖J_w e_{c_i}‖²/β) / p(c_i) (GRAE≈,
    docs/maths.md#stochastic-column-estimators).

    Args:
        J: (B, D, k) the k drawn columns J e_{c_i} of each sample.
        probabilities: p(c_i) in (0, 1]: a number, (k,) or (B, k).
    Returns:
        (B,); unbiased for :func:`hadamard_bound` when the c_i are drawn from p.
    """
    with check.deferred():
        J, w, beta = operands(J, beta, weights)
        B, _, k = J.shape
        scale = _scale(probabilities, B, k, J.new_empty(0, dtype=accumulation_dtype(J.dtype)))
        return _call("column_estimate", J, w, beta, scale, backend)


_dispatch.load_backends(OP, __name__)
