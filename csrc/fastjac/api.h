// The entry points the bindings call, for the host (host/kernels.cpp) and, when built, the
// device (cuda/kernels.cu). No libtorch: tensors arrive as a data address and strides in
// elements; outputs are contiguous arrays the caller allocated.
#pragma once
#include <stdint.h>

#include "hd.h"

namespace fastjac {

struct View {  // a strided array: address (0 = absent) and strides in elements
  int64_t ptr = 0, s0 = 0, s1 = 0, s2 = 0;
  template <class T> FASTJAC_HD T* at() const { return reinterpret_cast<T*>(ptr); }
};

struct Problem {  // J (B, D, d) and the optional weights w (B, D)
  int64_t B = 0, D = 0;
  int d = 0;
  View J, w;
};

namespace host {
// L = chol(I + mask ⊙ JᵀWJ / β) (B, d, d) and log det (B,); returns the first batch index whose
// factorisation failed (its log det is NaN), or -1. When J is absent (address 0), L already
// holds the Gram matrices JᵀWJ (computed elsewhere) and is factorised in place.
template <class T> int64_t factor(const Problem& p, const T* beta, int bs, T* L, T* logdet, int threads);
// out = M⁻¹ = (L Lᵀ)⁻¹ (B, d, d) and trace (B,) (trace may be null).
template <class T> void inverse(int64_t B, int d, int bs, const T* L, T* out, T* trace, int threads);
// grad_J = 2 W J Γ_b s_b (B, D, d), grad_w = rowsum((J Γ_b s_b) ⊙ J) (B, D); either may be
// null; scale s (B,) null means 1.
template <class T> void gram_pass(const Problem& p, const T* gamma, const T* scale, T* grad_J,
                                  T* grad_w, int threads);
}  // namespace host

namespace cuda {
bool built();
// Same contracts, on `device`, enqueued on `stream` (a cudaStream_t as an integer); factor does
// not synchronise: a failed factorisation leaves log det NaN.
template <class T> void factor(const Problem& p, const T* beta, int bs, T* L, T* logdet, int device, int64_t stream);
template <class T> void inverse(int64_t B, int d, int bs, const T* L, T* out, T* trace, int device, int64_t stream);
template <class T> void gram_pass(const Problem& p, const T* gamma, const T* scale, T* grad_J, T* grad_w,
                                  int device, int64_t stream);
}  // namespace cuda

// The device entry points' explicit instantiations, shared by cuda/kernels.cu and cuda/stub.cpp
// (used inside namespace fastjac::cuda), so the two can never disagree on the signatures.
#define FASTJAC_CUDA_INSTANTIATE(T)                                                                  \
  template void factor<T>(const Problem&, const T*, int, T*, T*, int, int64_t);                    \
  template void inverse<T>(int64_t, int, int, const T*, T*, T*, int, int64_t);                     \
  template void gram_pass<T>(const Problem&, const T*, const T*, T*, T*, int, int64_t);

}  // namespace fastjac
