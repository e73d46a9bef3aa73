"""GradtraceCallback on the real clients: transformers' Trainer (LoRA via peft) and TRL's GRPOTrainer.

The oracle is the Trainer itself: it logs the pre-clip ``grad_norm`` of every
optimizer step; the callback's pass for that step must give the same total
norm. Models are random-weight tiny Llamas built from a config, the tokenizer
a WordLevel one built here: nothing is downloaded.
"""
from __future__ import annotations

import re

import pytest

import gradtrace

pytestmark = [
    pytest.mark.slow,
    # peft and transformers ask each other deprecated questions; not ours to fix
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
tokenizers = pytest.importorskip("tokenizers")

from gradtrace.integrations.transformers import GradtraceCallback  # noqa: E402  (needs transformers)
from tiny_trainer import LogCollector, lm_data, make_llama, make_tokenizer, training_args, with_lora  # noqa: E402
from tiny_trainer import grpo_trainer  # noqa: E402

SEQ = 8
STEPS = 3
REL = 1e-5


def _trainer(model, args, tokenizer, *callbacks):
    """A Trainer on the tiny LM data, with a LogCollector first among the user callbacks."""
    collector = LogCollector()
    trainer = transformers.Trainer(model=model, args=args, train_dataset=lm_data(tokenizer),
                                   data_collator=transformers.default_data_collator,
                                   callbacks=[collector, *callbacks])
    return trainer, collector


def _train(model, args, tokenizer, callback):
    trainer, collector = _trainer(model, args, tokenizer)
    callback.attach(trainer)
    trainer.train()
    return trainer, collector


def _errors(trace):
    return [v for v in trace.verdicts() if v.severity == "error"]


def _assert_norms_match(trace, grad_norms):
    """Each step's pass gives the Trainer's own pre-clip grad_norm for that step."""
    assert sorted(grad_norms) == list(range(1, STEPS + 1))
    for step, logged in grad_norms.items():
        p = trace.passes[f"step-{step}"]
        assert p.total_norm == pytest.approx(logged, rel=REL), f"step {step}"


# ---- transformers Trainer --------------------------------------------------------
def test_trainer_lora_accumulation_and_clipping(tmp_path, capsys):
    tokenizer = make_tokenizer()
    model = with_lora(make_llama(len(tokenizer)))
    callback = GradtraceCallback(save_dir=str(tmp_path / "traces"))
    args = training_args(tmp_path, gradient_accumulation_steps=2, max_grad_norm=1e-3)
    trainer, collector = _train(model, args, tokenizer, callback)
    trace = callback.trace
    grad_norms = collector.grad_norms()
    assert min(grad_norms.values()) > 10 * args.max_grad_norm  # clipping really changed every step
    _assert_norms_match(trace, grad_norms)
    assert [p.runs for p in trace.passes.values()] == [2] * STEPS  # both microbatches in the step's pass
    assert _errors(trace) == []
    assert "gradtrace step" not in capsys.readouterr().out  # no error printed
    # the metrics reached the reporters' logs and log_history, the same keys every step
    for step, logs in collector.logs:
        if "grad_norm" in logs:
            assert logs["gradtrace/total_norm"] == pytest.approx(logs["grad_norm"], rel=REL)
            assert (logs["gradtrace/coverage"], logs["gradtrace/errors"]) == (1.0, 0.0)
            assert logs["gradtrace/traced_step"] == step
    history = [h for h in trainer.state.log_history if "grad_norm" in h]
    assert [h["gradtrace/total_norm"] for h in history] == pytest.approx([h["grad_norm"] for h in history], rel=REL)
    saved = gradtrace.load(tmp_path / "traces" / "gradtrace.json")
    assert list(saved.passes) == [f"step-{n}" for n in range(1, STEPS + 1)]


def test_trainer_hooks_removed_after_training(tmp_path):
    tokenizer = make_tokenizer()
    model = with_lora(make_llama(len(tokenizer)))
    callback = GradtraceCallback()
    _train(model, training_args(tmp_path, max_steps=1), tokenizer, callback)
    # a second watch on the same parameters is refused while one is open: this one opens
    with gradtrace.watch(model):
        pass
    assert list(callback.trace.passes) == ["step-1"]


def test_every_second_step_is_logged_and_saved(tmp_path):
    tokenizer = make_tokenizer()
    callback = GradtraceCallback(every=2, save_every=2, save_dir=str(tmp_path / "traces"))
    _, collector = _train(with_lora(make_llama(len(tokenizer))), training_args(tmp_path), tokenizer, callback)
    logged = [logs["gradtrace/traced_step"] for _, logs in collector.logs if "gradtrace/traced_step" in logs]
    assert logged == [1.0, 2.0]  # step 1 (the first) and step 2; step 3 is recorded, not judged
    assert list(callback.trace.passes) == ["step-1", "step-2", "step-3"]
    assert list(gradtrace.load(tmp_path / "traces" / "step-2.json").passes) == ["step-1", "step-2"]
    assert sorted(p.name for p in (tmp_path / "traces").iterdir()) == ["gradtrace.json", "step-2.json"]


@pytest.mark.parametrize("options, says", [
    (dict(every=0), "every=...) is a positive int"),
    (dict(save_every=3), "give save_dir too"),
    (dict(register="A"), "register=...) is a function"),
])
def test_bad_options_are_refused(options, says):
    with pytest.raises(gradtrace.GradtraceError, match=re.escape(says)):
        GradtraceCallback(**options)


def test_register_without_attach_is_refused_before_any_hook(tmp_path):
    tokenizer = make_tokenizer()
    model = with_lora(make_llama(len(tokenizer)))
    trainer, _ = _trainer(model, training_args(tmp_path), tokenizer, GradtraceCallback(register=print))
    with pytest.raises(gradtrace.GradtraceError, match=re.escape("callback.attach(trainer)")):
        trainer.train()
    with gradtrace.watch(model):  # nothing was left watching the parameters
        pass


class Explodes(transformers.TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 2:
            raise RuntimeError("boom")


def test_close_after_a_failed_run_keeps_the_trace(tmp_path):
    tokenizer = make_tokenizer()
    model = with_lora(make_llama(len(tokenizer)))
    callback = GradtraceCallback()
    trainer, _ = _trainer(model, training_args(tmp_path), tokenizer, Explodes())
    callback.attach(trainer)  # after Explodes: step 2's pass is still open when it raises
    with pytest.raises(RuntimeError, match="boom"), callback:
        trainer.train()
    assert list(callback.trace.passes) == ["step-1", "step-2"]  # the open pass was ended, not lost
    with gradtrace.watch(model):  # refused while another watch holds these parameters: the hooks are gone
        pass


def _checkpointed(tokenizer, input_grads):
    """LoRA under reentrant checkpointing, enabled on the model (as custom set-ups do).

    transformers 5 calls ``enable_input_require_grads`` itself when the
    Trainer turns checkpointing on; enabling it here and undoing that shows
    the set-up older versions and custom models give.
    """
    model = with_lora(make_llama(len(tokenizer)))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    if input_grads:
        model.enable_input_require_grads()
    else:
        model.base_model.model.disable_input_require_grads()
        # a trainable final norm outside the checkpointed layers, so the loss still has a graph
        model.base_model.model.model.norm.weight.requires_grad_(True)
    return model


def test_trainer_reentrant_checkpointing(tmp_path):
    tokenizer = make_tokenizer()
    model = _checkpointed(tokenizer, input_grads=True)
    callback = GradtraceCallback()
    _, collector = _train(model, training_args(tmp_path, gradient_accumulation_steps=2), tokenizer, callback)
    _assert_norms_match(callback.trace, collector.grad_norms())
    assert _errors(callback.trace) == []


def test_trainer_reentrant_checkpointing_without_input_grads(tmp_path, capsys):
    tokenizer = make_tokenizer()
    model = _checkpointed(tokenizer, input_grads=False)
    callback = GradtraceCallback()
    _train(model, training_args(tmp_path), tokenizer, callback)
    trace = callback.trace
    lora = {n for n in trace.params if "lora_" in n}
    assert lora and all(lora <= p.missing for p in trace.passes.values())  # the adapters never got a gradient
    cuts = [v for v in _errors(trace) if v.code == "GRAPH_CUT"]
    assert cuts, [str(v) for v in trace.verdicts()]
    assert "enable_input_require_grads" in cuts[0].message
    # each finding printed once, when first seen, although every step repeats it
    printed = [line for line in capsys.readouterr().out.splitlines() if "GRAPH_CUT" in line]
    assert printed and all(line.startswith("gradtrace step 1: GRAPH_CUT: ") for line in printed)
    assert len(printed) == len({v.message for v in cuts if v.evidence.get("pass") == "step-1"})


def test_plain_watch_unlabelled_runs_under_reentrant_checkpointing(tmp_path):
    """No callback: one unlabelled pass per backward run; figures are .grad as each run left it (pre-clip)."""
    tokenizer = make_tokenizer()
    model = _checkpointed(tokenizer, input_grads=True)
    trainer, collector = _trainer(model, training_args(tmp_path, max_grad_norm=1e-3), tokenizer)
    with gradtrace.watch(trainer.model) as trace:
        trainer.train()
    assert [v for v in _errors(trace) if v.code == "ZERO_GRADS"] == []
    norms = [p.total_norm for p in trace.passes.values()]
    logged = [collector.grad_norms()[step] for step in range(1, STEPS + 1)]
    assert norms == pytest.approx(logged, rel=REL)


# ---- TRL GRPO --------------------------------------------------------------------
def _register_a_and_mask(trace, inputs):
    trace.tensor("A", inputs["advantages"])
    trace.tensor("completion_mask", inputs["completion_mask"])


def test_grpo_registers_advantages_without_false_cuts(tmp_path, capsys):
    pytest.importorskip("trl")
    pytest.importorskip("datasets")
    tokenizer = make_tokenizer()
    collector = LogCollector()
    trainer = grpo_trainer(tmp_path, with_lora(make_llama(len(tokenizer))), tokenizer, [collector])
    callback = GradtraceCallback(register=_register_a_and_mask).attach(trainer)
    trainer.train()
    trace = callback.trace
    # generation runs under no_grad by design: not a cut of A, nor of anything the loss needed
    wrong = [v for v in trace.verdicts() if v.code in ("TENSOR_NO_GRAD", "GRAPH_CUT")]
    assert wrong == [], [str(v) for v in wrong]
    assert _errors(trace) == [], [str(v) for v in _errors(trace)]
    assert trace.tensors["A"].calls == 2 and trace.tensors["completion_mask"].calls == 2
    for step, logged in collector.grad_norms().items():  # the GRPO loss's pre-clip norm, too
        assert trace.passes[f"step-{step}"].total_norm == pytest.approx(logged, rel=REL)
    assert sorted(collector.grad_norms()) == [1, 2]
    assert "gradtrace step" not in capsys.readouterr().out
