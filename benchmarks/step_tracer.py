"""What an optimizer step costs under the trainer callbacks' step tracer, judged or not, and the alternatives.

    OMP_NUM_THREADS=1 python benchmarks/step_tracer.py                  # about 2 minutes on an idle 2-core CPU
    OMP_NUM_THREADS=1 python benchmarks/step_tracer.py --rounds 30 --workloads lora

The question it answers (docs/trainer.md, "What it costs"): with ``every=N``,
steps that are not judged still keep their hooks and are recorded as a pass.
What do they cost, against a step with no watch at all, and against a watch
whose hooks stay but record nothing (what pausing the watch would save)?

Variants, each on its own copy of the model, stepped in turn (interleaved, a
new random order every round), one plain training step each (forward,
backward, SGD step, ``zero_grad``), timed on the stepping thread's CPU clock
(``time.thread_time``) and on wall time:

* ``baseline``: no watch;
* ``judged``: ``StepTracer`` with ``every=1``: a pass per step, verdicts,
  metrics (what ``every=1`` costs);
* ``recorded``: ``StepTracer`` with ``every`` larger than the run: a pass per
  step, nothing judged (what an unjudged step costs today);
* ``hooks_idle``: the watch open, no pass, its recorder switched off: the hooks
  fire and return (a lower bound for what a paused watch would cost);
* ``enter_exit``: no watch during the step, but a watch opened and closed once
  per step (the cost of the former Lightning design, a watch per traced step,
  paid on each traced step; the step itself then costs the baseline).

Workloads: ``lora`` (the tests' tiny Llama with LoRA on q/v: 8 trainable
tensors, 40 modules), ``full`` (a 4-layer Llama, hidden 64, every parameter
trainable: 39 tensors). Reported: median per-step CPU and wall milliseconds, and
the median over rounds of each round's ratio to that round's baseline step.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import os
import random
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, os.pardir, "tests"))
sys.path.insert(0, os.path.join(HERE, os.pardir))

import torch  # noqa: E402
import transformers  # noqa: E402

import tiny_trainer as tiny  # noqa: E402
import gradtrace  # noqa: E402
from gradtrace.integrations.steps import StepOptions, StepTracer  # noqa: E402

VARIANTS = ("baseline", "judged", "recorded", "hooks_idle", "enter_exit")


def _full_llama(vocab: int):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                                      pad_token_id=0, eos_token_id=1, bos_token_id=1)
    return transformers.LlamaForCausalLM(config)


WORKLOADS = {
    "lora": lambda vocab: tiny.with_lora(tiny.make_llama(vocab)),
    "full": _full_llama,
}


class Runner:
    """One variant on its own model copy; ``step()`` is one timed optimizer step."""

    def __init__(self, variant: str, model, batch):
        self.variant = variant
        self.model = copy.deepcopy(model)
        self.batch = batch
        self.opt = torch.optim.SGD([p for p in self.model.parameters() if p.requires_grad], lr=1e-4)
        self.n = 0
        self.tracer = None
        self.stack = contextlib.ExitStack()
        with contextlib.redirect_stdout(open(os.devnull, "w")):
            if variant in ("judged", "recorded"):
                every = 1 if variant == "judged" else 10 ** 9
                self.tracer = StepTracer(StepOptions(every=every, max_passes=100, print_errors=False))
                self.tracer.start(self.model)
            elif variant == "hooks_idle":
                trace = self.stack.enter_context(gradtrace.watch(self.model, max_passes=100))
                trace._recording.recorder.enabled = False  # hooks fire and return: nothing is recorded

    def step(self) -> None:
        self.n += 1
        if self.variant == "enter_exit":
            with gradtrace.watch(self.model, max_passes=1):
                pass
        if self.tracer is not None:
            self.tracer.begin_step(self.n)
        self.model(**self.batch).loss.backward()
        self.opt.step()
        self.opt.zero_grad()
        if self.tracer is not None:
            self.tracer.end_step()

    def close(self) -> None:
        if self.tracer is not None:
            self.tracer.stop(merge=False)
        self.stack.close()


def measure(workload: str, rounds: int, warmup: int):
    tokenizer = tiny.make_tokenizer()
    model = WORKLOADS[workload](len(tokenizer))
    rows = tiny.lm_data(tokenizer, n=4)
    batch = {key: torch.tensor([r[key] for r in rows]) for key in ("input_ids", "attention_mask", "labels")}
    runners = [Runner(v, model, batch) for v in VARIANTS]
    samples = {v: {"cpu": [], "wall": []} for v in VARIANTS}
    rng = random.Random(0)
    gc.collect()
    gc.freeze()
    try:
        for r in range(warmup + rounds):
            order = list(runners)
            rng.shuffle(order)
            for runner in order:
                wall, cpu = time.perf_counter(), time.thread_time()
                runner.step()
                cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
                if r >= warmup:
                    samples[runner.variant]["cpu"].append(cpu)
                    samples[runner.variant]["wall"].append(wall)
            gc.collect()
    finally:
        gc.unfreeze()
        for runner in runners:
            runner.close()
    trainable = sum(p.requires_grad for p in model.parameters())
    print(f"\n{workload}: {trainable} trainable tensors, {sum(1 for _ in model.modules())} modules, "
          f"{rounds} rounds (+{warmup} warm-up), one thread")
    print(f"{'variant':<11} {'cpu ms/step':>12} {'wall ms/step':>13} {'paired x cpu':>13} {'paired x wall':>14}")
    for v in VARIANTS:
        ratios = {clock: statistics.median(a / b for a, b in zip(samples[v][clock], samples["baseline"][clock],
                                                                  strict=True))
                  for clock in ("cpu", "wall")}
        print(f"{v:<11} {statistics.median(samples[v]['cpu']) * 1e3:>12.2f} "
              f"{statistics.median(samples[v]['wall']) * 1e3:>13.2f} {ratios['cpu']:>13.3f} {ratios['wall']:>14.3f}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    options = parser.parse_args(argv)
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    print(f"load average before: {os.getloadavg()}")
    for workload in options.workloads.split(","):
        measure(workload, options.rounds, options.warmup)
    print(f"\nload average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
