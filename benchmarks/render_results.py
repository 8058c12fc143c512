"""Render README.md's results section from the committed benchmarks/results/*.json.

    python benchmarks/render_results.py            # rewrite the section in place
    python benchmarks/render_results.py --check    # exit 1 if the README is out of date

Only the text between ``<!-- section:results ... -->`` and ``<!-- /section:results -->`` changes.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from fastjac.bench.report import TOOL, markdown  # noqa: E402

SECTION = re.compile(r"(<!-- section:results[^>]*-->\n)(.*?)(<!-- /section:results -->)", re.S)

HOW = """\
### Speed

`fastjac bench` times every workload beside its baseline in the same run, interleaved, and prints
medians as ratios (< 1 is faster): operators against autograd through `torch.linalg.cholesky`
(`naive`), Jacobians against `vmap(jacfwd)` and per-sample `torch.autograd.functional.jacobian`,
training steps against a plain autoencoder step. On a GPU it also prints each operator's floor
(bytes over the measured copy bandwidth, flops over the measured matmul peak) and the share reached.

```bash
fastjac bench                                   # CPU; --device cuda on a GPU; --quick for a smoke run
fastjac bench --threads 1 --json benchmarks/results/<machine>.json && python benchmarks/render_results.py
cd benchmarks && asv check --python=same        # the asv suite (benchmarks/benchmarks/bench_*.py) imports
asv run --python=same --quick                   # every combination once (add --bench REGEX to pick)
```

The asv suite takes the implementation (`naive`, `torch`, `triton`, `cpp`, `cuda`, `vmap(jacfwd)`,
`functional.jacobian`) as a parameter so rivals run side by side; combinations this machine cannot
run are skipped (n/a). asv starts a fresh process for every combination, so `--bench` keeps a
run short. `asv run --python=same` benchmarks the fastjac importable here (or this checkout);
`asv continuous main HEAD` compares commits. Models: `mlp` (two hidden layers of 256),
`mlp_fused` (the same decoder as `fastjac.nn.TangentMLP`), and the App. D `mnist`/`celeba`
networks of `fastjac.models` with every channel count scaled by `width`; decoder BatchNorm runs
in eval mode for every rival. On a shared machine `--threads 1` gives steadier ratios.

The tables below were measured on a 2-core CPU (the load average at the start is in each JSON):
read the ratios, measured side by side, rather than the absolute times.
"""


def render(paths) -> str:
    parts = [HOW]
    for path in sorted(paths):
        with open(path) as f:
            result = json.load(f)
        if not _is_bench_result(result):
            continue  # another tool's results in the same folder
        parts.append(f"Measured: `{os.path.basename(path)}`\n\n{markdown(result)}\n")
    return "\n".join(parts)


def _is_bench_result(result) -> bool:
    """Written by `fastjac bench --json`."""
    return isinstance(result, dict) and result.get("tool") == TOOL


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="only report whether the README is current")
    parser.add_argument("--readme", default=os.path.join(ROOT, "README.md"))
    parser.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results"),
                        help="folder of `fastjac bench --json` files")
    args = parser.parse_args(argv)
    with open(args.readme) as f:
        text = f.read()
    match = SECTION.search(text)
    if match is None:
        raise SystemExit(f"{args.readme} has no <!-- section:results --> ... <!-- /section:results --> markers")
    body = render(glob.glob(os.path.join(args.results, "*.json")))
    new = text[:match.start(2)] + body + text[match.end(2):]
    if args.check:
        return 0 if new == text else 1
    folder = os.path.dirname(os.path.abspath(args.readme))
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(new)
    os.chmod(tmp, os.stat(args.readme).st_mode)
    os.replace(tmp, args.readme)
    return 0


if __name__ == "__main__":
    sys.exit(main())
