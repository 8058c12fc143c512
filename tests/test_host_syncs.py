"""Host round-trips per GRAE step (issue: no syncs in the hot path).

A host round-trip is any point where the host waits for a tensor's value: ``item``/``float``/
``bool`` (aten._local_scalar_dense), ``tolist``, ``nonzero`` (boolean-mask indexing), ``equal``.
On a GPU each one stalls the launch queue and makes the step impossible to capture in a CUDA
graph. They are counted here on the CPU, by a dispatch mode (every aten call, also inside
torch.func transforms and the backward) plus a patch of ``Tensor.tolist`` (which reads memory
without dispatching). Contract: 0 per step (forward + backward) with checks off; exactly 1 with
checks on (all value checks of the call share one deferred sync).
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastjac
from utils import mlp_decoder

aten = torch.ops.aten
SYNCING = {aten._local_scalar_dense.default, aten.nonzero.default, aten.equal.default,
           aten.is_nonzero.default, aten.item.default, aten.masked_select.default,
           aten._unique2.default, aten.unique_consecutive.default}


def _syncs(func, args) -> bool:
    """A host round-trip on a GPU: reads a value, or has an output shape that depends on values
    (boolean-mask indexing runs nonzero inside the CPU kernel, unseen by the dispatcher)."""
    if func in SYNCING:
        return True
    if func is aten.index.Tensor:
        return any(i is not None and i.dtype == torch.bool for i in args[1])
    return False


class HostSyncs(TorchDispatchMode):
    """Counts host round-trips while active (see the module docstring); ``.ops`` names them."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if _syncs(func, args):
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self._tolist = torch.Tensor.tolist
        counter = self

        def tolist(t):
            counter.ops.append("tolist")
            return counter._tolist(t)
        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)

    @property
    def count(self):
        return len(self.ops)


def test_the_counter_sees_every_kind_of_round_trip():
    """Power check: a step with known syncs is counted exactly (the counter is not blind)."""
    t = torch.randn(5)
    with HostSyncs() as syncs:
        bool(t.sum() > 0)
        float(t.max())
        t.tolist()
        _ = t[t > 0]
        _ = torch.randn(3, requires_grad=True).mul(2).sum().item()
    assert syncs.count == 5, syncs.ops


B, D, d = 4, 12, 6
CASES = {
    "exact": dict(estimator="exact"),
    "fischer": dict(estimator="fischer", block_size=2),
    "hadamard": dict(estimator="hadamard"),
    "frobenius": dict(estimator="frobenius"),
    "stochastic": dict(estimator="stochastic", num_columns=2),
    "stochastic blocks": dict(estimator="stochastic", num_columns=2, block_size=2),
    "orthogonality (stochastic)": dict(estimator="stochastic", block_size=2, orthogonality_weight=0.5),
    "orthogonality (exact)": dict(estimator="exact", block_size=2, orthogonality_weight=0.5),
    "bernoulli exact": dict(estimator="exact", observation="bernoulli"),
    "bernoulli stochastic": dict(estimator="stochastic", observation="bernoulli"),
    "bernoulli_logits": dict(estimator="exact", observation="bernoulli_logits"),
}


def _step(options, beta):
    net = mlp_decoder(d, D, dtype=torch.float32)
    dec = (lambda z: torch.sigmoid(net(z))) if options.get("observation") == "bernoulli" else net
    z = torch.randn(B, d, requires_grad=True)
    x = torch.rand(B, D).round()
    gen = torch.Generator().manual_seed(0)

    def step():
        loss = fastjac.grae_loss(dec, z, x, beta, generator=gen, **options)
        loss.backward()
        return loss
    return step


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("beta", [0.5, "tensor"], ids=["beta float", "beta tensor"])
def test_grae_step_syncs_once_with_checks_and_never_without(case, beta):
    beta = torch.tensor(0.5) if beta == "tensor" else beta
    step = _step(CASES[case], beta)
    step()  # first call: lazy imports, backend choice
    with fastjac.checks(False), HostSyncs() as off:
        step()
    with fastjac.checks(True), HostSyncs() as on:
        step()
    assert off.count == 0, f"{case}, checks off: {off.ops}"
    assert on.count == 1, f"{case}, checks on: {on.ops}"


def test_jacobian_regularizer_and_module_sync_once():
    net = mlp_decoder(d, D, dtype=torch.float32)
    z = torch.randn(B, d)
    reg = fastjac.nn.JacobianRegularizer(0.5, estimator="stochastic")
    reg(net, z)
    for call in (lambda: fastjac.jacobian_regularizer(net, z, 0.5), lambda: reg(net, z)):
        with HostSyncs() as on:
            call()
        with fastjac.checks(False), HostSyncs() as off:
            call()
        assert (on.count, off.count) == (1, 0), (on.ops, off.ops)


def test_deferred_checks_still_name_the_first_bad_argument():
    net = mlp_decoder(d, D, dtype=torch.float32)
    z = torch.randn(B, d)
    x = torch.rand(B, D)
    bad_z, bad_x = z.clone(), x.clone()
    bad_z[1, 2], bad_x[0, 0] = float("nan"), float("inf")
    with pytest.raises(ValueError, match="^z contains non-finite"):
        fastjac.grae_loss(net, bad_z, bad_x, 0.5)
    with pytest.raises(ValueError, match="^x contains non-finite"):
        fastjac.grae_loss(net, z, bad_x, 0.5)
    with pytest.raises(ValueError, match="beta must be finite and > 0"):
        fastjac.grae_loss(net, z, x, torch.tensor(-1.0))


class Reductions(TorchDispatchMode):
    """Records the input shapes of the finiteness reductions (a full sum) while active."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is aten.sum.default:
            self.shapes.append(tuple(args[0].shape))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("estimator", ["exact", "fischer", "hadamard", "stochastic"])
def test_each_input_is_checked_finite_once_per_call(estimator):
    """One grae_loss call reads z once and J once (the public entry points it reaches inside,
    jacobian_columns and the operator, do not check them again)."""
    net = mlp_decoder(d, D, dtype=torch.float32)
    z, x = torch.randn(B, d), torch.rand(B, D)
    fastjac.grae_loss(net, z, x, 0.5, estimator=estimator)
    with Reductions() as seen:
        fastjac.grae_loss(net, z, x, 0.5, estimator=estimator)
    k = d if estimator != "stochastic" else 1
    assert seen.shapes.count((B, d)) == 1, seen.shapes            # z
    assert seen.shapes.count((B, D, k)) == 1, seen.shapes         # J (or the drawn columns)
    assert seen.shapes.count((B, D)) == 2, seen.shapes            # x and the decoder output


def test_deferred_check_api():
    """condition/finite act at once outside a deferred block, record inside it (nested blocks join
    the outer one, one sync at its end), and do nothing with checks off."""
    from fastjac import _validation as check
    nan = torch.tensor([1.0, float("nan")])
    with pytest.raises(ValueError, match="^a contains non-finite"):
        check.finite("a", nan)
    with pytest.raises(ValueError, match="^b bad$"):
        check.condition("b", torch.tensor([True, False]), "b bad")
    with HostSyncs() as syncs, pytest.raises(ValueError, match="^second$"):
        with check.deferred():
            check.condition("first", torch.tensor(True), "first")
            with check.deferred():
                check.condition("second", torch.tensor(False), "second")
                check.finite("third", nan)
            assert syncs.count == 0  # nothing read yet: the inner block joined the outer one
    assert syncs.count == 1
    with fastjac.checks(False), HostSyncs() as off:
        check.finite("a", nan)
        check.condition("b", torch.tensor(False), "b bad")
    assert off.count == 0
    with pytest.raises(ValueError, match="python bools"):
        check.condition("c", False, "python bools raise at once")
