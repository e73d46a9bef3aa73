"""The step tracer behind every trainer callback: one watch per training run, one pass per optimizer step.

Both ``GradtraceCallback`` classes (transformers/TRL and Lightning) are thin
adapters over ``StepTracer``: they translate their framework's events into
``start`` / ``begin_step`` / ``end_step`` / ``fail_step`` / ``stop`` and hand
it the microbatches they see. So the options mean the same everywhere:

* one ``gradtrace.watch`` from the start of training to its end, on the model
  the trainer trains; ``callback.trace`` is its trace;
* one pass per optimizer step, ``step-<n>``, where ``n`` counts optimizer steps
  from 1 (the step the transformers Trainer logs; Lightning's
  ``trainer.global_step`` once the step is taken), opened before the first
  microbatch with ``step_start=True`` (stale gradients are judged there, never
  inside accumulation), its figures read
  when its last engine run ends (``read_at="run_end"``: the transformers
  Trainer clips and calls ``zero_grad()`` before any callback sees the step's
  end) or when the pass closes before clipping (Lightning,
  ``on_before_optimizer_step``): the gradients the optimizer steps with, before
  clipping;
* ``every``: step ``n`` is judged (verdicts, metrics, printed findings) when
  ``n == 1`` or ``n % every == 0``. Every step is still a pass: the watch stays
  open, and a step without a label would become one pass per backward run,
  without stale-gradient checks. What an unjudged step costs is measured in
  ``benchmarks/step_tracer.py`` (see docs/trainer.md, "What it costs");
* ``max_passes``: only the newest N passes stay in ``trace``;
* ``save_dir``: ``<save_dir>/gradtrace.json`` when training ends;
  ``save_every``: also ``<save_dir>/step-<n>.json`` every N steps. Under
  torch.distributed with more than one rank each rank writes
  ``gradtrace.rank<k>.json`` / ``step-<n>.rank<k>.json`` and, at the end,
  rank 0 writes the merged trace (``trace.gather()``) as ``gradtrace.json``
  (``gather=False``: no merge);
* ``register(trace, inputs)``: called with each microbatch while a step's pass
  is open;
* ``print_errors``: after each judged step, print each new error or warning
  verdict about that step once, ``gradtrace step <n>: <CODE>: <message>``
  (``[rank k] `` in front when the world has more than one rank). A finding is
  printed once per identity (its code, severity and what it names: tensor,
  parameters, module, location), not again when only its counts change;
* ``prefix`` / ``per_module``: of the metrics (``Trace.metrics``);
* a step that raises is recorded as failed (``PASS_FAILED``) and its findings
  are printed before the exception goes on.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

from ..analysis.metrics import _concerns as concerns_passes
from ..analysis.metrics import safe_key
from ..errors import GradtraceError
from ..live import CUT_MODES, watch
from ..records import Verdict
from ..render.text import safe

__all__ = ["StepOptions", "StepTracer", "StepViews", "World", "identity", "unscale_pass"]


# What makes two verdicts the same finding: the code, the severity and what it names (never counts or pass
# names).
IDENTITY_KEYS = ("tensor", "parameters", "parameter", "only_a", "only_b", "kind", "module", "location", "error")

PRINTED_SEVERITIES = ("error", "warning")


@dataclass(frozen=True)
class StepOptions:
    """The options every trainer callback takes, checked once, at construction."""

    every: int = 1
    max_passes: Optional[int] = 100
    cuts: str = "modules"
    save_dir: Optional[str] = None
    save_every: Optional[int] = None
    register: Optional[Callable[[Any, Any], Any]] = None
    print_errors: bool = True
    prefix: str = "gradtrace/"
    per_module: bool = False
    gather: bool = True

    def __post_init__(self) -> None:
        _positive_int("every", self.every)
        if self.max_passes is not None:
            _positive_int("max_passes", self.max_passes, "or None (keep every pass)")
        if self.save_every is not None:
            _positive_int("save_every", self.save_every, "or None")
        if self.cuts not in CUT_MODES:
            raise GradtraceError(f"GradtraceCallback(cuts={self.cuts!r}) is one of {', '.join(CUT_MODES)}")
        if self.save_dir is not None and not isinstance(self.save_dir, (str, os.PathLike)):
            raise GradtraceError(f"GradtraceCallback(save_dir=...) is a folder path, got {self.save_dir!r}")
        if self.save_every is not None and self.save_dir is None:
            raise GradtraceError("GradtraceCallback(save_every=...) writes into save_dir: give save_dir too")
        if self.register is not None and not callable(self.register):
            raise GradtraceError(f"GradtraceCallback(register=...) is a function (trace, inputs), got {self.register!r}")
        for option in ("print_errors", "per_module", "gather"):
            if not isinstance(getattr(self, option), bool):
                raise GradtraceError(f"GradtraceCallback({option}=...) is True or False, got "
                                     f"{getattr(self, option)!r}")
        if not isinstance(self.prefix, str):
            raise GradtraceError(f"GradtraceCallback(prefix=...) is a string such as 'gradtrace/' (or ''), "
                                 f"got {self.prefix!r}")


def _positive_int(option: str, value: Any, otherwise: str = "") -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise GradtraceError(f"GradtraceCallback({option}=...) is a positive int{' ' + otherwise if otherwise else ''}"
                             f", got {value!r}")


def step_name(step: int) -> str:
    return f"step-{step}"


@dataclass(frozen=True)
class World:
    """This process's global rank and the world size (0 and 1 without torch.distributed)."""

    rank: int = 0
    size: int = 1

    @classmethod
    def current(cls) -> "World":
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def prefix(self) -> str:
        return f"[rank {self.rank}] " if self.size > 1 else ""

    def file_name(self, stem: str) -> str:
        return f"{stem}.rank{self.rank}.json" if self.size > 1 else f"{stem}.json"


def identity(v: Verdict) -> Tuple:
    """A verdict's code, severity and what it names; two verdicts with the same identity are one finding.

    Counts and pass names are left out (the same finding on the next step is not news); the severity is
    kept in (a warning that becomes an error, half the groups then all of them, is).
    """
    evidence = v.evidence or {}
    named = []
    for key in IDENTITY_KEYS:
        value = evidence.get(key)
        if isinstance(value, (list, tuple, set)):
            value = tuple(sorted(map(str, value)))
        elif value is not None and not isinstance(value, (str, int, float, bool)):
            value = repr(value)
        named.append(value)
    return (v.code, v.severity, *named)


def about_step(v: Verdict, name: str) -> bool:
    """Does the verdict concern pass ``name`` (it names it) or no pass in particular?"""
    return concerns_passes(v, {name})


class StepViews:
    """What a user reads off a framework callback (transformers', Lightning's) that keeps a ``StepTracer``
    in ``self._steps``: the same four views for both."""

    _steps: "StepTracer"

    @property
    def trace(self):
        """The trace of the current (or last) training run, one pass per optimizer step; readable during and
        after it."""
        return self._steps.trace

    @property
    def merged(self):
        """Under torch.distributed, every rank's trace merged at the end of training (``gather=True``)."""
        return self._steps.merged

    @property
    def metrics(self) -> Dict[str, float]:
        """The newest judged step's metrics."""
        return self._steps.metrics

    @property
    def printed(self):
        """Every line the callback printed, in order."""
        return list(self._steps.printed)


class StepTracer:
    """One watch per training run; one pass per optimizer step; judging, printing, saving."""

    def __init__(self, options: StepOptions, read_at: str = "run_end"):
        self.options = options
        # When a step's figures are read: "run_end" where the pass can only be closed after clipping and
        # zero_grad() (the transformers Trainer), "pass_end" where it closes before them (Lightning).
        self.read_at = read_at
        self.trace = None  # the LiveTrace of the current (or last) run; readable after it ends
        self.merged = None  # under torch.distributed: every rank's trace merged at the end (gather)
        self.metrics: Dict[str, float] = {}  # the newest judged step's metrics
        self.world = World()
        self.open_step: Optional[int] = None  # the step whose pass is open
        self.printed: List[str] = []  # every line printed, in order
        self.on_step_closed: List[Callable[[str], None]] = []  # adapters' fix-ups of a finished pass
        self._seen: set = set()
        self._watch: Optional[contextlib.ExitStack] = None
        self._pass: Optional[contextlib.ExitStack] = None
        self._finalizer: Optional[weakref.finalize] = None

    @property
    def running(self) -> bool:
        return self._watch is not None

    # ---- the run ---------------------------------------------------------------
    def start(self, model) -> None:
        """Open the run's watch on ``model`` (a watch left open by a run that raised is closed first)."""
        self.stop(merge=False)
        self.world = World.current()
        self._seen = set()
        stack = contextlib.ExitStack()
        try:
            self.trace = stack.enter_context(watch(model, cuts=self.options.cuts,
                                                   max_passes=self.options.max_passes))
        except GradtraceError as e:
            # A model gradtrace cannot watch (nothing trainable: frozen adapters) is a finding about the
            # run, not a reason to stop it: say so first, and let training go on untraced.
            self._say(f"gradtrace: not tracing this run: {e}{_frozen_hint(model)}")
            self.trace = None
            return
        pass_stack = contextlib.ExitStack()
        self._watch, self._pass = stack, pass_stack
        # If training raises and nothing calls stop(), the hooks go when the tracer is collected or
        # the interpreter exits. Pass first, then watch.
        self._finalizer = weakref.finalize(self, _close_stacks, pass_stack, stack)
        self.merged = None
        self.open_step = None

    def stop(self, merge: bool = True) -> None:
        """End the open pass and the watch (no hook stays on the model); save; merge the ranks' traces.

        ``merge``: under torch.distributed every rank must call it (a collective); False where
        ranks may not all arrive (a failed run).
        """
        if self._finalizer is None:
            return  # nothing open: stopping twice (end of training, then close()) is harmless
        self._finalizer()
        self._finalizer = None
        self._watch = self._pass = None
        self.open_step = None
        if self.options.save_dir is not None:
            self._save(self.trace, self.world.file_name("gradtrace"))
        if merge and self.options.gather and self.world.size > 1:
            try:
                self.merged = self.trace.gather()
            except GradtraceError as e:  # a rank that never came: each rank's own trace is still saved
                self._say(f"gradtrace: the ranks' traces were not merged: {e}")
                return
            if self.options.save_dir is not None and self.world.rank == 0:
                self._save(self.merged, "gradtrace.json")

    # ---- steps ------------------------------------------------------------------
    def begin_step(self, step: int) -> None:
        """Open pass ``step-<step>`` before the step's first microbatch (a pass left open is ended first)."""
        if not self.running:
            return
        if self.open_step is not None:
            self.end_step()
        self._pass.enter_context(self.trace.pass_(step_name(step), step_start=True, read_at=self.read_at))
        self.open_step = step

    def end_step(self) -> Optional[int]:
        """Close the open step's pass; judge, print and save as the options say. The step, or None."""
        step = self.open_step
        if not self.running or step is None:
            return None
        self.open_step = None
        self._pass.close()
        self._closed(step)
        return step

    def fail_step(self, error: BaseException) -> None:
        """The open step raised: its pass ends marked failed (PASS_FAILED) and its findings are printed."""
        step = self.open_step
        if not self.running or step is None:
            return
        self.open_step = None
        # The pass_ context sees the exception (it marks the pass failed); the stack, emptied, stays in use.
        self._pass.__exit__(type(error), error, error.__traceback__)
        self._closed(step, judge=True)

    def register(self, inputs: Any) -> None:
        """``register(trace, inputs)`` for a microbatch of the open step."""
        if self.options.register is not None and self.open_step is not None:
            self.options.register(self.trace, inputs)

    def observe(self, name: str, t: Any, **options) -> None:
        """``trace.tensor(name, t, **options)`` for a tensor gradtrace registers by itself (GRPO's, a batch's).

        Training must never fail because of it: a tensor it cannot record is said once, and skipped.
        """
        try:
            self.trace.tensor(name, t, **options)
        except GradtraceError as e:
            if ("observe", name) not in self._seen:
                self._seen.add(("observe", name))
                self._say(f"gradtrace: not recording tensor {name!r}: {e}")

    def judged(self, step: int) -> bool:
        return step == 1 or step % self.options.every == 0

    # ---- inside ------------------------------------------------------------------
    def _closed(self, step: int, judge: bool = False) -> None:
        name = step_name(step)
        for fix in self.on_step_closed:
            fix(name)
        if judge or self.judged(step):
            self._judge(name, step)
        if self.options.save_every is not None and step % self.options.save_every == 0:
            self._save(self.trace, self.world.file_name(name))

    def _judge(self, name: str, step: int) -> None:
        trace = self.trace
        verdicts = trace.verdicts()
        if name not in trace.passes:  # dropped already (max_passes) or never finished
            return
        mine = [v for v in verdicts if about_step(v, name)]
        prefix = safe_key(self.options.prefix)
        metrics = trace.metrics(prefix=prefix, per_module=self.options.per_module, passes=[name], verdicts=False)
        # The step's keys without its name in them: the same keys on every step.
        metrics = {key.replace(f"{prefix}{name}/", prefix, 1): value for key, value in metrics.items()}
        metrics[f"{prefix}errors"] = float(sum(v.severity == "error" for v in mine))
        metrics[f"{prefix}warnings"] = float(sum(v.severity == "warning" for v in mine))
        metrics[f"{prefix}traced_step"] = float(step)
        self.metrics = metrics
        if self.options.print_errors:
            self._print_new(mine, step)

    def _print_new(self, verdicts: List[Verdict], step: int) -> None:
        for v in verdicts:  # ranked: the most likely cause first
            if v.severity not in PRINTED_SEVERITIES:
                continue
            key = identity(v)
            if key in self._seen:
                continue
            self._seen.add(key)
            self._say(f"gradtrace step {step}: {v.code}: {v.message}")

    def _say(self, text: str) -> None:
        line = self.world.prefix + _one_line(text)
        self.printed.append(line)
        print(line, file=sys.stdout, flush=True)

    def _save(self, trace, filename: str) -> None:
        path = os.path.join(self.options.save_dir, filename)
        try:
            os.makedirs(self.options.save_dir, exist_ok=True)
            trace.save(path)
        except (GradtraceError, OSError) as e:  # a full disk must not end the training run
            self._say(f"gradtrace: could not save {path}: {e}")


def _one_line(text: str) -> str:
    """One printable line: names (parameters, tensors, locations) come from user code and are escaped."""
    return safe(" ".join(text.split()), newlines=False)


def _frozen_hint(model) -> str:
    """What usually froze every parameter of a peft model."""
    model = getattr(model, "module", model)  # a DDP wrapper
    if hasattr(model, "peft_config"):
        return (" (a peft adapter loaded with PeftModel.from_pretrained(...) is frozen unless is_trainable=True; "
                "requires_grad_(False) on the base model after get_peft_model freezes the adapters too)")
    return ""


def _close_stacks(*stacks: contextlib.ExitStack) -> None:
    for stack in stacks:
        stack.close()


def unscale_pass(trace, name: str, scale: float) -> None:
    """Divide a finished pass's gradient figures by a loss scale (fp16 ``GradScaler``): the figures of the
    gradients the optimizer steps with. Exact for the power-of-two scales GradScaler uses.

    Norms and max |g| of parameters and of registered tensors' incoming gradients scale linearly; zero,
    non-finite counts and coverage do not change. ``trace.meta["loss_scale"][name]`` says it was done.
    """
    passes = trace.passes
    p = passes.get(name)
    if p is None or not scale or scale == 1.0:
        return
    p.records = {n: dataclasses.replace(r, norm=r.norm / scale, max_abs=r.max_abs / scale)
                 for n, r in p.records.items()}
    for record in trace.tensors.values():
        facts = record.grads.get(name)
        if facts is not None:
            record.grads[name] = dataclasses.replace(facts, norm=facts.norm / scale, max_abs=facts.max_abs / scale)
    trace.meta.setdefault("loss_scale", {})[name] = float(scale)
