"""Triton backend of ``column_estimate`` (GRAE≈ and the Hadamard bound).

Only the column norms n_i = Σ_r w_r J_ri² enter, so the forward is one pass over J with the
shared Gram kernel in its diagonal mode (split over D for small batches); the package turns
n into Σ_i s_i log1p(n_i/β) and Γ = diag(γ) by the reference formula, and the backward is the
shared one pass ``_triton.gram_backward`` with a diagonal Γ.
Maths: docs/maths.md#stochastic-column-estimators.
"""
from __future__ import annotations

from .. import _dispatch, _triton


def forward(J, w):
    """Column norms n (B, k) in fp32."""
    return _triton.gram(J, w, diagonal=True)


IMPLEMENTATIONS = {"triton": _dispatch.Implementation(
    forward=forward, gram_backward=_triton.gram_backward, supports=_triton.unsupported)}
