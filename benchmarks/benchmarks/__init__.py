"""asv suite for fastjac (run from ``benchmarks/``: ``asv run --python=same --quick``).

Each area is one module; the implementation is a parameter so rivals run side by side, and
``setup`` raises ``NotImplementedError`` for a combination that cannot run here (a backend not
registered or not supporting the input, a model not benchmarked on this device). The workloads
are ``fastjac.bench.workloads``, the same that ``fastjac bench`` times as ratios. The device
parameter and the GPU-only classes (memory, bandwidth, fraction of the floor) exist where torch
sees a CUDA device: asv runs every combination in a fresh process, so listing GPU combinations
on a CPU machine would only cost an import each.
"""
import importlib.util
import os
import sys

if importlib.util.find_spec("fastjac") is None:
    # `--python=same` in a checkout where fastjac is not installed: benchmark this checkout
    # (asv does not pass PYTHONPATH through to its benchmark processes).
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
