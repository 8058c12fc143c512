"""Argument checks shared by every public function.

Each check names the argument and what was expected, and raises ``ValueError``
(bad value or shape) or ``TypeError`` (bad type). Finiteness checks read tensor
values, which costs one device synchronisation on a GPU; they are skipped while
``torch.compile`` traces and can be switched off with :func:`fastjac.set_checks`.
"""
from __future__ import annotations

import math
import os
from contextlib import contextmanager
from numbers import Real
from typing import Iterable

import torch

_CHECK_VALUES = os.environ.get("FASTJAC_CHECK_VALUES", "1") != "0"


def set_checks(enabled: bool) -> None:
    """Turn the value checks (finiteness of J, z, β) on or off globally."""
    global _CHECK_VALUES
    _CHECK_VALUES = bool(enabled)


@contextmanager
def checks(enabled: bool):
    """Context manager form of :func:`set_checks`."""
    global _CHECK_VALUES
    previous = _CHECK_VALUES
    _CHECK_VALUES = bool(enabled)
    try:
        yield
    finally:
        _CHECK_VALUES = previous


def values_checked() -> bool:
    return _CHECK_VALUES and not torch.compiler.is_compiling()


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


def finite(name: str, value: torch.Tensor) -> None:
    """One reduction, no temporary: min and max are finite iff every entry is (NaN propagates);
    15× cheaper than isfinite(value).all() on the CPU."""
    if not values_checked() or value.numel() == 0:
        return
    lo, hi = torch.stack(torch.aminmax(value.detach())).tolist()  # one sync
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"{name} contains non-finite values (NaN or inf)")


def beta(value):
    """β > 0 and finite: a Python number or a 0-d tensor (which may require grad)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dim() > 1:
            raise ValueError(f"beta must be a scalar, got a tensor of shape {tuple(value.shape)}")
        if not value.is_floating_point():
            raise TypeError(f"beta must be a floating-point scalar, got dtype {value.dtype}")
        if values_checked():
            b = float(value.detach())
            if not (math.isfinite(b) and b > 0):
                raise ValueError(f"beta must be finite and > 0, got {b}")
        return value.reshape(())
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
    if values_checked() and not bool((torch.isfinite(w) & (w >= 0)).all()):
        raise ValueError(f"{name} must be finite and >= 0 everywhere")
    return w
