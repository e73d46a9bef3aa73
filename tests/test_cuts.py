"""Graph-cut detection: every cut kind, where it happened, and what it explains.

Each scenario checks the verdict code, the module path the cut names, and that
the cut's ``location`` is the line of *this* file that caused it (the source
line at that location is read back and checked).

Small hand-written models cover every kind at module level and op level
(``watch(model, cuts="ops")``); a tiny GPT-2 from ``transformers`` (random
weights, built from a config) with a ``peft`` LoRA covers the realistic ones.
"""
from __future__ import annotations

import contextlib
import copy
import os
import warnings

import pytest
import torch
from torch import nn

import gradtrace

from cut_helpers import needs_hf, peft, source_line, transformers, verdicts_of

HERE = os.path.basename(__file__)


# ---------------------------------------------------------------- helpers






def errors(trace):
    return [v for v in trace.verdicts() if v.severity == "error"]


def source_at(location: str) -> str:
    return source_line(location, __file__)


def only(items):
    assert len(items) == 1, items
    return items[0]


def ops_cuts(trace, kind=None):
    return [c for c in trace.cuts if c.op is not None and (kind is None or c.kind == kind)]


def trainable(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def no_mode_left():
    return torch.overrides._get_current_function_mode_stack() == []


def no_hooks_left(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# ---------------------------------------------------------------- small models


class Stack(nn.Module):
    """x -> a -> tanh -> b -> head; a cut between the two layers loses ``a``."""

    def __init__(self, cut=None):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.head = nn.Linear(4, 1)
        self.cut = cut

    def forward(self, x):
        h = torch.tanh(self.a(x))
        if self.cut == "detach":
            h = h.detach()
        elif self.cut == "data":
            h = h.data
        elif self.cut == "detach_":
            h = h * 1.0
            h.detach_()
        elif self.cut == "no_grad":
            with torch.no_grad():
                h = h * 2.0
        elif self.cut == "argmax":
            h = nn.functional.one_hot(h.argmax(-1), 4).float()
        elif self.cut == "compare":
            h = (h > 0).float()
        return self.head(torch.tanh(self.b(h)))


class InnerNoGrad(nn.Module):
    """A submodule called under no_grad inside the forward: a module-level cut."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 1)
        self.cut = None

    def forward(self, x):
        with torch.no_grad() if self.cut else contextlib.nullcontext():
            h = self.a(x)
        return self.b(h)


def batch(seed=0, n=3):
    return torch.randn(n, 4, generator=torch.Generator().manual_seed(seed))


def two_passes(model, trace, cut=None, seeds=(0, 1)):
    """X: the healthy model, .backward() over microbatches; Y: autograd.grad with ``model.cut = cut``."""
    named = trainable(model)
    with trace.pass_("X"):
        for s in seeds:
            model(batch(s)).sum().backward()
    with trace.pass_("Y"):
        model.cut = cut
        try:
            out = model(batch(0)).sum()
        finally:
            model.cut = None
        grads = torch.autograd.grad(out, [p for _, p in named], allow_unused=True)
    return dict(zip([n for n, _ in named], grads, strict=True))


# ---------------------------------------------------------------- module level: no_grad / inference_mode


@pytest.mark.parametrize("cuts", ["modules", "ops"])
@pytest.mark.parametrize("kind,context", [("no_grad", torch.no_grad), ("inference_mode", torch.inference_mode)])
def test_s_built_without_grad_is_tensor_no_grad_and_graph_cut(kind, context, cuts):
    model = Stack()
    with gradtrace.watch(model, cuts=cuts) as trace:
        with trace.pass_("X"):
            model(batch(0)).sum().backward()
        with trace.pass_("Y"):
            with context():
                logits = model(batch(0))
            S = trace.tensor("S", logits.sum(-1))
            with pytest.raises(RuntimeError, match="does not require grad"):
                torch.autograd.grad(S.sum(), list(model.parameters()), allow_unused=True)

    tng = only(verdicts_of(trace, "TENSOR_NO_GRAD"))
    assert tng.severity == "error"
    assert tng.evidence["tensor"] == "S"
    assert tng.evidence["kind"] == kind
    assert tng.evidence["module"] == ""  # the whole model ran without grad: the root
    assert "model(batch(0))" in source_at(tng.evidence["location"])
    cut = next(v for v in verdicts_of(trace, "GRAPH_CUT") if v.evidence["kind"] == kind)
    assert cut.evidence["module"] == ""
    assert "model(batch(0))" in source_at(cut.evidence["location"])
    assert set(cut.evidence["lost"]) == {n for n, _ in trainable(model)}
    # the root cause comes first
    assert trace.verdicts()[0].code == "TENSOR_NO_GRAD"
    if cuts == "ops":
        # the whole call ran without grad: the module-level cut says it once, no op-level echo
        assert not ops_cuts(trace)


@pytest.mark.parametrize("cuts", ["modules", "ops"])
def test_submodule_under_no_grad_names_that_submodule(cuts):
    model = InnerNoGrad()
    with gradtrace.watch(model, cuts=cuts) as trace:
        grads = two_passes(model, trace, cut=True)
    assert grads["a.weight"] is None and grads["b.weight"] is not None
    cut = only(verdicts_of(trace, "GRAPH_CUT"))
    assert cut.evidence["kind"] == "no_grad"
    assert cut.evidence["module"] == "a"
    assert "self.a(x)" in source_at(cut.evidence["location"])
    assert set(cut.evidence["lost"]) == {"a.weight", "a.bias"}
    assert trace.passes["X"].covered - trace.passes["Y"].covered == {"a.weight", "a.bias"}


# ---------------------------------------------------------------- op level: every kind


@pytest.mark.parametrize("cut,kind,op,text", [
    ("detach", "detach", "detach", "h.detach()"),
    ("data", "detach", "data", "h.data"),
    ("detach_", "detach", "detach_", "h.detach_()"),
    ("no_grad", "no_grad", "mul", "h * 2.0"),
    ("argmax", "non_differentiable", "argmax", "h.argmax(-1)"),
    ("compare", "non_differentiable", "gt", "(h > 0)"),
])
def test_op_level_cut_names_op_module_and_line(cut, kind, op, text):
    model = Stack()
    with gradtrace.watch(model, cuts="ops") as trace:
        grads = two_passes(model, trace, cut=cut)
    assert grads["a.weight"] is None and grads["b.weight"] is not None

    found = only(ops_cuts(trace))
    assert (found.kind, found.op, found.pass_name) == (kind, op, "Y")
    assert found.module == ""  # the op ran in the root module's own forward
    assert found.module_type == "Stack"
    assert text in source_at(found.location)

    verdict = only(verdicts_of(trace, "GRAPH_CUT"))
    assert verdict.evidence["kind"] == kind and verdict.evidence["op"] == op
    assert set(verdict.evidence["lost"]) == {"a.weight", "a.bias"}
    assert text in source_at(verdict.evidence["location"])
    assert verdict.severity == "error"


def test_module_level_mode_does_not_see_a_cut_inside_a_forward():
    """The same detach is invisible to module hooks (the root's output still requires grad)."""
    model = Stack()
    with gradtrace.watch(model, cuts="modules") as trace:
        two_passes(model, trace, cut="detach")
    assert trace.cuts == []
    gap = only(verdicts_of(trace, "COVERAGE_GAP"))
    assert set(gap.evidence["only_a"]) == {"a.weight", "a.bias"}


def test_op_level_detach_in_user_code_outside_the_model():
    model = Stack()
    with gradtrace.watch(model, cuts="ops") as trace:
        with trace.pass_("Y"):
            h = model.a(batch(0))
            h = h.detach()
            out = model.head(torch.tanh(model.b(h))).sum()
            out.backward()
    c = only(ops_cuts(trace))
    assert (c.kind, c.op, c.module) == ("detach", "detach", "")
    assert "h = h.detach()" in source_at(c.location)


def test_op_level_no_grad_and_inference_mode_on_a_computed_tensor():
    """S's log-probs taken under no_grad after a healthy forward: only op level sees it."""
    model = Stack()
    for context, kind in ((torch.no_grad, "no_grad"), (torch.inference_mode, "inference_mode")):
        with gradtrace.watch(model, cuts="ops") as trace:
            with trace.pass_("Y"):
                logits = model(batch(0))
                with context():
                    S = torch.log_softmax(logits, -1)
                trace.tensor("S", S)
        c = only(ops_cuts(trace))
        assert (c.kind, c.op, c.module) == (kind, "log_softmax", "")
        assert "torch.log_softmax(logits, -1)" in source_at(c.location)
        tng = only(verdicts_of(trace, "TENSOR_NO_GRAD"))
        assert tng.evidence["kind"] == kind
        assert "torch.log_softmax" in source_at(tng.evidence["location"])


def test_op_level_cut_is_counted_once_per_site():
    model = Stack("detach")
    with gradtrace.watch(model, cuts="ops") as trace:
        with trace.pass_("Y"):
            for s in range(3):
                model(batch(s)).sum().backward()
    c = only(ops_cuts(trace))
    assert c.count == 3


class CustomSquare(torch.autograd.Function):
    """A custom Function: its forward runs without grad by design, and is no cut."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g


class WithCustomFunction(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x):
        return CustomSquare.apply(self.a(x)).sum()


def test_op_level_ignores_bookkeeping_custom_functions_and_gradtrace_itself():
    model = WithCustomFunction()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    ema = [p.detach().clone() for p in model.parameters()]
    with gradtrace.watch(model, cuts="ops") as trace:
        with trace.pass_("X"):
            loss = trace.tensor("loss", model(batch(0)))  # gradtrace's own value statistics
            loss.backward()
        opt.step()  # in-place updates and weight decay on parameters under no_grad
        with torch.no_grad():
            for e, p in zip(ema, model.parameters(), strict=True):
                e.lerp_(p, 0.1)  # EMA
        norms = [p.detach().norm() for p in model.parameters()]  # logging
        logged = [loss.detach()]  # logging a computed value: detached, never used for a gradient
        float(logged[0])
        with trace.pass_("Y"):
            torch.autograd.grad(model(batch(1)), list(model.parameters()))
    assert len(norms) == 2
    assert trace.cuts == []
    assert trace.passes["X"].covered == trace.passes["Y"].covered == {"a.weight", "a.bias"}
    assert not errors(trace)


class ScaledTanh(torch.autograd.Function):
    """setup_context style (no ctx in forward), several ops inside forward, a non-differentiable output."""

    @staticmethod
    def forward(x, scale):
        inner = x * scale  # ops inside forward run without grad: never a cut
        out = torch.tanh(inner)
        return out, out.argmax(-1)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output[0])
        ctx.scale = inputs[1]
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, g, _):
        (out,) = ctx.saved_tensors
        return g * (1 - out * out) * ctx.scale, None


def test_custom_function_forwards_are_no_cut_on_any_torch():
    """torch 2.14/2.15: Function.apply became a builtin (no Python frame), and a custom Function's
    forward (`x * x`) was reported as a no_grad cut. Its outputs are recognised by the history
    Function.apply gives them; the ops of its forward never become cuts, in any style of Function."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    x = batch(0)
    with gradtrace.watch(model, cuts="ops") as trace:
        with trace.pass_("X"):
            out, index = ScaledTanh.apply(model[0](x), 2.0)
            squared = CustomSquare.apply(out)
            y = trace.tensor("y", model[1](squared).sum() + squared[0, index[0]])
            y.backward()
    assert trace.cuts == [] and not errors(trace)
    assert trace.passes["X"].covered == {"0.weight", "0.bias", "1.weight", "1.bias"}
    assert trace.tensors["y"].requires_grad


def test_op_level_gradients_are_bitwise_identical():
    torch.manual_seed(0)
    model = Stack()
    reference = copy.deepcopy(model)
    for s in (0, 1):
        reference(batch(s)).sum().backward()
    with gradtrace.watch(model, cuts="ops") as trace:
        with trace.pass_("X"):
            for s in (0, 1):
                model(batch(s)).sum().backward()
        with trace.pass_("Y"):
            g = torch.autograd.grad(model(batch(0)).sum(), list(model.parameters()))
    g_ref = torch.autograd.grad(reference(batch(0)).sum(), list(reference.parameters()))
    for (n, p), (_, q) in zip(model.named_parameters(), reference.named_parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), n
    for a, b in zip(g, g_ref, strict=True):
        assert torch.equal(a, b)
    assert trace.cuts == []


def test_op_level_mode_and_hooks_are_removed_even_when_the_body_raises():
    model = Stack()
    with pytest.raises(ValueError, match="boom"):
        with gradtrace.watch(model, cuts="ops"):
            assert not no_mode_left()
            model(batch(0))
            raise ValueError("boom")
    assert no_mode_left()
    assert no_hooks_left(model)


def test_op_level_mode_leaves_a_users_mode_in_place():
    class Counting(torch.overrides.TorchFunctionMode):
        calls = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            Counting.calls += 1
            return func(*args, **(kwargs or {}))

    model = Stack()
    user_mode = Counting()
    with user_mode:
        with gradtrace.watch(model, cuts="ops"):
            model(batch(0))
        assert torch.overrides._get_current_function_mode_stack() == [user_mode]
        before = Counting.calls
        model(batch(0))
        assert Counting.calls > before
    assert no_mode_left()


def test_op_level_survives_a_forward_that_raises_midway():
    """A forward that raised must not leave the module stack pointing into it."""

    class Fails(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(4, 4)
            self.head = nn.Linear(4, 1)

        def forward(self, x, fail=False):
            h = self.inner(x)
            if fail:
                raise KeyError("midway")
            return self.head(h)

    model = Fails()
    with gradtrace.watch(model, cuts="ops") as trace:
        with torch.no_grad():
            with pytest.raises(KeyError):
                model(batch(0), fail=True)
        logits = model(batch(0))
        with torch.no_grad():
            S = logits * 2
        trace.tensor("S", S)
    c = only(ops_cuts(trace))
    # outside any module call: the call that raised under no_grad is gone from the stack
    assert (c.kind, c.op, c.module) == ("no_grad", "mul", "")
    assert "S = logits * 2" in source_at(c.location)


def test_op_level_candidates_that_never_come_back_are_not_cuts():
    """Logging a detached loss, an accuracy from argmax: no gradient was wanted from them."""
    model = Stack()
    with gradtrace.watch(model, cuts="ops") as trace:
        with trace.pass_("X"):
            history = []
            for s in range(2):
                logits = model(batch(s))
                loss = logits.pow(2).mean()
                loss.backward()
                history.append(loss.detach())
                accuracy = (logits.argmax(-1) == 0).float().mean()
                with torch.no_grad():
                    scaled = logits * 2
        total = torch.stack(history).sum()
    assert trace.cuts == []
    assert len(history) == 2 and float(total) > 0 and 0 <= float(accuracy) <= 1 and scaled.shape == (3, 1)


def test_op_level_candidate_reaching_the_engine_is_a_cut():
    """A detached S handed to autograd.grad: recorded before the engine raises."""
    model = Stack()
    with gradtrace.watch(model, cuts="ops") as trace:
        with trace.pass_("Y"):
            logp = torch.log_softmax(model(batch(0)), 0)
            S = logp.detach().sum()
            with pytest.raises(RuntimeError, match="does not require grad"):
                torch.autograd.grad(S, list(model.parameters()))
    c = only(ops_cuts(trace))
    assert (c.kind, c.op, c.module, c.pass_name) == ("detach", "detach", "", "Y")
    assert "logp.detach()" in source_at(c.location)


# ---------------------------------------------------------------- transformers GPT-2 + peft LoRA

VOCAB = 64
BLOCK = "base_model.model.transformer.h"


def gpt2(trainable_ln_f: bool = False, lora: bool = True):
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=32,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
    if not lora:
        return model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                           target_modules=["c_attn"], fan_in_fan_out=True))
    if trainable_ln_f:  # so that a pass with the adapters cut or disabled still has a graph
        for name, p in model.named_parameters():
            if ".ln_f." in name:
                p.requires_grad_(True)
    return model


def lora_names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad and "lora_" in n}


def ids(seed=0):
    return torch.randint(1, VOCAB, (2, 8), generator=torch.Generator().manual_seed(seed))


def padded_batch(seed=0):
    """Left-padded: attention mask with zeros, position ids counting from the first real token."""
    input_ids = ids(seed)
    mask = torch.ones_like(input_ids)
    mask[0, :3] = 0
    input_ids = input_ids.masked_fill(mask == 0, 0)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return input_ids, mask, position_ids


def seq_logprobs(model, input_ids, mask, position_ids):
    logits = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids).logits
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return (logp * mask[:, 1:]).sum(-1)


def x_pass(model, trace, seeds=(0, 1)):
    with trace.pass_("X"):
        for s in seeds:
            input_ids, mask, position_ids = padded_batch(s)
            model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                  labels=input_ids).loss.backward()


@pytest.mark.slow  # builds a real GPT-2
@needs_hf
@pytest.mark.parametrize("cuts", ["modules", "ops"])
@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_healthy_gpt2_has_no_cut_and_no_error(lora, cuts):
    model = gpt2(lora=lora)
    named = trainable(model)
    with gradtrace.watch(model, cuts=cuts) as trace:
        x_pass(model, trace)
        with trace.pass_("Y"):
            S = trace.tensor("S", seq_logprobs(model, *padded_batch(2)))
            A = trace.tensor("A", torch.tensor([0.5, -1.0]))
            grads = torch.autograd.grad((S * A).sum(), [p for _, p in named], allow_unused=True)
    assert trace.cuts == []
    assert not errors(trace), errors(trace)
    reached = {n for (n, _), g in zip(named, grads, strict=True) if g is not None}
    assert trace.passes["Y"].covered == reached
    assert trace.passes["X"].covered == {n for n, p in named if p.grad is not None}


@pytest.mark.slow  # builds a real GPT-2
@needs_hf
@pytest.mark.parametrize("context,kind", [(torch.no_grad, "no_grad"), (torch.inference_mode, "inference_mode")])
def test_gpt2_lora_s_without_grad(context, kind):
    model = gpt2()
    with gradtrace.watch(model) as trace:
        x_pass(model, trace)
        with trace.pass_("Y"):
            with context():
                S = seq_logprobs(model, *padded_batch(2))
            trace.tensor("S", S)
    tng = only(verdicts_of(trace, "TENSOR_NO_GRAD"))
    assert tng.evidence["kind"] == kind
    assert tng.evidence["module"] == ""  # the PeftModel itself ran without grad
    assert "logits = model(" in source_at(tng.evidence["location"])
    cut = next(v for v in verdicts_of(trace, "GRAPH_CUT") if v.evidence["kind"] == kind)
    assert cut.evidence["module"] == ""
    assert set(cut.evidence["lost"]) == lora_names(model)
    assert trace.verdicts()[0].code == "TENSOR_NO_GRAD"


@pytest.mark.slow  # builds a real GPT-2
@needs_hf
@pytest.mark.parametrize("cuts", ["modules", "ops"])
def test_gpt2_lora_block_output_detached_by_a_hook(cuts):
    """A forward hook returns block h.1's output detached: GRAPH_CUT detach at h.1."""
    model = gpt2(trainable_ln_f=True)
    block = model.base_model.model.transformer.h[1]
    cut = {"on": False}
    # registered before watch: forward hooks run in registration order, the detector's after it
    handle = block.register_forward_hook(lambda mod, args, out: out.detach() if cut["on"] else None)
    named = trainable(model)
    try:
        with gradtrace.watch(model, cuts=cuts) as trace:
            x_pass(model, trace)
            with trace.pass_("Y"):
                cut["on"] = True
                S = trace.tensor("S", seq_logprobs(model, *padded_batch(2)))
                cut["on"] = False
                grads = torch.autograd.grad(S.sum(), [p for _, p in named], allow_unused=True)
    finally:
        handle.remove()
    lost = {n for (n, _), g in zip(named, grads, strict=True) if g is None}
    assert lost == lora_names(model)
    assert trace.passes["X"].covered - trace.passes["Y"].covered == lost
    verdict = only([v for v in verdicts_of(trace, "GRAPH_CUT") if v.evidence["op"] is None])
    assert verdict.evidence["kind"] == "detach"
    assert verdict.evidence["module"] == f"{BLOCK}.1"
    assert "logits = model(" in source_at(verdict.evidence["location"])
    assert set(verdict.evidence["lost"]) == lost
    assert trace.verdicts()[0].code == "GRAPH_CUT"
    if cuts == "ops":  # the op level sees the hook's own line, inside h.1's call
        c = only(ops_cuts(trace))
        assert (c.kind, c.op, c.module) == ("detach", "detach", f"{BLOCK}.1")
        assert "out.detach()" in source_at(c.location)


@pytest.mark.slow  # builds a real GPT-2
@needs_hf
def test_gpt2_lora_detach_inside_a_block_found_at_op_level(monkeypatch):
    """Block h.1's forward detaches its input: h.0's adapters lose their gradient."""
    model = gpt2()
    block = model.base_model.model.transformer.h[1]
    original = block.forward

    def detaching_forward(hidden_states, *args, **kwargs):
        hidden_states = hidden_states.detach()
        return original(hidden_states, *args, **kwargs)

    named = trainable(model)
    with gradtrace.watch(model, cuts="ops") as trace:
        x_pass(model, trace)
        with trace.pass_("Y"):
            monkeypatch.setattr(block, "forward", detaching_forward)
            S = trace.tensor("S", seq_logprobs(model, *padded_batch(2)))
            grads = torch.autograd.grad(S.sum(), [p for _, p in named], allow_unused=True)
    lost = {n for (n, _), g in zip(named, grads, strict=True) if g is None}
    assert lost == {n for n in lora_names(model) if f"{BLOCK}.0." in n} and lost
    assert trace.passes["X"].covered - trace.passes["Y"].covered == lost

    c = only(ops_cuts(trace))
    assert (c.kind, c.op, c.module, c.pass_name) == ("detach", "detach", f"{BLOCK}.1", "Y")
    assert c.module_type == "GPT2Block"
    assert "hidden_states = hidden_states.detach()" in source_at(c.location)
    cut = only(verdicts_of(trace, "GRAPH_CUT"))
    assert (cut.evidence["kind"], cut.evidence["op"], cut.evidence["module"]) == ("detach", "detach", f"{BLOCK}.1")
    assert set(cut.evidence["lost"]) == lost
    assert "hidden_states.detach()" in source_at(cut.evidence["location"])


@pytest.mark.slow  # builds a real GPT-2
@needs_hf
@pytest.mark.parametrize("cuts", ["modules", "ops"])
def test_gpt2_disabled_adapters_are_a_coverage_gap_not_a_cut(cuts):
    model = gpt2(trainable_ln_f=True)
    with gradtrace.watch(model, cuts=cuts) as trace:
        x_pass(model, trace)
        with trace.pass_("Y"):
            with model.disable_adapter():
                # peft freezes the adapters while they are disabled: ask for what is trainable now
                named = trainable(model)
                S = trace.tensor("S", seq_logprobs(model, *padded_batch(2)))
                grads = torch.autograd.grad(S.sum(), [p for _, p in named], allow_unused=True)
    assert all(g is not None for g in grads)
    assert lora_names(model) and {n for n, _ in named}.isdisjoint(lora_names(model))
    gap = only(verdicts_of(trace, "COVERAGE_GAP"))
    assert (gap.evidence["a"], gap.evidence["b"]) == ("X", "Y")
    assert set(gap.evidence["only_a"]) == lora_names(model)
    assert gap.evidence["only_b"] == []
    assert not verdicts_of(trace, "GRAPH_CUT")
    assert trace.cuts == []
