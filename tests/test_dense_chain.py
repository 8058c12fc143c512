"""Runs of Linear layers and their activations as one node (fastjac/autodiff/dense_chain.py):
the node's values and first and second derivatives against the same run in ordinary torch ops
(float64), the extension's reverse kernel against the torch reference, and the decoders that
take the node against brute force."""
import pytest
import torch
from torch import nn

from fastjac import _extension
from fastjac.autodiff import dense_chain, stacked
from test_zoo_stacked import ACTIVATION_LAYERS, check_exact
from utils import assert_close

DT = torch.float64
CHAINED = ["elu", "relu", "leaky_relu", "sigmoid", "tanh"]
needs_extension = pytest.mark.skipif(_extension.module is None, reason="fastjac._C not built")


@pytest.fixture(params=["kernel", "reference"])
def backward_path(request, monkeypatch):
    """Both reverse passes: the extension's kernel, and the torch reference (no extension)."""
    if request.param == "kernel" and _extension.module is None:
        pytest.skip("fastjac._C not built")
    if request.param == "reference":
        monkeypatch.setattr(_extension, "module", None)
    return request.param


def _run(act: str, k: int, B: int = 3, last_act: bool = True):
    torch.manual_seed(0)
    a = ACTIVATION_LAYERS[act]
    layers = [(nn.Linear(4, 6).to(DT), a()), (nn.Linear(6, 5, bias=False).to(DT), a()),
              (nn.Linear(5, 7).to(DT), a() if last_act else None)]
    P = torch.randn(B, 4, dtype=DT, requires_grad=True)
    T = torch.randn(k * B, 4, dtype=DT, requires_grad=True)
    params = [p for lin, _ in layers for p in lin.parameters()]
    ref_layers = [(lin.weight, lin.bias, act) for lin, act in layers]
    return layers, ref_layers, P, T, params


@pytest.mark.parametrize("last_act", [True, False], ids=["act-last", "linear-last"])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("act", CHAINED)
def test_chain_matches_unfused_ops(act, k, last_act, backward_path):
    """Values and ∂(P, T, W, b) of the node to 1e-12 of the same run in ordinary ops."""
    layers, ref_layers, P, T, params = _run(act, k, last_act=last_act)
    Y, U = dense_chain.run(P, T, layers)
    want = dense_chain.reference(P, T, ref_layers)
    assert_close("forward", want, torch.cat([Y, U]), rtol=1e-13)
    G = torch.randn(want.shape, dtype=DT, generator=torch.Generator().manual_seed(3))
    inputs = [P, T, *params]
    got = torch.autograd.grad(torch.cat([Y, U]), inputs, G)
    expected = torch.autograd.grad(want, inputs, G)
    for i, (a, e) in enumerate(zip(got, expected)):
        assert_close(f"grad {i}", e, a, rtol=1e-12)


@pytest.mark.parametrize("act", ["elu", "sigmoid", "tanh"])  # σ″ ≠ 0: second derivatives to check
def test_chain_second_derivatives(act):
    layers, _, P, T, params = _run(act, 2, B=2)

    def f(P, T, *ps):
        Y, U, *_ = dense_chain.DenseChain.apply(P, T, [(0, 1, layers[0][1]), (2, None, layers[1][1]),
                                                       (3, 4, layers[2][1])], *ps)
        return Y, U
    assert torch.autograd.gradcheck(f, (P, T, *params))
    assert torch.autograd.gradgradcheck(f, (P, T, *params))


@needs_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("act", [None, *CHAINED])
def test_reverse_kernel_matches_reference(act, k, dtype):
    """fastjac._C.dense_backward against backward_reference on random outputs and gradients,
    into a separate buffer and in place over the gradients (as the node runs it below the top)."""
    g = torch.Generator().manual_seed(5)
    B, N = 5, 37
    module = None if act is None else ACTIVATION_LAYERS[act]()
    pre = torch.randn(B, N, dtype=dtype, generator=g)
    y = pre if module is None else dense_chain.ACTIVATIONS[type(module)].value(module, pre)
    u = torch.randn(k * B, N, dtype=dtype, generator=g)
    G = torch.randn((1 + k) * B, N, dtype=dtype, generator=g)
    want = dense_chain.backward_reference(module, y, u, G[:B], G[B:], torch.empty_like(G))
    tol = 1e-6 if dtype == torch.float32 else 1e-14
    for in_place in (False, True):
        dY = G.clone() if in_place else torch.full_like(G, float("nan"))
        source = dY if in_place else G
        got, db = dense_chain._backward_layer(module, y, u, source[:B], source[B:], dY, True)
        assert got is dY
        assert_close(f"dY in_place={in_place}", want, dY, rtol=tol)
        assert_close("db", want[:B].sum(0), db, rtol=tol)


def test_strided_operands_take_the_reference():
    """The kernel reads contiguous rows only: a strided operand is handed to the torch reference."""
    g = torch.Generator().manual_seed(6)
    y, u = torch.rand(3, 8, dtype=DT, generator=g), torch.randn(8, 3, dtype=DT, generator=g).t()  # u strided
    G = torch.randn(6, 8, dtype=DT, generator=g)
    want = dense_chain.backward_reference(nn.Tanh(), y, u.contiguous(), G[:3], G[3:], torch.empty_like(G))
    got, _ = dense_chain._backward_layer(nn.Tanh(), y, u, G[:3], G[3:], torch.empty_like(G), False)
    assert_close("dY", want, got, rtol=1e-14)


@needs_extension
def test_reverse_kernel_relu_passes_no_nan_where_it_is_flat():
    """As torch's threshold_backward: ∂ is 0 where y = 0, even for a NaN incoming gradient."""
    y = torch.tensor([[0.0, 2.0]])
    u = torch.tensor([[0.0, 1.0]])
    G = torch.tensor([[float("nan"), 1.0], [float("nan"), 1.0]])
    dY, _ = dense_chain._backward_layer(nn.ReLU(), y, u, G[:1], G[1:], torch.empty_like(G), False)
    assert torch.equal(dY, torch.tensor([[0.0, 1.0], [0.0, 1.0]]))


def test_the_benchmark_mlp_runs_as_one_node(monkeypatch):
    """Linear, ELU, Linear, ELU, Linear, Sigmoid: one node holding all three layers."""
    specs = []
    original = dense_chain.DenseChain.forward
    monkeypatch.setattr(dense_chain.DenseChain, "forward",
                        staticmethod(lambda P, T, spec, *p: specs.append(spec) or original(P, T, spec, *p)))
    dec = nn.Sequential(nn.Linear(4, 8), nn.ELU(), nn.Linear(8, 8), nn.ELU(), nn.Linear(8, 6), nn.Sigmoid()).to(DT)
    check_exact(dec, torch.randn(3, 4, dtype=DT, requires_grad=True))
    assert [[type(a) for _, _, a in spec] for spec in specs] == [[nn.ELU, nn.ELU, nn.Sigmoid]]


@pytest.mark.parametrize("case", {
    "one sample, one latent": lambda a: (nn.Sequential(nn.Linear(1, 7), a(), nn.Linear(7, 5, bias=False), a()), (1, 1)),
    "linear output": lambda a: (nn.Sequential(nn.Linear(3, 6), a(), nn.Linear(6, 4)), (2, 3)),
    "unchained activation after": lambda a: (nn.Sequential(nn.Linear(3, 6), a(), nn.Linear(6, 4), nn.SiLU()), (2, 3)),
    "convolutions after": lambda a: (nn.Sequential(nn.Linear(3, 8), a(), nn.Linear(8, 2 * 2 * 2), nn.Unflatten(1, (2, 2, 2)),
                                                   nn.ConvTranspose2d(2, 3, 2, stride=2), a()), (2, 3)),
    "convolution before": lambda a: (nn.Sequential(nn.Unflatten(1, (1, 2, 2)), nn.Conv2d(1, 2, 2), nn.Flatten(),
                                                   nn.Linear(2, 5), a(), nn.Linear(5, 3)), (2, 4)),
}.items(), ids=lambda c: c[0] if isinstance(c, tuple) else c)
@pytest.mark.parametrize("act", CHAINED)
def test_decoders_with_runs_against_brute_force(case, act, backward_path):
    torch.manual_seed(0)
    dec, z_shape = case[1](ACTIVATION_LAYERS[act])
    check_exact(dec.to(DT), torch.randn(*z_shape, dtype=DT, requires_grad=True))


@pytest.mark.parametrize("layer", [lambda: nn.ELU(-0.5), lambda: nn.LeakyReLU(-0.3)])
def test_activations_whose_derivative_is_not_a_function_of_y_stay_out(layer):
    """ELU with α < 0 and LeakyReLU with slope < 0: σ′ cannot be read from y, so no run; exact anyway."""
    assert not dense_chain.chainable(layer())
    torch.manual_seed(0)
    dec = nn.Sequential(nn.Linear(3, 6), layer(), nn.Linear(6, 4)).to(DT)
    check_exact(dec, torch.randn(2, 3, dtype=DT, requires_grad=True))


def test_modifying_the_output_in_place_raises_instead_of_a_wrong_gradient():
    """The node's outputs are views of a buffer it keeps for the reverse pass: changing one in
    place is an autograd error."""
    dec = nn.Sequential(nn.Linear(3, 4), nn.Tanh()).to(DT)
    z = torch.randn(2, 3, dtype=DT, requires_grad=True)
    out, T = stacked.push(dec, z, torch.randn(1, 2, 3, dtype=DT))
    with pytest.raises(RuntimeError, match="inplace"):
        out.mul_(2)
        (out.sum() + T.sum()).backward()


def test_the_node_under_torch_func_and_fake_tensors():
    """Inside torch.func transforms (wrapped tensors) and under fake tensors the reverse pass
    takes the torch reference, whose memory reads those tensors allow."""
    torch.manual_seed(0)
    dec = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4), nn.Sigmoid()).to(DT)
    z = torch.randn(2, 3, dtype=DT)
    t = torch.randn(1, 2, 3, dtype=DT)

    def loss(z):
        out, T = stacked.push(dec, z, t)
        return out.sum() + T.pow(2).sum()
    zr = z.clone().requires_grad_()
    want, = torch.autograd.grad(loss(zr), zr)
    assert_close("grad under torch.func.grad", want, torch.func.grad(loss)(z), rtol=1e-13)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        zf = mode.from_tensor(z).requires_grad_()
        g, = torch.autograd.grad(loss(zf), zf)
        assert g.shape == z.shape


def test_info_says_which_reverse_pass_runs(monkeypatch):
    import fastjac
    built = fastjac.info()["dense_runs"]
    assert built.startswith("host kernel" if _extension.module is not None else "torch reference")
    monkeypatch.setattr(_extension, "module", None)
    assert fastjac.info()["dense_runs"].startswith("torch reference")


@needs_extension
def test_reverse_kernel_split_over_threads_matches_reference():
    """A layer large enough that the kernel splits its columns over two threads (each owning its
    slice of the bias gradient) gives the reference's result."""
    g = torch.Generator().manual_seed(7)
    B, N = 512, 2048  # B·(k + 1)·4·N multiply-adds > the kernel's per-thread grain
    y = torch.rand(B, N, generator=g)
    u, G = torch.randn(B, N, generator=g), torch.randn(2 * B, N, generator=g)
    want = dense_chain.backward_reference(nn.Sigmoid(), y, u, G[:B], G[B:], torch.empty_like(G))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        got, db = dense_chain._backward_layer(nn.Sigmoid(), y, u, G[:B], G[B:], torch.empty_like(G), True)
    finally:
        torch.set_num_threads(threads)
    assert_close("dY", want, got, rtol=1e-6)
    assert_close("db", want[:B].double().sum(0), db.double(), rtol=1e-4)
