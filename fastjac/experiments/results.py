"""results.json: every run's raw numbers and the settings, written atomically, resumable.

A results file holds ``{"experiment", "config", "runs": {key: record}, "summary"}``. Re-running an experiment
with the same ``--out`` skips the keys already present; a file made with a different config is
refused rather than mixed with new numbers. Every write goes to a temporary file in the same
folder and is renamed into place, so an interrupted run never leaves a half-written file.
"""
from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` and rename the temporary file onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _clean(value):
    """JSON-safe: NaN/inf become None (strict JSON), tuples become lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class Results:
    """The runs of one experiment in ``out/results.json``.

    Example:
        >>> res = Results(out, "identifiability", {"quick": True})
        >>> if "tanh/n=100" not in res:
        ...     res.put("tanh/n=100", {"elbo": [...]})
    """

    def __init__(self, out, experiment: str, config: dict[str, Any]):
        self.path = Path(out) / "results.json"
        self.experiment, self.config = experiment, _clean(config)
        self.runs: dict[str, Any] = {}
        self.summary: Any = None
        if self.path.exists():
            saved = json.loads(self.path.read_text())
            if saved.get("experiment") != experiment or saved.get("config") != self.config:
                raise ValueError(
                    f"{self.path} holds results of {saved.get('experiment')!r} with config "
                    f"{saved.get('config')}, not {experiment!r} with {self.config}; "
                    "use another --out (or delete the file) to start afresh")
            self.runs = saved.get("runs", {})
            self.summary = saved.get("summary")

    def __contains__(self, key: str) -> bool:
        return key in self.runs

    def __getitem__(self, key: str):
        return self.runs[key]

    def put(self, key: str, record: dict[str, Any]) -> None:
        self.runs[key] = _clean(record)
        self.save()

    def put_summary(self, summary) -> None:
        """Numbers derived from the runs (recomputed on every run, never used to skip work)."""
        self.summary = _clean(summary)
        self.save()

    def save(self) -> None:
        doc = {"experiment": self.experiment, "config": self.config, "runs": self.runs,
               "summary": self.summary}
        text = json.dumps(doc, indent=1, allow_nan=False)
        atomic_write(self.path, lambda tmp: Path(tmp).write_text(text))


class Progress:
    """One line per event, and at most one line every ``every`` seconds inside a long loop."""

    def __init__(self, label: str, total: int, *, every: float = 10.0, stream=None):
        self.label, self.total, self.every = label, total, every
        self.stream = stream or sys.stdout
        self.start = self.last = time.perf_counter()

    def update(self, done: int, note: str = "") -> None:
        now = time.perf_counter()
        if now - self.last >= self.every and done < self.total:
            self.last = now
            print(f"  {self.label}: {done}/{self.total} ({now - self.start:.0f} s) {note}",
                  file=self.stream, flush=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def log(message: str) -> None:
    print(message, flush=True)
