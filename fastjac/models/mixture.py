"""An ex-post density on the codes: a Gaussian mixture fitted to an autoencoder's training codes.

A deterministic autoencoder (GRAE, an RAE) has no prior that its codes follow, and a β-VAE's
aggregate posterior need not match N(0, I); sampling g(z) with z from a density fitted to the
codes h(x) of the training data is the usual remedy (Ghosh et al. 2020, "From variational to
deterministic autoencoders"). :class:`GaussianMixture` is that density: k components with full
covariances, fitted by expectation-maximisation in float64.

    >>> codes = model.encode(x_train)                       # (N, d)
    >>> density = GaussianMixture.fit(codes, components=10)
    >>> images = model.decoder(density.sample(64).float())
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor


def _check_points(z: Tensor, name: str, dim: Optional[int] = None) -> Tensor:
    if not isinstance(z, Tensor) or z.dim() != 2 or z.shape[0] < 1:
        raise ValueError(f"{name} must be a tensor of shape (N, d) with N >= 1, got "
                         f"{tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__}")
    if dim is not None and z.shape[1] != dim:
        raise ValueError(f"{name} must have shape (N, {dim}), got {tuple(z.shape)}")
    if not torch.isfinite(z).all():
        raise ValueError(f"{name} holds NaN or infinite values")
    return z.detach().to(torch.float64)


def _component_log_densities(z: Tensor, means: Tensor, scale_trils: Tensor) -> Tensor:
    """log N(z_n; m_k, L_k L_kᵀ) for every point and component: (N, d) -> (N, k)."""
    diff = (z.unsqueeze(1) - means).unsqueeze(-1)                             # (N, k, d, 1)
    white = torch.linalg.solve_triangular(scale_trils, diff, upper=False).squeeze(-1)
    log_det = scale_trils.diagonal(dim1=-2, dim2=-1).log().sum(-1)           # ½ log det Σ_k
    d = z.shape[1]
    return -0.5 * (white ** 2).sum(-1) - log_det - 0.5 * d * math.log(2 * math.pi)


class GaussianMixture:
    """Σ_k w_k N(m_k, C_k) on R^d, float64.

    Args:
        weights: (k,) positive, summing to 1.
        means: (k, d).
        covariances: (k, d, d) symmetric positive definite.
    """

    def __init__(self, weights: Tensor, means: Tensor, covariances: Tensor):
        weights, means, covariances = (torch.as_tensor(t, dtype=torch.float64)
                                       for t in (weights, means, covariances))
        if means.dim() != 2 or weights.shape != means.shape[:1] or \
                covariances.shape != (*means.shape, means.shape[1]):
            raise ValueError("need weights of shape (k,), means (k, d) and covariances (k, d, d); got "
                             f"{tuple(weights.shape)}, {tuple(means.shape)}, {tuple(covariances.shape)}")
        if not (weights > 0).all() or abs(float(weights.sum()) - 1) > 1e-6:
            raise ValueError(f"weights must be positive and sum to 1, got {weights.tolist()}")
        scale_trils, info = torch.linalg.cholesky_ex(covariances)
        if (info != 0).any() or not torch.isfinite(means).all():
            raise ValueError("covariances must be symmetric positive definite and means finite")
        self.weights, self.means, self.covariances = weights, means, covariances
        self.scale_trils = scale_trils

    @property
    def components(self) -> int:
        return self.weights.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def log_prob(self, z: Tensor) -> Tensor:
        """log density at each row of z: (N, d) -> (N,), float64."""
        z = _check_points(z, "z", self.dim)
        return torch.logsumexp(self._joint(z), dim=1)

    def _joint(self, z: Tensor) -> Tensor:
        return self.weights.log() + _component_log_densities(z, self.means, self.scale_trils)

    def sample(self, n: int, *, generator: Optional[torch.Generator] = None) -> Tensor:
        """n draws, (n, d) float64: a component by its weight, then its Gaussian."""
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        eps = torch.randn(n, self.dim, 1, generator=generator, dtype=torch.float64)
        return self.means[k] + (self.scale_trils[k] @ eps).squeeze(-1)

    def mean(self) -> Tensor:
        """The mixture's mean, (d,)."""
        return self.weights @ self.means

    def covariance(self) -> Tensor:
        """The mixture's covariance, (d, d): Σ_k w_k (C_k + m_k m_kᵀ) − m mᵀ."""
        m = self.mean()
        second = (self.weights[:, None, None] * (self.covariances + self.means.unsqueeze(-1)
                                                  * self.means.unsqueeze(-2))).sum(0)
        return second - torch.outer(m, m)

    @classmethod
    def fit(cls, codes: Tensor, components: int, *, iterations: int = 300, tolerance: float = 1e-7,
            regularisation: float = 1e-6, seed: int = 0) -> "GaussianMixture":
        """Maximum-likelihood mixture by EM from a k-means++ start.

        Args:
            codes: (N, d) training codes, N >= components.
            components: k >= 1.
            tolerance: stop once the mean log-likelihood per point rises by less than this.
            regularisation: added to every covariance's diagonal, times the codes' mean variance
                (keeps a component on a few points positive definite).
        """
        z = _check_points(codes, "codes")
        if not isinstance(components, int) or not 1 <= components <= z.shape[0]:
            raise ValueError(f"components must be an int in [1, {z.shape[0]}] (the number of codes), "
                             f"got {components!r}")
        if iterations < 1 or not regularisation >= 0:
            raise ValueError("iterations must be >= 1 and regularisation >= 0")
        ridge = regularisation * float(z.var(0, unbiased=False).mean().clamp_min(1e-12))
        resp = _kmeanspp_responsibilities(z, components, torch.Generator().manual_seed(seed))
        mixture, previous = None, -math.inf
        for _ in range(iterations):
            mixture = _maximisation(z, resp, ridge)
            joint = mixture._joint(z)
            log_likelihood = float(torch.logsumexp(joint, 1).mean())
            resp = torch.softmax(joint, dim=1)
            if log_likelihood - previous < tolerance:
                break
            previous = log_likelihood
        return mixture


def _kmeanspp_responsibilities(z: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """Hard assignments to k centres chosen by k-means++ seeding, as one-hot (N, k)."""
    centres = [z[torch.randint(z.shape[0], (1,), generator=generator)].squeeze(0)]
    for _ in range(1, k):
        d2 = torch.cdist(z, torch.stack(centres)).min(1).values ** 2
        p = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1.0 / len(d2))
        centres.append(z[torch.multinomial(p, 1, generator=generator)].squeeze(0))
    nearest = torch.cdist(z, torch.stack(centres)).argmin(1)
    return torch.nn.functional.one_hot(nearest, k).to(z.dtype)


def _maximisation(z: Tensor, resp: Tensor, ridge: float) -> GaussianMixture:
    """Weights, means and covariances maximising the expected log-likelihood under ``resp``."""
    counts = resp.sum(0) + 10 * torch.finfo(z.dtype).eps                      # an empty component
    means = (resp.T @ z) / counts[:, None]
    diff = z.unsqueeze(1) - means                                             # (N, k, d)
    cov = torch.einsum("nk,nki,nkj->kij", resp, diff, diff) / counts[:, None, None]
    cov = 0.5 * (cov + cov.mT) + (ridge + 1e-12) * torch.eye(z.shape[1], dtype=z.dtype)
    return GaussianMixture(counts / counts.sum(), means, cov)



@torch.no_grad()
def code_density(model, images: Tensor, components: int, *, batch_size: int = 500,
                 seed: int = 0) -> GaussianMixture:
    """The mixture fitted to ``model.encode`` of the training images (any fastjac autoencoder,
    or anything with ``encode(x) -> (B, d)``)."""
    codes = torch.cat([model.encode(chunk).reshape(len(chunk), -1) for chunk in torch.split(images, batch_size)])
    return GaussianMixture.fit(codes, components, seed=seed)


@torch.no_grad()
def sample_images(model, density: GaussianMixture, n: int, *,
                  generator: Optional[torch.Generator] = None) -> Tensor:
    """``model.decoder`` of n codes drawn from ``density``: the ex-post counterpart of
    ``model.sample`` (which draws the codes from the prior N(0, I))."""
    param = next(model.decoder.parameters())
    return model.decoder(density.sample(n, generator=generator).to(param.device, param.dtype))


__all__ = ["GaussianMixture", "code_density", "sample_images"]
