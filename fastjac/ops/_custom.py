"""One registration per operator: the torch custom op and its eager twin.

Every operator's forward, ``setup_context`` and backward are registered as a torch custom op
(with its fake), which is what torch.compile traces and ``torch.library.opcheck`` tests. Eager
calls skip the custom-op dispatch round trip (~70 µs a call on the CPU, most of the cost of the
small operators on GRAE≈'s few columns) by an ``autograd.Function`` running the same three
functions, so both paths compute, save and differentiate alike. Under a dispatch mode (fake
tensors, make_fx, a user's mode) the op stays one opaque call, as it does for torch.compile.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode


def operator(name: str, forward: Callable, *, fake: Callable, setup: Callable, backward: Callable) -> Callable:
    """Register ``forward`` as the custom op ``name``; returns the callable for every call site:
    the custom op while torch.compile traces or a dispatch mode is active, the eager twin otherwise."""
    op = torch.library.custom_op(name, forward, mutates_args=())
    op.register_fake(fake)
    op.register_autograd(backward, setup_context=setup)
    run_backward = backward

    class Eager(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            output = forward(*inputs)
            setup(ctx, inputs, output)
            return output

        @staticmethod
        def backward(ctx, *grads):
            return run_backward(ctx, *grads)

    def call(*inputs):
        traced = torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None
        return op(*inputs) if traced else Eager.apply(*inputs)
    return call
