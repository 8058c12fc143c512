"""What the Triton backends share: availability, launching, tensor-core products, launch
sizes, and the two kernels every operator on J is built from.

Every operator is a function of G = Jᵀ W J (``_gram.py``). So the Triton side is ``gram``
(one pass over J, fp32 accumulation in tiles over D, optionally split over D so small batches
still fill the GPU), a small per-sample epilogue in the operator's own module (the solver for
log det), and ``gram_backward`` (one pass over J writing ∂R/∂J = 2 W J Γ and
∂R/∂w_r = J_r Γ J_rᵀ). Γ is dense (B, k, k) or diagonal (B, k).

Products run on tensor cores (``mma``): bfloat16/float16 natively with fp32 accumulation, and
float32 as 3xTF32 — each operand split into a TF32 "hi" part and a TF32 "lo" remainder, three
TF32 products — which keeps float32 accuracy (docs/maths.md#numerical-error-and-tolerances).

Each launcher picks its launch sizes in one ``*_plan`` function of the shapes; every launch
goes through :func:`launch` (device guard; :func:`capturing` records launches instead of
running them, which is how ``benchmarks/kernel_report.py`` compiles exactly what runs).

Importing this module imports triton; without it the ImportError is what
``_dispatch.load_backends`` records. Kernels run on the CPU only under the interpreter
(``TRITON_INTERPRET=1`` set before triton is imported).
"""
from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_COLUMNS = 256       # largest d (or k) the kernels are tested for
GRAM_TILE = 64          # G is computed in GRAM_TILE² tiles once d exceeds it
TILE_ELEMENTS = 4096    # rows × columns of J loaded per step: enough bytes in flight per SM
_PROGRAMS_CPU = 4       # "SM count" under the interpreter: small, so splitting is exercised

# How ``mma`` multiplies (its MODE): operands in their own 16-bit dtype; one TF32 product
# (the user allowed TF32); or TF32 products with operand a, b or both split into hi + lo.
NATIVE = tl.constexpr(0)
TF32 = tl.constexpr(1)
SPLIT_A = tl.constexpr(2)
SPLIT_B = tl.constexpr(3)
SPLIT_AB = tl.constexpr(4)


def unsupported(*, device_type: str, dtype: torch.dtype, d: int, max_d: int = MAX_COLUMNS,
                **_sizes) -> Optional[str]:
    """None when the Triton kernels can run on this input (d: columns of J, at most ``max_d``),
    else why not. With ``max_d`` bound (functools.partial) it is an ``Implementation.supports``."""
    if device_type != "cuda" and not (device_type == "cpu" and INTERPRETED):
        return f"triton runs on CUDA tensors (or on the CPU with TRITON_INTERPRET=1); got {device_type}"
    if dtype not in DTYPES:
        return f"triton kernels take float32, float16 or bfloat16; {dtype} runs on the torch backend"
    if not 1 <= d <= max_d:
        return f"triton kernels support 1 <= d <= {max_d} columns here; got {d}"
    return None


# ---- launching ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Launch:
    """One kernel launch: what :func:`capturing` records."""
    kernel: Any
    grid: tuple
    args: tuple
    meta: dict


_capture: Optional[list] = None
_capture_multiprocessors: Optional[int] = None


def device_guard(device: torch.device):
    """Make ``device`` current for a launch (Triton launches on the current CUDA device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def launch(kernel, grid: tuple, device: torch.device, *args, **meta) -> None:
    """``kernel[grid](*args, **meta)`` on ``device``, or recorded while :func:`capturing`."""
    if _capture is not None:
        _capture.append(Launch(kernel, tuple(grid), args, meta))
        return
    with device_guard(device):
        kernel[grid](*args, **meta)


@contextlib.contextmanager
def capturing(multiprocessors: int = 132):
    """Record launches instead of running them (use meta tensors), sizing grids as for a GPU
    with ``multiprocessors`` SMs (132: H100/H200). Yields the list of :class:`Launch`."""
    global _capture, _capture_multiprocessors
    saved = _capture, _capture_multiprocessors
    _capture, _capture_multiprocessors = [], multiprocessors
    try:
        yield _capture
    finally:
        _capture, _capture_multiprocessors = saved


def pad(k: int) -> int:
    """Register tile for k columns: a power of two, at least 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(k))


def step_rows(columns: int, products: bool = False) -> int:
    """Rows of J per step of a loop over D, for a tile of ``columns`` (a power of two). Tiles
    that feed tensor-core products take at most 64 rows (more spills registers: see
    ``benchmarks/kernel_report.py``)."""
    return max(16 if products else 32, min(64 if products else 256, TILE_ELEMENTS // columns))


def programs(device: torch.device) -> int:
    """How many programs fill the device (two per SM)."""
    if _capture_multiprocessors is not None:
        return 2 * _capture_multiprocessors
    if device.type != "cuda":
        return _PROGRAMS_CPU
    return 2 * _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def product_mode(a_dtype: torch.dtype, b_dtype: torch.dtype) -> int:
    """``mma`` MODE for a @ b with operands of these dtypes (float32 marks a computed fp32
    operand, e.g. w·J or Γ). 16-bit pairs multiply natively; a 16-bit operand is exact in TF32,
    so only float32 operands are split — unless the user allowed TF32 for float32 matmuls.
    (The interpreter multiplies bfloat16 tiles wrongly, so there bfloat16 pairs take one TF32
    product: the same exact products, fp32 sums.)"""
    if a_dtype == b_dtype and a_dtype != torch.float32:
        mode = TF32 if INTERPRETED and a_dtype == torch.bfloat16 else NATIVE
    elif torch.backends.cuda.matmul.allow_tf32:
        mode = TF32
    else:
        split_a, split_b = a_dtype == torch.float32, b_dtype == torch.float32
        mode = SPLIT_AB if split_a and split_b else SPLIT_A if split_a else SPLIT_B
    return mode.value


@triton.jit
def _tf32(x):
    """x rounded to TF32 (10 mantissa bits, to nearest even): exactly what a TF32 tensor
    core reads, so the interpreter computes the same products as the GPU."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + (((bits >> 13) & 1) + 0xFFF)) & 0xFFFFE000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def mma(a, b, acc, MODE: tl.constexpr):
    """acc + a @ b on tensor cores with fp32 accumulation (MODE: see ``product_mode``).
    Split operands x = hi + lo with hi, lo in TF32: a@b ≈ a_hi b_hi + a_hi b_lo + a_lo b_hi,
    the dropped a_lo b_lo being 2⁻²² relative (3xTF32)."""
    if MODE == NATIVE:
        return tl.dot(a, b, acc, out_dtype=tl.float32)
    a = a.to(tl.float32)
    b = b.to(tl.float32)
    a_hi = _tf32(a)
    b_hi = _tf32(b)
    if MODE == SPLIT_A or MODE == SPLIT_AB:
        acc = tl.dot(_tf32(a - a_hi), b_hi, acc, input_precision="tf32", out_dtype=tl.float32)
    if MODE == SPLIT_B or MODE == SPLIT_AB:
        acc = tl.dot(a_hi, _tf32(b - b_hi), acc, input_precision="tf32", out_dtype=tl.float32)
    return tl.dot(a_hi, b_hi, acc, input_precision="tf32", out_dtype=tl.float32)


# ---- G = JᵀWJ ------------------------------------------------------------------------------
@triton.jit
def gram_tile(J, w, r_lo, r_hi, ci, cj, k, s_r, s_c, s_w,
              HAS_W: tl.constexpr, DIAGONAL: tl.constexpr, MODE: tl.constexpr,
              ROWS: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr):
    """Σ_{r_lo <= r < r_hi} w_r J_ri J_rj for the columns ci (BI,), cj (BJ,), fp32.
    J and w point at this sample; DIAGONAL returns the (BI,) squared norms instead."""
    if DIAGONAL:
        acc = tl.zeros((BI,), tl.float32)
    else:
        acc = tl.zeros((BI, BJ), tl.float32)
    for r0 in range(r_lo, r_hi, ROWS):
        rows = r0 + tl.arange(0, ROWS).to(tl.int64)
        rmask = rows < r_hi
        a = tl.load(J + rows[:, None] * s_r + ci[None, :] * s_c,
                    mask=rmask[:, None] & (ci[None, :] < k), other=0.0)
        if HAS_W:
            wr = tl.load(w + rows * s_w, mask=rmask, other=0.0).to(tl.float32)
        if DIAGONAL:
            af = a.to(tl.float32)
            sq = af * af
            if HAS_W:
                sq = sq * wr[:, None]
            acc += tl.sum(sq, axis=0)
        else:
            b = tl.load(J + rows[:, None] * s_r + cj[None, :] * s_c,
                        mask=rmask[:, None] & (cj[None, :] < k), other=0.0)
            if HAS_W:
                a = a.to(tl.float32) * wr[:, None]
            acc = mma(tl.trans(a), b, acc, MODE)
    return acc


@triton.jit
def _gram_kernel(J, w, G, D, k, rows_per_split, s_split, s_b, s_r, s_c, s_wb, s_wr,
                 HAS_W: tl.constexpr, DIAGONAL: tl.constexpr, ATOMIC: tl.constexpr,
                 MODE: tl.constexpr, ROWS: tl.constexpr, TILE: tl.constexpr, TILES: tl.constexpr):
    """Program (b, split, tile): one lower tile of G[b] and its mirror (or a slice of the
    norms) over one slice of rows. G is (B, k, k) fp32 (or (B, k)); split slices add
    atomically (ATOMIC) or write their own partial sums at G + split · s_split (deterministic
    mode)."""
    b = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    tile = tl.program_id(2)
    ti = tile // TILES
    tj = tile % TILES
    if tj > ti:
        return  # G is symmetric: the program of tile (tj, ti) writes this one
    r_lo = split * rows_per_split
    r_hi = tl.minimum(r_lo + rows_per_split, D)
    ci = ti * TILE + tl.arange(0, TILE)
    cj = tj * TILE + tl.arange(0, TILE)
    acc = gram_tile(J + b * s_b, w + b * s_wb, r_lo, r_hi, ci, cj, k, s_r, s_c, s_wr,
                    HAS_W, DIAGONAL, MODE, ROWS, TILE, TILE)
    out = G + split * s_split
    if DIAGONAL:
        ptr = out + b * k + ci
        mask = ci < k
    else:
        ptr = out + b * k * k + ci[:, None] * k + cj[None, :]
        mask = (ci[:, None] < k) & (cj[None, :] < k)
    _write(ptr, acc, mask, ATOMIC)
    if not DIAGONAL and tj < ti:  # the mirror tile: G is written whole
        _write(out + b * k * k + cj[:, None] * k + ci[None, :], tl.trans(acc), tl.trans(mask), ATOMIC)


@triton.jit
def _write(ptr, value, mask, ATOMIC: tl.constexpr):
    if ATOMIC:
        tl.atomic_add(ptr, value, mask=mask)
    else:
        tl.store(ptr, value, mask=mask)


@dataclass(frozen=True)
class GramPlan:
    tile: int           # columns per side of a tile of G
    tiles: int          # tiles per side
    rows: int           # rows of J per step
    rows_per_split: int
    splits: int
    atomic: bool        # splits add atomically (else: partial sums, summed after)
    mode: int
    num_warps: int
    num_stages: int


def gram_plan(B: int, D: int, k: int, dtype: torch.dtype, weighted: bool, diagonal: bool,
              device: torch.device, rows_per_split: Optional[int] = None) -> GramPlan:
    """Launch sizes of the Gram kernel for J (B, D, k) of ``dtype``."""
    tile = min(pad(k), GRAM_TILE)
    tiles = triton.cdiv(k, tile)
    grid_tiles = tiles if diagonal else tiles * tiles
    mode = product_mode(torch.float32 if weighted else dtype, dtype)
    split = mode not in (NATIVE.value, TF32.value)  # split products hold twice the operands
    step = step_rows(tile * (2 if split else 1), products=not diagonal)
    want = max(1, programs(device) // max(1, B * grid_tiles))
    per = rows_per_split or (max(triton.cdiv(D, want), 4 * step) if want > 1 else D)
    splits = triton.cdiv(D, per)
    return GramPlan(tile, tiles, step, per, splits, splits > 1 and not torch.are_deterministic_algorithms_enabled(),
                    mode, 4 if diagonal or tile < 32 else 8, 3)


def gram(J: torch.Tensor, w: Optional[torch.Tensor], *, diagonal: bool = False,
         rows_per_split: Optional[int] = None) -> torch.Tensor:
    """G = JᵀWJ, (B, D, k) -> (B, k, k) fp32, or the (B, k) column norms Σ_r w_r J_rk² when
    ``diagonal``."""
    B, D, k = J.shape
    plan = gram_plan(B, D, k, J.dtype, w is not None, diagonal, J.device, rows_per_split)
    shape = (B, k) if diagonal else (B, k, k)
    partials = plan.splits > 1 and not plan.atomic
    if plan.atomic:
        G = torch.zeros(shape, dtype=torch.float32, device=J.device)
    else:
        G = torch.empty((plan.splits, *shape) if partials else shape, dtype=torch.float32, device=J.device)
    launch(_gram_kernel, (B, plan.splits, plan.tiles if diagonal else plan.tiles ** 2), J.device,
           J, J if w is None else w, G, D, k, plan.rows_per_split, G[0].numel() if partials else 0, *J.stride(),
           *((0, 0) if w is None else w.stride()),
           HAS_W=w is not None, DIAGONAL=diagonal, ATOMIC=plan.atomic, MODE=plan.mode, ROWS=plan.rows,
           TILE=plan.tile, TILES=1 if diagonal else plan.tiles, num_warps=plan.num_warps,
           num_stages=plan.num_stages)
    return G.sum(0) if partials else G


# ---- ∂R/∂J = 2 W J Γ, ∂R/∂w_r = J_r Γ J_rᵀ ----------------------------------------------------
@triton.jit
def _rows_times_gamma(Jb, Gb, rows, rmask, cj, k, s_r, s_c, MODE: tl.constexpr, ROWS: tl.constexpr,
                      TILE: tl.constexpr):
    """(J Γ)[rows, cj] in fp32: J (ROWS × k) times the columns cj of Γ (k × k)."""
    acc = tl.zeros((ROWS, TILE), tl.float32)
    for i0 in range(0, k, TILE):
        ci = i0 + tl.arange(0, TILE)
        a_i = tl.load(Jb + rows[:, None] * s_r + ci[None, :] * s_c,
                      mask=rmask[:, None] & (ci[None, :] < k), other=0.0)
        g = tl.load(Gb + ci[:, None] * k + cj[None, :], mask=(ci[:, None] < k) & (cj[None, :] < k), other=0.0)
        acc = mma(a_i, g, acc, MODE)
    return acc


@triton.jit
def _gram_backward_kernel(J, w, Gamma, scale, gJ, gw, D, k, s_b, s_r, s_c, s_wb, s_wr,
                          s_gb, s_gr, s_gc,
                          HAS_W: tl.constexpr, HAS_SCALE: tl.constexpr,
                          WRITE_J: tl.constexpr, WRITE_W: tl.constexpr,
                          DIAGONAL: tl.constexpr, MODE: tl.constexpr,
                          ROWS: tl.constexpr, TILE: tl.constexpr):
    """Program (b, row block): rows of ∂R/∂J = 2 W J Γ and ∂R/∂w_r = J_r Γ J_rᵀ.
    Γ is (B, k, k) fp32 (or its (B, k) diagonal), times scale[b] (fp32) when HAS_SCALE."""
    b = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    rmask = rows < D
    Jb = J + b * s_b
    if HAS_W:
        wr = tl.load(w + b * s_wb + rows * s_wr, mask=rmask, other=0.0).to(tl.float32)
    quad = tl.zeros((ROWS,), tl.float32)
    for j0 in range(0, k, TILE):
        cj = j0 + tl.arange(0, TILE)
        jmask = rmask[:, None] & (cj[None, :] < k)
        a_j = tl.load(Jb + rows[:, None] * s_r + cj[None, :] * s_c, mask=jmask, other=0.0)
        if DIAGONAL:
            acc = a_j.to(tl.float32) * tl.load(Gamma + b * k + cj, mask=cj < k, other=0.0)[None, :]
        else:
            acc = _rows_times_gamma(Jb, Gamma + b * k * k, rows, rmask, cj, k, s_r, s_c, MODE, ROWS, TILE)
        if HAS_SCALE:
            acc = acc * tl.load(scale + b)
        if WRITE_W:
            quad += tl.sum(acc * a_j.to(tl.float32), axis=1)
        if WRITE_J:
            out = 2 * acc
            if HAS_W:
                out = out * wr[:, None]
            tl.store(gJ + b * s_gb + rows[:, None] * s_gr + cj[None, :] * s_gc, out, mask=jmask)
    if WRITE_W:
        tl.store(gw + b * D + rows, quad, mask=rmask)


@dataclass(frozen=True)
class BackwardPlan:
    tile: int
    rows: int
    mode: int
    num_warps: int
    num_stages: int


def gram_backward_plan(B: int, D: int, k: int, dtype: torch.dtype, diagonal: bool) -> BackwardPlan:
    """Launch sizes of the backward kernel for J (B, D, k) of ``dtype`` and Γ in fp32."""
    tile = min(pad(k), GRAM_TILE)
    rows = step_rows(2 * tile, products=not diagonal)  # Γ's tile is in registers too
    return BackwardPlan(tile, rows, product_mode(dtype, torch.float32), 4 if diagonal else 8, 1)


def _gram_backward(J: torch.Tensor, w: Optional[torch.Tensor], gamma: torch.Tensor,
                   need_J: bool, need_w: bool, scale: Optional[torch.Tensor] = None):
    B, D, k = J.shape
    gamma = gamma.to(torch.float32).contiguous()
    grad_J = torch.empty_like(J, memory_format=torch.contiguous_format) if need_J else J.new_empty(0)
    grad_w = torch.empty((B, D), dtype=torch.float32, device=J.device) if need_w else J.new_empty(0)
    plan = gram_backward_plan(B, D, k, J.dtype, gamma.dim() == 2)
    launch(_gram_backward_kernel, (B, triton.cdiv(D, plan.rows)), J.device,
           J, J if w is None else w, gamma, gamma if scale is None else scale.to(torch.float32).contiguous(),
           J if not need_J else grad_J, J if not need_w else grad_w,
           D, k, *J.stride(), *((0, 0) if w is None else w.stride()),
           *(grad_J.stride() if need_J else (0, 0, 0)),
           HAS_W=w is not None, HAS_SCALE=scale is not None, WRITE_J=need_J, WRITE_W=need_w,
           DIAGONAL=gamma.dim() == 2,
           MODE=plan.mode, ROWS=plan.rows, TILE=plan.tile, num_warps=plan.num_warps,
           num_stages=plan.num_stages)
    return grad_J, grad_w


# Backward formulas run under AOT autograd's tracing (torch.compile, opcheck), which cannot
# see into a raw kernel launch (and wrap_triton does not trace under the interpreter), so the
# backward kernel is an opaque custom op with a fake implementation.
@torch.library.custom_op("fastjac::triton_gram_backward", mutates_args=())
def _gram_backward_op(J: torch.Tensor, w: Optional[torch.Tensor], gamma: torch.Tensor,
                      need_J: bool, need_w: bool, scale: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return _gram_backward(J, w, gamma, need_J, need_w, scale)


@_gram_backward_op.register_fake
def _(J, w, gamma, need_J, need_w, scale):
    B, D, _ = J.shape
    return (J.new_empty(J.shape) if need_J else J.new_empty(0),
            J.new_empty((B, D), dtype=torch.float32) if need_w else J.new_empty(0))


def gram_backward(J: torch.Tensor, w: Optional[torch.Tensor], gamma: torch.Tensor,
                  need_J: bool = True, need_w: bool = True, scale: Optional[torch.Tensor] = None):
    """(∂R/∂J in J's dtype or None, ∂R/∂w (B, D) fp32 or None) from Γ = ∂R/∂G, which is
    (B, k, k) symmetric or its (B, k) diagonal, times the per-sample ``scale`` (B,) if given;
    one pass over J (docs/maths.md#log-determinant-and-its-gradients)."""
    need_w = need_w and w is not None
    if not (need_J or need_w):
        return None, None
    run = _gram_backward if _capture is not None else torch.ops.fastjac.triton_gram_backward
    grad_J, grad_w = run(J, w, gamma, need_J, need_w, scale)
    return (grad_J if need_J else None), (grad_w if need_w else None)
