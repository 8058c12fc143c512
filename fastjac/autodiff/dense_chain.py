"""Runs of ``nn.Linear`` layers, each with the activation after it, on the stacked rows as one autograd node.

Shapes: the primal rows P (B, n₀) and the tangent rows T (k·B, n₀) go in; the primal output
(B, n_L) and the tangent outputs (k·B, n_L) come back: σ(x Wᵀ + b) and σ′ ⊙ t Wᵀ, layer by layer.

Why one node: on the benchmarks' MLP, the autograd graph of the unfused layers (a node and its
bookkeeping per op, temporaries for every elementwise step) costs as much as the extra GEMMs of
the tangent rows. Here each layer is one GEMM on the whole stack in forward (one weight packing
for all rows), then the bias, σ and σ′ written in place into the GEMM's output; backward is one
elementwise pass and two GEMMs (∂W, ∂X) per layer, the pass in place in the previous layer's ∂X.
The two outputs are views of the last layer's stack, kept for the reverse pass: modifying one
in place is an autograd error, never a wrong gradient.

Why the reverse pass needs only the layer outputs: for the activations in :data:`ACTIVATIONS`,
σ′ and the ratio r = σ″/σ′ are functions of y = σ(p) (ELU: σ′ = y + α, r = 1 where y ≤ 0; sigmoid:
σ′ = y(1 − y), r = 1 − 2y; tanh: σ′ = 1 − y², r = −2y; ReLU, LeakyReLU: r = 0), so with u = σ′ ⊙ t
the tangent output,

    ∂/∂p = σ′ ⊙ ∂y + r ⊙ Σⱼ ∂uⱼ ⊙ uⱼ,    ∂/∂tⱼ = σ′ ⊙ ∂uⱼ,

exactly (σ″ tⱼ = r σ′ tⱼ = r uⱼ; no division). The elementwise pass is the extension's host
kernel (``fastjac._C.dense_backward``) for float32/float64 CPU tensors, else :func:`backward_reference`
(torch ops, the same formula); the two are tested against each other.

Double backward (``create_graph``) recomputes the run with ordinary torch ops and differentiates those.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch._C._functorch import is_functorch_wrapped_tensor
from torch._functorch.utils import unwrap_dead_wrappers

from .. import _extension

aten = torch.ops.aten


class Activation(NamedTuple):
    code: int            # the extension kernel's activation code
    param: Callable      # m -> its parameter (α, slope; 0 when none)
    value: Callable      # (m, p) -> σ(p), a new tensor
    value_: Callable     # (m, p) -> σ(p) written into p
    tangent: Callable    # (m, t, y, **out) -> σ′(p) ⊙ t from y = σ(p) (torch's kernel; y broadcasts)
    ratio: Optional[Callable]  # (m, y) -> r = σ″/σ′, None where σ″ = 0


ACTIVATIONS: dict = {
    nn.ELU: Activation(1, lambda m: m.alpha, lambda m, p: F.elu(p, m.alpha), lambda m, p: F.elu_(p, m.alpha),
                       lambda m, t, y, **o: aten.elu_backward(t, m.alpha, 1, 1, True, y, **o),
                       lambda m, y: (y <= 0).to(y.dtype)),
    nn.Sigmoid: Activation(2, lambda m: 0.0, lambda m, p: p.sigmoid(), lambda m, p: p.sigmoid_(),
                           lambda m, t, y, **o: aten.sigmoid_backward(t, y, **o), lambda m, y: 1 - 2 * y),
    nn.Tanh: Activation(3, lambda m: 0.0, lambda m, p: p.tanh(), lambda m, p: p.tanh_(),
                        lambda m, t, y, **o: aten.tanh_backward(t, y, **o), lambda m, y: -2 * y),
    nn.ReLU: Activation(4, lambda m: 0.0, lambda m, p: p.clamp_min(0), lambda m, p: p.clamp_min_(0),
                        lambda m, t, y, **o: aten.threshold_backward(t, y, 0, **o), None),
    nn.LeakyReLU: Activation(5, lambda m: m.negative_slope, lambda m, p: F.leaky_relu(p, m.negative_slope),
                             lambda m, p: F.leaky_relu_(p, m.negative_slope),
                             lambda m, t, y, **o: aten.leaky_relu_backward(t, y, m.negative_slope, False, **o),
                             None),
}


def chainable(m: nn.Module) -> bool:
    """Whether activation ``m`` joins a run: σ′ and σ″ must be functions of y = σ(p), which holds for
    ELU with α ≥ 0 and LeakyReLU with slope ≥ 0 (the sign of y is the sign of p)."""
    if type(m) not in ACTIVATIONS:
        return False
    return not ((type(m) is nn.ELU and m.alpha < 0) or (type(m) is nn.LeakyReLU and m.negative_slope < 0))


def _activate(Y: Tensor, U: Tensor, b: Optional[Tensor], act, k: int) -> None:
    """In place: the primal rows Y (B, m) become σ(Y + b), the tangent rows U (k·B, m) σ′ ⊙ U."""
    if b is not None:
        Y.add_(b)
    if act is not None:
        a = ACTIVATIONS[type(act)]
        a.value_(act, Y)
        U3 = U.view(k, *Y.shape)
        a.tangent(act, U3, Y, grad_input=U3)  # y broadcasts over the k tangents


def backward_reference(act, y: Tensor, u: Tensor, gy: Tensor, gu: Tensor, dY: Tensor) -> Tensor:
    """∂/∂(pre-activation) of one layer into dY ((1 + k)·B, m) from its outputs y (B, m), u (k·B, m)
    and their gradients gy, gu (which may be dY's own rows): the module docstring's formula in torch ops."""
    B = y.shape[0]
    dP, dT = dY[:B], dY[B:]
    if act is None:
        if dP.data_ptr() != gy.data_ptr():
            dP.copy_(gy)
            dT.copy_(gu)
        return dY
    a = ACTIVATIONS[type(act)]
    U, gU = u.reshape(-1, *y.shape), gu.reshape(-1, *y.shape)
    r = None if a.ratio is None else (gU * U).sum(0).mul_(a.ratio(act, y))  # before dY may overwrite gu
    a.tangent(act, gU, y, grad_input=dT.view(U.shape))
    a.tangent(act, gy, y, grad_input=dP)
    if r is not None:
        dP.add_(r)
    return dY


def reverse_pass() -> str:
    """Which implementation the elementwise part of the reverse pass takes on CPU tensors (``fastjac.info()``)."""
    if _extension.module is None:
        return f"torch reference ({_extension.reason})"
    return "host kernel fastjac._C.dense_backward (float32/float64 CPU; torch reference elsewhere)"


def _in_host_memory(t: Tensor) -> bool:
    """A plain contiguous CPU tensor whose memory the kernel may read (not fake, not a torch.func wrapper)."""
    return (type(t) is torch.Tensor and t.device.type == "cpu" and not is_functorch_wrapped_tensor(t)
            and t.is_contiguous())


def _kernel_runs(*tensors: Tensor) -> bool:
    """Whether the extension's kernel can take these operands (else the torch reference)."""
    return (_extension.module is not None and tensors[0].dtype in _extension.DTYPE_CODES
            and all(map(_in_host_memory, tensors)))


def _backward_layer(act, y: Tensor, u: Tensor, gy: Tensor, gu: Tensor, dY: Tensor, bias: bool,
                    kernel: Optional[bool] = None):
    """(dY, ∂ bias (m,) or None): one layer's reverse (:func:`backward_reference`, or the kernel;
    ``kernel`` None: decided from the operands)."""
    if kernel if kernel is not None else _kernel_runs(y, u, gy, gu, dY):
        a = ACTIVATIONS[type(act)] if act is not None else None
        db = dY.new_empty(dY.shape[1]) if bias else None
        _extension.module.dense_backward(
            _extension.DTYPE_CODES[dY.dtype], a.code if a else 0, float(a.param(act)) if a else 0.0, y.shape[0],
            u.shape[0] // y.shape[0], y.shape[1], y.data_ptr(), u.data_ptr(), gy.data_ptr(), gu.data_ptr(),
            dY.data_ptr(), 0 if db is None else db.data_ptr(), torch.get_num_threads())
        return dY, db
    backward_reference(act, y, u, gy, gu, dY)
    return dY, dY[: y.shape[0]].sum(0) if bias else None


def reference(P: Tensor, T: Tensor, layers: list) -> Tensor:
    """The run in ordinary differentiable torch ops (double backward, and the tests' reference);
    layers = [(weight, bias or None, activation or None)]."""
    B = P.shape[0]
    X = torch.cat([P, T])
    for W, b, act in layers:
        p, U = F.linear(X, W).split([B, T.shape[0]])
        p = p if b is None else p + b
        if act is not None:
            a = ACTIVATIONS[type(act)]
            p = a.value(act, p)
            U3 = U.view(-1, *p.shape)
            U = a.tangent(act, U3, p.expand_as(U3)).view(U.shape)
        X = torch.cat([p, U])
    return X


class DenseChain(torch.autograd.Function):
    """The run (module docstring) as one node: apply(P, T, spec, *params) -> (primal out, tangent
    outputs, the inner layers' output stacks (non-differentiable; kept for the reverse pass));
    params are the layers' weights and biases in order (those that exist), spec is
    [(weight index, bias index or None, activation or None)] per layer."""

    @classmethod
    def apply(cls, *args):
        """``Function.apply`` less its per-call ``inspect.signature`` binding (~60 µs a step here;
        ``forward`` has no defaults to bind), unless a torch.func transform needs the full path."""
        if torch._C._are_functorch_transforms_active():
            return super().apply(*args)
        return super(torch.autograd.Function, cls).apply(*unwrap_dead_wrappers(args))

    @staticmethod
    def forward(P, T, spec, *params):
        B, k = P.shape[0], T.shape[0] // P.shape[0]
        stacks, X = [], None  # each layer's output stack (the input of the next)
        for wi, bi, act in spec:
            W, b = params[wi], None if bi is None else params[bi]
            if X is None:  # the first layer: one buffer, two GEMMs, and no copy of P and T
                X = P.new_empty((P.shape[0] + T.shape[0], W.shape[0]))
                torch.mm(P, W.t(), out=X[:B])
                torch.mm(T, W.t(), out=X[B:])
            else:
                X = F.linear(X, W)
            _activate(X[:B], X[B:], b, act, k)
            stacks.append(X)
        stacks.pop()
        return (X[:B], X[B:], *stacks)

    @staticmethod
    def setup_context(ctx, inputs, output):  # (a separate step: torch.func transforms need it)
        P, T, spec, *params = inputs
        Y, U, *stacks = output
        ctx.save_for_backward(P, T, *stacks, Y, U, *params)
        ctx.mark_non_differentiable(*stacks)  # kept for the reverse pass only
        ctx.spec = spec

    @staticmethod
    def backward(ctx, gY, gU, *_stacks):
        spec, need = ctx.spec, ctx.needs_input_grad
        L = len(spec)
        saved = ctx.saved_tensors
        P, T, stacks, (Y, U), params = saved[0], saved[1], saved[2: L + 1], saved[L + 1: L + 3], saved[L + 3:]
        if torch.is_grad_enabled():
            return _recomputed(ctx, P, T, params, gY, gU)
        B = P.shape[0]
        grads = [None] * len(params)
        gP = gT = None
        dY = gY.new_empty((B + U.shape[0], Y.shape[1]))  # the top layer's; below, in place in ∂X
        gY, gU = gY.contiguous(), gU.contiguous()
        kernel = _kernel_runs(Y, U, gY, gU, dY)  # below the top every operand is one of our own buffers
        for i in range(L - 1, -1, -1):
            wi, bi, act = spec[i]
            if i + 1 < L:
                Y, U = stacks[i][:B], stacks[i][B:]
            with_bias = bi is not None and need[3 + bi]
            dY, db = _backward_layer(act, Y, U, gY, gU, dY, with_bias, kernel)
            W = params[wi]
            if need[3 + wi]:
                grads[wi] = dY.t().mm(stacks[i - 1]) if i else torch.addmm(dY[:B].t().mm(P), dY[B:].t(), T)
            if with_bias:
                grads[bi] = db
            if i:
                dY = dY.mm(W)
                gY, gU = dY[:B], dY[B:]
            else:
                gP = dY[:B].mm(W) if need[0] else None
                gT = dY[B:].mm(W) if need[1] else None
        return (gP, gT, None, *grads)


def _recomputed(ctx, P: Tensor, T: Tensor, params, gY: Tensor, gU: Tensor) -> tuple:
    """The run's gradients as a differentiable graph (double backward): rerun it with ordinary ops
    from the node's own inputs."""
    need = ctx.needs_input_grad
    layers = [(params[wi], None if bi is None else params[bi], act) for wi, bi, act in ctx.spec]
    wanted = [t for t, n in zip((P, T, *params), (need[0], need[1], *need[3:])) if n]
    with torch.enable_grad():
        out = reference(P, T, layers)
        found = iter(torch.autograd.grad(out, wanted, torch.cat([gY, gU]), create_graph=True))
    return tuple(next(found) if n else None for n in need[:2]) + (None,) + \
        tuple(next(found) if n else None for n in need[3:])


def run(P: Tensor, T: Tensor, layers: list) -> tuple:
    """(primal out (B, n_L), tangent outputs (k·B, n_L)) of ``layers`` [(Linear, activation or
    None)] on P (B, n₀), T (k·B, n₀)."""
    params, spec = [], []
    for lin, act in layers:
        wi = len(params)
        params.append(lin.weight)
        bi = None
        if lin.bias is not None:
            bi = len(params)
            params.append(lin.bias)
        spec.append((wi, bi, act))
    return DenseChain.apply(P, T, spec, *params)[:2]
