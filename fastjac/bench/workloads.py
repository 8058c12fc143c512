"""Benchmark workloads: one builder per area, the implementation a parameter.

Each builder returns a :class:`Workload` whose ``run()`` does one unit of work (an operator's
forward + backward, a Jacobian's forward + backward, one optimiser step) and synchronises on a
GPU. A combination that cannot run here (a backend not registered or not supporting the input,
a GPU workload without a GPU) raises ``NotImplementedError``
with the reason: asv skips it, ``fastjac bench`` lists it as skipped. The same builders serve
the asv suite (``benchmarks/``) and ``fastjac bench``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .. import objectives
from .._validation import checks as check_values
from ..jacobian import jacobian_columns
from ..ops import (_dispatch, column_estimate, hadamard_bound, logdet_gram, orthogonality_penalty)
from . import baselines, models
from .timing import synchronised

BETA = 0.5
FASTJAC_BACKENDS = _dispatch.BACKENDS                      # torch, triton, cpp, cuda
BASELINE = baselines.OPERATOR_LABEL                      # "autograd": what a user writes by hand
OPERATOR_IMPLEMENTATIONS = (BASELINE,) + FASTJAC_BACKENDS
JACOBIAN_IMPLEMENTATIONS = tuple(baselines.JACOBIANS) + ("fastjac",)
TRAINING_IMPLEMENTATIONS = tuple(baselines.JACOBIANS) + FASTJAC_BACKENDS
OPERATORS = ("logdet_gram", "hadamard_bound", "column_estimate", "orthogonality_penalty")
OBJECTIVES = ("ae", "beta_vae", "grae_k1", "grae_k4", "grae_exact", "grae_exact_chunk4", "grae_hutchinson_cg")
_EXACT = ("grae_exact", "grae_exact_chunk4")
_ESTIMATOR = {"grae_k1": "stochastic", "grae_k4": "stochastic", "grae_exact": "exact",
              "grae_exact_chunk4": "exact", "grae_hutchinson_cg": "hutchinson_cg"}
# the registered custom op behind each public operator (what a backend registers for)
_DISPATCH_OP = {"logdet_gram": "logdet_gram", "hadamard_bound": "column_estimate",
                "column_estimate": "column_estimate", "orthogonality_penalty": "orthogonality_penalty"}


@dataclass
class Workload:
    run: Callable[[], None]
    bytes: Optional[float] = None   # bytes a perfect kernel moves once (for the floor)
    flops: Optional[float] = None   # its arithmetic


def require_device(device: str) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise NotImplementedError("no CUDA device here")
    return device


def require_backend(op: str, backend: str, device: torch.device, dtype, **sizes) -> None:
    """NotImplementedError unless fastjac's ``backend`` computes ``op`` for this input."""
    if backend not in _dispatch.operators().get(op, ()):
        why = _dispatch.availability().get(backend) or f"{op} has no {backend} implementation"
        raise NotImplementedError(f"backend {backend!r}: {why}")
    reason = _dispatch.implementation(op, backend).supports(device_type=device.type, dtype=dtype, **sizes)
    if reason is not None:
        raise NotImplementedError(f"backend {backend!r}: {reason}")


# -- operators ---------------------------------------------------------------------------------

def operator(op: str, implementation: str, *, device: str, B: int, D: int, d: int, k: int = 1,
             dtype=torch.float32, seed: int = 0) -> Workload:
    """Forward + backward (∂/∂J) of ``op`` on a random J.

    J is (B, D, d), except column_estimate's (B, D, k): the k drawn columns.
    """
    if op not in OPERATORS:
        raise ValueError(f"op must be one of {OPERATORS}, got {op!r}")
    if implementation not in OPERATOR_IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {OPERATOR_IMPLEMENTATIONS}, got {implementation!r}")
    dev = require_device(device)
    cols = k if op == "column_estimate" else d
    if implementation != BASELINE:
        require_backend(_DISPATCH_OP[op], implementation, dev, dtype, B=B, D=D, d=cols)
    gen = torch.Generator().manual_seed(seed)
    J = (torch.randn(B, D, cols, generator=gen, dtype=dtype) / D ** 0.5).to(dev).requires_grad_()
    forward = _operator_forward(op, implementation, d)

    def step():
        torch.autograd.grad(forward(J).sum(), J)

    elt = J.element_size()
    # forward reads J; backward reads J and writes ∂/∂J. Gram-type ops: 2·B·D·k² flops each way.
    gram_like = op in ("logdet_gram", "orthogonality_penalty")
    flops = (4 * B * D * cols * cols) if gram_like else 6 * B * D * cols
    return Workload(synchronised(dev, step), bytes=3 * B * D * cols * elt, flops=flops)


def _operator_forward(op, implementation, d):
    if implementation == BASELINE:
        return {"logdet_gram": lambda J: baselines.logdet_gram(J, BETA),
                "hadamard_bound": lambda J: baselines.hadamard_bound(J, BETA),
                "column_estimate": lambda J: baselines.column_estimate(J, BETA, latent_dim=d),
                "orthogonality_penalty": baselines.orthogonality}[op]
    b = implementation
    return {"logdet_gram": lambda J: logdet_gram(J, BETA, backend=b),
            "hadamard_bound": lambda J: hadamard_bound(J, BETA, backend=b),
            "column_estimate": lambda J: column_estimate(J, BETA, probabilities=1.0 / d, backend=b),
            "orthogonality_penalty": lambda J: orthogonality_penalty(J, backend=b)}[op]


# -- Jacobian columns ----------------------------------------------------------------------------

def _columns(B, d, k, device, gen):
    if k >= d:
        return None
    return torch.randint(d, (B, k), generator=gen, device=gen.device).to(device)


def _pick(J, columns):
    return J if columns is None else torch.gather(J, 2, columns.unsqueeze(1).expand(-1, J.shape[1], -1))


def jacobian(model: str, implementation: str, *, device: str, B: int, d: int, k: int,
             width: float = 1.0, seed: int = 0) -> Workload:
    """k Jacobian columns of the decoder (k = d: all) and the backward of Σ J² into its parameters.

    The baselines compute the full J and pick the columns, as a user would."""
    if implementation not in JACOBIAN_IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {JACOBIAN_IMPLEMENTATIONS}, got {implementation!r}")
    dev = require_device(device)
    torch.manual_seed(seed)
    m = models.build(model, d, code_dim=d, width=width, device=dev)
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(B, d, generator=gen).to(dev)
    columns = _columns(B, d, k, dev, gen)
    params = tuple(m.decoder.parameters())

    if implementation == "fastjac":
        def columns_of(zz):
            return jacobian_columns(m.decoder, zz, columns)[1]
    else:
        full = baselines.JACOBIANS[implementation]

        def columns_of(zz):
            return _pick(full(m.decoder, zz), columns)

    def step():
        J = columns_of(z)
        torch.autograd.grad((J * J).sum(), params)
    return Workload(synchronised(dev, step))


# -- training steps ----------------------------------------------------------------------------

def _num_columns(objective):
    return {"grae_k1": 1, "grae_k4": 4}.get(objective)


def _check_training(objective, implementation, dev, B, D, d):
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if implementation not in TRAINING_IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {TRAINING_IMPLEMENTATIONS}, got {implementation!r}")
    if objective in ("ae", "beta_vae"):
        if implementation != "torch":
            raise NotImplementedError(f"{objective} has no Jacobian: only the plain PyTorch step ('torch')")
        return
    if implementation in baselines.JACOBIANS:
        if objective == "grae_hutchinson_cg":
            raise NotImplementedError("no hand-written form of the Hutchinson–CG estimator")
        if objective == "grae_exact_chunk4":
            raise NotImplementedError("chunking is fastjac's; the hand-written exact step is 'grae_exact'")
        if implementation == "functional.jacobian" and objective != "grae_exact":
            raise NotImplementedError("the per-sample reverse-mode baseline is run for exact GRAE only")
        return
    if objective == "grae_hutchinson_cg":
        if implementation != "torch":
            raise NotImplementedError("hutchinson_cg runs in plain PyTorch only")
        return
    k = _num_columns(objective)
    if objective in _EXACT:
        require_backend("logdet_gram", implementation, dev, torch.float32, B=B, D=D, d=d)
    else:
        require_backend("column_estimate", implementation, dev, torch.float32, B=B, D=D, d=k)


def training_step(model: str, objective: str, implementation: str, *, device: str, B: int, d: int,
                  width: float = 1.0, beta: float = BETA, seed: int = 0, checks: bool = True) -> Workload:
    """One Adam step of ``objective`` on a fixed batch (Gaussian σ = 1 observations).

    objective: "ae" (plain autoencoder), "beta_vae" (mean field, one sample), "grae_k1"/"grae_k4"
    (GRAE≈ with k columns), "grae_exact", "grae_exact_chunk4" (tangents pushed 4 at a time, bounding
    memory), "grae_hutchinson_cg". implementation: a fastjac backend,
    or "vmap(jacfwd)" / "functional.jacobian" (the user's full J and autograd through the operator).
    checks: fastjac's value checks (finiteness, one sync on a GPU) on, the default, or off.
    """
    dev = require_device(device)
    torch.manual_seed(seed)
    m = models.build(model, d, code_dim=2 * d if objective == "beta_vae" else d, width=width, device=dev)
    D = int(torch.tensor(m.x_shape).prod())
    _check_training(objective, implementation, dev, B, D, d)
    gen = torch.Generator(device=dev).manual_seed(seed)
    x = models.data(m, B, device=dev, generator=torch.Generator().manual_seed(seed))
    opt = torch.optim.Adam([*m.encoder.parameters(), *m.decoder.parameters()], lr=1e-4)
    loss_of = _loss(objective, implementation, m, beta, gen)

    def step():
        with check_values(checks):
            loss = loss_of(x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return Workload(synchronised(dev, step))


def _reconstruction(out, x):
    return 0.5 * ((out - x) ** 2).flatten(1).sum(-1)


def _loss(objective, implementation, m: models.Model, beta, gen):
    enc, dec, d = m.encoder, m.decoder, m.latent_dim
    if objective == "ae":
        return lambda x: _reconstruction(dec(enc(x)), x).mean()
    if objective == "beta_vae":
        def loss(x):
            h = enc(x)
            scale = torch.diag_embed(h[:, d:].clamp(-6, 2).exp())
            return objectives.beta_vae_loss(dec, h[:, :d], scale, x, beta, generator=gen)
        return loss
    k = _num_columns(objective)
    if implementation in baselines.JACOBIANS:
        full = baselines.JACOBIANS[implementation]

        def loss(x):
            z = enc(x)
            J = full(dec, z)
            if k is None:
                R = baselines.logdet_gram(J, beta)
            else:
                R = baselines.column_estimate(_pick(J, _columns(len(z), d, k, z.device, gen)), beta, latent_dim=d)
            return (_reconstruction(dec(z), x) + beta / 2 * (z * z).sum(-1) + beta / 2 * R).mean()
        return loss
    estimator = _ESTIMATOR[objective]
    chunk = 4 if objective == "grae_exact_chunk4" else None
    return lambda x: objectives.grae_loss(dec, enc(x), x, beta, estimator=estimator, num_columns=k or 1,
                                          generator=gen, chunk_size=chunk, backend=implementation)
