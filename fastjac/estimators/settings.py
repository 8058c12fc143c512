"""What every estimator receives besides (decoder, z, β, observation, x), and the one place where
the public keyword options become :class:`Settings`.

The public functions (``jacobian_regularizer``, ``grae_loss``, ``grae_terms``,
``JacobianRegularizer``) take the same keyword options. They are written once, in
:data:`OPTION_DEFAULTS`; each function declares ``**options``, gets the full keyword
signature from :func:`with_options` (so ``help()`` and ``inspect.signature`` show every
option with its default) and turns what the caller passed into Settings with
:func:`settings_from`, which refuses unknown names like Python would.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field, fields
from typing import Any, Callable, NamedTuple, Optional

import torch
from torch import Tensor

from .. import _validation as check
from ..jacobian import Selector

REDUCTIONS = ("mean", "sum", "none")


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything an estimator may need besides (decoder, z, β, observation, x)."""
    estimator: str = "stochastic"
    num_columns: int = 1
    block_size: int = 1
    orthogonality_weight: float = 0.0
    generator: Optional[torch.Generator] = None
    chunk_size: Optional[int] = None
    output: Selector = None
    backend: str = "auto"
    num_probes: int = 1
    cg_max_iter: int = 100
    cg_tol: float = 1e-6
    extra: dict = field(default_factory=dict)


class Estimate(NamedTuple):
    out: Tensor                      # decoder output, (B, *out_shape)
    R: Tensor                        # regulariser R (B,), estimate of log det M or a bound
    orthogonality: Optional[Tensor]  # (B,) or None when not asked
    info: Optional[dict] = None      # estimator diagnostics (e.g. hutchinson_cg's CG iterations)


# decoder, z, β, observation model, x (or None), settings -> Estimate
Estimator = Callable[[Callable, Tensor, Any, Any, Optional[Tensor], Settings], Estimate]

_PUBLIC_ORDER = ("estimator", "num_columns", "block_size", "observation", "orthogonality_weight",
                 "reduction", "generator", "chunk_size", "output", "num_probes", "cg_max_iter",
                 "cg_tol", "backend")
_SETTINGS_DEFAULTS = {f.name: f.default for f in fields(Settings) if f.name != "extra"}
# The public keyword options and their defaults (jacobian_regularizer's), written once.
OPTION_DEFAULTS = {name: {**_SETTINGS_DEFAULTS, "observation": "gaussian", "reduction": "mean"}[name]
                   for name in _PUBLIC_ORDER}


def option_defaults(*, without: tuple = (), **changed) -> dict:
    """OPTION_DEFAULTS less ``without``, with some defaults ``changed`` (e.g. estimator="exact")."""
    table = {name: changed.get(name, default) for name, default in OPTION_DEFAULTS.items()
             if name not in without}
    unknown = sorted(set(changed) - set(table))
    if unknown:
        raise TypeError(f"not public options: {', '.join(unknown)}")
    return table


def with_options(defaults: dict):
    """Decorator: show ``defaults`` as keyword-only parameters in place of the function's ``**options``."""
    def wrap(fn):
        signature = inspect.signature(fn)
        params = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
        params += [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=value)
                   for name, value in defaults.items()]
        fn.__signature__ = signature.replace(parameters=params)
        return fn
    return wrap


class Options(NamedTuple):
    settings: Settings
    observation: Any
    reduction: Optional[str]  # None for functions without a reduction


def settings_from(options: dict, defaults: dict, function: str) -> Options:
    """The caller's keyword ``options`` over ``defaults``, as Settings (+ observation, reduction)."""
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise TypeError(f"{function}() got unexpected keyword argument(s) {', '.join(map(repr, unknown))}; "
                        f"its options are {', '.join(defaults)}")
    merged = {**defaults, **options}
    if "reduction" in merged:
        check.choice("reduction", merged["reduction"], REDUCTIONS)
    settings = Settings(**{name: merged[name] for name in _SETTINGS_DEFAULTS if name in merged})
    return Options(settings, merged["observation"], merged.get("reduction"))


def check_output(out: Tensor) -> None:
    """The decoder output is finite: checked before anything built on it, so a NaN decoder is named."""
    check.finite("decoder output", out, what="the decoder output g(z)")
