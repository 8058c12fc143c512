"""Turning a β-VAE training script into GRAE≈ (Kumar & Poole 2020, §5.3), on scikit-learn's digits.

The β-VAE loss below is the usual one: sample z from the encoder's diagonal Gaussian, Bernoulli
reconstruction, β·KL. GRAE≈ drops the sampling and the variance head: the code is the encoder's
mean, and the posterior noise is replaced by the implicit regulariser it induces,
(β/2)·log det(I + J_wᵀJ_w/β), estimated from one random decoder Jacobian column per sample:

    -    mu, logvar = encoder(x).chunk(2, -1)
    -    z = mu + (0.5 * logvar).exp() * torch.randn_like(mu)
    -    recon = F.binary_cross_entropy(decoder(z), x, reduction="none").sum(-1)
    -    kl = 0.5 * (mu ** 2 + logvar.exp() - logvar - 1).sum(-1)
    -    loss = (recon + beta * kl).mean()
    +    mu, _ = encoder(x).chunk(2, -1)
    +    loss = fastjac.grae_loss(decoder, mu, x, beta, estimator="stochastic", observation="bernoulli")

Both models are then scored by the same held-out β-VAE objective (Eq. 2, 16 posterior samples);
the GRAE model's posterior is the optimal one its decoder implies, Σ* = (I + J_wᵀJ_w/β)⁻¹ (Eq. 11).

    python examples/beta_vae_to_grae.py             # both runs, ~15 s of CPU time
    python examples/beta_vae_to_grae.py --steps 20  # a smoke run
"""
import argparse

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import fastjac

D, LATENT = 64, 8


def networks(seed):
    torch.manual_seed(seed)
    encoder = nn.Sequential(nn.Linear(D, 128), nn.ELU(), nn.Linear(128, 2 * LATENT))  # mean, log-variance
    decoder = nn.Sequential(nn.Linear(LATENT, 128), nn.ELU(), nn.Linear(128, D), nn.Sigmoid())
    return encoder, decoder


def beta_vae_loss(encoder, decoder, x, beta):
    mu, logvar = encoder(x).chunk(2, -1)
    z = mu + (0.5 * logvar).exp() * torch.randn_like(mu)
    recon = F.binary_cross_entropy(decoder(z), x, reduction="none").sum(-1)
    kl = 0.5 * (mu ** 2 + logvar.exp() - logvar - 1).sum(-1)
    return (recon + beta * kl).mean()


def grae_loss(encoder, decoder, x, beta):
    mu, _ = encoder(x).chunk(2, -1)
    return fastjac.grae_loss(decoder, mu, x, beta, estimator="stochastic", observation="bernoulli")


def train(loss_fn, x, *, steps, beta, seed):
    encoder, decoder = networks(seed)
    opt = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=2e-3)
    for _ in range(steps):
        loss = loss_fn(encoder, decoder, x[torch.randint(len(x), (128,))], beta)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return encoder, decoder


@torch.no_grad()
def posterior(encoder, decoder, x, beta, objective):
    """(μ, C) with Σ = CCᵀ: the encoder's own for the β-VAE, Σ* (Eq. 11) for GRAE."""
    mu, logvar = encoder(x).chunk(2, -1)
    if objective == "beta-vae":
        return mu, torch.diag_embed((0.5 * logvar).exp())
    out, J = fastjac.jacobian_columns(decoder, mu)
    w = fastjac.Bernoulli().weights(out, x)
    return mu, torch.linalg.cholesky(fastjac.optimal_posterior_covariance(J, beta, weights=w))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for torch (default 1: these small networks gain nothing from more, "
                             "and one thread is not slowed down by a busy machine)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    x = torch.tensor(load_digits().data, dtype=torch.float32) / 16  # intensities in [0, 1]
    train_x, test_x = x[:1500], x[1500:]
    print(f"held-out digits ({len(test_x)}), {args.steps} Adam steps, β = {args.beta}, Bernoulli decoder")
    print(f"{'trained as':<10} {'β-VAE objective':>16} {'−log p(x|g(μ))':>15} {'mean var':>9}")
    for name, loss_fn in [("beta-vae", beta_vae_loss), ("grae", grae_loss)]:
        encoder, decoder = train(loss_fn, train_x, steps=args.steps, beta=args.beta, seed=args.seed)
        mu, C = posterior(encoder, decoder, test_x, args.beta, name)
        with torch.no_grad():
            elbo = fastjac.beta_vae_loss(decoder, mu, C, test_x, args.beta, observation="bernoulli",
                                         num_samples=16, generator=torch.Generator().manual_seed(0))
            nll = F.binary_cross_entropy(decoder(mu), test_x, reduction="none").sum(-1).mean()
        var = (C ** 2).sum(-1).mean()  # mean diagonal of Σ
        print(f"{name:<10} {float(elbo):>16.2f} {float(nll):>15.2f} {float(var):>9.3f}")


if __name__ == "__main__":
    main()
