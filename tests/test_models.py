"""fastjac.models: posterior families against torch.distributions, the optimal-posterior
identity Taylor = GRAE, the Taylor − GRAE gap formula, the App. D shapes, and the thin
models against the functional objectives they wrap."""

import pytest
import torch
from torch import nn
from torch.distributions import MultivariateNormal

import fastjac
from fastjac.models import (GRAE, BetaVAE, ConvDecoder, ConvEncoder, GaussianPosterior, Linear2DDecoder,
                            LinearGaussianEncoder, MLPDecoder, MLPEncoder, block_mask,
                            make_autoencoder, random_rotation)
from tests.utils import assert_close


def _head(d, b, F=10, seed=0):
    torch.manual_seed(seed)
    head = GaussianPosterior(F, d, block_size=b).double()
    with torch.no_grad():  # spread the entries so the test sees non-trivial off-diagonals
        head.cholesky.weight.normal_()
    return head, torch.randn(5, F, dtype=torch.float64)


@pytest.mark.parametrize("d,b", [(7, 1), (7, 3), (7, 7), (6, 2)], ids=lambda v: str(v))
def test_posterior_kl_and_log_prob_match_multivariate_normal(d, b):
    head, h = _head(d, b)
    q = head(h)
    ref = MultivariateNormal(q.mean, scale_tril=q.scale_tril)
    prior = MultivariateNormal(torch.zeros(d, dtype=torch.float64), torch.eye(d, dtype=torch.float64))
    assert_close("kl", torch.distributions.kl_divergence(ref, prior), q.kl())
    z = q.rsample(3, generator=torch.Generator().manual_seed(1))
    assert z.shape == (3, 5, d)
    assert_close("log_prob", ref.log_prob(z), q.log_prob(z))
    assert_close("covariance", ref.covariance_matrix, q.covariance)


@pytest.mark.parametrize("d,b", [(7, 1), (7, 3), (8, 4), (7, 7)], ids=lambda v: str(v))
def test_posterior_covariance_is_block_diagonal_with_positive_cholesky(d, b):
    head, h = _head(d, b)
    q = head(h)
    C, mask = q.scale_tril, block_mask(d, b)
    assert torch.equal(torch.triu(C, 1), torch.zeros_like(C))
    assert bool((C.diagonal(dim1=-2, dim2=-1) > 0).all())
    assert bool((q.covariance[:, ~mask] == 0).all())
    inside = mask & ~torch.eye(d, dtype=torch.bool)
    if inside.any():  # every allowed off-diagonal entry is actually used
        assert bool((q.covariance[:, inside].abs() > 1e-8).all())
    n_free = sum(k * (k + 1) // 2 for k in [b] * (d // b) + ([d % b] if d % b else []))
    assert head.cholesky.out_features == n_free


def _linear_vae(D=5, d=3, beta=0.7, sigma=0.5, seed=0):
    torch.manual_seed(seed)
    enc = LinearGaussianEncoder(D, d, covariance="full", generator=torch.Generator().manual_seed(seed))
    dec = nn.Linear(d, D)
    vae = BetaVAE(enc.double(), dec.double(), beta=beta, observation=fastjac.Gaussian(sigma)).double()
    M = torch.eye(d, dtype=torch.float64) + dec.weight.T @ dec.weight / (sigma ** 2 * beta)
    return vae, M, torch.randn(40, D, dtype=torch.float64)


def test_optimal_posterior_makes_taylor_equal_grae_for_linear_decoder():
    vae, M, x = _linear_vae()
    J = vae.decoder.weight.expand(1, -1, -1)
    sigma_star = fastjac.optimal_posterior_covariance(J, vae.beta, weights=vae.observation.weights(None))[0]
    assert_close("Σ* = M⁻¹", torch.linalg.inv(M), sigma_star)
    vae.encoder.set_covariance(sigma_star)
    assert_close("Σ set", sigma_star, vae.posterior_of(x[:1]).covariance[0])
    o = vae.objectives(x, num_samples=64, generator=torch.Generator().manual_seed(0))
    assert_close("taylor = grae", o.grae, o.taylor)
    # linear decoder, Gaussian likelihood: the Taylor expansion is exact, so β-VAE = Taylor in expectation
    assert abs(float(o.beta_vae - o.taylor)) < 4 * float(o.beta_vae_stderr) + 1e-12
    assert float(o.beta_vae_stderr) > 0


def test_taylor_minus_grae_is_the_gap_formula_for_any_posterior():
    vae, M, x = _linear_vae(seed=3)
    with torch.no_grad():
        vae.encoder.L_lower.normal_()
    sigma = vae.posterior_of(x[:1]).covariance[0]
    MS = M @ sigma
    d = M.shape[0]
    gap = (vae.beta / 2 * (torch.trace(MS) - torch.logdet(MS) - d)).detach()
    o = vae.objectives(x, num_samples=2)
    assert float(gap) > 1e-3
    assert_close("taylor − grae", gap, o.taylor - o.grae)


def test_grae_objectives_use_its_implied_optimal_posterior():
    torch.manual_seed(0)
    enc = nn.Sequential(MLPEncoder((6,), hidden=(16,)), nn.Linear(16, 3)).double()
    dec = MLPDecoder(3, (6,), hidden=(16,)).double()
    grae = GRAE(enc, dec, beta=0.4, observation="bernoulli")
    x = torch.rand(10, 6, dtype=torch.float64)
    o = grae.objectives(x, num_samples=8)
    assert_close("taylor = grae", o.grae, o.taylor)
    assert_close("grae = model's exact loss", GRAE(enc, dec, beta=0.4, observation="bernoulli").loss(x), o.grae)


def test_models_are_thin_over_the_functional_objectives():
    torch.manual_seed(0)
    enc, dec = MLPEncoder((1, 4, 4), hidden=(16,)).double(), MLPDecoder(5, (1, 4, 4), hidden=(16,)).double()
    head = GaussianPosterior(16, 5, block_size=2).double()
    x = torch.rand(6, 1, 4, 4, dtype=torch.float64)
    vae = BetaVAE(enc, dec, posterior=head, beta=0.3, observation="bernoulli")
    q = head(enc(x))
    ref = fastjac.beta_vae_loss(dec, q.mean, q.scale_tril, x, 0.3, observation="bernoulli", num_samples=3,
                                generator=torch.Generator().manual_seed(5))
    out = vae.loss(x, num_samples=3, generator=torch.Generator().manual_seed(5))
    assert_close("β-VAE loss", ref, out)
    code = nn.Sequential(enc, nn.Linear(16, 5)).double()
    grae = GRAE(code, dec, beta=0.3, estimator="stochastic", num_columns=2, block_size=2,
                orthogonality_weight=0.1)
    ref = fastjac.grae_loss(dec, code(x), x, 0.3, estimator="stochastic", num_columns=2, block_size=2,
                            orthogonality_weight=0.1, generator=torch.Generator().manual_seed(5))
    assert_close("GRAE≈ loss", ref, grae.loss(x, generator=torch.Generator().manual_seed(5)))
    assert grae.reconstruct(x).shape == x.shape
    assert vae.sample(7).shape == (7, 1, 4, 4)


@pytest.mark.parametrize("arch,shape", [("mnist", (1, 28, 28)), ("celeba", (3, 64, 64))])
def test_app_d_architectures_shapes_and_jacobian_through_batchnorm(arch, shape):
    torch.manual_seed(0)
    enc = ConvEncoder(arch, width=1 / 32)
    x = torch.rand(2, *shape)
    assert enc(x).shape == (2, enc.out_features)
    dec = ConvDecoder(4, arch, width=1 / 32)
    assert dec(torch.randn(2, 4)).shape == (2, *shape)
    # width scales the paper's 64 (MNIST) / 128 (CelebA) first-layer filters
    assert enc[0][1].out_channels == {"mnist": 2, "celeba": 4}[arch]
    grae = make_autoencoder("grae", arch, latent_dim=4, beta=0.5, width=1 / 32, estimator="stochastic")
    grae.loss(x).backward()
    assert all(p.grad is not None for p in grae.decoder.parameters())


def test_linear2d_model_and_rotation():
    O = random_rotation(3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert_close("OᵀO", torch.eye(3, dtype=torch.float64), O.T @ O)
    assert abs(float(torch.det(O)) - 1) < 1e-12
    dec = Linear2DDecoder(activation="tanh")
    z = torch.randn(4, 2)
    assert_close("ν(Az)+b", torch.tanh(z @ dec.A.T) + dec.b, dec(z), rtol=1e-6)
    enc = LinearGaussianEncoder(2, 2, covariance="diagonal")
    enc.set_covariance(torch.diag(torch.tensor([0.3, 2.0])))
    assert_close("diag Σ", torch.diag(torch.tensor([0.3, 2.0])), enc(torch.randn(3, 2)).covariance[1], rtol=1e-6)


def test_bad_arguments_are_refused_with_their_names():
    with pytest.raises(ValueError, match="block_size"):
        GaussianPosterior(4, 3, block_size=4)
    with pytest.raises(ValueError, match="width"):
        ConvEncoder("mnist", width=0)
    with pytest.raises(ValueError, match="architecture"):
        make_autoencoder("grae", "cifar", latent_dim=2, beta=1.0)
    with pytest.raises(ValueError, match="data_shape"):
        make_autoencoder("grae", "mnist", data_shape=(1, 8, 8), latent_dim=2, beta=1.0)
    with pytest.raises(ValueError, match="beta"):
        GRAE(nn.Linear(2, 2), nn.Linear(2, 2), beta=-1.0)
    with pytest.raises(ValueError, match="estimator"):
        GRAE(nn.Linear(2, 2), nn.Linear(2, 2), beta=1.0, estimator="nope")
    with pytest.raises(TypeError, match="decoder"):
        GRAE(nn.Linear(2, 2), lambda z: z, beta=1.0)
    with pytest.raises(TypeError, match="mean, scale_tril"):
        BetaVAE(nn.Linear(2, 2), nn.Linear(2, 2), beta=1.0).loss(torch.randn(3, 2))
    with pytest.raises(ValueError, match="num_samples"):
        GRAE(nn.Linear(2, 2), nn.Linear(2, 2), beta=1.0).objectives(torch.randn(3, 2), num_samples=1)


def test_batchnorm_decoder_gives_per_sample_jacobians_and_the_usual_running_statistics():
    from fastjac.models.batchnorm import frozen_batch_statistics
    torch.manual_seed(0)
    dec = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.ELU(), nn.Linear(8, 5)).double()
    z = torch.randn(6, 3, dtype=torch.float64)
    before = dec[1].running_mean.clone()
    with frozen_batch_statistics(dec, z, update_running=False):
        out, J = fastjac.jacobian_columns(dec, z)
        full = torch.autograd.functional.jacobian(dec, z)                     # (B, D, B, d)
    assert dec[1].training and torch.equal(dec[1].running_mean, before)
    idx = torch.arange(6)
    assert_close("per-sample J", full[idx, :, idx, :], J)
    other = ~torch.eye(6, dtype=torch.bool)
    assert bool((full.permute(0, 2, 1, 3)[other] == 0).all())  # no sample moves another's output
    with frozen_batch_statistics(dec, z, update_running=True):
        dec(z)
    expected = 0.9 * before + 0.1 * dec[0](z).detach().mean(0)  # momentum 0.1, as nn.BatchNorm1d
    assert_close("running mean", expected, dec[1].running_mean)
    assert int(dec[1].num_batches_tracked) == 1
