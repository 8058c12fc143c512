// Linked instead of cuda/gram_cholesky.cu when the extension is built without CUDA: the device entry
// points exist but say so.
#include <stdexcept>

#include "../fastjac/api.h"

namespace fastjac {
namespace cuda {

bool built() { return false; }

namespace {
[[noreturn]] void missing() {
  throw std::runtime_error(
      "fastjac._C was built without CUDA support (no nvcc at install time, or FASTJAC_CUDA=0); "
      "reinstall with nvcc on PATH and FASTJAC_CUDA=1");
}
}  // namespace

template <class T> void factor(const Problem&, Scalar<T>, int, T*, T*, T*, int, int64_t) { missing(); }
template <class T> void inverse(int64_t, int, int, const T*, T*, int, int64_t) { missing(); }
template <class T> void gram_backward(const Problem&, const T*, T*, T*, int, int64_t) { missing(); }

FASTJAC_CUDA_INSTANTIATE(float)
FASTJAC_CUDA_INSTANTIATE(double)

}  // namespace cuda
}  // namespace fastjac
