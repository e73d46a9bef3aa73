"""``.backward()`` runs seen without a Python hook per parameter (issue 23).

A tensor hook on every watched parameter sees every run that reaches it, in the
engine's order, at the price of a Python call per parameter per run: on a chain
of 1,000 small layers, about as much as the rest of gradtrace together. For
``.backward()`` runs, whose gradients land in ``.grad``, the hook is not needed
once the watch knows the run's shape:

1. **Run start.** The watched model's forward puts a tensor hook on each of its
   outputs that requires grad (``ForwardOutputs``). Backward reaches an output
   before any parameter used inside that forward (their gradients all flow
   through it). There, ``will_engine_execute_node`` over each parameter's
   AccumulateGrad node (held, so every forward reuses the same node) names the
   parameters this run will write, or raises for a parameter that
   ``autograd.grad`` captures: such a run gets gradtrace's tensor hook on those
   parameters for its duration, as before.
2. **Run end.** ``.grad`` identity and ``_version`` of those parameters, read at
   the start and at the end in C-level loops: each one that changed was reached
   (one hit per run). The same reads serve the pass's reading strategy.
3. **Order.** The engine's order cannot be read without a hook: it is learned.
   A watch begins with the hooks in (``LEARNING``). A run whose output hook fired
   before any parameter hook, that reached exactly the parameters the engine
   named and changed every one's ``.grad``, teaches its order; then the hooks come
   out (``HOOKLESS``). A later run for which the engine names the same parameters
   reports that order; one for which it names others gets the hooks back at its
   start, before any of them is reached, and is seen exactly (and teaches its
   order in turn).
4. **Back to hooks.** Anything else outside that pattern puts the hooks back
   (``relearn``): a watched module run with grad outside the model's forward
   (seen by the cut detector's hooks, before its backward: hookless reading needs
   ``cuts`` on), a nested run (reentrant checkpointing), runs of two threads at
   once (both at their start), a parameter named but left unchanged (its run
   reports the others in the learned order), a run only a registered tensor saw,
   and, when a labelled pass ends, a ``.grad`` that is a new tensor although no
   run seen reached it (a backward that never went through the model's output:
   counted as reached by the pass).
5. **Two threads.** The hooks go in for good (``pin``) once the model (or a
   submodule on its own, or the compiled model) runs with grad in a second
   thread, and once a run begins while another top-level run is open or has
   reached the model's output (two threads' backwards through one forward's
   outputs): runs of two threads may overlap, where ``.grad`` cannot tell them
   apart, and taking a hook out destroys the engine's pre-hook that another
   thread's backward may be calling (``hook_state.ParamHooks``). The hooks come
   out only at the end of a run while no other run is known to be in flight. A
   backward that raised between the model's output and its first parameter leaves
   its start noted: the next run then pins too (exact; only the speed-up is lost).

Where hooks are always used: a watch of bare parameters (no forward to hook),
``cuts="off"`` (no module hooks to see a submodule called on its own), wrappers
(DDP, FSDP: ``.grad`` is written after the run), tensor-subclass or non-leaf
parameters. What hookless runs cannot see: an ``autograd.grad`` run whose graph
reaches watched parameters only through ops outside every watched module's
forward (``F.linear(x, model.fc.weight)``) while the hooks are out.
"""
from __future__ import annotations

import itertools
import operator
import threading
from threading import get_ident
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from .._torch_compat import will_engine_execute_node
from .hook_state import ParamHooks
from .reading import RunLeft

# The watch's state.
NEVER = "never"  # hooks always: hookless runs are not possible for this watch
LEARNING = "learning"  # hooks in; the next plain run teaches the order
HOOKLESS = "hookless"  # hooks out; .backward() runs read at their end

_GRAD = operator.attrgetter("grad")
_VERSION = operator.attrgetter("_version")

# (.grad of each parameter, the _version of each, -1 where .grad is None; None when every .grad is None)
Snapshot = Tuple[List[Optional[torch.Tensor]], Optional[List[int]]]


def snapshot(params: Sequence[torch.Tensor]) -> Snapshot:
    grads = list(map(_GRAD, params))
    if all(map(operator.is_, grads, itertools.repeat(None))):  # a zeroed (set_to_none) model: no versions to read
        return grads, None
    try:
        return grads, list(map(_VERSION, grads))
    except AttributeError:  # some .grad is None
        return grads, [-1 if g is None else g._version for g in grads]


def changed(before: Snapshot, after: Snapshot) -> Optional[List[bool]]:
    """Per parameter: is ``.grad`` another tensor, or the same one changed in place? None: every one is."""
    same = list(map(operator.is_, before[0], after[0]))
    if not any(same):
        return None
    if before[1] is None or after[1] is None:  # the same object throughout is None throughout
        return list(map(operator.not_, same))
    return list(map(operator.or_, map(operator.not_, same), map(operator.ne, before[1], after[1])))


def accumulate_grad_nodes(params: List[torch.Tensor]) -> Optional[list]:
    """Each parameter's AccumulateGrad node, or None when one has none (not a plain leaf)."""
    nodes = []
    with torch.enable_grad():
        for p in params:
            if not p.is_leaf or not p.requires_grad:
                return None
            try:
                node = p.view_as(p).grad_fn.next_functions[0][0]
            except (AttributeError, IndexError, RuntimeError):
                return None
            if node is None or getattr(node, "variable", None) is not p:
                return None
            nodes.append(node)
    return nodes


class HooklessRuns:
    """The watch's state (``NEVER`` / ``LEARNING`` / ``HOOKLESS``), the learned order, and the run
    start and end of a ``.backward()`` run read without parameter hooks."""

    def __init__(self, params: List[torch.Tensor], hooks: ParamHooks, possible: bool):
        self.params = params
        self.hooks = hooks
        plain = possible and all(hooks.plain)
        self.mode = LEARNING if plain else NEVER
        # Each parameter's AccumulateGrad node, found at the first forward with grad (``find_nodes``),
        # not at watch entry (a view per parameter: a watch that never runs backward need not pay).
        self.nodes: Optional[list] = None
        self.all = list(range(len(params)))
        self.learned_set: Optional[List[int]] = None  # the parameters of the learned order, in model order
        self.learned_order: Optional[List[int]] = None  # the same, in the engine's order
        self.relearned = 0  # how many times the hooks went back in (tests and benchmarks read it)
        self.pinned = False  # the model ran in two threads: hooks in until the watch ends
        self._positions: Optional[Callable[[list], tuple]] = None

    @property
    def possible(self) -> bool:
        return self.mode != NEVER

    def find_nodes(self) -> None:
        """Hold every parameter's AccumulateGrad node (so every forward uses it); none: hooks always."""
        if self.nodes is None and self.mode != NEVER:
            self.nodes = accumulate_grad_nodes(self.params)
            if self.nodes is None:
                self.mode = NEVER  # the hooks put in at entry stay for good

    # ---- the mode ---------------------------------------------------------------------------------
    def start(self) -> None:
        """At watch entry: every parameter's hook in (the exact way), whatever comes next."""
        self.hooks.arm(self.all)

    def relearn(self) -> None:
        """Hooks back in for the runs to come (and the rest of the current one)."""
        with self.hooks.lock:  # (a mode and its hooks change together: see pin)
            if self.mode == HOOKLESS:
                self.mode = LEARNING
                self.relearned += 1
                self.hooks.arm(self.all)

    def pin(self) -> None:
        """The model ran in a second thread: hooks back in, and never out again until the watch ends."""
        with self.hooks.lock:  # not between another thread's check in learn and its disarm
            self.pinned = True
            self.relearn()

    def learn(self, order: List[int]) -> None:
        """A plain run's order: the hooks come out (unless pinned)."""
        self.learned_order = order
        self.learned_set = self.all if len(order) == len(self.all) else sorted(order)
        self._positions = None
        with self.hooks.lock:
            if self.mode == LEARNING and not self.pinned:
                self.mode = HOOKLESS
                self.hooks.disarm(self.all)

    def _learned_positions(self) -> Callable[[list], tuple]:
        """Picks, from a list in model order over the learned set, its items in the learned engine order."""
        if self._positions is None:
            where = dict(zip(self.learned_set, range(len(self.learned_set)), strict=False))
            positions = [where[i] for i in self.learned_order]
            self._positions = operator.itemgetter(*positions) if len(positions) > 1 else (lambda xs: (xs[positions[0]],))
        return self._positions

    # ---- a run's start (the output hook) ---------------------------------------------------------
    def will_execute(self) -> Optional[List[bool]]:
        """Per parameter: will this run write its ``.grad``? None for an ``autograd.grad`` run that
        captures a watched parameter (the engine refuses to say for a captured leaf)."""
        try:
            return list(map(will_engine_execute_node, self.nodes))
        except RuntimeError:
            return None

    def captured(self) -> List[int]:
        """The parameters the current ``autograd.grad`` run captures."""
        found = []
        for i, node in enumerate(self.nodes):
            try:
                will_engine_execute_node(node)
            except RuntimeError:
                found.append(i)
        return found

    def knows(self, predicted: List[int]) -> bool:
        """Is ``predicted`` (model order) the set of parameters whose engine order was learned?"""
        return predicted is self.learned_set or predicted == self.learned_set

    def predicted(self, flags: List[bool]) -> List[int]:
        return self.all if all(flags) else list(itertools.compress(self.all, flags))

    def params_of(self, indices: List[int]) -> Sequence[torch.Tensor]:
        return self.params if indices is self.all else list(map(self.params.__getitem__, indices))

    # ---- a run's end --------------------------------------------------------------------------------
    def left(self, reached: List[int], predicted: List[int], after: Snapshot) -> Optional[RunLeft]:
        """The reached parameters' part of ``after`` (taken over ``predicted``), in the order the run
        reported them (``reached``), without a None ``.grad``."""
        grads, versions = after
        if not reached or versions is None:
            return None
        if reached is self.learned_order and predicted is self.learned_set:
            pick = self._learned_positions()
            grads, versions = list(pick(grads)), list(pick(versions))
        elif reached is not predicted:
            where = dict(zip(predicted, range(len(predicted)), strict=False))
            positions = [where[i] for i in reached]
            grads, versions = [grads[k] for k in positions], [versions[k] for k in positions]
        if all(map(operator.is_not, grads, itertools.repeat(None))):
            return RunLeft(reached, grads, versions)
        kept = [k for k, g in enumerate(grads) if g is not None]  # cleared inside the run (optimizer in backward)
        return RunLeft([reached[k] for k in kept], [grads[k] for k in kept], [versions[k] for k in kept])

    def reached(self, predicted: List[int], before: Snapshot, after: Snapshot) -> Tuple[List[int], bool]:
        """The predicted parameters whose ``.grad`` changed, and whether every one did."""
        flags = changed(before, after)
        if flags is None or all(flags):
            return predicted, True
        return list(itertools.compress(predicted, flags)), False

    def in_order(self, reached: List[int]) -> Tuple[List[int], bool]:
        """``reached`` (model order) in the learned engine order; False when the order does not cover it
        (the new ones follow the known ones, in model order)."""
        if reached is self.learned_set or reached == self.learned_set:
            return self.learned_order, True
        members = set(reached)
        known = [i for i in self.learned_order or () if i in members]
        if len(known) == len(reached):
            return known, True
        seen = set(known)
        return known + [i for i in reached if i not in seen], False


class ForwardOutputs:
    """The watched model's forward, as hookless reading needs it: how deep its calls are, and the
    run-start hook on each of its outputs.

    A watched module that runs with grad outside the model's forward (``model[2](h)``
    called directly) makes a graph whose backward may never reach one of the model's
    outputs: the cut detector reports it (``ran_outside``), and the hooks go back in
    before that backward can run. The cut detector's root wrapper (or hooks) counts
    the calls and hands over each output (``mark``).
    """

    def __init__(self, on_output_grad: Callable[[torch.Tensor], None], ran_outside: Callable[[], None],
                 handles: list, find_nodes: Callable[[], None], second_thread: Callable[[], None]):
        self.on_output_grad = on_output_grad
        self.find_nodes: Optional[Callable[[], None]] = find_nodes  # at the first forward with grad
        self._relearn = ran_outside
        self.handles = handles  # every output hook's handle, removed at exit (outputs the user kept)
        self.depth = 0  # calls of the watched model's forward in progress
        # The thread of the first forward with grad; a forward with grad in another (of the model, of
        # a submodule on its own, of the compiled model) calls ``second_thread`` (once), before that
        # thread can run a backward through its output.
        self.thread: Optional[int] = None
        self.second_thread: Optional[Callable[[], None]] = second_thread
        self._thread_lock = threading.Lock()  # two threads' first forwards at once: one is the second

    def pre_hook(self) -> Callable:
        """A forward pre-hook that counts a call in (where the model is seen through forward hooks): a
        plain function, as a module deep-copied while watched copies a function by reference."""
        def enter(module, args, kwargs) -> None:
            self.depth += 1
        return enter

    def ran_outside(self) -> None:
        """A watched module ran with grad outside the model's forward (or the compiled model ran): hooks in."""
        if get_ident() != self.thread:
            self._seen_in_thread(get_ident())
        self._relearn()

    def _seen_in_thread(self, me: int) -> None:
        with self._thread_lock:
            if self.thread is None:
                self.thread = me
                return
            second, self.second_thread = self.second_thread, None
        if second is not None:
            second()

    def mark(self, output) -> None:
        """A call of the model returned ``output``: a run-start hook on each of its tensors that requires grad."""
        if not torch.is_grad_enabled():
            return
        me = get_ident()
        if me != self.thread:
            self._seen_in_thread(me)
        if self.find_nodes is not None:
            self.find_nodes()
            self.find_nodes = None
        for t in _tensors(output):
            if t.requires_grad and t.grad_fn is not None:
                self.handles.append(t.register_hook(self.on_output_grad))
        if len(self.handles) > 256:  # outputs of finished steps: their tensors are gone, or kept by the user
            del self.handles[:128]


def _tensors(output) -> list:
    """The tensors of a forward's output, one level deep (a tensor, a tuple/list, a dict / ModelOutput)."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        return [v for v in output.values() if isinstance(v, torch.Tensor)]
    if isinstance(output, (tuple, list)):
        return [v for v in output if isinstance(v, torch.Tensor)]
    return []
