"""The tables of docs/reproduction.md, rendered from the committed results files docs/results/*.json.

A published results file is an experiment's ``results.json`` plus where it came from::

    python -m fastjac.experiments.tables publish structure-digits results/structure/results.json \
        --command "fastjac reproduce structure --quick ..." --machine "2-core CPU, 1 thread"

adds ``name``, ``command``, ``machine``, ``date`` (and, if given, ``wall_seconds`` / ``cpu_seconds``),
replaces absolute paths by their last two parts, and writes ``docs/results/<name>.json``.
``RENDERERS`` maps each generated section of docs/reproduction.md (``<!-- generated:NAME -->``) to a
function ``results_dir -> markdown``: the table, with the command, machine and date beside it.
The docs' render script calls them and ``--check`` fails when the page differs from what they give.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import re
from pathlib import Path
from typing import Callable, Optional

from .results import atomic_write


# ----------------------------------------------------------------------------------- publishing

ABSOLUTE_PATH = re.compile(r"(?<![\w.])/(?:[\w.-]+/)+[\w.-]+")


def _scrub(value):
    """Absolute paths (machine specific), alone or inside a text, shortened to their last two parts."""
    if isinstance(value, str):
        return ABSOLUTE_PATH.sub(lambda m: "/".join(Path(m.group(0)).parts[-2:]), value)
    if isinstance(value, dict):
        return {k: _scrub(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub(v) for v in value]
    return value


def publish(name: str, results_json: Path, *, command: str, machine: str, out_dir: Path,
            wall_seconds: Optional[float] = None, cpu_seconds: Optional[float] = None,
            date: Optional[str] = None) -> Path:
    """Write ``out_dir/<name>.json``: the results with their provenance."""
    doc = json.loads(Path(results_json).read_text())
    if "experiment" not in doc or "runs" not in doc:
        raise ValueError(f"{results_json} is not an experiment's results.json")
    published = dict(name=name, command=command, machine=machine,
                     date=date or datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                     wall_seconds=wall_seconds, cpu_seconds=cpu_seconds, **_scrub(doc))
    path = Path(out_dir) / f"{name}.json"
    text = json.dumps(published, indent=1, allow_nan=False, ensure_ascii=False) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return path


def load(results_dir: Path, name: str) -> dict:
    path = Path(results_dir) / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"no results file {path}; publish it first (python -m "
                                f"fastjac.experiments.tables publish {name} …)")
    return json.loads(path.read_text())


# ------------------------------------------------------------------------------------ markdown

def _num(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    text = f"{value:.{digits}f}"
    return text.replace("-", "−") if text.startswith("-") else text


def _deg(value) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{_num(value, 1)}°"


def _gap(value) -> str:
    """An ELBO gap (≤ 0): in nats, scientific when tiny."""
    if value is None or not math.isfinite(value):
        return "—"
    return f"{value:.1e}".replace("-", "−") if abs(value) < 1e-3 else _num(value, 4)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _provenance(docs: list[dict]) -> str:
    parts = []
    for d in docs:
        time = ""
        if d.get("wall_seconds"):
            time = f", {d['wall_seconds'] / 60:.1f} min wall"
            time += f" / {d['cpu_seconds'] / 60:.1f} min CPU" if d.get("cpu_seconds") else ""
        parts.append(f"`{d['command']}` ({d['machine']}, {d['date']}{time}; `docs/results/{d['name']}.json`)")
    return "Produced by " + "; ".join(parts) + "."


def _section(docs: list[dict], table: str) -> str:
    return f"{table}\n\n{_provenance(docs)}\n"


# ----------------------------------------------------------------------------------- renderers

def _identifiability_rows(doc: dict, with_mixing: bool) -> list[list[str]]:
    mixing = doc["config"]["training"]["mixing"]
    rows = []
    for r in doc["summary"]:
        principal = _deg(r["near_best_principal_angle_median_abs"]) if mixing == "gaussian" else "—"
        rows.append(([mixing] if with_mixing else []) + [
            r["nonlinearity"], r["inference"], r["covariance"], str(r["runs"]),
            f"{r['near_best_runs']}", _gap(r.get("best_gap_min")),
            f"{_deg(r['near_best_angle_median_abs'])} / {_deg(r['near_best_angle_max_abs'])}",
            _deg(r.get("near_best_angle_to_best_median_abs")), principal,
            "—" if r.get("gradient_max") is None else f"{r['gradient_max']:.0e}"])
    return rows


IDENTIFIABILITY_HEADER = ["ν", "inference", "Σ", "runs", "within 0.01 nats of the best",
                          "worst gap of Σ's best run", "median / max \\|θ\\| (within 0.01)",
                          "spread (median)", "median \\|θ_W\\|", "largest gradient entry"]


OPTIMUM_HEADER = ["ν", "inference", "Σ", "median \\|θ_A\\| of the decoder (within 0.01)",
                  "singular values of W⁻¹A (median)",
                  "decoder's / W's axes to the data's coordinate axes: median \\|θ_x\\| / \\|φ\\|",
                  "true decoder, encoder fitted: ELBO gap (median)",
                  "true decoder's own mean-field axes: median \\|ψ\\|",
                  "from the truth, converged: ELBO gap (median) / median \\|θ\\|"]


def _optimum_rows(doc: dict, with_mixing: bool) -> list[list[str]]:
    """Where each family's optimum lies: the fitted decoder, and the reference runs started at the
    true model (results made before these were recorded: '—')."""
    mixing = doc["config"]["training"]["mixing"]
    rows = []
    for r in doc["summary"]:
        sv = r.get("near_best_decoder_singular_values_median") or [None, None]
        has_truth = bool(r.get("truth_data_sets"))
        rows.append(([mixing] if with_mixing else []) + [
            r["nonlinearity"], r["inference"], r["covariance"],
            _deg(r.get("near_best_decoder_angle_median_abs")), f"{_num(sv[0])}, {_num(sv[1])}",
            f"{_deg(r.get('near_best_data_axes_angle_median_abs'))} / {_deg(r.get('mixing_angle_median_abs'))}"
            if "near_best_data_axes_angle_median_abs" in r else "—",
            _gap(r.get("truth_gap_median")) if has_truth else "—",
            _deg(r.get("true_decoder_axes_median_abs")) if has_truth else "—",
            f"{_gap(r.get('truth_start_gap_median'))} / {_deg(r.get('truth_start_angle_median_abs'))}"
            if has_truth else "—"])
    return rows


PROFILE_HEADER = ["ν", "inference", "Σ", "data sets", "peaks (most on one data set)",
                  "peak of the profile: median / max \\|θ_A\\|",
                  "peak − best ELBO on the data (median)", "ELBO at θ_A = 0 − peak (median)",
                  "peak − lowest ELBO (median)", "largest gradient entry"]


def _profile_rows(doc: dict, with_mixing: bool) -> list[list[str]]:
    """The ELBO profiles over the decoder's angle (settings without one are left out)."""
    mixing = doc["config"]["training"]["mixing"]
    return [([mixing] if with_mixing else []) + [
        r["nonlinearity"], r["inference"], r["covariance"], str(r["profile_data_sets"]),
        "none (flat)" if r.get("profile_peaks_max") is None else str(r["profile_peaks_max"]),
        f"{_deg(r['profile_peak_angle_median_abs'])} / {_deg(r['profile_peak_angle_max_abs'])}",
        _gap(r.get("profile_peak_gap_median")), _gap(r["profile_at_true_axes_median"]),
        _gap(r["profile_range_median"]),
        f"{r['profile_gradient_max']:.0e}"] for r in doc["summary"] if r.get("profile_data_sets")]


def _identifiability_tables(docs: list[dict], with_mixing: bool) -> str:
    first = ["W"] if with_mixing else []
    angles = _table(first + IDENTIFIABILITY_HEADER,
                    [row for d in docs for row in _identifiability_rows(d, with_mixing)])
    optimum = _table(first + OPTIMUM_HEADER, [row for d in docs for row in _optimum_rows(d, with_mixing)])
    out = f"{angles}\n\nWhere the optimum lies:\n\n{optimum}"
    profile = [row for d in docs for row in _profile_rows(d, with_mixing)]
    if profile:
        out += ("\n\nThe ELBO over the decoder's angle (at each θ_A, the best ELBO with the decoder "
                "turned exactly θ_A from the true axes):\n\n" + _table(first + PROFILE_HEADER, profile))
    return out


def _identifiability(name: str) -> Callable[[Path], str]:
    """One identifiability results file, its tables."""
    def render(results_dir: Path) -> str:
        doc = load(results_dir, name)
        return _section([doc], _identifiability_tables([doc], False))
    render.__name__ = name.replace("-", "_")
    return render


identifiability_quick = _identifiability("identifiability-quick")


GRID = [f"identifiability-{inference}-{mixing}" for inference in ("amortised", "unamortised")
        for mixing in ("orthogonal", "gaussian", "aligned")]


def identifiability_grid(results_dir: Path) -> str:
    docs = [load(results_dir, n) for n in GRID if (Path(results_dir) / f"{n}.json").is_file()]
    if not docs:
        raise FileNotFoundError(f"none of {GRID} in {results_dir}")
    notes = [_unfinished(d) for d in docs if _unfinished(d)]
    table = _identifiability_tables(docs, True)
    return _section(docs, table + ("\n\n" + " ".join(notes) if notes else ""))


def _unfinished(doc: dict) -> str:
    """A note when a grid stopped before all its settings ran (what is missing)."""
    grid = doc["config"]["grid"]
    wanted = [f"{nu}/{inf}/{cov}/n={n}" for nu in grid["nonlinearities"] for inf in grid["inference"]
              for cov in grid["covariances"] for n in grid["steps"]]
    missing = [k for k in wanted if k not in doc["runs"]]
    if not missing:
        return ""
    mixing = doc["config"]["training"]["mixing"]
    return (f"*Unfinished*: the {mixing}-W {'/'.join(grid['inference'])} grid ran {len(wanted) - len(missing)} "
            f"of its {len(wanted)} settings before the time ran out (missing: {', '.join(missing)}).")


def _structure_rows(doc: dict, label: str) -> list[list[str]]:
    rows = []
    for r in doc["runs"].values():
        steps = f"{r['steps']}" + (f" + encoder {r['encoder_steps']}" if "encoder_steps" in r else "") + (
            f" + per-point optimal Σ ({r['optimal_draws']} draws)" if "optimal_draws" in r else "")
        rows.append([label, f"{r['beta']:g}", str(r["latent_dim"]), str(r["block_size"]), steps,
                     _num(r["off_block_fraction_median"]), _num(r["chance"]),
                     _num(r["relative_error_median"]), _num(r["relative_error_in_blocks_median"])])
    return rows


def structure(results_dir: Path) -> str:
    names = ("structure-digits", "structure-mnist")
    docs = [load(results_dir, n) for n in names if (Path(results_dir) / f"{n}.json").is_file()]
    if not docs:
        raise FileNotFoundError(f"none of {names} in {results_dir}")
    rows = [row for d in docs for row in _structure_rows(d, d["config"]["model"]["dataset"])]
    header = ["data", "β", "d", "b", "training steps", "off-block energy", "chance", "rel. err. (all)",
              "rel. err. (blocks)"]
    return _section(docs, _table(header, rows))


def samples_digits(results_dir: Path) -> str:
    doc = load(results_dir, "samples-digits")
    runs = doc["runs"]
    rows = []
    for beta in doc["config"]["grid"]["betas"]:
        v, g = runs[f"beta-vae/beta={beta:g}"], runs[f"grae≈/beta={beta:g}"]
        rows.append([f"{beta:g}", _num(v["frechet"]), _num(v.get("frechet_ex_post")), _num(g["frechet"]),
                     _num(g.get("frechet_ex_post")), _num(v["reconstruction_sq_error"]),
                     _num(g["reconstruction_sq_error"])])
    header = ["β", "β-VAE, prior", "β-VAE, ex-post", "GRAE≈, prior", "GRAE≈, ex-post",
              "β-VAE held-out ‖x − g(h(x))‖²", "GRAE≈ held-out ‖x − g(h(x))‖²"]
    floor = f"Floor (training vs held-out real images): {_num(doc['summary']['floor'])}."
    return _section([doc], _table(header, rows) + "\n\n" + floor)


def _objectives_settings(doc: dict) -> str:
    """What the table's models and evaluation were, from the results file's config."""
    model, grid = doc["config"]["model"], doc["config"]["grid"]
    arch = {"mlp": "MLP"}.get(model["architecture"], f"App. D {model['architecture']} network")
    width = "" if model["width"] == 1 else f" (width {model['width']:g})"
    points = " / ".join(str(n) for n in sorted({r["points"] for r in doc["runs"].values()})) or "no"
    text = (f"Models: {arch}{width}, d = {grid['latent_dim']}, {model['train_steps']} Adam steps each; "
            f"evaluated on {points} held-out points, "
            f"{grid['num_samples']} posterior draws per point for the β-VAE value.")
    wanted = [f"b={b}/beta={beta:g}" for b in grid["blocks"] for beta in grid["betas"]]
    missing = [k for k in wanted if k not in doc["runs"]]
    if missing:
        text += (f" *Unfinished*: {len(wanted) - len(missing)} of the grid's {len(wanted)} models ran "
                 f"(missing: {', '.join(missing)}).")
    return text


def _objectives(name: str) -> Callable[[Path], str]:
    def render(results_dir: Path) -> str:
        doc = load(results_dir, name)
        runs = sorted(doc["runs"].values(), key=lambda r: (r["block_size"], r["beta"]))  # any grid order
        rows = [[str(r["block_size"]), f"{r['beta']:g}", f"{_num(r['beta_vae'])} ± {_num(r['beta_vae_stderr'])}",
                 _num(r["taylor"]), _num(r["grae"]), _num(r["beta_vae"] - r["taylor"]), _num(r["gap_mean"]),
                 f"{r['gap_min']:.1e}"] for r in runs]
        header = ["b", "β", "β-VAE ± s.e.", "Taylor", "GRAE", "β-VAE − Taylor", "Taylor − GRAE",
                  "min per-point gap"]
        return _section([doc], _table(header, rows) + "\n\n" + _objectives_settings(doc))
    render.__name__ = name.replace("-", "_")
    return render


RENDERERS: dict[str, Callable[[Path], str]] = {
    "identifiability-quick": identifiability_quick,
    "identifiability-tanh-4000": _identifiability("identifiability-tanh-4000"),
    "identifiability-grid": identifiability_grid,
    "structure": structure,
    "samples-digits": samples_digits,
    "objectives-digits": _objectives("objectives-digits"),
    "objectives-mnist": _objectives("objectives-mnist"),
    "objectives-mnist-appd": _objectives("objectives-mnist-appd"),
}


# ------------------------------------------------------------------------------------------ CLI

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastjac.experiments.tables")
    sub = parser.add_subparsers(dest="action", required=True)
    pub = sub.add_parser("publish", help="copy a results.json into docs/results with its provenance")
    pub.add_argument("name")
    pub.add_argument("results_json", type=Path)
    pub.add_argument("--command", required=True)
    pub.add_argument("--machine", help="where it ran (default: this machine's CPU, cores, torch; "
                     "add the thread count and load the run saw)")
    pub.add_argument("--wall-seconds", type=float)
    pub.add_argument("--cpu-seconds", type=float)
    pub.add_argument("--date")
    pub.add_argument("--out-dir", type=Path, default=Path("docs/results"))
    show = sub.add_parser("render", help="print one generated section")
    show.add_argument("name", choices=sorted(RENDERERS))
    show.add_argument("--results-dir", type=Path, default=Path("docs/results"))
    args = parser.parse_args(argv)
    if args.action == "publish":
        from ..bench.results import cpu_model
        import os
        import torch
        machine = args.machine or f"{cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}"
        print(publish(args.name, args.results_json, command=args.command, machine=machine,
                      out_dir=args.out_dir, wall_seconds=args.wall_seconds, cpu_seconds=args.cpu_seconds,
                      date=args.date))
    else:
        print(RENDERERS[args.name](args.results_dir), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
