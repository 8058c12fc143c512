"""Attacks on the loss layer (thread-local checks, autocast, NaN decoders, user mistakes), each
reproduced as it was reported and held: a clear error naming the cause, or the right number."""
import threading

import pytest
import torch

import fastjac
from fastjac import observations
from utils import assert_close, mlp_decoder

BETA = 0.5


# ----------------------------------------------------------------------------- threads
def _nan_loss_raises() -> bool:
    dec = mlp_decoder(3, 5, dtype=torch.float32)
    z = torch.randn(2, 3)
    z[0, 0] = float("nan")
    try:
        fastjac.jacobian_regularizer(dec, z, BETA, estimator="exact")
    except ValueError as error:
        return "z contains non-finite" in str(error)
    return False


def test_checks_off_in_overlapping_threads_leaves_them_on_elsewhere_and_afterwards():
    """Attack: A enters checks(False), B enters, A leaves, B leaves (the old global switch then
    stayed off for the process), and while A is inside, a third thread passes NaN."""
    a_in, b_in, a_out, c_done = (threading.Event() for _ in range(4))
    seen = {}

    def thread_a():
        with fastjac.checks(False):
            a_in.set()
            b_in.wait(10)
            c_done.wait(10)
        a_out.set()

    def thread_b():
        a_in.wait(10)
        with fastjac.checks(False):
            b_in.set()
            a_out.wait(10)
            seen["b still off"] = not fastjac._validation.values_checked()

    def thread_c():
        b_in.wait(10)
        seen["c caught NaN"] = _nan_loss_raises()
        c_done.set()

    threads = [threading.Thread(target=t) for t in (thread_a, thread_b, thread_c)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert seen == {"b still off": True, "c caught NaN": True}
    assert fastjac._validation.values_checked() and _nan_loss_raises()


def test_set_checks_is_the_process_default_and_a_thread_block_overrides_it():
    try:
        fastjac.set_checks(False)
        assert not _nan_loss_raises()
        with fastjac.checks(True):
            assert _nan_loss_raises()
    finally:
        fastjac.set_checks(True)
    assert _nan_loss_raises()


# ----------------------------------------------------------------------------- autocast
def _bernoulli_decoder():
    """sigmoid(logits), logits 7 ± 3: many outputs round to 1.0 in bfloat16 (the reported attack)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 30)
    with torch.no_grad():
        lin.bias.copy_(7 + 3 * torch.randn(30))
        lin.weight.mul_(2)
    return lambda z: torch.sigmoid(lin(z))


def _reference(estimator, out, J, x, generator_seed):
    """float64 maths on the decoder's own (low-precision) output and columns, Bernoulli w with the clamp."""
    g = out.double().clamp(1e-6, 1 - 1e-6).reshape(out.shape[0], -1)
    w = x / g ** 2 + (1 - x) / (1 - g) ** 2
    Jw = J.double() * w.sqrt().unsqueeze(-1)
    G = Jw.mT @ Jw
    d = G.shape[-1]
    diag = G.diagonal(dim1=-2, dim2=-1)
    if estimator == "exact":
        return torch.linalg.slogdet(torch.eye(d, dtype=G.dtype) + G / BETA)[1]
    if estimator == "hadamard":
        return torch.log1p(diag / BETA).sum(-1)
    if estimator == "frobenius":
        return diag.sum(-1) / BETA
    cols = torch.randint(d, (G.shape[0], 1), generator=torch.Generator().manual_seed(generator_seed))
    return d * torch.log1p(diag.gather(1, cols) / BETA).mean(-1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("estimator", ["exact", "stochastic", "hadamard", "frobenius"])
def test_bernoulli_decoder_under_autocast_gives_finite_right_values(estimator, dtype):
    """Attack: exact/stochastic/hadamard raised "weights must be finite" (w = 0/0 from a clamp
    1 − 1e-6 that rounds to 1 in bf16) and frobenius returned NaN. Weights are now computed in
    float32 from the decoder output: the result is R of the low-precision decoder's own output
    and columns, to float32 accumulation."""
    dec = _bernoulli_decoder()
    z = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    x = (dec(z) > 0.5).float()  # the data the decoder reconstructs (x = 1 where g rounds to 1: w = 0/0 before)
    with torch.autocast("cpu", dtype=dtype):
        R = fastjac.jacobian_regularizer(dec, z, BETA, x=x, observation="bernoulli", estimator=estimator,
                                         reduction="none", generator=torch.Generator().manual_seed(0))
        out, J = fastjac.jacobian_columns(dec, z)
        loss = fastjac.grae_loss(dec, z, x, BETA, observation="bernoulli", estimator=estimator)
    assert out.dtype == dtype and (out == 1).any()  # the attack's condition holds
    ref = _reference(estimator, out, J, x.double(), 0) * BETA / 2
    assert ref.abs().max() > 1e-3  # not vacuous: the saturated outputs do not make R vanish
    assert_close(f"{estimator} under {dtype} autocast", ref, R.double(), rtol=1e-4)
    assert torch.isfinite(loss)


# ----------------------------------------------------------------------------- NaN decoders
def _nan_decoder():
    net = mlp_decoder(4, 6, dtype=torch.float64)
    return lambda z: net(z) * torch.where(z[:, :1] > 0, float("nan"), 1.0)


@pytest.mark.parametrize("estimator", ["exact", "fischer", "hadamard", "frobenius", "stochastic", "hutchinson_cg"])
def test_decoder_returning_nan_is_named(estimator):
    """Attack: frobenius returned NaN; hutchinson_cg blamed `directions` (never passed by the user)."""
    z = torch.randn(4, 4, dtype=torch.float64)
    z[0, 0] = 1.0
    with pytest.raises(ValueError, match="^the decoder output g\\(z\\) contains non-finite") as info:
        fastjac.jacobian_regularizer(_nan_decoder(), z, BETA, estimator=estimator)
    assert "directions" not in str(info.value)


def test_decoder_returning_nan_with_checks_off_is_not_caught_but_costs_nothing():
    z = torch.ones(2, 4, dtype=torch.float64)
    with fastjac.checks(False):
        R = fastjac.jacobian_regularizer(_nan_decoder(), z, BETA, estimator="frobenius", reduction="none")
    assert torch.isnan(R).all()


# ----------------------------------------------------------------------------- user mistakes
DEC = mlp_decoder(3, 6, dtype=torch.float64)
SIGMOID_DEC = (lambda z: torch.sigmoid(DEC(z)))
Z = torch.randn(4, 3, dtype=torch.float64)


@pytest.mark.parametrize("observation", ["bernoulli", "bernoulli_logits"])
def test_bernoulli_x_outside_unit_interval_says_so(observation):
    x = torch.rand(4, 6, dtype=torch.float64) * 2
    with pytest.raises(ValueError, match=r"x must be in \[0, 1\]"):
        fastjac.grae_loss(SIGMOID_DEC, Z, x, BETA, observation=observation)


@pytest.mark.parametrize("estimator", ["exact", "stochastic"])
@pytest.mark.parametrize("observation", ["gaussian", "bernoulli"])
def test_x_of_the_wrong_shape_says_both_shapes(observation, estimator):
    """Attack: Bernoulli x of the wrong shape gave torch's raw broadcast error."""
    x = torch.rand(4, 5, dtype=torch.float64).round()
    with pytest.raises(ValueError, match=r"x must hold one target per decoder output: x has shape "
                                         r"\(4, 5\), the decoder returned \(4, 6\)"):
        fastjac.grae_loss(SIGMOID_DEC, Z, x, BETA, observation=observation, estimator=estimator)


@pytest.mark.parametrize("estimator", ["exact", "stochastic", "hutchinson_cg"])
def test_decoder_and_z_dtype_mismatch_names_both(estimator):
    """Attack: a float32 decoder with float64 codes gave torch's raw matmul error."""
    dec32 = mlp_decoder(3, 6, dtype=torch.float32)
    with pytest.raises(ValueError, match="z has dtype torch.float64 but the decoder's parameters are "
                                         "torch.float32"):
        fastjac.jacobian_regularizer(dec32, Z, BETA, estimator=estimator)


@pytest.mark.parametrize("block_size,num_columns", [(1, 4), (2, 3)])
def test_more_draws_than_columns_is_refused(block_size, num_columns):
    """Attack: num_columns > d was accepted silently (more JVPs than the exact bound needs)."""
    with pytest.raises(ValueError, match="num_columns must be <="):
        fastjac.jacobian_regularizer(DEC, Z, BETA, estimator="stochastic", num_columns=num_columns,
                                     block_size=block_size)
    fastjac.jacobian_regularizer(DEC, Z, BETA, estimator="stochastic", num_columns=num_columns - 1,
                                 block_size=block_size)


def test_observation_weights_are_float32_from_a_half_output():
    out = torch.full((2, 3), 1.0, dtype=torch.bfloat16)
    x = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    w = observations.observation_weights(observations.Bernoulli(), out, x)
    assert w.dtype == torch.float32 and torch.isfinite(w).all()
    assert w[0, 1] == pytest.approx(1 / 1e-6 ** 2, rel=5e-2)  # the clamp 1 − 1e-6 held (fp32 spacing 6e-8)


def test_an_interrupted_call_leaves_no_deferred_block_behind():
    """A decoder interrupted mid-call (KeyboardInterrupt is no Exception) must not leave the thread
    inside a deferred block, where later checks would be recorded and never read."""
    def interrupted(z):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fastjac.jacobian_regularizer(interrupted, torch.randn(2, 3), BETA)
    assert _nan_loss_raises()
    with pytest.raises(ValueError, match="contains non-finite"):
        fastjac.logdet_gram(torch.full((1, 2, 2), float("nan")), BETA)


def test_legacy_import_paths_still_work():
    """fastjac.regularizer and fastjac.hutchinson are faces of the new homes (users import them)."""
    from fastjac import estimators, hutchinson, objectives, regularizer
    from fastjac.estimators import hutchinson as moved
    assert regularizer.ESTIMATORS is estimators.ESTIMATORS
    assert regularizer.jacobian_regularizer is objectives.jacobian_regularizer
    assert regularizer.observation_weights is observations.observation_weights
    assert hutchinson.ConvergenceWarning is moved.ConvergenceWarning
    dec, z = mlp_decoder(3, 4), torch.randn(2, 3, dtype=torch.float64)
    s = regularizer.Settings(estimator="exact")
    t = regularizer.regularizer_terms(dec, z, BETA, settings=s)
    assert_close("regularizer_terms", fastjac.jacobian_regularizer(dec, z, BETA, estimator="exact", reduction="none"),
                 t.regularizer)


def test_deferred_checks_of_concurrent_calls_stay_in_their_thread():
    """Thread A's call is inside its deferred block (its decoder waits) while thread B passes NaN:
    B raises, A returns its value; neither sees the other's flags."""
    net = mlp_decoder(3, 5, dtype=torch.float64)
    inside, b_done = threading.Event(), threading.Event()
    results = {}

    def slow(z):
        inside.set()
        b_done.wait(10)
        return net(z)

    def thread_a():
        results["a"] = fastjac.grae_loss(slow, torch.randn(2, 3, dtype=torch.float64),
                                         torch.randn(2, 5, dtype=torch.float64), BETA, estimator="frobenius")

    def thread_b():
        inside.wait(10)
        results["b"] = _nan_loss_raises()
        b_done.set()

    threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results["b"] is True and torch.isfinite(results["a"])
