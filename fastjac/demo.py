"""``fastjac demo``: a short GRAE≈ and β-VAE run on scikit-learn's 8×8 digits, printing loss terms."""
from __future__ import annotations

import time

import torch
from torch import nn

from .objectives import beta_vae_terms, grae_terms
from .observations import Gaussian


def add_arguments(parser):
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--latent-dim", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)


def _digits():
    from sklearn.datasets import load_digits
    x = torch.tensor(load_digits().data, dtype=torch.float32) / 16.0
    return x[:1500], x[1500:]


def _mlp(i, o):
    return nn.Sequential(nn.Linear(i, 128), nn.ELU(), nn.Linear(128, o))


def run(args):
    torch.manual_seed(args.seed)
    train, test = _digits()
    d, beta, obs = args.latent_dim, args.beta, Gaussian(sigma=0.2)
    gen = torch.Generator().manual_seed(args.seed)
    print(f"digits: {len(train)} train / {len(test)} test, d = {d}, β = {beta}, Gaussian σ = 0.2")
    print(f"{'model':10s} {'step':>5s} {'recon':>9s} {'code/KL':>9s} {'regul.':>9s} {'total':>9s} {'s/step':>8s}")
    for model in ("grae≈", "β-vae"):
        enc, dec = _mlp(64, 2 * d), _mlp(d, 64)
        opt = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=1e-3)
        start = time.perf_counter()
        for step in range(1, args.steps + 1):
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
        per_step = (time.perf_counter() - start) / args.steps
        with torch.no_grad():
            h = enc(test)
        mu, sd = h[:, :d], h[:, d:].clamp(-6, 2).exp()
        if model == "grae≈":  # held-out terms with the exact regulariser
            t = grae_terms(dec, mu, test, beta, estimator="exact", observation=obs)
            row = (t.reconstruction.mean(), t.code.mean(), t.regularizer.mean(), t.total.mean())
        else:
            t = beta_vae_terms(dec, mu, torch.diag_embed(sd), test, beta, observation=obs,
                               num_samples=16, generator=gen)
            row = (t.reconstruction.mean(), beta * t.kl.mean(), None, t.per_sample.mean())
        cells = ("        -" if v is None else f"{float(v.detach()):9.3f}" for v in row)
        print(f"{model:10s} {args.steps:5d} " + " ".join(cells) + f" {per_step:8.4f}")
    return 0
