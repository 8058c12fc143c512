"""Train a small auxiliary network of an experiment (the feature classifier; the autoencoders use
``fastjac.training``) with Adam on random minibatches, and keep its weights in ``checkpoint`` so
an interrupted experiment does not retrain it."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .results import Progress, atomic_write


def fit(model: nn.Module, data, *, steps: int, batch_size: int, lr: float, seed: int,
        checkpoint: Path, label: str, device: str = "cpu") -> dict:
    """Minimise ``model.loss(batch)`` for ``steps`` Adam steps, or load the finished weights.

    Args:
        model: anything with ``loss(x) -> scalar``.
        data: a source with ``len()`` and ``batch(indices) -> Tensor`` (``fastjac.training`` data);
            batches are drawn with replacement from ``seed``.
    Returns:
        {"final_loss": mean loss over the last 10% of steps (None if loaded), "seconds": ...}.
    """
    model.to(device)
    checkpoint = Path(checkpoint)
    if checkpoint.exists():
        model.load_state_dict(torch.load(checkpoint, map_location=device, weights_only=True))
        return {"final_loss": None, "seconds": 0.0, "loaded": str(checkpoint)}
    torch.manual_seed(seed)  # initialisation-independent draws (dropout, posterior noise)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    progress = Progress(label, steps)
    model.train()
    tail, tail_count = 0.0, 0
    for step in range(steps):
        x = data.batch(torch.randint(len(data), (batch_size,), generator=g)).to(device)
        loss = model.loss(x)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{label}: the loss became {float(loss)} at step {step}; "
                                     "lower the learning rate")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step >= steps - max(1, steps // 10):
            tail, tail_count = tail + float(loss.detach()), tail_count + 1
        progress.update(step + 1, f"loss {float(loss.detach()):.3f}")
    model.eval()
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_write(checkpoint, lambda tmp: torch.save(state, tmp))
    return {"final_loss": tail / tail_count, "seconds": progress.elapsed()}
