"""The benchmark harness: rivals compute the same thing, skips are explicit, the outputs are valid.

Speed itself is never asserted here (it is what ``fastjac bench`` reports); these tests check that
the baselines are fair (same values as fastjac), that combinations that cannot run say why, that
``fastjac bench --quick`` writes a valid ratio table, and that ``asv check`` accepts the suite.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from fastjac import column_estimate, hadamard_bound, jacobian_columns, logdet_gram, orthogonality_penalty
from fastjac.bench import baselines, models, report, results, suites, timing
from fastjac.bench import workloads as W
import fastjac.bench
from tests.utils import assert_close

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench(argv):
    """`fastjac bench ARGV` (the subcommand's own parser, so other subcommands cannot interfere)."""
    parser = argparse.ArgumentParser(prog="fastjac bench")
    fastjac.bench.add_arguments(parser)
    return fastjac.bench.run(parser.parse_args(argv))


def _grad(f, J):
    J = J.detach().requires_grad_()
    value = f(J)
    (g,) = torch.autograd.grad((value * torch.linspace(1, 2, len(value), dtype=value.dtype)).sum(), J)
    return value, g


OPERATOR_PAIRS = {  # baseline (what a user writes) -> fastjac, on J (B, D, k)
    "logdet_gram": (lambda J: baselines.logdet_gram(J, 0.5), lambda J: logdet_gram(J, 0.5)),
    "hadamard_bound": (lambda J: baselines.hadamard_bound(J, 0.5), lambda J: hadamard_bound(J, 0.5)),
    "column_estimate": (lambda J: baselines.column_estimate(J, 0.5, latent_dim=7),
                        lambda J: column_estimate(J, 0.5, probabilities=1 / 7)),
    "orthogonality_penalty": (baselines.orthogonality, orthogonality_penalty),
}


@pytest.mark.parametrize("op", list(OPERATOR_PAIRS))
def test_baseline_operators_agree_with_fastjac_in_value_and_gradient(op):
    """A fair race: the baseline computes the same function, forward and backward."""
    assert set(baselines.OPERATORS) == set(OPERATOR_PAIRS) == set(W.OPERATORS)
    J = torch.randn(3, 20, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    theirs, ours = OPERATOR_PAIRS[op]
    v_ref, g_ref = _grad(ours, J)
    v, g = _grad(theirs, J)
    assert_close(f"{op} value", v_ref, v, 1e-10)
    assert_close(f"{op} gradient", g_ref, g, 1e-10)
    assert float(g_ref.abs().max()) > 0  # the comparison above is not between two zeros


def test_baselines_take_half_precision_as_a_user_would():
    """bfloat16 J is computed in float32 (cholesky needs it), so the result matches the fp32 input."""
    J = torch.randn(2, 16, 4, generator=torch.Generator().manual_seed(0)).bfloat16()
    for name, fn in baselines.OPERATORS.items():
        kw = {"latent_dim": 4} if name == "column_estimate" else {}
        args = (J,) if name == "orthogonality_penalty" else (J, 0.5)
        out = fn(*args, **kw)
        assert out.dtype == torch.float32, name
        ref = fn(*((J.float(),) + args[1:]), **kw)
        assert_close(name, ref, out, 1e-6)


def test_baseline_jacobians_agree_with_jacobian_columns():
    dec = torch.nn.Sequential(torch.nn.Linear(3, 6), torch.nn.Tanh(), torch.nn.Linear(6, 4)).double()
    z = torch.randn(2, 3, dtype=torch.float64)
    _, J = jacobian_columns(dec, z)
    assert set(baselines.JACOBIANS) == {"vmap(jacfwd)", "functional.jacobian"}
    for name, jac in baselines.JACOBIANS.items():
        assert_close(name, J, jac(dec, z), 1e-10)
    assert_close("no graph", J, baselines.jacobian_per_sample(dec, z, create_graph=False), 1e-10)


@pytest.mark.parametrize("model", ["mlp", "mlp_fused", "mnist"])
def test_exact_grae_rivals_compute_the_same_loss_and_gradient(model):
    """The hand-written exact step (vmap(jacfwd) + Cholesky) and fastjac's optimise the same objective."""
    torch.manual_seed(0)
    m = models.build(model, 3, code_dim=3, width=1 / 16)
    x = models.data(m, 2, device="cpu", generator=torch.Generator().manual_seed(0))
    params = [p for p in [*m.encoder.parameters(), *m.decoder.parameters()] if p.requires_grad]
    grads = {}
    for implementation in ("torch", "vmap(jacfwd)"):
        loss = W._loss("grae_exact", implementation, m, 0.5, torch.Generator())(x)
        grads[implementation] = (loss, torch.autograd.grad(loss, params))
    (ours, g_ours), (theirs, g_theirs) = grads["torch"], grads["vmap(jacfwd)"]
    assert_close("loss", ours, theirs, 1e-4)
    assert_close("gradient", torch.cat([g.flatten() for g in g_ours]),
                 torch.cat([g.flatten() for g in g_theirs]), 1e-3)


@pytest.mark.parametrize("model", ["mlp", "mlp_fused", "mnist", "celeba"])
def test_models_map_codes_to_data_shape(model):
    m = models.build(model, 4, code_dim=8, width=1 / 16)
    x = models.data(m, 3, device="cpu", generator=torch.Generator().manual_seed(0))
    assert m.encoder(x).shape == (3, 8)
    out = m.decoder(torch.randn(3, 4))
    assert out.shape == x.shape and bool(((out > 0) & (out < 1)).all())


def test_combinations_that_cannot_run_raise_not_implemented():
    with pytest.raises(NotImplementedError, match="cuda"):
        W.operator("logdet_gram", "cuda", device="cpu", B=2, D=8, d=2)
    if not torch.cuda.is_available():
        with pytest.raises(NotImplementedError, match="no CUDA device"):
            W.operator("logdet_gram", "autograd", device="cuda", B=2, D=8, d=2)
    with pytest.raises(NotImplementedError, match="plain PyTorch"):
        W.training_step("mlp", "ae", "vmap(jacfwd)", device="cpu", B=2, d=2)
    with pytest.raises(NotImplementedError, match="exact GRAE only"):
        W.training_step("mlp", "grae_k1", "functional.jacobian", device="cpu", B=2, d=2)
    with pytest.raises(ValueError, match="op must be one of"):
        W.operator("frobenius", "autograd", device="cpu", B=2, D=8, d=2)
    with pytest.raises(ValueError, match="implementation must be one of"):
        W.operator("logdet_gram", "naive", device="cpu", B=2, D=8, d=2)
    with pytest.raises(ValueError, match="objective must be one of"):
        W.training_step("mlp", "vae", "torch", device="cpu", B=2, d=2)


def test_interleaved_timing_is_round_robin_and_stops_a_slow_rival_at_its_budget(monkeypatch):
    """A fake clock: every call of "slow" takes 10 ms, "fast" 0; the order of calls is recorded."""
    clock, calls = [0.0], []

    def rival(name, cost):
        def run():
            calls.append(name)
            clock[0] += cost
        return run
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])
    samples = timing.interleaved({"slow": rival("slow", 0.01), "fast": rival("fast", 0.0)},
                                 repeats=8, min_repeats=3, budget_s=0.025, min_sample_s=0.0)
    assert calls[:2] == ["slow", "fast"]                      # one warm-up each
    assert calls[2:8] == ["slow", "fast"] * 3                  # then round-robin
    assert samples["slow"] == [pytest.approx(0.01)] * 3        # stopped once 25 ms were spent
    assert samples["fast"] == [0.0] * 8
    assert timing.summary([3.0, 1.0, 2.0]) == {"median_s": 2.0, "min_s": 1.0, "repeats": 3}
    with pytest.raises(ValueError, match="repeats"):
        timing.interleaved({"f": lambda: None}, repeats=0)


def test_interleaved_timing_batches_fast_calls_into_samples_of_min_sample_s(monkeypatch):
    clock, count = [0.0], [0]

    def run():
        count[0] += 1
        clock[0] += 0.001
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])
    samples = timing.interleaved({"f": run}, repeats=2, min_sample_s=0.01)
    assert count[0] == 2 + 2 * 10 and samples["f"] == [pytest.approx(0.001)] * 2


def test_report_computes_ratios_targets_and_skips_from_the_samples(monkeypatch):
    """report.run on fixed samples: ratio to the group's baseline, targets judged, failures listed."""
    fixed = {"base": [2.0, 2.0, 9.0], "fast": [1.0, 1.0, 1.0], "slow": [5.0, 5.0, 5.0]}
    monkeypatch.setattr(timing, "interleaved", lambda fns, **kw: {k: fixed[k] for k in fns})

    def unavailable():
        raise NotImplementedError("not here")
    work = lambda: W.Workload(run=lambda: None)  # noqa: E731
    group = suites.Group("operators", "g", suites.Rival("base", work), [
        suites.Rival("fast", work, (suites.Target("≥ 1.5× faster", speedup=1.5),)),
        suites.Rival("slow", work, (suites.Target("≤ 2× base", at_most=2.0),)),
        suites.Rival("missing", unavailable)])
    rows, skipped = report.run([group], repeats=3, device=torch.device("cpu"), peaks=None, budget_s=1.0)
    by = {r["implementation"]: r for r in rows}
    assert [r["implementation"] for r in rows] == ["base", "fast", "slow"]
    assert by["base"]["baseline"] and not by["fast"]["baseline"]
    assert by["fast"]["ratio"] == 0.5 and by["slow"]["ratio"] == 2.5
    assert by["base"]["median_s"] == 2.0 and by["base"]["min_s"] == 2.0 and by["base"]["repeats"] == 3
    assert by["fast"]["targets"] == [{"text": "≥ 1.5× faster", "ratio": 0.5, "holds": True}]
    assert by["slow"]["targets"] == [{"text": "≤ 2× base", "ratio": 2.5, "holds": False}]
    assert skipped == [{"area": "operators", "workload": "g", "implementation": "missing", "reason": "not here"}]


def test_results_record_names_the_command_and_machine_and_writes_atomically(tmp_path):
    r = results.record("t", program="python x.py", argv=["--json", "a b.json"], settings={"k": 1})
    assert r["tool"] == "t" and r["command"] == "python x.py --json 'a b.json'" and r["settings"] == {"k": 1}
    assert {"cpu", "cores", "torch_threads", "load_average", "torch", "date", "device"} <= set(r["machine"])
    path = tmp_path / "sub" / "r.json"
    results.write_json(r, path)
    assert results.load(path) == r and os.listdir(path.parent) == ["r.json"]
    assert (os.stat(path).st_mode & 0o777) == 0o644
    line = results.machine_line(r["machine"])
    assert r["machine"]["cpu"] in line and "torch threads" in line


@pytest.mark.parametrize("device,quick", [("cpu", False), ("cpu", True), ("cuda", False)])
def test_every_group_is_timed_against_a_hand_written_baseline(device, quick):
    """No group compares fastjac with itself: the baseline is what a user writes, or the plain step."""
    groups = suites.groups(device, quick=quick)
    assert {g.area for g in groups} == set(suites.AREAS)
    hand_written = {baselines.OPERATOR_LABEL, *baselines.JACOBIANS, "plain AE", suites.ZOO_LABELS["plain"]}
    for g in groups:
        assert g.baseline.label in hand_written, g.title
        labels = [r.label for r in g.rivals]
        assert g.baseline.label not in labels and len(set(labels)) == len(labels), g.title
    k1 = [r for g in groups for r in g.rivals if r.label.startswith("GRAE≈ k=1") and "by hand" not in r.label]
    assert k1 and all(r.targets for r in k1)   # the cost target is attached where it is judged


def test_targets():
    assert suites.Target("≤ 2.2×", at_most=2.2).holds(2.1)
    assert not suites.Target("≤ 2.2×", at_most=2.2).holds(2.3)
    assert suites.Target("≥ 1.3× faster", speedup=1.3).holds(1 / 1.4)
    assert not suites.Target("≥ 1.3× faster", speedup=1.3).holds(1 / 1.2)


def test_quick_bench_writes_a_ratio_table_and_valid_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert _bench(["--quick", "--repeats", "2", "--json", str(path)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(path.read_text())
    assert result["tool"] == "fastjac bench"
    assert {"cpu", "cores", "torch", "date", "device", "load_average"} <= set(result["machine"])
    assert result["command"] == f"fastjac bench --device cpu --quick --repeats 2 --areas operators,jacobian,training,zoo --json {path}"
    rows = result["rows"]
    assert {r["area"] for r in rows} == {"operators", "jacobian", "training", "zoo"}
    by_group = {}
    for r in rows:
        by_group.setdefault(r["workload"], []).append(r)
        assert 0 < r["min_s"] <= r["median_s"] and 1 <= r["repeats"] <= 2
    for workload, group in by_group.items():
        base = [r for r in group if r["baseline"]]
        assert len(base) == 1, workload
        for r in group:
            assert r["ratio"] == pytest.approx(r["median_s"] / base[0]["median_s"])
    k1 = [r for r in rows if r["implementation"] in ("GRAE≈ k=1 [torch]", suites.ZOO_LABELS["fastjac"])]
    assert len(k1) == 2 and k1[0]["targets"][0]["text"] == "≤ 2.2× plain"
    zoo_target = suites.ZOO_COST_TARGETS["mlp"]
    assert [t["text"] for t in k1[1]["targets"]] == [f"≤ {zoo_target:g}× plain",
                                                     "never slower than torch.func by hand"]
    assert all(s["reason"] for s in result["skipped"])
    assert "ratio" in printed and "plain AE (baseline)" in printed and "GRAE≈ k=1 [torch]" in printed


RESULT = {"tool": "fastjac bench", "machine": {"device": "cpu", "card": None, "cpu": "X", "cores": 2, "torch": "2", "date": "d"},
          "settings": {"repeats": 3},
          "rows": [{"workload": "w", "implementation": "autograd", "baseline": True, "median_s": 2e-3,
                    "ratio": 1.0, "targets": []},
                   {"workload": "w", "implementation": "torch", "baseline": False, "median_s": 1e-3,
                    "ratio": 0.5, "targets": [{"text": "≥ 1.3× faster", "ratio": 0.5, "holds": True}]}]}


def test_markdown_table_has_one_row_per_result():
    lines = report.markdown(RESULT).splitlines()
    assert lines[-2] == "| w | autograd (baseline) | 2.00 ms | 1.00 |  |"
    assert lines[-1] == "|  | torch | 1.00 ms | 0.50 | ✓ ≥ 1.3× faster (2.0× faster) |"


@pytest.mark.skipif(shutil.which("asv") is None, reason="asv is not installed")
def test_asv_check_passes():
    proc = subprocess.run(["asv", "check", "--python=same"], cwd=os.path.join(ROOT, "benchmarks"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "No problems found" in proc.stdout


def test_hutchinson_study_runs_on_the_shared_harness(tmp_path):
    """`benchmarks/hutchinson.py --quick` writes rows for every rival, with the command and the machine."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import hutchinson as study
    finally:
        sys.path.pop(0)
    path = tmp_path / "h.json"
    argv = ["--quick", "--models", "mlp", "--pretrain", "1", "--json", str(path)]
    assert study.main(argv) == 0
    result = results.load(path)
    assert result["tool"] == "benchmarks/hutchinson.py"
    assert result["command"] == "python benchmarks/hutchinson.py " + " ".join(argv)
    assert {"cpu", "torch", "date"} <= set(result["machine"])
    rows = {r["estimator"]: r for r in result["rows"]}
    assert set(rows) == {"exact", "stochastic", "hutchinson_cg"}
    assert rows["exact"]["reg_err"] == 0.0                    # exact against itself: the error is measured
    assert rows["stochastic"]["reg_err"] > 0 and rows["hutchinson_cg"]["cg_iterations"] >= 1
    assert all(0 < r["seconds"] <= r["seconds_median"] for r in result["rows"])
