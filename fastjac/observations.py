"""Observation models p(x | g): negative log-likelihood and weights w (SPEC §2).

w = −diag(∂² log p(x; g)/∂g²) ≥ 0 turns J into J_w = diag(√w) J. Constants of the NLL
are dropped, the same way in every objective, so objective values compare.
A custom model is any object with ``nll(out, x) -> (B,)`` and ``weights(out, x)``
(a number, or a tensor shaped like ``out``) and a boolean ``needs_x_for_weights``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def _per_sample(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1).sum(-1)


class Gaussian:
    """N(x; g, σ²I): NLL ½‖x − g‖²/σ², w = 1/σ²."""

    needs_x_for_weights = False

    def __init__(self, sigma: float = 1.0):
        if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")
        self.sigma = float(sigma)

    def nll(self, out: Tensor, x: Tensor) -> Tensor:
        return 0.5 * _per_sample((x - out) ** 2) / self.sigma ** 2

    def weights(self, out: Tensor, x=None) -> float:
        return 1.0 / self.sigma ** 2

    def __repr__(self):
        return f"Gaussian(sigma={self.sigma})"


class Bernoulli:
    """Bernoulli(x; g), g the probability: w = x/g² + (1−x)/(1−g)² (= 1/(1−x−g)² for binary x).

    g is clamped to [eps, 1 − eps] so neither the NLL nor w overflows.
    """

    needs_x_for_weights = True

    def __init__(self, eps: float = 1e-6):
        self.eps = float(eps)

    def _clamped(self, out):
        return out.clamp(self.eps, 1 - self.eps)

    def nll(self, out: Tensor, x: Tensor) -> Tensor:
        g = self._clamped(out)
        return -_per_sample(x * torch.log(g) + (1 - x) * torch.log1p(-g))

    def weights(self, out: Tensor, x: Tensor) -> Tensor:
        g = self._clamped(out)
        return x / g ** 2 + (1 - x) / (1 - g) ** 2

    def __repr__(self):
        return f"Bernoulli(eps={self.eps})"


class BernoulliLogits:
    """Bernoulli with logits g: NLL = BCE with logits, w = σ(g)(1 − σ(g))."""

    needs_x_for_weights = False

    def nll(self, out: Tensor, x: Tensor) -> Tensor:
        return _per_sample(F.binary_cross_entropy_with_logits(out, x, reduction="none"))

    def weights(self, out: Tensor, x=None) -> Tensor:
        p = torch.sigmoid(out)
        return p * (1 - p)

    def __repr__(self):
        return "BernoulliLogits()"


NAMES = {"gaussian": Gaussian, "bernoulli": Bernoulli, "bernoulli_logits": BernoulliLogits}


def get(observation):
    """An observation model from its name or a user object (checked for nll/weights)."""
    if isinstance(observation, str):
        if observation not in NAMES:
            raise ValueError(f"observation must be one of {', '.join(map(repr, NAMES))} or an object "
                             f"with nll() and weights(); got {observation!r}")
        return NAMES[observation]()
    missing = [m for m in ("nll", "weights") if not callable(getattr(observation, m, None))]
    if missing:
        raise TypeError(f"observation object {type(observation).__name__} lacks {', '.join(missing)}(); "
                        "a custom observation needs nll(out, x) and weights(out, x)")
    return observation
