"""The README's main job and the CLI entry point run end to end."""
import subprocess
import sys


def test_demo_runs_and_prints_both_models():
    out = subprocess.run([sys.executable, "-m", "fastjac", "demo", "--steps", "3"], capture_output=True,
                         text=True, timeout=300, check=True).stdout
    assert "grae≈" in out and "β-vae" in out


def test_info_lists_backends():
    out = subprocess.run([sys.executable, "-m", "fastjac", "info"], capture_output=True, text=True,
                         timeout=300, check=True).stdout
    assert "torch   available" in out and "logdet_gram" in out
