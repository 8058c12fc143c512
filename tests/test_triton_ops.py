"""Triton kernels against the float64 reference: forward and every gradient, awkward shapes,
both logdet schedules (register and blocked solvers), poisoned outputs, non-contiguous J, dtypes
and errors; the tensor-core products, launch counts, device guard, deterministic mode and int64
offsets.

Without a GPU these run on the CPU through TRITON_INTERPRET=1 (set in conftest.py before
triton is imported); with one, natively on it.

Tolerances: the kernels multiply the input's own values to float32 accuracy (16-bit values
exactly; float32 by 3xTF32, 2⁻²² relative) and sum in fp32, and the reference here is computed
in float64 from the *same rounded* inputs, so forward values of float32, float16 and bfloat16
inputs all meet float32's RTOL (1e-4) — or, for the random shapes, the float32 error estimate of
docs/maths.md#numerical-error-and-tolerances when that is larger. Gradients with respect to
J and w leave in the input's dtype, so they meet that dtype's RTOL (its rounding of the result).
"""
import contextlib
import inspect
import re

import pytest
import torch
from hypothesis import given, settings, strategies as st

pytest.importorskip("triton")

import fastjac  # noqa: E402
from fastjac.ops import _dispatch  # noqa: E402
from utils import RTOL, assert_close  # noqa: E402

if _dispatch.availability()["triton"] is not None:
    pytest.skip(f"triton backend unavailable: {_dispatch.availability()['triton']}", allow_module_level=True)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes  # noqa: E402

from fastjac.ops import _triton  # noqa: E402
from fastjac.ops.column_estimate import triton as column_triton  # noqa: E402
from fastjac.ops.logdet_gram import reference as logdet_reference  # noqa: E402
from fastjac.ops.logdet_gram import triton as logdet_triton  # noqa: E402
from fastjac.ops.orthogonality import triton as orthogonality_triton  # noqa: E402
from fastjac.ops.tangent_linear import triton as tangent_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not _triton.INTERPRETED:
    pytest.skip("no GPU and TRITON_INTERPRET is not set", allow_module_level=True)

D = 300  # not a multiple of the row step; with B = 1 the Gram kernel splits D (atomic adds)
DEFAULT_TILE_ELEMENTS = _triton.TILE_ELEMENTS


@pytest.fixture(autouse=True)
def small_steps(monkeypatch):
    """32-row steps (the GPU default takes up to 256), so D = 300 spans several steps and,
    for B = 1 under the interpreter, several programs adding atomically."""
    monkeypatch.setattr(_triton, "TILE_ELEMENTS", 512)


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    """Every float buffer the launchers allocate starts as NaN, so unwritten elements show."""
    empty, empty_like = torch.empty, torch.empty_like

    def fill(t):
        if t.is_floating_point():
            with _disable_current_modes():  # the launch counts below do not see the poison
                t.fill_(float("nan"))
        return t
    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(empty_like(*a, **k)))


@pytest.fixture
def schedule(request, monkeypatch):
    """Force one logdet schedule (fused, split) instead of the size heuristic."""
    plan = logdet_triton.solver_plan
    monkeypatch.setattr(logdet_triton, "solver_plan",
                        lambda B, D, d, dtype, weighted, device, _=None: plan(B, D, d, dtype, weighted, device,
                                                                               request.param))
    return request.param


def inputs(B, D, k, *, weighted, seed=0, layout="contiguous"):
    """J (B, D, k) in float64, with the memory layout jacobian_columns returns when asked
    ("permuted": a (k, B, D) buffer seen as (B, D, k); "sliced": every other column)."""
    g = torch.Generator().manual_seed(seed)
    if layout == "permuted":
        J = torch.randn(k, B, D, generator=g, dtype=torch.float64).permute(1, 2, 0)
    elif layout == "sliced":
        J = torch.randn(B, D, 2 * k, generator=g, dtype=torch.float64)[..., ::2]
    else:
        J = torch.randn(B, D, k, generator=g, dtype=torch.float64)
    J = J / D ** 0.5 * 3  # column norms ~ 3, so M is well away from I and from singular
    w = torch.rand(B, D, generator=g, dtype=torch.float64) + 0.1 if weighted else None
    return J, w


def check(call, J, w=None, beta=0.7, dtype=torch.float32, grads=True, rtol=None, grad_rtol=None):
    """call(J, beta, w, backend) by triton (``dtype`` on DEVICE) against torch in float64 on
    the same rounded values: the output, then ∂/∂J, ∂/∂w, ∂/∂β of ⟨cotangent, output⟩.
    ``rtol`` replaces float32's tolerance (for ill-conditioned inputs), ``grad_rtol`` that of
    the float32 gradients (for products J M⁻¹ that cancel)."""
    tolerance = {**RTOL, **({torch.float32: rtol} if rtol else {})}
    grad_tolerance = {**tolerance, **({torch.float32: grad_rtol} if grad_rtol else {})}
    fast = [J.to(DEVICE, dtype), None if w is None else w.to(DEVICE, dtype),
            torch.tensor(beta, dtype=torch.float32, device=DEVICE)]
    ref = [None if t is None else t.detach().cpu().double() for t in fast]
    leaves = [t for t in fast + ref if t is not None]
    for t in leaves:
        t.requires_grad_(grads)
    out = call(fast[0], fast[2], fast[1], "triton")
    expected = call(ref[0], ref[2], ref[1], "torch")
    assert_close("forward", expected, out.cpu(), rtol=tolerance[torch.float32])
    if not grads:
        return
    cotangent = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    have = [t for t in fast if t is not None]
    want = [t for t in ref if t is not None]
    got = torch.autograd.grad((out * cotangent.to(out.device, out.dtype)).sum(), have, allow_unused=True)
    exp = torch.autograd.grad((expected * cotangent).sum(), want, allow_unused=True)
    for name, e, g, leaf in zip(("dJ", "dw", "dbeta") if w is not None else ("dJ", "dbeta"), exp, got, have):
        if e is None:  # β does not enter the orthogonality penalty
            assert g is None, f"{name}: triton returned a gradient the reference does not have"
            continue
        assert g.dtype == leaf.dtype, f"{name} returned in {g.dtype}, the input is {leaf.dtype}"
        assert_close(name, e, g.cpu(), rtol=grad_tolerance[leaf.dtype])


def logdet(J, beta, w, backend):
    return fastjac.logdet_gram(J, beta, weights=w, backend=backend)


def fischer(block_size):
    return lambda J, beta, w, backend: fastjac.fischer_bound(J, beta, block_size=block_size,
                                                             weights=w, backend=backend)


def covariance(J, beta, w, backend):
    return fastjac.optimal_posterior_covariance(J, beta, weights=w, backend=backend)


def hadamard(J, beta, w, backend):
    return fastjac.hadamard_bound(J, beta, weights=w, backend=backend)


def sampled(probabilities):
    return lambda J, beta, w, backend: fastjac.column_estimate(
        J, beta, probabilities=probabilities.to(J.device), weights=w, backend=backend)


def orthogonality(block_size):
    return lambda J, beta, w, backend: fastjac.orthogonality_penalty(J, block_size=block_size,
                                                                     weights=w, backend=backend)


@pytest.mark.parametrize("schedule", logdet_triton.PATHS, indirect=True)
@pytest.mark.parametrize("d", [1, 2, 3, 7, 16, 33])
def test_logdet_every_schedule(schedule, d):
    check(logdet, *inputs(1, D, d, weighted=True, seed=d))


@pytest.mark.parametrize("d", [1, 3, 16, 33, 64, 128, 256])
def test_logdet_default_schedule_unweighted(d, monkeypatch):
    monkeypatch.setattr(_triton, "TILE_ELEMENTS", DEFAULT_TILE_ELEMENTS)  # the launch sizes a GPU gets
    check(logdet, *inputs(2, 70, d, weighted=False, seed=d))


@pytest.mark.parametrize("schedule,d", [("fused", 64), ("split", 64), ("split", 65), ("split", 128),
                                        ("split", 130), ("split", 256)], indirect=["schedule"])
def test_logdet_large_d(schedule, d):
    """Register (d <= 64) and blocked (d > 64) solvers, gradients included, on small B and D."""
    check(logdet, *inputs(1, 40, d, weighted=True, seed=d))


def float32_tolerance(J, w, beta, block_size):
    """RTOL, or the float32 error estimate ε κ of docs/maths.md#numerical-error-and-tolerances
    (ε = u(√D + d + 1), κ = ‖M⁻¹ ⊙ s sᵀ‖_F) with a factor 4 of headroom, when larger: long,
    nearly parallel columns (D < d makes them parallel) cost float32 digits in any backend."""
    B, D, d = J.shape
    G = J.mT @ (J if w is None else J * w[..., None])
    mask = (torch.arange(d)[:, None] // block_size) == (torch.arange(d)[None, :] // block_size)
    M = torch.eye(d, dtype=J.dtype) + G * mask / beta
    s = M.diagonal(dim1=-2, dim2=-1).sqrt()
    kappa = torch.linalg.matrix_norm(torch.linalg.inv(M) * s[..., :, None] * s[..., None, :]).max().item()
    return max(RTOL[torch.float32], 4 * 2 ** -24 * (D ** 0.5 + d + 1) * kappa)


@settings(max_examples=50, deadline=None)
@given(B=st.integers(1, 2), D=st.integers(1, 48), d=st.integers(1, 72), block_size=st.integers(1, 72),
       weighted=st.booleans())
def test_fischer_random_shapes(B, D, d, block_size, weighted):
    """Forward and every gradient, register (d <= 64) and blocked solvers, any block size."""
    J, w = inputs(B, D, d, weighted=weighted, seed=B * D * d)
    rtol = float32_tolerance(J, w, 0.7, block_size)
    products = 2 * 2 ** -24 * (d + 1) * cancellation(J, w, 0.7, block_size)  # 2: headroom
    check(fischer(block_size), J, w, rtol=rtol, grad_rtol=max(rtol, products))


def cancellation(J, w, beta, block_size):
    """max |J| |Γ| / max |J Γ| (Γ = M⁻¹ of the block-masked M), at least 1: the rounding error
    of the products in ∂R/∂J = 2 W J Γ is <= u (d + 1) |J| |Γ| componentwise, so relative to the
    result's largest entry it is u (d + 1) times this factor. Few long columns (D << d) make J M⁻¹
    a difference of nearly equal terms: for D = 1, J M⁻¹ = j β / (β + ‖j‖²)."""
    d = J.shape[-1]
    G = J.mT @ (J if w is None else J * w[..., None])
    mask = (torch.arange(d)[:, None] // block_size) == (torch.arange(d)[None, :] // block_size)
    gamma = torch.linalg.inv(torch.eye(d, dtype=J.dtype) + G * mask / beta)
    return max(1.0, ((J.abs() @ gamma.abs()).amax() / (J @ gamma).abs().amax()).item())


def test_logdet_matches_slogdet():
    """Brute force: log det(I + JᵀWJ/β) by LU in float64, no Cholesky involved."""
    J, w = inputs(3, D, 9, weighted=True, seed=5)
    M = torch.eye(9, dtype=torch.float64) + J.mT @ (w.unsqueeze(-1) * J) / 0.3
    out = fastjac.logdet_gram(J.float().to(DEVICE), 0.3, weights=w.float().to(DEVICE), backend="triton")
    assert_close("logdet", torch.linalg.slogdet(M).logabsdet, out.cpu(), rtol=RTOL[torch.float32])


@pytest.mark.parametrize("schedule", logdet_triton.PATHS, indirect=True)
@pytest.mark.parametrize("d,block_size", [(7, 1), (7, 3), (16, 5), (33, 8)])
def test_fischer_blocks(schedule, d, block_size):
    check(fischer(block_size), *inputs(1, D, d, weighted=True, seed=block_size))


@pytest.mark.parametrize("d", [1, 7, 33])
def test_posterior_covariance(d):
    check(covariance, *inputs(2, D, d, weighted=d > 1, seed=d))


@pytest.mark.parametrize("k", [1, 7, 33, 130])
@pytest.mark.parametrize("weighted", [False, True])
def test_hadamard(k, weighted):
    check(hadamard, *inputs(1, D, k, weighted=weighted, seed=k))


@pytest.mark.parametrize("B,k", [(1, 1), (3, 2), (2, 5)])
def test_column_estimate(B, k):
    p = torch.rand(B, k, generator=torch.Generator().manual_seed(k), dtype=torch.float64) * 0.9 + 0.1
    check(sampled(p), *inputs(B, D, k, weighted=True, seed=k))


@pytest.mark.parametrize("k,block_size", [(2, 1), (7, 1), (7, 3), (33, 4)])
@pytest.mark.parametrize("weighted", [False, True])
def test_orthogonality(k, block_size, weighted):
    check(orthogonality(block_size), *inputs(2, D, k, weighted=weighted, seed=k))


def test_orthogonality_zero_column():
    """A zero column has n = 0: its cos² are 0 and its gradient must stay finite (the reference's ε)."""
    J, w = inputs(1, D, 4, weighted=True)
    J[..., 2] = 0
    check(orthogonality(1), J, w)


OPERATORS = {"logdet": logdet, "fischer": fischer(3), "covariance": covariance, "hadamard": hadamard,
             "orthogonality": orthogonality(2)}


@pytest.mark.parametrize("layout", ["permuted", "sliced"])
@pytest.mark.parametrize("name", OPERATORS)
def test_non_contiguous_J(name, layout):
    check(OPERATORS[name], *inputs(2, D, 7, weighted=True, seed=3, layout=layout))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("name", OPERATORS)
def test_half_precision_inputs(name, dtype, weighted):
    check(OPERATORS[name], *inputs(1, D, 16, weighted=weighted, seed=4), dtype=dtype)


def test_scalar_weight_is_folded_into_beta():
    J, _ = inputs(2, D, 5, weighted=False)
    check(lambda J, beta, w, backend: fastjac.logdet_gram(J, beta, weights=2.5, backend=backend), J)


def test_auto_never_picks_triton_on_cpu():
    J = torch.randn(2, 10, 3)
    assert _dispatch.resolve("logdet_gram", "auto", J, B=2, D=10, d=3) != "triton"


@pytest.mark.parametrize("call", [logdet, hadamard, orthogonality(1)], ids=["logdet", "hadamard", "orthogonality"])
def test_unsupported_inputs_raise(call):
    with pytest.raises(ValueError, match="float64"):
        call(torch.randn(1, 10, 3, dtype=torch.float64, device=DEVICE), 1.0, None, "triton")
    with pytest.raises(ValueError, match=r"d <= (256|128) columns"):
        call(torch.randn(1, 4, 257, device=DEVICE), 1.0, None, "triton")
    with pytest.raises(ValueError, match="dimensions"):
        call(torch.randn(10, 3, device=DEVICE), 1.0, None, "triton")


def test_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setattr(_triton, "INTERPRETED", False)
    reason = _triton.unsupported(device_type="cpu", dtype=torch.float32, d=4)
    assert reason is not None and "TRITON_INTERPRET" in reason


def test_unknown_schedule_raises():
    J, _ = inputs(1, 10, 3, weighted=False)
    with pytest.raises(ValueError, match="schedule"):
        logdet_triton.forward(J.float().to(DEVICE), None, torch.tensor(1.0), 3, "lu")
    with pytest.raises(ValueError, match="fused"):
        logdet_triton.forward(torch.randn(1, 10, 65, device=DEVICE), None, torch.tensor(1.0), 65, "fused")


@pytest.mark.gpu
def test_offsets_beyond_int32():
    """J with more than 2³¹ elements: the last sample must match the reference."""
    B, Dbig, d = 2, 2 ** 24 + 3, 64  # 2.1e9 elements in bfloat16 (4.3 GB)
    J = torch.empty(B, Dbig, d, dtype=torch.bfloat16, device="cuda").normal_(0, 2 ** -12)
    out = fastjac.logdet_gram(J, 1.0, backend="triton")
    expected = fastjac.logdet_gram(J[1:].float(), 1.0, backend="torch")
    assert_close("last sample", expected, out[1:], rtol=1e-3)


# ---- tensor-core products ---------------------------------------------------------------------
@triton.jit
def _product_kernel(a, b, out, MODE: tl.constexpr, N: tl.constexpr):
    idx = tl.arange(0, N)
    x = tl.load(a + idx[:, None] * N + idx[None, :])
    y = tl.load(b + idx[:, None] * N + idx[None, :])
    tl.store(out + idx[:, None] * N + idx[None, :], _triton.mma(x, y, tl.zeros((N, N), tl.float32), MODE))


def _product(a, b, mode):
    out = torch.empty(a.shape, dtype=torch.float32, device=DEVICE)
    _product_kernel[(1,)](a.to(DEVICE), b.to(DEVICE), out, MODE=mode, N=a.shape[0])
    return out.cpu().double()


def test_3xtf32_products_have_float32_accuracy():
    """The split products meet float32's accuracy; one TF32 product (what the split replaces)
    does not — so the accuracy tests above would catch a missing term. The rounding to TF32 is
    done in the kernel, so the interpreter computes the GPU's products."""
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(32, 32, generator=g) for _ in range(2))
    exact = a.double() @ b.double()
    scale = exact.abs().max()
    split = (_product(a, b, _triton.SPLIT_AB.value) - exact).abs().max() / scale
    single = (_product(a, b, _triton.TF32.value) - exact).abs().max() / scale
    assert split < 2e-6, split
    assert single > 2e-5, single


def test_product_modes():
    """16-bit pairs multiply natively (not in the interpreter for bfloat16, see product_mode);
    a computed fp32 operand (w·J, Γ) is split, the 16-bit one is exact in TF32."""
    assert _triton.product_mode(torch.float16, torch.float16) == _triton.NATIVE.value
    assert _triton.product_mode(torch.float32, torch.float32) == _triton.SPLIT_AB.value
    assert _triton.product_mode(torch.float32, torch.bfloat16) == _triton.SPLIT_A.value
    assert _triton.product_mode(torch.bfloat16, torch.float32) == _triton.SPLIT_B.value


# ---- launches -------------------------------------------------------------------------------
class _Launches(TorchDispatchMode):
    """Counts device kernels: Triton launches (through ``_triton.launch``) plus every torch op
    that computes (views, allocations and the fastjac custom ops, whose launches are counted
    inside, are free)."""
    FREE = {"aten.empty", "aten.empty_strided", "aten.empty_like", "aten.new_empty", "aten.new_empty_strided",
            "aten.lift_fresh", "aten.detach", "aten.is_same_size"}

    def __init__(self, monkeypatch):
        super().__init__()
        self.triton, self.torch = [], []
        launch = _triton.launch

        def counted(kernel, *args, **meta):
            self.triton.append(kernel.__name__)
            with _disable_current_modes():  # the interpreter's own tensor traffic is not the kernel's
                launch(kernel, *args, **meta)
        monkeypatch.setattr(_triton, "launch", counted)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket._qualified_op_name).replace("::", ".")
        if not (func.is_view or name in self.FREE or name.startswith("fastjac.")):
            self.torch.append(name)
        return func(*args, **(kwargs or {}))

    @property
    def total(self):
        return len(self.triton) + len(self.torch)


@pytest.mark.parametrize("schedule,d", [("fused", 16), ("split", 16), ("split", 64), ("split", 130)],
                         indirect=["schedule"])
def test_logdet_launches(schedule, d, monkeypatch):
    """Forward (the backend's factorisation): <= 3 launches ([zeros,] Gram, solver; fused: 1).
    Backward (reference Γ formula + gram_backward): <= 2 launches, grad/β (the per-sample
    scale of Γ = M⁻¹·grad/β) and one pass over J."""
    J, w = inputs(1, D, d, weighted=True, seed=d)
    J, w = J.float().to(DEVICE), w.float().to(DEVICE)
    beta = torch.tensor(0.7, device=DEVICE)
    with _Launches(monkeypatch) as count:
        logdet_value, m_inv, m_diag = logdet_triton.forward(J, w, beta, d)
    print(f"forward {schedule} d={d}: {count.total} launches {count.triton + count.torch}")
    assert count.total <= (1 if schedule == "fused" else 3), (count.triton, count.torch)
    assert count.triton[-1] == "_solve_kernel" and "cholesky" not in " ".join(count.torch)
    # the solver also wrote diag M (for the float32 error estimate: no further pass over J)
    J64, w64 = J.cpu().double(), w.cpu().double()
    assert_close("diag M", 1 + (w64[..., None] * J64 ** 2).sum(1) / 0.7, m_diag.cpu(), rtol=RTOL[torch.float32])
    grad = torch.ones(1, device=DEVICE)
    with _Launches(monkeypatch) as count:
        grads = logdet_reference.backward(J, w, beta, m_inv, grad, None, (True, True, False),
                                          _triton.gram_backward)
    print(f"backward d={d}: {count.total} launches {count.triton + count.torch}")
    assert count.triton == ["_gram_backward_kernel"] and count.total <= 2, (count.triton, count.torch)
    assert grads[0] is not None and grads[1] is not None


def test_every_launch_is_guarded(monkeypatch):
    """Every kernel launch goes through _triton.launch, which makes J's device current."""
    sources = [inspect.getsource(m) for m in (_triton, logdet_triton, column_triton, orthogonality_triton,
                                              tangent_triton)]
    launches = [line for src in sources for line in src.splitlines() if re.search(r"^[^\"`#]*\w\[[^\]]*\]\(", line)]
    assert launches == ["        kernel[grid](*args, **meta)"], launches
    guard = _triton.device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    seen = []
    monkeypatch.setattr(_triton, "device_guard", lambda device: (seen.append(device), contextlib.nullcontext())[1])
    J, w = inputs(1, 50, 70, weighted=True)
    fastjac.logdet_gram(J.float().to(DEVICE), 0.5, weights=w.float().to(DEVICE), backend="triton")
    assert len(seen) >= 2 and all(dev == torch.device(DEVICE) or dev.type == DEVICE for dev in seen)


@pytest.mark.parametrize("diagonal", [False, True])
def test_deterministic_mode_has_no_atomics(diagonal, monkeypatch):
    """With torch.use_deterministic_algorithms(True) the split-D Gram writes partial sums and
    adds them in a fixed order: no atomics, the same bits on every run."""
    J, w = inputs(1, D, 40, weighted=True, seed=2)
    J, w = J.float().to(DEVICE), w.float().to(DEVICE)
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    plan = _triton.gram_plan(1, D, 40, J.dtype, True, diagonal, J.device)
    assert plan.splits > 1 and not plan.atomic
    with _triton.capturing(4) as captured:
        _triton.gram(J.to("meta"), w.to("meta"), diagonal=diagonal)
    assert [launch.meta["ATOMIC"] for launch in captured] == [False]
    first, second = (_triton.gram(J, w, diagonal=diagonal) for _ in range(2))
    assert torch.equal(first, second)
    Jd, wd = J.double(), w.double()
    expected = (Jd * Jd * wd[..., None]).sum(1) if diagonal else Jd.mT @ (Jd * wd[..., None])
    assert_close("G", expected, first.cpu().double(), rtol=RTOL[torch.float32])


def test_tangent_offsets_are_int64():
    """t·N·OUT and t·N·IN pass 2³¹ for k·N·OUT >= 2³¹ (e.g. N = 1024, k = 171, OUT = 12288): the
    tangent kernels compute every offset in int64 (checked on the arguments' arithmetic: a
    launch with N·OUT near 2³¹ reads and writes the last tangent's last row correctly)."""
    N, IN, OUT, K = 3, 16, 20, 4
    h = torch.randn(N, IN, device=DEVICE)
    T = torch.randn(K, N, IN, device=DEVICE)
    W = torch.randn(OUT, IN, device=DEVICE)
    for kernel in (tangent_triton._forward_kernel, tangent_triton._backward_kernel):
        src = inspect.getsource(kernel.fn)
        assert "t * N" not in src and "tl.cast(t, tl.int64) * N" in src
        assert "program_id(0).to(tl.int64)" in src and "program_id(1).to(tl.int64)" in src
    y, U, _ = tangent_triton.forward(h, T, W, None, "tanh")
    expected = torch.tanh(h @ W.T)
    assert_close("y", expected.double(), y.cpu().double(), rtol=RTOL[torch.float32])
    assert_close("U", ((1 - expected ** 2) * (T @ W.T)).double(), U.cpu().double(), rtol=RTOL[torch.float32])
