"""What the trainer shows while it runs: the running sums behind each log entry, and the
progress line on stderr."""
from __future__ import annotations

import sys
import time

import torch

from .distributed import Context


class LogWindow:
    """The training terms and step times since the last log entry. Checkpoints keep it (summed
    over processes), so the first entry after a resume averages the same steps as without one."""

    def __init__(self):
        self.clear()

    def clear(self) -> None:
        self.sums, self.count, self.seconds, self.steps = {}, 0, 0.0, 0

    def add(self, terms: dict, count: int, seconds: float) -> None:
        for k, v in terms.items():
            self.sums[k] = self.sums.get(k, 0.0) + v.detach().sum()
        self.count, self.seconds, self.steps = self.count + count, self.seconds + seconds, self.steps + 1

    def _totals(self, ctx: Context) -> dict:
        keys = sorted(self.sums)
        count = torch.tensor(float(self.count), device=ctx.device)
        totals = ctx.sum(torch.stack([self.sums[k] for k in keys] + [count]))
        return dict(zip(keys + ["count"], totals))

    def mean(self, ctx: Context) -> dict:
        """The log entry's terms (averaged over every process's samples); empties the window."""
        totals = self._totals(ctx)
        count = float(totals.pop("count"))
        entry = {"train": {k: float(v) / count for k, v in totals.items()},
                 "seconds_per_step": self.seconds / self.steps}
        self.clear()
        return entry

    def state(self, ctx: Context) -> dict:
        """For a checkpoint: the sums over all processes (a collective when there are several)."""
        totals = self._totals(ctx) if self.steps else {"count": torch.tensor(0.0)}
        count = int(totals.pop("count"))
        return {"sums": {k: v.cpu() for k, v in totals.items()}, "count": count,
                "seconds": self.seconds, "steps": self.steps}

    def load(self, state: dict, device: torch.device) -> None:
        self.sums = {k: v.to(device) for k, v in state["sums"].items()}
        self.count, self.seconds, self.steps = int(state["count"]), float(state["seconds"]), int(state["steps"])


class ProgressLine:
    """One status line on stderr: redrawn in place on a terminal, printed every log step otherwise."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled = total, enabled
        self.tty = sys.stderr.isatty()
        self._last = 0.0
        self.loss, self.seconds = None, None  # known from the first log step on

    def update(self, step: int, logged: bool) -> None:
        if not self.enabled or not (logged or (self.tty and time.monotonic() - self._last > 0.2)):
            return
        self._last = time.monotonic()
        done = int(20 * step / self.total)
        line = f"[{'#' * done}{'.' * (20 - done)}] step {step}/{self.total}"
        if self.loss is not None:
            eta = self.seconds * (self.total - step)
            line += f"  loss {self.loss:.4g}  {self.seconds:.4f} s/step  eta {int(eta // 60)}:{int(eta % 60):02d}"
        sys.stderr.write(("\r" + line) if self.tty else line + "\n")
        if self.tty and step == self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()
