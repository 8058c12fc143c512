"""Stacked tangent evaluation of plain ``nn.Sequential`` decoders: primal and k tangents in one call per layer.

For a decoder built only of the layers in :data:`LAYERS` (Linear, convolutions, eval-mode
BatchNorm, reshapes, resampling and elementwise activations), :func:`push` runs the primal z and
the k tangents stacked along the batch, X = [z; t_1; …; t_k] ((1 + k)·B rows):
- linear layers (Linear, Conv*, ConvTranspose*) are linear in X, so one call on the stack gives
  the primal and every tangent; the bias is added to the primal rows only;
- reshapes, Upsample, PixelShuffle, Dropout in eval mode act on each row alike;
- BatchNorm in eval mode: the primal through torch, the tangents scaled by weight/√(var + ε);
- an activation σ: primal rows σ(p), tangent rows σ′(p) ⊙ t by torch's fused backward kernel of σ.
Everything is ordinary torch ops, so the result is differentiable by reverse mode, exactly (the
kernels' own derivatives are torch's double-backward formulas). Against ``torch.func.jvp`` under ``vmap`` this
saves one call and one weight-gradient sum per layer in backward, and all of functorch's
per-op overhead (a GRAE≈ step on the benchmarks' MLP: see ``fastjac.bench.zoo``).

Any other module (or a hook, or a training-mode BatchNorm/Dropout) makes :func:`supports` false
and the decoder goes through torch.func under the op rules instead.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


aten = torch.ops.aten


def _silu_tangent(t: Tensor, p: Tensor) -> Tensor:
    """silu′(p) ⊙ t = σ(p)(1 + p(1 − σ(p))) ⊙ t (torch's silu_backward has no derivative)."""
    s = torch.sigmoid(p)
    return t * (s * (1 + p * (1 - s)))


# activation type -> (σ(m, p), (m, t, p, y) -> σ′(p) ⊙ t). σ′ ⊙ t is torch's own fused backward
# kernel of σ (what torch's forward-AD formula and ordinary double backward use): one kernel for
# the tangent, and its derivative (double backward) is exact; SiLU's kernel has no derivative,
# so its σ′ is written out. (CELU is left to torch.func: torch's own CELU derivatives are off by
# ~3e-8 in float64, and the stacked result would then differ from every other path.)
ACTIVATIONS: dict = {
    nn.Identity: (lambda m, p: p, None),
    nn.ELU: (lambda m, p: F.elu(p, m.alpha), lambda m, t, p, y: aten.elu_backward(t, m.alpha, 1, 1, True, y)),
    nn.ReLU: (lambda m, p: F.relu(p), lambda m, t, p, y: aten.threshold_backward(t, y, 0)),
    nn.LeakyReLU: (lambda m, p: F.leaky_relu(p, m.negative_slope),
                   lambda m, t, p, y: aten.leaky_relu_backward(t, p, m.negative_slope, False)),
    nn.Sigmoid: (lambda m, p: torch.sigmoid(p), lambda m, t, p, y: aten.sigmoid_backward(t, y)),
    nn.Tanh: (lambda m, p: torch.tanh(p), lambda m, t, p, y: aten.tanh_backward(t, y)),
    nn.SiLU: (lambda m, p: F.silu(p), lambda m, t, p, y: _silu_tangent(t, p)),
    nn.Softplus: (lambda m, p: F.softplus(p, m.beta, m.threshold),
                  lambda m, t, p, y: aten.softplus_backward(t, p, m.beta, m.threshold)),
    nn.GELU: (lambda m, p: F.gelu(p, approximate=m.approximate),
              lambda m, t, p, y: aten.gelu_backward(t, p, approximate=m.approximate)),
}


def _summed(gT: Tensor, T: Tensor) -> Tensor:
    """Σ over the k tangents of gT ⊙ T ((k, B, n) each): what σ″ multiplies in ∂/∂p."""
    return gT[0] * T[0] if len(T) == 1 else (gT * T).sum(0)


def _pre_elu(m, gY, gT, T, y):
    # σ″ = σ′ where p ≤ 0 (and 0 above): σ′gY + σ″ Σ gT·T = σ′(gY + [y ≤ 0] Σ gT·T)
    return _summed(gT, T).mul_(y <= 0).add_(gY)


def _pre_sigmoid(m, gY, gT, T, y):
    # σ″ = σ′(1 − 2y)
    u = _summed(gT, T)
    return torch.addcmul(gY, u, y, value=-2).add_(u)


def _pre_tanh(m, gY, gT, T, y):
    # σ″ = −2y σ′
    return torch.addcmul(gY, _summed(gT, T), y, value=-2)


def _pre_piecewise_linear(m, gY, gT, T, y):
    # σ″ = 0
    return gY


# activation type -> (σ(p) into out, σ′(p) ⊙ t into out, (m, gY, gT, T, y) -> u with
# ∂/∂p = σ′(p) ⊙ u): the kernels of ACTIVATIONS writing into a given buffer (the fused pairs of
# :class:`_LinearActivation` build their outputs in place: fewer large allocations, no cat), and
# the reverse of [σ(p); σ′(p) ⊙ T] in closed form, σ″ written out through σ′.
FUSED: dict = {
    nn.ELU: (lambda m, p, o: aten.elu.out(p, m.alpha, 1, 1, out=o),
             lambda m, t, p, y, o: aten.elu_backward.grad_input(t, m.alpha, 1, 1, True, y, grad_input=o), _pre_elu),
    nn.Sigmoid: (lambda m, p, o: torch.sigmoid(p, out=o),
                 lambda m, t, p, y, o: aten.sigmoid_backward.grad_input(t, y, grad_input=o), _pre_sigmoid),
    nn.Tanh: (lambda m, p, o: torch.tanh(p, out=o),
              lambda m, t, p, y, o: aten.tanh_backward.grad_input(t, y, grad_input=o), _pre_tanh),
    nn.ReLU: (lambda m, p, o: torch.clamp_min(p, 0, out=o),
              lambda m, t, p, y, o: aten.threshold_backward.grad_input(t, y, 0, grad_input=o), _pre_piecewise_linear),
    nn.LeakyReLU: (lambda m, p, o: aten.leaky_relu.out(p, m.negative_slope, out=o),
                   lambda m, t, p, y, o: aten.leaky_relu_backward.grad_input(t, p, m.negative_slope, False,
                                                                             grad_input=o), _pre_piecewise_linear),
}
LINEAR = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
ROWWISE = (nn.Flatten, nn.Unflatten, nn.Upsample, nn.PixelShuffle, nn.PixelUnshuffle, nn.Dropout)
BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _plain(m: nn.Module) -> bool:
    return not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks)


def _layer_supported(m: nn.Module) -> bool:
    if not _plain(m):
        return False
    if type(m) in ACTIVATIONS:
        return True  # the rules below never write in place, whatever ``inplace`` says
    if isinstance(m, LINEAR):  # subclasses only with torch's own forward (parametrised ones are)
        return any(type(m).forward is base.forward for base in LINEAR)
    if isinstance(m, nn.Flatten):  # the batch dimension must stay as it is
        return m.start_dim >= 1
    if isinstance(m, nn.Unflatten):
        return m.dim >= 1
    if isinstance(m, nn.Dropout):
        return not m.training or m.p == 0
    if isinstance(m, BATCHNORM):
        return not m.training and m.running_mean is not None
    return type(m) in ROWWISE


def supports(decoder) -> bool:
    """Whether ``decoder`` is an ``nn.Sequential`` of :data:`LAYERS` only (nested Sequentials allowed)."""
    if type(decoder) is not nn.Sequential or not _plain(decoder) or len(decoder) == 0:
        return False
    return all(supports(m) if type(m) is nn.Sequential else _layer_supported(m) for m in decoder)


def _channel_shaped(bias, X: Tensor):
    """The bias shaped per channel, in X's dtype (under autocast, as the layer's own addmm casts it)."""
    return None if bias is None else bias.to(X.dtype).reshape((-1,) + (1,) * (X.dim() - 2))


def _with_bias(X: Tensor, bias, B: int) -> Tensor:
    """Add ``bias`` to the primal rows only (a new tensor: no in-place write, whose backward copies)."""
    if bias is None:
        return X
    P, T = X.split([B, X.shape[0] - B])
    return torch.cat([P + bias, T])


_TRANSPOSED = {nn.ConvTranspose1d: F.conv_transpose1d, nn.ConvTranspose2d: F.conv_transpose2d,
               nn.ConvTranspose3d: F.conv_transpose3d}


def _linear(m: nn.Module, X: Tensor) -> tuple:
    """(the layer without its bias on the whole stack, the bias still to add to the primal rows);
    the module is not modified."""
    if isinstance(m, nn.Linear):
        Y = F.linear(X, m.weight)
    elif isinstance(m, nn.modules.conv._ConvTransposeNd):
        conv = next(f for cls, f in _TRANSPOSED.items() if isinstance(m, cls))
        Y = conv(X, m.weight, None, m.stride, m.padding, m.output_padding, m.groups, m.dilation)
    else:
        Y = m._conv_forward(X, m.weight, None)  # handles the padding modes
    return Y, _channel_shaped(m.bias, Y)


def _batch_norm(m: nn.Module, X: Tensor, B: int, k: int) -> Tensor:
    P, T = X.split([B, k * B])
    primal = m(P)
    scale = torch.rsqrt(m.running_var + m.eps)
    scale = scale if m.weight is None else scale * m.weight
    return torch.cat([primal, T * scale.reshape((-1,) + (1,) * (X.dim() - 2))])


def _activation(m: nn.Module, X: Tensor, B: int, k: int, bias=None) -> Tensor:
    """σ on the primal rows (after the pending bias of the layer before), σ′(p) ⊙ t on the rest."""
    sigma, tangent = ACTIVATIONS[type(m)]
    if tangent is None:
        return _with_bias(X, bias, B)
    p, T = X.split([B, k * B])
    p = p if bias is None else p + bias
    y = sigma(m, p)
    if k == 1:
        return torch.cat([y, tangent(m, T, p, y)])
    p_k, y_k = (a.repeat((k,) + (1,) * (a.dim() - 1)) for a in (p, y))
    return torch.cat([y, tangent(m, T, p_k, y_k)])


class _LinearActivation(torch.autograd.Function):
    """An ``nn.Linear`` and the activation after it on the stack X ((1 + k)·B, n_in): the primal
    rows σ(x Wᵀ + b), the tangent rows σ′ ⊙ t Wᵀ, with the reverse pass written out (:data:`FUSED`):
    one GEMM each for ∂W and ∂X over the whole stack and a few elementwise kernels, and no
    autograd graph inside the pair, whose bookkeeping costs as much as the GEMMs on small layers.
    Double backward (``create_graph``) recomputes the pair with ordinary ops and differentiates those."""

    @staticmethod
    def forward(ctx, X, W, b, act, B):
        Y = F.linear(X, W)
        p, T = Y[:B], Y[B:].view(-1, B, Y.shape[1])
        p = p if b is None else p.add_(b)  # Y is ours: the bias goes into the primal rows in place
        sigma, tangent, _ = FUSED[type(act)]
        out = torch.empty_like(Y)
        y = sigma(act, p, out[:B])
        tangent(act, T, p, y, out[B:].view(T.shape))
        ctx.save_for_backward(X, W, b, p, T, out)  # the output, not its view y (made without grad)
        ctx.act, ctx.B = act, B
        return out

    @staticmethod
    def backward(ctx, G):
        X, W, b, p, T, out = ctx.saved_tensors
        if torch.is_grad_enabled():
            return _recomputed_grads(ctx, (X, W, b), G)
        y = out[: ctx.B]
        _, tangent, pre = FUSED[type(ctx.act)]
        gY, gT = G[: ctx.B], G[ctx.B:].reshape(T.shape)
        dY = G.new_empty(G.shape)
        dp = tangent(ctx.act, pre(ctx.act, gY, gT, T, y), p, y, dY[: ctx.B])
        tangent(ctx.act, gT, p, y, dY[ctx.B:].view(T.shape))
        need_X, need_W, need_b = ctx.needs_input_grad[:3]
        return (dY @ W if need_X else None, dY.t() @ X if need_W else None,
                dp.sum(0) if need_b else None, None, None)


def _recomputed_grads(ctx, inputs: tuple, G: Tensor) -> tuple:
    """The pair's gradients as a differentiable graph (double backward): rerun it unfused."""
    X, W, b = inputs
    need = [bool(n) and t is not None for t, n in zip(inputs, ctx.needs_input_grad)]
    with torch.enable_grad():
        out = _activation(ctx.act, F.linear(X, W), ctx.B, (X.shape[0] - ctx.B) // ctx.B, b)
        found = iter(torch.autograd.grad(out, [t for t, n in zip(inputs, need) if n], G, create_graph=True))
    return tuple(next(found) if n else None for n in need) + (None, None)


def _fusable(m: nn.Module, after, X: Tensor) -> bool:
    """Whether ``m`` and the layer ``after`` it run as one :class:`_LinearActivation` (not under
    autocast or torch.compile, whose casts and tracing the hand-written reverse pass would skip)."""
    return (type(m) is nn.Linear and type(after) in FUSED and X.dim() == 2
            and not torch.is_autocast_enabled(X.device.type) and not torch.compiler.is_compiling())


def _leaves(decoder: nn.Sequential):
    for m in decoder:
        yield from (_leaves(m) if type(m) is nn.Sequential else (m,))


def push(decoder: nn.Sequential, z: Tensor, tangents: Tensor):
    """(out (B, *out), tangent outputs (k, B, *out)) for z (B, *latent), tangents (k, B, *latent).

    A linear layer's bias is added by the activation right after it (to its input rows), or on
    its own before any other layer: no copy of the stack for it."""
    k, B = tangents.shape[:2]
    X = torch.cat([z.unsqueeze(0), tangents.to(z.dtype)]).reshape((k + 1) * B, *z.shape[1:])
    bias, fused = None, False
    layers = list(_leaves(decoder))
    for m, after in zip(layers, layers[1:] + [None]):
        if fused:  # the activation already applied with the linear layer before it
            fused = False
        elif type(m) in ACTIVATIONS:
            X, bias = _activation(m, X, B, k, bias), None
        elif _fusable(m, after, X):
            X, bias, fused = _LinearActivation.apply(_with_bias(X, bias, B), m.weight, m.bias, after, B), None, True
        else:
            X, bias = _layer(m, _with_bias(X, bias, B), B, k)
    out, T = _with_bias(X, bias, B).split([B, k * B])
    return out, T.reshape(k, B, *X.shape[1:])


def _layer(m: nn.Module, X: Tensor, B: int, k: int) -> tuple:
    """(output, pending bias) of a non-activation layer on the stack."""
    if isinstance(m, LINEAR):
        return _linear(m, X)
    if isinstance(m, BATCHNORM):
        return _batch_norm(m, X, B, k), None
    return m(X), None
