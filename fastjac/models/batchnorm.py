"""Per-sample decoder Jacobians through BatchNorm layers that are in training mode.

A BatchNorm layer normalising with batch statistics couples the samples, so forward-mode
columns would not be per-sample Jacobians (docs/maths.md#batch-coupling), and its running-statistics update is an
in-place write that forward-mode AD cannot trace. Inside :func:`frozen_batch_statistics`
such layers normalise by the *current batch's* statistics held constant (computed first in
one no-grad pass), so the outputs are the training-mode ones (up to the unbiased variance)
while every Jacobian is per sample; afterwards their running averages are updated as one
training step would have, or left untouched. Which layers need this is decided by the same
test the op rules use to refuse them (:func:`fastjac._rules.updates_running_statistics`).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor, nn

from .._rules import updates_running_statistics


@contextmanager
def frozen_batch_statistics(decoder: nn.Module, z: Tensor, *, update_running: bool):
    """Within the block, ``decoder``'s training-mode BatchNorm layers use z's batch statistics
    as constants. ``update_running``: fold those statistics into the running averages after."""
    layers = [m for m in decoder.modules() if updates_running_statistics(m)]
    if not layers:
        yield
        return
    saved = [(m.momentum, m.running_mean, m.running_var, m.num_batches_tracked) for m in layers]
    try:
        with torch.no_grad():
            for m in layers:  # fresh buffers, overwritten by this batch's statistics
                m.momentum = 1.0
                m.running_mean, m.running_var = m.running_mean.clone(), m.running_var.clone()
                m.num_batches_tracked = m.num_batches_tracked.clone()
            decoder(z.detach())
        for m in layers:
            m.eval()
        yield
    finally:
        for m, (momentum, mean, var, count) in zip(layers, saved):
            batch_mean, batch_var = m.running_mean, m.running_var  # may be held by autograd: not touched
            m.train()
            m.momentum = momentum
            if update_running:  # in place on the original buffers (DDP holds references to them)
                rate = momentum if momentum is not None else 1.0 / float(count + 1)
                with torch.no_grad():
                    mean.lerp_(batch_mean, rate)
                    var.lerp_(batch_var, rate)
                    count.add_(1)
            m.running_mean, m.running_var, m.num_batches_tracked = mean, var, count
