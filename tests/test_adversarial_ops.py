"""Attacks on the operators (issue: never a silent wrong number), each reproduced here.

- Ill-conditioned float32: J of rank 4 with d = 8 and β = 1e-4, 1e-5. Before, ``logdet_gram``
  was off by 2 % (torch) and ``optimal_posterior_covariance`` by 111 % (torch) / 34 % (cpp), the
  Triton Σ* NaN, all without an error. Now every backend returns a value within 1e-2 of the
  float64 answer or raises a ValueError that names the condition and suggests float64. The
  error estimate behind the check is docs/maths.md#numerical-error-and-tolerances.
- Overflow: float32 J with entries 1e20. Before, ``hadamard_bound`` / ``column_estimate`` returned
  inf, ``orthogonality_penalty`` and Σ* NaN. Now each raises a clear error (checks on); where only
  ‖J e_i‖²/β overflows (not ‖J e_i‖²), the column estimators return the right finite value.
- NaN input with checks off on the cpp backend: NaN out, never "J is too large".
"""
import math

import pytest
import torch

import fastjac
from fastjac.ops import _dispatch
from utils import assert_close

TOLERANCE = 1e-2  # the operators' promise: within 1e-2 (relative) of float64, or an error
BACKENDS = ("torch", "cpp", "triton")


def _backend(name):
    reason = _dispatch.availability()[name] or _dispatch.implementation("logdet_gram", name).supports(
        device_type="cpu", dtype=torch.float32, B=4, D=64, d=8)
    return pytest.param(name, marks=[pytest.mark.skip(reason=reason)] if reason else [], id=name)


def low_rank_J(B=4, D=64, d=8, rank=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, D, rank, generator=g, dtype=torch.float64)
            @ torch.randn(B, rank, d, generator=g, dtype=torch.float64)).float()


def relative_error(out, ref):
    """‖out − ref‖_F / ‖ref‖_F per sample, the worst sample (inf for a non-finite out)."""
    if not torch.isfinite(out).all():
        return math.inf
    diff = (out.double() - ref).reshape(ref.shape[0], -1).norm(dim=-1)
    return float((diff / ref.reshape(ref.shape[0], -1).norm(dim=-1)).max())


OPERATORS = {"logdet_gram": fastjac.logdet_gram, "covariance": fastjac.optimal_posterior_covariance}


def accurate_or_refused(op, J, beta, backend):
    """Run ``op`` with checks on: a ValueError naming the condition, or a value within TOLERANCE.
    Returns (error of the unchecked value, whether the checked call refused)."""
    fn = OPERATORS[op]
    ref = fn(J.double(), beta, backend="torch")
    with fastjac.checks(False):
        unchecked = relative_error(fn(J, beta, backend=backend), ref)
    try:
        out = fn(J, beta, backend=backend)
    except ValueError as error:
        assert "ill-conditioned" in str(error) and "float64" in str(error), str(error)
        return unchecked, True
    assert relative_error(out, ref) <= TOLERANCE, f"{op} {backend} β={beta}: returned a wrong number"
    return unchecked, False


@pytest.mark.parametrize("beta", [1e-4, 1e-5])
@pytest.mark.parametrize("op", sorted(OPERATORS))
@pytest.mark.parametrize("backend", [_backend(b) for b in BACKENDS])
def test_ill_conditioned_float32_is_accurate_or_refused(backend, op, beta):
    unchecked, refused = accurate_or_refused(op, low_rank_J(), beta, backend)
    if unchecked > TOLERANCE:  # the attack bites here: the check must have fired
        assert refused


@pytest.mark.parametrize("backend", [_backend(b) for b in ("torch", "cpp")])
def test_conditioning_sweep_refuses_exactly_where_float32_fails(backend):
    """Over β from well- to ill-conditioned: every answer returned is within 1e-2; the easy end is
    not refused (no false alarm), the hard end is."""
    J = low_rank_J(B=2, D=64, d=8, rank=4, seed=3)
    refusals = {op: [accurate_or_refused(op, J, 10.0 ** -e, backend)[1] for e in range(0, 7)] for op in OPERATORS}
    for op, refused in refusals.items():
        assert not refused[0], f"{op}: a well-conditioned M was refused"
        assert refused[-1], f"{op}: β = 1e-6 on a rank-4 J was not refused"


def test_realistic_float32_problems_are_not_refused():
    """Full-rank decoder-sized Jacobians at the βs used in training: no false alarms."""
    g = torch.Generator().manual_seed(1)
    for D, d, beta, scale in ((784, 16, 0.5, 1.0), (784, 16, 0.01, 0.1), (3072, 32, 0.1, 0.3)):
        J = scale * torch.randn(2, D, d, generator=g)
        assert_close("logdet", fastjac.logdet_gram(J.double(), beta), fastjac.logdet_gram(J, beta).double(), rtol=1e-4)
        sigma = fastjac.optimal_posterior_covariance(J, beta)
        assert relative_error(sigma, fastjac.optimal_posterior_covariance(J.double(), beta)) <= TOLERANCE


OVERFLOWING = {
    "hadamard_bound": lambda J: fastjac.hadamard_bound(J, 0.5),
    "column_estimate": lambda J: fastjac.column_estimate(J, 0.5, probabilities=0.5),
    "orthogonality_penalty": lambda J: fastjac.orthogonality_penalty(J, block_size=1),
    "optimal_posterior_covariance": lambda J: fastjac.optimal_posterior_covariance(J, 0.5),
    "logdet_gram": lambda J: fastjac.logdet_gram(J, 0.5),
}


@pytest.mark.parametrize("name", sorted(OVERFLOWING))
def test_overflowing_float32_J_raises_a_clear_error(name):
    g = torch.Generator().manual_seed(0)
    J = 1e20 * torch.randn(2, 16, 3, generator=g)
    assert torch.isfinite(OVERFLOWING[name](J.double())).all()  # the float64 answer exists
    with pytest.raises(ValueError, match=r"(overflow|ill-conditioned).*float64"):
        OVERFLOWING[name](J)


@pytest.mark.parametrize("name", ["hadamard_bound", "column_estimate"])
def test_column_estimators_survive_a_ratio_that_overflows(name):
    """‖J e_i‖² ≈ 5e31 fits float32, ‖J e_i‖²/β ≈ 5e41 does not: log1p(n/β) = log n − log β."""
    g = torch.Generator().manual_seed(0)
    J = (1e15 * torch.randn(2, 50, 3, generator=g)).requires_grad_()
    fn = {"hadamard_bound": lambda J: fastjac.hadamard_bound(J, 1e-10),
          "column_estimate": lambda J: fastjac.column_estimate(J, 1e-10, probabilities=0.5)}[name]
    out = fn(J)
    ref = fn(J.detach().double())
    assert_close(name, ref, out.double(), rtol=1e-6)
    (grad,) = torch.autograd.grad(out.sum(), J)
    J64 = J.detach().double().requires_grad_()
    (ref_grad,) = torch.autograd.grad(fn(J64).sum(), J64)
    assert_close(f"{name} grad", ref_grad, grad.double(), rtol=1e-5)


@pytest.mark.skipif(_dispatch.availability()["cpp"] is not None, reason="the cpp extension is not built")
def test_cpp_with_checks_off_does_not_blame_size_for_nan_input():
    J = torch.randn(2, 10, 3)
    J[1, 4, 2] = float("nan")
    with fastjac.checks(False):
        out = fastjac.logdet_gram(J, 0.5, backend="cpp")  # no "J is too large" error
    assert torch.isfinite(out[0]) and torch.isnan(out[1])
    with pytest.raises(ValueError, match="non-finite"):
        fastjac.logdet_gram(J, 0.5, backend="cpp")
