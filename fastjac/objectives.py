"""The objectives (docs/maths.md#objectives), in minimisation form with one convention for constants.

GRAE (Eq. 12/13):      −log p(x | g(h)) + (β/2)‖h‖² + (β/2) R(J_w)
β-VAE (Eq. 2):         E_q[−log p(x | g(z))] + β KL(N(μ, CCᵀ) ‖ N(0, I))
Taylor β-VAE (Eq. 7):  −log p(x | g(μ)) + ½ tr(J_wᵀJ_w Σ) + β KL
so that Taylor(Σ) − GRAE = (β/2)[tr(MΣ) − log det(MΣ) − d] ≥ 0 for R = log det M
(docs/maths.md#the-taylor-gap). R is computed by one of :mod:`fastjac.estimators`
(GRAE≈ is :mod:`fastjac.estimators.stochastic`); this module checks the inputs once and
assembles the terms around it. ``jacobian_regularizer`` is the decoder term alone,
(β/2) R + λ·orthogonality, built from the same :func:`_grae_terms` as ``grae_loss``, so the
two never disagree.

Codes may have any shape (B, *latent_shape): J, the column draws, the posterior and the code
term are over the d = prod(latent_shape) flattened elements; the decoder receives z in its
own shape. Each public function runs its value checks in one deferred block (one host sync,
none with checks off; see :mod:`fastjac._validation`). Decoders are any callables; nothing
here knows our model classes.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor, nn

from . import _validation as check
from . import observations
from .chunked import columns
from .estimators import (ESTIMATORS, REDUCTIONS, Estimate, Settings, check_settings, option_defaults,
                         settings_from, with_options)
from .jacobian import Selector, select_output
from .observations import negative_log_likelihood, observation_weights, weighted_dots

# The keyword options of each public function: the same names, one default changed.
REGULARIZER_OPTIONS = option_defaults()
GRAE_OPTIONS = option_defaults(estimator="exact")
GRAE_TERMS_OPTIONS = option_defaults(estimator="exact", without=("reduction",))


class Terms(NamedTuple):
    """Per-sample (B,) terms of a GRAE-family objective, and the decoder output."""
    out: Tensor
    reconstruction: Optional[Tensor]  # −log p(x | g(z)), None when x was not given
    code: Tensor                      # (β/2)‖z‖²
    regularizer: Tensor               # (β/2) R
    orthogonality: Tensor             # λ · penalty (zeros when λ = 0)

    @property
    def total(self) -> Tensor:
        parts = self.code + self.regularizer + self.orthogonality
        return parts if self.reconstruction is None else self.reconstruction + parts


def reduce(values: Tensor, reduction: str) -> Tensor:
    check.choice("reduction", reduction, REDUCTIONS)
    if reduction == "mean":
        return values.mean()
    if reduction == "sum":
        return values.sum()
    return values


# ----------------------------------------------------------------------------- input checks
def _check_code(name: str, z) -> None:
    """z: (B, *latent_shape) floating, non-empty, finite."""
    check.tensor(name, z, ndim=range(2, 10))
    if z.shape[0] == 0 or z[0].numel() == 0:
        raise ValueError(f"{name} must be a non-empty (B, *latent_shape) tensor, got shape {tuple(z.shape)}")
    check.finite(name, z)


def _check_data(x, B: int, code: str, obs) -> None:
    check.tensor("x", x, ndim=range(1, 9))
    if x.shape[0] != B:
        raise ValueError(f"x and {code} must have the same batch size, got x {x.shape[0]} and {code} {B}")
    check.finite("x", x)
    observations.check_data(obs, x)


def _checked_grae_inputs(decoder, z, beta, x, observation, s: Settings):
    """Validate everything a GRAE-family call takes; returns (β, observation model)."""
    if not callable(decoder):
        raise TypeError(f"decoder must be callable, got {type(decoder).__name__}")
    _check_code("z", z)
    beta = check.beta(beta)
    check_settings(s)
    obs = observations.get(observation)
    if x is not None:
        _check_data(x, z.shape[0], "z", obs)
    elif getattr(obs, "needs_x_for_weights", False):
        raise ValueError(f"x is required for observation={observation!r}: its weights w depend on the "
                         "data (docs/maths.md#observation-models); pass x=<the batch being reconstructed>")
    return beta, obs


# ----------------------------------------------------------------------------- the GRAE core
def _parameter_dtype(decoder) -> Optional[torch.dtype]:
    """The dtype of the decoder's first floating parameter, looking through partials and wrappers."""
    for _ in range(8):
        if isinstance(decoder, nn.Module):
            p = next((p for p in decoder.parameters() if p.is_floating_point()), None)
            return None if p is None else p.dtype
        decoder = getattr(decoder, "func", None) or getattr(decoder, "__self__", None)
    return None


def _estimate(decoder, z: Tensor, beta, obs, x, s: Settings) -> Estimate:
    """Run the estimator once; a dtype clash between z and the decoder is explained. (The decoder
    is prepared — wrappers removed, op rules, autocast kept to it — by the Jacobian engine.)"""
    try:
        return ESTIMATORS[s.estimator](decoder, z, beta, obs, x, s)
    except RuntimeError as error:
        dtype = _parameter_dtype(decoder)
        if dtype is not None and dtype != z.dtype and "type" in str(error):
            raise ValueError(f"z has dtype {z.dtype} but the decoder's parameters are {dtype}: cast "
                             f"one to the other (z.to({dtype}) or decoder.to({z.dtype}))") from error
        raise


def _decoder_terms(est: Estimate, beta, s: Settings) -> tuple:
    """(β/2) R and λ · orthogonality penalty (None when not asked) of one estimate."""
    ortho = None if est.orthogonality is None else s.orthogonality_weight * est.orthogonality
    return beta / 2 * est.R, ortho


def _grae_terms(decoder, z: Tensor, beta, obs, x: Optional[Tensor], s: Settings) -> Terms:
    """The per-sample terms from checked inputs (the core of every GRAE-family function)."""
    est = _estimate(decoder, z, beta, obs, x, s)
    recon = None if x is None else negative_log_likelihood(obs, est.out, x)
    code = beta / 2 * (z.reshape(z.shape[0], -1).to(est.R.dtype) ** 2).sum(-1)
    regularizer, ortho = _decoder_terms(est, beta, s)
    return Terms(est.out, recon, code, regularizer, torch.zeros_like(regularizer) if ortho is None else ortho)


# ----------------------------------------------------------------------------- GRAE, public
@with_options(REGULARIZER_OPTIONS)
def jacobian_regularizer(decoder: Callable, z: Tensor, beta, *, x: Optional[Tensor] = None,
                         return_output: bool = False, **options):
    """The implicit β-VAE regulariser alone: (β/2)·R(J_w) + λ·orthogonality, for any decoder.

    Add it to your own autoencoder's loss: ``loss = my_loss + jacobian_regularizer(dec, z, beta)``,
    or take the decoder output from the same pass: ``reg, out = jacobian_regularizer(dec, z, beta,
    return_output=True)`` (one primal decoder pass for the reconstruction and the regulariser).

    Args:
        decoder: callable (B, *latent_shape) -> (B, *out_shape) acting per sample. Extra inputs (a
            conditional decoder(z, y)): pass ``functools.partial(decoder, y=y)`` or a lambda.
            ``DistributedDataParallel``/``DataParallel``/``torch.compile`` wrappers are looked
            through (their forward cannot run under torch.func); DDP still all-reduces the
            gradients when its own forward ran in the same step (e.g. for the reconstruction).
            Under ``torch.autocast`` the decoder runs in reduced precision and the regulariser
            (and the observation weights) accumulate in float32.
        z: (B, d) or (B, *latent_shape) codes (d = prod(latent_shape)), beta: β > 0.
        x: the data (B, *out_shape), needed only when w depends on it (``observation="bernoulli"``).
        return_output: also return the decoder output g(z) (B, *out_shape), differentiable.
        estimator: "exact" (d JVPs), "fischer" (d), "hadamard" (d), "frobenius" (d),
            "stochastic" (k = num_columns <= d JVPs, or k blocks of block_size), "hutchinson_cg"
            (CG iterations × num_probes JVP+VJP pairs); see the README's estimator table.
        output: which part of a tuple/dict/object output is the reconstruction: a key, an
            attribute name, an index or a callable.
        reduction: "mean" | "sum" | "none" over the batch.
        The other options are those of :func:`fastjac.grae_loss`.
    Returns:
        A scalar, or (B,) for reduction="none"; with ``return_output``, (that, decoder output).

    Example:
        >>> dec = torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.Tanh(), torch.nn.Linear(32, 64))
        >>> z = torch.randn(8, 4)
        >>> jacobian_regularizer(dec, z, beta=0.5).shape
        torch.Size([])
    """
    s, observation, reduction = settings_from(options, REGULARIZER_OPTIONS, "jacobian_regularizer")
    with check.deferred():
        beta, obs = _checked_grae_inputs(decoder, z, beta, x, observation, s)
        est = _estimate(decoder, z, beta, obs, x, s)  # x, if given, is matched to the output by w
        regularizer, ortho = _decoder_terms(est, beta, s)
        value = reduce(regularizer if ortho is None else regularizer + ortho, reduction)
    return (value, est.out) if return_output else value


@with_options(GRAE_TERMS_OPTIONS)
def grae_terms(decoder: Callable, z: Tensor, x: Tensor, beta, **options) -> Terms:
    """Per-sample terms of :func:`grae_loss` (reconstruction, code, regularizer, orthogonality)
    and the decoder output, from one decoder pass."""
    return _checked_grae_terms(decoder, z, x, beta, options, GRAE_TERMS_OPTIONS, "grae_terms")[0]


def _checked_grae_terms(decoder, z, x, beta, options, spec, name):
    """Validate once (one deferred check block), then the terms from one decoder pass;
    returns (Terms, reduction)."""
    if x is None:
        raise ValueError("x is required: grae_loss reconstructs x (use jacobian_regularizer for the "
                         "regulariser alone)")
    s, observation, reduction = settings_from(options, spec, name)
    with check.deferred():
        beta, obs = _checked_grae_inputs(decoder, z, beta, x, observation, s)
        return _grae_terms(decoder, z, beta, obs, x, s), reduction


@with_options(GRAE_OPTIONS)
def grae_loss(decoder: Callable, z: Tensor, x: Tensor, beta, **options) -> Tensor:
    """General GRAE (Eq. 12): −log p(x|g(z)) + (β/2)‖z‖² + (β/2)R(J_w) [+ λ·orthogonality].

    Args:
        decoder: callable (B, *latent_shape) -> (B, *out_shape), acting per sample.
        z: (B, d) or (B, *latent_shape) codes h(x) from your encoder; x: (B, *out_shape) the data.
        beta: β > 0 (number or 0-d tensor).
        estimator: "exact" | "fischer" | "hadamard" | "frobenius" | "stochastic" (GRAE≈) |
            "hutchinson_cg" (unbiased gradient of the exact R, cost independent of d);
            see :func:`fastjac.jacobian_regularizer` and the README's estimator table.
        num_probes, cg_max_iter, cg_tol: probes and conjugate-gradient limits of "hutchinson_cg".
        chunk_size: for "exact"/"fischer", columns are produced in chunks and recomputed in the
            backward, so memory follows the chunk, not d.
        num_columns: k columns (or blocks) drawn per sample by "stochastic" (at most d, or the
            number of blocks).
        block_size: posterior block size b for "fischer", "stochastic" and the orthogonality pairs.
        observation: "gaussian" | "bernoulli" | "bernoulli_logits" | an object
            (docs/maths.md#observation-models).
        orthogonality_weight: λ >= 0 of the orthogonality penalty (docs/maths.md#orthogonality-penalty).
        reduction: "mean" | "sum" | "none" over the batch.
        generator: torch.Generator for the stochastic draws.
        output: selector of the reconstruction in a tuple/dict/object decoder output.
        backend: "auto" | "torch" | "triton" | "cpp" | "cuda" for the operators.
    Returns:
        Scalar loss, or (B,) for reduction="none".

    Example:
        >>> enc, dec = torch.nn.Linear(64, 4), torch.nn.Linear(4, 64)
        >>> x = torch.randn(8, 64)
        >>> loss = grae_loss(dec, enc(x), x, beta=0.5, estimator="stochastic")
        >>> loss.backward()
    """
    terms, reduction = _checked_grae_terms(decoder, z, x, beta, options, GRAE_OPTIONS, "grae_loss")
    return reduce(terms.total, reduction)


# ----------------------------------------------------------------------------- β-VAE and Taylor
def _checked_posterior(mu, scale_tril, x, beta, observation):
    """Validate (μ (B, *latent_shape), C (B, d, d), x, β); returns (β, observation model)."""
    _check_code("mu", mu)
    check.tensor("scale_tril", scale_tril, ndim=3)
    B, d = mu.shape[0], mu[0].numel()
    if tuple(scale_tril.shape) != (B, d, d):
        raise ValueError(f"scale_tril must have shape (B, d, d) = ({B}, {d}, {d}) to match mu "
                         f"(d = prod(latent_shape)), got {tuple(scale_tril.shape)}")
    check.finite("scale_tril", scale_tril)
    if check.values_checked():
        check.condition("scale_tril", torch.triu(scale_tril, 1) == 0,
                        "scale_tril must be lower-triangular (its strict upper part is non-zero)")
        check.condition("scale_tril", scale_tril.diagonal(dim1=-2, dim2=-1) > 0,
                        "scale_tril must have a positive diagonal")
    beta = check.beta(beta)
    obs = observations.get(observation)
    _check_data(x, B, "mu", obs)
    return beta, obs


def gaussian_kl(mu: Tensor, scale_tril: Tensor) -> Tensor:
    """KL(N(μ, CCᵀ) ‖ N(0, I)) = ½(‖μ‖² + ‖C‖_F² − 2 Σ log C_ii − d): (B, *latent), (B, d, d) -> (B,)."""
    d = scale_tril.shape[-1]
    log_diag = scale_tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    mu2 = (mu.reshape(mu.shape[0], -1) ** 2).sum(-1)
    return 0.5 * (mu2 + (scale_tril ** 2).sum((-2, -1)) - 2 * log_diag - d)


class BetaVAETerms(NamedTuple):
    reconstruction: Tensor  # (S, B): −log p(x | g(z_s)) per reparameterised draw
    kl: Tensor              # (B,)
    beta: object

    @property
    def per_sample(self) -> Tensor:
        """(B,) the objective per data point (reconstruction averaged over draws)."""
        return self.reconstruction.mean(0) + self.beta * self.kl


def _beta_vae_terms(decoder, mu, scale_tril, x, beta, obs, num_samples, generator, output) -> BetaVAETerms:
    B, d = scale_tril.shape[:2]
    device = generator.device if generator is not None else mu.device
    eps = torch.randn((num_samples, B, d, 1), generator=generator, device=device, dtype=mu.dtype).to(mu.device)
    z = mu.reshape(B, d) + (scale_tril @ eps).squeeze(-1)                        # (S, B, d)
    out = select_output(decoder(z.reshape(num_samples * B, *mu.shape[1:])), output)
    xs = x.reshape(1, B, -1).expand(num_samples, B, -1).reshape(num_samples * B, -1)
    recon = negative_log_likelihood(obs, out, xs).reshape(num_samples, B)
    return BetaVAETerms(recon, gaussian_kl(mu, scale_tril), beta)


def beta_vae_terms(decoder: Callable, mu: Tensor, scale_tril: Tensor, x: Tensor, beta, *,
                   observation="gaussian", num_samples: int = 1,
                   generator: Optional[torch.Generator] = None, output: Selector = None) -> BetaVAETerms:
    """Per-draw reconstruction terms and KL of the β-VAE objective (one batched decoder call).
    mu may be (B, *latent_shape): the posterior is over its d flattened elements."""
    check.positive_int("num_samples", num_samples)
    with check.deferred():
        beta, obs = _checked_posterior(mu, scale_tril, x, beta, observation)
        return _beta_vae_terms(decoder, mu, scale_tril, x, beta, obs, num_samples, generator, output)


def beta_vae_loss(decoder: Callable, mu: Tensor, scale_tril: Tensor, x: Tensor, beta, *,
                  observation="gaussian", num_samples: int = 1, reduction: str = "mean",
                  generator: Optional[torch.Generator] = None, output: Selector = None) -> Tensor:
    """β-VAE objective (Eq. 2): E_q[−log p(x|g(z))] + β KL(q ‖ N(0, I)), q = N(μ, CCᵀ).

    Args:
        mu: (B, d) or (B, *latent_shape) posterior means; scale_tril: (B, d, d) lower-triangular C
            with positive diagonal (diagonal, block-diagonal or full) over the flattened latent;
            x: (B, *out_shape).
        num_samples: reparameterised draws z = μ + Cε per data point.
    Returns:
        Scalar, or (B,) for reduction="none".
    """
    check.choice("reduction", reduction, REDUCTIONS)
    check.positive_int("num_samples", num_samples)
    with check.deferred():
        beta, obs = _checked_posterior(mu, scale_tril, x, beta, observation)
        t = _beta_vae_terms(decoder, mu, scale_tril, x, beta, obs, num_samples, generator, output)
        return reduce(t.per_sample, reduction)


def taylor_beta_vae_loss(decoder: Callable, mu: Tensor, scale_tril: Tensor, x: Tensor, beta, *,
                         observation="gaussian", reduction: str = "mean",
                         chunk_size: Optional[int] = None, output: Selector = None) -> Tensor:
    """Taylor β-VAE (Eq. 7): −log p(x|g(μ)) + ½ tr(J_wᵀJ_w Σ) + β KL, Σ = CCᵀ.

    tr(J_wᵀJ_wΣ) = Σ_i ‖J_w C e_i‖²: d JVPs along C's columns, in the same pass as g(μ).
    With ``chunk_size``, the JVPs go in chunks whose graphs are recomputed in backward
    (memory follows the chunk, not d; see :mod:`fastjac.chunked`). mu may be (B, *latent_shape).
    """
    check.choice("reduction", reduction, REDUCTIONS)
    with check.deferred():
        beta, obs = _checked_posterior(mu, scale_tril, x, beta, observation)
        out, JC = columns(decoder, mu, directions=scale_tril, chunk_size=chunk_size, output=output)
        trace = weighted_dots(JC, JC, observation_weights(obs, out, x)).sum(-1)
        recon = negative_log_likelihood(obs, out, x)
        return reduce(recon + 0.5 * trace + beta * gaussian_kl(mu, scale_tril), reduction)
