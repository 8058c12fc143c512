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


@pytest.mark.parametrize("chunk_size", [None, 5])
def test_spatial_latents_equal_the_flattened_computation(chunk_size):
    from fastjac.chunked import recomputed_columns
    torch.manual_seed(4)
    conv = torch.nn.Sequential(torch.nn.ConvTranspose2d(2, 3, 4, stride=2, padding=1), torch.nn.GroupNorm(1, 3),
                               torch.nn.SiLU(), torch.nn.Conv2d(3, 1, 3, padding=1)).double()
    z = torch.randn(2, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    flat = lambda v: conv(v.reshape(-1, 2, 3, 3))  # noqa: E731
    cols = torch.tensor([[0, 17, 5], [9, 2, 11]])
    V = torch.randn(2, 18, 2, dtype=torch.float64)
    for kw in ({}, {"columns": cols}, {"directions": V}):
        out, J = jacobian_columns(conv, z, chunk_size=chunk_size, **kw)
        out_flat, J_flat = jacobian_columns(flat, z.reshape(2, -1), chunk_size=chunk_size, **kw)
        assert out.shape == (2, 1, 6, 6) and J.shape == J_flat.shape
        assert_close("out", out_flat, out)
        assert_close(f"J {list(kw)}", J_flat, J)
        g, g_flat = (torch.autograd.grad((A ** 2).sum(), z)[0] for A in (J, J_flat))
        assert_close("grad z", g_flat, g)
    _, J_rec = recomputed_columns(conv, z, chunk_size=7)
    assert_close("recomputed", brute_jacobian(conv, z), J_rec)
    with pytest.raises(ValueError, match=r"directions must have shape \(B, d, k\) = \(2, 18"):
        jacobian_columns(conv, z, directions=torch.randn(2, 2, 1, dtype=torch.float64))


def test_every_entry_point_prepares_the_decoder_itself():
    """Wrappers are removed by jacobian_columns and chunked.recomputed_columns themselves (not only
    by the estimators above them): DataParallel, torch.compile, and both inside a partial."""
    import functools
    from fastjac.chunked import recomputed_columns
    dec = mlp_decoder(3, 5)
    z = torch.randn(2, 3, dtype=torch.float64)
    want = brute_jacobian(dec, z)
    compiled = torch.compile(dec, backend="eager")
    for wrapped in (torch.nn.DataParallel(dec), compiled, functools.partial(torch.nn.DataParallel(dec))):
        assert_close("jacobian_columns", want, jacobian_columns(wrapped, z)[1])
        assert_close("recomputed_columns", want, recomputed_columns(wrapped, z, chunk_size=2)[1])
