// fastjac._C: pybind11 bindings. Arguments are plain integers (addresses, sizes, strides in
// elements); validation is the Python side's job. device < 0 runs the host path with `threads`
// threads; device >= 0 enqueues the CUDA kernels on `stream` (a cudaStream_t as an integer).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <stdexcept>

#include "fastjac/api.h"

namespace py = pybind11;
using fastjac::Problem;
using fastjac::View;
using Strided = std::array<int64_t, 4>;  // address, then up to three strides in elements

namespace {

View view(const Strided& s) { return View{s[0], s[1], s[2], s[3]}; }

Problem problem(int64_t B, int64_t D, int d, const Strided& J, const Strided& w) {
  Problem p;
  p.B = B, p.D = D, p.d = d, p.J = view(J), p.w = view(w);
  return p;
}

struct Target {  // where to run
  int device;
  int64_t stream;
  int threads;
};

// Calls f.template operator()<T>() with T the C++ type of `dtype` (0 float32, 1 float64).
template <class F>
auto by_dtype(int dtype, F f) {
  if (dtype == 0) return f(float{});
  if (dtype == 1) return f(double{});
  throw std::invalid_argument("fastjac._C: dtype code must be 0 (float32) or 1 (float64)");
}

template <class T> T* ptr(int64_t address) { return reinterpret_cast<T*>(address); }

// Host: L holds the Gram matrices (J must be absent); device: the kernel computes them from J.
// beta is an address in host memory (beta_on_host; read here, passed to the kernel by value) or
// in device memory (read by the kernel). diag (B, d) receives diag M unless it is 0.
void factor(int dtype, Target t, int64_t B, int64_t D, int d, Strided J, Strided w, int64_t beta,
            bool beta_on_host, int block_size, int64_t L, int64_t logdet, int64_t diag) {
  const Problem p = problem(B, D, d, J, w);
  if (t.device < 0 && p.J.ptr != 0)
    throw std::invalid_argument("fastjac._C.factor: the host path reads the Gram matrices from L; pass no J");
  py::gil_scoped_release release;
  by_dtype(dtype, [&](auto zero) {
    using T = decltype(zero);
    if (t.device >= 0) {
      fastjac::Scalar<T> b;
      if (beta_on_host) b.value = *ptr<T>(beta); else b.device = ptr<T>(beta);
      fastjac::cuda::factor<T>(p, b, block_size, ptr<T>(L), ptr<T>(logdet), ptr<T>(diag), t.device, t.stream);
    } else {
      if (!beta_on_host) throw std::invalid_argument("fastjac._C.factor: the host path needs beta in host memory");
      fastjac::host::factor<T>(B, d, ptr<T>(beta), block_size, ptr<T>(L), ptr<T>(logdet), ptr<T>(diag),
                               t.threads);
    }
  });
}

void inverse(int dtype, Target t, int64_t B, int d, int block_size, int64_t L, int64_t out) {
  py::gil_scoped_release release;
  by_dtype(dtype, [&](auto zero) {
    using T = decltype(zero);
    if (t.device >= 0)
      fastjac::cuda::inverse<T>(B, d, block_size, ptr<T>(L), ptr<T>(out), t.device, t.stream);
    else
      fastjac::host::inverse<T>(B, d, block_size, ptr<T>(L), ptr<T>(out), t.threads);
  });
}

// Device only: on the host the backward pass over J is torch's matmul.
void gram_backward(int dtype, Target t, int64_t B, int64_t D, int d, Strided J, Strided w, int64_t gamma,
                   int64_t grad_J, int64_t grad_w) {
  if (t.device < 0) throw std::invalid_argument("fastjac._C.gram_backward runs on CUDA tensors only");
  const Problem p = problem(B, D, d, J, w);
  py::gil_scoped_release release;
  by_dtype(dtype, [&](auto zero) {
    using T = decltype(zero);
    fastjac::cuda::gram_backward<T>(p, ptr<T>(gamma), ptr<T>(grad_J), ptr<T>(grad_w), t.device, t.stream);
  });
}

void dense_backward(int dtype, int act, double param, int64_t B, int64_t k, int64_t N, int64_t y, int64_t u,
                    int64_t gy, int64_t gu, int64_t dY, int64_t db, int threads) {
  py::gil_scoped_release release;
  by_dtype(dtype, [&](auto zero) {
    using T = decltype(zero);
    fastjac::host::dense_backward<T>(act, T(param), B, k, N, ptr<T>(y), ptr<T>(u), ptr<T>(gy), ptr<T>(gu), ptr<T>(dY),
                                     ptr<T>(db), threads);
  });
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastjac's compiled kernels: batched Cholesky log-determinant of I + J_wᵀJ_w/β (host and CUDA), the reverse of dense layers on stacked rows (host)";
  py::class_<Target>(m, "Target")
      .def(py::init<int, int64_t, int>(), py::arg("device"), py::arg("stream"), py::arg("threads"));
  m.attr("has_cuda") = fastjac::cuda::built();
  m.def("factor", &factor,
        "L = chol(I + mask*G/beta), log det (NaN where it failed) and diag(I + mask*G/beta) unless diag is 0; "
        "G from J on CUDA, in L on the host",
        py::arg("dtype"), py::arg("target"), py::arg("B"), py::arg("D"), py::arg("d"), py::arg("J"),
        py::arg("w"), py::arg("beta"), py::arg("beta_on_host"), py::arg("block_size"), py::arg("L"),
        py::arg("logdet"), py::arg("diag") = 0);
  m.def("inverse", &inverse, "M^-1 = (L L^T)^-1", py::arg("dtype"), py::arg("target"),
        py::arg("B"), py::arg("d"), py::arg("block_size"), py::arg("L"), py::arg("out"));
  m.def("gram_backward", &gram_backward, "grad_J = 2 W J Gamma, grad_w = rowsum(J Gamma * J) (CUDA)",
        py::arg("dtype"), py::arg("target"), py::arg("B"), py::arg("D"), py::arg("d"), py::arg("J"),
        py::arg("w"), py::arg("gamma"), py::arg("grad_J"), py::arg("grad_w"));
  m.def("dense_backward", &dense_backward,
        "reverse of a dense layer's activation on stacked rows (host; contiguous; dY may hold gy, gu; db may be 0)",
        py::arg("dtype"), py::arg("act"), py::arg("param"), py::arg("B"), py::arg("k"), py::arg("N"),
        py::arg("y"), py::arg("u"), py::arg("gy"), py::arg("gu"), py::arg("dY"), py::arg("db"), py::arg("threads"));
}
