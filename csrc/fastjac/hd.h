// One source for host and device (the NVIDIA Warp pattern): functions marked FASTJAC_HD compile
// as __host__ __device__ under nvcc and as plain C++ otherwise. A "Lanes" object says which
// share of a loop this caller runs and how to wait for the others: SerialLanes (one host thread
// does everything) here, BlockLanes (the threads of a CUDA block) in cuda/gram_cholesky.cu.
#pragma once
#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__)
#define FASTJAC_HD __host__ __device__ __forceinline__
#define FASTJAC_SIMD_SUM(var)
#else
#define FASTJAC_HD inline
#define FASTJAC_PRAGMA(x) _Pragma(#x)
// Vectorise a dot-product loop (a reduction the compiler may not reorder by itself).
#define FASTJAC_SIMD_SUM(var) FASTJAC_PRAGMA(omp simd reduction(+ : var))
#endif

namespace fastjac {

struct SerialLanes {
  FASTJAC_HD int id() const { return 0; }
  FASTJAC_HD int count() const { return 1; }
  FASTJAC_HD void sync() const {}
};

FASTJAC_HD float sqrt_(float x) { return sqrtf(x); }
FASTJAC_HD double sqrt_(double x) { return sqrt(x); }
FASTJAC_HD float log_(float x) { return logf(x); }
FASTJAC_HD double log_(double x) { return log(x); }

}  // namespace fastjac
