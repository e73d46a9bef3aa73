"""A transformers ``TrainerCallback``: one gradtrace pass per optimizer step (Trainer and TRL's trainers).

    from gradtrace.integrations.transformers import GradtraceCallback

    callback = GradtraceCallback(save_dir="gradtraces")
    trainer = Trainer(model=model, args=args, train_dataset=data)
    callback.attach(trainer)   # adds the callback; metrics reach report_to; TRL GRPO tensors; DDP; fp16
    trainer.train()
    print(callback.trace.report())

The options and what a step is are ``steps.StepTracer``'s (shared with the
Lightning callback). What this adapter adds, through ``attach(trainer)``,
which wraps a few methods of the trainer *instance* (``close()`` gives them
back):

* ``log``: the metrics go into ``logs`` before the Trainer copies them to
  ``state.log_history`` and hands them to ``report_to`` (transformers 5,
  ``Trainer.log``, calls ``on_log`` on the reporters first and on user
  callbacks last: keys added in ``on_log`` reach only callbacks after this one);
* ``compute_loss``: sees each microbatch: ``register(trace, inputs)``; the
  batch's own facts (``labels != -100`` and ``attention_mask``: a batch whose
  every label is masked, or whose attention selects nothing, is named); on TRL's
  GRPO-style trainers the rewards, advantages and masks in group order and the
  policy's log-probs ``S`` (``grpo.py``);
* ``training_step``: a microbatch that raises ends its step's pass as failed
  (PASS_FAILED) and prints the step's findings before the error goes on;
* the model watched is the one the Trainer steps with: the DDP wrapper when
  there is one (figures are ``.grad`` after DDP's all-reduce: equal to the
  Trainer's ``grad_norm`` on every rank, a NaN on one rank is everyone's), and
  under fp16 the figures are divided by the ``GradScaler``'s scale of the step
  (``trace.meta["loss_scale"]`` says by how much): the gradients the optimizer
  steps with, as the Trainer's ``grad_norm`` is.

Without ``attach`` the callback still traces (the unwrapped model, figures as
``.grad`` holds them) and warns once, at train begin, about what it cannot do.

This module imports transformers; ``import gradtrace`` never does.
"""
from __future__ import annotations

import functools
import warnings
from collections.abc import Mapping
from typing import Any, Callable, Dict, Optional

import torch
from transformers import TrainerCallback

from ..capture.deepspeed_engine import is_deepspeed_engine
from ..errors import GradtraceError
from . import grpo
from .patching import InstancePatches
from .steps import StepOptions, StepTracer, StepViews, unscale_pass

__all__ = ["GradtraceCallback"]

IGNORE_INDEX = -100  # transformers' label for "no loss here"


class GradtraceCallback(StepViews, TrainerCallback):
    """Trace every optimizer step of a ``transformers.Trainer`` (or a TRL trainer) as pass ``step-<n>``.

    ``every``: judge step ``n`` (verdicts, metrics, printed findings) when
    ``n == 1`` or ``n % every == 0``; every step is still a pass.
    ``max_passes``: keep only the newest N passes in ``trace``.
    ``cuts``: ``gradtrace.watch``'s cut detection.
    ``save_dir``: ``<save_dir>/gradtrace.json`` when training ends (per rank,
    ``gradtrace.rank<k>.json``, plus the merged ``gradtrace.json`` from rank 0,
    under torch.distributed). ``save_every``: also ``<save_dir>/step-<n>.json``
    every N steps. ``register``: ``register(trace, inputs)`` with each microbatch
    ``compute_loss`` receives during a step (needs ``attach``).
    ``print_errors``: print each new error or warning about a judged step once.
    ``prefix``, ``per_module``: of the metric keys. ``gather``: merge the ranks'
    traces at the end of training under torch.distributed.
    """

    def __init__(self, *, every: int = 1, max_passes: Optional[int] = 100, cuts: str = "modules",
                 save_dir: Optional[str] = None, save_every: Optional[int] = None,
                 register: Optional[Callable[[Any, Dict[str, Any]], Any]] = None, print_errors: bool = True,
                 prefix: str = "gradtrace/", per_module: bool = False, gather: bool = True):
        self._steps = StepTracer(StepOptions(every=every, max_passes=max_passes, cuts=cuts, save_dir=save_dir,
                                             save_every=save_every, register=register, print_errors=print_errors,
                                             prefix=prefix, per_module=per_module, gather=gather))
        self._steps.on_step_closed.append(self._unscale)
        self._trainer = None
        self._patches: Optional[InstancePatches] = None
        self._grpo: Optional[grpo.GRPOWiring] = None
        self._logged = True  # the newest metrics already went into a training log
        self._scale: Optional[float] = None  # the GradScaler's scale during the open step
        self._warned = False

    # ---- wiring ---------------------------------------------------------------
    def attach(self, trainer) -> "GradtraceCallback":
        """Add this callback to ``trainer`` (if needed) and wrap a few of its methods (see the module doc)."""
        if self._patches is not None:
            raise GradtraceError("this GradtraceCallback is already attached to a trainer; close() it first")
        if not hasattr(trainer, "callback_handler") or not callable(getattr(trainer, "compute_loss", None)):
            raise GradtraceError(f"attach() takes a transformers.Trainer (or a TRL trainer), got "
                                 f"{type(trainer).__name__}")
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        patches = InstancePatches(trainer)
        patches.wrap("log", self._wrap_log)
        patches.wrap("compute_loss", self._wrap_compute_loss)
        patches.wrap("training_step", self._wrap_training_step)
        self._trainer, self._patches = trainer, patches
        if grpo.is_grpo_like(trainer):
            self._grpo = grpo.GRPOWiring(trainer, self._steps, patches)
        return self

    def close(self) -> None:
        """End the open pass and the watch (no hook stays on the model) and give the trainer its methods back.

        The Trainer calls no callback when training raises: call this (or use
        ``with callback: trainer.train()``) to remove the hooks after a failure.
        The trace stays readable.
        """
        self._steps.stop(merge=False)
        if self._patches is not None:
            self._patches.restore()
        self._patches = self._grpo = self._trainer = None

    def __enter__(self) -> "GradtraceCallback":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None:
            self._failed(exc)
        self.close()

    # ---- Trainer events ------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self._patches is None:
            if self._steps.options.register is not None:
                raise GradtraceError("GradtraceCallback(register=...) needs the trainer's inputs: call "
                                     "callback.attach(trainer) before trainer.train()")
            self._warn_unattached()
        self._steps.start(self._watched(model))
        self._logged = True

    def on_step_begin(self, args, state, control, **kwargs):
        self._scale = self._loss_scale()
        self._steps.begin_step(state.global_step + 1)  # the step number the Trainer will log for this step

    def on_step_end(self, args, state, control, **kwargs):
        step = self._steps.end_step()
        if step is not None and self._steps.judged(step):
            self._logged = False

    def on_log(self, args, state, control, logs=None, **kwargs):
        # Without attach(): reaches callbacks after this one only (see the module docstring).
        if logs is not None:
            self._add_metrics(logs)

    def on_train_end(self, args, state, control, **kwargs):
        self._steps.stop()

    # ---- inside ----------------------------------------------------------------
    def _watched(self, model):
        """What the Trainer steps with: its DDP wrapper or DeepSpeed engine (attached), else the model it hands
        callbacks. (The wrapper decides what .grad holds; DeepSpeed keeps ZeRO's gradients in the engine.)"""
        wrapped = getattr(self._trainer, "model_wrapped", None) if self._trainer is not None else None
        if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel) or is_deepspeed_engine(wrapped):
            return wrapped
        if model is None and self._trainer is not None:
            model = self._trainer.model
        while isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        return model

    def _warn_unattached(self) -> None:
        if self._warned:
            return
        self._warned = True
        warnings.warn(
            "GradtraceCallback was not attached: its metrics reach only the callbacks registered after it, "
            "not report_to nor state.log_history; TRL's GRPO tensors, the batch's labels, DDP's reduced "
            "gradients and fp16 loss-scale correction need it too. Call callback.attach(trainer) before "
            "trainer.train().", UserWarning, stacklevel=3)

    def _loss_scale(self) -> Optional[float]:
        """The GradScaler's scale for the step about to run (fp16), or None. One host read per step."""
        scaler = getattr(getattr(self._trainer, "accelerator", None), "scaler", None)
        if scaler is None or not callable(getattr(scaler, "get_scale", None)):
            return None
        if callable(getattr(scaler, "is_enabled", None)) and not scaler.is_enabled():
            return None
        return float(scaler.get_scale())

    def _failed(self, error: BaseException) -> None:
        """The open step raised: record it, without ever hiding the error behind one of gradtrace's own."""
        try:
            self._steps.fail_step(error)
        except Exception as own:  # pragma: no cover - a gradtrace bug must not replace the user's error
            warnings.warn(f"gradtrace could not record the failed step: {type(own).__name__}: {own}",
                          RuntimeWarning, stacklevel=2)

    def _unscale(self, name: str) -> None:
        if self._scale is not None:
            unscale_pass(self.trace, name, self._scale)

    def _add_metrics(self, logs: Dict[str, Any]) -> None:
        # Training-step logs carry "loss"; evaluation ("eval_loss") and the final summary do not.
        if "loss" in logs and self.metrics and not self._logged:
            logs.update(self.metrics)
            self._logged = True

    def _before_loss(self, inputs: Any) -> None:
        """What a microbatch of the open step says: the GRPO tensors, the batch's own facts, the user's."""
        steps = self._steps
        if steps.open_step is None:
            return
        if self._grpo is not None:
            self._grpo.before_loss()
        elif isinstance(inputs, Mapping):
            _register_batch(steps, inputs)
        steps.register(inputs)

    def _wrap_log(self, log: Callable) -> Callable:
        @functools.wraps(log)
        def log_with_gradtrace(logs, *args, **kwargs):
            if self._patches is not None and self._patches.active:
                self._add_metrics(logs)
            return log(logs, *args, **kwargs)
        return log_with_gradtrace

    def _wrap_compute_loss(self, compute_loss: Callable) -> Callable:
        @functools.wraps(compute_loss)
        def compute_loss_with_gradtrace(model, inputs, *args, **kwargs):
            if self._patches is None or not self._patches.active:
                return compute_loss(model, inputs, *args, **kwargs)
            self._before_loss(inputs)
            if self._grpo is None:
                return compute_loss(model, inputs, *args, **kwargs)
            with self._grpo.loss():
                return compute_loss(model, inputs, *args, **kwargs)
        return compute_loss_with_gradtrace

    def _wrap_training_step(self, training_step: Callable) -> Callable:
        @functools.wraps(training_step)
        def training_step_with_gradtrace(*args, **kwargs):
            try:
                return training_step(*args, **kwargs)
            except Exception as e:
                if self._patches is not None and self._patches.active:
                    self._failed(e)
                raise
        return training_step_with_gradtrace


def _register_batch(steps: StepTracer, inputs: Mapping) -> None:
    """A Trainer batch's own facts: which tokens carry a label, which ones are attended to."""
    labels = inputs.get("labels")
    if isinstance(labels, torch.Tensor) and labels.dim() >= 1 and not labels.is_floating_point():
        steps.observe(f"labels != {IGNORE_INDEX}", labels != IGNORE_INDEX, expect_grad=False, role="mask")
    attention = inputs.get("attention_mask")
    if isinstance(attention, torch.Tensor) and attention.dim() == 2:
        steps.observe("attention_mask", attention, expect_grad=False, role="attention_mask")
