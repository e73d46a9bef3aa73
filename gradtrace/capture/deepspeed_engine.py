"""DeepSpeed: where a ``DeepSpeedEngine`` keeps each pass's gradients, and when they can be read.

DeepSpeed is never imported here unless the user's process imported it already
(a watched engine means it did): it is not a dependency of gradtrace.

What the engine does with a backward, by ZeRO stage (verified on deepspeed 0.19.8):

* stage 0: ``engine.backward`` all-reduces (averages) ``.grad`` in place at the
  gradient accumulation boundary, like DDP; between boundaries (or under
  ``engine.no_sync()``) ``.grad`` holds this rank's accumulation;
* stages 1 and 2: at the boundary the averaged gradient goes into the
  optimizer's partitions and ``.grad`` is set to None: each rank holds a slice
  of the flat partition (``param._hp_mapping``: where its fragment lies, if on
  this rank). Between boundaries nothing can be read (stage 1 keeps the local
  sum in ``.grad``, stage 2 in its buckets);
* stage 3: parameters are empty placeholders (their shape is ``ds_shape``);
  every micro-step reduce-scatters into this rank's partition of each
  parameter (``deepspeed.utils.safe_get_local_grad``, padded at the end);
* ``engine.step()`` clears them all.

So a pass's figures are taken when DeepSpeed is done with a backward and before
it steps: when ``engine.backward()`` returns (the engine's method is wrapped on
the instance for the watch; an unlabelled ``engine.backward()`` is one pass of
its own, held open until the reduction is over), after DeepSpeed's own
end-of-backward callback for a plain ``loss.backward()`` (ZeRO's
PyTorch-style backward), or when ``engine.step()`` begins. Stages 1-3 give this
rank's shard of each averaged gradient: the pass is ``sharded`` and
``gather()`` gives the global figures, equal to ``engine.get_global_grad_norm()``
and ``deepspeed.utils.safe_get_full_grad``. Where a pass's own share cannot be
read (it began mid-accumulation, ends between boundaries at stages 1-2, spans an
optimizer step), its figures are unknown and the pass says why.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from .reading import CLEARED, reading_for
from .runs import at_run_end

LOCAL, REDUCED, SHARDED = "local", "reduced", "sharded"
_ONE_PASS = "label one pass per optimizer step (every micro-step up to and including engine.step())"


def _engine_class() -> Optional[type]:
    if "deepspeed" not in sys.modules:
        return None
    try:
        from deepspeed.runtime.engine import DeepSpeedEngine
    except ImportError:  # a broken or partial install: not an engine we can read
        return None
    return DeepSpeedEngine


def is_deepspeed_engine(obj: Any) -> bool:
    """Is ``obj`` a DeepSpeedEngine? (False without importing deepspeed where the process never did.)"""
    engine_class = _engine_class()
    return engine_class is not None and isinstance(obj, engine_class)


def _zero_stage_of(param: torch.Tensor) -> Optional[int]:
    if hasattr(param, "ds_id"):
        return 3
    if getattr(param, "_hp_mapping", "absent") != "absent":
        return 1  # 1 or 2: the parameter does not say which
    return None


class EngineWatch:
    """One watched DeepSpeed engine (or ZeRO parameters watched without theirs: ``engine`` None)."""

    def __init__(self, engine: Any, stage: Optional[int], params: List[torch.Tensor]):
        self.engine = engine
        self.stage = stage
        self.params = params
        self.inside_backward = False  # in the engine's backward(): its reduction follows the autograd run
        # Backward runs since the engine's last optimizer step (at ``step_seen``), the latest one included:
        # DeepSpeed's buffers hold them all. (Its micro-step counter cannot say: accelerate and the HF
        # Trainer call engine.step() once per optimizer step, marking the boundary themselves.)
        self.runs_since_step = 0
        self.step_seen: Optional[int] = None

    @classmethod
    def of(cls, root: Optional[nn.Module], params: List[torch.Tensor]) -> Optional["EngineWatch"]:
        engine_class = _engine_class()
        if engine_class is None:
            return None
        if isinstance(root, engine_class):
            return cls(root, int(root.zero_optimization_stage()), params)
        stages = {_zero_stage_of(p) for p in params} - {None}
        if stages:  # the engine's parameters, watched through engine.module (or a list)
            return cls(None, stages.pop() if len(stages) == 1 else None, params)
        return None

    # ---- what the figures are ---------------------------------------------------------
    def backward_scope(self) -> str:
        """Asked once as every ``.backward()`` run ends: what its figures are; also counts the run."""
        if self.engine is None:
            return LOCAL
        steps = self.optimizer_steps()
        if steps != self.step_seen:
            self.step_seen, self.runs_since_step = steps, 0
        self.runs_since_step += 1
        if self.stage:
            return SHARDED
        engine = self.engine
        synced = (self.inside_backward and engine.is_gradient_accumulation_boundary()
                  and getattr(engine, "enable_backward_allreduce", True)
                  and not getattr(engine, "inside_no_sync_ctxt", False))
        return REDUCED if synced else LOCAL

    def shapes(self) -> Dict[int, List[int]]:
        """ZeRO-3 leaves an empty placeholder in each parameter: its real shape is ``ds_shape``."""
        return {id(p): list(p.ds_shape) for p in self.params if hasattr(p, "ds_shape")}

    def reading_for(self, read_at: str):
        if self.engine is None and not self.stage:  # plain-looking parameters: nothing to add
            return reading_for(read_at)
        return EngineReading(self)

    # ---- where a pass stands in DeepSpeed's accumulation ----------------------------------
    def at_boundary(self) -> bool:
        return bool(self.engine.is_gradient_accumulation_boundary())

    def optimizer_steps(self) -> int:
        """Optimizer steps the engine took (``engine.step()`` steps only at an accumulation boundary)."""
        return int(self.engine.global_steps) if self.engine is not None else 0

    # ---- reading ---------------------------------------------------------------------
    def local_gradient(self, param: torch.Tensor) -> Optional[torch.Tensor]:
        """This rank's part of ``param``'s averaged gradient now, or None where DeepSpeed holds none readable."""
        if self.stage == 3:
            return _zero3_local(param)
        return _zero12_local(param)

    # ---- the engine's methods, wrapped for the watch -------------------------------------
    def attach(self, recorder, stack: contextlib.ExitStack) -> None:
        engine = self.engine
        if engine is None:
            return
        backward, step = engine.backward, engine.step  # bound methods (or a user's own wrappers)

        def watched_backward(*args, **kwargs):
            held = recorder.begin_held_pass() if recorder.active is None else None
            self.inside_backward = True
            try:
                result = backward(*args, **kwargs)
            except BaseException:
                self.inside_backward = False
                if held is not None:
                    held.fail("engine.backward() raised")
                    recorder.end_pass(held)
                raise
            self.inside_backward = False
            pass_ = held if held is not None else recorder.active
            if pass_ is not None:
                pass_.read_now()
            if held is not None:
                recorder.end_pass(held)
            return result

        def watched_step(*args, **kwargs):
            pass_ = recorder.active
            if pass_ is not None:
                pass_.read_now()  # a plain loss.backward() in this pass: read before the step clears it
            return step(*args, **kwargs)

        engine.backward, engine.step = watched_backward, watched_step
        stack.callback(_unwrap, engine, {"backward": watched_backward, "step": watched_step})


def _unwrap(engine: Any, wrapped: Dict[str, Any]) -> None:
    """Give the engine its own methods back (unless someone wrapped ours in the meantime: then leave theirs)."""
    for name, ours in wrapped.items():
        if engine.__dict__.get(name) is ours:
            del engine.__dict__[name]


def _zero12_local(param: torch.Tensor) -> Optional[torch.Tensor]:
    """ZeRO-1/2: this rank's fragment of ``param``'s averaged gradient (empty: no fragment here)."""
    mapping = getattr(param, "_hp_mapping", None)
    if mapping is None:
        return param.new_zeros(0)  # the parameter lies wholly in other ranks' partitions
    try:
        fragment = mapping.get_lp_grad_fragment(param._index_in_param_group)
    except (ValueError, KeyError, AttributeError):  # "only available immediately after backward and before step"
        return None
    if fragment is None:
        return None
    fragment = fragment.detach().reshape(-1)
    address = mapping.lp_fragment_address
    if fragment.numel() == param.numel() and address.numel != param.numel():
        # bf16 keeps a full accumulation buffer on every rank: only the fragment this partition owns counts
        fragment = fragment.narrow(0, address.start, address.numel)
    return fragment


def _zero3_local(param: torch.Tensor) -> Optional[torch.Tensor]:
    """ZeRO-3: this rank's partition of ``param``'s averaged gradient, without the padding after the end."""
    from deepspeed.utils import safe_get_local_grad
    import torch.distributed as dist

    try:
        partition = safe_get_local_grad(param)
    except (AssertionError, KeyError, AttributeError, RuntimeError):
        return None
    if partition is None:
        return None
    partition = partition.detach().reshape(-1)
    size = partition.numel()
    group = getattr(param, "ds_process_group", None)
    start = dist.get_rank(group=group) * size
    return partition.narrow(0, 0, min(size, max(0, int(param.ds_numel) - start)))


class EngineReading:
    """A pass's reading under DeepSpeed: figures taken when the engine is done with a backward.

    Every take reads every parameter the pass reached so far and replaces the
    previous take (DeepSpeed's buffers hold the accumulation, not one run's share).
    """

    __slots__ = ("watch", "pass_", "taken", "dirty", "runs_before", "steps")
    # Told of a run after the run's other end-of-run callbacks (DeepSpeed's own, for a plain loss.backward()).
    reads_values = True

    def __init__(self, watch: EngineWatch):
        self.watch = watch
        self.pass_ = None
        self.taken: List[Tuple[List[int], Any]] = []
        self.dirty = False  # a run ended since the last take
        self.runs_before: Optional[int] = None  # backward runs since the last optimizer step, before the pass's
        self.steps: Optional[int] = None  # engine.step() calls seen when the pass's first run ended

    def bind(self, pass_) -> None:
        self.pass_ = pass_

    def run_ended(self, pass_, indices: List[int], left=None) -> None:
        # (``left``: never given here: a DeepSpeed engine is never read hookless, see Wrapper.allows_hookless)
        self._note_first_run()
        self.dirty = True
        if self.watch.stage and not self.watch.inside_backward:
            # A plain loss.backward() (ZeRO's PyTorch-style backward): DeepSpeed reduces in a callback it
            # queued during the run; one queued from this callback runs after it.
            at_run_end(self.take)

    def _note_first_run(self) -> None:
        """As the pass's first run ends (or, for a pass that finished at its run's end, as it is read)."""
        if self.steps is None:
            self.steps = self.watch.optimizer_steps()
            self.runs_before = max(self.watch.runs_since_step - 1, 0)

    def take(self) -> None:
        """Read the pass's gradients now (DeepSpeed is done with its backward and has not stepped)."""
        if self.pass_ is not None and not self.pass_.closed:
            self._take()

    def _take(self) -> None:
        pass_ = self.pass_
        if not self.dirty or pass_ is None:
            return
        self.dirty = False
        self._note_first_run()  # a pass that finished at its run's end never heard of the run
        indices = sorted(pass_.backward_indices)
        reason = self._why_unknown()
        known, grads = [], []
        if reason is None:
            for i in indices:
                grad = self._gradient(pass_, i)
                if grad is not None:
                    known.append(i)
                    grads.append(grad)
            if len(known) < len(indices):
                reason = self._between_boundaries()
        self.taken = [(known, pass_.figures(grads))] if known else []
        # A parameter wholly in other ranks' partitions: nothing here, which is not "exactly zero"
        pass_.set_empty([i for i, g in zip(known, grads, strict=False) if g.numel() == 0])
        known_now = set(known)
        pass_.set_unknown([i for i in indices if i not in known_now], reason)

    def _gradient(self, pass_, index: int) -> Optional[torch.Tensor]:
        param = pass_.params[index]
        if not self.watch.stage:  # ZeRO-0: .grad, averaged at the boundary
            grad = param.grad
            return pass_.gain(index, grad) if grad is not None else None
        return self.watch.local_gradient(param)

    def _why_unknown(self) -> Optional[str]:
        watch = self.watch
        if watch.engine is None:
            return ("these are DeepSpeed ZeRO parameters watched without their engine: DeepSpeed keeps their "
                    "gradients in its own partitions, and only the engine says when they are complete. Watch "
                    "the engine deepspeed.initialize() returned (the HF Trainer's trainer.model_wrapped, "
                    "accelerate's prepared model)")
        if watch.optimizer_steps() != self.steps:
            return "the pass spans a DeepSpeed optimizer step, which clears the gradients; " + _ONE_PASS
        if watch.stage and self.runs_before:
            return (f"the pass began after {self.runs_before} backward(s) that DeepSpeed accumulated since its last "
                    f"optimizer step: ZeRO-{watch.stage}'s partitions hold their gradients too; " + _ONE_PASS)
        return None

    def _between_boundaries(self) -> str:
        watch = self.watch
        if watch.engine is not None and watch.stage in (1, 2) and not watch.at_boundary():
            return (f"DeepSpeed ZeRO-{watch.stage} reduces gradients into its partitions only at the gradient "
                    "accumulation boundary, and this pass ended before it: until then they are inside DeepSpeed, "
                    "out of reach; " + _ONE_PASS)
        return ("DeepSpeed held no readable gradient for them when the pass was read (read before engine.step(), "
                "or let engine.backward() end inside the pass)")

    # ---- GradReading ---------------------------------------------------------------------
    def pieces(self) -> List[Tuple[List[int], Any]]:
        if self.dirty and self.watch.optimizer_steps() == self.steps:  # nothing stepped since: still readable
            self._take()
        return self.taken

    def backward_grad(self, param: torch.Tensor, index: int) -> Tuple[Optional[torch.Tensor], str]:
        return None, CLEARED

    def all_as_left(self, params: List[torch.Tensor], order: List[int], grads: List[torch.Tensor]) -> bool:
        return True

    def release(self) -> None:
        self.taken = []
        self.pass_ = None
