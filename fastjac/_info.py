"""``fastjac.info()``: versions, devices and which backend computes each operator, and why."""
from __future__ import annotations

import platform

import torch

from . import _validation
from .autodiff import dense_chain
from .estimators import ESTIMATORS
from .ops import _dispatch


def info(file=None) -> dict:
    """Print (and return) versions, devices, backend availability and the auto choice per operator."""
    from . import __version__
    report = {
        "fastjac": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "backends": _dispatch.availability(),
        "operators": _dispatch.operators(),
        "estimators": {name: f"{fn.__module__}.{fn.__name__}" for name, fn in ESTIMATORS.items()},
        "value_checks": _validation.values_checked(),
        "dense_runs": dense_chain.reverse_pass(),
    }
    lines = [f"fastjac {report['fastjac']}  python {report['python']}  torch {report['torch']}"
             f"  cuda {report['cuda']}  devices {report['cuda_devices'] or 'none'}",
             "backends:"]
    for name, why in report["backends"].items():
        lines.append(f"  {name:7s} {'available' if why is None else 'unavailable: ' + why}")
    lines.append("operators (registered backends):")
    for op, backends in report["operators"].items():
        lines.append(f"  {op:24s} {', '.join(backends)}")
    lines.append("estimators: " + ", ".join(f"{n} ({where})" for n, where in report["estimators"].items()))
    lines.append(f"stacked Linear + activation runs, reverse pass: {report['dense_runs']}")
    lines.append(f"value checks: {'on' if report['value_checks'] else 'off'} in this thread "
                 "(one host sync per loss call when on)")
    print("\n".join(lines), file=file)
    return report
