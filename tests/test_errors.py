"""Bad input gets a GradtraceError that says what to do, and nothing stays registered."""
import json

import pytest
import torch
from torch import nn

import gradtrace
from gradtrace import GradtraceError, cli


def hook_counts(model: nn.Module):
    return [(len(p._backward_hooks or {}), len(getattr(p, "_post_accumulate_grad_hooks", None) or {}))
            for p in model.parameters()] + [len(m._forward_hooks) for m in model.modules()]


@pytest.fixture
def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


@pytest.mark.parametrize("target", [42, "model", torch.zeros(3), None], ids=["int", "str", "tensor", "none"])
def test_watch_rejects_what_is_not_a_model(target):
    with pytest.raises(GradtraceError, match="nn.Module or an iterable"):
        with gradtrace.watch(target):
            pass


def test_watch_rejects_malformed_pairs(model):
    with pytest.raises(GradtraceError, match=r"\(name, parameter\) pairs"):
        with gradtrace.watch([("a", 1)]):
            pass
    with pytest.raises(GradtraceError, match="unique"):
        p = nn.Parameter(torch.zeros(2))
        with gradtrace.watch([("a", p), ("a", p)]):
            pass


def test_model_without_trainable_parameters(model):
    for p in model.parameters():
        p.requires_grad_(False)
    before = hook_counts(model)
    with pytest.raises(GradtraceError, match="no trainable parameter"):
        with gradtrace.watch(model):
            pass
    assert hook_counts(model) == before


def test_pass_nested_in_itself(model):
    before = hook_counts(model)
    with pytest.raises(GradtraceError, match="nested in itself"):
        with gradtrace.watch(model) as trace:
            with trace.pass_("X"):
                with trace.pass_("X"):
                    pass
    assert hook_counts(model) == before


def test_passes_do_not_nest_and_do_not_reopen(model):
    with gradtrace.watch(model) as trace:
        with trace.pass_("X"):
            with pytest.raises(GradtraceError, match="do not nest"):
                with trace.pass_("Y"):
                    pass
            model(torch.randn(2, 3)).sum().backward()
        with pytest.raises(GradtraceError, match="already ended"):
            with trace.pass_("X"):
                pass
    # The pass that was open when the error was raised still holds its data.
    assert trace.passes["X"].covered == {n for n, _ in model.named_parameters()}


def test_unknown_pass_in_diff(model):
    with gradtrace.watch(model) as trace:
        with trace.pass_("X"):
            model(torch.randn(2, 3)).sum().backward()
    with pytest.raises(GradtraceError, match="no pass named 'Y'; this trace has 'X'"):
        trace.diff("X", "Y")


def test_second_watch_on_the_same_parameters(model):
    with gradtrace.watch(model) as trace:
        with pytest.raises(GradtraceError, match="already watched"):
            with gradtrace.watch(model.named_parameters()):
                pass
        # The first watch is untouched by the failed second one.
        with trace.pass_("X"):
            model(torch.randn(2, 3)).sum().backward()
    assert trace.passes["X"].runs == 1
    with gradtrace.watch(model):  # free again after exit
        pass


def test_exception_in_body_removes_everything_and_keeps_data(model):
    before = hook_counts(model)
    with pytest.raises(RuntimeError, match="boom"):
        with gradtrace.watch(model) as trace:
            with trace.pass_("X"):
                model(torch.randn(2, 3)).sum().backward()
                raise RuntimeError("boom")
    assert hook_counts(model) == before
    assert len(trace.passes["X"].covered) == 4


def test_recording_after_exit_or_on_a_loaded_trace(model, tmp_path):
    with gradtrace.watch(model) as trace:
        pass
    with pytest.raises(GradtraceError, match="after `watch` exited"):
        trace.tensor("S", torch.zeros(2))
    trace.save(tmp_path / "t.json")
    loaded = gradtrace.load(tmp_path / "t.json")
    with pytest.raises(GradtraceError, match="read-only"):
        with loaded.pass_("X"):
            pass


def test_bad_tensor_and_scalar_arguments(model):
    with gradtrace.watch(model) as trace:
        with pytest.raises(GradtraceError, match="takes a torch.Tensor"):
            trace.tensor("S", [1.0, 2.0])
        with pytest.raises(GradtraceError, match="real number"):
            trace.scalar("x", "0.1")
        with pytest.raises(GradtraceError, match="one number"):
            trace.scalar("x", torch.zeros(3))
        with pytest.raises(GradtraceError, match="cuts="):
            with gradtrace.watch(nn.Linear(2, 2), cuts="everything"):
                pass


@pytest.mark.parametrize("content, message", [
    ("not json at all", "not valid JSON"),
    (json.dumps({"hello": 1}), "not a gradtrace trace"),
    (json.dumps({"format": "gradtrace-trace", "version": 99}), "version 99"),
    (json.dumps({"format": "gradtrace-trace", "version": 1, "params": ["a"], "passes": [{"bogus": 1}],
                 "tensors": [], "scalars": [], "cuts": []}), "damaged"),
    (json.dumps({"format": "gradtrace-trace", "version": 1, "params": "a"}), "damaged"),
], ids=["not-json", "foreign", "future-version", "unknown-field", "wrong-type"])
def test_load_rejects_bad_files(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(GradtraceError, match=message):
        gradtrace.load(path)


def test_load_missing_file(tmp_path):
    with pytest.raises(GradtraceError, match="no such trace file"):
        gradtrace.load(tmp_path / "missing.json")


def test_precondition_needs_kept_grads_and_adam(model):
    with gradtrace.watch(model) as trace:
        for name in ("X", "Y"):
            with trace.pass_(name):
                model(torch.randn(2, 3)).sum().backward()
    with pytest.raises(GradtraceError, match="keep_grads=True"):
        trace.diff("X", "Y", precondition=torch.optim.Adam(model.parameters()))
    with gradtrace.watch(model, keep_grads=True) as trace:
        for name in ("X", "Y"):
            with trace.pass_(name):
                model.zero_grad()
                model(torch.randn(2, 3)).sum().backward()
    with pytest.raises(GradtraceError, match="Adam"):
        trace.diff("X", "Y", precondition=torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(GradtraceError, match="second-moment|step"):
        trace.diff("X", "Y", precondition=torch.optim.Adam(model.parameters()))


# ---- hostile and damaged trace files ----------------------------------------------


@pytest.fixture
def saved_dict(model):
    """A real saved trace as a JSON document, to damage: two passes, a cut, a tensor, a scalar."""
    with gradtrace.watch(model) as trace:
        with trace.pass_("X"):
            model(torch.randn(2, 3)).sum().backward()
        with trace.pass_("Y"):
            with torch.no_grad():
                h = model[0](torch.randn(2, 3))
            trace.tensor("S", model[2](h)).sum().backward()
        trace.scalar("deltaH1", 1e-9)
    return json.loads(json.dumps(gradtrace.storage.to_dict(trace)))


def write(tmp_path, data, name="t.json"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_load_deeply_nested_json_is_a_gradtrace_error(tmp_path):
    """Regression: 100,000 nested arrays let RecursionError escape from load."""
    path = write(tmp_path, '{"format": "gradtrace-trace", "version": 1, "params": ' + "[" * 100000 + "]" * 100000 + "}")
    with pytest.raises(GradtraceError, match="nested deeper than 64"):
        gradtrace.load(path)


def test_nesting_is_limited_before_the_parser_recurses(tmp_path, monkeypatch):
    """65 levels would parse, but the limit holds even where the recursion limit was raised (C stack)."""
    monkeypatch.setattr(json, "loads", lambda *a, **k: pytest.fail("parsed a file nested too deeply"))
    path = write(tmp_path, '{"format": "gradtrace-trace", "meta": {"m": ' + "[" * 64 + "]" * 64 + "}}")
    with pytest.raises(GradtraceError, match="nested deeper than 64"):
        gradtrace.load(path)


def test_brackets_inside_strings_do_not_count_as_nesting(saved_dict, tmp_path):
    saved_dict["passes"][0]["name"] = "[" * 100 + '\\"{' * 100
    assert list(gradtrace.load(write(tmp_path, saved_dict)).passes)[0] == saved_dict["passes"][0]["name"]


def test_load_5000_digit_integer_is_a_gradtrace_error(tmp_path):
    """Regression: a 5,000-digit integer let ValueError (int digit limit) escape from load."""
    path = write(tmp_path, '{"format": "gradtrace-trace", "version": 1, "params": [' + "7" * 5000 + "]}")
    with pytest.raises(GradtraceError, match="too many digits"):
        gradtrace.load(path)


def _set(path, value):
    def damage(data):
        *parents, last = path
        for key in parents:
            data = data[key]
        data[last] = value
    return damage


WRONG_FIELDS = {
    "norm-null": (_set(["passes", 0, "records", "0.weight", "norm"], None),
                  r"passes\[0\]\.records\['0\.weight'\]\.norm: expected a number, got null"),
    "rank-coverage-list": (_set(["rank_coverage"], ["not", "a", "dict"]),
                           r"rank_coverage: expected an object, got a JSON array"),
    "rank-not-a-number": (_set(["rank_coverage"], {"X": {"zero": []}}), r"rank_coverage\['X'\] key: expected a decimal number, got 'zero'"),
    "hits-string": (_set(["passes", 0, "records", "0.weight", "hits"], "3"), r"passes\[0\]\.records\['0\.weight'\]\.hits: expected an integer from 0 to \d+, got '3'"),
    "count-bool": (_set(["passes", 0, "runs"], True), r"passes\[0\]\.runs: expected an integer"),
    "negative-count": (_set(["tensors", 0, "calls"], -1), r"tensors\[0\]\.calls: expected an integer from 0"),
    "huge-count": (_set(["cuts", 0, "count"], 10 ** 4000), r"cuts\[0\]\.count: .* got an integer of 4001 digits"),
    "negative-norm": (_set(["tensors", 0, "grads", "Y", "norm"], -1.0), r"tensors\[0\]\.grads\['Y'\]\.norm: expected a number >= 0, got -1\.0"),
    "name-number": (_set(["scalars", 0, "name"], 5), r"scalars\[0\]\.name: expected a non-empty string"),
    "empty-pass-name": (_set(["passes", 1, "name"], ""), r"passes\[1\]\.name: expected a non-empty string"),
    "duplicate-pass": (_set(["passes", 1, "name"], "X"), r"passes: 'X' appears twice"),
    "record-name-mismatch": (_set(["passes", 0, "records", "0.weight", "name"], "other"), r"passes\[0\]\.records\['0\.weight'\]\.name: 'other' is not the name it is stored under"),
    "cut-index-out-of-range": (_set(["tensors", 0, "cuts"], [7]), r"tensors\[0\]\.cuts: cut 7 is not among"),
    "values-not-object": (_set(["tensors", 0, "values"], [1, 2]), r"tensors\[0\]\.values: expected a ValueStats"),
    "unknown-top-field": (_set(["extra"], 1), r"top level: unknown trace field\(s\): 'extra'"),
    "inner-without-dot": (_set(["inner_products"], [{"a": "X", "b": "Y", "preconditioned": False}]),
                          r"inner_products\[0\]: InnerProduct lacks field\(s\) dot"),
    "meta-too-deep": (_set(["meta", "deep"], [[[[[[[[[[1]]]]]]]]]]), r"meta\['deep'\].*: nested deeper than 8"),
}


@pytest.mark.parametrize("damage, message", list(WRONG_FIELDS.values()), ids=list(WRONG_FIELDS))
def test_load_rejects_wrongly_typed_fields(saved_dict, tmp_path, damage, message):
    """Regression: wrongly typed fields loaded, and report()/verdicts() crashed later with raw TypeErrors."""
    damage(saved_dict)
    with pytest.raises(GradtraceError, match=r"is a damaged gradtrace trace: " + message):
        gradtrace.load(write(tmp_path, saved_dict))


def test_show_of_an_endless_device_stops_at_the_size_limit(monkeypatch, capsys):
    """Regression: `show /dev/zero` read until MemoryError: there was no size limit."""
    monkeypatch.setattr(gradtrace.storage, "MAX_FILE_BYTES", 1 << 20)
    assert cli.main(["show", "/dev/zero"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gradtrace: error: ") and "larger than" in err and err.count("\n") == 1


def test_a_file_over_the_size_limit_is_refused_before_reading(monkeypatch, tmp_path):
    monkeypatch.setattr(gradtrace.storage, "MAX_FILE_BYTES", 10)
    with pytest.raises(GradtraceError, match="larger than .*MAX_FILE_BYTES"):
        gradtrace.load(write(tmp_path, {"format": "gradtrace-trace"}))


def test_non_utf8_file_is_a_gradtrace_error(tmp_path):
    path = tmp_path / "t.json"
    path.write_bytes(b'{"format": "gradtrace-trace\xff"}')
    with pytest.raises(GradtraceError, match="not UTF-8"):
        gradtrace.load(path)


HOSTILE = "\x1b]0;pwned\x07\x1b[2J\x9b31m\u202eevil\u2066\r"


def test_show_escapes_terminal_control_sequences_from_the_file(saved_dict, tmp_path, capsys):
    """Regression: `show` printed names and locations verbatim, so a trace could drive the viewer's terminal."""
    saved_dict["passes"][0]["name"] = "X" + HOSTILE
    saved_dict["tensors"][0]["grads"] = {"X" + HOSTILE: saved_dict["tensors"][0]["grads"]["Y"]}
    saved_dict["cuts"][0]["location"] = "model.py:1" + HOSTILE
    saved_dict["scalars"][0]["name"] = "lone \ud800 surrogate"  # printing it raised UnicodeEncodeError
    assert cli.main(["show", str(write(tmp_path, saved_dict))]) == 0
    out = capsys.readouterr().out
    assert not any(c in out for c in "\x1b\x07\x9b\u202e\u2066\r\ud800")
    assert "\\x1b]0;pwned\\x07\\x1b[2J\\x9b31m\\u202eevil\\u2066\\r" in out and "lone \\ud800 surrogate" in out


def test_a_newline_in_a_name_does_not_forge_a_table_row(saved_dict, tmp_path):
    saved_dict["passes"][0]["name"] = "X\ngradtrace: no problems found."
    report = gradtrace.load(write(tmp_path, saved_dict)).report()
    assert "X\\ngradtrace: no problems found." in report
    assert "\ngradtrace: no problems found." not in report


def test_diff_output_and_error_messages_are_escaped_too(saved_dict, tmp_path, capsys):
    saved_dict["passes"][0]["name"] = "X\x1b[2J"
    path = str(write(tmp_path, saved_dict))
    assert cli.main(["diff", path, "X\x1b[2J", "Y"]) == 0
    assert cli.main(["diff", path, "X", "Y\x1b[2J"]) == 2
    captured = capsys.readouterr()
    assert "\x1b" not in captured.out + captured.err and "X\\x1b[2J" in captured.out


def test_scalar_on_a_loaded_trace_is_read_only(model, tmp_path):
    """Regression: trace.scalar() on a loaded trace recorded into it."""
    with gradtrace.watch(model) as trace:
        pass
    trace.save(tmp_path / "t.json")
    loaded = gradtrace.load(tmp_path / "t.json")
    with pytest.raises(GradtraceError, match="read-only"):
        loaded.scalar("x", 1.0)
    assert loaded.scalars == {}
