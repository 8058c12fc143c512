"""The operators are custom ops torch.compile can see: ``torch.library.opcheck`` on the
``fastjac::`` ops of ``fastjac.ops`` (torch backend, and triton where it runs, with the Triton
backward kernels' own ops), and ``grae_loss`` traced whole by
``torch.compile(fullgraph=True)`` (a graph break fails the test).

The compile test uses the ``aot_eager`` backend: it traces exactly what inductor would
(dynamo, fake tensors, AOT autograd through register_fake/register_autograd) without
spending a minute generating C++ on this CPU.
"""
import pytest
import torch

import fastjac
from fastjac.ops import _dispatch
from utils import assert_close, mlp_decoder

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _backends():
    triton_ok = (_dispatch.availability()["triton"] is None
                 and _dispatch.implementation("logdet_gram", "triton").supports(
                     device_type=torch.device(DEVICE).type, dtype=torch.float32, B=2, D=9, d=3) is None)
    return ["torch"] + (["triton"] if triton_ok else [])


def _samples(backend):
    """(op name, args) for every fastjac:: op, weighted and not, inputs requiring grad; with
    the triton backend also the kernels its backward passes call as custom ops."""
    g = torch.Generator().manual_seed(0)
    J = torch.randn(2, 9, 3, generator=g).to(DEVICE).requires_grad_()
    w = (torch.rand(2, 9, generator=g) + 0.1).to(DEVICE).requires_grad_()
    beta = torch.tensor(0.7, device=DEVICE, requires_grad=True)
    scale = torch.rand(2, 3, generator=g).to(DEVICE)
    for weights in (None, w):
        yield "logdet_gram", (J, weights, beta, 2, backend)
        yield "posterior_covariance", (J, weights, beta, backend)
        yield "column_estimate", (J, weights, beta, scale, backend)
        yield "orthogonality_penalty", (J, weights, 1, 1e-8, backend)
        if backend == "triton":  # internal, not differentiable: detached inputs
            Jd, wd = J.detach(), None if weights is None else weights.detach()
            C = Jd.mT @ Jd  # any (B, k, k) fp32 is a valid Γ or Gram operand
            yield "triton_gram", (Jd, wd, False)
            yield "triton_gram", (Jd, wd, True)
            yield "triton_apply_gamma", (Jd, wd, C, True, wd is not None)
            yield "triton_orthogonality_cosines", (C, None, 1, 1e-8)
            yield "triton_orthogonality_cosines", (C, torch.randn(2, generator=g).to(DEVICE), 2, 1e-8)


def _cases():
    for backend in _backends():
        for name in sorted({name for name, _ in _samples(backend)}):
            yield pytest.param(backend, name, id=f"{backend}-{name}")


@pytest.mark.parametrize("backend,name", _cases())
def test_opcheck(backend, name):
    for sample_name, args in _samples(backend):
        if sample_name == name:
            torch.library.opcheck(getattr(torch.ops.fastjac, name).default, args)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("estimator", ["exact", "stochastic"])
def test_grae_loss_compiles_without_graph_breaks(estimator, backend):
    torch._dynamo.reset()
    decoder = mlp_decoder(4, 12, hidden=16, dtype=torch.float32).to(DEVICE)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 4, generator=g).to(DEVICE)
    x = torch.randn(3, 12, generator=g).to(DEVICE)

    def loss(z, x):
        return fastjac.grae_loss(decoder, z, x, 0.5, estimator=estimator, backend=backend)

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    results = []
    for run in (compiled, loss):
        torch.manual_seed(1)  # the same drawn columns for the stochastic estimator
        zr = z.clone().requires_grad_()
        value = run(zr, x)
        value.backward()
        results.append((value.detach(), zr.grad))
    (got, got_dz), (want, want_dz) = results
    assert_close("loss", want, got, rtol=1e-5)
    assert_close("dz", want_dz, got_dz, rtol=1e-4)
