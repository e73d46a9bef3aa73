"""GRPO-native: ``GradtraceCallback().attach(trainer)`` on real trl 1.16 GRPO/RLOO trainers (issue 21).

Tiny random-weight Llama / Qwen2 models from configs, a WordLevel tokenizer built
here, 2 optimizer steps each: nothing is downloaded. Healthy configurations must
give no error or warning, print nothing, and equal the Trainer's own logged
``grad_norm`` on every step. Each injected cause asserts the first line the
callback prints: its code and what it names.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import List, Optional

import pytest
import torch

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

trl = pytest.importorskip("trl")
pytest.importorskip("datasets")
pytest.importorskip("peft")

from gradtrace.integrations.grpo import TRUNCATION_FLAGS  # noqa: E402
from gradtrace.integrations.transformers import GradtraceCallback  # noqa: E402
from tiny_trainer import (LogCollector, characters, grpo_trainer, make_llama, make_qwen2,  # noqa: E402
                          make_tokenizer, with_lora)

REL = 1e-5
HERE = os.path.basename(__file__)


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


MODELS = {
    "llama-lora": lambda n: with_lora(make_llama(n)),
    "llama-dora": lambda n: with_lora(make_llama(n), use_dora=True),
    "qwen2-lora": lambda n: with_lora(make_qwen2(n)),
    "qwen2-full": make_qwen2,
}


@dataclass
class Run:
    callback: GradtraceCallback
    collector: LogCollector
    trainer: object
    error: Optional[BaseException]

    @property
    def trace(self):
        return self.callback.trace

    @property
    def printed(self) -> List[str]:
        return self.callback.printed

    def logged(self, key):
        return {step: logs[key] for step, logs in self.collector.logs if key in logs}


def _saved(make, tmp_path, vocab):
    """A model TRL loads by path itself (as it must to build a separate reference model): saved locally."""
    path = tmp_path / "model"
    make(vocab).save_pretrained(path)
    return str(path)


def train(tmp_path, tokenizer, model="llama-lora", trainer_cls=None, reward=characters, cuts="modules",
          freeze=None, **config) -> Run:
    if model == "qwen2-full-by-path":
        net = _saved(make_qwen2, tmp_path, len(tokenizer))
    else:
        net = MODELS[model](len(tokenizer))
    if freeze is not None:
        for name, p in net.named_parameters():
            if freeze(name):
                p.requires_grad_(False)
    collector = LogCollector()
    options = dict(per_device_train_batch_size=4, num_generations=2)
    options.update(config)
    trainer = grpo_trainer(tmp_path, net, tokenizer, [collector], reward_funcs=reward, trainer_cls=trainer_cls,
                           **options)
    callback = GradtraceCallback(cuts=cuts).attach(trainer)
    error = None
    try:
        with callback:
            trainer.train()
    except Exception as e:  # an injected cause may crash the step: the callback still printed its cause
        error = e
    return Run(callback, collector, trainer, error)


# ---- healthy configurations ---------------------------------------------------------
HEALTHY = {
    "lora-grpo-beta0": dict(),
    "dora-bnpo-beta0.1": dict(model="llama-dora", loss_type="bnpo", beta=0.1),
    "qwen2-lora-dapo-beta0.1": dict(model="qwen2-lora", loss_type="dapo", beta=0.1),
    "qwen2-full-grpo": dict(model="qwen2-full"),
    # beta > 0 without peft: TRL loads a separate reference model from the model's path
    "qwen2-full-ref-model": dict(model="qwen2-full-by-path", beta=0.04),
    "accumulation-2": dict(gradient_accumulation_steps=2),
    "reentrant-checkpointing": dict(gradient_checkpointing=True,
                                    gradient_checkpointing_kwargs={"use_reentrant": True}),
    "non-reentrant-checkpointing": dict(gradient_checkpointing=True,
                                        gradient_checkpointing_kwargs={"use_reentrant": False}),
    "num-iterations-2": dict(num_iterations=2),
    "steps-per-generation-2": dict(steps_per_generation=2),
    "mask-truncated-completions": dict(mask_truncated_completions=True),
    "rloo": dict(trainer_cls="rloo"),
    # transformers' continuous batching (a vLLM-free generation path): TRL runs the model in bfloat16
    "continuous-batching": dict(use_transformers_continuous_batching=True),
}


@pytest.mark.parametrize("name", list(HEALTHY))
def test_healthy_configuration(name, tmp_path, tokenizer):
    config = dict(HEALTHY[name])
    if config.get("trainer_cls") == "rloo":
        config["trainer_cls"] = trl.RLOOTrainer
    run = train(tmp_path, tokenizer, **config)
    assert run.error is None, run.error
    trace = run.trace
    bad = [str(v) for v in trace.verdicts() if v.severity in ("error", "warning")]
    assert bad == [] and run.printed == []
    grad_norms = run.logged("grad_norm")
    assert sorted(grad_norms) == [1, 2]
    # The Trainer's norm is computed in the parameters' dtype; gradtrace's in float64.
    dtype = next(p.dtype for p in run.trainer.model.parameters() if p.requires_grad)
    rel = REL if dtype == torch.float32 else 2.0 ** -7
    for step, logged in grad_norms.items():
        assert trace.passes[f"step-{step}"].total_norm == pytest.approx(logged, rel=rel), step
    assert run.logged("gradtrace/total_norm") == pytest.approx(grad_norms, rel=rel)
    # registered by attach() alone, in group order: rows are the 2 completions of one prompt
    assert {"advantages", "S", "completion_mask", "rewards/characters"} <= set(trace.tensors)
    assert trace.tensors["advantages"].shape[-1] == 2 and trace.tensors["advantages"].role == "group"
    assert trace.tensors["S"].requires_grad and all(f.reached for f in trace.tensors["S"].grads.values())
    if name == "qwen2-full-ref-model":  # the reference log-probs came from a separate model
        assert run.trainer.ref_model is not None and run.trainer.ref_model is not run.trainer.model
    if name == "mask-truncated-completions":  # TRL emptied some rows by design: counted, not a finding
        flags = trace.tensors[TRUNCATION_FLAGS].values
        assert 0 < flags.zeros < flags.numel
        assert all(ratio > 0 for ratio in run.logged("completions/clipped_ratio").values())


def test_training_is_bitwise_the_same_with_and_without_the_callback(tmp_path, tokenizer):
    """attach() wraps methods and registers tensors; it never changes a gradient, a weight or the RNG."""
    def final_state(traced: bool):
        net = MODELS["llama-lora"](len(tokenizer))
        collector = LogCollector()
        trainer = grpo_trainer(tmp_path / str(traced), net, tokenizer, [collector], per_device_train_batch_size=4,
                               beta=0.1)
        if traced:
            GradtraceCallback().attach(trainer)
        trainer.train()
        weights = {n: p.detach().clone() for n, p in net.named_parameters() if p.requires_grad}
        return weights, collector.grad_norms(), torch.get_rng_state()

    plain, traced = final_state(False), final_state(True)
    assert plain[0].keys() == traced[0].keys()
    assert all(torch.equal(plain[0][n], traced[0][n]) for n in plain[0])
    assert plain[1] == traced[1] and torch.equal(plain[2], traced[2])


def test_groups_match_trls_frac_reward_zero_std(tmp_path, tokenizer):
    """Half the prompts get one reward for every completion: CONSTANT_ROWS is TRL's frac_reward_zero_std."""
    def half_constant(prompts, completions, **kwargs):
        return [1.0 if p.startswith("the") else float(len(c)) for p, c in zip(prompts, completions, strict=True)]

    run = train(tmp_path, tokenizer, reward=half_constant)
    first = run.printed[0]
    assert first.startswith("gradtrace step 1: CONSTANT_ROWS: tensor 'rewards/half_constant': ")
    verdict = next(v for v in run.trace.verdicts() if v.code == "CONSTANT_ROWS"
                   and v.evidence["tensor"] == "rewards/half_constant")
    trl_fractions = list(run.logged("frac_reward_zero_std").values())
    assert verdict.evidence["fraction"] == pytest.approx(sum(trl_fractions) / len(trl_fractions))
    assert trl_fractions == [0.5, 0.5]
    # printed once, although both steps show it
    assert sum("CONSTANT_ROWS: tensor 'rewards/half_constant'" in line for line in run.printed) == 1


# ---- injected causes: the first printed line ------------------------------------------
def constant(completions, **kwargs):
    return [1.0] * len(completions)


def zero(completions, **kwargs):
    return [0.0] * len(completions)


def nan_reward(completions, **kwargs):
    return [float("nan")] * len(completions)


class EmptyMask(trl.GRPOTrainer):
    """A completion mask that selects nothing (a prompt-length mismatch)."""

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        out["completion_mask"] = torch.zeros_like(out["completion_mask"])
        return out


class MaskOnPadding(trl.GRPOTrainer):
    """A completion mask that also selects the padding after each EOS."""

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        out["completion_mask"] = torch.ones_like(out["completion_mask"])
        return out


class LogpsUnderNoGrad(trl.GRPOTrainer):
    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        with torch.no_grad():  # the injected cause: the policy's log-probs without a graph
            return super()._get_per_token_logps_and_entropies(*args, **kwargs)  # the model runs here


class LogpsDetached(trl.GRPOTrainer):
    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        logps, entropies, aux = super()._get_per_token_logps_and_entropies(*args, **kwargs)
        return logps.detach(), entropies, aux  # the injected cause


class LossDetached(trl.GRPOTrainer):
    def _compute_loss(self, model, inputs):
        loss = super()._compute_loss(model, inputs)
        return loss.detach().requires_grad_()  # the injected cause: backward runs, but reaches nothing


def _line_of(cls, text):
    import inspect
    lines, start = inspect.getsourcelines(cls)
    return start + next(i for i, line in enumerate(lines) if text in line)


CAUSES = {
    "zero-variance-every-group": (dict(reward=constant), ("CONSTANT_ROWS",), ["rewards/constant"],
                                  "2 of 2 groups (100%, as TRL's frac_reward_zero_std counts them) have zero variance"),
    "rewards-all-zero": (dict(reward=zero), ("ALL_ZERO_VALUES",), ["rewards/zero"], "is all zeros"),
    "nan-rewards": (dict(reward=nan_reward), ("NONFINITE",), ["rewards/nan_reward"], "NaN"),
    "empty-completion-mask": (dict(trainer_cls=EmptyMask), ("ALL_ZERO_VALUES",), ["completion_mask"],
                              "selects nothing"),
    "mask-on-padding": (dict(trainer_cls=MaskOnPadding), ("MASK_ON_PADDING",), ["completion_mask"], "padding"),
    "every-completion-truncated": (dict(mask_truncated_completions=True, max_completion_length=2),
                                   ("ALL_ZERO_VALUES",), ["completion_mask"],
                                   "every completion hit max_completion_length (4 of 4 truncated) and "
                                   "mask_truncated_completions=True masked them all out"),
}


@pytest.mark.parametrize("name", list(CAUSES))
def test_injected_cause_is_the_first_printed_line(name, tmp_path, tokenizer):
    config, codes, names, says = CAUSES[name]
    run = train(tmp_path, tokenizer, **config)
    assert run.printed, [str(v) for v in run.trace.verdicts()]
    first = run.printed[0]
    match = re.match(r"gradtrace step 1: (\w+): ", first)
    assert match and match.group(1) in codes, first
    assert any(f"'{n}'" in first for n in names) and says in first, first


def test_frozen_adapters_are_named_before_training_goes_on(tmp_path, tokenizer):
    run = train(tmp_path, tokenizer, freeze=lambda name: "lora_" in name)
    assert run.printed[0].startswith("gradtrace: not tracing this run: ")
    assert "no trainable parameter" in run.printed[0] and "is_trainable=True" in run.printed[0]
    assert run.trace is None


def test_logps_under_no_grad_are_named_at_their_line(tmp_path, tokenizer):
    run = train(tmp_path, tokenizer, trainer_cls=LogpsUnderNoGrad)
    assert run.error is not None  # backward has nothing to differentiate: the step crashes
    line = _line_of(LogpsUnderNoGrad, "the model runs here")
    first = run.printed[0]
    assert first.startswith("gradtrace step 1: TENSOR_NO_GRAD: tensor 'S' ") and f"{HERE}:{line}" in first, first


def test_logps_detached_are_named_at_their_line_with_op_cuts(tmp_path, tokenizer):
    run = train(tmp_path, tokenizer, trainer_cls=LogpsDetached, cuts="ops")
    line = _line_of(LogpsDetached, "logps.detach()")
    first = run.printed[0]
    assert first.startswith("gradtrace step 1: TENSOR_NO_GRAD: tensor 'S' ") and f"{HERE}:{line}" in first, first


def test_a_detached_loss_names_s_first(tmp_path, tokenizer):
    run = train(tmp_path, tokenizer, trainer_cls=LossDetached)
    assert run.error is None  # backward ran: it reached no parameter
    first = run.printed[0]
    assert first.startswith("gradtrace step 1: TENSOR_NOT_REACHED: tensor 'S' "), run.printed


@pytest.mark.parametrize("trainer_cls, cuts, marker", [(LogpsUnderNoGrad, "modules", "the model runs here"),
                                                        (LogpsDetached, "ops", "logps.detach()")],
                         ids=["no_grad", "detach-ops"])
def test_a_crashed_step_is_recorded_and_its_cause_named_at_its_line(trainer_cls, cuts, marker, tmp_path, tokenizer):
    """Until ranking is causal the crash leads; the cause is printed in the same step, at its line."""
    run = train(tmp_path, tokenizer, trainer_cls=trainer_cls, cuts=cuts)
    assert isinstance(run.error, RuntimeError)  # backward has nothing to differentiate
    assert run.trace.passes["step-1"].failed.startswith("RuntimeError")
    named = [p for p in run.printed if p.startswith("gradtrace step 1: TENSOR_NO_GRAD: tensor 'S' ")]
    assert named and f"{HERE}:{_line_of(trainer_cls, marker)}" in named[0], run.printed
    assert any(p.startswith("gradtrace step 1: PASS_FAILED: ") for p in run.printed)
    # data tensors registered beside it are not blamed for the crash
    assert not any("TENSOR_NO_GRAD: tensor 'rewards" in p or "TENSOR_NO_GRAD: tensor 'advantages'" in p
                   for p in run.printed)


def test_rewards_collapsing_at_step_2_are_named_in_step_2(tmp_path, tokenizer):
    calls = []

    def collapses(completions, **kwargs):
        calls.append(1)
        return [float(len(c)) for c in completions] if len(calls) == 1 else [1.0] * len(completions)

    run = train(tmp_path, tokenizer, reward=collapses)
    assert not [p for p in run.printed if p.startswith("gradtrace step 1:")]
    first = run.printed[0]
    assert first.startswith("gradtrace step 2: CONSTANT_ROWS: tensor 'rewards/collapses': 2 of 2 groups"), first


def test_a_negligible_learning_rate_is_named(tmp_path, tokenizer):
    run = train(tmp_path, tokenizer, learning_rate=1e-9)
    assert run.printed and re.match(r"gradtrace step \d+: TINY_UPDATES: ", run.printed[0]), run.printed


def test_close_gives_the_trainer_its_methods_back(tmp_path, tokenizer):
    trainer = grpo_trainer(tmp_path, with_lora(make_llama(len(tokenizer))), tokenizer)
    wrapped = ("log", "compute_loss", "training_step", "_generate_and_score_completions", "_calculate_rewards",
               "_get_per_token_logps_and_entropies")
    before = {name: vars(trainer).get(name) for name in wrapped}
    callback = GradtraceCallback().attach(trainer)
    assert all(vars(trainer).get(name) is not None for name in wrapped)
    callback.close()
    assert {name: vars(trainer).get(name) for name in wrapped} == before
    assert type(trainer)._generate_and_score_completions is trl.GRPOTrainer._generate_and_score_completions
