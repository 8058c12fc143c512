"""Thin models over the functional objectives: :class:`BetaVAE` and :class:`GRAE`.

Both are ``nn.Module``s whose ``forward(x)`` returns per-sample loss terms (so that
DistributedDataParallel sees one forward call), with ``loss(x)``, ``reconstruct(x)``,
``sample(n)`` and ``objectives(x)``: the β-VAE (Eq. 2, Monte Carlo with a standard error),
Taylor (Eq. 7) and exact GRAE (Eq. 12) values of one batch, for the paper's Fig. 3.
A GRAE has no posterior of its own; its objectives use the posterior it implies,
N(h(x), M⁻¹) with M = I + J_wᵀJ_w/β (Eq. 11), at which Taylor = GRAE.
Decoder BatchNorm layers in training mode are handled by ``frozen_batch_statistics`` wherever
a Jacobian is taken, so every Jacobian is per sample.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor, nn

from .. import _validation as check
from .. import observations
from ..jacobian import jacobian_columns
from ..objectives import beta_vae_terms, grae_terms, taylor_beta_vae_loss
from ..ops import optimal_posterior_covariance
from ..regularizer import ESTIMATORS, observation_weights
from .batchnorm import frozen_batch_statistics
from .posterior import Posterior


class Objectives(NamedTuple):
    """Batch means of the three objectives (0-d tensors), for the same encoder and decoder."""
    beta_vae: Tensor         # E_q[−log p(x|g(z))] + β KL, Monte Carlo over num_samples draws
    beta_vae_stderr: Tensor  # standard error of that Monte Carlo estimate over the draws
    taylor: Tensor           # Eq. 7 with the same posterior
    grae: Tensor             # Eq. 12 with R = log det M at z = posterior mean


def _module(name: str, value) -> nn.Module:
    if not isinstance(value, nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module (its parameters are trained), "
                        f"got {type(value).__name__}")
    return value


class _Autoencoder(nn.Module):
    def __init__(self, encoder, decoder, beta, observation):
        super().__init__()
        self.encoder, self.decoder = _module("encoder", encoder), _module("decoder", decoder)
        self.beta = check.beta(beta)
        self.observation = observations.get(observation)

    # --- what each model defines
    def encode(self, x: Tensor) -> Tensor:
        """The code (B, d) that is decoded for a reconstruction."""
        raise NotImplementedError

    def posterior_of(self, x: Tensor) -> Posterior:
        raise NotImplementedError

    # --- shared
    def loss(self, x: Tensor, **options) -> Tensor:
        """The training objective averaged over the batch (a scalar); options go to forward."""
        return self(x, **options)["loss"].mean()

    def reconstruct(self, x: Tensor) -> Tensor:
        """g(code(x)), shaped like x."""
        return self.decoder(self.encode(x))

    def latent_dim_of(self) -> int:
        for part in (self.decoder, getattr(self, "posterior", None), self.encoder):
            if isinstance(getattr(part, "latent_dim", None), int):
                return part.latent_dim
        raise ValueError("cannot tell the latent dimension: give the decoder a `latent_dim` attribute "
                         "or pass latent_dim= to sample()")

    def sample(self, n: int, *, latent_dim: Optional[int] = None,
               generator: Optional[torch.Generator] = None) -> Tensor:
        """Decoder outputs of n prior draws z ~ N(0, I): (n, *data_shape)."""
        check.positive_int("n", n)
        d = self.latent_dim_of() if latent_dim is None else check.positive_int("latent_dim", latent_dim)
        param = next(self.decoder.parameters())
        device = generator.device if generator is not None else param.device
        z = torch.randn(n, d, generator=generator, device=device, dtype=param.dtype).to(param.device)
        return self.decoder(z)

    @torch.no_grad()
    def objectives(self, x: Tensor, *, num_samples: int = 16, batch_size: Optional[int] = None,
                   generator: Optional[torch.Generator] = None) -> Objectives:
        """β-VAE (± standard error over ``num_samples`` draws), Taylor and GRAE values of x.

        Args:
            x: (N, *data_shape) data; evaluated in chunks of ``batch_size`` (all at once by default).
            num_samples: S >= 2 reparameterised draws per point for the β-VAE expectation.
        Returns:
            :class:`Objectives` of 0-d tensors, means over the N points.

        Example:
            >>> o = model.eval().objectives(x_test, num_samples=16, batch_size=500)
            >>> float(o.taylor - o.grae)   # >= 0, zero iff the posterior is optimal
        """
        check.positive_int("num_samples", num_samples, minimum=2)
        if batch_size is not None:
            check.positive_int("batch_size", batch_size)
        beta, obs = self.beta, self.observation
        draws, taylor, grae = 0.0, 0.0, 0.0
        for chunk in torch.split(x, batch_size or len(x)):
            q = self.posterior_of(chunk)
            with frozen_batch_statistics(self.decoder, q.mean, update_running=False):
                t = beta_vae_terms(self.decoder, q.mean, q.scale_tril, chunk, beta, observation=obs,
                                   num_samples=num_samples, generator=generator)
                draws = draws + (t.reconstruction + beta * t.kl).sum(1)                 # (S,)
                taylor = taylor + taylor_beta_vae_loss(self.decoder, q.mean, q.scale_tril, chunk, beta,
                                                       observation=obs, reduction="sum")
                grae = grae + grae_terms(self.decoder, q.mean, chunk, beta, estimator="exact",
                                         observation=obs).total.sum()
        draws = draws / len(x)
        return Objectives(draws.mean(), draws.std() / math.sqrt(num_samples), taylor / len(x), grae / len(x))


class BetaVAE(_Autoencoder):
    """β-VAE (Eq. 2) with a Gaussian posterior N(μ, CCᵀ) and prior N(0, I).

    Args:
        encoder: x -> features for ``posterior``, or (without ``posterior``) x -> a
            :class:`Posterior` / (mean (B, d), scale_tril (B, d, d)) pair.
        decoder: z (B, d) -> (B, *data_shape).
        posterior: a head such as :class:`GaussianPosterior` (mean-field, block-diagonal or full),
            or None when the encoder already returns the posterior.
        beta: β > 0; observation: "gaussian" | "bernoulli" | "bernoulli_logits" | an object (docs/maths.md#observation-models).

    Example:
        >>> enc, dec = MLPEncoder((64,), hidden=(128,)), MLPDecoder(8, (64,), hidden=(128,))
        >>> vae = BetaVAE(enc, dec, posterior=GaussianPosterior(128, 8, block_size=2), beta=0.5)
        >>> vae.loss(torch.rand(16, 64)).backward()
    """

    def __init__(self, encoder: nn.Module, decoder: nn.Module, *, posterior: Optional[nn.Module] = None,
                 beta, observation="gaussian"):
        super().__init__(encoder, decoder, beta, observation)
        self.posterior = None if posterior is None else _module("posterior", posterior)

    def posterior_of(self, x: Tensor) -> Posterior:
        """q(z|x): Posterior(mean (B, d), scale_tril (B, d, d))."""
        h = self.encoder(x)
        q = h if self.posterior is None else self.posterior(h)
        if not (isinstance(q, tuple) and len(q) == 2):
            raise TypeError("the posterior (or an encoder without posterior=) must return "
                            f"(mean, scale_tril), got {type(q).__name__}")
        return Posterior(*q)

    def encode(self, x: Tensor) -> Tensor:
        return self.posterior_of(x).mean

    def forward(self, x: Tensor, *, num_samples: int = 1,
                generator: Optional[torch.Generator] = None) -> dict:
        """Per-sample terms (B,): loss, reconstruction (mean over draws) and kl."""
        q = self.posterior_of(x)
        t = beta_vae_terms(self.decoder, q.mean, q.scale_tril, x, self.beta, observation=self.observation,
                           num_samples=num_samples, generator=generator)
        return {"loss": t.per_sample, "reconstruction": t.reconstruction.mean(0), "kl": t.kl}


class GRAE(_Autoencoder):
    """GRAE (Eq. 12/13): −log p(x|g(h)) + (β/2)‖h‖² + (β/2) R(J_w) [+ λ·orthogonality].

    Args:
        encoder: x -> code h (B, d); decoder: z (B, d) -> (B, *data_shape).
        beta: β > 0.
        estimator: "exact" | "fischer" | "hadamard" | "frobenius" | "stochastic" (GRAE≈).
        num_columns: k columns (or blocks) per sample for "stochastic".
        block_size: block size for "fischer", "stochastic" and the orthogonality pairs.
        orthogonality_weight: λ >= 0 for the off-block orthogonality penalty.
        observation: as for :class:`BetaVAE`.

    Example:
        >>> enc = nn.Sequential(MLPEncoder((64,), hidden=(128,)), nn.Linear(128, 8))
        >>> grae = GRAE(enc, MLPDecoder(8, (64,), hidden=(128,)), beta=0.5, estimator="stochastic")
        >>> grae.loss(torch.rand(16, 64)).backward()
    """

    def __init__(self, encoder: nn.Module, decoder: nn.Module, *, beta, estimator: str = "exact",
                 num_columns: int = 1, block_size: int = 1, orthogonality_weight: float = 0.0,
                 observation="gaussian"):
        super().__init__(encoder, decoder, beta, observation)
        check.choice("estimator", estimator, ESTIMATORS)
        check.positive_int("num_columns", num_columns)
        check.positive_int("block_size", block_size)
        if not (isinstance(orthogonality_weight, (int, float)) and orthogonality_weight >= 0):
            raise ValueError(f"orthogonality_weight must be a number >= 0, got {orthogonality_weight!r}")
        self.estimator, self.num_columns, self.block_size = estimator, num_columns, block_size
        self.orthogonality_weight = float(orthogonality_weight)

    def encode(self, x: Tensor) -> Tensor:
        return self.encoder(x)

    def posterior_of(self, x: Tensor) -> Posterior:
        """The implied posterior N(h(x), M⁻¹), M = I + J_wᵀJ_w/β at h(x) (Eq. 11)."""
        h = self.encoder(x)
        with frozen_batch_statistics(self.decoder, h, update_running=False):
            out, J = jacobian_columns(self.decoder, h)
        w = observation_weights(self.observation, out, x)
        sigma = optimal_posterior_covariance(J, self.beta, weights=w)
        return Posterior(h, torch.linalg.cholesky(sigma))

    def forward(self, x: Tensor, *, generator: Optional[torch.Generator] = None) -> dict:
        """Per-sample terms (B,): loss, reconstruction, code, regularizer, orthogonality."""
        z = self.encoder(x)
        with frozen_batch_statistics(self.decoder, z, update_running=True):
            t = grae_terms(self.decoder, z, x, self.beta, estimator=self.estimator,
                           num_columns=self.num_columns, block_size=self.block_size,
                           observation=self.observation, orthogonality_weight=self.orthogonality_weight,
                           generator=generator)
        return {"loss": t.total, "reconstruction": t.reconstruction, "code": t.code,
                "regularizer": t.regularizer, "orthogonality": t.orthogonality}
