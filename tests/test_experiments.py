"""The paper's experiments (fastjac.experiments): the measurement tools against known answers,
batched trials against the same trials run one by one, and each --quick path at toy size."""
import argparse
import itertools
import json
import math

import numpy as np
import pytest
import torch

from fastjac.experiments import cli
from fastjac.experiments import identifiability as ident
from fastjac.experiments.procrustes import latent_angle, procrustes, rotation, rotation_angle

SIGNED_PERMUTATIONS = [torch.tensor(p, dtype=torch.float64) * torch.tensor(s, dtype=torch.float64)
                       for p in ([[1, 0], [0, 1]], [[0, 1], [1, 0]])
                       for s in itertools.product((1, -1), repeat=2)]


def reproduce(tmp_path, *argv):
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    threads = torch.get_num_threads()
    code = cli.run(parser.parse_args([*argv, "--out", str(tmp_path), "--threads", "1"]))
    assert torch.get_num_threads() == threads, "reproduce must restore torch's thread count"
    return code


def read_results(tmp_path):
    return json.loads((tmp_path / "results.json").read_text())


def assert_png(path):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"


# ------------------------------------------------------------------------------- Procrustes

@pytest.mark.parametrize("degrees", [-44.0, -30.0, -7.5, 0.0, 12.0, 44.5])
@pytest.mark.parametrize("perm", range(8))
def test_procrustes_recovers_rotation_up_to_signed_permutation(degrees, perm):
    g = torch.Generator().manual_seed(perm)
    Z = torch.randn(500, 2, generator=g, dtype=torch.float64)
    O = rotation(torch.tensor(math.radians(degrees), dtype=torch.float64)) @ SIGNED_PERMUTATIONS[perm]
    M = Z @ O + 1e-3 * torch.randn(500, 2, generator=g, dtype=torch.float64)   # rows: Z = O M
    assert latent_angle(Z, M).item() == pytest.approx(degrees, abs=0.05)


def test_procrustes_is_the_least_squares_orthogonal_matrix():
    g = torch.Generator().manual_seed(0)
    Z, M = torch.randn(3, 2, 40, generator=g, dtype=torch.float64).unbind(0)[:2]
    O = procrustes(Z, M)
    torch.testing.assert_close(O @ O.T, torch.eye(2, dtype=torch.float64))
    best = (Z - O @ M).norm()
    t = torch.linspace(0, 2 * math.pi, 721, dtype=torch.float64)        # no rotation/reflection does better
    others = torch.cat([rotation(t), rotation(t) @ torch.diag(torch.tensor([1.0, -1.0], dtype=torch.float64))])
    assert bool((best <= (Z - others @ M).norm(dim=(-2, -1)) + 1e-12).all())


def test_rotation_angle_range_and_batch_shape():
    angles = torch.linspace(-180, 180, 97, dtype=torch.float64)
    out = rotation_angle(rotation(torch.deg2rad(angles)).reshape(97, 1, 2, 2)).reshape(97)
    assert bool(((out > -45) & (out <= 45 + 1e-9)).all())
    torch.testing.assert_close(torch.remainder(out - angles + 1e-9, 90.0),
                               torch.full_like(out, 1e-9), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="shape"):
        rotation_angle(torch.eye(3))
    with pytest.raises(ValueError, match="same shape"):
        procrustes(torch.randn(2, 5), torch.randn(2, 6))


# ------------------------------------------------------------------------- identifiability

def _setting(nu="tanh", inference="amortised", covariance="full", n=3):
    return ident.Setting(nu, inference, covariance, n)


def test_identity_elbo_matches_closed_form():
    """For ν = identity, E_q‖x − Az − b‖² = ‖x − Aμ − b‖² + tr(AΣAᵀ): the quadrature is exact."""
    training = ident.Training(num_points=50, quadrature=2)
    for inference, cov in itertools.product(ident.INFERENCE, ident.COVARIANCES):
        s = _setting("identity", inference, cov)
        data, params, fixed = ident.simulate([(1, 2), (3, 4)], s, training)
        with torch.no_grad():
            got = ident.negative_elbo(params, fixed, data.X, nonlinearity="identity", covariance=cov,
                                      rule=ident.hermite_rule(2))
            mu, L = ident.posterior(params, fixed, data.X, cov)
            A, b, S = params["A"], params["b"], L @ L.mT
            resid = data.X - mu @ A.mT - b[:, None]
            trace = (A[:, None] @ S @ A[:, None].mT).diagonal(dim1=-2, dim2=-1).sum(-1)
            recon = ((resid ** 2).sum(-1) + trace) / (2 * ident.NOISE_STD ** 2)
            kl = 0.5 * ((mu ** 2).sum(-1) + S.diagonal(dim1=-2, dim2=-1).sum(-1)
                        - torch.logdet(S) - 2)
            want = (recon + kl).mean(1) + math.log(2 * math.pi * ident.NOISE_STD ** 2)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=0)


def test_diagonal_posterior_keeps_only_the_diagonal_of_the_rotated_covariance():
    s = _setting("tanh", "unamortised", "diagonal")
    data, params, fixed = ident.simulate([(5, 6)], s, ident.Training(num_points=7))
    with torch.no_grad():
        _, L_diag = ident.posterior(params, fixed, data.X, "diagonal")
        _, L_full = ident.posterior(params, fixed, data.X, "full")
        O, D = fixed["O2"].reshape(-1, 1, 2, 2), params["D"]
        S = O @ D @ D.mT @ O.mT
    torch.testing.assert_close(L_full @ L_full.mT, S)
    torch.testing.assert_close(L_diag @ L_diag.mT, torch.diag_embed(S.diagonal(dim1=-2, dim2=-1)))


@pytest.mark.parametrize("inference", ident.INFERENCE)
def test_batched_trials_equal_trials_run_one_by_one(inference):
    s = _setting("tanh", inference, "diagonal", n=4)
    training = ident.Training(num_points=40, quadrature=3, seed=1, refine_iterations=30)
    seeds = [ident.trial_seeds(1, s, t) for t in range(3)]
    batched = ident.run_trials(seeds, s, training)
    for t, pair in enumerate(seeds):
        alone = ident.run_trials([pair], s, training)
        for key in ("elbo", "angle", "principal_angle"):
            assert alone[key][0] == pytest.approx(batched[key][t], rel=1e-9, abs=1e-9), key


def test_trial_data_are_shared_across_settings_and_initialisations_are_not():
    a, b = _setting(covariance="full", n=3), _setting(covariance="diagonal", n=9)
    (da, ia), (db, ib) = ident.trial_seeds(0, a, 2), ident.trial_seeds(0, b, 2)
    assert da == db and ia != ib


def test_identifiability_quick_path_writes_results_and_figure_and_resumes(tmp_path, capsys):
    argv = ["identifiability", "--quick", "--steps", "2", "--trials", "2", "--points", "16", "--refine-iterations", "20",
            "--nonlinearities", "identity", "sigmoid", "--inference", "amortised",
            "--mixing", "gaussian"]
    assert reproduce(tmp_path, *argv) == 0
    doc = read_results(tmp_path)
    assert doc["experiment"] == "identifiability" and doc["config"]["quick"] is True
    assert set(doc["runs"]) == {f"{nu}/amortised/{c}/n=2" for nu in ("identity", "sigmoid")
                                for c in ("diagonal", "full")}
    for rec in doc["runs"].values():
        assert len(rec["elbo"]) == len(rec["angle"]) == len(rec["decoder_angle"]) == 2
        assert all(a is None or -45 < a <= 45 for a in rec["angle"] + rec["principal_angle"])
        assert len(rec["truth"]["elbo"]) == len(rec["truth"]["at_truth"]["elbo"]) == 2   # one n: the reference
        assert len(rec["profile"]["elbo"]) == 2 and len(rec["profile"]["elbo"][0]) == 36  # two data sets profiled
    assert len(doc["summary"]) == 4
    for r in doc["summary"]:                                     # complete profiles are summarised
        prof = doc["runs"][f"{r['nonlinearity']}/amortised/{r['covariance']}/n=2"]["profile"]
        assert r["profile_data_sets"] == sum(c is not None for c in ident.profile_curves(prof))
    assert_png(tmp_path / "identifiability.png")
    assert_png(tmp_path / "identifiability_principal.png")
    assert_png(tmp_path / "identifiability_profile.png")
    capsys.readouterr()
    assert reproduce(tmp_path, *argv) == 0                       # resume: nothing is redone
    assert capsys.readouterr().out.count("done already, skipped") == 4
    assert read_results(tmp_path)["runs"] == doc["runs"]
    del doc["runs"]["sigmoid/amortised/full/n=2"]                # an interrupted grid:
    (tmp_path / "results.json").write_text(json.dumps(doc))
    assert reproduce(tmp_path, *argv, "--summarise-only") == 0   # summarised, nothing trained
    assert "sigmoid/amortised/full/n=2" not in read_results(tmp_path)["runs"]
    assert len(read_results(tmp_path)["summary"]) == 3
    assert reproduce(tmp_path, *argv[:-1], "orthogonal") == 2    # other settings: refused


# ------------------------------------------------------------------------------- objectives

def _tiny_vae(beta, block_size, d=4):
    from fastjac.models import make_autoencoder
    torch.manual_seed(0)
    return make_autoencoder("beta-vae", "mlp", data_shape=(1, 3, 3), latent_dim=d, beta=beta,
                            block_size=block_size, width=0.1).double().eval()


@pytest.mark.parametrize("block_size", [1, 2, 4])
def test_objectives_evaluate_gap_is_nonnegative_and_matches_closed_form(block_size):
    from fastjac.experiments import objectives as exp
    vae = _tiny_vae(0.3, block_size)
    x = torch.rand(20, 1, 3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    v = exp.evaluate(vae, x, num_samples=4, batch_size=7, generator=torch.Generator().manual_seed(0))
    assert v["draws"].shape == (4, 20) and v["taylor"].shape == v["grae"].shape == (20,)
    gap = v["taylor"] - v["grae"]
    assert (gap >= -1e-12).all()
    assert abs(gap - v["closed_form_gap"]).max() < 1e-10
    s = exp.summarise(v)
    assert s["gap_negative_points"] == 0 and s["points"] == 20 and s["beta_vae_stderr"] > 0


def test_objectives_taylor_equals_grae_at_the_optimal_posterior_of_a_linear_decoder():
    """Linear check (docs/maths.md#the-taylor-gap): with Σ = Σ* the gap vanishes, and for a linear decoder the Monte Carlo
    β-VAE value converges to Taylor (the expansion is exact)."""
    from fastjac import beta_vae_terms, grae_terms, optimal_posterior_covariance, taylor_beta_vae_loss
    g = torch.Generator().manual_seed(0)
    dec = torch.nn.Linear(3, 6).double()
    mu, x = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, 6, generator=g, dtype=torch.float64)
    J = dec.weight.detach().expand(5, 6, 3)
    L = torch.linalg.cholesky(optimal_posterior_covariance(J, 0.5))
    with torch.no_grad():
        taylor = taylor_beta_vae_loss(dec, mu, L, x, 0.5, reduction="none")
        grae = grae_terms(dec, mu, x, 0.5).total
        mc = beta_vae_terms(dec, mu, L, x, 0.5, num_samples=20000, generator=g).per_sample
    torch.testing.assert_close(taylor, grae, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(mc, taylor, rtol=0, atol=0.05)


def test_objectives_quick_path_at_toy_size(tmp_path, capsys):
    argv = ["objectives", "--quick", "--betas", "0.1", "1", "--blocks", "1", "2", "--latent-dim", "4",
            "--train-steps", "3", "--test-points", "12", "--num-samples", "3", "--width", "0.1"]
    assert reproduce(tmp_path, *argv) == 0
    out = capsys.readouterr().out
    assert "Taylor − GRAE ≥ 0 on every one of 12 points × 4 models: yes" in out
    doc = read_results(tmp_path)
    assert set(doc["runs"]) == {f"b={b}/beta={beta}" for b in (1, 2) for beta in ("0.1", "1")}
    for r in doc["runs"].values():
        assert r["gap_negative_points"] == 0 and r["taylor"] >= r["grae"]
        assert all(math.isfinite(r[k]) for k in ("beta_vae", "beta_vae_stderr", "taylor", "grae"))
    assert doc["summary"]["all_gaps_nonnegative"] is True
    assert_png(tmp_path / "objectives.png")
    assert len(list((tmp_path / "models").glob("*/checkpoint.pt"))) == 4   # one trainer run per model
    assert reproduce(tmp_path, *argv) == 0                       # resume
    assert capsys.readouterr().out.count("done already, skipped") == 4


def _mnist_idx(folder, count: int) -> None:
    """A synthetic MNIST test file (IDX, uncompressed) of ``count`` random 28×28 images."""
    import struct
    images = np.random.default_rng(0).integers(0, 256, (count, 28, 28)).astype(np.uint8)
    (folder / "t10k-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 0x803, count, 28, 28) + images.tobytes())


def test_objectives_app_d_networks_at_toy_size(tmp_path, capsys):
    """--architecture mnist: the App. D conv nets, evaluated in chunks; the trainer's own held-out
    check uses no more points than the experiment evaluates (it was 500, minutes per App. D model)."""
    from fastjac.experiments import objectives
    _mnist_idx(tmp_path, 60)
    argv = ["objectives", "--dataset", "mnist", "--data-dir", str(tmp_path), "--architecture", "mnist",
            "--width", "0.05", "--betas", "0.5", "--blocks", "2", "--latent-dim", "4", "--train-steps", "2",
            "--test-points", str(objectives.EVAL_BATCH_CONV + 3), "--num-samples", "3", "--batch-size", "8"]
    assert reproduce(tmp_path / "out", *argv) == 0
    doc = read_results(tmp_path / "out")
    assert doc["config"]["model"]["architecture"] == "mnist"
    (r,) = doc["runs"].values()
    assert r["points"] == objectives.EVAL_BATCH_CONV + 3 and r["gap_negative_points"] == 0   # two chunks
    assert r["gap_closed_form_max_error"] < 1e-8
    trained = json.loads((tmp_path / "out" / "models" / "objectives-b2-beta0.5" / "config.json").read_text())
    assert trained["architecture"] == "mnist" and trained["eval_size"] == r["points"]


def test_objectives_table_says_what_ran_and_what_is_missing(tmp_path):
    from fastjac.experiments import tables
    run = dict(block_size=1, beta=0.1, beta_vae=2.0, beta_vae_stderr=0.01, taylor=1.9, grae=1.8, gap_mean=0.1,
               gap_min=0.05, points=40)
    first = dict(run, beta=0.01, beta_vae=1.0)                     # run after b=1/β=0.1: rows sort by (b, β)
    res = {"experiment": "objectives", "runs": {"b=1/beta=0.1": run, "b=1/beta=0.01": first}, "summary": None,
           "config": {"model": {"architecture": "mnist", "width": 1.0, "train_steps": 200},
                      "grid": {"betas": [0.1, 1.0, 0.01], "blocks": [1], "latent_dim": 12, "num_samples": 32}}}
    (tmp_path / "results.json").write_text(json.dumps(res))
    tables.publish("objectives-x", tmp_path / "results.json", command="fastjac reproduce objectives",
                   machine="m", out_dir=tmp_path, date="2026-01-01 00:00 UTC")
    text = tables._objectives("objectives-x")(tmp_path)
    assert text.index("| 1 | 0.01 | 1.000 ± 0.010 |") < text.index("| 1 | 0.1 | 2.000 ± 0.010 |")
    assert "| 1 | 0.1 | 2.000 ± 0.010 | 1.900 | 1.800 | 0.100 | 0.100 | 5.0e-02 |" in text
    assert "App. D mnist network, d = 12, 200 Adam steps each; evaluated on 40 held-out points, 32" in text
    assert "*Unfinished*: 2 of the grid's 3 models ran (missing: b=1/beta=1)" in text


def test_objectives_bad_settings_are_refused(tmp_path, capsys):
    assert reproduce(tmp_path, "objectives", "--quick", "--blocks", "5", "--latent-dim", "4") == 2
    assert "--blocks must lie in [1, d = 4]" in capsys.readouterr().out
    assert reproduce(tmp_path, "objectives", "--quick", "--dataset", "mnist") == 2
    assert "--data-dir" in capsys.readouterr().out


# -------------------------------------------------------------------------------- structure

def test_structure_measure_on_a_known_optimal_posterior():
    """A model whose posterior is Eq. 11 exactly on the blocks: relative error in blocks 0."""
    from fastjac.experiments import structure
    from fastjac.models import Posterior, block_mask

    dec = torch.nn.Linear(4, 9).double()
    mask = block_mask(4, 2)

    class Exact(torch.nn.Module):
        beta, observation, decoder = 0.4, __import__("fastjac").Gaussian(), dec

        def posterior_of(self, x):
            mu = x.flatten(1)[:, :4]
            G = dec.weight.T @ dec.weight
            P = torch.eye(4, dtype=G.dtype) + (G * mask) / self.beta
            L = torch.linalg.cholesky(torch.linalg.inv(P)).expand(len(x), 4, 4)
            return Posterior(mu, L)

    m = structure.measure(Exact(), torch.rand(6, 1, 3, 3, dtype=torch.float64), 2)
    assert max(m["relative_error_in_blocks"]) < 1e-10
    G = (dec.weight.T @ dec.weight).detach()
    off = (G ** 2 * ~mask).sum() / (G ** 2 * ~torch.eye(4, dtype=torch.bool)).sum()
    assert m["off_block_fraction"][0] == pytest.approx(float(off), rel=1e-10)
    assert m["chance"] == pytest.approx(8 / 12)


def test_structure_optimal_posterior_of_a_linear_decoder_is_eq_11():
    """For a linear decoder the β-VAE objective's optimal block Σ is Eq. 11 exactly; with fixed draws
    it is found up to the draws' sampling error, from a start far from it."""
    from fastjac.experiments import structure
    from fastjac.models import Posterior

    torch.manual_seed(0)
    dec = torch.nn.Linear(4, 9).double()
    x = torch.rand(5, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    class Start(torch.nn.Module):
        beta, observation, decoder = 0.4, __import__("fastjac").Gaussian(), dec

        def posterior_of(self, x):
            return Posterior(x[:, :4], 0.5 * torch.eye(4, dtype=x.dtype).expand(len(x), 4, 4).clone())

    start = structure.measure(Start(), x, 2)
    best = structure.optimal_posteriors(Start(), x, 2, num_samples=4000, iterations=200)
    rough = structure.optimal_posteriors(Start(), x, 2, num_samples=100, iterations=200)
    assert min(start["relative_error_in_blocks"]) > 0.3
    # the fixed draws' sampling error, ~ 1/√S in Σ (amplified in Σ⁻¹): shrinks with more draws
    assert np.median(best["relative_error_in_blocks"]) < 0.06 < np.median(rough["relative_error_in_blocks"])
    P = best["precision"][0]
    assert abs(P[0, 2]) < 1e-12 and abs(P[1, 3]) < 1e-12         # the block structure is kept


def test_structure_quick_path_at_toy_size(tmp_path):
    argv = ["structure", "--quick", "--models", "0.2,4,2", "0.5,3,3", "--train-steps", "3",
            "--test-points", "10", "--width", "0.1"]
    assert reproduce(tmp_path, *argv) == 0
    doc = read_results(tmp_path)
    assert set(doc["runs"]) == {"beta=0.2/d=4/b=2/steps=3", "beta=0.5/d=3/b=3/steps=3"}
    r = doc["runs"]["beta=0.2/d=4/b=2/steps=3"]
    assert 0 <= r["off_block_fraction_median"] <= 1 and r["relative_error_median"] >= 0
    assert doc["runs"]["beta=0.5/d=3/b=3/steps=3"]["chance"] == 0   # one block: nothing outside
    assert_png(tmp_path / "structure.png")
    assert reproduce(tmp_path, "structure", "--quick", "--models", "0.2,4") == 2


def test_structure_checkpoints_resume_one_run_and_refine_the_encoder_only(tmp_path):
    from fastjac.experiments import structure
    argv = ["structure", "--quick", "--models", "0.2,4,2", "--checkpoints", "2", "5",
            "--refine-encoder", "3", "--test-points", "10", "--width", "0.1"]
    assert reproduce(tmp_path, *argv) == 0
    runs = read_results(tmp_path)["runs"]
    assert list(runs) == ["beta=0.2/d=4/b=2/steps=2", "beta=0.2/d=4/b=2/steps=5",
                          "beta=0.2/d=4/b=2/steps=5+encoder3"]
    assert runs["beta=0.2/d=4/b=2/steps=5+encoder3"]["encoder_steps"] == 3
    assert runs["beta=0.2/d=4/b=2/steps=2"] != runs["beta=0.2/d=4/b=2/steps=5"]
    assert reproduce(tmp_path, *argv) == 0                     # rerun: the run is past step 2, no error
    assert read_results(tmp_path)["runs"] == runs
    # the refined model's decoder is the trained one, bit for bit; its encoder moved
    from fastjac.models import make_autoencoder
    torch.manual_seed(0)
    vae = make_autoencoder("beta-vae", "mlp", data_shape=(1, 8, 8), latent_dim=4, beta=0.2, block_size=2,
                           width=0.1)
    x = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    data = type("D", (), {"__len__": lambda self: 64, "batch": lambda self, i: x[i]})()
    refined, _ = structure.refined_encoder(vae, data, steps=3, batch_size=8, lr=1e-2, seed=0,
                                           checkpoint=tmp_path / "enc.pt")
    for (name, a), b in zip(vae.state_dict().items(), refined.state_dict().values()):
        if name.startswith("decoder"):
            assert torch.equal(a, b), name
    assert any(not torch.equal(a, b) for (name, a), b in zip(vae.state_dict().items(),
               refined.state_dict().values()) if name.startswith("encoder"))


# ---------------------------------------------------------------------------------- samples

def test_frechet_distance_of_gaussians_matches_closed_form():
    from fastjac.experiments.frechet import frechet_distance
    import numpy as np
    rng = np.random.default_rng(0)
    a = rng.standard_normal((200000, 3)) * [1.0, 2.0, 0.5]
    b = rng.standard_normal((200000, 3)) * [2.0, 2.0, 1.0] + [1.0, 0.0, 0.0]
    # ‖δ‖² + Σ (σ_a − σ_b)² for diagonal covariances
    assert frechet_distance(a, b) == pytest.approx(1.0 + 1.0 + 0.0 + 0.25, abs=0.03)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    with pytest.raises(ValueError, match="features"):
        frechet_distance(a, b[:, :2])


def test_samples_quick_path_at_toy_size(tmp_path, capsys):
    argv = ["samples", "--quick", "--betas", "0.05", "0.5", "--latent-dim", "2", "--train-steps", "3",
            "--samples", "20", "--classifier-steps", "3", "--width", "0.1"]
    assert reproduce(tmp_path, *argv) == 0
    assert "NOT Inception-FID" in capsys.readouterr().out
    doc = read_results(tmp_path)
    assert set(doc["runs"]) == {f"{m}/beta={b}" for m in ("beta-vae", "grae≈") for b in ("0.05", "0.5")}
    assert all(r["frechet"] >= 0 and r["frechet_ex_post"] >= 0 for r in doc["runs"].values())
    assert all(r["frechet"] != r["frechet_ex_post"] for r in doc["runs"].values())
    assert doc["summary"]["classifier"]["task"] == "rotation (4 classes)"
    assert_png(tmp_path / "samples.png")
    assert_png(tmp_path / "frechet.png")
    assert reproduce(tmp_path, "samples", "--quick", "--inception-weights", str(tmp_path / "none.pt")) == 2


def test_atomic_write_leaves_no_temporary_file_and_usual_permissions(tmp_path):
    import os
    from fastjac.experiments.results import Results
    res = Results(tmp_path, "x", {"a": 1})
    res.put("k", {"v": float("nan"), "w": (1, 2)})
    assert json.loads((tmp_path / "results.json").read_text())["runs"]["k"] == {"v": None, "w": [1, 2]}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "results.json").stat().st_mode & 0o777 == 0o666 & ~umask
    with pytest.raises(ValueError, match="another --out"):
        Results(tmp_path, "x", {"a": 2})


# ------------------------------------------------------------------------- batched L-BFGS

def _rosenbrock_rows(scales):
    """Row t: scale_t · 100‖x₂: − x₁:⁻¹²‖² + ‖1 − x‖² (4-D Rosenbrock), minimum at all ones."""
    def value_and_grad(x):
        x = x.detach().requires_grad_()
        f = (scales[:, None] * 100 * (x[:, 1:] - x[:, :-1] ** 2) ** 2 + (1 - x[:, :-1]) ** 2).sum(-1)
        return f.detach(), torch.autograd.grad(torch.nan_to_num(f).sum(), x)[0]
    return value_and_grad


STARTS = torch.tensor([[-1.2, 1.0, -0.5, 0.3], [0.0, 0.0, 0.0, 0.0], [2.0, -1.0, 1.5, 0.5]],
                      dtype=torch.float64)
SCALES = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)


def test_batched_lbfgs_finds_each_rows_minimum():
    from fastjac.experiments import lbfgs
    x, g = lbfgs.minimise(_rosenbrock_rows(SCALES), STARTS, iterations=500, tolerance=1e-10)
    torch.testing.assert_close(x, torch.ones_like(x), atol=1e-7, rtol=0)
    assert g.abs().max() <= 1e-6                                  # stopped at rounding level of f


def test_batched_lbfgs_rows_do_not_interact():
    """A batch reaches what its rows reach alone (own history, step length and stopping test),
    and a row starting at a non-finite value stays put without stopping the others."""
    from fastjac.experiments import lbfgs
    batched, _ = lbfgs.minimise(_rosenbrock_rows(SCALES), STARTS, iterations=30)
    for t in range(3):
        alone, _ = lbfgs.minimise(_rosenbrock_rows(SCALES[t:t + 1]), STARTS[t:t + 1], iterations=30)
        torch.testing.assert_close(alone[0], batched[t], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(batched[0], torch.ones_like(batched[0]))  # 30 steps: on the way
    broken = STARTS.clone()
    broken[1, 0] = math.nan
    x, _ = lbfgs.minimise(_rosenbrock_rows(SCALES), broken, iterations=30)
    assert torch.equal(x[1, 1:], broken[1, 1:]) and torch.isnan(x[1, 0])
    torch.testing.assert_close(x[[0, 2]], batched[[0, 2]], rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------ published tables

def test_publish_adds_provenance_scrubs_paths_and_refuses_other_files(tmp_path):
    from fastjac.experiments import tables
    res = {"experiment": "structure", "config": {"model": {"data_dir": "/home/me/data/mnist"},
                                                 "data": "MNIST (no training file in /home/me/data/mnist): 5 train"},
           "runs": {"k": {"train": {"run": "/tmp/xyz/models/m1"}}}, "summary": None}
    (tmp_path / "results.json").write_text(json.dumps(res))
    path = tables.publish("structure-x", tmp_path / "results.json", command="fastjac reproduce structure",
                          machine="test box", out_dir=tmp_path / "pub", date="2026-01-01 00:00 UTC")
    doc = json.loads(path.read_text())
    assert doc["command"] == "fastjac reproduce structure" and doc["machine"] == "test box"
    assert doc["config"]["model"]["data_dir"] == "data/mnist" and doc["runs"]["k"]["train"]["run"] == "models/m1"
    assert doc["config"]["data"] == "MNIST (no training file in data/mnist): 5 train"
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(ValueError, match="not an experiment"):
        tables.publish("x", tmp_path / "other.json", command="c", machine="m", out_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="publish it first"):
        tables.RENDERERS["samples-digits"](tmp_path / "pub")


def test_every_renderer_renders_the_committed_results():
    """docs/reproduction.md's generated sections come from these; each names its command."""
    from pathlib import Path

    from fastjac.experiments import tables
    results = Path(__file__).resolve().parents[1] / "docs" / "results"
    for name, render in tables.RENDERERS.items():
        text = render(results)
        assert text.startswith("| ") and text.endswith("\n"), name
        assert "Produced by `fastjac reproduce" in text and "docs/results/" in text, name
        assert "nan" not in text.lower().replace("nats", ""), name
