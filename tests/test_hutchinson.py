"""estimator="hutchinson_cg": CG against a dense solve, SLQ against log det, the gradient against
the exact estimator's within its standard error, the decoder-call count the docs state, bad input."""
import logging
import warnings

import pytest
import torch

from fastjac import grae_loss, jacobian_columns, jacobian_regularizer, logdet_gram, observations
from fastjac.estimators.hutchinson import (ConvergenceWarning, conjugate_gradients, draw_probes, gram_matvec,
                                lanczos_quadrature)
from fastjac.estimators import ESTIMATORS, Settings
from tests.utils import assert_close, mlp_decoder

F64 = torch.float64
BETA = 0.3


class Counting:
    """A decoder wrapper that counts calls (vmap traces a call once for all its tangents)."""

    def __init__(self, decoder):
        self.decoder, self.calls = decoder, 0

    def __call__(self, z):
        self.calls += 1
        return self.decoder(z)


class TinyConv(torch.nn.Module):
    """Image output (B, 1, 6, 6) in (0, 1), so w for Bernoulli is (B, D) over a reshaped output."""

    def __init__(self, d):
        super().__init__()
        self.fc = torch.nn.Linear(d, 2 * 3 * 3)
        self.up = torch.nn.ConvTranspose2d(2, 1, 4, stride=2, padding=1)

    def forward(self, z):
        return torch.sigmoid(self.up(torch.nn.functional.elu(self.fc(z)).reshape(-1, 2, 3, 3)))


def problem(kind, d=4, B=3, seed=0):
    """(decoder, z, x, observation name): a float64 MLP (Gaussian) or a sigmoid decoder (Bernoulli)."""
    torch.manual_seed(seed)
    if kind == "gaussian":
        dec, obs, shape = mlp_decoder(d, 10, hidden=16, seed=seed), "gaussian", (B, 10)
    elif kind == "bernoulli":
        dec = torch.nn.Sequential(mlp_decoder(d, 10, hidden=16, seed=seed), torch.nn.Sigmoid())
        obs, shape = "bernoulli", (B, 10)
    else:
        dec, obs, shape = TinyConv(d).to(F64), "bernoulli", (B, 1, 6, 6)
    z = torch.randn(B, d, dtype=F64)
    x = torch.rand(shape, dtype=F64) * 0.6 + 0.2
    return dec, z, x, obs


def explicit_M(dec, z, x, obs):
    out, J = jacobian_columns(dec, z)
    w = observations.get(obs).weights(out, x)
    w = w.reshape(z.shape[0], -1) if isinstance(w, torch.Tensor) else torch.full(J.shape[:2], float(w), dtype=F64)
    return torch.eye(z.shape[1], dtype=F64) + J.mT @ (w.unsqueeze(-1) * J) / BETA, J, w


@pytest.mark.parametrize("kind", ["gaussian", "bernoulli", "conv"])
def test_matvec_and_cg_match_dense_solve(kind):
    dec, z, x, obs = problem(kind, d=5)
    M, _, _ = explicit_M(dec, z, x, obs)
    matvec = gram_matvec(dec, z, BETA, observations.get(obs), x)
    V = torch.randn(7, *z.shape, dtype=F64)
    assert_close("matvec", torch.einsum("bij,pbj->pbi", M, V), matvec(V), rtol=1e-12)
    rhs = V.clone()
    cg = conjugate_gradients(matvec, rhs, max_iter=50, tol=1e-12)
    assert torch.equal(rhs, V) and bool(cg.converged.all())
    expected = torch.linalg.solve(M.expand(7, -1, -1, -1), V.unsqueeze(-1)).squeeze(-1)
    assert_close("CG solution", expected, cg.solution, rtol=1e-9)


def test_cg_batched_systems_stop_independently():
    torch.manual_seed(1)
    n = 6
    A = torch.randn(4, n, n, dtype=F64)
    A = A @ A.mT + torch.eye(n, dtype=F64)
    A[0] = 2 * torch.eye(n, dtype=F64)                       # converges after one step
    A[1] = torch.diag(torch.tensor([1.0, 1, 5, 5, 5, 5], dtype=F64))  # two distinct eigenvalues: two steps
    b = torch.randn(4, n, dtype=F64)
    cg = conjugate_gradients(lambda v: (A @ v.unsqueeze(-1)).squeeze(-1), b, max_iter=40, tol=1e-12)
    assert cg.iterations[0] == 1 and cg.iterations[1] == 2 and bool(cg.converged.all())
    assert int(cg.iterations.max()) == cg.alphas.shape[0] <= 40
    assert_close("batched CG", torch.linalg.solve(A, b), cg.solution, rtol=1e-9)
    assert (cg.alphas[cg.iterations[0]:, 0] == 0).all()      # a stopped system no longer moves
    lam, Q = torch.linalg.eigh(A)                            # padding T past a system's stop adds nothing
    expected = torch.einsum("bi,bij,bj->b", b, Q @ torch.diag_embed(lam.log()) @ Q.mT, b)
    assert_close("quadrature", expected, lanczos_quadrature(cg, b), rtol=1e-9)


def test_lanczos_quadrature_is_exact_on_a_complete_krylov_space():
    dec, z, x, obs = problem("bernoulli", d=5)
    M, _, _ = explicit_M(dec, z, x, obs)
    eps = draw_probes("gaussian", (9, *z.shape), z, torch.Generator().manual_seed(3))
    cg = conjugate_gradients(lambda v: torch.einsum("bij,pbj->pbi", M, v), eps, max_iter=50, tol=1e-13)
    lam, Q = torch.linalg.eigh(M)
    logM = Q @ torch.diag_embed(lam.log()) @ Q.mT
    expected = torch.einsum("pbi,bij,pbj->pb", eps, logM, eps)
    assert_close("e1ᵀ log(T) e1", expected, lanczos_quadrature(cg, eps), rtol=1e-8)


@pytest.mark.parametrize("probes", ["rademacher", "gaussian"])
def test_value_is_slq_and_converges_to_logdet(probes):
    dec, z, x, obs = problem("gaussian", d=6, B=4)
    M, J, _ = explicit_M(dec, z, x, obs)
    exact = logdet_gram(J, BETA)
    P, seed = 400, 5
    s = Settings(estimator="hutchinson_cg", num_probes=P, cg_tol=1e-12, generator=torch.Generator().manual_seed(seed),
                 extra={"probes": probes})
    est = ESTIMATORS["hutchinson_cg"](dec, z, BETA, observations.get(obs), None, s)
    # The same probes through a dense CG: the returned value is exactly their SLQ mean.
    eps = draw_probes(probes, (P, *z.shape), z, torch.Generator().manual_seed(seed))
    cg = conjugate_gradients(lambda v: torch.einsum("bij,pbj->pbi", M, v), eps, max_iter=50, tol=1e-12)
    per_probe = lanczos_quadrature(cg, eps)
    assert_close("value", per_probe.mean(0), est.R.detach(), rtol=1e-9)
    se = per_probe.std(0) / P ** 0.5
    assert ((est.R.detach() - exact).abs() <= 5 * se).all(), (est.R, exact, se)
    assert (se < 0.05 * exact).all()  # the bound is tight enough to mean something


def flat_grad(loss, inputs):
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, inputs)])


@pytest.mark.parametrize("kind", ["gaussian", "bernoulli"])
def test_gradient_is_unbiased_for_the_exact_gradient(kind):
    dec, z, x, obs = problem(kind, d=4, B=3)
    z.requires_grad_(True)
    beta = torch.tensor(BETA, dtype=F64, requires_grad=True)
    inputs = [*dec.parameters(), z, beta]

    def grad(estimator, **kw):
        return flat_grad(grae_loss(dec, z, x, beta, estimator=estimator, observation=obs, **kw), inputs)

    exact = grad("exact")
    g = torch.Generator().manual_seed(11)
    draws = torch.stack([grad("hutchinson_cg", num_probes=64, cg_tol=1e-12, generator=g) for _ in range(40)])
    mean, se = draws.mean(0), draws.std(0) / draws.shape[0] ** 0.5
    worst = float(((mean - exact).abs() / (se + 1e-15)).max())
    assert worst <= 5.0, f"hutchinson_cg gradient is {worst:.1f} standard errors from exact"
    # Non-vacuous: the same bound resolves the (biased) Hadamard gradient from the exact one.
    assert ((grad("hadamard") - exact).abs() > 5 * se).any()


def test_decoder_calls_match_the_docs_and_max_iter_warns(caplog):
    dec, z, x, obs = problem("gaussian", d=6)
    counted = Counting(dec)
    s = Settings(estimator="hutchinson_cg", num_probes=3, cg_tol=1e-12, generator=torch.Generator().manual_seed(0))
    with caplog.at_level(logging.DEBUG, logger="fastjac.hutchinson"):
        est = ESTIMATORS["hutchinson_cg"](counted, z, BETA, observations.get(obs), None, s)
    assert est.info["converged"] and 1 <= est.info["cg_iterations"] <= 6 + 2
    assert counted.calls == est.info["decoder_calls"] == est.info["cg_iterations"] + 2
    assert "CG iterations" in caplog.text
    counted.calls = 0
    capped = Settings(estimator="hutchinson_cg", num_probes=3, cg_max_iter=2, cg_tol=1e-12)
    with pytest.warns(ConvergenceWarning, match="cg_max_iter=2"):
        est = ESTIMATORS["hutchinson_cg"](counted, z, BETA, observations.get(obs), None, capped)
    assert est.info["cg_iterations"] == 2 and not est.info["converged"] and counted.calls == 4


def test_float32_and_public_entry_points_leave_inputs_alone():
    torch.manual_seed(0)
    dec = mlp_decoder(8, 20, dtype=torch.float32)
    z = torch.randn(5, 8)
    z0 = z.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        R = jacobian_regularizer(dec, z, BETA, estimator="hutchinson_cg", num_probes=256, cg_tol=1e-5,
                                 reduction="none", generator=torch.Generator().manual_seed(2))
    assert R.dtype == torch.float32 and torch.equal(z, z0)
    _, J = jacobian_columns(dec, z)
    exact = (BETA / 2) * logdet_gram(J.double(), BETA)
    # Tolerance from the estimator's variance: per Rademacher probe, SLQ on a complete Krylov space
    # is εᵀ log(M) ε, whose variance is 2 Σ_{i≠j} (log M)_ij². With P = 256 probes the value is a
    # mean, so 5 standard errors (false alarm < 1e-6 per sample, CLT) plus 1e-3 relative for the
    # float32 matvecs and CG stopping at residual 1e-5. Here 5·se is about 16 % of R.
    M = torch.eye(8, dtype=F64) + J.double().mT @ J.double() / BETA
    lam, Q = torch.linalg.eigh(M)
    log_M = Q @ torch.diag_embed(lam.log()) @ Q.mT
    off_diagonal = log_M - torch.diag_embed(log_M.diagonal(dim1=-2, dim2=-1))
    se = (BETA / 2) * (2 * (off_diagonal ** 2).sum((-2, -1)) / 256).sqrt()
    assert ((R.double() - exact).abs() <= 5 * se + 1e-3 * exact).all(), ((R - exact) / se)
    assert (5 * se < 0.2 * exact).all()  # the bound is tight enough to mean something


@pytest.mark.parametrize("kw, err, match", [
    ({"orthogonality_weight": 0.1}, ValueError, "orthogonality_weight"),
    ({"num_probes": 0}, ValueError, "num_probes"),
    ({"cg_max_iter": 2.5}, TypeError, "cg_max_iter"),
    ({"cg_tol": 0.0}, ValueError, "cg_tol"),
    ({"cg_tol": float("nan")}, ValueError, "cg_tol"),
])
def test_bad_arguments_raise(kw, err, match):
    dec, z, _, _ = problem("gaussian")
    with pytest.raises(err, match=match):
        jacobian_regularizer(dec, z, BETA, estimator="hutchinson_cg", **kw)


def test_unknown_probe_distribution_raises():
    dec, z, _, _ = problem("gaussian")
    s = Settings(estimator="hutchinson_cg", extra={"probes": "uniform"})
    with pytest.raises(ValueError, match="probes"):
        ESTIMATORS["hutchinson_cg"](dec, z, BETA, observations.get("gaussian"), None, s)
