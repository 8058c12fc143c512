"""Fig. 3 (App. F): β-VAE, its Taylor approximation (Eq. 7) and GRAE (Eq. 13) against β.

For each β and posterior block size b ∈ {1, 2, 3} (d = 12) a β-VAE is trained (one posterior draw
per step, Gaussian observations with σ = 1) and its encoder/decoder are evaluated on held-out data,
in float64, per data point:
- β-VAE objective (Eq. 2) by Monte Carlo with S draws (mean and standard error over the draws);
- Taylor β-VAE (Eq. 7) with the same posterior;
- GRAE (Eq. 13) at z = posterior mean, exact log det;
- the gap Taylor − GRAE, checked ≥ 0 on every point and against its closed form
  (β/2)[tr(MΣ) − log det(MΣ) − d], M = Σ*⁻¹ = I + JᵀJ/β (docs/maths.md#the-taylor-gap).
All values come from the package's functional objectives; nothing is re-derived here.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..jacobian import jacobian_columns
from ..objectives import beta_vae_terms, grae_terms, taylor_beta_vae_loss
from ..ops import optimal_posterior_covariance
from . import common, plotting
from .results import Results, log

QUICK = dict(betas=(0.01, 0.03, 0.1, 0.3, 1.0), blocks=(1, 2, 3), latent_dim=12, train_steps=400,
             num_samples=64, test_points=500)
FULL = dict(betas=(0.01, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0), blocks=(1, 2, 3), latent_dim=12,
            train_steps=20000, num_samples=256, test_points=5000)
GAP_TOLERANCE = 1e-8  # float64 evaluation: Taylor − GRAE may only be below 0 by rounding
# Held-out points evaluated at once: the MLP's 250 (the published runs' draws depend on it); the
# App. D nets hold num_samples × points feature maps of up to 512 × 7 × 7 in float64 (GBs at 250).
EVAL_BATCH = {"mlp": 250}
EVAL_BATCH_CONV = 20


def add_arguments(parser) -> None:
    common.add_data_arguments(parser)
    parser.add_argument("--betas", type=float, nargs="+", help="β grid (quick: 0.01 … 1)")
    parser.add_argument("--blocks", type=int, nargs="+", help="posterior block sizes (paper: 1 2 3)")
    parser.add_argument("--latent-dim", type=int, help="d (paper: 12)")
    parser.add_argument("--num-samples", type=int, help="posterior draws per point for the β-VAE value")
    parser.add_argument("--test-points", type=int, help="held-out points evaluated (paper: 5000)")


@torch.no_grad()
def evaluate(model, x: torch.Tensor, *, num_samples: int, batch_size: int = 250,
             generator: torch.Generator | None = None) -> dict:
    """Per-point objectives of a trained β-VAE on x, in the model's dtype.

    Returns numpy arrays: draws (S, N) the β-VAE objective per draw, taylor (N,), grae (N,),
    closed_form_gap (N,)."""
    beta, obs, dec = model.beta, model.observation, model.decoder
    parts = {"draws": [], "taylor": [], "grae": [], "closed_form_gap": []}
    for chunk in torch.split(x, batch_size):
        q = model.posterior_of(chunk)
        t = beta_vae_terms(dec, q.mean, q.scale_tril, chunk, beta, observation=obs,
                           num_samples=num_samples, generator=generator)
        parts["draws"].append(t.reconstruction + beta * t.kl)
        parts["taylor"].append(taylor_beta_vae_loss(dec, q.mean, q.scale_tril, chunk, beta,
                                                    observation=obs, reduction="none"))
        parts["grae"].append(grae_terms(dec, q.mean, chunk, beta, estimator="exact", observation=obs).total)
        out, J = jacobian_columns(dec, q.mean)
        optimal = optimal_posterior_covariance(J, beta, weights=obs.weights(out, chunk))
        sigma = q.covariance
        M_sigma = torch.linalg.solve(optimal, sigma)                      # M Σ, M = Σ*⁻¹
        d = sigma.shape[-1]
        parts["closed_form_gap"].append(0.5 * beta * (M_sigma.diagonal(dim1=-2, dim2=-1).sum(-1)
                                                      - torch.logdet(M_sigma) - d))
    return {k: torch.cat(v, -1).cpu().numpy() for k, v in parts.items()}


def summarise(values: dict) -> dict:
    """The numbers of one (β, b) point, from :func:`evaluate`'s per-point arrays."""
    draws = values["draws"].mean(1)                                       # (S,) dataset means per draw
    gap = values["taylor"] - values["grae"]
    return dict(beta_vae=float(draws.mean()), beta_vae_stderr=float(draws.std(ddof=1) / math.sqrt(len(draws))),
                taylor=float(values["taylor"].mean()), grae=float(values["grae"].mean()),
                gap_mean=float(gap.mean()), gap_min=float(gap.min()),
                gap_negative_points=int((gap < -GAP_TOLERANCE).sum()), points=int(len(gap)),
                gap_closed_form_max_error=float(np.abs(gap - values["closed_form_gap"]).max()))


def _config(args) -> tuple[dict, dict]:
    base = QUICK if args.quick else FULL
    grid = dict(betas=tuple(args.betas or base["betas"]), blocks=tuple(args.blocks or base["blocks"]),
                latent_dim=args.latent_dim or base["latent_dim"],
                num_samples=args.num_samples or base["num_samples"],
                test_points=args.test_points or base["test_points"])
    if min(grid["betas"]) <= 0:
        raise ValueError(f"--betas must be > 0, got {grid['betas']}")
    if min(grid["blocks"]) < 1 or max(grid["blocks"]) > grid["latent_dim"]:
        raise ValueError(f"--blocks must lie in [1, d = {grid['latent_dim']}], got {grid['blocks']}")
    if grid["num_samples"] < 2 or grid["test_points"] < 1:
        raise ValueError("--num-samples must be >= 2 and --test-points >= 1")
    return common.model_config(args, base["train_steps"]), grid


def run(args) -> int:
    model_cfg, grid = _config(args)
    data = common.load_data(args)
    test = common.first(data.test, grid["test_points"]).double()
    results = Results(args.out, "objectives", {"model": model_cfg, "grid": grid, "quick": bool(args.quick),
                                               "data": data.description})
    log(f"objectives: {data.description}; {model_cfg['architecture']} β-VAE, d = {grid['latent_dim']}, "
        f"{model_cfg['train_steps']} steps each; evaluated on {len(test)} held-out points → {args.out}")
    points = [(b, beta) for b in grid["blocks"] for beta in grid["betas"]]
    for i, (b, beta) in enumerate(points, 1):
        key = f"b={b}/beta={beta:g}"
        if key in results:
            log(f"[{i}/{len(points)}] {key}: done already, skipped")
            continue
        model, fitted = common.trained_autoencoder(
            "beta-vae", model_cfg, data.shape, out=args.out, name=f"objectives-b{b}-beta{beta:g}",
            device=args.device, eval_size=min(500, grid["test_points"]), latent_dim=grid["latent_dim"],
            beta=beta, block_size=b)
        model = model.cpu().double()
        values = evaluate(model, test, num_samples=grid["num_samples"],
                          batch_size=EVAL_BATCH.get(model_cfg["architecture"], EVAL_BATCH_CONV),
                          generator=torch.Generator().manual_seed(args.seed))
        rec = dict(block_size=b, beta=beta, **summarise(values), train=fitted)
        results.put(key, rec)
        log(f"[{i}/{len(points)}] {key}: β-VAE {rec['beta_vae']:.3f} ± {rec['beta_vae_stderr']:.3f}, "
            f"Taylor {rec['taylor']:.3f}, GRAE {rec['grae']:.3f}")
    rows = [results[f"b={b}/beta={beta:g}"] for b, beta in points]
    summary = dict(points=len(rows), all_gaps_nonnegative=all(r["gap_negative_points"] == 0 for r in rows),
                   min_gap=min(r["gap_min"] for r in rows),
                   max_closed_form_error=max(r["gap_closed_form_max_error"] for r in rows))
    results.put_summary(summary)
    print_table(rows)
    log(f"Taylor − GRAE ≥ 0 on every one of {rows[0]['points']} points × {len(rows)} models: "
        f"{'yes' if summary['all_gaps_nonnegative'] else 'NO'} (smallest {summary['min_gap']:.3g}); "
        f"it matches (β/2)[tr(MΣ) − log det(MΣ) − d] to {summary['max_closed_form_error']:.1e}")
    log(f"figure: {figure(rows, sorted(grid['blocks']), args.out / 'objectives.png')}")
    return 0


def print_table(rows: list[dict]) -> None:
    log(f"\n{'b':>2s} {'β':>6s} {'β-VAE':>10s} {'± s.e.':>7s} {'Taylor':>10s} {'GRAE':>10s} "
        f"{'β-VAE−Taylor':>13s} {'Taylor−GRAE':>12s} {'min gap':>9s}")
    for r in rows:
        log(f"{r['block_size']:2d} {r['beta']:6g} {r['beta_vae']:10.3f} {r['beta_vae_stderr']:7.3f} "
            f"{r['taylor']:10.3f} {r['grae']:10.3f} {r['beta_vae'] - r['taylor']:13.3f} "
            f"{r['gap_mean']:12.4f} {r['gap_min']:9.2e}")


def figure(rows: list[dict], blocks, path):
    """Top: the three objectives against β per block size; bottom: their gaps."""
    fig, axes = plotting.panels(2, len(blocks), width=3.6, height=2.8)
    for col, b in enumerate(blocks):
        rs = sorted((r for r in rows if r["block_size"] == b), key=lambda r: r["beta"])
        betas = [r["beta"] for r in rs]
        top, bottom = axes[0][col], axes[1][col]
        top.errorbar(betas, [r["beta_vae"] for r in rs], yerr=[2 * r["beta_vae_stderr"] for r in rs],
                     marker="o", ms=4, label="β-VAE (Eq. 2) ± 2 s.e.")
        top.plot(betas, [r["taylor"] for r in rs], marker="s", ms=4, label="Taylor (Eq. 7)")
        top.plot(betas, [r["grae"] for r in rs], marker="^", ms=4, label="GRAE (Eq. 13)")
        top.set_title(f"block size b = {b}", fontsize=9)
        bottom.errorbar(betas, [r["beta_vae"] - r["taylor"] for r in rs],
                        yerr=[2 * r["beta_vae_stderr"] for r in rs], marker="o", ms=4, label="β-VAE − Taylor")
        bottom.plot(betas, [r["gap_mean"] for r in rs], marker="s", ms=4, color="tab:red", label="Taylor − GRAE")
        bottom.axhline(0, color="gray", lw=0.5)
        for ax in (top, bottom):
            ax.set_xscale("log")
        bottom.set_xlabel("β")
    axes[0][0].set_ylabel("objective (held out, per point)")
    axes[1][0].set_ylabel("gap")
    axes[0][0].legend(fontsize=7)
    axes[1][0].legend(fontsize=7)
    return plotting.save(fig, path)
