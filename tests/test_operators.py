"""Reference operators (docs/maths.md#operators) against brute force, their gradients, and the
inequalities and identities (hypothesis, through every backend that runs here)."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import fastjac
from fastjac.ops import _dispatch
from fastjac.ops.logdet_gram import reference as logdet_reference
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
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


# Property tests, run through every backend that can run here (a missing one is a SKIP).
# Tolerances (docs/maths.md#numerical-error-and-tolerances): the rounding error of log det is
# about ε ‖M⁻¹ ⊙ s sᵀ‖_F with ε = u (√D + d + 1), s_i² = 1 + ‖J e_i‖²/β. The strategies bound
# D <= 12, d <= 8 and ‖J e_i‖²/β <= 12 · e³ / e⁻³ (float64) or 12 · e / e⁻¹ (float32), so the
# error is below 1e-11 (1 + R) in float64 (u = 1.1e-16) and 1e-4 (1 + R) in float32 (u = 6e-8,
# the Triton kernels): the tolerances below, with room for the independent-sign assumption.
PROPERTY_TOL = {torch.float64: 1e-9, torch.float32: 1e-4}


def _property_backend(name):
    reason = _dispatch.availability()[name] or _dispatch.implementation("logdet_gram", name).supports(
        device_type="cpu", dtype=torch.float32, B=2, D=12, d=8)
    return pytest.param(name, marks=[pytest.mark.skip(reason=reason)] if reason else [], id=name)


PROPERTY_BACKENDS = [_property_backend(b) for b in ("torch", "cpp", "triton")]


def _property_dtype(backend):
    return torch.float32 if backend == "triton" else torch.float64


def _bounds(J, beta, block, backend):
    exact = fastjac.logdet_gram(J, beta, backend=backend)
    fischer = fastjac.fischer_bound(J, beta, block_size=block, backend=backend)
    had = fastjac.hadamard_bound(J, beta, backend="triton" if backend == "triton" else "torch")
    return exact, fischer, had


dims = st.tuples(st.integers(1, 3), st.integers(1, 12), st.integers(1, 8))


@pytest.mark.parametrize("backend", PROPERTY_BACKENDS)
@settings(max_examples=50, deadline=None)
@given(dims=dims, log_beta=st.floats(-3, 3), log_scale=st.floats(-2, 1.5), seed=st.integers(0, 2 ** 16),
       block=st.integers(1, 8))
def test_inequalities_and_gradients(backend, dims, log_beta, log_scale, seed, block):
    """0 <= R_exact <= R_fischer(b) <= R_had, b >= d is exact, b = 1 is Hadamard
    (docs/maths.md#bounds-and-identities); the gradients (J, β) equal autograd through slogdet."""
    dtype = _property_dtype(backend)
    if dtype == torch.float32:
        log_beta, log_scale = max(-1.0, min(log_beta, 2.0)), min(log_scale, 0.5)
    B, D, d = dims
    J = random_J(B, D, d, seed, scale=math.exp(log_scale)).to(dtype).requires_grad_()
    beta = torch.tensor(math.exp(log_beta), dtype=dtype, requires_grad=True)
    exact, fischer, had = _bounds(J, beta, block, backend)
    tol = PROPERTY_TOL[dtype] * (1 + had.detach().abs())
    assert (exact >= -tol).all()
    assert (exact <= fischer + tol).all() and (fischer <= had + tol).all()
    assert_close("b=1 is Hadamard", had, fastjac.fischer_bound(J, beta, block_size=1, backend=backend),
                 rtol=PROPERTY_TOL[dtype], atol=PROPERTY_TOL[dtype])
    assert_close("b=d is exact", exact, fastjac.fischer_bound(J, beta, block_size=d, backend=backend),
                 rtol=PROPERTY_TOL[dtype], atol=PROPERTY_TOL[dtype])
    J64, beta64 = J.detach().double().requires_grad_(), beta.detach().double().requires_grad_()
    weights = torch.linspace(0.5, 1.5, B, dtype=torch.float64)
    for name, ours, ref in (("exact", exact, brute_logdet(J64, beta64)),
                            ("fischer", fischer, brute_fischer(J64, beta64, block))):
        got = torch.autograd.grad((ours * weights.to(dtype)).sum(), (J, beta), retain_graph=True)
        want = torch.autograd.grad((ref * weights).sum(), (J64, beta64))
        for what, g, r in zip(("dJ", "dbeta"), got, want):
            assert_close(f"{name} {what}", r, g.double(), rtol=10 * PROPERTY_TOL[dtype], atol=PROPERTY_TOL[dtype])


@pytest.mark.parametrize("backend", PROPERTY_BACKENDS)
@settings(max_examples=50, deadline=None)
@given(d=st.integers(1, 6), extra=st.integers(0, 10), seed=st.integers(0, 2 ** 16), log_beta=st.floats(-1, 2))
def test_identities_and_their_gradients(backend, d, extra, seed, log_beta):
    """Orthogonal columns: R_exact = R_had, with equal gradients (M is diagonal, so Γ is the
    same diagonal); rotation: R(JQ) = R(J) and ∇R(J) = ∇R(JQ) Qᵀ (docs/maths.md#bounds-and-identities)."""
    dtype = _property_dtype(backend)
    tol = PROPERTY_TOL[dtype]
    g = torch.Generator().manual_seed(seed)
    D, beta = d + extra, torch.tensor(math.exp(log_beta), dtype=dtype, requires_grad=True)
    Q, _ = torch.linalg.qr(torch.randn(2, D, D, generator=g, dtype=torch.float64))
    J_orth = (Q[..., :d] * torch.rand(2, 1, d, generator=g, dtype=torch.float64) * 3).to(dtype).requires_grad_()
    exact = fastjac.logdet_gram(J_orth, beta, backend=backend)
    had = fastjac.hadamard_bound(J_orth, beta, backend="triton" if backend == "triton" else "torch")
    assert_close("orthogonal columns", had, exact, rtol=tol, atol=tol)
    for name, a, b in zip(("dJ", "dbeta"), torch.autograd.grad(exact.sum(), (J_orth, beta)),
                          torch.autograd.grad(had.sum(), (J_orth, beta))):
        assert_close(f"orthogonal columns {name}", b, a, rtol=10 * tol, atol=tol)
    if d >= 2:
        assert fastjac.orthogonality_penalty(J_orth.detach(), backend="triton" if backend == "triton"
                                             else "torch").abs().max() < tol
    J = torch.randn(2, D, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    R, _ = torch.linalg.qr(torch.randn(2, d, d, generator=g, dtype=torch.float64))
    JR = (J.detach() @ R.to(dtype)).requires_grad_()
    value, rotated = fastjac.logdet_gram(J, beta, backend=backend), fastjac.logdet_gram(JR, beta, backend=backend)
    assert_close("rotation invariance", value, rotated, rtol=tol, atol=tol)
    (grad,), (grad_rotated,) = torch.autograd.grad(value.sum(), J), torch.autograd.grad(rotated.sum(), JR)
    assert_close("rotation gradient", grad, grad_rotated @ R.to(dtype).mT, rtol=10 * tol, atol=tol)


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


# ---- J is read once: the float32 error check reads diag M, not J ----------------------------
def _cpu_backend(name):
    """A logdet_gram backend that runs on CPU float32 here (triton: under the interpreter), or a skip."""
    reason = _dispatch.availability()[name] or _dispatch.implementation("logdet_gram", name).supports(
        device_type="cpu", dtype=torch.float32, B=3, D=40, d=70)
    return pytest.param(name, marks=[pytest.mark.skip(reason=reason)] if reason else [], id=name)


CPU_BACKENDS = [_cpu_backend(b) for b in ("torch", "cpp", "triton")]
FACTORISED = {
    "logdet_gram": lambda J, w, backend: fastjac.logdet_gram(J, 0.5, weights=w, backend=backend),
    "fischer_bound": lambda J, w, backend: fastjac.fischer_bound(J, 0.5, block_size=2, weights=w, backend=backend),
    "optimal_posterior_covariance": lambda J, w, backend: fastjac.optimal_posterior_covariance(
        J, 0.5, weights=w, backend=backend),
}


class ReadsOf(TorchDispatchMode):
    """The torch ops that read a tensor's storage, in order (views read nothing and are left out).
    A custom op is one entry: ``fastjac::logdet_gram`` is the backend's factorisation."""

    def __init__(self, tensor):
        super().__init__()
        self.storage, self.ops = tensor.untyped_storage().data_ptr(), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        leaves = pytree.tree_leaves((args, kwargs))
        if not func.is_view and any(isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() == self.storage
                                    for t in leaves):
            self.ops.append(str(func.overloadpacket._qualified_op_name).replace("::", "."))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("op", sorted(FACTORISED))
def test_float32_error_check_reads_no_J(op, backend, weighted):
    """With value checks on, a float32 log det / Fischer bound / Σ* reads J in two places only:
    the finite check (one sum) and the factorisation, which returns diag M for the float32
    error estimate (docs/maths.md#numerical-error-and-tolerances); before, the estimate read J a
    third time (the column norms). With checks off only the factorisation reads it."""
    J, w = random_J(3, 40, 6, seed=4).float(), random_w(3, 40).float() if weighted else None
    with ReadsOf(J) as reads:
        FACTORISED[op](J, w, backend)
    assert reads.ops == ["aten.sum", "fastjac.logdet_gram"], reads.ops
    with fastjac.checks(False), ReadsOf(J) as reads:
        FACTORISED[op](J, w, backend)
    assert reads.ops == ["fastjac.logdet_gram"], reads.ops


def test_torch_factorisation_reads_J_once():
    """Inside the op, the torch backend reads J in one product (the Gram), and diag M comes from it."""
    J = random_J(3, 40, 6, seed=5).float()
    with ReadsOf(J) as reads:
        logdet_reference.forward(J, None, torch.tensor(0.5), 6)
    assert reads.ops == ["aten.bmm"], reads.ops


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("d,block_size", [(1, 1), (7, 3), (16, 16), (40, 40), (70, 70)])
def test_factorisation_returns_diag_M(backend, d, block_size):
    """The third output of fastjac::logdet_gram is diag M = 1 + ‖J_w e_i‖²/β (the error estimate
    trusts it), in every backend: register and blocked Triton solvers, Fischer blocks."""
    J, w = random_J(2, 30, d, seed=d, scale=0.3).float(), random_w(2, 30).float()
    J.requires_grad_()
    logdet, m_inv, m_diag = torch.ops.fastjac.logdet_gram(J, w, torch.tensor(0.7), block_size, backend)
    want = 1 + (w.double().unsqueeze(-1) * J.detach().double() ** 2).sum(1) / 0.7
    assert m_diag.shape == (2, d) and m_diag.dtype == torch.float32
    assert_close("diag M", want, m_diag, rtol=1e-5)
    assert logdet.requires_grad and not m_diag.requires_grad  # for the check only: not differentiable
