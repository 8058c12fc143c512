"""Observation models p(x | g): negative log-likelihood and weights w
(docs/maths.md#observation-models), and the two things every estimator does with them:
:func:`observation_weights` (w for J_w) and :func:`weighted_dots` (Σ_r w_r A_ri C_ri).

w = −diag(∂² log p(x; g)/∂g²) ≥ 0 turns J into J_w = diag(√w) J. Constants of the NLL
are dropped, the same way in every objective, so objective values compare.
A custom model is any object with ``nll(out, x) -> (B,)`` and ``weights(out, x)``
(a number, or a tensor shaped like ``out``) and a boolean ``needs_x_for_weights``; it may have
``check_data(x)`` to validate the data.

Weights and NLL are computed in float32 at least, from the decoder output, with autocast off:
a bf16 output's clamp 1 − ε would round to 1 and its weights overflow.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _validation as check
from .ops._gram import accumulation_dtype


def _per_sample(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1).sum(-1)


def _probabilities(observation: str, x: Tensor) -> None:
    if check.values_checked():
        check.condition("x", (x >= 0) & (x <= 1),
                        f"x must be in [0, 1] for observation={observation!r} (each entry is the "
                        "probability of a 1), but it has entries outside [0, 1]")


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

    check_data = staticmethod(lambda x: _probabilities("bernoulli", x))

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

    check_data = staticmethod(lambda x: _probabilities("bernoulli_logits", x))

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


def check_data(obs, x: Tensor) -> None:
    """The model's own check of the data (Bernoulli: x in [0, 1]), if it has one."""
    validate = getattr(obs, "check_data", None)
    if callable(validate):
        validate(x)


def matching_data(x: Tensor, out: Tensor) -> Tensor:
    """x reshaped like the decoder output ``out`` (flat or shaped x), or a ValueError saying both shapes."""
    if x.numel() != out.numel():
        raise ValueError(f"x must hold one target per decoder output: x has shape {tuple(x.shape)}, "
                         f"the decoder returned {tuple(out.shape)}")
    return x.reshape(out.shape).to(out.dtype)


def _full_precision(out: Tensor):
    """out in its accumulation dtype (float32 at least) and a context with autocast off."""
    device = out.device.type
    on = device in ("cpu", "cuda") and torch.is_autocast_enabled(device)
    off = torch.autocast(device, enabled=False) if on else nullcontext()  # building one costs ~50 µs
    return out.to(accumulation_dtype(out.dtype)), off


def observation_weights(obs, out: Tensor, x: Optional[Tensor]):
    """w for J_w: a number, or (B, D) matching the flattened output, in float32 at least
    (differentiable through out). x may be flat or shaped like out."""
    out, off = _full_precision(out)
    with off:
        w = obs.weights(out, None if x is None else matching_data(x, out))
    if isinstance(w, Tensor) and w.dim() > 0:
        return w.reshape(out.shape[0], -1)
    return w


def negative_log_likelihood(obs, out: Tensor, x: Tensor) -> Tensor:
    """−log p(x | out) per sample (B,), in float32 at least (a bf16 output's NLL sums in fp32)."""
    out, off = _full_precision(out)
    with off:
        return obs.nll(out, matching_data(x, out))


def weighted_dots(A: Tensor, C: Tensor, w) -> Tensor:
    """Σ_r w_r A_ri C_ri per column: (B, D, k), (B, D, k), w (number or (B, D)) -> (B, k),
    in the accumulation dtype (‖J_w e_i‖² for A = C = J)."""
    acc = accumulation_dtype(A.dtype)
    prod = A.to(acc) * C.to(acc)
    if not (isinstance(w, Tensor) and w.dim() == 2):
        return prod.sum(1) * w
    with _full_precision(prod)[1]:  # autocast would run this product in bf16/fp16
        return (w.to(acc).unsqueeze(1) @ prod).squeeze(1)
