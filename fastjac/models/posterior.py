"""Gaussian posteriors q(z|x) = N(μ, CCᵀ) with block-diagonal Cholesky factors (docs/maths.md#objectives).

Block size b groups consecutive latents: b = 1 is mean-field, b = d is a full covariance,
anything between is the block-diagonal family of the paper's Fig. 2/3 (the last block may
be shorter when b does not divide d). C is lower-triangular with a positive diagonal.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _validation as check
from ..objectives import gaussian_kl


class Posterior(NamedTuple):
    """N(mean, scale_tril scale_trilᵀ) per data point: mean (B, d), scale_tril (B, d, d)."""
    mean: Tensor
    scale_tril: Tensor

    @property
    def covariance(self) -> Tensor:
        """Σ = CCᵀ, (B, d, d)."""
        return self.scale_tril @ self.scale_tril.mT

    def kl(self) -> Tensor:
        """KL(q ‖ N(0, I)), (B,)."""
        return gaussian_kl(self.mean, self.scale_tril)

    def log_prob(self, z: Tensor) -> Tensor:
        """log q(z), z (..., B, d) -> (..., B)."""
        diff = (z - self.mean).unsqueeze(-1)
        white = torch.linalg.solve_triangular(self.scale_tril.expand(*diff.shape[:-2], -1, -1), diff,
                                              upper=False).squeeze(-1)
        half_logdet = self.scale_tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        d = self.mean.shape[-1]
        return -0.5 * (white ** 2).sum(-1) - half_logdet - 0.5 * d * math.log(2 * math.pi)

    def rsample(self, num_samples: int = 1, *, generator: Optional[torch.Generator] = None) -> Tensor:
        """Reparameterised draws z = μ + Cε, (num_samples, B, d)."""
        device = generator.device if generator is not None else self.mean.device
        eps = torch.randn((num_samples, *self.mean.shape, 1), generator=generator, device=device,
                          dtype=self.mean.dtype).to(self.mean.device)
        return self.mean + (self.scale_tril @ eps).squeeze(-1)


def block_mask(latent_dim: int, block_size: int, *, device=None) -> Tensor:
    """(d, d) bool: True where two latents lie in the same block of consecutive latents."""
    block = torch.arange(latent_dim, device=device) // block_size
    return block[:, None] == block[None, :]


def _tril_positions(latent_dim: int, block_size: int):
    """Row/column indices of C's free entries (lower triangle inside each block)."""
    rows, cols = torch.tril_indices(latent_dim, latent_dim)
    keep = (rows // block_size) == (cols // block_size)
    return rows[keep], cols[keep]


class GaussianPosterior(nn.Module):
    """Posterior head: features (B, F) -> Posterior(mean (B, d), scale_tril (B, d, d)).

    One linear layer gives μ, another the free entries of the block-diagonal Cholesky
    factor C; its diagonal passes through softplus (+ ``min_scale``) so it stays positive.

    Args:
        in_features: F; latent_dim: d.
        block_size: b in [1, d]: 1 mean-field, d full, otherwise block-diagonal.
        min_scale: lower bound of C's diagonal (keeps log det Σ finite).

    Example:
        >>> head = GaussianPosterior(32, 12, block_size=3)
        >>> q = head(torch.randn(5, 32))
        >>> q.mean.shape, q.scale_tril.shape
        (torch.Size([5, 12]), torch.Size([5, 12, 12]))
    """

    def __init__(self, in_features: int, latent_dim: int, *, block_size: int = 1, min_scale: float = 1e-4):
        super().__init__()
        check.positive_int("in_features", in_features)
        check.positive_int("latent_dim", latent_dim)
        check.positive_int("block_size", block_size)
        if block_size > latent_dim:
            raise ValueError(f"block_size must lie in [1, latent_dim] = [1, {latent_dim}], got {block_size}")
        if not (isinstance(min_scale, (int, float)) and min_scale >= 0):
            raise ValueError(f"min_scale must be a number >= 0, got {min_scale!r}")
        self.latent_dim, self.block_size, self.min_scale = latent_dim, block_size, float(min_scale)
        rows, cols = _tril_positions(latent_dim, block_size)
        self.register_buffer("_flat_index", rows * latent_dim + cols, persistent=False)
        self.register_buffer("_on_diagonal", rows == cols, persistent=False)
        self.mean = nn.Linear(in_features, latent_dim)
        self.cholesky = nn.Linear(in_features, len(rows))
        with torch.no_grad():  # start near unit posterior scale: softplus(0.5413) = 1
            self.cholesky.weight.mul_(0.1)
            self.cholesky.bias.copy_(torch.where(self._on_diagonal, 0.5413, 0.0))

    def forward(self, features: Tensor) -> Posterior:
        raw = self.cholesky(features)
        entries = torch.where(self._on_diagonal, F.softplus(raw) + self.min_scale, raw)
        B, d = features.shape[0], self.latent_dim
        index = self._flat_index.expand(B, -1)
        scale_tril = entries.new_zeros(B, d * d).scatter(1, index, entries).reshape(B, d, d)
        return Posterior(self.mean(features), scale_tril)

    def extra_repr(self) -> str:
        return f"latent_dim={self.latent_dim}, block_size={self.block_size}"
