"""The estimators by name. Registration is explicit: this table is the whole list (no import side
effects); :func:`register_estimator` adds one of your own."""
from __future__ import annotations

from typing import Optional

from .. import _validation as check
from . import full, hutchinson, stochastic
from .settings import Estimator, Settings

ESTIMATORS: dict[str, Estimator] = {
    "exact": full.exact,
    "fischer": full.fischer,
    "hadamard": full.hadamard,
    "frobenius": full.frobenius,
    "stochastic": stochastic.stochastic,
    "hutchinson_cg": hutchinson.hutchinson_cg,
}


def register_estimator(name: str, estimator: Optional[Estimator] = None):
    """Add ``estimator`` (decoder, z, β, observation, x, Settings) -> Estimate under ``name``;
    without ``estimator``, a decorator that does so."""
    if estimator is None:
        return lambda fn: register_estimator(name, fn)
    if not callable(estimator):
        raise TypeError(f"estimator must be callable, got {type(estimator).__name__}")
    ESTIMATORS[name] = estimator
    return estimator


def check_settings(s: Settings) -> None:
    """Raise ValueError/TypeError naming the first invalid setting (no decoder call needed)."""
    check.choice("estimator", s.estimator, ESTIMATORS)
    check.positive_int("num_columns", s.num_columns)
    check.positive_int("block_size", s.block_size)
    weight = s.orthogonality_weight
    if isinstance(weight, bool) or not (isinstance(weight, (int, float)) and weight >= 0):
        raise ValueError(f"orthogonality_weight must be a number >= 0, got {weight!r}")
    if s.chunk_size is not None:
        check.positive_int("chunk_size", s.chunk_size)
