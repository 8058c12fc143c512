"""The training loop: Adam, progress, held-out evaluation, JSON log, PNG grid, atomic
checkpoints, exact resumption, DistributedDataParallel.

Exact resumption. Everything random is a pure function of (seed, step, rank): the batch of a
step comes from a permutation seeded by (seed, epoch); the draws of the objective (posterior
noise, GRAE≈ columns) from a generator seeded by (seed, step, rank). A checkpoint therefore only
needs the step, the model, the optimiser and the running sums of the log entry in progress, and a
resumed run takes the same steps (and writes the same log) as an uninterrupted one.

The run folder (:mod:`.runfolder`). The checkpoint is the source of truth: on ``resume`` the log
is cut back to the checkpoint's step (a line torn by a crash is dropped, with a warning). A new
run into a folder that holds another one is refused unless ``overwrite``. SIGINT/SIGTERM stop
the run after the current step with a checkpoint (:mod:`.stopping`).

Distributed. ``batch_size`` is the global batch: each of the N processes takes its share of the
same global batch. Each process minimises (N / B_global) · Σ_local per-sample loss; DDP
averages gradients over processes, so the gradient is that of the mean over the global batch,
whatever the split (the regulariser's per-sample terms included). Logged terms are summed over
processes before they are averaged. Held-out evaluation, the grid and checkpoints are written
by rank 0. Collectives time out after ``ddp_timeout`` seconds (a dead or stalled peer).
"""
from __future__ import annotations

import hashlib
import math
import signal
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch

from .. import observations
from ..models import MODELS, make_autoencoder
from ..regularizer import ESTIMATORS
from . import distributed
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .data import DATASETS, Dataset, load_dataset
from .errors import RunWarning, TrainingInterrupted, UsageError
from .images import image_grid, save_png
from .progress import LogWindow, ProgressLine
from .runfolder import CHECKPOINT, CONFIG, GRID, LOG, RunFolder  # noqa: F401 (file names, re-exported)
from .stopping import StopRequests, under_torchrun

DEFAULT_ARCHITECTURE = {"digits": "mlp", "mnist": "mnist", "celeba": "celeba"}
# Settings a resumed run may change; every other one must match the checkpoint.
RESUMABLE = {"out", "steps", "eval_every", "eval_size", "eval_samples", "checkpoint_every",
             "log_every", "device", "threads", "resume", "data_dir", "progress", "ddp_timeout", "overwrite"}


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
    threads: Optional[int] = None      # CPU threads for torch (default: leave torch's setting)
    crop: Optional[int] = None         # CelebA center-crop side
    resume: bool = False
    progress: bool = True
    ddp_timeout: float = 600.0         # seconds a collective waits for the other processes
    overwrite: bool = False            # replace the run already in ``out``


def derived_seed(*parts) -> int:
    """A 63-bit seed that depends on every part (stable across runs and machines)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


class BatchOrder:
    """Step -> this process's indices: a fresh permutation per epoch, the global batch split
    over processes (the last incomplete batch of an epoch is dropped)."""

    def __init__(self, n: int, global_batch: int, seed: int, rank: int = 0, world: int = 1):
        if global_batch > n:
            raise UsageError(f"batch_size {global_batch} exceeds the {n} training examples")
        if global_batch < world:
            raise UsageError(f"batch_size {global_batch} is smaller than the {world} processes")
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
            raise UsageError(f"{name} must be one of {', '.join(map(repr, options))}; got {getattr(cfg, name)!r}")
    choice("model", MODELS)
    choice("dataset", DATASETS)
    choice("estimator", ESTIMATORS)
    choice("observation", tuple(observations.NAMES))
    for name in ("latent_dim", "steps", "batch_size", "num_columns", "block_size", "num_samples",
                 "eval_every", "eval_size", "checkpoint_every", "log_every"):
        if not (isinstance(getattr(cfg, name), int) and getattr(cfg, name) >= 1):
            raise UsageError(f"{name} must be an integer >= 1, got {getattr(cfg, name)!r}")
    if cfg.eval_samples < 2:
        raise UsageError(f"eval_samples must be >= 2 (for a standard error), got {cfg.eval_samples}")
    for name in ("threads", "crop"):
        if getattr(cfg, name) is not None and not (isinstance(getattr(cfg, name), int) and getattr(cfg, name) >= 1):
            raise UsageError(f"{name} must be None or an integer >= 1, got {getattr(cfg, name)!r}")
    for name in ("beta", "lr", "sigma", "width", "ddp_timeout"):
        if not (math.isfinite(getattr(cfg, name)) and getattr(cfg, name) > 0):
            raise UsageError(f"{name} must be finite and > 0, got {getattr(cfg, name)!r}")
    if cfg.resume and cfg.overwrite:
        raise UsageError("--resume continues the run in --out and --overwrite replaces it: pass one of them")


def build_model(cfg: TrainConfig, data_shape):
    obs = observations.Gaussian(cfg.sigma) if cfg.observation == "gaussian" else cfg.observation
    return make_autoencoder(cfg.model, cfg.architecture or DEFAULT_ARCHITECTURE[cfg.dataset],
                            latent_dim=cfg.latent_dim, beta=cfg.beta, data_shape=data_shape,
                            width=cfg.width, norm=cfg.norm, block_size=cfg.block_size,
                            estimator=cfg.estimator, num_columns=cfg.num_columns,
                            orthogonality_weight=cfg.orthogonality_weight, observation=obs)


def _changed_settings(saved: dict, cfg: TrainConfig) -> list:
    """The settings (beyond RESUMABLE) in which ``cfg`` differs from a run's saved ones."""
    now = asdict(cfg)
    return [k for k, v in saved.items() if k not in RESUMABLE and now.get(k) != v]


def _check_same_settings(saved: dict, cfg: TrainConfig) -> None:
    """Refuse to continue a run whose saved settings differ from ``cfg`` (beyond RESUMABLE)."""
    now = asdict(cfg)
    changed = _changed_settings(saved, cfg)
    if changed:
        diffs = ", ".join(f"{k}={saved[k]!r} (now {now.get(k)!r})" for k in changed)
        raise UsageError(f"--resume: the run in {cfg.out} was started with {diffs}; pass the same "
                         "settings (or choose another --out)")


def _check_resumable(state: dict, cfg: TrainConfig, model, path) -> None:
    """Refuse a checkpoint from another configuration or model before anything is loaded."""
    if not isinstance(state, dict) or not {"step", "config", "model", "optimizer"} <= set(state):
        raise CheckpointError(f"{path} lacks the step/config/model/optimizer entries of a training checkpoint")
    _check_same_settings(state["config"], cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state["model"].items()}
    if expected != found:
        bad = sorted(set(expected) ^ set(found)) or [k for k in expected if expected[k] != found[k]]
        raise CheckpointError(f"{path} holds a model that does not match this configuration "
                              f"(first differences: {bad[:3]})")


def evaluate(model, x: torch.Tensor, cfg: TrainConfig, grid_path) -> dict:
    """Held-out β-VAE (± s.e.), Taylor and GRAE values, and the PNG grid (rank 0)."""
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(derived_seed(cfg.seed, "eval"))
    o = model.objectives(x, num_samples=cfg.eval_samples, batch_size=100, generator=gen)
    with torch.no_grad():
        shown = x[:8]
        rows = [shown, model.reconstruct(shown), model.sample(8, generator=gen), model.sample(8, generator=gen)]
    save_png(image_grid(rows), grid_path)
    model.train(was_training)
    return {k: float(v) for k, v in o._asdict().items()}


@dataclass
class _Run:
    """A run in progress: what it was given, what it trains, and where it stands."""
    cfg: TrainConfig
    ctx: distributed.Context
    folder: RunFolder
    data: Dataset
    order: BatchOrder
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    step: int = 0
    window: LogWindow = field(default_factory=LogWindow)
    last_eval: Optional[dict] = None
    step_times: list = field(default_factory=list)

    def due(self, every: int) -> bool:
        return self.step % every == 0 or self.step == self.cfg.steps

    def summary(self, **extra) -> dict:
        timed = self.step_times[1:] or self.step_times  # the first step pays for one-off set-up
        return {"step": self.step, "out": str(self.folder.path), "eval": self.last_eval, "rank": self.ctx.rank,
                "seconds_per_step": sum(timed) / len(timed) if timed else None, **extra}


def train(cfg: TrainConfig, *, on_step: Optional[Callable[[int, torch.nn.Module], None]] = None) -> dict:
    """Train (or, with ``cfg.resume``, continue) a run in ``cfg.out``; returns a summary
    (``already_finished`` is True when a resumed run had nothing left to do).

    ``on_step(step, model)`` is called after every step (after any checkpoint of that step).
    SIGINT/SIGTERM stop the run after the current step: a checkpoint is written, then
    :class:`~fastjac.training.errors.TrainingInterrupted` is raised.

    Example:
        >>> train(TrainConfig(out="runs/grae", model="grae", dataset="digits", steps=2000))
    """
    _check(cfg)
    threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    stop = StopRequests(watch_parent=under_torchrun())
    ctx = distributed.setup(cfg.device, timeout_s=cfg.ddp_timeout)
    try:
        run = _start(cfg, ctx)
        if run.step >= cfg.steps:
            return run.summary(already_finished=True)
        with stop:  # signals become stop requests in the loop only: before it, Ctrl-C stops at once
            _loop(run, stop, on_step)
        return run.summary(already_finished=False)
    finally:
        ctx.close()
        torch.set_num_threads(threads)


def _start(cfg: TrainConfig, ctx: distributed.Context) -> _Run:
    """Folder, data, model and optimiser; the checkpoint's state when resuming."""
    folder = RunFolder(cfg.out)
    restart = not cfg.resume and not cfg.overwrite and _stopped_before_first_checkpoint(folder, cfg)
    if ctx.is_main:
        folder.prepare(keep=cfg.resume or restart, overwrite=cfg.overwrite)
    with ctx.peers("start-up"):
        ctx.barrier()
    data = load_dataset(cfg.dataset, data_dir=cfg.data_dir, crop=cfg.crop)
    torch.manual_seed(derived_seed(cfg.seed, "init"))
    try:
        model = build_model(cfg, data.shape).to(ctx.device)
    except ValueError as e:  # the settings do not make a model (e.g. an architecture for other data)
        raise UsageError(f"cannot build the model: {e}") from e
    order = BatchOrder(len(data.train), cfg.batch_size, cfg.seed, ctx.rank, ctx.world)
    run = _Run(cfg, ctx, folder, data, order, model, torch.optim.Adam(model.parameters(), lr=cfg.lr))
    if cfg.resume or restart:
        _resume(run)
    if run.step < cfg.steps and ctx.is_main:
        folder.write_config(asdict(cfg))
    return run


def _stopped_before_first_checkpoint(folder: RunFolder, cfg: TrainConfig) -> bool:
    """True if ``folder`` holds this very run (same settings), stopped before its first checkpoint:
    starting it again from step 0 writes the same log, so it needs neither --resume nor --overwrite."""
    if not folder.path.is_dir() or folder.checkpoint.exists():
        return False
    try:
        saved = folder.read_config()
    except UsageError:  # unreadable: not known to be this run
        return False
    return saved is not None and not _changed_settings(saved, cfg)


def _resume(run: _Run) -> None:
    """Load the checkpoint (refusing another configuration, or --steps below its step) and cut the
    log back to it; without a checkpoint, restart a run that stopped before its first one."""
    cfg, folder = run.cfg, run.folder
    if not folder.checkpoint.exists():
        saved = folder.read_config()
        if saved is None:
            raise CheckpointError(f"--resume: {folder.path} holds no run to continue (no {CHECKPOINT}); "
                                  "start it without --resume")
        _check_same_settings(saved, cfg)
        warnings.warn(f"{folder.checkpoint} was never written (the run stopped before its first "
                      "checkpoint): starting it again from step 0", RunWarning, stacklevel=3)
    else:
        state = load_checkpoint(folder.checkpoint)
        _check_resumable(state, cfg, run.model, folder.checkpoint)
        if int(state["step"]) > cfg.steps:
            raise UsageError(f"--resume: the checkpoint in {folder.path} is at step {int(state['step'])}, beyond "
                             f"--steps {cfg.steps}; pass --steps {int(state['step'])} or more")
        run.model.load_state_dict(state["model"])
        run.optimizer.load_state_dict(state["optimizer"])
        run.step = int(state["step"])
        if run.ctx.is_main and "window" in state:
            run.window.load(state["window"], run.ctx.device)
    if run.ctx.is_main and run.step < cfg.steps:
        folder.repair_log(run.step)


def _loop(run: _Run, stop: StopRequests, on_step) -> None:
    cfg, ctx = run.cfg, run.ctx
    net = run.model
    if ctx.world > 1:
        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        net = torch.nn.parallel.DistributedDataParallel(run.model, device_ids=ids)
    held_out = run.data.test.batch(torch.arange(min(cfg.eval_size, len(run.data.test)))).to(ctx.device) \
        if ctx.is_main else None
    progress = ProgressLine(cfg.steps, cfg.progress and ctx.is_main)
    run.model.train()
    with ctx.peers("training"):
        while run.step < cfg.steps:
            _step(run, net)
            stopping = ctx.any(stop.signal is not None)
            _record(run, held_out, progress, checkpoint=stopping)
            if on_step is not None:
                on_step(run.step, run.model)
            if stopping and run.step < cfg.steps:
                raise _interrupted(run, stop.signal or signal.SIGTERM)


def _step(run: _Run, net) -> None:
    """One Adam step on this process's share of the global batch."""
    cfg, ctx = run.cfg, run.ctx
    started = time.perf_counter()
    x = run.data.train.batch(run.order.indices(run.step)).to(ctx.device)
    seed = derived_seed(cfg.seed, "step", run.step, ctx.rank)
    torch.manual_seed(seed)  # anything the model draws from the global generator
    options = {"num_samples": cfg.num_samples} if cfg.model == "beta-vae" else {}
    terms = net(x, generator=torch.Generator().manual_seed(seed), **options)
    loss = terms["loss"].sum() * (ctx.world / cfg.batch_size)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    run.optimizer.step()
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)
    run.step += 1
    run.step_times.append(time.perf_counter() - started)
    run.window.add(terms, len(x), run.step_times[-1])


def _record(run: _Run, held_out, progress: ProgressLine, *, checkpoint: bool) -> None:
    """After a step: the log entry, the progress line, the held-out evaluation and the checkpoint
    that are due (and a checkpoint anyway if ``checkpoint``)."""
    cfg, ctx, folder = run.cfg, run.ctx, run.folder
    logged = run.due(cfg.log_every)
    if logged:
        entry = run.window.mean(ctx)
        progress.loss, progress.seconds = entry["train"]["loss"], entry["seconds_per_step"]
        if ctx.is_main:
            folder.append_log({"step": run.step, **entry})
    progress.update(run.step, logged)
    if run.due(cfg.eval_every):
        if ctx.is_main:
            run.last_eval = evaluate(run.model, held_out, cfg, folder.grid)
            folder.append_log({"step": run.step, "eval": run.last_eval})
        ctx.barrier()
    if run.due(cfg.checkpoint_every) or checkpoint:
        window = run.window.state(ctx)
        if ctx.is_main:
            save_checkpoint({"step": run.step, "config": asdict(cfg), "model": run.model.state_dict(),
                             "optimizer": run.optimizer.state_dict(), "window": window}, folder.checkpoint)
        ctx.barrier()


def _interrupted(run: _Run, signum: int) -> TrainingInterrupted:
    name = signal.Signals(signum).name
    return TrainingInterrupted(
        f"stopped by {name} at step {run.step} of {run.cfg.steps}; checkpoint written to {run.folder.checkpoint}. "
        "To continue, resume it (fastjac train: the same command again with --resume)", step=run.step,
        signal_number=signum, rank=run.ctx.rank)
