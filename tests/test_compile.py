"""The operators are custom ops torch.compile can see, for EVERY backend.

- ``torch.library.opcheck`` on each ``fastjac::`` op of ``fastjac.ops`` through each backend
  (forward, backward, fake), and on the traceable ops the backends' backward passes call.
- ``torch.compile(fullgraph=True)`` of ``grae_loss`` forward + backward (a graph break fails the
  test) for each backend and estimator, and on the default CPU backend ("auto", which takes
  "cpp" when the extension is built).

A backend that cannot run here (Triton without the interpreter or a GPU, the extension not
built, no CUDA device) is reported as a SKIP with its reason, never dropped from the list.
The compile tests use the ``aot_eager`` backend: it traces exactly what inductor would
(dynamo, fake tensors, AOT autograd through register_fake/register_autograd) without
spending a minute generating C++ on this CPU.
"""
import pytest
import torch

import fastjac
from fastjac.ops import _dispatch
from utils import assert_close, mlp_decoder

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
OPS = ("logdet_gram", "column_estimate", "orthogonality_penalty")


def _unavailable(op, backend):
    """None when ``backend`` computes ``op`` on this machine, else why not."""
    if backend not in _dispatch.operators().get(op, ()):
        return f"{backend}: {_dispatch.availability()[backend] or f'no {backend} implementation of {op}'}"
    return _dispatch.implementation(op, backend).supports(
        device_type=torch.device(DEVICE).type, dtype=torch.float32, B=2, D=9, d=3)


def _param(op, backend, *values):
    reason = _unavailable(op, backend)
    marks = [pytest.mark.skip(reason=reason)] if reason else []
    return pytest.param(backend, *values, marks=marks, id="-".join(map(str, (backend, *values))))


def _inputs():
    g = torch.Generator().manual_seed(0)
    J = torch.randn(2, 9, 3, generator=g).to(DEVICE).requires_grad_()
    w = (torch.rand(2, 9, generator=g) + 0.1).to(DEVICE).requires_grad_()
    beta = torch.tensor(0.7, device=DEVICE, requires_grad=True)
    scale = torch.rand(2, 3, generator=g).to(DEVICE)
    return J, w, beta, scale


def _samples(op, backend):
    """Arguments of ``fastjac::<op>`` through ``backend``, weighted and not, inputs requiring grad."""
    J, w, beta, scale = _inputs()
    for weights in (None, w):
        if op == "logdet_gram":
            yield J, weights, beta, 2, backend   # Fischer blocks
            yield J, weights, beta, 3, backend   # exact (and Σ* = its second output)
        elif op == "column_estimate":
            yield J, weights, beta, scale, backend
            yield J, weights, beta, None, backend
        else:
            yield J, weights, 1, 1e-8, backend


@pytest.mark.parametrize("backend,op", [_param(op, b, op) for op in OPS for b in _dispatch.BACKENDS])
def test_opcheck(backend, op):
    for args in _samples(op, backend):
        torch.library.opcheck(getattr(torch.ops.fastjac, op).default, args)


@pytest.mark.parametrize("backend", [_param("logdet_gram", b) for b in _dispatch.BACKENDS])
def test_opcheck_gram_backward(backend):
    """The backend's one pass over J, as traced inside every backward (a custom op, or torch ops)."""
    J, w, _beta, _scale = _inputs()
    backend_gram_backward = _dispatch.implementation("logdet_gram", backend).gram_backward
    Jd, wd = J.detach(), w.detach()
    gamma = Jd.mT @ Jd  # any symmetric (B, k, k) is a valid Γ
    per_sample = torch.linspace(-2.0, 3.0, J.shape[0])  # the optional scale of Γ, one per sample
    for weights, scale in ((None, None), (wd, None), (wd, per_sample)):
        for need_J, need_w in ((True, True), (True, False), (False, True)):
            got = backend_gram_backward(Jd, weights, gamma, need_J, need_w, scale=scale)
            scaled = gamma.double() * (1 if scale is None else scale.double()[:, None, None])
            want = fastjac.ops._gram.gram_backward(Jd.double(), None if weights is None else weights.double(),
                                                  scaled, need_J, need_w)
            for name, g, r in zip(("grad_J", "grad_w"), got, want):
                assert (g is None) == (r is None), name
                if g is not None:
                    assert_close(name, r, g.double(), rtol=1e-4)
    for name in ("triton_gram_backward", "cuda_gram_backward"):
        if backend in name:
            op = getattr(torch.ops.fastjac, name).default
            extra = (per_sample,) if name == "triton_gram_backward" else ()
            torch.library.opcheck(op, (Jd, wd, gamma, True, True, *extra),
                                  test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("backend", [_param("tangent_linear", b) for b in _dispatch.BACKENDS])
def test_opcheck_tangent_linear(backend):
    g = torch.Generator().manual_seed(0)
    N, IN, OUT, k = 3, 4, 5, 2
    h, T = torch.randn(N, IN, generator=g), torch.randn(k, N, IN, generator=g)
    W, b = torch.randn(OUT, IN, generator=g), torch.randn(OUT, generator=g)
    for bias in (b, None):
        args = [t.to(DEVICE).requires_grad_() for t in (h, T, W)] + [None if bias is None else bias.to(DEVICE)]
        torch.library.opcheck(torch.ops.fastjac.tangent_linear.default, (*args, "elu", backend))


ESTIMATORS = {"exact": "logdet_gram", "fischer": "logdet_gram", "hadamard": "column_estimate",
              "stochastic": "column_estimate"}


def _compile_and_compare(estimator, backend, **options):
    torch._dynamo.reset()
    decoder = mlp_decoder(4, 12, hidden=16, dtype=torch.float32).to(DEVICE)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 4, generator=g).to(DEVICE)
    x = torch.randn(3, 12, generator=g).to(DEVICE)

    def loss(z, x):
        return fastjac.grae_loss(decoder, z, x, 0.5, estimator=estimator, backend=backend, **options)

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


@pytest.mark.parametrize("backend,estimator",
                         [_param(op, b, est) for est, op in ESTIMATORS.items() for b in _dispatch.BACKENDS])
def test_grae_loss_compiles_without_graph_breaks(estimator, backend):
    options = {"block_size": 2} if estimator == "fischer" else {}
    _compile_and_compare(estimator, backend, **options)


@pytest.mark.parametrize("backend", [_param("orthogonality_penalty", b) for b in _dispatch.BACKENDS])
def test_orthogonality_term_compiles(backend):
    _compile_and_compare("hadamard", backend, orthogonality_weight=0.3)


@pytest.mark.skipif(DEVICE != "cpu", reason="the default CPU backend is asked about")
def test_exact_regulariser_compiles_on_the_default_cpu_backend():
    """Issue: compiling the exact regulariser failed by default on the CPU, because "auto"
    takes the cpp backend there and its backward called the extension on fake tensors."""
    J = torch.randn(3, 12, 4)
    default = _dispatch.resolve("logdet_gram", "auto", J, B=3, D=12, d=4)
    if _dispatch.availability()["cpp"] is None:
        assert default == "cpp"
    _compile_and_compare("exact", "auto")
