"""The objectives of SPEC §4, in minimisation form with one convention for constants.

GRAE (Eq. 12/13):      −log p(x | g(h)) + (β/2)‖h‖² + (β/2) R(J_w)
β-VAE (Eq. 2):         E_q[−log p(x | g(z))] + β KL(N(μ, CCᵀ) ‖ N(0, I))
Taylor β-VAE (Eq. 7):  −log p(x | g(μ)) + ½ tr(J_wᵀJ_w Σ) + β KL
so that Taylor(Σ) − GRAE = (β/2)[tr(MΣ) − log det(MΣ) − d] ≥ 0 for R = log det M.
Decoders are any callables; nothing here knows our model classes.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from . import _validation as check
from . import observations
from .chunked import columns
from .jacobian import Selector, select_output
from .regularizer import Settings, Terms, observation_weights, reduce, regularizer_terms, weighted_dots


def grae_terms(decoder: Callable, z: Tensor, x: Tensor, beta, *, estimator: str = "exact",
               num_columns: int = 1, block_size: int = 1, observation="gaussian",
               orthogonality_weight: float = 0.0, generator: Optional[torch.Generator] = None,
               chunk_size: Optional[int] = None, output: Selector = None, num_probes: int = 1,
               cg_max_iter: int = 100, cg_tol: float = 1e-6, backend: str = "auto") -> Terms:
    """Per-sample terms of :func:`grae_loss` (reconstruction, code, regularizer, orthogonality)."""
    if x is None:
        raise ValueError("x is required: grae_loss reconstructs x (use jacobian_regularizer for the "
                         "regulariser alone)")
    s = Settings(estimator, num_columns, block_size, orthogonality_weight, generator, chunk_size,
                 output, backend, num_probes, cg_max_iter, cg_tol)
    return regularizer_terms(decoder, z, beta, x=x, settings=s, observation=observation)


def grae_loss(decoder: Callable, z: Tensor, x: Tensor, beta, *, estimator: str = "exact",
              num_columns: int = 1, block_size: int = 1, observation="gaussian",
              orthogonality_weight: float = 0.0, reduction: str = "mean",
              generator: Optional[torch.Generator] = None, chunk_size: Optional[int] = None,
              output: Selector = None, num_probes: int = 1, cg_max_iter: int = 100,
              cg_tol: float = 1e-6, backend: str = "auto") -> Tensor:
    """General GRAE (Eq. 12): −log p(x|g(z)) + (β/2)‖z‖² + (β/2)R(J_w) [+ λ·orthogonality].

    Args:
        decoder: callable (B, d) -> (B, *out_shape), acting per sample.
        z: (B, d) codes h(x) from your encoder; x: (B, *out_shape) the data.
        beta: β > 0 (number or 0-d tensor).
        estimator: "exact" | "fischer" | "hadamard" | "frobenius" | "stochastic" (GRAE≈) |
            "hutchinson_cg" (unbiased gradient of the exact R, cost independent of d);
            see :func:`fastjac.jacobian_regularizer` and the README's estimator table.
        num_probes, cg_max_iter, cg_tol: probes and conjugate-gradient limits of "hutchinson_cg".
        chunk_size: for "exact"/"fischer", columns are produced in chunks and recomputed in the
            backward, so memory follows the chunk, not d.
        num_columns: k columns (or blocks) drawn per sample by "stochastic".
        block_size: posterior block size b for "fischer", "stochastic" and the orthogonality pairs.
        observation: "gaussian" | "bernoulli" | "bernoulli_logits" | an object (SPEC §2).
        reduction: "mean" | "sum" | "none" over the batch.
        generator: torch.Generator for the stochastic draws.
    Returns:
        Scalar loss, or (B,) for reduction="none".

    Example:
        >>> enc, dec = torch.nn.Linear(64, 4), torch.nn.Linear(4, 64)
        >>> x = torch.randn(8, 64)
        >>> loss = grae_loss(dec, enc(x), x, beta=0.5, estimator="stochastic")
        >>> loss.backward()
    """
    t = grae_terms(decoder, z, x, beta, estimator=estimator, num_columns=num_columns,
                   block_size=block_size, observation=observation,
                   orthogonality_weight=orthogonality_weight, generator=generator,
                   chunk_size=chunk_size, output=output, num_probes=num_probes,
                   cg_max_iter=cg_max_iter, cg_tol=cg_tol, backend=backend)
    return reduce(t.total, reduction)


def _posterior(mu, scale_tril):
    check.tensor("mu", mu, ndim=2)
    check.tensor("scale_tril", scale_tril, ndim=3)
    B, d = mu.shape
    if tuple(scale_tril.shape) != (B, d, d):
        raise ValueError(f"scale_tril must have shape (B, d, d) = ({B}, {d}, {d}) to match mu, "
                         f"got {tuple(scale_tril.shape)}")
    check.finite("mu", mu)
    check.finite("scale_tril", scale_tril)
    if check.values_checked():
        if bool((torch.triu(scale_tril, 1) != 0).any()):
            raise ValueError("scale_tril must be lower-triangular (its strict upper part is non-zero)")
        if not bool((scale_tril.diagonal(dim1=-2, dim2=-1) > 0).all()):
            raise ValueError("scale_tril must have a positive diagonal")


def _data(x, B):
    check.tensor("x", x, ndim=range(1, 9))
    if x.shape[0] != B:
        raise ValueError(f"x and mu must have the same batch size, got x {x.shape[0]} and mu {B}")
    check.finite("x", x)


def gaussian_kl(mu: Tensor, scale_tril: Tensor) -> Tensor:
    """KL(N(μ, CCᵀ) ‖ N(0, I)) = ½(‖μ‖² + ‖C‖_F² − 2 Σ log C_ii − d): (B, d), (B, d, d) -> (B,)."""
    d = mu.shape[-1]
    log_diag = scale_tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    return 0.5 * ((mu ** 2).sum(-1) + (scale_tril ** 2).sum((-2, -1)) - 2 * log_diag - d)


class BetaVAETerms(NamedTuple):
    reconstruction: Tensor  # (S, B): −log p(x | g(z_s)) per reparameterised draw
    kl: Tensor              # (B,)
    beta: object

    @property
    def per_sample(self) -> Tensor:
        """(B,) the objective per data point (reconstruction averaged over draws)."""
        return self.reconstruction.mean(0) + self.beta * self.kl


def beta_vae_terms(decoder: Callable, mu: Tensor, scale_tril: Tensor, x: Tensor, beta, *,
                   observation="gaussian", num_samples: int = 1,
                   generator: Optional[torch.Generator] = None, output: Selector = None) -> BetaVAETerms:
    """Per-draw reconstruction terms and KL of the β-VAE objective (one batched decoder call)."""
    _posterior(mu, scale_tril)
    beta = check.beta(beta)
    check.positive_int("num_samples", num_samples)
    B, d = mu.shape
    _data(x, B)
    obs = observations.get(observation)
    device = generator.device if generator is not None else mu.device
    eps = torch.randn((num_samples, B, d, 1), generator=generator, device=device, dtype=mu.dtype).to(mu.device)
    z = mu + (scale_tril @ eps).squeeze(-1)                                 # (S, B, d)
    out = select_output(decoder(z.reshape(num_samples * B, d)), output)
    xs = x.reshape(1, B, -1).expand(num_samples, B, -1).reshape(out.shape).to(out.dtype)
    recon = obs.nll(out, xs).reshape(num_samples, B)
    return BetaVAETerms(recon, gaussian_kl(mu, scale_tril), beta)


def beta_vae_loss(decoder: Callable, mu: Tensor, scale_tril: Tensor, x: Tensor, beta, *,
                  observation="gaussian", num_samples: int = 1, reduction: str = "mean",
                  generator: Optional[torch.Generator] = None, output: Selector = None) -> Tensor:
    """β-VAE objective (Eq. 2): E_q[−log p(x|g(z))] + β KL(q ‖ N(0, I)), q = N(μ, CCᵀ).

    Args:
        mu: (B, d) posterior means; scale_tril: (B, d, d) lower-triangular C with positive
            diagonal (diagonal, block-diagonal or full); x: (B, *out_shape).
        num_samples: reparameterised draws z = μ + Cε per data point.
    Returns:
        Scalar, or (B,) for reduction="none".
    """
    t = beta_vae_terms(decoder, mu, scale_tril, x, beta, observation=observation,
                       num_samples=num_samples, generator=generator, output=output)
    return reduce(t.per_sample, reduction)


def taylor_beta_vae_loss(decoder: Callable, mu: Tensor, scale_tril: Tensor, x: Tensor, beta, *,
                         observation="gaussian", reduction: str = "mean",
                         chunk_size: Optional[int] = None, output: Selector = None) -> Tensor:
    """Taylor β-VAE (Eq. 7): −log p(x|g(μ)) + ½ tr(J_wᵀJ_w Σ) + β KL, Σ = CCᵀ.

    tr(J_wᵀJ_wΣ) = Σ_i ‖J_w C e_i‖²: d JVPs along C's columns, in the same pass as g(μ).
    With ``chunk_size``, the JVPs go in chunks whose graphs are recomputed in backward
    (memory follows the chunk, not d; see :mod:`fastjac.chunked`).
    """
    _posterior(mu, scale_tril)
    beta = check.beta(beta)
    B, d = mu.shape
    _data(x, B)
    obs = observations.get(observation)
    out, JC = columns(decoder, mu, directions=scale_tril, chunk_size=chunk_size, output=output)
    if x.numel() != out.numel():
        raise ValueError(f"x has shape {tuple(x.shape)} but the decoder returned {tuple(out.shape)}")
    trace = weighted_dots(JC, JC, observation_weights(obs, out, x)).sum(-1)
    recon = obs.nll(out, x.reshape(out.shape).to(out.dtype))
    return reduce(recon + 0.5 * trace + beta * gaussian_kl(mu, scale_tril), reduction)
