"""Hookless reading of ``.backward()`` runs (issue 23, ``capture/hookless.py``).

Once a plain run has taught the engine's order, ``.backward()`` runs are read from
``.grad`` with no gradtrace hook on the parameters. Every pass must still equal the
oracle (coverage, hits, norms, max |g|, zero flags, backward order), and anything the
hookless reading could get wrong must put the hooks back before it matters.
"""
from __future__ import annotations

import copy
import threading

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import gradtrace
from gradtrace.capture.hookless import HOOKLESS, LEARNING, NEVER
from zoo import _features, assert_pass_matches, oracle_backward, oracle_grad, trainable


def _state(trace):
    return trace._recording.recorder.hookless


def _hooks_out(model) -> bool:
    """No tensor hook container on any trainable parameter: the engine calls nothing per parameter."""
    return all(p._backward_hooks is None for _, p in trainable(model))


def _grad_all(model, loss):
    return torch.autograd.grad(loss, [p for _, p in trainable(model)], allow_unused=True)


def test_a_long_loop_matches_the_oracle_every_pass_with_the_hooks_out(zoo_case):
    """Labelled .backward() passes of two microbatches, autograd.grad passes and unlabelled runs mixed,
    six steps: every pass equals plain autograd's answer, and after the first run no parameter hook."""
    name, model, make_inputs, loss_fn = zoo_case
    wants, got = [], []
    with gradtrace.watch(model) as trace:
        for step in range(6):
            model.zero_grad(set_to_none=True)
            batches = [make_inputs(10 * step + k) for k in range(2)]
            wants.append((f"X{step}", oracle_backward(copy.deepcopy(model), batches, loss_fn), "backward"))
            with trace.pass_(f"X{step}"):
                for batch in batches:
                    loss_fn(model, batch).backward()
            if step >= 1:
                assert _state(trace).mode == HOOKLESS and _hooks_out(model), f"{name}: hooks still in at step {step}"
            if step % 2:
                batch = make_inputs(10 * step + 5)
                wants.append((f"Y{step}", oracle_grad(copy.deepcopy(model), [batch], loss_fn), "grad"))
                with trace.pass_(f"Y{step}"):
                    _grad_all(model, loss_fn(model, batch))
                assert _hooks_out(model), "the autograd.grad run's hooks were not taken out after it"
            if step % 3 == 2:
                model.zero_grad(set_to_none=True)
                batch = make_inputs(10 * step + 7)
                want = oracle_backward(copy.deepcopy(model), [batch], loss_fn)
                loss_fn(model, batch).backward()
                got.append((list(trace.passes)[-1], want))
        assert _state(trace).relearned == 0
    for pass_name, want, via in wants:
        assert_pass_matches(trace.passes[pass_name], want, via=via)
    for pass_name, want in got:
        assert trace.passes[pass_name].auto
        assert_pass_matches(trace.passes[pass_name], want, via="backward")


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(6, 6)
        self.a = nn.Linear(6, 1)
        self.b = nn.Linear(6, 1)
        self.use_b = False

    def forward(self, x):
        h = torch.tanh(self.body(x))
        out = self.a(h)
        return out + self.b(h) if self.use_b else out


def _two_heads_loss(model, batch):
    return model(batch).pow(2).mean()


def test_a_run_that_reaches_other_parameters_gets_the_hooks_at_its_start():
    """Head b joins in step 2 and leaves in step 3: those runs are seen with hooks from their start, so
    their backward order (head b first) is the engine's, not a guess; the hooks come out again after."""
    torch.manual_seed(0)
    model = TwoHeads()
    with gradtrace.watch(model) as trace:
        for step, use_b in enumerate([False, False, True, True, False, False]):
            model.use_b = use_b
            model.zero_grad(set_to_none=True)
            batch = _features(step)
            want = oracle_backward(copy.deepcopy(model), [batch], _two_heads_loss)
            with trace.pass_(f"s{step}"):
                _two_heads_loss(model, batch).backward()
            assert_pass_matches(trace.passes[f"s{step}"], want, via="backward")
        assert _state(trace).relearned == 2 and _state(trace).mode == HOOKLESS and _hooks_out(model)
    assert trace.passes["s2"].covered == {n for n, _ in model.named_parameters()}
    assert trace.passes["s4"].missing == {"b.weight", "b.bias"}


def test_a_submodule_called_outside_the_model_puts_the_hooks_back_before_its_backward():
    """Regression (found by tests/test_cli_ci.py): after a learned .backward() pass, an autograd.grad pass
    through model[2] called on its own never reaches the model's output; without hooks it went unseen."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 1))
    with gradtrace.watch(model) as trace:
        with trace.pass_("X"):
            model(_features(0)).pow(2).mean().backward()
            model(_features(1)).pow(2).mean().backward()
        assert _state(trace).mode == HOOKLESS
        with trace.pass_("Y"):
            with torch.no_grad():
                hidden = model[0](_features(2))
            grads = torch.autograd.grad(model[2](model[1](hidden)).sum(), list(model.parameters()),
                                        allow_unused=True)
        with trace.pass_("Z"):  # and a .backward() the same way
            model[2](model[1](hidden)).sum().backward()
    y = trace.passes["Y"]
    assert y.covered == {"2.weight", "2.bias"} and y.runs == 1
    assert y.records["2.weight"].norm == pytest.approx(grads[2].norm().item(), rel=1e-6)
    assert trace.passes["Z"].covered == {"2.weight", "2.bias"}
    assert "GRAPH_CUT" in {v.code for v in trace.verdicts()}


def test_a_watched_forward_that_raised_still_ends_its_call():
    """The forward's depth is counted down by an always-called hook: after a forward that raised, a
    submodule called on its own is still noticed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 1))
    with gradtrace.watch(model) as trace:
        model(_features(0)).sum().backward()
        assert _state(trace).mode == HOOKLESS
        with pytest.raises(RuntimeError):
            model(torch.randn(2, 5))  # wrong width: the first layer raises
        with trace.pass_("Y"):
            torch.autograd.grad(model[2](torch.randn(2, 6)).sum(), [model[2].weight])
    assert trace.passes["Y"].covered == {"2.weight"}


class MaybeCheckpointed(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = nn.Linear(6, 6)
        self.block = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6))
        self.head = nn.Linear(6, 1)
        self.reentrant = False

    def forward(self, x):
        h = torch.tanh(self.first(x))
        h = checkpoint(self.block, h, use_reentrant=True) if self.reentrant else self.block(h)
        return self.head(h)


def test_reentrant_checkpointing_after_learning_is_seen_exactly():
    torch.manual_seed(0)
    model = MaybeCheckpointed()
    loss_fn = _two_heads_loss
    with gradtrace.watch(model) as trace:
        for step, reentrant in enumerate([False, False, True, True, False]):
            model.reentrant = reentrant
            model.zero_grad(set_to_none=True)
            batches = [_features(step), _features(step + 100)]
            reference = copy.deepcopy(model)
            reference.reentrant = False  # the same gradients, computed plainly
            want = oracle_backward(reference, batches, loss_fn)
            with trace.pass_(f"s{step}"):
                for batch in batches:
                    loss_fn(model, batch).backward()
            pt = trace.passes[f"s{step}"]
            assert pt.covered == want.covered and pt.runs == 2
            for n in want.covered:
                assert pt.records[n].hits == 2, (step, n)
                assert pt.records[n].norm == pytest.approx(want.norm(n), rel=1e-5)
        assert _state(trace).relearned >= 1


class GateFn(torch.autograd.Function):
    """y = x * w, whose backward gives w no gradient at all (None) when ``give`` is False."""

    @staticmethod
    def forward(ctx, x, w, give):
        ctx.save_for_backward(x, w)
        ctx.give = give
        return x * w

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        return g * w, (g * x).sum(0) if ctx.give else None, None


class Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 6)
        self.w = nn.Parameter(torch.randn(6))
        self.give = True

    def forward(self, x):
        return GateFn.apply(self.lin(x), self.w, self.give).sum(-1)


def test_a_parameter_the_engine_names_but_gives_no_gradient_is_not_reached():
    torch.manual_seed(0)
    model = Gated()
    loss_fn = _two_heads_loss
    with gradtrace.watch(model) as trace:
        for step, give in enumerate([True, True, False, True]):
            model.give = give
            model.zero_grad(set_to_none=True)
            batch = _features(step)
            want = oracle_backward(copy.deepcopy(model), [batch], loss_fn)
            with trace.pass_(f"s{step}"):
                loss_fn(model, batch).backward()
            assert_pass_matches(trace.passes[f"s{step}"], want, via="backward")
    assert trace.passes["s2"].missing == {"w"}


def test_optimizer_in_backward_registered_after_learning_is_reached_and_unknown():
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    with gradtrace.watch(model) as trace:
        with trace.pass_("learn"):
            model(torch.randn(5, 4)).sum().backward()
        assert _state(trace).mode == HOOKLESS
        opts = {p: torch.optim.SGD([p], lr=0.1) for p in model.parameters()}

        def step_and_clear(p):
            opts[p].step()
            p.grad = None

        for p in model.parameters():
            p.register_post_accumulate_grad_hook(step_and_clear)
        with trace.pass_("step"):
            model(torch.randn(5, 4)).sum().backward()
    p = trace.passes["step"]
    assert p.covered == {"weight", "bias"} and p.zero == set() and p.cleared == {"weight", "bias"}


def test_stale_grads_are_found_without_parameter_hooks():
    """.grad not zeroed before a step: the copy that makes the pass's figure its own gain, and the
    staleness, are taken at the run's start instead of in a parameter hook."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradtrace.watch(model, optimizer=opt) as trace:
        for step in range(4):
            if step != 2:  # step 2 forgets zero_grad
                opt.zero_grad(set_to_none=False)
            batch = _features(step)
            before = {n: p.grad.clone() if p.grad is not None else None for n, p in model.named_parameters()}
            with trace.pass_(f"s{step}"):
                model(batch).pow(2).mean().backward()
            if step >= 1:
                assert _state(trace).mode == HOOKLESS
            gained = {n: p.grad - before[n] if before[n] is not None else p.grad for n, p in model.named_parameters()}
            opt.step()
            pt = trace.passes[f"s{step}"]
            for n, g in gained.items():
                assert pt.records[n].norm == pytest.approx(g.norm().item(), rel=1e-5), (step, n)
    assert trace.passes["s2"].stale == {n for n, _ in model.named_parameters()}
    assert all(not trace.passes[f"s{k}"].stale for k in (0, 1, 3))
    assert "STALE_GRADS" in {v.code for v in trace.verdicts()}


def test_a_backward_that_bypasses_the_model_is_counted_by_the_labelled_pass():
    """Parameters used outside every module's forward (no output, no module hook saw it): the pass end
    finds the new .grad, counts it, and puts the hooks back."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 1))
    with gradtrace.watch(model) as trace:
        model(_features(0)).sum().backward()
        model.zero_grad(set_to_none=True)
        assert _state(trace).mode == HOOKLESS
        with trace.pass_("L2"):
            (model[0].weight ** 2).sum().backward()
        assert _state(trace).mode == LEARNING
        with trace.pass_("after"):
            (model[0].weight ** 2).sum().backward()
    assert trace.passes["L2"].covered == {"0.weight"}
    assert trace.passes["after"].covered == {"0.weight"} and trace.passes["after"].records["0.weight"].hits == 1


@pytest.mark.parametrize("read_at", ["pass_end", "run_end"])
def test_keep_grads_and_run_end_reading_without_hooks(read_at):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 1))
    with gradtrace.watch(model, keep_grads=True) as trace:
        for step in range(3):
            model.zero_grad(set_to_none=True)
            with trace.pass_(f"s{step}", read_at=read_at):
                model(_features(step)).pow(2).mean().backward()
                model(_features(step + 50)).pow(2).mean().backward()
                want = {n: p.grad.clone() for n, p in model.named_parameters()}
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)  # in place, before the pass ends
            assert _state(trace).mode == HOOKLESS
            pt = trace.passes[f"s{step}"]
            kept = trace._recording.kept[f"s{step}"]
            for n, g in want.items():
                assert pt.records[n].hits == 2
                if read_at == "run_end":  # read before the clipping
                    assert pt.records[n].norm == pytest.approx(g.norm().item(), rel=1e-6)
                else:  # changed in place after its run: read as the pass left it
                    assert pt.records[n].norm == pytest.approx(model.get_parameter(n).grad.norm().item(), rel=1e-6)
                assert torch.equal(kept[n], model.get_parameter(n).grad)


def test_two_threads_backward_on_one_model_at_once():
    """Runs in two threads at once put the hooks back at their start: every pass still reaches
    every parameter once per run."""
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(6, 6) for _ in range(20)))
    barrier = threading.Barrier(2)
    errors = []

    def work(tag, trace):
        try:
            for step in range(3):
                barrier.wait(timeout=30)
                with trace.pass_(f"{tag}{step}"):
                    model(_features(step)).sum().backward()
        except Exception as e:  # reported below
            errors.append(e)

    with gradtrace.watch(model) as trace:
        model(_features(0)).sum().backward()  # learns
        threads = [threading.Thread(target=work, args=(tag, trace)) for tag in "ab"]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    assert not errors and not any(t.is_alive() for t in threads)
    names = {n for n, _ in model.named_parameters()}
    for tag in "ab":
        for step in range(3):
            pt = trace.passes[f"{tag}{step}"]
            assert pt.covered == names and pt.runs == 1
            assert all(r.hits == 1 for r in pt.records.values())


def test_a_forward_in_a_second_thread_keeps_the_hooks_in_until_exit():
    """Taking a hook out sets the parameter's container to None, which destroys the engine's C++
    pre-hook: a backward in another thread about to call it read freed memory (CI on torch 2.6:
    ``vector::_M_range_check: __n (which is 1248) >= this->size() (which is 1)``). Once the model
    has run with grad in a second thread, no container is reset before the watch ends."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 1))
    with gradtrace.watch(model) as trace:
        for step in range(2):
            model.zero_grad(set_to_none=True)
            model(_features(step)).sum().backward()
        assert _state(trace).mode == HOOKLESS and _hooks_out(model)  # one thread: the hooks came out
        other = threading.Thread(target=lambda: model(_features(7)))  # a forward with grad, no backward
        other.start()
        other.join(timeout=60)
        assert _state(trace).mode == LEARNING and not _hooks_out(model)  # back in before its backward could run
        containers = [p._backward_hooks for p in model.parameters()]
        for step in range(3):  # plain one-thread runs, which would teach the order and take the hooks out
            model.zero_grad(set_to_none=True)
            with trace.pass_(f"s{step}"):
                model(_features(step)).sum().backward()
            assert _state(trace).mode == LEARNING
            held = zip(model.parameters(), containers, strict=True)
            assert all(p._backward_hooks is c and len(c) == 1 for p, c in held)
    assert _hooks_out(model)  # put back as found at exit
    names = {n for n, _ in model.named_parameters()}
    for step in range(3):
        pt = trace.passes[f"s{step}"]
        assert pt.covered == names and all(r.hits == 1 for r in pt.records.values())


def test_a_backward_in_a_second_thread_through_the_first_threads_forward_keeps_the_hooks_in():
    """Both forwards in one thread, one of their backwards in another, while the first thread's run is
    still open: the first run's end must not take the hooks out (it would free the pre-hooks the other
    run is on its way to, and lose that run). Sequenced by an end-of-run callback of the user's, queued
    before gradtrace's own: the second run reaches the model's output while the first is open."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64))
    past_output, go = threading.Event(), threading.Event()
    containers_while_open = []
    with gradtrace.watch(model) as trace:
        first_out = model(torch.randn(8, 64))
        second_out = model(torch.randn(8, 64))
        second_out.register_hook(lambda g: past_output.set())

        def second_backward():
            go.wait(timeout=30)
            second_out.sum().backward()

        other = threading.Thread(target=second_backward)
        other.start()

        def let_the_other_run_start():  # runs at the end of the first run, before gradtrace closes it
            go.set()
            past_output.wait(timeout=30)

        first_out.register_hook(lambda g: torch.autograd.Variable._execution_engine.queue_callback(
            let_the_other_run_start))
        first_out.sum().backward()
        containers_while_open = [p._backward_hooks for p in model.parameters()]
        other.join(timeout=60)
        assert not other.is_alive()
        assert _state(trace).pinned and _state(trace).mode == LEARNING
    assert all(c is not None for c in containers_while_open)  # not taken out under the other run
    names = {n for n, _ in model.named_parameters()}
    passes = list(trace.passes.values())  # unlabelled runs, both seen (the second is not lost)
    assert sum(pt.runs for pt in passes) == 2
    assert sum(r.hits for pt in passes for r in pt.records.values()) == 2 * len(names)
    assert all(pt.covered == names for pt in passes)


def test_a_submodule_run_with_grad_in_a_second_thread_keeps_the_hooks_in():
    """A watched submodule called on its own in another thread (no model forward there to notice it)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 1))
    with gradtrace.watch(model) as trace:
        for step in range(2):
            model.zero_grad(set_to_none=True)
            model(_features(step)).sum().backward()
        assert _state(trace).mode == HOOKLESS and _hooks_out(model)
        other = threading.Thread(target=lambda: model[2](_features(7)))
        other.start()
        other.join(timeout=60)
        assert _state(trace).pinned and not _hooks_out(model)
        model.zero_grad(set_to_none=True)
        model(_features(3)).sum().backward()
        assert _state(trace).mode == LEARNING and not _hooks_out(model)


def test_a_second_thread_running_only_under_no_grad_leaves_the_hooks_out():
    """Generation in a background thread (no grad) cannot start a backward: the watch stays hookless."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 1))

    def generate():
        with torch.no_grad():
            model(_features(7))

    with gradtrace.watch(model) as trace:
        for step in range(2):
            model.zero_grad(set_to_none=True)
            model(_features(step)).sum().backward()
        other = threading.Thread(target=generate)
        other.start()
        other.join(timeout=60)
        model.zero_grad(set_to_none=True)
        model(_features(3)).sum().backward()
        assert _state(trace).mode == HOOKLESS and _hooks_out(model)


def test_generation_under_no_grad_between_steps_keeps_the_hooks_out():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 10))
    with gradtrace.watch(model) as trace:
        for step in range(4):
            with torch.no_grad():
                tokens = torch.randint(0, 10, (2, 3))
                for _ in range(4):
                    tokens = torch.cat([tokens, model(tokens)[:, -1:].argmax(-1)], dim=1)
            model.zero_grad(set_to_none=True)
            with trace.pass_(f"s{step}"):
                model(tokens).log_softmax(-1).mean().backward()
        assert _state(trace).mode == HOOKLESS and _state(trace).relearned == 0
    assert all(trace.passes[f"s{k}"].covered == {"0.weight", "1.weight", "1.bias"} for k in range(4))


@pytest.mark.parametrize("how", ["parameters", "cuts_off"])
def test_hooks_stay_in_where_hookless_reading_cannot_see_every_run(how):
    model = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 1))
    target = list(model.named_parameters()) if how == "parameters" else model
    with gradtrace.watch(target, cuts="off") as trace:
        for _ in range(3):
            model(_features(0)).sum().backward()
        assert _state(trace).mode == NEVER
        assert all(p._backward_hooks for p in model.parameters())
    assert all(p._backward_hooks is None for p in model.parameters())  # and out at exit


@pytest.mark.parametrize("cuts", ["off", "modules"])
def test_an_undefined_gradient_reaching_a_hook_is_not_reached_and_breaks_nothing(cuts):
    """Regression: a tensor hook is called with None when a backward returns None for its input;
    gradtrace's parameter hook read ``grad.device`` and made the user's backward raise."""
    torch.manual_seed(0)
    model = Gated()
    model.give = False
    with gradtrace.watch(model, cuts=cuts) as trace:
        with trace.pass_("s"):
            out = model(_features(0))
            trace.tensor("out", out)
            out.pow(2).mean().backward()
    assert trace.passes["s"].missing == {"w"} and model.w.grad is None


@pytest.mark.slow  # seconds each: the dev loop stays under a minute
@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_a_compiled_models_unlabelled_backwards_are_each_a_pass(backend):
    """Regression (merge of main's forward checks): torch.compile's code calls none of the forward
    wrappers, so no output was marked and, hooks out, its backwards went unseen (3 passes of 7).
    Each compiled call now puts the hooks back in for its backward."""
    import torch._dynamo

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
    x = torch.randn(4, 8)
    names = {n for n, _ in model.named_parameters()}
    with gradtrace.watch(model) as trace:
        for _ in range(3):
            model(x).sum().backward()
            model.zero_grad()
        compiled = torch.compile(model, backend=backend)
        grads = []
        for _ in range(4):
            compiled(x).sum().backward()
            grads.append({n: p.grad.norm().item() for n, p in model.named_parameters()})
            model.zero_grad()
    passes = list(trace.passes.values())
    assert len(passes) == 7 and all(p.covered == names and p.runs == 1 for p in passes)
    for p, g in zip(passes[3:], grads, strict=True):
        assert all(abs(float(p.records[n].norm) - g[n]) <= 1e-5 * max(1.0, g[n]) for n in names)
    torch._dynamo.reset()
