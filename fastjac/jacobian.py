"""Decoder Jacobian columns J e_j by forward-mode AD (SPEC §5).

One primal pass of the decoder carries k tangents at once (``torch.func.jvp`` under
``vmap`` over the tangents; the primal is not batched, so it is computed once). The
result is differentiable into z and the decoder's parameters (reverse over forward).
Reverse mode over the D outputs is never used.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor
from torch.func import jvp, vmap

from . import _validation as check

Selector = Union[None, str, int, Callable[[Any], Tensor]]


def select_output(result, output: Selector) -> Tensor:
    """The tensor the regulariser acts on, out of whatever the decoder returned."""
    if output is None:
        if isinstance(result, Tensor):
            return result
        raise TypeError(
            f"decoder returned {type(result).__name__}, not a Tensor; pass output= "
            "(a key, an index or a callable) to say which part is the reconstruction")
    if callable(output):
        selected = output(result)
    else:
        try:
            selected = result[output]
        except (KeyError, IndexError, TypeError):
            try:
                selected = getattr(result, output) if isinstance(output, str) else None
            except AttributeError:
                selected = None
            if selected is None:
                raise ValueError(f"output={output!r} selects nothing in the decoder's "
                                 f"{type(result).__name__} output") from None
    if not isinstance(selected, Tensor):
        raise TypeError(f"output={output!r} selected a {type(selected).__name__}, expected a Tensor")
    return selected


def column_directions(columns, directions, B: int, d: int, like: Tensor) -> Tensor:
    """The (B, d, k) tangent directions for ``columns`` / ``directions`` (see jacobian_columns)."""
    if columns is not None and directions is not None:
        raise ValueError("pass either columns or directions, not both")
    if directions is not None:
        check.tensor("directions", directions, ndim=3)
        if directions.shape[:2] != (B, d) or directions.shape[2] < 1:
            raise ValueError(f"directions must have shape (B, d, k) = ({B}, {d}, k >= 1), "
                             f"got {tuple(directions.shape)}")
        check.finite("directions", directions)
        return directions.to(like.dtype)
    eye = torch.eye(d, dtype=like.dtype, device=like.device)
    if columns is None:
        return eye.expand(B, d, d)
    if not isinstance(columns, Tensor) or columns.dtype not in (torch.int64, torch.int32):
        raise TypeError("columns must be a LongTensor of shape (k,) or (B, k)")
    if columns.dim() == 1:
        columns = columns.unsqueeze(0).expand(B, -1)
    if columns.dim() != 2 or columns.shape[0] != B or columns.shape[1] < 1:
        raise ValueError(f"columns must have shape (k,) or (B, k) with B = {B}, got {tuple(columns.shape)}")
    if check.values_checked() and not bool(((columns >= 0) & (columns < d)).all()):
        raise ValueError(f"columns must lie in [0, d) = [0, {d})")
    return eye[columns.to(like.device).long()].mT  # (B, d, k)


def jacobian_columns(decoder: Callable, z: Tensor, columns: Optional[Tensor] = None, *,
                     directions: Optional[Tensor] = None, chunk_size: Optional[int] = None,
                     output: Selector = None):
    """Decoder output and Jacobian columns, by forward mode in one primal pass.

    Args:
        decoder: any callable acting per sample, (B, d) -> (B, *out_shape) (or a tuple/dict/
            object holding it; see ``output``).
        z: (B, d) codes.
        columns: None (all d columns), a LongTensor (k,) shared by all samples, or (B, k) per sample.
        directions: arbitrary tangent directions (B, d, k) instead of columns: J @ directions.
        chunk_size: push at most this many tangents at once (bounds memory; same result).
        output: which part of the decoder's return value to use: a key, an index or a callable.
    Returns:
        (out, J): out = decoder(z) selected, (B, *out_shape); J (B, D, k), D = prod(out_shape).

    Example:
        >>> dec = torch.nn.Linear(3, 5)
        >>> out, J = jacobian_columns(dec, torch.randn(2, 3))
        >>> J.shape
        torch.Size([2, 5, 3])
    """
    if not callable(decoder):
        raise TypeError(f"decoder must be callable, got {type(decoder).__name__}")
    check.tensor("z", z, ndim=2)
    B, d = z.shape
    if B == 0 or d == 0:
        raise ValueError(f"z must be a non-empty (B, d) tensor, got shape {tuple(z.shape)}")
    check.finite("z", z)
    if chunk_size is not None:
        check.positive_int("chunk_size", chunk_size)
    tangents = column_directions(columns, directions, B, d, z).permute(2, 0, 1)  # (k, B, d)

    def decode(code):
        return select_output(decoder(code), output)

    def push(tangent):
        return jvp(decode, (z,), (tangent,))

    out, cols = vmap(push, out_dims=(None, 0), randomness="same", chunk_size=chunk_size)(tangents)
    if out.dim() < 1 or out.shape[0] != B:
        raise ValueError(f"decoder output must have batch size B = {B} first, got shape {tuple(out.shape)}")
    J = cols.reshape(cols.shape[0], B, -1).permute(1, 2, 0)
    return out, J
