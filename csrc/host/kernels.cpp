// Host path: the per-matrix arithmetic of fastjac/matrix.h, one matrix per task, the batch split
// over std::threads; the two passes over J (the Gram and J Γ) use a register-tiled
// broadcast-times-vector kernel that the compiler vectorises.
#include <algorithm>
#include <atomic>
#include <limits>
#include <type_traits>
#include <thread>
#include <vector>

#include "../fastjac/api.h"
#include "../fastjac/matrix.h"

namespace fastjac {
namespace host {
namespace {

// Multiply-adds worth a thread of its own: below this a started thread costs more than it saves
// (on a loaded machine a new thread can wait milliseconds for a core).
constexpr double kGrain = 4e6;

// Runs body(begin, end) over [0, n) split into at most `threads` contiguous chunks, fewer when
// the items (`cost` multiply-adds each) are too little work to share.
template <class F>
void parallel_for(int64_t n, double cost, int threads, F body) {
  const int64_t by_work = int64_t(double(n) * cost / kGrain);
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>({int64_t(threads), n, by_work}));
  if (workers == 1) return body(int64_t(0), n);
  std::vector<std::thread> pool;
  for (int64_t t = 1; t < workers; ++t)
    pool.emplace_back(body, n * t / workers, n * (t + 1) / workers);
  body(int64_t(0), n / workers);
  for (auto& th : pool) th.join();
}

// out[t][c] = Σ_k wt_k · a[t·ats + k·aks] · b[k·bks + c] for t < R, c < C (wt null means 1).
// The R·C accumulators are explicit vectors (GCC/Clang vector extensions; lowered to whatever
// width the target has), so they stay in registers and the k loop is never vectorised itself.
template <int R, int C, bool Weighted, class T, class Stride>
inline void tile(int64_t K, const T* a, int64_t ats, Stride aks, const T* wt, int64_t ws,
                 const T* b, int64_t bks, T* out, int64_t ots) {
  constexpr int W = C < 64 / int(sizeof(T)) ? C : 64 / int(sizeof(T));  // lanes per vector
  constexpr int N = C / W;                                                // vectors per row
  typedef T vec __attribute__((vector_size(W * sizeof(T))));
  vec acc[R][N];
  for (int t = 0; t < R; ++t)
    for (int v = 0; v < N; ++v) acc[t][v] = vec{};
  for (int64_t k = 0; k < K; ++k) {
    vec bk[N];
    __builtin_memcpy(bk, b + k * bks, sizeof(bk));
    const T wk = Weighted ? wt[k * ws] : T(1);
#pragma GCC unroll 8
    for (int t = 0; t < R; ++t) {
      const T at = Weighted ? a[t * ats + k * aks] * wk : a[t * ats + k * aks];
#pragma GCC unroll 8
      for (int v = 0; v < N; ++v) acc[t][v] += at * bk[v];
    }
  }
  for (int t = 0; t < R; ++t) __builtin_memcpy(out + t * ots, acc[t], sizeof(acc[t]));
}

// The columns [0, n) of an R-row block, in tiles of two vectors, one vector, then halves.
template <int R, bool Weighted, class T, class Stride>
inline void tile_columns(int64_t K, const T* a, int64_t ats, Stride aks, const T* wt, int64_t ws,
                         const T* b, int64_t bks, int n, T* out, int64_t ots) {
  constexpr int V = 64 / sizeof(T);  // one 512-bit vector
  int c = 0;
  for (; c + 2 * V <= n; c += 2 * V) tile<R, 2 * V, Weighted>(K, a, ats, aks, wt, ws, b + c, bks, out + c, ots);
#define FASTJAC_TAIL(W) \
  if (c + (W) <= n) { tile<R, (W), Weighted>(K, a, ats, aks, wt, ws, b + c, bks, out + c, ots); c += (W); }
  FASTJAC_TAIL(V) FASTJAC_TAIL(V / 2) FASTJAC_TAIL(V / 4)
  if constexpr (V >= 16) { FASTJAC_TAIL(V / 8) }
#undef FASTJAC_TAIL
  for (; c < n; ++c) tile<R, 1, Weighted>(K, a, ats, aks, wt, ws, b + c, bks, out + c, ots);
}

// tile_columns with the weighted / unit-stride cases made compile-time.
template <int R, class T>
inline void tile_row(int64_t K, const T* a, int64_t ats, int64_t aks, const T* wt, int64_t ws,
                     const T* b, int64_t bks, int n, T* out, int64_t ots) {
  if (wt)
    tile_columns<R, true>(K, a, ats, aks, wt, ws, b, bks, n, out, ots);
  else if (aks == 1)  // rows of J along k (the backward's J Γ): constant stride, simpler addressing
    tile_columns<R, false>(K, a, ats, std::integral_constant<int64_t, 1>{}, wt, ws, b, bks, n, out, ots);
  else
    tile_columns<R, false>(K, a, ats, aks, wt, ws, b, bks, n, out, ots);
}

constexpr int kRows = 8;

// Lower triangle (inside the blocks) of G = Jᵀ diag(w) J for one matrix into a (row stride d).
// J rows have stride jr and unit column stride; w has stride ws (null: no weights).
template <class T>
void gram_lower(const T* J, int64_t jr, const T* w, int64_t ws, int64_t D, int d, int bs, T* a) {
  int i = 0;
  for (; i + kRows <= d; i += kRows) {
    const int c0 = block_begin(i, bs);
    tile_row<kRows>(D, J + i, 1, jr, w, ws, J + c0, jr, i + kRows - c0, a + int64_t(i) * d + c0, d);
  }
  for (; i < d; ++i) {
    const int c0 = block_begin(i, bs);
    tile_row<1>(D, J + i, 1, jr, w, ws, J + c0, jr, i + 1 - c0, a + int64_t(i) * d + c0, d);
  }
}

}  // namespace

template <class T>
int64_t factor(const Problem& p, const T* beta, int bs, T* L, T* logdet, int threads) {
  const int d = p.d;
  const T inv_beta = T(1) / *beta;
  std::atomic<int64_t> failed{std::numeric_limits<int64_t>::max()};
  const double cost = p.J.ptr ? double(p.D) * d * d / 2 + double(d) * d * d / 3 : double(d) * d * d / 3;
  parallel_for(p.B, cost, threads, [&](int64_t b0, int64_t b1) {
    std::vector<T> col(d), packed;
    for (int64_t b = b0; b < b1; ++b) {
      T* a = L + b * int64_t(d) * d;
      if (p.J.ptr) {
        const T* J = p.J.at<T>() + b * p.J.s0;
        int64_t jr = p.J.s1;
        if (p.J.s2 != 1) {  // the Gram kernel reads contiguous rows: pack this matrix
          packed.resize(size_t(p.D) * d);
          for (int64_t r = 0; r < p.D; ++r)
            for (int c = 0; c < d; ++c) packed[r * d + c] = J[r * p.J.s1 + c * p.J.s2];
          J = packed.data();
          jr = d;
        }
        const T* w = p.w.ptr ? p.w.at<T>() + b * p.w.s0 : nullptr;
        gram_lower(J, jr, w, p.w.s1, p.D, d, bs, a);
      }
      shift_scale_mask(a, d, d, bs, inv_beta, SerialLanes{});
      if (cholesky(a, d, d, bs, col.data(), SerialLanes{}) == 0) {
        logdet[b] = logdet_from_factor(a, d, d);
      } else {
        logdet[b] = std::numeric_limits<T>::quiet_NaN();
        int64_t seen = failed.load();
        while (b < seen && !failed.compare_exchange_weak(seen, b)) {}
      }
    }
  });
  const int64_t first = failed.load();
  return first == std::numeric_limits<int64_t>::max() ? -1 : first;
}

template <class T>
void inverse(int64_t B, int d, int bs, const T* L, T* out, T* trace, int threads) {
  parallel_for(B, double(d) * d * d * 2 / 3, threads, [&](int64_t b0, int64_t b1) {
    std::vector<T> a(size_t(d) * d), dg(d);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t off = b * int64_t(d) * d;
      std::copy(L + off, L + off + int64_t(d) * d, a.begin());  // L itself is the caller's
      invert_factor(a.data(), d, d, bs, dg.data(), SerialLanes{});
      inverse_from_inverted(a.data(), d, d, bs, dg.data(), out + off, d, SerialLanes{});
      if (trace) {
        T s = T(0);
        for (int i = 0; i < d; ++i) s += out[off + int64_t(i) * d + i];
        trace[b] = s;
      }
    }
  });
}

template <class T>
void gram_pass(const Problem& p, const T* gamma, const T* scale, T* grad_J, T* grad_w, int threads) {
  const int d = p.d;
  const bool unit = p.J.s2 == 1;
  parallel_for(p.B, double(p.D) * d * d, threads, [&](int64_t b0, int64_t b1) {
    std::vector<T> scratch(grad_J ? 0 : size_t(kRows) * d);  // J Γ rows when grad_J is not wanted
    for (int64_t b = b0; b < b1; ++b) {
      const T* J = p.J.at<T>() + b * p.J.s0;
      const T* w = p.w.ptr ? p.w.at<T>() + b * p.w.s0 : nullptr;
      const T* G = gamma + b * int64_t(d) * d;
      const T s = scale ? scale[b] : T(1);
      for (int64_t r0 = 0; r0 < p.D; r0 += kRows) {
        const int rows = int(std::min<int64_t>(kRows, p.D - r0));
        const T* Jr = J + r0 * p.J.s1;
        T* out = grad_J ? grad_J + (b * p.D + r0) * d : scratch.data();  // J Γ first, scaled below
        if (rows == kRows)
          tile_row<kRows>(d, Jr, p.J.s1, p.J.s2, (const T*)nullptr, 0, G, d, d, out, d);
        else
          for (int t = 0; t < rows; ++t)
            tile_row<1>(d, Jr + t * p.J.s1, 0, p.J.s2, (const T*)nullptr, 0, G, d, d, out + t * d, d);
        for (int t = 0; t < rows; ++t) {
          const int64_t r = r0 + t;
          T* row = out + t * d;
          if (grad_w) {  // J_r Γ J_rᵀ s, before row is scaled
            const T* jrow = Jr + t * p.J.s1;
            T acc = T(0);
            if (unit) {
              FASTJAC_SIMD_SUM(acc)
              for (int c = 0; c < d; ++c) acc += row[c] * jrow[c];
            } else {
              for (int c = 0; c < d; ++c) acc += row[c] * jrow[c * p.J.s2];
            }
            grad_w[b * p.D + r] = s * acc;
          }
          if (grad_J) {
            const T f = T(2) * s * (w ? w[r * p.w.s1] : T(1));
#pragma omp simd
            for (int c = 0; c < d; ++c) row[c] *= f;
          }
        }
      }
    }
  });
}

#define FASTJAC_INSTANTIATE(T)                                                                  \
  template int64_t factor<T>(const Problem&, const T*, int, T*, T*, int);                      \
  template void inverse<T>(int64_t, int, int, const T*, T*, T*, int);                          \
  template void gram_pass<T>(const Problem&, const T*, const T*, T*, T*, int);
FASTJAC_INSTANTIATE(float)
FASTJAC_INSTANTIATE(double)
#undef FASTJAC_INSTANTIATE

}  // namespace host
}  // namespace fastjac
