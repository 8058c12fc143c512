"""The ex-post code density (fastjac.models.GaussianMixture): EM recovers a known mixture, samples
carry the fitted moments, densities match scipy, bad input is refused."""
import math

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal

from fastjac.models import GaussianMixture

TRUE = GaussianMixture(
    torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64),
    torch.tensor([[0.0, 0.0], [6.0, 1.0], [-2.0, 7.0]], dtype=torch.float64),
    torch.tensor([[[1.0, 0.6], [0.6, 1.0]], [[0.5, -0.2], [-0.2, 0.3]], [[2.0, 0.0], [0.0, 0.4]]],
                 dtype=torch.float64))


def _matched(fitted: GaussianMixture, true: GaussianMixture):
    """Fitted components reordered to the nearest true means."""
    order = torch.cdist(true.means, fitted.means).argmin(1)
    assert len(set(order.tolist())) == true.components, "two true components share one fitted"
    return fitted.weights[order], fitted.means[order], fitted.covariances[order]


def test_em_recovers_a_known_mixture():
    codes = TRUE.sample(6000, generator=torch.Generator().manual_seed(0))
    fitted = GaussianMixture.fit(codes, 3, seed=1)
    w, m, c = _matched(fitted, TRUE)
    # sampling error of 6000 draws: weights ~0.006, means ~0.03, covariances ~0.04 (several s.e.)
    torch.testing.assert_close(w, TRUE.weights, atol=0.025, rtol=0)
    torch.testing.assert_close(m, TRUE.means, atol=0.1, rtol=0)
    torch.testing.assert_close(c, TRUE.covariances, atol=0.15, rtol=0)
    # and it is a maximum: the fitted likelihood beats the true parameters' on the same data
    assert fitted.log_prob(codes).mean() >= TRUE.log_prob(codes).mean() - 1e-9


def test_em_fails_the_recovery_check_with_too_few_components():
    """The recovery test can fail: two components cannot place three means."""
    codes = TRUE.sample(3000, generator=torch.Generator().manual_seed(0))
    fitted = GaussianMixture.fit(codes, 2, seed=1)
    gaps = torch.cdist(TRUE.means, fitted.means).min(1).values
    assert gaps.max() > 1.0


def test_em_log_likelihood_never_decreases():
    codes = TRUE.sample(800, generator=torch.Generator().manual_seed(3))
    values = [float(GaussianMixture.fit(codes, 3, iterations=i, tolerance=-1.0, seed=2).log_prob(codes).mean())
              for i in range(1, 12)]
    assert all(b >= a - 1e-10 for a, b in zip(values, values[1:])), values


def test_samples_have_the_mixtures_moments():
    n = 40000
    z = TRUE.sample(n, generator=torch.Generator().manual_seed(5))
    mean, cov = TRUE.mean(), TRUE.covariance()
    se_mean = (cov.diagonal() / n).sqrt()
    assert ((z.mean(0) - mean).abs() < 5 * se_mean).all()
    torch.testing.assert_close(torch.cov(z.T), cov, atol=0.12, rtol=0.02)
    counts = torch.bincount(torch.cdist(z, TRUE.means).argmin(1), minlength=3).double() / n
    torch.testing.assert_close(counts, TRUE.weights, atol=0.02, rtol=0)


def test_moments_match_the_closed_form_by_monte_carlo_of_a_single_gaussian():
    one = GaussianMixture(torch.ones(1, dtype=torch.float64), TRUE.means[1:2], TRUE.covariances[1:2])
    torch.testing.assert_close(one.mean(), TRUE.means[1])
    torch.testing.assert_close(one.covariance(), TRUE.covariances[1])


def test_log_prob_matches_scipy():
    z = torch.randn(50, 2, generator=torch.Generator().manual_seed(7), dtype=torch.float64) * 3
    want = np.log(sum(float(w) * multivariate_normal(m.numpy(), c.numpy()).pdf(z.numpy())
                      for w, m, c in zip(TRUE.weights, TRUE.means, TRUE.covariances)))
    np.testing.assert_allclose(TRUE.log_prob(z).numpy(), want, rtol=1e-10, atol=1e-10)


def test_fit_is_deterministic_in_the_seed_and_leaves_codes_alone():
    codes = TRUE.sample(500, generator=torch.Generator().manual_seed(1)).float()
    before = codes.clone()
    a, b = GaussianMixture.fit(codes, 3, seed=4), GaussianMixture.fit(codes, 3, seed=4)
    torch.testing.assert_close(a.means, b.means, rtol=0, atol=0)
    assert torch.equal(codes, before)


def test_one_component_is_the_sample_mean_and_covariance():
    codes = torch.randn(300, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    fitted = GaussianMixture.fit(codes, 1, regularisation=0.0)
    torch.testing.assert_close(fitted.means[0], codes.mean(0))
    torch.testing.assert_close(fitted.covariances[0], torch.cov(codes.T, correction=0), atol=1e-9, rtol=0)


@pytest.mark.parametrize("codes, k, match", [
    (torch.randn(10), 2, "shape"),
    (torch.randn(5, 2), 6, "components"),
    (torch.randn(5, 2), 0, "components"),
    (torch.tensor([[0.0, math.nan], [1.0, 2.0]]), 1, "NaN"),
])
def test_fit_rejects_bad_input(codes, k, match):
    with pytest.raises(ValueError, match=match):
        GaussianMixture.fit(codes, k)


def test_constructor_and_sampler_reject_bad_input():
    with pytest.raises(ValueError, match="sum to 1"):
        GaussianMixture(torch.tensor([0.5, 0.2]), torch.zeros(2, 2), torch.eye(2).expand(2, 2, 2))
    with pytest.raises(ValueError, match="positive definite"):
        GaussianMixture(torch.ones(1), torch.zeros(1, 2), -torch.eye(2)[None])
    with pytest.raises(ValueError, match="shape"):
        GaussianMixture(torch.ones(1), torch.zeros(1, 2), torch.eye(3)[None])
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        TRUE.log_prob(torch.zeros(4, 3))
    with pytest.raises(ValueError, match="positive int"):
        TRUE.sample(0)


def test_code_density_and_ex_post_samples_of_an_autoencoder():
    from fastjac.models import code_density, make_autoencoder, sample_images
    torch.manual_seed(0)
    model = make_autoencoder("grae", "mlp", data_shape=(1, 4, 4), latent_dim=2, beta=0.1, width=0.1).eval()
    x = torch.rand(200, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    density = code_density(model, x, 3, batch_size=64)
    with torch.no_grad():
        codes = model.encode(x).double()
    assert density.dim == 2 and density.components == 3
    torch.testing.assert_close(density.mean(), codes.mean(0), atol=1e-6, rtol=1e-6)   # EM keeps the mean
    images = sample_images(model, density, 7, generator=torch.Generator().manual_seed(2))
    assert images.shape == (7, 1, 4, 4) and images.dtype == torch.float32
