"""Stopping a run cleanly: SIGINT (Ctrl-C) and SIGTERM ask the trainer to finish the current step,
write a checkpoint and exit; a second Ctrl-C aborts at once. Under torchrun a worker also stops
when its agent dies (Linux: ``PR_SET_PDEATHSIG``; elsewhere: the parent pid is checked each step),
so killing the agent does not leave workers training."""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
from typing import Optional

_PR_SET_PDEATHSIG = 1


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ


def _ask_for_signal_on_parent_death(signum: int) -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0)
    except (OSError, AttributeError):  # no prctl here: the parent pid check remains
        pass


class StopRequests:
    """A context in which SIGINT/SIGTERM (and, with ``watch_parent``, the parent's death) become a
    request that :attr:`signal` reports; handlers are installed only in the main thread. The
    parent's death is watched from construction on."""

    def __init__(self, *, watch_parent: bool = False):
        self._signal: Optional[int] = None
        self._parent = os.getppid() if watch_parent else None
        self._previous = {}
        self._announce = os.environ.get("RANK", "0") == "0"  # one line for all the processes
        if watch_parent:  # from now on; until the handlers are in place, SIGTERM ends the process
            _ask_for_signal_on_parent_death(signal.SIGTERM)

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame) -> None:
        if self._signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now, without a checkpoint
        self._signal = signum
        if not self._announce:
            return
        # os.write, not print: the handler may interrupt a write to sys.stderr
        os.write(2, f"\n{signal.Signals(signum).name}: stopping after this step and writing a checkpoint "
                    "(Ctrl-C again to stop at once, without one)\n".encode())

    @property
    def signal(self) -> Optional[int]:
        """The signal that asked the run to stop (SIGTERM if the parent died), else None."""
        if self._signal is None and self._parent is not None and os.getppid() != self._parent:
            self._signal = signal.SIGTERM
        return self._signal
