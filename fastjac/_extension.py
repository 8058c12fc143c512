"""The compiled extension ``fastjac._C`` (built from csrc/ by ``pip install``), if present.

``module`` is the loaded extension or None; ``reason`` says why it is missing. The extension
takes raw addresses and strides, so this module also turns tensors into those arguments.
"""
from __future__ import annotations

from typing import Optional

import torch

try:
    from . import _C as module
    reason: Optional[str] = None
except ImportError as error:  # not built: pure-Python install, or no compiler at install time
    module = None
    reason = (f"fastjac._C is not built ({error}); reinstall with a C++ compiler "
              "(pip install -e .) and without FASTJAC_EXTENSION=0")

DTYPE_CODES = {torch.float32: 0, torch.float64: 1}


def strided(t: Optional[torch.Tensor]) -> list[int]:
    """[address, strides...] (padded to 4 entries) of a tensor, or zeros when it is absent."""
    if t is None:
        return [0, 0, 0, 0]
    return [t.data_ptr(), *t.stride(), *([0] * (3 - t.dim()))]


def target(t: torch.Tensor):
    """Where the extension runs for a tensor: its CUDA device and current stream, or host threads."""
    if t.device.type == "cuda":
        return module.Target(t.device.index, torch.cuda.current_stream(t.device).cuda_stream, 1)
    return module.Target(-1, 0, torch.get_num_threads())
