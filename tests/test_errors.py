"""Bad input gets a GradtraceError that says what to do, and nothing stays registered."""
import json

import pytest
import torch
from torch import nn

import gradtrace
from gradtrace import GradtraceError


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
