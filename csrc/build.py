"""What setup.py compiles: the optional extension ``fastjac._C`` from csrc/.

- The host path (C++17, pybind11, no libtorch) is built whenever a C++ compiler works.
- The CUDA kernels (csrc/cuda/gram_cholesky.cu) are added when ``nvcc`` is found; without them
  csrc/cuda/stub.cpp is linked, whose entry points say the CUDA path was not built.
- Nothing compiles: a warning, and the package installs pure Python (``fastjac.info()`` says why).

Environment overrides: FASTJAC_EXTENSION=0 skips the extension (=1 makes a failed build an
error); FASTJAC_CUDA=0/1 forbids/requires the CUDA kernels; FASTJAC_CUDA_ARCH="80;90" the GPU
architectures (SASS for each, PTX for the last); FASTJAC_MARCH (default "native") the host -march,
empty for a portable binary; NVCC the compiler to use.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import warnings

from setuptools import Extension
from setuptools.command.build_ext import build_ext

HOST_SOURCES = ["csrc/bindings.cpp", "csrc/host/cholesky_batch.cpp", "csrc/host/dense_chain.cpp"]
CUDA_SOURCE = "csrc/cuda/gram_cholesky.cu"
CUDA_STUB = "csrc/cuda/stub.cpp"
CXX_FLAGS = ["-std=c++17", "-O3", "-fopenmp-simd", "-fvisibility=hidden"]


def _switch(name: str):
    """True / False when the environment variable forces a choice, None when unset."""
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return None
    return value not in ("0", "false", "no", "off")


def find_nvcc():
    return os.environ.get("NVCC") or shutil.which("nvcc")


def _cuda_library_dirs(nvcc: str) -> list[str]:
    """The -L directories nvcc itself links with (its dry run says), stubs excluded."""
    out = subprocess.run([nvcc, "-dryrun", "-x", "cu", os.devnull, "-o", os.devnull],
                         capture_output=True, text=True, timeout=60)
    dirs = re.findall(r'"?-L([^"\s]+)"?', "".join(l for l in (out.stdout + out.stderr).splitlines(True)
                                                   if "LIBRARIES=" in l))
    return [d for d in dirs if not d.rstrip("/").endswith("stubs")]


def cuda_arch_flags() -> list[str]:
    archs = [a.strip() for a in os.environ.get("FASTJAC_CUDA_ARCH", "80;90").replace(",", ";").split(";") if a.strip()]
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    return flags + [f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}"]


def nvcc_command(nvcc: str, source: str, output: str) -> list[str]:
    """Compile one .cu file to a position-independent object (also used by the CI compile check)."""
    return [nvcc, "-std=c++17", "-O3", "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden",
            *cuda_arch_flags(), "-c", source, "-o", output]


def extension_modules() -> list[Extension]:
    if _switch("FASTJAC_EXTENSION") is False:
        return []
    try:
        import pybind11
    except ImportError:
        warnings.warn("pybind11 is not installed: fastjac._C is not built (pure-Python fallback)")
        return []
    march = os.environ.get("FASTJAC_MARCH", "native").strip()
    ext = Extension("fastjac._C", sources=list(HOST_SOURCES), include_dirs=[pybind11.get_include()],
                    language="c++", extra_compile_args=CXX_FLAGS + ([f"-march={march}"] if march else []))
    return [ext]


class BuildExtension(build_ext):
    """build_ext that adds the CUDA object when it can and falls back instead of failing."""

    def build_extension(self, ext):
        required = _switch("FASTJAC_EXTENSION") is True
        want_cuda = _switch("FASTJAC_CUDA")
        nvcc = find_nvcc() if want_cuda is not False else None
        if want_cuda and nvcc is None:
            raise RuntimeError("FASTJAC_CUDA=1 but nvcc was not found (set NVCC or PATH)")
        attempts = []
        if nvcc:
            attempts.append(("cuda", ext.extra_compile_args))
        attempts.append(("host", ext.extra_compile_args))
        portable = [f for f in ext.extra_compile_args if not f.startswith("-march=")]
        if portable != ext.extra_compile_args:
            attempts.append(("host", portable))
        base_sources = list(ext.sources)
        for i, (kind, flags) in enumerate(attempts):
            ext.sources = base_sources + ([] if kind == "cuda" else [CUDA_STUB])
            ext.extra_compile_args = flags
            ext.extra_objects, ext.library_dirs, ext.libraries = [], [], []
            try:
                if kind == "cuda":
                    self._add_cuda_object(ext, nvcc)
                super().build_extension(ext)
                return
            except Exception as error:  # compiler missing or failing: try the next, smaller build
                last = i == len(attempts) - 1
                if (kind == "cuda" and want_cuda) or (last and required):
                    raise
                following = "giving up: fastjac installs without fastjac._C" if last else "retrying with less"
                warnings.warn(f"building fastjac._C ({kind}, {' '.join(flags)}) failed: {error}; {following}")
                print(f"fastjac: {kind} build of fastjac._C failed ({error}); {following}", file=sys.stderr)

    def _add_cuda_object(self, ext, nvcc):
        os.makedirs(self.build_temp, exist_ok=True)
        obj = os.path.join(self.build_temp, "fastjac_gram_cholesky.o")
        self.spawn(nvcc_command(nvcc, CUDA_SOURCE, obj))
        ext.extra_objects = [obj]
        ext.library_dirs = _cuda_library_dirs(nvcc)
        ext.libraries = ["cudart_static", "rt", "pthread", "dl"]  # static: importable without a driver


def check_cuda_sources() -> int:
    """Compile the CUDA sources to a throw-away object (a compile error is an error even where
    no GPU exists); 0 on success. ``python csrc/build.py --check-cuda``."""
    import tempfile

    nvcc = find_nvcc()
    if nvcc is None:
        print("nvcc not found: the CUDA sources were not compile-checked", file=sys.stderr)
        return 0 if _switch("FASTJAC_CUDA") is not True else 1
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory() as tmp:
        command = nvcc_command(nvcc, os.path.join(root, CUDA_SOURCE), os.path.join(tmp, "gram_cholesky.o"))
        print(" ".join(command))
        return subprocess.run(command).returncode


if __name__ == "__main__":
    if sys.argv[1:] != ["--check-cuda"]:
        sys.exit("usage: python csrc/build.py --check-cuda")
    sys.exit(check_cuda_sources())
