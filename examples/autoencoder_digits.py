"""A plain PyTorch autoencoder on scikit-learn's 8×8 digits, before and after adding the implicit
β-VAE regulariser of Kumar & Poole (2020). The whole change is the two lines marked "after".

    python examples/autoencoder_digits.py             # both runs, ~15 s of CPU time
    python examples/autoencoder_digits.py --steps 20  # a smoke run

The regulariser is (β/2)·log det(I + JᵀJ/β) of the decoder Jacobian J, estimated from one
random column per sample (GRAE≈). Added with the code term (β/2)‖z‖² it turns the autoencoder
into GRAE, the deterministic stand-in for a β-VAE; without the code term the encoder could
shrink J for free by spreading the codes out.
"""
import argparse

import torch
from sklearn.datasets import load_digits
from torch import nn

from fastjac import jacobian_regularizer


def train(x, *, steps, beta=None, seed=0):
    torch.manual_seed(seed)
    encoder = nn.Sequential(nn.Linear(64, 128), nn.ELU(), nn.Linear(128, 8))
    decoder = nn.Sequential(nn.Linear(8, 128), nn.ELU(), nn.Linear(128, 64))
    opt = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=2e-3)
    for _ in range(steps):
        batch = x[torch.randint(len(x), (128,))]
        z = encoder(batch)
        loss = 0.5 * ((decoder(z) - batch) ** 2).sum(-1).mean()
        if beta is not None:  # after: the implicit β-VAE regulariser and the code term
            loss = loss + jacobian_regularizer(decoder, z, beta) + beta / 2 * (z ** 2).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return encoder, decoder


@torch.no_grad()  # forward-mode columns need no graph
def report(name, encoder, decoder, x, beta):
    z = encoder(x)
    mse = 0.5 * ((decoder(z) - x) ** 2).sum(-1).mean()
    exact = jacobian_regularizer(decoder, z, beta, estimator="exact")        # (β/2)·log det M
    hadamard = jacobian_regularizer(decoder, z, beta, estimator="hadamard")  # its upper bound
    print(f"{name:<18} {float(mse):>14.3f} {float((z ** 2).sum(-1).mean()):>8.2f} "
          f"{float(exact):>14.3f} {float(hadamard - exact):>16.4f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--beta", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for torch (default 1: these small networks gain nothing from more, "
                             "and one thread is not slowed down by a busy machine)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    x = torch.tensor(load_digits().data, dtype=torch.float32) / 16
    train_x, test_x = x[:1500], x[1500:]
    print(f"held-out digits ({len(test_x)}), {args.steps} Adam steps, β = {args.beta}")
    print(f"{'model':<18} {'½‖x − g(z)‖²':>14} {'‖z‖²':>8} {'(β/2) log det M':>14} {'Hadamard − exact':>16}")
    for name, beta in [("autoencoder", None), ("+ regulariser", args.beta)]:
        encoder, decoder = train(train_x, steps=args.steps, beta=beta, seed=args.seed)
        report(name, encoder, decoder, test_x, args.beta)


if __name__ == "__main__":
    main()
