"""Memory-bounded Jacobians: all columns in chunks, each chunk's tangent graph recomputed in backward.

Exact R = log det M needs all d columns, but its backward needs only ∂R/∂J = (2/β) W J M⁻¹
(docs/maths.md#jacobian-columns). So the forward pushes the tangents a chunk at a time and keeps only the columns
J (B, D, d) — none of the decoder's tangent activations; ``logdet_gram`` factorises M once
and keeps L; in backward each chunk's JVPs are re-run with graph (non-reentrant activation
checkpointing) and (2/β) W J M⁻¹[:, c] flows through them, one chunk at a time. Peak memory
then follows the chunk size, not d, at the cost of one more decoder pass per chunk.

The decoder output is the first chunk's primal, so the reconstruction term, the weights
w(g(z)) and J all come from one and the same output (gradients through w flow into it).
Every chunk replays one random state, so dropout draws one mask for the primal and all
tangents, also when the chunks are recomputed. The recomputation runs the same code as the
forward (:func:`fastjac.jacobian.columns_along`), so the op rules of :mod:`fastjac._rules` and
the forward-AD lock are active then too.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from . import _validation as check
from .jacobian import Selector, checked_codes, column_directions, columns_along, jacobian_columns, prepared, random_state


def _chunk(decoder, z, directions, output):
    return columns_along(decoder, z, directions, output=output)


def columns(decoder: Callable, z: Tensor, *, chunk_size: Optional[int] = None,
            directions: Optional[Tensor] = None, output: Selector = None):
    """:func:`fastjac.jacobian_columns` when ``chunk_size`` is None, else the memory-bounded
    :func:`recomputed_columns`: the one switch the objectives use."""
    if chunk_size is None:
        return jacobian_columns(decoder, z, directions=directions, output=output)
    return recomputed_columns(decoder, z, chunk_size=chunk_size, directions=directions, output=output)


def recomputed_columns(decoder: Callable, z: Tensor, *, chunk_size: int,
                       directions: Optional[Tensor] = None, output: Selector = None):
    """Decoder output and J @ directions (all d columns by default), whose backward re-runs the
    decoder chunk by chunk instead of keeping every tangent's activations.

    Same values and gradients as :func:`fastjac.jacobian_columns`; the forward keeps z, the
    directions and J; backward holds one chunk's tangent graph at a time.

    Args:
        decoder: callable (B, *latent_shape) -> (B, *out_shape), acting per sample, however
            wrapped (prepared as in :func:`fastjac.jacobian_columns`).
        z: (B, *latent_shape) codes; d = prod(latent_shape).
        chunk_size: columns pushed (and later recomputed) per decoder call.
        directions: (B, d, k) tangent directions; None means the d unit columns.
        output: selector for tuple/dict outputs.
    Returns:
        (out (B, *out_shape), J (B, D, k)).

    Example:
        >>> dec = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.ELU(), torch.nn.Linear(64, 100))
        >>> out, J = recomputed_columns(dec, torch.randn(4, 8), chunk_size=2)
        >>> J.shape
        torch.Size([4, 100, 8])
    """
    decoder = prepared(decoder)
    with check.deferred():  # one host sync for all value checks (joins a caller's block)
        B, d = checked_codes(z)
        check.positive_int("chunk_size", chunk_size)
        directions = column_directions(None, directions, B, d, z)
        k = directions.shape[-1]
        replay = random_state(z.device)
        out, pieces = None, []
        for start in range(0, k, chunk_size):
            replay()  # checkpoint stores this state and restores it when it recomputes the chunk
            primal, J_c = checkpoint(_chunk, decoder, z, directions[..., start:start + chunk_size], output,
                                     use_reentrant=False, preserve_rng_state=True)
            out = primal if out is None else out
            pieces.append(J_c)
        return out, torch.cat(pieces, -1) if len(pieces) > 1 else pieces[0]
