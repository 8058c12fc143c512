"""What the trainer raises when the user, the disk or a peer process is at fault.

The command line (``fastjac``) prints these as one line and exits with a status code instead of a
traceback; any other exception is a bug and keeps its traceback.
"""
from __future__ import annotations

import contextlib
import errno
import os
from typing import Iterator

# OSError numbers that describe the machine or the user's paths, not a bug.
OSERROR_REASONS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exhausted",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.ENOTDIR: "a path component is a file, not a folder",
    errno.EISDIR: "it is a folder, not a file",
    errno.EEXIST: "a file of that name is in the way",
    errno.ENOENT: "no such file or folder",
    errno.EIO: "input/output error",
}


class UsageError(ValueError):
    """A setting, path or data file the user gave cannot be used (exit status 2)."""


class RunFolderError(UsageError):
    """The run folder (``--out``) cannot be written or read: full disk, read-only, not a folder."""


class DataError(UsageError):
    """A data file cannot be decoded or is unreasonable (the message names the file)."""


class PeerError(RuntimeError):
    """Another training process died or stalled past the collective timeout (exit status 1)."""


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM stopped the run after a checkpoint; ``step`` is where it stopped."""

    def __init__(self, message: str, *, step: int, signal_number: int, rank: int = 0):
        super().__init__(message)
        self.step, self.signal_number, self.rank = step, signal_number, rank


class RunWarning(UserWarning):
    """Something in the run folder was repaired or cleaned (the message names the file)."""


@contextlib.contextmanager
def writing(path: os.PathLike, doing: str = "write") -> Iterator[None]:
    """Turn an OSError met while ``doing`` ``path`` into a one-line RunFolderError when it is the
    machine's or the user's (full disk, read-only, a file in the way); other OSErrors pass."""
    try:
        yield
    except OSError as e:
        if e.errno not in OSERROR_REASONS:
            raise
        full = e.errno in (errno.ENOSPC, errno.EDQUOT)
        hint = " Free some space, then continue with --resume." if full else ""
        raise RunFolderError(f"cannot {doing} {path}: {OSERROR_REASONS[e.errno]}.{hint}") from e
