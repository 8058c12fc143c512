"""Render every generated section of README.md and docs/*.md from the committed results files.

    python benchmarks/render_results.py            # rewrite the generated sections in place
    python benchmarks/render_results.py --check    # exit 1 if a section is stale, missing or unknown,
                                                   # or a results file it is made from is missing
    python benchmarks/render_results.py --only README.md   # one document (and its renderers) only

A generated section is the text between ``<!-- generated:NAME -->`` and ``<!-- /generated:NAME -->``;
nothing outside those markers is touched. Each NAME has one renderer, a function of a results
folder returning Markdown that names the command, the machine and the date of the numbers:

- here, all in README.md, from ``benchmarks/results/``: ``bench`` (every ``fastjac bench --json``
  file), ``extension-cpu`` (``extension_cpu.json``), ``jacobian-memory`` (``jacobian_memory.json``),
  ``hutchinson`` (``hutchinson_cpu.json``) and ``zoo`` (``zoo_cpu.json``); ``examples``
  (``examples/timings.json``, the worked examples' run times), also in README.md;
- ``fastjac.experiments.tables.RENDERERS`` (name -> function(results_dir) -> Markdown), reading
  ``docs/results/``, for the sections of docs/reproduction.md.

Every renderer's section must exist in its home file: ``--check`` fails on a missing one, so a table
cannot silently stop being generated.
"""
from __future__ import annotations

import argparse
import glob
import importlib
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
from fastjac.bench import baselines, results  # noqa: E402
from fastjac.bench.report import TOOL, markdown  # noqa: E402

SECTION = re.compile(r"<!-- generated:([\w.-]+) -->\n(.*?)<!-- /generated:\1 -->", re.S)
OPENING = re.compile(r"<!-- generated:([\w.-]+) -->")
SCIENCE = "fastjac.experiments.tables"
RENDERER_COMMAND = "python benchmarks/render_results.py"
# results written before the baselines were renamed label them "naive"; it is the same code
LEGACY_LABELS = {"naive": baselines.OPERATOR_LABEL}


@dataclass(frozen=True)
class Renderer:
    render: Callable[[str], str]   # results folder -> Markdown
    home: str                      # the file (relative to the root) that must hold the section
    results: str                   # the results folder, relative to the root


# -- sources -------------------------------------------------------------------------------------

def _bench_command(result: dict, name: str) -> str:
    if result.get("command"):
        return result["command"]
    s, threads = result["settings"], result["machine"].get("torch_threads")
    argv = ["--device", result["machine"]["device"]] + (["--quick"] if s.get("quick") else [])
    argv += ["--repeats", str(s["repeats"]), "--threads", str(threads), "--json", f"benchmarks/results/{name}"]
    return results.command("fastjac bench", argv)


def _relabelled(result: dict) -> dict:
    rows = [dict(r, implementation=LEGACY_LABELS.get(r["implementation"], r["implementation"]))
            for r in result["rows"]]
    return dict(result, rows=rows)


def bench_tables(folder: str) -> str:
    """Every ``fastjac bench --json`` file in ``folder``, one table each."""
    parts = []
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        result = results.load(path)
        if not (isinstance(result, dict) and result.get("tool") == TOOL):
            continue  # another tool's results in the same folder
        name = os.path.basename(path)
        parts.append(f"Source: `benchmarks/results/{name}`, written by `{_bench_command(result, name)}`.\n\n"
                     f"{markdown(_relabelled(result))}\n")
    if not parts:
        raise FileNotFoundError(f"no `{TOOL} --json` results in {folder}")
    return "\n".join(parts)


EXTENSION_FILE = "extension_cpu.json"


def _extension_machine(r: dict) -> tuple[str, str]:
    if "machine" in r:
        return results.machine_line(r["machine"]), r["machine"]["date"]
    load = r.get("load_average_start")
    m = dict(cpu=r["cpu"], cores=r["cores"], torch_threads=r["torch_threads"], torch=r["torch"],
             load_average=None if load is None else round(load[0], 2))
    return results.machine_line(m), r["date"]


def _extension_row(x: dict, base: str) -> str:
    ms = x["ms"]
    return (f"| {x['dtype']} | {x['B']} | {x['D']} | {x['d']} | {ms[base]:.2f} | {ms['torch']:.2f} | "
            f"{ms['cpp']:.2f} | {ms[base] / ms['cpp']:.2f}× | {ms['torch'] / ms['cpp']:.2f}× |")


def extension_cpu(folder: str) -> str:
    """The compiled extension's host path against autograd and the torch reference."""
    path = os.path.join(folder, EXTENSION_FILE)
    r = results.load(path)
    machine, date = _extension_machine(r)
    rows = r["results"]
    base = "autograd" if "autograd" in rows[0]["ms"] else "naive"
    command = r.get("command") or f"python benchmarks/extension_cpu.py --json benchmarks/results/{EXTENSION_FILE}"
    big = [x["ms"][base] / x["ms"]["cpp"] for x in rows if x["B"] == 256]
    lines = [f"Source: `benchmarks/results/{EXTENSION_FILE}`, written by `{command}` on {machine}, {date}; "
             "logdet_gram forward+backward, ms, medians of interleaved repeats.", "",
             "| dtype | B | D | d | autograd (ms) | torch (ms) | cpp (ms) | cpp vs autograd | cpp vs torch |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [_extension_row(x, base) for x in rows]
    if big:
        lines += ["", f"At B = 256 the host path is {min(big):.2f}–{max(big):.2f}× as fast as autograd through "
                  "a hand-written Cholesky (`fastjac.bench.baselines`)."]
    return "\n".join(lines)


def _study_head(r: dict, name: str, default_command: str) -> str:
    """'Source: file, command, machine, date' for a study's results (also those written before the harness)."""
    if "machine" in r and "cpu" in r["machine"]:
        machine, date = results.machine_line(r["machine"]), r["machine"]["date"]
    else:  # older files: {"environment"|"machine": {...}, "date"}
        env = r.get("environment") or r.get("machine", {})
        machine = f"{env.get('cpu') or env.get('processor')}, {env.get('threads')} torch threads, torch {env['torch']}"
        date = env.get("date") or r.get("date")
    return (f"Source: `benchmarks/results/{name}`, written by `{r.get('command') or default_command}` "
            f"on {machine}, {date}.")


def _mib(n: float) -> str:
    return f"{n / 2 ** 20:.0f} MiB"


def jacobian_memory(folder: str) -> str:
    """Peak memory of an exact-GRAE step with and without chunk_size, and column throughput."""
    name = "jacobian_memory.json"
    r = results.load(os.path.join(folder, name))
    lines = [_study_head(r, name, f"python benchmarks/jacobian_memory.py --out benchmarks/results/{name}"), "",
             "| device | exact-GRAE step (App. D MNIST decoder) | peak, unchunked | peak, `chunk_size=4` | ratio "
             "| ratio net of the pre-step footprint | same loss |", "|---|---|---:|---:|---:|---:|---|"]
    for m in r.get("memory", []):
        plain, chunked = m["runs"]["unchunked"], m["runs"][f"chunk_size={m['chunk_size']}"]
        lines.append(f"| {m['device']} | B={m['B']} d={m['d']} width={m['width']:g} | "
                     f"{_mib(plain['peak_bytes'])} | {_mib(chunked['peak_bytes'])} | "
                     f"{m['peak_ratio']:.2f} | {m['step_ratio']:.2f} | {'yes' if m['same_loss'] else 'no'} |")
    lines += ["", "| device | Jacobian of an MLP decoder | `jacobian_columns` vs `vmap(jacfwd)` "
              "| vs per-sample `functional.jacobian` |", "|---|---|---:|---:|"]
    for t in r.get("throughput", []):
        lines.append(f"| {t['device']} | B={t['B']} d={t['d']} D={t['D']} hidden={t['hidden']} | "
                     f"{t['speedup_vs_vmap_jacfwd']:.2f}× | {t['speedup_vs_per_sample_jacobian']:.0f}× |")
    return "\n".join(lines)


def _fastest_within(rows: list, tau: float):
    ok = [x for x in rows if x["estimator"] == "hutchinson_cg" and x["loss_err"] <= tau]
    return min(ok, key=lambda x: x["seconds"]) if ok else None


def hutchinson(folder: str, tau: float = 0.05) -> str:
    """estimator="hutchinson_cg" against "exact": ms per step and the fastest setting within a loss error."""
    name = "hutchinson_cpu.json"
    r = results.load(os.path.join(folder, name))
    lines = [_study_head(r, name, f"python benchmarks/hutchinson.py --json benchmarks/results/{name}")
             + " Times are the best of the interleaved repeats.", "",
             f"| decoder | d | exact (ms/step) | GRAE≈ k=1 (ms/step) | fastest `hutchinson_cg` with loss-gradient "
             f"error ≤ {tau:g} (ms/step, P, k) | its time vs exact |", "|---|---:|---:|---:|---|---:|"]
    for model, d in dict.fromkeys((x["model"], x["d"]) for x in r["rows"]):
        here = [x for x in r["rows"] if x["model"] == model and x["d"] == d]
        exact, stochastic = (next(x for x in here if x["estimator"] == e) for e in ("exact", "stochastic"))
        best = _fastest_within(here, tau)
        cell = "none in the grid" if best is None else \
            f"{1e3 * best['seconds']:.1f} (P={best['probes']}, k={best['cg_max_iter']})"
        ratio = "" if best is None else f"{best['seconds'] / exact['seconds']:.2f}"
        lines.append(f"| {model} | {d} | {1e3 * exact['seconds']:.1f} | {1e3 * stochastic['seconds']:.1f} | "
                     f"{cell} | {ratio} |")
    return "\n".join(lines)


def _zoo_table(folder: str, name: str) -> list:
    r = results.load(os.path.join(folder, name))
    malloc = r["settings"].get("malloc") or {}
    env = ", ".join(f"`{k}={v}`" for k, v in malloc.items()) or "glibc malloc's defaults"
    lines = [_study_head(r, name, f"python -m fastjac.bench.zoo --out benchmarks/results/{name}")
             + f" Medians of interleaved repeats; allocator: {env}.", "",
             "| decoder | z shape | plain step | GRAE≈ k=1, fastjac (× plain) | GRAE≈ k=1, torch.func by hand (× plain) |",
             "|---|---|---:|---:|---:|"]
    for row in r["rows"]:
        plain = row["steps"]["plain"]["median_s"]
        lines.append(f"| {row['decoder']} | {tuple(row['z_shape'])} | {1e3 * plain:.2f} ms | "
                     f"{row['ratio']['fastjac']:.2f} | {row['ratio']['torch.func']:.2f} |")
    return lines


def zoo(folder: str) -> str:
    """Decoder-only GRAE≈ steps on users' decoders against the plain step (fastjac.bench.zoo),
    one table per ``zoo_cpu*.json`` (e.g. with glibc malloc's defaults and tuned)."""
    names = sorted(os.path.basename(p) for p in glob.glob(os.path.join(folder, "zoo_cpu*.json")))
    return "\n\n".join("\n".join(_zoo_table(folder, name)) for name in names)


def examples(folder: str) -> str:
    """Wall time of each worked example with its default steps (examples/timings.json)."""
    r = results.load(os.path.join(folder, "timings.json"))
    rows = [x for x in r["rows"] if x["steps"] == "default" and x["exit"] == 0]
    if not rows:
        raise FileNotFoundError("examples/timings.json has no successful run with the default steps")
    lines = [f"Source: `examples/timings.json` ({r['what']}; `{r['commands'][-1].split('#')[0].strip()}`) on a "
             f"{r['machine']}, {min(x['utc'] for x in rows)} UTC.", "",
             "| example | wall time, default steps | 1-minute load |", "|---|---:|---:|"]
    lines += [f"| `{x['script']}` | {x['wall_s']:.0f} s | {x['load1']:.1f} |" for x in rows]
    return "\n".join(lines)


def renderers() -> dict[str, Renderer]:
    """Every section name -> its renderer: the benchmark ones here and the experiments' tables."""
    out = {"bench": Renderer(bench_tables, "README.md", "benchmarks/results"),
           "extension-cpu": Renderer(extension_cpu, "README.md", "benchmarks/results"),
           "jacobian-memory": Renderer(jacobian_memory, "README.md", "benchmarks/results"),
           "hutchinson": Renderer(hutchinson, "README.md", "benchmarks/results"),
           "zoo": Renderer(zoo, "README.md", "benchmarks/results"),
           "examples": Renderer(examples, "README.md", "examples")}
    for name, fn in _science_renderers().items():
        out[name] = Renderer(fn, "docs/reproduction.md", "docs/results")
    return out


def _science_renderers() -> dict:
    try:
        module = importlib.import_module(SCIENCE)
    except ModuleNotFoundError as e:
        if e.name not in (SCIENCE, SCIENCE.rsplit(".", 1)[0]):
            raise
        print(f"note: {SCIENCE} does not exist yet; docs/reproduction.md is not rendered", file=sys.stderr)
        return {}
    return dict(module.RENDERERS)


# -- rendering -----------------------------------------------------------------------------------

def documents(root: str) -> list[str]:
    """README.md and the Markdown under docs/, relative to ``root``."""
    found = [p for p in ["README.md"] if os.path.exists(os.path.join(root, p))]
    for path in sorted(glob.glob(os.path.join(root, "docs", "**", "*.md"), recursive=True)):
        found.append(os.path.relpath(path, root))
    return found


def render_text(text: str, where: str, root: str, table: dict[str, Renderer]) -> tuple[str, list[str]]:
    """``text`` with every generated section rendered anew, and the problems found."""
    problems = []
    opened = OPENING.findall(text)
    closed = [m.group(1) for m in SECTION.finditer(text)]
    for name in sorted(set(opened) - set(closed)):
        problems.append(f"{where}: <!-- generated:{name} --> has no matching <!-- /generated:{name} -->")

    def body(match):
        name = match.group(1)
        if name not in table:
            problems.append(f"{where}: no renderer for section {name!r}")
            return match.group(0)
        try:
            rendered = table[name].render(os.path.join(root, table[name].results)).strip()
        except FileNotFoundError as e:
            problems.append(f"{where}: section {name!r}: results file missing ({e})")
            return match.group(0)
        note = f"<!-- made by `{RENDERER_COMMAND}`; edit the results, not this text -->"
        return f"<!-- generated:{name} -->\n{note}\n{rendered}\n<!-- /generated:{name} -->"
    return SECTION.sub(body, text), problems


def _missing_sections(root: str, texts: dict[str, str], table: dict[str, Renderer]) -> list[str]:
    problems = []
    for name, renderer in sorted(table.items()):
        text = texts.get(renderer.home)
        if text is None or f"<!-- generated:{name} -->" not in text:
            problems.append(f"{renderer.home}: section {name!r} is missing (add <!-- generated:{name} --> "
                            f"... <!-- /generated:{name} -->)")
    return problems


def check_and_render(root: str = ROOT, table=None, only=None) -> tuple[dict[str, str], list[str]]:
    """({path: new text} for every document whose sections changed, problems); ``only``: these
    documents (paths relative to the root) and the renderers whose home they are."""
    table = renderers() if table is None else table
    if only is not None:
        table = {name: r for name, r in table.items() if r.home in only}
    texts, changed, problems = {}, {}, []
    for path in documents(root) if only is None else [p for p in documents(root) if p in only]:
        with open(os.path.join(root, path), encoding="utf-8") as f:
            texts[path] = f.read()
        new, found = render_text(texts[path], path, root, table)
        problems += found
        if new != texts[path]:
            changed[path] = new
    return changed, problems + _missing_sections(root, texts, table)


def _write(path: str, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(tmp, os.stat(path).st_mode)
    os.replace(tmp, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="change nothing; exit 1 if a generated section is stale, missing or unknown")
    parser.add_argument("--root", default=ROOT, help="the checkout (default: this one)")
    parser.add_argument("--only", nargs="+", metavar="DOC",
                        help="only these documents, e.g. README.md docs/reproduction.md (default: all)")
    args = parser.parse_args(argv)
    changed, problems = check_and_render(args.root, only=args.only)
    for p in problems:
        print(f"render_results: {p}", file=sys.stderr)
    if args.check:
        for path in changed:
            print(f"render_results: {path} is stale: run `{RENDERER_COMMAND}`", file=sys.stderr)
        return 1 if changed or problems else 0
    for path, text in changed.items():
        _write(os.path.join(args.root, path), text)
        print(f"rendered {path}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
