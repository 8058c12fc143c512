"""GRAE≈: the stochastic column estimator and the stochastic orthogonality penalty
(docs/maths.md#stochastic-column-estimators, #orthogonality-penalty).

Per sample, k = ``num_columns`` columns (``block_size`` 1) or k blocks of consecutive latents
are drawn uniformly, with replacement; only the drawn columns are computed (k·b tangents in
one decoder pass). With block size 1 the estimate (d/k) Σ log(1 + ‖J_w e_c‖²/β) is unbiased
for the Hadamard bound; with blocks, (blocks/k) Σ log det M_bb is unbiased for the Fischer
bound. With an orthogonality weight, one off-block pair per sample rides in the same pass
and cos² of that pair is unbiased for the mean over all off-block pairs.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from ..jacobian import columns_along, prepared
from ..observations import observation_weights
from ..ops import column_estimate, fischer_bound, orthogonality_penalty
from .settings import Estimate, Settings, check_output


def draw(high: int, shape, z: Tensor, generator) -> Tensor:
    """Independent uniform integers in [0, high) of ``shape``, on z's device (drawn on the generator's)."""
    device = generator.device if generator is not None else z.device
    return torch.randint(high, shape, generator=generator, device=device).to(z.device)


def _all_off_block_pairs(d: int, block_size: int, device: torch.device) -> Tensor:
    i, j = torch.triu_indices(d, d, offset=1, device=device)
    keep = (i // block_size) != (j // block_size)
    return torch.stack([i[keep], j[keep]], -1)


_cached_pairs = functools.lru_cache(maxsize=64)(_all_off_block_pairs)


def off_block_pairs(d: int, block_size: int, device) -> Tensor:
    """(pairs, 2) all column pairs i < j that lie in different blocks of ``block_size`` latents.
    Cached per (d, b, device) (the boolean mask would cost a host round-trip on every step),
    except while tracing or in inference mode, where a cached tensor could not be reused."""
    uncacheable = (torch.compiler.is_compiling() or torch._guards.detect_fake_mode() is not None
                   or torch.is_inference_mode_enabled())
    make = _all_off_block_pairs if uncacheable else _cached_pairs
    return make(d, block_size, torch.device(device))


def _unit_directions(cols: Tensor, d: int, like: Tensor, keep: Tensor | None = None) -> Tensor:
    """(B, n) column indices -> (B, d, n) unit directions e_cols (zero where ``keep`` is false):
    a view of an (n, B, d) tensor, the tangents' own layout, so no copy is made of it later."""
    B, n = cols.shape
    index = cols.t().unsqueeze(-1)
    ones = 1.0 if keep is None else keep.to(like.dtype).t().unsqueeze(-1)
    tangents = torch.zeros(n, B, d, dtype=like.dtype, device=like.device)
    return tangents.scatter_(2, index, ones).permute(1, 2, 0)


def _block_directions(blocks: Tensor, b: int, d: int, like: Tensor) -> Tensor:
    """(B, k) drawn block ids -> (B, d, k·b) unit directions of their columns (a short last block
    gets zero directions past d, which add log det 1 = 0)."""
    B, k = blocks.shape
    if b == 1:
        return _unit_directions(blocks, d, like)
    cols = (blocks.unsqueeze(-1) * b + torch.arange(b, device=blocks.device)).reshape(B, k * b)
    if d % b == 0:
        return _unit_directions(cols, d, like)
    return _unit_directions(cols.clamp_max(d - 1), d, like, keep=cols < d)


def _pair_directions(B: int, b: int, d: int, z: Tensor, generator) -> Tensor:
    """(B, d, 2): one off-block column pair per sample, drawn uniformly."""
    pairs = off_block_pairs(d, b, z.device)  # read-only: shared between calls
    if len(pairs) == 0:
        raise ValueError(f"orthogonality_weight > 0 needs two blocks: block_size {b} >= d = {d}")
    return _unit_directions(pairs[draw(len(pairs), (B,), z, generator)], d, z)


def _check_draws(k: int, b: int, d: int, blocks: int) -> None:
    if k > blocks:
        what, exact = ("columns d", "hadamard") if b == 1 else ("blocks", "fischer")
        raise ValueError(f"num_columns must be <= the number of {what} = {blocks} (d = {d}, block_size "
                         f"{b}), got {k}: draws are with replacement, so more draws cost more than "
                         f"estimator={exact!r}, which uses all of them exactly")


def stochastic(decoder, z, beta, obs, x, s: Settings) -> Estimate:
    """GRAE≈ (module docstring): k drawn columns or blocks per sample, one decoder pass."""
    B, d = z.shape[0], z[0].numel()
    b, k = min(s.block_size, d), s.num_columns
    blocks = -(-d // b)
    _check_draws(k, b, d, blocks)
    directions = _block_directions(draw(blocks, (B, k), z, s.generator), b, d, z)
    if s.orthogonality_weight != 0:
        directions = torch.cat([directions, _pair_directions(B, b, d, z, s.generator)], -1)
    # the engine's core: z, the settings and these directions are checked already
    out, J = columns_along(prepared(decoder), z, directions, chunk_size=s.chunk_size, output=s.output)
    check_output(out)
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
