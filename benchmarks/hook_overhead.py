"""How much does watching gradients cost? Forward+backward steps, side by side.

Every variant trains its own copy of the same model (same init, same batch) in
one process. After warm-up, each round runs every variant once, in a fresh
random order, so drift (thermal, allocator, other load) hits all of them
alike. Reported: medians and min-max per step, the ratio to the unhooked
baseline, and the overhead per watched parameter,
``(median_variant - median_baseline) / n_params``.

Variants
  baseline              no hooks
  gradtrace             one ``gradtrace.watch(model)`` open over all steps;
                        each step is its own ``trace.pass_``, and the pass's
                        ``total_norm`` is read after it (one host transfer)
  gradtrace_keep_grads  the same with ``keep_grads=True``
  gradtrace_ops         the same with ``cuts="ops"`` (op-level cut detection)
  item_hooks            reference: per-parameter hook ``g.norm().item()``
  wandb_like            reference: what ``wandb.watch(log="gradients")`` does
                        per parameter on a logged step (clone, finiteness
                        checks, min/max to host, 64-bin histc to host)
  foreach_floor         reference: no hooks; ``torch._foreach_norm`` over all
                        gradients after backward and one host transfer: the
                        floor of reading every gradient once

Workloads
  transformer    GPT-2-small-shaped decoder in plain torch, ``.backward()``
  linear_chain   1,000 ``nn.Linear(4, 4)``: per-hook cost dominates
  lora_gpt2      ``transformers`` GPT2LMHeadModel (random weights) + ``peft`` LoRA
  ypass          the transformer through ``torch.autograd.grad(loss, params)``

Also measured: entering and leaving ``gradtrace.watch(model)`` with no step
in between ("enter+exit"), and each variant's peak memory during one step
(CPU: peak RSS above the RSS before the step, with malloc told to hand freed
memory back; CUDA: ``torch.cuda.max_memory_allocated``), measured after all
timing so the allocator settings cannot touch the timings.

    python benchmarks/hook_overhead.py --quick
    python benchmarks/hook_overhead.py --json results.json
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import importlib.metadata
import json
import math
import os
import platform
import random
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from tabulate import tabulate

# run from a checkout: `python benchmarks/hook_overhead.py` finds the package next door
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
try:  # the benchmark measures references even while gradtrace cannot be imported
    import gradtrace
except Exception as exc:  # noqa: BLE001 - any import failure means "skip gradtrace variants"
    gradtrace = None
    GRADTRACE_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"
else:
    GRADTRACE_IMPORT_ERROR = None

WORKLOADS = ("transformer", "linear_chain", "lora_gpt2", "ypass")
VARIANTS = (
    "baseline",
    "gradtrace",
    "gradtrace_keep_grads",
    "gradtrace_ops",
    "item_hooks",
    "wandb_like",
    "foreach_floor",
)
GRADTRACE_OPTIONS = {
    "gradtrace": {},
    "gradtrace_keep_grads": {"keep_grads": True},
    "gradtrace_ops": {"cuts": "ops"},
}
WANDB_BINS = 64  # wandb.sdk.wandb_torch.TorchHistory._num_bins
# cuts="ops" enters a TorchFunctionMode: process-wide, it sees every torch call,
# other models' included. Interleaved with the rest it would slow the baseline
# and every other variant down, so it is timed in rounds of its own, against
# the same baseline copy, with its watch open only for those rounds and the
# baseline's steps run with torch-function handling off (Runner.hide_modes).
OWN_ROUNDS = ("gradtrace_ops",)

# Shapes per size. "full" is the benchmark, "quick" runs in under a minute on a
# 2-core CPU, "tiny" exists for the test suite.
SHAPES = {
    # The plain-torch transformer keeps GPT-2 small's 12 blocks but an 8,192-token
    # vocabulary: with 50,257 the tied embedding's 154 MB gradient, freshly
    # allocated every step (zero_grad(set_to_none=True)), is page-faulted in each
    # time, which on a 2-core VM put a third of the step in the kernel and made
    # step times swing by +-30%. The LoRA model keeps GPT-2's vocabulary: its
    # embedding is frozen and gets no gradient.
    "full": {
        "transformer": dict(n_layer=12, d=768, n_head=12, vocab=8192, seq=64, batch=1),
        "lora_gpt2": dict(n_layer=12, d=768, n_head=12, vocab=50257, seq=64, batch=1),
        "ypass": dict(n_layer=12, d=768, n_head=12, vocab=8192, seq=64, batch=1),
        "linear_chain": dict(n=1000, width=4, batch=8),
        "rounds": 15, "warmup": 2, "chain_inner": 5, "enter_exit_repeats": 10,
    },
    "quick": {
        "transformer": dict(n_layer=4, d=256, n_head=4, vocab=4096, seq=64, batch=2),
        "lora_gpt2": dict(n_layer=2, d=128, n_head=4, vocab=2048, seq=32, batch=2),
        "ypass": dict(n_layer=4, d=256, n_head=4, vocab=4096, seq=64, batch=2),
        "linear_chain": dict(n=1000, width=4, batch=8),
        "rounds": 4, "warmup": 1, "chain_inner": 2, "enter_exit_repeats": 5,
    },
    "tiny": {
        "transformer": dict(n_layer=2, d=64, n_head=2, vocab=256, seq=16, batch=2),
        "lora_gpt2": dict(n_layer=2, d=32, n_head=2, vocab=128, seq=16, batch=2),
        "ypass": dict(n_layer=2, d=64, n_head=2, vocab=256, seq=16, batch=2),
        "linear_chain": dict(n=300, width=4, batch=8),  # tests only; the benchmark keeps 1,000
        "rounds": 2, "warmup": 1, "chain_inner": 1, "enter_exit_repeats": 2,
    },
}


class SkipWorkload(Exception):
    """An optional dependency of a workload is missing."""


# --------------------------------------------------------------------------- models


class CausalSelfAttention(nn.Module):
    def __init__(self, d: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.c_attn(x).split(d, dim=2)
        q, k, v = (z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.c_fc = nn.Linear(d, 4 * d)
        self.c_proj = nn.Linear(4 * d, d)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, d: int, n_head: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, n_head)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = MLP(d)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """GPT-2's shape in plain torch (tied embedding / head, pre-LayerNorm, no dropout)."""

    def __init__(self, n_layer: int, d: int, n_head: int, vocab: int, seq: int):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(seq, d)
        self.h = nn.ModuleList(Block(d, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx):
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def lm_loss(logits, idx):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), idx[:, 1:].reshape(-1))


# ------------------------------------------------------------------------ workloads


@dataclass
class Workload:
    """A model, one fixed batch, a loss, and how gradients are taken."""

    name: str
    model: nn.Module
    batch: torch.Tensor
    loss: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    mode: str  # "backward" (.backward() into .grad) or "grad" (torch.autograd.grad)
    inner: int = 1  # steps per variant per round
    shape: str = ""


def build_workload(name: str, size: str, device: torch.device) -> Workload:
    shapes = SHAPES[size]
    cfg = shapes[name]
    torch.manual_seed(0)
    if name in ("transformer", "ypass"):
        model = GPT(cfg["n_layer"], cfg["d"], cfg["n_head"], cfg["vocab"], cfg["seq"])
        batch = torch.randint(0, cfg["vocab"], (cfg["batch"], cfg["seq"]))
        loss = lambda m, idx: lm_loss(m(idx), idx)  # noqa: E731
        mode = "grad" if name == "ypass" else "backward"
        shape = f"{cfg['n_layer']}L d={cfg['d']} V={cfg['vocab']} {cfg['batch']}x{cfg['seq']}"
        inner = 1
    elif name == "linear_chain":
        model = nn.Sequential(*(nn.Linear(cfg["width"], cfg["width"]) for _ in range(cfg["n"])))
        batch = torch.randn(cfg["batch"], cfg["width"])
        loss = lambda m, x: m(x).square().mean()  # noqa: E731
        mode = "backward"
        shape = f"{cfg['n']} x Linear({cfg['width']},{cfg['width']}) batch {cfg['batch']}"
        inner = shapes["chain_inner"]
    elif name == "lora_gpt2":
        model = build_lora_gpt2(cfg)
        batch = torch.randint(0, cfg["vocab"], (cfg["batch"], cfg["seq"]))
        loss = lambda m, idx: m(input_ids=idx, labels=idx).loss  # noqa: E731
        mode = "backward"
        shape = f"{cfg['n_layer']}L d={cfg['d']} V={cfg['vocab']} {cfg['batch']}x{cfg['seq']} LoRA r=8"
        inner = 1
    else:
        raise ValueError(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")
    model.to(device).train()
    return Workload(name, model, batch.to(device), loss, mode, inner, shape)


def build_lora_gpt2(cfg: dict) -> nn.Module:
    try:
        import transformers
        from transformers import GPT2Config, GPT2LMHeadModel
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:
        raise SkipWorkload(f"needs transformers and peft ({exc})") from exc
    transformers.logging.set_verbosity_error()
    config = GPT2Config(
        n_layer=cfg["n_layer"], n_embd=cfg["d"], n_head=cfg["n_head"], vocab_size=cfg["vocab"],
        n_positions=max(cfg["seq"], 64), resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=cfg["vocab"] - 1, eos_token_id=cfg["vocab"] - 1,
    )
    lora = LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["c_attn", "c_proj", "c_fc"],
        fan_in_fan_out=True, task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # peft calls a renamed transformers method
        return get_peft_model(GPT2LMHeadModel(config), lora)


def trainable(model: nn.Module) -> List[Tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


# ------------------------------------------------------------------------- variants


class Variant:
    """Hooks (or none) on one model copy; registered once, live for every step."""

    name = "baseline"

    def __init__(self, model: nn.Module):
        self.model = model
        self.named = trainable(model)
        self.params = [p for _, p in self.named]
        self._handles: list = []

    def pass_(self, step: int):
        return contextlib.nullcontext()

    def after(self, step: int, grads: Optional[Sequence[torch.Tensor]]) -> None:
        """Runs inside the timed step, after backward."""

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


class GradtraceVariant(Variant):
    def __init__(self, model: nn.Module, name: str):
        super().__init__(model)
        self.name = name
        self._stack = contextlib.ExitStack()
        self.trace = self._stack.enter_context(gradtrace.watch(model, **GRADTRACE_OPTIONS[name]))
        self.last_norm = float("nan")

    def pass_(self, step: int):
        return self.trace.pass_(f"step{step}")

    def after(self, step, grads):
        self.last_norm = self.trace.passes[f"step{step}"].total_norm

    def close(self):
        self._stack.close()


class ItemHooks(Variant):
    name = "item_hooks"

    def __init__(self, model):
        super().__init__(model)
        self.norms: Dict[str, float] = {}
        for n, p in self.named:
            self._handles.append(p.register_hook(self._hook(n)))

    def _hook(self, name):
        def hook(g):
            self.norms[name] = g.norm().item()

        return hook


class WandbLike(Variant):
    """wandb.watch(model, log="gradients") on a logged step, without the wandb client.

    Mirrors ``TorchHistory.log_tensor_stats`` (wandb/sdk/wandb_torch.py) as called
    from the hook ``_hook_variable_gradient_stats`` puts on every trainable
    parameter: detach+clone, flatten, two finiteness checks read on the host,
    min and max to the host, ``histc`` with 64 bins over [min, max], counts and
    bin edges to host lists. Only the hand-off to ``wandb.Histogram`` / ``run._log``
    is replaced by storing the lists.
    """

    name = "wandb_like"

    def __init__(self, model):
        super().__init__(model)
        self.row: Dict[str, Tuple[list, list]] = {}
        for n, p in self.named:
            self._handles.append(p.register_hook(self._hook(n)))

    def _hook(self, name):
        def hook(grad):
            self.log_tensor_stats(grad.data, name)

        return hook

    def log_tensor_stats(self, tensor: torch.Tensor, name: str) -> None:
        flat = tensor.detach().clone().reshape(-1)
        if not flat.is_cuda and flat.dtype not in (torch.float32, torch.float64):
            flat = flat.float()
        if flat.shape == torch.Size([0]) or (~torch.isfinite(flat)).all().item():
            return
        if not torch.isfinite(flat).all():
            flat = flat[torch.isfinite(flat)]
        tmin = flat.min().item()
        tmax = flat.max().item()
        if tmin > tmax:
            tmin, tmax = tmax, tmin
        if tmin == tmax:
            counts = torch.Tensor([flat.numel()])
            bins = torch.Tensor([tmin, tmax])
        else:
            counts = flat.histc(bins=WANDB_BINS, min=tmin, max=tmax).cpu().detach().clone()
            bins = torch.linspace(tmin, tmax, steps=WANDB_BINS + 1)
        self.row[name] = (counts.tolist(), bins.tolist())


class ForeachFloor(Variant):
    name = "foreach_floor"

    def after(self, step, grads):
        if grads is None:
            grads = [p.grad for p in self.params if p.grad is not None]
        else:
            grads = [g for g in grads if g is not None]
        self.norms = torch.stack(torch._foreach_norm(grads)).tolist()


REFERENCE_VARIANTS = {"baseline": Variant, "item_hooks": ItemHooks,
                      "wandb_like": WandbLike, "foreach_floor": ForeachFloor}


def make_variant(name: str, model: nn.Module) -> Variant:
    if name in GRADTRACE_OPTIONS:
        if gradtrace is None:
            raise RuntimeError(f"gradtrace cannot be imported: {GRADTRACE_IMPORT_ERROR}")
        return GradtraceVariant(model, name)
    return REFERENCE_VARIANTS[name](model)


# --------------------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Runner:
    """One variant on its own copy of the workload's model."""

    def __init__(self, variant: str, workload: Workload, device: torch.device):
        self.name = variant
        self.workload = workload
        self.device = device
        self.model = copy.deepcopy(workload.model)
        self.variant = make_variant(variant, self.model)
        self.steps = 0
        # Set while another variant's TorchFunctionMode is active: this runner's
        # steps then run with torch-function handling off, as if no mode were open.
        self.hide_modes = False

    def step(self) -> Tuple[int, int]:
        """One forward+backward; returns (forward ns, whole step ns)."""
        if self.hide_modes:
            with torch._C.DisableTorchFunction():
                return self._step()
        return self._step()

    def _step(self) -> Tuple[int, int]:
        wl, model, v = self.workload, self.model, self.variant
        model.zero_grad(set_to_none=True)
        synchronize(self.device)
        t0 = time.perf_counter_ns()
        with v.pass_(self.steps):
            loss = wl.loss(model, wl.batch)
            synchronize(self.device)
            t1 = time.perf_counter_ns()
            if wl.mode == "grad":
                grads = torch.autograd.grad(loss, v.params, allow_unused=True)
            else:
                loss.backward()
                grads = None
        v.after(self.steps, grads)
        synchronize(self.device)
        t2 = time.perf_counter_ns()
        del grads, loss
        model.zero_grad(set_to_none=True)  # untimed: keeps idle copies from holding gradients
        self.steps += 1
        return t1 - t0, t2 - t0

    def close(self) -> None:
        self.variant.close()


@dataclass
class Samples:
    """Timed steps of one variant in one group of interleaved rounds."""

    fwd_ns: List[int] = field(default_factory=list)
    step_ns: List[int] = field(default_factory=list)
    round_ns: Dict[int, List[int]] = field(default_factory=dict)  # round -> its step times


def time_group(runners: List[Runner], rounds: int, warmup: int, inner: int,
               rng: random.Random, errors: Dict[str, str], log=None) -> Dict[str, Samples]:
    """Interleaved timing: every round runs every live runner, in a random order."""
    live = list(runners)
    samples = {run.name: Samples() for run in runners}
    started = time.perf_counter()
    for r in range(warmup + rounds):
        if log is not None and r:
            log(f"    round {r}/{warmup + rounds} ({time.perf_counter() - started:.0f} s)")
        order = list(live)
        rng.shuffle(order)
        for run in order:
            got = samples[run.name]
            try:
                for _ in range(inner):
                    fwd, total = run.step()
                    if r >= warmup:
                        got.fwd_ns.append(fwd)
                        got.step_ns.append(total)
                        got.round_ns.setdefault(r, []).append(total)
            except Exception as exc:  # noqa: BLE001 - report it as the variant's row and go on
                errors[run.name] = f"step {run.steps}: {type(exc).__name__}: {exc}"
                live.remove(run)
        gc.collect()
    return samples


def time_enter_exit(model: nn.Module, repeats: int) -> List[int]:
    """Enter and leave gradtrace.watch(model) with no step: registering and removing hooks."""
    with gradtrace.watch(model):
        pass  # warm-up: first use may import or cache things
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter_ns()
        with gradtrace.watch(model):
            pass
        samples.append(time.perf_counter_ns() - t0)
    return samples


# --------------------------------------------------------------------------- memory


class MemoryProbe:
    """Peak memory of one step, above what was in use just before it.

    CUDA: the caching allocator's own counters. CPU: Linux peak RSS (VmHWM),
    reset through /proc/self/clear_refs; glibc malloc is told to hand freed
    memory back (mmap threshold 64 KiB, trim after every step), so RSS follows
    what is live instead of what malloc cached. That setting slows allocation,
    which is why memory is measured only after all timing is done.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.libc = None
        self.why_not = None
        if device.type == "cuda":
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.libc = ctypes.CDLL("libc.so.6")
            self.libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD (also stops its dynamic growth)
            self.libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
        except OSError as exc:
            self.why_not = f"peak RSS cannot be reset here ({exc})"

    def restore(self) -> None:
        """Leave malloc close to where its dynamic thresholds settle for a tensor-heavy process.

        (mallopt turned the dynamic adjustment off for good; 32 MiB is glibc's ceiling for it.)
        """
        if self.libc is not None:
            self.libc.mallopt(-3, 32 * 2**20)
            self.libc.mallopt(-1, 64 * 2**20)

    @property
    def available(self) -> bool:
        return self.device.type == "cuda" or self.libc is not None

    def _settle(self):
        gc.collect()
        if self.libc is not None:
            self.libc.malloc_trim(0)

    def measure(self, fn: Callable[[], object]) -> Tuple[float, float]:
        """Runs fn once; returns (peak MiB above the start, MiB still held after)."""
        self._settle()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            start = torch.cuda.memory_allocated(self.device)
            fn()
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            self._settle()
            end = torch.cuda.memory_allocated(self.device)
        else:
            start = proc_status_kib("VmRSS") * 1024
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            fn()
            peak = proc_status_kib("VmHWM") * 1024
            self._settle()
            end = proc_status_kib("VmRSS") * 1024
        return (peak - start) / 2**20, (end - start) / 2**20


def proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def measure_memory(wl: Workload, variants: List[str], probe: MemoryProbe,
                   errors: Dict[str, str]) -> Dict[str, Tuple[float, float]]:
    """Per variant: a warm-up step, then one measured step (steady state)."""
    out = {}
    for name in variants:
        if name in errors:
            continue
        run = None
        try:
            run = Runner(name, wl, probe.device)
            run.step()
            out[name] = probe.measure(run.step)
        except Exception as exc:  # noqa: BLE001
            errors.setdefault(name, f"memory step: {type(exc).__name__}: {exc}")
        finally:
            if run is not None:
                run.close()
            del run
    return out


# -------------------------------------------------------------------------- results


def summarize(wl: Workload, samples: Dict[str, Samples], n_params: int, errors: Dict[str, str],
              own_rounds: bool = False) -> List[dict]:
    """One row per variant in ``samples``, against the baseline timed in the same rounds.

    ``own_rounds``: the group held one variant and the baseline only; the
    baseline's row comes from the main group, so it is left out here.
    """
    base = samples.get("baseline")
    base = base if base is not None and base.step_ns else None
    base_med = statistics.median([t / 1e6 for t in base.step_ns]) if base else None
    base_fwd = statistics.median([t / 1e6 for t in base.fwd_ns]) if base else None
    rows = []
    for name, got in samples.items():
        if own_rounds and name == "baseline":
            continue
        row = {"workload": wl.name, "variant": name, "shape": wl.shape, "mode": wl.mode,
               "n_params": n_params, "samples": len(got.step_ns), "own_rounds": own_rounds}
        if name in errors:
            row["error"] = errors[name]
        if got.step_ns:
            ms = [t / 1e6 for t in got.step_ns]
            fwd = [t / 1e6 for t in got.fwd_ns]
            med = statistics.median(ms)
            row.update(median_ms=med, min_ms=min(ms), max_ms=max(ms),
                       fwd_median_ms=statistics.median(fwd))
            if base_med:
                row["baseline_median_ms"] = base_med
                row["ratio"] = med / base_med
                row["fwd_ratio"] = row["fwd_median_ms"] / base_fwd
                row["us_per_param"] = (med - base_med) * 1e3 / n_params
                row["paired_ratio"] = paired_ratio(got, base)
        rows.append(row)
    return rows


def paired_ratio(run: Samples, base: Samples) -> float:
    """Median over rounds of (variant / baseline) within the same round.

    Both ran back to back in that round, so load that comes and goes over
    minutes cancels; the ratio of medians does not have that protection.
    """
    ratios = [statistics.fmean(run.round_ns[r]) / statistics.fmean(base.round_ns[r])
              for r in run.round_ns if r in base.round_ns]
    return statistics.median(ratios)


def fmt(x, spec):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def render_rows(rows: List[dict]) -> str:
    table = []
    for r in rows:
        table.append([
            r["workload"], r["variant"], fmt(r.get("median_ms"), ".2f"),
            f"{fmt(r.get('min_ms'), '.2f')}-{fmt(r.get('max_ms'), '.2f')}" if "min_ms" in r else "-",
            fmt(r.get("ratio"), ".3f"), fmt(r.get("paired_ratio"), ".3f"), fmt(r.get("us_per_param"), ".2f"),
            fmt(r.get("fwd_ratio"), ".3f"), fmt(r.get("peak_mib"), ".1f"),
            fmt(r.get("retained_mib"), ".1f"), r.get("error", ""),
        ])
    return tabulate(table, headers=["workload", "variant", "median ms/step", "min-max ms",
                                    "x baseline", "paired x", "us/param", "fwd x", "peak MiB",
                                    "held MiB", "error"], disable_numparse=True)


def render_workloads(infos: List[dict]) -> str:
    return tabulate([[i["workload"], i["shape"], i["mode"], i["n_params"], i["samples"]]
                     for i in infos],
                    headers=["workload", "shape", "grads via", "watched params", "samples/variant"])


def render_enter_exit(rows: List[dict]) -> str:
    return tabulate([[r["workload"], r["n_params"], fmt(r["median_ms"], ".2f"),
                      f"{r['min_ms']:.2f}-{r['max_ms']:.2f}", fmt(r["us_per_param"], ".2f")]
                     for r in rows],
                    headers=["workload", "params", "median ms", "min-max ms", "us/param"],
                    disable_numparse=True)


def goal_checks(rows: List[dict], enter_exit: List[dict]) -> List[list]:
    """The project's performance goals (issue 4), checked against this run's medians."""
    by = {(r["workload"], r["variant"]): r for r in rows}
    checks = []

    def add(goal, value, target, ok):
        checks.append([goal, value, target, "yes" if ok else "NO"])

    r = by.get(("transformer", "gradtrace"))
    if r and "ratio" in r:
        add("transformer: gradtrace x baseline", f"{r['ratio']:.3f}", "<= 1.03", r["ratio"] <= 1.03)
        add("transformer: gradtrace paired x baseline", f"{r['paired_ratio']:.3f}", "<= 1.03",
            r["paired_ratio"] <= 1.03)
    r = by.get(("linear_chain", "gradtrace"))
    if r and "us_per_param" in r:
        add("linear_chain: gradtrace us/param", f"{r['us_per_param']:.2f}", "<= 2.5",
            r["us_per_param"] <= 2.5)
    for wl in dict.fromkeys(w for w, _ in by):
        gt, wb, base = by.get((wl, "gradtrace")), by.get((wl, "wandb_like")), by.get((wl, "baseline"))
        if gt and wb and base and "median_ms" in gt and "median_ms" in wb and "median_ms" in base:
            over_gt = gt["median_ms"] - base["median_ms"]
            over_wb = wb["median_ms"] - base["median_ms"]
            add(f"{wl}: gradtrace overhead / wandb_like overhead",
                f"{over_gt / over_wb:.3f}" if over_wb > 0 else f"{over_gt:.2f} ms vs {over_wb:.2f} ms",
                "<= 0.333", over_gt <= over_wb / 3)
        ops = by.get((wl, "gradtrace_ops"))
        if ops and "fwd_ratio" in ops:
            add(f"{wl}: gradtrace_ops forward x baseline forward", f"{ops['fwd_ratio']:.3f}",
                "<= 1.5", ops["fwd_ratio"] <= 1.5)
    for e in enter_exit:
        add(f"{e['workload']}: enter+exit us/param", f"{e['us_per_param']:.2f}", "<= 12",
            e["us_per_param"] <= 12)
    return checks


def machine_info(device: torch.device) -> dict:
    info = {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "gradtrace": getattr(gradtrace, "__version__", None) if gradtrace else None,
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    for dist in ("transformers", "peft"):
        try:
            info[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            info[dist] = None
    return info


# ----------------------------------------------------------------------------- main


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small shapes, under a minute on 2 CPU cores")
    p.add_argument("--size", choices=sorted(SHAPES), default=None,
                   help="shape set (default full; --quick means quick; tiny is for tests)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help="comma list of " + ", ".join(WORKLOADS))
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="comma list of " + ", ".join(VARIANTS) + " (baseline is always added)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds after warm-up")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds first")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the per-round shuffles")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--no-enter-exit", action="store_true", help="skip timing watch() enter+exit")
    p.add_argument("--json", metavar="PATH", help="write machine info and every row as JSON")
    args = p.parse_args(argv)
    if args.size is None:
        args.size = "quick" if args.quick else "full"
    shapes = SHAPES[args.size]
    args.rounds = shapes["rounds"] if args.rounds is None else args.rounds
    args.warmup = shapes["warmup"] if args.warmup is None else args.warmup
    if args.rounds < 1 or args.warmup < 0:
        p.error("--rounds must be >= 1 and --warmup >= 0")
    args.workloads = pick(p, args.workloads, WORKLOADS, "workload")
    args.variants = pick(p, args.variants, VARIANTS, "variant")
    if "baseline" not in args.variants:
        args.variants.insert(0, "baseline")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    return args


def pick(parser, text: str, allowed: Sequence[str], what: str) -> List[str]:
    chosen = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in chosen if t not in allowed]
    if bad:
        parser.error(f"unknown {what} {', '.join(bad)}; choose from {', '.join(allowed)}")
    return [a for a in allowed if a in chosen]


def make_runners(names: Sequence[str], wl: Workload, device: torch.device,
                 errors: Dict[str, str]) -> List[Runner]:
    runners = []
    for v in names:
        try:
            runners.append(Runner(v, wl, device))
        except Exception as exc:  # noqa: BLE001 - reported as the variant's row
            errors[v] = f"setup: {type(exc).__name__}: {exc}"
    return runners


def run_workload(name: str, args, rng: random.Random, log) -> Tuple[List[dict], Optional[dict], dict]:
    """Time every variant of one workload; variants with process-wide state get rounds of their own."""
    wl = build_workload(name, args.size, args.device)
    n_params = len(trainable(wl.model))
    variants = list(args.variants)
    errors: Dict[str, str] = {}
    if gradtrace is None:
        for v in variants:
            if v in GRADTRACE_OPTIONS:
                errors[v] = f"skipped: gradtrace cannot be imported ({GRADTRACE_IMPORT_ERROR})"
    shared = [v for v in variants if v not in errors and v not in OWN_ROUNDS]
    own = [v for v in variants if v not in errors and v in OWN_ROUNDS]
    runners = make_runners(shared, wl, args.device, errors)
    base = next((r for r in runners if r.name == "baseline"), None)
    rows: List[dict] = []
    enter_exit = None
    try:
        samples = time_group(runners, args.rounds, args.warmup, wl.inner, rng, errors, log)
        rows += summarize(wl, samples, n_params, errors)
        for v in own if base is not None else []:
            log(f"    {v}: its own rounds against the baseline")
            extra = make_runners([v], wl, args.device, errors)
            base.hide_modes = True
            try:
                samples = time_group([base] + extra, args.rounds, args.warmup, wl.inner, rng, errors, log)
            finally:
                base.hide_modes = False
                for run in extra:
                    run.close()  # its mode must not outlive its rounds
            rows += summarize(wl, samples, n_params, errors, own_rounds=True)
        if gradtrace is not None and base is not None and not args.no_enter_exit:
            try:
                ns = time_enter_exit(base.model, SHAPES[args.size]["enter_exit_repeats"])
                med = statistics.median(ns) / 1e6
                enter_exit = {"workload": name, "n_params": n_params, "median_ms": med,
                              "min_ms": min(ns) / 1e6, "max_ms": max(ns) / 1e6,
                              "us_per_param": med * 1e3 / n_params}
            except Exception as exc:  # noqa: BLE001
                errors["enter_exit"] = f"{type(exc).__name__}: {exc}"
    finally:
        for run in runners:
            run.close()
    ran = {r["variant"] for r in rows}
    rows += [{"workload": name, "variant": v, "shape": wl.shape, "mode": wl.mode,
              "n_params": n_params, "samples": 0, "error": errors.get(v, "not run: the baseline failed")}
             for v in variants if v not in ran]
    rows.sort(key=lambda r: VARIANTS.index(r["variant"]))
    info = {"workload": name, "shape": wl.shape, "mode": wl.mode, "n_params": n_params,
            "samples": args.rounds * wl.inner}
    if "enter_exit" in errors:
        info["enter_exit_error"] = errors["enter_exit"]
    return rows, enter_exit, info


def add_memory(rows: List[dict], args, log) -> Optional[str]:
    probe = MemoryProbe(args.device)
    if not probe.available:
        return probe.why_not
    try:
        for name in args.workloads:
            wl_rows = [r for r in rows if r["workload"] == name]
            if not wl_rows:
                continue
            t0 = time.perf_counter()
            wl = build_workload(name, args.size, args.device)
            errors = {r["variant"]: r["error"] for r in wl_rows if "error" in r}
            mem = measure_memory(wl, [r["variant"] for r in wl_rows], probe, errors)
            for r in wl_rows:
                if r["variant"] in mem:
                    r["peak_mib"], r["retained_mib"] = mem[r["variant"]]
                elif r["variant"] in errors and "error" not in r:
                    r["error"] = errors[r["variant"]]
            log(f"  memory {name}: {time.perf_counter() - t0:.1f} s")
            del wl
            gc.collect()
    finally:
        probe.restore()
    return None


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)  # main() is also called in-process by the tests


def run(args: argparse.Namespace) -> dict:
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    if GRADTRACE_IMPORT_ERROR:
        log(f"gradtrace variants skipped: {GRADTRACE_IMPORT_ERROR}")
    rng = random.Random(args.seed)
    rows: List[dict] = []
    enter_exit: List[dict] = []
    infos: List[dict] = []
    skipped: Dict[str, str] = {}
    started = time.perf_counter()
    for name in list(args.workloads):
        t0 = time.perf_counter()
        try:
            wl_rows, ee, info = run_workload(name, args, rng, log)
        except SkipWorkload as exc:
            skipped[name] = str(exc)
            log(f"skipping workload {name}: {exc}")
            continue
        rows += wl_rows
        infos.append(info)
        if ee:
            enter_exit.append(ee)
        log(f"  {name}: {time.perf_counter() - t0:.1f} s")
        gc.collect()
    memory_note = None
    if not args.no_memory:
        memory_note = add_memory(rows, args, log)
    machine = machine_info(args.device)
    machine["load_avg_1m_before"] = load_before
    result = {
        "machine": machine,
        "settings": {"size": args.size, "rounds": args.rounds, "warmup": args.warmup,
                     "seed": args.seed, "workloads": args.workloads, "variants": args.variants},
        "workloads": infos,
        "rows": rows,
        "enter_exit": enter_exit,
        "skipped": skipped,
        "memory_note": memory_note,
        "wall_s": time.perf_counter() - started,
    }
    result["goals"] = [dict(zip(("goal", "value", "target", "met"), g))
                       for g in goal_checks(rows, enter_exit)]
    print(render_report(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


def render_report(result: dict) -> str:
    m = result["machine"]
    parts = [
        f"machine: {m['cpu_count']} CPUs ({m['cpus_usable']} usable, torch threads "
        f"{m['torch_threads']}), torch {m['torch']}, device {m['device']}"
        + (f" ({m['device_name']})" if "device_name" in m else "")
        + f", python {m['python']}, gradtrace {m['gradtrace']}; load average (1 min) "
        f"{fmt(m.get('load_avg_1m_before'), '.2f')} before, {fmt(m.get('load_avg_1m'), '.2f')} after",
        f"settings: size {result['settings']['size']}, {result['settings']['rounds']} rounds after "
        f"{result['settings']['warmup']} warm-up, wall {result['wall_s']:.0f} s",
        "",
        render_workloads(result["workloads"]),
        "",
        render_rows(result["rows"]),
    ]
    if result["enter_exit"]:
        parts += ["", "enter+exit of gradtrace.watch(model), no step:", render_enter_exit(result["enter_exit"])]
    if result["goals"]:
        parts += ["", tabulate([list(g.values()) for g in result["goals"]],
                               headers=["goal", "measured", "target", "met"], disable_numparse=True)]
    for name, why in result["skipped"].items():
        parts.append(f"skipped {name}: {why}")
    if result["memory_note"]:
        parts.append(f"memory not measured: {result['memory_note']}")
    if any(r.get("own_rounds") for r in result["rows"]):
        parts.append(f"{', '.join(OWN_ROUNDS)}: timed in rounds of its own against the baseline, whose "
                     "steps hide the mode (a TorchFunctionMode sees every torch call in the process)")
    parts.append("x baseline = median / baseline median; paired x = median over rounds of the ratio to "
                 "the baseline step of the same round; us/param = (median - baseline median) / watched "
                 "params; fwd x = forward medians' ratio; peak MiB = memory above the pre-step level during "
                 "one step; held MiB = still held after it")
    return "\n".join(parts)


if __name__ == "__main__":
    main()
