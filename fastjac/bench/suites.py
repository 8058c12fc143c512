"""What ``fastjac bench`` measures: groups of rivals, each against a baseline timed in the same run.

A group is one workload (an operator at one shape, a model's training step, ...); its baseline is
what a user writes without fastjac (or the plain autoencoder step, for the cost of a regulariser),
its rivals fastjac's implementations. Targets (issue 8) are attached to the rows they judge.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache, partial
from typing import Callable, Optional

import torch

from . import timing
from . import workloads as W

OBJECTIVE_LABELS = {"ae": "plain AE", "beta_vae": "β-VAE", "grae_k1": "GRAE≈ k=1", "grae_k4": "GRAE≈ k=4",
                    "grae_exact": "exact GRAE", "grae_hutchinson_cg": "GRAE hutchinson_cg"}


@dataclass(frozen=True)
class Target:
    """ratio = time / time(versus): holds when ratio <= at_most (a cost) or 1/ratio >= speedup."""
    text: str
    at_most: Optional[float] = None
    speedup: Optional[float] = None
    versus: Optional[str] = None      # label of the row compared with; None: the group's baseline

    def holds(self, ratio: float) -> bool:
        if self.at_most is not None:
            return ratio <= self.at_most
        return 1.0 / ratio >= self.speedup


@dataclass
class Rival:
    label: str
    build: Callable[[], W.Workload]
    targets: tuple = ()


@dataclass
class Group:
    area: str
    title: str
    baseline: Rival
    rivals: list = field(default_factory=list)


@dataclass(frozen=True)
class Sizes:
    operator_shapes: tuple          # (B, D, d)
    models: dict                    # name -> dict(B=, d=, width=) for jacobian and training
    plain_cost_target: float        # GRAE≈ k=1 step / plain step
    # exact-GRAE groups: (model, sizes, {baseline label: speed-up fastjac must reach}); the first
    # label is the group's baseline. Per-sample reverse mode takes seconds a sample: small batches.
    exact: tuple
    zoo: tuple = ("mlp", "autoencoder_kl")   # decoders of fastjac.bench.zoo (users' own architectures)


CPU = Sizes(operator_shapes=((64, 784, 16),),
            models={"mlp": dict(B=64, d=16, width=1.0), "mlp_fused": dict(B=64, d=16, width=1.0),
                    "mnist": dict(B=32, d=16, width=0.25)},
            plain_cost_target=2.2,
            exact=(("mlp", dict(B=64, d=16, width=1.0), {"vmap(jacfwd)": 1.3}),
                   ("mlp_fused", dict(B=64, d=16, width=1.0), {"vmap(jacfwd)": 1.3}),
                   ("mnist", dict(B=8, d=16, width=0.25), {"vmap(jacfwd)": 1.3}),
                   ("mlp", dict(B=4, d=16, width=1.0), {"functional.jacobian": 100.0, "vmap(jacfwd)": None})))
QUICK = Sizes(operator_shapes=((4, 32, 4),),  # a smoke run: every area, the MLP only, no per-sample baseline
              models={"mlp": dict(B=4, d=4, width=1 / 16)}, plain_cost_target=2.2,
              exact=(("mlp", dict(B=2, d=4, width=1 / 16), {"vmap(jacfwd)": 1.3}),), zoo=("mlp",))
CUDA = Sizes(operator_shapes=((64, 784, 16), (64, 12288, 128)),
             models={"mnist": dict(B=64, d=16, width=1.0), "celeba": dict(B=64, d=128, width=1.0)},
             plain_cost_target=2.0,
             exact=(("mnist", dict(B=64, d=16, width=1.0), {"vmap(jacfwd)": 1.3}),))


def _operator_groups(device, sizes: Sizes):
    for B, D, d in sizes.operator_shapes:
        for op in W.OPERATORS:
            shape = f"B={B} D={D} " + (f"k=1 of d={d}" if op == "column_estimate" else f"d={d}")
            build = partial(W.operator, op, device=device, B=B, D=D, d=d)
            yield Group("operators", f"{op} fwd+bwd {shape}", Rival(W.BASELINE, partial(build, W.BASELINE)),
                        [Rival(b, partial(build, b)) for b in W.FASTJAC_BACKENDS])


def _jacobian_groups(device, sizes: Sizes):
    for model, kw in sizes.models.items():
        for k in (kw["d"], 1):
            build = partial(W.jacobian, model, device=device, k=k, **kw)
            what = "all d" if k == kw["d"] else f"k={k}"
            yield Group("jacobian", f"{model} columns ({what}) fwd+bwd B={kw['B']} d={kw['d']}",
                        Rival("vmap(jacfwd)", partial(build, "vmap(jacfwd)")),
                        [Rival("fastjac", partial(build, "fastjac"))])


def _step(model, objective, implementation, device, kw, **options):
    return partial(W.training_step, model, objective, implementation, device=device, **kw, **options)


def _training_groups(device, sizes: Sizes):
    for model, kw in sizes.models.items():
        rivals = [Rival("β-VAE", _step(model, "beta_vae", "torch", device, kw))]
        for objective in ("grae_k1", "grae_k4"):
            for b in W.FASTJAC_BACKENDS:
                targets = ()
                if objective == "grae_k1":
                    t = sizes.plain_cost_target
                    targets = (Target(f"≤ {t:g}× plain", at_most=t),)
                rivals.append(Rival(f"{OBJECTIVE_LABELS[objective]} [{b}]",
                                    _step(model, objective, b, device, kw), targets))
                if objective == "grae_k1" and b == "torch":  # what the value checks cost
                    rivals.append(Rival(f"{OBJECTIVE_LABELS[objective]} [{b}, checks off]",
                                        _step(model, objective, b, device, kw, checks=False), targets))
        rivals.append(Rival(OBJECTIVE_LABELS["grae_hutchinson_cg"],
                            _step(model, "grae_hutchinson_cg", "torch", device, kw)))
        yield Group("training", f"{model} step B={kw['B']} d={kw['d']} width={kw['width']:g}",
                    Rival("plain AE", _step(model, "ae", "torch", device, kw)), rivals)
    for model, kw, speedups in sizes.exact:
        baselines = list(speedups)
        targets = tuple(Target(f"≥ {s:g}× faster than {name}", speedup=s, versus=name)
                        for name, s in speedups.items() if s is not None)
        rivals = [Rival(name, _step(model, "grae_exact", name, device, kw)) for name in baselines[1:]]
        rivals += [Rival(f"exact GRAE [{b}]", _step(model, "grae_exact", b, device, kw), targets)
                   for b in W.FASTJAC_BACKENDS]
        yield Group("training", f"{model} exact GRAE step B={kw['B']} d={kw['d']} width={kw['width']:g}",
                    Rival(baselines[0], _step(model, "grae_exact", baselines[0], device, kw)), rivals)


# decoder-only GRAE≈ step / plain step that issue 14 asks of each zoo decoder
ZOO_COST_TARGETS = {"mlp": 2.0, "autoencoder_kl": 3.5}
ZOO_LABELS = {"plain": "plain step", "fastjac": "GRAE≈ k=1 (fastjac)", "torch.func": "GRAE≈ k=1 (torch.func by hand)"}


def _zoo_inputs(name: str, device: str):
    """(decoder, z, x) of zoo decoder ``name`` on ``device``; NotImplementedError when its package is missing."""
    from . import zoo
    dev = W.require_device(device)
    built = zoo.DECODERS[name]()
    if built is None:
        raise NotImplementedError(f"zoo decoder {name!r} needs a package that is not installed")
    decoder, z_shape, D = built
    decoder = decoder.to(dev)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(*z_shape, generator=g).to(dev).requires_grad_()
    x = torch.rand(z_shape[0], D, generator=g).to(dev).reshape(decoder(z).shape)
    return decoder, z, x


def _zoo_rival(inputs, rival: str, device: str) -> W.Workload:
    from . import zoo
    return W.Workload(timing.synchronised(device, zoo.STEPS[rival](*inputs())))


def _zoo_groups(device, sizes: Sizes):
    """Decoder-only GRAE≈ steps on decoders users have (fastjac.bench.zoo), against the plain step."""
    for name in sizes.zoo:
        inputs = lru_cache(maxsize=None)(partial(_zoo_inputs, name, device))  # one decoder for all rivals
        t = ZOO_COST_TARGETS.get(name, sizes.plain_cost_target)
        targets = (Target(f"≤ {t:g}× plain", at_most=t),
                   Target("never slower than torch.func by hand", speedup=1.0, versus=ZOO_LABELS["torch.func"]))
        rivals = [Rival(ZOO_LABELS["fastjac"], partial(_zoo_rival, inputs, "fastjac", device), targets),
                  Rival(ZOO_LABELS["torch.func"], partial(_zoo_rival, inputs, "torch.func", device))]
        yield Group("zoo", f"{name} decoder-only step", Rival(ZOO_LABELS["plain"],
                    partial(_zoo_rival, inputs, "plain", device)), rivals)


AREAS = {"operators": _operator_groups, "jacobian": _jacobian_groups, "training": _training_groups,
         "zoo": _zoo_groups}


def groups(device: str, *, quick: bool, areas=tuple(AREAS)) -> list[Group]:
    sizes = QUICK if quick else (CUDA if device.startswith("cuda") else CPU)
    return [g for area in areas for g in AREAS[area](device, sizes)]
