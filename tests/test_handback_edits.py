"""Gradients ``autograd.grad`` hands back, edited in place before the pass ends (issue 24 item 3).

An ``autograd.grad`` pass's figures are the gradients handed back. The caller owns
those tensors and may change them in place before the pass closes: scale them
(``torch._foreach_mul_``), or put them in ``.grad`` and let an optimizer step and
``zero_grad(set_to_none=False)`` zero them. The figures must stay what was handed
back (they are taken at the end of the run that handed them back), and where that
is impossible (a later run adds to an edited tensor) they are unknown
(``cleared``), never wrong and never "exactly zero".
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gradtrace


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))


def _loss(model, seed=0):
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(seed))
    return model(x).pow(2).mean()


def _norms(grads):
    return [g.double().norm().item() for g in grads]


@pytest.fixture(params=["auto", "device"])
def statistics(request):
    return request.param


def test_scaling_handed_back_gradients_in_place_keeps_their_figures(statistics):
    model = _model()
    names = [n for n, _ in model.named_parameters()]
    with gradtrace.watch(model, statistics=statistics) as trace:
        with trace.pass_("Y"):
            gs = torch.autograd.grad(_loss(model), list(model.parameters()))
            want = _norms(gs)
            want_max = [g.abs().max().item() for g in gs]
            torch._foreach_mul_(list(gs), 1e-3)  # the caller's own tensors, changed before the pass closes
    records = trace.passes["Y"].records
    for name, norm, top in zip(names, want, want_max, strict=True):
        assert math.isclose(records[name].norm, norm, rel_tol=1e-6), f"{name}: the norm after the caller's edit"
        assert records[name].max_abs == pytest.approx(top, rel=1e-6)
        assert not records[name].cleared


def test_handed_back_gradients_stepped_and_zeroed_in_place_are_not_exactly_zero(statistics):
    """``p.grad = g; opt.step(); opt.zero_grad(set_to_none=False)``: the handed-back tensors end up zero."""
    model = _model()
    names = [n for n, _ in model.named_parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradtrace.watch(model, statistics=statistics) as trace:
        with trace.pass_("Y"):
            params = list(model.parameters())
            gs = torch.autograd.grad(_loss(model), params)
            want = _norms(gs)
            for p, g in zip(params, gs, strict=True):
                p.grad = g
            opt.step()
            opt.zero_grad(set_to_none=False)
        assert all(not g.any() for g in gs)  # really zeroed in place
    pt = trace.passes["Y"]
    assert pt.zero == set()
    for name, norm in zip(names, want, strict=True):
        assert math.isclose(pt.records[name].norm, norm, rel_tol=1e-6), name
    codes = [v.code for v in trace.verdicts()]
    assert "ZERO_GRADS" not in codes and "ZERO_GRADS" not in str(trace.report())
    assert trace.report().splitlines()[0].startswith("gradtrace: no problems found")


def test_an_edit_before_a_later_run_adds_to_it_makes_the_figure_unknown(statistics):
    """Two autograd.grad runs in one pass: the pass's gradient is their sum. The first was scaled in
    place before the second arrived, so the sum of what was handed back is gone: cleared, not wrong."""
    model = _model()
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())
    with gradtrace.watch(model, statistics=statistics) as trace:
        with trace.pass_("Y"):
            first = torch.autograd.grad(_loss(model, 0), params)
            torch._foreach_mul_(list(first), 0.0)
            torch.autograd.grad(_loss(model, 1), params)
    pt = trace.passes["Y"]
    assert pt.cleared == set(names) and pt.zero == set()


def test_edits_after_the_last_run_of_several_leave_the_sum_exact(statistics):
    model = _model()
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())
    with gradtrace.watch(model, statistics=statistics) as trace:
        with trace.pass_("Y"):
            first = torch.autograd.grad(_loss(model, 0), params)
            second = torch.autograd.grad(_loss(model, 1), params)
            want = _norms([a + b for a, b in zip(first, second, strict=True)])
            torch._foreach_mul_(list(first), 0.5)
            torch._foreach_mul_(list(second), 0.5)
    records = trace.passes["Y"].records
    for name, norm in zip(names, want, strict=True):
        assert math.isclose(records[name].norm, norm, rel_tol=1e-6), name
        assert records[name].hits == 2 and not records[name].cleared


def test_a_pass_of_both_kinds_with_an_edited_handback_is_unknown_for_those_parameters(statistics):
    """``.grad`` gain plus an edited handed-back tensor: its part of the sum is gone (cleared)."""
    model = _model()
    names = [n for n, _ in model.named_parameters()]
    with gradtrace.watch(model, statistics=statistics) as trace:
        with trace.pass_("XY"):
            _loss(model, 0).backward()
            gs = torch.autograd.grad(_loss(model, 1), list(model.parameters()))
            gs[0].mul_(2.0)
    pt = trace.passes["XY"]
    assert pt.records[names[0]].via == "both"
    assert pt.cleared == {names[0]}
    assert pt.zero == set()
