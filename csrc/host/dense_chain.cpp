// Host path of fastjac/autodiff/dense_chain.py: the reverse of one layer's activation on the
// stacked rows, one pass over memory. The layer's output is the primal rows y = σ(p) (B, N) and
// the tangent rows u_j = σ′(p) ⊙ t_j (k·B, N), with gradients gy and gu; with σ′ and r = σ″/σ′
// written through y,
//   ∂p = σ′ gy + r Σ_j gu_j u_j,   ∂t_j = σ′ gu_j,
// into dY ((1 + k)·B, N: ∂p, then the ∂t_j), and, unless db is null, db = Σ_b ∂p_b (the bias
// gradient). dY may hold the gradients themselves (gy = dY, gu = dY + B·N): each element is read
// before it is written. Columns are split over threads, so each owns its slice of db.
#include <algorithm>
#include <stdexcept>
#include <vector>

#include "../fastjac/api.h"
#include "../fastjac/parallel.h"

namespace fastjac {
namespace host {
namespace {

// σ′ and r = σ″/σ′ from y = σ(p), per activation code (dense_chain.ACTIVATIONS); selects, not
// branches, so the loop vectorises. ReLU-like σ′ passes ∂ through untouched where it is 1 (as torch does).
template <int Act, class T>
inline void derivatives(T y, T param, T& d1, T& r) {
  if constexpr (Act == 0) { d1 = T(1); r = T(0); }                                 // identity
  if constexpr (Act == 1) { d1 = y > T(0) ? T(1) : y + param; r = y > T(0) ? T(0) : T(1); }  // ELU(α)
  if constexpr (Act == 2) { d1 = (T(1) - y) * y; r = T(1) - T(2) * y; }             // sigmoid
  if constexpr (Act == 3) { d1 = T(1) - y * y; r = T(-2) * y; }                      // tanh
  if constexpr (Act == 4) { d1 = y > T(0) ? T(1) : T(0); r = T(0); }                // ReLU
  if constexpr (Act == 5) { d1 = y > T(0) ? T(1) : param; r = T(0); }               // LeakyReLU(slope)
}

template <int Act, class T>
inline T scaled(T d1, T g) {  // σ′ ∂, with ReLU's zeros exact (a NaN ∂ where σ′ = 0 gives 0, as torch does)
  return Act == 4 ? (d1 > T(0) ? g : T(0)) : d1 * g;
}

// One row at a time, in short loops over the thread's columns that vectorise (one loop body
// each: u = Σ_j ∂u_j u_j into scratch, then ∂p, then each ∂t_j).
template <int Act, class T>
void backward(T param, int64_t B, int64_t k, int64_t N, const T* y_rows, const T* u_rows, const T* gy_rows,
              const T* gu_rows, T* dY, T* db, int threads) {
  constexpr bool kCurved = Act == 1 || Act == 2 || Act == 3;  // σ″ ≠ 0: the Σ_j gu_j u_j term
  const int64_t rows = B * N;
  parallel_for(N, double(B) * double(k + 1) * 4, threads, [&](int64_t n0, int64_t n1) {
    std::vector<T> scratch(size_t(n1 - n0), T(0));
    T* u = scratch.data() - n0;
    if (db) std::fill(db + n0, db + n1, T(0));
    for (int64_t b = 0; b < B; ++b) {
      const T* y = y_rows + b * N;
      const T* gy = gy_rows + b * N;
      for (int64_t j = 1; j <= k && kCurved; ++j) {
        const T* gu = gu_rows + (j - 1) * rows + b * N;
        const T* uj = u_rows + (j - 1) * rows + b * N;
        if (j == 1) {
#pragma omp simd
          for (int64_t n = n0; n < n1; ++n) u[n] = gu[n] * uj[n];
        } else {
#pragma omp simd
          for (int64_t n = n0; n < n1; ++n) u[n] += gu[n] * uj[n];
        }
      }
      T* dp = dY + b * N;
#pragma omp simd
      for (int64_t n = n0; n < n1; ++n) {
        T d1, r;
        derivatives<Act>(y[n], param, d1, r);
        dp[n] = kCurved ? scaled<Act>(d1, gy[n]) + r * u[n] : scaled<Act>(d1, gy[n]);
      }
      if (db) {
#pragma omp simd
        for (int64_t n = n0; n < n1; ++n) db[n] += dp[n];
      }
      for (int64_t j = 1; j <= k; ++j) {
        const T* gu = gu_rows + (j - 1) * rows + b * N;
        T* dt = dY + j * rows + b * N;
#pragma omp simd
        for (int64_t n = n0; n < n1; ++n) {
          T d1, r;
          derivatives<Act>(y[n], param, d1, r);
          dt[n] = scaled<Act>(d1, gu[n]);
        }
      }
    }
  });
}

}  // namespace

template <class T>
void dense_backward(int act, T param, int64_t B, int64_t k, int64_t N, const T* y, const T* u, const T* gy,
                    const T* gu, T* dY, T* db, int threads) {
  switch (act) {
    case 0: return backward<0>(param, B, k, N, y, u, gy, gu, dY, db, threads);
    case 1: return backward<1>(param, B, k, N, y, u, gy, gu, dY, db, threads);
    case 2: return backward<2>(param, B, k, N, y, u, gy, gu, dY, db, threads);
    case 3: return backward<3>(param, B, k, N, y, u, gy, gu, dY, db, threads);
    case 4: return backward<4>(param, B, k, N, y, u, gy, gu, dY, db, threads);
    case 5: return backward<5>(param, B, k, N, y, u, gy, gu, dY, db, threads);
  }
  throw std::invalid_argument("fastjac._C.dense_backward: activation code must be 0..5");
}

#define FASTJAC_INSTANTIATE(T) \
  template void dense_backward<T>(int, T, int64_t, int64_t, int64_t, const T*, const T*, const T*, const T*, T*, T*, \
                                  int);
FASTJAC_INSTANTIATE(float)
FASTJAC_INSTANTIATE(double)
#undef FASTJAC_INSTANTIATE

}  // namespace host
}  // namespace fastjac
