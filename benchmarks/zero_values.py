"""What telling a zero-initialised factor apart costs (``capture/zero_values.py``).

    python benchmarks/zero_values.py              # about half a minute
    python benchmarks/zero_values.py --json out.json

Three costs, each a median of interleaved rounds (CPU thread time beside wall):

* ``entry``: sampling every watched parameter once at ``watch`` entry (16 elements each, one
  concatenation and one segment max per device and dtype), per parameter, on a chain of small
  layers (the per-parameter cost shows) and on a LoRA-shaped model (half its tensors are zero);
* ``probe``: a pass beginning while candidates last (one foreach max-norm over them, no host read)
  and its record reading them (one small transfer), per candidate;
* ``step``: a whole training step (forward, backward, step) of the LoRA-shaped model under
  ``watch``, in its first step (every lora_up still a candidate) against a later one (dropped),
  with the unwatched step of the same round as the baseline.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import gradtrace  # noqa: E402
from gradtrace.capture.zero_values import ZeroValued  # noqa: E402


class Injected(nn.Module):
    def __init__(self, width, r=8):
        super().__init__()
        self.base = nn.Linear(width, width)
        self.base.requires_grad_(False)
        self.lora_down = nn.Linear(width, r, bias=False)
        self.lora_up = nn.Linear(r, width, bias=False)
        nn.init.zeros_(self.lora_up.weight)

    def forward(self, x):
        return self.base(x) + self.lora_up(self.lora_down(x))


def lora_model(layers=64, width=256):
    return nn.Sequential(*[Injected(width) for _ in range(layers)])


def chain(n=1000, width=4):
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(n)])


def timed(fn):
    wall, cpu = time.perf_counter(), time.thread_time()
    fn()
    return time.perf_counter() - wall, time.thread_time() - cpu


def median_us(samples, per):
    return {"wall_us": 1e6 * statistics.median(s[0] for s in samples) / per,
            "cpu_us": 1e6 * statistics.median(s[1] for s in samples) / per}


def entry(rounds):
    out = {}
    for name, model in (("chain", chain()), ("lora", lora_model())):
        params = [p for p in model.parameters() if p.requires_grad]
        samples = [timed(lambda params=params: ZeroValued(params)) for _ in range(rounds)]
        out[name] = {"params": len(params), **median_us(samples, len(params))}
    return out


def probe(rounds):
    params = [p for p in lora_model().parameters() if p.requires_grad]
    zero_values = ZeroValued(params)

    def once():
        zero_values.read(zero_values.probe())
    samples = [timed(once) for _ in range(rounds)]
    return {"candidates": len(zero_values.candidates), **median_us(samples, len(zero_values.candidates))}


def step(rounds):
    torch.manual_seed(0)
    x = torch.randn(32, 256)
    first, later, base = [], [], []
    for _ in range(rounds):
        for variant, sink in (("baseline", base), ("first", first), ("later", later)):
            model = lora_model()
            opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)

            def train(model=model, opt=opt):
                opt.zero_grad()
                model(x).pow(2).mean().backward()
                opt.step()
            if variant == "baseline":
                sink.append(timed(train))
                continue
            with gradtrace.watch(model, cuts="off") as trace:
                if variant == "later":
                    train()
                    trace.verdicts()  # the first record read drops the candidates that moved
                sink.append(timed(train))
                trace.verdicts()
    baseline = median_us(base, 1)
    return {"baseline": baseline, "first_step": median_us(first, 1), "later_step": median_us(later, 1),
            "first_ratio": median_us(first, 1)["cpu_us"] / baseline["cpu_us"],
            "later_ratio": median_us(later, 1)["cpu_us"] / baseline["cpu_us"]}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = {"torch": torch.__version__, "entry_per_param": entry(args.rounds),
              "probe_per_candidate": probe(args.rounds), "train_step": step(args.rounds)}
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
