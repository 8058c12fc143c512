"""GRAE, β-VAE and Taylor objectives (docs/maths.md#objectives) against brute force, identities and unbiasedness."""
import itertools
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import fastjac
from fastjac.estimators import stochastic
from decoders import brute_jacobian, conv_decoder
from utils import assert_close, mlp_decoder

BETA = 0.6


def _setup(kind, observation, B=3, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "mlp":
        net = mlp_decoder(d, 10, seed=seed)
        dec = (lambda z: torch.sigmoid(net(z))) if observation == "bernoulli" else net
        params = list(net.parameters())
        shape = (B, 10)
    else:
        dec = conv_decoder(d, seed=seed)
        params = list(dec.parameters())
        shape = (B, 1, 8, 8)
    z = torch.randn(B, d, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.rand(shape, generator=g, dtype=torch.float64)
    if observation == "bernoulli":
        x = (x > 0.5).double()
    return dec, params, z, x


def _weights(observation, out, x):
    if observation == "gaussian":
        return torch.ones_like(out).reshape(out.shape[0], -1)
    if observation == "bernoulli":
        return (x / out ** 2 + (1 - x) / (1 - out) ** 2).reshape(out.shape[0], -1)
    p = torch.sigmoid(out)
    return (p * (1 - p)).reshape(out.shape[0], -1)


def _nll(observation, out, x):
    if observation == "gaussian":
        return 0.5 * ((x - out) ** 2).flatten(1).sum(-1)
    if observation == "bernoulli":
        return -(x * out.log() + (1 - x) * (1 - out).log()).flatten(1).sum(-1)
    return torch.nn.functional.binary_cross_entropy_with_logits(out, x, reduction="none").flatten(1).sum(-1)


def brute_grae(dec, z, x, beta, observation, regulariser, block=2):
    out = dec(z)
    J = brute_jacobian(dec, z, create_graph=True)
    w = _weights(observation, out, x)
    Jw = J * w.sqrt().unsqueeze(-1)
    d = z.shape[1]
    G = Jw.mT @ Jw
    if regulariser == "exact":
        R = torch.linalg.slogdet(torch.eye(d, dtype=z.dtype) + G / beta)[1]
    elif regulariser == "hadamard":
        R = torch.log1p(G.diagonal(dim1=-2, dim2=-1) / beta).sum(-1)
    elif regulariser == "fischer":  # blocks of `block`
        R = sum(torch.linalg.slogdet(torch.eye(min(block, d - s), dtype=z.dtype)
                                     + G[:, s:s + block, s:s + block] / beta)[1] for s in range(0, d, block))
    else:  # frobenius
        R = G.diagonal(dim1=-2, dim2=-1).sum(-1) / beta
    return _nll(observation, out, x) + beta / 2 * (z ** 2).sum(-1) + beta / 2 * R


CASES = [("mlp", "gaussian", "exact"), ("mlp", "bernoulli", "exact"), ("mlp", "bernoulli_logits", "exact"),
         ("conv", "gaussian", "exact"), ("mlp", "gaussian", "hadamard"), ("mlp", "bernoulli", "fischer"),
         ("mlp", "gaussian", "frobenius")]


@pytest.mark.parametrize("kind,observation,estimator", CASES)
def test_grae_value_and_gradients_match_brute_force(kind, observation, estimator):
    dec, params, z, x = _setup(kind, observation)
    ours = fastjac.grae_loss(dec, z, x, BETA, estimator=estimator, block_size=2, observation=observation,
                             reduction="none")
    ref = brute_grae(dec, z, x, BETA, observation, estimator)
    assert_close("value", ref, ours)
    g_ours = torch.autograd.grad(ours.sum(), [z, *params], allow_unused=True)
    g_ref = torch.autograd.grad(ref.sum(), [z, *params], allow_unused=True)
    for i, (a, b) in enumerate(zip(g_ours, g_ref)):
        assert (a is None) == (b is None)
        if b is not None:
            assert_close(f"grad {i}", b, a)


@settings(max_examples=60, deadline=None)
@given(B=st.integers(1, 4), d=st.integers(1, 5), D=st.integers(1, 9), block=st.integers(1, 5),
       estimator=st.sampled_from(["exact", "fischer", "hadamard", "frobenius"]),
       observation=st.sampled_from(["gaussian", "bernoulli", "bernoulli_logits"]),
       log_beta=st.floats(-2, 2), seed=st.integers(0, 2 ** 16))
def test_grae_matches_brute_force_on_random_shapes(B, d, D, block, estimator, observation, log_beta, seed):
    """Value and gradients (z, parameters, β) of grae_loss against reverse-mode brute force, float64."""
    g = torch.Generator().manual_seed(seed)
    net = mlp_decoder(d, D, hidden=6, seed=seed % 97)
    dec = (lambda v: torch.sigmoid(net(v))) if observation == "bernoulli" else net
    z = torch.randn(B, d, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.rand(B, D, generator=g, dtype=torch.float64)
    x = (x > 0.5).double() if observation == "bernoulli" else x
    beta = torch.tensor(math.exp(log_beta), dtype=torch.float64, requires_grad=True)
    inputs = [z, beta, *net.parameters()]
    ours = fastjac.grae_loss(dec, z, x, beta, estimator=estimator, block_size=block, observation=observation,
                             reduction="none")
    ref = brute_grae(dec, z, x, beta, observation, estimator, block=block)
    assert_close("value", ref, ours)
    probe = torch.rand(B, generator=g, dtype=torch.float64)  # a random combination of the per-sample losses
    for i, (a, b) in enumerate(zip(torch.autograd.grad((ours * probe).sum(), inputs),
                                   torch.autograd.grad((ref * probe).sum(), inputs))):
        assert_close(f"grad {i}", b, a)


def test_reductions_and_beta_tensor_gradient():
    dec, _, z, x = _setup("mlp", "gaussian")
    per = fastjac.grae_loss(dec, z, x, BETA, reduction="none")
    assert per.shape == (3,)
    assert_close("mean", per.mean(), fastjac.grae_loss(dec, z, x, BETA))
    assert_close("sum", per.sum(), fastjac.grae_loss(dec, z, x, BETA, reduction="sum"))
    beta = torch.tensor(BETA, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda b: fastjac.grae_loss(dec, z.detach(), x, b), (beta,))


def _fixed_J_decoder(J):
    """A linear decoder with per-sample Jacobian J (B, D, d): g(z)_b = J_b z_b."""
    return lambda z: (J @ z.unsqueeze(-1)).squeeze(-1)


def _enumerated(J, monkeypatch, *, num_columns=1, block_size=1, orthogonality_weight=0.0):
    """(R, orthogonality) of the stochastic estimator for EVERY equally likely outcome of its draws:
    one replica of the batch per outcome, the estimator's ``draw`` replaced by that assignment.
    Their mean is the estimator's exact expectation under uniform draws (the uniformity of
    ``draw`` itself is tested separately)."""
    B, D, d = J.shape
    blocks = -(-d // block_size)
    block_outcomes = list(itertools.product(range(blocks), repeat=num_columns))
    n_pairs = len(stochastic.off_block_pairs(d, block_size, J.device)) if orthogonality_weight else 1
    outcomes = [(b, p) for b in block_outcomes for p in range(n_pairs)]
    n = len(outcomes)
    assigned_blocks = torch.tensor([b for b, _ in outcomes]).repeat_interleave(B, 0)    # (n·B, k)
    assigned_pairs = torch.tensor([p for _, p in outcomes]).repeat_interleave(B, 0)     # (n·B,)

    def fixed(high, shape, z, generator):
        drawn = assigned_blocks if len(shape) == 2 else assigned_pairs
        assert high == (blocks if len(shape) == 2 else n_pairs) and drawn.shape == tuple(shape)
        return drawn

    monkeypatch.setattr(stochastic, "draw", fixed)
    J_rep = J.repeat(n, 1, 1)
    z = torch.zeros(n * B, d, dtype=J.dtype)
    x = torch.zeros(n * B, D, dtype=J.dtype)
    t = fastjac.grae_terms(_fixed_J_decoder(J_rep), z, x, BETA, estimator="stochastic", num_columns=num_columns,
                           block_size=block_size, orthogonality_weight=orthogonality_weight)
    return t.regularizer.reshape(n, B) * 2 / BETA, t.orthogonality.reshape(n, B)


def _assert_expectation(outcomes, target):
    """The mean over all outcomes equals the target to float64 rounding."""
    assert_close("expectation over all draws", target, outcomes.mean(0), rtol=1e-12)


@pytest.mark.parametrize("block_size,num_columns", [(1, 1), (1, 3), (2, 1), (3, 2)])
def test_stochastic_estimator_is_unbiased(block_size, num_columns, monkeypatch):
    """E over the draws of the column (block) estimator is the Hadamard (Fischer) bound, exactly;
    a 2 % bias fails the same test (power check)."""
    g = torch.Generator().manual_seed(5)
    B, D, d = 4, 9, 7
    J = torch.randn(B, D, d, generator=g, dtype=torch.float64) * torch.linspace(0.2, 2, d, dtype=torch.float64)
    target = (fastjac.hadamard_bound(J, BETA) if block_size == 1 else
              fastjac.fischer_bound(J, BETA, block_size=block_size))
    R, _ = _enumerated(J, monkeypatch, num_columns=num_columns, block_size=block_size)
    _assert_expectation(R, target)
    assert (R.std(0) > 0.05 * target).all()  # the outcomes really differ: the mean is not trivially right
    with pytest.raises(AssertionError):
        _assert_expectation(1.02 * R, target)


def test_stochastic_orthogonality_pair_is_unbiased(monkeypatch):
    g = torch.Generator().manual_seed(6)
    B, D, d, b, lam = 3, 6, 5, 2, 0.3
    J = torch.randn(B, D, d, generator=g, dtype=torch.float64)
    _, ortho = _enumerated(J, monkeypatch, block_size=b, orthogonality_weight=lam)
    target = fastjac.orthogonality_penalty(J, block_size=b)
    _assert_expectation(ortho / lam, target)
    with pytest.raises(AssertionError):
        _assert_expectation(1.02 * ortho / lam, target)


def _max_standardised_deviation(samples: torch.Tensor, high: int) -> float:
    """max over values of |count − N/high| / sd under uniform draws (binomial sd)."""
    n, p = samples.numel(), 1 / high
    counts = torch.bincount(samples.flatten(), minlength=high).double()
    return float(((counts - n * p).abs() / math.sqrt(n * p * (1 - p))).max())


@pytest.mark.parametrize("high", [2, 7, 15])
def test_draws_are_uniform_over_every_column(high):
    """``draw`` covers [0, high) uniformly: 2·10⁶ draws, every count within 5.5 standard deviations
    (false alarm < 1e-6 per value). Power: a sampler favouring one value by 2 % is 0.02·√(N/(high−1))
    ≥ 7.3 standard deviations off at N = 2·10⁶, high <= 15, and fails the same bound."""
    N = 2_000_000
    z = torch.zeros(1, high)
    fair = stochastic.draw(high, (N,), z, torch.Generator().manual_seed(high))
    assert int(fair.min()) == 0 and int(fair.max()) == high - 1
    assert _max_standardised_deviation(fair, high) <= 5.5
    probs = torch.full((high,), 1.0)
    probs[0] = 1.02
    probs[1:] = (high - 1.02) / (high - 1)
    biased = torch.multinomial(probs / high, N, replacement=True, generator=torch.Generator().manual_seed(1))
    assert _max_standardised_deviation(biased, high) > 5.5


def test_full_estimators_add_the_exact_orthogonality_penalty():
    dec, _, z, x = _setup("mlp", "gaussian")
    J = fastjac.jacobian_columns(dec, z)[1]
    t = fastjac.grae_terms(dec, z, x, BETA, estimator="exact", block_size=2, orthogonality_weight=0.7)
    assert_close("orthogonality", 0.7 * fastjac.orthogonality_penalty(J, block_size=2), t.orthogonality)


def test_seeds_give_different_draws_and_the_same_seed_repeats():
    dec, _, z, x = _setup("mlp", "gaussian", d=6)

    def run(seed):
        return fastjac.grae_loss(dec, z, x, BETA, estimator="stochastic", reduction="none",
                                 generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


class TangentCounter(torch.nn.Module):
    """A decoder that pushes its tangents itself (``tangent_forward``) and records how many it got."""

    def __init__(self, net):
        super().__init__()
        self.net, self.tangents = net, []

    def forward(self, z):
        return self.net(z)

    def tangent_forward(self, z, tangents):
        self.tangents.append(tangents.shape[0])
        return torch.func.vmap(lambda t: torch.func.jvp(self.net, (z,), (t,)), out_dims=(None, 0))(tangents)


@pytest.mark.parametrize("options,pushed", [(dict(num_columns=1), 1), (dict(num_columns=3), 3),
                                            (dict(num_columns=2, block_size=3), 6),
                                            (dict(num_columns=1, block_size=2, orthogonality_weight=0.5), 4)])
def test_stochastic_computes_only_drawn_columns(options, pushed):
    """k drawn columns (k·b for blocks, + 2 for an orthogonality pair) are pushed, not d = 8:
    counted as tangent directions reaching the decoder, and the result equals the same columns
    taken from the full Jacobian."""
    dec = TangentCounter(mlp_decoder(8, 10))
    z = torch.randn(2, 8, dtype=torch.float64)
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    R = fastjac.jacobian_regularizer(dec, z, BETA, estimator="stochastic", generator=gen(), reduction="none",
                                     **options)
    assert dec.tangents == [pushed]
    full = fastjac.jacobian_regularizer(dec.net, z, BETA, estimator="stochastic", generator=gen(),
                                        reduction="none", **options)
    assert_close("drawn columns", full, R, rtol=1e-12)


def _posterior(B, d, seed, block=None):
    g = torch.Generator().manual_seed(seed)
    C = torch.randn(B, d, d, generator=g, dtype=torch.float64).tril(-1) * 0.3
    C = C + torch.diag_embed(torch.rand(B, d, generator=g, dtype=torch.float64) + 0.3)
    if block is not None:
        ids = torch.arange(d) // block
        C = C * (ids[:, None] == ids[None, :])
    mu = torch.randn(B, d, generator=g, dtype=torch.float64)
    return mu, C


def test_gaussian_kl_matches_torch_distributions():
    mu, C = _posterior(3, 4, 0)
    q = torch.distributions.MultivariateNormal(mu, scale_tril=C)
    p = torch.distributions.MultivariateNormal(torch.zeros(4, dtype=torch.float64),
                                               torch.eye(4, dtype=torch.float64))
    assert_close("kl", torch.distributions.kl_divergence(q, p), fastjac.gaussian_kl(mu, C))


@pytest.mark.parametrize("observation", ["gaussian", "bernoulli_logits"])
def test_taylor_minus_grae_is_the_analytic_gap(observation):
    """Taylor(Σ) − GRAE = (β/2)[tr(MΣ) − log det(MΣ) − d] ≥ 0 for any Σ, any decoder (docs/maths.md#the-taylor-gap)."""
    B, d = 3, 4
    dec = mlp_decoder(d, 10, seed=2)
    mu, C = _posterior(B, d, 1, block=2)
    x = torch.rand(B, 10, dtype=torch.float64)
    taylor = fastjac.taylor_beta_vae_loss(dec, mu, C, x, BETA, observation=observation, reduction="none")
    grae = fastjac.grae_loss(dec, mu, x, BETA, observation=observation, reduction="none")
    out, J = fastjac.jacobian_columns(dec, mu)
    w = fastjac.observations.get(observation).weights(out, x)
    w = w.reshape(B, -1) if isinstance(w, torch.Tensor) else w
    Jw = J * (w.sqrt().unsqueeze(-1) if isinstance(w, torch.Tensor) else 1)
    M = torch.eye(d, dtype=torch.float64) + Jw.mT @ Jw / BETA
    MS = M @ C @ C.mT
    gap = BETA / 2 * (MS.diagonal(dim1=-2, dim2=-1).sum(-1) - torch.linalg.slogdet(MS)[1] - d)
    assert (gap > 0).all()
    assert_close("gap", gap, taylor - grae)


@settings(max_examples=50, deadline=None)
@given(B=st.integers(1, 3), d=st.integers(1, 4), D=st.integers(1, 8), block=st.integers(1, 4),
       observation=st.sampled_from(["gaussian", "bernoulli", "bernoulli_logits"]), log_beta=st.floats(-2, 2),
       seed=st.integers(0, 2 ** 16))
def test_taylor_matches_brute_force_on_random_shapes(B, d, D, block, observation, log_beta, seed):
    """Taylor β-VAE value and gradients (μ, C, parameters) against reverse-mode brute force,
    −log p(x|g(μ)) + ½ tr(J_wᵀJ_w CCᵀ) + β KL, float64, block-diagonal C of random block size."""
    g = torch.Generator().manual_seed(seed)
    net = mlp_decoder(d, D, hidden=6, seed=seed % 89)
    dec = (lambda v: torch.sigmoid(net(v))) if observation == "bernoulli" else net
    mu, C = _posterior(B, d, seed, block=block)
    mu.requires_grad_(True)
    C.requires_grad_(True)
    x = torch.rand(B, D, generator=g, dtype=torch.float64)
    x = (x > 0.5).double() if observation == "bernoulli" else x
    beta = math.exp(log_beta)
    ours = fastjac.taylor_beta_vae_loss(dec, mu, C, x, beta, observation=observation, reduction="none")
    out = dec(mu)
    Jw = brute_jacobian(dec, mu, create_graph=True) * _weights(observation, out, x).sqrt().unsqueeze(-1)
    trace = ((Jw @ C) ** 2).sum((-2, -1))
    ref = _nll(observation, out, x) + 0.5 * trace + beta * fastjac.gaussian_kl(mu, C)
    assert_close("value", ref, ours)
    inputs = [mu, C, *net.parameters()]
    for i, (a, b) in enumerate(zip(torch.autograd.grad(ours.sum(), inputs), torch.autograd.grad(ref.sum(), inputs))):
        assert_close(f"grad {i}", b, a)


def test_linear_decoder_optimal_posterior_taylor_and_beta_vae_equal_grae():
    """Linear g: Taylor is exact, and with Σ = M⁻¹ the β-VAE objective equals GRAE (docs/maths.md#objectives)."""
    B, d, D = 3, 3, 7
    g = torch.Generator().manual_seed(3)
    lin = torch.nn.Linear(d, D).double()
    mu = torch.randn(B, d, generator=g, dtype=torch.float64)
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    J = lin.weight.expand(B, D, d)
    sigma = fastjac.optimal_posterior_covariance(J, BETA)
    C = torch.linalg.cholesky(sigma)
    grae = fastjac.grae_loss(lin, mu, x, BETA, reduction="none")
    taylor = fastjac.taylor_beta_vae_loss(lin, mu, C, x, BETA, reduction="none")
    assert_close("Taylor = GRAE", grae, taylor)
    t = fastjac.beta_vae_terms(lin, mu, C, x, BETA, num_samples=20000, generator=g)
    se = t.reconstruction.std(0) / math.sqrt(20000)
    assert ((t.per_sample - grae).abs() <= 4.5 * se).all()
    # any other Σ is worse in expectation (the gap is > 0)
    taylor_other = fastjac.taylor_beta_vae_loss(lin, mu, C * 1.3, x, BETA, reduction="none")
    assert (taylor_other > grae).all()


def test_beta_vae_loss_is_reparameterised_mean():
    dec = mlp_decoder(3, 5, seed=4)
    mu, C = _posterior(2, 3, 4)
    x = torch.randn(2, 5, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    loss = fastjac.beta_vae_loss(dec, mu, C, x, BETA, num_samples=3, reduction="none", generator=gen)
    eps = torch.randn((3, 2, 3, 1), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    z = mu + (C @ eps).squeeze(-1)
    recon = 0.5 * ((dec(z) - x) ** 2).sum(-1).mean(0)
    assert_close("beta-vae", recon + BETA * fastjac.gaussian_kl(mu, C), loss)


@pytest.mark.parametrize("estimator", ["exact", "stochastic"])
def test_flat_data_against_image_output(estimator):
    """x given flat (B, 64) while the decoder returns (B, 1, 8, 8): same loss as shaped x."""
    dec, _, z, x = _setup("conv", "bernoulli")
    x = (x > 0.5).double()
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    shaped = fastjac.grae_loss(dec, z, x, BETA, estimator=estimator, observation="bernoulli", generator=gen())
    flat = fastjac.grae_loss(dec, z, x.flatten(1), BETA, estimator=estimator, observation="bernoulli",
                             generator=gen())
    assert_close("flat x", shaped, flat)


# ----------------------------------------------------------------------------- latents of any shape
class SpatialDecoder(torch.nn.Module):
    """(B, 2, 3, 3) codes -> (B, 1, 4, 4) images."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(7)
        self.conv = torch.nn.Conv2d(2, 3, 3, padding=1)
        self.lin = torch.nn.Linear(27, 16)

    def forward(self, z):
        return torch.sigmoid(self.lin(torch.tanh(self.conv(z)).flatten(1))).reshape(-1, 1, 4, 4)


SPATIAL_CASES = [dict(estimator="exact"), dict(estimator="fischer", block_size=4),
                 dict(estimator="hadamard"), dict(estimator="frobenius"),
                 dict(estimator="stochastic", num_columns=3), dict(estimator="stochastic", num_columns=2, block_size=5),
                 dict(estimator="exact", chunk_size=7), dict(estimator="hutchinson_cg", num_probes=2),
                 dict(estimator="stochastic", block_size=3, orthogonality_weight=0.4),
                 dict(estimator="exact", observation="bernoulli", orthogonality_weight=0.2, block_size=6)]


@pytest.mark.parametrize("options", SPATIAL_CASES, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_spatial_latent_equals_the_flattened_computation(options):
    """z (B, 2, 3, 3): value and gradients (z, decoder parameters) equal those of the same decoder
    behind a flattening lambda with z (B, 18), in float64."""
    dec = SpatialDecoder().double()
    g = torch.Generator().manual_seed(3)
    z = torch.randn(3, 2, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    x = (torch.rand(3, 1, 4, 4, generator=g, dtype=torch.float64) > 0.5).double()
    params = [z, *dec.parameters()]

    def run(decoder, code):
        gen = torch.Generator().manual_seed(11)
        return fastjac.grae_loss(decoder, code, x, BETA, reduction="none", generator=gen, **options)

    shaped = run(dec, z)
    flat = run(lambda v: dec(v.reshape(-1, 2, 3, 3)), z.reshape(3, 18))
    assert_close("value", flat, shaped, rtol=1e-12)
    for i, (a, b) in enumerate(zip(torch.autograd.grad(shaped.sum(), params),
                                   torch.autograd.grad(flat.sum(), params))):
        assert_close(f"grad {i}", b, a, rtol=1e-10)


def test_spatial_latent_in_every_public_entry_point():
    dec = SpatialDecoder().double()
    g = torch.Generator().manual_seed(4)
    z = torch.randn(2, 2, 3, 3, generator=g, dtype=torch.float64)
    x = torch.rand(2, 16, generator=g, dtype=torch.float64)
    flat_dec = lambda v: dec(v.reshape(-1, 2, 3, 3))  # noqa: E731
    zf = z.reshape(2, 18)
    mu, C = _posterior(2, 18, 5, block=3)
    mu = mu.reshape(2, 2, 3, 3)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    pairs = [
        (fastjac.jacobian_regularizer(dec, z, BETA, generator=gen()),
         fastjac.jacobian_regularizer(flat_dec, zf, BETA, generator=gen())),
        (fastjac.nn.JacobianRegularizer(BETA, estimator="exact")(dec, z),
         fastjac.nn.JacobianRegularizer(BETA, estimator="exact")(flat_dec, zf)),
        (fastjac.grae_terms(dec, z, x, BETA).code, BETA / 2 * (zf ** 2).sum(-1)),
        (fastjac.taylor_beta_vae_loss(dec, mu, C, x, BETA), fastjac.taylor_beta_vae_loss(flat_dec, mu.reshape(2, 18), C, x, BETA)),
        (fastjac.beta_vae_loss(dec, mu, C, x, BETA, num_samples=3, generator=gen()),
         fastjac.beta_vae_loss(flat_dec, mu.reshape(2, 18), C, x, BETA, num_samples=3, generator=gen())),
        (fastjac.gaussian_kl(mu, C), fastjac.gaussian_kl(mu.reshape(2, 18), C)),
    ]
    for i, (shaped, flat) in enumerate(pairs):
        assert_close(f"entry point {i}", flat, shaped, rtol=1e-12)
    with pytest.raises(ValueError, match=r"scale_tril must have shape \(B, d, d\) = \(2, 18, 18\)"):
        fastjac.beta_vae_loss(dec, mu, C[:, :9, :9], x, BETA)


def test_return_output_is_the_decoder_output_of_the_same_pass():
    """One primal pass: the output returned with the regulariser is g(z), differentiable, and the
    decoder ran once (one call carrying the tangents)."""
    dec = SpatialDecoder().double()
    calls = []

    def counted(v):
        calls.append(1)
        return dec(v)

    z = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    for reg in (lambda: fastjac.jacobian_regularizer(counted, z, BETA, return_output=True),
                lambda: fastjac.nn.JacobianRegularizer(BETA)(counted, z, return_output=True)):
        calls.clear()
        value, out = reg()
        assert len(calls) == 1 and value.shape == ()
        assert_close("output", dec(z), out, rtol=1e-14)
        g_out = torch.autograd.grad(out.sum(), z)[0]
        assert_close("output gradient", torch.autograd.grad(dec(z).sum(), z)[0], g_out, rtol=1e-12)
    assert torch.is_tensor(fastjac.jacobian_regularizer(dec, z, BETA))
