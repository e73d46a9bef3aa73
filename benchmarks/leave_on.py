"""Issue 23: is gradtrace cheap enough to leave on in a training loop? Every figure before and after, one process.

    OMP_NUM_THREADS=1 python benchmarks/leave_on.py --before 88041ed       # every workload, both regimes
    OMP_NUM_THREADS=1 python benchmarks/leave_on.py --workloads chain,mlp --rounds 6
    python benchmarks/leave_on.py --size tiny                               # seconds: the test suite's smoke run

Workloads, and the figure each is judged on (issue 23's goals, CPU thread time):

| workload | what | figure | goal |
| --- | --- | --- | --- |
| ``chain`` | 1,000 ``nn.Linear(4, 4)``, batch 8, ``.backward()`` | us per parameter per step above the baseline | <= 2.5 |
| ``transformer`` | ``nn.TransformerEncoder``: 4 layers, d=256, 4 heads, feed-forward 2,048 (5.3M parameters), batch 4 x 64 | step time / baseline | <= 1.03 |
| ``generation`` | 16 tokens generated greedily under ``no_grad`` by a 2-layer GPT-2 (d=128) with LoRA (transformers + peft), the watch open | time / baseline | <= 1.05 (1.03) |
| ``mlp`` | 8 x (``Linear(16, 16)``, ``Tanh``), batch 4: what a pass costs apart from its parameters | us per pass above the baseline | <= 120 |
| ``enter_exit`` | entering and leaving ``gradtrace.watch`` on the chain, no step | us per parameter | <= 10 |

Variants, all in this process: ``baseline`` (no hooks); ``after`` (this gradtrace:
``watch(model)`` open, a pass per step, the pass's total norm read after it);
``before`` (the same with the gradtrace of ``--before``, a git ref or a directory,
imported beside it by ``benchmarks/before.py``); and the floors: ``noop_tensor_hooks``
(a Python tensor hook per parameter that does nothing), ``noop_module_hooks`` (a forward
hook with kwargs on every module that does nothing) and ``fused_read`` (after backward,
one ``_foreach_norm`` over every ``.grad`` and one host read).

Two regimes, both reported: ``warm`` (one model; every round runs a block of steps
per variant, in a new random order, the variant's hooks put on before its block and
taken off after, untimed: a training loop) and ``interleaved`` (a copy of the model per
variant, one step each in turn, a new random order every round: every step finds the
caches cold, as in ``benchmarks/hook_overhead``).

Clocks: ``time.thread_time`` of the stepping thread (with one intra-op thread, CPU
backward and every hook run on it) and wall time. Figures come from per-variant
medians; ``paired`` is the median over rounds of each round's ratio to the baseline in
that round, with its quartiles. The load average is printed before and after: compare
figures from one run only.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
if __package__ in (None, ""):  # run as a file: the repository root on the path
    sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import gradtrace  # noqa: E402
from benchmarks.before import load_before  # noqa: E402

WORKLOADS = ("chain", "transformer", "generation", "mlp", "enter_exit")
GOALS = {"chain": ("us/param", 2.5), "transformer": ("x", 1.03), "generation": ("x", 1.05),
         "mlp": ("us/pass", 120.0), "enter_exit": ("us/param", 10.0)}

# (rounds, steps per warm block) per workload and size
SIZES = {
    "full": {"chain": (12, 6), "transformer": (8, 2), "generation": (10, 2), "mlp": (12, 30), "enter_exit": (12, 1)},
    "quick": {"chain": (5, 3), "transformer": (3, 1), "generation": (4, 1), "mlp": (5, 10), "enter_exit": (5, 1)},
    "tiny": {"chain": (1, 1), "transformer": (1, 1), "generation": (1, 1), "mlp": (1, 2), "enter_exit": (1, 1)},
}


# ---- workloads ------------------------------------------------------------------------------------------


@dataclass
class Workload:
    name: str
    build: Callable[[], nn.Module]  # the same weights every call
    step: Callable[[nn.Module, "Session", int], None]
    trains: bool = True  # False: generation, no backward (no pass)


def _train_step(batch: torch.Tensor) -> Callable:
    def step(model, session, i):
        model.zero_grad(set_to_none=True)
        with session.pass_(i):
            model(batch).square().mean().backward()
        session.after(i)
    return step


def _seeded(make: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def build():
        torch.manual_seed(0)
        return make()
    return build


def chain(size: str) -> Workload:
    n = 1000 if size != "tiny" else 50
    return Workload("chain", _seeded(lambda: nn.Sequential(*(nn.Linear(4, 4) for _ in range(n)))),
                    _train_step(torch.randn(8, 4)))


def mlp(size: str) -> Workload:
    return Workload("mlp", _seeded(lambda: nn.Sequential(*(m for _ in range(8) for m in (nn.Linear(16, 16), nn.Tanh())))),
                    _train_step(torch.randn(4, 16)))


def transformer(size: str) -> Workload:
    d, ff, layers = (256, 2048, 4) if size != "tiny" else (32, 64, 2)

    def make():
        layer = nn.TransformerEncoderLayer(d, 4, dim_feedforward=ff, dropout=0.0, batch_first=True)
        return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    return Workload("transformer", _seeded(make), _train_step(torch.randn(4, 64, d)))


def generation(size: str) -> Workload:
    import transformers
    from peft import LoraConfig, get_peft_model

    transformers.logging.set_verbosity_error()
    d = 128 if size != "tiny" else 32

    def make():
        config = transformers.GPT2Config(n_layer=2, n_embd=d, n_head=4, vocab_size=512, n_positions=64,
                                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                         bos_token_id=511, eos_token_id=511, pad_token_id=511)
        lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["c_attn", "c_proj", "c_fc"],
                          fan_in_fan_out=True, task_type="CAUSAL_LM")
        return get_peft_model(transformers.GPT2LMHeadModel(config), lora)

    prompts = torch.randint(0, 500, (2, 8), generator=torch.Generator().manual_seed(0))
    tokens = 16 if size != "tiny" else 2

    def step(model, session, i):
        with torch.no_grad():
            model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=tokens,
                           min_new_tokens=tokens, do_sample=False, pad_token_id=511)

    return Workload("generation", _seeded(make), step, trains=False)


def enter_exit(size: str) -> Workload:
    wl = chain(size)  # the chain's model, timed by ``time_enter_exit``
    wl.name = "enter_exit"
    return wl


BUILDERS = {"chain": chain, "transformer": transformer, "generation": generation, "mlp": mlp,
            "enter_exit": enter_exit}


# ---- variants -------------------------------------------------------------------------------------------


class Session:
    """One variant's hooks on one model, from ``open`` to ``close``."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]

    def pass_(self, i: int):
        return contextlib.nullcontext()

    def after(self, i: int) -> None:
        pass

    def close(self) -> None:
        pass


class WatchSession(Session):
    def __init__(self, model: nn.Module, package):
        super().__init__(model)
        self._stack = contextlib.ExitStack()
        self.trace = self._stack.enter_context(package.watch(model))
        self._count = 0

    def pass_(self, i):
        self._count += 1
        return self.trace.pass_(f"s{self._count}")

    def after(self, i):
        _ = self.trace.passes[f"s{self._count}"].total_norm  # a figure read, as a loop logging it would

    def close(self):
        self._stack.close()


class NoopTensorHooks(Session):
    def __init__(self, model):
        super().__init__(model)
        self.handles = [p.register_hook(_noop) for p in self.params]

    def close(self):
        for h in self.handles:
            h.remove()
        for p in self.params:  # an emptied container still costs every later backward
            if not p._backward_hooks:
                p._backward_hooks = None


class NoopModuleHooks(Session):
    def __init__(self, model):
        super().__init__(model)
        self.handles = [m.register_forward_hook(_noop_forward, with_kwargs=True) for m in model.modules()]

    def close(self):
        for h in self.handles:
            h.remove()


class FusedRead(Session):
    def after(self, i):
        grads = [p.grad for p in self.params if p.grad is not None]
        if grads:
            torch.stack(torch._foreach_norm(grads)).tolist()


def _noop(grad):
    return None


def _noop_forward(module, args, kwargs, output):
    return None


def variants(before) -> Dict[str, Callable[[nn.Module], Session]]:
    found = {"baseline": Session, "after": lambda m: WatchSession(m, gradtrace)}
    if before is not None:
        found["before"] = lambda m: WatchSession(m, before)
    found.update(noop_tensor_hooks=NoopTensorHooks, noop_module_hooks=NoopModuleHooks, fused_read=FusedRead)
    return found


def applies(variant: str, wl: Workload) -> bool:
    if wl.name == "enter_exit":
        return variant in ("after", "before")
    if not wl.trains:  # generation: no backward, no .grad
        return variant not in ("noop_tensor_hooks", "fused_read")
    return True


# ---- timing ---------------------------------------------------------------------------------------------


@dataclass
class Samples:
    cpu: List[float] = field(default_factory=list)
    wall: List[float] = field(default_factory=list)
    rounds: Dict[int, List[float]] = field(default_factory=dict)  # round -> cpu samples


def _timed(fn: Callable[[], None], samples: Samples, r: int) -> None:
    wall, cpu = time.perf_counter(), time.thread_time()
    fn()
    cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
    samples.cpu.append(cpu)
    samples.wall.append(wall)
    samples.rounds.setdefault(r, []).append(cpu)


def run_warm(wl: Workload, names: Dict[str, Callable], rounds: int, block: int, rng: random.Random) -> Dict[str, Samples]:
    model = wl.build()
    out = {name: Samples() for name in names}
    counter = iter(range(10 ** 9))
    for make in names.values():  # warm-up: one block each
        session = make(model)
        for _ in range(block):
            wl.step(model, session, next(counter))
        session.close()
    for r in range(rounds):
        for name in rng.sample(list(names), len(names)):
            session = names[name](model)
            gc.collect()
            for _ in range(block):
                i = next(counter)
                _timed(lambda session=session, i=i: wl.step(model, session, i), out[name], r)
            session.close()
    return out


def run_interleaved(wl: Workload, names: Dict[str, Callable], rounds: int, inner: int,
                    rng: random.Random) -> Dict[str, Samples]:
    template = wl.build()
    models = {name: copy.deepcopy(template) for name in names}
    sessions = {name: make(models[name]) for name, make in names.items()}
    out = {name: Samples() for name in names}
    counter = iter(range(10 ** 9))
    try:
        for name in names:  # warm-up
            wl.step(models[name], sessions[name], next(counter))
        for r in range(rounds):
            gc.collect()
            for name in rng.sample(list(names), len(names)):
                for _ in range(inner):
                    i = next(counter)
                    _timed(lambda name=name, i=i: wl.step(models[name], sessions[name], i), out[name], r)
    finally:
        for session in sessions.values():
            session.close()
    return out


def time_enter_exit(wl: Workload, packages: Dict[str, object], rounds: int, rng: random.Random) -> Dict[str, Samples]:
    model = wl.build()
    out = {name: Samples() for name in packages}

    def once(package):
        with package.watch(model):
            pass

    for package in packages.values():
        once(package)
    for r in range(rounds):
        for name in rng.sample(list(packages), len(packages)):
            _timed(lambda name=name: once(packages[name]), out[name], r)
    return out


# ---- report ---------------------------------------------------------------------------------------------


def _quartiles(values: List[float]):
    q = statistics.quantiles(values, n=4) if len(values) >= 2 else [values[0]] * 3
    return q[0], statistics.median(values), q[2]


def rows_of(wl: Workload, regime: str, samples: Dict[str, Samples], n_params: int) -> List[dict]:
    unit, _ = GOALS[wl.name]
    base = samples.get("baseline")
    rows = []
    for name, s in samples.items():
        cpu, wall = statistics.median(s.cpu), statistics.median(s.wall)
        row = {"workload": wl.name, "regime": regime, "variant": name, "cpu_ms": cpu * 1e3, "wall_ms": wall * 1e3}
        if unit == "us/param" and base is None:  # enter+exit: the time itself
            row["cpu_figure"], row["wall_figure"] = cpu * 1e6 / n_params, wall * 1e6 / n_params
        elif base is not None:
            b_cpu, b_wall = statistics.median(base.cpu), statistics.median(base.wall)
            if unit == "x":
                row["cpu_figure"], row["wall_figure"] = cpu / b_cpu, wall / b_wall
            else:
                per = n_params if unit == "us/param" else 1
                row["cpu_figure"], row["wall_figure"] = (cpu - b_cpu) * 1e6 / per, (wall - b_wall) * 1e6 / per
            paired = [statistics.median(s.rounds[r]) / statistics.median(base.rounds[r])
                      for r in s.rounds if r in base.rounds]
            row["paired_q1"], row["paired"], row["paired_q3"] = _quartiles(paired)
        rows.append(row)
    return rows


def load_average() -> str:
    try:
        return "/".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "unknown"


def render(rows: List[dict]) -> str:
    lines = [f"{'workload':<12} {'regime':<12} {'variant':<18} {'cpu ms':>9} {'wall ms':>9} {'figure':>18} "
             f"{'wall figure':>12} {'paired x cpu [IQR]':>24} {'goal':>10}"]
    for row in rows:
        unit, target = GOALS[row["workload"]]
        figure = f"{row['cpu_figure']:.3f} {unit}" if "cpu_figure" in row else "-"
        wall = f"{row['wall_figure']:.3f}" if "wall_figure" in row else "-"
        paired = (f"{row['paired']:.3f} [{row['paired_q1']:.3f}-{row['paired_q3']:.3f}]"
                  if "paired" in row and row["variant"] != "baseline" else "-")
        goal = ""
        if row["variant"] == "after" and "cpu_figure" in row:
            goal = f"<= {target:g} " + ("met" if row["cpu_figure"] <= target else "NO")
        lines.append(f"{row['workload']:<12} {row['regime']:<12} {row['variant']:<18} {row['cpu_ms']:>9.3f} "
                     f"{row['wall_ms']:>9.3f} {figure:>18} {wall:>12} {paired:>24} {goal:>10}")
    return "\n".join(lines)


def run(workloads: List[str], size: str, before_source: Optional[str], seed: int) -> dict:
    torch.set_num_threads(1)
    rng = random.Random(seed)
    before = load_before(before_source) if before_source else None
    names = variants(before)
    result = {"load_before": load_average(), "torch": torch.__version__, "size": size,
              "before": before_source, "rows": []}
    gc.collect()
    gc.freeze()  # objects alive now are never walked by a collection during a step
    for name in workloads:
        try:
            wl = BUILDERS[name](size)
        except ImportError as exc:
            result["rows"].append({"workload": name, "skipped": f"needs {exc.name}"})
            continue
        rounds, block = SIZES[size][name]
        n_params = sum(1 for p in wl.build().parameters() if p.requires_grad)
        if name == "enter_exit":
            packages = {"after": gradtrace, **({"before": before} if before is not None else {})}
            result["rows"] += rows_of(wl, "interleaved", time_enter_exit(wl, packages, rounds, rng), n_params)
            continue
        chosen = {v: make for v, make in names.items() if applies(v, wl)}
        print(f"{name}: warm", file=sys.stderr, flush=True)
        result["rows"] += rows_of(wl, "warm", run_warm(wl, chosen, rounds, block, rng), n_params)
        print(f"{name}: interleaved", file=sys.stderr, flush=True)
        result["rows"] += rows_of(wl, "interleaved", run_interleaved(wl, chosen, rounds, 1, rng), n_params)
    result["load_after"] = load_average()
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--before", default=None, help="a git ref or a directory holding the gradtrace to compare")
    parser.add_argument("--size", choices=list(SIZES), default="full")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write every row here")
    options = parser.parse_args(argv)
    workloads = [w for w in options.workloads.split(",") if w]
    unknown = set(workloads) - set(WORKLOADS)
    if unknown:
        parser.error(f"unknown workloads: {', '.join(sorted(unknown))}; choose from {', '.join(WORKLOADS)}")
    result = run(workloads, options.size, options.before, options.seed)
    print(f"load average (1/5/15 min): before {result['load_before']}, after {result['load_after']}; "
          f"torch {result['torch']}, 1 thread; before = {options.before or '-'}")
    print(render([r for r in result["rows"] if "skipped" not in r]))
    for r in result["rows"]:
        if "skipped" in r:
            print(f"{r['workload']}: skipped ({r['skipped']})")
    if options.json:
        with open(options.json, "w") as out:
            json.dump(result, out, indent=1)
    return result


if __name__ == "__main__":
    main()
