"""Process-group set-up for ``torchrun`` (gloo on CPU, NCCL on GPU) and the reductions the
trainer needs. A single process (no WORLD_SIZE) runs without any process group.

Every collective has a finite timeout (``--ddp-timeout``): a peer that died or stalled makes the
others stop with a :class:`~fastjac.training.errors.PeerError` instead of waiting forever.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import re
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist

from .errors import PeerError, UsageError

# How the backends word a lost peer or a timeout (gloo, NCCL, the TCP store).
_PEER_FAILURE = re.compile(r"gloo|nccl|timed? ?out|connection (reset|closed|refused)|broken pipe|peer",
                           re.IGNORECASE)


@dataclass
class Context:
    rank: int
    world: int
    device: torch.device
    owns_group: bool
    timeout_s: float = 0.0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """The sum of ``t`` over all processes (``t`` itself for one process)."""
        if self.world > 1:
            t = t.clone()
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def any(self, flag: bool) -> bool:
        """True on every process if ``flag`` is True on any (so all stop at the same step)."""
        if self.world == 1:
            return flag
        return bool(self.sum(torch.tensor([float(flag)], device=self.device)) > 0)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    @contextlib.contextmanager
    def peers(self, what: str) -> Iterator[None]:
        """Report a collective that failed because another process died or stalled as a
        PeerError (one line); any other error passes unchanged."""
        try:
            yield
        except RuntimeError as e:
            if self.world == 1 or isinstance(e, PeerError) or not (
                    isinstance(e, getattr(dist, "DistError", ())) or _PEER_FAILURE.search(str(e))):
                raise
            first_line = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise PeerError(f"process {self.rank} of {self.world} lost the others during {what}: a peer died "
                            f"or stalled for more than --ddp-timeout {self.timeout_s:g} s ({first_line})") from e

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            try:
                dist.destroy_process_group()
            except RuntimeError:  # a group whose peer died cannot always be torn down cleanly
                pass


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """"auto" -> this process's GPU if there is one, else the CPU; "cuda" -> cuda:LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"device must be auto, cpu, cuda or cuda:N; got {name!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device {name!r} asked for, but this torch has no CUDA device")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


def setup(device: str, *, timeout_s: float = 600.0) -> Context:
    """Join the process group that torchrun describes in the environment (if any); collectives
    give up after ``timeout_s`` seconds."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    owns = False
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        context = Context(rank, world, dev, False, timeout_s)
        with context.peers("start-up (joining the process group)"):
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                                    timeout=datetime.timedelta(seconds=timeout_s))
        owns = True
    return Context(rank, world, dev, owns, timeout_s)
