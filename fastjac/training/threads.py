"""How many CPU threads torch uses when the user does not say (``--threads``).

torch's own default is one thread per core. On a machine whose cores are busy with other work,
its OpenMP threads wait on each other and a small model's step gets many times slower, while one
thread is hardly slowed (``fastjac train --steps 100`` on digits, 2-core machine at load 9–13:
0.27–1.0 s/step with torch's 2 threads, 0.026–0.032 s/step with this default). So the default
counts only the idle cores.
"""
from __future__ import annotations

import os

import torch

# More threads than this rarely pays for the small networks of the trainer, demo and examples.
MAX_DEFAULT_THREADS = 4


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_threads() -> int:
    """OMP_NUM_THREADS when set; 1 per process under torchrun or several processes; otherwise the
    idle cores (cores minus the 1-minute load average), at least 1 and at most
    ``MAX_DEFAULT_THREADS``."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) >= 1:
        return int(os.environ["OMP_NUM_THREADS"])
    if int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1"))) > 1:
        return 1
    try:
        busy = os.getloadavg()[0]
    except OSError:  # no load average on this system: assume busy
        busy = float(_cores())
    return max(1, min(MAX_DEFAULT_THREADS, int(_cores() - busy)))


def use_threads(threads) -> int:
    """Set torch's CPU threads to ``threads`` (None: :func:`default_threads`); returns the number."""
    n = default_threads() if threads is None else int(threads)
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    if n != torch.get_num_threads():
        torch.set_num_threads(n)
    return n
