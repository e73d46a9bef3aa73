"""What GradtraceCallback costs in a real trainer: step time, report size, memory.

    OMP_NUM_THREADS=1 python benchmarks/trainer_overhead.py                 # all three, about 4 minutes
    OMP_NUM_THREADS=1 python benchmarks/trainer_overhead.py --only overhead

* ``overhead``: a real TRL GRPO step: ``trl.GRPOTrainer`` on the tiny LoRA
  Llama of the tests (2 generations per prompt, 8 completion tokens), runs with
  and without the callback interleaved (a fresh model and trainer each, the
  first variant rotating), the callback attached as documented
  (``GradtraceCallback().attach(trainer)``: it registers the rewards, ``A``, the
  completion mask and ``S`` by itself every step). ``every=1000`` is the
  callback on steps it does not judge (each is still a pass). ``cuts=off`` is
  the callback without cut detection: GRPO generates under no_grad inside every
  step, and every generation forward through a trainable module is a cut to
  record. A step's time is the wall and main-thread CPU
  time between consecutive ``on_step_begin`` calls, so it holds generation,
  the backward, the optimizer and every callback's work; the first step of
  each run is warm-up and dropped. Medians over every kept step, and the
  median over rounds of each round's ratio to that round's baseline.
* ``report``: the transformers Trainer for ``--report-steps`` steps with the
  callback's defaults and with ``max_passes=None``; lines, bytes and the widest
  line of ``callback.trace.report()``.
* ``rss``: the Trainer for ``--rss-steps`` steps with and without the callback;
  the process's resident set size before and after each (``/proc/self/status``).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, os.pardir, "tests"))  # the tiny world the tests use
sys.path.insert(0, os.path.join(HERE, os.pardir))

import transformers  # noqa: E402

import tiny_trainer as tiny  # noqa: E402
from gradtrace.integrations.transformers import GradtraceCallback  # noqa: E402


class StepClock(transformers.TrainerCallback):
    """Wall and main-thread CPU seconds between consecutive step starts (the first step dropped)."""

    def __init__(self):
        self.wall, self.cpu, self._last = [], [], None

    def on_step_begin(self, args, state, control, **kwargs):
        now = (time.perf_counter(), time.thread_time())
        if self._last is not None and state.global_step > 1:  # step 1 -> 2 includes warm-up
            self.wall.append(now[0] - self._last[0])
            self.cpu.append(now[1] - self._last[1])
        self._last = now


# variant -> the callback's options (None: no callback)
VARIANTS = {"baseline": None, "gradtrace": {}, "every=1000": {"every": 1000}, "cuts=off": {"cuts": "off"}}


def _grpo_run(options, steps: int) -> StepClock:
    tokenizer = tiny.make_tokenizer()
    clock = StepClock()
    with tempfile.TemporaryDirectory() as out:
        trainer = tiny.grpo_trainer(out, tiny.with_lora(tiny.make_llama(len(tokenizer))), tokenizer, [clock],
                                    max_steps=steps + 1)
        if options is not None:
            GradtraceCallback(print_errors=False, **options).attach(trainer)
        trainer.train()
    return clock


def overhead(rounds: int, steps: int) -> None:
    rows = []  # (round, variant, wall samples, cpu samples)
    for r in range(rounds):
        order = list(VARIANTS)[r % len(VARIANTS):] + list(VARIANTS)[:r % len(VARIANTS)]  # rotate who goes first
        for name in order:
            clock = _grpo_run(VARIANTS[name], steps)
            rows.append((r, name, clock.wall, clock.cpu))
    base = {r: (statistics.median(w), statistics.median(c)) for r, name, w, c in rows if name == "baseline"}
    print(f"GRPO tiny LoRA Llama, {rounds} rounds x {steps} timed steps per variant")
    print(f"{'variant':<10} {'wall ms/step':>13} {'cpu ms/step':>12} {'+ms cpu':>8} {'paired x wall':>14} "
          f"{'paired x cpu':>13}")
    base_cpu = statistics.median(c for _, name, _, cs in rows if name == "baseline" for c in cs)
    for variant in VARIANTS:
        mine = [row for row in rows if row[1] == variant]
        wall = statistics.median(w for *_, ws, _ in mine for w in ws)
        cpu = statistics.median(c for *_, cs in mine for c in cs)
        # the median of per-round ratios: each round's variants ran within seconds of each other
        x_wall = statistics.median(statistics.median(ws) / base[r][0] for r, _, ws, _ in mine)
        x_cpu = statistics.median(statistics.median(cs) / base[r][1] for r, _, _, cs in mine)
        print(f"{variant:<10} {wall * 1e3:>13.2f} {cpu * 1e3:>12.2f} {(cpu - base_cpu) * 1e3:>8.2f} "
              f"{x_wall:>14.3f} {x_cpu:>13.3f}")


def _lm_trainer(out: str, steps: int, callbacks=()):
    tokenizer = tiny.make_tokenizer()
    model = tiny.with_lora(tiny.make_llama(len(tokenizer)))
    return transformers.Trainer(model=model, args=tiny.training_args(out, max_steps=steps, logging_steps=50),
                                train_dataset=tiny.lm_data(tokenizer, n=64),
                                data_collator=transformers.default_data_collator, callbacks=list(callbacks))


def report_size(steps: int) -> None:
    print(f"report of a {steps}-step Trainer run (tiny LoRA Llama, 8 watched parameters)")
    print(f"{'max_passes':<11} {'passes':>7} {'lines':>7} {'bytes':>9} {'widest':>7}")
    for max_passes in (100, None):
        with tempfile.TemporaryDirectory() as out:
            callback = GradtraceCallback(max_passes=max_passes, print_errors=False)
            trainer = _lm_trainer(out, steps)
            callback.attach(trainer)
            trainer.train()
        text = callback.trace.report()
        lines = text.splitlines()
        print(f"{str(max_passes):<11} {len(callback.trace.passes):>7} {len(lines):>7} {len(text.encode()):>9} "
              f"{max(map(len, lines)):>7}")


def _rss_mib() -> float:
    with open("/proc/self/status") as status:
        kib = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    return kib / 1024


def rss(steps: int) -> None:
    print(f"resident set size over a {steps}-step Trainer run (tiny LoRA Llama)")
    print(f"{'variant':<12} {'before MiB':>11} {'after MiB':>10} {'growth MiB':>11} {'seconds':>8}")
    for traced in (False, True):
        with tempfile.TemporaryDirectory() as out:
            trainer = _lm_trainer(out, steps)
            if traced:
                GradtraceCallback(print_errors=False).attach(trainer)
            before, start = _rss_mib(), time.perf_counter()
            trainer.train()
            after, seconds = _rss_mib(), time.perf_counter() - start
        print(f"{'gradtrace' if traced else 'baseline':<12} {before:>11.1f} {after:>10.1f} {after - before:>11.1f} "
              f"{seconds:>8.1f}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("overhead", "report", "rss"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6, help="timed GRPO steps per run")
    parser.add_argument("--report-steps", type=int, default=300)
    parser.add_argument("--rss-steps", type=int, default=2000)
    options = parser.parse_args(argv)
    transformers.logging.set_verbosity_error()
    if options.only in (None, "overhead"):
        overhead(options.rounds, options.steps)
    if options.only in (None, "report"):
        report_size(options.report_steps)
    if options.only in (None, "rss"):
        rss(options.rss_steps)


if __name__ == "__main__":
    main()
