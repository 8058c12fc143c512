"""The compiled extension fastjac._C ("cpp" host path, "cuda" kernels) against the float64
torch reference: values, gradients (gradcheck through the autograd wrapper), awkward d,
strided/offset inputs, a factorisation that breaks down, and 64-bit offsets."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

import fastjac
from fastjac import _extension
from fastjac.ops import _dispatch
from fastjac.ops.logdet_gram import reference
from utils import RTOL, assert_close

pytestmark = pytest.mark.skipif(_extension.module is None, reason=f"{_extension.reason}")

if _extension.module is not None:
    from fastjac.ops.logdet_gram import extension

AWKWARD_D = (1, 2, 3, 17, 64, 128, 256)


def operands(B, D, d, dtype, seed=0, weighted=True):
    g = torch.Generator().manual_seed(seed)
    J = (torch.randn(B, D, d, generator=g, dtype=torch.float64) / D ** 0.5).to(dtype)
    w = (torch.rand(B, D, generator=g, dtype=torch.float64) * 2 + 0.05).to(dtype) if weighted else None
    return J, w, torch.tensor(0.7, dtype=torch.float64)


def reference_values(J, w, beta, block_size):
    J64, w64 = J.double(), None if w is None else w.double()
    return reference.forward(J64, w64, beta.double(), block_size)[:2]  # (log det, M⁻¹)


def grads(fn, J, w, beta, backend):
    J, beta = J.clone().requires_grad_(), beta.clone().requires_grad_()
    w = None if w is None else w.clone().requires_grad_()
    out = fn(J, beta, weights=w, backend=backend)
    g = torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).reshape(out.shape)
    inputs = [t for t in (J, w, beta) if t is not None]
    return torch.autograd.grad((out * g).sum(), inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("d", AWKWARD_D)
def test_logdet_matches_float64_reference(d, dtype):
    J, w, beta = operands(3, 40, d, dtype, seed=d)
    ref, _ = reference_values(J, w, beta, d)
    out = fastjac.logdet_gram(J, beta.to(dtype), weights=w, backend="cpp")
    assert out.dtype == dtype
    assert_close(f"logdet d={d}", ref.to(dtype), out, rtol=RTOL[dtype] * (10 if d >= 128 else 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("d", (1, 3, 17, 64, 128))
def test_gradients_match_float64_reference(d, dtype):
    J, w, beta = operands(2, 30, d, dtype, seed=d)
    ref = grads(fastjac.logdet_gram, J.double(), w.double(), beta, "torch")
    out = grads(fastjac.logdet_gram, J, w, beta.to(dtype), "cpp")
    for name, r, o in zip(("dJ", "dw", "dbeta"), ref, out):
        assert o.dtype == dtype
        assert_close(f"{name} d={d}", r.to(dtype), o, rtol=RTOL[dtype] * 10)


@pytest.mark.parametrize("d,block_size", [(5, 1), (7, 3), (17, 4), (64, 16), (9, 9)])
def test_fischer_blocks_and_gradients(d, block_size):
    J, w, beta = operands(3, 25, d, torch.float64, seed=block_size)
    ref = reference.forward(J, w, beta, block_size)[0]
    out = fastjac.fischer_bound(J, beta, block_size=block_size, weights=w, backend="cpp")
    assert_close("fischer", ref, out)
    for r, o in zip(grads(lambda *a, **k: fastjac.fischer_bound(*a, block_size=block_size, **k), J, w, beta, "torch"),
                    grads(lambda *a, **k: fastjac.fischer_bound(*a, block_size=block_size, **k), J, w, beta, "cpp")):
        assert_close("fischer grad", r, o)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("d", (1, 17, 128))
def test_posterior_covariance_and_gradients(d, dtype):
    J, w, beta = operands(2, 30, d, dtype, seed=d + 1)
    _, sigma_ref = reference_values(J, w, beta, d)
    sigma = fastjac.optimal_posterior_covariance(J, beta.to(dtype), weights=w, backend="cpp")
    assert_close("sigma", sigma_ref.to(dtype), sigma, rtol=RTOL[dtype] * 10)
    ref = grads(fastjac.optimal_posterior_covariance, J.double(), w.double(), beta, "torch")
    out = grads(fastjac.optimal_posterior_covariance, J, w, beta.to(dtype), "cpp")
    for name, r, o in zip(("dJ", "dw", "dbeta"), ref, out):
        assert_close(f"sigma {name}", r.to(dtype), o, rtol=RTOL[dtype] * 10)


@pytest.mark.parametrize("op", ["logdet", "fischer", "covariance"])
def test_gradcheck_through_autograd_wrapper(op):
    J, w, beta = operands(2, 6, 4, torch.float64, seed=3)
    fn = {"logdet": lambda J, w, b: fastjac.logdet_gram(J, b, weights=w, backend="cpp"),
          "fischer": lambda J, w, b: fastjac.fischer_bound(J, b, block_size=3, weights=w, backend="cpp"),
          "covariance": lambda J, w, b: fastjac.optimal_posterior_covariance(J, b, weights=w, backend="cpp")}[op]
    inputs = (J.requires_grad_(), w.requires_grad_(), beta.requires_grad_())
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)  # create_graph falls back to the reference


def test_unweighted_and_half_inputs():
    J, _, beta = operands(3, 30, 6, torch.float64, weighted=False)
    ref, _ = reference_values(J, None, beta, 6)
    assert_close("unweighted", ref, fastjac.logdet_gram(J, beta, backend="cpp"))
    out = fastjac.logdet_gram(J.half(), beta, weights=0.5, backend="cpp")  # scalar w folds into beta
    assert out.dtype == torch.float32
    assert_close("float16", reference_values(J.half(), None, beta / 0.5, 6)[0].float(), out, rtol=RTOL[torch.float16])


@pytest.mark.parametrize("layout", ["sliced", "transposed", "offset"])
def test_strided_inputs_give_the_contiguous_result(layout):
    B, D, d = 3, 20, 9
    g = torch.Generator().manual_seed(5)
    base = torch.randn(B, D + 3, 2 * d + 1, generator=g, dtype=torch.float64) / D ** 0.5
    J = {"sliced": base[:, 1:D + 1, 1::2],                                   # column stride 2
         "transposed": base[:, :D, :d].contiguous().mT.contiguous().mT,      # column stride D
         "offset": base.reshape(-1)[7:7 + B * D * d].view(B, D, d)}[layout]
    w = (torch.rand(B, 2 * D, generator=g, dtype=torch.float64) + 0.1)[:, ::2]
    J_before, w_before = J.clone(), w.clone()
    beta = torch.tensor(0.3, dtype=torch.float64)
    ref = grads(fastjac.logdet_gram, J.contiguous(), w.contiguous(), beta, "torch")
    out = grads(fastjac.logdet_gram, J, w, beta, "cpp")
    assert_close("value", fastjac.logdet_gram(J.contiguous(), beta, weights=w.contiguous(), backend="torch"),
                 fastjac.logdet_gram(J, beta, weights=w, backend="cpp"))
    for r, o in zip(ref, out):
        assert_close(f"{layout} grad", r, o)
    assert torch.equal(J, J_before) and torch.equal(w, w_before)


def test_factorisation_breakdown_raises_not_nan():
    # M = I + 2^40 [[1, 1], [1, 1]]: in float32 1 + 2^40 rounds to 2^40, so the second pivot
    # is exactly 0. With checks on the cpp backend says so, like every backend; with checks
    # off it leaves the log det NaN (no sync, no misleading message).
    J = torch.zeros(2, 3, 2)
    J[:, 0, :] = 2.0 ** 20
    with pytest.raises(ValueError, match="ill-conditioned for torch.float32.*float64"):
        fastjac.logdet_gram(J, 1.0, backend="cpp")
    with fastjac.checks(False):
        assert torch.isnan(fastjac.logdet_gram(J, 1.0, backend="cpp")).all()
    assert torch.isfinite(fastjac.logdet_gram(J.double(), 1.0, backend="cpp")).all()  # fine in float64


def test_nan_input_with_checks_off_is_not_blamed_on_size():
    """Checks off: NaN in, NaN out (as the torch backend), never "J is too large"."""
    J, w, beta = operands(2, 10, 3, torch.float32)
    J[1, 4, 2] = float("nan")
    with fastjac.checks(False):
        out = fastjac.logdet_gram(J, beta.float(), weights=w, backend="cpp")
    assert torch.isfinite(out[0]) and torch.isnan(out[1])
    with pytest.raises(ValueError, match="non-finite"):
        fastjac.logdet_gram(J, beta.float(), weights=w, backend="cpp")


def test_batch_offsets_beyond_32_bits():
    """A batch stride of 2^31 + 8 elements: element offsets overflow int32. The storage is
    reserved (8.6 GB of address space) but only the pages of the two matrices are touched."""
    B, D, d, stride = 2, 16, 5, 2 ** 31 + 8
    try:
        storage = torch.empty(stride + D * d, dtype=torch.float32)
    except RuntimeError as error:
        pytest.skip(f"cannot reserve 8.6 GB of address space: {error}")
    J = storage.as_strided((B, D, d), (stride, d, 1))
    J.copy_(operands(B, D, d, torch.float32, weighted=False)[0])
    beta = torch.tensor(0.5)
    ref = grads(fastjac.logdet_gram, J.contiguous(), None, beta, "torch")
    out = grads(fastjac.logdet_gram, J, None, beta, "cpp")
    assert_close("value", fastjac.logdet_gram(J.contiguous(), beta, backend="torch"),
                 fastjac.logdet_gram(J, beta, backend="cpp"))
    for r, o in zip(ref, out):
        assert_close("grad", r, o)


@settings(deadline=None, max_examples=15)
@given(B=st.integers(1, 4), D=st.integers(1, 30), d=st.integers(1, 20), block=st.integers(1, 20),
       weighted=st.booleans())
def test_random_shapes_match_reference(B, D, d, block, weighted):
    J, w, beta = operands(B, D, d, torch.float64, seed=B * D + d, weighted=weighted)
    ref = reference.forward(J, w, beta, min(block, d))[0]
    assert_close("fischer", ref, fastjac.fischer_bound(J, beta, block_size=block, weights=w, backend="cpp"))


def test_auto_and_availability():
    J = torch.randn(2, 10, 4)
    assert _dispatch.resolve("logdet_gram", "auto", J, B=2, D=10, d=4) == "cpp"
    # beyond the measured range "auto" keeps the reference; forcing cpp still works there
    assert _dispatch.resolve("logdet_gram", "auto", J, B=2, D=10, d=256) == "torch"
    assert _dispatch.resolve("logdet_gram", "auto", J.double(), B=2, D=10, d=128) == "cpp"
    assert _dispatch.resolve("logdet_gram", "cpp", J, B=2, D=10, d=256) == "cpp"
    assert _dispatch.availability()["cpp"] is None
    if not torch.cuda.is_available():  # registered as unavailable, with the reason
        assert "CUDA" in _dispatch.availability()["cuda"]
        with pytest.raises(RuntimeError, match="cuda"):
            fastjac.logdet_gram(J, 1.0, backend="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("d,block_size", [(1, 1), (17, 17), (17, 4), (64, 64), (128, 128)])
def test_cuda_matches_reference(d, block_size, dtype):
    J, w, beta = operands(3, 50, d, dtype, seed=d)
    J, w, beta = J.cuda(), w.cuda(), beta.cuda()
    ref = reference.forward(J.double(), w.double(), beta, block_size)[0]
    out = fastjac.fischer_bound(J, beta.to(dtype), block_size=block_size, weights=w, backend="cuda")
    assert_close("cuda logdet", ref.to(dtype), out, rtol=RTOL[dtype] * 10)
    for r, o in zip(grads(lambda *a, **k: fastjac.fischer_bound(*a, block_size=block_size, **k), J.double(), w.double(), beta, "torch"),
                    grads(lambda *a, **k: fastjac.fischer_bound(*a, block_size=block_size, **k), J, w, beta.to(dtype), "cuda")):
        assert_close("cuda grad", r.to(dtype), o, rtol=RTOL[dtype] * 10)
    sigma = fastjac.optimal_posterior_covariance(J, beta.to(dtype), weights=w, backend="cuda")
    assert_close("cuda sigma", torch.cholesky_inverse(torch.linalg.cholesky(
        reference.matrix(J.double(), w.double(), beta, d))).to(dtype), sigma, rtol=RTOL[dtype] * 10)


@pytest.mark.gpu
def test_cuda_beta_by_value_or_on_the_device():
    """β given as a number reaches the kernel by value; as a CUDA tensor, through its address."""
    J, w, _ = operands(3, 40, 6, torch.float32, seed=2)
    J, w = J.cuda(), w.cuda()
    by_value = fastjac.logdet_gram(J, 0.7, weights=w, backend="cuda")
    on_device = fastjac.logdet_gram(J, torch.tensor(0.7, device="cuda"), weights=w, backend="cuda")
    assert torch.equal(by_value, on_device)
    assert_close("cuda vs cpp", fastjac.logdet_gram(J.cpu(), 0.7, weights=w.cpu(), backend="cpp"), by_value.cpu())


@pytest.mark.gpu
def test_cuda_refuses_large_d():
    J = torch.randn(2, 10, extension.CUDA_MAX_D + 1, device="cuda")
    with pytest.raises(ValueError, match="shared memory"):
        fastjac.logdet_gram(J, 1.0, backend="cuda")
