"""Reference operators (SPEC §3) against brute force, their gradients, and the inequalities."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import fastjac
from fastjac.ops import _dispatch
from utils import assert_close

OPERATORS_WITH_BETA = ("logdet_gram", "fischer_bound", "hadamard_bound")


def random_J(B, D, d, seed=0, dtype=torch.float64, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(B, D, d, generator=g, dtype=dtype)


def random_w(B, D, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, D, generator=g, dtype=dtype) * 2 + 0.05


def brute_M(J, beta, w=None, block_size=None):
    Jw = J if w is None else J * w.sqrt().unsqueeze(-1)
    G = Jw.mT @ Jw
    d = J.shape[-1]
    if block_size is not None:
        ids = torch.arange(d) // block_size
        G = G * (ids[:, None] == ids[None, :])
    return torch.eye(d, dtype=J.dtype) + G / beta


def brute_logdet(J, beta, w=None, block_size=None):
    sign, logabs = torch.linalg.slogdet(brute_M(J, beta, w, block_size))
    assert (sign > 0).all()
    return logabs


def brute_fischer(J, beta, b, w=None):
    """Σ over explicit column blocks of log det M_bb (independent of the masking trick)."""
    d = J.shape[-1]
    return sum(brute_logdet(J[..., s:s + b], beta, w) for s in range(0, d, b))


def brute_hadamard(J, beta, w=None):
    Jw = J if w is None else J * w.sqrt().unsqueeze(-1)
    return torch.log1p((Jw ** 2).sum(1) / beta).sum(-1)


def brute_orthogonality(J, block_size, w=None, eps=1e-8):
    Jw = J if w is None else J * w.sqrt().unsqueeze(-1)
    B, _, k = J.shape
    vals, count = torch.zeros(B, dtype=J.dtype), 0
    for i in range(k):
        for j in range(i + 1, k):
            if i // block_size != j // block_size:
                a, b = Jw[..., i], Jw[..., j]
                cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1) + eps)
                vals, count = vals + cos ** 2, count + 1
    return vals / count


@pytest.mark.parametrize("B,D,d", [(1, 1, 1), (1, 5, 3), (3, 17, 7), (2, 40, 16), (2, 130, 33)])
@pytest.mark.parametrize("weighted", [False, True])
def test_values_match_brute_force(B, D, d, weighted):
    J = random_J(B, D, d)
    w = random_w(B, D) if weighted else None
    beta = 0.37
    assert_close("logdet_gram", brute_logdet(J, beta, w), fastjac.logdet_gram(J, beta, weights=w))
    for b in (1, 2, 3):
        assert_close(f"fischer b={b}", brute_fischer(J, beta, b, w),
                     fastjac.fischer_bound(J, beta, block_size=b, weights=w))
    assert_close("hadamard", brute_hadamard(J, beta, w), fastjac.hadamard_bound(J, beta, weights=w))
    assert_close("posterior covariance", torch.linalg.inv(brute_M(J, beta, w)),
                 fastjac.optimal_posterior_covariance(J, beta, weights=w))
    if d >= 2:
        for b in (1, 2):
            if d > b:
                assert_close(f"orthogonality b={b}", brute_orthogonality(J, b, w),
                             fastjac.orthogonality_penalty(J, block_size=b, weights=w))


def test_scalar_weight_equals_rescaled_beta_and_full_weight():
    J = random_J(2, 11, 4)
    full = torch.full((2, 11), 2.5, dtype=torch.float64)
    for op in (fastjac.logdet_gram, fastjac.hadamard_bound):
        assert_close(op.__name__, op(J, 0.8, weights=full), op(J, 0.8, weights=2.5))
        assert_close(op.__name__, op(J, 0.8 / 2.5), op(J, 0.8, weights=torch.tensor(2.5, dtype=torch.float64)))


def test_column_estimate_all_columns_is_hadamard():
    J = random_J(3, 9, 5)
    assert_close("column_estimate", fastjac.hadamard_bound(J, 0.5),
                 fastjac.column_estimate(J, 0.5, probabilities=1 / 5))
    p = torch.tensor([0.1, 0.2, 0.3, 0.25, 0.15], dtype=torch.float64)
    expected = (torch.log1p((J ** 2).sum(1) / 0.5) / p).mean(-1)
    assert_close("column_estimate p", expected, fastjac.column_estimate(J, 0.5, probabilities=p))


def _gradcheck_inputs(B=2, D=6, d=4, seed=3):
    J = random_J(B, D, d, seed).requires_grad_()
    w = random_w(B, D, seed + 1).requires_grad_()
    beta = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    return J, w, beta


GRAD_CASES = {
    "logdet_gram": lambda J, w, b: fastjac.logdet_gram(J, b, weights=w),
    "fischer_bound_2": lambda J, w, b: fastjac.fischer_bound(J, b, block_size=2, weights=w),
    "fischer_bound_3": lambda J, w, b: fastjac.fischer_bound(J, b, block_size=3, weights=w),
    "hadamard_bound": lambda J, w, b: fastjac.hadamard_bound(J, b, weights=w),
    "column_estimate": lambda J, w, b: fastjac.column_estimate(
        J, b, probabilities=torch.arange(1.0, J.shape[-1] + 1, dtype=torch.float64) / 10, weights=w),
    "orthogonality_1": lambda J, w, b: fastjac.orthogonality_penalty(J, weights=w) * b,
    "orthogonality_2": lambda J, w, b: fastjac.orthogonality_penalty(J, block_size=2, weights=w) * b,
    "posterior_covariance": lambda J, w, b: fastjac.optimal_posterior_covariance(J, b, weights=w),
    "scalar_weight": lambda J, w, b: fastjac.logdet_gram(J, b, weights=w[0, 0]),
}


@pytest.mark.parametrize("case", list(GRAD_CASES))
def test_gradcheck(case):
    assert torch.autograd.gradcheck(GRAD_CASES[case], _gradcheck_inputs())


@pytest.mark.parametrize("case", list(GRAD_CASES))
def test_gradgradcheck(case):
    assert torch.autograd.gradgradcheck(GRAD_CASES[case], _gradcheck_inputs(B=1, D=4, d=3))


def test_logdet_backward_matches_autograd_through_slogdet():
    J, w, beta = _gradcheck_inputs(B=3, D=20, d=6)
    ours = torch.autograd.grad(fastjac.logdet_gram(J, beta, weights=w).sum(), (J, w, beta))
    ref = torch.autograd.grad(brute_logdet(J, beta, w).sum(), (J, w, beta))
    for name, a, b in zip(("J", "w", "beta"), ours, ref):
        assert_close(f"d/d{name}", b, a)


def test_logdet_forward_uses_one_factorisation_and_no_autograd_through_cholesky():
    """The backward comes from the registered formula: the graph holds our op, not linalg_cholesky."""
    J, w, beta = _gradcheck_inputs()
    out = fastjac.logdet_gram(J, beta, weights=w)
    names, stack, seen = [], [out.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.append(type(fn).__name__)
        stack.extend(f for f, _ in fn.next_functions)
    assert not any("Cholesky" in n or "Linalg" in n for n in names), names


def test_float32_and_half_inputs_accumulate_in_float32():
    J64 = random_J(2, 300, 8, scale=0.3)
    ref = fastjac.logdet_gram(J64, 0.5)
    out32 = fastjac.logdet_gram(J64.float(), 0.5)
    assert out32.dtype == torch.float32
    assert_close("float32", ref, out32.double(), rtol=1e-5)
    for dtype, rtol in ((torch.bfloat16, 3e-2), (torch.float16, 5e-3)):
        J = J64.to(dtype).requires_grad_()
        out = fastjac.logdet_gram(J, 0.5)
        assert out.dtype == torch.float32
        assert_close(str(dtype), brute_logdet(J.detach().double(), 0.5), out.double(), rtol=rtol)
        (g,) = torch.autograd.grad(out.sum(), J)
        assert g.dtype == dtype and torch.isfinite(g).all()


def test_inputs_are_not_modified():
    J, w, beta = (t.detach() for t in _gradcheck_inputs())
    before = (J.clone(), w.clone())
    for fn in GRAD_CASES.values():
        fn(J, w, beta)
    assert torch.equal(J, before[0]) and torch.equal(w, before[1])


def test_non_contiguous_J():
    J = random_J(2, 8, 10)[..., ::2]  # (2, 8, 5) with stride 2 in the last dim
    assert not J.is_contiguous()
    assert_close("non-contiguous", brute_logdet(J.contiguous(), 0.9), fastjac.logdet_gram(J, 0.9))


dims = st.tuples(st.integers(1, 3), st.integers(1, 12), st.integers(1, 8))


@settings(max_examples=40, deadline=None)
@given(dims=dims, log_beta=st.floats(-3, 3), log_scale=st.floats(-2, 1.5), seed=st.integers(0, 2 ** 16),
       block=st.integers(1, 8))
def test_inequalities(dims, log_beta, log_scale, seed, block):
    """0 <= R_exact <= R_fischer(b) <= R_had, and b >= d is exact, b = 1 is Hadamard (SPEC §3)."""
    B, D, d = dims
    J = random_J(B, D, d, seed, scale=math.exp(log_scale))
    beta = math.exp(log_beta)
    exact = fastjac.logdet_gram(J, beta)
    fischer = fastjac.fischer_bound(J, beta, block_size=block)
    had = fastjac.hadamard_bound(J, beta)
    tol = 1e-9 * (1 + had.abs())
    assert (exact >= -tol).all()
    assert (exact <= fischer + tol).all() and (fischer <= had + tol).all()
    assert_close("b=1 is Hadamard", had, fastjac.fischer_bound(J, beta, block_size=1), rtol=1e-9, atol=1e-12)
    assert_close("b=d is exact", exact, fastjac.fischer_bound(J, beta, block_size=d), rtol=1e-9, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(d=st.integers(1, 6), extra=st.integers(0, 10), seed=st.integers(0, 2 ** 16), log_beta=st.floats(-2, 2))
def test_identities(d, extra, seed, log_beta):
    """R_exact = R_had for orthogonal columns; R_exact is invariant under J -> JQ."""
    g = torch.Generator().manual_seed(seed)
    D, beta = d + extra, math.exp(log_beta)
    Q, _ = torch.linalg.qr(torch.randn(2, D, D, generator=g, dtype=torch.float64))
    norms = torch.rand(2, 1, d, generator=g, dtype=torch.float64) * 3
    J_orth = Q[..., :d] * norms
    assert_close("orthogonal columns", fastjac.logdet_gram(J_orth, beta), fastjac.hadamard_bound(J_orth, beta),
                 rtol=1e-9, atol=1e-12)
    J = torch.randn(2, D, d, generator=g, dtype=torch.float64)
    R, _ = torch.linalg.qr(torch.randn(2, d, d, generator=g, dtype=torch.float64))
    assert_close("rotation invariance", fastjac.logdet_gram(J, beta), fastjac.logdet_gram(J @ R, beta),
                 rtol=1e-9, atol=1e-12)
    if d >= 2:
        assert fastjac.orthogonality_penalty(J_orth).abs().max() < 1e-12


def test_torch_backend_can_be_forced_and_unknown_backend_is_refused():
    J = random_J(1, 4, 2)
    assert torch.equal(fastjac.logdet_gram(J, 1.0, backend="torch"), fastjac.logdet_gram(J, 1.0))
    with pytest.raises(ValueError, match="backend"):
        fastjac.logdet_gram(J, 1.0, backend="fortran")
    missing = [b for b, why in _dispatch.availability().items() if why is not None]
    for b in missing:
        with pytest.raises(RuntimeError, match=b):
            fastjac.logdet_gram(J, 1.0, backend=b)


def test_ill_conditioned_float32_raises_instead_of_nan():
    J = torch.full((1, 4, 3), 1e20)
    J[0, :, 1] *= 1.0000001
    with pytest.raises(ValueError, match="ill-conditioned for torch.float32.*float64"):
        fastjac.logdet_gram(J, 1e-6)


def test_operators_accumulate_in_float32_under_autocast():
    """Custom ops see the caller's autocast; the Gram must not be cast down to bf16 by it."""
    J = random_J(2, 500, 6, scale=0.2).float()
    ref = fastjac.logdet_gram(J.double(), 0.3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fastjac.logdet_gram(J, 0.3)
        ortho = fastjac.orthogonality_penalty(J)
    assert out.dtype == torch.float32 and ortho.dtype == torch.float32
    assert_close("autocast logdet", ref, out.double(), rtol=1e-5)
    assert_close("autocast orthogonality", fastjac.orthogonality_penalty(J.double()), ortho.double(), rtol=1e-4)
