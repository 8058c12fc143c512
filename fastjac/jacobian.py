"""Decoder Jacobian columns J e_j by forward-mode AD (SPEC §5).

One primal pass of the decoder carries k tangents at once (``torch.func.jvp`` under
``vmap`` over the tangents; the primal is not batched, so it is computed once). The
result is differentiable into z and the decoder's parameters (reverse over forward).
Reverse mode over the D outputs is never used. Decoders that carry tangents themselves
(a ``tangent_forward(z, tangents)`` method, e.g. :class:`fastjac.nn.TangentMLP` with its
fused Linear+activation kernels) are used through that method instead of torch.func.

Pitfalls, and what happens here:
- BatchNorm using batch statistics (training mode, or ``track_running_stats=False``)
  couples the samples: the columns are then those of the whole batch's output with every
  sample moved along e_j, not the per-sample Jacobian (terms of order 1/B). That warns;
  training mode *with* running statistics cannot be traced at all and raises ValueError.
  Fix: ``decoder.eval()`` for the regulariser pass, or GroupNorm/LayerNorm.
- ``torch.no_grad()`` does not stop forward tangents: columns computed under it are
  exact (only no graph is kept), and a ``no_grad`` block *inside* a decoder still
  carries its tangents but records no graph, so the gradient of J through it (into z
  and the block's parameters) is silently lost. To freeze parameters use
  ``requires_grad_(False)``; to cut a path, ``.detach()`` (which stops the tangent too).
- Dropout: one mask per decoder call, shared by the primal and every tangent
  (``randomness="same"``); chunks replay the same random state, so every chunk and the
  primal see the same mask.
- Tuple, dict or object outputs: ``output=`` selects the reconstruction.
- Second-order terms: training differentiates J, i.e. reverse mode over the decoder's
  forward-AD formulas. For LayerNorm and InstanceNorm (instance statistics) those drop the
  derivative of the statistics (torch 2.13), so gradients of J are silently wrong; while
  columns are computed, such layers of a module decoder run a decomposed form whose
  derivatives are exact (decoders hidden in a lambda, or ``F.layer_norm`` calls, are not seen).
"""
from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Mapping
from contextlib import contextmanager
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn
from torch.func import jvp, vmap

from . import _validation as check

Selector = Union[None, str, int, Callable[[Any], Tensor]]


class BatchCouplingWarning(UserWarning):
    """The decoder normalises with batch statistics, so its per-sample Jacobian is not defined."""


_MISSING = object()


def _contents(result) -> str:
    """What a decoder's return value holds, for error messages."""
    if isinstance(result, Mapping):
        return f"keys {list(result)}"
    if dataclasses.is_dataclass(result):
        return f"fields {[f.name for f in dataclasses.fields(result)]}"
    if isinstance(result, tuple) and hasattr(result, "_fields"):
        return f"fields {list(result._fields)}"
    if isinstance(result, (tuple, list)):
        return f"{len(result)} items"
    names = [n for n in getattr(result, "__dict__", {}) if not n.startswith("_")]
    return f"attributes {names}"


def _lookup(result, key):
    try:
        return result[key]
    except (KeyError, IndexError, TypeError):
        return getattr(result, key, _MISSING) if isinstance(key, str) else _MISSING


def select_output(result, output: Selector) -> Tensor:
    """The tensor the regulariser acts on, out of whatever the decoder returned.

    ``output``: None (the decoder returns a Tensor), a key or attribute name (dict, dataclass,
    named tuple, ModelOutput-like object), an index (tuple, list) or a callable of the result.
    """
    kind = type(result).__name__
    if output is None:
        if isinstance(result, Tensor):
            return result
        raise TypeError(
            f"decoder returned a {kind} ({_contents(result)}), not a Tensor; pass output= "
            "(a key, an index or a callable) to say which part is the reconstruction")
    if callable(output):
        selected = output(result)
    elif isinstance(result, Tensor):
        raise TypeError(f"output={output!r} selects a part of a tuple, dict or object, but the decoder "
                        "returned a Tensor; leave output=None")
    else:
        selected = _lookup(result, output)
        if selected is _MISSING:
            raise ValueError(f"output={output!r} selects nothing in the decoder's {kind} output "
                             f"({_contents(result)})")
    if not isinstance(selected, Tensor):
        raise TypeError(f"output={output!r} selected a {type(selected).__name__} from the decoder's "
                        f"{kind} output, expected a Tensor")
    return selected


def column_directions(columns, directions, B: int, d: int, like: Tensor) -> Tensor:
    """The (B, d, k) tangent directions for ``columns`` / ``directions`` (see jacobian_columns)."""
    if columns is not None and directions is not None:
        raise ValueError("pass either columns or directions, not both")
    if directions is not None:
        check.tensor("directions", directions, ndim=3)
        if directions.shape[:2] != (B, d) or directions.shape[2] < 1:
            raise ValueError(f"directions must have shape (B, d, k) = ({B}, {d}, k >= 1), "
                             f"got {tuple(directions.shape)}")
        check.finite("directions", directions)
        return directions.to(like.dtype)
    eye = torch.eye(d, dtype=like.dtype, device=like.device)
    if columns is None:
        return eye.expand(B, d, d)
    if not isinstance(columns, Tensor) or columns.dtype not in (torch.int64, torch.int32):
        raise TypeError("columns must be a LongTensor of shape (k,) or (B, k)")
    if columns.dim() == 1:
        columns = columns.unsqueeze(0).expand(B, -1)
    if columns.dim() != 2 or columns.shape[0] != B or columns.shape[1] < 1:
        raise ValueError(f"columns must have shape (k,) or (B, k) with B = {B}, got {tuple(columns.shape)}")
    if check.values_checked() and not bool(((columns >= 0) & (columns < d)).all()):
        raise ValueError(f"columns must lie in [0, d) = [0, {d})")
    return eye[columns.to(like.device).long()].mT  # (B, d, k)


def _modules(decoder) -> list:
    """The nn.Modules a decoder callable is made of, as far as they can be seen."""
    while hasattr(decoder, "func") and callable(decoder.func):  # functools.partial
        decoder = decoder.func
    owner = getattr(decoder, "__self__", decoder)  # bound method
    return list(owner.modules()) if isinstance(owner, nn.Module) else []


def check_normalisation(decoder) -> None:
    """Refuse or warn about BatchNorm layers that use batch statistics (see the module notes)."""
    coupled = [m for m in _modules(decoder) if isinstance(m, nn.modules.batchnorm._BatchNorm)
               and (m.training or m.running_mean is None)]
    if not coupled:
        return
    names = ", ".join(sorted({type(m).__name__ for m in coupled}))
    why = (f"the decoder has {len(coupled)} {names} layer(s) normalising with batch statistics, "
           "which couple the samples, so J is not the per-sample Jacobian (SPEC §5)")
    fix = "call decoder.eval() for the regulariser pass, or use GroupNorm/LayerNorm"
    if any(m.training and m.track_running_stats for m in coupled):
        raise ValueError(f"{why}; in training mode their running-statistics update is an in-place "
                         f"write that forward-mode AD cannot trace: {fix}")
    warnings.warn(f"{why}: J e_j is the derivative with every sample moved along e_j at once "
                  f"(errors of order 1/B); {fix}", BatchCouplingWarning, stacklevel=3)


def _normalised(x: Tensor, dims: tuple, eps: float, weight, bias) -> Tensor:
    centred = x - x.mean(dims, keepdim=True)
    y = centred * torch.rsqrt(centred.pow(2).mean(dims, keepdim=True) + eps)
    y = y if weight is None else y * weight
    return y if bias is None else y + bias


def _layer_norm(m: nn.LayerNorm, x: Tensor) -> Tensor:
    return _normalised(x, tuple(range(-len(m.normalized_shape), 0)), m.eps, m.weight, m.bias)


def _instance_norm(m, x: Tensor) -> Tensor:
    per_channel = (-1,) + (1,) * (x.dim() - 2)
    weight = None if m.weight is None else m.weight.reshape(per_channel)
    bias = None if m.bias is None else m.bias.reshape(per_channel)
    return _normalised(x, tuple(range(2, x.dim())), m.eps, weight, bias)


@contextmanager
def decomposed_normalisation(decoder):
    """Within the block, the decoder's LayerNorm and instance-statistics InstanceNorm layers run
    a decomposed form, whose forward-AD formulas are exactly twice differentiable (see notes)."""
    swapped = []
    for m in _modules(decoder):
        if isinstance(m, nn.LayerNorm):
            form = _layer_norm
        elif isinstance(m, nn.modules.instancenorm._InstanceNorm) and (m.training or not m.track_running_stats):
            form = _instance_norm
        else:
            continue
        swapped.append((m, m.__dict__.get("forward")))
        m.forward = functools.partial(form, m)
    try:
        yield
    finally:
        for m, previous in swapped:
            del m.forward
            if previous is not None:
                m.forward = previous


def random_state(device: torch.device) -> Callable[[], None]:
    """A function that resets the RNG (CPU and ``device``) to its state now, so that every
    chunk's decoder call draws the same dropout masks as the first one."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def replay() -> None:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)
    return replay


def _pusher(decoder: Callable, output: Selector):
    """push(z, tangents (k, B, d)) -> (out (B, *out), tangent outputs (k, B, *out))."""
    fused = getattr(decoder, "tangent_forward", None)
    if output is None and callable(fused):
        return fused

    def decode(code):
        return select_output(decoder(code), output)

    def push(z, tangents):
        one = lambda tangent: jvp(decode, (z,), (tangent,))  # noqa: E731
        return vmap(one, out_dims=(None, 0), randomness="same")(tangents)
    return push


def jacobian_columns(decoder: Callable, z: Tensor, columns: Optional[Tensor] = None, *,
                     directions: Optional[Tensor] = None, chunk_size: Optional[int] = None,
                     output: Selector = None):
    """Decoder output and Jacobian columns, by forward mode in one primal pass.

    Args:
        decoder: any callable acting per sample, (B, d) -> (B, *out_shape) (or a tuple/dict/
            object holding it; see ``output``). A decoder with a ``tangent_forward(z, tangents)``
            method ((B, d), (k, B, d) -> (B, *out), (k, B, *out)) is pushed through it.
        z: (B, d) codes.
        columns: None (all d columns), a LongTensor (k,) shared by all samples, or (B, k) per sample.
        directions: arbitrary tangent directions (B, d, k) instead of columns: J @ directions.
        chunk_size: push at most this many tangents per decoder call (same result; each call
            keeps its own graph, so this bounds the forward's peak, not what backward holds —
            for that see :func:`fastjac.chunked.recomputed_columns`).
        output: which part of the decoder's return value to use: a key, an index or a callable.
    Returns:
        (out, J): out = decoder(z) selected, (B, *out_shape); J (B, D, k), D = prod(out_shape).

    Example:
        >>> dec = torch.nn.Linear(3, 5)
        >>> out, J = jacobian_columns(dec, torch.randn(2, 3))
        >>> J.shape
        torch.Size([2, 5, 3])
    """
    if not callable(decoder):
        raise TypeError(f"decoder must be callable, got {type(decoder).__name__}")
    check.tensor("z", z, ndim=2)
    B, d = z.shape
    if B == 0 or d == 0:
        raise ValueError(f"z must be a non-empty (B, d) tensor, got shape {tuple(z.shape)}")
    check.finite("z", z)
    if chunk_size is not None:
        check.positive_int("chunk_size", chunk_size)
    check_normalisation(decoder)
    tangents = column_directions(columns, directions, B, d, z).permute(2, 0, 1)  # (k, B, d)
    k = tangents.shape[0]
    step = k if chunk_size is None else min(chunk_size, k)
    push = _pusher(decoder, output)
    replay = random_state(z.device) if step < k else None  # only chunks replay (and it breaks compile)
    out, pieces = None, []
    for start in range(0, k, step):
        if start:
            replay()
        with decomposed_normalisation(decoder):
            primal, cols = push(z, tangents[start:start + step])
        if out is None:
            if primal.dim() < 1 or primal.shape[0] != B:
                raise ValueError(f"decoder output must have batch size B = {B} first, "
                                 f"got shape {tuple(primal.shape)}")
            out = primal
        pieces.append(cols)
    cols = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
    return out, cols.reshape(k, B, -1).permute(1, 2, 0)
