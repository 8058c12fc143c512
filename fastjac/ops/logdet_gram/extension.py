"""Compiled backends of ``logdet_gram`` (exact, Fischer; Σ* = its M⁻¹): "cpp" (the host path
of ``fastjac._C``, threads over the batch) and "cuda" (its kernels).

The per-matrix work (mask, Cholesky, log det, M⁻¹) is csrc/fastjac/matrix.h, one source for
host and device. The two passes over J are where the time goes: on the host they are torch's
matmul (MKL beat hand-written C++ passes at every d that ``benchmarks/extension_cpu.py``
measured, 8–256), so the host ``gram_backward`` is the reference one, in traceable torch
ops; on CUDA the Gram is fused into the factorisation kernel and the backward pass is the
``fastjac::cuda_gram_backward`` custom op (a fake tensor has no data pointer, so a raw
extension call could not be traced). Validation stays in the public functions; this module
sees checked operands. Shapes as ``reference``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ... import _extension
from .. import _dispatch, _gram

if _extension.module is None:
    _dispatch.mark_unavailable("cuda", _extension.reason)
    raise ImportError(_extension.reason)
_C = _extension.module

CUDA_MAX_D = 128      # one matrix per thread block: M must fit in shared memory


def _operands(J: Tensor, w: Optional[Tensor]):
    """J and w in the accumulation dtype the kernels compute in (a copy only for half inputs)."""
    acc = _gram.accumulation_dtype(J.dtype)
    return J.to(acc), (None if w is None else w.to(acc)), acc


def forward(J: Tensor, w: Optional[Tensor], beta: Tensor, block_size: int):
    """(log det M (B,), M⁻¹ (B, d, d), diag M (B, d)); a factorisation that fails leaves its
    log det NaN (the public functions' checks report it; nothing here syncs). diag M is kept by
    the factorisation before the Cholesky overwrites it: the error estimate reads no J."""
    J, w, acc = _operands(J, w)
    B, D, d = J.shape
    L = J.new_empty(B, d, d)
    logdet = J.new_empty(B)
    m_diag = J.new_empty(B, d)
    beta = beta.to(dtype=acc).contiguous()  # on the host (a number) or on J's device; never copied over
    on_host = J.device.type == "cpu"
    if on_host:  # the kernel factorises the Gram matrices it finds in L
        torch.matmul(J.mT, J if w is None else J * w.unsqueeze(-1), out=L)
    _C.factor(_extension.DTYPE_CODES[acc], _extension.target(J), B, D, d,
              _extension.strided(None if on_host else J), _extension.strided(None if on_host else w),
              beta.data_ptr(), beta.device.type == "cpu", block_size, L.data_ptr(), logdet.data_ptr(),
              m_diag.data_ptr())
    m_inv = torch.empty_like(L)
    _C.inverse(_extension.DTYPE_CODES[acc], _extension.target(L), B, d, block_size,
               L.data_ptr(), m_inv.data_ptr())
    return logdet, m_inv, m_diag


@torch.library.custom_op("fastjac::cuda_gram_backward", mutates_args=())
def _cuda_gram_backward(J: Tensor, w: Optional[Tensor], gamma: Tensor, need_J: bool,
                        need_w: bool) -> tuple[Tensor, Tensor]:
    """The CUDA kernel's (2 W J Γ, rowsum((J Γ) ⊙ J)); an unwanted result is an empty tensor."""
    J, w, acc = _operands(J, w)
    B, D, d = J.shape
    gamma = gamma.to(acc).contiguous()
    grad_J = J.new_empty(B, D, d) if need_J else J.new_empty(0)
    grad_w = J.new_empty(B, D) if need_w else J.new_empty(0)
    _C.gram_backward(_extension.DTYPE_CODES[acc], _extension.target(J), B, D, d,
                     _extension.strided(J), _extension.strided(w), gamma.data_ptr(),
                     grad_J.data_ptr() if need_J else 0, grad_w.data_ptr() if need_w else 0)
    return grad_J, grad_w


@_cuda_gram_backward.register_fake
def _(J, w, gamma, need_J, need_w):
    B, D, d = J.shape
    acc = _gram.accumulation_dtype(J.dtype)
    return (J.new_empty((B, D, d) if need_J else (0,), dtype=acc),
            J.new_empty((B, D) if need_w else (0,), dtype=acc))


def cuda_gram_backward(J: Tensor, w: Optional[Tensor], gamma: Tensor, need_J: bool = True,
                       need_w: bool = True, scale: Optional[Tensor] = None):
    """``_gram.gram_backward`` on the CUDA kernel (dense Γ; a diagonal Γ goes to the reference)."""
    need_w = need_w and w is not None
    if not (need_J or need_w) or gamma.dim() == 2:
        return _gram.gram_backward(J, w, gamma, need_J, need_w, scale)
    gamma = _gram.per_sample_scaled(gamma, scale)
    grad_J, grad_w = torch.ops.fastjac.cuda_gram_backward(J, w, gamma, need_J, need_w)
    return (grad_J if need_J else None), (grad_w if need_w else None)


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


IMPLEMENTATIONS = {"cpp": _dispatch.Implementation(forward, supports=host_supports, faster=host_faster,
                                                   gram_backward=_gram.gram_backward)}
if _cuda_unavailable() is None:
    IMPLEMENTATIONS["cuda"] = _dispatch.Implementation(forward, supports=cuda_supports,
                                                       gram_backward=cuda_gram_backward)
else:
    _dispatch.mark_unavailable("cuda", _cuda_unavailable())
