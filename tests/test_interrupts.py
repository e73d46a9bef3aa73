"""Any ``BaseException`` (Ctrl-C's ``KeyboardInterrupt``, ``SystemExit``) inside backward or a pass marks
the pass failed and propagates unchanged (issue 24 item 8: ``failed`` stayed None, the run looked complete).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import gradtrace


class Interrupted(BaseException):
    """Not an ``Exception``, like ``KeyboardInterrupt``."""


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))


def _interrupting_hook(grad):
    raise KeyboardInterrupt


@pytest.mark.parametrize("error", [KeyboardInterrupt, SystemExit, Interrupted])
def test_a_pass_interrupted_inside_its_block_is_failed(error):
    model = _model()
    with gradtrace.watch(model) as trace:
        with pytest.raises(error) as raised:
            with trace.pass_("X"):
                model(torch.ones(2, 3)).sum().backward()
                raise error()
        assert type(raised.value) is error  # unchanged
    assert trace.passes["X"].failed == error.__name__
    assert trace.verdicts()[0].code == "PASS_FAILED"


def test_a_backward_interrupted_inside_a_pass_keeps_what_it_wrote():
    model = _model()
    with gradtrace.watch(model) as trace:
        handle = model[0].weight.register_hook(_interrupting_hook)  # the last layer backward reaches
        with pytest.raises(KeyboardInterrupt):
            with trace.pass_("X"):
                model(torch.ones(2, 3)).sum().backward()
        handle.remove()
    pt = trace.passes["X"]
    assert pt.failed == "KeyboardInterrupt"
    # .grad written before the interrupt is read; the interrupted parameter's figure is unknown, not zero
    assert pt.records["1.weight"].norm == pytest.approx(model[1].weight.grad.norm().item())
    assert pt.cleared == {"0.weight"} and pt.zero == set()
    assert [v.code for v in trace.verdicts()][0] == "PASS_FAILED"


def test_an_unlabelled_backward_interrupted_out_of_the_watch_is_failed():
    model = _model()
    with pytest.raises(KeyboardInterrupt):
        with gradtrace.watch(model) as trace:
            model[0].weight.register_hook(_interrupting_hook)
            model(torch.ones(2, 3)).sum().backward()
    (pt,) = trace.passes.values()
    assert pt.failed == "KeyboardInterrupt" and trace.meta["error"] == "KeyboardInterrupt"
    assert trace.verdicts()[0].code == "PASS_FAILED"


def test_an_unlabelled_backward_interrupted_and_caught_is_failed_at_exit():
    """The engine closes every run that finishes: one still open when watch exits was cut short."""
    model = _model()
    with gradtrace.watch(model) as trace:
        handle = model[0].weight.register_hook(_interrupting_hook)
        try:
            model(torch.ones(2, 3)).sum().backward()
        except KeyboardInterrupt:
            pass
        handle.remove()
        model.zero_grad(set_to_none=True)
        model(torch.ones(2, 3)).sum().backward()  # training goes on
    failed = {name: p.failed for name, p in trace.passes.items()}
    assert sorted(failed.values(), key=str) == [None, failed["backward-1"]]
    assert "cut short" in failed["backward-1"]
