"""The worked integrations in examples/ run (a few steps each, all in one interpreter)."""
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = {  # script -> what its output must contain
    "autoencoder_digits.py": ["autoencoder", "+ regulariser"],
    "beta_vae_to_grae.py": ["beta-vae", "grae"],
    "dict_output_decoder.py": ["JacobianRegularizer(beta=0.5", "restored JacobianRegularizer"],
}
RUNNER = textwrap.dedent("""
    import runpy, sys
    for script in sys.argv[1:]:
        print("=== " + script, flush=True)
        sys.argv = [script, "--steps", "3", "--threads", "1"]
        runpy.run_path(script, run_name="__main__")
""")


def test_examples_run():
    scripts = [os.path.join(ROOT, "examples", name) for name in EXAMPLES]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-c", RUNNER, *scripts], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    sections = dict(part.split("\n", 1) for part in done.stdout.split("=== ")[1:])
    for name, expected in EXAMPLES.items():
        out = sections[os.path.join(ROOT, "examples", name)]
        for line in expected:
            assert line in out, f"{name}: {line!r} missing from its output:\n{out}"
        assert "nan" not in out.lower(), f"{name} printed NaN:\n{out}"
