"""What the Triton backends share: availability, the range they support, launch sizes,
and the two kernels every operator on J is built from.

Every operator is a function of G = Jᵀ W J (``_gram.py``). So the Triton side is:
``gram`` (one pass over J, fp32 accumulation in tiles over D, optionally split over D
with atomic adds so small batches still fill the GPU), a small per-sample epilogue in the
operator's own module (Cholesky, cos²), and ``apply_gamma`` (one pass over J writing
∂R/∂J = 2 W J Γ and ∂R/∂w_r = J_r Γ J_rᵀ). Γ is dense (B, k, k) or diagonal (B, k).

Importing this module imports triton; without it the ImportError is what
``_dispatch.load_backends`` records. Kernels run on the CPU only under the interpreter
(``TRITON_INTERPRET=1`` set before triton is imported).
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_COLUMNS = 256       # largest d (or k) the kernels are tested for
GRAM_TILE = 64          # G is computed in GRAM_TILE² tiles once d exceeds it
TILE_ELEMENTS = 4096    # rows × columns of J loaded per step: enough bytes in flight per SM
_PROGRAMS_CPU = 4       # "SM count" under the interpreter: small, so splitting is exercised


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


def pad(k: int) -> int:
    """Register tile for k columns: a power of two, at least 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(k))


def step_rows(columns: int) -> int:
    """Rows of J per step of a loop over D, for a tile of ``columns`` (a power of two)."""
    return max(32, min(256, TILE_ELEMENTS // columns))


def warps(elements: int) -> int:
    """Warps for a program holding a register tile of ``elements`` fp32 values."""
    return min(16, max(4, elements // 2048))


def programs(device: torch.device) -> int:
    """How many programs fill the device (two per SM)."""
    if device.type != "cuda":
        return _PROGRAMS_CPU
    return 2 * _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def dot_mode(dtype: torch.dtype, weighted: bool) -> tuple[bool, str]:
    """(multiply in the input dtype?, tl.dot input_precision) for JᵀWJ tiles.

    fp32 is IEEE unless the user allowed TF32 (``torch.backends.cuda.matmul.allow_tf32``).
    bfloat16 values are exact in TF32, so unweighted bf16 tiles use TF32 tensor cores at no
    loss; unweighted fp16 multiplies natively (exact products, fp32 sums). Weighted tiles
    (w·J is no longer exact in the input dtype) multiply in fp32.
    """
    tf32 = torch.backends.cuda.matmul.allow_tf32
    if not weighted and dtype == torch.float16:
        return True, "ieee"
    if not weighted and dtype == torch.bfloat16:
        return False, "tf32"
    return False, "tf32" if tf32 else "ieee"


@triton.jit
def gram_tile(J, w, r_lo, r_hi, ci, cj, k, s_r, s_c, s_w,
              HAS_W: tl.constexpr, DIAGONAL: tl.constexpr, NATIVE: tl.constexpr,
              PRECISION: tl.constexpr, ROWS: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr):
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
                b = b.to(tl.float32)
            elif not NATIVE:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc += tl.dot(tl.trans(a), b, input_precision=PRECISION, out_dtype=tl.float32)
    return acc


@triton.jit
def _gram_kernel(J, w, G, D, k, rows_per_split, s_b, s_r, s_c, s_wb, s_wr,
                 HAS_W: tl.constexpr, DIAGONAL: tl.constexpr, ATOMIC: tl.constexpr,
                 NATIVE: tl.constexpr, PRECISION: tl.constexpr, ROWS: tl.constexpr,
                 TILE: tl.constexpr, TILES: tl.constexpr):
    """Program (b, split, tile): one lower tile of G[b] (or a slice of the norms) over one
    slice of rows. G is (B, k, k) fp32 (or (B, k)); split slices add atomically."""
    b = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    tile = tl.program_id(2)
    ti = tile // TILES
    tj = tile % TILES
    if tj > ti:
        return  # G is symmetric: readers take the lower triangle
    r_lo = split * rows_per_split
    r_hi = tl.minimum(r_lo + rows_per_split, D)
    ci = ti * TILE + tl.arange(0, TILE)
    cj = tj * TILE + tl.arange(0, TILE)
    acc = gram_tile(J + b * s_b, w + b * s_wb, r_lo, r_hi, ci, cj, k, s_r, s_c, s_wr,
                    HAS_W, DIAGONAL, NATIVE, PRECISION, ROWS, TILE, TILE)
    if DIAGONAL:
        ptr = G + b * k + ci
        mask = ci < k
    else:
        ptr = G + b * k * k + ci[:, None] * k + cj[None, :]
        mask = (ci[:, None] < k) & (cj[None, :] < k)
    if ATOMIC:
        tl.atomic_add(ptr, acc, mask=mask)
    else:
        tl.store(ptr, acc, mask=mask)


def split_rows(B: int, D: int, tiles: int, step: int, device: torch.device) -> int:
    """Rows of J per program so that B · splits · tiles programs fill the device
    (never fewer than four steps of ``step`` rows per program)."""
    want = max(1, programs(device) // max(1, B * tiles))
    per = triton.cdiv(D, want)
    return max(per, 4 * step) if want > 1 else D


def gram(J: torch.Tensor, w: Optional[torch.Tensor], *, diagonal: bool = False,
         rows_per_split: Optional[int] = None) -> torch.Tensor:
    """G = JᵀWJ, (B, D, k) -> (B, k, k) fp32 with only the lower triangle written (the rest
    zero), or the (B, k) column norms Σ_r w_r J_rk² when ``diagonal``."""
    B, D, k = J.shape
    tile = min(pad(k), GRAM_TILE)
    tiles = triton.cdiv(k, tile)
    grid_tiles = tiles if diagonal else tiles * tiles
    step = step_rows(tile)
    per = rows_per_split or split_rows(B, D, grid_tiles, step, J.device)
    splits = triton.cdiv(D, per)
    shape = (B, k) if diagonal else (B, k, k)
    G = torch.zeros(shape, dtype=torch.float32, device=J.device)
    native, precision = dot_mode(J.dtype, w is not None)
    w_arg = J if w is None else w  # never read when HAS_W is false
    s_w = (0, 0) if w is None else w.stride()
    _gram_kernel[(B, splits, grid_tiles)](
        J, w_arg, G, D, k, per, *J.stride(), *s_w,
        HAS_W=w is not None, DIAGONAL=diagonal, ATOMIC=splits > 1, NATIVE=native,
        PRECISION=precision, ROWS=step, TILE=tile, TILES=1 if diagonal else tiles,
        num_warps=warps(tile * (1 if diagonal else tile)))
    return G


def symmetric(G: torch.Tensor) -> torch.Tensor:
    """The full symmetric matrix from the lower triangle ``gram`` writes."""
    return G.tril() + G.tril(-1).mT


@triton.jit
def _apply_gamma_kernel(J, w, Gamma, gJ, gw, D, k, s_b, s_r, s_c, s_wb, s_wr,
                        s_gb, s_gr, s_gc,
                        HAS_W: tl.constexpr, WRITE_J: tl.constexpr, WRITE_W: tl.constexpr,
                        DIAGONAL: tl.constexpr, PRECISION: tl.constexpr,
                        ROWS: tl.constexpr, TILE: tl.constexpr):
    """Program (b, row block): rows of ∂R/∂J = 2 W J Γ and ∂R/∂w_r = J_r Γ J_rᵀ.
    Γ is (B, k, k) fp32 (or its (B, k) diagonal)."""
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
        a_j = tl.load(Jb + rows[:, None] * s_r + cj[None, :] * s_c, mask=jmask, other=0.0).to(tl.float32)
        if DIAGONAL:
            acc = a_j * tl.load(Gamma + b * k + cj, mask=cj < k, other=0.0)[None, :]
        else:
            acc = tl.zeros((ROWS, TILE), tl.float32)
            for i0 in range(0, k, TILE):
                ci = i0 + tl.arange(0, TILE)
                a_i = tl.load(Jb + rows[:, None] * s_r + ci[None, :] * s_c,
                              mask=rmask[:, None] & (ci[None, :] < k), other=0.0).to(tl.float32)
                g = tl.load(Gamma + b * k * k + ci[:, None] * k + cj[None, :],
                            mask=(ci[:, None] < k) & (cj[None, :] < k), other=0.0)
                acc += tl.dot(a_i, g, input_precision=PRECISION, out_dtype=tl.float32)
        if WRITE_W:
            quad += tl.sum(acc * a_j, axis=1)
        if WRITE_J:
            out = 2 * acc
            if HAS_W:
                out = out * wr[:, None]
            tl.store(gJ + b * s_gb + rows[:, None] * s_gr + cj[None, :] * s_gc, out, mask=jmask)
    if WRITE_W:
        tl.store(gw + b * D + rows, quad, mask=rmask)


def _apply_gamma(J: torch.Tensor, w: Optional[torch.Tensor], gamma: torch.Tensor,
                 need_J: bool, need_w: bool):
    B, D, k = J.shape
    gamma = gamma.to(torch.float32).contiguous()
    grad_J = torch.empty_like(J, memory_format=torch.contiguous_format) if need_J else J.new_empty(0)
    grad_w = torch.empty((B, D), dtype=torch.float32, device=J.device) if need_w else J.new_empty(0)
    _, precision = dot_mode(torch.float32, True)
    tile = min(pad(k), GRAM_TILE)
    step = step_rows(tile)
    _apply_gamma_kernel[(B, triton.cdiv(D, step))](
        J, J if w is None else w, gamma, J if not need_J else grad_J, J if not need_w else grad_w,
        D, k, *J.stride(), *((0, 0) if w is None else w.stride()),
        *(grad_J.stride() if need_J else (0, 0, 0)),
        HAS_W=w is not None, WRITE_J=need_J, WRITE_W=need_w, DIAGONAL=gamma.dim() == 2,
        PRECISION=precision, ROWS=step, TILE=tile, num_warps=warps(step * tile // 2))
    return grad_J, grad_w


# Backward formulas run under AOT autograd's tracing (torch.compile, opcheck), which cannot
# see into a raw kernel launch (and wrap_triton does not trace under the interpreter), so the
# kernels backward passes use are opaque custom ops with fake implementations.
@torch.library.custom_op("fastjac::triton_gram", mutates_args=())
def gram_op(J: torch.Tensor, w: Optional[torch.Tensor], diagonal: bool) -> torch.Tensor:
    """:func:`gram` as a custom op."""
    return gram(J, w, diagonal=diagonal)


@gram_op.register_fake
def _(J, w, diagonal):
    B, _, k = J.shape
    return J.new_empty((B, k) if diagonal else (B, k, k), dtype=torch.float32)


@torch.library.custom_op("fastjac::triton_apply_gamma", mutates_args=())
def _apply_gamma_op(J: torch.Tensor, w: Optional[torch.Tensor], gamma: torch.Tensor,
                    need_J: bool, need_w: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _apply_gamma(J, w, gamma, need_J, need_w)


@_apply_gamma_op.register_fake
def _(J, w, gamma, need_J, need_w):
    B, D, _ = J.shape
    return (J.new_empty(J.shape) if need_J else J.new_empty(0),
            J.new_empty((B, D), dtype=torch.float32) if need_w else J.new_empty(0))


def apply_gamma(J: torch.Tensor, w: Optional[torch.Tensor], gamma: torch.Tensor,
                need_J: bool = True, need_w: bool = True):
    """(∂R/∂J in J's dtype or None, ∂R/∂w (B, D) fp32 or None) from Γ = ∂R/∂G, which is
    (B, k, k) symmetric or its (B, k) diagonal; one pass over J."""
    need_w = need_w and w is not None
    if not (need_J or need_w):
        return None, None
    grad_J, grad_w = torch.ops.fastjac.triton_apply_gamma(J, w, gamma, need_J, need_w)
    return (grad_J if need_J else None), (grad_w if need_w else None)
