"""The decoder term of GRAE alone: (β/2)·R(J_w) + λ·orthogonality (SPEC §3–4).

``jacobian_regularizer`` is what a user adds to *their* autoencoder's loss; ``grae_loss``
is built from the same :func:`regularizer_terms`, so the two never disagree.
Estimators are registered by name in ``ESTIMATORS``; each gets the decoder, z, β, the
observation model and the settings, runs the decoder once (with its tangents) and
returns the decoder output, R (B,) and the orthogonality penalty (B,) or None.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Optional

import torch
from torch import Tensor

from . import _validation as check
from . import observations
from ._decoders import estimator_precision
from .chunked import columns
from .jacobian import Selector, jacobian_columns
from .ops._gram import accumulation_dtype
from .ops import (column_estimate, fischer_bound, hadamard_bound, logdet_gram,
                  orthogonality_penalty)

REDUCTIONS = ("mean", "sum", "none")


@dataclass(frozen=True)
class Settings:
    """Everything an estimator may need besides (decoder, z, β, observation, x)."""
    estimator: str = "stochastic"
    num_columns: int = 1
    block_size: int = 1
    orthogonality_weight: float = 0.0
    generator: Optional[torch.Generator] = None
    chunk_size: Optional[int] = None
    output: Selector = None
    backend: str = "auto"
    num_probes: int = 1
    cg_max_iter: int = 100
    cg_tol: float = 1e-6
    extra: dict = field(default_factory=dict)


class Estimate(NamedTuple):
    out: Tensor                     # decoder output, (B, *out_shape)
    R: Tensor                       # regulariser R (B,), estimate of log det M or a bound
    orthogonality: Optional[Tensor]  # (B,) or None when not asked
    info: Optional[dict] = None      # estimator diagnostics (e.g. hutchinson_cg's CG iterations)


Estimator = Callable[[Callable, Tensor, Any, Any, Optional[Tensor], Settings], Estimate]
ESTIMATORS: dict[str, Estimator] = {}


def register_estimator(name: str):
    def wrap(fn: Estimator) -> Estimator:
        ESTIMATORS[name] = fn
        return fn
    return wrap


def observation_weights(obs, out: Tensor, x: Optional[Tensor]):
    """w for J_w: a number, or (B, D) matching the flattened output. x may be flat or shaped."""
    if x is not None and x.numel() == out.numel():
        x = x.reshape(out.shape).to(out.dtype)
    w = obs.weights(out, x)
    if isinstance(w, Tensor) and w.dim() > 0:
        return w.reshape(out.shape[0], -1)
    return w


def weighted_dots(A: Tensor, C: Tensor, w) -> Tensor:
    """Σ_r w_r A_ri C_ri per column: (B, D, k), (B, D, k), w (number or (B, D)) -> (B, k),
    in the accumulation dtype (‖J_w e_i‖² for A = C = J)."""
    acc = accumulation_dtype(A.dtype)
    prod = A.to(acc) * C.to(acc)
    if isinstance(w, Tensor) and w.dim() == 2:
        return (w.to(acc).unsqueeze(1) @ prod).squeeze(1)
    return prod.sum(1) * w


def _draw(high: int, shape, z: Tensor, generator) -> Tensor:
    device = generator.device if generator is not None else z.device
    return torch.randint(high, shape, generator=generator, device=device).to(z.device)


def _off_block_pairs(d: int, block_size: int, device) -> Tensor:
    i, j = torch.triu_indices(d, d, offset=1, device=device)
    keep = (i // block_size) != (j // block_size)
    return torch.stack([i[keep], j[keep]], -1)  # (pairs, 2)


def _ortho_from_full(J, w, s: Settings):
    if s.orthogonality_weight == 0:
        return None
    return orthogonality_penalty(J, block_size=s.block_size, weights=w, backend=s.backend)


def _full_jacobian(decoder, z, obs, x, s: Settings):
    out, J = columns(decoder, z, chunk_size=s.chunk_size, output=s.output)  # chunked: memory-bounded
    return out, J, observation_weights(obs, out, x)


@register_estimator("exact")
def _exact(decoder, z, beta, obs, x, s):
    out, J, w = _full_jacobian(decoder, z, obs, x, s)
    return Estimate(out, logdet_gram(J, beta, weights=w, backend=s.backend), _ortho_from_full(J, w, s))


@register_estimator("fischer")
def _fischer(decoder, z, beta, obs, x, s):
    out, J, w = _full_jacobian(decoder, z, obs, x, s)
    R = fischer_bound(J, beta, block_size=s.block_size, weights=w, backend=s.backend)
    return Estimate(out, R, _ortho_from_full(J, w, s))


@register_estimator("hadamard")
def _hadamard(decoder, z, beta, obs, x, s):
    out, J, w = _full_jacobian(decoder, z, obs, x, s)
    return Estimate(out, hadamard_bound(J, beta, weights=w, backend=s.backend), _ortho_from_full(J, w, s))


@register_estimator("frobenius")
def _frobenius(decoder, z, beta, obs, x, s):
    """First-order Taylor of log det M: tr(G)/β = ‖J_w‖_F²/β (so (β/2)R = ½‖J_w‖_F²)."""
    out, J, w = _full_jacobian(decoder, z, obs, x, s)
    R = weighted_dots(J, J, w).sum(-1) / beta
    return Estimate(out, R, _ortho_from_full(J, w, s))


@register_estimator("stochastic")
def _stochastic(decoder, z, beta, obs, x, s):
    """GRAE≈: k columns (block_size 1, unbiased for Hadamard) or k blocks (unbiased for
    Fischer) drawn uniformly per sample; only the drawn columns are computed. With an
    orthogonality weight, one off-block pair per sample rides in the same decoder pass."""
    B, d = z.shape
    b, k = min(s.block_size, d), s.num_columns
    blocks = -(-d // b)
    drawn = _draw(blocks, (B, k), z, s.generator)                               # (B, k) block ids
    cols = drawn.unsqueeze(-1) * b + torch.arange(b, device=z.device)           # (B, k, b)
    valid = cols < d                                                            # last block may be short
    eye = torch.eye(d, dtype=z.dtype, device=z.device)
    directions = (eye[cols.clamp_max(d - 1)] * valid.unsqueeze(-1)).reshape(B, k * b, d).mT
    if s.orthogonality_weight != 0:
        pairs = _off_block_pairs(d, b, z.device)
        if len(pairs) == 0:
            raise ValueError(f"orthogonality_weight > 0 needs two blocks: block_size {b} >= d = {d}")
        pair = pairs[_draw(len(pairs), (B,), z, s.generator)]                  # (B, 2)
        directions = torch.cat([directions, eye[pair].mT], -1)
    out, J = jacobian_columns(decoder, z, directions=directions, chunk_size=s.chunk_size, output=s.output)
    w = observation_weights(obs, out, x)
    J_drawn = J[..., : k * b]
    if b == 1:
        R = column_estimate(J_drawn, beta, probabilities=1.0 / d, weights=w, backend=s.backend)
    else:
        R = fischer_bound(J_drawn, beta, block_size=b, weights=w, backend=s.backend) * (blocks / k)
    ortho = None
    if s.orthogonality_weight != 0:
        ortho = orthogonality_penalty(J[..., k * b:], block_size=1, weights=w, backend=s.backend)
    return Estimate(out, R, ortho)


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


def check_settings(s: Settings) -> None:
    """Raise ValueError/TypeError naming the first invalid setting (no decoder call needed)."""
    check.choice("estimator", s.estimator, ESTIMATORS)
    check.positive_int("num_columns", s.num_columns)
    check.positive_int("block_size", s.block_size)
    if not (isinstance(s.orthogonality_weight, (int, float)) and s.orthogonality_weight >= 0):
        raise ValueError(f"orthogonality_weight must be a number >= 0, got {s.orthogonality_weight!r}")
    if s.chunk_size is not None:
        check.positive_int("chunk_size", s.chunk_size)


def regularizer_terms(decoder, z, beta, *, x=None, settings: Settings, observation="gaussian") -> Terms:
    """Validate everything, run the estimator once, and return the per-sample terms."""
    if not callable(decoder):
        raise TypeError(f"decoder must be callable, got {type(decoder).__name__}")
    check.tensor("z", z, ndim=2)
    check.finite("z", z)
    beta = check.beta(beta)
    s = settings
    check_settings(s)
    obs = observations.get(observation)
    if x is not None:
        check.tensor("x", x, ndim=range(1, 9))
        if x.shape[0] != z.shape[0]:
            raise ValueError(f"x and z must have the same batch size, got x {x.shape[0]} and z {z.shape[0]}")
        check.finite("x", x)
    elif getattr(obs, "needs_x_for_weights", False):
        raise ValueError(f"x is required for observation={observation!r}: its weights w depend on the "
                         "data (SPEC §2); pass x=<the batch being reconstructed>")
    with estimator_precision(decoder) as traceable:  # no DDP/compile wrapper; autocast only inside it
        est = ESTIMATORS[s.estimator](traceable, z, beta, obs, x, s)
    if x is not None and x.numel() != est.out.numel():
        raise ValueError(f"x must hold one target per decoder output: x has shape {tuple(x.shape)}, "
                         f"the decoder returned {tuple(est.out.shape)}")
    out = est.out.to(accumulation_dtype(est.out.dtype))  # a bf16/fp16 output's NLL sums in fp32
    recon = None if x is None else obs.nll(out, x.reshape(out.shape).to(out.dtype))
    half_beta = beta / 2
    code = half_beta * (z.to(est.R.dtype) ** 2).sum(-1)
    ortho = torch.zeros_like(est.R) if est.orthogonality is None else s.orthogonality_weight * est.orthogonality
    return Terms(est.out, recon, code, half_beta * est.R, ortho)


def jacobian_regularizer(decoder: Callable, z: Tensor, beta, *, x: Optional[Tensor] = None,
                         estimator: str = "stochastic", num_columns: int = 1, block_size: int = 1,
                         observation="gaussian", orthogonality_weight: float = 0.0,
                         reduction: str = "mean", generator: Optional[torch.Generator] = None,
                         chunk_size: Optional[int] = None, output: Selector = None,
                         num_probes: int = 1, cg_max_iter: int = 100, cg_tol: float = 1e-6,
                         backend: str = "auto") -> Tensor:
    """The implicit β-VAE regulariser alone: (β/2)·R(J_w) + λ·orthogonality, for any decoder.

    Add it to your own autoencoder's loss: ``loss = my_loss + jacobian_regularizer(dec, z, beta)``.

    Args:
        decoder: callable (B, d) -> (B, *out_shape) acting per sample. Extra inputs (a
            conditional decoder(z, y)): pass ``functools.partial(decoder, y=y)`` or a lambda.
            ``DistributedDataParallel``/``DataParallel``/``torch.compile`` wrappers are looked
            through (their forward cannot run under torch.func); DDP still all-reduces the
            gradients when its own forward ran in the same step (e.g. for the reconstruction).
            Under ``torch.autocast`` the decoder runs in reduced precision and the regulariser
            accumulates in float32.
        z: (B, d) codes, beta: β > 0.
        x: the data (B, *out_shape), needed only when w depends on it (``observation="bernoulli"``).
        estimator: "exact" (d JVPs), "fischer" (d), "hadamard" (d), "frobenius" (d),
            "stochastic" (k = num_columns JVPs, or k blocks of block_size), "hutchinson_cg"
            (CG iterations × num_probes JVP+VJP pairs); see the README's estimator table.
        output: which part of a tuple/dict/object output is the reconstruction: a key, an
            attribute name, an index or a callable.
        reduction: "mean" | "sum" | "none" over the batch.
    Returns:
        A scalar, or (B,) for reduction="none".

    Example:
        >>> dec = torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.Tanh(), torch.nn.Linear(32, 64))
        >>> z = torch.randn(8, 4)
        >>> jacobian_regularizer(dec, z, beta=0.5).shape
        torch.Size([])
    """
    check.choice("reduction", reduction, REDUCTIONS)
    s = Settings(estimator, num_columns, block_size, orthogonality_weight, generator, chunk_size,
                 output, backend, num_probes, cg_max_iter, cg_tol)
    t = regularizer_terms(decoder, z, beta, x=x, settings=s, observation=observation)
    return reduce(t.regularizer + t.orthogonality, reduction)
