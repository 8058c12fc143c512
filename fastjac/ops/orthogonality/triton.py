"""Triton backend of ``orthogonality_penalty``.

The shared Gram kernel gives C = J_wᵀJ_w (norms and dot products, one pass over J); the
package forms the penalty and Γ = ∂P/∂C from C by the reference formula (a (B, k, k)
epilogue), and the shared one pass ``_triton.gram_backward`` writes ∂P/∂J = 2 W J Γ and
∂P/∂w. Maths: docs/maths.md#orthogonality-penalty.
"""
from __future__ import annotations

from .. import _dispatch, _triton


def forward(J, w):
    """The full symmetric C = J_wᵀJ_w (B, k, k) in fp32."""
    return _triton.gram(J, w)


IMPLEMENTATIONS = {"triton": _dispatch.Implementation(
    forward=forward, gram_backward=_triton.gram_backward, supports=_triton.unsupported)}
