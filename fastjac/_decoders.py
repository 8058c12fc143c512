"""User decoders as torch.func can differentiate them: DDP/DataParallel/torch.compile wrappers removed.

Applied by :func:`fastjac.jacobian.prepared`, i.e. by every entry point that computes Jacobian
columns (``jacobian_columns``, ``chunked.recomputed_columns`` and through them every estimator).

- ``DistributedDataParallel`` / ``DataParallel``: their forward cannot run under vmap/jvp
  (DDP's output hooks fail on batched tensors and its reducer waits for the output bias,
  which J does not depend on). The JVPs therefore use ``.module``; gradients are still
  all-reduced by DDP in backward, because its reducer hooks sit on the parameters — as long
  as the wrapper's own forward ran in the same step (e.g. for the reconstruction).
- ``torch.compile``: ``jvp`` of a compiled module from eager code is unsupported; dynamo
  falls back to eager *and* marks the module's code as skipped, so it would stay uncompiled
  for the rest of the run. The JVPs use ``_orig_mod`` instead; to compile them as well,
  compile *around* the regulariser call.
- ``torch.autocast``: the decoder runs under the caller's autocast (bf16/fp16 activations); the
  operators of :mod:`fastjac.ops` (Gram, Cholesky) and the observation weights run with autocast
  off themselves, so they accumulate in float32 instead of being cast down by autocast.
"""
from __future__ import annotations

import functools
import sys
from typing import Callable

from torch.nn.parallel import DataParallel, DistributedDataParallel


def _compiled_original(decoder):
    """What torch.compile wrapped, or None if ``decoder`` is not a torch.compile wrapper."""
    dynamo = sys.modules.get("torch._dynamo")  # nothing can be compiled before dynamo is imported
    if dynamo is not None and isinstance(decoder, dynamo.eval_frame.OptimizedModule):
        return decoder._orig_mod
    return getattr(decoder, "_torchdynamo_orig_callable", None)


def unwrapped(decoder: Callable) -> Callable:
    """``decoder`` without DDP/DataParallel/torch.compile wrappers (also inside a functools.partial)."""
    if isinstance(decoder, functools.partial):
        inner = unwrapped(decoder.func)
        if inner is decoder.func:
            return decoder
        return functools.partial(inner, *decoder.args, **decoder.keywords)
    while True:
        if isinstance(decoder, (DataParallel, DistributedDataParallel)):
            decoder = decoder.module
        elif (original := _compiled_original(decoder)) is not None:
            decoder = original
        else:
            return decoder
