"""After ``watch`` exits, every parameter, tensor and module is as it was before.

Not only "no hook left": torch's speed depends on the containers too. A tensor
whose ``_backward_hooks`` went from None to an empty dict takes the engine's
Python path on every later backward, so an emptied container that was None
must be None again, while a hook the user registered (before, during or after
the watch) keeps working, in order.
"""
from __future__ import annotations

import contextlib
import weakref

import pytest
import torch
from torch import nn
import torch.nn.modules.module as module_globals

import gradtrace
from gradtrace.capture import hook_state
from zoo import ZOO, trainable

CUTS = ["modules", "ops", "off"]
_MODULE_HOOK_DICTS = sorted({
    "_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
    "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks",
    "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
})
_GLOBAL_HOOK_DICTS = [a for a in dir(module_globals) if a.startswith("_global_") and "hook" in a]


class Boom(Exception):
    pass


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Sequential(nn.Linear(4, 4), nn.ReLU()), nn.Linear(4, 1))


def _containers(model: nn.Module):
    """Each hook container as (object, its items in order): None stays None, a dict is compared by content and order."""
    state = {}
    for n, p in model.named_parameters():
        for attr in ("_backward_hooks", "_post_accumulate_grad_hooks"):
            value = getattr(p, attr)
            state["param", n, attr] = None if value is None else (id(value), list(value.items()))
    for n, m in model.named_modules():
        for attr in _MODULE_HOOK_DICTS:
            value = getattr(m, attr)
            state["module", n, attr] = (id(value), list(value.items()))
    for attr in _GLOBAL_HOOK_DICTS:
        value = getattr(module_globals, attr)
        state["global", attr] = list(value.items()) if isinstance(value, dict) else value
    return state


def _assert_same(before, after):
    changed = sorted(str(k) for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"left behind: {changed}"


def _step(model: nn.Module, trace=None, seed: int = 0) -> torch.Tensor:
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(seed), requires_grad=True)
    h = model[0](x)
    if trace is not None:
        trace.tensor("x", x)
        trace.tensor("h", h)
    out = model[3](model[2](model[1](h))).sum()
    out.backward()
    return h


@pytest.mark.parametrize("cuts", CUTS)
@pytest.mark.parametrize("exit_by", ["return", "exception"])
def test_containers_as_before(cuts, exit_by):
    model = _model()
    before = _containers(model)
    assert all(v is None for k, v in before.items() if k[0] == "param")
    with pytest.raises(Boom) if exit_by == "exception" else contextlib.nullcontext():
        with gradtrace.watch(model, cuts=cuts) as trace:
            h = _step(model, trace)
            with trace.pass_("X"):
                _step(model, trace, seed=1)
            if exit_by == "exception":
                raise Boom()
    _assert_same(before, _containers(model))
    assert h._backward_hooks is None, "registered non-leaf tensor kept an empty hook dict"


def test_exception_inside_backward_leaves_nothing():
    model = _model()
    before = _containers(model)

    def explode(grad):
        raise Boom()

    with pytest.raises(Boom):
        with gradtrace.watch(model) as trace:
            with trace.pass_("X"):
                loss = model(torch.randn(2, 3)).sum()
                loss.register_hook(explode)
                loss.backward()
    _assert_same(before, _containers(model))


@pytest.mark.parametrize("case", ZOO, ids=[c.name for c in ZOO])
def test_every_zoo_parameter_back_to_none(case):
    model, make_inputs, loss_fn = case.build()
    with gradtrace.watch(model, cuts="ops") as trace:
        with trace.pass_("X"):
            loss_fn(model, make_inputs(0)).backward()
        params = [p for _, p in trainable(model)]
        torch.autograd.grad(loss_fn(model, make_inputs(1)), params, allow_unused=True)
    for n, p in model.named_parameters():
        assert p._backward_hooks is None, n
        assert p._post_accumulate_grad_hooks is None, n


def test_parameters_given_as_pairs():
    model = _model()
    before = _containers(model)
    with gradtrace.watch(list(model.named_parameters())):
        _step(model)
    _assert_same(before, _containers(model))


def test_registered_leaf_tensor_back_to_none():
    x = torch.randn(3, requires_grad=True)
    model = _model()
    with gradtrace.watch(model) as trace:
        trace.tensor("x", x)
        model(x.expand(2, 3)).sum().backward()
    assert trace.tensors["x"].grads, "the tensor hook fired"
    assert x._backward_hooks is None
    assert x._post_accumulate_grad_hooks is None


def test_dict_that_existed_before_is_kept_as_it_was():
    """A container the user emptied before the watch was a dict, not None: it stays that very dict."""
    model = _model()
    p = model[0].weight
    p.register_hook(lambda g: None).remove()
    p.register_post_accumulate_grad_hook(lambda t: None).remove()
    before = _containers(model)
    with gradtrace.watch(model):
        _step(model)
    _assert_same(before, _containers(model))


@pytest.mark.parametrize("cuts", CUTS)
@pytest.mark.parametrize("exit_by", ["return", "exception"])
def test_user_hooks_before_during_after_fire_in_order(cuts, exit_by):
    model = _model()
    fired = []
    p = model[2][0].weight
    module = model[2]

    def user(tag):
        p.register_hook(lambda g: fired.append(("grad", tag)))
        p.register_post_accumulate_grad_hook(lambda t: fired.append(("post", tag)))
        module.register_forward_hook(lambda m, a, o: fired.append(("fwd", tag)))
        module.register_forward_pre_hook(lambda m, a: fired.append(("pre", tag)))
        module.register_forward_hook(lambda m, a, k, o: fired.append(("fwd_kw", tag)), with_kwargs=True)
        module.register_forward_hook(lambda m, a, o: fired.append(("fwd_always", tag)), always_call=True)

    # on a parameter whose containers were None until the watch: the user's own
    # hook, registered during the watch, must survive the reset
    q = model[3].weight
    user("before")
    with pytest.raises(Boom) if exit_by == "exception" else contextlib.nullcontext():
        with gradtrace.watch(model, cuts=cuts):
            user("during")
            q.register_hook(lambda g: fired.append(("q_grad", "during")))
            q.register_post_accumulate_grad_hook(lambda t: fired.append(("q_post", "during")))
            if exit_by == "exception":
                raise Boom()
    user("after")
    fired.clear()
    _step(model)
    tags = ("before", "during", "after")
    for kind in ("pre", "fwd", "fwd_kw", "fwd_always", "grad", "post"):
        assert [t for k, t in fired if k == kind] == list(tags), kind
    assert ("q_grad", "during") in fired and ("q_post", "during") in fired


def test_hook_registered_on_a_registered_tensor_during_watch_survives():
    model = _model()
    fired = []
    x = torch.randn(2, 3, requires_grad=True)
    with gradtrace.watch(model) as trace:
        trace.tensor("x", x)
        x.register_hook(lambda g: fired.append("x"))
    model(x).sum().backward()
    assert fired == ["x"]


def test_engine_no_longer_calls_the_emptied_tensor_hook_dict():
    """Through torch's own behaviour: the dict the watch used is no longer attached to the parameter.

    (None-ness alone is not enough: the C++ pre-hook holds the dict, so a hook
    put into it later would still fire, and every backward still calls into Python.)
    """
    model = _model()
    with gradtrace.watch(model):
        used = model[0].weight._backward_hooks
    fired = []
    used[10 ** 9] = lambda g: fired.append("stale")
    _step(model)
    assert fired == []


def test_torch_keeps_a_removed_post_accumulate_hook_alive():
    """Why plain parameters get no post-accumulate hook: once registered, torch 2.13 cannot drop it.

    Assigning None clears the attribute but not the C++ hook, which keeps
    calling into Python (its old dict) on every backward. When this fails,
    torch has fixed it and the hook may go back on every parameter.
    """
    p = torch.zeros(2, requires_grad=True)
    p.register_post_accumulate_grad_hook(lambda t: None).remove()
    used = p._post_accumulate_grad_hooks
    p._post_accumulate_grad_hooks = None
    fired = []
    used[10 ** 9] = lambda t: fired.append("stale")
    (p * 2).sum().backward()
    assert fired == ["stale"]


def test_plain_parameters_get_no_post_accumulate_hook():
    model = _model()
    with gradtrace.watch(model) as trace:
        assert all(p._post_accumulate_grad_hooks is None for p in model.parameters())
        with trace.pass_("X"):
            _step(model)
    assert trace.passes["X"].covered == {n for n, _ in model.named_parameters()}


class _Sub(torch.Tensor):
    """A tensor-subclass parameter, standing in for FSDP2's DTensor (whose tensor hooks never fire)."""


def test_subclass_parameter_keeps_its_post_accumulate_hook_and_leaves_none():
    model = _model()
    model[0].weight = nn.Parameter(model[0].weight.detach().as_subclass(_Sub))
    p = model[0].weight
    with gradtrace.watch(model) as trace:
        assert p._post_accumulate_grad_hooks, "the subclass parameter was not given its post-accumulate hook"
        with trace.pass_("X"):
            _step(model)
    assert "0.weight" in trace.passes["X"].covered
    assert p._post_accumulate_grad_hooks is None and p._backward_hooks is None


def test_two_watches_in_a_row_leave_nothing():
    model = _model()
    before = _containers(model)
    for _ in range(2):
        with gradtrace.watch(model) as trace:
            _step(model, trace)
        _assert_same(before, _containers(model))


def test_restore_keeps_no_tensor_alive():
    """A tensor registered in every step of a long watch is not kept alive until exit."""
    state = hook_state.HookSnapshot()
    t = torch.randn(2, requires_grad=True) * 2
    ref = weakref.ref(t)
    state.note(t)
    del t
    assert ref() is None
    hook_state.restore(state)  # nothing left to restore, and no error


def test_watch_gives_the_garbage_collector_back_as_it_found_it():
    """Hooks go on and come off with collection paused (it was most of what entering cost):
    collection is on again afterwards, and stays off where the user had turned it off."""
    import gc

    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    assert gc.isenabled()
    with gradtrace.watch(model):
        assert gc.isenabled()  # paused only while registering, never inside the block
    assert gc.isenabled()
    gc.disable()
    try:
        with gradtrace.watch(model):
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
    with pytest.raises(gradtrace.GradtraceError):
        with gradtrace.watch(model, cuts="nope"):
            pass
    assert gc.isenabled()


def test_hooks_put_straight_into_containers_take_ids_a_handle_never_reuses():
    """gradtrace's hooks skip RemovableHandle but draw from its counter: a user's handle removed
    during the watch removes only the user's hook, and ours come off at exit."""
    model = nn.Linear(2, 1)
    seen = []
    with gradtrace.watch(model) as trace:
        handle = model.weight.register_hook(lambda g: seen.append(1))
        module_handle = model.register_forward_hook(lambda m, a, o: seen.append(2))
        ours = set(model.weight._backward_hooks) - {handle.id}
        ours_forward = set(model._forward_hooks) - {module_handle.id}
        assert len(ours) == 1 and handle.id not in ours and module_handle.id not in ours_forward
        handle.remove()
        module_handle.remove()
        # gradtrace sees module calls through an instance ``forward`` wrapper (capture/module_calls.py),
        # which the user's hook handle cannot take off
        assert set(model.weight._backward_hooks) == ours and set(model._forward_hooks) == ours_forward
        assert "forward" in vars(model)
        with trace.pass_("X"):
            model(torch.ones(1, 2)).sum().backward()
    assert seen == [] and trace.passes["X"].covered == {"weight", "bias"}
    assert model.weight._backward_hooks is None and not model._forward_hooks and "forward" not in vars(model)
    assert not model._forward_hooks_with_kwargs
