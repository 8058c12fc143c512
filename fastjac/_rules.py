"""The op table: every torch function fastjac replaces while Jacobian columns are computed, and why.

While :func:`fastjac.jacobian_columns` pushes tangents through a decoder (and while
``torch.utils.checkpoint`` recomputes that push in backward, see :mod:`fastjac.chunked`),
:class:`ColumnRules` — a ``TorchFunctionMode`` — sees every torch call the decoder makes,
whether it comes from an ``nn.Module`` handed in directly, one hidden behind a lambda or
``functools.partial``, or a functional call such as ``F.layer_norm``. The calls listed in
:data:`RULES` run a replacement instead; everything else runs unchanged.

| op | problem in torch 2.13 | rule |
|---|---|---|
| ``layer_norm`` | forward-AD formula drops the derivative of the statistics: J is right, gradients of J are 25-70 % off | decomposed (mean, rsqrt), exactly twice differentiable |
| ``instance_norm`` (instance statistics) | same as layer_norm | decomposed |
| ``group_norm`` | channels-last input (as after attention blocks) fails with a view error under forward AD | decomposed (one formula with layer and instance norm) |
| ``batch_norm``, batch statistics | couples the samples (see docs/maths.md#batch-coupling); in training mode with running statistics its in-place update cannot be traced | decomposed with a ``BatchCouplingWarning``, or ``ValueError`` naming the fix |
| ``scaled_dot_product_attention`` | the CPU flash kernel has no forward-AD formula (``NotImplementedError``) | math decomposition: softmax(QKᵀ·s + mask) V |
| ``multi_head_attention_forward`` | a Python-level function: a ``TorchFunctionMode`` does not see the calls inside it, and with ``need_weights=False`` it calls the flash kernel above | run with ``need_weights=True`` (explicit softmax(QKᵀ) V, the same numbers); the weights are dropped when not asked for |
| ``nn.TransformerEncoderLayer`` / ``nn.MultiheadAttention`` fast path | ``_transformer_encoder_layer_fwd`` / ``_native_multi_head_attention`` have no forward-AD formula | fast path disabled within the block |

An op with no forward-AD formula and no rule makes :func:`fastjac.jacobian_columns` fall back
to the double-VJP method (exact, k reverse passes) with one warning naming the op.
``tests/test_zoo_rules.py`` holds a canary per torch problem above: it fails once torch fixes it,
so the rule can be dropped.
"""
from __future__ import annotations

import inspect
import math
import warnings
from contextlib import contextmanager
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode


class BatchCouplingWarning(UserWarning):
    """The decoder normalises with batch statistics, so its per-sample Jacobian is not defined."""


BATCH_COUPLING = ("its batch statistics couple the samples, so J is not the per-sample Jacobian "
                  "(docs/maths.md#batch-coupling)")
BATCH_FIX = "call decoder.eval() for the regulariser pass, or use GroupNorm/LayerNorm"
LOW_PRECISION = (torch.float16, torch.bfloat16)


def _normalised(x: Tensor, dims: tuple, eps: float, weight: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
    """(x − mean) / sqrt(var + eps) · weight + bias over ``dims`` (biased variance), in float32
    at least for half inputs, as torch's fused norms and autocast's fp32 policy compute it."""
    work = x.float() if x.dtype in LOW_PRECISION else x
    var, mean = torch.var_mean(work, dims, unbiased=False, keepdim=True)  # one fused reduction
    y = (work - mean) * torch.rsqrt(var + eps)
    y = y if weight is None else y * weight
    y = y if bias is None else y + bias
    keep_fp32 = x.dtype in LOW_PRECISION and torch.is_autocast_enabled(x.device.type)
    return y if keep_fp32 else y.to(x.dtype)


def _per_channel(p: Optional[Tensor], x: Tensor) -> Optional[Tensor]:
    return None if p is None else p.reshape((-1,) + (1,) * (x.dim() - 2))


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5, *_):
    dims = tuple(range(-len(tuple(normalized_shape)), 0))
    return _normalised(input, dims, eps, weight, bias)


def group_norm(input, num_groups, weight=None, bias=None, eps=1e-5, *_):
    B = input.shape[0]
    grouped = input.reshape(B, num_groups, -1)  # copies channels-last input: no strided view needed
    y = _normalised(grouped, (-1,), eps, None, None).reshape(input.shape)
    y = y if weight is None else y * _per_channel(weight, input)
    return y if bias is None else y + _per_channel(bias, input)


def instance_norm(input, running_mean=None, running_var=None, weight=None, bias=None,
                  use_input_stats=True, momentum=0.1, eps=1e-5):
    if not use_input_stats:  # running statistics: an affine map, torch's formulas are exact
        return F.batch_norm(input, running_mean, running_var, weight, bias, False, momentum, eps)
    dims = tuple(range(2, input.dim()))
    return _normalised(input, dims, eps, _per_channel(weight, input), _per_channel(bias, input))


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5):
    if not training:
        return F.batch_norm(input, running_mean, running_var, weight, bias, False, momentum, eps)
    if running_mean is not None:
        refuse_running_statistics_update(1)
    warnings.warn(f"a BatchNorm layer without running statistics: {BATCH_COUPLING}; J e_j is the "
                  f"derivative with every sample moved along e_j at once (errors of order 1/B); "
                  f"{BATCH_FIX}", BatchCouplingWarning, stacklevel=4)
    dims = (0,) + tuple(range(2, input.dim()))
    return _normalised(input, dims, eps, _per_channel(weight, input), _per_channel(bias, input))


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                 scale=None, enable_gqa=False):
    """softmax(Q Kᵀ · scale + mask) V, the math path of ``F.scaled_dot_product_attention``."""
    if enable_gqa:
        key = key.repeat_interleave(query.size(-3) // key.size(-3), -3)
        value = value.repeat_interleave(query.size(-3) // value.size(-3), -3)
    scale = 1.0 / math.sqrt(query.size(-1)) if scale is None else scale
    scores = (query * scale) @ key.transpose(-2, -1)
    if is_causal:
        L, S = query.size(-2), key.size(-2)
        keep = torch.ones(L, S, dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool \
            else scores + attn_mask
    weights = torch.softmax(scores, -1)
    if dropout_p > 0:
        weights = F.dropout(weights, dropout_p)
    return weights @ value


_MHA_SIGNATURE = inspect.signature(F.multi_head_attention_forward)


def multi_head_attention_forward(*args, **kwargs):
    """``F.multi_head_attention_forward`` on its explicit-weights path (see the table above)."""
    bound = _MHA_SIGNATURE.bind(*args, **kwargs)
    wanted = bound.arguments.get("need_weights", True)
    bound.arguments["need_weights"] = True
    out, weights = F.multi_head_attention_forward(*bound.args, **bound.kwargs)
    return out, (weights if wanted else None)


def _torch_instance_norm(input, weight, bias, running_mean, running_var, use_input_stats, momentum, eps, *_):
    return instance_norm(input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps)


def _torch_batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps, *_):
    return batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)


RULES: dict = {
    F.layer_norm: layer_norm, torch.layer_norm: layer_norm,
    F.group_norm: group_norm, torch.group_norm: group_norm,
    F.instance_norm: instance_norm, torch.instance_norm: _torch_instance_norm,
    F.batch_norm: batch_norm, torch.batch_norm: _torch_batch_norm,
    F.scaled_dot_product_attention: scaled_dot_product_attention,
    F.multi_head_attention_forward: multi_head_attention_forward,
}


class ColumnRules(TorchFunctionMode):
    """Runs the replacement from :data:`RULES` for the calls listed there (see the module notes).

    A torch function written in Python runs its body with the mode off (torch pops a mode
    while it handles a call), so the table lists the one such function in torch 2.13 whose
    body calls a ruled op (``multi_head_attention_forward``; ``tests/test_zoo_rules.py`` checks
    that no other function of ``torch.nn.functional`` does)."""

    def __torch_function__(self, func: Callable, types, args=(), kwargs=None):
        rule = RULES.get(func, func)
        return rule(*args, **(kwargs or {}))


def updates_running_statistics(module: nn.Module) -> bool:
    """A BatchNorm layer in training mode with running statistics: what the batch_norm rule
    refuses, checked on visible modules before any call (``check_normalisation``) and what
    :func:`fastjac.models.batchnorm.frozen_batch_statistics` makes traceable."""
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training and module.track_running_stats


def refuse_running_statistics_update(count: int) -> None:
    raise ValueError(f"{count} BatchNorm layer(s) in training mode: {BATCH_COUPLING}, and their "
                     f"running-statistics update is an in-place write that forward-mode AD cannot "
                     f"trace: {BATCH_FIX}")


@contextmanager
def column_rules():
    """Within the block every torch call follows :data:`RULES` and the attention fast path is off
    (under torch.compile the flag is left alone: the traced graph never takes the fast path)."""
    if torch.compiler.is_compiling():
        with ColumnRules():
            yield
        return
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with ColumnRules():
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
