"""A transformers ``TrainerCallback``: one gradtrace pass per optimizer step (Trainer and TRL's trainers).

    from gradtrace.integrations.transformers import GradtraceCallback

    callback = GradtraceCallback(save_dir="gradtraces")
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    callback.attach(trainer)   # optional: metrics reach report_to and log_history; needed for register=
    trainer.train()
    print(callback.trace.report())

One ``gradtrace.watch`` is open from ``on_train_begin`` to ``on_train_end`` on
the model the Trainer trains (a DDP / DataParallel wrapper is looked through,
a peft model is watched as the Trainer sees it, so parameter names are the
peft ones). Each optimizer step is one pass, ``step-<n>`` where ``n``
is the ``step`` the Trainer logs for it: opened in ``on_step_begin`` before the
first microbatch, closed in ``on_step_end``, so every microbatch of gradient
accumulation lands in it. The Trainer clips, steps and calls ``zero_grad()``
before ``on_step_end``; the pass is opened with ``read_at="run_end"`` so each
parameter's figures are taken when the last engine run that reached it ends:
before clipping, and untouched by ``zero_grad()``. They are therefore the
gradients behind the Trainer's logged ``grad_norm`` (which is the pre-clip norm).

How the metrics reach the trackers (transformers 5, ``Trainer.log``): the
Trainer appends a copy of ``logs`` to ``state.log_history`` and then calls
``on_log`` on every callback in order, its reporting integrations
(``report_to``) first and user callbacks last. Adding keys to ``logs`` in
``on_log`` therefore reaches only callbacks registered after this one.
``attach(trainer)`` wraps the trainer's own ``log`` (TRL's trainers override
it and call ``Trainer.log``; the wrapper sits on top of both) so the keys are
in ``logs`` before the copy and before any reporter sees them.

This module imports transformers; ``import gradtrace`` never does.
"""
from __future__ import annotations

import contextlib
import functools
import os
import re
import weakref
from typing import Any, Callable, Dict, Optional

import torch
from transformers import TrainerCallback

from ..errors import GradtraceError

_STEP_NAME = re.compile(r"step-\d+")


class GradtraceCallback(TrainerCallback):
    """Trace every ``every``-th optimizer step of a ``transformers.Trainer`` (or a TRL trainer).

    ``every``: which steps are judged: for step ``n`` (as the Trainer logs
    it) with ``n == 1`` or ``n % every == 0`` the callback computes verdicts,
    adds metrics to the logs and prints new errors. Every step is still a pass
    of its own: a watch cannot be paused, and an unlabelled step would become
    one pass per backward run, without stale-gradient checks. So ``every``
    saves the analysis and the logging, not the hooks' cost.
    ``max_passes``: keep only the newest N passes in ``trace`` (memory stays
    bounded over a long run). ``cuts``: ``gradtrace.watch``'s cut detection.
    ``save_dir``: ``trace.save(<save_dir>/gradtrace.json)`` when training ends
    or the callback is closed. ``save_every``: also ``<save_dir>/step-<n>.json``
    every N steps (with ``save_every <= max_passes`` no step is lost to the
    bound). ``register``: ``register(trace, inputs)`` is
    called with each microbatch the trainer hands to ``compute_loss`` while a
    step's pass is open (GRPO: ``inputs["advantages"]``,
    ``inputs["completion_mask"]``); needs ``attach(trainer)``.
    ``print_errors``: print each new error verdict once, one line each.
    ``prefix``: of the metric keys added to the Trainer's logs.
    """

    def __init__(self, *, every: int = 1, max_passes: Optional[int] = 100, cuts: str = "modules",
                 save_dir: Optional[str] = None, save_every: Optional[int] = None, register: Optional[Callable[[Any, Dict[str, Any]], Any]] = None,
                 print_errors: bool = True, prefix: str = "gradtrace/"):
        for option, value in (("every", every), ("save_every", save_every)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise GradtraceError(f"GradtraceCallback({option}=...) is a positive int, got {value!r}")
        if save_every is not None and save_dir is None:
            raise GradtraceError("GradtraceCallback(save_every=...) writes into save_dir: give save_dir too")
        if register is not None and not callable(register):
            raise GradtraceError(f"GradtraceCallback(register=...) is a function (trace, inputs), got {register!r}")
        self.every, self.max_passes, self.cuts = every, max_passes, cuts
        self.save_dir, self.save_every, self.register, self.print_errors, self.prefix = save_dir, save_every, register, print_errors, prefix
        self.trace = None  # the LiveTrace of the current (or last) training run; readable after it ends
        self.metrics: Dict[str, float] = {}  # the newest traced step's metrics
        self._watch: Optional[contextlib.ExitStack] = None
        self._pass: Optional[contextlib.ExitStack] = None
        self._finalizer: Optional[weakref.finalize] = None
        self._open_step: Optional[int] = None  # the step whose pass is open
        self._printed: set = set()
        self._logged = True  # the newest metrics already went into a training log
        self._attached = False

    # ---- wiring ---------------------------------------------------------------
    def attach(self, trainer) -> "GradtraceCallback":
        """Add this callback to ``trainer`` (if needed) and wrap its ``log`` and ``compute_loss``.

        ``log``: the metrics go into ``logs`` before the Trainer copies them to
        ``state.log_history`` and hands them to ``report_to``. ``compute_loss``:
        ``register(trace, inputs)`` sees each microbatch of a traced step.
        Both are instance attributes wrapping the trainer's own bound methods,
        so subclasses (TRL) keep their behaviour.
        """
        if self._attached:
            raise GradtraceError("this GradtraceCallback is already attached to a trainer")
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        trainer.log = _with_metrics(trainer.log, self)
        trainer.compute_loss = _with_register(trainer.compute_loss, self)
        self._attached = True
        return self

    def close(self) -> None:
        """End the open pass and the watch (no hook stays on the model); the trace stays readable.

        The Trainer calls no callback when training raises: call this (or use
        ``with callback: trainer.train()``) to remove the hooks after a failure.
        A later ``trainer.train()`` also closes a watch left open.
        """
        if self._finalizer is None:
            return  # nothing open: closing twice (on_train_end, then `with`) is harmless
        self._finalizer()
        self._finalizer = None
        self._watch = self._pass = self._open_step = None
        if self.save_dir is not None and self.trace is not None:
            self._save("gradtrace.json")

    def __enter__(self) -> "GradtraceCallback":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- Trainer events ------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.register is not None and not self._attached:
            raise GradtraceError("GradtraceCallback(register=...) needs the trainer's inputs: call "
                                 "callback.attach(trainer) before trainer.train()")
        self.close()  # a watch left open by a run that raised
        from .. import watch

        stack = contextlib.ExitStack()
        self.trace = stack.enter_context(watch(_unwrapped(model), cuts=self.cuts, max_passes=self.max_passes))
        pass_stack = contextlib.ExitStack()
        self._watch, self._pass = stack, pass_stack
        # If training raises, nothing calls on_train_end: the hooks go when the callback is
        # collected or the interpreter exits, or at once with close(). Pass first, then watch.
        self._finalizer = weakref.finalize(self, _close_stacks, pass_stack, stack)
        self._printed = set()

    def on_step_begin(self, args, state, control, **kwargs):
        if self._watch is None:
            return
        step = state.global_step + 1  # the step number the Trainer will log for this step
        self._pass.enter_context(self.trace.pass_(f"step-{step}", step_start=True, read_at="run_end"))
        self._open_step = step

    def on_step_end(self, args, state, control, **kwargs):
        step, self._open_step = self._open_step, None
        if self._watch is None or step is None:
            return
        self._pass.close()
        if step == 1 or step % self.every == 0:
            self._after_step(f"step-{step}", step)
        if self.save_every is not None and step % self.save_every == 0:
            self._save(f"step-{step}.json")

    def on_log(self, args, state, control, logs=None, **kwargs):
        # Without attach(): reaches callbacks after this one only (see the module docstring).
        if logs is not None:
            self._add_metrics(logs)

    def on_train_end(self, args, state, control, **kwargs):
        self.close()

    # ---- inside ----------------------------------------------------------------
    def _after_step(self, name: str, step: int) -> None:
        # The step just closed is the newest pass: the same keys every step (coverage, total_norm, errors, ...).
        self.metrics = self.trace.metrics(prefix=self.prefix, passes="last")
        self.metrics[f"{self.prefix}traced_step"] = float(step)
        verdicts = self.trace.verdicts()
        self._logged = False
        if self.print_errors:
            self._print_new_errors(verdicts, step)

    def _save(self, filename: str) -> None:
        os.makedirs(self.save_dir, exist_ok=True)
        self.trace.save(os.path.join(self.save_dir, filename))

    def _print_new_errors(self, verdicts, step: int) -> None:
        for v in verdicts:
            if v.severity != "error":
                continue
            # The same finding on every step differs only in the pass name: print it once.
            key = (v.code, _STEP_NAME.sub("step-*", v.message))
            if key not in self._printed:
                self._printed.add(key)
                print(f"gradtrace step {step}: {v.code}: {v.message}", flush=True)

    def _add_metrics(self, logs: Dict[str, Any]) -> None:
        # Training-step logs carry "loss"; evaluation ("eval_loss") and the final summary do not.
        if "loss" in logs and self.metrics and not self._logged:
            logs.update(self.metrics)
            self._logged = True

    def _register(self, inputs: Dict[str, Any]) -> None:
        if self.register is not None and self._open_step is not None:
            self.register(self.trace, inputs)


def _with_metrics(log: Callable, callback: GradtraceCallback) -> Callable:
    @functools.wraps(log)
    def log_with_gradtrace(logs, *args, **kwargs):
        callback._add_metrics(logs)
        return log(logs, *args, **kwargs)
    return log_with_gradtrace


def _with_register(compute_loss: Callable, callback: GradtraceCallback) -> Callable:
    @functools.wraps(compute_loss)
    def compute_loss_with_gradtrace(model, inputs, *args, **kwargs):
        callback._register(inputs)
        return compute_loss(model, inputs, *args, **kwargs)
    return compute_loss_with_gradtrace


def _close_stacks(*stacks: contextlib.ExitStack) -> None:
    for stack in stacks:
        stack.close()


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose parameters the Trainer trains: DDP / DataParallel are looked through."""
    while isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
        model = model.module
    return model
