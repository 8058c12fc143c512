"""Jacobian columns in chunks: the same columns, and exact GRAE / Taylor with chunked recomputation
giving the same loss and gradients (float64, 1e-10) while keeping no tangent graph between passes."""
import pytest
import torch

import fastjac
from fastjac import grae_loss, jacobian_columns, jacobian_regularizer, taylor_beta_vae_loss
from fastjac.chunked import recomputed_columns
from fastjac.models.networks import ConvDecoder
from utils import assert_close, mlp_decoder

B, d = 3, 5


def app_d_decoder(seed=0):
    """App. D MNIST decoder (Linear → BN → ELU → convs/ConvT with BN → sigmoid, (B, 1, 28, 28))
    at 1/64 width, float64, BatchNorm in eval mode with non-trivial running statistics."""
    torch.manual_seed(seed)
    dec = ConvDecoder(d, "mnist", width=1 / 64).double()
    with torch.no_grad():
        for m in dec.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return dec.eval()


def mlp_probabilities(D=40, seed=0):
    """MLP decoder with a sigmoid output, so Bernoulli weights stay moderate."""
    return torch.nn.Sequential(mlp_decoder(d, D, seed=seed), torch.nn.Sigmoid())


DECODERS = {"mlp": mlp_probabilities, "app_d_conv": app_d_decoder}


def codes_and_data(decoder, seed=1):
    torch.manual_seed(seed)
    z = torch.randn(B, d, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        x = torch.bernoulli(torch.sigmoid(decoder(z))).reshape(decoder(z).shape)
    return z, x


def loss_and_grads(decoder, loss_fn, z):
    params = list(decoder.parameters())
    loss = loss_fn()
    grads = torch.autograd.grad(loss, [z, *params], allow_unused=True)
    return loss, grads


def assert_same(name, ref, out):
    (ref_loss, ref_grads), (loss, grads) = ref, out
    assert_close(f"{name} loss", ref_loss, loss)
    for i, (a, b) in enumerate(zip(grads, ref_grads)):
        if b is None:
            assert a is None or a.abs().max() == 0, f"{name}: grad {i} should vanish"
        else:
            assert_close(f"{name} grad {i}", b, a)


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 7])
def test_chunk_size_gives_the_same_columns_and_gradients(chunk_size):
    dec = mlp_decoder(d, 11)
    z = torch.randn(B, d, dtype=torch.float64, requires_grad=True)
    per_sample = torch.tensor([[0, 4, 4], [1, 2, 3], [3, 0, 1]])
    V = torch.randn(B, d, 4, dtype=torch.float64)
    for kw in ({}, {"columns": per_sample}, {"directions": V}):
        out_ref, J_ref = jacobian_columns(dec, z, **kw)
        out, J = jacobian_columns(dec, z, chunk_size=chunk_size, **kw)
        assert_close("out", out_ref, out)
        assert_close(f"J {sorted(kw)}", J_ref, J)
        g_ref = torch.autograd.grad((J_ref ** 3).sum(), z)[0]
        g = torch.autograd.grad((J ** 3).sum(), z)[0]
        assert_close("grad z", g_ref, g)


@pytest.mark.parametrize("estimator", ["exact", "fischer"])
@pytest.mark.parametrize("observation", ["gaussian", "bernoulli"])
@pytest.mark.parametrize("kind", list(DECODERS))
def test_chunked_grae_matches_unchunked(kind, observation, estimator):
    """Same loss and same gradients (z and every parameter), including the path through the
    output-dependent Bernoulli weights w(g(z))."""
    dec = DECODERS[kind]()
    z, x = codes_and_data(dec)
    kw = dict(estimator=estimator, block_size=2, observation=observation)
    ref = loss_and_grads(dec, lambda: grae_loss(dec, z, x, 0.7, **kw), z)
    for chunk_size in ((2, 3) if kind == "mlp" else (2,)):  # 2 leaves a short last chunk (d = 5)
        out = loss_and_grads(dec, lambda: grae_loss(dec, z, x, 0.7, chunk_size=chunk_size, **kw), z)
        assert_same(f"{kind} {estimator} {observation} chunk {chunk_size}", ref, out)


def test_chunked_regularizer_and_beta_gradient():
    dec = mlp_probabilities(30)
    z, x = codes_and_data(dec)
    beta = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    for chunk_size in (None, 2):
        R = jacobian_regularizer(dec, z, beta, x=x, estimator="exact", observation="bernoulli",
                                 chunk_size=chunk_size)
        g = torch.autograd.grad(R, [z, beta])
        if chunk_size is None:
            ref = (R, g)
        else:
            assert_close("R", ref[0], R)
            assert_close("dR/dz", ref[1][0], g[0])
            assert_close("dR/dbeta", ref[1][1], g[1])


@pytest.mark.parametrize("observation", ["gaussian", "bernoulli"])
def test_chunked_taylor_matches_unchunked(observation):
    dec = app_d_decoder()
    mu, x = codes_and_data(dec)
    torch.manual_seed(2)
    C = (torch.randn(B, d, d, dtype=torch.float64) * 0.3).tril()
    C.diagonal(dim1=-2, dim2=-1).copy_(torch.rand(B, d, dtype=torch.float64) + 0.5)
    C.requires_grad_(True)

    def run(chunk_size):
        loss = taylor_beta_vae_loss(dec, mu, C, x, 0.5, observation=observation, chunk_size=chunk_size)
        return loss, torch.autograd.grad(loss, [mu, C, *dec.parameters()], allow_unused=True)

    assert_same(f"taylor {observation}", run(None), run(2))


def test_recomputation_keeps_no_tangent_graph_and_reruns_each_chunk_once():
    """What the forward keeps outside the recomputed chunks is J, z and the factor, not the
    decoder's tangent activations; backward re-runs the decoder once per chunk."""
    dec = app_d_decoder()
    z, x = codes_and_data(dec)
    calls = []

    def counted(code):
        calls.append(code.shape)
        return dec(code)

    def saved_bytes(chunk_size):
        sizes = []

        def pack(t):
            sizes.append(t.numel() * t.element_size())
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = grae_loss(counted, z, x, 0.7, estimator="exact", chunk_size=chunk_size)
        return loss, sum(sizes)

    full_loss, full = saved_bytes(None)
    saved_bytes(2)  # the first call per chunk shape also decides the tangent path (a probe run)
    calls.clear()
    loss, kept = saved_bytes(2)
    chunks = -(-d // 2)
    assert len(calls) == chunks
    J_bytes = B * 784 * d * 8
    assert kept < 4 * J_bytes + 100_000, f"chunked forward kept {kept} bytes"
    assert kept < full / 3, f"chunked forward kept {kept} of the unchunked {full} bytes"
    calls.clear()
    loss.backward()
    assert len(calls) == chunks
    assert_close("loss", full_loss, loss)


def test_dropout_mask_is_shared_by_all_chunks_and_their_recomputation():
    torch.manual_seed(0)
    dec = torch.nn.Sequential(torch.nn.Linear(d, 32), torch.nn.ELU(), torch.nn.Dropout(0.5),
                              torch.nn.Linear(32, 20)).double()
    z = torch.randn(B, d, dtype=torch.float64, requires_grad=True)
    x = torch.randn(B, 20, dtype=torch.float64)
    results = []
    for chunk_size in (None, 1, 2):
        torch.manual_seed(123)
        loss = grae_loss(dec, z, x, 0.5, estimator="exact", chunk_size=chunk_size)
        results.append((loss, torch.autograd.grad(loss, [z, *dec.parameters()])))
    for r in results[1:]:
        assert_same("dropout", results[0], r)


def test_recomputed_columns_match_and_validate():
    dec = mlp_decoder(d, 9)
    z = torch.randn(B, d, dtype=torch.float64)
    V = torch.randn(B, d, 3, dtype=torch.float64)
    out, J = recomputed_columns(dec, z, chunk_size=2, directions=V)
    ref_out, ref_J = jacobian_columns(dec, z, directions=V)
    assert_close("out", ref_out, out)
    assert_close("J", ref_J, J)
    with pytest.raises(ValueError, match="chunk_size"):
        recomputed_columns(dec, z, chunk_size=0)
    with pytest.raises(TypeError, match="chunk_size"):
        grae_loss(dec, z, torch.zeros(B, 9, dtype=torch.float64), 0.5, chunk_size=2.0)
    with pytest.raises(ValueError, match="directions"):
        recomputed_columns(dec, z, chunk_size=2, directions=V[:, :2])
    with pytest.raises(TypeError, match="decoder"):
        recomputed_columns(None, z, chunk_size=2)
