"""Train one model of an experiment (Adam, random minibatches) and keep its weights in
``out/models/<name>.pt`` so an interrupted experiment does not retrain what it finished."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from .results import Progress, atomic_write


def _to(batch, device):
    return tuple(t.to(device) for t in batch) if isinstance(batch, tuple) else batch.to(device)


def fit(model: nn.Module, data: Tensor, *, steps: int, batch_size: int, lr: float, seed: int,
        checkpoint: Path, label: str, device: str = "cpu") -> dict:
    """Minimise ``model.loss(batch)`` for ``steps`` Adam steps, or load the finished weights.

    Args:
        model: anything with ``loss(x) -> scalar`` (our BetaVAE / GRAE, a classifier wrapper).
        data: (N, ...) training data, or anything indexable by a LongTensor returning a tuple of
            tensors (e.g. inputs and labels); batches are drawn with replacement from ``seed``.
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
        batch = data[torch.randint(len(data), (batch_size,), generator=g)]
        loss = model.loss(_to(batch, device))
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
