"""What the forward-side observations cost per module call: NaN/Inf checks and the unregistered-module hook.

    OMP_NUM_THREADS=1 python benchmarks/forward_checks.py                   # about a minute on an idle 2-core CPU
    OMP_NUM_THREADS=1 python benchmarks/forward_checks.py --rounds 40 --workloads chain

Variants, each on its own copy of the model, one training step each (forward, ``.backward()``,
``zero_grad``), stepped in turn in a new random order every round, timed on the stepping thread's
CPU clock (``time.thread_time``) and on wall time:

* ``plain``: no watch;
* ``bare``: ``watch(model, forward_values=False)`` with the unregistered-module observer taken out:
  gradtrace as it was before these observations;
* ``unregistered``: ``bare`` plus the observer (torch's global module forward hook, registered only
  while the watched forward runs: every module call inside it pays one hook call);
* ``default``: ``watch(model)``: the above plus the NaN/Inf checks (one ``aminmax`` per module output,
  and per input no earlier check saw; nothing read back in a healthy pass).

Workloads: ``chain`` (200 ``Linear(16, 16)`` + ``Tanh`` in a ``Sequential``: 401 module calls per
step on tiny tensors, the worst case per call) and ``llama`` (the tests' tiny Llama, 2 layers,
hidden 32: about 40 module calls per step). Reported per workload: median CPU and wall ms per step,
the median over rounds of each round's ratio to that round's ``plain`` step, and the added cost per
module call (difference of medians / module calls per step) of each observation. Noisy on a shared
machine: read the medians and ratios, not single rounds.
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
from typing import Callable, Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, os.pardir, "tests"))
sys.path.insert(0, os.path.join(HERE, os.pardir))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import gradtrace  # noqa: E402
from gradtrace import live  # noqa: E402

VARIANTS = ("plain", "bare", "unregistered", "default")


class _NoObserver:
    """Stands in for ``UnregisteredModules``: registers nothing, finds nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def attach(self, register, root_site=None) -> None:
        pass

    def records(self) -> list:
        return []


def chain() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[m for _ in range(200) for m in (nn.Linear(16, 16), nn.Tanh())])


def llama() -> nn.Module:
    from tiny_trainer import make_llama
    return make_llama(64)


def batch_for(name: str):
    g = torch.Generator().manual_seed(0)
    if name == "chain":
        x = torch.randn(8, 16, generator=g)
        return lambda model: model(x).pow(2).mean()
    ids = torch.randint(1, 64, (4, 16), generator=g)
    return lambda model: model(input_ids=ids, labels=ids).loss


WORKLOADS: Dict[str, Callable[[], nn.Module]] = {"chain": chain, "llama": llama}


def module_calls(model: nn.Module, loss: Callable) -> int:
    count = [0]
    handle = nn.modules.module.register_module_forward_hook(lambda m, a, o: count.__setitem__(0, count[0] + 1))
    try:
        loss(model)
    finally:
        handle.remove()
    return count[0]


@contextlib.contextmanager
def opened(variant: str, model: nn.Module):
    """The variant's watch, open for all of its steps (steady state), or nothing."""
    if variant == "plain":
        yield
        return
    saved = live.UnregisteredModules
    if variant == "bare":
        live.UnregisteredModules = _NoObserver
    try:
        with gradtrace.watch(model, forward_values=variant == "default", max_passes=4):
            live.UnregisteredModules = saved
            yield
    finally:
        live.UnregisteredModules = saved


def run(name: str, rounds: int, warmup: int) -> Dict[str, Dict[str, float]]:
    base = WORKLOADS[name]()
    loss = batch_for(name)
    calls = module_calls(base, loss)
    models = {v: copy.deepcopy(base) for v in VARIANTS}
    samples: Dict[str, List[tuple]] = {v: [] for v in VARIANTS}
    with contextlib.ExitStack() as stack:
        for v in VARIANTS:
            stack.enter_context(opened(v, models[v]))
        gc.collect()
        gc.freeze()
        order = list(VARIANTS)
        for r in range(warmup + rounds):
            random.shuffle(order)
            for v in order:
                model = models[v]
                cpu, wall = time.thread_time(), time.perf_counter()
                loss(model).backward()
                model.zero_grad(set_to_none=True)
                cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
                if r >= warmup:
                    samples[v].append((cpu, wall))
            gc.collect()
        gc.unfreeze()
    out: Dict[str, Dict[str, float]] = {}
    plain = samples["plain"]
    for v in VARIANTS:
        cpu = [s[0] for s in samples[v]]
        out[v] = {"cpu_ms": statistics.median(cpu) * 1e3,
                  "wall_ms": statistics.median(s[1] for s in samples[v]) * 1e3,
                  "ratio": statistics.median(s[0] / p[0] for s, p in zip(samples[v], plain, strict=False)),
                  "calls": calls}
    return out


def per_call(result: Dict[str, Dict[str, float]], a: str, b: str) -> float:
    """Microseconds per module call that variant ``a`` adds to variant ``b`` (difference of median CPU times)."""
    return (result[a]["cpu_ms"] - result[b]["cpu_ms"]) * 1e3 / result[a]["calls"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--workloads", default="chain,llama")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    for name in args.workloads.split(","):
        result = run(name, args.rounds, args.warmup)
        calls = result["plain"]["calls"]
        print(f"\n{name}: {calls} module calls per step; median per step (CPU thread time / wall), "
              f"median of per-round CPU ratios to plain")
        for v in VARIANTS:
            r = result[v]
            print(f"  {v:13s} {r['cpu_ms']:8.3f} ms cpu  {r['wall_ms']:8.3f} ms wall  x{r['ratio']:.3f}")
        print(f"  per module call: unregistered-module hook {per_call(result, 'unregistered', 'bare'):+.2f} us, "
              f"NaN/Inf checks {per_call(result, 'default', 'unregistered'):+.2f} us, "
              f"both {per_call(result, 'default', 'bare'):+.2f} us (CPU time)")


if __name__ == "__main__":
    main()
