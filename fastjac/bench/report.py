"""Run the groups, and print one table of ratios (and the JSON the README table is made from)."""
from __future__ import annotations

from typing import Optional

import torch

from . import timing
from .results import machine, machine_line, write_json  # noqa: F401  (part of this module's interface)
from .suites import Group

TOOL = "fastjac bench"  # marks the JSON this module writes (other tools share benchmarks/results/)


def run(groups: list[Group], *, repeats: int, device: torch.device, peaks: Optional[timing.Peaks],
        budget_s: float, min_sample_s: float = 0.02, progress=None) -> tuple[list[dict], list[dict]]:
    """Time every group (rivals interleaved with their baseline); rows and the skipped rivals."""
    rows, skipped = [], []
    for group in groups:
        if progress:
            progress(f"{group.area}: {group.title}")
        built, targets = {}, {}
        for rival in [group.baseline, *group.rivals]:
            try:
                built[rival.label] = rival.build()
                targets[rival.label] = rival.targets
            except NotImplementedError as e:
                skipped.append({"area": group.area, "workload": group.title, "implementation": rival.label,
                                "reason": str(e)})
        if group.baseline.label not in built:
            continue
        samples = timing.interleaved({k: w.run for k, w in built.items()}, repeats=repeats,
                                     budget_s=budget_s, min_sample_s=min_sample_s)
        medians = {k: timing.median(v) for k, v in samples.items()}
        base = medians[group.baseline.label]
        for label, work in built.items():
            row = {"area": group.area, "workload": group.title, "implementation": label,
                   "baseline": label == group.baseline.label, **timing.summary(samples[label]),
                   "ratio": medians[label] / base, "targets": []}
            for t in targets[label]:
                versus = t.versus or group.baseline.label
                if versus in medians:
                    ratio = medians[label] / medians[versus]
                    row["targets"].append({"text": t.text, "ratio": ratio, "holds": t.holds(ratio)})
            if peaks is not None and work.bytes is not None:
                floor = max(work.bytes / peaks.bandwidth, work.flops / peaks.flops)
                row.update(floor_s=floor, of_floor=floor / medians[label])
            rows.append(row)
    return rows, skipped


def _duration(s: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if s >= scale:
            return f"{s / scale:7.2f} {unit}"
    return f"{s * 1e9:7.0f} ns"


def _ratio(r: float) -> str:
    return f"{r:.2f}" if r >= 0.1 else f"{r:.4f}"


def _target_cell(row) -> str:
    cells = []
    for t in row["targets"]:
        measured = f"{1 / t['ratio']:.1f}× faster" if "faster" in t["text"] else f"{t['ratio']:.2f}×"
        cells.append(f"{'✓' if t['holds'] else '✗'} {t['text']} ({measured})")
    return "; ".join(cells)


def table(result: dict) -> str:
    """The one table a person reads: every row a ratio to its group's baseline."""
    m, rows = result["machine"], result["rows"]
    on_card = any("floor_s" in r for r in rows)
    head = (f"fastjac bench · {m['device']} · {m['card'] or m['cpu']} · {m['cores']} cores · "
            f"{m.get('torch_threads')} torch threads · torch {m['torch']}"
            + (f" · CUDA {m['cuda']}" if m["card"] else "") + f" · {m['date']}")
    lines = [head, f"medians of up to {result['settings']['repeats']} interleaved repeats; "
             "ratio = time / baseline time in the same run (< 1 is faster)"]
    if result.get("peaks"):
        p = result["peaks"]
        lines.append(f"floor = max(bytes / {p['bandwidth'] / 1e9:.0f} GB/s, flops / {p['flops'] / 1e12:.1f} "
                     "TFLOP/s), both measured on this card")
    cols = f"{'workload':48s} {'implementation':32s} {'median':>10s} {'ratio':>7s}"
    if on_card:
        cols += f" {'floor':>10s} {'of floor':>8s}"
    lines += ["", cols + "  target", "-" * (len(cols) + 8)]
    area = title = None
    for r in rows:
        if r["area"] != area:
            area = r["area"]
            lines.append(f"[{area}]")
        name = r["workload"] if r["workload"] != title else ""
        title = r["workload"]
        label = r["implementation"] + (" (baseline)" if r["baseline"] else "")
        line = f"{name:48s} {label:32s} {_duration(r['median_s']):>10s} {_ratio(r['ratio']):>7s}"
        if on_card:
            line += (f" {_duration(r['floor_s']):>10s} {100 * r['of_floor']:7.1f}%" if "floor_s" in r
                     else f" {'':>10s} {'':>8s}")
        lines.append((line + "  " + _target_cell(r)).rstrip())
    reasons = sorted({f"{s['implementation']}: {s['reason']}" for s in result["skipped"]})
    if reasons:
        lines += ["", "not run here (" + str(len(result["skipped"])) + " rivals):"] + [f"  {x}" for x in reasons]
    return "\n".join(lines)


def markdown(result: dict) -> str:
    """The same rows as :func:`table`, as a Markdown table under a line naming the machine."""
    m = result["machine"]
    lines = [f"**{m['device']}** — {machine_line(m)}, {m['date']} "
             f"(medians of up to {result['settings']['repeats']} interleaved repeats)", "",
             "| workload | implementation | median | ratio to baseline | target |", "|---|---|---:|---:|---|"]
    title = None
    for r in result["rows"]:
        name = r["workload"] if r["workload"] != title else ""
        title = r["workload"]
        label = r["implementation"] + (" (baseline)" if r["baseline"] else "")
        floor = f" ({100 * r['of_floor']:.0f}% of floor)" if "of_floor" in r else ""
        lines.append(f"| {name} | {label} | {_duration(r['median_s']).strip()}{floor} | "
                     f"{_ratio(r['ratio'])} | {_target_cell(r)} |")
    return "\n".join(lines)
