"""gradtrace observes; it never changes a gradient, never leaves a hook behind,
and never synchronises the host inside backward."""
from __future__ import annotations

import contextlib
import copy
from collections import Counter

import pytest
import torch
from torch import nn
import torch.nn.modules.module as module_globals

import gradtrace
from zoo import assert_pass_matches, oracle_backward, oracle_grad, trainable

OPTIONS = [
    pytest.param({}, id="default"),
    pytest.param({"keep_grads": True}, id="keep_grads"),
    pytest.param({"cuts": "ops"}, id="cuts_ops"),
    pytest.param({"cuts": "ops", "keep_grads": True}, id="cuts_ops_keep_grads"),
    pytest.param({"cuts": "off"}, id="cuts_off"),
]


def _train_step(model, make_inputs, loss_fn, trace=None):
    """Two X microbatches (.backward) then two Y calls (autograd.grad); returns every gradient."""
    params = [p for _, p in trainable(model)]
    labelled = trace.pass_ if trace is not None else (lambda name: contextlib.nullcontext())
    with labelled("X"):
        for seed in (0, 1):
            loss_fn(model, make_inputs(seed)).backward()
    grads_x = [None if p.grad is None else p.grad.clone() for p in params]
    grads_y = []
    with labelled("Y"):
        for seed in (2, 3):
            grads_y.append(
                torch.autograd.grad(loss_fn(model, make_inputs(seed)), params, allow_unused=True)
            )
    return grads_x, grads_y


def _assert_bitwise(a, b):
    assert len(a) == len(b)
    for i, (ga, gb) in enumerate(zip(a, b, strict=True)):
        if ga is None or gb is None:
            assert ga is None and gb is None, f"gradient {i}: {ga is None} vs {gb is None}"
        else:
            assert torch.equal(ga, gb), f"gradient {i} differs"


@pytest.mark.parametrize("options", OPTIONS)
def test_gradients_bitwise_identical_with_and_without_watch(zoo_case, options):
    name, model, make_inputs, loss_fn = zoo_case
    plain = copy.deepcopy(model)
    want_x, want_y = _train_step(plain, make_inputs, loss_fn)
    with gradtrace.watch(model, **options) as trace:
        got_x, got_y = _train_step(model, make_inputs, loss_fn, trace)
    _assert_bitwise(got_x, want_x)
    for a, b in zip(got_y, want_y, strict=True):
        _assert_bitwise(a, b)
    # .grad after watch exit is still what the X pass left, bitwise
    _assert_bitwise([p.grad for _, p in trainable(model)], want_x)


class Tapped(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 5)
        self.b = nn.Linear(5, 3)

    def forward(self, x, tap=lambda name, t: t):
        h = tap("h", torch.tanh(self.a(x)))
        return tap("logits", self.b(h))


@pytest.mark.parametrize("options", OPTIONS)
def test_registered_tensors_do_not_change_gradients(options):
    torch.manual_seed(0)
    model = Tapped()
    plain = copy.deepcopy(model)
    x = torch.randn(4, 5)
    adv = torch.randn(4, 3)

    (plain(x) * adv).sum().backward()
    want_y = torch.autograd.grad((plain(x) * adv).sum(), list(plain.parameters()))

    with gradtrace.watch(model, **options) as trace:
        with trace.pass_("X"):
            (model(x, trace.tensor) * trace.tensor("A", adv)).sum().backward()
        with trace.pass_("Y"):
            got_y = torch.autograd.grad(
                (model(x, trace.tensor) * adv).sum(), list(model.parameters())
            )
    _assert_bitwise([p.grad for p in model.parameters()], [p.grad for p in plain.parameters()])
    _assert_bitwise(got_y, want_y)


# ------------------------------------------------------------------ no hook survives

_MODULE_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)
_GLOBAL_HOOK_DICTS = [a for a in dir(module_globals) if a.startswith("_global_") and "hook" in a]


def _hook_state(model, tensors=()):
    """Every hook registry gradtrace could touch, as plain dict copies."""
    state = {}
    for n, p in model.named_parameters():
        state["param", n, "backward"] = dict(p._backward_hooks or {})
        state["param", n, "post_accumulate"] = dict(
            getattr(p, "_post_accumulate_grad_hooks", None) or {}
        )
    for i, t in enumerate(tensors):
        state["tensor", i, "backward"] = dict(t._backward_hooks or {})
    for n, m in model.named_modules():
        for attr in _MODULE_HOOK_DICTS:
            state["module", n, attr] = dict(getattr(m, attr, None) or {})
    for attr in _GLOBAL_HOOK_DICTS:
        value = getattr(module_globals, attr)
        state["global", attr] = dict(value) if isinstance(value, dict) else value
    state["function_modes"] = len(torch.overrides._get_current_function_mode_stack())
    state["grad_enabled"] = torch.is_grad_enabled()
    return state


def _assert_clean(before, after):
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    assert not changed, f"hooks or modes left behind: {sorted(map(str, changed))}"


def _hooks_empty(model):
    for n, p in model.named_parameters():
        assert not p._backward_hooks, n
        assert not getattr(p, "_post_accumulate_grad_hooks", None), n


class Boom(Exception):
    pass


@pytest.mark.parametrize("options", OPTIONS)
def test_no_hook_survives_watch_exit(zoo_case, options):
    name, model, make_inputs, loss_fn = zoo_case
    before = _hook_state(model)
    with gradtrace.watch(model, **options) as trace:
        assert _hook_state(model) != before, "watch attached nothing"
        _train_step(model, make_inputs, loss_fn, trace)
        out = loss_fn(model, make_inputs(9))
        trace.tensor("loss", out)
    _assert_clean(before, _hook_state(model, ()))
    _hooks_empty(model)
    assert not out._backward_hooks, "registered tensor kept its hook"
    # a graph built inside watch, run after it: nothing is recorded any more
    n_passes = len(trace.passes)
    snapshot = {k: (pt.runs, set(pt.covered)) for k, pt in trace.passes.items()}
    out.backward()
    assert len(trace.passes) == n_passes
    assert {k: (pt.runs, set(pt.covered)) for k, pt in trace.passes.items()} == snapshot


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize(
    "where", ["after_backward", "inside_pass", "at_loss_in_backward", "mid_backward"]
)
def test_no_hook_survives_an_exception(zoo_case, options, where):
    name, model, make_inputs, loss_fn = zoo_case
    before = _hook_state(model)
    # the parameter backward reaches last: raising there leaves a half-done engine run
    last = oracle_backward(copy.deepcopy(model), [make_inputs(1)], loss_fn).order[-1]
    user_handles = []

    def explode(grad):
        raise Boom()

    with pytest.raises(Boom):
        with gradtrace.watch(model, **options) as trace:
            loss_fn(model, make_inputs(0)).backward()
            if where == "after_backward":
                raise Boom()
            with trace.pass_("X"):
                loss = loss_fn(model, make_inputs(1))
                if where == "inside_pass":
                    raise Boom()
                if where == "at_loss_in_backward":
                    loss.register_hook(explode)  # before any parameter is reached
                else:
                    user_handles.append(model.get_parameter(last).register_hook(explode))
                loss.backward()
    for handle in user_handles:
        handle.remove()
    _assert_clean(before, _hook_state(model))
    _hooks_empty(model)

    # the model trains normally afterwards, and a new watch records correctly
    model.zero_grad(set_to_none=True)
    batch = make_inputs(2)
    want = oracle_backward(copy.deepcopy(model), [batch], loss_fn)
    with gradtrace.watch(model, **options) as again:
        with again.pass_("X"):
            loss_fn(model, batch).backward()
    assert_pass_matches(again.passes["X"], want, via="backward")
    assert again.passes["X"].runs == 1


def test_recording_continues_after_a_failed_backward(zoo_case):
    """A backward that raises mid-run (caught by the user) must not poison later passes."""
    name, model, make_inputs, loss_fn = zoo_case
    last = oracle_backward(copy.deepcopy(model), [make_inputs(1)], loss_fn).order[-1]
    batches = [make_inputs(s) for s in (3, 4)]
    want = oracle_backward(copy.deepcopy(model), batches, loss_fn)
    want_auto = oracle_grad(copy.deepcopy(model), batches[:1], loss_fn)

    def explode(grad):
        raise Boom()

    with gradtrace.watch(model) as trace:
        handle = model.get_parameter(last).register_hook(explode)
        with pytest.raises(Boom):
            with trace.pass_("bad"):
                loss_fn(model, make_inputs(1)).backward()
        handle.remove()
        model.zero_grad(set_to_none=True)
        with trace.pass_("good"):
            for batch in batches:
                loss_fn(model, batch).backward()
        params = [p for _, p in trainable(model)]
        torch.autograd.grad(loss_fn(model, batches[0]), params, allow_unused=True)

    assert list(trace.passes)[:2] == ["bad", "good"]
    assert len(trace.passes) == 3
    good = trace.passes["good"]
    assert good.runs == len(batches)
    assert_pass_matches(good, want, via="backward")
    auto = trace.passes[list(trace.passes)[2]]
    assert auto.auto and auto.runs == 1
    assert_pass_matches(auto, want_auto, via="grad")


# ------------------------------------------------------------------ host syncs

SYNC_METHODS = ("item", "cpu", "tolist", "__float__", "__int__", "__bool__", "numpy")


@contextlib.contextmanager
def count_host_syncs():
    """Count calls of host-syncing ``torch.Tensor`` methods while the block runs."""
    counts = Counter()
    saved = {}
    for meth in SYNC_METHODS:
        saved[meth] = torch.Tensor.__dict__.get(meth)
        original = getattr(torch.Tensor, meth)

        def wrapper(self, *args, _meth=meth, _original=original, **kwargs):
            counts[_meth] += 1
            return _original(self, *args, **kwargs)

        setattr(torch.Tensor, meth, wrapper)
    try:
        yield counts
    finally:
        for meth, original in saved.items():
            if original is None:
                delattr(torch.Tensor, meth)
            else:
                setattr(torch.Tensor, meth, original)


class Wide(nn.Module):
    """``n_blocks`` parallel linear blocks (two parameters each) summed."""

    def __init__(self, n_blocks: int):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(n_blocks))
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)

    def forward(self, x):
        return sum(torch.tanh(b(self.frozen(x))) for b in self.blocks).pow(2).mean()


def _syncs(n_blocks, options, labelled, statistics="device"):
    """Host syncs inside backward and at pass exit. ``statistics="device"``: the statistics run as on an
    accelerator (on a CPU the host reduction reads values back on purpose, nothing to wait for there,
    which would hide a sync the accelerator path introduced)."""
    torch.manual_seed(0)
    model = Wide(n_blocks)
    params = [p for p in model.parameters() if p.requires_grad]
    xs = [torch.randn(3, 4) for _ in range(4)]
    inside, at_exit = Counter(), Counter()
    with gradtrace.watch(model, statistics=statistics, **options) as trace:
        for name, run in (("X", "backward"), ("Y", "grad"), ("Z", "backward")):
            ctx = trace.pass_(name) if labelled else contextlib.nullcontext()
            ctx.__enter__()
            try:
                for x in xs[:2]:
                    loss = model(x)
                    with count_host_syncs() as counts:
                        if run == "backward":
                            loss.backward()
                        else:
                            torch.autograd.grad(loss, params, allow_unused=True)
                    inside.update(counts)
            finally:
                with count_host_syncs() as counts:
                    ctx.__exit__(None, None, None)
                at_exit.update(counts)
    with count_host_syncs() as counts:  # records reach the host here at the latest
        passes = trace.passes
        assert len(passes) == (3 if labelled else 6)
        for pt in passes.values():
            assert len(pt.covered) == 2 * n_blocks
    at_exit.update(counts)
    return inside, at_exit




@pytest.mark.parametrize("labelled", [True, False], ids=["in_pass", "auto_pass"])
@pytest.mark.parametrize("options", OPTIONS)
def test_no_host_sync_inside_backward(options, labelled):
    # the counter itself works, and plain autograd makes no such call
    with count_host_syncs() as probe:
        torch.ones(2).sum().item()
    assert probe["item"] == 1
    torch.manual_seed(0)
    bare = Wide(3)
    with count_host_syncs() as bare_counts:
        bare(torch.randn(3, 4)).backward()
    assert sum(bare_counts.values()) == 0

    for n_blocks in (5, 100):  # 10 and 200 trainable parameters
        inside, _ = _syncs(n_blocks, options, labelled)
        assert sum(inside.values()) == 0, f"{n_blocks * 2} params: host syncs in backward {dict(inside)}"


@pytest.mark.parametrize("labelled", [True, False], ids=["in_pass", "auto_pass"])
@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("path", ["accelerator", "cpu"])
def test_host_syncs_do_not_grow_with_parameter_count(options, labelled, path):
    statistics = "auto" if path == "cpu" else "device"
    _, after_small = _syncs(5, options, labelled, statistics)
    _, after_large = _syncs(100, options, labelled, statistics)
    assert sum(after_large.values()) <= sum(after_small.values()), (
        f"pass exit and reading records: {dict(after_small)} syncs for 10 params, "
        f"{dict(after_large)} for 200"
    )
