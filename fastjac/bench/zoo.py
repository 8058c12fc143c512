"""GRAE≈ training steps on decoders users have, against a plain step and a hand-written torch.func step.

One *decoder-only step* per rival, timed interleaved in the same run (:mod:`fastjac.bench.timing`):
- ``plain``: out = g(z); MSE(out, x); gradients into z and the decoder's parameters.
- ``fastjac``: the same plus GRAE≈ (``estimator="stochastic"``, one column per sample) from one
  pass: ``reg, out = jacobian_regularizer(g, z, β, return_output=True)``.
- ``torch.func``: what a user writes by hand — one drawn unit direction per sample through
  ``torch.func.jvp``, then d·log(1 + ‖J v‖²/β) (the same estimate):

      v = eye[torch.randint(d, (B,))]                          # (B, d)
      out, Jv = torch.func.jvp(g, (z,), (v.view_as(z),))

  (for the attention decoders under fastjac's op rules, ``fastjac._rules.column_rules()``:
  torch.func alone fails on their attention and channels-last GroupNorm)
      R = d * torch.log1p(Jv.flatten(1).pow(2).sum(1) / beta)
      loss = mse(out, x) + beta / 2 * R.mean()
      grads = torch.autograd.grad(loss, [z, *params])

The ratios (step / plain step) are what the README and issue 14 quote. Run:
``python -m fastjac.bench.zoo --breakdown --out benchmarks/results/zoo_cpu.json`` (``--quick`` for a
smoke run); ``--breakdown`` adds where each step's time goes (GEMM/convolution, fastjac's operators,
the rest) from the profiler.
"""
from __future__ import annotations

import argparse
import math
import os
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from .. import objectives
from .._rules import column_rules
from . import results, timing

BETA = 0.5


def mlp_decoder(dtype=torch.float32) -> tuple[nn.Module, tuple, int]:
    """The benchmarks' MLP: d = 16 → 512 → 512 → 784 (ELU, sigmoid), batch 64."""
    torch.manual_seed(0)
    dec = nn.Sequential(nn.Linear(16, 512), nn.ELU(), nn.Linear(512, 512), nn.ELU(), nn.Linear(512, 784),
                        nn.Sigmoid()).to(dtype)
    return dec, (64, 16), 784


def autoencoder_kl(dtype=torch.float32) -> Optional[tuple[nn.Module, tuple, int]]:
    """diffusers AutoencoderKL's decoder, channels 32/64/64, latent 4×8×8, batch 8 (None without diffusers)."""
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        return None
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(32, 64, 64),
                        layers_per_block=1, latent_channels=4, norm_num_groups=32, sample_size=32)
    return vae.decoder.to(dtype), (8, 4, 8, 8), 3 * 32 * 32


DECODERS: dict[str, Callable] = {"mlp": mlp_decoder, "autoencoder_kl": autoencoder_kl}


def _params(decoder: nn.Module) -> list:
    return [p for p in decoder.parameters() if p.requires_grad]


def plain_step(decoder, z: Tensor, x: Tensor) -> Callable[[], None]:
    params = _params(decoder)

    def step():
        loss = (decoder(z) - x).pow(2).flatten(1).sum(1).mean()
        torch.autograd.grad(loss, [z, *params])
    return step


def fastjac_step(decoder, z: Tensor, x: Tensor) -> Callable[[], None]:
    params = _params(decoder)

    def step():
        reg, out = objectives.jacobian_regularizer(decoder, z, BETA, estimator="stochastic", num_columns=1,
                                                   return_output=True)
        loss = (out - x).pow(2).flatten(1).sum(1).mean() + reg
        torch.autograd.grad(loss, [z, *params])
    return step


def torch_func_step(decoder, z: Tensor, x: Tensor) -> Callable[[], None]:
    params = _params(decoder)
    B, d = z.shape[0], math.prod(z.shape[1:])
    eye = torch.eye(d, dtype=z.dtype, device=z.device)

    def step():
        v = eye[torch.randint(d, (B,), device=z.device)]
        with column_rules():  # attention and channels-last GroupNorm need patched ops (none in an MLP)
            out, Jv = torch.func.jvp(decoder, (z,), (v.view_as(z),))
        R = d * torch.log1p(Jv.flatten(1).pow(2).sum(1) / BETA)
        loss = (out - x).pow(2).flatten(1).sum(1).mean() + BETA / 2 * R.mean()
        torch.autograd.grad(loss, [z, *params])
    return step


STEPS = {"plain": plain_step, "fastjac": fastjac_step, "torch.func": torch_func_step}


def measure(name: str, *, repeats: int = 15, min_sample_s: float = 0.2) -> Optional[dict]:
    """Median seconds per step of every rival on decoder ``name`` and the ratios to the plain step."""
    built = DECODERS[name]()
    if built is None:
        return None
    decoder, z_shape, D = built
    g = torch.Generator().manual_seed(0)
    z = torch.randn(*z_shape, generator=g).requires_grad_()
    x = torch.rand(z_shape[0], D, generator=g).reshape(decoder(z).shape)
    samples = timing.interleaved({rival: make(decoder, z, x) for rival, make in STEPS.items()},
                                 repeats=repeats, min_sample_s=min_sample_s)
    rows = {rival: timing.summary(s) for rival, s in samples.items()}
    base = rows["plain"]["median_s"]
    return {"decoder": name, "z_shape": list(z_shape), "steps": rows,
            "ratio": {rival: row["median_s"] / base for rival, row in rows.items()}}


CATEGORIES = (("GEMM / convolution", ("mm", "addmm", "bmm", "baddbmm", "conv", "mkldnn", "linear", "matmul")),
              ("fastjac operators", ("fastjac", "column_estimate", "logdet_gram")))


def _category(op_name: str) -> str:
    for label, keys in CATEGORIES:
        if any(key in op_name for key in keys):
            return label
    return "elementwise, copies, other"


def breakdown(name: str, *, steps: int = 5) -> Optional[dict]:
    """Where each rival's step time goes on decoder ``name``: milliseconds per step by category
    (profiler self CPU time; the profiler's overhead inflates small ops alike for every rival)."""
    built = DECODERS[name]()
    if built is None:
        return None
    decoder, z_shape, D = built
    z = torch.randn(*z_shape).requires_grad_()
    x = torch.rand(z_shape[0], D).reshape(decoder(z).shape)
    table = {}
    for rival, make in STEPS.items():
        step = make(decoder, z, x)
        step()
        with torch.profiler.profile() as prof:
            for _ in range(steps):
                step()
        parts: dict = {}
        for event in prof.key_averages():
            key = _category(event.key)
            parts[key] = parts.get(key, 0.0) + event.self_cpu_time_total / 1e3 / steps
        table[rival] = parts
    return {"decoder": name, "ms_per_step": table}


def run(names=None, *, repeats: int = 15, min_sample_s: float = 0.2, threads: int = 1) -> list[dict]:
    """Every decoder's rows (decoders whose package is missing are left out)."""
    torch.set_num_threads(threads)
    found = (measure(n, repeats=repeats, min_sample_s=min_sample_s) for n in (names or DECODERS))
    return [row for row in found if row is not None]


def format_rows(rows: list[dict]) -> str:
    lines = [f"{'decoder':<16}{'plain ms':>10}{'fastjac':>10}{'torch.func':>12}   (step / plain step)"]
    for row in rows:
        r = row["ratio"]
        lines.append(f"{row['decoder']:<16}{row['steps']['plain']['median_s'] * 1e3:>10.2f}"
                     f"{r['fastjac']:>9.2f}×{r['torch.func']:>11.2f}×")
    return "\n".join(lines)


def malloc_settings() -> dict:
    """The glibc malloc tunables in the environment: the stacked passes' larger buffers make
    glibc's default trim/mmap thresholds return memory and fault it back in on every step, so
    the ratios depend on them (as PyTorch's CPU tuning guide says of allocators in general)."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastjac.bench.zoo", description=__doc__.split("\n")[0])
    parser.add_argument("--decoders", nargs="*", choices=list(DECODERS), default=None)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="3 repeats, short samples (a smoke run)")
    parser.add_argument("--out", default=None, help="write the results JSON here")
    parser.add_argument("--breakdown", action="store_true", help="also: where each step's time goes (profiler)")
    args = parser.parse_args(argv)
    repeats, min_sample_s = (3, 0.0) if args.quick else (args.repeats, 0.2)
    rows = run(args.decoders, repeats=repeats, min_sample_s=min_sample_s, threads=args.threads)
    print(format_rows(rows))
    parts = [b for b in (breakdown(row["decoder"]) for row in rows) if b] if args.breakdown else []
    for part in parts:
        print(f"\n{part['decoder']}: ms per step (profiler self time)")
        for rival, cats in part["ms_per_step"].items():
            print(f"  {rival:<11}" + "".join(f"  {k}: {v:7.2f}" for k, v in sorted(cats.items())))
    if args.out:
        result = results.record("fastjac.bench.zoo", program="python -m fastjac.bench.zoo", argv=argv,
                                settings={"repeats": repeats, "threads": args.threads, "beta": BETA,
                                          "malloc": malloc_settings()})
        result["rows"] = rows
        if parts:
            result["breakdown"] = parts
        results.write_json(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
