"""Estimators from all d Jacobian columns: exact log det M, the Fischer and Hadamard bounds and
the first-order (Frobenius) term (docs/maths.md#operators, #bounds-and-identities,
#first-order-and-hutchinson-estimators).

Each runs the decoder once with d tangents (or in chunks, ``chunk_size``, recomputed in
backward: memory follows the chunk, not d) and hands J to one operator of :mod:`fastjac.ops`.
With an orthogonality weight the exact penalty over all off-block pairs comes from the same J.
"""
from __future__ import annotations

from .. import _validation as check
from ..chunked import columns
from ..observations import observation_weights, weighted_dots
from ..ops import fischer_bound, hadamard_bound, logdet_gram, orthogonality_penalty
from .settings import Estimate, Settings, check_output


def _all_columns(decoder, z, obs, x, s: Settings):
    out, J = columns(decoder, z, chunk_size=s.chunk_size, output=s.output)  # chunked: memory-bounded
    check_output(out)
    return out, J, observation_weights(obs, out, x)


def _orthogonality(J, w, s: Settings):
    if s.orthogonality_weight == 0:
        return None
    return orthogonality_penalty(J, block_size=s.block_size, weights=w, backend=s.backend)


def exact(decoder, z, beta, obs, x, s: Settings) -> Estimate:
    """R = log det(I + J_wᵀJ_w/β), the exact GRAE regulariser."""
    out, J, w = _all_columns(decoder, z, obs, x, s)
    return Estimate(out, logdet_gram(J, beta, weights=w, backend=s.backend), _orthogonality(J, w, s))


def fischer(decoder, z, beta, obs, x, s: Settings) -> Estimate:
    """R = Σ_blocks log det M_bb over blocks of ``block_size`` latents (an upper bound of exact)."""
    out, J, w = _all_columns(decoder, z, obs, x, s)
    R = fischer_bound(J, beta, block_size=s.block_size, weights=w, backend=s.backend)
    return Estimate(out, R, _orthogonality(J, w, s))


def hadamard(decoder, z, beta, obs, x, s: Settings) -> Estimate:
    """R = Σ_j log(1 + ‖J_w e_j‖²/β) (Eq. 14), the bound GRAE≈ estimates from k columns."""
    out, J, w = _all_columns(decoder, z, obs, x, s)
    return Estimate(out, hadamard_bound(J, beta, weights=w, backend=s.backend), _orthogonality(J, w, s))


def frobenius(decoder, z, beta, obs, x, s: Settings) -> Estimate:
    """First-order Taylor of log det M: tr(G)/β = ‖J_w‖_F²/β (so (β/2)R = ½‖J_w‖_F²)."""
    out, J, w = _all_columns(decoder, z, obs, x, s)
    check.finite("J", J, what="the decoder's Jacobian columns J")
    R = weighted_dots(J, J, w).sum(-1) / beta
    return Estimate(out, R, _orthogonality(J, w, s))
