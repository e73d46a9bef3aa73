"""A merged trace (what gather() returns) read in one process: saving, verdicts, the report.

Built from plain records, as ``gather`` builds it; the multi-process path is in
``test_distributed.py``.
"""
import json
import math
import re

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


# ---- rank numbers, NaN origins, figures a wrapper made unknown ----------------------------------
def nonfinite_pass(scope="reduced", born=None):
    p = PassTrace(name="X", params=PARAMS, runs=1, kinds=["backward"], scope=scope, nonfinite_ranks=born)
    p.records = {"a.weight": GradRecord(name="a.weight", hits=1, norm=float("nan"), max_abs=float("nan"),
                                        nonfinite=4)}
    return p


def test_a_group_of_global_ranks_is_named_by_them_where_figures_were_identical():
    trace = gradtrace.Trace(PARAMS, meta={"world_size": 2, "ranks": [1, 2]}, passes={"X": nonfinite_pass("local")})
    (v,) = [v for v in trace.verdicts() if v.code == "NONFINITE"]
    assert v.evidence["ranks"] == [1, 2] and "on rank(s) 1, 2" in v.message


def test_a_nan_reduced_into_every_rank_names_where_it_was_born(tmp_path):
    trace = gradtrace.Trace(PARAMS, meta={"world_size": 2, "ranks": [0, 1]}, passes={"X": nonfinite_pass(born=[1])})
    trace.save(tmp_path / "m.json")
    for t in (trace, gradtrace.load(tmp_path / "m.json")):
        (v,) = [v for v in t.verdicts() if v.code == "NONFINITE"]
        assert v.evidence["ranks"] == [1] and v.evidence["seen_on_ranks"] == [0, 1]
        assert "born on rank(s) 1 (reduced into rank(s) 0' gradients too)" in v.message


def test_a_reduced_nan_without_its_origin_does_not_pretend_to_know_where_it_was_born():
    trace = gradtrace.Trace(PARAMS, meta={"world_size": 2, "cuts": "modules"}, passes={"X": nonfinite_pass()})
    (v,) = [v for v in trace.verdicts() if v.code == "NONFINITE"]
    assert "the rank where they were born is not known" in v.message and 'cuts="ops"' in v.message


def test_per_rank_figures_are_built_only_for_the_rank_read_and_read_like_the_dict():
    import numpy as np
    from gradtrace.distributed import WIDTH, RankCoverage, RankFigures, _pack

    p = PassTrace(name="X", params=PARAMS, runs=1, kinds=["backward"])
    p.records = {"b.weight": GradRecord(name="b.weight", hits=2, norm=3.0, max_abs=2.0, stale=True, order=0)}
    rows = np.zeros((2, 2, WIDTH))
    rows[1, 1] = [9.0, 2.0, 0.0, _pack(p)[0]]  # global rank 7 reached b.weight; rank 5 nothing
    figures, coverage = RankFigures(rows, list(PARAMS), [5, 7]), RankCoverage(rows, list(PARAMS), [5, 7])
    assert figures._built == {}
    assert figures[7] == {"b.weight": [3.0, 2.0, 0, 1]} and list(figures._built) == [7]
    assert figures == {5: {}, 7: {"b.weight": [3.0, 2.0, 0, 1]}} and coverage == {5: [], 7: ["b.weight"]}


def test_figures_a_wrapper_made_unknown_are_a_warning_and_nan_in_metrics_never_a_number():
    p = PassTrace(name="mb1", params=PARAMS, runs=1, kinds=["backward"], scope="reduced",
                  unknown_because="a sync averaged it with an unsynced microbatch")
    p.records = {"a.weight": GradRecord(name="a.weight", hits=1, norm=0.0, max_abs=0.0, cleared=True),
                 "b.weight": GradRecord(name="b.weight", hits=1, norm=0.0, max_abs=0.0, cleared=True, order=1)}
    trace = gradtrace.Trace(PARAMS, meta={}, passes={"mb1": p})
    codes = [v.code for v in trace.verdicts()]
    assert codes.count("FIGURES_UNKNOWN") == 1 and "CLEARED_GRADS" not in codes
    assert trace.report().splitlines()[0].startswith("gradtrace diagnosis: FIGURES_UNKNOWN: pass 'mb1'")
    metrics = trace.metrics(passes="last")
    assert math.isnan(metrics["gradtrace/total_norm"]) and math.isnan(metrics["gradtrace/max_abs"])
    # the report's tables say unknown too (they showed 0.000e+00 under 'reduced')
    report = trace.report()
    summary = next(line for line in report.splitlines() if line.startswith("mb1 "))
    assert "unknown" in summary and "0.000e+00" not in summary
    assert re.search(r"a\.weight +1 +unknown +unknown +cleared", report)


def test_a_shards_figures_are_named_shard_until_gathered():
    p = PassTrace(name="X", params=PARAMS, runs=1, kinds=["backward"], scope="sharded")
    p.records = {"a.weight": GradRecord(name="a.weight", hits=1, norm=1.0, max_abs=1.0)}
    local = gradtrace.Trace(PARAMS, meta={}, passes={"X": p}).metrics(passes="last")
    assert local["gradtrace/shard_total_norm"] == 1.0 and "gradtrace/total_norm" not in local
    merged = gradtrace.Trace(PARAMS, meta={"world_size": 2}, passes={"X": p}).metrics(passes="last")
    assert merged["gradtrace/total_norm"] == 1.0 and "gradtrace/shard_total_norm" not in merged
