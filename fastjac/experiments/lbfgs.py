"""Batched L-BFGS: many independent smooth problems, one per entry of the first dimension.

The identifiability experiment trains T trials as one batched computation (the loss is the sum of
the trials' losses). A joint quasi-Newton method on that sum would couple the trials through its
line search and curvature pairs; here every trial has its own history, its own step length
(backtracking to the Armijo condition) and its own stopping test, so a batch of trials reaches
exactly what the trials reach one by one.

Why a second-order method: the ELBO of a mean-field posterior changes by a fraction of a nat when
the latent axes rotate, while the reconstruction term has curvature ~1/σ² = 400, so first-order
steps (gradient descent, Adam) slow to a crawl long before the axes settle. Quasi-Newton steps
scale each direction by its curvature and leave the equal-variance saddle in a few hundred steps.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

ARMIJO = 1e-4
MAX_HALVINGS = 40
RESOLUTION = 1e-12  # a row stops when a step lowers f by less than this, relative to max(1, |f|)


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum(-1)


def _direction(g: Tensor, pairs: list) -> Tensor:
    """−H·g by the two-loop recursion, per row; pairs with sᵀy ≤ 0 carry ρ = 0 (ignored)."""
    q, alphas = g.clone(), []
    for s, y, rho in reversed(pairs):
        a = rho * _dot(s, q)
        q -= a[:, None] * y
        alphas.append(a)
    gamma = torch.ones_like(g[:, 0])
    for s, y, rho in reversed(pairs):        # the newest valid pair scales the initial Hessian
        sy, yy = _dot(s, y), _dot(y, y)
        gamma = torch.where((rho > 0) & (gamma == 1), sy / yy.clamp_min(1e-300), gamma)
    r = gamma[:, None] * q
    for (s, y, rho), a in zip(pairs, reversed(alphas)):
        r += s * (a - rho * _dot(y, r))[:, None]
    return -r


def _finite(f: Tensor) -> Tensor:
    return torch.where(torch.isfinite(f), f, torch.full_like(f, float("inf")))


def _line_search(value: Callable, x: Tensor, f: Tensor, g: Tensor, d: Tensor, active: Tensor):
    """Per row, the first step t ∈ {1, ½, ¼, …} with f(x + t d) ≤ f + c·t·gᵀd; 0 if none."""
    slope = _dot(g, d)
    t = torch.where(active, torch.ones_like(f), torch.zeros_like(f))
    pending = active.clone()
    for _ in range(MAX_HALVINGS):
        f_new = _finite(value(torch.where(active[:, None], x + t[:, None] * d, x)))
        pending = pending & ~(f_new <= f + ARMIJO * t * slope)
        if not pending.any():
            return t
        t = torch.where(pending, t / 2, t)
    return torch.where(pending, torch.zeros_like(t), t)


def minimise(value_and_grad: Callable[[Tensor], tuple[Tensor, Tensor]], x: Tensor, *,
             iterations: int, history: int = 20, tolerance: float = 1e-9,
             on_step: Optional[Callable[[int], None]] = None) -> tuple[Tensor, Tensor]:
    """Minimise T independent functions from the rows of ``x`` (T, P).

    Args:
        value_and_grad: x (T, P) -> (f (T,), ∂f/∂x (T, P)); row t of f depends on row t of x only.
            Non-finite values count as +inf (a step into them is rejected).
        iterations: the most quasi-Newton steps.
        tolerance: a row stops once its gradient's largest entry is below this, or once its steps
            lower f by no more than rounding (``RESOLUTION``; near a minimum, where float64 cannot
            resolve further progress).
    Returns:
        (x, gradient) at the end; a row whose start is not finite stays where it is.
    """
    if x.dim() != 2:
        raise ValueError(f"x must have shape (T, P), got {tuple(x.shape)}")
    value = lambda z: value_and_grad(z)[0].detach()  # noqa: E731
    f, g = value_and_grad(x)
    pairs: list = []
    stalled = torch.zeros_like(f, dtype=torch.bool)
    for step in range(iterations):
        active = torch.isfinite(f) & torch.isfinite(g).all(-1) & (g.abs().amax(-1) > tolerance) & ~stalled
        if not active.any():
            break
        d = _direction(g, pairs)
        d = torch.where((_dot(g, d) < 0)[:, None], d, -g)             # fall back to steepest descent
        t = _line_search(value, x, f, g, d, active)
        stalled = stalled | (active & (t == 0))
        x_new = torch.where((t > 0)[:, None], x + t[:, None] * d, x)          # 0·NaN stays out
        f_new, g_new = value_and_grad(x_new)
        # a decrease at the objective's rounding level: as far as float64 can tell, a minimum
        stalled = stalled | (active & (f - f_new <= RESOLUTION * f.abs().clamp_min(1.0)))
        s, y = x_new - x, g_new - g
        sy = _dot(s, y)
        rho = torch.where(sy > 1e-12 * _dot(s, s).sqrt() * _dot(y, y).sqrt(), 1 / sy, torch.zeros_like(sy))
        pairs = (pairs + [(s, y, torch.nan_to_num(rho))])[-history:]
        x, f, g = x_new, f_new, g_new
        if on_step is not None:
            on_step(step + 1)
    return x, g
