"""Stacked tangent evaluation of *any* decoder: its own forward, run once on [z; t_1; …; t_k].

:mod:`fastjac.autodiff.stacked` does this for plain ``nn.Sequential`` decoders by walking their
layers. Here the decoder's own ``forward`` (a diffusers VAE, a residual block, a function) runs on
X = [z; t_1; …; t_k], (1 + k)·B rows, wrapped in :class:`Stacked`, a tensor subclass whose
``__torch_function__`` sees every torch call that touches it and runs the rule of :data:`RULES`
(the decoder reads a batch of (1 + k)·B; shape-derived sizes in its reshapes follow):
- linear in X (conv, conv-transpose, linear, interpolate, pixel shuffle, pooling, reshapes, …):
  one call on the whole stack; a bias goes to the primal rows by a [1; 0] row mask (one kernel),
  an added constant to the primal rows only; a constant with one row per sample broadcasts
  against the primal rows and each block of tangent rows alike;
- an activation σ: σ(p) on the primal rows, σ′(p) ⊙ t on the tangent rows by torch's fused
  backward kernel of σ (as in :mod:`fastjac.autodiff.stacked`; SiLU's σ′ written out), and
  likewise exp, log, sin, cos, sqrt, abs, square, a power or clamp by constants, c / x;
- group/layer/instance norm: the primal by torch's fused op, the tangents by the closed-form
  JVP r·(t − mean t − (x − μ)·r²·mean((x − μ) t))·γ (docs/maths.md#jacobian-columns) with μ, r
  from a mean and a mean square (native_group_norm's own mean/rstd outputs fail in backward
  without a weight, native_layer_norm's carry no gradient); eval-mode batch norm is affine;
- products (mul, matmul, bmm, baddbmm) by the product rule, softmax by y ⊙ (t − Σ y ⊙ t), and
  ``scaled_dot_product_attention`` as its math form (:mod:`fastjac._rules`) through those rules.
Everything is ordinary, twice-differentiable torch ops, so reverse mode through the result is
exact (the gradients of the columns into z and the parameters: reverse over "forward").

Why this beats ``torch.func.jvp`` here: under forward AD a convolution costs three convolution
calls forward and three convolution_backward calls (the lead's profile of the AutoencoderKL step:
180 against 60 plain per 3 steps), and the decomposed norms and functorch's per-op wrapping add
thousands of small ops; stacked, a convolution is ONE call on 2B rows forward and one
convolution_backward, and the norms and activations are torch's fused kernels plus a few
elementwise ops on the tangent rows (``python -m fastjac.bench.zoo --decoders autoencoder_kl``).

Whitelist only: a call on a stacked tensor with no rule, or whose rule's precondition fails (a
permute, transpose or reshape that moves or mixes the batch dimension, an in-place write into
any tensor, ``.item()`` or a branch on stacked values, a training-mode BatchNorm or Dropout, a
constant whose first dimension is the stacked one, stacked tensors of an earlier pass) raises
:class:`Unsupported`, and :mod:`fastjac.jacobian` takes its ``torch.func`` path instead, and
remembers that for the decoder's structure, shapes and dtype (:func:`cache_key`): one failed
attempt at most. Decoders with module hooks (which would see the stacked rows) go to torch.func
without an attempt. Not covered (torch.func path): ``nn.MultiheadAttention`` with
``batch_first`` (it transposes the batch dimension), heads folded into the batch dimension,
max pooling, in-place activations, and any op not in :data:`RULES`.
"""
from __future__ import annotations

import functools
import threading
import types
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch._C import DisableTorchFunctionSubclass

from .. import _rules

aten = torch.ops.aten


class Unsupported(Exception):
    """The stacked evaluation cannot (or may not) run this call: use torch.func instead."""


class _Pass:
    """One stacked evaluation: B primal rows, then k blocks of B tangent rows.

    Rules see the tangent rows as blocks (k, B, …) that broadcast against the primal rows (B, …),
    and for k = 1 as (B, …) itself (no broadcasting: its backward would add a reduction per op)."""
    __slots__ = ("B", "k", "lead", "grad", "open")

    def __init__(self, B: int, k: int):
        self.B, self.k, self.lead = B, k, ((k,) if k > 1 else ())
        self.open = True  # until push returns; then its tensors (kept by autograd) act as plain ones
        self.grad = torch.is_grad_enabled()  # a call under no_grad after this: see _pass_of

    def split(self, X: Tensor) -> tuple:
        """(primal rows (B, …), tangent blocks (k, B, …), or (B, …) for k = 1)."""
        if not isinstance(X, Tensor) or X.dim() == 0 or X.shape[0] != (1 + self.k) * self.B:
            raise Unsupported("expected a stacked tensor")
        P, T = torch.split(X, [self.B, self.k * self.B])  # backward: one cat (slicing zero-fills)
        return P, T.reshape(*self.lead, self.B, *X.shape[1:])

    def join(self, P: Tensor, T: Tensor) -> Tensor:
        """[P; T] for primal rows P (B, …) and tangent blocks T as :meth:`split` gives them."""
        shape = (*self.lead, *P.shape)
        T = T.expand(shape) if T.shape != shape else T
        return torch.cat([P, T.reshape(self.k * self.B, *P.shape[1:]).to(P.dtype)])


class Stacked(Tensor):
    """A (1 + k)·B-row tensor [primal; tangents] of one stacked pass (``_fj``)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in METADATA or not _in_open_pass(args, kwargs):
            # e.g. backward ops on saved tensors under a user's dispatch mode, after the pass
            with DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        ctx = _pass_of(args, kwargs)
        composite = COMPOSITES.get(func)
        if composite is not None:  # a decomposition that runs through the rules
            return composite(*args, **kwargs)
        rule = RULES.get(func)
        if rule is None:
            raise Unsupported(f"no stacked rule for {getattr(func, '__name__', func)}")
        with DisableTorchFunctionSubclass():
            return _wrap(rule(ctx, *args, **kwargs), ctx)


def _stacked_in(args) -> list:
    found = []
    for a in args:
        if isinstance(a, Stacked):
            found.append(a)
        elif isinstance(a, (list, tuple)):
            found.extend(x for x in a if isinstance(x, Stacked))
    return found


def _in_open_pass(args, kwargs) -> bool:
    return any(getattr(getattr(x, "_fj", None), "open", False) for x in _stacked_in(list(args) + list(kwargs.values())))


def _pass_of(args, kwargs) -> _Pass:
    """The pass of the stacked arguments. Refused: tensors of another pass, and any call inside an
    autograd.Function (its forward runs under no_grad; its output's backward is the user's, written
    for unstacked rows) or a no_grad block of a pass that records a graph."""
    found = _stacked_in(list(args) + list(kwargs.values()))
    passes = {id(getattr(x, "_fj", None)) for x in found}
    if len(passes) != 1 or getattr(found[0], "_fj", None) is None:
        raise Unsupported("stacked tensors of another pass")
    ctx = found[0]._fj
    if ctx.grad and not torch.is_grad_enabled():
        raise Unsupported("a stacked tensor under no_grad (or in an autograd.Function's forward)")
    _refuse_function_outputs(found)
    return ctx


def _refuse_function_outputs(tensors) -> None:
    with DisableTorchFunctionSubclass():
        if any(isinstance(x.grad_fn, torch.autograd.function.BackwardCFunction) for x in tensors):
            raise Unsupported("the output of an autograd.Function")


def _wrap(out, ctx: _Pass):
    if isinstance(out, (tuple, list)):
        return type(out)(_wrap(o, ctx) for o in out)
    if not isinstance(out, Tensor):
        return out
    if out.dim() == 0 or out.shape[0] != (1 + ctx.k) * ctx.B:
        raise Unsupported("a rule lost the stacked batch dimension")
    wrapped = out if isinstance(out, Stacked) else out.as_subclass(Stacked)
    wrapped._fj = ctx
    return wrapped


def stack(z: Tensor, tangents: Tensor) -> Stacked:
    """[z; t_1; …; t_k] (z (B, …), tangents (k, B, …)) as a :class:`Stacked` of a new pass."""
    k, B = tangents.shape[:2]
    X = torch.cat([z, tangents.to(z.dtype).reshape(k * B, *z.shape[1:])])
    return _wrap(X, _Pass(B, k))


def unstack(out) -> tuple:
    """(primal (B, …), tangents (k, B, …)) of a decoder's stacked output."""
    if not isinstance(out, Stacked) or getattr(out, "_fj", None) is None:
        raise Unsupported("the decoder's output is not the stacked result")
    ctx = out._fj
    _refuse_function_outputs([out])
    with DisableTorchFunctionSubclass():
        P, T = ctx.split(out)
        return P.as_subclass(Tensor), T.reshape(ctx.k, *P.shape).as_subclass(Tensor)


# --- metadata reads: answered from the stacked tensor itself (its batch is (1 + k)·B) -----------

_PROPERTIES = ("shape", "dtype", "device", "ndim", "requires_grad", "is_cuda", "layout", "is_nested",
               "is_sparse", "is_quantized", "is_meta", "is_mps", "is_cpu", "is_xpu", "is_mkldnn")
_METHODS = ("size", "dim", "numel", "nelement", "is_contiguous", "is_floating_point", "is_complex",
            "element_size", "stride", "get_device", "is_inference", "ndimension")
METADATA = frozenset([getattr(Tensor, n).__get__ for n in _PROPERTIES if hasattr(Tensor, n)]
                     + [getattr(Tensor, n) for n in _METHODS if hasattr(Tensor, n)])

RULES: dict = {}
COMPOSITES: dict = {}


def rule(*funcs):
    def register(handler):
        for func in funcs:
            RULES[func] = handler
        return handler
    return register


# --- constants: broadcast against the primal rows ------------------------------------------------

def _is_const(x) -> bool:
    return not isinstance(x, Stacked)


def _per_sample(ctx: _Pass, X: Tensor, c) -> bool:
    """Whether constant ``c`` has one row per sample (B > 1); Unsupported if it would broadcast
    along the stacked batch dimension in any other way."""
    if not isinstance(c, Tensor) or c.dim() < X.dim():
        return False
    if c.dim() > X.dim() or c.shape[0] not in (1, ctx.B):
        raise Unsupported("a constant whose first dimension is not 1 or the batch")
    return c.shape[0] == ctx.B and ctx.B > 1


def _primal_only(ctx: _Pass, X: Tensor, op: Callable) -> Tensor:
    """op(P) on the primal rows, the tangent rows unchanged (an added constant)."""
    P, T = ctx.split(X)
    return ctx.join(op(P), T)  # a constant that broadcasts P further broadcasts the tangents alike


def _scaled(ctx: _Pass, X: Tensor, c, op: Callable) -> Tensor:
    """op(X, c) for a constant c and op linear in X (mul, div): one call on the stack, or per block
    for a per-sample c."""
    if _per_sample(ctx, X, c):
        blocks = X.reshape(1 + ctx.k, ctx.B, *X.shape[1:])
        out = op(blocks, c)
        return out.reshape(out.shape[0] * out.shape[1], *out.shape[2:])
    return op(X, c)


# --- add, sub, mul, div, neg ---------------------------------------------------------------------

def _combination(ctx: _Pass, a, b, alpha) -> Tensor:
    """a + alpha·b, either stacked."""
    if isinstance(a, Stacked) and isinstance(b, Stacked):
        if a.dim() != b.dim():
            raise Unsupported("stacked operands of different rank")
        return torch.add(a, b, alpha=alpha)
    if isinstance(a, Stacked):
        _per_sample(ctx, a, b)
        return _primal_only(ctx, a, lambda P: torch.add(P, b, alpha=alpha))
    _per_sample(ctx, b, a)
    P, T = ctx.split(b)
    return ctx.join(torch.add(a, P, alpha=alpha), T if alpha == 1 else T * alpha)


@rule(torch.add, Tensor.add, Tensor.__add__, Tensor.__radd__)
def _add(ctx, a, b, *, alpha=1, out=None):
    if out is not None:
        raise Unsupported("out=")
    return _combination(ctx, a, b, alpha)


@rule(torch.sub, Tensor.sub, Tensor.__sub__, torch.subtract)
def _sub(ctx, a, b, *, alpha=1, out=None):
    if out is not None:
        raise Unsupported("out=")
    return _combination(ctx, a, b, -alpha)


@rule(Tensor.__rsub__, torch.rsub)
def _rsub(ctx, a, b, *, alpha=1):
    return _combination(ctx, b, a, -alpha)  # b − alpha·a


def _product(ctx: _Pass, op: Callable, a: Stacked, b: Stacked) -> Tensor:
    """op(a, b) for op bilinear (mul, matmul): primal op(p_a, p_b), tangent op(t_a, p_b) + op(p_a, t_b)."""
    if a.dim() != b.dim():
        raise Unsupported("stacked operands of different rank")
    Pa, Ta = ctx.split(a)
    Pb, Tb = ctx.split(b)
    return ctx.join(op(Pa, Pb), op(Ta, Pb) + op(Pa, Tb))


@rule(torch.mul, Tensor.mul, Tensor.__mul__, Tensor.__rmul__, torch.multiply)
def _mul(ctx, a, b, *, out=None):
    if out is not None:
        raise Unsupported("out=")
    if isinstance(a, Stacked) and isinstance(b, Stacked):
        return _product(ctx, torch.mul, a, b)
    X, c = (a, b) if isinstance(a, Stacked) else (b, a)
    return _scaled(ctx, X, c, torch.mul)


@rule(torch.div, Tensor.div, Tensor.__truediv__, torch.true_divide)
def _div(ctx, a, b, *, rounding_mode=None, out=None):
    if out is not None or rounding_mode is not None or not _is_const(b):
        raise Unsupported("division by a stacked tensor, rounding or out=")
    return _scaled(ctx, a, b, torch.div)


@rule(torch.neg, Tensor.neg, Tensor.__neg__, torch.negative)
def _neg(ctx, X):
    return torch.neg(X)


# --- calls linear in the stacked tensor, row by row: one call on the whole stack -----------------

def _rowwise(check: Optional[Callable] = None):
    """A rule for a call that acts on each row alike and is linear in its stacked first argument
    (every other argument constant); ``check(X, *args, **kwargs)`` vetoes the cases that are not."""
    def handler(ctx, func, X, *args, **kwargs):
        if not isinstance(X, Stacked) or _stacked_in(list(args) + list(kwargs.values())):
            raise Unsupported("a stacked tensor in a constant argument")
        if check is not None and not check(X, *args, **kwargs):
            raise Unsupported(f"{getattr(func, '__name__', func)} with these arguments")
        return func(X, *args, **kwargs)
    return handler


def _rowwise_rule(funcs, check=None):
    handler = _rowwise(check)
    for func in funcs:
        RULES[func] = functools.partial(_bound, handler, func)


def _bound(handler, func, ctx, *args, **kwargs):
    return handler(ctx, func, *args, **kwargs)


def _keeps_batch(X, *args, **kwargs) -> bool:
    """Reshapes: row i must stay row i (then the first dimension is unchanged), no dtype views."""
    return not any(isinstance(a, torch.dtype) for a in list(args) + list(kwargs.values()))


def _dim0(X, d) -> bool:
    return d is not None and d % max(X.dim(), 1) == 0


def _reduce_ok(X, dim=None, *args, **kwargs) -> bool:
    """sum/mean over given dimensions, never the batch one."""
    dims = dim if isinstance(dim, (tuple, list)) else (dim,)
    return not any(d is None or isinstance(d, str) or _dim0(X, d) for d in dims)


def _split_ok(X, size, dim=0) -> bool:
    return not _dim0(X, dim)


def _unbind_ok(X, dim=0) -> bool:
    return not _dim0(X, dim)


def _transpose_ok(X, dim0, dim1) -> bool:
    return (_dim0(X, dim0) == _dim0(X, dim1)) and (not _dim0(X, dim0) or dim0 % X.dim() == dim1 % X.dim())


def _permute_ok(X, *dims) -> bool:
    dims = dims[0] if len(dims) == 1 and isinstance(dims[0], (tuple, list)) else dims
    return len(dims) > 0 and dims[0] % X.dim() == 0


def _pad_ok(X, pad, mode="constant", value=None) -> bool:
    return len(pad) // 2 < X.dim() and (mode != "constant" or not value)


def _not_inplace(X, *args, inplace=False, **kwargs) -> bool:
    return not inplace


def _dropout_ok(X, p=0.5, training=True, inplace=False) -> bool:
    return not inplace and (p == 0 or not training)


def _getitem_ok(X, index) -> bool:
    index = index if isinstance(index, tuple) else (index,)
    if any(isinstance(i, (Tensor, list)) or i is None and n == 0 for n, i in enumerate(index)):
        return False
    first = index[0] if index else slice(None)
    return first == slice(None) or (first is Ellipsis and len(index) - 1 < X.dim())


def _to_ok(X, *args, **kwargs) -> bool:
    return not kwargs.get("copy", False) and not any(isinstance(a, Tensor) for a in args)


_rowwise_rule([Tensor.reshape, torch.reshape, Tensor.view, Tensor.flatten, torch.flatten, Tensor.unflatten,
               torch.unflatten, Tensor.squeeze, torch.squeeze, Tensor.unsqueeze, torch.unsqueeze,
               Tensor.view_as, Tensor.reshape_as], _keeps_batch)
_rowwise_rule([Tensor.transpose, torch.transpose, Tensor.swapaxes, torch.swapaxes], _transpose_ok)
_rowwise_rule([Tensor.permute, torch.permute], _permute_ok)
_rowwise_rule([Tensor.contiguous, Tensor.clone, torch.clone, Tensor.float, Tensor.double, Tensor.half,
               Tensor.bfloat16, torch.nn.functional.interpolate, torch.pixel_shuffle, torch.pixel_unshuffle,
               F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
               F.adaptive_avg_pool3d, torch.conj, Tensor.conj])
_rowwise_rule([Tensor.to], _to_ok)
_rowwise_rule([F.pad, torch.constant_pad_nd], _pad_ok)
_rowwise_rule([Tensor.sum, torch.sum, Tensor.mean, torch.mean], _reduce_ok)
_rowwise_rule([Tensor.chunk, torch.chunk, Tensor.split, torch.split], _split_ok)
_rowwise_rule([Tensor.unbind, torch.unbind], _unbind_ok)
_rowwise_rule([F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout],
              _dropout_ok)
_rowwise_rule([Tensor.__getitem__], _getitem_ok)
RULES[Tensor.mT.__get__] = lambda ctx, X: X.mT if X.dim() >= 3 else _refuse("mT of a matrix")


def _refuse(why: str):
    raise Unsupported(why)


@rule(torch.dropout, torch.feature_dropout, torch.alpha_dropout)
def _torch_dropout(ctx, X, p, train):
    return X if p == 0 or not train else _refuse("dropout in training mode")


@rule(Tensor.detach, torch.detach)
def _detach(ctx, X):
    """detach() stops the tangent too: J of a detached value is zero."""
    P, T = ctx.split(X)
    return ctx.join(P.detach(), torch.zeros_like(T))


# --- layers with weights: one call on the stack, the bias on the primal rows ---------------------

def _with_bias(ctx: _Pass, Y: Tensor, bias, per_channel: bool) -> Tensor:
    """Y + [1; 0]·bias: the bias on the primal rows only, in one kernel (and in backward no copy of
    the stack, as splitting it and joining the parts again would make)."""
    if bias is None:
        return Y
    b = bias.to(Y.dtype)
    b = b.reshape((-1,) + (1,) * (Y.dim() - 2)) if per_channel else b
    rows = torch.zeros(Y.shape[0], *(1,) * (Y.dim() - 1), dtype=Y.dtype, device=Y.device)
    rows[:ctx.B] = 1
    return Y + rows * b


def _layer(func, per_channel: bool):
    def handler(ctx, X, weight, bias=None, *args, **kwargs):
        if not isinstance(X, Stacked) or isinstance(weight, Stacked) or isinstance(bias, Stacked) or X.dim() < 2:
            raise Unsupported("a stacked weight, or a layer across the batch dimension")
        return _with_bias(ctx, func(X, weight, None, *args, **kwargs), bias, per_channel)
    return handler


RULES[F.linear] = _layer(F.linear, False)
for _conv in (F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d):
    RULES[_conv] = _layer(_conv, True)


def _constant_side(ctx: _Pass, op: Callable, X: Stacked, c: Tensor, stacked_first: bool) -> Tensor:
    """op(X, c) or op(c, X) for op linear in X (matmul): c must not broadcast over X's batch."""
    if X.dim() < (2 if stacked_first else 3) or (isinstance(c, Tensor) and c.dim() > X.dim()):
        raise Unsupported("a matmul that contracts the batch dimension")
    call = (lambda A, C: op(A, C)) if stacked_first else (lambda A, C: op(C, A))
    if not isinstance(c, Tensor) or c.dim() <= 2:  # a matrix or vector: no batch dimension to align
        return call(X, c)
    return _scaled(ctx, X, c, call)


@rule(torch.matmul, Tensor.matmul, Tensor.__matmul__, torch.bmm, Tensor.bmm)
def _matmul(ctx, a, b, *, out=None):
    if out is not None:
        raise Unsupported("out=")
    if isinstance(a, Stacked) and isinstance(b, Stacked):
        if a.dim() < 3:
            raise Unsupported("a matmul that contracts the batch dimension")
        return _product(ctx, torch.matmul, a, b)
    return _constant_side(ctx, torch.matmul, a, b, True) if isinstance(a, Stacked) \
        else _constant_side(ctx, torch.matmul, b, a, False)


@rule(Tensor.__rmatmul__)
def _rmatmul(ctx, a, b):
    return _matmul(ctx, b, a)


def _baddbmm(input, batch1, batch2, *, beta=1, alpha=1, out=None):
    """beta·input + alpha·batch1 @ batch2 through the matmul/add rules (beta = 0 ignores input)."""
    if out is not None:
        raise Unsupported("out=")
    product = torch.bmm(batch1, batch2)
    product = product if alpha == 1 else product * alpha
    return product if beta == 0 else product + (input if beta == 1 else input * beta)


COMPOSITES.update({torch.baddbmm: _baddbmm, Tensor.baddbmm: _baddbmm,
                   F.scaled_dot_product_attention: _rules.scaled_dot_product_attention})


@rule(torch.masked_fill, Tensor.masked_fill)
def _masked_fill(ctx, X, mask, value):
    if not _is_const(mask) or not _is_const(value):
        raise Unsupported("a stacked mask or value")
    P, T = ctx.split(X)
    return ctx.join(P.masked_fill(mask, value), T.masked_fill(mask, 0))


def _full_rows(ctx: _Pass, tensors, ndim: int) -> list:
    """The pieces of a cat/stack as stacked rows: a constant (one row per sample) gets zero tangents."""
    pieces = []
    for t in tensors:
        if isinstance(t, Stacked):
            pieces.append(t)
        elif isinstance(t, Tensor) and t.dim() == ndim and t.shape[0] == ctx.B:
            pieces.append(torch.cat([t, t.new_zeros(ctx.k * ctx.B, *t.shape[1:])]))
        else:
            raise Unsupported("cat with a constant that has no row per sample")
    return pieces


@rule(torch.cat, torch.concat, torch.concatenate)
def _cat(ctx, tensors, dim=0, *, out=None):
    """Along a non-batch dimension."""
    ndim = next(t.dim() for t in tensors if isinstance(t, Stacked))
    if out is not None or dim % ndim == 0:
        raise Unsupported("cat along the batch dimension")
    return torch.cat(_full_rows(ctx, tensors, ndim), dim)


@rule(torch.stack)
def _stack(ctx, tensors, dim=0, *, out=None):
    ndim = next(t.dim() for t in tensors if isinstance(t, Stacked))
    if out is not None or dim % (ndim + 1) == 0:
        raise Unsupported("stack along the batch dimension")
    return torch.stack(_full_rows(ctx, tensors, ndim), dim)


# --- activations: σ(p) on the primal rows, σ′(p) ⊙ t by torch's fused backward kernel -----------

def _activation(primal_and_tangent: Callable):
    """primal_and_tangent(P, *args, **kwargs) -> (σ(P), t ↦ σ′(P) ⊙ t)."""
    def handler(ctx, X, *args, **kwargs):
        if _stacked_in(list(args) + list(kwargs.values())):
            raise Unsupported("a stacked activation parameter")
        P, T = ctx.split(X)
        y, tangent = primal_and_tangent(P, *args, **kwargs)
        return ctx.join(y, tangent(T))
    return handler


def _inplace(flag) -> None:
    if flag:
        raise Unsupported("an in-place activation on a stacked tensor")


def _silu(p, inplace=False):
    _inplace(inplace)
    s = torch.sigmoid(p)  # silu′(p) = s + p s(1 − s), on the primal rows (silu_backward has no derivative)
    slope = s + aten.sigmoid_backward(p, s)
    return F.silu(p), lambda t: t * slope


def _relu(p, inplace=False):
    _inplace(inplace)
    y = torch.relu(p)
    return y, lambda t: aten.threshold_backward(t, y, 0)


def _elu(p, alpha=1.0, inplace=False):
    _inplace(inplace)
    y = F.elu(p, alpha)
    return y, lambda t: aten.elu_backward(t, alpha, 1, 1, True, y)


def _leaky_relu(p, negative_slope=0.01, inplace=False):
    _inplace(inplace)
    return F.leaky_relu(p, negative_slope), lambda t: aten.leaky_relu_backward(t, p, negative_slope, False)


def _gelu(p, approximate="none"):
    return F.gelu(p, approximate=approximate), lambda t: aten.gelu_backward(t, p, approximate=approximate)


def _softplus(p, beta=1.0, threshold=20.0):
    return F.softplus(p, beta, threshold), lambda t: aten.softplus_backward(t, p, beta, threshold)


def _sigmoid(p):
    y = torch.sigmoid(p)
    return y, lambda t: aten.sigmoid_backward(t, y)


def _tanh(p):
    y = torch.tanh(p)
    return y, lambda t: aten.tanh_backward(t, y)


def _exp(p):
    y = torch.exp(p)
    return y, lambda t: t * y


def _log(p):
    return torch.log(p), lambda t: t / p


def _sin(p):
    return torch.sin(p), lambda t: t * torch.cos(p)


def _cos(p):
    return torch.cos(p), lambda t: -t * torch.sin(p)


def _sqrt(p):
    y = torch.sqrt(p)
    return y, lambda t: t / (2 * y)


def _abs(p):
    return torch.abs(p), lambda t: t * torch.sgn(p)


def _square(p):
    return torch.square(p), lambda t: 2 * p * t


def _pow(p, exponent):
    """p ** c for a constant c (a python number): c p^(c−1) t, as torch's derivative writes it."""
    if isinstance(exponent, Tensor):
        raise Unsupported("a tensor exponent")
    return torch.pow(p, exponent), lambda t: t * (exponent * p.pow(exponent - 1)) if exponent != 0 else t * 0


def _reciprocal_scaled(p, numerator):
    """numerator / p for a constant numerator: −y/p · t."""
    y = torch.div(numerator, p)
    return y, lambda t: -t * y / p


def _clamp(p, min=None, max=None):
    """clamp by constant bounds: t where min ≤ p ≤ max (torch's derivative), 0 elsewhere."""
    inside = torch.ones_like(p, dtype=torch.bool)
    inside = inside if min is None else inside & (p >= min)
    inside = inside if max is None else inside & (p <= max)
    return torch.clamp(p, min, max), lambda t: t * inside


def _hardtanh(p, min_val=-1.0, max_val=1.0, inplace=False):
    _inplace(inplace)
    return _clamp(p, min_val, max_val)


for _funcs, _spec in (((F.silu,), _silu), ((F.relu, torch.relu, Tensor.relu), _relu), ((F.elu,), _elu),
                      ((F.leaky_relu,), _leaky_relu), ((F.gelu,), _gelu), ((F.softplus,), _softplus),
                      ((torch.sigmoid, Tensor.sigmoid, F.sigmoid), _sigmoid),
                      ((torch.tanh, Tensor.tanh, F.tanh), _tanh), ((torch.exp, Tensor.exp), _exp),
                      ((torch.log, Tensor.log), _log), ((torch.sin, Tensor.sin), _sin), ((torch.cos, Tensor.cos), _cos),
                      ((torch.sqrt, Tensor.sqrt), _sqrt), ((torch.abs, Tensor.abs, Tensor.__abs__), _abs),
                      ((torch.square, Tensor.square), _square), ((torch.pow, Tensor.pow, Tensor.__pow__), _pow),
                      ((Tensor.__rtruediv__, Tensor.__rdiv__), _reciprocal_scaled),
                      ((torch.clamp, Tensor.clamp, torch.clip, Tensor.clip), _clamp), ((F.hardtanh,), _hardtanh)):
    for _func in _funcs:
        RULES[_func] = _activation(_spec)


def _softmax_dim(X, dim) -> int:
    if dim is None or _dim0(X, dim):
        raise Unsupported("softmax over the batch dimension")
    return dim % X.dim() - X.dim()  # negative: the same dimension of P and of the (k, B, …) blocks


@rule(torch.softmax, Tensor.softmax, F.softmax)
def _softmax(ctx, X, dim=None, _stacklevel=3, dtype=None):
    dim = _softmax_dim(X, dim)
    P, T = ctx.split(X if dtype is None else X.to(dtype))
    y = torch.softmax(P, dim)
    if ctx.k == 1:  # torch's fused JVP kernel y ⊙ (t − Σ y ⊙ t), twice differentiable
        return ctx.join(y, aten._softmax_backward_data(T, y, dim, y.dtype))
    return ctx.join(y, y * (T - (y * T).sum(dim, keepdim=True)))


# --- normalisation: the primal by torch's fused kernel, the tangent in closed form ---------------

def _centred_tangent(T: Tensor, centred: Tensor, rstd: Tensor, dims: tuple) -> Tensor:
    """(d x̂)/r = t − mean t − (x − μ)·r²·mean((x − μ) t) over ``dims`` (negative), for x̂ = (x − μ)·r
    (the caller scales by r, folded with the norm's weight)."""
    along = (centred * T).mean(dims, keepdim=True) * rstd.square()
    return torch.addcmul(T - T.mean(dims, keepdim=True), centred, along, value=-1)


def _statistics(x: Tensor, dims: tuple, eps: float) -> tuple:
    """(x − μ, 1/√(var + ε)) over ``dims`` (mean, then the mean square: half var_mean's time, both ways)."""
    centred = x - x.mean(dims, keepdim=True)
    return centred, torch.rsqrt(centred.square().mean(dims, keepdim=True) + eps)


def _work(P: Tensor, T: Tensor) -> tuple:
    """Half inputs in float32 (as torch's fused norms and autocast compute them); the output dtype."""
    if P.dtype not in _rules.LOW_PRECISION:
        return P, T, P.dtype
    keep = torch.is_autocast_enabled(P.device.type)
    return P.float(), T.float(), (torch.float32 if keep else P.dtype)


def _grouped_norm(ctx: _Pass, X: Tensor, groups: int, weight, bias, eps: float) -> Tensor:
    """group_norm (and instance norm, groups = channels) of the stack. The statistics come from
    var_mean, not from native_group_norm's mean/rstd outputs (whose backward fails without a weight)."""
    P, T, dtype = _work(*ctx.split(X))
    B, C = P.shape[:2]
    if weight is None and bias is not None:  # torch's fused backward fails on a bias without a weight
        y = F.group_norm(P, groups, None, None, eps) + bias.reshape(C, *(1,) * (P.dim() - 2))
    else:
        y = F.group_norm(P, groups, weight, bias, eps)
    centred, rstd = _statistics(P.reshape(B, groups, -1), (-1,), eps)
    tangent = _centred_tangent(T.reshape(*ctx.lead, B, groups, -1), centred, rstd, (-1,))
    scale = rstd.expand(B, groups, C // groups).reshape(B, C)  # r per channel, times the weight
    scale = scale if weight is None else scale * weight
    tangent = tangent.reshape(T.shape) * scale.reshape(B, C, *(1,) * (P.dim() - 2))
    return ctx.join(y.to(dtype), tangent.to(dtype))


@rule(F.group_norm)
def _group_norm(ctx, X, num_groups, weight=None, bias=None, eps=1e-5):
    if X.dim() < 2 or _stacked_in([weight, bias]):
        raise Unsupported("group_norm with stacked parameters")
    return _grouped_norm(ctx, X, num_groups, weight, bias, eps)


@rule(F.layer_norm)
def _layer_norm(ctx, X, normalized_shape, weight=None, bias=None, eps=1e-5):
    n = len(tuple(normalized_shape))
    if n >= X.dim() or _stacked_in([weight, bias]):
        raise Unsupported("layer_norm over the batch dimension or with stacked parameters")
    P, T, dtype = _work(*ctx.split(X))
    dims = tuple(range(-n, 0))
    y = F.layer_norm(P, normalized_shape, weight, bias, eps)
    centred, rstd = _statistics(P, dims, eps)  # (native_layer_norm's mean and rstd carry no gradient)
    tangent = _centred_tangent(T, centred, rstd, dims) * rstd
    tangent = tangent if weight is None else tangent * weight
    return ctx.join(y.to(dtype), tangent.to(dtype))


def _affine_norm(ctx: _Pass, X: Tensor, running_mean, running_var, weight, bias, eps) -> Tensor:
    """Normalisation by running statistics: an affine map per channel."""
    if running_mean is None or running_var is None or _stacked_in([weight, bias, running_mean, running_var]):
        raise Unsupported("batch statistics")
    P, T = ctx.split(X)
    primal = F.batch_norm(P, running_mean, running_var, weight, bias, False, 0.0, eps)
    scale = torch.rsqrt(running_var + eps)
    scale = scale if weight is None else scale * weight
    return ctx.join(primal, T * scale.to(T.dtype).reshape((-1,) + (1,) * (X.dim() - 2)))


@rule(F.batch_norm)
def _batch_norm(ctx, X, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1,
                eps=1e-5):
    if training:  # batch statistics mix the primal and tangent rows (and update in place)
        raise Unsupported("batch_norm with batch statistics")
    return _affine_norm(ctx, X, running_mean, running_var, weight, bias, eps)


@rule(F.instance_norm)
def _instance_norm(ctx, X, running_mean=None, running_var=None, weight=None, bias=None, use_input_stats=True,
                   momentum=0.1, eps=1e-5):
    if not use_input_stats:
        return _affine_norm(ctx, X, running_mean, running_var, weight, bias, eps)
    if running_mean is not None or running_var is not None or X.dim() < 3 or _stacked_in([weight, bias]):
        raise Unsupported("instance_norm updating running statistics")
    return _grouped_norm(ctx, X, X.shape[1], weight, bias, eps)


# --- the push, and the decision cache -------------------------------------------------------------

def push(decoder: Callable, select: Callable[[Any], Tensor], z: Tensor, tangents: Tensor) -> tuple:
    """(out (B, *out), tangent outputs (k, B, *out)) of ``select(decoder(z))`` and its JVPs along
    ``tangents`` (k, B, *latent), by one stacked run; :class:`Unsupported` if the decoder does
    anything the rules do not cover."""
    X = stack(z, tangents)
    try:
        return unstack(select(decoder(X)))
    finally:
        X._fj.open = False


def hooked(modules) -> bool:
    """Whether module hooks would see (and might keep) stacked tensors: those decoders go to torch.func."""
    glob = nn.modules.module
    if glob._global_forward_hooks or glob._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)


def _structure(obj, depth: int = 0):
    """A hashable description of what a decoder callable is made of (module types, function code,
    partial arguments), not of its weights: decoders alike share one decision."""
    if depth > 4:
        return type(obj)
    if isinstance(obj, nn.Module):
        return type(obj), obj.training
    if isinstance(obj, functools.partial):
        return ("partial", _structure(obj.func, depth + 1), tuple(_structure(a, depth + 1) for a in obj.args),
                tuple(sorted((n, _structure(v, depth + 1)) for n, v in obj.keywords.items())))
    if isinstance(obj, types.MethodType):
        return ("method", _structure(obj.__self__, depth + 1), obj.__func__)
    if isinstance(obj, types.FunctionType):
        cells = tuple(_cell(c, depth) for c in obj.__closure__ or ())
        return ("function", obj.__code__, cells)
    if isinstance(obj, Tensor):
        return ("tensor", tuple(obj.shape), obj.dtype)
    return type(obj)


def _cell(cell, depth: int):
    try:
        return _structure(cell.cell_contents, depth + 1)
    except ValueError:  # an empty cell
        return None


def cache_key(decoder: Callable, output, z: Tensor, k: int):
    """What the stacked evaluation's support depends on: the decoder's structure, the output
    selector, the shapes, dtype, device and autocast state."""
    selector = output if output is None or isinstance(output, (str, int)) else _structure(output)
    autocast = torch.is_autocast_enabled(z.device.type)
    return (_structure(decoder), selector, tuple(z.shape), z.dtype, z.device.type, k, autocast,
            torch.get_autocast_dtype(z.device.type) if autocast else None)


class Decisions:
    """key -> True where the stacked evaluation ran, False where it failed (torch.func from then
    on); thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self._table: dict = {}

    def get(self, key) -> Optional[bool]:
        try:
            return self._table.get(key)
        except TypeError:  # an unhashable piece: never stacked
            return False

    def set(self, key, value: bool) -> None:
        with self._lock:
            self._table[key] = value

    def clear(self) -> None:
        with self._lock:
            self._table.clear()


DECISIONS = Decisions()
