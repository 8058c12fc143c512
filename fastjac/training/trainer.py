"""The training loop: Adam, progress, held-out evaluation, JSON log, PNG grid, atomic
checkpoints, exact resumption, DistributedDataParallel.

Exact resumption. Everything random is a pure function of (seed, step, rank): the batch of a
step comes from a permutation seeded by (seed, epoch); the draws of the objective (posterior
noise, GRAE≈ columns) from a generator seeded by (seed, step, rank). A checkpoint therefore only
needs the step, the model and the optimiser, and a resumed run takes the same steps as an
uninterrupted one.

Distributed. ``batch_size`` is the global batch: each of the N processes takes its share of the
same global batch. Each process minimises (N / B_global) · Σ_local per-sample loss; DDP
averages gradients over processes, so the gradient is that of the mean over the global batch,
whatever the split (the regulariser's per-sample terms included). Logged terms are summed over
processes before they are averaged. Held-out evaluation, the grid and checkpoints are written
by rank 0.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from .. import observations
from ..models import MODELS, make_autoencoder
from ..regularizer import ESTIMATORS
from . import distributed
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .data import DATASETS, load_dataset
from .images import image_grid, save_png

DEFAULT_ARCHITECTURE = {"digits": "mlp", "mnist": "mnist", "celeba": "celeba"}
# Settings a resumed run may change; every other one must match the checkpoint.
RESUMABLE = {"out", "steps", "eval_every", "eval_size", "eval_samples", "checkpoint_every",
             "log_every", "device", "threads", "resume", "data_dir", "progress"}
CHECKPOINT, LOG, GRID, CONFIG = "checkpoint.pt", "log.jsonl", "grid.png", "config.json"


@dataclass
class TrainConfig:
    """Everything a run depends on (the CLI flags, one for one)."""
    out: str
    model: str = "grae"                # "beta-vae" | "grae"
    dataset: str = "digits"            # "digits" | "mnist" | "celeba"
    data_dir: Optional[str] = None
    architecture: Optional[str] = None  # default: mlp for digits, App. D for mnist / celeba
    beta: float = 0.5
    latent_dim: int = 8
    steps: int = 1000
    batch_size: int = 64               # global: split over the processes
    lr: float = 1e-3
    width: float = 1.0
    norm: str = "batch"
    block_size: int = 1
    estimator: str = "stochastic"      # GRAE only; "stochastic" is GRAE≈
    num_columns: int = 1
    orthogonality_weight: float = 0.0
    observation: str = "gaussian"
    sigma: float = 0.1                 # Gaussian observation noise
    num_samples: int = 1               # β-VAE posterior draws per training point
    eval_every: int = 500
    eval_size: int = 500
    eval_samples: int = 8
    checkpoint_every: int = 500
    log_every: int = 50
    seed: int = 0
    device: str = "auto"
    threads: Optional[int] = None      # CPU threads for torch (default: torch's choice)
    crop: Optional[int] = None         # CelebA center-crop side
    resume: bool = False
    progress: bool = True


def derived_seed(*parts) -> int:
    """A 63-bit seed that depends on every part (stable across runs and machines)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


class BatchOrder:
    """Step -> this process's indices: a fresh permutation per epoch, the global batch split
    over processes (the last incomplete batch of an epoch is dropped)."""

    def __init__(self, n: int, global_batch: int, seed: int, rank: int = 0, world: int = 1):
        if global_batch > n:
            raise ValueError(f"batch_size {global_batch} exceeds the {n} training examples")
        if global_batch < world:
            raise ValueError(f"batch_size {global_batch} is smaller than the {world} processes")
        self.n, self.global_batch, self.seed, self.rank, self.world = n, global_batch, seed, rank, world
        self.per_epoch = n // global_batch
        self._epoch, self._perm = None, None

    def indices(self, step: int) -> torch.Tensor:
        epoch, j = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(derived_seed(self.seed, "epoch", epoch))
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=gen)
        batch = self._perm[j * self.global_batch:(j + 1) * self.global_batch]
        return torch.tensor_split(batch, self.world)[self.rank]


def _check(cfg: TrainConfig) -> None:
    def choice(name, options):
        if getattr(cfg, name) not in options:
            raise ValueError(f"{name} must be one of {', '.join(map(repr, options))}; got {getattr(cfg, name)!r}")
    choice("model", MODELS)
    choice("dataset", DATASETS)
    choice("estimator", ESTIMATORS)
    choice("observation", tuple(observations.NAMES))
    for name in ("latent_dim", "steps", "batch_size", "num_columns", "block_size", "num_samples",
                 "eval_every", "eval_size", "checkpoint_every", "log_every"):
        if not (isinstance(getattr(cfg, name), int) and getattr(cfg, name) >= 1):
            raise ValueError(f"{name} must be an integer >= 1, got {getattr(cfg, name)!r}")
    if cfg.eval_samples < 2:
        raise ValueError(f"eval_samples must be >= 2 (for a standard error), got {cfg.eval_samples}")
    for name in ("threads", "crop"):
        if getattr(cfg, name) is not None and not (isinstance(getattr(cfg, name), int) and getattr(cfg, name) >= 1):
            raise ValueError(f"{name} must be None or an integer >= 1, got {getattr(cfg, name)!r}")
    for name in ("beta", "lr", "sigma", "width"):
        if not (math.isfinite(getattr(cfg, name)) and getattr(cfg, name) > 0):
            raise ValueError(f"{name} must be finite and > 0, got {getattr(cfg, name)!r}")


def build_model(cfg: TrainConfig, data_shape):
    obs = observations.Gaussian(cfg.sigma) if cfg.observation == "gaussian" else cfg.observation
    return make_autoencoder(cfg.model, cfg.architecture or DEFAULT_ARCHITECTURE[cfg.dataset],
                            latent_dim=cfg.latent_dim, beta=cfg.beta, data_shape=data_shape,
                            width=cfg.width, norm=cfg.norm, block_size=cfg.block_size,
                            estimator=cfg.estimator, num_columns=cfg.num_columns,
                            orthogonality_weight=cfg.orthogonality_weight, observation=obs)


def _check_resumable(state: dict, cfg: TrainConfig, model, path: Path) -> None:
    """Refuse a checkpoint from another configuration or model before anything is loaded."""
    if not isinstance(state, dict) or not {"step", "config", "model", "optimizer"} <= set(state):
        raise CheckpointError(f"{path} lacks the step/config/model/optimizer entries of a training checkpoint")
    now = asdict(cfg)
    changed = [k for k, v in state["config"].items() if k not in RESUMABLE and now.get(k) != v]
    if changed:
        diffs = ", ".join(f"{k}={state['config'][k]!r} (now {now.get(k)!r})" for k in changed)
        raise ValueError(f"--resume: the run in {cfg.out} was started with {diffs}; pass the same "
                         "settings (or choose another --out)")
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state["model"].items()}
    if expected != found:
        bad = sorted(set(expected) ^ set(found)) or [k for k in expected if expected[k] != found[k]]
        raise CheckpointError(f"{path} holds a model that does not match this configuration "
                              f"(first differences: {bad[:3]})")


class _Progress:
    """One status line on stderr: redrawn in place on a terminal, printed every log step otherwise."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled = total, enabled
        self.tty = sys.stderr.isatty()
        self._last = 0.0

    def update(self, step: int, loss: Optional[float], seconds: Optional[float], logged: bool) -> None:
        if not self.enabled or not (logged or (self.tty and time.monotonic() - self._last > 0.2)):
            return
        self._last = time.monotonic()
        done = int(20 * step / self.total)
        line = f"[{'#' * done}{'.' * (20 - done)}] step {step}/{self.total}"
        if loss is not None:  # known from the first log step on
            eta = seconds * (self.total - step)
            line += f"  loss {loss:.4g}  {seconds:.4f} s/step  eta {int(eta // 60)}:{int(eta % 60):02d}"
        sys.stderr.write(("\r" + line) if self.tty else line + "\n")
        if self.tty and step == self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _log(out: Path, entry: dict) -> None:
    with open(out / LOG, "a") as f:
        f.write(json.dumps(entry) + "\n")


def _truncate_log(out: Path, step: int) -> None:
    """Drop entries the interrupted run wrote after its last checkpoint."""
    path = out / LOG
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    tmp = path.with_name(f".{LOG}.tmp-{os.getpid()}")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


def evaluate(model, x: torch.Tensor, cfg: TrainConfig, out: Path) -> dict:
    """Held-out β-VAE (± s.e.), Taylor and GRAE values, and the PNG grid (rank 0)."""
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(derived_seed(cfg.seed, "eval"))
    o = model.objectives(x, num_samples=cfg.eval_samples, batch_size=100, generator=gen)
    with torch.no_grad():
        shown = x[:8]
        rows = [shown, model.reconstruct(shown), model.sample(8, generator=gen), model.sample(8, generator=gen)]
    save_png(image_grid(rows), out / GRID)
    model.train(was_training)
    return {k: float(v) for k, v in o._asdict().items()}


def train(cfg: TrainConfig, *, on_step: Optional[Callable[[int, torch.nn.Module], None]] = None) -> dict:
    """Train (or, with ``cfg.resume``, continue) a run in ``cfg.out``; returns a summary.

    ``on_step(step, model)`` is called after every step (after any checkpoint of that step).

    Example:
        >>> train(TrainConfig(out="runs/grae", model="grae", dataset="digits", steps=2000))
    """
    _check(cfg)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    ctx = distributed.setup(cfg.device)
    try:
        return _train(cfg, ctx, on_step)
    finally:
        ctx.close()


def _train(cfg: TrainConfig, ctx: distributed.Context, on_step) -> dict:
    out = Path(cfg.out)
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
    ctx.barrier()
    if not cfg.resume and (out / CHECKPOINT).exists():
        raise ValueError(f"{out} already holds a run ({CHECKPOINT}); pass --resume to continue it, "
                         "or choose another --out")
    data = load_dataset(cfg.dataset, data_dir=cfg.data_dir, crop=cfg.crop)
    torch.manual_seed(derived_seed(cfg.seed, "init"))
    model = build_model(cfg, data.shape).to(ctx.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    step = 0
    if cfg.resume:
        state = load_checkpoint(out / CHECKPOINT)
        _check_resumable(state, cfg, model, out / CHECKPOINT)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step = int(state["step"])
        if ctx.is_main:
            _truncate_log(out, step)
    if ctx.is_main:
        (out / CONFIG).write_text(json.dumps(asdict(cfg), indent=1) + "\n")
    net = model
    if ctx.world > 1:
        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    order = BatchOrder(len(data.train), cfg.batch_size, cfg.seed, ctx.rank, ctx.world)
    held_out = data.test.batch(torch.arange(min(cfg.eval_size, len(data.test)))).to(ctx.device) \
        if ctx.is_main else None
    options = {"num_samples": cfg.num_samples} if cfg.model == "beta-vae" else {}
    progress = _Progress(cfg.steps, cfg.progress and ctx.is_main)
    sums, count, window, window_steps, step_times, last_eval = {}, 0, 0.0, 0, [], None
    shown_loss, shown_seconds = None, None  # what the progress line shows between logs
    model.train()
    while step < cfg.steps:
        started = time.perf_counter()
        x = data.train.batch(order.indices(step)).to(ctx.device)
        seed = derived_seed(cfg.seed, "step", step, ctx.rank)
        torch.manual_seed(seed)  # anything the model draws from the global generator
        terms = net(x, generator=torch.Generator().manual_seed(seed), **options)
        loss = terms["loss"].sum() * (ctx.world / cfg.batch_size)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if ctx.device.type == "cuda":
            torch.cuda.synchronize(ctx.device)
        step += 1
        step_times.append(time.perf_counter() - started)
        window, window_steps = window + step_times[-1], window_steps + 1
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + v.detach().sum()
        count += len(x)
        logged = step % cfg.log_every == 0 or step == cfg.steps
        if logged:
            keys = sorted(sums)
            totals = ctx.sum(torch.stack([sums[k] for k in keys] + [torch.tensor(float(count), device=ctx.device)]))
            means = {k: float(v) / float(totals[-1]) for k, v in zip(keys, totals[:-1])}
            shown_loss, shown_seconds = means["loss"], window / window_steps
            if ctx.is_main:
                _log(out, {"step": step, "train": means, "seconds_per_step": shown_seconds})
            sums, count, window, window_steps = {}, 0, 0.0, 0
        progress.update(step, shown_loss, shown_seconds, logged)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            if ctx.is_main:
                last_eval = evaluate(model, held_out, cfg, out)
                _log(out, {"step": step, "eval": last_eval})
            ctx.barrier()
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            if ctx.is_main:
                save_checkpoint({"step": step, "config": asdict(cfg), "model": model.state_dict(),
                                 "optimizer": optimizer.state_dict()}, out / CHECKPOINT)
            ctx.barrier()
        if on_step is not None:
            on_step(step, model)
    timed = step_times[1:] or step_times  # the first step pays for one-off set-up
    return {"step": step, "out": str(out), "eval": last_eval, "rank": ctx.rank,
            "seconds_per_step": sum(timed) / len(timed) if timed else None}
