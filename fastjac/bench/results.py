"""What every benchmark writes beside its numbers, and how it writes them.

A results file is one JSON object with at least::

    {"tool": "<what wrote it>", "command": "<how to rerun it>", "machine": machine(device),
     "settings": {...}, ...the tool's own rows...}

``benchmarks/render_results.py`` turns the files committed in ``benchmarks/results/`` into the
tables of README.md and docs/, and prints the command, the machine and the date beside each one.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import sys
import tempfile
from typing import Optional, Sequence

import torch


def machine(device="cpu") -> dict:
    """Where the numbers come from: CPU model and cores, load, card, CUDA, torch, triton, date."""
    device = torch.device(device)
    info = {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_average": _load_average(), "torch": torch.__version__,
            "python": platform.python_version(), "device": device.type, "card": None,
            "cuda": torch.version.cuda, "triton": _triton_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    if device.type == "cuda":
        info["card"] = torch.cuda.get_device_name(device)
    return info


def machine_line(m: dict) -> str:
    """One line naming the machine of a ``machine()`` record (also of older records lacking some keys)."""
    where = (f"{m['card']}, CUDA {m['cuda']}" if m.get("card")
             else f"{m['cpu']}, {m['cores']} cores, {m.get('torch_threads')} torch threads")
    extras = "".join(f", {label} {m[key]}" for key, label in (("triton", "triton"), ("load_average", "load average"))
                     if m.get(key) is not None)
    return f"{where}, torch {m['torch']}{extras}"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _load_average() -> Optional[float]:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _triton_version() -> Optional[str]:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def command(program: str, argv: Optional[Sequence[str]] = None) -> str:
    """The command line that reproduces a run: ``program`` and its arguments (default sys.argv[1:])."""
    args = list(sys.argv[1:] if argv is None else argv)
    return " ".join([program, *map(shlex.quote, args)])


def record(tool: str, *, program: str, argv: Optional[Sequence[str]] = None, device="cpu",
           settings: Optional[dict] = None) -> dict:
    """The common head of a results file; the caller adds its rows."""
    return {"tool": tool, "command": command(program, argv), "machine": machine(device),
            "settings": dict(settings or {})}


def write_json(result: dict, path) -> None:
    """Atomic write: a temporary file in the same folder, then rename (readable by all)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(result, f, indent=1, ensure_ascii=False)
            f.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def load(path) -> dict:
    with open(path) as f:
        return json.load(f)
