"""Sources of the compiled extension ``fastjac._C`` (see build.py for what setup.py builds).

fastjac/  host+device headers: hd.h (the FASTJAC_HD macro), matrix.h (per-matrix arithmetic),
          api.h (entry points); host/cholesky_batch.cpp (factor and inverse, threads over the
          batch; the Gram comes from torch's matmul); cuda/gram_cholesky.cu (Gram fused into the
          factorisation, one matrix per thread block; inverse; backward pass over J) or
          cuda/stub.cpp when built without CUDA; bindings.cpp.
"""
