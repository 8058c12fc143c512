"""Triton backend of ``tangent_linear``: one kernel for the primal and all k tangents.

Forward: program (row block, column block) computes the pre-activation tile a = h Wᵀ + b,
writes σ(a) and a, keeps σ′(a) in registers and then runs the same tile of the matmul for
each tangent, T_i Wᵀ, writing σ′(a) ⊙ T_i Wᵀ — the matmul over [h; T_1 … T_k] with an epilogue
that differs for primal and tangent rows, so σ′ is never stored or re-read.
Backward: one kernel forms ḡa = ḡy ⊙ σ′(a) + σ″(a) ⊙ Σ_i ḡU_i ⊙ (T_i Wᵀ) (recomputing T_i Wᵀ
tile by tile; skipped for identity/ReLU where σ″ = 0) and ḡV_i = ḡU_i ⊙ σ′(a); the three
products with W, h and T are then plain GEMMs (cuBLAS). The in-kernel products run on tensor
cores (``_triton.mma``: 16-bit natively, float32 as 3xTF32). Offsets are int64 (k·N·OUT may
pass 2³¹). Shapes as ``reference``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dataclasses import dataclass

from .. import _dispatch, _triton

CODES = {"identity": 0, "relu": 1, "elu": 2, "tanh": 3, "sigmoid": 4, "softplus": 5}


@triton.jit
def _derivatives(a, ACT: tl.constexpr):
    """(σ(a), σ′(a), σ″(a)) for the activation code ACT (see CODES)."""
    zero = tl.zeros_like(a)
    if ACT == 0:
        return a, zero + 1, zero
    elif ACT == 1:
        pos = a > 0
        return tl.where(pos, a, zero), tl.where(pos, zero + 1, zero), zero
    elif ACT == 2:
        e = tl.exp(tl.minimum(a, zero))
        pos = a > 0
        return tl.where(pos, a, e - 1), tl.where(pos, zero + 1, e), tl.where(pos, zero, e)
    elif ACT == 3:
        t = 2 * tl.sigmoid(2 * a) - 1
        s1 = 1 - t * t
        return t, s1, -2 * t * s1
    elif ACT == 4:
        s = tl.sigmoid(a)
        s1 = s * (1 - s)
        return s, s1, s1 * (1 - 2 * s)
    else:
        s = tl.sigmoid(a)
        return tl.maximum(a, zero) + tl.log(1 + tl.exp(-tl.abs(a))), s, s * (1 - s)


@triton.jit
def _times_wt(x, W, rn, ro, N, IN, OUT,
              MODE: tl.constexpr, BI: tl.constexpr, BN: tl.constexpr, BO: tl.constexpr):
    """Tile (rn, ro) of x Wᵀ in fp32; x (N, IN) and W (OUT, IN) contiguous, rn and ro int64."""
    acc = tl.zeros((BN, BO), dtype=tl.float32)
    for i0 in range(0, IN, BI):
        ri = i0 + tl.arange(0, BI)
        xa = tl.load(x + rn[:, None] * IN + ri[None, :], mask=(rn[:, None] < N) & (ri[None, :] < IN), other=0.0)
        wb = tl.load(W + ro[None, :] * IN + ri[:, None], mask=(ro[None, :] < OUT) & (ri[:, None] < IN), other=0.0)
        acc = _triton.mma(xa, wb, acc, MODE)
    return acc


@triton.jit
def _forward_kernel(h, T, W, bias, y, U, A, N, IN, OUT, K,
                    HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
                    MODE: tl.constexpr, BN: tl.constexpr, BO: tl.constexpr, BI: tl.constexpr):
    rn = tl.program_id(0).to(tl.int64) * BN + tl.arange(0, BN)
    ro = tl.program_id(1).to(tl.int64) * BO + tl.arange(0, BO)
    mask = (rn[:, None] < N) & (ro[None, :] < OUT)
    tile = rn[:, None] * OUT + ro[None, :]
    a = _times_wt(h, W, rn, ro, N, IN, OUT, MODE, BI, BN, BO)
    if HAS_BIAS:
        a += tl.load(bias + ro, mask=ro < OUT, other=0.0).to(tl.float32)[None, :]
    value, s1, _s2 = _derivatives(a, ACT)
    tl.store(y + tile, value, mask=mask)
    tl.store(A + tile, a, mask=mask)
    for t in range(K):  # tangent rows: same tile of the matmul, σ′(a) ⊙ epilogue
        v = _times_wt(T + tl.cast(t, tl.int64) * N * IN, W, rn, ro, N, IN, OUT, MODE, BI, BN, BO)
        tl.store(U + tl.cast(t, tl.int64) * N * OUT + tile, s1 * v, mask=mask)


@triton.jit
def _backward_kernel(T, W, A, gy, gU, ga, gV, N, IN, OUT, K,
                     ACT: tl.constexpr, SECOND: tl.constexpr,
                     MODE: tl.constexpr, BN: tl.constexpr, BO: tl.constexpr, BI: tl.constexpr):
    rn = tl.program_id(0).to(tl.int64) * BN + tl.arange(0, BN)
    ro = tl.program_id(1).to(tl.int64) * BO + tl.arange(0, BO)
    mask = (rn[:, None] < N) & (ro[None, :] < OUT)
    tile = rn[:, None] * OUT + ro[None, :]
    a = tl.load(A + tile, mask=mask, other=0.0).to(tl.float32)
    _value, s1, s2 = _derivatives(a, ACT)
    g = tl.load(gy + tile, mask=mask, other=0.0).to(tl.float32) * s1
    for t in range(K):
        gu = tl.load(gU + tl.cast(t, tl.int64) * N * OUT + tile, mask=mask, other=0.0).to(tl.float32)
        tl.store(gV + tl.cast(t, tl.int64) * N * OUT + tile, gu * s1, mask=mask)
        if SECOND:
            v = _times_wt(T + tl.cast(t, tl.int64) * N * IN, W, rn, ro, N, IN, OUT, MODE, BI, BN, BO)
            g += s2 * gu * v
    tl.store(ga + tile, g, mask=mask)


@dataclass(frozen=True)
class TangentPlan:
    rows: int       # BN: rows of h per program
    outputs: int    # BO: output features per program
    inputs: int     # BI: input features per step
    mode: int
    num_warps: int
    num_stages: int


def tangent_plan(N: int, IN: int, OUT: int, K: int, dtype: torch.dtype) -> TangentPlan:
    """Launch sizes of both kernels for h (N, IN), W (OUT, IN), K tangents of ``dtype``."""
    return TangentPlan(32, 64, 32, _triton.product_mode(dtype, dtype), 4, 2)


def _grid(plan: TangentPlan, N: int, OUT: int):
    return (triton.cdiv(N, plan.rows), triton.cdiv(OUT, plan.outputs))


def forward(h, tangents, weight, bias, name):
    h, T, W = h.contiguous(), tangents.contiguous(), weight.contiguous()
    (N, IN), OUT, K = h.shape, W.shape[0], T.shape[0]
    y = h.new_empty(N, OUT)
    A = h.new_empty(N, OUT)
    U = h.new_empty(K, N, OUT)
    plan = tangent_plan(N, IN, OUT, K, h.dtype)
    _triton.launch(
        _forward_kernel, _grid(plan, N, OUT), h.device,
        h, T, W, h if bias is None else bias.contiguous(), y, U, A, N, IN, OUT, K,
        HAS_BIAS=bias is not None, ACT=CODES[name], MODE=plan.mode, BN=plan.rows, BO=plan.outputs,
        BI=plan.inputs, num_warps=plan.num_warps, num_stages=plan.num_stages)
    return y, U, A


def backward(h, tangents, weight, bias, name, a, grad_y, grad_U, needs=(True, True, True, True)):
    h, T, W = h.contiguous(), tangents.contiguous(), weight.contiguous()
    (N, IN), OUT, K = h.shape, W.shape[0], T.shape[0]
    grad_a = torch.empty_like(a)
    grad_V = torch.empty_like(grad_U, memory_format=torch.contiguous_format)
    plan = tangent_plan(N, IN, OUT, K, h.dtype)
    _triton.launch(
        _backward_kernel, _grid(plan, N, OUT), h.device,
        T, W, a.contiguous(), grad_y.contiguous(), grad_U.contiguous(), grad_a, grad_V, N, IN, OUT, K,
        ACT=CODES[name], SECOND=name not in ("identity", "relu"), MODE=plan.mode, BN=plan.rows,
        BO=plan.outputs, BI=plan.inputs, num_warps=plan.num_warps, num_stages=plan.num_stages)
    grad_h = grad_a @ W if needs[0] else None
    grad_T = grad_V @ W if needs[1] else None
    grad_W = grad_a.mT @ h + grad_V.flatten(0, 1).mT @ T.flatten(0, 1) if needs[2] else None
    grad_b = grad_a.sum(0) if (needs[3] and bias is not None) else None
    return grad_h, grad_T, grad_W, grad_b


def unsupported(*, device_type, dtype, **_sizes):
    """Where the kernels run (any number of tangents: they loop inside the kernel)."""
    if device_type != "cuda" and not (device_type == "cpu" and _triton.INTERPRETED):
        return f"triton runs on CUDA tensors (or on the CPU with TRITON_INTERPRET=1); got {device_type}"
    if dtype not in _triton.DTYPES:
        return f"triton kernels take float32, float16 or bfloat16; {dtype} runs on the torch backend"
    return None


IMPLEMENTATIONS = {"triton": _dispatch.Implementation(forward=forward, backward=backward, supports=unsupported)}
