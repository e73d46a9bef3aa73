"""Gradients between two optimizer steps: cleared inside an accumulation loop (ACCUMULATION_RESET), or added up
on purpose over labelled passes and applied by one step (no STALE_GRADS).

Oracle for the reset: what the optimizer applied equals the last microbatch's gradient alone, recomputed with
``torch.autograd.grad``.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradtrace


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def data(n):
    torch.manual_seed(1)
    return [(torch.randn(6, 8), torch.randint(0, 4, (6,))) for _ in range(n)]


def codes(trace, severities=("error", "warning")):
    return [v.code for v in trace.verdicts() if v.severity in severities]


@pytest.mark.parametrize("set_to_none", [True, False], ids=["set_to_none", "zeroed"])
def test_zero_grad_before_every_microbatch_is_named(set_to_none):
    model, batches, accumulation = net(), data(8), 4
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    applied = []
    with gradtrace.watch(model) as trace:
        for i, (x, y) in enumerate(batches):
            opt.zero_grad(set_to_none=set_to_none)
            (F.cross_entropy(model(x), y) / accumulation).backward()
            if (i + 1) % accumulation == 0:
                applied.append([p.grad.clone() for p in model.parameters()])
                twin = copy.deepcopy(model)  # unwatched: the oracle is no pass of the trace
                last = torch.autograd.grad(F.cross_entropy(twin(x), y) / accumulation, list(twin.parameters()))
                # only the last microbatch's
                assert all(torch.equal(a, b) for a, b in zip(applied[-1], last, strict=True))
                opt.step()
    assert [p.grads_reset for p in trace.passes.values()] == [None, 1, 1, 1] * 2
    first = trace.verdicts()[0]
    assert first.code == "ACCUMULATION_RESET" and first.severity == "warning"
    assert first.evidence["discarded"] == ["backward-1", "backward-2", "backward-3"]
    assert "in 2 of 2 optimizer steps" in first.message and "zero_grad() once per optimizer step" in first.message


def test_accumulation_with_zero_grad_after_the_step_is_clean():
    model, batches = net(), data(8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradtrace.watch(model) as trace:
        for i, (x, y) in enumerate(batches):
            (F.cross_entropy(model(x), y) / 4).backward()
            if (i + 1) % 4 == 0:
                opt.step()
                opt.zero_grad()
    assert all(not p.grads_reset for p in trace.passes.values()) and codes(trace) == []


def test_a_grad_norm_probe_that_recomputes_the_step_loss_is_clean():
    model, batches = net(), data(3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradtrace.watch(model) as trace:
        for x, y in batches:
            loss = F.cross_entropy(model(x), y)
            loss.backward(retain_graph=True)
            torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
            opt.zero_grad()
            loss.backward()
            opt.step()
            opt.zero_grad()
    assert [p.grads_reset for p in trace.passes.values()] == [None, 1] * 3  # seen, and judged deliberate
    assert codes(trace) == []


def test_one_step_with_a_reset_is_not_a_habit():
    model, batches = net(), data(2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradtrace.watch(model) as trace:
        for x, y in batches:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
        opt.step()
    assert "ACCUMULATION_RESET" not in codes(trace)


def test_labelled_probe_and_train_passes_are_deliberate():
    model, batches = net(), data(4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradtrace.watch(model) as trace:
        for step in range(2):
            (x, y), (x2, y2) = batches[2 * step], batches[2 * step + 1]
            with trace.pass_(f"probe-{step}"):
                F.cross_entropy(model(x), y).backward()
            opt.zero_grad()
            with trace.pass_(f"train-{step}"):
                F.cross_entropy(model(x2), y2).backward()
            opt.step()
            opt.zero_grad()
    assert "ACCUMULATION_RESET" not in codes(trace)


def test_numbered_microbatch_passes_cleared_in_between_are_named():
    model, batches = net(), data(4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradtrace.watch(model) as trace:
        for step in range(2):
            for k in range(2):
                opt.zero_grad()
                with trace.pass_(f"micro{2 * step + k}"):
                    x, y = batches[2 * step + k]
                    F.cross_entropy(model(x), y).backward()
            opt.step()
    first = trace.verdicts()[0]
    assert first.code == "ACCUMULATION_RESET" and first.evidence["discarded"] == ["micro0"]


def two_loss_terms(step_after=True, zero_between=False):
    """A generator's two loss terms in two labelled passes, then one optimizer step."""
    model, batches = net(), data(3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradtrace.watch(model) as trace:
        for step, (x, y) in enumerate(batches):
            opt.zero_grad()
            out = model(x)
            with trace.pass_(f"g_adv-{step}"):
                F.cross_entropy(out, y).backward(retain_graph=True)
            if zero_between:
                opt.zero_grad()
            with trace.pass_(f"g_lat-{step}"):
                out.pow(2).mean().backward()
            if step_after:
                opt.step()
    return trace


def test_loss_terms_accumulated_over_labelled_passes_and_stepped_are_not_stale():
    trace = two_loss_terms()
    assert all(p.stale for name, p in trace.passes.items() if name.startswith("g_lat"))  # the fact is kept
    assert codes(trace) == []


def test_the_same_passes_with_no_step_after_them_are_stale():
    """Issue 19 item 7: nothing applied the mixed gradients (a probe reads .grad): the warning stays."""
    trace = two_loss_terms(step_after=False)
    stale = [v for v in trace.verdicts() if v.code == "STALE_GRADS"]
    assert [v.evidence["pass"] for v in stale] == ["g_lat-0", "g_lat-1", "g_lat-2"]
    assert all(v.severity == "warning" for v in stale)


def test_a_pass_on_stale_gradients_cleared_before_the_step_is_still_stale():
    """The probe forgot zero_grad() before its pass, then training cleared and stepped: the step never applied
    the mixed gradients, so the probe's reading of .grad was the point -- still a warning."""
    model, batches = net(), data(2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradtrace.watch(model) as trace:
        (x, y), (x2, y2) = batches
        F.cross_entropy(model(x), y).backward()  # a warm-up left .grad filled
        with trace.pass_("X"):
            F.cross_entropy(model(x2), y2).backward()
        opt.zero_grad()
        with trace.pass_("train"):
            F.cross_entropy(model(x), y).backward()
        opt.step()
    assert [v.evidence["pass"] for v in trace.verdicts() if v.code == "STALE_GRADS"] == ["X"]
