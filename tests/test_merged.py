"""A merged trace (what gather() returns) read in one process: saving, verdicts, the report.

Built from plain records, as ``gather`` builds it; the multi-process path is in
``test_distributed.py``.
"""
import json

import gradtrace
from gradtrace.records import GradRecord, PassTrace

PARAMS = ("a.weight", "b.weight")


def merged(meta=None, **parts):
    p = PassTrace(name="X", params=PARAMS, runs=1, kinds=["backward"])
    p.records = {"a.weight": GradRecord(name="a.weight", hits=1, norm=2.0, max_abs=1.0, nonfinite=3)}
    return gradtrace.Trace(PARAMS, meta=dict({"world_size": 11}, **(meta or {})), passes={"X": p}, **parts)


def test_rank_keys_come_back_as_ints_in_rank_order(tmp_path):
    coverage = {"X": {r: ["a.weight"] for r in (2, 10)}}
    figures = {"X": {10: {"a.weight": [2.0, 1.0, 3]}, 2: {"a.weight": [1.0, 0.5, 0]}}}
    merged(rank_coverage=coverage, rank_figures=figures).save(tmp_path / "m.json")
    loaded = gradtrace.load(tmp_path / "m.json")
    assert sorted(loaded.rank_coverage["X"]) == [2, 10]
    assert loaded.rank_figures == figures
    assert [v.evidence.get("ranks") for v in loaded.verdicts() if v.code == "NONFINITE"] == [[10]]


def test_a_file_without_the_new_fields_loads_with_their_defaults(tmp_path):
    path = tmp_path / "old.json"
    merged().save(path)
    data = json.loads(path.read_text())
    del data["rank_figures"]
    for p in data["passes"]:
        del p["scope"]
    path.write_text(json.dumps(data))
    loaded = gradtrace.load(path)
    assert loaded.passes["X"].scope == "local" and loaded.rank_figures == {}


def test_divergence_is_a_warning_only_when_ddp_declared_unused_parameters():
    coverage = {"X": {0: ["a.weight"], 1: ["a.weight", "b.weight"]}}
    for declared, severity in ((True, "warning"), (False, "error")):
        found = merged({"wrapper": "DDP", "find_unused_parameters": declared}, rank_coverage=coverage).verdicts()
        (v,) = [v for v in found if v.code == "RANK_DIVERGENCE"]
        assert (v.severity, v.evidence["ranks"], v.evidence["parameters"]) == (severity, [0], ["b.weight"])
        assert ("Expected to have finished reduction" in v.message) is (not declared)


def test_identical_figures_name_every_rank_and_the_report_says_merged():
    trace = merged({"world_size": 2})
    (v,) = [v for v in trace.verdicts() if v.code == "NONFINITE"]
    assert v.evidence["ranks"] == [0, 1]
    assert "passes (merged over 2 ranks)" in trace.report()


def test_report_shows_each_rank_where_figures_differ():
    figures = {"X": {0: {"a.weight": [1.0, 0.5, 0]}, 1: {"a.weight": [3.0, 2.0, 3]}}}
    report = merged({"world_size": 2}, rank_figures=figures).report()
    section = report[report.index("per-rank figures in 'X'"):]
    rows = [line.split() for line in section.splitlines()[3:5]]
    assert rows == [["0", "1/2", "1.000e+00", "5.000e-01", "0"], ["1", "1/2", "3.000e+00", "2.000e+00", "3"]]


def test_a_sharded_pass_says_whether_its_figures_are_shard_local_or_global():
    p = PassTrace(name="X", params=PARAMS, runs=1, kinds=["backward"], scope="sharded")
    p.records = {"a.weight": GradRecord(name="a.weight", hits=1, norm=1.0, max_abs=1.0)}
    assert "shard-local" in gradtrace.Trace(PARAMS, meta={}, passes={"X": p}).report()
    assert "global (gathered shards)" in gradtrace.Trace(PARAMS, meta={"world_size": 2}, passes={"X": p}).report()
