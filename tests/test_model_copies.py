"""A copy of a watched model (deepcopy for a reference or EMA model, torch.save, pickle) made inside the
watch carries none of gradtrace's hooks' work: nothing is recorded from it, it keeps no trace alive, and
pickling does not fail on gradtrace's local functions.
"""
import copy
import gc
import io
import pickle
import warnings
import weakref

import pytest
import torch
from torch import nn

import gradtrace


class Detach(nn.Module):
    def forward(self, x):
        return x.detach()


class Detached(nn.Module):
    """A real cut: module ``cut`` detaches what ``a`` made, so ``a`` gets no gradient."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.cut = Detach()
        self.b = nn.Linear(4, 1)

    def forward(self, x):
        return self.b(self.cut(self.a(x)))


def hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("cuts", ["modules", "ops"])
def test_a_deepcopy_made_inside_the_watch_records_nothing_and_keeps_nothing(cuts):
    torch.manual_seed(0)
    model = Detached()
    x = torch.randn(3, 4)
    with gradtrace.watch(model, cuts=cuts) as trace:
        reference = copy.deepcopy(model)  # e.g. a KL reference or an EMA model
        with trace.pass_("X"):
            with torch.no_grad():
                reference(x)  # the copy's no_grad forward is no cut of the watched model
            model(x).sum().backward()
    graph_cuts = [v for v in trace.verdicts() if v.code == "GRAPH_CUT"]
    # the real cause (module-level, and op-level with cuts="ops"), never the copy's no_grad forward
    assert graph_cuts and {(v.evidence["kind"], v.evidence["module"]) for v in graph_cuts} == {("detach", "cut")}
    assert {(c.kind, c.module) for c in trace.cuts} == {("detach", "cut")}
    recorded = list(trace.cuts)
    with torch.no_grad():
        out = reference(x)  # after the watch: the stand-ins take themselves out
    assert trace.cuts == recorded and hook_count(reference) == 0 and hook_count(model) == 0
    assert torch.equal(out, model(x))
    gone = weakref.ref(trace)
    del trace, graph_cuts
    gc.collect()
    assert gone() is None  # the copy does not keep the closed trace alive


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
@pytest.mark.parametrize("cuts", ["modules", "ops"])
def test_saving_or_pickling_the_model_inside_the_watch_works(how, cuts):
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    x = torch.randn(2, 4)
    with gradtrace.watch(model, cuts=cuts) as trace:
        with trace.pass_("X"):
            model(x).sum().backward()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # not even "backward hook ... will not be serialized"
            if how == "pickle":
                copy_ = pickle.loads(pickle.dumps(model))
            else:
                buffer = io.BytesIO()
                torch.save(model, buffer)
                buffer.seek(0)
                copy_ = torch.load(buffer, weights_only=False)
        with trace.pass_("Y"):
            copy_(x).sum().backward()  # the copy's own backward: its parameters are not watched
    assert trace.passes["X"].covered == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert "Y" not in trace.passes or trace.passes["Y"].covered == set()
    assert trace.cuts == []
    assert hook_count(copy_) == 0 and not any(p._backward_hooks for p in copy_.parameters())
    assert torch.equal(copy_(x), model(x))


def test_the_watched_model_itself_still_records_after_a_copy():
    model = Detached()
    with gradtrace.watch(model) as trace:
        copy.deepcopy(model)
        pickle.dumps(model)
        with trace.pass_("X"):
            model(torch.randn(2, 4)).sum().backward()
    assert trace.passes["X"].covered == {"b.weight", "b.bias"}
    assert [c.kind for c in trace.cuts] == ["detach"]
