"""Concurrent calls from several threads (issue: 4 threads × 300 calls of the exact regulariser
raised forward-AD "no level exists" errors and returned 0.0 without a graph). torch.func's
forward-AD levels are process-wide; fastjac.jacobian.FORWARD_AD_LOCK serialises the tangent pass."""
import threading

import pytest
import torch

import fastjac
from fastjac.jacobian import FORWARD_AD_LOCK
from utils import assert_close, mlp_decoder

THREADS, CALLS = 4, 60


@pytest.mark.parametrize("path", ["torch.func", "stacked"])
def test_concurrent_regularizer_calls_give_the_sequential_result_with_a_graph(path):
    seq = mlp_decoder(4, 12, hidden=16)
    dec = seq if path == "stacked" else (lambda v: seq(v))  # a lambda hides the Sequential: forward AD
    z = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    want = fastjac.jacobian_regularizer(dec, z, 0.5, estimator="exact")
    want_grad = torch.autograd.grad(want, next(seq.parameters()))[0]
    results, errors = [], []
    start = threading.Barrier(THREADS)

    def work():
        start.wait()
        for _ in range(CALLS):
            try:
                value = fastjac.jacobian_regularizer(dec, z, 0.5, estimator="exact")
                grad = torch.autograd.grad(value, next(seq.parameters()))[0]
                results.append((value.detach(), value.grad_fn is not None, grad))
            except Exception as error:  # noqa: BLE001 - every failure is collected and reported
                errors.append(repr(error))

    threads = [threading.Thread(target=work) for _ in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, f"{len(errors)} of {THREADS * CALLS} calls failed, e.g. {errors[0]}"
    assert len(results) == THREADS * CALLS
    for value, has_graph, grad in results:
        assert has_graph
        assert_close("R", want.detach(), value)
        assert_close("dR/dW", want_grad, grad)


def test_the_lock_is_reentrant_for_decoders_that_compute_columns_themselves():
    dec = mlp_decoder(3, 5, hidden=8)
    z = torch.randn(2, 3, dtype=torch.float64)
    with FORWARD_AD_LOCK:
        _, J = fastjac.jacobian_columns(dec, z)
    assert J.shape == (2, 5, 3)
