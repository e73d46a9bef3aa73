"""Activation checkpointing: what each pass reaches, how runs are counted, and the cut it leaves.

Reentrant checkpointing (``use_reentrant=True``) runs the segment's forward
under ``no_grad`` and recomputes it inside backward with a nested engine run:

* ``.backward()`` still reaches the segment's parameters (through the nested
  run), and a pass counts the user's backward calls, not the nested runs;
* ``torch.autograd.grad(..., allow_unused=True)`` hands back ``None`` for them:
  gradtrace shows them missing and a ``GRAPH_CUT`` of kind ``checkpoint``
  naming the module that ran inside the checkpoint, with the fix.

Non-reentrant checkpointing (``use_reentrant=False``) is transparent: full
coverage in both passes and no cut. Checked on a small model and on a tiny
GPT-2 from ``transformers`` with a ``peft`` LoRA and
``gradient_checkpointing_enable``.
"""
from __future__ import annotations

import os
import warnings

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import gradtrace

from cut_helpers import needs_hf, peft, source_line, transformers, verdicts_of

HERE = os.path.basename(__file__)






def trainable(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def dot_grad_oracle(model):
    """Reached in .backward() <=> .grad was written (an exactly zero gradient counts)."""
    return {n for n, p in trainable(model) if p.grad is not None}


# ---------------------------------------------------------------- a small model


class Segmented(nn.Module):
    """Checkpointed blocks over an input that requires grad, optionally followed by a head.

    Without the head every parameter lives inside a segment: the outer engine
    run reaches no watched parameter before (or after) the nested runs.
    """

    def __init__(self, use_reentrant: bool, head: bool = True, blocks: int = 1):
        super().__init__()
        self.use_reentrant = use_reentrant
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
                                    for _ in range(blocks))
        self.head = nn.Linear(4, 1) if head else None

    def forward(self, x):
        h = x
        for block in self.blocks:
            h = checkpoint(block, h, use_reentrant=self.use_reentrant)
        return (self.head(h) if self.head is not None else h).pow(2).sum()


def inputs(seed):
    # requires grad, as transformers' enable_input_require_grads makes the embeddings
    return torch.randn(3, 4, generator=torch.Generator().manual_seed(seed)).requires_grad_(True)


def x_backward_then_y_grad(model, named, cuts):
    """Pass X: .backward() over two microbatches; pass Y: autograd.grad over every trainable parameter."""
    with gradtrace.watch(model, cuts=cuts) as trace:
        with trace.pass_("X"):
            for s in range(2):
                model(inputs(s)).backward()
        with trace.pass_("Y"):
            grads = torch.autograd.grad(model(inputs(0)), [p for _, p in named], allow_unused=True)
    return trace, grads


SHAPES = [
    pytest.param(dict(head=True, blocks=1), id="segment_then_head"),
    pytest.param(dict(head=False, blocks=1), id="only_a_segment"),
    pytest.param(dict(head=False, blocks=3), id="three_segments"),
]


@pytest.mark.parametrize("cuts", ["modules", "ops"])
@pytest.mark.parametrize("shape", SHAPES)
def test_reentrant_backward_reaches_the_segment_and_counts_outer_calls(shape, cuts):
    torch.manual_seed(0)
    model = Segmented(use_reentrant=True, **shape)
    with gradtrace.watch(model, cuts=cuts) as trace:
        with trace.pass_("X"):
            for s in range(3):
                model(inputs(s)).backward()
    x = trace.passes["X"]
    assert x.covered == dot_grad_oracle(model) == {n for n, _ in trainable(model)}
    assert x.runs == 3, "nested (reentrant) engine runs must not count as runs"
    for name, record in x.records.items():
        assert record.hits == 3, name


@pytest.mark.parametrize("shape", SHAPES)
def test_reentrant_backward_outside_a_pass_is_one_pass_per_call(shape):
    torch.manual_seed(0)
    model = Segmented(use_reentrant=True, **shape)
    with gradtrace.watch(model) as trace:
        for s in range(2):
            model.zero_grad(set_to_none=True)
            model(inputs(s)).backward()
    passes = trace.passes
    assert len(passes) == 2, list(passes)
    for p in passes.values():
        assert p.runs == 1
        assert p.covered == {n for n, _ in trainable(model)}


@pytest.mark.parametrize("cuts", ["modules", "ops"])
def test_reentrant_autograd_grad_misses_the_segment_with_a_checkpoint_cut(cuts):
    torch.manual_seed(0)
    model = Segmented(use_reentrant=True)
    named = trainable(model)
    trace, grads = x_backward_then_y_grad(model, named, cuts)
    unreached = {n for (n, _), g in zip(named, grads, strict=True) if g is None}
    assert unreached == {n for n, _ in named if n.startswith("blocks.0.")}

    y = trace.passes["Y"]
    assert y.missing == unreached
    assert y.covered == {"head.weight", "head.bias"}
    assert y.runs == 1
    verdict = next(v for v in verdicts_of(trace, "GRAPH_CUT") if "Y" in v.evidence["passes"])
    assert verdict.evidence["kind"] == "checkpoint"
    assert verdict.evidence["module"] == "blocks.0"  # the checkpointed module itself
    assert set(verdict.evidence["lost"]) == unreached
    assert "use_reentrant=False" in verdict.message
    assert "checkpoint(block, h" in source_at(verdict.evidence["location"])
    assert verdict.severity == "error"
    assert trace.verdicts()[0].code == "GRAPH_CUT"
    gap = verdicts_of(trace, "COVERAGE_GAP")
    assert gap and set(gap[0].evidence["only_a"]) == unreached
    if cuts == "ops":  # the segment's own ops run inside a module called without grad: no op-level echo
        assert all(c.op is None for c in trace.cuts)


@pytest.mark.parametrize("cuts", ["modules", "ops"])
@pytest.mark.parametrize("shape", SHAPES)
def test_non_reentrant_checkpointing_is_transparent(shape, cuts):
    torch.manual_seed(0)
    model = Segmented(use_reentrant=False, **shape)
    named = trainable(model)
    trace, grads = x_backward_then_y_grad(model, named, cuts)
    everything = {n for n, _ in named}
    assert all(g is not None for g in grads)
    assert trace.passes["X"].covered == trace.passes["Y"].covered == dot_grad_oracle(model) == everything
    assert trace.passes["X"].runs == 2 and trace.passes["Y"].runs == 1
    assert trace.cuts == []
    assert not [v for v in trace.verdicts() if v.severity == "error"]


# ---------------------------------------------------------------- transformers GPT-2 + peft LoRA

VOCAB = 64
BLOCKS = "base_model.model.transformer.h."


def lora_gpt2(use_reentrant: bool):
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=32,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                     bos_token_id=0, eos_token_id=0, use_cache=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # renamed APIs, not ours
        model = peft.get_peft_model(transformers.GPT2LMHeadModel(config),
                                    peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                    target_modules=["c_attn"], fan_in_fan_out=True))
        # transformers also makes the input embeddings require grad (enable_input_require_grads):
        # with a frozen embedding, reentrant segments would otherwise get no gradient at all
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    model.train()  # checkpointing only happens in training mode
    return model


def tokens(seed):
    return torch.randint(1, VOCAB, (2, 8), generator=torch.Generator().manual_seed(seed))


def seq_logprobs(model, ids):
    logits = model(input_ids=ids).logits
    return torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1).sum(-1)


def run_probe(model, microbatches=2):
    named = trainable(model)
    with gradtrace.watch(model) as trace:
        with trace.pass_("X"):
            for s in range(microbatches):
                ids = tokens(s)
                model(input_ids=ids, labels=ids).loss.backward()
        with trace.pass_("Y"):
            S = trace.tensor("S", seq_logprobs(model, tokens(5)))
            grads = torch.autograd.grad(S.sum(), [p for _, p in named], allow_unused=True)
    return trace, named, grads


@pytest.mark.slow  # builds a real GPT-2
@needs_hf
def test_gpt2_lora_reentrant_checkpointing():
    model = lora_gpt2(use_reentrant=True)
    lora = {n for n, _ in trainable(model)}
    assert lora and all("lora_" in n for n in lora)
    trace, named, grads = run_probe(model, microbatches=2)

    # X: .backward() reaches every adapter through the nested recompute runs
    x = trace.passes["X"]
    assert x.covered == dot_grad_oracle(model) == lora
    assert x.runs == 2, "one run per backward call, however many checkpointed layers recompute"

    # Y: autograd.grad hands back None for every adapter, and gradtrace says why
    assert all(g is None for g in grads)
    y = trace.passes["Y"]
    assert y.missing == lora and not y.covered
    cuts = [v for v in verdicts_of(trace, "GRAPH_CUT") if "Y" in v.evidence["passes"]]
    assert cuts
    lost = set()
    for verdict in cuts:
        assert verdict.evidence["kind"] == "checkpoint"
        assert verdict.evidence["module"].startswith(BLOCKS), verdict.evidence["module"]
        assert "use_reentrant=False" in verdict.message
        assert "logits = model(" in source_at(verdict.evidence["location"])
        lost |= set(verdict.evidence["lost"])
    assert lost == lora
    # each checkpointed layer is named (transformers checkpoints the layer's forward, not its call)
    layers = {v.evidence["module"][len(BLOCKS):].split(".")[0] for v in cuts}
    assert layers == {"0", "1"}
    assert trace.verdicts()[0].code == "GRAPH_CUT"
    assert verdicts_of(trace, "NO_COVERAGE")


@pytest.mark.slow  # builds a real GPT-2
@needs_hf
def test_gpt2_lora_non_reentrant_checkpointing_is_transparent():
    model = lora_gpt2(use_reentrant=False)
    lora = {n for n, _ in trainable(model)}
    trace, named, grads = run_probe(model, microbatches=2)
    assert all(g is not None for g in grads)
    assert trace.passes["X"].covered == trace.passes["Y"].covered == dot_grad_oracle(model) == lora
    assert trace.passes["X"].runs == 2 and trace.passes["Y"].runs == 1
    assert trace.cuts == []
    assert not [v for v in trace.verdicts() if v.severity == "error"]


def source_at(location: str) -> str:
    return source_line(location, __file__)
