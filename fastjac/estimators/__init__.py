"""The estimators of R(J_w), one module per family, registered by name in :data:`ESTIMATORS`.

| estimator | where | what it computes |
|---|---|---|
| ``exact``, ``fischer``, ``hadamard``, ``frobenius`` | :mod:`.full` | from all d Jacobian columns |
| ``stochastic`` (GRAE≈) | :mod:`.stochastic` | k drawn columns or blocks; orthogonality pairs |
| ``hutchinson_cg`` | :mod:`.hutchinson` | CG + Lanczos, no columns formed |

Each is a function (decoder, z, β, observation, x, :class:`Settings`) -> :class:`Estimate` that
runs the decoder once with its tangents; the objectives (:mod:`fastjac.objectives`) validate the
inputs and assemble the loss terms around it.
"""
from .registry import ESTIMATORS, check_settings, register_estimator
from .settings import (OPTION_DEFAULTS, REDUCTIONS, Estimate, Estimator, Options, Settings,
                       option_defaults, settings_from, with_options)

__all__ = ["ESTIMATORS", "register_estimator", "check_settings", "Settings", "Estimate", "Estimator",
           "Options", "OPTION_DEFAULTS", "REDUCTIONS", "option_defaults", "settings_from", "with_options"]
