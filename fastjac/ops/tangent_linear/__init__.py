"""Linear + elementwise activation carrying k forward tangents in one fused pass.

``fastjac::tangent_linear(h, T, W, b)`` returns y = σ(h Wᵀ + b) and U_i = σ′(h Wᵀ + b) ⊙ (T_i Wᵀ),
the layer's output and its JVPs along k tangents, with its own backward (reverse over
forward, as training through Jacobian columns needs). The Triton backend does the matmul
over [h; T_1 … T_k] in one kernel with the activation epilogue; the torch backend is the
reference. Twice differentiable: under ``create_graph=True`` the backward is recomputed in
differentiable reference ops.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _custom, _dispatch
from ... import _validation as check
from . import reference

OP = "tangent_linear"
ACTIVATIONS = tuple(reference.ACTIVATIONS)
_dispatch.register(OP, "torch", _dispatch.Implementation(reference.forward, reference.backward))


def _forward(h: Tensor, tangents: Tensor, weight: Tensor, bias: Optional[Tensor],
                       activation: str, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    return _dispatch.implementation(OP, backend).forward(h, tangents, weight, bias, activation)


def _fake(h, tangents, weight, bias, activation, backend):
    N, out, k = h.shape[0], weight.shape[0], tangents.shape[0]
    return h.new_empty(N, out), h.new_empty(k, N, out), h.new_empty(N, out)


def _setup(ctx, inputs, output):
    h, tangents, weight, bias, activation, backend = inputs
    ctx.save_for_backward(h, tangents, weight, bias, output[2])
    ctx.activation, ctx.backend = activation, backend


@torch.library.custom_op("fastjac::tangent_linear_backward", mutates_args=())
def _backend_backward(h: Tensor, tangents: Tensor, weight: Tensor, bias: Optional[Tensor], a: Tensor,
                      grad_y: Tensor, grad_U: Tensor, activation: str, backend: str,
                      needs: list[bool]) -> list[Tensor]:
    """A kernel backend's backward as an opaque op (AOT autograd traces the backward with fake
    tensors, which a raw kernel launch cannot take); a gradient not needed is an empty tensor."""
    grads = _dispatch.implementation(OP, backend).backward(
        h, tangents, weight, bias, activation, a, grad_y, grad_U, tuple(needs))
    return [h.new_empty(0) if g is None else g for g in grads]


@_backend_backward.register_fake
def _(h, tangents, weight, bias, a, grad_y, grad_U, activation, backend, needs):
    shapes = (h, tangents, weight, bias)
    return [t.new_empty(t.shape) if (need and t is not None) else h.new_empty(0) for t, need in zip(shapes, needs)]


def _backward(ctx, grad_y, grad_U, _grad_a):
    h, tangents, weight, bias, a = ctx.saved_tensors
    grad_y = torch.zeros_like(a) if grad_y is None else grad_y
    grad_U = a.new_zeros(tangents.shape[0], *a.shape) if grad_U is None else grad_U
    needs = [bool(n) for n in ctx.needs_input_grad[:4]]
    if torch.is_grad_enabled() or ctx.backend == "torch":  # create_graph=True: differentiable a
        a = reference.pre_activation(h, weight, bias) if torch.is_grad_enabled() else a
        grads = reference.backward(h, tangents, weight, bias, ctx.activation, a, grad_y, grad_U, needs)
    else:
        grads = _backend_backward(h, tangents, weight, bias, a, grad_y, grad_U, ctx.activation, ctx.backend, needs)
        grads = [g if need and g.numel() else None for g, need in zip(grads, needs)]
        grads[3] = None if bias is None else grads[3]
    return (*grads, None, None)


_tangent_linear = _custom.operator("fastjac::tangent_linear", _forward, fake=_fake, setup=_setup,
                                   backward=_backward)


def tangent_linear(h: Tensor, tangents: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *,
                   activation: str = "identity", backend: str = "auto") -> tuple[Tensor, Tensor]:
    """σ(h Wᵀ + b) and its JVPs along k tangents, σ′(h Wᵀ + b) ⊙ (T_i Wᵀ), in one fused pass.

    Args:
        h: (N, in) primal input.
        tangents: (k, N, in) tangents of h, k >= 1.
        weight: (out, in); bias: (out,) or None.
        activation: "identity", "relu", "elu" (α = 1), "tanh", "sigmoid" or "softplus" (β = 1).
        backend: "auto", "torch" or "triton".
    Returns:
        (y (N, out), U (k, N, out)), differentiable in all four inputs.

    Example:
        >>> W, b = torch.randn(16, 8), torch.randn(16)
        >>> y, U = tangent_linear(torch.randn(4, 8), torch.randn(3, 4, 8), W, b, activation="elu")
        >>> U.shape
        torch.Size([3, 4, 16])
    """
    check.tensor("h", h, ndim=2)
    check.tensor("tangents", tangents, ndim=3)
    check.tensor("weight", weight, ndim=2)
    N, n_in = h.shape
    if tangents.shape[0] < 1 or tuple(tangents.shape[1:]) != (N, n_in):
        raise ValueError(f"tangents must have shape (k, N, in) = (k >= 1, {N}, {n_in}) to match h, "
                         f"got {tuple(tangents.shape)}")
    if weight.shape[1] != n_in:
        raise ValueError(f"weight must have shape (out, in) with in = {n_in}, got {tuple(weight.shape)}")
    if bias is not None:
        check.tensor("bias", bias, ndim=1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must have shape (out,) = ({weight.shape[0]},), got {tuple(bias.shape)}")
    tensors = {"h": h, "tangents": tangents, "weight": weight, "bias": bias}
    for name, t in tensors.items():
        if t is not None and (t.dtype != h.dtype or t.device != h.device):
            raise TypeError(f"{name} must have h's dtype and device ({h.dtype}, {h.device}), "
                            f"got {t.dtype} on {t.device}")
    check.choice("activation", activation, ACTIVATIONS)
    name = _dispatch.resolve(OP, backend, h, B=N, D=weight.shape[0], d=tangents.shape[0])
    y, U, _a = _tangent_linear(h, tangents, weight, bias, activation, name)
    return y, U


_dispatch.load_backends(OP, __name__)
