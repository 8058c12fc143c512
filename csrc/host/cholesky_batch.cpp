// Host path: the per-matrix arithmetic of fastjac/matrix.h (mask, Cholesky, log det, inverse),
// one matrix per task, the batch split over std::threads. The Gram matrices arrive computed
// (torch's matmul on the host: faster than hand-written passes at every d measured).
#include <algorithm>
#include <limits>
#include <vector>

#include "../fastjac/api.h"
#include "../fastjac/matrix.h"
#include "../fastjac/parallel.h"

namespace fastjac {
namespace host {
template <class T>
void factor(int64_t B, int d, const T* beta, int bs, T* L, T* logdet, T* diag, int threads) {
  const T inv_beta = T(1) / *beta;
  parallel_for(B, double(d) * d * d / 3, threads, [&](int64_t b0, int64_t b1) {
    std::vector<T> col(d);
    for (int64_t b = b0; b < b1; ++b) {
      T* a = L + b * int64_t(d) * d;
      shift_scale_mask(a, d, d, bs, inv_beta, SerialLanes{});
      copy_diagonal(a, d, d, diag ? diag + b * d : nullptr, SerialLanes{});
      logdet[b] = cholesky(a, d, d, bs, col.data(), SerialLanes{}) == 0
                      ? logdet_from_factor(a, d, d)
                      : std::numeric_limits<T>::quiet_NaN();
    }
  });
}

template <class T>
void inverse(int64_t B, int d, int bs, const T* L, T* out, int threads) {
  parallel_for(B, double(d) * d * d * 2 / 3, threads, [&](int64_t b0, int64_t b1) {
    std::vector<T> a(size_t(d) * d), dg(d);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t off = b * int64_t(d) * d;
      std::copy(L + off, L + off + int64_t(d) * d, a.begin());  // L itself is the caller's
      invert_factor(a.data(), d, d, bs, dg.data(), SerialLanes{});
      inverse_from_inverted(a.data(), d, d, bs, dg.data(), out + off, d, SerialLanes{});
    }
  });
}

#define FASTJAC_INSTANTIATE(T)                                            \
  template void factor<T>(int64_t, int, const T*, int, T*, T*, T*, int); \
  template void inverse<T>(int64_t, int, int, const T*, T*, int);
FASTJAC_INSTANTIATE(float)
FASTJAC_INSTANTIATE(double)
#undef FASTJAC_INSTANTIATE

}  // namespace host
}  // namespace fastjac
