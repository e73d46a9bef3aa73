"""What it costs to find where a NaN gradient is born: gradtrace against torch.autograd.detect_anomaly.

Both run the same training step (forward + backward) of a small causal
transformer whose loss takes ``sqrt`` of a value that is exactly zero, so
every step produces a NaN gradient with a finite forward:

  * plain       — no tool (the baseline)
  * gradtrace   — ``gradtrace.watch(model, cuts="ops", max_passes=1)`` open over the loop:
                  names the op, module and line (and says the forward was finite)
  * anomaly     — ``torch.autograd.detect_anomaly()``: raises at the op, with a traceback
  * default     — ``gradtrace.watch(model)`` for reference: names only the first parameter,
                  and the one-line change (``cuts="ops"``) that finds the op

Blocks of steps are interleaved (plain, default, gradtrace, anomaly, plain, ...)
so drift hits all alike; each figure is the median CPU thread time of one step. The
overhead is the median minus the plain median; the goal is an overhead at
least 5x smaller than detect_anomaly's. Two ratios are printed: against the
whole cuts="ops" watch, and against what locating adds to a default watch
(whose own cost, mostly pass-end statistics, is paid anyway).

    python benchmarks/nan_origin.py [--steps 5] [--blocks 6] [--layers 4]
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time
import warnings

import torch
from torch import nn

import gradtrace


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x, causal):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=causal, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class TinyLM(nn.Module):
    def __init__(self, vocab=128, d=64, heads=4, layers=4, length=32):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(length, d))
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.head = nn.Linear(d, vocab)
        self.register_buffer("causal", torch.ones(length, length).triu(1).bool())

    def forward(self, ids):
        x = self.tok(ids) + self.pos[: ids.size(1)]
        for block in self.blocks:
            x = block(x, self.causal[: ids.size(1), : ids.size(1)])
        return self.head(x)


def nan_loss(model, ids):
    logits = model(ids)
    ce = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1))
    spread = (logits - logits).pow(2).mean()  # exactly 0: its sqrt has an infinite derivative
    return ce + spread.sqrt()


def step_plain(model, ids):
    model.zero_grad(set_to_none=True)
    nan_loss(model, ids).backward()


def step_gradtrace(model, ids):
    """One step under a watch that stays open over the loop (``max_passes=1``), as in training."""
    model.zero_grad(set_to_none=True)
    nan_loss(model, ids).backward()


def gradtrace_origin(trace):
    origin = list(trace.passes.values())[-1].nonfinite_origin
    assert origin is not None and origin["op"] == "sqrt", origin
    return origin


def step_anomaly(model, ids):
    model.zero_grad(set_to_none=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.autograd.detect_anomaly():
            try:
                nan_loss(model, ids).backward()
            except RuntimeError as e:  # "Function 'PowBackward0' returned nan values in its 0th output."
                assert "returned nan values" in str(e), e
                return str(e).splitlines()[0]
    raise AssertionError("detect_anomaly did not raise")


def timed(fn, *args) -> float:
    start = time.thread_time()
    fn(*args)
    return time.thread_time() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="steps per block")
    parser.add_argument("--blocks", type=int, default=6, help="blocks per tool, interleaved")
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = TinyLM(layers=args.layers)
    # one copy per tool, so the watch can stay open while the three are interleaved
    models = {name: TinyLM(layers=args.layers) for name in ("plain", "default", "gradtrace", "anomaly")}
    for copy in models.values():
        copy.load_state_dict(model.state_dict())
    ids = torch.randint(0, 128, (8, 32))
    runs = {"plain": step_plain, "default": step_gradtrace, "gradtrace": step_gradtrace, "anomaly": step_anomaly}
    # cuts="ops" pushes a TorchFunctionMode that sees every op in the thread, so the tools cannot be open
    # side by side: blocks of steps are interleaved instead, each watch open over its block as in training.
    tools = {"plain": contextlib.nullcontext, "anomaly": contextlib.nullcontext,
             "default": lambda: gradtrace.watch(models["default"], max_passes=1),
             "gradtrace": lambda: gradtrace.watch(models["gradtrace"], cuts="ops", max_passes=1)}
    times = {name: [] for name in runs}
    origin = None
    for block in range(args.blocks + 1):
        for name, fn in runs.items():
            with tools[name]() as trace:
                for _ in range(args.steps):
                    elapsed = timed(fn, models[name], ids)
                    if block:  # block 0 is the warm-up: first calls pay for lazy initialisation
                        times[name].append(elapsed)
                if name == "gradtrace":
                    origin = gradtrace_origin(trace)
    print(f"gradtrace:      {origin}")
    # sqrt's backward makes an Inf, which detect_anomaly does not check; it stops at the NaN that follows
    print(f"detect_anomaly: {step_anomaly(models['anomaly'], ids)}")
    median = {name: statistics.median(values) for name, values in times.items()}
    base = median["plain"]
    print(f"{'run':<10} {'median ms':>10} {'overhead ms':>12}")
    for name, value in median.items():
        print(f"{name:<10} {value * 1e3:>10.2f} {(value - base) * 1e3:>12.2f}")
    over_g, over_a = median["gradtrace"] - base, median["anomaly"] - base
    locating = median["gradtrace"] - median["default"]  # what naming the op adds to a watch
    print(f"detect_anomaly's overhead / gradtrace cuts=\"ops\" overhead: {_ratio(over_a, over_g)} "
          f"(whole step: {median['anomaly'] / median['gradtrace']:.1f}x)")
    print(f"detect_anomaly's overhead / what locating adds to a default watch: {_ratio(over_a, locating)}")


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.1f}x" if b > 0 else "inf (no measurable cost)"


if __name__ == "__main__":
    main()
