"""Triton backend of ``logdet_gram`` (exact, Fischer; the posterior covariance uses the same
forward): log det M and M⁻¹ for M = I + mask ⊙ JᵀWJ/β, in at most two launches.

One solver program per sample reads G (or accumulates it over D itself, the ``"fused"``
schedule, for small d when B alone fills the GPU), forms M and inverts it by Gauss–Jordan
elimination without pivoting — M is symmetric positive definite, and the pivots of the
elimination are the squared Cholesky pivots, so log det M = Σ log pivots comes for free.
For d <= SOLVER_BLOCK the whole M stays in registers; above, the elimination is blocked
(BLOCKED_TILE² tiles, tensor-core products) in place in the output buffer, which at d <= 256
(256 KB per sample) stays in L2. The op saves M⁻¹, so the backward (the reference Γ formula
and ``_triton.gram_backward``) needs no further factorisation. The solver also writes diag M
(B, d), which the float32 error estimate needs, so nothing reads J again for it.

Launches: ``"split"`` = [zeros] + Gram + solver (<= 3), ``"fused"`` = solver alone.
Shapes as ``reference``; the maths in docs/maths.md#log-determinant-and-its-gradients.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from .. import _dispatch, _triton

PATHS = ("fused", "split")
FUSED_MAX_D = 32      # largest d the fused schedule (Gram and solver in one program) takes by default
SOLVER_BLOCK = 64     # the solver holds M in registers up to this d, then works in blocks
BLOCKED_TILE = 32     # tiles of the blocked solver (64² tiles spill registers: benchmarks/kernel_report.py)


@triton.jit
def _scaled(g, r, c, k, beta, block_size):
    """Tile (r, c) of M = I + mask ⊙ G/β from the same tile of G; the identity beyond k."""
    inside = (r[:, None] < k) & (c[None, :] < k)
    same_block = (r[:, None] // block_size) == (c[None, :] // block_size)
    return tl.where(inside & same_block, g / beta, 0.0) + tl.where(r[:, None] == c[None, :], 1.0, 0.0)


@triton.jit
def _g_tile(Gb, k, r, c):
    """Tile (r, c) of G[b] (k, k)."""
    return tl.load(Gb + r[:, None] * k + c[None, :], mask=(r[:, None] < k) & (c[None, :] < k), other=0.0)


@triton.jit
def _invert(A, n, BD: tl.constexpr):
    """(A⁻¹, log det A) for a symmetric positive definite register tile A (the identity beyond
    its leading n × n block): Gauss–Jordan elimination in place, one column per step."""
    idx = tl.arange(0, BD)
    row = idx[:, None]
    col = idx[None, :]
    log_pivots = tl.zeros((BD,), tl.float32)
    for j in range(0, n):
        row_j = tl.sum(tl.where(row == j, A, 0.0), axis=0)
        col_j = tl.sum(tl.where(col == j, A, 0.0), axis=1)
        pivot = tl.sum(tl.where(idx == j, col_j, 0.0), axis=0)
        new_row = tl.where(idx == j, 1.0, row_j) / pivot
        others = tl.where(idx == j, 0.0, col_j)
        A = tl.where(col == j, 0.0, A) - others[:, None] * new_row[None, :]
        A = tl.where(row == j, new_row[None, :], A)
        log_pivots = tl.where(idx == j, tl.log(pivot), log_pivots)
    return A, tl.sum(log_pivots, axis=0)


@triton.jit
def _tile(Mb, k, I, Jt, NB: tl.constexpr):
    """Pointers and mask of tile (I, Jt) of the (k, k) row-major matrix at Mb."""
    r = I * NB + tl.arange(0, NB)
    c = Jt * NB + tl.arange(0, NB)
    return Mb + r[:, None] * k + c[None, :], (r[:, None] < k) & (c[None, :] < k)


@triton.jit
def _store_diagonal(A, Db, k, c0, NB: tl.constexpr):
    """Db[c0 + i] <- A[i, i] for the register tile A (NB × NB) whose diagonal is M's c0, c0 + 1, ..."""
    idx = tl.arange(0, NB)
    diagonal = tl.sum(tl.where(idx[:, None] == idx[None, :], A, 0.0), axis=1)
    tl.store(Db + c0 + idx, diagonal, mask=c0 + idx < k)


@triton.jit
def _write_matrix(Gb, Mb, Db, k, beta, block_size, NB: tl.constexpr, BLOCKS: tl.constexpr):
    """Mb <- M = I + mask ⊙ G/β, tile by tile, and Db <- diag M."""
    idx = tl.arange(0, NB)
    for I in range(BLOCKS):
        for Jt in range(BLOCKS):
            ptr, mask = _tile(Mb, k, I, Jt, NB)
            tile = _scaled(_g_tile(Gb, k, I * NB + idx, Jt * NB + idx), I * NB + idx, Jt * NB + idx, k, beta,
                           block_size)
            tl.store(ptr, tile, mask=mask)
            if I == Jt:
                _store_diagonal(tile, Db, k, I * NB, NB)
    tl.debug_barrier()


@triton.jit
def _blocked_inverse(Gb, Mb, Db, k, beta, block_size, NB: tl.constexpr, BLOCKS: tl.constexpr):
    """Write M⁻¹ to Mb by block Gauss–Jordan on NB × NB tiles, in place, and diag M to Db;
    returns log det M."""
    _write_matrix(Gb, Mb, Db, k, beta, block_size, NB, BLOCKS)
    idx = tl.arange(0, NB)
    zero = tl.zeros((NB, NB), tl.float32)
    eye = tl.where(idx[:, None] == idx[None, :], 1.0, 0.0)
    logdet = 0.0
    for K in range(BLOCKS):
        ptr, mask = _tile(Mb, k, K, K, NB)
        pivot_block = tl.where(mask, tl.load(ptr, mask=mask, other=0.0), eye)
        P, log_det_P = _invert(pivot_block, tl.minimum(NB, k - K * NB), NB)
        logdet += log_det_P
        for Jt in range(BLOCKS):  # row panel: M_KJ <- P M_KJ
            if Jt != K:
                ptr, mask = _tile(Mb, k, K, Jt, NB)
                X = _triton.mma(P, tl.load(ptr, mask=mask, other=0.0), zero, _triton.SPLIT_AB)
                tl.debug_barrier()
                tl.store(ptr, X, mask=mask)
        tl.debug_barrier()
        for I in range(BLOCKS):  # other rows: M_IJ -= M_IK M_KJ, M_IK <- -M_IK P
            if I != K:
                f_ptr, f_mask = _tile(Mb, k, I, K, NB)
                F = tl.load(f_ptr, mask=f_mask, other=0.0)
                for Jt in range(BLOCKS):
                    if Jt != K:
                        x_ptr, x_mask = _tile(Mb, k, K, Jt, NB)
                        ptr, mask = _tile(Mb, k, I, Jt, NB)
                        Y = _triton.mma(-F, tl.load(x_ptr, mask=x_mask, other=0.0),
                                        tl.load(ptr, mask=mask, other=0.0), _triton.SPLIT_AB)
                        tl.debug_barrier()
                        tl.store(ptr, Y, mask=mask)
                Z = _triton.mma(-F, P, zero, _triton.SPLIT_AB)
                tl.debug_barrier()
                tl.store(f_ptr, Z, mask=f_mask)
        tl.debug_barrier()
        ptr, mask = _tile(Mb, k, K, K, NB)
        tl.store(ptr, P, mask=mask)
        tl.debug_barrier()
    return logdet


@triton.jit
def _solve_kernel(J, w, G, beta, Minv, logdet, Mdiag, D, k, block_size, s_b, s_r, s_c, s_wb, s_wr,
                  BETA_PTR: tl.constexpr, FUSED: tl.constexpr, HAS_W: tl.constexpr, MODE: tl.constexpr,
                  ROWS: tl.constexpr, NB: tl.constexpr, BLOCKS: tl.constexpr):
    """Program b: Minv[b] = M⁻¹, logdet[b] = log det M and Mdiag[b] = diag M, M = I + mask ⊙ G[b]/β.
    G is accumulated here (FUSED) or read from the Gram kernel's output."""
    b = tl.program_id(0).to(tl.int64)
    if BETA_PTR:
        beta = tl.load(beta).to(tl.float32)
    Mb = Minv + b * k * k
    if BLOCKS == 1:
        idx = tl.arange(0, NB)
        if FUSED:
            g = _triton.gram_tile(J + b * s_b, w + b * s_wb, 0, D, idx, idx, k, s_r, s_c, s_wr,
                                  HAS_W, False, MODE, ROWS, NB, NB)
        else:
            g = _g_tile(G + b * k * k, k, idx, idx)
        A = _scaled(g, idx, idx, k, beta, block_size)
        _store_diagonal(A, Mdiag + b * k, k, 0, NB)
        A, ld = _invert(A, k, NB)
        ptr, mask = _tile(Mb, k, 0, 0, NB)
        tl.store(ptr, A, mask=mask)
    else:
        ld = _blocked_inverse(G + b * k * k, Mb, Mdiag + b * k, k, beta, block_size, NB, BLOCKS)
    tl.store(logdet + b, ld)


@dataclass(frozen=True)
class SolverPlan:
    fused: bool
    block: int          # NB: side of the register tile
    blocks: int         # tiles per side (1: all in registers)
    rows: int           # rows of J per step (fused)
    mode: int           # product mode of the fused Gram
    num_warps: int


def solver_plan(B: int, D: int, d: int, dtype: torch.dtype, weighted: bool, device: torch.device,
                schedule: Optional[str] = None) -> SolverPlan:
    """Launch sizes of the solver for J (B, D, d); ``schedule`` forces one of PATHS."""
    if schedule is None:
        schedule = "fused" if d <= FUSED_MAX_D and B >= _triton.programs(device) // 2 else "split"
    if schedule not in PATHS:
        raise ValueError(f"schedule must be one of {PATHS}, got {schedule!r}")
    block = _triton.pad(d) if d <= SOLVER_BLOCK else BLOCKED_TILE
    blocks = triton.cdiv(d, block)
    if schedule == "fused" and blocks > 1:
        raise ValueError(f"the fused schedule holds M in registers, for d <= {SOLVER_BLOCK}; got {d}")
    mode = _triton.product_mode(torch.float32 if weighted else dtype, dtype)
    return SolverPlan(schedule == "fused", block, blocks, _triton.step_rows(block, products=True), mode,
                      4 if block <= 32 else 8)


def forward(J, w, beta, block_size: int, schedule: Optional[str] = None):
    """(log det M (B,), M⁻¹ (B, d, d), diag M (B, d)) in fp32; ``schedule`` as in :func:`solver_plan`."""
    B, D, k = J.shape
    plan = solver_plan(B, D, k, J.dtype, w is not None, J.device, schedule)
    G = None if plan.fused else _triton.gram(J, w)
    Minv = torch.empty(B, k, k, dtype=torch.float32, device=J.device)
    logdet = torch.empty(B, dtype=torch.float32, device=J.device)
    m_diag = torch.empty(B, k, dtype=torch.float32, device=J.device)
    beta_ptr = beta.device == J.device  # a host β is passed by value: no copy, no sync
    _triton.launch(
        _solve_kernel, (B,), J.device,
        J, J if w is None else w, Minv if G is None else G, beta if beta_ptr else float(beta),
        Minv, logdet, m_diag, D, k, block_size, *J.stride(), *((0, 0) if w is None else w.stride()),
        BETA_PTR=beta_ptr, FUSED=plan.fused, HAS_W=w is not None, MODE=plan.mode, ROWS=plan.rows,
        NB=plan.block, BLOCKS=plan.blocks, num_warps=plan.num_warps)
    return logdet, Minv, m_diag


IMPLEMENTATIONS = {"triton": _dispatch.Implementation(
    forward=forward, gram_backward=_triton.gram_backward, supports=_triton.unsupported)}
