"""Sources of the compiled extension ``fastjac._C`` (see build.py for what setup.py builds).

fastjac/  host+device headers: hd.h (the FASTJAC_HD macro), matrix.h (per-matrix arithmetic),
          api.h (entry points); host/kernels.cpp (threads over the batch); cuda/kernels.cu
          (one matrix per thread block) or cuda/stub.cpp when built without CUDA; bindings.cpp.
"""
