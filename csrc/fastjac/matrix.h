// Per-matrix arithmetic of M = I + mask ⊙ G / β (G = J_wᵀJ_w): its Cholesky factor, log det and
// inverse, for the host and the device alike (see hd.h). Matrices are d×d, row-major with row
// stride ld. The Fischer mask keeps only the diagonal blocks of bs consecutive latents; every
// loop stays inside a block, so small blocks also cost less (bs >= d is the exact matrix).
// Lanes split the rows of a matrix; each lane's inner loop runs over a contiguous row segment
// (it vectorises on the host; on the device ld = d + 1 spreads the rows over shared-memory banks).
#pragma once
#include "hd.h"

namespace fastjac {

FASTJAC_HD int block_begin(int i, int bs) { return (i / bs) * bs; }
FASTJAC_HD int block_end(int i, int bs, int d) {
  const int e = (i / bs + 1) * bs;
  return e < d ? e : d;
}

// a holds G in its lower triangle (inside the blocks); make it M = I + G/β in the lower
// triangle and zero everywhere else (off-block and upper).
template <class T, class Lanes>
FASTJAC_HD void shift_scale_mask(T* a, int64_t ld, int d, int bs, T inv_beta, const Lanes& lanes) {
  for (int i = lanes.id(); i < d; i += lanes.count()) {
    T* row = a + i * ld;
    const int b0 = block_begin(i, bs);
    for (int k = 0; k < b0; ++k) row[k] = T(0);
    for (int k = b0; k < i; ++k) row[k] *= inv_beta;
    row[i] = T(1) + row[i] * inv_beta;
    for (int k = i + 1; k < d; ++k) row[k] = T(0);
  }
  lanes.sync();
}

// diag[i] = a[i][i] (diag may be null: nothing to do): M's diagonal, kept before the Cholesky
// overwrites it (the float32 error estimate needs M_ii = 1 + ‖J_w e_i‖²/β).
template <class T, class Lanes>
FASTJAC_HD void copy_diagonal(const T* a, int64_t ld, int d, T* diag, const Lanes& lanes) {
  if (diag == nullptr) return;
  for (int i = lanes.id(); i < d; i += lanes.count()) diag[i] = a[i * ld + i];
  lanes.sync();
}

// In-place lower Cholesky factor of the block-diagonal SPD matrix in a's lower triangle
// (right-looking; col is d values of scratch). Returns 0, or j + 1 for the first column whose
// pivot is not positive (rounding broke positive definiteness); every lane returns the same.
template <class T, class Lanes>
FASTJAC_HD int cholesky(T* a, int64_t ld, int d, int bs, T* col, const Lanes& lanes) {
  for (int j = 0; j < d; ++j) {
    const T pivot = a[j * ld + j];
    if (!(pivot > T(0))) return j + 1;  // also false for NaN
    const T ljj = sqrt_(pivot), inv = T(1) / ljj;
    const int e = block_end(j, bs, d);
    for (int i = j + 1 + lanes.id(); i < e; i += lanes.count()) {
      const T v = a[i * ld + j] * inv;
      a[i * ld + j] = v;
      col[i] = v;
    }
    lanes.sync();
    for (int i = j + 1 + lanes.id(); i < e; i += lanes.count()) {
      const T ci = col[i];
      T* row = a + i * ld;
      for (int k = j + 1; k <= i; ++k) row[k] -= ci * col[k];
    }
    lanes.sync();  // every lane has read a[j][j] as the pivot
    if (lanes.id() == 0) a[j * ld + j] = ljj;
  }
  lanes.sync();
  return 0;
}

// log det M = 2 Σ log L_ii.
template <class T>
FASTJAC_HD T logdet_from_factor(const T* a, int64_t ld, int d) {
  T s = T(0);
  for (int i = 0; i < d; ++i) s += log_(a[i * ld + i]);
  return T(2) * s;
}

// With L in a's lower triangle (diagonal included), write X = L⁻ᵀ (upper triangular) into
// a's strict upper triangle and X's diagonal 1/L_ii into dg: row k of X is column k of L⁻¹,
// found by forward substitution inside k's block. Lanes never write what others read.
template <class T, class Lanes>
FASTJAC_HD void invert_factor(T* a, int64_t ld, int d, int bs, T* dg, const Lanes& lanes) {
  for (int k = lanes.id(); k < d; k += lanes.count()) {
    const int e = block_end(k, bs, d);
    T* xk = a + k * ld;
    const T dk = T(1) / xk[k];
    dg[k] = dk;
    for (int i = k + 1; i < e; ++i) {
      const T* li = a + i * ld;
      T s = li[k] * dk;
      FASTJAC_SIMD_SUM(s)
      for (int m = k + 1; m < i; ++m) s += li[m] * xk[m];
      xk[i] = -s / li[i];
    }
  }
  lanes.sync();
}

// M⁻¹ = L⁻ᵀL⁻¹ = X Xᵀ (X = L⁻ᵀ from invert_factor), full and symmetric, into out (row stride ldo).
template <class T, class Lanes>
FASTJAC_HD void inverse_from_inverted(const T* a, int64_t ld, int d, int bs, const T* dg, T* out,
                                      int64_t ldo, const Lanes& lanes) {
  for (int i = lanes.id(); i < d; i += lanes.count()) {
    const int b0 = block_begin(i, bs), e = block_end(i, bs, d);
    const T* xi = a + i * ld;
    T* oi = out + i * ldo;
    for (int k = 0; k < b0; ++k) oi[k] = T(0);
    for (int k = e; k < d; ++k) oi[k] = T(0);
    for (int k = b0; k <= i; ++k) {  // (M⁻¹)_ik = Σ_{m >= i} X_im X_km for k <= i
      const T* xk = a + k * ld;
      T s = dg[i] * (k == i ? dg[i] : xk[i]);
      FASTJAC_SIMD_SUM(s)
      for (int m = i + 1; m < e; ++m) s += xi[m] * xk[m];
      oi[k] = s;
      out[k * ldo + i] = s;
    }
  }
  lanes.sync();
}

}  // namespace fastjac
