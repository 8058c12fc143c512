"""The host path of fastjac._C ("cpp") against what users write and against our torch reference
(a benchmark, not a test).

logdet_gram forward+backward (∂/∂J and ∂/∂β) per dtype and d, for

- ``autograd``: autograd through ``torch.linalg.cholesky(eye + bmm(Jᵀ, J)/β)``
  (``fastjac.bench.baselines.logdet_gram``, what a user writes),
- ``torch``: fastjac's reference backend (``backend="torch"``),
- ``cpp``: the extension (per-matrix Cholesky and inverse in C++, the two passes over J on
  torch's matmul).

Timing is the shared harness (``fastjac.bench.timing.interleaved``: round-robin, so load
changes hit every method alike; medians), the file head is ``fastjac.bench.results.record``.
Ratios are against the baselines measured in the same run. Value checks are off while timing.

    python benchmarks/extension_cpu.py --json benchmarks/results/extension_cpu.json
    python benchmarks/extension_cpu.py --tiny        # seconds: proves it runs
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import fastjac  # noqa: E402
from fastjac.bench import baselines, results, timing  # noqa: E402
from fastjac.ops.logdet_gram import extension  # noqa: E402,F401  (ImportError: fastjac._C not built)

BETA = 0.5
FULL = dict(dtypes=("float32", "float64"), shapes=[(256, 784, d) for d in (8, 16, 32, 64, 128)]
            + [(1, 64, 4), (16, 784, 2), (16, 784, 16), (16, 784, 256)], reps=15)
TINY = dict(dtypes=("float32",), shapes=[(4, 50, 3), (4, 50, 70)], reps=3)


def _autograd(J, beta):
    Jr = J.detach().requires_grad_()
    baselines.logdet_gram(Jr, beta).sum().backward()


def _fastjac(backend):
    def run(J, beta):
        Jr, b = J.detach().requires_grad_(), torch.tensor(beta, dtype=J.dtype, requires_grad=True)
        fastjac.logdet_gram(Jr, b, backend=backend).sum().backward()
    return run


METHODS = {baselines.OPERATOR_LABEL: _autograd, "torch": _fastjac("torch"), "cpp": _fastjac("cpp")}


def measure(B, D, d, dtype, reps):
    g = torch.Generator().manual_seed(0)
    J = torch.randn(B, D, d, generator=g, dtype=dtype) / D ** 0.5
    samples = timing.interleaved({name: (lambda fn=fn: fn(J, BETA)) for name, fn in METHODS.items()},
                                 repeats=reps, min_sample_s=0.0)
    ms = {name: 1e3 * timing.median(s) for name, s in samples.items()}
    return {"B": B, "D": D, "d": d, "dtype": str(dtype).replace("torch.", ""),
            "reps": min(len(s) for s in samples.values()), "ms": ms,
            "speedup_vs_autograd": ms[baselines.OPERATOR_LABEL] / ms["cpp"],
            "speedup_vs_torch": ms["torch"] / ms["cpp"]}


def _row(r) -> str:
    return (f"{r['dtype']:8s} {r['B']:4d} {r['D']:4d} {r['d']:4d} " + " ".join(f"{r['ms'][m]:10.2f}" for m in METHODS)
            + f"  {r['speedup_vs_autograd']:11.2f}x  {r['speedup_vs_torch']:11.2f}x")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results here (atomically)")
    parser.add_argument("--tiny", action="store_true", help="small shapes, few repeats")
    args = parser.parse_args(argv)
    grid = TINY if args.tiny else FULL
    fastjac.set_checks(False)
    report = results.record("benchmarks/extension_cpu.py", program="python benchmarks/extension_cpu.py",
                            argv=argv, device="cpu", settings={"beta": BETA, "operator": "logdet_gram fwd+bwd"})
    print(results.machine_line(report["machine"]))
    print(f"{'dtype':8s} {'B':>4s} {'D':>4s} {'d':>4s} " + " ".join(f"{m:>10s}" for m in METHODS)
          + "  cpp vs autograd  cpp vs torch  (ms, median)")
    report["results"] = []
    for dtype in grid["dtypes"]:
        for B, D, d in grid["shapes"]:
            report["results"].append(measure(B, D, d, getattr(torch, dtype), grid["reps"]))
            print(_row(report["results"][-1]), flush=True)
    if args.json:
        results.write_json(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
