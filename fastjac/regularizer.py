"""Former home of the regulariser; kept so that ``from fastjac.regularizer import ...`` still works.

Where things are now:
- the estimators (exact, Fischer, Hadamard, Frobenius, GRAE≈, Hutchinson–CG): :mod:`fastjac.estimators`
- ``jacobian_regularizer``, ``grae_loss`` and the term assembly: :mod:`fastjac.objectives`
- ``observation_weights``, ``weighted_dots``: :mod:`fastjac.observations`
"""
from __future__ import annotations

from . import _validation as check
from .estimators import (ESTIMATORS, REDUCTIONS, Estimate, Estimator, Settings, check_settings,
                         register_estimator)
from .objectives import Terms, _checked_grae_inputs, _grae_terms, jacobian_regularizer, reduce
from .observations import observation_weights, weighted_dots


def regularizer_terms(decoder, z, beta, *, x=None, settings: Settings, observation="gaussian") -> Terms:
    """Validate everything, run the estimator once, and return the per-sample terms."""
    with check.deferred():
        beta, obs = _checked_grae_inputs(decoder, z, beta, x, observation, settings)
        return _grae_terms(decoder, z, beta, obs, x, settings)


__all__ = ["ESTIMATORS", "REDUCTIONS", "Estimate", "Estimator", "Settings", "Terms", "check_settings",
           "jacobian_regularizer", "observation_weights", "reduce", "register_estimator",
           "regularizer_terms", "weighted_dots"]
