"""How the cut detector sees module calls (issue 23 items 3 and 4, ``capture/module_calls.py``).

An instance ``forward`` wrapper instead of a forward hook (``Module.__call__`` keeps its
fast path), and ``no_grad`` regions (a module entered with grad disabled is judged, its
descendants only call through). Neither may change what a model computes, nor lose a
cut: the scenario suite is run both ways and must say the same thing.
"""
from __future__ import annotations

import copy
import inspect
import threading

import pytest
import torch
from torch import nn

import gradtrace
from gradtrace.capture import cuts as cuts_py
from gradtrace.capture import module_calls
from scenarios import SCENARIOS, first_line


class Tower(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.block = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.block(self.embed(x)))


def _tower():
    torch.manual_seed(0)
    return Tower()


def _count_judged(monkeypatch):
    """Calls of the no_grad judgment, by module path."""
    judged = []
    original = cuts_py.ModuleSite.after_no_grad

    def counting(site, args, kwargs, output):
        judged.append(site.name)
        return original(site, args, kwargs, output)

    monkeypatch.setattr(cuts_py.ModuleSite, "after_no_grad", counting)
    return judged


def test_module_calls_take_the_fast_path_and_everything_comes_off():
    model = _tower()
    with gradtrace.watch(model):
        for m in model.modules():
            assert not m._forward_hooks and not m._forward_pre_hooks  # Module.__call__'s fast path
            assert "forward" in vars(m)
    assert all("forward" not in vars(m) and not m._forward_hooks for m in model.modules())


def test_a_copy_made_while_watched_computes_with_its_own_weights():
    """copy.deepcopy of a watched model: its wrappers call the copy's modules, not the original's."""
    model = _tower()
    x = torch.randn(3, 4)
    with gradtrace.watch(model):
        twin = copy.deepcopy(model)
        with torch.no_grad():
            for p in twin.parameters():
                p.mul_(2.0)
        plain = copy.deepcopy(_tower())
        with torch.no_grad():
            for p in plain.parameters():
                p.mul_(2.0)
        assert torch.equal(twin(x), plain(x)) and not torch.equal(twin(x), model(x))
        twin(x).sum().backward()
        assert all(p.grad is not None for p in twin.parameters())
        assert all(p.grad is None for p in model.parameters())


def test_forward_signatures_are_the_modules_own():
    """transformers and TRL inspect forward signatures (to drop unused dataset columns, to build kwargs)."""
    model = _tower()
    before = {n: inspect.signature(m.forward) for n, m in model.named_modules()}
    with gradtrace.watch(model):
        assert {n: inspect.signature(m.forward) for n, m in model.named_modules()} == before


def test_an_instance_forward_is_wrapped_and_given_back_and_a_replacement_made_during_the_watch_stays():
    model = _tower()
    calls = []
    own = model.head.forward

    def logged(x):
        calls.append("head")
        return own(x)

    model.head.forward = logged
    with gradtrace.watch(model) as trace:
        model(torch.randn(2, 4)).sum().backward()
        replacement = model.embed.forward  # the user wraps the (watched) forward of embed
        model.embed.forward = lambda x: replacement(x)
    assert calls == ["head"] and model.head.forward is logged
    assert trace.passes["backward-1"].covered == {n for n, _ in model.named_parameters()}
    # embed keeps the user's replacement; the wrapper inside it records nothing after the watch
    cuts_before = len(trace.cuts)
    with torch.no_grad():
        model(torch.randn(2, 4))
    assert len(trace.cuts) == cuts_before and "forward" in vars(model.embed)


def test_a_forward_hook_registered_before_the_watch_is_seen_after_it():
    """Such a module is watched through a forward hook, after the user's: a hook that detaches the
    module's output is a detach cut (a wrapper would see the output before the user's hook)."""
    model = _tower()
    handle = model.block.register_forward_hook(lambda m, a, out: out.detach())
    try:
        with gradtrace.watch(model) as trace:
            assert "forward" not in vars(model.block) and len(model.block._forward_hooks) == 2
            model(torch.randn(2, 4)).sum().backward()
    finally:
        handle.remove()
    assert [(c.kind, c.module) for c in trace.cuts] == [("detach", "block")]


def test_a_model_holding_data_parallel_is_watched_through_hooks():
    """DataParallel's replicas share their originals' __dict__: a forward wrapper would run the original."""
    model = nn.DataParallel(_tower())
    with gradtrace.watch(model) as trace:
        assert all("forward" not in vars(m) for m in model.modules())
        model(torch.randn(2, 4)).sum().backward()
    assert trace.passes["backward-1"].covered == {n for n, _ in model.named_parameters()}


def test_a_no_grad_region_is_judged_once_at_its_root(monkeypatch):
    judged = _count_judged(monkeypatch)
    model = _tower()
    with gradtrace.watch(model) as trace:
        with torch.no_grad():
            for _ in range(3):
                model(torch.randn(2, 4))
            model.block(torch.randn(2, 8))
    assert judged == ["", "", "", "block"]
    assert [(c.kind, c.module, c.count) for c in trace.cuts] == [("no_grad", "", 3), ("no_grad", "block", 1)]


def test_grad_enabled_again_inside_a_region_is_judged_as_always():
    class Detach(nn.Module):
        def forward(self, x):
            return x.detach()

    class Inner(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)
            self.cut = Detach()

        def forward(self, h):
            with torch.enable_grad():
                return self.cut(self.lin(h))  # a detach cut, with grad on, inside a no_grad region

    model = _tower()
    model.block = Inner()
    with gradtrace.watch(model) as trace:
        with torch.no_grad():
            model(torch.randn(2, 4))
    assert {(c.kind, c.module) for c in trace.cuts} == {("no_grad", ""), ("detach", "block.cut")}
    assert "block.lin" in trace._recording.cut_log.ran_with_grad  # stamped: it ran with grad


def test_a_region_whose_forward_raised_is_closed():
    class Boom(nn.Module):
        def forward(self, x):
            raise ValueError("boom")

    model = _tower()
    model.block = Boom()
    with gradtrace.watch(model) as trace:
        with torch.no_grad():
            with pytest.raises(ValueError):
                model(torch.randn(2, 4))
            model.embed(torch.randn(2, 4))  # judged: the region is over
    assert [(c.kind, c.module) for c in trace.cuts] == [("no_grad", "embed")]


def test_recursion_inside_a_region():
    class Recursive(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x, depth=3):
            return self.lin(x) if depth == 0 else self(self.lin(x), depth - 1)

    model = Recursive()
    with gradtrace.watch(model) as trace:
        with torch.no_grad():
            out = model(torch.randn(2, 4))
        model(torch.randn(2, 4)).sum().backward()
    assert out.shape == (2, 4)
    assert [(c.kind, c.module, c.count) for c in trace.cuts] == [("no_grad", "", 1)]
    assert trace.passes["backward-1"].covered == {"lin.weight", "lin.bias"}


def test_a_second_thread_without_grad_is_judged_while_a_region_is_open():
    model = _tower()
    inside, release = threading.Event(), threading.Event()

    class Waiting(nn.Module):
        def forward(self, x):
            inside.set()
            release.wait(timeout=30)
            return x

    model.block = nn.Sequential(Waiting(), nn.Linear(8, 8))
    seen = []
    with gradtrace.watch(model) as trace:
        def region():
            with torch.no_grad():
                model(torch.randn(2, 4))

        worker = threading.Thread(target=region)
        worker.start()
        assert inside.wait(timeout=30)
        with torch.no_grad():
            seen.append(model.head(torch.randn(2, 8)))  # another thread: not inside that region
        release.set()
        worker.join(timeout=30)
    assert not worker.is_alive()
    assert {(c.kind, c.module) for c in trace.cuts} == {("no_grad", ""), ("no_grad", "head")}


def _cuts_and_verdicts(trace):
    verdicts = [(v.code, v.severity, tuple(sorted((k, str(v.evidence[k])) for k in ("kind", "module", "location")
                                                  if k in v.evidence))) for v in trace.verdicts()]
    return first_line(trace), verdicts


FAST_SCENARIOS = [pytest.param(s, id=s.name, marks=[pytest.mark.slow] if s.slow else []) for s in SCENARIOS]


@pytest.mark.parametrize("s", FAST_SCENARIOS)
@pytest.mark.parametrize("fixed", [False, True], ids=["bug", "fixed"])
def test_every_scenario_says_the_same_with_forward_hooks(s, fixed, monkeypatch):
    """Zero missed cuts: each scenario of the suite, seen through forward wrappers and no_grad regions,
    gives the first line and the verdicts (with each cut's kind, module and line) that forward hooks on
    every module give; every cut the hooks record is recorded too, or lies inside a region recorded
    at its root in the same pass."""
    with_wrappers = s.run(fixed)
    monkeypatch.setattr(module_calls, "needs_hooks", lambda root, modules: True)
    with_hooks = s.run(fixed)
    assert _cuts_and_verdicts(with_wrappers) == _cuts_and_verdicts(with_hooks)
    mine = {(c.kind, c.module, c.pass_name, c.location) for c in with_wrappers.cuts}
    regions = {(c.module, c.pass_name) for c in with_wrappers.cuts
               if c.kind in ("no_grad", "inference_mode", "checkpoint")}
    for c in with_hooks.cuts:
        if (c.kind, c.module, c.pass_name, c.location) in mine:
            continue
        inside = any(c.pass_name == p and (not root or c.module.startswith(root + ".")) for root, p in regions)
        assert c.kind in ("no_grad", "inference_mode", "checkpoint") and inside, f"missed: {c}"
