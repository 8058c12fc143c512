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
kernels' own derivatives are torch's double-backward formulas), except runs of Linear layers
with their activations: those are one autograd node with its reverse pass written out
(:mod:`fastjac.autodiff.dense_chain`). Against ``torch.func.jvp`` under ``vmap`` this saves one
call and one weight-gradient sum per layer in backward, and all of functorch's per-op overhead
(a GRAE≈ step on the benchmarks' MLP: see ``fastjac.bench.zoo``).

Any other module (or a hook, or a training-mode BatchNorm/Dropout) makes :func:`supports` false
and the decoder goes through torch.func under the op rules instead.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import dense_chain


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
    nn.ELU: (lambda m, p: F.elu(p, m.alpha), lambda m, t, p, y: aten.elu_backward(t, m.alpha, 1, 1, False, p)),
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


def _dense_run(layers: list, X: Tensor) -> list:
    """The (Linear, activation or None) pairs from the start of ``layers`` that run as one
    :class:`~fastjac.autodiff.dense_chain.DenseChain` node: plain Linear layers on 2-D stacks,
    outside autocast and torch.compile (whose casts and tracing its hand-written reverse pass
    would skip), each with the activation after it when that one can join."""
    if X.dim() != 2 or torch.is_autocast_enabled(X.device.type) or torch.compiler.is_compiling():
        return []
    run, i = [], 0
    while i < len(layers) and type(layers[i]) is nn.Linear:
        act = layers[i + 1] if i + 1 < len(layers) and dense_chain.chainable(layers[i + 1]) else None
        run.append((layers[i], act))
        i += 1 if act is None else 2
    return run


def _leaves(decoder: nn.Sequential):
    for m in decoder:
        yield from (_leaves(m) if type(m) is nn.Sequential else (m,))


def push(decoder: nn.Sequential, z: Tensor, tangents: Tensor):
    """(out (B, *out), tangent outputs (k, B, *out)) for z (B, *latent), tangents (k, B, *latent).

    Runs of Linear layers and their activations go as one node (:func:`_dense_run`), on the
    primal and tangent rows apart (P, T); everything else on their stack X = [P; T]. Any other
    linear layer's bias is added by the activation right after it (to its input rows), or on
    its own before any other layer: no copy of the stack for it."""
    k, B = tangents.shape[:2]
    layers = list(_leaves(decoder))
    P, T, X, bias, i = z, tangents.to(z.dtype).reshape(k * B, *z.shape[1:]), None, None, 0
    while i < len(layers):
        run = _dense_run(layers[i:], P if X is None else X)
        if run:
            if X is not None:
                P, T = _with_bias(X, bias, B).split([B, k * B])
            (P, T), X, bias = dense_chain.run(P, T, run), None, None
            i += sum(1 if act is None else 2 for _, act in run)
            continue
        if X is None:
            X = torch.cat([P, T])
        m = layers[i]
        if type(m) in ACTIVATIONS:
            X, bias = _activation(m, X, B, k, bias), None
        else:
            X, bias = _layer(m, _with_bias(X, bias, B), B, k)
        i += 1
    if X is not None:
        P, T = _with_bias(X, bias, B).split([B, k * B])
    return P, T.reshape(k, B, *P.shape[1:])


def _layer(m: nn.Module, X: Tensor, B: int, k: int) -> tuple:
    """(output, pending bias) of a non-activation layer on the stack."""
    if isinstance(m, LINEAR):
        return _linear(m, X)
    if isinstance(m, BATCHNORM):
        return _batch_norm(m, X, B, k), None
    return m(X), None
