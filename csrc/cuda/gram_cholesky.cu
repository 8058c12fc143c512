// Device path: the Gram matrix fused into the factorisation (one matrix per thread block, M in
// shared memory, row stride d + 1 so the rows that neighbouring threads walk fall in different
// banks), its inverse, and the backward pass over J. The per-matrix arithmetic is
// fastjac/matrix.h (the host's too), run by BlockLanes. d is limited by the shared memory of one block (the Python side refuses
// d > 128). Every CUDA call is checked; launches go on the caller's stream and device.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "../fastjac/api.h"
#include "../fastjac/matrix.h"

namespace fastjac {
namespace cuda {
namespace {

struct BlockLanes {
  __device__ int id() const { return threadIdx.x; }
  __device__ int count() const { return blockDim.x; }
  __device__ void sync() const { __syncthreads(); }
};

constexpr int kThreads = 256;

void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess)
    throw std::runtime_error(std::string("fastjac CUDA: ") + what + ": " + cudaGetErrorString(status));
}

class DeviceGuard {  // run on the tensor's device, restore the caller's afterwards
 public:
  explicit DeviceGuard(int device) {
    check(cudaGetDevice(&previous_), "cudaGetDevice");
    if (device != previous_) check(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() { cudaSetDevice(previous_); }

 private:
  int previous_ = 0;
};

// Allow `bytes` of dynamic shared memory for `kernel`, or say why d is too large.
template <class K>
void reserve_shared(K kernel, size_t bytes, int device) {
  int limit = 0;
  check(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device), "cudaDeviceGetAttribute");
  if (bytes > size_t(limit))
    throw std::invalid_argument("fastjac CUDA: d is too large for one thread block (" + std::to_string(bytes) +
                                " bytes of shared memory needed, " + std::to_string(limit) + " available)");
  check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)),
        "cudaFuncSetAttribute");
}

template <class T>
__global__ void factor_kernel(Problem p, Scalar<T> beta, int bs, T* L, T* logdet, T* diag) {
  extern __shared__ unsigned char smem[];
  const int d = p.d;
  const int64_t ld = d + 1;
  T* a = reinterpret_cast<T*>(smem);
  T* col = a + d * ld;
  const int64_t b = blockIdx.x;
  const T* J = p.J.at<T>() + b * p.J.s0;
  const T* w = p.w.ptr ? p.w.at<T>() + b * p.w.s0 : nullptr;
  // Gram: one lane per lower entry (i, k) inside the blocks, summed over the D rows.
  const int64_t entries = int64_t(d) * (d + 1) / 2;
  T* out = L + b * int64_t(d) * d;
  for (int64_t e = threadIdx.x; e < entries; e += blockDim.x) {
    int i = int((sqrt(8.0 * double(e) + 1.0) - 1.0) / 2.0);
    while (int64_t(i) * (i + 1) / 2 > e) --i;
    while (int64_t(i + 1) * (i + 2) / 2 <= e) ++i;
    const int k = int(e - int64_t(i) * (i + 1) / 2);
    T s = T(0);
    if (k >= block_begin(i, bs))
      for (int64_t r = 0; r < p.D; ++r) {
        const T* row = J + r * p.J.s1;
        s += (w ? w[r * p.w.s1] : T(1)) * row[i * p.J.s2] * row[k * p.J.s2];
      }
    a[i * ld + k] = s;
  }
  __syncthreads();
  const BlockLanes lanes;
  shift_scale_mask(a, ld, d, bs, T(1) / beta.get(), lanes);
  copy_diagonal(a, ld, d, diag ? diag + b * d : nullptr, lanes);
  const int failed = cholesky(a, ld, d, bs, col, lanes);
  for (int64_t e = threadIdx.x; e < int64_t(d) * d; e += blockDim.x) out[e] = a[(e / d) * ld + e % d];
  if (threadIdx.x == 0) logdet[b] = failed ? T(NAN) : logdet_from_factor(a, ld, d);
}

template <class T>
__global__ void inverse_kernel(int d, int bs, const T* L, T* out) {
  extern __shared__ unsigned char smem[];
  const int64_t ld = d + 1;
  T* a = reinterpret_cast<T*>(smem);
  T* dg = a + d * ld;
  const int64_t off = int64_t(blockIdx.x) * d * d;
  for (int64_t e = threadIdx.x; e < int64_t(d) * d; e += blockDim.x) a[(e / d) * ld + e % d] = L[off + e];
  __syncthreads();
  const BlockLanes lanes;
  invert_factor(a, ld, d, bs, dg, lanes);
  inverse_from_inverted(a, ld, d, bs, dg, out + off, d, lanes);
}

// grid (B, row chunks): Γ_b in shared memory, one lane per row r of J.
template <class T>
__global__ void gram_backward_kernel(Problem p, const T* gamma, T* grad_J, T* grad_w) {
  extern __shared__ unsigned char smem[];
  const int d = p.d;
  T* g = reinterpret_cast<T*>(smem);
  const int64_t b = blockIdx.x;
  for (int64_t e = threadIdx.x; e < int64_t(d) * d; e += blockDim.x) g[e] = gamma[b * d * d + e];
  __syncthreads();
  const int64_t r = int64_t(blockIdx.y) * blockDim.x + threadIdx.x;
  if (r >= p.D) return;
  const T* row = p.J.at<T>() + b * p.J.s0 + r * p.J.s1;
  const T f = T(2) * (p.w.ptr ? p.w.at<T>()[b * p.w.s0 + r * p.w.s1] : T(1));
  T dot = T(0);
  for (int c = 0; c < d; ++c) {
    T acc = T(0);
    for (int k = 0; k < d; ++k) acc += row[k * p.J.s2] * g[k * d + c];
    if (grad_J) grad_J[(b * p.D + r) * d + c] = f * acc;
    dot += acc * row[c * p.J.s2];
  }
  if (grad_w) grad_w[b * p.D + r] = dot;
}

}  // namespace

bool built() { return true; }

template <class T>
void factor(const Problem& p, Scalar<T> beta, int bs, T* L, T* logdet, T* diag, int device, int64_t stream) {
  if (p.B == 0) return;
  DeviceGuard guard(device);
  const size_t bytes = sizeof(T) * (size_t(p.d) * (p.d + 1) + p.d);
  reserve_shared(factor_kernel<T>, bytes, device);
  factor_kernel<T><<<unsigned(p.B), kThreads, bytes, reinterpret_cast<cudaStream_t>(stream)>>>(p, beta, bs, L, logdet,
                                                                                               diag);
  check(cudaGetLastError(), "factor_kernel launch");
}

template <class T>
void inverse(int64_t B, int d, int bs, const T* L, T* out, int device, int64_t stream) {
  if (B == 0) return;
  DeviceGuard guard(device);
  const size_t bytes = sizeof(T) * (size_t(d) * (d + 1) + d);
  reserve_shared(inverse_kernel<T>, bytes, device);
  inverse_kernel<T><<<unsigned(B), kThreads, bytes, reinterpret_cast<cudaStream_t>(stream)>>>(d, bs, L, out);
  check(cudaGetLastError(), "inverse_kernel launch");
}

template <class T>
void gram_backward(const Problem& p, const T* gamma, T* grad_J, T* grad_w, int device, int64_t stream) {
  if (p.B == 0 || p.D == 0) return;
  DeviceGuard guard(device);
  const size_t bytes = sizeof(T) * size_t(p.d) * p.d;
  reserve_shared(gram_backward_kernel<T>, bytes, device);
  const dim3 grid(unsigned(p.B), unsigned((p.D + kThreads - 1) / kThreads));
  gram_backward_kernel<T><<<grid, kThreads, bytes, reinterpret_cast<cudaStream_t>(stream)>>>(p, gamma, grad_J, grad_w);
  check(cudaGetLastError(), "gram_backward_kernel launch");
}

FASTJAC_CUDA_INSTANTIATE(float)
FASTJAC_CUDA_INSTANTIATE(double)

}  // namespace cuda
}  // namespace fastjac
