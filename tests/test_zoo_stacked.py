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
