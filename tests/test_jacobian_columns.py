"""jacobian_columns against per-sample reverse-mode Jacobians, and its gradients."""
import pytest
import torch

from fastjac import jacobian_columns
from decoders import brute_jacobian, conv_decoder
from utils import assert_close, mlp_decoder

DECODERS = {"mlp": lambda d: mlp_decoder(d, 23), "conv": conv_decoder}


@pytest.mark.parametrize("kind", list(DECODERS))
def test_all_columns_match_brute_force(kind):
    d = 3
    dec = DECODERS[kind](d)
    z = torch.randn(2, d, dtype=torch.float64)
    out, J = jacobian_columns(dec, z)
    assert out.shape == dec(z).shape
    assert_close("out", dec(z), out)
    assert_close(f"J {kind}", brute_jacobian(dec, z), J)


def test_shared_and_per_sample_columns_and_directions():
    d = 5
    dec = mlp_decoder(d, 7)
    z = torch.randn(3, d, dtype=torch.float64)
    full = brute_jacobian(dec, z)
    _, J = jacobian_columns(dec, z, torch.tensor([4, 0]))
    assert_close("shared", full[..., [4, 0]], J)
    cols = torch.tensor([[1, 1], [0, 3], [4, 2]])
    _, J = jacobian_columns(dec, z, cols)
    assert_close("per-sample", torch.stack([full[i][:, cols[i]] for i in range(3)]), J)
    V = torch.randn(3, d, 4, dtype=torch.float64)
    _, J = jacobian_columns(dec, z, directions=V)
    assert_close("directions", full @ V, J)


@pytest.mark.parametrize("kind", list(DECODERS))
def test_gradients_reach_z_and_parameters(kind):
    d = 3
    dec = DECODERS[kind](d)
    z = torch.randn(2, d, dtype=torch.float64, requires_grad=True)
    params = [p for p in dec.parameters()]
    weights = torch.randn(2, dec(z).numel() // 2, d, dtype=torch.float64)

    def loss(J):
        return (J * weights).sum() + (J ** 2).sum()

    ours = torch.autograd.grad(loss(jacobian_columns(dec, z)[1]), [z, *params], allow_unused=True)
    ref = torch.autograd.grad(loss(brute_jacobian(dec, z, create_graph=True)), [z, *params], allow_unused=True)
    for i, (a, b) in enumerate(zip(ours, ref)):
        if b is None:  # the output bias does not move J
            assert a is None or a.abs().max() == 0
        else:
            assert_close(f"grad {i}", b, a)
    assert ours[0].abs().sum() > 0 and sum(g is not None and g.abs().sum() > 0 for g in ours[1:]) >= 3


def test_decoder_called_once_per_primal_pass():
    calls = []
    dec = mlp_decoder(4, 6)

    def counted(z):
        calls.append(z.shape)
        return dec(z)

    jacobian_columns(counted, torch.randn(5, 4, dtype=torch.float64))
    assert len(calls) == 1
