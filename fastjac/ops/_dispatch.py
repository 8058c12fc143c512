"""One dispatch point for every operator: which backend computes it.

Each operator package registers its backends explicitly: the torch one from its
``reference`` module, the optional ones through :func:`load_backends`, which imports a
backend module (``<package>.triton``, ``<package>.extension``) and registers the
:class:`Implementation` objects it lists in ``IMPLEMENTATIONS``. Backend modules never
import their package, so imports point one way. ``resolve`` turns a
user's ``backend=`` keyword into a concrete name. ``"auto"`` walks the device's
preference list and takes the first backend that is available and supports the
input (``supports`` returns ``None``, or a reason why not). A forced backend that
cannot run raises an error that says why.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

BACKENDS = ("torch", "triton", "cpp", "cuda")

# Preference for "auto", by device type. Each implementation's ``supports``
# encodes its measured range (e.g. the d above which cuSOLVER wins). The "cuda" extension
# backend is not in the CUDA list yet: its kernels have not run on a GPU (the Triton ones are
# tested under the interpreter); force it with backend="cuda" until a GPU run measures it.
AUTO_ORDER = {"cuda": ("triton", "torch"), "cpu": ("cpp", "torch")}


def _always(**_sizes) -> Optional[str]:
    return None


@dataclass(frozen=True)
class Implementation:
    """What a backend supplies for one operator package.

    ``forward`` is the backend's factorisation (its meaning is the package's: see each
    package's docstring); ``gram_backward(J, w, Γ, need_J, need_w)`` is the one pass over J
    that applies Γ = ∂R/∂G (``_gram.gram_backward`` is the reference); the Γ formulas
    themselves live once, in the package's ``reference``. ``backward`` is for operators
    that are not functions of the Gram matrix (``tangent_linear``).
    """
    forward: Callable
    backward: Optional[Callable] = None
    # supports(device_type=..., dtype=..., **sizes) -> None if it can run, else the reason
    supports: Callable[..., Optional[str]] = field(default=_always)
    # faster(**same) -> whether "auto" should take it over the ones after it (its measured range)
    faster: Callable[..., bool] = field(default=lambda **_sizes: True)
    gram_backward: Optional[Callable] = None


_IMPLEMENTATIONS: dict[str, dict[str, Implementation]] = {}
_UNAVAILABLE: dict[str, str] = {}


def _without_autocast(fn: Callable) -> Callable:
    """Run ``fn`` with autocast off: custom ops see the caller's autocast, which would cast the
    Gram matmuls down to bf16/fp16; every backend accumulates in float32 itself."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        enabled = [dev for dev in ("cpu", "cuda") if torch.is_autocast_enabled(dev)]
        if not enabled:
            return fn(*args, **kwargs)
        with contextlib.ExitStack() as stack:
            for dev in enabled:
                stack.enter_context(torch.autocast(dev, enabled=False))
            return fn(*args, **kwargs)
    return run


def register(op: str, backend: str, implementation: Implementation) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}")
    wrap = (lambda fn: None if fn is None else _without_autocast(fn))
    _IMPLEMENTATIONS.setdefault(op, {})[backend] = Implementation(
        wrap(implementation.forward), wrap(implementation.backward), implementation.supports,
        implementation.faster, wrap(implementation.gram_backward))


def mark_unavailable(backend: str, reason: str) -> None:
    """Record why a backend is missing (shown by ``fastjac.info()`` and in errors)."""
    _UNAVAILABLE.setdefault(backend, reason)


def load_backends(op: str, package: str, modules=("triton", "extension")) -> None:
    """Import an operator's optional backend modules (``<package>.triton``, ``.extension``)
    and register what each lists in ``IMPLEMENTATIONS`` (backend name -> Implementation).
    A module that cannot import records why."""
    import importlib

    for module in modules:
        backend = {"extension": "cpp"}.get(module, module)
        try:
            loaded = importlib.import_module(f"{package}.{module}")
        except ModuleNotFoundError as e:
            if e.name == f"{package}.{module}":
                continue  # this operator has no such backend
            mark_unavailable(backend, f"{e.name} is not installed")
            continue
        except ImportError as e:
            mark_unavailable(backend, str(e))
            continue
        for name, implementation in getattr(loaded, "IMPLEMENTATIONS", {}).items():
            register(op, name, implementation)


def availability() -> dict[str, Optional[str]]:
    """Backend name -> None when usable, else the reason it is not."""
    registered = {b for impls in _IMPLEMENTATIONS.values() for b in impls}
    out = {}
    for b in BACKENDS:
        if b in registered:
            out[b] = None
        else:
            out[b] = _UNAVAILABLE.get(b, "not implemented")
    return out


def operators() -> dict[str, tuple[str, ...]]:
    """Operator name -> backends registered for it."""
    return {op: tuple(impls) for op, impls in sorted(_IMPLEMENTATIONS.items())}


def resolve(op: str, backend: str, tensor: torch.Tensor, **sizes) -> str:
    """Concrete backend for ``op`` on ``tensor`` (device, dtype) with the given sizes."""
    impls = _IMPLEMENTATIONS[op]
    kw = dict(device_type=tensor.device.type, dtype=tensor.dtype, **sizes)
    if backend == "auto":
        for name in AUTO_ORDER.get(tensor.device.type, ()) + ("torch",):
            impl = impls.get(name)
            if impl is not None and impl.supports(**kw) is None and impl.faster(**kw):
                return name
        raise RuntimeError(f"no backend of {op} supports device {tensor.device}")  # torch always does
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {', '.join(map(repr, BACKENDS))}; got {backend!r}")
    impl = impls.get(backend)
    if impl is None:
        why = _UNAVAILABLE.get(backend, f"{op} has no {backend} implementation")
        raise RuntimeError(f"backend={backend!r} is not available for {op}: {why}")
    reason = impl.supports(**kw)
    if reason is not None:
        raise ValueError(f"backend={backend!r} cannot compute {op} here: {reason}")
    return backend


def implementation(op: str, backend: str) -> Implementation:
    return _IMPLEMENTATIONS[op][backend]
