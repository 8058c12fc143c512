"""Triton operators on one GPU: forward and forward+backward against what a user writes
(``fastjac.bench.baselines``: bmm + Cholesky with autograd), against fastjac's torch backend,
and against the card's measured floors, with a per-kernel breakdown. A benchmark, not a test.

Each row is one operator at one shape (dtype, B, D, d; weights, value checks on/off, Fischer
blocks, the logdet schedules forced). It is written to the JSON file as soon as it is measured
(atomically), and guarded: an out-of-memory or any error is recorded in the row and the run
goes on. Rows start only while the time budget lasts (default 330 s, compilation included);
the rest are recorded as skipped. Floors: the memory floor is the bytes the operator must move
(J read once forward; read twice and its gradient written once forward+backward) over the
measured copy bandwidth; the compute floor is its flops (Gram B·D·d(d+1), backward 2·B·D·d²)
over the measured float32 matmul peak. Value checks are off unless the row says ``checks``.

    python benchmarks/triton_ops.py                     # GPU: benchmarks/results/triton_ops.json
    python benchmarks/triton_ops.py --tiny              # CPU: the Triton interpreter, tiny shapes (CI)
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():  # kernels run only through the interpreter, chosen before import
    os.environ.setdefault("TRITON_INTERPRET", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import fastjac  # noqa: E402
from fastjac.bench import baselines, results, timing  # noqa: E402
from fastjac.ops import tangent_linear  # noqa: E402
from fastjac.ops.logdet_gram import triton as logdet_triton  # noqa: E402

BETA = 0.5
FISCHER_BLOCK = 8
OUT = ROOT / "benchmarks" / "results" / "triton_ops.json"


def _grid(*, B, D, ds, op="logdet", dtype="float32", **extra):
    return [dict(op=op, dtype=dtype, B=B, D=D, d=d, **extra) for d in ds]


FULL = (_grid(B=256, D=784, ds=(16, 64, 128, 256))
        + _grid(B=256, D=12288, ds=(16, 64, 128))
        + _grid(B=256, D=784, ds=(16,), schedule="fused") + _grid(B=256, D=784, ds=(16,), schedule="split")
        + _grid(B=64, D=784, ds=(16,), schedule="fused") + _grid(B=64, D=784, ds=(16,), schedule="split")
        + _grid(B=256, D=12288, ds=(64, 128), dtype="bfloat16") + _grid(B=256, D=784, ds=(64,), dtype="float16")
        + _grid(B=256, D=784, ds=(64,), weighted=True) + _grid(B=256, D=784, ds=(64,), checks=True)
        + _grid(B=256, D=12288, ds=(128,), checks=True)
        + _grid(op="fischer", B=256, D=784, ds=(64, 256)) + _grid(op="covariance", B=256, D=784, ds=(64,))
        + _grid(op="hadamard", B=256, D=12288, ds=(64,)) + _grid(op="hadamard", B=256, D=12288, ds=(64,), weighted=True)
        + _grid(op="orthogonality", B=256, D=784, ds=(64, 256))
        + _grid(op="tangent_linear", B=256, D=784, ds=(16, 64)) + _grid(op="tangent_linear", B=256, D=784, ds=(64,),
                                                                      dtype="bfloat16"))
TINY = (_grid(B=2, D=64, ds=(4, 40)) + _grid(B=2, D=64, ds=(8,), schedule="fused")
        + _grid(B=2, D=64, ds=(8,), dtype="float16", weighted=True) + _grid(B=2, D=64, ds=(8,), checks=True)
        + _grid(op="fischer", B=2, D=64, ds=(8,)) + _grid(op="covariance", B=2, D=64, ds=(8,))
        + _grid(op="hadamard", B=2, D=64, ds=(8,)) + _grid(op="orthogonality", B=2, D=64, ds=(8,))
        + _grid(op="tangent_linear", B=2, D=16, ds=(3,)))


def operator(op: str):
    """{implementation: fn(J, w) -> tensor} for an operator on J (B, D, d)."""
    if op == "logdet":
        call = lambda backend: lambda J, w: fastjac.logdet_gram(J, BETA, weights=w, backend=backend)  # noqa: E731
        return {"triton": call("triton"), "torch": call("torch"),
                baselines.OPERATOR_LABEL: lambda J, w: baselines.logdet_gram(J, BETA)}
    if op == "fischer":
        return {b: (lambda b: lambda J, w: fastjac.fischer_bound(J, BETA, block_size=FISCHER_BLOCK, weights=w,
                                                                  backend=b))(b) for b in ("triton", "torch")}
    if op == "covariance":
        return {b: (lambda b: lambda J, w: fastjac.optimal_posterior_covariance(J, BETA, weights=w, backend=b))(b)
                for b in ("triton", "torch")}
    if op == "hadamard":
        return {"triton": lambda J, w: fastjac.hadamard_bound(J, BETA, weights=w, backend="triton"),
                "torch": lambda J, w: fastjac.hadamard_bound(J, BETA, weights=w, backend="torch"),
                baselines.OPERATOR_LABEL: lambda J, w: baselines.hadamard_bound(J, BETA)}
    if op == "orthogonality":
        return {"triton": lambda J, w: fastjac.orthogonality_penalty(J, weights=w, backend="triton"),
                "torch": lambda J, w: fastjac.orthogonality_penalty(J, weights=w, backend="torch"),
                baselines.OPERATOR_LABEL: lambda J, w: baselines.orthogonality(J)}
    raise ValueError(f"unknown operator {op!r}")


def _forced(schedule):
    """Force one logdet schedule (None: the backend's own choice); returns the undo."""
    plan = logdet_triton.solver_plan
    if schedule is not None:
        logdet_triton.solver_plan = lambda B, D, d, dtype, w, dev, _=None: plan(B, D, d, dtype, w, dev, schedule)
    return lambda: setattr(logdet_triton, "solver_plan", plan)


def _inputs(cfg, device):
    """(leaves requiring grad, fn(*leaves) -> output, bytes moved fwd, fwd+bwd, flops fwd, fwd+bwd)."""
    dtype = getattr(torch, cfg["dtype"])
    g = torch.Generator(device=device).manual_seed(0)
    B, D, d = cfg["B"], cfg["D"], cfg["d"]
    if cfg["op"] == "tangent_linear":  # a decoder layer: d tangents of h (B, 512) -> (B, D)
        width = 512 if device.type == "cuda" else 8
        h = torch.randn(B, width, device=device, generator=g).to(dtype)
        T = torch.randn(d, B, width, device=device, generator=g).to(dtype)
        W = (torch.randn(D, width, device=device, generator=g) / width ** 0.5).to(dtype)
        leaves = [t.requires_grad_() for t in (h, T, W)]
        size = dtype.itemsize
        moved = (T.numel() + d * B * D) * size
        flops = 2 * (d + 1) * B * width * D
        return leaves, moved, 3 * moved, flops, 3 * flops
    J = (torch.randn(B, D, d, device=device, generator=g) / D ** 0.5).to(dtype).requires_grad_()
    w = (torch.rand(B, D, device=device, generator=g) + 0.5).to(dtype) if cfg.get("weighted") else None
    moved = J.numel() * J.element_size() + (0 if w is None else w.numel() * w.element_size())
    return [J] if w is None else [J, w], moved, 3 * moved, B * D * d * (d + 1), B * D * d * (d + 1) + 2 * B * D * d * d


def _implementations(cfg):
    """{implementation: fn(*leaves) -> tensor}."""
    if cfg["op"] == "tangent_linear":
        act = "elu"
        return {b: (lambda b: lambda h, T, W: tangent_linear(h, T, W, activation=act, backend=b)[1])(b)
                for b in ("triton", "torch")}
    impls = operator(cfg["op"])
    if cfg.get("weighted"):
        impls.pop(baselines.OPERATOR_LABEL, None)  # the user's form has no observation weights
    return {name: (lambda fn: lambda J, w=None: fn(J, w))(fn) for name, fn in impls.items()}


def _kernels(fn, device, top: int = 8):
    """[(kernel, total µs, calls)] of one call, by the profiler (CUDA kernels; CPU ops on the CPU)."""
    from torch.profiler import ProfilerActivity, profile
    activity = ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU
    with profile(activities=[activity]) as prof:
        fn()
    events = prof.key_averages()
    attr = "device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    rows = sorted(((e.key, getattr(e, attr, 0.0), e.count) for e in events), key=lambda r: -r[1])
    return [dict(kernel=k[:80], total_us=round(t, 1), calls=c) for k, t, c in rows[:top] if t > 0]


def measure(cfg, device, peaks, repeats: int, min_sample_s: float) -> dict:
    """One row: every implementation's forward and forward+backward, floors and kernel breakdown."""
    leaves, moved_fwd, moved_both, flops_fwd, flops_both = _inputs(cfg, device)
    impls = _implementations(cfg)
    undo = _forced(cfg.get("schedule"))
    try:
        with fastjac.checks(bool(cfg.get("checks"))):
            def forward(fn):
                return timing.synchronised(device, lambda: fn(*[t.detach() for t in leaves]))

            def both(fn):
                def run():
                    for t in leaves:
                        t.grad = None
                    fn(*leaves).float().sum().backward()
                return timing.synchronised(device, run)
            fns = {f"{name} {part}": make(fn) for name, fn in impls.items()
                   for part, make in (("fwd", forward), ("fwd+bwd", both))}
            samples = timing.interleaved(fns, repeats=repeats, min_sample_s=min_sample_s)
            breakdown = _kernels(fns["triton fwd+bwd"], device)
    finally:
        undo()
    floors = {"fwd": dict(memory_s=moved_fwd / peaks.bandwidth, compute_s=flops_fwd / peaks.flops),
              "fwd+bwd": dict(memory_s=moved_both / peaks.bandwidth, compute_s=flops_both / peaks.flops)}
    out = dict(cfg, floors=floors, kernels=breakdown, implementations={})
    for name in impls:
        out["implementations"][name] = {part: timing.summary(samples[f"{name} {part}"]) for part in floors}
    for part, floor in floors.items():
        t = out["implementations"]["triton"][part]["median_s"]
        floor.update(x_memory=t / floor["memory_s"], x_compute=t / floor["compute_s"])
        for rival in impls:
            if rival != "triton":
                floor[f"speedup_vs_{rival}"] = out["implementations"][rival][part]["median_s"] / t
    return out


def _line(row: dict) -> str:
    head = (f"{row['op']:14s} {row['dtype']:8s} B={row['B']:<4d} D={row['D']:<6d} d={row['d']:<4d} "
            f"{'w ' if row.get('weighted') else ''}{'checks ' if row.get('checks') else ''}"
            f"{row.get('schedule') or ''}")
    if "error" in row or "skipped" in row:
        return f"{head:60s} {row.get('error') or row.get('skipped')}"
    parts = []
    for part in ("fwd", "fwd+bwd"):
        f = row["floors"][part]
        t = row["implementations"]["triton"][part]["median_s"] * 1e3
        vs = " ".join(f"{k[11:]} {v:.2f}x" for k, v in f.items() if k.startswith("speedup_vs_"))
        parts.append(f"{part} {t:8.3f} ms ({f['x_memory']:.1f}x mem, {f['x_compute']:.1f}x flop floor; {vs})")
    return f"{head:60s} " + " | ".join(parts)


def run(configs, device, result, path, *, budget_s: float, repeats: int, min_sample_s: float, log=print):
    start = time.perf_counter()
    peaks = timing.measure_peaks(device) if device.type == "cuda" else timing.Peaks(bandwidth=1e10, flops=1e11)
    result["peaks"] = dict(bandwidth_bytes_per_s=peaks.bandwidth, float32_matmul_flops=peaks.flops)
    log(f"peaks: {peaks.bandwidth / 1e9:.0f} GB/s copy, {peaks.flops / 1e12:.1f} TFLOP/s float32 matmul")
    for cfg in configs:
        if time.perf_counter() - start > budget_s:
            row = dict(cfg, skipped=f"time budget of {budget_s:.0f} s spent")
        else:
            try:
                row = measure(cfg, device, peaks, repeats, min_sample_s)
            except Exception as e:  # noqa: BLE001 — recorded in the row; the run goes on
                row = dict(cfg, error=f"{type(e).__name__}: {str(e)[:300]}")
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        result["rows"].append(row)
        result["elapsed_s"] = round(time.perf_counter() - start, 1)
        if path is not None:
            results.write_json(result, path)
        log(_line(row))
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes; on the CPU through the Triton interpreter")
    parser.add_argument("--json", type=Path, default=None,
                        help=f"output (default {OUT.relative_to(ROOT)} on a GPU; --tiny writes none unless given)")
    parser.add_argument("--budget-s", type=float, default=330.0, help="start no row after this many seconds")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.tiny:
        parser.error("no GPU here: the full grid needs one (--tiny runs the script under the interpreter)")
    path = args.json or (None if args.tiny else OUT)
    result = results.record("benchmarks/triton_ops.py", program="python benchmarks/triton_ops.py", argv=argv,
                            device=device, settings=dict(beta=BETA, fischer_block=FISCHER_BLOCK, tiny=args.tiny,
                                                         tf32=torch.backends.cuda.matmul.allow_tf32))
    result["rows"] = []
    fastjac.set_checks(False)
    cuda = device.type == "cuda"
    run(TINY if args.tiny else FULL, device, result, path, budget_s=args.budget_s,
        repeats=5 if cuda else 1, min_sample_s=0.02 if cuda else 0.0)
    failed = [r for r in result["rows"] if "error" in r]
    print(f"{len(result['rows'])} rows, {len(failed)} failed, {result['elapsed_s']} s"
          + (f"; wrote {path}" if path else ""))
    return 1 if args.tiny and failed else 0


if __name__ == "__main__":
    sys.exit(main())
