"""Checkpoints that are written atomically and read back whole or not at all.

File layout: a header line ``fastjac-checkpoint 1 <payload bytes> <sha256 of payload>\\n``
followed by the ``torch.save`` payload. Writing goes to a temporary file in the same
folder, fsync, then ``os.replace`` (a crash leaves the previous checkpoint intact).
Reading checks the header, the length and the checksum before unpickling with
``torch.load(weights_only=True)``, so a truncated or corrupted file is refused with a
:class:`CheckpointError` and nothing is loaded from it.
"""
from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import torch

from .errors import UsageError, writing

MAGIC = b"fastjac-checkpoint"
VERSION = 1


class CheckpointError(UsageError):
    """A checkpoint file that cannot be used (missing, truncated, corrupted, or not ours)."""


def save_checkpoint(state: dict, path) -> None:
    """Atomically write ``state`` (tensors, numbers, strings, lists, dicts) to ``path``."""
    path = Path(path)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    header = b"%s %d %d %s\n" % (MAGIC, VERSION, len(payload), hashlib.sha256(payload).hexdigest().encode())
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with writing(path):
            with open(tmp, "wb") as f:
                f.write(header)
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def load_checkpoint(path) -> dict:
    """The state saved by :func:`save_checkpoint`, on the CPU; CheckpointError if unusable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    with writing(path, "read"):
        data = path.read_bytes()
    newline = data.find(b"\n", 0, 256)
    fields = data[:newline].split(b" ") if newline > 0 else []
    if len(fields) != 4 or fields[0] != MAGIC:
        raise CheckpointError(f"{path} is not a fastjac checkpoint (or its header is damaged)")
    if fields[1] != str(VERSION).encode():
        raise CheckpointError(f"{path} has checkpoint format {fields[1].decode(errors='replace')}, "
                              f"this fastjac reads format {VERSION}")
    payload = data[newline + 1:]
    expected = int(fields[2]) if fields[2].isdigit() else -1
    if len(payload) != expected:
        raise CheckpointError(f"{path} is truncated or padded: {len(payload)} payload bytes, "
                              f"the header says {expected}; refusing to load it")
    if hashlib.sha256(payload).hexdigest().encode() != fields[3]:
        raise CheckpointError(f"{path} is corrupted (checksum mismatch); refusing to load it")
    try:
        return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as e:  # the checksum matched, so this is not ours or not weights-only
        raise CheckpointError(f"{path} could not be unpickled safely: {e}") from None
