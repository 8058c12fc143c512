// The entry points the bindings call, for the host (host/cholesky_batch.cpp) and, when built,
// the device (cuda/gram_cholesky.cu). No libtorch: tensors arrive as a data address and strides in
// elements; outputs are contiguous arrays the caller allocated.
#pragma once
#include <stdint.h>

#include "hd.h"

namespace fastjac {

struct View {  // a strided array: address (0 = absent) and strides in elements
  int64_t ptr = 0, s0 = 0, s1 = 0, s2 = 0;
  template <class T> FASTJAC_HD T* at() const { return reinterpret_cast<T*>(ptr); }
};

template <class T>
struct Scalar {  // a kernel argument: the value itself, or (device != null) where it lies on the device
  const T* device = nullptr;
  T value = T(0);
  FASTJAC_HD T get() const { return device ? *device : value; }
};

struct Problem {  // J (B, D, d) and the optional weights w (B, D)
  int64_t B = 0, D = 0;
  int d = 0;
  View J, w;
};

namespace host {
// L holds the Gram matrices JᵀWJ (B, d, d; lower triangle read); overwritten by the lower Cholesky
// factor of M = I + mask ⊙ G / β, with log det M in logdet (B,): NaN where the factorisation
// failed (rounding broke positive definiteness, or non-finite input), and diag M in diag (B, d)
// unless diag is null.
template <class T> void factor(int64_t B, int d, const T* beta, int bs, T* L, T* logdet, T* diag, int threads);
// out = M⁻¹ = (L Lᵀ)⁻¹ (B, d, d), block-diagonal for bs < d.
template <class T> void inverse(int64_t B, int d, int bs, const T* L, T* out, int threads);
// The reverse of one dense layer's activation on stacked rows (host/dense_chain.cpp): y (B, N)
// and u (k·B, N) the layer's primal and tangent outputs, gy and gu their gradients, dY
// ((1 + k)·B, N; may hold gy, gu) the gradient of the pre-activation, db (N; null: skipped) the
// bias gradient; act 0 identity, 1 ELU(param), 2 sigmoid, 3 tanh, 4 ReLU, 5 LeakyReLU(param).
template <class T> void dense_backward(int act, T param, int64_t B, int64_t k, int64_t N, const T* y, const T* u,
                                       const T* gy, const T* gu, T* dY, T* db, int threads);
}  // namespace host

namespace cuda {
bool built();
// The device twins, on `device`, enqueued on `stream` (a cudaStream_t as an integer); nothing
// synchronises; β is a kernel argument (no copy) when it lives on the host. factor computes the Gram
// matrices from p.J, p.w itself (fused) and writes diag M unless diag is null; gram_backward
// writes grad_J = 2 W J Γ_b (B, D, d) and grad_w = rowsum((J Γ_b) ⊙ J) (B, D), either may be null.
template <class T> void factor(const Problem& p, Scalar<T> beta, int bs, T* L, T* logdet, T* diag, int device,
                               int64_t stream);
template <class T> void inverse(int64_t B, int d, int bs, const T* L, T* out, int device, int64_t stream);
template <class T> void gram_backward(const Problem& p, const T* gamma, T* grad_J, T* grad_w, int device,
                                      int64_t stream);
}  // namespace cuda

// The device entry points' explicit instantiations, shared by cuda/gram_cholesky.cu and
// cuda/stub.cpp (used inside namespace fastjac::cuda), so the two can never disagree on the signatures.
#define FASTJAC_CUDA_INSTANTIATE(T)                                                                  \
  template void factor<T>(const Problem&, Scalar<T>, int, T*, T*, T*, int, int64_t);               \
  template void inverse<T>(int64_t, int, int, const T*, T*, int, int64_t);                         \
  template void gram_backward<T>(const Problem&, const T*, T*, T*, int, int64_t);

}  // namespace fastjac
