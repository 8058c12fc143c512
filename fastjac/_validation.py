"""Argument checks shared by every public function.

Each check names the argument and what was expected, and raises ``ValueError``
(bad value or shape) or ``TypeError`` (bad type).

Value checks (finiteness, ranges) read tensor values, which costs a host round-trip on a GPU.
So every public loss or regulariser runs inside one :func:`deferred` block: there
:func:`finite` and :func:`condition` only record a device-side flag, and leaving the block
reads all flags with ONE host synchronisation and raises a ``ValueError`` naming the first
failing argument. Outside a deferred block they act at once. With checks off
(:func:`set_checks` / :func:`checks`, or while ``torch.compile`` traces) they record nothing
and cost nothing, so the step makes no host round-trip and can be captured in a CUDA graph.

The on/off switch: :func:`set_checks` sets the process-wide default; :func:`checks` overrides
it for the calling thread only, so one thread switching checks off never lets another
thread's NaN through.
"""
from __future__ import annotations

import math
import os
import threading
from contextlib import contextmanager
from numbers import Real
from typing import Iterable, Optional

import torch

_DEFAULT = os.environ.get("FASTJAC_CHECK_VALUES", "1") != "0"
_local = threading.local()


def set_checks(enabled: bool) -> None:
    """Turn the value checks (finiteness of J, z, β, x ...) on or off: the process-wide default.

    A :func:`checks` block in a thread overrides it for that thread."""
    global _DEFAULT
    _DEFAULT = bool(enabled)


@contextmanager
def checks(enabled: bool):
    """Value checks on or off inside the block, for the calling thread only (other threads keep theirs)."""
    previous = getattr(_local, "enabled", None)
    _local.enabled = bool(enabled)
    try:
        yield
    finally:
        _local.enabled = previous


def values_checked() -> bool:
    enabled = getattr(_local, "enabled", None)
    return (_DEFAULT if enabled is None else enabled) and not torch.compiler.is_compiling()


# ----------------------------------------------------------------------------- deferred checks
class _Pending:
    """Flags recorded in one deferred block, in call order: (ok, message, None) with ok a 0-d bool
    tensor, or (sum, message, value) for a value that must be finite (:func:`finite`)."""

    def __init__(self):
        self.flags: list[tuple[torch.Tensor, str, Optional[torch.Tensor]]] = []
        self.seen: dict[tuple, torch.Tensor] = {}  # (id, version) of tensors already checked finite

    def first_failure(self) -> Optional[str]:
        if not self.flags:
            return None
        device = self.flags[0][0].device
        got = torch.stack([flag.to(device) for flag, _, _ in self.flags]).tolist()  # one sync
        for flag, (_, message, value) in zip(got, self.flags):
            if (not flag) if value is None else not (math.isfinite(flag) or _all_finite(value)):
                return message
        return None


def _pending() -> Optional[_Pending]:
    return getattr(_local, "pending", None)


@contextmanager
def deferred():
    """Collect the value checks of the block; one host sync on exit raises the first failure.

    Nested blocks join the outermost one. If the block raises, a recorded failure (e.g. a NaN
    input that made a later step fail) is raised instead, chained to the original error.
    """
    if _pending() is not None:
        yield
        return
    pending = _local.pending = _Pending()
    try:
        yield
    except Exception as error:
        _local.pending = None
        try:
            message = pending.first_failure()
        except Exception:  # the device is in an error state: the original error says more
            message = None
        if message is not None:
            raise ValueError(message) from error
        raise
    finally:  # also on KeyboardInterrupt: a stale block would swallow every later check of the thread
        _local.pending = None
    message = pending.first_failure()
    if message is not None:
        raise ValueError(message)


def condition(name: str, ok, message: str) -> None:
    """Require ``ok`` (a Python bool or a bool tensor, all of it true); else ValueError(message).

    ``name`` is the argument the condition is about. Deferred inside :func:`deferred`; a
    no-op with checks off (so callers may pass a tensor that is cheap to build)."""
    if isinstance(ok, bool):
        if not ok:
            raise ValueError(message)
        return
    if not values_checked():
        return
    ok = ok.all() if ok.dim() else ok
    pending = _pending()
    if pending is not None:
        pending.flags.append((ok, message, None))
    elif not bool(ok):
        raise ValueError(message)


def finite(name: str, value: torch.Tensor, what: Optional[str] = None) -> None:
    """``value`` has no NaN or inf, by one reduction (its sum) and no temporary, read now or at the
    end of a deferred block. A tensor already checked in the current deferred block (same
    object, unchanged) is not read again."""
    if not values_checked() or value.numel() == 0:
        return
    pending = _pending()
    key = (id(value), value._version if not value.is_inference() else -1)
    if pending is not None and key in pending.seen:
        return
    message = f"{what or name} contains non-finite values (NaN or inf)"
    # a finite sum proves every entry finite: one vectorised reduction, no temporary; a sum that
    # is not (NaN/inf entries, or finite ones overflowing it) takes the exact test
    total = value.detach().sum()
    if pending is None:
        if not (math.isfinite(total.item()) or _all_finite(value)):
            raise ValueError(message)
        return
    pending.seen[key] = value  # holding it keeps its id from being reused within the block
    pending.flags.append((total, message, value))


def _all_finite(value: torch.Tensor) -> bool:
    """The exact test (min and max are finite iff every entry is; NaN propagates): a host sync."""
    return all(math.isfinite(v) for v in torch.stack(torch.aminmax(value.detach())).tolist())


def beta(value):
    """β > 0 and finite: a Python number (returned as a float, never copied to a device) or a
    0-d tensor (which may require grad; its value is checked without an immediate sync)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dim() > 1:
            raise ValueError(f"beta must be a scalar, got a tensor of shape {tuple(value.shape)}")
        if not value.is_floating_point():
            raise TypeError(f"beta must be a floating-point scalar, got dtype {value.dtype}")
        value = value.reshape(())
        if values_checked():
            b = value.detach()
            condition("beta", torch.isfinite(b) & (b > 0), "beta must be finite and > 0")
        return value
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"beta must be a positive number or a 0-d tensor, got {type(value).__name__}")
    b = float(value)
    if not (math.isfinite(b) and b > 0):
        raise ValueError(f"beta must be finite and > 0, got {value!r}")
    return b


def positive_int(name: str, value, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def choice(name: str, value, options: Iterable[str]) -> str:
    options = tuple(options)
    if value not in options:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, options))}; got {value!r}")
    return value


def tensor(name: str, value, *, ndim: int | Iterable[int] | None = None, floating: bool = True):
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if floating and not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if value.dim() not in allowed:
            want = " or ".join(str(n) for n in allowed)
            raise ValueError(f"{name} must have {want} dimensions, got shape {tuple(value.shape)}")
    return value


def jacobian(J, name: str = "J") -> torch.Tensor:
    """J: (B, D, k) floating tensor with B, D, k >= 1 and finite entries."""
    tensor(name, J, ndim=3)
    if 0 in J.shape:
        raise ValueError(f"{name} must be a non-empty (B, D, k) tensor, got shape {tuple(J.shape)}")
    finite(name, J)
    return J


def weights(w, J: torch.Tensor, name: str = "weights"):
    """Observation weights: None, a number or 0-d tensor (>= 0), or a (B, D) tensor (>= 0)."""
    if w is None:
        return None
    if isinstance(w, Real) and not isinstance(w, bool):
        if not (math.isfinite(float(w)) and float(w) >= 0):
            raise ValueError(f"{name} must be finite and >= 0, got {w!r}")
        return float(w)
    tensor(name, w)
    B, D, _ = J.shape
    if w.dim() == 0 or (w.dim() == 1 and w.numel() == 1):
        w = w.reshape(())
    elif tuple(w.shape) != (B, D):
        raise ValueError(
            f"{name} must be a scalar or have shape (B, D) = ({B}, {D}) matching J, got {tuple(w.shape)}")
    if values_checked():
        condition(name, torch.isfinite(w) & (w >= 0), f"{name} must be finite and >= 0 everywhere")
    return w
