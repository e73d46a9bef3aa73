"""The output shown in docs/trainer.md and the README: GradtraceCallback in a Trainer and in TRL's GRPOTrainer.

    OMP_NUM_THREADS=1 python docs/trainer_example.py trainer   # transformers Trainer, LoRA, accumulation 2
    OMP_NUM_THREADS=1 python docs/trainer_example.py grpo      # TRL GRPOTrainer: what attach() registers

A random-weight tiny LoRA Llama and a WordLevel tokenizer built in
``tests/tiny_trainer.py`` (nothing is downloaded), 3 steps; GRPO's reward is
the completion's length in characters.
"""
from __future__ import annotations

import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.normpath(os.path.join(HERE, os.pardir, "tests")))
sys.path.insert(0, os.path.normpath(os.path.join(HERE, os.pardir)))

import transformers  # noqa: E402

import tiny_trainer as tiny  # noqa: E402
from gradtrace.integrations.transformers import GradtraceCallback  # noqa: E402


def trainer_run(out, tokenizer, collector):
    model = tiny.with_lora(tiny.make_llama(len(tokenizer)))
    trainer = transformers.Trainer(model=model, args=tiny.training_args(out, gradient_accumulation_steps=2),
                                   train_dataset=tiny.lm_data(tokenizer),
                                   data_collator=transformers.default_data_collator, callbacks=[collector])
    return trainer, GradtraceCallback()


def grpo_run(out, tokenizer, collector):
    model = tiny.with_lora(tiny.make_llama(len(tokenizer)))
    return tiny.grpo_trainer(out, model, tokenizer, [collector], max_steps=3), GradtraceCallback()


def main() -> None:
    build = {"trainer": trainer_run, "grpo": grpo_run}[sys.argv[1] if len(sys.argv) > 1 else "trainer"]
    transformers.logging.set_verbosity_error()
    tokenizer = tiny.make_tokenizer()
    collector = tiny.LogCollector()
    with tempfile.TemporaryDirectory() as out:
        trainer, callback = build(out, tokenizer, collector)
        trainer.remove_callback(transformers.PrinterCallback)  # its log lines would bury the output below
        callback.attach(trainer)
        trainer.train()
    print("\n--- what the Trainer logged (the keys that reach report_to) ---")
    for step, logs in collector.logs:
        if "grad_norm" in logs:
            shown = {k: round(v, 6) for k, v in logs.items() if k == "grad_norm" or k.startswith("gradtrace/")}
            print(step, shown)
    print("\n--- callback.trace.report() ---")
    print(callback.trace.report())


if __name__ == "__main__":
    main()
