"""What is timed: hooks (or none) on one model copy, registered once, live for every step.

Each variant is a class with a ``name``; ``VARIANTS`` lists them in report
order. A variant may say it does not apply to a workload (``not_applicable``),
that it needs an optional package (``requires``), or that it changes process-wide
state and must be timed in rounds of its own (``own_rounds``).
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import tempfile
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .models import Workload, trainable

try:  # the benchmark measures the references even while gradtrace cannot be imported
    import gradtrace
except Exception as exc:  # noqa: BLE001 - any import failure means "skip gradtrace variants"
    gradtrace = None
    GRADTRACE_IMPORT_ERROR: Optional[str] = f"{type(exc).__name__}: {exc}"
else:
    GRADTRACE_IMPORT_ERROR = None

WANDB_BINS = 64  # wandb.integration.torch.wandb_torch.TorchHistory._num_bins
WANDB_DEFAULT_LOG_FREQ = 1000  # wandb.watch(log_freq=...)'s default


def take_grads(loss: torch.Tensor, mode: str, params: Sequence[torch.Tensor]):
    """The workload's way of taking gradients; returns them for autograd.grad, None for backward."""
    if mode == "grad":
        return torch.autograd.grad(loss, params, allow_unused=True)
    loss.backward()
    return None


class Variant:
    """No hooks: the baseline every other variant is compared with."""

    name = "baseline"
    requires: Tuple[str, ...] = ()  # importable modules it needs
    own_rounds = False  # True: changes process-wide state, so it cannot share rounds

    def __init__(self, model: nn.Module, workload: Workload):
        self.model = model
        self.workload = workload
        self.named = trainable(model)
        self.params = [p for _, p in self.named]
        self._handles: list = []

    @classmethod
    def not_applicable(cls, workload: Workload) -> Optional[str]:
        """Why this variant cannot run on ``workload``, or None when it can."""
        return None

    def loss(self) -> torch.Tensor:
        """The step's forward and loss (a peer that traces the forward itself overrides it)."""
        return self.workload.loss(self.model)

    def take_grads(self, loss: torch.Tensor):
        """The step's backward (a peer that records the backward itself overrides it)."""
        return take_grads(loss, self.workload.mode, self.params)

    def pass_(self, step: int):
        return contextlib.nullcontext()

    def after(self, step: int, grads: Optional[Sequence[torch.Tensor]]) -> None:
        """Runs inside the timed step, after the gradients were taken."""

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


class NeedsGradAttribute(Variant):
    """A variant that reads ``.grad``, which ``torch.autograd.grad`` never writes."""

    @classmethod
    def not_applicable(cls, workload):
        if workload.mode == "grad":
            return "reads .grad, which torch.autograd.grad does not write"
        return None


# ------------------------------------------------------------------------ gradtrace


class GradtraceVariant(Variant):
    """One ``gradtrace.watch`` open over all steps; each step is a pass, its total norm read after it."""

    name = "gradtrace"
    options: dict = {}

    def __init__(self, model, workload):
        super().__init__(model, workload)
        if gradtrace is None:
            raise RuntimeError(f"gradtrace cannot be imported: {GRADTRACE_IMPORT_ERROR}")
        self._stack = contextlib.ExitStack()
        self.trace = self._stack.enter_context(gradtrace.watch(model, **self.options))
        self.last_norm = float("nan")

    def pass_(self, step):
        return self.trace.pass_(f"step{step}")

    def after(self, step, grads):
        self.last_norm = self.trace.passes[f"step{step}"].total_norm

    def close(self):
        self._stack.close()


class GradtraceKeepGrads(GradtraceVariant):
    name = "gradtrace_keep_grads"
    options = {"keep_grads": True}


class GradtraceOps(GradtraceVariant):
    # cuts="ops" enters a TorchFunctionMode: process-wide, it sees every torch
    # call, other models' included, so it would slow every variant sharing its rounds.
    name = "gradtrace_ops"
    options = {"cuts": "ops"}
    own_rounds = True


class GradtraceCutsOff(GradtraceVariant):
    """``cuts="off"``: no module forward hooks. gradtrace minus this is what cut detection costs."""

    name = "gradtrace_cuts_off"
    options = {"cuts": "off"}


class GradtraceNoForwardValues(GradtraceVariant):
    """``forward_values=False``: no NaN/Inf check of module outputs. gradtrace minus this is what the checks
    cost (one small reduction per module call with grad enabled; nothing read back in a healthy pass)."""

    name = "gradtrace_no_forward_values"
    options = {"forward_values": False}


class GradtraceUnread(GradtraceVariant):
    """The passes are never read in the step (they move to the host in batches of 64 at a later
    ``pass_``). gradtrace minus this is what reading ``trace.passes[...]`` every step costs."""

    name = "gradtrace_unread"

    def after(self, step, grads):
        pass


class AfterWatch(Variant):
    """A plain step on a copy that was watched once (one pass) and whose watch has exited.

    Compared with the baseline, a copy that was never watched, stepped in the
    same rounds: anything ``watch`` leaves behind on the model (hooks, hook
    dicts, module attributes) shows as a ratio away from 1.
    """

    name = "after_watch"

    def __init__(self, model, workload):
        super().__init__(model, workload)
        if gradtrace is None:
            raise RuntimeError(f"gradtrace cannot be imported: {GRADTRACE_IMPORT_ERROR}")
        with gradtrace.watch(model) as trace:
            with trace.pass_("before_exit"):
                take_grads(workload.loss(model), workload.mode, self.params)
        self.covered_while_watched = len(trace.passes["before_exit"].covered)
        model.zero_grad(set_to_none=True)


# ------------------------------------------------------------------- references


class NoopHook(Variant):
    """Floor: a Python ``Tensor.register_hook`` per parameter that does nothing."""

    name = "noop_hook"

    def __init__(self, model, workload):
        super().__init__(model, workload)
        self._handles = [p.register_hook(noop) for p in self.params]


def noop(grad: torch.Tensor) -> None:
    return None


class NoopModuleHooks(Variant):
    """Floor of module-level cut detection: a forward hook (with kwargs) on every module that does
    nothing. Any forward hook sends ``Module.__call__`` down its slow path; this is that price."""

    name = "noop_module_hooks"

    def __init__(self, model, workload):
        super().__init__(model, workload)
        self._handles = [m.register_forward_hook(noop_forward, with_kwargs=True) for m in model.modules()]


def noop_forward(module, args, kwargs, output):
    return None


class ItemHooks(Variant):
    """Reference: a hook per parameter doing ``g.norm().item()`` (one host read per parameter)."""

    name = "item_hooks"

    def __init__(self, model, workload):
        super().__init__(model, workload)
        self.norms: Dict[str, float] = {}
        self._handles = [p.register_hook(self._hook(n)) for n, p in self.named]

    def _hook(self, name):
        def hook(g):
            self.norms[name] = g.norm().item()

        return hook


class WandbLike(Variant):
    """``wandb.watch(model, log="gradients")`` on a logged step, without the wandb client.

    Mirrors ``TorchHistory.log_tensor_stats`` (wandb/integration/torch/wandb_torch.py)
    as called from the hook it puts on every trainable parameter: detach+clone,
    flatten, two finiteness checks read on the host, min and max to the host,
    ``histc`` with 64 bins over [min, max], counts and bin edges to host lists.
    Only the hand-off to ``wandb.Histogram`` / ``run._log`` is replaced by storing
    the lists. Runs where wandb is not installed; ``wandb_watch`` is the real one.
    """

    name = "wandb_like"

    def __init__(self, model, workload):
        super().__init__(model, workload)
        self.row: Dict[str, Tuple[list, list]] = {}
        self._handles = [p.register_hook(self._hook(n)) for n, p in self.named]

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
    """Floor: no hooks; ``torch._foreach_norm`` over every gradient after backward, one host read."""

    name = "foreach_floor"

    def after(self, step, grads):
        if grads is None:
            grads = [p.grad for p in self.params if p.grad is not None]
        else:
            grads = [g for g in grads if g is not None]
        self.norms = torch.stack(torch._foreach_norm(grads)).tolist()


# ------------------------------------------------------------------------ peers


class WandbRun:
    """One offline wandb run shared by every ``wandb.watch`` variant of the process.

    wandb's gradient hooks log through the global ``wandb.run``, so two runs
    cannot be open side by side; the run is finished when its last user closes.
    """

    run = None
    users = 0
    folder: Optional[str] = None

    @classmethod
    def acquire(cls):
        import wandb

        if cls.run is None:
            os.environ.setdefault("WANDB_SILENT", "true")
            cls.folder = tempfile.mkdtemp(prefix="gradtrace-bench-wandb-")
            cls.run = wandb.init(mode="offline", dir=cls.folder, project="gradtrace-hook-overhead",
                                 settings=wandb.Settings(console="off", x_disable_stats=True))
        cls.users += 1
        return cls.run

    @classmethod
    def release(cls) -> None:
        cls.users -= 1
        if cls.users == 0 and cls.run is not None:
            cls.run.finish()
            shutil.rmtree(cls.folder, ignore_errors=True)  # the offline run's files are not wanted
            cls.run = cls.folder = None


class WandbWatch(Variant):
    """The real ``wandb.watch(model, log="gradients", log_freq=1)``, offline.

    Each step ends with ``run.log({}, commit=True)``: wandb's hooks only stage the
    histograms (``commit=False``) and the commit is what hands them to the writer;
    a training loop that logs anything per step pays for it anyway.
    """

    name = "wandb_watch"
    requires = ("wandb",)
    log_freq = 1

    def __init__(self, model, workload):
        super().__init__(model, workload)
        self.run = WandbRun.acquire()
        self.index = id(self)  # wandb keys the hooks of each watched model by this index
        self.run.watch(model, log="gradients", log_freq=self.log_freq, idx=self.index)

    def after(self, step, grads):
        self.run.log({}, commit=True)

    def close(self):
        if self.run is not None:
            self.run.unwatch(self.model)
            self.run = None
            WandbRun.release()


class WandbWatchDefaultFreq(WandbWatch):
    """``wandb.watch`` at its default ``log_freq`` (1000): most steps only count hook calls."""

    name = "wandb_watch_default"
    log_freq = WANDB_DEFAULT_LOG_FREQ


class LightningGradNorm(NeedsGradAttribute):
    """Lightning's ``grad_norm(module, norm_type=2)`` after backward, its total read on the host.

    What ``LightningModule.on_before_optimizer_step`` typically logs
    (``self.log_dict(grad_norm(self, norm_type=2))``), without the logger.
    """

    name = "lightning_grad_norm"
    requires = ("lightning",)

    def after(self, step, grads):
        from lightning.pytorch.utilities import grad_norm

        norms = grad_norm(self.model, norm_type=2)
        self.total = float(norms["grad_2.0_norm_total"])


class TorchLens(Variant):
    """torchlens traces every step's forward (``tl.trace``) and its backward (``Trace.log_backward``).

    Activations and gradients of every layer are saved (``layers_to_save="all"``,
    ``save_grads=True``), as torchlens does by default; torch's functions are
    unwrapped after each forward (``unwrap_when_done``) so the rest of the process
    runs unwrapped. It wraps torch's functions process-wide while tracing: own rounds.
    """

    name = "torchlens"
    requires = ("torchlens",)
    own_rounds = True

    def __init__(self, model, workload):
        super().__init__(model, workload)
        import torchlens
        from torchlens.options import CaptureOptions

        self.torchlens = torchlens
        self.capture = CaptureOptions(layers_to_save="all", save_grads=True, backward_ready=True,
                                      unwrap_when_done=True)
        self.trace = None

    @classmethod
    def not_applicable(cls, workload):
        if workload.mode == "grad":
            return "torchlens records the backward of Trace.log_backward (.backward()), not autograd.grad"
        if workload.name == "lora_gpt2":
            return ("this variant traces model(batch) and takes the loss from the output layer; the "
                    "transformers model's loss comes from model(input_ids=..., labels=...)")
        return None

    def loss(self):
        self.trace = self.torchlens.trace(self.model, self.workload.batch, capture=self.capture)
        out = self.trace[self.trace.output_layers[0]].out
        return self.workload.loss_of(out, self.workload.batch)

    def take_grads(self, loss):
        self.trace.log_backward(loss)
        return None

    def after(self, step, grads):
        self.trace = None  # its saved activations and gradients must not outlive the step


VARIANTS: Tuple[type, ...] = (
    Variant, GradtraceVariant, GradtraceKeepGrads, GradtraceOps, GradtraceCutsOff, GradtraceNoForwardValues,
    GradtraceUnread, AfterWatch,
    NoopHook, NoopModuleHooks, ItemHooks, WandbLike, ForeachFloor,
    WandbWatch, WandbWatchDefaultFreq, LightningGradNorm, TorchLens,
)
BY_NAME: Dict[str, type] = {cls.name: cls for cls in VARIANTS}
NAMES: Tuple[str, ...] = tuple(BY_NAME)
GRADTRACE_VARIANTS = ("gradtrace", "gradtrace_keep_grads", "gradtrace_ops", "gradtrace_cuts_off",
                      "gradtrace_no_forward_values", "gradtrace_unread", "after_watch")
PEERS = ("wandb_watch", "wandb_watch_default", "lightning_grad_norm", "torchlens")


def why_skipped(name: str, workload: Workload) -> Optional[str]:
    """A note when variant ``name`` cannot run here (missing package, not applicable), else None."""
    cls = BY_NAME[name]
    if name in GRADTRACE_VARIANTS and gradtrace is None:
        return f"skipped: gradtrace cannot be imported ({GRADTRACE_IMPORT_ERROR})"
    missing = [m for m in cls.requires if importlib.util.find_spec(m) is None]
    if missing:
        return f"skipped: {', '.join(missing)} not installed (pip install -e '.[bench]')"
    reason = cls.not_applicable(workload)
    return f"not applicable: {reason}" if reason else None


def make_variant(name: str, model: nn.Module, workload: Workload) -> Variant:
    return BY_NAME[name](model, workload)


def runnable(names: List[str], workload: Workload) -> Tuple[List[str], Dict[str, str]]:
    """Splits ``names`` into those that can run on ``workload`` and {name: why not} for the rest."""
    notes = {n: why for n in names if (why := why_skipped(n, workload))}
    return [n for n in names if n not in notes], notes
