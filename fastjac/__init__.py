"""fastjac: Jacobian-based autoencoder regularisers (Kumar & Poole, 2020), exact and fast.

    >>> from fastjac import grae_loss
    >>> loss = grae_loss(decoder, encoder(x), x, beta=0.5, estimator="stochastic")
"""
from ._validation import checks, set_checks
from .jacobian import jacobian_columns
from .objectives import (beta_vae_loss, beta_vae_terms, gaussian_kl, grae_loss, grae_terms,
                         taylor_beta_vae_loss)
from .observations import Bernoulli, BernoulliLogits, Gaussian
from .ops import (column_estimate, fischer_bound, hadamard_bound, logdet_gram,
                  optimal_posterior_covariance, orthogonality_penalty)
from .estimators import ESTIMATORS
from .objectives import jacobian_regularizer
from . import nn  # fastjac.nn.JacobianRegularizer and the fused tangent layers
from . import estimators, hutchinson  # noqa: F401 (fastjac.hutchinson: the old path of estimators.hutchinson)
from ._info import info

__version__ = "0.1.0"

__all__ = [
    "jacobian_columns", "logdet_gram", "fischer_bound", "hadamard_bound", "column_estimate",
    "orthogonality_penalty", "optimal_posterior_covariance", "grae_loss", "grae_terms",
    "jacobian_regularizer", "beta_vae_loss", "beta_vae_terms", "taylor_beta_vae_loss",
    "gaussian_kl", "Gaussian", "Bernoulli", "BernoulliLogits", "ESTIMATORS", "info",
    "set_checks", "checks",
]
