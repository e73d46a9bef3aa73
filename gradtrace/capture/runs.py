"""Engine runs as the hooks see them: which run a hook fired in, whether it is nested, when it ends.

An engine run is one ``backward`` or ``autograd.grad`` call. Hooks learn the
run they fire in from its graph-task id, whether it writes ``.grad`` from the
AccumulateGrad node they fire under, and close it with a callback the engine
runs when it drains (``queue_callback``): no torch function is patched.

A *nested* run is one started from inside another run's backward (reentrant
checkpointing recomputes its segment and calls ``torch.autograd.backward``
from the ``CheckpointFunction``'s backward). Which pass a run belongs to is
decided elsewhere (``assign.PassAssigner``); this module only describes runs.
"""
from __future__ import annotations

import sys
from typing import Callable, List, Optional, Tuple

import torch

from .._torch_compat import current_autograd_node, current_graph_task_id, queue_callback, will_engine_execute_node
from .frames import function_backward_on_stack

current_task: Callable[[], int] = current_graph_task_id


def at_run_end(callback: Callable[[], None]) -> None:
    """Run ``callback`` when the current engine run finishes (nested runs fire their own)."""
    queue_callback(callback)


def run_accumulates_grad() -> bool:
    """Inside a parameter hook: does this engine run write ``.grad``?

    Asking the engine whether it will execute the AccumulateGrad node answers True in
    ``.backward()`` and raises for a leaf in ``autograd.grad`` (verified on
    torch 2.13), which is the one fact we need. Asked once per run.
    """
    node = current_autograd_node()
    if node is None:  # a hook fired outside any node: only .backward() on a leaf tensor itself does that
        return True
    try:
        return bool(will_engine_execute_node(node))
    except RuntimeError:
        return False


def started_inside_another_run(depth: int = 2) -> bool:
    """Is a custom autograd Function's backward (the only way to start a run from a run) on the stack?

    ``depth`` skips this function's callers inside gradtrace: the walk starts at the hook.
    """
    return function_backward_on_stack(sys._getframe(depth))


class Run:
    """One engine run: its task id, whether it writes ``.grad``, whether it is nested, and what it saw."""

    __slots__ = ("task", "accumulates", "nested", "pass_", "start", "captured", "tensor_grads",
                 "first", "root_seen", "predicted", "before", "hookless", "armed")

    def __init__(self, task: int, nested: bool, pass_):  # pass_: a passes.Pass
        self.task = task
        self.accumulates: Optional[bool] = None  # unknown until a parameter hook fires (a leaf knows)
        self.nested = nested
        self.pass_ = pass_
        # Where this run's hits start in the pass's log: a nested run's hits
        # interleave with its outer run's exactly as the engine delivered them.
        self.start = pass_.hit_count
        self.captured: List[Tuple[int, torch.Tensor]] = []  # autograd.grad: the gradients handed back
        self.tensor_grads: List[Tuple[str, torch.Tensor]] = []
        # Hookless reading (capture/hookless.py): what opened the run ("param", "tensor", "root" for an
        # output of the watched forward, "written"); did an output hook see it; the parameters the
        # engine named for it and their .grad / version at its start; read without parameter hooks?
        # the parameters given hooks for this run only (autograd.grad).
        self.first = "param"
        self.root_seen = False
        self.predicted: Optional[List[int]] = None
        self.before = None
        self.hookless = False
        self.armed: List[int] = []
