"""GradtraceCallback on the real clients: transformers' Trainer (LoRA via peft) and TRL's GRPOTrainer.

The oracle is the Trainer itself: it logs the pre-clip ``grad_norm`` of every
optimizer step; the callback's pass for that step must give the same total
norm. Models are random-weight tiny Llamas built from a config, the tokenizer
a WordLevel one built here: nothing is downloaded.
"""
from __future__ import annotations

import re

import pytest
import torch

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
    # each of these was accepted, and failed (or not) only once training began
    (dict(max_passes=0), "max_passes=...) is a positive int"),
    (dict(max_passes="10"), "max_passes=...) is a positive int"),
    (dict(cuts="bogus"), "cuts='bogus') is one of modules, ops, off"),
    (dict(prefix=None), "prefix=...) is a string"),
    (dict(print_errors="yes"), "print_errors=...) is True or False"),
])
def test_bad_options_are_refused_at_construction(options, says):
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
    printed = [line for line in capsys.readouterr().out.splitlines() if re.match(r"gradtrace step \d+: GRAPH_CUT: ", line)]
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


# ---- TRL GRPO: register= for extra tensors (the GRPO tensors themselves: tests/test_grpo.py) --------
def _register_shuffled_advantages(trace, inputs):
    trace.tensor("A (shuffled microbatch)", inputs["advantages"], expect_grad=False)


def test_grpo_register_adds_tensors_beside_the_automatic_ones(tmp_path, capsys):
    pytest.importorskip("trl")
    pytest.importorskip("datasets")
    tokenizer = make_tokenizer()
    collector = LogCollector()
    trainer = grpo_trainer(tmp_path, with_lora(make_llama(len(tokenizer))), tokenizer, [collector])
    callback = GradtraceCallback(register=_register_shuffled_advantages).attach(trainer)
    trainer.train()
    trace = callback.trace
    # generation runs under no_grad by design: not a cut of A, nor of anything the loss needed
    wrong = [v for v in trace.verdicts() if v.code in ("TENSOR_NO_GRAD", "GRAPH_CUT")]
    assert wrong == [], [str(v) for v in wrong]
    assert _errors(trace) == [], [str(v) for v in _errors(trace)]
    assert trace.tensors["A (shuffled microbatch)"].calls == 2  # one microbatch per step
    assert trace.tensors["advantages"].calls == 2 and trace.tensors["advantages"].role == "group"  # the automatic one
    for step, logged in collector.grad_norms().items():  # the GRPO loss's pre-clip norm, too
        assert trace.passes[f"step-{step}"].total_norm == pytest.approx(logged, rel=REL)
    assert sorted(collector.grad_norms()) == [1, 2]
    assert "gradtrace step" not in capsys.readouterr().out


# ---- what a batch says (issue 20, item 9) ----------------------------------------------
@pytest.mark.parametrize("field, names", [("labels", "labels != -100"), ("attention_mask", "attention_mask")])
def test_a_batch_that_selects_nothing_is_named_first(field, names, tmp_path):
    tokenizer = make_tokenizer()
    data = lm_data(tokenizer)
    for row in data:
        row[field] = [-100 if field == "labels" else 0] * len(row[field])
    collector = LogCollector()
    trainer = transformers.Trainer(model=with_lora(make_llama(len(tokenizer))), args=training_args(tmp_path),
                                   train_dataset=data, data_collator=transformers.default_data_collator,
                                   callbacks=[collector])
    callback = GradtraceCallback().attach(trainer)
    trainer.train()
    assert set(collector.grad_norms().values()) == {0.0}  # the step's gradients are zero
    first = callback.printed[0]
    assert first.startswith(f"gradtrace step 1: ALL_ZERO_VALUES: tensor '{names}' selects nothing"), first


def test_a_healthy_batch_registers_its_facts_and_finds_nothing(tmp_path):
    tokenizer = make_tokenizer()
    callback = GradtraceCallback()
    _train(with_lora(make_llama(len(tokenizer))), training_args(tmp_path, max_steps=1), tokenizer, callback)
    labels = callback.trace.tensors["labels != -100"]
    assert labels.values.zeros == 0 and labels.row_facts["empty_rows"] == 0
    assert callback.printed == [] and _errors(callback.trace) == []


# ---- fp16: the GradScaler's scale (issue 24, item 4) -------------------------------------------
def test_fp16_loss_scale_is_divided_out(tmp_path):
    """accelerate scales the loss by 65536 before backward and unscales before clipping: the Trainer logs the
    unscaled norm, and so must the callback (it reported 5.67e4 for 0.865). On CPU accelerate keeps no
    scaler, so the test gives it one, exactly as it builds one on a GPU."""
    tokenizer = make_tokenizer()
    trainer, collector = _trainer(with_lora(make_llama(len(tokenizer))), training_args(tmp_path, fp16=True),
                                  tokenizer)
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    trainer.accelerator.native_amp = True
    callback = GradtraceCallback().attach(trainer)
    trainer.train()
    _assert_norms_match(callback.trace, collector.grad_norms())
    assert callback.trace.meta["loss_scale"] == {f"step-{n}": 65536.0 for n in range(1, STEPS + 1)}
    assert _errors(callback.trace) == []


# ---- without attach() (issue 25) ----------------------------------------------------------
def test_unattached_callback_warns_once_at_train_begin(tmp_path):
    tokenizer = make_tokenizer()
    callback = GradtraceCallback()
    trainer, collector = _trainer(with_lora(make_llama(len(tokenizer))), training_args(tmp_path), tokenizer,
                                  callback)
    with pytest.warns(UserWarning, match=r"callback\.attach\(trainer\)") as caught:
        trainer.train()
        trainer.train()  # a second run: no second warning
    assert sum("attach" in str(w.message) for w in caught) == 1
    # it still traced; its metrics reached no reporter (the collector runs before it)
    assert list(callback.trace.passes) == [f"step-{n}" for n in range(1, STEPS + 1)]
    assert not any("gradtrace/total_norm" in logs for _, logs in collector.logs)


# ---- a step that raises --------------------------------------------------------------------
def test_a_step_that_raises_is_pass_failed_and_printed(tmp_path):
    tokenizer = make_tokenizer()
    trainer, _ = _trainer(with_lora(make_llama(len(tokenizer))), training_args(tmp_path), tokenizer)
    compute_loss = trainer.compute_loss

    def breaks_at_step_2(model, inputs, *args, **kwargs):
        if trainer.state.global_step == 1:
            raise ValueError("bad batch")
        return compute_loss(model, inputs, *args, **kwargs)

    trainer.compute_loss = breaks_at_step_2
    callback = GradtraceCallback().attach(trainer)
    with pytest.raises(ValueError, match="bad batch"):
        trainer.train()
    assert callback.trace.passes["step-2"].failed == "ValueError: bad batch"
    assert callback.printed[0].startswith("gradtrace step 2: PASS_FAILED: pass 'step-2' ended with an exception")
    callback.close()
    with gradtrace.watch(trainer.model):  # the hooks are gone
        pass


def test_attach_checks_what_it_is_given(tmp_path):
    with pytest.raises(gradtrace.GradtraceError, match="attach\\(\\) takes a transformers.Trainer"):
        GradtraceCallback().attach(object())
    tokenizer = make_tokenizer()
    trainer, _ = _trainer(with_lora(make_llama(len(tokenizer))), training_args(tmp_path), tokenizer)
    callback = GradtraceCallback().attach(trainer)
    with pytest.raises(gradtrace.GradtraceError, match="already attached"):
        callback.attach(trainer)
    callback.close()
    assert "compute_loss" not in vars(trainer) and callback.attach(trainer) is callback  # given back, attachable again
