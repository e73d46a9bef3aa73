"""The GRPO output shown in docs/trainer.md: each injected cause, and what the callback prints first.

    OMP_NUM_THREADS=1 python docs/examples/grpo_causes.py            # every cause, about a minute
    OMP_NUM_THREADS=1 python docs/examples/grpo_causes.py nan-rewards

TRL's GRPOTrainer on the tests' tiny random-weight LoRA Llama and WordLevel
tokenizer (``tests/tiny_trainer.py``; nothing is downloaded), 2 prompts x 2
generations per step, 2 steps, ``GradtraceCallback().attach(trainer)`` and
nothing else: every line below was found by the callback on its own.
"""
from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.normpath(os.path.join(HERE, os.pardir, os.pardir, "tests")))
sys.path.insert(0, os.path.normpath(os.path.join(HERE, os.pardir, os.pardir)))

import torch  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402

import tiny_trainer as tiny  # noqa: E402
from gradtrace.integrations.transformers import GradtraceCallback  # noqa: E402


def constant(completions, **kwargs):
    return [1.0] * len(completions)  # every completion of a prompt scores the same


def half_constant(prompts, completions, **kwargs):
    return [1.0 if p.startswith("the") else float(len(c)) for p, c in zip(prompts, completions, strict=True)]


def nan_reward(completions, **kwargs):
    return [float("nan")] * len(completions)  # a scorer that failed on every completion


class EmptyMask(trl.GRPOTrainer):
    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        out["completion_mask"] = torch.zeros_like(out["completion_mask"])  # a prompt-length mismatch
        return out


class MaskOnPadding(trl.GRPOTrainer):
    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        out["completion_mask"] = torch.ones_like(out["completion_mask"])  # also selects padding after EOS
        return out


class LogpsUnderNoGrad(trl.GRPOTrainer):
    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        with torch.no_grad():
            return super()._get_per_token_logps_and_entropies(*args, **kwargs)


CAUSES = {
    "healthy": {},
    "zero-variance-half": dict(reward_funcs=half_constant),
    "zero-variance-all": dict(reward_funcs=constant),
    "nan-rewards": dict(reward_funcs=nan_reward),
    "empty-completion-mask": dict(trainer_cls=EmptyMask),
    "mask-on-padding": dict(trainer_cls=MaskOnPadding),
    "every-completion-truncated": dict(mask_truncated_completions=True, max_completion_length=2),
    "logps-under-no-grad": dict(trainer_cls=LogpsUnderNoGrad),
    "frozen-adapters": dict(frozen=True),
}


def run(name: str) -> None:
    config = dict(CAUSES[name])
    tokenizer = tiny.make_tokenizer()
    model = tiny.with_lora(tiny.make_llama(len(tokenizer)))
    if config.pop("frozen", False):
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.requires_grad_(False)  # as PeftModel.from_pretrained(...) leaves an adapter
    collector = tiny.LogCollector()
    with tempfile.TemporaryDirectory() as out, contextlib.redirect_stdout(io.StringIO()):
        trainer = tiny.grpo_trainer(out, model, tokenizer, [collector], per_device_train_batch_size=4, **config)
        callback = GradtraceCallback().attach(trainer)
        error = None
        try:
            with callback:
                trainer.train()
        except Exception as e:  # the step crashed; the callback printed first
            error = f"{type(e).__name__}: {e}"
    print(f"$ {name}")
    for line in callback.printed[:3] or ["(nothing printed)"]:
        print(line)
    fractions = [logs["frac_reward_zero_std"] for _, logs in collector.logs if "frac_reward_zero_std" in logs]
    norms = [round(logs["grad_norm"], 6) for _, logs in collector.logs if "grad_norm" in logs]
    print(f"  (TRL logged grad_norm {norms}, frac_reward_zero_std {fractions}"
          f"{'; training raised ' + error[:80] if error else ''})\n")


def main() -> None:
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    for name in sys.argv[1:] or CAUSES:
        run(name)


if __name__ == "__main__":
    main()
