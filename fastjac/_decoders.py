"""User decoders as torch.func can differentiate them: wrappers removed, autocast kept to the decoder.

- ``DistributedDataParallel`` / ``DataParallel``: their forward cannot run under vmap/jvp
  (DDP's output hooks fail on batched tensors and its reducer waits for the output bias,
  which J does not depend on). The JVPs therefore use ``.module``; gradients are still
  all-reduced by DDP in backward, because its reducer hooks sit on the parameters — as long
  as the wrapper's own forward ran in the same step (e.g. for the reconstruction).
- ``torch.compile``: ``jvp`` of a compiled module from eager code is unsupported; dynamo
  falls back to eager *and* marks the module's code as skipped, so it would stay uncompiled
  for the rest of the run. The JVPs use ``_orig_mod`` instead; to compile them as well,
  compile *around* the regulariser call.
- ``torch.autocast``: the decoder runs under the caller's autocast (bf16/fp16 activations),
  while the estimator's own arithmetic (Gram, Cholesky, CG) runs with autocast off, so it
  accumulates in float32 instead of being cast down by autocast.
"""
from __future__ import annotations

import functools
import sys
from contextlib import ExitStack, contextmanager
from typing import Callable

import torch
from torch.nn.parallel import DataParallel, DistributedDataParallel

AUTOCAST_DEVICES = ("cpu", "cuda")


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


def autocast_states() -> tuple:
    """The (device_type, dtype) pairs autocast is enabled for right now."""
    return tuple((dev, torch.get_autocast_dtype(dev)) for dev in AUTOCAST_DEVICES
                 if torch.is_autocast_enabled(dev))


@contextmanager
def _autocast(states, enabled: bool):
    with ExitStack() as stack:
        for dev, dtype in states:
            stack.enter_context(torch.autocast(dev, dtype=dtype, enabled=enabled))
        yield


class UnderAutocast:
    """Calls ``func`` (and its fused ``tangent_forward``, if any) under the given autocast states.

    ``func`` stays visible as ``.func`` (like functools.partial), so checks that look for the
    decoder's modules (BatchNorm) still find them.
    """

    def __init__(self, func: Callable, states):
        self.func, self.states = func, states
        fused = getattr(func, "tangent_forward", None)
        if callable(fused):
            self.tangent_forward = functools.partial(self._call, fused)

    def _call(self, fn, *args, **kwargs):
        with _autocast(self.states, True):
            return fn(*args, **kwargs)

    def __call__(self, *args, **kwargs):
        return self._call(self.func, *args, **kwargs)


@contextmanager
def estimator_precision(decoder: Callable):
    """Yield the decoder to differentiate; inside the block autocast is off except in that decoder."""
    decoder = unwrapped(decoder)
    states = autocast_states()
    if not states:
        yield decoder
        return
    with _autocast(states, False):
        yield UnderAutocast(decoder, states)
