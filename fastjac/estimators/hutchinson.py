"""``estimator="hutchinson_cg"``: an unbiased gradient of log det M, M = I + J_wᵀJ_w/β, at a cost
that does not grow with d (docs/maths.md#first-order-and-hutchinson-estimators).

For P probes ε (Rademacher by default, Gaussian with ``Settings.extra["probes"] = "gaussian"``):

1. Solve M u = ε by conjugate gradients, all B·P systems advancing together (per-system α, β and
   convergence masks). M v = v + Jᵀ diag(w) (J v)/β is one forward-mode pass (JVP, P tangents) and
   one reverse sweep (VJP, P cotangents) of the decoder at z; J is never formed and nothing in
   the solve is recorded for autograd.
2. Gradient: back-propagate the surrogate S = (1/P) Σ_p ⟨J_w u_p, J_w ε_p⟩/β with u held fixed.
   Its gradient is uᵀ(∂M)ε = εᵀM⁻¹(∂M)ε, whose expectation is tr(M⁻¹∂M) = ∂ log det M: unbiased
   for the exact regulariser's gradient with respect to the decoder parameters, z, β and — through
   w(g(z)) for the Bernoulli models — the observation weights.
3. Value: stochastic Lanczos quadrature from the same matvecs. CG's α, β give the Lanczos
   tridiagonal T of the Krylov space of ε, and V = (1/P) Σ_p ‖ε_p‖² e₁ᵀ log(T_p) e₁ estimates
   log det M (exact per probe, εᵀ log(M) ε, once the Krylov space is complete).

The returned R is ``V.detach() + (S − S.detach())``: its *value* is the SLQ estimate V and its
*gradient* is the Hutchinson gradient of step 2; the two are never mixed within one of them.

Cost per call, with ``chunk_size=None``: k + 2 decoder calls, k = CG iterations (≤ cg_max_iter,
about ≤ d in exact arithmetic and usually far fewer: CG converges at a rate set by √cond(M)):
one primal pass whose graph the k VJPs reuse, k JVP passes carrying P tangents, and one pass with
2P tangents that keeps the graph for back-propagation (its output is the reconstruction's primal).
The iteration count is returned in ``Estimate.info`` and logged at DEBUG level on the
``fastjac.hutchinson`` logger; a :class:`ConvergenceWarning` is issued when CG stops on
``cg_max_iter``. A decoder with BatchNorm in training mode would update its running statistics
once per call: use eval mode (per-sample Jacobians need it anyway, docs/maths.md#batch-coupling).
z may have any shape (B, *latent_shape); the probes and CG vectors are over its d = prod(latent_shape)
flattened elements.
"""
from __future__ import annotations

import logging
import math
import warnings
from numbers import Real
from typing import Callable, NamedTuple

import torch
from torch import Tensor
from torch.func import jvp, vjp, vmap

from .. import _validation as check
from .._rules import column_rules
from ..jacobian import FORWARD_AD_LOCK, jacobian_columns, prepared, select_output
from ..observations import observation_weights, weighted_dots
from .settings import Estimate, Settings, check_output

PROBES = ("rademacher", "gaussian")
logger = logging.getLogger("fastjac.hutchinson")  # the name users configured before the move


class ConvergenceWarning(RuntimeWarning):
    """Conjugate gradients stopped on ``cg_max_iter`` before every system met ``cg_tol``."""


class CGResult(NamedTuple):
    solution: Tensor    # (*systems, n)
    iterations: Tensor  # (*systems,) int64: iterations each system took
    converged: Tensor   # (*systems,) bool: ‖r‖ <= tol·‖b‖
    residual: Tensor    # (*systems,) relative recursive residual ‖r‖/‖b‖
    alphas: Tensor      # (k, *systems) CG step sizes (0 after a system stopped)
    betas: Tensor       # (k, *systems) CG direction updates ‖r_{i+1}‖²/‖r_i‖²


def conjugate_gradients(matvec: Callable[[Tensor], Tensor], rhs: Tensor, *, max_iter: int,
                        tol: float) -> CGResult:
    """Solve A x = b for a batch of symmetric positive definite systems, all advancing together.

    Args:
        matvec: (*systems, n) -> (*systems, n), applies each system's A to its own vector.
        rhs: (*systems, n) right-hand sides b (not modified).
        max_iter: the most matvecs; tol: stop a system once ‖r‖ <= tol·‖b‖.
    Returns:
        :class:`CGResult`; one matvec per iteration (a batch stops when all its systems stopped).

    Example:
        >>> A = torch.eye(3) * 2
        >>> conjugate_gradients(lambda v: v @ A, torch.ones(4, 3), max_iter=5, tol=1e-8).solution[0]
        tensor([0.5000, 0.5000, 0.5000])
    """
    x = torch.zeros_like(rhs)
    r = rhs.clone()
    p = r.clone()
    rr = (r * r).sum(-1)
    stop = (tol ** 2) * rr
    active = rr > stop
    iterations = torch.zeros(rhs.shape[:-1], dtype=torch.long, device=rhs.device)
    alphas, betas = [], []
    for _ in range(max_iter):
        if not bool(active.any()):
            break
        Ap = matvec(p)
        pAp = (p * Ap).sum(-1)
        alpha = torch.where(active, rr / torch.where(active, pAp, 1), 0)
        x = x + alpha.unsqueeze(-1) * p
        r = r - alpha.unsqueeze(-1) * Ap
        rr_next = (r * r).sum(-1)
        beta = torch.where(active, rr_next / torch.where(active, rr, 1), 0)
        p = torch.where(active.unsqueeze(-1), r + beta.unsqueeze(-1) * p, p)
        alphas.append(alpha)
        betas.append(beta)
        iterations += active
        rr = torch.where(active, rr_next, rr)
        active = active & (rr_next > stop)
    empty = rhs.new_zeros((0, *rhs.shape[:-1]))
    norm_b = (rhs * rhs).sum(-1).sqrt()
    return CGResult(x, iterations, ~active, rr.sqrt() / norm_b.clamp_min(torch.finfo(rhs.dtype).tiny),
                    torch.stack(alphas) if alphas else empty, torch.stack(betas) if betas else empty)


def lanczos_tridiagonal(result: CGResult) -> Tensor:
    """(*systems, k, k) float64 Lanczos matrices T from CG's coefficients (Saad, §6.7.3).

    T_ii = 1/α_i + β_{i−1}/α_{i−1}, T_{i,i+1} = √β_i/α_i for i below a system's own iteration
    count m; beyond it T is padded with the identity, which adds nothing to e₁ᵀ log(T) e₁.
    """
    alphas, betas = result.alphas.double(), result.betas.double()
    k = alphas.shape[0]
    steps = torch.arange(k, device=alphas.device).reshape(k, *([1] * result.iterations.dim()))
    valid = steps < result.iterations
    inv_alpha = 1 / torch.where(valid, alphas, 1)
    carried = torch.cat([torch.zeros_like(inv_alpha[:1]), (betas * inv_alpha)[:-1]])
    diag = torch.where(valid, inv_alpha + carried, 1).movedim(0, -1)
    coupled = steps[:-1] < result.iterations - 1
    off = torch.where(coupled, betas[:-1].sqrt() * inv_alpha[:-1], 0).movedim(0, -1)
    return torch.diag_embed(diag) + torch.diag_embed(off, 1) + torch.diag_embed(off, -1)


def lanczos_quadrature(result: CGResult, rhs: Tensor) -> Tensor:
    """(*systems,) float64 ‖b‖² e₁ᵀ log(T) e₁ ≈ bᵀ log(A) b (Gauss quadrature; exact once the
    Krylov space of b is complete)."""
    norm2 = (rhs.double() ** 2).sum(-1)
    if result.alphas.shape[0] == 0:
        return torch.zeros_like(norm2)
    ritz, vectors = torch.linalg.eigh(lanczos_tridiagonal(result))
    weights = vectors[..., 0, :] ** 2
    return norm2 * (weights * ritz.clamp_min(torch.finfo(ritz.dtype).tiny).log()).sum(-1)


def gram_matvec(decoder: Callable, z: Tensor, beta, obs, x, *, output=None, chunk_size=None):
    """M v = v + Jᵀ diag(w) J v / β at z, as a closure over (P, B, d) -> (P, B, d), no graph kept
    (d = prod(z.shape[1:]): the vectors are over the flattened latent).

    One primal decoder call now (its graph serves every VJP); each matvec then costs one decoder
    call (JVP with P tangents) and one reverse sweep. w is taken at g(z) and held fixed.
    """
    decoder = prepared(decoder)  # wrappers removed, BatchNorm checked, as for the columns

    def decode(code):
        return select_output(decoder(code), output)

    beta = beta.detach() if isinstance(beta, Tensor) else beta
    with torch.no_grad(), column_rules():
        z0 = z.detach()
        out, pullback = vjp(decode, z0)
        check_output(out)
        w = observation_weights(obs, out, x)

    def weighted(Jv):  # (P, B, *out) -> diag(w) J v, same shape
        if not (isinstance(w, Tensor) and w.dim() == 2):
            return Jv * w
        return (Jv.reshape(*Jv.shape[:2], -1) * w).reshape(Jv.shape)

    def push(tangent):  # (B, d) flat
        return jvp(decode, (z0,), (tangent.reshape(z0.shape),))[1]

    def matvec(V: Tensor) -> Tensor:
        with torch.no_grad(), FORWARD_AD_LOCK, column_rules():  # forward-AD state is process-wide
            Jv = vmap(push, chunk_size=chunk_size)(V)
            (JtWJv,) = vmap(pullback, chunk_size=chunk_size)(weighted(Jv))
            return V + JtWJv.reshape(V.shape) / beta

    return matvec


def draw_probes(kind: str, shape, like: Tensor, generator) -> Tensor:
    """Rademacher (±1) or standard Gaussian probes of ``shape``, drawn with ``generator``."""
    device = generator.device if generator is not None else like.device
    if kind == "rademacher":
        signs = torch.randint(0, 2, shape, generator=generator, device=device)
        return (2 * signs - 1).to(device=like.device, dtype=like.dtype)
    return torch.randn(shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


def _options(s: Settings) -> str:
    check.positive_int("num_probes", s.num_probes)
    check.positive_int("cg_max_iter", s.cg_max_iter)
    tol = s.cg_tol
    if isinstance(tol, bool) or not isinstance(tol, Real) or not (math.isfinite(tol) and 0 < tol < 1):
        raise ValueError(f"cg_tol must be a number in (0, 1) (relative residual), got {tol!r}")
    if s.orthogonality_weight != 0:
        raise ValueError("orthogonality_weight > 0 is not supported by estimator='hutchinson_cg' (it never "
                         "forms Jacobian columns); use estimator='stochastic' or 'exact' for that penalty")
    if not isinstance(s.extra, dict):
        raise TypeError(f"settings.extra must be a dict, got {type(s.extra).__name__}")
    return check.choice("extra['probes']", s.extra.get("probes", "rademacher"), PROBES)


def _report(cg: CGResult, s: Settings, kind: str) -> dict:
    """The info dict of :func:`hutchinson_cg`; logs it and warns when CG stopped on cg_max_iter."""
    iterations = int(cg.iterations.max())
    P, systems = s.num_probes, cg.iterations.numel()
    info = {"cg_iterations": iterations, "decoder_calls": iterations + 2,
            "converged": bool(cg.converged.all()), "max_relative_residual": float(cg.residual.max()),
            "num_probes": P, "probes": kind}
    logger.debug("hutchinson_cg: %d CG iterations for %d systems, max relative residual %.2e",
                 iterations, systems, info["max_relative_residual"])
    if not info["converged"]:
        warnings.warn(f"hutchinson_cg: conjugate gradients stopped on cg_max_iter={s.cg_max_iter} with "
                      f"{int((~cg.converged).sum())} of {systems} systems above cg_tol={s.cg_tol} (max relative "
                      f"residual {info['max_relative_residual']:.2e}); the gradient is biased by the "
                      "unsolved part: raise cg_max_iter or cg_tol", ConvergenceWarning, stacklevel=4)
    return info


def hutchinson_cg(decoder, z, beta, obs, x, s: Settings) -> Estimate:
    """Estimate(out, R, None, info): R's value is the SLQ estimate of log det M and its gradient
    the unbiased Hutchinson–CG gradient (module docstring). ``info`` holds ``cg_iterations`` (the
    matvecs taken), ``decoder_calls`` (= cg_iterations + 2 with chunk_size None), ``converged``,
    ``max_relative_residual``, ``num_probes`` and ``probes``.
    """
    kind = _options(s)
    B, d = z.shape[0], z[0].numel()
    P = s.num_probes
    matvec = gram_matvec(decoder, z, beta, obs, x, output=s.output, chunk_size=s.chunk_size)
    eps = draw_probes(kind, (P, B, d), z, s.generator)
    cg = conjugate_gradients(matvec, eps, max_iter=s.cg_max_iter, tol=s.cg_tol)
    value = lanczos_quadrature(cg, eps).mean(0)                                      # (B,)

    directions = torch.cat([cg.solution, eps]).permute(1, 2, 0)                      # (B, d, 2P)
    out, J = jacobian_columns(decoder, z, directions=directions, chunk_size=s.chunk_size, output=s.output)
    w = observation_weights(obs, out, x)
    surrogate = weighted_dots(J[..., :P], J[..., P:], w).mean(-1) / beta             # (B,)
    R = value.to(surrogate.dtype) + (surrogate - surrogate.detach())
    return Estimate(out, R, None, _report(cg, s, kind))
