"""Jacobian columns at scale: memory of exact GRAE with and without chunked recomputation, and
column throughput against what users write by hand.

    python benchmarks/jacobian_memory.py            # CPU (and GPU parts when CUDA is present)
    python benchmarks/jacobian_memory.py --quick    # smaller, for a smoke run

1. Peak memory of one exact-GRAE training step (encoder Linear(784, d), App. D MNIST decoder at
   full width, d = 16, B = 32, Adam step): unchunked against ``chunk_size=4``. Each configuration
   runs in a fresh subprocess; on the CPU the peak is the process's peak RSS (glibc's mmap
   threshold fixed at 64 KiB so freed tensors leave the RSS), also given net of the RSS just
   before the step (interpreter, torch, the model); on a GPU
   ``torch.cuda.max_memory_allocated``.
2. Jacobian-column throughput on an MLP decoder with D = 784: ``jacobian_columns`` against
   per-sample ``torch.autograd.functional.jacobian`` and ``vmap(jacfwd)``, same run, same machine.
3. On a GPU: the fused tangent MLP (``fastjac.nn.TangentMLP``) against torch.func for the
   columns plus their backward, B = 256, widths 512–1024, k in {1, 8, 16}.
Timing is ``fastjac.bench.timing.interleaved`` (rivals round-robin, best of the repeats: the machine
may be shared) and the baselines are ``fastjac.bench.baselines``; ratios are measured against
baselines in the same run; results go to ``benchmarks/results/jacobian_memory.json`` (written
atomically, with the command and the machine).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import fastjac  # noqa: E402
from fastjac.bench import baselines, results, timing  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "jacobian_memory.json"
# glibc's adaptive mmap threshold keeps freed multi-MB tensors in the heap, so RSS would measure
# the allocator's high-water mark rather than live tensors; a fixed threshold returns them.
WORKER_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}


def mnist_decoder(d: int, width: float) -> torch.nn.Module:
    """App. D MNIST decoder (fastjac.models) with its BatchNorm layers in eval mode (per-sample J)."""
    from fastjac.models.networks import ConvDecoder
    return ConvDecoder(d, "mnist", width=width, norm="batch").eval()


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def training_step(device: str, B: int, d: int, width: float, chunk_size) -> dict:
    """One exact-GRAE Adam step; returns peak memory (run me in a fresh process)."""
    torch.manual_seed(0)
    decoder = mnist_decoder(d, width).to(device)
    encoder = torch.nn.Linear(784, d).to(device)
    opt = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=1e-4)
    x = torch.rand(B, 1, 28, 28, device=device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = rss_bytes()
    start = time.perf_counter()
    loss = fastjac.grae_loss(decoder, encoder(x.flatten(1)), x, 0.5, estimator="exact", chunk_size=chunk_size)
    opt.zero_grad()
    loss.backward()
    opt.step()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"peak_bytes": peak, "before_bytes": before, "step_bytes": peak - before,
            "seconds": time.perf_counter() - start, "loss": float(loss)}


def memory_part(device: str, B: int, d: int, width: float, chunk: int) -> dict:
    rows = {}
    for name, c in (("unchunked", None), (f"chunk_size={chunk}", chunk)):
        cmd = [sys.executable, __file__, "--worker", device, str(B), str(d), str(width), str(c)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True, env=WORKER_ENV)
        rows[name] = json.loads(done.stdout.strip().splitlines()[-1])
    base, chunked = rows["unchunked"], rows[f"chunk_size={chunk}"]
    return {"device": device, "B": B, "d": d, "width": width, "chunk_size": chunk, "runs": rows,
            "peak_ratio": chunked["peak_bytes"] / base["peak_bytes"],
            "step_ratio": chunked["step_bytes"] / base["step_bytes"],
            "same_loss": abs(chunked["loss"] - base["loss"]) <= 1e-4 * abs(base["loss"])}


def best_times(fns: dict, repeat: int, device: str) -> dict:
    """Best seconds per call of each function over ``repeat`` interleaved rounds (synchronised on a GPU)."""
    samples = timing.interleaved({name: timing.synchronised(device, fn) for name, fn in fns.items()},
                                 repeats=repeat, min_repeats=repeat, min_sample_s=0.0)
    return {name: timing.summary(s)["min_s"] for name, s in samples.items()}


def throughput_part(device: str, B: int, d: int, hidden: tuple, repeat: int) -> dict:
    """Columns per second: ours against per-sample autograd.functional.jacobian and vmap(jacfwd)."""
    torch.manual_seed(0)
    layers, width = [], d
    for h in hidden:
        layers += [torch.nn.Linear(width, h), torch.nn.ELU()]
        width = h
    dec = torch.nn.Sequential(*layers, torch.nn.Linear(width, 784), torch.nn.Sigmoid()).to(device)
    z = torch.randn(B, d, device=device)
    few = z[: max(1, B // 8)]  # the per-sample reverse-mode loop is slow: time it on fewer samples

    def ours():
        return fastjac.jacobian_columns(dec, z)[1]

    def per_sample():
        return baselines.jacobian_per_sample(dec, few, create_graph=False)

    def vmap_jacfwd():
        return baselines.jacobian_vmap_jacfwd(dec, z)

    J = ours()
    ref = per_sample()
    assert torch.allclose(J[: len(few)], ref, rtol=1e-4, atol=1e-6), "columns disagree"
    fast = best_times({"jacobian_columns": ours, "vmap(jacfwd)": vmap_jacfwd}, repeat, device)
    slow = best_times({"jacobian_columns": ours, "per_sample": per_sample}, 2, device)
    t = {"jacobian_columns": min(fast["jacobian_columns"], slow["jacobian_columns"]) / B,
         "autograd.functional.jacobian per sample": slow["per_sample"] / len(few),
         "vmap(jacfwd)": fast["vmap(jacfwd)"] / B}
    return {"device": device, "B": B, "d": d, "D": 784, "hidden": list(hidden), "threads": torch.get_num_threads(),
            "seconds_per_sample": t,
            "speedup_vs_per_sample_jacobian": t["autograd.functional.jacobian per sample"] / t["jacobian_columns"],
            "speedup_vs_vmap_jacfwd": t["vmap(jacfwd)"] / t["jacobian_columns"]}


def fused_part(repeat: int) -> list:
    """GPU: TangentMLP's fused Linear+activation kernels against torch.func, columns + backward."""
    from fastjac.nn import TangentMLP
    rows = []
    for hidden in ((512, 512), (1024, 1024)):
        for k in (1, 8, 16):
            torch.manual_seed(0)
            mlp = TangentMLP([32, *hidden, 784], activation="elu").cuda()
            z = torch.randn(256, 32, device="cuda")
            dirs = torch.randn(256, 32, k, device="cuda")

            def run(decoder):
                out, J = fastjac.jacobian_columns(decoder, z, directions=dirs)
                (out.square().sum() + J.square().sum()).backward()

            t = best_times({"fused": lambda: run(mlp),
                            "torch.func": lambda: run(lambda v: mlp(v))},  # a lambda hides tangent_forward
                           repeat, "cuda")
            fused, func = t["fused"], t["torch.func"]
            rows.append({"hidden": list(hidden), "k": k, "fused_s": fused, "torch_func_s": func,
                         "speedup": func / fused})
    return rows


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--worker":
        device, B, d, width, chunk = sys.argv[2:7]
        print(json.dumps(training_step(device, int(B), int(d), float(width),
                                       None if chunk == "None" else int(chunk))))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller shapes (smoke run)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--parts", default="memory,throughput,fused",
                        help="comma-separated subset of memory,throughput,fused; the others keep "
                             "their earlier results in --out")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    parts = set(args.parts.split(","))
    if args.threads:
        torch.set_num_threads(args.threads)
    width, repeat = (0.25, 3) if args.quick else (1.0, 20)  # best of many: the machine may be shared
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    result = json.loads(args.out.read_text()) if args.out.exists() else {}
    result.pop("environment", None)  # the machine of results written before the shared harness
    result.update(results.record("benchmarks/jacobian_memory.py", program="python benchmarks/jacobian_memory.py",
                                 argv=argv, device="cuda" if "cuda" in devices else "cpu",
                                 settings={"quick": args.quick, "parts": sorted(parts), "threads": args.threads}))
    for part in parts & {"memory", "throughput", "fused"}:
        result[part] = []
    for device in devices if "memory" in parts else ():
        m = memory_part(device, 32, 16, width, 4)
        result["memory"].append(m)
        print(f"[{device}] exact GRAE step, App. D MNIST decoder width {width}, d=16, B=32: "
              f"peak {m['runs']['unchunked']['peak_bytes'] / 2**20:.0f} MiB unchunked, "
              f"{m['runs']['chunk_size=4']['peak_bytes'] / 2**20:.0f} MiB chunk_size=4 "
              f"-> {100 * m['peak_ratio']:.0f} % (net of the pre-step footprint: {100 * m['step_ratio']:.0f} %)")
    for device in devices if "throughput" in parts else ():
        t = throughput_part(device, 32, 16, (256, 512), repeat)
        result["throughput"].append(t)
        print(f"[{device}] columns, MLP D=784 d=16: {t['speedup_vs_per_sample_jacobian']:.0f}x vs per-sample "
              f"autograd.functional.jacobian, {t['speedup_vs_vmap_jacfwd']:.2f}x vs vmap(jacfwd)")
    if torch.cuda.is_available() and "fused" in parts:
        result["fused"] = fused_part(repeat)
        for r in result["fused"]:
            print(f"[cuda] fused tangent MLP {r['hidden']} k={r['k']}: {r['speedup']:.2f}x vs torch.func")
    results.write_json(result, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
