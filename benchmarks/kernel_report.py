"""What a GPU would meet, without a GPU: every Triton kernel configuration fastjac launches,
compiled for sm_80 and sm_90 by Triton's own compiler, with registers, spill bytes, shared
memory and whether the GEMMs run on tensor cores (mma / wgmma in the PTX).

The launches are not a copied list: each operator's Triton backend runs on ``meta`` tensors
under ``fastjac.ops._triton.capturing``, which records every launch (kernel, arguments,
constexprs, warps, stages) instead of running it, with grids sized for an H200 (132 SMs). Each
launch is then specialised as ``JITFunction.run`` would specialise it and compiled for each
target; ``ptxas -v`` on the PTX gives registers and spill bytes.

    python benchmarks/kernel_report.py                       # table + benchmarks/results/kernel_report.json
    python benchmarks/kernel_report.py --check               # also exit 1 on a spill or a missing mma
    python benchmarks/kernel_report.py --tiny --check        # a small subset (what the tests compile)

Compiles run one at a time (2-core CI machines), niced; results are cached by kernel source,
specialisation and target in ``~/.cache/fastjac/kernel_report.json``, so a rerun with unchanged
kernels takes seconds.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile real kernels; nothing is launched
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

from fastjac.ops import _triton  # noqa: E402
from fastjac.ops.column_estimate import triton as column_triton  # noqa: E402
from fastjac.ops.logdet_gram import triton as logdet_triton  # noqa: E402
from fastjac.ops.orthogonality import triton as orthogonality_triton  # noqa: E402
from fastjac.ops.tangent_linear import triton as tangent_triton  # noqa: E402

FULL = dict(B=(256,), D=(784, 12288), d=(16, 64, 128, 256),
            dtypes=(torch.float32, torch.bfloat16, torch.float16), weighted=(False, True))
# small batches split the Gram over D: atomic adds, or ordered partial sums in deterministic mode
SPLIT = dict(B=(16,), D=(12288,), d=(64,), dtypes=(torch.float32, torch.bfloat16), weighted=(False,),
             deterministic=(False, True))
TINY = dict(B=(256,), D=(784,), d=(64,), dtypes=(torch.float32, torch.bfloat16), weighted=(False,))
ARCHS = (80, 90)
TANGENT_ACTIVATIONS = ("relu", "elu")  # σ″ = 0 and σ″ != 0: the backward kernel's two forms
TENSOR_CORE = re.compile(r"\b(wgmma\.mma_async|mma\.sync)\b")
OUT = ROOT / "benchmarks" / "results" / "kernel_report.json"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fastjac" / "kernel_report.json"


def launches(B: int, D: int, d: int, dtype: torch.dtype, weighted: bool):
    """(operator, Launch) for everything one training step's Triton operators launch on J (B, D, d)."""
    meta = dict(device="meta")
    J = torch.empty(B, D, d, dtype=dtype, **meta)
    w = torch.empty(B, D, dtype=dtype, **meta) if weighted else None
    beta = torch.empty((), dtype=torch.float32, **meta)
    steps = [
        ("logdet forward", lambda: logdet_triton.forward(J, w, beta, d)),
        ("logdet backward (M⁻¹ and a per-sample scale)", lambda: _triton.gram_backward(
            J, w, torch.empty(B, d, d, **meta), True, weighted, scale=torch.empty(B, **meta))),
        ("covariance/orthogonality backward",
         lambda: _triton.gram_backward(J, w, torch.empty(B, d, d, **meta), True, weighted)),
        ("orthogonality forward", lambda: orthogonality_triton.forward(J, w)),
        ("column estimate forward", lambda: column_triton.forward(J, w)),
        ("column estimate backward", lambda: _triton.gram_backward(J, w, torch.empty(B, d, **meta), True, weighted)),
    ]
    if B <= 64 or d <= logdet_triton.FUSED_MAX_D:
        steps.append(("logdet forward (split)", lambda: logdet_triton.forward(J, w, beta, d, "split")))
    if not weighted:  # tangent layers have no observation weights: once per (d, dtype)
        h = torch.empty(B, 512, dtype=dtype, **meta)
        T = torch.empty(d, B, 512, dtype=dtype, **meta)
        W = torch.empty(512, 512, dtype=dtype, **meta)
        for act in TANGENT_ACTIVATIONS:
            steps.append((f"tangent_linear forward ({act})",
                          lambda act=act: tangent_triton.forward(h, T, W, W[0], act)))
            steps.append((f"tangent_linear backward ({act})", lambda act=act: tangent_triton.backward(
                h, T, W, W[0], act, h, h, T, (False, False, False, False))))
    out = []
    for name, step in steps:
        with _triton.capturing() as captured:
            step()
        out += [(name, launch) for launch in captured]
    return out


def needs_tensor_cores(launch) -> bool:
    """Whether this configuration multiplies tiles of J (the kernels that must use mma)."""
    c = launch.meta
    name = launch.kernel.__name__
    if name in ("_gram_kernel", "_gram_backward_kernel"):
        return not c["DIAGONAL"]
    if name == "_forward_kernel":
        return True
    if name == "_backward_kernel":
        return bool(c["SECOND"])
    return False  # the solver multiplies d-sized tiles only (blocked: it does use mma)


def specialise(launch, backend):
    """(ASTSource, options) exactly as JITFunction.run builds them for these arguments."""
    fn = launch.kernel
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(launch.meta, debug=False)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return ASTSource(fn, signature, constexprs, attrs), options


def cache_key(launch, src, options, arch) -> str:
    text = repr((launch.kernel.cache_key, sorted(src.signature.items()), sorted(map(repr, src.constants.items())),
                 sorted(map(repr, src.attrs.items())), options.num_warps, options.num_stages, arch,
                 triton.__version__))
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def ptxas_usage(ptx: str, arch: int) -> dict:
    """Registers, spill bytes (stores + loads) and stack from ``ptxas -v`` on the PTX."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        # the flags Triton's own make_cubin passes
        proc = subprocess.run([get_ptxas(arch).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
                               f"--gpu-name={sm_arch_from_capability(arch)}", str(src), "-o",
                               str(Path(tmp) / "kernel.cubin")], capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"ptxas failed: {proc.stderr[-2000:]}")
        log = proc.stderr

    def number(pattern):
        m = re.search(pattern, log)
        return int(m.group(1)) if m else 0
    return dict(registers=number(r"Used (\d+) registers"),
                spill_bytes=number(r"(\d+) bytes spill stores") + number(r"(\d+) bytes spill loads"),
                stack_bytes=number(r"(\d+) bytes stack frame"))


def compile_one(launch, arch: int, cache: dict) -> dict:
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    src, options = specialise(launch, backend)
    key = cache_key(launch, src, options, arch)
    if key not in cache:
        start = time.perf_counter()
        kernel = triton.compile(src, target=target, options=options.__dict__)
        ptx = kernel.asm["ptx"]
        found = sorted(set(TENSOR_CORE.findall(ptx)))
        cache[key] = dict(ptxas_usage(ptx, arch), shared_bytes=kernel.metadata.shared,
                          tensor_core=[f.split(".")[0] for f in found],
                          compile_s=round(time.perf_counter() - start, 2))
    return cache[key]


def constexprs(launch) -> dict:
    return {k: v for k, v in launch.meta.items() if k not in ("num_warps", "num_stages")}


def shapes(grids):
    """(B, D, d, dtype, weighted, deterministic) of every shape in the grids."""
    for grid in grids:
        for B, D, d, dtype, weighted in itertools.product(grid["B"], grid["D"], grid["d"], grid["dtypes"],
                                                          grid["weighted"]):
            for deterministic in grid.get("deterministic", (False,)):
                yield B, D, d, dtype, weighted, deterministic


def report(grids, cache: dict, log=print) -> list[dict]:
    """One row per (shape, operator, kernel launch), with each target's compile results."""
    rows = []
    seen = set()
    for B, D, d, dtype, weighted, deterministic in shapes(grids):
        with deterministic_algorithms(deterministic):
            captured = launches(B, D, d, dtype, weighted)
        for op, launch in captured:
            row = dict(B=B, D=D, d=d, dtype=str(dtype).replace("torch.", ""), weighted=weighted,
                       deterministic=deterministic, operator=op, kernel=launch.kernel.__name__,
                       grid=list(launch.grid), constexprs=constexprs(launch),
                       num_warps=launch.meta.get("num_warps", 4), num_stages=launch.meta.get("num_stages", 3),
                       needs_tensor_cores=needs_tensor_cores(launch))
            for arch in ARCHS:
                row[f"sm_{arch}"] = compile_one(launch, arch, cache)
            ident = (row["kernel"], row["dtype"], json.dumps(row["constexprs"], sort_keys=True), row["num_warps"])
            if ident not in seen:
                seen.add(ident)
                log(line(row))
            rows.append(row)
    return rows


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool):
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(enabled)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def problems(row: dict) -> list[str]:
    out = []
    for arch in ARCHS:
        r = row[f"sm_{arch}"]
        if r["spill_bytes"]:
            out.append(f"sm_{arch}: {r['spill_bytes']} spill bytes")
        if row["needs_tensor_cores"] and not r["tensor_core"]:
            out.append(f"sm_{arch}: no tensor-core instruction")
    return out


def line(row: dict) -> str:
    per_arch = "  ".join(f"sm_{a}: {row[f'sm_{a}']['registers']:3d} regs {row[f'sm_{a}']['spill_bytes']:5d} B spill "
                         f"{row[f'sm_{a}']['shared_bytes']:6d} B smem {','.join(row[f'sm_{a}']['tensor_core']) or '-':12s}"
                         for a in ARCHS)
    flags = " ".join(f"{k}={v}" for k, v in row["constexprs"].items() if k in ("MODE", "TILE", "ROWS", "NB", "BLOCKS",
                                                                            "FUSED", "DIAGONAL", "ACT", "BN", "BO"))
    return (f"{row['kernel']:22s} {row['dtype']:8s} d={row['d']:3d} w={int(row['weighted'])} "
            f"warps={row['num_warps']} {flags:38s} {per_arch}  {'; '.join(problems(row)) or 'ok'}")


def summary(rows: list[dict]) -> dict:
    kernels = {}
    for row in rows:
        k = kernels.setdefault(row["kernel"], dict(launches=0, max_registers=0, spill_bytes=0,
                                                   tensor_core={}))
        k["launches"] += 1
        for arch in ARCHS:
            r = row[f"sm_{arch}"]
            k["max_registers"] = max(k["max_registers"], r["registers"])
            k["spill_bytes"] = max(k["spill_bytes"], r["spill_bytes"])
            if row["needs_tensor_cores"]:
                k["tensor_core"].setdefault(f"sm_{arch}", {})[row["dtype"]] = sorted(
                    set(k["tensor_core"].get(f"sm_{arch}", {}).get(row["dtype"], [])) | set(r["tensor_core"]))
    return dict(kernels=kernels, launches=len(rows), problems=sum(bool(problems(r)) for r in rows))


CONFIGURATION_KEYS = ("kernel", "dtype", "constexprs", "num_warps", "num_stages", "needs_tensor_cores") + tuple(
    f"sm_{a}" for a in ARCHS)


def compact(rows: list[dict]):
    """(distinct compiled configurations, launches naming theirs by index): what the JSON keeps."""
    configurations, index, launched = [], {}, []
    for row in rows:
        config = {k: row[k] for k in CONFIGURATION_KEYS}
        for arch in ARCHS:  # compile times depend on the machine and on Triton's own cache
            config[f"sm_{arch}"] = {k: v for k, v in config[f"sm_{arch}"].items() if k != "compile_s"}
        key = json.dumps(config, sort_keys=True)
        if key not in index:
            index[key] = len(configurations)
            configurations.append(config)
        launched.append(dict({k: v for k, v in row.items() if k not in CONFIGURATION_KEYS or k in ("kernel", "dtype")},
                             configuration=index[key]))
    return configurations, launched


def load_cache() -> dict:
    try:
        return json.loads(CACHE.read_text())
    except (OSError, ValueError):
        return {}


def save(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, sort_keys=True, separators=(",", ":")).replace('},{"', '},\n{"') + "\n")
    tmp.replace(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 on any spill or missing tensor-core instruction")
    parser.add_argument("--tiny", action="store_true", help="one shape (d=64, D=784): what the tests compile")
    parser.add_argument("--json", type=Path, default=None, help=f"output (default {OUT.relative_to(ROOT)}; "
                        "--tiny writes none unless given)")
    args = parser.parse_args(argv)
    if hasattr(os, "nice"):
        os.nice(10)
    start = time.perf_counter()
    cache = load_cache()
    try:
        rows = report([TINY] if args.tiny else [FULL, SPLIT], cache)
    finally:
        save(CACHE, cache)
    configurations, launched = compact(rows)
    result = dict(command="python benchmarks/kernel_report.py" + (" --tiny" if args.tiny else ""),
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  triton=triton.__version__, torch=torch.__version__, targets=[f"sm_{a}" for a in ARCHS],
                  summary=summary(rows), configurations=configurations, launches=launched)
    out = args.json or (None if args.tiny else OUT)
    if out is not None:
        save(out, result)
    s = result["summary"]
    print(f"{s['launches']} launches, {len(s['kernels'])} kernels, {s['problems']} with problems, "
          f"{time.perf_counter() - start:.0f} s")
    for name, k in s["kernels"].items():
        print(f"  {name:22s} {k['launches']:4d} launches  max {k['max_registers']} regs  "
              f"max spill {k['spill_bytes']} B  tensor cores {json.dumps(k['tensor_core'])}")
    return 1 if args.check and s["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
