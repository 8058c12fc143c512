"""The run folder (``--out``): what a run writes there, and how a used folder is checked, cleaned
and repaired. The checkpoint is the source of truth; the log is repaired to agree with it.

Files: ``checkpoint.pt`` (atomic, checksummed), ``log.jsonl`` (one JSON entry per line),
``grid.png`` and ``config.json`` (both atomic). Temporary files are ``.<name>.tmp-<pid>``; those of
processes that no longer run are deleted when a run starts.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Optional

from .errors import RunFolderError, RunWarning, UsageError, writing

CHECKPOINT, LOG, GRID, CONFIG = "checkpoint.pt", "log.jsonl", "grid.png", "config.json"
RUN_FILES = (CHECKPOINT, LOG, GRID, CONFIG)
_TEMPORARY = re.compile(r"^\.(?:%s)\.tmp-(\d+)$" % "|".join(map(re.escape, RUN_FILES)))


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def write_atomically(path: Path, data: bytes) -> None:
    """``path`` holds ``data`` or its previous content, never a part (temporary file + rename)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with writing(path):
            tmp.write_bytes(data)
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


class RunFolder:
    """The files of one run, written by the main process."""

    def __init__(self, path):
        self.path = Path(path)

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT

    @property
    def log(self) -> Path:
        return self.path / LOG

    @property
    def grid(self) -> Path:
        return self.path / GRID

    @property
    def config(self) -> Path:
        return self.path / CONFIG

    def used_files(self) -> list:
        return [name for name in RUN_FILES if (self.path / name).exists()]

    def prepare(self, *, keep: bool, overwrite: bool) -> None:
        """Create the folder; unless ``keep`` (the run in it continues), refuse (or, with
        ``overwrite``, clear) a folder that holds a run."""
        if self.path.exists() and not self.path.is_dir():
            raise RunFolderError(f"--out {self.path} is a file, not a folder: choose a folder for the run")
        with writing(self.path, "create the run folder"):
            self.path.mkdir(parents=True, exist_ok=True)
        self.clean_temporaries()
        used = self.used_files()
        if keep or not used:
            return
        if not overwrite:
            hint = "pass --resume to continue it, " if CHECKPOINT in used or CONFIG in used else ""
            raise UsageError(f"{self.path} already holds a run ({', '.join(used)}); {hint}pass --overwrite "
                             "to replace it, or choose another --out")
        for name in used:
            with writing(self.path / name, "delete"):
                (self.path / name).unlink()

    def clean_temporaries(self) -> None:
        """Delete the temporary files that killed runs left behind."""
        for tmp in self.path.iterdir():
            found = _TEMPORARY.match(tmp.name)
            if found and int(found.group(1)) != os.getpid() and not _process_exists(int(found.group(1))):
                with writing(tmp, "delete the stale temporary file"):
                    tmp.unlink()
                warnings.warn(f"deleted {tmp}, left behind by a run that was killed", RunWarning, stacklevel=2)

    def write_config(self, config: dict) -> None:
        write_atomically(self.config, (json.dumps(config, indent=1) + "\n").encode())

    def read_config(self) -> Optional[dict]:
        if not self.config.exists():
            return None
        try:
            with writing(self.config, "read"):
                return json.loads(self.config.read_text())
        except ValueError:
            raise UsageError(f"{self.config} is not readable JSON; pass --overwrite to start the run "
                             "again") from None

    def append_log(self, entry: dict) -> None:
        with writing(self.log), open(self.log, "a") as f:
            f.write(json.dumps(entry) + "\n")

    def repair_log(self, step: int) -> None:
        """Keep the log entries up to ``step`` (the checkpoint's); drop a torn or unreadable line
        (a crash or a full disk mid-write) and the entries an interrupted run wrote later."""
        if not self.log.exists():
            return
        with writing(self.log, "read"):
            raw = self.log.read_bytes()
        keep, unreadable, later = [], [], 0
        for number, line in enumerate(raw.split(b"\n"), 1):
            entry_step = _entry_step(line)
            if entry_step is None:
                unreadable += [number] if line.strip() else []
            elif entry_step > step:
                later += 1
            else:
                keep.append(line.strip() + b"\n")
        repaired = b"".join(keep)
        if repaired == raw:
            return
        write_atomically(self.log, repaired)
        what = [f"{len(unreadable)} unreadable line(s) (line {', '.join(map(str, unreadable[:3]))}: a write cut "
                "short by a crash or a full disk)"] if unreadable else []
        what += [f"{later} entr{'y' if later == 1 else 'ies'} after the checkpoint's step {step}"] if later else []
        if what:
            warnings.warn(f"repaired {self.log}: dropped {' and '.join(what)}", RunWarning, stacklevel=2)


def _entry_step(line: bytes) -> Optional[int]:
    """The step of a log line, or None if the line is not a complete entry."""
    try:
        entry = json.loads(line)
    except ValueError:
        return None
    step = entry.get("step") if isinstance(entry, dict) else None
    return step if isinstance(step, int) and not isinstance(step, bool) else None
