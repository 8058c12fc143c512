"""Triton operators against what users write and against our torch reference (a benchmark, not a test).

For each dtype, B, D, d it times the forward and forward+backward of

- ``bmm+cholesky``: autograd through ``torch.linalg.cholesky(I + JᵀJ/β)`` on ``bmm`` (what a
  user writes; bfloat16 J is cast to float32 first, as cholesky needs),
- ``torch``: fastjac's reference backend (``backend="torch"``),
- ``triton``: the Triton backend with its default schedule, and each logdet schedule forced
  (``triton:fused``, ``triton:split``, ``triton:cusolver``) so the thresholds in
  ``fastjac/ops/logdet_gram/triton.py`` can be set from the numbers,

plus the Hadamard bound and the orthogonality penalty (all columns) against their user-written
forms. Each time is printed beside the floor: the bytes of J read once (forward) or read twice
and written once (forward+backward), over the copy bandwidth measured at the start of the run.
Ratios are against baselines measured in the same run. Value checks (one device sync each) are
off while timing.

    python benchmarks/triton_ops.py --json benchmarks/results/triton_ops.json   # on a GPU, one call
    python benchmarks/triton_ops.py --tiny                                        # CPU: interpreter, proves it runs
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch

if not torch.cuda.is_available():  # kernels run only through the interpreter, chosen before import
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import fastjac  # noqa: E402
from fastjac.ops.logdet_gram import triton as logdet_triton  # noqa: E402

BETA = 0.5
FULL = dict(dtypes=("float32", "bfloat16"), B=(64, 256), D=(784, 12288), d=(8, 16, 32, 64, 128))
TINY = dict(dtypes=("float32", "bfloat16"), B=(2,), D=(100,), d=(4, 40))


def timer(device: torch.device, reps: int):
    """fn -> median milliseconds. CUDA: triton's do_bench (clears L2 between runs) over about
    ``reps`` ms; CPU: ``reps`` calls."""
    if device.type == "cuda":
        from triton.testing import do_bench
        return lambda fn, grad_to_none=None: do_bench(fn, warmup=10, rep=reps,
                                                      grad_to_none=grad_to_none, return_mode="median")

    def cpu(fn, grad_to_none=None):
        times = []
        for _ in range(reps):
            for t in grad_to_none or ():
                t.grad = None
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    return cpu


def copy_bandwidth(device: torch.device, measure) -> float:
    """Bytes per millisecond of a large device copy (read + write counted)."""
    n = (1 << 28) if device.type == "cuda" else (1 << 20)
    src = torch.empty(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() * src.element_size() / measure(lambda: dst.copy_(src))


# ---- what a user writes with PyTorch ops ----------------------------------------------------
def user_logdet(J):
    Jf = J.float()
    G = torch.bmm(Jf.mT, Jf)
    M = G / BETA + torch.eye(G.shape[-1], device=J.device)
    return 2 * torch.linalg.cholesky(M).diagonal(dim1=-2, dim2=-1).log().sum(-1)


def user_hadamard(J):
    Jf = J.float()
    return torch.log1p((Jf * Jf).sum(1) / BETA).sum(-1)


def user_orthogonality(J):
    Jf = J.float()
    G = torch.bmm(Jf.mT, Jf)
    n = G.diagonal(dim1=-2, dim2=-1).sqrt()
    cos2 = (G / (n[:, :, None] * n[:, None, :] + 1e-8)) ** 2
    k = G.shape[-1]
    return cos2.triu(1).sum((-2, -1)) / (k * (k - 1) / 2)


@contextlib.contextmanager
def schedule(name):
    """Force one logdet schedule for the Triton backend (None: its own choice)."""
    original = logdet_triton.path
    if name is not None:
        logdet_triton.path = lambda *_: name
    try:
        yield
    finally:
        logdet_triton.path = original


def candidates(d: int):
    """(operator, implementation, fn(J) -> (B,), schedule or None)."""
    out = [("logdet", "bmm+cholesky", user_logdet, None),
           ("logdet", "torch", lambda J: fastjac.logdet_gram(J, BETA, backend="torch"), None),
           ("logdet", "triton", lambda J: fastjac.logdet_gram(J, BETA, backend="triton"), None)]
    for name in logdet_triton.PATHS:
        if name == "cusolver" or d <= logdet_triton.REGISTER_MAX_D:
            out.append(("logdet", f"triton:{name}", lambda J: fastjac.logdet_gram(J, BETA, backend="triton"), name))
    out += [("hadamard", "user", user_hadamard, None),
            ("hadamard", "torch", lambda J: fastjac.hadamard_bound(J, BETA, backend="torch"), None),
            ("hadamard", "triton", lambda J: fastjac.hadamard_bound(J, BETA, backend="triton"), None),
            ("orthogonality", "user", user_orthogonality, None),
            ("orthogonality", "torch", lambda J: fastjac.orthogonality_penalty(J, backend="torch"), None),
            ("orthogonality", "triton", lambda J: fastjac.orthogonality_penalty(J, backend="triton"), None)]
    return out


def run(sizes, device, reps, out=print):
    measure = timer(device, reps)
    bandwidth = copy_bandwidth(device, measure)
    rows = []
    out(f"copy bandwidth {bandwidth / 1e6:.0f} GB/s on {device_name(device)}")
    out(f"{'op':13s} {'dtype':8s} {'B':>4s} {'D':>6s} {'d':>4s} {'impl':16s} {'fwd ms':>9s} {'floor':>8s} "
        f"{'x floor':>7s} {'fwd+bwd':>9s} {'floor':>8s} {'x floor':>7s} {'vs user':>12s}")
    for dtype_name in sizes["dtypes"]:
        dtype = getattr(torch, dtype_name)
        for B in sizes["B"]:
            for D in sizes["D"]:
                for d in sizes["d"]:
                    g = torch.Generator(device=device).manual_seed(0)
                    J = (torch.randn(B, D, d, device=device, generator=g) / D ** 0.5).to(dtype).requires_grad_()
                    bytes_J = J.numel() * J.element_size()
                    floor_fwd, floor_bwd = bytes_J / bandwidth, 3 * bytes_J / bandwidth
                    user = {}
                    for op, impl, fn, sched in candidates(d):
                        with schedule(sched):
                            fwd = measure(lambda: fn(J.detach()))
                            both = measure(lambda: fn(J).sum().backward(), grad_to_none=[J])
                            peak = peak_bytes(lambda: fn(J).sum().backward(), J, device)
                        if impl in ("user", "bmm+cholesky"):
                            user[op] = (fwd, both)
                        base = user.get(op, (float("nan"), float("nan")))
                        row = dict(op=op, dtype=dtype_name, B=B, D=D, d=d, impl=impl, fwd_ms=fwd,
                                   fwd_bwd_ms=both, floor_fwd_ms=floor_fwd, floor_fwd_bwd_ms=floor_bwd,
                                   speedup_fwd=base[0] / fwd, speedup_fwd_bwd=base[1] / both,
                                   peak_fwd_bwd_bytes=peak, bytes_J=bytes_J,
                                   schedule=(sched or logdet_triton.path(B, D, d, device))
                                   if op == "logdet" and impl.startswith("triton") else None)
                        rows.append(row)
                        out(f"{op:13s} {dtype_name:8s} {B:4d} {D:6d} {d:4d} {impl:16s} {fwd:9.4f} {floor_fwd:8.4f} "
                            f"{fwd / floor_fwd:7.1f} {both:9.4f} {floor_bwd:8.4f} {both / floor_bwd:7.1f} "
                            f"{row['speedup_fwd']:5.2f}/{row['speedup_fwd_bwd']:5.2f}x")
                    del J
    return bandwidth, rows


def peak_bytes(fn, J, device):
    """Peak device memory above what was allocated before one call (None on the CPU)."""
    if device.type != "cuda":
        return None
    J.grad = None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    J.grad = None
    return torch.cuda.max_memory_allocated() - before


def targets(rows, out=print):
    """The issue's targets, per (dtype, B, D, d): default Triton logdet ≥ 3× faster than
    bmm+cholesky (forward and forward+backward), and within 2× of the floor at D = 12288."""
    out("targets (logdet, default triton schedule): speedup vs bmm+cholesky fwd / fwd+bwd, x floor fwd / fwd+bwd")
    for r in rows:
        if r["op"] == "logdet" and r["impl"] == "triton":
            fast = r["speedup_fwd"] >= 3 and r["speedup_fwd_bwd"] >= 3
            near = r["D"] != 12288 or (r["fwd_ms"] <= 2 * r["floor_fwd_ms"] and r["fwd_bwd_ms"] <= 2 * r["floor_fwd_bwd_ms"])
            out(f"  {r['dtype']:8s} B={r['B']:<4d} D={r['D']:<6d} d={r['d']:<4d} {r['schedule']:9s} "
                f"{r['speedup_fwd']:5.2f}x / {r['speedup_fwd_bwd']:5.2f}x   "
                f"{r['fwd_ms'] / r['floor_fwd_ms']:5.1f} / {r['fwd_bwd_ms'] / r['floor_fwd_bwd_ms']:5.1f}   "
                f"{'ok' if fast and near else 'MISSED'}")


def device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or 'cpu'}, triton interpreter)"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (CPU/interpreter: proves the script runs)")
    parser.add_argument("--reps", type=int, default=None, help="GPU: ms of timed runs per measurement (default 100); CPU: calls (default 1)")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.tiny:
        parser.error("no GPU here: the full sizes need one (use --tiny to check the script under the interpreter)")
    reps = args.reps or (100 if device.type == "cuda" else 1)
    fastjac.set_checks(False)
    import triton
    header = dict(device=device_name(device), torch=torch.__version__, cuda=torch.version.cuda,
                  triton=triton.__version__, date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  tf32=torch.backends.cuda.matmul.allow_tf32)
    print(" ".join(f"{k}={v}" for k, v in header.items()))
    bandwidth, rows = run(TINY if args.tiny else FULL, device, reps)
    targets(rows)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(dict(header, bandwidth_bytes_per_ms=bandwidth, results=rows), f, indent=1)
        os.replace(tmp, args.json)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
