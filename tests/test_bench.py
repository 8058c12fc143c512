"""The benchmark harness: rivals compute the same thing, skips are explicit, the outputs are valid.

Speed itself is never asserted here (it is what ``fastjac bench`` reports); these tests check that
the baselines are fair (same values as fastjac), that combinations that cannot run say why, that
``fastjac bench --quick`` writes a valid ratio table, and that ``asv check`` accepts the suite.
"""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from fastjac import jacobian_columns, logdet_gram, hadamard_bound, orthogonality_penalty
from fastjac.bench import models, naive, report, suites, timing
from fastjac.bench import workloads as W
from fastjac.cli import main
from tests.utils import assert_close

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_naive_operators_agree_with_fastjac():
    J = torch.randn(3, 20, 5, dtype=torch.float64)
    assert_close("logdet", logdet_gram(J, 0.5), naive.logdet_gram(J, 0.5), 1e-10)
    assert_close("hadamard", hadamard_bound(J, 0.5), naive.hadamard_bound(J, 0.5), 1e-10)
    assert_close("ortho", orthogonality_penalty(J), naive.orthogonality(J), 1e-10)


def test_naive_jacobians_agree_with_jacobian_columns():
    dec = torch.nn.Sequential(torch.nn.Linear(3, 6), torch.nn.Tanh(), torch.nn.Linear(6, 4)).double()
    z = torch.randn(2, 3, dtype=torch.float64)
    _, J = jacobian_columns(dec, z)
    assert_close("vmap(jacfwd)", J, naive.jacobian_vmap_jacfwd(dec, z), 1e-10)
    assert_close("functional.jacobian", J, naive.jacobian_per_sample(dec, z), 1e-10)


@pytest.mark.parametrize("model", ["mlp", "mlp_fused", "mnist"])
def test_exact_grae_rivals_compute_the_same_loss(model):
    """The naive exact step (vmap(jacfwd) + Cholesky) and fastjac's optimise the same objective."""
    torch.manual_seed(0)
    m = models.build(model, 3, code_dim=3, width=1 / 16)
    x = models.data(m, 2, device="cpu", generator=torch.Generator().manual_seed(0))
    gen = torch.Generator()
    ours = W._loss("grae_exact", "torch", m, 0.5, gen)(x)
    theirs = W._loss("grae_exact", "vmap(jacfwd)", m, 0.5, gen)(x)
    assert_close("loss", ours, theirs, 1e-4)


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
            W.operator("logdet_gram", "naive", device="cuda", B=2, D=8, d=2)
    with pytest.raises(NotImplementedError, match="plain PyTorch"):
        W.training_step("mlp", "ae", "vmap(jacfwd)", device="cpu", B=2, d=2)
    with pytest.raises(NotImplementedError, match="exact GRAE only"):
        W.training_step("mlp", "grae_k1", "functional.jacobian", device="cpu", B=2, d=2)
    with pytest.raises(ValueError, match="op must be one of"):
        W.operator("frobenius", "naive", device="cpu", B=2, D=8, d=2)
    with pytest.raises(ValueError, match="objective must be one of"):
        W.training_step("mlp", "vae", "torch", device="cpu", B=2, d=2)


def test_interleaved_timing_stops_a_slow_rival_at_its_budget():
    samples = timing.interleaved({"slow": lambda: time.sleep(0.01), "fast": lambda: None},
                                 repeats=8, min_repeats=3, budget_s=0.02, min_sample_s=0.0)
    assert len(samples["slow"]) == 3 and len(samples["fast"]) == 8
    assert timing.median(samples["slow"]) >= 0.009


def test_targets():
    assert suites.Target("≤ 2.2×", at_most=2.2).holds(2.1)
    assert not suites.Target("≤ 2.2×", at_most=2.2).holds(2.3)
    assert suites.Target("≥ 1.3× faster", speedup=1.3).holds(1 / 1.4)
    assert not suites.Target("≥ 1.3× faster", speedup=1.3).holds(1 / 1.2)


def test_quick_bench_writes_a_ratio_table_and_valid_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--repeats", "2", "--json", str(path)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(path.read_text())
    assert result["tool"] == "fastjac bench"
    assert {"cpu", "cores", "torch", "date", "device"} <= set(result["machine"])
    rows = result["rows"]
    assert {r["area"] for r in rows} == {"operators", "jacobian", "training"}
    by_group = {}
    for r in rows:
        by_group.setdefault(r["workload"], []).append(r)
        assert r["median_s"] > 0 and 1 <= r["repeats"] <= 2
    for workload, group in by_group.items():
        base = [r for r in group if r["baseline"]]
        assert len(base) == 1, workload
        for r in group:
            assert r["ratio"] == pytest.approx(r["median_s"] / base[0]["median_s"])
    k1 = [r for r in rows if r["implementation"] == "GRAE≈ k=1 [torch]"]
    assert len(k1) == 1 and all(r["targets"][0]["text"] == "≤ 2.2× plain" for r in k1)
    assert all(s["reason"] for s in result["skipped"])
    assert "ratio" in printed and "plain AE (baseline)" in printed and "GRAE≈ k=1 [torch]" in printed


def test_render_results_rewrites_only_its_section(tmp_path):
    """Renders `fastjac bench --json` files (ignoring other tools' JSON) into its section only."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import render_results
    finally:
        sys.path.pop(0)
    readme = tmp_path / "README.md"
    before = "# title\n\n<!-- section:other -->\nkeep\n<!-- /section:other -->\n"
    readme.write_text(before + "<!-- section:results (owned) -->\nold\n<!-- /section:results -->\ntail\n")
    results = tmp_path / "results"
    results.mkdir()
    (results / "cpu-x.json").write_text(json.dumps(RESULT))
    (results / "other-tool.json").write_text(json.dumps({"rows": [], "machine": {"device": "cpu"}}))
    args = ["--readme", str(readme), "--results", str(results)]
    assert render_results.main(args + ["--check"]) == 1
    assert render_results.main(args) == 0
    text = readme.read_text()
    assert text.startswith(before) and text.endswith("<!-- /section:results -->\ntail\n")
    assert "old" not in text and "asv run --python=same --quick" in text
    assert "`cpu-x.json`" in text and "| w | naive (baseline) |" in text and "other-tool" not in text
    assert render_results.main(args + ["--check"]) == 0


RESULT = {"tool": "fastjac bench", "machine": {"device": "cpu", "card": None, "cpu": "X", "cores": 2, "torch": "2", "date": "d"},
          "settings": {"repeats": 3},
          "rows": [{"workload": "w", "implementation": "naive", "baseline": True, "median_s": 2e-3,
                    "ratio": 1.0, "targets": []},
                   {"workload": "w", "implementation": "torch", "baseline": False, "median_s": 1e-3,
                    "ratio": 0.5, "targets": [{"text": "≥ 1.3× faster", "ratio": 0.5, "holds": True}]}]}


def test_markdown_table_has_one_row_per_result():
    lines = report.markdown(RESULT).splitlines()
    assert lines[-2] == "| w | naive (baseline) | 2.00 ms | 1.00 |  |"
    assert lines[-1] == "|  | torch | 1.00 ms | 0.50 | ✓ ≥ 1.3× faster (2.0× faster) |"


@pytest.mark.skipif(shutil.which("asv") is None, reason="asv is not installed")
def test_asv_check_passes():
    proc = subprocess.run(["asv", "check", "--python=same"], cwd=os.path.join(ROOT, "benchmarks"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "No problems found" in proc.stdout
