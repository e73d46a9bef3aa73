"""Reading a trace file costs bounded work (issue 24, item 2, the loading part).

A file's size in bytes does not bound what reading it costs: 240 KB held 10,000
parameters whose coverage changed in each of 1,000 passes (91.5 s to report),
64 MiB of nested empty arrays took 83 s to refuse. ``storage.LoadWork`` counts
what the loader and the analysis will do (values, bytes, nesting scans,
parameters x coverage changes, cut pairs) and ``load`` refuses a file over
``MAX_LOAD_WORK`` before doing it. These tests count: they never time. The
benchmark (``benchmarks/load_work.py``) measures the CPU time per file.
"""
from __future__ import annotations

import json

import pytest

import gradtrace
from gradtrace import GradtraceError, cli, schema, storage
from benchmarks.load_work import churn, cuts, healthy, meta_values, write_brackets


def write(tmp_path, doc, name="t.json"):
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return path


def test_the_issues_240_kb_file_is_refused_before_any_analysis(tmp_path, monkeypatch):
    """Regression: 10,000 parameters x 1,000 passes whose coverage changes every pass: load + report took 91.5 s."""
    path = write(tmp_path, churn(10_000, 1000))
    assert path.stat().st_size < 300_000
    monkeypatch.setattr(gradtrace.analysis, "verdicts", lambda trace: pytest.fail("analysed a refused file"))
    with pytest.raises(GradtraceError, match=r"too long to read and report: about 2,0\d\d,\d{3} work units "
                                             r".*most of it for parameters x coverage changes.*MAX_LOAD_WORK"):
        gradtrace.load(path)
    code = cli.main(["show", str(path)])
    assert code == 2


def test_raising_the_limit_reads_it(tmp_path, monkeypatch):
    path = write(tmp_path, churn(2000, 200))
    monkeypatch.setattr(storage, "MAX_LOAD_WORK", 50_000)
    with pytest.raises(GradtraceError, match="MAX_LOAD_WORK"):
        gradtrace.load(path)
    monkeypatch.setattr(storage, "MAX_LOAD_WORK", 10 ** 9)
    trace = gradtrace.load(path)
    assert len(trace.params) == 2000 and len(trace.passes) == 200


@pytest.mark.parametrize("n_params, n_passes", [(2000, 100), (5000, 300), (7000, 1000)])
def test_legitimate_long_runs_whose_coverage_changes_every_pass_load(tmp_path, n_params, n_passes):
    """Regression: 2,000 parameters x 100 passes (an MoE routing to other experts each step) was refused
    (the limit charged 10 units a parameter per coverage change, when grouping names cost that per gap;
    names are now grouped once per analysis call)."""
    trace = gradtrace.load(write(tmp_path, churn(n_params, n_passes)))
    assert len(trace.params) == n_params and len(trace.passes) == n_passes


def test_nested_arrays_are_refused_by_their_count_before_the_parser_runs(tmp_path, monkeypatch):
    """Regression: 64 MiB of nested empty arrays: parsed into ~30 million lists, then refused after 83 s."""
    path = tmp_path / "brackets.json"
    write_brackets(path, size=8 * 2 ** 20)
    monkeypatch.setattr(json, "loads", lambda *a, **k: pytest.fail("parsed a file over the work limit"))
    monkeypatch.setattr(storage, "_nesting_bound", lambda *a, **k: pytest.fail("scanned a file over the limit"))
    with pytest.raises(GradtraceError, match=r"most of it for JSON values"):
        gradtrace.load(path)


def test_the_nesting_scan_counts_every_pass_and_stops_at_the_limit(tmp_path, monkeypatch):
    """A file under the value count but nested 62 deep: each pass over its brackets is counted, and the
    scan stops once the count is over the limit, not after 62 passes."""
    path = tmp_path / "deep.json"
    write_brackets(path, size=5_000_000)
    monkeypatch.setattr(json, "loads", lambda *a, **k: pytest.fail("parsed a file over the work limit"))
    seen = []
    real_check = storage.LoadWork.check

    def counting_check(self, where):
        seen.append(self.scanned)
        return real_check(self, where)

    monkeypatch.setattr(storage.LoadWork, "check", counting_check)
    with pytest.raises(GradtraceError, match="MAX_LOAD_WORK"):
        gradtrace.load(path)
    scans = [s for s in seen if s]
    assert 1 <= len(scans) < 30  # refused part-way through the 62 passes
    skeleton_length = len(storage._skeleton(path.read_bytes()).replace(b",", b""))
    assert scans[0] == skeleton_length  # the first pass scans every bracket once


@pytest.mark.parametrize("text, values", [
    ('{"a": 1}', 2), ("[1, 2, 3]", 4), ('{"a": [1, {"b": "x,y[z]{"}], "c": ""}', 6),
    ('["a\\\\", "b\\"c,", 2]', 4), ("[[], {}, [[{}]]]", 6 + 3),
])
def test_values_are_counted_from_the_bytes_outside_strings(text, values):
    """What the pre-parse count sees: every value of a valid document (an empty array or object counts
    twice: an upper bound), commas and brackets inside strings ignored."""
    work = storage.LoadWork()
    parsed = storage._parse(text.encode(), "x", work)
    assert work.values == values >= _count_values(parsed)
    assert _count_values(parsed) + text.count("[]") + text.count("{}") == values


def _count_values(value) -> int:
    if isinstance(value, list):
        return 1 + sum(map(_count_values, value))
    if isinstance(value, dict):
        return 1 + sum(map(_count_values, value.values()))
    return 1


def test_a_free_form_list_of_millions_of_numbers_is_refused(tmp_path, monkeypatch):
    """3 million numbers in a free-form meta key (benchmarks/load_work.py); a tenth of both here."""
    monkeypatch.setattr(storage, "MAX_LOAD_WORK", storage.MAX_LOAD_WORK // 10)
    path = write(tmp_path, meta_values(300_000))
    with pytest.raises(GradtraceError, match="most of it for JSON values"):
        gradtrace.load(path)


def test_thousands_of_cuts_are_refused_for_their_pairs(tmp_path):
    with pytest.raises(GradtraceError, match="most of it for cut pairs"):
        gradtrace.load(write(tmp_path, cuts(4000)))
    assert len(gradtrace.load(write(tmp_path, cuts(500))).cuts) == 500


def test_a_long_healthy_run_is_not_charged_for_coverage(tmp_path):
    """Every pass reaching the same parameters costs no coverage comparison: the work is the file's values."""
    doc = healthy(400, 60)
    work = storage.LoadWork()
    trace = storage.from_dict(json.loads(json.dumps(doc)), gradtrace.Trace, "x", work)
    assert work.coverage == 0 and work.total < storage.MAX_LOAD_WORK
    assert len(trace.passes) == 60


def test_coverage_changes_are_counted_once_per_neighbour_pair_and_pairwise_for_a_few_passes():
    def contents(coverages, n_params=10):
        params = [f"p{i}" for i in range(n_params)]
        passes = []
        for j, cov in enumerate(coverages):
            p = gradtrace.PassTrace(name=f"s{j}", params=tuple(params))
            p.records = {params[i]: gradtrace.GradRecord(params[i], hits=1) for i in cov}
            passes.append(p)
        return {"params": params, "passes": passes, "cuts": [], "tensors": []}

    work = storage._add_analysis_work(storage.LoadWork(), contents([{0}, {0}, {0}, {1}, {1}, {0}, {0}, {0}]))
    assert work.coverage == 10 * (2 + 1)  # two changes; two distinct patterns: one pair
    work = storage._add_analysis_work(storage.LoadWork(), contents([{i} for i in range(4)]))
    assert work.coverage == 10 * (3 + 6)


def test_every_string_is_bounded(tmp_path):
    """Regression: a 1 MB parameter name took 28 s to lay out in the report's tables."""
    doc = healthy(4, 1)
    doc["params"][0] = doc["passes"][0]["records"]["layers.0.m0.weight"]["name"] = "x" * (schema.MAX_TEXT + 1)
    doc["passes"][0]["records"] = {doc["params"][0]: doc["passes"][0]["records"].pop("layers.0.m0.weight"),
                                   **doc["passes"][0]["records"]}
    with pytest.raises(GradtraceError, match=r"params\[0\]: expected a string of at most \d+ characters "
                                             r"\(gradtrace.schema.MAX_TEXT\), got a string of \d+ characters"):
        gradtrace.load(write(tmp_path, doc))
    doc = healthy(4, 1)
    doc["passes"][0]["records"]["y" * (schema.MAX_TEXT + 1)] = doc["passes"][0]["records"].pop("layers.0.m0.weight")
    with pytest.raises(GradtraceError, match=r"passes\[0\]\.records key: expected a string of at most"):
        gradtrace.load(write(tmp_path, doc))
