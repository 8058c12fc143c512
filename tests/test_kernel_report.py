"""The offline kernel report (benchmarks/kernel_report.py): Triton's compiler on the launches
fastjac makes, for sm_80 and sm_90, without a GPU; and the GPU benchmark's --tiny mode.

These run in subprocesses: the report compiles real kernels, so triton must be imported
without TRITON_INTERPRET (which conftest.py sets for this process).
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton")
pytest.importorskip("triton.backends.nvidia.compiler", reason="triton without its NVIDIA backend")

ROOT = Path(__file__).resolve().parents[1]


def _run(args, timeout, env=None):
    env = dict(os.environ if env is None else env, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "kernel_report.json"
    proc = _run(["benchmarks/kernel_report.py", "--tiny", "--check", "--json", str(out)], timeout=900)
    return proc, json.loads(out.read_text()) if out.exists() else None


def test_tiny_report_has_no_spills_and_finds_tensor_cores(tiny_report):
    proc, report = tiny_report
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = report["configurations"]
    assert all(0 <= launch["configuration"] < len(rows) for launch in report["launches"])
    kernels = {row["kernel"] for row in rows}
    assert {"_gram_kernel", "_gram_backward_kernel", "_solve_kernel", "_forward_kernel", "_backward_kernel"} <= kernels
    for row in rows:
        for arch in ("sm_80", "sm_90"):
            assert row[arch]["spill_bytes"] == 0, (row["kernel"], arch, row[arch])
            assert row[arch]["registers"] > 0
            if row["needs_tensor_cores"]:
                assert row[arch]["tensor_core"], (row["kernel"], arch, row["dtype"])
    needing = {(row["kernel"], row["dtype"]) for row in rows if row["needs_tensor_cores"]}
    assert ("_gram_kernel", "float32") in needing and ("_gram_backward_kernel", "bfloat16") in needing


def test_report_launches_are_the_runtime_plans(tiny_report):
    """The report compiles what the launchers pick: grids and constexprs from the same plans."""
    _, report = tiny_report
    script = textwrap.dedent("""
        import json, sys, torch
        sys.path.insert(0, "benchmarks")
        import kernel_report as R
        from fastjac.ops import _triton
        with _triton.capturing(132):
            plan = _triton.gram_plan(256, 784, 64, torch.float32, False, False, torch.device("meta"))
        print(json.dumps(dict(splits=plan.splits, rows=plan.rows, tile=plan.tile, warps=plan.num_warps)))
    """)
    proc = _run(["-c", script], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = json.loads(proc.stdout.strip().splitlines()[-1])
    configurations = report["configurations"]
    gram = [launch for launch in report["launches"] if launch["kernel"] == "_gram_kernel" and launch["dtype"] == "float32"
            and not configurations[launch["configuration"]]["constexprs"]["DIAGONAL"]][0]
    config = configurations[gram["configuration"]]
    assert gram["grid"][1] == plan["splits"] and config["constexprs"]["ROWS"] == plan["rows"]
    assert config["constexprs"]["TILE"] == plan["tile"] and config["num_warps"] == plan["warps"]


def test_tangent_pointer_offsets_are_int64():
    """In the compiled tangent kernels every offset from a tangent buffer's base (t·N·IN,
    t·N·OUT, which pass 2³¹ at k·N·OUT >= 2³¹) is a 64-bit integer."""
    script = textwrap.dedent("""
        import re, sys, torch, triton
        sys.path.insert(0, "benchmarks")
        import kernel_report as R
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
        target = GPUTarget("cuda", 80, 32)
        for launch in (l for _, l in R.launches(256, 784, 16, torch.float32, False) if l.kernel.__name__ in
                       ("_forward_kernel", "_backward_kernel") and l.meta["ACT"] == 2):
            src, options = R.specialise(launch, make_backend(target))
            ttir = triton.compile(src, target=target, options=options.__dict__).asm["ttir"]
            for base in ("T", "U") if launch.kernel.__name__ == "_forward_kernel" else ("T", "gU", "gV"):
                types = re.findall(rf"tt\\.addptr %{base}, %\\S+ : !tt\\.ptr<\\w+>, (\\w+)", ttir)
                print(launch.kernel.__name__, base, types)
                assert types and set(types) == {"i64"}, (launch.kernel.__name__, base, types)
    """)
    proc = _run(["-c", script], timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_gpu_benchmark_tiny_mode(tmp_path):
    """benchmarks/triton_ops.py --tiny: every row measured under the interpreter (none failed),
    written to the JSON with floors, speed-ups and a kernel breakdown."""
    out = tmp_path / "triton_ops.json"
    proc = _run(["benchmarks/triton_ops.py", "--tiny", "--json", str(out)], timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert {r["op"] for r in rows} >= {"logdet", "fischer", "covariance", "hadamard", "orthogonality", "tangent_linear"}
    assert any(r.get("checks") for r in rows) and any(r.get("weighted") for r in rows)
    for row in rows:
        assert "error" not in row and "skipped" not in row, row
        assert row["implementations"]["triton"]["fwd+bwd"]["median_s"] > 0
        assert row["floors"]["fwd"]["x_memory"] > 0 and row["kernels"]
    assert "speedup_vs_autograd" in rows[0]["floors"]["fwd+bwd"]
