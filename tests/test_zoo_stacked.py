"""The stacked evaluation (fastjac/autodiff/stacked.py) that plain nn.Sequential decoders take:
every layer type it accepts, against brute force (columns and their gradients), for k = 1 and
k > 1 tangents; and what it refuses goes through torch.func instead."""
import pytest
import torch
from torch import nn

import fastjac
from fastjac.autodiff import stacked
from decoders import brute_jacobian
from utils import assert_close

DT = torch.float64
ACTIVATION_LAYERS = {
    "elu": lambda: nn.ELU(0.7), "relu": nn.ReLU, "leaky_relu": lambda: nn.LeakyReLU(0.2),
    "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "silu": nn.SiLU, "softplus": lambda: nn.Softplus(2.0, 3.0),
    "gelu": nn.GELU, "gelu_tanh": lambda: nn.GELU("tanh"), "identity": nn.Identity, "elu_inplace": lambda: nn.ELU(inplace=True),
}


def check_exact(dec, z, columns=None):
    assert stacked.supports(dec)
    out, J = fastjac.jacobian_columns(dec, z, columns)
    brute = brute_jacobian(dec, z, create_graph=True)
    brute = brute if columns is None else brute[..., columns]
    assert_close("out", dec(z), out)
    assert_close("J", brute, J)
    probe = torch.randn(brute.shape, dtype=DT, generator=torch.Generator().manual_seed(1))
    params = [p for p in dec.parameters() if p.requires_grad]

    def grads(A):
        return torch.autograd.grad((A * probe).sum() + (A ** 2).sum(), [z, *params], allow_unused=True)
    for i, (a, b) in enumerate(zip(grads(J), grads(brute))):
        if b is None or b.abs().max() == 0:
            assert a is None or a.abs().max() < 1e-12, f"grad {i}"
        else:
            assert_close(f"grad {i}", b, a, rtol=1e-9)


@pytest.mark.parametrize("columns", [None, [2]])
@pytest.mark.parametrize("act", list(ACTIVATION_LAYERS))
def test_stacked_mlp_every_activation(act, columns):
    torch.manual_seed(0)
    dec = nn.Sequential(nn.Linear(3, 8), ACTIVATION_LAYERS[act](), nn.Linear(8, 8, bias=False),
                        nn.Sequential(ACTIVATION_LAYERS[act](), nn.Linear(8, 5))).to(DT)
    z = torch.randn(4, 3, dtype=DT, requires_grad=True)
    check_exact(dec, z, None if columns is None else torch.tensor(columns))


def test_stacked_convolutions_batchnorm_resampling():
    torch.manual_seed(0)
    dec = nn.Sequential(
        nn.Linear(3, 2 * 3 * 3), nn.Unflatten(1, (2, 3, 3)), nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect"),
        nn.BatchNorm2d(4), nn.SiLU(), nn.ConvTranspose2d(4, 4, 3, stride=2, padding=1, output_padding=1),
        nn.Upsample(scale_factor=2, mode="bilinear"), nn.Conv2d(4, 4, 1), nn.PixelShuffle(2), nn.Dropout(0.3),
        nn.Conv1d(1, 1, 1) if False else nn.Identity(), nn.Flatten(), nn.Softplus()).to(DT)
    with torch.no_grad():
        dec[3].running_mean.uniform_(-0.5, 0.5)
        dec[3].running_var.uniform_(0.5, 2)
    dec.eval()
    check_exact(dec, torch.randn(2, 3, dtype=DT, requires_grad=True))


def test_stacked_spatial_latent_and_weight_norm():
    torch.manual_seed(0)
    P = nn.utils.parametrizations
    dec = nn.Sequential(P.weight_norm(nn.ConvTranspose2d(2, 3, 4, stride=2, padding=1)), nn.Tanh(),
                        nn.Conv2d(3, 1, 3, padding=1)).to(DT)
    check_exact(dec, torch.randn(2, 2, 3, 3, dtype=DT, requires_grad=True))


@pytest.mark.parametrize("refused", [
    lambda: nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)),              # training-mode BatchNorm
    lambda: nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5)),                # training-mode dropout
    lambda: nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4)),                # not in the table
    lambda: nn.Sequential(nn.Linear(3, 4), nn.CELU()),                      # torch's CELU derivative is inexact
    lambda: nn.Sequential(nn.Linear(3, 12), nn.Flatten(0)),                 # touches the batch dimension
    lambda: nn.Sequential(nn.Linear(3, 4)).register_forward_hook(lambda *a: None) and None,
])
def test_other_sequentials_are_not_stacked(refused):
    dec = refused()
    if dec is not None:
        assert not stacked.supports(dec)
    hooked = nn.Sequential(nn.Linear(3, 4))
    hooked[0].register_forward_hook(lambda *a: None)
    assert not stacked.supports(hooked)


def test_stacked_path_under_autocast_runs_the_decoder_in_bf16_like_the_module():
    torch.manual_seed(0)
    dec = nn.Sequential(nn.Linear(3, 16), nn.ELU(), nn.Linear(16, 5), nn.Sigmoid())
    z = torch.randn(4, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, J = fastjac.jacobian_columns(dec, z)
        want = dec(z)
    assert out.dtype == want.dtype == J.dtype == torch.bfloat16
    assert_close("out", want.float(), out.float(), rtol=1e-2)
    assert_close("J", brute_jacobian(dec, z), J.float(), rtol=3e-2)


FUSED_ACTIVATIONS = ["elu", "relu", "leaky_relu", "sigmoid", "tanh"]


@pytest.mark.parametrize("act", FUSED_ACTIVATIONS)
@pytest.mark.parametrize("k", [1, 3])
def test_fused_linear_activation_first_and_second_derivatives(act, k):
    """The hand-written reverse pass of a Linear + activation pair (and, through its recomputed
    graph, double backward) against torch's derivatives of the unfused ops, float64."""
    torch.manual_seed(0)
    lin, nonlin = nn.Linear(3, 5).to(DT), ACTIVATION_LAYERS[act]()
    B = 2
    X = torch.randn((1 + k) * B, 3, dtype=DT, requires_grad=True)
    W, b = lin.weight, lin.bias

    def fused(X, W, b):
        return stacked._LinearActivation.apply(X, W, b, nonlin, B)

    def unfused(X, W, b):
        return stacked._activation(nonlin, torch.nn.functional.linear(X, W), B, k, b)
    assert_close("forward", unfused(X, W, b), fused(X, W, b))
    G = torch.randn((1 + k) * B, 5, dtype=DT)
    want = torch.autograd.grad(unfused(X, W, b), (X, W, b), G)
    got = torch.autograd.grad(fused(X, W, b), (X, W, b), G)
    for name, a, e in zip("XWb", got, want):
        assert_close(f"∂{name}", e, a, rtol=1e-12)
    if act not in ("relu", "leaky_relu"):  # their σ″ is 0 almost everywhere: nothing to check twice
        assert torch.autograd.gradgradcheck(fused, (X, W, b))


def test_fused_pairs_are_what_the_mlp_runs(monkeypatch):
    """The benchmarks' MLP shape (Linear, ELU, Linear, ELU, Linear, Sigmoid) runs three fused pairs."""
    calls = []
    original = stacked._LinearActivation.forward
    monkeypatch.setattr(stacked._LinearActivation, "forward",
                        staticmethod(lambda ctx, *a: calls.append(type(a[3])) or original(ctx, *a)))
    dec = nn.Sequential(nn.Linear(4, 8), nn.ELU(), nn.Linear(8, 8), nn.ELU(), nn.Linear(8, 6), nn.Sigmoid()).to(DT)
    check_exact(dec, torch.randn(3, 4, dtype=DT, requires_grad=True))
    assert calls == [nn.ELU, nn.ELU, nn.Sigmoid]


@pytest.mark.parametrize("act", FUSED_ACTIVATIONS)
def test_fused_pairs_at_one_sample_and_one_latent(act):
    """B = 1 and d = 1 (a one-column stack, one primal row) through fused pairs, against brute force."""
    torch.manual_seed(0)
    dec = nn.Sequential(nn.Linear(1, 7), ACTIVATION_LAYERS[act](), nn.Linear(7, 5, bias=False),
                        ACTIVATION_LAYERS[act]()).to(DT)
    check_exact(dec, torch.randn(1, 1, dtype=DT, requires_grad=True))
