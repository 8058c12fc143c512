"""Identifiability experiment (App. C): the decoder's angle, the aligned mixing, and the reference
runs started at the true model (float64 throughout)."""
import math

import pytest
import torch

from fastjac.experiments import identifiability as ident
from fastjac.experiments.procrustes import latent_angle, rotation, rotation_angle

DEG = math.pi / 180


def _data(nu, mixing, inference="amortised", covariance="diagonal", points=200, trials=3, seed=0):
    s = ident.Setting(nu, inference, covariance, 5)
    training = ident.Training(num_points=points, mixing=mixing, seed=seed, refine_iterations=2000)
    seeds = [ident.trial_seeds(seed, s, t) for t in range(trials)]
    return s, training, seeds


@pytest.mark.parametrize("theta", [-44.0, -30.0, -7.5, 0.0, 12.0, 45.0])
def test_decoder_angle_recovers_the_rotation_under_any_signed_permutation(theta):
    g = torch.Generator().manual_seed(3)
    W = torch.randn(4, 2, 2, generator=g, dtype=torch.float64)
    Q = rotation(torch.tensor(theta * DEG, dtype=torch.float64))
    for P in ([[1., 0.], [0., 1.]], [[0., 1.], [1., 0.]], [[-1., 0.], [0., 1.]], [[0., -1.], [1., 0.]]):
        got = ident.decoder_angle(W @ Q @ torch.tensor(P, dtype=torch.float64), W)
        torch.testing.assert_close(got, torch.full((4,), theta, dtype=torch.float64), atol=1e-9, rtol=0)


def test_decoder_angle_equals_the_encoder_means_angle_when_latents_are_turned():
    """A model whose latents are m = Qᵀz and whose decoder is A = W·Q: both measures give Q's angle."""
    g = torch.Generator().manual_seed(4)
    W = torch.randn(2, 2, 2, generator=g, dtype=torch.float64)
    Z = torch.randn(2, 500, 2, generator=g, dtype=torch.float64)
    Q = rotation(torch.tensor([17.0 * DEG, -33.0 * DEG], dtype=torch.float64))
    M = Z @ Q                                                         # rows: mᵀ = zᵀQ
    torch.testing.assert_close(latent_angle(Z, M), ident.decoder_angle(W @ Q, W), atol=1e-9, rtol=0)


def test_aligned_mixing_is_a_signed_permutation_times_diag_2_1():
    s, training, seeds = _data("tanh", "aligned", trials=12)
    data, _, _ = ident.simulate(seeds, s, training)
    W = data.W
    torch.testing.assert_close(W.norm(dim=1), torch.tensor([[2.0, 1.0]] * 12, dtype=torch.float64))
    assert bool(((W != 0).sum(-1) == 1).all()) and bool(((W != 0).sum(-2) == 1).all())
    assert len({tuple(w.flatten().tolist()) for w in W}) > 1        # the permutation and signs vary


@pytest.mark.parametrize("mixing", ["orthogonal", "gaussian"])
def test_true_decoder_axes_of_a_linear_model_are_the_right_singular_vectors_of_W(mixing):
    """ν = identity: the best Σ at the true decoder is (I + WᵀW/σ²)⁻¹ whatever the data, so its
    eigenvectors are W's right singular vectors (the true axes when W's columns are orthogonal)."""
    s, training, seeds = _data("identity", mixing)
    data, params, fixed = ident.simulate(seeds, s, training)
    start = ident._fit_encoder(ident._truth_parameters(data, params, fixed), fixed, data.X, s, training,
                               "diagonal")
    got = ident.true_decoder_axes(data, start, fixed, s, training)
    want = rotation_angle(torch.linalg.svd(data.W).Vh.mT)
    diff = 45.0 - torch.remainder(45.0 - (got - want), 90.0)        # modulo signed permutations
    torch.testing.assert_close(diff, torch.zeros_like(got), atol=1e-3, rtol=0)
    if mixing == "orthogonal":
        assert float(got.abs().max()) < 1e-3


def test_identity_runs_started_at_the_truth_reach_the_random_starts_optimum():
    """ν = identity, orthogonal W: the truth is where the mean-field optimum lies; L-BFGS from the
    true model and from random starts end at the same ELBO and the same axes."""
    s, training, seeds = _data("identity", "orthogonal", points=120, trials=2)
    rec = ident.run_trials(seeds, s, training, reference=True)
    truth = rec["truth"]
    for t in range(len(seeds)):
        assert truth["elbo"][t] == pytest.approx(rec["elbo"][t], abs=1e-8)
        assert ident.wrap_angle(truth["angle"][t] - rec["angle"][t]) == pytest.approx(0.0, abs=0.05)
        assert truth["at_truth"]["elbo"][t] <= truth["elbo"][t] + 1e-12
        # the true model is optimal up to the fit to 120 samples: a gap of order (parameters)/(2N)
        assert rec["elbo"][t] - truth["at_truth"]["elbo"][t] < 0.05
        assert rec["decoder_singular_values"][t] == pytest.approx([1.0, 1.0], abs=0.2)  # 120 points


def test_tanh_amortised_optimum_is_not_the_true_decoder():
    """ν = tanh, amortised (linear encoder, one Σ): L-BFGS leaves the true model for a decoder that is
    not W·Q (W⁻¹A far from orthogonal) and an ELBO clearly above the true decoder's."""
    s, training, seeds = _data("tanh", "orthogonal", trials=2)
    rec = ident.run_trials(seeds, s, training, reference=True)
    truth = rec["truth"]
    for t in range(2):
        assert truth["elbo"][t] - truth["at_truth"]["elbo"][t] > 0.1
        assert truth["elbo"][t] == pytest.approx(rec["elbo"][t], abs=1e-6)
        assert min(truth["decoder_singular_values"][t]) < 0.75
        assert truth["true_decoder_axes"][t] is not None


def test_flatten_measures_the_reference_runs_against_the_best_run_of_the_data_set():
    rec = {"elbo": [-1.0], "angle": [3.0], "principal_angle": [3.0], "decoder_angle": [2.0],
           "decoder_singular_values": [[1.0, 0.9]],
           "truth": {"at_truth": {"elbo": [-1.5], "angle": [0.5]}, "true_decoder_axes": [4.0],
                     "elbo": [-1.0], "angle": [3.0]}}
    other = {"elbo": [-0.9], "angle": [30.0], "principal_angle": [30.0]}     # an old file: no decoder
    rows = ident.flatten({"tanh/amortised/diagonal/n=5": rec, "tanh/amortised/full/n=5": other})
    diag = next(r for r in rows if r["covariance"] == "diagonal")
    assert diag["truth_gap"] == pytest.approx(-0.6) and diag["truth_start_gap"] == pytest.approx(-0.1)
    summary = ident.summarise(rows, tolerance=0.2)
    d, f = (next(r for r in summary if r["covariance"] == c) for c in ("diagonal", "full"))
    assert d["truth_data_sets"] == 1 and d["true_decoder_axes_median_abs"] == 4.0
    assert d["near_best_decoder_angle_median_abs"] == 2.0
    assert f["truth_data_sets"] == 0 and math.isnan(f["truth_gap_median"])
    assert math.isnan(f["near_best_decoder_angle_median_abs"])


def test_optimum_table_renders_reference_runs_and_dashes_for_files_made_before_them(tmp_path):
    import json

    from fastjac.experiments import tables
    new = {"nonlinearity": "tanh", "inference": "amortised", "covariance": "diagonal", "runs": 2,
           "near_best_runs": 2, "best_gap_min": 0.0, "near_best_angle_median_abs": 24.5,
           "near_best_angle_max_abs": 30.0, "near_best_angle_to_best_median_abs": 0.0,
           "near_best_principal_angle_median_abs": 1.0, "gradient_max": 1e-5,
           "near_best_decoder_angle_median_abs": 25.6, "near_best_decoder_singular_values_median": [0.772, 0.578],
           "truth_data_sets": 2, "truth_gap_median": -0.2824, "true_decoder_axes_median_abs": 7.3,
           "truth_start_gap_median": -1.6e-13, "truth_start_angle_median_abs": 24.5,
           "near_best_data_axes_angle_median_abs": 42.0, "mixing_angle_median_abs": 14.6}
    old = {k: v for k, v in new.items()
           if not k.startswith(("truth", "true", "near_best_decoder", "near_best_data_axes", "mixing"))}
    old["covariance"] = "full"
    doc = {"experiment": "identifiability", "runs": {}, "summary": [new, old],
           "config": {"training": {"mixing": "orthogonal"}}}
    (tmp_path / "results.json").write_text(json.dumps(doc))
    tables.publish("identifiability-quick", tmp_path / "results.json", out_dir=tmp_path, machine="m",
                   command="fastjac reproduce identifiability --quick", date="2026-01-01 00:00 UTC")
    text = tables.identifiability_quick(tmp_path)
    assert ("| tanh | amortised | diagonal | 25.6° | 0.772, 0.578 | 42.0° / 14.6° | −0.2824 | 7.3° | "
            "−1.6e−13 / 24.5° |") in text
    assert "| tanh | amortised | full | — | —, — | — | — | — | — |" in text
    assert "ELBO over the decoder's angle" not in text                # no profile in these runs: no table
    new.update(profile_data_sets=2, profile_peak_angle_median_abs=28.75, profile_peak_angle_max_abs=30.0,
               profile_at_true_axes_median=-0.0282, profile_range_median=0.0359, profile_gradient_max=4e-5,
               profile_peak_gap_median=-2e-5, profile_peaks_max=1)
    (tmp_path / "results.json").write_text(json.dumps(doc))
    tables.publish("identifiability-quick", tmp_path / "results.json", out_dir=tmp_path, machine="m",
                   command="fastjac reproduce identifiability --quick", date="2026-01-01 00:00 UTC")
    text = tables.identifiability_quick(tmp_path)
    assert "| tanh | amortised | diagonal | 2 | 1 | 28.8° / 30.0° | −2.0e−05 | −0.0282 | 0.0359 | 4e-05 |" in text
    assert "| full |" not in text.split("ELBO over the decoder's angle")[1]  # the full row had no profile


# ------------------------------------------------------------------ the profile over the decoder's angle

@pytest.mark.parametrize("inference", ["amortised", "unamortised"])
@pytest.mark.parametrize("nu", ["identity", "tanh"])
def test_turning_the_latent_axes_keeps_a_full_sigma_elbo_but_not_a_diagonal_one(nu, inference):
    angle = torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64)
    losses = {}
    for cov in ("full", "diagonal"):
        s, training, seeds = _data(nu, "orthogonal", inference, cov, points=50)
        data, params, fixed = ident.simulate(seeds, s, training)
        loss_of = ident._loss_function(fixed, data.X, s, training)
        turned = ident.turn(params, fixed, angle)
        with torch.no_grad():
            losses[cov] = (loss_of(params), loss_of(turned))
            mu, _ = ident.posterior(params, fixed, data.X, cov)
            mu_turned, _ = ident.posterior(turned, fixed, data.X, cov)
        torch.testing.assert_close(mu_turned, mu @ rotation(angle), atol=1e-12, rtol=0)   # μ′ = Rᵀμ
        torch.testing.assert_close(turned["A"], params["A"].detach() @ rotation(angle))
    torch.testing.assert_close(*losses["full"], atol=1e-12, rtol=0)
    assert float((losses["diagonal"][0] - losses["diagonal"][1]).abs().min()) > 1e-4


def _converged(nu, covariance, points=150, trials=2):
    s, training, seeds = _data(nu, "orthogonal", covariance=covariance, points=points, trials=trials)
    s = ident.Setting(nu, "amortised", covariance, 60)
    data, params, fixed = ident.simulate(seeds, s, training)
    loss_of = ident._loss_function(fixed, data.X, s, training)
    ident.schedule(params, loss_of, s, training)
    ident.refine(params, loss_of, training)
    with torch.no_grad():
        return s, training, data, params, fixed, loss_of(params)


def _assert_same_angles(got, want):
    """Equal modulo the signed permutations (45° and −45° are one angle)."""
    diff = [ident.wrap_angle(g - w) for g, w in zip(got, want.tolist())]
    assert len(got) == len(want) and max(map(abs, diff)) < 1e-8, diff


ANGLES = torch.tensor([-40.0, -25.0, -10.0, -2.5, 0.0, 2.5, 10.0, 25.0, 45.0], dtype=torch.float64)


def test_angle_profile_holds_the_decoder_at_its_angle_and_is_flat_for_a_full_sigma():
    s, training, data, params, fixed, loss = _converged("tanh", "full")
    prof = ident.angle_profile(data, params, fixed, s, training, ANGLES)
    assert prof["angle"] == ANGLES.tolist() and len(prof["elbo"]) == 2
    for t in range(2):
        _assert_same_angles(prof["decoder_angle"][t], ANGLES)
        # every angle reaches the run's own optimum: a full Σ has no preferred axes
        torch.testing.assert_close(torch.tensor(prof["elbo"][t], dtype=torch.float64),
                                   torch.full((len(ANGLES),), -float(loss[t]), dtype=torch.float64),
                                   atol=1e-8, rtol=0)
        assert ident.profile_stats(prof)[t]["range"] < 1e-8


@pytest.mark.parametrize("nu", ["identity", "tanh"])
def test_angle_profile_of_a_diagonal_sigma_peaks_at_the_converged_run(nu):
    """The profile is the best ELBO at each decoder angle, so it stays below the converged run and
    touches it near the run's own angle; for identity ν (orthogonal W) that is near the true axes,
    for tanh (amortised) it is not, and the true axes cost ELBO."""
    s, training, data, params, fixed, loss = _converged(nu, "diagonal")
    own = ident.decoder_angle(params["A"].detach(), data.W)
    angles = torch.cat([ANGLES, own]).sort().values
    prof = ident.angle_profile(data, params, fixed, s, training, angles)
    for t, stats in enumerate(ident.profile_stats(prof)):
        elbo = torch.tensor(prof["elbo"][t], dtype=torch.float64)
        _assert_same_angles(prof["decoder_angle"][t], angles)
        assert float(elbo.max()) <= -float(loss[t]) + 1e-8
        at_own = elbo[(angles - own[t]).abs().argmin()]
        assert float(at_own) == pytest.approx(-float(loss[t]), abs=1e-7)
        assert stats["range"] > 1e-3                                     # the angle matters
        if nu == "identity":
            assert abs(stats["peak_angle"]) <= 10.0 and stats["at_true_axes"] > -0.01
        else:
            assert abs(stats["peak_angle"]) >= 10.0 and stats["at_true_axes"] < -1e-3


def test_profile_stats_find_the_peak_the_true_axes_and_the_range():
    prof = {"angle": [-10.0, 0.0, 10.0, 20.0], "elbo": [[-3.0, -2.5, -2.0, -2.2], [-1.0, None, -1.0, -1.0]],
            "gradient_max": [[1e-6, 2e-6, 1e-7, 1e-6], [0.0] * 4], "decoder_angle": [[-10.0, 0.0, 10.0, 20.0]] * 2}
    (stats,) = ident.profile_stats(prof)                                 # the set with a diverged angle: out
    assert stats == {"peak_angle": 10.0, "peaks": 1, "at_true_axes": pytest.approx(-0.5),
                     "range": pytest.approx(1.0), "gradient_max": 2e-6}
    (stats,) = ident.profile_stats(prof, best=[-1.5, -0.5])
    assert stats["peak_gap"] == pytest.approx(-0.5)                      # a local optimum: below the best
    flat = {"angle": [-10.0, 0.0, 10.0], "elbo": [[-2.0, -2.0 + 1e-9, -2.0]], "gradient_max": [[0.0] * 3],
            "decoder_angle": [[-10.0, 0.0, 10.0]]}
    (stats,) = ident.profile_stats(flat)
    assert stats["peak_angle"] is None and stats["peaks"] is None and stats["range"] < ident.FLAT
    # two peaks on the circle of angles: −10° (whose neighbours are 0° and, round the circle, 20°) and 10°
    two = {"angle": [-10.0, 0.0, 10.0, 20.0], "elbo": [[-1.0, -3.0, -1.5, -2.0]], "gradient_max": [[0.0] * 4],
           "decoder_angle": [[-10.0, 0.0, 10.0, 20.0]]}
    assert ident.profile_stats(two)[0]["peaks"] == 2
    # one peak on a plateau, with wiggles below FLAT on it: still one
    plateau = {"angle": [-20.0, -10.0, 0.0, 10.0, 20.0], "elbo": [[-1.0, -0.5, -0.5 + 1e-8, -0.5, -2.0]],
               "gradient_max": [[0.0] * 5], "decoder_angle": [[-20.0, -10.0, 0.0, 10.0, 20.0]]}
    assert ident.profile_stats(plateau)[0]["peaks"] == 1


def test_axes_against_the_data_coordinates_are_w_rotation_for_the_true_decoder():
    """θ_x of the true decoder (A = W = R(φ)·diag(2, 1)) is φ modulo signed permutations, and the
    mixing angle is recorded beside it; turning the decoder's latents does not move θ_x of W."""
    s, training, seeds = _data("tanh", "orthogonal", trials=4)
    data, params, fixed = ident.simulate(seeds, s, training)
    truth = ident._truth_parameters(data, params, fixed)
    m = ident._measure(truth, fixed, data, "diagonal", torch.zeros(4, dtype=torch.float64))
    phi = torch.rad2deg(torch.atan2(data.W[:, 1, 0], data.W[:, 0, 0]))
    _assert_same_angles(m["data_axes_angle"], phi)
    _assert_same_angles(m["mixing_angle"], phi)
    assert m["decoder_angle"] == pytest.approx([0.0] * 4, abs=1e-9)


def test_a_profile_whose_decoder_left_its_angle_is_left_out(monkeypatch):
    """P must stay positive definite for Q to stay the Procrustes factor; an optimiser that leaves
    the cone moves the decoder's angle, and that point is dropped (None), never reported."""
    s, training, data, params, fixed, _ = _converged("identity", "diagonal", points=60, trials=1)

    def leave_the_cone(free, loss_of, training, on_step=None):
        with torch.no_grad():
            # R(30°)·diag(2, −1)·R(30°)ᵀ: indefinite, so WᵀA's orthogonal factor gains a reflection
            # about the 30° line and the decoder's angle moves by 60° (a diagonal one would not)
            free["P"][0] = torch.tensor([1.25, 0.75 * math.sqrt(3.0), -0.25], dtype=torch.float64)
        return torch.zeros(free["P"].shape[0], dtype=torch.float64)

    monkeypatch.setattr(ident, "refine", leave_the_cone)
    prof = ident.angle_profile(data, params, fixed, s, training, ANGLES)
    assert ident.wrap_angle(prof["decoder_angle"][0][0] - ANGLES[0].item()) == pytest.approx(-30.0)
    _assert_same_angles(prof["decoder_angle"][0][1:], ANGLES[1:])
    assert ident.profile_curves(prof) == [None] and ident.profile_stats(prof) == []   # not a profile: out
