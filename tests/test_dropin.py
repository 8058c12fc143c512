"""Drop-in use in other autoencoders (issue 9): the regulariser alone and as a module, with
decoders as users have them — conditional, tuple/dict/dataclass outputs, autocast, DDP, compile."""
import dataclasses
import functools
import io
import os
import subprocess
import sys
import textwrap
from collections import namedtuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastjac
from fastjac import grae_loss, jacobian_columns, jacobian_regularizer
from fastjac.nn import JacobianRegularizer
from utils import RTOL, assert_close, mlp_decoder

B, d, D, BETA = 5, 4, 12, 0.7
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def seeded(seed=7):
    return torch.Generator().manual_seed(seed)


def data(observation, dtype=torch.float64):
    torch.manual_seed(1)
    z = torch.randn(B, d, dtype=dtype, requires_grad=True)
    x = torch.rand(B, D, dtype=dtype)
    net = mlp_decoder(d, D, dtype=dtype)
    dec = nn.Sequential(net, nn.Sigmoid()) if observation == "bernoulli" else net
    return dec, z, x


def independent_nll(observation, g, x):
    """−log p(x|g) per sample, written out from docs/maths.md#observation-models rather than taken from fastjac."""
    if observation == "gaussian":
        return 0.5 * ((x - g) ** 2).sum(-1)
    if observation == "bernoulli":
        return -(x * g.log() + (1 - x) * (1 - g).log()).sum(-1)
    return F.binary_cross_entropy_with_logits(g, x, reduction="none").sum(-1)


def exact_R(J, beta):
    """log det(I + JᵀJ/β) by slogdet of the explicitly formed matrix."""
    eye = torch.eye(J.shape[-1], dtype=J.dtype)
    return torch.linalg.slogdet(eye + J.mT @ J / beta).logabsdet


# ---------------------------------------------------------------- regulariser + terms == grae_loss

@pytest.mark.parametrize("observation", ["gaussian", "bernoulli", "bernoulli_logits"])
@pytest.mark.parametrize("estimator", sorted(fastjac.ESTIMATORS))
def test_regularizer_plus_reconstruction_and_code_is_grae_loss(estimator, observation):
    dec, z, x = data(observation)
    columns_formed = estimator != "hutchinson_cg"  # the orthogonality penalty needs J's columns
    options = dict(estimator=estimator, num_columns=2, block_size=2, observation=observation,
                   orthogonality_weight=0.1 if columns_formed else 0.0, reduction="none")
    reg = jacobian_regularizer(dec, z, BETA, x=x, generator=seeded(), **options)
    pieces = reg + independent_nll(observation, dec(z), x) + BETA / 2 * (z ** 2).sum(-1)
    total = grae_loss(dec, z, x, BETA, generator=seeded(), **options)
    assert_close(f"{estimator}/{observation}", total, pieces)
    grad_total, = torch.autograd.grad(total.sum(), z)
    grad_pieces, = torch.autograd.grad(pieces.sum(), z)
    assert_close(f"{estimator}/{observation} dz", grad_total, grad_pieces)


def test_bernoulli_weights_need_x_and_say_so():
    dec, z, x = data("bernoulli")
    with pytest.raises(ValueError, match=r"x is required for observation='bernoulli'.*depend on the data"):
        jacobian_regularizer(dec, z, BETA, observation="bernoulli")
    for observation in ("gaussian", "bernoulli_logits"):  # w does not depend on x: no x needed
        jacobian_regularizer(dec, z, BETA, observation=observation, estimator="exact")


def test_bad_options_raise_before_the_decoder_runs():
    def never(z):
        raise AssertionError("the decoder ran before the arguments were checked")
    z = torch.randn(B, d)
    with pytest.raises(ValueError, match="reduction must be one of"):
        jacobian_regularizer(never, z, BETA, reduction="avg")
    with pytest.raises(ValueError, match="estimator must be one of.*'exact'"):
        jacobian_regularizer(never, z, BETA, estimator="nope")
    with pytest.raises(TypeError, match="decoder must be callable"):
        jacobian_regularizer("decoder", z, BETA)


# ---------------------------------------------------------------- conditional decoders

class Conditional(nn.Module):
    """decoder(z, y): the condition y (B, c) enters by concatenation."""

    def __init__(self, c=3):
        super().__init__()
        self.net = mlp_decoder(d + c, D)

    def forward(self, z, y):
        return self.net(torch.cat([z, y], -1))


def test_conditional_decoder_through_lambda_and_partial():
    dec = Conditional()
    torch.manual_seed(2)
    z = torch.randn(B, d, dtype=torch.float64)
    y = torch.randn(B, 3, dtype=torch.float64, requires_grad=True)
    J = torch.stack([torch.autograd.functional.jacobian(
        lambda zi: dec(zi[None], y[i:i + 1]).reshape(-1), z[i], create_graph=True) for i in range(B)])
    ref = BETA / 2 * exact_R(J, BETA)
    ref_grad_y, = torch.autograd.grad(ref.sum(), y)
    for name, decoder in [("lambda", lambda code: dec(code, y)), ("partial", functools.partial(dec, y=y))]:
        got = jacobian_regularizer(decoder, z, BETA, estimator="exact", reduction="none")
        assert_close(name, ref, got)
        grad_y, = torch.autograd.grad(got.sum(), y)  # the condition's gradient flows through J
        assert_close(f"{name} dy", ref_grad_y, grad_y)


# ---------------------------------------------------------------- tuple / dict / dataclass outputs

@dataclasses.dataclass
class Output:
    recon: torch.Tensor
    hidden: object = None


Pair = namedtuple("Pair", ["recon", "mu"])


class ModelOutput(dict):
    """Attribute access over a dict, like the output classes of other autoencoder libraries."""
    __getattr__ = dict.__getitem__


CONTAINERS = {
    "dict-key": (lambda g, z: {"recon": g, "mu": z}, "recon"),
    "tuple-index": (lambda g, z: (g, z), 0),
    "tuple-negative-index": (lambda g, z: (z, g), -1),
    "namedtuple-attribute": (lambda g, z: Pair(g, z), "recon"),
    "dataclass-attribute": (lambda g, z: Output(g), "recon"),
    "model-output-key": (lambda g, z: ModelOutput(recon=g, mu=z), "recon"),
    "callable": (lambda g, z: {"parts": [z, g]}, lambda out: out["parts"][1]),
}


@pytest.mark.parametrize("container", sorted(CONTAINERS))
@pytest.mark.parametrize("estimator", ["exact", "stochastic"])
def test_output_selector(container, estimator):
    pack, selector = CONTAINERS[container]
    dec, z, x = data("gaussian")
    wrapped = lambda code: pack(dec(code), code)  # noqa: E731
    options = dict(estimator=estimator, num_columns=2, reduction="none")
    ref = jacobian_regularizer(dec, z, BETA, generator=seeded(), **options)
    got = jacobian_regularizer(wrapped, z, BETA, output=selector, generator=seeded(), **options)
    assert_close(container, ref, got)
    assert_close(f"{container} grae", grae_loss(dec, z, x, BETA, generator=seeded(), **options),
                 grae_loss(wrapped, z, x, BETA, output=selector, generator=seeded(), **options))


@pytest.mark.parametrize("returns, output, error, message", [
    (lambda g: {"recon": g, "mu": g}, None, TypeError,
     r"returned a dict \(keys \['recon', 'mu'\]\), not a Tensor"),
    (lambda g: (g, g), None, TypeError, r"returned a tuple \(2 items\).*pass output="),
    (lambda g: {"recon": g}, "reconstruction", ValueError, r"output='reconstruction' selects nothing in the "
                                                            r"decoder's dict output \(keys \['recon'\]\)"),
    (lambda g: (g, g), 2, ValueError, r"output=2 selects nothing in the decoder's tuple output \(2 items\)"),
    (lambda g: Output(g), "x_hat", ValueError, r"Output output \(fields \['recon', 'hidden'\]\)"),
    (lambda g: Output(g), "hidden", TypeError, r"selected a NoneType from the decoder's Output output"),
    (lambda g: g, "recon", TypeError, r"the decoder returned a Tensor; leave output=None"),
    (lambda g: {"recon": g}, lambda out: out["recon"].tolist(), TypeError, r"selected a list"),
])
def test_output_errors_name_the_output_type(returns, output, error, message):
    dec, z, _ = data("gaussian")
    with pytest.raises(error, match=message):
        jacobian_regularizer(lambda code: returns(dec(code)), z, BETA, output=output)


# ---------------------------------------------------------------- torch.autocast (CPU bfloat16)

def test_autocast_bf16_decoder_accumulates_the_log_determinant_in_fp32():
    torch.manual_seed(3)
    dec = nn.Sequential(nn.Linear(6, 64), nn.ELU(), nn.Linear(64, 64), nn.ELU(), nn.Linear(64, 100))
    z = torch.randn(16, 6, requires_grad=True)
    params = [z, *dec.parameters()][:-1]  # J does not depend on the output bias
    ref = jacobian_regularizer(dec, z, 0.5, estimator="exact", reduction="none")
    ref_grads = torch.autograd.grad(ref.sum(), params)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, J = jacobian_columns(dec, z)
        got = {e: jacobian_regularizer(dec, z, 0.5, estimator=e, reduction="none", generator=seeded())
               for e in ("exact", "hadamard", "stochastic")}
        loss = grae_loss(dec, z, torch.randn(16, 100), 0.5, estimator="exact")
    assert J.dtype == torch.bfloat16                       # the decoder really ran in bf16
    assert all(r.dtype == torch.float32 for r in got.values()) and loss.dtype == torch.float32
    # Accumulation: the bf16 columns, upcast and reduced in float64, give R to fp32 rounding;
    # a Gram matrix formed in bf16 (autocast's matmul policy) is off by ~1e-3 here.
    assert_close("R from the bf16 J", 0.25 * exact_R(J.double(), 0.5), got["exact"].double(), rtol=1e-5)
    # Against the fp32 decoder: bf16 activations round to 2⁻⁹ relative per layer; measured 1e-3
    # for R and 8e-3 for the gradients (seed 3), checked at 1e-2 and RTOL[bf16] = 3e-2.
    assert_close("R bf16 vs fp32", ref, got["exact"], rtol=1e-2)
    grads = torch.autograd.grad(got["exact"].sum(), params)
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        assert g.dtype == torch.float32
        assert_close(f"grad {i} bf16 vs fp32", r, g, rtol=RTOL[torch.bfloat16])


# ---------------------------------------------------------------- DistributedDataParallel

DDP_WORKER = textwrap.dedent("""
    import copy, sys, torch, torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    from fastjac import jacobian_regularizer
    rank, world, rendezvous = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    dist.init_process_group("gloo", init_method="file://" + rendezvous, rank=rank, world_size=world)
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ELU(), torch.nn.Linear(16, 30)).double()
    torch.manual_seed(1 + rank)
    z, x = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 30, dtype=torch.float64)

    def step(forward, regularised):
        loss = ((forward(z) - x) ** 2).mean() + jacobian_regularizer(regularised, z, 0.5, estimator="exact")
        loss.backward()

    def grads(module):
        return torch.cat([p.grad.flatten() for p in module.parameters()])

    local = copy.deepcopy(base)
    step(local, local)
    mine = grads(local)
    every = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(every, mine)
    want = torch.stack(every).mean(0)
    model = DDP(copy.deepcopy(base))
    for _ in range(2):  # a second step fails if DDP's reduction did not finish in the first
        model.zero_grad()
        step(model, model)  # the regulariser gets the DDP wrapper itself
    err = float((grads(model.module) - want).abs().max())
    assert err < 1e-12, f"rank {rank}: DDP gradient differs from the mean of local gradients by {err}"
    assert float((mine - want).abs().max()) > 1e-6, "ranks saw the same data: the test proves nothing"
    print(f"rank {rank} ok {err:.1e}")
    dist.destroy_process_group()
""")


def test_ddp_wrapped_decoder_gradients_are_all_reduced(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(DDP_WORKER)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    world = 2
    procs = [subprocess.Popen([sys.executable, str(script), str(r), str(world), str(tmp_path / "rdv")],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for r in range(world)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    for rank, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0 and f"rank {rank} ok" in out, out[-3000:]


# ---------------------------------------------------------------- torch.compile

def test_compiled_decoder_is_differentiated_eagerly_and_stays_compiled():
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    dec, z, _ = data("gaussian")
    compiled = torch.compile(dec, backend="eager")
    ref = jacobian_regularizer(dec, z, BETA, estimator="exact", reduction="none")
    for decoder in (compiled, functools.partial(compiled)):
        assert_close("compiled decoder", ref, jacobian_regularizer(decoder, z, BETA, estimator="exact",
                                                                   reduction="none"))
    assert not counters["unimplemented"], dict(counters["unimplemented"])  # jvp never reached dynamo
    compiled(z)  # jvp of a compiled module would have marked its code skipped; it must still compile
    assert counters["stats"]["unique_graphs"] >= 1


@pytest.mark.parametrize("estimator", ["stochastic"])  # GRAE≈; each compile costs seconds
def test_compiling_around_the_regularizer(estimator):
    torch._dynamo.reset()
    dec, z, _ = data("gaussian")

    def regularised(code, generator):
        return jacobian_regularizer(dec, code, BETA, estimator=estimator, generator=generator,
                                    reduction="none")
    ref = regularised(z, seeded())
    got = torch.compile(regularised, backend="aot_eager")(z, seeded())
    assert_close(f"compiled {estimator}", ref, got)
    assert_close(f"compiled {estimator} dz", torch.autograd.grad(ref.sum(), z)[0],
                 torch.autograd.grad(got.sum(), z)[0])


# ---------------------------------------------------------------- nn.Module

def test_module_forward_is_the_functional():
    dec, z, x = data("bernoulli")
    options = dict(estimator="stochastic", num_columns=2, block_size=2, observation="bernoulli",
                   orthogonality_weight=0.1, reduction="none")
    reg = JacobianRegularizer(BETA, generator=seeded(), **options)
    assert_close("module", jacobian_regularizer(dec, z, BETA, x=x, generator=seeded(), **options),
                 reg(dec, z, x))
    reg.beta.fill_(0.3)  # β schedules write the buffer in place
    reg.generator = seeded()
    assert_close("module β=0.3", jacobian_regularizer(dec, z, 0.3, x=x, generator=seeded(), **options),
                 reg(dec, z, x))
    with pytest.raises(ValueError, match="x is required"):
        reg(dec, z)


def test_module_repr_shows_beta_and_what_differs_from_the_defaults():
    reg = JacobianRegularizer(0.5, estimator="exact", num_columns=3, output="recon")
    assert repr(reg) == ("JacobianRegularizer(beta=0.5, estimator='exact', observation='gaussian', "
                         "num_columns=3, output='recon')")


def _saved_and_loaded(module):
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_module_state_dict_round_trips():
    reg = JacobianRegularizer(0.25, estimator="fischer", block_size=2, observation=fastjac.Gaussian(0.5),
                              orthogonality_weight=0.2, reduction="sum", output="recon")
    fresh = JacobianRegularizer(1.0)
    fresh.load_state_dict(_saved_and_loaded(reg))
    assert float(fresh.beta) == 0.25 and repr(fresh) == repr(reg)
    dec, z, _ = data("gaussian")
    wrapped = lambda code: {"recon": dec(code)}  # noqa: E731
    assert_close("loaded module", reg(wrapped, z), fresh(wrapped, z))


def test_module_state_with_a_callable_selector_needs_it_given_again():
    select = lambda out: out[0]  # noqa: E731
    state = _saved_and_loaded(JacobianRegularizer(0.5, output=select))
    with pytest.raises(ValueError, match=r"custom output \(function\).*cannot be serialised"):
        JacobianRegularizer(1.0).load_state_dict(state)
    again = JacobianRegularizer(1.0, output=select)
    again.load_state_dict(state)
    assert again.output is select and float(again.beta) == 0.5


def test_module_rejects_bad_configuration():
    with pytest.raises(TypeError, match="unknown option.*num_column"):
        JacobianRegularizer(0.5, num_column=2)
    with pytest.raises(ValueError, match="estimator must be one of"):
        JacobianRegularizer(0.5, estimator="exactly")
    with pytest.raises(ValueError, match="beta must be finite and > 0"):
        JacobianRegularizer(-1.0)
    with pytest.raises(ValueError, match="observation must be one of"):
        JacobianRegularizer(0.5, observation="poisson")


# ----------------------------------------------------------------------------- the keyword contract
OLD_KEYWORDS = {  # every keyword and default of the public signatures before the estimators package
    "estimator": None, "num_columns": 1, "block_size": 1, "observation": "gaussian",
    "orthogonality_weight": 0.0, "reduction": "mean", "generator": None, "chunk_size": None,
    "output": None, "num_probes": 1, "cg_max_iter": 100, "cg_tol": 1e-6, "backend": "auto"}


@pytest.mark.parametrize("function,estimator,extra", [
    (fastjac.jacobian_regularizer, "stochastic", {"x": None}),
    (fastjac.grae_loss, "exact", {}),
    (fastjac.grae_terms, "exact", {}),
])
def test_public_keywords_and_defaults_are_kept(function, estimator, extra):
    import inspect
    params = inspect.signature(function).parameters
    expected = {**OLD_KEYWORDS, "estimator": estimator, **extra}
    if function is fastjac.grae_terms:
        expected.pop("reduction")
    for name, default in expected.items():
        assert name in params and params[name].kind is inspect.Parameter.KEYWORD_ONLY, name
        assert params[name].default == default, name


def test_unknown_keyword_and_positional_settings_are_refused():
    from fastjac.estimators import Settings
    dec = torch.nn.Linear(3, 4)
    with pytest.raises(TypeError, match="'estimater'"):
        fastjac.grae_loss(dec, torch.randn(2, 3), torch.randn(2, 4), 0.5, estimater="exact")
    with pytest.raises(TypeError, match="'x'"):
        fastjac.grae_terms(dec, torch.randn(2, 3), torch.randn(2, 4), 0.5, reduction="sum", x=None)
    with pytest.raises(TypeError):
        Settings("exact")  # keyword only: no setting is ever taken by position


def test_estimators_are_registered_explicitly():
    import pathlib

    import fastjac.estimators
    from fastjac.estimators import ESTIMATORS, register_estimator
    assert list(ESTIMATORS) == ["exact", "fischer", "hadamard", "frobenius", "stochastic", "hutchinson_cg"]
    package = pathlib.Path(fastjac.estimators.__file__).parent
    for module in package.glob("*.py"):  # only the registry's table registers (no import side effects)
        if module.name not in ("registry.py", "__init__.py"):
            assert "ESTIMATORS" not in module.read_text() and "register_estimator" not in module.read_text()

    def twice_hadamard(decoder, z, beta, obs, x, s):
        est = ESTIMATORS["hadamard"](decoder, z, beta, obs, x, s)
        return est._replace(R=2 * est.R)

    register_estimator("twice_hadamard", twice_hadamard)
    try:
        dec, z = torch.nn.Linear(3, 5).double(), torch.randn(2, 3, dtype=torch.float64)
        assert_close("custom estimator", 2 * fastjac.jacobian_regularizer(dec, z, 0.5, estimator="hadamard"),
                     fastjac.jacobian_regularizer(dec, z, 0.5, estimator="twice_hadamard"))
    finally:
        del ESTIMATORS["twice_hadamard"]


def test_info_names_where_each_estimator_lives_and_the_check_state(capsys):
    report = fastjac.info()
    assert report["estimators"]["stochastic"] == "fastjac.estimators.stochastic.stochastic"
    assert report["value_checks"] is True
    with fastjac.checks(False):
        assert fastjac.info()["value_checks"] is False
    assert "estimators: exact (fastjac.estimators.full.exact)" in capsys.readouterr().out
