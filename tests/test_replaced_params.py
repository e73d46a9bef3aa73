"""Parameters replaced while watched are named, never reported as unused or uncovered (issue 24 item 7).

gradtrace's hooks live on the tensors ``watch`` found. ``m[0].weight = nn.Parameter(...)``
puts another object in the module; ``.double()`` under swap-on-conversion swaps the
tensor inside the same object (``torch.utils.swap_tensors``). Either way the hooks
see nothing more, which gave false UNUSED_PARAMS, COVERAGE_GAP, NO_COVERAGE and NO_PASSES.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

import gradtrace


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))


def _step(model, trace, name, dtype=torch.float32):
    with trace.pass_(name):
        model(torch.ones(2, 3, dtype=dtype)).sum().backward()
    model.zero_grad(set_to_none=True)


@contextlib.contextmanager
def swap_on_conversion():
    before = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        yield
    finally:
        torch.__future__.set_swap_module_params_on_conversion(before)


def _codes(trace):
    return [(v.code, v.severity) for v in trace.verdicts()]


def test_a_parameter_replaced_by_a_new_object_is_named_not_unused():
    model = _model()
    with gradtrace.watch(model) as trace:
        _step(model, trace, "step-1")
        model[0].weight = nn.Parameter(torch.randn(4, 3))
        _step(model, trace, "step-2")
        _step(model, trace, "step-3")
        live = _codes(trace)  # judged while the watch is still open, too
    assert trace.meta["replaced_params"] == {"0.weight": "replaced"}
    for found in (live, _codes(trace)):
        assert found[0] == ("PARAMS_REPLACED", "warning")
        assert not any(code in ("UNUSED_PARAMS", "COVERAGE_GAP", "NO_COVERAGE") for code, _ in found), found
        assert not any(severity == "error" for _, severity in found)
    verdict = trace.verdicts()[0]
    assert verdict.evidence["parameters"] == ["0.weight"] and "new Parameter" in verdict.message
    assert trace.passes["step-2"].covered == {"0.bias", "2.weight", "2.bias"}  # the old one is not reached
    assert trace.report().splitlines()[0].startswith("gradtrace diagnosis: PARAMS_REPLACED")


def test_parameters_swapped_by_double_under_swap_on_conversion_are_named_not_missing():
    model = _model()
    with swap_on_conversion():
        with gradtrace.watch(model) as trace:
            model.double()
            model(torch.ones(2, 3, dtype=torch.float64)).sum().backward()
    assert trace.meta["replaced_params"] == dict.fromkeys(["0.weight", "0.bias", "2.weight", "2.bias"], "swapped")
    found = _codes(trace)
    assert found == [("PARAMS_REPLACED", "warning")], found  # not NO_PASSES: no backward reached the old tensors
    assert "swap_tensors" in trace.verdicts()[0].message


def test_swapped_after_some_passes_no_false_coverage_finding():
    model = _model()
    with swap_on_conversion():
        with gradtrace.watch(model) as trace:
            _step(model, trace, "step-1")
            model.double()
            _step(model, trace, "step-2", torch.float64)
    assert "NO_COVERAGE" not in [code for code, _ in _codes(trace)]
    assert _codes(trace)[0] == ("PARAMS_REPLACED", "warning")


def test_replacement_survives_save_and_load(tmp_path):
    model = _model()
    with gradtrace.watch(model) as trace:
        _step(model, trace, "step-1")
        model[2].bias = nn.Parameter(torch.zeros(1))
        _step(model, trace, "step-2")
    trace.save(tmp_path / "t.json")
    loaded = gradtrace.load(tmp_path / "t.json")
    assert loaded.meta["replaced_params"] == {"2.bias": "replaced"}
    assert [v.code for v in loaded.verdicts()] == [v.code for v in trace.verdicts()]


@pytest.mark.parametrize("convert", ["double", "data"])
def test_conversions_that_keep_the_tensor_are_not_replacements(convert):
    """``.double()`` without swapping assigns ``.data``: the same tensor, hooks intact, coverage goes on."""
    model = _model()
    with gradtrace.watch(model) as trace:
        _step(model, trace, "step-1")
        if convert == "double":
            model.double()
        else:
            model[0].weight.data = model[0].weight.data.clone()
        _step(model, trace, "step-2", torch.float64 if convert == "double" else torch.float32)
    assert "replaced_params" not in trace.meta
    assert trace.passes["step-2"].covered == set(trace.params)
    assert trace.report().splitlines()[0].startswith("gradtrace: no problems found")


def test_a_file_with_a_bad_replacement_is_refused(tmp_path):
    import json

    model = _model()
    with gradtrace.watch(model) as trace:
        _step(model, trace, "step-1")
    path = tmp_path / "t.json"
    trace.save(path)
    data = json.loads(path.read_text())
    data["meta"]["replaced_params"] = {"0.weight": "\x1b[31mstolen"}
    path.write_text(json.dumps(data))
    with pytest.raises(gradtrace.GradtraceError, match="replaced_params"):
        gradtrace.load(path)
