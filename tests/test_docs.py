"""The documentation is generated where it quotes numbers, links where it says it links, and
never points users at a document they do not have.

- every ``<!-- generated:NAME -->`` section of README.md and docs/ equals what
  ``python benchmarks/render_results.py`` makes from the committed results files (the CI line is
  ``python benchmarks/render_results.py --check``), and that check fails on a stale section, a
  missing results file, an unknown or missing section;
- every link into docs/maths.md (``maths.md#`` followed by an anchor) anywhere in the repository names a
  heading of docs/maths.md,
  and the headings other files link to exist;
- the tolerance table of docs/maths.md is the one the tests use (tests/utils.py);
- no user-facing file mentions the internal specification.
"""
import json
import os
import re
import subprocess
import sys

import pytest

from tests.utils import RTOL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MATHS = os.path.join(ROOT, "docs", "maths.md")
TEXT_SUFFIXES = (".py", ".md", ".txt", ".toml", ".cfg", ".cpp", ".h", ".cu", ".cuh", ".json", ".rst", ".sh")
SKIP_DIRS = {".git", ".asv", "build", "dist", "__pycache__", ".pytest_cache", ".hypothesis"}
# the headings other files link to (COORDINATION of the team that wrote them); never rename these
FIXED_ANCHORS = ("notation", "observation-models", "operators", "log-determinant-and-its-gradients",
                 "bounds-and-identities", "stochastic-column-estimators", "orthogonality-penalty",
                 "first-order-and-hutchinson-estimators", "optimal-posterior-covariance", "objectives",
                 "the-taylor-gap", "jacobian-columns", "batch-coupling", "numerical-error-and-tolerances",
                 "experiments")
INTERNAL = "SP" + "EC"  # spelled apart so this file does not match itself


def _render_results():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import render_results
    finally:
        sys.path.pop(0)
    return render_results


def _anchor(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: str) -> set[str]:
    with open(path, encoding="utf-8") as f:
        text = re.sub(r"```.*?```", "", f.read(), flags=re.S)
    seen, out = {}, set()
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", text, flags=re.M):
        base = _anchor(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def _repository_files():
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info")]
        for name in files:
            if name.endswith(TEXT_SUFFIXES):
                yield os.path.join(folder, name)


def _read(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


# -- generated sections ----------------------------------------------------------------------------

def test_generated_sections_are_current():
    changed, problems = _render_results().check_and_render(ROOT)
    assert not problems, "\n".join(problems)
    assert not changed, f"stale generated sections in {sorted(changed)}: run python benchmarks/render_results.py"


def test_check_command_exits_zero_here():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "render_results.py"), "--check"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


BENCH = {"tool": "fastjac bench", "command": "fastjac bench --device cpu --json x.json",
         "machine": {"device": "cpu", "card": None, "cpu": "X", "cores": 2, "torch_threads": 1, "torch": "2",
                     "date": "2026-01-01 00:00 UTC", "load_average": 0.5},
         "settings": {"repeats": 3, "quick": False},
         "rows": [{"workload": "w", "implementation": "autograd", "baseline": True, "median_s": 2e-3,
                   "ratio": 1.0, "targets": []},
                  {"workload": "w", "implementation": "torch", "baseline": False, "median_s": 1e-3,
                   "ratio": 0.5, "targets": []}]}


@pytest.fixture
def checkout(tmp_path):
    """A minimal checkout: README with one generated section, its results file, and its renderer."""
    rr = _render_results()
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "docs").mkdir()
    (tmp_path / "benchmarks" / "results" / "cpu.json").write_text(json.dumps(BENCH))
    (tmp_path / "README.md").write_text("# t\n\nkept\n<!-- generated:bench -->\nold\n<!-- /generated:bench -->\ntail\n")
    table = {"bench": rr.Renderer(rr.bench_tables, "README.md", "benchmarks/results")}
    return rr, tmp_path, table


def test_render_rewrites_only_the_section_and_then_checks_clean(checkout):
    rr, root, table = checkout
    changed, problems = rr.check_and_render(str(root), table)
    assert problems == [] and list(changed) == ["README.md"]
    text = changed["README.md"]
    assert text.startswith("# t\n\nkept\n<!-- generated:bench -->\n") and text.endswith("<!-- /generated:bench -->\ntail\n")
    assert "old" not in text
    assert "`fastjac bench --device cpu --json x.json`" in text and "2026-01-01 00:00 UTC" in text
    assert "| w | autograd (baseline) | 2.00 ms | 1.00 |  |" in text
    (root / "README.md").write_text(text)
    assert rr.check_and_render(str(root), table) == ({}, [])


def test_check_fails_on_a_stale_section(checkout):
    rr, root, table = checkout
    changed, _ = rr.check_and_render(str(root), table)
    (root / "README.md").write_text(changed["README.md"].replace("2.00 ms", "1.50 ms"))
    changed, problems = rr.check_and_render(str(root), table)
    assert list(changed) == ["README.md"] and problems == []


def test_check_fails_when_a_results_file_is_missing(checkout):
    rr, root, table = checkout
    (root / "benchmarks" / "results" / "cpu.json").unlink()
    _, problems = rr.check_and_render(str(root), table)
    assert any("results file missing" in p for p in problems), problems


def test_check_fails_on_unknown_missing_or_unclosed_sections(checkout):
    rr, root, table = checkout
    (root / "docs" / "x.md").write_text("<!-- generated:nobody -->\n<!-- /generated:nobody -->\n"
                                        "<!-- generated:open -->\n")
    (root / "README.md").write_text("# no sections\n")
    _, problems = rr.check_and_render(str(root), table)
    text = "\n".join(problems)
    assert "no renderer for section 'nobody'" in text
    assert "generated:open --> has no matching" in text
    assert "section 'bench' is missing" in text


def test_legacy_bench_results_render_with_a_command_and_the_new_label(checkout):
    rr, root, table = checkout
    legacy = dict(BENCH, rows=[dict(BENCH["rows"][0], implementation="naive")])
    del legacy["command"]
    (root / "benchmarks" / "results" / "cpu.json").write_text(json.dumps(legacy))
    text = rr.check_and_render(str(root), table)[0]["README.md"]
    assert "fastjac bench --device cpu --repeats 3 --threads 1 --json benchmarks/results/cpu.json" in text
    assert "autograd (baseline)" in text and "naive" not in text


def test_every_renderer_of_the_experiments_has_its_section():
    """Once fastjac.experiments.tables exists, every table it can render is in docs/reproduction.md."""
    rr = _render_results()
    table = rr.renderers()
    for name in ("bench", "extension-cpu", "jacobian-memory", "hutchinson", "zoo", "examples"):
        assert name in table
    homes = {r.home for r in table.values()}
    for home in homes:
        assert os.path.exists(os.path.join(ROOT, home)), home


# -- links and headings ----------------------------------------------------------------------------

def test_maths_has_the_fixed_headings():
    missing = set(FIXED_ANCHORS) - _anchors(MATHS)
    assert not missing, f"docs/maths.md lost headings others link to: {sorted(missing)}"


def test_every_maths_link_in_the_repository_resolves():
    anchors = _anchors(MATHS)
    link = re.compile(r"maths\.md#([\w\-]+)")
    broken, seen = [], 0
    for path in _repository_files():
        for anchor in link.findall(_read(path)):
            seen += 1
            if anchor not in anchors:
                broken.append(f"{os.path.relpath(path, ROOT)}: #{anchor}")
    assert seen > 0, "no file links into docs/maths.md"
    assert not broken, "links to headings docs/maths.md does not have:\n" + "\n".join(broken)


@pytest.mark.parametrize("doc", ["README.md", "docs/maths.md", "docs/reproduction.md"])
def test_links_within_a_document_resolve(doc):
    path = os.path.join(ROOT, doc)
    if not os.path.exists(path):
        pytest.skip(f"{doc} does not exist")
    anchors = _anchors(path)
    text = re.sub(r"```.*?```", "", _read(path), flags=re.S)
    broken = [a for a in re.findall(r"\]\(#([^)]+)\)", text) if a not in anchors]
    assert not broken, f"{doc}: links to missing headings {broken}"


def test_relative_file_links_in_the_docs_exist():
    broken = []
    for doc in ["README.md"] + [os.path.join("docs", n) for n in os.listdir(os.path.join(ROOT, "docs"))
                                if n.endswith(".md")]:
        folder = os.path.dirname(os.path.join(ROOT, doc))
        for target in re.findall(r"\]\(([^)#:\s]+)(?:#[^)]*)?\)", _read(os.path.join(ROOT, doc))):
            if not os.path.exists(os.path.normpath(os.path.join(folder, target))):
                broken.append(f"{doc}: {target}")
    assert not broken, "links to files that do not exist:\n" + "\n".join(broken)


# -- content ---------------------------------------------------------------------------------------

SUPERSCRIPT = str.maketrans("⁰¹²³⁴⁵⁶⁷⁸⁹⁻", "0123456789-")


def _number(cell: str) -> float:
    """'10⁻⁴' or '5·10⁻³' -> float."""
    cell = cell.strip().translate(SUPERSCRIPT)
    m = re.fullmatch(r"(?:([\d.]+)·)?10(-?\d+)", cell)
    assert m, f"not a power of ten: {cell!r}"
    return float(m.group(1) or 1) * 10.0 ** int(m.group(2))


def test_the_tolerance_table_in_the_maths_is_the_one_the_tests_use():
    rows = {}
    for line in _read(MATHS).splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0] in ("float64", "float32", "float16", "bfloat16"):
            rows[cells[0]] = _number(cells[2])
    used = {str(dtype).replace("torch.", ""): tol for dtype, tol in RTOL.items()}
    assert rows == pytest.approx(used), f"docs/maths.md says {rows}, tests/utils.py uses {used}"


def test_no_file_mentions_the_internal_specification():
    hits = []
    for path in _repository_files():
        for i, line in enumerate(_read(path).splitlines(), 1):
            # the bare quoted word is another test looking for it, as this one does
            if re.search(rf"\b{INTERNAL}\b", re.sub(rf"([\"']){INTERNAL}\1", "", line)):
                hits.append(f"{os.path.relpath(path, ROOT)}:{i}: {line.strip()[:100]}")
    assert not hits, "users do not have that document; link docs/maths.md instead:\n" + "\n".join(hits)


def test_only_restricts_the_documents_and_their_renderers(checkout):
    rr, root, table = checkout
    (root / "docs" / "other.md").write_text("<!-- generated:nobody -->\n<!-- /generated:nobody -->\n")
    changed, problems = rr.check_and_render(str(root), table, only=["README.md"])
    assert list(changed) == ["README.md"] and problems == []
    changed, problems = rr.check_and_render(str(root), table, only=["docs/other.md"])
    assert changed == {} and problems == ["docs/other.md: no renderer for section 'nobody'"]
