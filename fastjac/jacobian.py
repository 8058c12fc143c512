"""Decoder Jacobian columns J e_j by forward-mode AD (docs/maths.md#jacobian-columns).

One primal pass of the decoder carries k tangents at once (``torch.func.jvp`` under
``vmap`` over the tangents; the primal is not batched, so it is computed once). The
result is differentiable into z and the decoder's parameters (reverse over forward).
Reverse mode over the D outputs is never used. Decoders that carry tangents themselves
(a ``tangent_forward(z, tangents)`` method, e.g. :class:`fastjac.nn.TangentMLP` with its
fused Linear+activation kernels) are used through that method instead of torch.func, and plain
``nn.Sequential`` decoders of common layers by the stacked evaluation of
:mod:`fastjac.autodiff.stacked` (primal and tangents through one call per layer). Any other
decoder first runs its own forward on the stacked [z; tangents] under the whitelisted rules of
:mod:`fastjac.autodiff.stacked_ops` (a diffusers VAE, residual blocks, functions); a call
without a rule there (or a decoder with hooks) sends it to torch.func, and that decision is
kept per decoder structure, shapes and dtype. Under ``torch.compile``: torch.func, traced.

Every entry point (:func:`jacobian_columns`, :mod:`fastjac.chunked`, and through them every
estimator and objective) prepares the decoder here, in one place:
- DDP/DataParallel/torch.compile wrappers are removed (:mod:`fastjac._decoders`); the
  decoder runs under the caller's autocast.
- The op table of :mod:`fastjac._rules` is active around the tangent pass, also when
  ``torch.utils.checkpoint`` recomputes it in backward: layer/group/instance/batch norm run
  exactly twice-differentiable decompositions, ``scaled_dot_product_attention`` its math
  form, the transformer fast path is off — for modules handed in directly, behind a lambda
  or ``functools.partial``, and for functional calls alike.
- An op with no forward-AD formula and no rule: the columns come from the double-VJP
  method instead (J v = ∂/∂u ⟨Jᵀu, v⟩, exact and differentiable, one reverse pass per
  column), with one ``ForwardADFallbackWarning`` naming the op.
- Threads: torch.func's forward-AD levels are process-wide state, so concurrent tangent
  passes corrupt each other ("no level exists", or silently zero columns). The forward-AD
  section holds :data:`FORWARD_AD_LOCK` (a process-wide re-entrant lock); the decoder's
  backward runs outside it. Under ``torch.compile`` the lock is not taken (the compiled
  graph holds no forward-AD state).
- Latents of any shape: z (B, *latent_shape); d = prod(latent_shape), columns and
  directions index the flattened latent, the decoder receives z in its own shape.

Pitfalls, and what happens here:
- BatchNorm using batch statistics (training mode, or ``track_running_stats=False``)
  couples the samples: the columns are then those of the whole batch's output with every
  sample moved along e_j, not the per-sample Jacobian (terms of order 1/B;
  docs/maths.md#batch-coupling). That warns; training mode *with* running statistics
  cannot be traced at all and raises ValueError. Fix: ``decoder.eval()`` for the
  regulariser pass, or GroupNorm/LayerNorm.
- ``torch.no_grad()`` does not stop forward tangents: columns computed under it are
  exact (only no graph is kept), and a ``no_grad`` block *inside* a decoder still
  carries its tangents but records no graph, so the gradient of J through it (into z
  and the block's parameters) is silently lost. To freeze parameters use
  ``requires_grad_(False)``; to cut a path, ``.detach()`` (which stops the tangent too).
- Dropout: one mask per decoder call, shared by the primal and every tangent
  (``randomness="same"``); chunks replay the same random state, so every chunk and the
  primal see the same mask.
- Tuple, dict or object outputs: ``output=`` selects the reconstruction.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
import threading
import warnings
from collections.abc import Mapping
from typing import Any, Callable, Optional, Union

import torch
import torch.utils.checkpoint
from torch import Tensor, nn
from torch.func import jvp, vmap

from . import _decoders
from .autodiff import stacked, stacked_ops
from . import _validation as check
from ._rules import BATCH_FIX, BatchCouplingWarning, column_rules, refuse_running_statistics_update, updates_running_statistics

Selector = Union[None, str, int, Callable[[Any], Tensor]]


__all__ = ["jacobian_columns", "select_output", "column_directions", "BatchCouplingWarning",
           "ForwardADFallbackWarning", "FORWARD_AD_LOCK"]

FORWARD_AD_LOCK = threading.RLock()


class ForwardADFallbackWarning(UserWarning):
    """An op without a forward-AD formula: columns computed by the (slower) double-VJP method."""


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
    check.condition("columns", (columns >= 0) & (columns < d), f"columns must lie in [0, d) = [0, {d})")
    return eye[columns.to(like.device).long()].mT  # (B, d, k)


def _modules(decoder) -> list:
    """The nn.Modules a decoder callable is made of, as far as they can be seen."""
    while hasattr(decoder, "func") and callable(decoder.func):  # functools.partial
        decoder = decoder.func
    owner = getattr(decoder, "__self__", decoder)  # bound method
    return list(owner.modules()) if isinstance(owner, nn.Module) else []


def check_normalisation(decoder) -> None:
    """Refuse visible BatchNorm layers whose running-statistics update cannot be traced, before
    any call touches them (hidden ones are refused by the batch_norm rule when called)."""
    count = sum(updates_running_statistics(m) for m in _modules(decoder))
    if count:
        refuse_running_statistics_update(count)


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


def _plain_ops(push):
    """Marks a push that runs ordinary torch ops only (no forward AD, no ruled op)."""
    def run(z, tangents):
        return push(z, tangents)
    run.plain_ops = True
    return run


def _pusher(decoder: Callable, output: Selector, flat: bool):
    """push(z (B, *latent), tangents (k, B, *latent)) -> (out (B, *out), tangent outputs (k, B, *out))."""
    fused = getattr(decoder, "tangent_forward", None)
    if output is None and flat and callable(fused):
        return _plain_ops(fused)
    if output is None and stacked.supports(decoder):
        return _plain_ops(functools.partial(stacked.push, decoder))

    def decode(code):
        return select_output(decoder(code), output)

    def push(z, tangents):
        if tangents.shape[0] == 1:  # one tangent: no vmap (its batching costs more than it saves)
            out, col = jvp(decode, (z,), (tangents[0],))
            return out, col.unsqueeze(0)
        one = lambda tangent: jvp(decode, (z,), (tangent,))  # noqa: E731
        return vmap(one, out_dims=(None, 0), randomness="same")(tangents)
    return push


def double_vjp_columns(decoder: Callable, output: Selector, z: Tensor, tangents: Tensor):
    """(out, J v for each tangent v) by reverse mode only: g(u) = Jᵀu is linear in u, and
    ∂⟨g(u), v⟩/∂u = J v; every step keeps its graph, so J stays differentiable."""
    keep_graph = torch.is_grad_enabled()
    with torch.enable_grad():
        code = z if z.requires_grad else z.detach().requires_grad_()
        out = select_output(decoder(code), output)
        u = torch.zeros_like(out, requires_grad=True)
        (pulled,) = torch.autograd.grad(out, code, u, create_graph=True)
        cols = torch.stack([torch.autograd.grad(pulled, u, v, create_graph=True, retain_graph=True)[0]
                            for v in tangents])
    return (out, cols) if keep_graph else (out.detach(), cols.detach())


# torch's errors for an op that forward AD / vmap cannot push a tangent through; group 1 names it
_NO_TANGENT_RULE = tuple(re.compile(p) for p in (
    r"forward AD with (\S+) that does not support it",
    r"(\S+) inside vmap is only supported",
    r"Batching rule not implemented for (\S+)\.",
    r"You tried to vmap over (\S+), but it does not have vmap support",
    r"(autograd\.Function) with functorch transforms",
    r"(\S+) does not have a jvp",
))
_warned_ops: set = set()


def _fallback_op(error: Exception) -> Optional[str]:
    """The op named by torch's "no forward-AD / batching rule" errors, or None for any other error."""
    for pattern in _NO_TANGENT_RULE:
        found = pattern.search(str(error))
        if found:
            return found.group(1)
    return None


def _captured_write(error: Exception) -> Exception:
    """A clearer error for torch's "in-place write to a captured tensor" inside the tangent pass."""
    if "would mutate a captured Tensor" not in str(error):
        return error
    return ValueError("the decoder writes in place to a tensor it does not take as input, which forward-"
                      "mode AD cannot trace — typically a BatchNorm layer in training mode updating its "
                      f"running statistics ({BATCH_FIX}); torch says: {error}")


def _push(push, decoder, output, z: Tensor, tangents: Tensor):
    """One tangent pass: the stacked evaluation where it works (see :func:`_stacked_push`), else
    forward AD under the op rules and the lock (see the module notes); the stacked and fused
    pushes use neither forward AD nor a ruled op. Under torch.compile: forward AD, traced."""
    if getattr(push, "plain_ops", False):
        return push(z, tangents)
    if torch.compiler.is_compiling():
        with column_rules():
            return push(z, tangents)
    return _stacked_push(push, decoder, output, z, tangents)


def _stacked_push(push, decoder, output, z: Tensor, tangents: Tensor):
    """The decoder's own forward on [z; tangents] (:mod:`fastjac.autodiff.stacked_ops`); where it
    meets a call without a stacked rule, forward AD instead, and for this decoder structure,
    shapes and dtype from then on (one failed attempt at most)."""
    key = stacked_ops.cache_key(decoder, output, z, tangents.shape[0])
    decided = stacked_ops.DECISIONS.get(key)
    if decided is not False and not stacked_ops.hooked(_modules(decoder)):
        select = functools.partial(select_output, output=output)
        replay = random_state(z.device)
        if decided is None and torch._C._autograd._top_saved_tensors_default_hooks(False) is not None:
            with torch.no_grad():  # under checkpoint: a failed attempt must not leave saved tensors
                decided = _stacked_attempt(key, decoder, select, z, tangents) is not None
            replay()
        if decided is not False:
            got = _stacked_attempt(key, decoder, select, z, tangents)
            if got is not None:
                return got
            replay()  # the same random draws for torch.func as for the failed attempt
    return _forward_ad_push(push, decoder, output, z, tangents)


def _stacked_attempt(key, decoder, select, z: Tensor, tangents: Tensor):
    """stacked_ops.push's result, or None (and the decision recorded) where it cannot run."""
    try:
        got = stacked_ops.push(decoder, select, z, tangents)
    except _StopRecomputation:  # checkpoint's own control flow, not a failure
        raise
    except Exception:  # noqa: BLE001 -- Unsupported, or the decoder's own error: torch.func decides
        stacked_ops.DECISIONS.set(key, False)
        return None
    if stacked_ops.DECISIONS.get(key) is None:
        stacked_ops.DECISIONS.set(key, True)
    return got


_StopRecomputation = getattr(torch.utils.checkpoint, "_StopRecomputationError", ())


def _forward_ad_push(push, decoder, output, z: Tensor, tangents: Tensor):
    """The tangent pass by torch.func under the op rules and the forward-AD lock; the double-VJP
    method for an op without a forward-AD formula."""
    try:
        with FORWARD_AD_LOCK, column_rules():
            return push(z, tangents)
    except (NotImplementedError, RuntimeError) as error:
        op = _fallback_op(error)
        if op is None:
            raise _captured_write(error) from error
    if op not in _warned_ops:
        _warned_ops.add(op)
        warnings.warn(f"{op} has no forward-AD formula and no fastjac rule: Jacobian columns are "
                      "computed by the double-VJP method (exact, one reverse pass per column)",
                      ForwardADFallbackWarning, stacklevel=5)
    try:
        with column_rules():
            return double_vjp_columns(decoder, output, z, tangents)
    except (NotImplementedError, RuntimeError) as error:
        raise NotImplementedError(f"{op} has no forward-AD formula, and the double-VJP fallback "
                                  f"failed too, so fastjac cannot compute its Jacobian columns: {error}") from error


def checked_codes(z: Tensor) -> tuple:
    """(B, d) of codes z (B, *latent_shape), d = prod(latent_shape), after the input checks."""
    check.tensor("z", z, ndim=range(2, 10))
    B, d = z.shape[0], math.prod(z.shape[1:])
    if B == 0 or d == 0:
        raise ValueError(f"z must be a non-empty (B, *latent_shape) tensor, got shape {tuple(z.shape)}")
    check.finite("z", z)
    return B, d


def columns_along(decoder: Callable, z: Tensor, directions: Tensor, *, chunk_size: Optional[int] = None,
                  output: Selector = None):
    """The core of :func:`jacobian_columns` for a prepared decoder and checked (B, d, k) directions."""
    B = z.shape[0]
    tangents = directions.permute(2, 0, 1).reshape(-1, *z.shape)  # (k, B, *latent)
    k = tangents.shape[0]
    step = k if chunk_size is None else min(chunk_size, k)
    push = _pusher(decoder, output, flat=z.dim() == 2)
    replay = random_state(z.device) if step < k else None  # only chunks replay (and it breaks compile)
    out, pieces = None, []
    for start in range(0, k, step):
        if start:
            replay()
        primal, cols = _push(push, decoder, output, z, tangents[start:start + step])
        if out is None:
            if primal.dim() < 1 or primal.shape[0] != B:
                raise ValueError(f"decoder output must have batch size B = {B} first, "
                                 f"got shape {tuple(primal.shape)}")
            out = primal
        pieces.append(cols)
    cols = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
    return out, cols.reshape(k, B, -1).permute(1, 2, 0)


def prepared(decoder: Callable) -> Callable:
    """The decoder every entry point differentiates: checked, wrappers removed, BatchNorm checked."""
    if not callable(decoder):
        raise TypeError(f"decoder must be callable, got {type(decoder).__name__}")
    decoder = _decoders.unwrapped(decoder)
    check_normalisation(decoder)
    return decoder


def jacobian_columns(decoder: Callable, z: Tensor, columns: Optional[Tensor] = None, *,
                     directions: Optional[Tensor] = None, chunk_size: Optional[int] = None,
                     output: Selector = None):
    """Decoder output and Jacobian columns, by forward mode in one primal pass.

    Args:
        decoder: any callable acting per sample, (B, *latent_shape) -> (B, *out_shape) (or a
            tuple/dict/object holding it; see ``output``), however wrapped (lambda, partial,
            DDP, torch.compile). A decoder with a ``tangent_forward(z, tangents)`` method
            ((B, d), (k, B, d) -> (B, *out), (k, B, *out)) is pushed through it.
        z: (B, *latent_shape) codes, e.g. (B, d) or (B, C, h, w); d = prod(latent_shape).
        columns: None (all d columns), a LongTensor (k,) shared by all samples, or (B, k) per
            sample, indexing the flattened latent.
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
    decoder = prepared(decoder)
    with check.deferred():  # one host sync for all value checks (joins a caller's block)
        B, d = checked_codes(z)
        if chunk_size is not None:
            check.positive_int("chunk_size", chunk_size)
        dirs = column_directions(columns, directions, B, d, z)
        return columns_along(decoder, z, dirs, chunk_size=chunk_size, output=output)
