"""The baselines: what a user writes by hand without fastjac, in plain PyTorch autograd.

Every benchmark times fastjac against these (and reports ratios to them); they are *not* the
reference implementation fastjac is tested against (that is ``fastjac.ops.<op>.reference``), only
the code fastjac has to beat. The tests check that they compute the same values.

Operators on J (B, D, k), β a number (half-precision J is cast to float32 first, as the
Cholesky factorisation needs):
    logdet_gram      Cholesky of I + JᵀJ/β through ``torch.linalg.cholesky_ex`` (autograd backward; the
                     ``_ex`` form, as a careful user writes it, does not wait for the device to check)
    hadamard_bound   Σ_j log1p(‖J e_j‖²/β)
    column_estimate  the same over the k drawn columns, scaled by d/k
    orthogonality    mean cos² over column pairs i < j
Decoder Jacobians (B, D, d), keys of :data:`JACOBIANS`:
    "vmap(jacfwd)"          ``vmap(jacfwd(per-sample decoder))``
    "functional.jacobian"   a Python loop of ``torch.autograd.functional.jacobian`` (reverse mode, D passes)
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.func import jacfwd, vmap

OPERATOR_LABEL = "autograd"   # the label of these operator baselines in every results table


def _working(J: Tensor) -> Tensor:
    return J.float() if J.dtype in (torch.float16, torch.bfloat16) else J


def logdet_gram(J: Tensor, beta: float) -> Tensor:
    J = _working(J)
    d = J.shape[-1]
    M = torch.eye(d, dtype=J.dtype, device=J.device) + torch.bmm(J.mT, J) / beta
    L = torch.linalg.cholesky_ex(M)[0]
    return 2 * L.diagonal(dim1=-2, dim2=-1).log().sum(-1)


def hadamard_bound(J: Tensor, beta: float) -> Tensor:
    J = _working(J)
    return torch.log1p((J * J).sum(1) / beta).sum(-1)


def column_estimate(J: Tensor, beta: float, *, latent_dim: int) -> Tensor:
    return hadamard_bound(J, beta) * (latent_dim / J.shape[-1])


def orthogonality(J: Tensor, eps: float = 1e-8) -> Tensor:
    J = _working(J)
    k = J.shape[-1]
    norms = J.norm(dim=1)
    cos = torch.bmm(J.mT, J) / (norms.unsqueeze(-1) * norms.unsqueeze(-2) + eps)
    upper = torch.triu(torch.ones(k, k, dtype=torch.bool, device=J.device), diagonal=1)
    return (cos[:, upper] ** 2).mean(-1)


OPERATORS = {"logdet_gram": logdet_gram, "hadamard_bound": hadamard_bound,
             "column_estimate": column_estimate, "orthogonality_penalty": orthogonality}


def _per_sample(decoder):
    return lambda z_i: decoder(z_i.unsqueeze(0)).reshape(-1)


def jacobian_vmap_jacfwd(decoder, z: Tensor) -> Tensor:
    """(B, D, d), differentiable into z and the decoder's parameters."""
    return vmap(jacfwd(_per_sample(decoder)))(z)


def jacobian_per_sample(decoder, z: Tensor, *, create_graph: bool = True) -> Tensor:
    """(B, D, d) by reverse mode, one sample at a time (``create_graph`` so training can use it)."""
    f = _per_sample(decoder)
    return torch.stack([torch.autograd.functional.jacobian(f, z_i, create_graph=create_graph) for z_i in z])


JACOBIANS = {"vmap(jacfwd)": jacobian_vmap_jacfwd, "functional.jacobian": jacobian_per_sample}
