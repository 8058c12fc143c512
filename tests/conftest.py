import os

import pytest
import torch
from hypothesis import settings

# CI draws the same hypothesis examples every run (a red CI must be reproducible); local runs
# draw new ones each time and so keep exploring.
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.load_profile(os.environ.get("FASTJAC_HYPOTHESIS_PROFILE", "default"))

torch.set_default_dtype(torch.float32)

# Without a GPU the Triton kernels are tested on the CPU through triton's interpreter, which
# must be chosen before triton is imported (``import fastjac`` imports the Triton backends).
# "auto" never picks triton for CPU tensors, so only tests that ask for it run it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
