"""JSON round trip: a loaded trace answers diff, verdicts and report like the live one."""
import json
import math
import os
import stat

import pytest
import torch
from torch import nn

import gradtrace
from gradtrace import storage


def make_trace():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    with gradtrace.watch(model, keep_grads=True) as trace:
        with trace.pass_("X"):
            model(torch.randn(2, 3)).sum().backward()
        with trace.pass_("Y"):
            with torch.no_grad():
                h = model[0](torch.randn(2, 3))
            S = trace.tensor("S", model[2](model[1](h)).sum(-1))
            trace.tensor("A", torch.tensor([[1.0, 1.0], [2.0, float("nan")]]))
            torch.autograd.grad(S.sum(), list(model.parameters()), allow_unused=True)
        trace.scalar("deltaH1", -2e-9)
        trace.diff("X", "Y")
    return trace


def test_round_trip(tmp_path):
    trace = make_trace()
    path = tmp_path / "trace.json"
    trace.save(path)
    loaded = gradtrace.load(path)
    assert list(loaded.passes) == list(trace.passes)
    for name, p in trace.passes.items():
        q = loaded.passes[name]
        assert q.covered == p.covered and q.missing == p.missing and q.runs == p.runs
        for param, r in p.records.items():
            assert q.records[param] == r
    assert loaded.verdicts() == trace.verdicts()
    assert loaded.report() == trace.report()
    assert str(loaded.diff("X", "Y")) == str(trace.diff("X", "Y"))
    assert loaded.cuts == trace.cuts
    assert math.isnan(loaded.tensors["A"].values.max) is False
    assert loaded.tensors["A"].values.nonfinite == 1


def test_file_is_plain_json_without_nan_literals(tmp_path):
    trace = make_trace()
    path = tmp_path / "trace.json"
    trace.save(path)
    text = path.read_text()
    assert "NaN" not in text
    data = json.loads(text)
    assert data["format"] == "gradtrace-trace" and data["version"] == 1
    assert not list(tmp_path.glob("*.tmp"))


def test_names_nan_and_inf_stay_names(tmp_path):
    """Regression: the decoder turned every "nan"/"inf"/"-inf" string back into a float, names included."""
    model = nn.Linear(2, 1)
    with gradtrace.watch(model) as trace:
        with trace.pass_("nan"):
            trace.tensor("inf", model(torch.randn(3, 2))).sum().backward()
        trace.scalar("-inf", float("-inf"))
    trace.save(tmp_path / "t.json")
    loaded = gradtrace.load(tmp_path / "t.json")
    assert list(loaded.passes) == ["nan"] and list(loaded.tensors) == ["inf"] and list(loaded.scalars) == ["-inf"]
    assert loaded.tensors["inf"].grads["nan"].reached and loaded.scalars["-inf"].value == float("-inf")
    assert loaded.report() == trace.report()


def test_files_with_non_finite_numbers_as_strings_still_load(tmp_path):
    """Compatibility: files written before the typed decoder spell NaN/Inf as strings in number fields."""
    data = json.loads(json.dumps(storage.to_dict(make_trace())))
    record = next(iter(data["passes"][0]["records"].values()))
    record["norm"], data["scalars"][0]["value"] = "nan", "-inf"
    path = tmp_path / "old.json"
    path.write_text(json.dumps(data))
    loaded = gradtrace.load(path)
    assert math.isnan(loaded.passes["X"].records[record["name"]].norm)
    assert loaded.scalars["deltaH1"].value == float("-inf")


def test_rank_coverage_keeps_integer_ranks(tmp_path):
    """JSON object keys are strings; the loaded trace has the live trace's int ranks back."""
    trace = make_trace()
    trace.rank_coverage = {"X": {0: ["0.weight"], 1: []}}
    trace.save(tmp_path / "t.json")
    assert gradtrace.load(tmp_path / "t.json").rank_coverage == {"X": {0: ["0.weight"], 1: []}}


def test_save_does_not_follow_a_symlink_planted_at_the_temporary_name(tmp_path):
    """Regression: save wrote to the fixed name path + ".tmp" with open(), following a planted symlink."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    path = tmp_path / "trace.json"
    (tmp_path / "trace.json.tmp").symlink_to(victim)
    make_trace().save(path)
    assert victim.read_text() == "precious"
    assert not path.is_symlink() and json.loads(path.read_text())["format"] == "gradtrace-trace"


def _interrupted_dump(data, f, **kwargs):
    f.write(json.dumps(data)[:100])  # half a trace reaches the file, then the process is interrupted
    raise KeyboardInterrupt


def test_interrupted_save_keeps_the_previous_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "trace.json"
    trace = make_trace()
    trace.save(path)
    before = path.read_bytes()
    monkeypatch.setattr(storage.json, "dump", _interrupted_dump)
    with pytest.raises(KeyboardInterrupt):
        trace.save(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trace.json"]


def test_interrupted_first_save_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(storage.json, "dump", _interrupted_dump)
    with pytest.raises(KeyboardInterrupt):
        make_trace().save(tmp_path / "trace.json")
    assert list(tmp_path.iterdir()) == []


def test_save_syncs_the_data_before_renaming_it_into_place(tmp_path, monkeypatch):
    """A crash right after the rename must not leave a name pointing at unwritten data."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    make_trace().save(tmp_path / "trace.json")
    assert events[:2] == ["fsync", "replace"]


def test_saved_file_gets_the_usual_mode(tmp_path):
    """mkstemp creates 0600 files; a trace is created as open(path, "w") would (umask honoured)."""
    old = os.umask(0o022)
    try:
        make_trace().save(tmp_path / "trace.json")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "trace.json").st_mode) == 0o644


def test_save_into_a_missing_folder_is_a_gradtrace_error(tmp_path):
    with pytest.raises(gradtrace.GradtraceError, match="cannot write trace"):
        make_trace().save(tmp_path / "no" / "such" / "trace.json")
