"""Fig. 4, Table 1 (App. G): β-VAE and GRAE≈ (k = 1 sampled column) give similar samples over β.

For each β, a mean-field β-VAE and a GRAE≈ are trained on the same data; each draws images from
the prior N(0, I). We show the samples and report a Fréchet distance between the samples and
held-out images against β. The distance uses features of a classifier fastjac trains on the same
training set (see ``frechet.py``): it is not Inception-FID and does not compare with published
numbers. With ``--inception-weights PATH`` the Inception-v3 FID is reported as well.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from ..models.mixture import code_density, sample_images
from . import common, plotting
from .frechet import InceptionFeatures, features, frechet_distance, trained_classifier
from .results import Results, log

MODELS = {"beta-vae": dict(block_size=1), "grae≈": dict(estimator="stochastic", num_columns=1)}
QUICK = dict(betas=(0.003, 0.01, 0.03, 0.1), train_steps=400, samples=500, classifier_steps=300)
FULL = dict(betas=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0), train_steps=50000, samples=10000,
            classifier_steps=5000)
MIXTURE_CODES = 10000  # training images whose codes the ex-post mixture is fitted to (at most)
LATENT_DIM = {"celeba": 128, "mnist": 16, "digits": 8}  # CelebA: the paper's d = 128


def add_arguments(parser) -> None:
    common.add_data_arguments(parser)
    parser.add_argument("--betas", type=float, nargs="+", help="β grid")
    parser.add_argument("--latent-dim", type=int, help="d (default: 128 CelebA, 16 MNIST, 8 digits)")
    parser.add_argument("--samples", type=int, help="generated (and held-out) images per distance")
    parser.add_argument("--classifier-steps", type=int, help="training steps of the feature classifier")
    parser.add_argument("--mixture-components", type=int, default=10,
                        help="also decode codes drawn from a Gaussian mixture with this many components "
                             "fitted to the training codes (ex-post density); 0: prior samples only")
    parser.add_argument("--inception-weights", type=Path,
                        help="FID Inception-v3 state dict (pytorch-fid's pt_inception-2015-12-05 file) for "
                             "true FID; read with weights_only=True, never downloaded")


def _grid(args, base) -> dict:
    grid = dict(betas=tuple(args.betas or base["betas"]),
                latent_dim=args.latent_dim or LATENT_DIM[args.dataset],
                samples=args.samples or base["samples"],
                classifier_steps=args.classifier_steps or base["classifier_steps"],
                mixture_components=args.mixture_components,
                inception=str(args.inception_weights) if args.inception_weights else None)
    if min(grid["betas"]) <= 0 or grid["samples"] < 2 or grid["classifier_steps"] < 1 \
            or grid["mixture_components"] < 0:
        raise ValueError("--betas must be > 0, --samples >= 2, --classifier-steps >= 1 and "
                         "--mixture-components >= 0")
    return grid


class _Reference(NamedTuple):
    """What every model's samples are measured against."""
    classifier: object
    inception: object          # None without --inception-weights
    real: torch.Tensor         # held-out images
    real_features: np.ndarray
    real_inception: object     # np.ndarray or None
    summary: dict


def _reference(args, grid, data) -> _Reference:
    """Train (or reload) the feature classifier; distances of real training images to held-out ones."""
    inception = InceptionFeatures(args.inception_weights, args.device) if args.inception_weights else None
    real = common.first(data.test, grid["samples"])
    classifier, cls_record = trained_classifier(data.train, real, steps=grid["classifier_steps"],
                                                seed=args.seed, device=args.device,
                                                checkpoint=args.out / "models" / "feature-classifier.pt")
    log(f"feature classifier ({cls_record['task']}): held-out accuracy {cls_record['held_out_accuracy']:.3f}")
    real_features = features(classifier, real)
    train_real = common.first(data.train, len(real))
    summary = dict(classifier=cls_record, held_out_images=len(real),
                   floor=frechet_distance(features(classifier, train_real), real_features))
    real_inception = None
    if inception is not None:
        real_inception = features(inception, real)
        summary["fid_floor"] = frechet_distance(features(inception, train_real), real_inception)
    return _Reference(classifier, inception, real, real_features, real_inception, summary)


def _draws(args, grid, model, data) -> dict:
    """Images from the prior N(0, I) and, with a mixture, from the codes' ex-post density."""
    g = lambda: torch.Generator(args.device).manual_seed(args.seed)  # noqa: E731
    with torch.no_grad():
        draws = {"prior": model.sample(grid["samples"], generator=g()).clamp(0, 1).cpu()}
        if grid["mixture_components"]:
            train = common.first(data.train, MIXTURE_CODES).to(args.device)
            density = code_density(model, train, grid["mixture_components"], seed=args.seed)
            draws["ex_post"] = sample_images(model, density, grid["samples"],
                                             generator=torch.Generator().manual_seed(args.seed)).clamp(0, 1).cpu()
    return draws


def _record(args, name, beta, model, draws, ref: _Reference, fitted) -> dict:
    with torch.no_grad():
        test = ref.real.to(args.device)
        recon_error = float(((model.reconstruct(test) - test) ** 2).flatten(1).sum(1).mean())
    rec = dict(model=name, beta=beta, reconstruction_sq_error=recon_error, train=fitted)
    for source, images in draws.items():
        suffix = "" if source == "prior" else f"_{source}"
        rec["frechet" + suffix] = frechet_distance(features(ref.classifier, images), ref.real_features)
        if ref.inception is not None:
            rec["fid" + suffix] = frechet_distance(features(ref.inception, images), ref.real_inception)
    return rec


def run(args) -> int:
    base = QUICK if args.quick else FULL
    grid = _grid(args, base)
    model_cfg = common.model_config(args, base["train_steps"])
    data = common.load_data(args)
    results = Results(args.out, "samples", {"model": model_cfg, "grid": grid, "quick": bool(args.quick),
                                            "data": data.description})
    log(f"samples: {data.description}; {model_cfg['architecture']} β-VAE and GRAE≈, d = "
        f"{grid['latent_dim']}, {model_cfg['train_steps']} steps each → {args.out}")
    ref = _reference(args, grid, data)
    shown = {}
    points = [(m, beta) for m in MODELS for beta in grid["betas"]]
    for i, (name, beta) in enumerate(points, 1):
        key = f"{name}/beta={beta:g}"
        kind = "beta-vae" if name == "beta-vae" else "grae"
        model, fitted = common.trained_autoencoder(
            kind, model_cfg, data.shape, out=args.out, name=f"samples-{kind}-beta{beta:g}", device=args.device,
            latent_dim=grid["latent_dim"], beta=beta, **MODELS[name])
        draws = _draws(args, grid, model, data)
        shown.update({(key, source): images[:36] for source, images in draws.items()})
        if key not in results:
            results.put(key, _record(args, name, beta, model, draws, ref, fitted))
        rec = results[key]
        log(f"[{i}/{len(points)}] {key}: Fréchet distance, prior {rec['frechet']:.3f}"
            + (f", ex-post {rec['frechet_ex_post']:.3f}" if "frechet_ex_post" in rec else "")
            + f"; held-out ‖x − g(h(x))‖² {rec['reconstruction_sq_error']:.3f}")
    rows = [results[f"{m}/beta={beta:g}"] for m, beta in points]
    results.put_summary(ref.summary)
    _print_table(grid, results, ref)
    log(f"figures: {sample_figure(shown, grid['betas'], args.out / 'samples.png')}, "
        f"{distance_figure(rows, ref.summary, args.out / 'frechet.png')}")
    return 0


def _print_table(grid, results, ref: _Reference) -> None:
    log(f"\nFréchet distance on the trained classifier's features (NOT Inception-FID); floor (train vs "
        f"held-out real images): {ref.summary['floor']:.3f}; codes from the prior and ex post (a "
        f"{grid['mixture_components']}-component Gaussian mixture fitted to the training codes)")
    keys = ["frechet"] + (["frechet_ex_post"] if grid["mixture_components"] else [])
    keys += [k.replace("frechet", "fid") for k in keys] if ref.inception is not None else []
    log(f"{'β':>8s} " + " ".join(f"{m + ' ' + k:>26s}" for k in keys for m in MODELS))
    for beta in grid["betas"]:
        recs = [results[f"{m}/beta={beta:g}"] for m in MODELS]
        log(f"{beta:8g} " + " ".join(f"{r[k]:26.3f}" for k in keys for r in recs))


def _montage(images: torch.Tensor, columns: int = 6) -> np.ndarray:
    count, c, h, w = images.shape
    rows = -(-count // columns)
    canvas = torch.ones(c, rows * (h + 1), columns * (w + 1))
    for k, im in enumerate(images):
        r, col = divmod(k, columns)
        canvas[:, r * (h + 1): r * (h + 1) + h, col * (w + 1): col * (w + 1) + w] = im
    return canvas.permute(1, 2, 0).squeeze(-1).numpy()


def sample_figure(shown: dict, betas, path):
    """Rows: each model's prior samples, then its ex-post samples (if drawn); columns: β."""
    sources = [src for src in ("prior", "ex_post") if any(k[1] == src for k in shown)]
    rows = [(name, src) for name in MODELS for src in sources]
    fig, axes = plotting.panels(len(rows), len(betas), width=2.0, height=2.1)
    for i, (name, src) in enumerate(rows):
        for j, beta in enumerate(betas):
            ax = axes[i][j]
            ax.imshow(_montage(shown[(f"{name}/beta={beta:g}", src)]), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
            ax.set_title(f"{name}, β = {beta:g}, {src.replace('_', '-')}", fontsize=7)
    return plotting.save(fig, path)


def distance_figure(rows: list[dict], reference: dict, path):
    keys = ["frechet"] + (["fid"] if "fid" in rows[0] else [])
    fig, axes = plotting.panels(1, len(keys), width=3.8, height=3.0)
    for ax, k in zip(axes[0], keys):
        for name in MODELS:
            rs = sorted((r for r in rows if r["model"] == name), key=lambda r: r["beta"])
            ax.plot([r["beta"] for r in rs], [r[k] for r in rs], marker="o", ms=4, label=f"{name}, prior")
            if f"{k}_ex_post" in rs[0]:
                ax.plot([r["beta"] for r in rs], [r[f"{k}_ex_post"] for r in rs], marker="s", ms=4, ls="--",
                        label=f"{name}, ex-post")
        floor = reference["floor" if k == "frechet" else "fid_floor"]
        ax.axhline(floor, color="gray", ls=":", label="real vs real")
        ax.set_xscale("log")
        ax.set_xlabel("β")
        ax.set_ylabel("Fréchet distance, own classifier" if k == "frechet" else "Inception FID")
        ax.legend(fontsize=7)
    return plotting.save(fig, path)
