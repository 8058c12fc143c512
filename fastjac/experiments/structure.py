"""Fig. 2, 7 (App. E): the posterior precision Σ⁻¹ and the decoder's JᵀJ share their block structure.

Eq. 11: the optimal block-diagonal posterior has Σ⁻¹ = I + blockdiag(JᵀJ)/β (Gaussian observations,
σ = 1), and a decoder trained with it is pushed towards JᵀJ with little energy outside the blocks.
For β-VAEs with block-diagonal posteriors (b ∈ {2, 3}) we report, per (β, d, b) and as medians
over held-out points:
- ``off_block_fraction``: the fraction of JᵀJ's off-diagonal energy (squared entries) that lies
  outside the posterior blocks, beside ``chance``, the fraction of off-diagonal entries outside
  the blocks (what an unstructured JᵀJ would give);
- ``relative_error``: ‖β(Σ⁻¹ − I) − JᵀJ‖_F / ‖JᵀJ‖_F (Eq. 11 against the whole JᵀJ), and
  ``relative_error_in_blocks``: the same against JᵀJ's block-diagonal part (Eq. 11 exactly);
and draw Σ⁻¹ beside JᵀJ for a few held-out points.
"""
from __future__ import annotations

import copy

import numpy as np
import torch

from ..jacobian import jacobian_columns
from ..objectives import beta_vae_terms
from ..models import block_mask
from ..observations import observation_weights
from ..training import load_checkpoint
from ..training.trainer import CHECKPOINT
from . import common, lbfgs, plotting
from .fit import fit
from .results import Results, log

OPTIMAL_POINTS = 100      # held-out points whose Σ is optimised one by one (the first ones)
OPTIMAL_ITERATIONS = 100  # L-BFGS steps per point at most
STATISTICS = ("off_block_fraction", "relative_error", "relative_error_in_blocks")

# (β, d, b) of the paper's Fig. 7 panels
PAPER_MODELS = ((0.2, 8, 2), (0.4, 8, 2), (0.6, 12, 2), (1.0, 8, 2), (0.4, 12, 3), (0.6, 8, 3), (0.8, 20, 3))
QUICK = dict(models=((0.05, 8, 2), (0.2, 8, 2), (0.05, 12, 3), (0.2, 12, 3)), train_steps=400,
             test_points=500, shown_points=2)
FULL = dict(models=PAPER_MODELS, train_steps=20000, test_points=5000, shown_points=3)


def add_arguments(parser) -> None:
    common.add_data_arguments(parser)
    parser.add_argument("--models", nargs="+", metavar="BETA,D,B",
                        help="models as β,d,b triples (paper: the seven panels of Fig. 7)")
    parser.add_argument("--test-points", type=int, help="held-out points measured")
    parser.add_argument("--checkpoints", type=int, nargs="+", metavar="STEPS",
                        help="measure each model after these many training steps (one run, resumed; "
                             "default: --train-steps), to follow Eq. 11 as training converges")
    parser.add_argument("--refine-encoder", type=int, default=0, metavar="STEPS",
                        help="then train the encoder alone this many steps with the decoder frozen and "
                             "measure again: the posterior's limit at that decoder (0: skip)")
    parser.add_argument("--optimal-posterior", type=int, default=0, metavar="DRAWS",
                        help="also measure, at the last checkpoint and on the first 100 held-out points, the "
                             "per-point Σ minimising the β-VAE objective (this many fixed draws) at the "
                             "encoder's mean: the limit of any encoder")


def _triples(specs) -> tuple:
    out = []
    for spec in specs:
        try:
            beta, d, b = spec.split(",")
            out.append((float(beta), int(d), int(b)))
        except ValueError:
            raise ValueError(f"--models takes β,d,b triples such as 0.2,8,2; got {spec!r}") from None
    return tuple(out)


def _gram(model, mu: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """J_wᵀJ_w of the decoder at the codes mu (observation weights applied)."""
    out, J = jacobian_columns(model.decoder, mu)
    w = observation_weights(model.observation, out, x)
    Jw = J * (w.unsqueeze(-1).sqrt() if isinstance(w, torch.Tensor) and w.dim() == 2 else w ** 0.5)
    return Jw.mT @ Jw


def structure_numbers(P: torch.Tensor, G: torch.Tensor, beta: float, block_size: int) -> dict:
    """Off-block energy of JᵀJ and the relative errors of Eq. 11 from per-point Σ⁻¹ and JᵀJ."""
    d = G.shape[-1]
    inside = block_mask(d, block_size)
    off_diagonal = ~torch.eye(d, dtype=torch.bool)
    energy = G ** 2
    off_block = (energy * (~inside)).sum((-2, -1)) / (energy * off_diagonal).sum((-2, -1)).clamp_min(1e-300)
    implied = beta * (P - torch.eye(d, dtype=P.dtype))
    norm = lambda t: torch.linalg.matrix_norm(t).clamp_min(1e-300)  # noqa: E731
    return dict(precision=P.numpy(), gram=G.numpy(), off_block_fraction=off_block.numpy(),
                relative_error=(norm(implied - G) / norm(G)).numpy(),
                relative_error_in_blocks=(norm(implied - G * inside) / norm(G * inside)).numpy(),
                chance=float((~inside).sum() / off_diagonal.sum()))


@torch.no_grad()
def measure(model, x: torch.Tensor, block_size: int, batch_size: int = 250) -> dict:
    """Per-point Σ⁻¹, JᵀJ (weighted, J_wᵀJ_w) and the structure numbers, as numpy arrays."""
    precisions, grams = [], []
    for chunk in torch.split(x, batch_size):
        q = model.posterior_of(chunk)
        grams.append(_gram(model, q.mean, chunk))
        precisions.append(torch.cholesky_inverse(q.scale_tril))
    return structure_numbers(torch.cat(precisions), torch.cat(grams), model.beta, block_size)


def optimal_posteriors(model, x: torch.Tensor, block_size: int, *, num_samples: int, iterations: int = 300,
                       seed: int = 0) -> dict:
    """The limit of any encoder at this decoder: per point, the block-diagonal Σ = LLᵀ minimising the
    β-VAE objective itself (Monte Carlo with ``num_samples`` fixed draws, so deterministic) at the
    encoder's mean, by per-point L-BFGS from the encoder's Σ. Eq. 11 is this optimum under the
    second-order (Taylor) approximation; what remains between the two is the decoder's curvature."""
    with torch.no_grad():
        q = model.posterior_of(x)
        mu, L0 = q.mean, q.scale_tril
    d = mu.shape[1]
    free = block_mask(d, block_size) & torch.ones(d, d, dtype=torch.bool).tril(-1)
    eye = torch.eye(d, dtype=mu.dtype)

    def scale_tril(theta):                      # strictly-lower block entries and log-diagonal
        lower = torch.zeros(len(theta), d, d, dtype=theta.dtype).masked_scatter(free, theta[:, d:])
        return lower + eye * theta[:, :d].exp().unsqueeze(-1)

    def value_and_grad(theta):
        theta = theta.detach().requires_grad_()
        with torch.enable_grad():
            t = beta_vae_terms(model.decoder, mu, scale_tril(theta), x, model.beta, observation=model.observation,
                               num_samples=num_samples, generator=torch.Generator().manual_seed(seed))
            f = t.reconstruction.mean(0) + model.beta * t.kl
            (g,) = torch.autograd.grad(f.sum(), theta)
        return f.detach(), g

    theta0 = torch.cat([L0.diagonal(dim1=-2, dim2=-1).log(), L0[:, free]], 1)
    theta, _ = lbfgs.minimise(value_and_grad, theta0, iterations=iterations, tolerance=1e-8)
    with torch.no_grad():
        return structure_numbers(torch.cholesky_inverse(scale_tril(theta)), _gram(model, mu, x),
                                 model.beta, block_size)


def _grid(args, base) -> dict:
    models = _triples(args.models) if args.models else base["models"]
    for beta, d, b in models:
        if not (beta > 0 and d >= 2 and 1 <= b <= d):
            raise ValueError(f"--models: need β > 0, d >= 2 and 1 <= b <= d, got {beta},{d},{b}")
    steps = sorted(set(args.checkpoints or [args.train_steps or base["train_steps"]]))
    if steps[0] < 1 or args.refine_encoder < 0 or args.optimal_posterior < 0:
        raise ValueError("--checkpoints must be >= 1, --refine-encoder and --optimal-posterior >= 0")
    grid = dict(models=[list(m) for m in models], checkpoints=steps, refine_encoder=args.refine_encoder,
                test_points=args.test_points or base["test_points"])
    if args.optimal_posterior:
        grid["optimal_posterior_draws"] = args.optimal_posterior
    return grid


def _record(m: dict, beta, d, b, steps, fitted) -> dict:
    return dict(beta=beta, latent_dim=d, block_size=b, steps=steps, chance=m["chance"], train=fitted,
                **{f"{k}_median": float(np.median(m[k])) for k in STATISTICS},
                **{f"{k}_quartiles": np.percentile(m[k], [25, 75]).tolist() for k in STATISTICS},
                gram_trace_median=float(np.median(np.trace(m["gram"], axis1=-2, axis2=-1))))


def refined_encoder(model, data, *, steps: int, batch_size: int, lr: float, seed: int, checkpoint,
                    device: str = "cpu"):
    """The encoder trained further on the model's own loss with the decoder frozen: the limit
    the posterior approaches at this decoder (Eq. 11 compares Σ with the *optimal* posterior)."""
    model = copy.deepcopy(model).float().train()
    for p in model.decoder.parameters():
        p.requires_grad_(False)            # Adam skips parameters without a gradient
    record = fit(model, data, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                 checkpoint=checkpoint, label=f"encoder at fixed decoder, {steps} steps", device=device)
    return model.eval(), record


def _measure_model(args, results, grid, model_cfg, data, test, spec) -> tuple:
    """Train one (β, d, b) model through its checkpoints (one resumed run), measure each, and the
    refined encoder at the last; returns what the figure shows (the last measurement)."""
    beta, d, b = spec
    name = f"structure-beta{beta:g}-d{d}-b{b}"
    done = _trained_steps(args.out / "models" / name)
    for steps in grid["checkpoints"]:
        key = f"beta={beta:g}/d={d}/b={b}/steps={steps}"
        if steps != grid["checkpoints"][-1] and (key in results or steps < done):
            log(f"{key}: " + ("done already, skipped" if key in results else f"not measured (the run is at {done})"))
            continue
        model, fitted = common.trained_autoencoder(
            "beta-vae", dict(model_cfg, train_steps=steps), data.shape, out=args.out, name=name,
            device=args.device, latent_dim=d, beta=beta, block_size=b)
        shown = measure(model.cpu().double(), test, b)
        if key not in results:
            results.put(key, _record(shown, beta, d, b, steps, fitted))
        _log_record(key, results[key])
    if grid["refine_encoder"]:
        key = f"beta={beta:g}/d={d}/b={b}/steps={steps}+encoder{grid['refine_encoder']}"
        refined, fitted = refined_encoder(
            model, data.train, steps=grid["refine_encoder"], batch_size=model_cfg["batch_size"],
            lr=model_cfg["lr"], seed=args.seed, device=args.device,
            checkpoint=args.out / "models" / f"structure-beta{beta:g}-d{d}-b{b}" / f"encoder-{steps}.pt")
        m = measure(refined.cpu().double(), test, b)
        if key not in results:
            results.put(key, _record(m, beta, d, b, steps, fitted) | {"encoder_steps": grid["refine_encoder"]})
        _log_record(key, results[key])
    if grid.get("optimal_posterior_draws"):
        key = f"beta={beta:g}/d={d}/b={b}/steps={steps}+optimal"
        if key not in results:
            m = optimal_posteriors(model.cpu().double(), test[:OPTIMAL_POINTS], b, seed=args.seed,
                                   num_samples=grid["optimal_posterior_draws"], iterations=OPTIMAL_ITERATIONS)
            results.put(key, _record(m, beta, d, b, steps, None) | {"optimal_draws": grid["optimal_posterior_draws"]})
        _log_record(key, results[key])
    return shown


def _trained_steps(run_dir) -> int:
    """The step of a model run's checkpoint (0 if none): checkpoints before it cannot be measured."""
    path = run_dir / CHECKPOINT
    return int(load_checkpoint(path)["step"]) if path.is_file() else 0


def _log_record(key: str, rec: dict) -> None:
    log(f"{key}: off-block energy {rec['off_block_fraction_median']:.3f} (chance {rec['chance']:.3f}), "
        f"in-block ‖β(Σ⁻¹−I) − JᵀJ‖/‖JᵀJ‖ {rec['relative_error_in_blocks_median']:.3f}")


def run(args) -> int:
    base = QUICK if args.quick else FULL
    grid = _grid(args, base)
    model_cfg = common.model_config(args, base["train_steps"])
    data = common.load_data(args)
    test = common.first(data.test, grid["test_points"]).double()
    results = Results(args.out, "structure", {"model": model_cfg, "grid": grid, "quick": bool(args.quick),
                                              "data": data.description})
    log(f"structure: {data.description}; {model_cfg['architecture']} β-VAEs with block-diagonal "
        f"posteriors, measured after {grid['checkpoints']} steps; {len(test)} held-out points → {args.out}")
    shown = {}
    for beta, d, b in (tuple(m) for m in grid["models"]):
        m = _measure_model(args, results, grid, model_cfg, data, test, (beta, d, b))
        shown[f"beta={beta:g}/d={d}/b={b}"] = (m["precision"][: base["shown_points"]],
                                               m["gram"][: base["shown_points"]])
    rows = list(results.runs.values())
    results.put_summary(dict(models=len(grid["models"]),
                             below_chance=sum(r["off_block_fraction_median"] < r["chance"] for r in rows)))
    _print_table(rows)
    log(f"figure: {figure(shown, args.out / 'structure.png')}")
    return 0


def _print_table(rows) -> None:
    log(f"\n{'β':>5s} {'d':>3s} {'b':>2s} {'steps':>14s} {'off-block energy':>17s} {'chance':>7s} "
        f"{'rel. err. (all)':>16s} {'rel. err. (blocks)':>19s} {'tr JᵀJ':>8s}")
    for r in rows:
        steps = f"{r['steps']}" + (f"+enc{r['encoder_steps']}" if "encoder_steps" in r else "") + (
            "+opt" if "optimal_draws" in r else "")
        log(f"{r['beta']:5g} {r['latent_dim']:3d} {r['block_size']:2d} {steps:>14s} "
            f"{r['off_block_fraction_median']:17.3f} {r['chance']:7.3f} {r['relative_error_median']:16.3f} "
            f"{r['relative_error_in_blocks_median']:19.3f} {r['gram_trace_median']:8.2f}")


def figure(shown: dict, path):
    count = len(next(iter(shown.values()))[0])
    fig, axes = plotting.panels(len(shown), 2 * count, width=1.7, height=1.8)
    for row, (key, (P, G)) in zip(axes, shown.items()):
        for k in range(count):
            for col, (mat, name) in enumerate(((P[k], "Σ⁻¹"), (G[k], "JᵀJ"))):
                ax = row[2 * k + col]
                lim = np.abs(mat).max() or 1.0
                ax.imshow(mat, cmap="RdBu_r", vmin=-lim, vmax=lim)
                ax.set_xticks([]), ax.set_yticks([])
                ax.set_title(f"{name}, point {k}", fontsize=7)
        row[0].set_ylabel(key.replace("/", "\n"), fontsize=7)
    return plotting.save(fig, path)
