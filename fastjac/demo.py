"""``fastjac demo``: a short GRAE≈ and β-VAE run on scikit-learn's 8×8 digits, printing loss terms."""
from __future__ import annotations

import math
import time

import torch
from torch import nn

from .objectives import beta_vae_terms, grae_terms
from .observations import Gaussian
from .training.errors import UsageError


def add_arguments(parser):
    from .cli import positive_int
    parser.add_argument("--steps", type=positive_int, default=300)
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--latent-dim", type=positive_int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="CPU threads for torch (default: the idle cores, at most 4)")


def _digits():
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UsageError("fastjac demo needs scikit-learn: pip install scikit-learn") from None
    x = torch.tensor(load_digits().data, dtype=torch.float32) / 16.0
    return x[:1500], x[1500:]


def _mlp(i, o):
    return nn.Sequential(nn.Linear(i, 128), nn.ELU(), nn.Linear(128, o))


def _train(model, train, args, obs, gen):
    """Adam steps on random batches of 128; returns (encoder, decoder, seconds per step)."""
    d, beta = args.latent_dim, args.beta
    enc, dec = _mlp(64, 2 * d), _mlp(d, 64)
    opt = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=1e-3)
    start = time.perf_counter()
    for _ in range(args.steps):
        x = train[torch.randint(len(train), (128,), generator=gen)]
        h = enc(x)
        mu, log_sd = h[:, :d], h[:, d:].clamp(-6, 2)
        if model == "grae≈":
            loss = grae_terms(dec, mu, x, beta, estimator="stochastic", observation=obs,
                              generator=gen).total.mean()
        else:
            loss = beta_vae_terms(dec, mu, torch.diag_embed(log_sd.exp()), x, beta, observation=obs,
                                  generator=gen).per_sample.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return enc, dec, (time.perf_counter() - start) / args.steps


def _held_out(model, enc, dec, test, beta, obs, gen):
    """(reconstruction, code or β·KL, regulariser or None, total) on the held-out digits."""
    with torch.no_grad():
        h = enc(test)
    d = h.shape[1] // 2
    mu, sd = h[:, :d], h[:, d:].clamp(-6, 2).exp()
    if model == "grae≈":  # held-out terms with the exact regulariser
        t = grae_terms(dec, mu, test, beta, estimator="exact", observation=obs)
        return t.reconstruction.mean(), t.code.mean(), t.regularizer.mean(), t.total.mean()
    t = beta_vae_terms(dec, mu, torch.diag_embed(sd), test, beta, observation=obs, num_samples=16, generator=gen)
    return t.reconstruction.mean(), beta * t.kl.mean(), None, t.per_sample.mean()


def run(args):
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if not (math.isfinite(args.beta) and args.beta > 0):
        raise UsageError(f"--beta must be finite and > 0, got {args.beta}")
    torch.manual_seed(args.seed)
    train, test = _digits()
    obs = Gaussian(sigma=0.2)
    gen = torch.Generator().manual_seed(args.seed)
    print(f"digits: {len(train)} train / {len(test)} test, d = {args.latent_dim}, β = {args.beta}, Gaussian σ = 0.2")
    print(f"{'model':10s} {'step':>5s} {'recon':>9s} {'code/KL':>9s} {'regul.':>9s} {'total':>9s} {'s/step':>8s}")
    for model in ("grae≈", "β-vae"):
        enc, dec, per_step = _train(model, train, args, obs, gen)
        row = _held_out(model, enc, dec, test, args.beta, obs, gen)
        cells = ("        -" if v is None else f"{float(v.detach()):9.3f}" for v in row)
        print(f"{model:10s} {args.steps:5d} " + " ".join(cells) + f" {per_step:8.4f}")
    return 0
