"""Fused tangent layers: tangent_linear (torch reference and Triton kernel) against torch.func,
forward and backward, and TangentMLP's columns through jacobian_columns against brute force."""
import pytest
import torch
from hypothesis import given, settings, strategies as st
import torch.nn.functional as F
from torch.func import jvp, vmap

import fastjac
from fastjac.nn import TangentLinear, TangentMLP
from fastjac.ops import _dispatch
from fastjac.ops.tangent_linear import ACTIVATIONS, reference, tangent_linear
from utils import RTOL, assert_close

SHAPES = [(5, 7, 19, 3), (33, 40, 70, 1)]  # (N, in, out, k): ragged against the 32/64/32 tiles


def triton_reason():
    return _dispatch.implementation("tangent_linear", "triton").supports(
        device_type="cuda" if torch.cuda.is_available() else "cpu", dtype=torch.float32) \
        if "triton" in _dispatch.operators().get("tangent_linear", ()) else "triton is not installed"


def inputs(N, n_in, n_out, k, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)  # noqa: E731
    return [make(N, n_in), make(k, N, n_in), make(n_out, n_in) / n_in ** 0.5, make(n_out)]


def torch_func(h, T, W, b, activation):
    """The layer's output and JVPs the way torch.func computes them."""
    layer = lambda x: reference.activation(activation, F.linear(x, W, b))  # noqa: E731
    return vmap(lambda t: jvp(layer, (h,), (t,)), out_dims=(None, 0))(T)


def forward_and_grads(fn, tensors, probes):
    tensors = [t.detach().requires_grad_(True) for t in tensors]
    y, U = fn(*tensors)
    loss = (y * probes[0]).sum() + (U * probes[1]).sum()
    return (y, U), torch.autograd.grad(loss, tensors)


def check_against_torch_func(backend, activation, shape, dtype, device="cpu"):
    tensors = inputs(*shape, dtype, device)
    ref64 = [t.double().cpu() for t in tensors]
    N, _, n_out, k = shape
    g = torch.Generator().manual_seed(1)
    probes64 = [torch.randn(N, n_out, generator=g, dtype=torch.float64),
                torch.randn(k, N, n_out, generator=g, dtype=torch.float64)]
    (y_ref, U_ref), grads_ref = forward_and_grads(
        lambda h, T, W, b: torch_func(h, T, W, b, activation), ref64, probes64)
    probes = [p.to(dtype=dtype, device=device) for p in probes64]
    (y, U), grads = forward_and_grads(
        lambda h, T, W, b: tangent_linear(h, T, W, b, activation=activation, backend=backend), tensors, probes)
    rtol = RTOL[dtype] * (10 if dtype == torch.float32 else 1)  # fp32 sums over in = 40 and k·N rows
    assert_close(f"{backend} {activation} y", y_ref, y.cpu(), rtol)
    assert_close(f"{backend} {activation} U", U_ref, U.cpu(), rtol)
    for name, a, b in zip(("h", "T", "W", "b"), grads, grads_ref):
        assert_close(f"{backend} {activation} grad {name}", b, a.cpu(), rtol)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}-in{}-out{}-k{}".format(*s))
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_reference_matches_torch_func(activation, shape):
    check_against_torch_func("torch", activation, shape, torch.float64)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}-in{}-out{}-k{}".format(*s))
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_triton_kernel_matches_torch_func(activation, shape):
    """The fused kernel (on the CPU through TRITON_INTERPRET=1) in float32 against float64 torch.func."""
    reason = triton_reason()
    if reason is not None:
        pytest.skip(reason)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    check_against_torch_func("triton", activation, shape, torch.float32, device)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_kernel_half_precision_on_gpu(dtype):
    tensors = inputs(64, 96, 128, 4, dtype, "cuda")
    (y, U), _ = forward_and_grads(lambda *t: tangent_linear(*t, activation="elu", backend="triton"),
                                  tensors, [torch.ones(64, 128, device="cuda", dtype=dtype),
                                            torch.ones(4, 64, 128, device="cuda", dtype=dtype)])
    y_ref, U_ref = torch_func(*[t.double() for t in tensors], "elu")
    assert_close("y", y_ref, y.double(), RTOL[dtype])
    assert_close("U", U_ref, U.double(), RTOL[dtype])


@pytest.mark.parametrize("activation", ["elu", "softplus"])
def test_custom_op_gradcheck_gradgradcheck_and_opcheck(activation):
    tensors = [t.requires_grad_(True) for t in inputs(3, 4, 5, 2, torch.float64)]
    fn = lambda *t: tangent_linear(*t, activation=activation, backend="torch")  # noqa: E731
    assert torch.autograd.gradcheck(fn, tensors)
    assert torch.autograd.gradgradcheck(fn, tensors)
    torch.library.opcheck(torch.ops.fastjac.tangent_linear.default, (*tensors, activation, "torch"))


@settings(deadline=None, max_examples=12)
@given(N=st.integers(1, 9), n_in=st.integers(1, 9), n_out=st.integers(1, 9), k=st.integers(1, 4),
       activation=st.sampled_from(ACTIVATIONS), bias=st.booleans())
def test_reference_matches_torch_func_on_random_shapes(N, n_in, n_out, k, activation, bias):
    h, T, W, b = inputs(N, n_in, n_out, k, torch.float64)
    b = b if bias else None
    y, U = tangent_linear(h, T, W, b, activation=activation, backend="torch")
    y_ref, U_ref = torch_func(h, T, W, b, activation)
    assert_close("y", y_ref, y)
    assert_close("U", U_ref, U)


def test_compiles_without_graph_breaks():
    h, T, W, b = inputs(4, 5, 6, 2, torch.float64)
    fn = lambda *t: tangent_linear(*t, activation="tanh")  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for a, r in zip(compiled(h, T, W, b), fn(h, T, W, b)):
        assert_close("compiled", r, a)


def test_tangent_mlp_columns_use_the_fused_path_and_match_brute_force():
    torch.manual_seed(0)
    d = 4
    mlp = TangentMLP([d, 24, 30, 12], activation="tanh", output_activation="sigmoid",
                     out_shape=(3, 4), dtype=torch.float64)
    z = torch.randn(3, d, dtype=torch.float64, requires_grad=True)
    calls = []
    original = mlp.tangent_forward
    mlp.tangent_forward = lambda *a: calls.append(1) or original(*a)
    out, J = fastjac.jacobian_columns(mlp, z, chunk_size=3)
    assert len(calls) == 2 and out.shape == (3, 3, 4)
    brute = torch.stack([torch.autograd.functional.jacobian(lambda v: mlp(v[None]).reshape(-1), zi,
                                                            create_graph=True) for zi in z])
    assert_close("out", mlp(z), out)
    assert_close("J", brute, J)
    params = [z, *mlp.parameters()]
    ours = torch.autograd.grad(fastjac.logdet_gram(J, 0.3).sum(), params)
    ref = torch.autograd.grad(fastjac.logdet_gram(brute, 0.3).sum(), params)
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert_close(f"grad {i}", b, a)


def test_tangent_mlp_in_grae_matches_torch_func_path():
    torch.manual_seed(1)
    mlp = TangentMLP([5, 32, 20], activation="softplus", dtype=torch.float64)
    z = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    x = torch.randn(4, 20, dtype=torch.float64)
    fused = fastjac.grae_loss(mlp, z, x, 0.5, estimator="exact", chunk_size=2)
    plain = fastjac.grae_loss(lambda v: mlp(v), z, x, 0.5, estimator="exact")  # a lambda hides the fused path
    assert_close("loss", plain, fused)
    for a, b in zip(torch.autograd.grad(fused, [z, *mlp.parameters()]),
                    torch.autograd.grad(plain, [z, *mlp.parameters()])):
        assert_close("grad", b, a)


def test_bad_arguments_are_named():
    h, T, W, b = inputs(3, 4, 5, 2, torch.float64)
    with pytest.raises(ValueError, match="tangents"):
        tangent_linear(h, T[:, :2], W, b)
    with pytest.raises(ValueError, match="weight"):
        tangent_linear(h, T, W[:, :3], b)
    with pytest.raises(ValueError, match="bias"):
        tangent_linear(h, T, W, b[:2])
    with pytest.raises(TypeError, match="weight"):
        tangent_linear(h, T, W.float(), b)
    with pytest.raises(ValueError, match="activation"):
        tangent_linear(h, T, W, b, activation="gelu")
    with pytest.raises(ValueError, match="activation"):
        TangentLinear(3, 4, activation="swish")
    with pytest.raises(ValueError, match="out_shape"):
        TangentMLP([3, 8], out_shape=(3, 3))
    with pytest.raises(ValueError, match="widths"):
        TangentMLP([3])
    if triton_reason() is None and not torch.cuda.is_available():
        with pytest.raises(ValueError, match="float32"):
            tangent_linear(h, T, W, b, backend="triton")  # float64 stays on the torch backend
