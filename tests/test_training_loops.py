"""Inside real training loops: what a training step does to .grad must not become a false finding.

Each test is a regression of a set-up a trainer produces (the Trainer calls
zero_grad() before on_step_end; gradient checkpointing; accumulation; GRPO's
data tensors next to no_grad generation; failures), checked against the
gradients the loop itself saw.
"""
import sys
import textwrap

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import gradtrace

from cut_helpers import codes


def errors(trace):
    return [str(v) for v in trace.verdicts() if v.severity == "error"]


class Segmented(nn.Module):
    """A frozen stem, then every trainable parameter inside reentrant-checkpointed blocks."""

    def __init__(self, d=6):
        super().__init__()
        self.stem = nn.Linear(d, d)
        self.stem.requires_grad_(False)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(d, d), nn.Tanh()) for _ in range(2))

    def forward(self, x, inputs_require_grad=True):
        h = self.stem(x)
        if inputs_require_grad:
            h = h.detach().requires_grad_(True)  # what enable_input_require_grads() does for an embedding
        for block in self.blocks:
            h = checkpoint(block, h, use_reentrant=True)
        return h.pow(2).sum()


def grad_norm(model):
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()


def test_unlabelled_runs_under_reentrant_checkpointing_report_what_grad_gained():
    """Regression: every gradient 'exactly zero' (the pass was read after zero_grad)."""
    torch.manual_seed(0)
    model = Segmented()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    seen = []
    with gradtrace.watch(model) as trace:
        for _ in range(3):
            model(torch.randn(4, 6)).backward()
            seen.append(grad_norm(model))
            opt.step()
            model.zero_grad()
    passes = list(trace.passes.values())
    assert [p.total_norm for p in passes] == pytest.approx(seen, rel=1e-6)
    assert all(len(p.covered) == 4 and not p.zero for p in passes)
    assert errors(trace) == []


@pytest.mark.parametrize("read_at", ["pass_end", "run_end"])
def test_a_pass_closed_after_step_and_zero_grad_reads_what_backward_left(read_at):
    """Regression: a callback pass (on_step_begin .. on_step_end) around zero_grad() gave ZERO_GRADS x3."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = []
    with gradtrace.watch(model) as trace:
        for step in range(3):
            with trace.pass_(f"step-{step}", step_start=True, read_at=read_at):
                for _ in range(2):  # accumulation: both microbatches in the pass
                    model(torch.randn(5, 4)).sum().backward()
                seen.append(grad_norm(model))
                opt.step()
                model.zero_grad()  # set_to_none=True, as the Trainer does before on_step_end
    assert [p.total_norm for p in trace.passes.values()] == pytest.approx(seen, rel=1e-6)
    assert [p.runs for p in trace.passes.values()] == [2, 2, 2]
    assert codes(trace) == []


def test_read_at_run_end_gives_pre_clip_figures_and_survives_in_place_zeroing():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    with gradtrace.watch(model) as trace:
        with trace.pass_("step", read_at="run_end"):
            model(torch.randn(5, 4)).sum().backward()
            pre_clip = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3).item()
            model.zero_grad(set_to_none=False)
    assert trace.passes["step"].total_norm == pytest.approx(pre_clip, rel=1e-6)
    assert codes(trace) == []


def test_grads_zeroed_in_place_before_the_pass_ends_are_unknown_not_zero():
    model = nn.Linear(4, 1)
    with gradtrace.watch(model) as trace:
        with trace.pass_("step"):
            model(torch.randn(5, 4)).sum().backward()
            model.zero_grad(set_to_none=False)
    p = trace.passes["step"]
    assert p.cleared == {"weight", "bias"} and p.zero == set()
    assert "ZERO_GRADS" not in codes(trace)
    assert [v.code for v in trace.verdicts()] == ["CLEARED_GRADS"]  # info: the report still leads healthy
    assert trace.report().startswith("gradtrace: no problems found")


def test_optimizer_in_backward_is_not_reported_as_exactly_zero():
    """Regression: a post-accumulate hook that steps and clears .grad made every gradient 'exactly zero'."""
    model = nn.Linear(4, 1)
    opts = {p: torch.optim.SGD([p], lr=0.1) for p in model.parameters()}

    def step_and_clear(p):
        opts[p].step()
        p.grad = None

    for p in model.parameters():
        p.register_post_accumulate_grad_hook(step_and_clear)
    with gradtrace.watch(model) as trace:
        with trace.pass_("step"):
            model(torch.randn(5, 4)).sum().backward()
    p = trace.passes["step"]
    assert p.covered == {"weight", "bias"} and p.zero == set() and p.cleared == {"weight", "bias"}
    assert errors(trace) == []


def test_data_registered_next_to_no_grad_generation_is_data():
    """Regression: GRPO's advantages got TENSOR_NO_GRAD + GRAPH_CUT ('the model ran under no_grad')."""
    torch.manual_seed(0)
    policy = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 10))
    prompts = torch.randint(0, 10, (4, 3))
    with gradtrace.watch(policy) as trace:
        with trace.pass_("step", step_start=True):
            with torch.no_grad():  # generation, by design
                completions = policy(prompts).argmax(-1)
            rewards = (completions == 3).float().sum(-1)
            advantages = trace.tensor("A", (rewards - rewards.mean()) / (rewards.std() + 1e-4))
            logp = policy(prompts).log_softmax(-1).gather(-1, completions[..., None]).squeeze(-1).sum(-1)
            (-(advantages * logp).mean()).backward()
    found = codes(trace)
    assert "TENSOR_NO_GRAD" not in found and "GRAPH_CUT" not in found, found
    # what was recorded: the generation's no_grad forward (judged once, at the root of its no_grad region:
    # capture/module_calls.py), A as data, and a step that reached everything
    assert {(c.kind, c.module) for c in trace.cuts} == {("no_grad", "")}
    assert not trace.tensors["A"].requires_grad and trace.tensors["A"].shape == [4]
    assert trace.passes["step"].covered == {"0.weight", "1.weight", "1.bias"}


def test_frozen_while_watched_and_a_backward_that_raised_are_findings():
    """Regression: parameters frozen after watch began, backward raised -> 'no problems found'."""
    model = nn.Linear(4, 1)
    with gradtrace.watch(model) as trace:
        model.requires_grad_(False)
        with pytest.raises(RuntimeError):
            with trace.pass_("step"):
                model(torch.randn(2, 4)).sum().backward()
    found = codes(trace)
    # The freeze explains the failed backward: it comes first, and the failure points to it.
    assert found[:2] == ["FROZEN_WHILE_WATCHED", "PASS_FAILED"], found
    failed = trace.verdicts()[1]
    assert "does not require grad" in failed.message and failed.evidence["explained_by"] == ["FROZEN_WHILE_WATCHED"]
    assert not trace.report().startswith("gradtrace: no problems found")


def test_a_leaked_set_grad_enabled_false_without_labels_is_no_passes():
    """Regression: set_grad_enabled(False) leaked from a reward function, unlabelled -> 'no problems found'."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    with gradtrace.watch(model) as trace:
        torch.set_grad_enabled(False)  # leaked
        try:
            for _ in range(3):
                loss = model(torch.randn(2, 4)).sum()
                if loss.requires_grad:
                    loss.backward()
        finally:
            torch.set_grad_enabled(True)
    (v,) = [v for v in trace.verdicts() if v.code == "NO_PASSES"]
    assert v.severity == "error" and v.evidence["forward_calls"] == 3 and v.evidence["kind"] == "no_grad"
    assert trace.report().startswith("gradtrace diagnosis: NO_PASSES")


def test_a_watched_block_that_raised_says_so():
    model = nn.Linear(4, 1)
    with pytest.raises(ValueError):
        with gradtrace.watch(model) as trace:
            model(torch.randn(2, 4)).sum().backward()
            raise ValueError("reward function failed")
    assert trace.meta["error"] == "ValueError: reward function failed"
    assert codes(trace)[0] == "PASS_FAILED"


def test_reentrant_checkpointing_without_inputs_requiring_grad_advises_enable_input_require_grads():
    """Regression: the advice was 'use use_reentrant=False or .backward()' although .backward() was used."""
    model = Segmented()
    with gradtrace.watch(model) as trace:
        with pytest.warns(UserWarning, match="None of the inputs have requires_grad=True"):
            loss = model(torch.randn(4, 6), inputs_require_grad=False)
        assert not loss.requires_grad  # nothing to backward: the blocks' parameters can get no gradient
    (v,) = [v for v in trace.verdicts() if v.code == "NO_PASSES"]
    assert "enable_input_require_grads" in v.message and v.evidence["kind"] == "checkpoint"
    assert all(c.inputs_require_grad is False for c in trace.cuts if c.kind == "checkpoint")


def test_a_cut_made_inside_a_library_names_the_library_line_and_the_users(tmp_path, monkeypatch):
    """Regression: every cut's location was the user's line that called trainer.train()."""
    library = tmp_path / "site-packages" / "fakelib"
    library.mkdir(parents=True)
    (library / "__init__.py").write_text(textwrap.dedent("""\
        import torch

        def generate(model, x):
            with torch.no_grad():
                return model(x)
    """))
    monkeypatch.syspath_prepend(str(tmp_path / "site-packages"))
    import fakelib

    model = nn.Linear(4, 4)
    with gradtrace.watch(model) as trace:
        fakelib.generate(model, torch.randn(2, 4))  # the user's line
    (cut,) = trace.cuts
    assert cut.library_location == "fakelib/__init__.py:5"
    assert cut.location.endswith(f"test_training_loops.py:{sys._getframe().f_lineno - 3}")
    sys.modules.pop("fakelib", None)
