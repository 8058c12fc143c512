"""estimator="hutchinson_cg" against "exact": time per training step and gradient error, as
functions of the number of probes P and of CG iterations k, for d in {16, 64, 128}.

    python benchmarks/hutchinson.py [--quick] [--json benchmarks/results/hutchinson_cpu.json]

Decoders (from fastjac.models): the MLP d → 256 → 256 → 784 and the App. D MNIST decoder
(ConvT stack, ELU, sigmoid; ``--width`` scales its channels so a CPU finishes in minutes;
``norm="none"`` so every estimator sees the exact per-sample Jacobian, docs/maths.md#batch-coupling). A Jacobian at
random initialisation is tiny (M ≈ I, CG converges in one step), so each decoder is first trained
for ``--pretrain`` Adam steps of GRAE≈ on the MNIST test images (``--mnist``; random data if absent)
and the benchmark runs on held-out images, z = encoder(x).

A step is grae_loss (Gaussian, β) forward + backward into the decoder parameters and z; the
encoder's cost, the same for every estimator, is left out. The rivals (exact, GRAE≈ with one column
for context, every (P, k)) are timed by ``fastjac.bench.timing.interleaved`` (``--repeats`` rounds,
one call per sample) and the time is the best of them (the CPU is shared: the minimum is the least
disturbed; medians are in the JSON too). Every timed call's gradient also enters the error. Errors are
the RMS over the repeats' draws of ‖g − g_exact‖ / ‖·‖ over the decoder parameters and z, relative to the exact *regulariser*
gradient (``reg_err``) and to the whole loss gradient (``loss_err``); CG runs to ``cg_tol`` or to
k = cg_max_iter iterations, whichever comes first. "Beats exact at accuracy τ" means the fastest
(P, k) whose error (reg_err, or loss_err) is <= τ takes less time per step than exact; the
crossover is the smallest d of the grid from which on that holds.
"""
from __future__ import annotations

import argparse
import gzip
import logging
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from fastjac import grae_loss, jacobian_regularizer  # noqa: E402
from fastjac.bench import results, timing  # noqa: E402
from fastjac.estimators import hutchinson as cg  # noqa: E402
from fastjac.models import ConvDecoder, MLPDecoder, MLPEncoder  # noqa: E402

SHAPE = (1, 28, 28)


def load_images(folder: Path, n: int, generator) -> torch.Tensor:
    """n MNIST test images in [0, 1], (n, 1, 28, 28); uniform noise when the IDX file is absent."""
    path = folder / "t10k-images-idx3-ubyte.gz"
    if not path.exists():
        print(f"note: {path} not found; using uniform random images", file=sys.stderr)
        return torch.rand(n, *SHAPE, generator=generator)
    with gzip.open(path, "rb") as f:
        raw = f.read()
    images = torch.frombuffer(bytearray(raw[16:]), dtype=torch.uint8).reshape(-1, *SHAPE)
    return images[torch.randperm(len(images), generator=generator)[:n]].float() / 255


def make_decoder(model: str, d: int, width: float) -> torch.nn.Module:
    if model == "mlp":
        return MLPDecoder(d, SHAPE, hidden=(256, 256))
    return ConvDecoder(d, "mnist", width=width, norm="none")


def pretrain(decoder, encoder, images, beta, steps, batch, generator):
    """GRAE≈ (one sampled column) with Adam, so J has the scale of a trained decoder."""
    opt = torch.optim.Adam([*decoder.parameters(), *encoder.parameters()], lr=1e-3)
    for _ in range(steps):
        x = images[torch.randint(len(images), (batch,), generator=generator)]
        loss = grae_loss(decoder, encoder(x), x, beta, estimator="stochastic", generator=generator)
        opt.zero_grad()
        loss.backward()
        opt.step()


class IterationLog(logging.Handler):
    """Collects the CG iteration counts that fastjac.hutchinson logs at DEBUG level."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.counts = []

    def emit(self, record):
        self.counts.append(int(record.args[0]))


def gradient(decoder, z, x, beta, **options):
    """The flat gradient over the decoder parameters and z of one grae_loss step."""
    loss = grae_loss(decoder, z, x, beta, **options)
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, [*decoder.parameters(), z])])


def regularizer_gradient(decoder, z, beta):
    R = jacobian_regularizer(decoder, z, beta, estimator="exact")
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(R, [*decoder.parameters(), z])])


def rivals(args):
    """(name, options) of every estimator setting timed: exact, GRAE≈ for context, the (P, k) grid."""
    out = [("exact", dict(estimator="exact")), ("stochastic", dict(estimator="stochastic"))]
    out += [(f"hutchinson_cg P={P} k={k}",
             dict(estimator="hutchinson_cg", num_probes=P, cg_max_iter=k, cg_tol=args.cg_tol))
            for P in args.probes for k in args.iterations]
    return out


def measure(model, d, args, images, log, generator):
    torch.manual_seed(args.seed)
    decoder, encoder = make_decoder(model, d, args.width), MLPEncoder(SHAPE, hidden=(256,))
    encoder = torch.nn.Sequential(encoder, torch.nn.Linear(256, d))
    train, held_out = images[: -args.batch], images[-args.batch:]
    start = time.perf_counter()
    pretrain(decoder, encoder, train, args.beta, args.pretrain, 32, generator)
    print(f"  {model} d={d}: pretrained in {time.perf_counter() - start:.1f}s", file=sys.stderr, flush=True)
    with torch.no_grad():
        z = encoder(held_out).requires_grad_(True)
    reg_norm = float(regularizer_gradient(decoder, z, args.beta).norm())
    exact = gradient(decoder, z, held_out, args.beta, estimator="exact")
    settings = rivals(args)
    errors = {name: [] for name, _ in settings}
    iterations = {name: [] for name, _ in settings}

    def timed(name, options):
        if options["estimator"] != "exact":
            options = dict(options, generator=generator)

        def run():
            log.counts.clear()
            errors[name].append(float((gradient(decoder, z, held_out, args.beta, **options) - exact).norm()))
            iterations[name].extend(log.counts)
        return run

    samples = timing.interleaved({name: timed(name, options) for name, options in settings},
                                 repeats=args.repeats, min_repeats=args.repeats, min_sample_s=0.0)
    rows = []
    for name, options in settings:
        e, k, t = errors[name], iterations[name], timing.summary(samples[name])
        rms = math.sqrt(sum(v * v for v in e) / len(e))
        rows.append(dict(model=model, d=d, estimator=options["estimator"], probes=options.get("num_probes"),
                         cg_max_iter=options.get("cg_max_iter"), cg_iterations=statistics.mean(k) if k else None,
                         seconds=t["min_s"], seconds_median=t["median_s"],
                         reg_err=rms / reg_norm, loss_err=rms / float(exact.norm())))
    print(f"  {model} d={d}: done", file=sys.stderr, flush=True)
    return rows


def crossovers(rows, targets, key):
    """{model: {τ: smallest d from which on hutchinson_cg with rows[key] <= τ is faster than exact}}."""
    result = {}
    for model in sorted({r["model"] for r in rows}):
        result[model] = {}
        ds = sorted({r["d"] for r in rows if r["model"] == model})
        for tau in targets:
            beats = {}
            for d in ds:
                here = [r for r in rows if r["model"] == model and r["d"] == d]
                exact = next(r["seconds"] for r in here if r["estimator"] == "exact")
                ok = [r["seconds"] for r in here if r["estimator"] == "hutchinson_cg" and r[key] <= tau]
                beats[d] = bool(ok) and min(ok) < exact
            winning = [d for d in ds if all(beats[e] for e in ds if e >= d)]
            result[model][str(tau)] = min(winning) if winning else None
    return result


def table(rows) -> str:
    lines = [f"{'model':6} {'d':>4} {'estimator':14} {'P':>3} {'k max':>5} {'k used':>6} {'ms/step':>9} "
             f"{'vs exact':>8} {'reg_err':>8} {'loss_err':>9}"]
    exact = {(r["model"], r["d"]): r["seconds"] for r in rows if r["estimator"] == "exact"}
    for r in rows:
        used = "" if r["cg_iterations"] is None else f"{r['cg_iterations']:.1f}"
        lines.append(f"{r['model']:6} {r['d']:>4} {r['estimator']:14} {r['probes'] or '':>3} "
                     f"{r['cg_max_iter'] or '':>5} {used:>6} {1e3 * r['seconds']:9.1f} "
                     f"{exact[(r['model'], r['d'])] / r['seconds']:7.2f}x {r['reg_err']:8.3f} {r['loss_err']:9.4f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="mlp,mnist")
    parser.add_argument("--dims", default="16,64,128")
    parser.add_argument("--probes", default="1,4,16")
    parser.add_argument("--iterations", default="2,5,10,20", help="cg_max_iter values")
    parser.add_argument("--cg-tol", type=float, default=1e-4)
    parser.add_argument("--targets", default="0.1,0.3", help="reg_err thresholds τ for the crossover")
    parser.add_argument("--loss-targets", default="0.01,0.05", help="loss_err thresholds for the crossover")
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--width", type=float, default=0.125, help="channel multiplier of the App. D decoder")
    parser.add_argument("--pretrain", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: least noise on a shared CPU)")
    parser.add_argument("--mnist", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/mnist")
    parser.add_argument("--quick", action="store_true", help="d=16, P=1, k=5, 1 repeat: a smoke run")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.quick:
        args.dims, args.probes, args.iterations, args.repeats, args.pretrain = "16", "1", "5", 1, 5
    args.models = args.models.split(",")
    args.dims = [int(v) for v in args.dims.split(",")]
    args.probes = [int(v) for v in args.probes.split(",")]
    args.iterations = [int(v) for v in args.iterations.split(",")]
    targets = {"reg_err": [float(v) for v in args.targets.split(",")],
               "loss_err": [float(v) for v in args.loss_targets.split(",")]}

    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(args.seed)
    images = load_images(args.mnist, 4000, generator)
    log = IterationLog()
    cg.logger.addHandler(log)
    cg.logger.setLevel(logging.DEBUG)
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cg.ConvergenceWarning)  # capped k is the point of the sweep
        for model in args.models:
            for d in args.dims:
                rows += measure(model, d, args, images, log, generator)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "json"}
    result = results.record("benchmarks/hutchinson.py", program="python benchmarks/hutchinson.py", argv=argv,
                            device="cpu", settings=settings)
    result.update({
        "rows": rows, "crossover_d": {key: crossovers(rows, taus, key) for key, taus in targets.items()}})
    print(table(rows))
    print("crossover d (hutchinson_cg faster than exact at error <= τ, from this d of the grid on):")
    for key, by_model in result["crossover_d"].items():
        for model, by_tau in by_model.items():
            print(f"  {key:8} {model:6}: " + ", ".join(f"τ={t}: {'none in grid' if v is None else v}"
                                                    for t, v in by_tau.items()))
    if args.json:
        results.write_json(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
