"""Every figure in README.md and docs/ comes from a committed record, equals it, and says how it was taken.

The convention is in docs/development.md ("Figures") and ``tests/support/figures_scan.py``: a measured number
in prose carries ``<!-- fig: FILE#PATH -->`` (or ``<!-- param -->`` for a parameter). These tests fail
when a figure has no citation, differs from its record, cites a record that does not state its command,
commit, threads and load before and after, is called quiet while its record's load went above the
CPUs + 0.5, or when a record claims ``meets_target`` from a spread that crosses the target. The same
checks run first on small hand-written pages and records, so each can be seen to fail.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import support.figures_scan as fs

ROOT = Path(__file__).resolve().parents[2]


def _harness():
    spec = importlib.util.spec_from_file_location("bench_harness", ROOT / "bench" / "harness.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


harness = _harness()
QUIET = re.compile(r"(?<!not )\bquiet\b", re.I)


@pytest.fixture(scope="module")
def scanned() -> list[fs.Page]:
    return [fs.scan(path) for path in fs.pages()]


# -- the checks, as functions of scanned pages -------------------------------------------------------------
def uncited(pages: list[fs.Page]) -> list[str]:
    """Figures without a citation, and citations that follow no number (they would check nothing)."""
    return [n.where() for page in pages for n in page.numbers if n.figure and n.binding is None] + [
        orphan for page in pages for orphan in page.orphans
    ]


def mismatches(pages: list[fs.Page]) -> list[str]:
    out = []
    for page in pages:
        try:
            cited = fs.citations(page)
        except (LookupError, KeyError, IndexError, TypeError, ValueError, ZeroDivisionError) as error:
            out.append(f"{page.name}: a citation cannot be read: {error!r}")
            continue
        out += [f"{n.where()} but {n.binding} is {c.value:.6g}" for n, c in cited if not fs.agrees(n, c.value)]
    return out


def untested(pages: list[fs.Page]) -> list[str]:
    out = []
    for page in pages:
        for number in page.numbers:
            if number.binding and number.binding.startswith("test:") and (why := fs.tested(number)):
                out.append(f"{number.where()}: {why}")
    return out


def cited_refs(pages: list[fs.Page]) -> dict[tuple[str, tuple], list[str]]:
    """(file, path) -> where it is cited."""
    out: dict[tuple[str, tuple], list[str]] = {}
    for page in pages:
        for number, cited in fs.citations(page):
            for file, steps in cited.refs:
                out.setdefault((file, tuple(steps)), []).append(f"{page.name}:{number.line}")
    return out


def missing_conditions(pages: list[fs.Page]) -> list[str]:
    out = []
    for (file, steps), where in cited_refs(pages).items():
        path = [s for s in steps if s != "*"]
        missing = harness.record_conditions(fs.record(file), path)["missing"]
        if missing:
            out.append(f"{file}#{list(steps)} (cited at {where[0]}) does not state {missing}")
    return sorted(set(out))


def false_quiet(pages: list[fs.Page]) -> list[str]:
    """Paragraphs that say 'quiet' (with the table that follows them) citing a record that was not quiet."""
    out = []
    for page in pages:
        cited = fs.citations(page)
        for i, (first, last, text) in enumerate(page.paragraphs):
            if not QUIET.search(text):
                continue
            if i + 1 < len(page.paragraphs) and page.paragraphs[i + 1][2].lstrip().startswith("|"):
                last = page.paragraphs[i + 1][1]
            refs = [ref for n, c in cited if first <= n.line <= last for ref in c.refs]
            figures = [n for n in page.numbers if first <= n.line <= last and (n.figure or n.binding)]
            if figures and not refs:
                out.append(f"{page.name}:{first}: says quiet next to figures that cite no record")
            for file, steps in refs:
                state = harness.record_conditions(fs.record(file), [s for s in steps if s != "*"])
                if not state["quiet"]:
                    out.append(
                        f"{page.name}:{first}: says quiet, but {file} went to load {state['max_load']} "
                        f"on {state.get('cpus', 2)} CPUs"
                    )
    return sorted(set(out))


def _verdicts(value, where: str = ""):
    if isinstance(value, dict):
        if "meets_target" in value:
            yield where, value
        for key, item in value.items():
            yield from _verdicts(item, f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _verdicts(item, f"{where}[{i}]")


def _spread(node: dict) -> tuple[float, float] | None:
    for key in ("ratio_quartiles", "quartiles"):
        if isinstance(node.get(key), dict):
            return node[key]["q1"], node[key]["q3"]
    for key in ("ratio_iqr", "interval", "ci"):
        if isinstance(node.get(key), list) and len(node[key]) == 2:
            return tuple(node[key])
    return None


def bad_verdicts(records: dict[str, object]) -> list[str]:
    out = []
    for name, data in records.items():
        for where, node in _verdicts(data):
            spread, target = _spread(node), node.get("target", node.get("target_ratio"))
            if node["meets_target"] is None:
                continue
            if spread is None or target is None:
                out.append(f"{name}{where}: meets_target={node['meets_target']} without a spread and a target")
                continue
            expected = harness.meets_target(*spread, target, lower_is_better=node.get("lower_is_better", True))
            if node["meets_target"] != expected:
                out.append(f"{name}{where}: meets_target={node['meets_target']} but spread {spread} vs {target}")
    return out


# -- the checks can fail: small pages and records with a known defect ---------------------------------------
CONDITIONS = {"command": "b.py", "commit": "abc", "torch_threads": 2, "cpu_count": 2}
MADE_UP = {
    "quiet.json": {
        "build_s": 351.5,
        "stages": {"census": 162.0},
        "conditions": {**CONDITIONS, "load_before": [0.35, 0.8, 1.1], "load_after": [1.86, 1.5, 1.4]},
    },
    "loaded.json": {"ratio": 7.09, "conditions": {**CONDITIONS, "load_before": [3.33], "load_after": [3.18]}},
    "bare.json": {"ratio": 1.05, "torch_threads": 1, "trials": [{"load": 1.5}, {"load": 4.0}]},
}


@pytest.fixture
def records(tmp_path, monkeypatch):
    """Records written for the test, read by the scanner instead of bench/results/."""
    (tmp_path / "results").mkdir()
    for name, data in MADE_UP.items():
        (tmp_path / "results" / name).write_text(json.dumps(data))
    monkeypatch.setattr(fs, "RESULTS", tmp_path / "results")
    fs.record.cache_clear()
    yield tmp_path
    fs.record.cache_clear()


def _page(tmp_path: Path, text: str) -> fs.Page:
    path = tmp_path / "page.md"
    path.write_text(text)
    return fs.scan(path)


def test_the_scanner_finds_figures_and_leaves_names_code_and_parameters(tmp_path):
    page = _page(
        tmp_path,
        "SmolLM2-135M at 8k, Llama-3.1-8B, nnsight 0.8.1, Python 3.11, 4 x 128 tokens and `1.5 s` are not figures,\n"
        "nor a version on the next line after transformers\n5.2;\n"
        "budget 0.25 <!-- param --> neither; 12 trials neither.\n"
        "```\n2.5 s in code\n```\n"
        "But 351.5 s, 45 ms, 80%, 1.49x, 35/25 points, 2.8e-5 and a load of 1.4-3.5 are.\n",
    )
    figures = [n.text for n in page.numbers if n.figure and n.binding is None]
    assert figures == ["351.5", "45", "80", "1.49", "35", "25", "2.8e-5", "1.4", "3.5"]
    assert len(uncited([page])) == len(figures)


def test_a_citation_binds_in_order_and_is_compared_at_the_shown_precision(records):
    page = _page(
        records,
        "built in 351.5 s <!-- fig: quiet.json#build_s -->, load 0.35 <!-- fig: #conditions.load_before[0] --> to "
        "1.86 <!-- fig: #conditions.load_after[0] -->, census 162 s <!-- fig: #stages.census -->\n",
    )
    assert not uncited([page])
    assert [n.binding for n in page.numbers if n.text == "1.86"] == ["fig: #conditions.load_after[0]"]
    assert not mismatches([page])
    assert mismatches([_page(records, "built in 351.6 s <!-- fig: quiet.json#build_s -->\n")]), "a changed figure"
    assert mismatches([_page(records, "built in 352 s <!-- fig: quiet.json#build_s - 1 -->\n")])
    swapped = (
        "load 1.86 to 0.35 <!-- fig: quiet.json#conditions.load_before[0] --> <!-- fig: #conditions.load_after[0] -->\n"
    )
    assert len(mismatches([_page(records, swapped)])) == 2
    assert mismatches([_page(records, "a 1.0x ratio <!-- fig: missing.json#ratio -->\n")]), "no such record"
    assert uncited([_page(records, "grew x7.09 <!-- fig: loaded.json#ratio -->\n")]), "a citation that binds nothing"


def test_a_figure_cited_to_a_test_must_be_asserted_there(tmp_path):
    cited = "tests/causal/test_causal.py::test_attribution_values_of_the_fixture_equal_a_plain_rederivation"
    good = _page(tmp_path, f"plain attribution says -2.87 <!-- test: {cited} -->\n")
    bad = _page(tmp_path, f"plain attribution says -2.88 <!-- test: {cited} -->\n")
    gone = _page(tmp_path, "plain attribution says -2.87 <!-- test: tests/causal/test_causal.py::test_gone -->\n")
    assert not untested([good]) and untested([bad]) and untested([gone])


def test_expressions_read_lists_and_arithmetic(records):
    assert fs.evaluate("max(bare.json#trials[*].load) * 100 / 100", None).value == 4.0
    assert fs.evaluate("quiet.json#build_s / #stages.census", None).value == pytest.approx(351.5 / 162)
    assert fs.evaluate("max(loaded.json#conditions.load_before[0], #conditions.load_after[0])", None).value == 3.33
    with pytest.raises(ValueError):
        fs.evaluate("quiet.json#build_s; import os", None)


def test_quiet_is_checked_against_the_records_load(records):
    loaded = _page(records, "On a quiet machine: memory grew 7.09x <!-- fig: loaded.json#ratio -->\n")
    quiet = _page(records, "On a quiet machine: built in 351.5 s <!-- fig: quiet.json#build_s -->\n")
    table = _page(records, "Quiet machine:\n\n| a | b |\n|---|---|\n| 7.09x <!-- fig: loaded.json#ratio --> | |\n")
    bare = _page(records, "Measured on a quiet machine: 351.5 s.\n")
    plan = _page(records, "The full grid is one quiet run, not yet made.\n")
    assert false_quiet([loaded]) and false_quiet([table]) and false_quiet([bare])
    assert not false_quiet([quiet]) and not false_quiet([plan])


def test_conditions_are_required_of_a_cited_record(records):
    stated = _page(records, "built in 351.5 s <!-- fig: quiet.json#build_s -->\n")
    unstated = _page(records, "a ratio of 1.05x <!-- fig: bare.json#ratio -->\n")
    assert not missing_conditions([stated])
    assert "commit" in missing_conditions([unstated])[0] and "load_before" in missing_conditions([unstated])[0]


def test_meets_target_refuses_a_spread_that_crosses_the_target():
    assert harness.meets_target(0.9, 1.05, 1.10) is True
    assert harness.meets_target(1.2, 1.4, 1.10) is False
    assert harness.meets_target(0.63, 1.71, 1.10) is None  # edit.json's paired ratios
    assert harness.meets_target(0.5, 0.7, 0.6, lower_is_better=False) is None
    assert harness.meets_target(0.65, 0.7, 0.6, lower_is_better=False) is True
    fragment = harness.ratio_verdict([0.63, 0.9, 1.05, 1.2, 1.71], 1.10)
    assert fragment["meets_target"] is None and fragment["ratio_quartiles"]["median"] == 1.05
    made_up = {
        "x.json": {"ratio": 1.05, "ratio_quartiles": {"q1": 0.8, "q3": 1.3}, "target": 1.1, "meets_target": True}
    }
    assert bad_verdicts(made_up)
    assert bad_verdicts({"y.json": {"ratio": 1.05, "target": 1.1, "meets_target": True}})


def test_record_conditions_read_every_layout():
    flat = {"command": "c", "commit": "abc", "torch_threads": 2, "uptime_before": "x load average: 1.2, 1, 1"}
    state = harness.record_conditions({**flat, "load_average_after": [2.7, 2, 2]})
    assert state["missing"] == [] and state["loads"] == [1.2, 2.7] and not state["quiet"]
    nested = {"sections": {"a": {**flat, "uptime_after": "load average: 2.0, 1, 1"}, "b": {"load_before": [3.9]}}}
    assert harness.record_conditions(nested, ["sections", "a"])["quiet"]
    assert not harness.record_conditions(nested)["quiet"]  # the whole record: section b went to 3.9


# -- the real pages and records ----------------------------------------------------------------------------
def test_every_figure_in_readme_and_docs_cites_a_record(scanned):
    missing = uncited(scanned)
    assert not missing, "figures without a record (add <!-- fig: FILE#PATH --> or <!-- param -->):\n" + "\n".join(
        missing
    )


def test_every_cited_figure_equals_its_record(scanned):
    wrong = mismatches(scanned)
    assert not wrong, "figures that differ from their record:\n" + "\n".join(wrong)


def test_every_figure_cited_to_a_test_is_asserted_by_it(scanned):
    wrong = untested(scanned)
    assert not wrong, "\n".join(wrong)


def test_every_cited_record_states_its_conditions(scanned):
    missing = missing_conditions(scanned)
    assert not missing, "\n".join(missing)


def test_quiet_only_where_the_record_was_quiet(scanned):
    wrong = false_quiet(scanned)
    assert not wrong, "\n".join(wrong)


def test_no_record_claims_a_target_its_spread_crosses():
    records = {p.name: fs.record(p.name) for p in sorted(fs.RESULTS.glob("*.json"))}
    wrong = bad_verdicts(records)
    assert not wrong, "\n".join(wrong)
