"""Compiled backends of ``logdet_gram`` (exact, Fischer) and ``posterior_covariance``: "cpp"
(the host path of ``fastjac._C``, threads over the batch) and "cuda" (its kernels).

The per-matrix work (mask, Cholesky, log det, M⁻¹ and its trace) is csrc/fastjac/matrix.h,
one source for both. The two passes over J are where the time goes; on the host the Gram
JᵀWJ comes from the C++ symmetric kernel (the host twin of the CUDA Gram kernel) or from
torch's matmul (MKL), and the backward's J·Γ likewise, from ``HOST_MATMUL_MIN_D`` on, as
``benchmarks/extension_cpu.py`` measured faster. Validation stays in the public functions;
this module sees checked operands. Shapes as ``reference``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ... import _extension
from .. import _dispatch
from .._gram import accumulation_dtype
from . import COVARIANCE_OP, OP

if _extension.module is None:
    _dispatch.mark_unavailable("cuda", _extension.reason)
    raise ImportError(_extension.reason)
_C = _extension.module

HOST_MATMUL_MIN_D = 0  # from this d on, the host's passes over J use torch's matmul (on a quiet
                       # machine MKL's passes beat the C++ ones at every d measured, 8–256)
CUDA_MAX_D = 128      # one matrix per thread block: M must fit in shared memory


def _operands(J: Tensor, w: Optional[Tensor]):
    """J and w in the accumulation dtype the kernels compute in (a copy only for half inputs)."""
    acc = accumulation_dtype(J.dtype)
    return J.to(acc), (None if w is None else w.to(acc)), acc


def _host_gram(J: Tensor, w: Optional[Tensor], out: Tensor) -> None:
    torch.matmul(J.mT, J if w is None else J * w.unsqueeze(-1), out=out)


def forward(J: Tensor, w: Optional[Tensor], beta: Tensor, block_size: int):
    J, w, acc = _operands(J, w)
    B, D, d = J.shape
    L = J.new_empty(B, d, d)
    logdet = J.new_empty(B)
    beta = beta.to(acc).contiguous()
    on_host = J.device.type == "cpu"
    gram_here = on_host and d >= HOST_MATMUL_MIN_D
    if gram_here:
        _host_gram(J, w, L)
    failed = _C.factor(_extension.DTYPE_CODES[acc], _extension.target(J), B, D, d,
                       _extension.strided(None if gram_here else J),
                       _extension.strided(None if gram_here else w),
                       beta.data_ptr(), block_size, L.data_ptr(), logdet.data_ptr())
    if failed >= 0:
        raise ValueError(
            f"M = I + JᵀWJ/β is not numerically positive definite in {acc} at batch index {failed} "
            "(J is too large relative to beta); pass J in float64 or rescale")
    return logdet, L


def _inverse(L: Tensor, block_size: int, with_trace: bool):
    B, d, _ = L.shape
    L = L.contiguous()
    m_inv = torch.empty_like(L)
    trace = L.new_empty(B) if with_trace else None
    _C.inverse(_extension.DTYPE_CODES[L.dtype], _extension.target(L), B, d, block_size,
               L.data_ptr(), m_inv.data_ptr(), _extension.address(trace))
    return m_inv, trace


def _gram_pass(J: Tensor, w: Optional[Tensor], gamma: Tensor, scale: Optional[Tensor],
               need_J: bool, need_w: bool):
    """(2 W J Γ s, rowsum((J Γ s) ⊙ J)) per sample, either None when not needed."""
    B, D, d = J.shape
    if J.device.type == "cpu" and d >= HOST_MATMUL_MIN_D:
        if scale is not None:
            gamma = gamma * scale[:, None, None]
        JG = J @ gamma
        grad_w = (JG * J).sum(-1) if need_w else None
        grad_J = None
        if need_J:
            grad_J = JG.mul_(2) if w is None else JG.mul_(w.unsqueeze(-1) * 2)
        return grad_J, grad_w
    gamma = gamma.contiguous()
    grad_J = J.new_empty(B, D, d) if need_J else None
    grad_w = J.new_empty(B, D) if need_w else None
    _C.gram_pass(_extension.DTYPE_CODES[J.dtype], _extension.target(J), B, D, d,
                 _extension.strided(J), _extension.strided(w), gamma.data_ptr(),
                 _extension.address(scale), _extension.address(grad_J), _extension.address(grad_w))
    return grad_J, grad_w


def backward(J, w, beta, block_size, L, grad, needs_input_grad=(True, True, True)):
    """SPEC §3.1 from L: Γ = M⁻¹ grad_b/β, then one pass over J; ∂R/∂β = −Σ grad_b (d − tr M⁻¹)/β."""
    J, w, acc = _operands(J, w)
    d = J.shape[-1]
    beta = beta.to(acc)
    grad = grad.to(acc)
    m_inv, trace = _inverse(L.to(acc), block_size, with_trace=needs_input_grad[2])
    grad_J = grad_w = grad_beta = None
    need_w = w is not None and needs_input_grad[1]
    if needs_input_grad[0] or need_w:
        scale = (grad / beta).contiguous()
        grad_J, grad_w = _gram_pass(J, w, m_inv, scale, needs_input_grad[0], need_w)
    if needs_input_grad[2]:
        grad_beta = -(grad * (d - trace)).sum() / beta
    return grad_J, grad_w, grad_beta


def posterior_covariance(J: Tensor, w: Optional[Tensor], beta: Tensor) -> Tensor:
    """Σ* = M⁻¹ (Eq. 11), (B, d, d)."""
    d = J.shape[-1]
    _, L = forward(J, w, beta, d)
    return _inverse(L, d, with_trace=False)[0]


def posterior_covariance_backward(J, w, beta, sigma, grad, needs_input_grad=(True, True, True)):
    """dΣ = −Σ dM Σ: Γ = −Σ sym(grad) Σ/β (B·d³ in torch), one pass over J; ∂Σ/∂β = (Σ − Σ²)/β."""
    J, w, acc = _operands(J, w)
    beta = beta.to(acc)
    sigma = sigma.to(acc)
    grad = grad.to(acc)
    grad_J = grad_w = grad_beta = None
    need_w = w is not None and needs_input_grad[1]
    if needs_input_grad[0] or need_w:
        gamma = -(sigma @ ((grad + grad.mT) / 2) @ sigma) / beta
        grad_J, grad_w = _gram_pass(J, w, gamma, None, needs_input_grad[0], need_w)
    if needs_input_grad[2]:
        grad_beta = (grad * (sigma - sigma @ sigma)).sum() / beta
    return grad_J, grad_w, grad_beta


def host_supports(*, device_type, dtype, B=None, D=None, d=None, **_) -> Optional[str]:
    if device_type != "cpu":
        return f"the cpp backend runs on the CPU, not {device_type}"
    return None


def host_faster(*, dtype, d=None, **_) -> bool:
    """Where "auto" takes cpp over the torch reference: benchmarks/extension_cpu.py on a quiet
    2-core Xeon measured cpp 1.1–1.6× faster up to d = 64 (float32) and d = 128 (float64), and
    slower beyond (LAPACK's blocked Cholesky and inverse win at large d)."""
    return d is None or d <= (128 if dtype == torch.float64 else 64)


def cuda_supports(*, device_type, dtype, B=None, D=None, d=None, **_) -> Optional[str]:
    if device_type != "cuda":
        return f"the cuda backend runs on CUDA tensors, not {device_type}"
    if d is not None and d > CUDA_MAX_D:
        return f"d = {d} > {CUDA_MAX_D} does not fit one thread block's shared memory"
    return None


def _cuda_unavailable() -> Optional[str]:
    if not _C.has_cuda:
        return "fastjac._C was built without CUDA kernels (no nvcc at install time, or FASTJAC_CUDA=0)"
    if not torch.cuda.is_available():
        return "fastjac._C has CUDA kernels but torch sees no CUDA device"
    return None


_dispatch.register(OP, "cpp", _dispatch.Implementation(forward, backward, host_supports, host_faster))
_dispatch.register(COVARIANCE_OP, "cpp", _dispatch.Implementation(
    posterior_covariance, posterior_covariance_backward, host_supports, host_faster))
if _cuda_unavailable() is None:
    _dispatch.register(OP, "cuda", _dispatch.Implementation(forward, backward, cuda_supports))
    _dispatch.register(COVARIANCE_OP, "cuda", _dispatch.Implementation(
        posterior_covariance, posterior_covariance_backward, cuda_supports))
else:
    _dispatch.mark_unavailable("cuda", _cuda_unavailable())
