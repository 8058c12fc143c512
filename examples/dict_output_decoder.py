"""A decoder that returns a dict — the way other autoencoder libraries return their outputs — and
is conditioned on the digit label, regularised with ``fastjac.nn.JacobianRegularizer``.

Two things a library decoder usually needs:
- ``output="logits"`` says which entry of the returned dict the regulariser differentiates
  (a key, an attribute name, an index or a callable of the output);
- a conditional decoder ``decoder(z, y)`` is handed over as ``functools.partial(decoder, y=y)``:
  the Jacobian is taken with respect to z only, for each sample's own label.
The regulariser's configuration is saved with the model's checkpoint (its state_dict).

    python examples/dict_output_decoder.py             # ~10 s of CPU time
    python examples/dict_output_decoder.py --steps 20  # a smoke run
"""
import argparse
import functools
import os
import tempfile

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from fastjac.nn import JacobianRegularizer

LATENT, CLASSES = 6, 10


class ConditionalDecoder(nn.Module):
    """(z, y) -> {"logits", "probabilities", "features"}, like a library's output object."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(LATENT + CLASSES, 128), nn.ELU())
        self.head = nn.Linear(128, 64)

    def forward(self, z, y):
        features = self.body(torch.cat([z, F.one_hot(y, CLASSES).to(z.dtype)], -1))
        logits = self.head(features)
        return {"logits": logits, "probabilities": torch.sigmoid(logits), "features": features}


def train(encoder, decoder, regularizer, x, labels, *, steps, beta):
    opt = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=2e-3)
    for step in range(1, steps + 1):
        idx = torch.randint(len(x), (128,))
        batch, y = x[idx], labels[idx]
        z = encoder(batch)
        recon = F.binary_cross_entropy_with_logits(decoder(z, y)["logits"], batch, reduction="none").sum(-1)
        penalty = regularizer(functools.partial(decoder, y=y), z)  # (β/2)·R, w = σ(g)(1 − σ(g))
        loss = recon.mean() + beta / 2 * (z ** 2).sum(-1).mean() + penalty
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % max(1, steps // 4) == 0 or step == steps:
            print(f"step {step:>4}: reconstruction {recon.mean().item():7.2f}  "
                  f"regulariser {penalty.item():6.3f}")


def save_and_restore(decoder, regularizer):
    """The checkpoint carries the regulariser's configuration; a default module restores it."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "checkpoint.pt")
        torch.save({"decoder": decoder.state_dict(), "regularizer": regularizer.state_dict()}, path)
        checkpoint = torch.load(path, weights_only=True)
    restored = JacobianRegularizer(1.0)
    restored.load_state_dict(checkpoint["regularizer"])
    print(f"restored {restored}")
    assert repr(restored) == repr(regularizer)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for torch (default 1: these small networks gain nothing from more, "
                             "and one thread is not slowed down by a busy machine)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16
    labels = torch.tensor(digits.target)
    torch.manual_seed(args.seed)
    encoder = nn.Sequential(nn.Linear(64, 128), nn.ELU(), nn.Linear(128, LATENT))
    decoder = ConditionalDecoder()
    regularizer = JacobianRegularizer(args.beta, output="logits", observation="bernoulli_logits",
                                      num_columns=2)
    print(regularizer)
    train(encoder, decoder, regularizer, x, labels, steps=args.steps, beta=args.beta)
    save_and_restore(decoder, regularizer)


if __name__ == "__main__":
    main()
