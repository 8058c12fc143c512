"""Validation and normalisation of (J, β, weights) shared by the public operators."""
from __future__ import annotations

import torch

from .. import _validation as check
from ._gram import accumulation_dtype


def operands(J, beta, weights):
    """Checked (J, w, β): w is None or a (B, D) tensor; a scalar weight is folded into β
    (M = I + wG/β = I + G/(β/w)). β becomes a 0-d tensor in the accumulation dtype: a
    tensor β moves to J's device, a Python number stays a CPU scalar (no host->device copy
    per call; every backend reads it as a scalar)."""
    J = check.jacobian(J)
    beta = check.beta(beta)
    w = check.weights(weights, J)
    acc = accumulation_dtype(J.dtype)
    if isinstance(beta, torch.Tensor):
        beta = beta.to(device=J.device, dtype=acc)
    else:
        beta = torch.tensor(float(beta), dtype=acc)
    if isinstance(w, float) or (isinstance(w, torch.Tensor) and w.dim() == 0):
        beta = beta / (w.to(beta.device) if isinstance(w, torch.Tensor) else w)
        w = None
    return J, w, beta


def cast_grad(grad, like):
    """Gradients leave in the dtype (and device) of the input they belong to."""
    return None if grad is None or like is None else grad.to(dtype=like.dtype, device=like.device)
