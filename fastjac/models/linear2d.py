"""The 2-D model of App. C: decoder x = ν(Az) + b, amortised encoder q(z|x) = N(Cx + d, Σ).

As in App. C, gradient descent never sees C or Σ directly: C = O₁C′ and
Σ = O₂ LLᵀ O₂ᵀ (full) with fixed random rotations O₁, O₂, so that no axis is preferred
by the parameterisation; for a diagonal Σ only its diagonal is learnt (Σ = diag(s)², no
rotation). Σ is shared by all x (it does not depend on x in App. C).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _validation as check
from .posterior import Posterior

ACTIVATIONS = {"identity": lambda t: t, "tanh": torch.tanh, "sigmoid": torch.sigmoid, "elu": F.elu}
COVARIANCES = ("diagonal", "full")


def random_rotation(n: int, *, generator: Optional[torch.Generator] = None, dtype=None) -> Tensor:
    """A Haar-random n×n rotation (det +1)."""
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    if torch.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q.to(dtype or torch.get_default_dtype())


class Linear2DDecoder(nn.Module):
    """g(z) = ν(Az) + b: z (B, d) -> (B, D); ν ∈ {identity, tanh, sigmoid, elu} elementwise.

    Example:
        >>> Linear2DDecoder(activation="tanh")(torch.randn(4, 2)).shape
        torch.Size([4, 2])
    """

    def __init__(self, latent_dim: int = 2, data_dim: int = 2, *, activation: str = "identity"):
        super().__init__()
        check.positive_int("latent_dim", latent_dim)
        check.positive_int("data_dim", data_dim)
        check.choice("activation", activation, ACTIVATIONS)
        self.latent_dim, self.data_shape, self.activation = latent_dim, (data_dim,), activation
        self.A = nn.Parameter(torch.randn(data_dim, latent_dim) / math.sqrt(latent_dim))
        self.b = nn.Parameter(torch.zeros(data_dim))

    def forward(self, z: Tensor) -> Tensor:
        return ACTIVATIONS[self.activation](z @ self.A.mT) + self.b


class LinearGaussianEncoder(nn.Module):
    """q(z|x) = N(O₁C′x + d, Σ): x (B, D) -> Posterior(mean (B, d), scale_tril (B, d, d)).

    Args:
        covariance: "diagonal" (mean-field, Σ = diag(s)²) or "full" (Σ = O₂LLᵀO₂ᵀ, L
            lower-triangular with a positive diagonal).
        rotate: use the fixed random rotations O₁, O₂ (App. C); False uses identities.
        generator: draws O₁, O₂ (and nothing else).

    Example:
        >>> q = LinearGaussianEncoder(2, 2, covariance="full")(torch.randn(5, 2))
        >>> q.scale_tril.shape
        torch.Size([5, 2, 2])
    """

    def __init__(self, data_dim: int = 2, latent_dim: int = 2, *, covariance: str = "diagonal",
                 rotate: bool = True, generator: Optional[torch.Generator] = None):
        super().__init__()
        check.positive_int("data_dim", data_dim)
        check.positive_int("latent_dim", latent_dim)
        check.choice("covariance", covariance, COVARIANCES)
        self.latent_dim, self.covariance_type = latent_dim, covariance
        eye = torch.eye(latent_dim)
        self.register_buffer("O1", random_rotation(latent_dim, generator=generator) if rotate else eye)
        self.register_buffer("O2", random_rotation(latent_dim, generator=generator) if rotate else eye)
        self.C = nn.Parameter(torch.randn(latent_dim, data_dim) / math.sqrt(data_dim))
        self.d = nn.Parameter(torch.zeros(latent_dim))
        self.log_scale = nn.Parameter(torch.full((latent_dim,), math.log(0.5)))
        self.L_lower = nn.Parameter(torch.zeros(latent_dim, latent_dim)) if covariance == "full" else None

    def scale_tril(self) -> Tensor:
        """The shared Cholesky factor of Σ, (d, d)."""
        L = torch.diag(self.log_scale.exp())
        if self.L_lower is None:
            return L
        L = L + torch.tril(self.L_lower, -1)
        sigma = self.O2 @ L @ L.mT @ self.O2.mT
        return torch.linalg.cholesky(0.5 * (sigma + sigma.mT))

    @torch.no_grad()
    def set_covariance(self, sigma: Tensor) -> None:
        """Set the parameters so that Σ = ``sigma`` ((d, d) SPD; diagonal for "diagonal")."""
        d = self.latent_dim
        check.tensor("sigma", sigma, ndim=2)
        if tuple(sigma.shape) != (d, d):
            raise ValueError(f"sigma must have shape ({d}, {d}), got {tuple(sigma.shape)}")
        if self.L_lower is None:
            if bool((sigma - torch.diag(sigma.diagonal())).abs().max() > 0):
                raise ValueError("sigma must be diagonal for covariance='diagonal'")
            self.log_scale.copy_(0.5 * sigma.diagonal().log())
            return
        O2 = self.O2.to(sigma)  # solve, not transpose: O₂ is orthogonal only to its dtype's rounding
        inner = torch.linalg.solve(O2, torch.linalg.solve(O2, sigma).mT).mT
        L = torch.linalg.cholesky(0.5 * (inner + inner.mT))
        self.log_scale.copy_(L.diagonal().log())
        self.L_lower.copy_(torch.tril(L, -1))

    def forward(self, x: Tensor) -> Posterior:
        x = x.reshape(x.shape[0], -1)
        mean = x @ (self.O1 @ self.C).mT + self.d
        return Posterior(mean, self.scale_tril().expand(x.shape[0], -1, -1))
