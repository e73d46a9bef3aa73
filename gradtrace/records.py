"""Plain records: what a trace knows, with no torch objects in it.

Everything here is a dataclass of Python numbers and strings, so the analysis
and the renderer work the same on a live trace and on one loaded from JSON.
Each field is declared once, with a type from ``fields.py``: the storage
schema (``schema.py``) is read off these declarations, so a field added here is
saved, loaded and checked with no other change.
"""
from __future__ import annotations

import collections.abc
import dataclasses
import itertools
import math
from dataclasses import dataclass, field
from typing import (AbstractSet, Any, ClassVar, Dict, FrozenSet, Iterator, List, Mapping, Optional, Sequence,
                    Tuple, Union)

from .fields import (NOT_STORED, SEVERITIES, TENSOR_ROLES, Amount, Count, CutKind, CutsMode, FailureKind,
                     ForwardCause, ForwardSite, ForwardValues, Magnitude, Name, Replacement, RunKind, Scope, Severity,
                     TensorRole, Via, Wrapper, stored, stored_as, stored_name)

__all__ = [
    "GradRecord", "PassColumns", "PassTrace", "TensorGradFacts", "ValueStats", "TensorRecord", "TensorPassFacts",
    "Cut", "OptimizerRecord",
    "ScalarRecord", "Verdict", "TraceMeta", "InnerProduct", "Contribution", "NonfiniteOrigin",
    "ForwardNonfinite", "FailureCause", "UnregisteredModule", "TiedParams", "SEVERITIES", "TENSOR_ROLES", "VALUE_FIELDS",
]

# What ``capture.values.value_stats`` computes for a registered tensor, in order;
# ``ValueStats.merge`` reads them by name. ``mean`` and ``m2`` (the sum of squared
# deviations from that mean) are over the finite elements.
VALUE_FIELDS = ("numel", "mean", "m2", "min", "max", "zeros", "nonfinite", "rows", "constant_rows")


_UNSET = object()


class ReadsLikeADict:
    """``record["field"]``, ``record.get("field")``, ``"field" in record``, ``dict(record)``.

    These records were dicts before they were typed, and callers still read
    them that way (``trace.inner_products[0]["dot"]``,
    ``p.nonfinite_origin["location"]``); keys are the names the file stores.
    gradtrace's own code reads attributes.
    """

    def keys(self) -> List[str]:
        return [stored_name(f) for f in dataclasses.fields(self) if stored(f)]

    def _attribute(self, key: Any) -> str:
        for f in dataclasses.fields(self):
            if stored(f) and stored_name(f) == key:
                return f.name
        raise KeyError(key)

    def __getitem__(self, key: Any) -> Any:
        return getattr(self, self._attribute(key))

    def get(self, key: Any, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default

    def __contains__(self, key: Any) -> bool:
        return key in self.keys()


@dataclass
class GradRecord:
    """One parameter's gradient in one pass (only parameters that were reached).

    ``norm`` and ``max_abs`` describe the gradient the pass produced: for
    ``.backward()`` what ``.grad`` gained during the pass, for
    ``torch.autograd.grad`` the sum of the gradients handed back.
    """

    name: str
    hits: Count = 0  # engine deliveries: hook fires, one per run that reached it
    norm: Magnitude = 0.0
    max_abs: Magnitude = 0.0
    zero: bool = False  # reached, and every element exactly zero
    nonfinite: Count = 0  # NaN/Inf elements
    via: Via = "backward"  # "backward" (.grad written), "grad" (handed back), "both"
    order: Count = 0  # position in backward order within the pass (0 = first reached)
    stale: bool = False  # .grad held nonzero values when the pass first reached it
    # The gradient was cleared (set to None, or zeroed in place) before gradtrace could read it:
    # norm and max_abs are unknown (stored as 0), and it is not an exact zero.
    cleared: bool = False


@dataclass
class PassColumns:
    """A pass's per-parameter figures as parallel lists, in backward order.

    One sequence per ``GradRecord`` field: a pass over many thousands of
    parameters costs a few lists until someone asks for ``records``. A live
    trace keeps the float columns as ``array("d")`` and ``order`` as a
    ``range`` (8 and 0 bytes a parameter instead of 32 and 36).
    """

    name: List[str]
    hits: List[int]
    norm: Sequence[float]
    max_abs: Sequence[float]
    zero: List[bool]
    nonfinite: List[int]
    via: List[str]
    order: Sequence[int]
    stale: List[bool]
    cleared: List[bool]

    def records(self) -> Dict[str, GradRecord]:
        fields = [getattr(self, f.name) for f in dataclasses.fields(GradRecord)]
        return {values[0]: GradRecord(*values) for values in zip(*fields, strict=False)}


@dataclass
class PassTrace:
    """Everything recorded for one labelled pass (or one unlabelled engine run)."""

    name: Name
    # every trainable parameter watched, in model order (a file stores them once, for every pass)
    params: Tuple[str, ...] = field(metadata=NOT_STORED)
    runs: Count = 0  # top-level engine runs (nested reentrant runs are not counted)
    kinds: List[RunKind] = field(default_factory=list)  # "backward" and/or "grad"
    expected: Optional[List[str]] = None  # parameters reachable from registered tensors
    expected_partial: bool = False  # a checkpoint node hid part of the graph
    auto: bool = False  # named automatically (run outside any pass_)
    kept_grads: bool = False  # the live trace kept this pass's gradients
    step_start: bool = False  # the pass began an optimizer step: stale .grad is judged here only
    failed: Optional[str] = None  # the exception the pass's block ended with, if any
    # cuts="ops": where the first NaN/Inf gradient was born (see capture.opcuts.NonfiniteOrigins)
    nonfinite_origin: Optional[NonfiniteOrigin] = None
    # A merged trace (gather()): the global ranks whose own backward made the NaN/Inf (cuts="ops" found
    # ``nonfinite_origin`` there); under DDP every rank's reduced .grad holds it, only these made it.
    nonfinite_ranks: Optional[List[Count]] = None
    # What the figures are: "local" (this process's gradients: autograd.grad, no wrapper, DDP's
    # no_sync), "reduced" (.grad after DDP's all-reduce) or "sharded" (FSDP: this rank's shard,
    # global only after gather()).
    scope: Scope = "local"
    # Where the pass's forward first held NaN/Inf (module outputs checked on the device, read only for a
    # pass whose gradients were non-finite or that failed), and how many values were checked when it was
    # read (None: not read; checked with no forward_nonfinite: every checked value was finite).
    forward_nonfinite: Optional[ForwardNonfinite] = None
    forward_checked: Optional[Count] = None
    failure: Optional[FailureCause] = None  # the culprit behind ``failed``, where gradtrace could name it
    # The forwards the pass differentiated (cuts="modules"/"ops"; None: not recorded): modules owning
    # trainable parameters that ran with grad enabled since the previous pass ended, in forward order,
    # and those of them whose output required grad.
    forward_modules: Optional[List[str]] = None
    forward_carried: Optional[List[str]] = None
    forward_cuts: Optional[List[Count]] = None  # cuts seen outside any pass in that time (Cut.seq)
    # Watched parameters whose values were all zero when the pass began (a zero-initialised LoRA B,
    # lora_up, lora_embedding_A): what explains a sibling's exactly zero gradient. Recorded only for
    # a pass that had exactly zero gradients (None: not recorded).
    zero_valued: Optional[List[Name]] = None
    # Runs of this pass that began after the gradient an earlier run (with no optimizer step in
    # between) had left in .grad was cleared (set to None or zeroed): zero_grad() inside an
    # accumulation loop discards what the earlier runs accumulated.
    grads_reset: Optional[Count] = None  # None: none seen
    # Why the figures of the parameters marked ``cleared`` are unknown, when a distributed wrapper is
    # the reason (DDP / FSDP / DeepSpeed keep part of this pass's gradient where it cannot be read
    # apart from other microbatches'); None: cleared ones were cleared by the user's code.
    unknown_because: Optional[str] = None
    # Watched parameters the engine reached with an undefined (None) gradient in this pass: the backward
    # of an op between the loss and them returned None for them (a custom autograd.Function's backward,
    # most often), so they got nothing. None: none seen (hooks see it; a hookless run puts them back).
    undefined_grads: Optional[List[Name]] = None
    _columns: Optional[PassColumns] = field(default=None, repr=False, compare=False)
    _records: Optional[Dict[str, GradRecord]] = field(default=None, repr=False, compare=False)
    _covered: Optional[FrozenSet[str]] = field(default=None, repr=False, compare=False)
    # Figures derived from the records, each computed once: the analysis reads every kept pass on every
    # verdicts() call (a training loop judges each step over up to max_passes passes).
    # (init=False: dataclasses.replace -- gather's merged passes -- must not carry the old pass's figures over)
    _derived: Optional[Dict[str, Any]] = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def from_columns(cls, columns: PassColumns, **fields) -> "PassTrace":
        return cls(_columns=columns, **fields)

    @property
    def records(self) -> Dict[str, GradRecord]:
        """``{parameter: GradRecord}`` for every parameter the pass reached, in backward order."""
        if self._records is None:
            self._records = self._columns.records() if self._columns is not None else {}
        return self._records

    @records.setter
    def records(self, value: Dict[str, GradRecord]) -> None:
        # Records are replaced as a whole, never edited in place: what was derived from the old ones goes.
        self._records, self._columns, self._covered, self._derived = value, None, None, None

    @property
    def covered(self) -> FrozenSet[str]:
        # Asked once per module group and pass by the report: build the set once.
        if self._covered is None:
            names = self._columns.name if self._records is None and self._columns is not None else self.records
            self._covered = frozenset(names)
        return self._covered

    @property
    def missing(self) -> set:
        return set(self.params) - self.covered

    def _derive(self, key: str, compute) -> Any:
        derived = self._derived
        if derived is None:
            derived = self._derived = {}
        value = derived.get(key, _UNSET)
        if value is _UNSET:
            value = derived[key] = compute()
        return value

    def _flagged(self, attribute: str) -> FrozenSet[str]:
        """The reached parameters whose record has ``attribute`` set."""
        def names():
            if self._records is None and self._columns is not None:
                return frozenset(itertools.compress(self._columns.name, getattr(self._columns, attribute)))
            return frozenset(n for n, r in self._records.items() if getattr(r, attribute)) if self._records else \
                frozenset()
        return self._derive(attribute, names)

    @property
    def zero(self) -> FrozenSet[str]:
        return self._flagged("zero")

    @property
    def stale(self) -> FrozenSet[str]:
        return self._flagged("stale")

    @property
    def cleared(self) -> FrozenSet[str]:
        """Reached parameters whose gradient was cleared before it could be read (figures unknown)."""
        return self._flagged("cleared")

    def column(self, attribute: str) -> list:
        """One ``GradRecord`` field over every reached parameter, without building the records."""
        if self._records is None and self._columns is not None:
            return getattr(self._columns, attribute)
        return [getattr(r, attribute) for r in self.records.values()]

    @property
    def total_norm(self) -> float:
        return self._derive("total_norm", lambda: sum(n * n for n in self.column("norm")) ** 0.5)

    @property
    def max_abs(self) -> float:
        return self._derive("max_abs", lambda: max(self.column("max_abs"), default=0.0))

    @property
    def nonfinite(self) -> int:
        return self._derive("nonfinite", lambda: sum(self.column("nonfinite")))

    def in_backward_order(self) -> List[GradRecord]:
        return list(self._derive("in_backward_order",
                                 lambda: tuple(sorted(self.records.values(), key=lambda r: r.order))))

    def nonfinite_in_backward_order(self) -> List[GradRecord]:
        """The records with NaN/Inf elements, in backward order (empty, at no cost, when there are none)."""
        if not self.nonfinite:
            return []
        return [r for r in self.in_backward_order() if r.nonfinite]


@dataclass
class TensorGradFacts:
    """What backward did at a registered tensor during one pass."""

    hits: Count = 0  # how many times backward reached it (one per microbatch and run)
    norm: Magnitude = 0.0  # sqrt of the summed squares of every incoming gradient
    max_abs: Magnitude = 0.0
    nonfinite: Count = 0

    @property
    def reached(self) -> bool:
        return self.hits > 0

    @property
    def zero(self) -> bool:
        return self.hits > 0 and self.max_abs == 0.0 and self.nonfinite == 0


@dataclass
class ValueStats:
    """Value facts of a registered tensor, aggregated over every call with its name."""

    numel: Count = 0
    min: float = 0.0
    max: float = 0.0
    mean: float = 0.0
    std: Magnitude = 0.0
    zeros: Count = 0  # elements exactly zero
    nonfinite: Count = 0
    rows: Count = 0  # rows along the last dim (only when that dim has >= 2 elements)
    constant_rows: Count = 0  # rows whose elements are all equal (zero variance)

    def merge(self, row: Mapping[str, float]) -> None:
        """Fold in one call's figures (``VALUE_FIELDS``, as ``value_stats`` computes them).

        Mean and spread merge by Chan's update (count, mean, sum of squared deviations):
        no sum of squares minus a squared sum, which cancels for large, nearly equal values.
        """
        finite_n = row["numel"] - row["nonfinite"]
        old_n = self.numel - self.nonfinite
        new_n = old_n + finite_n
        if finite_n > 0:
            self.min = row["min"] if old_n == 0 else min(self.min, row["min"])
            self.max = row["max"] if old_n == 0 else max(self.max, row["max"])
            if old_n == 0:
                self.mean, m2 = row["mean"], row["m2"]
            else:
                delta = row["mean"] - self.mean
                m2 = self.std ** 2 * old_n + row["m2"] + delta * delta * old_n * finite_n / new_n
                self.mean += delta * finite_n / new_n
            self.std = math.sqrt(max(m2, 0.0) / new_n)
        self.numel += int(row["numel"])
        self.zeros += int(row["zeros"])
        self.nonfinite += int(row["nonfinite"])
        self.rows += int(row["rows"])
        self.constant_rows += int(row["constant_rows"])

    @property
    def zero_fraction(self) -> float:
        return self.zeros / self.numel if self.numel else 1.0

    @property
    def constant_fraction(self) -> float:
        return self.constant_rows / self.rows if self.rows else 0.0


@dataclass
class TensorPassFacts:
    """A registered tensor's value and row facts within one pass (the calls made for it)."""

    calls: Count = 0
    values: ValueStats = field(default_factory=ValueStats)
    row_facts: Dict[str, Amount] = field(default_factory=dict)


def merge_row_facts(into: Dict[str, float], facts: Mapping[str, float]) -> None:
    """Fold one call's row facts into ``into``: minima and maxima kept, counts and sums added."""
    for key, value in facts.items():
        old = into.get(key)
        if old is None:
            into[key] = value
        elif key.endswith("_min"):
            into[key] = min(old, value)
        elif key.endswith("_max"):
            into[key] = max(old, value)
        else:
            into[key] = old + value


@dataclass
class TensorRecord:
    """A tensor the user named with ``trace.tensor(name, t)``."""

    name: Name
    calls: Count = 0
    requires_grad: bool = False  # on every call
    requires_grad_calls: Count = 0  # calls on which it required grad
    grad_fn: Optional[str] = None  # name of the first grad_fn seen
    is_leaf: bool = True
    inference: bool = False  # an inference-mode tensor
    shape: List[Count] = field(default_factory=list)  # shape of the first call
    dtype: str = ""
    device: str = ""
    expect_grad: Optional[bool] = None
    values: ValueStats = field(default_factory=ValueStats)
    grads: Dict[str, TensorGradFacts] = field(default_factory=dict)  # per pass
    passes: List[str] = field(default_factory=list)  # passes open when it was registered
    cuts: List[Count] = field(default_factory=list)  # Cut.seq of the cuts seen while it was built
    reachable: Optional[List[str]] = None  # trainable parameters its graph reaches
    reach_partial: bool = False  # a checkpoint node hid part of its graph
    trainable_upstream: bool = False  # its graph reaches at least one watched parameter
    role: Optional[TensorRole] = None  # what the user said it is
    # Per-row facts summed over calls (``capture.values.row_facts``): "rows", "empty_rows",
    # "selected_min/max/sum", "left_padded", "right_padded", "on_padding", "empty_with_tokens", "std ..." bins.
    row_facts: Dict[str, Amount] = field(default_factory=dict)
    # The same value and row facts per pass (the pass a call was made in, or the next pass to end
    # after it): a mask empty at step k is judged at step k. Dropped with the pass (max_passes).
    # None until a pass holds facts (a file from an older gradtrace has none).
    by_pass: Optional[Dict[str, TensorPassFacts]] = None

    def merge_row_facts(self, facts: Mapping[str, float]) -> None:
        merge_row_facts(self.row_facts, facts)

    @property
    def padding_side(self) -> Optional[str]:
        """"left", "right", "none" or "mixed", from an attention mask's rows; None when not known."""
        left, right = self.row_facts.get("left_padded"), self.row_facts.get("right_padded")
        if left is None or right is None:
            return None
        return {(False, False): "none", (True, False): "left", (False, True): "right"}.get(
            (left > 0, right > 0), "mixed")


@dataclass
class Cut:
    """A place where the autograd graph was cut upstream of something trainable."""

    kind: CutKind
    module: str  # module path as named_modules() gives it ("" is the root)
    op: Optional[str] = None  # the op, when op-level detection saw it
    location: str = ""  # file:line of the user's code
    library_location: str = ""  # file:line of the innermost library frame (transformers, trl...), if any
    inputs_require_grad: Optional[bool] = None  # checkpoint cuts: did any input of the segment require grad?
    pass_name: Optional[str] = None  # pass open when it happened (None: outside any pass)
    module_type: str = ""
    count: Count = 1  # how many times the same cut was seen
    params: Count = 0  # trainable parameters inside the module
    seq: Count = 0  # order of recording
    # A parameter-free module's cut: the watched parameters its inputs were computed from (the only
    # ones it can have cut off). None: not asked (a module with parameters, or an op-level cut).
    upstream: Optional[List[str]] = None
    # A parameter-free module's detach: an output shares storage with an input that required grad, so
    # the data flowing through was cut (``x.detach()``, ``x.data``) — not fresh data that never carries
    # a gradient by design (rotary embeddings' cos/sin). None: not asked.
    passes_input: Optional[bool] = None


@dataclass
class OptimizerRecord:
    """An optimizer seen stepping while watched (``torch.optim``'s global step hooks), over the watch.

    ``updates`` says what its steps did to each watched parameter it stepped with a
    gradient, from a fixed sample of the parameter's elements (see ``capture/optim.py``):
    ``[steps judged, steps that moved no sampled element whose gradient was nonzero,
    ||update||^2 and ||weight||^2 of the sample at the latest step, the largest
    update-to-weight ratio of any step]``. Empty with ``watch(updates=False)``.
    """

    name: Name  # "AdamW#0": its class and the order gradtrace first saw it in
    params: List[str] = field(default_factory=list)  # watched parameters in its param groups (latest step)
    lrs: List[Optional[float]] = field(default_factory=list)  # each param group's lr at the latest step
    steps: Count = 0  # steps seen while watched
    # Passes whose gradients it stepped (the pass open at the step, else the newest finished pass),
    # with the number of steps; dropped with their pass (max_passes).
    passes: Dict[str, Count] = field(default_factory=dict)
    updates: Dict[str, List[Magnitude]] = field(default_factory=dict)
    dtypes: Dict[str, str] = field(default_factory=dict)  # of the parameters in ``updates``
    max_ratio: Magnitude = 0.0  # the largest whole-step ||update|| / ||weight|| of any step seen
    # Steps under a torch.amp.GradScaler: [pass, total norm of the gradients handed to the step, the scale].
    scaled_steps: List[List[Union[None, str, float]]] = field(default_factory=list)
    # Steps that had no nonzero gradient to apply (every .grad None, or every sampled one zero), and the
    # passes they followed (the newest 64).
    empty_steps: Count = 0
    empty_passes: List[Optional[str]] = field(default_factory=list)
    # Of them, the steps where .grad was there but every sampled element was zero: zeroed in place between
    # backward() and step() (zero_grad(set_to_none=False), clip_grad_norm_ with max_norm=0), not set to None.
    zeroed_steps: Count = 0
    # Parameters whose sampled weights its latest step changed although no sampled gradient element was
    # nonzero (momentum or weight decay acting on a zero or stale .grad): a frozen layer that still moves.
    drift: List[str] = field(default_factory=list)
    # Step by step: [step number (from 1, over the watch), the largest lr of its param groups (None:
    # unknown), its whole-step update-to-weight ratio from the sampled elements (None: not measured),
    # sampled elements with a nonzero gradient, those of them the step left bitwise unchanged]. The first
    # ``HISTORY_HEAD`` steps and the newest ``HISTORY_TAIL`` are kept: where a learning-rate schedule
    # killed the updates part-way (an lr of 0 from step k on, a decay to nothing).
    history: List[List[Optional[float]]] = field(default_factory=list)
    peak_lr: Magnitude = 0.0  # the largest lr of any step seen (any param group), kept steps or not
    # Steps that turned finite weights with finite gradients NaN/Inf (the first 8): [step, pass, the
    # parameters, sampled elements made non-finite] -- the update itself overflowed (Adam's eps in float16).
    nonfinite_steps: List[List[Union[None, str, float, List[str]]]] = field(default_factory=list)

    HISTORY_HEAD: ClassVar[int] = 16
    HISTORY_TAIL: ClassVar[int] = 240


@dataclass
class ScalarRecord:
    name: Name
    value: float
    pass_name: Optional[str] = None
    history: List[float] = field(default_factory=list)  # every value recorded under this name

    @property
    def prints_as_zero(self) -> bool:
        """True when ``f"{value:.6f}"`` shows zero but the value is not zero."""
        return self.value != 0.0 and float(f"{self.value:.6f}") == 0.0


@dataclass
class Verdict:
    code: str
    severity: Severity
    message: str
    evidence: dict = field(default_factory=dict)

    def __str__(self) -> str:
        return f"[{self.severity}] {self.code}: {self.message}"


@dataclass
class NonfiniteOrigin(ReadsLikeADict):
    """Where a pass's first NaN/Inf gradient was born (``watch(cuts="ops")``): the op whose backward made it."""

    op: str  # the op as the forward called it ("div", "__truediv__")
    location: str  # file:line of the call
    node: str = ""  # its backward node ("DivBackward0")
    module: str = ""  # the module it ran in ("" is the root module or top-level code)
    forward: ForwardValues = "unknown"  # were its forward values already NaN/Inf?
    pass_name: Optional[str] = field(default=None, metadata=stored_as("pass"))


@dataclass
class ForwardNonfinite(ReadsLikeADict):
    """Where a pass's forward first held NaN/Inf, in forward order (``capture/forward_values.py``).

    ``site`` "output": a module's output, the module made it; "input": a module's input that no
    module's output held before, made by the code of ``made_by`` around its submodules; "op": an op's
    output (``watch(cuts="ops")``).
    """

    module: str  # the module ("" is the root)
    module_type: str = ""
    site: ForwardSite = "output"
    cause: ForwardCause = "nan"
    nan: bool = False  # it held NaN
    inf: bool = False  # it held +inf or -inf (an overflow, when no NaN is there too)
    dtype: str = ""
    dtype_max: Optional[float] = None  # the dtype's largest finite value
    op: Optional[str] = None  # site "op": the op, and its file:line
    location: str = ""
    made_by: Optional[str] = None  # site "input": the module whose own code made it ("" the root or top level)
    made_by_type: str = ""
    after: Optional[str] = None  # the last module whose output was checked finite just before it
    largest: Optional[Magnitude] = None  # the largest finite |value| checked before it in the same forward
    largest_in: Optional[str] = None  # the module whose output held that
    mask: Optional[str] = None  # masked_softmax: the mask argument that held a fully masked row, and its module
    checked: Count = 0  # values checked before it in the pass's forward


@dataclass
class FailureCause(ReadsLikeADict):
    """The culprit behind a failed pass, found from the exception and what the watch saw (``capture/failures.py``).

    ``inference_tensor``: ``module`` holds, in ``attribute``, a tensor made under
    ``torch.inference_mode()`` (at ``location``; "" when that was before the watch began) that a
    forward with grad (``other``'s) tried to save for backward; with no ``attribute``, ``module`` ran under
    ``torch.inference_mode()`` inside the forward (at ``location``) and its output was that tensor. ``inplace``: ``module``'s output was
    saved for backward, then changed in place (by ``other`` when a module did it). ``no_graph``: the
    loss carries no graph; ``module`` is the last module whose output still carried one.
    """

    kind: FailureKind
    module: Optional[str] = None
    module_type: str = ""
    attribute: Optional[str] = None
    location: str = ""
    other: Optional[str] = None
    other_type: str = ""
    variable: Optional[str] = None  # inference_tensor: the failing code's variable that held it
    dtype: str = ""  # no_graph: the loss's dtype
    tensor: str = ""  # inplace: torch's description of the tensor ("[torch.FloatTensor [4, 8]], output 0 of Tanh")


@dataclass
class LooseTensor(ReadsLikeADict):
    """A tensor that requires grad, held by a module of the watched model, that is not a registered parameter.

    An attribute (``self.scale = torch.ones(4, requires_grad=True)``) or an item of a plain list, tuple or
    dict (``self.weights = [nn.Parameter(...)]``): in no ``model.parameters()``, optimizer built from them,
    or state dict.
    """

    name: str  # as the user would write it: "blocks.0.scale", "weights[1]"
    owner: str = ""  # the module path holding it ("" the root)
    attribute: str = ""
    container: Optional[str] = None  # "list", "tuple", "dict" (None: the attribute itself)
    shape: List[Count] = field(default_factory=list)
    is_parameter: bool = False  # an nn.Parameter kept where Module does not register it
    got_grad: bool = False  # it had a .grad when the watch last looked: backward reached it
    in_optimizer: Optional[bool] = None  # in a param group of an optimizer the watch saw (None: none seen)
    copy_of: Optional[str] = None  # the registered parameter whose values it equalled at entry (an anchor)


@dataclass
class IgnoredFreeze(ReadsLikeADict):
    """A module given a plain attribute ``requires_grad = False``, which freezes nothing."""

    module: str  # its path ("" the root)
    module_type: str = ""
    trainable: Count = 0  # its parameters that still require grad
    got_grad: bool = False  # one of them had a .grad when the watch last looked


@dataclass
class UnregisteredModule(ReadsLikeADict):
    """A module that ran inside the watched model's forward but is not one of its submodules.

    Kept in a plain list, dict or tuple attribute (or made on the fly), so its parameters are in
    neither ``model.parameters()`` nor an optimizer built from them, nor the state dict.
    """

    module: str  # as the user would write it: "encoder.layers[0]" (the type and an index when not found)
    module_type: str = ""
    owner: Optional[str] = None  # the watched module whose attribute holds it ("" the root)
    attribute: Optional[str] = None
    container: Optional[str] = None  # "list", "dict", "tuple"
    called_in: Optional[str] = None  # the watched module whose forward called it
    calls: Count = 0
    params: Count = 0  # its parameters, its submodules' included
    trainable: Count = 0  # of them, those requiring grad
    with_grad: bool = False  # it ran with grad enabled while some of its parameters required grad
    got_grad: bool = False  # one of its parameters had a .grad when the watch last looked
    in_optimizer: Optional[bool] = None  # in a param group of the optimizer watch() was given (None: none given)


@dataclass
class TiedParams(ReadsLikeADict):
    """One parameter tensor reachable under several names (tied weights: ``lm_head.weight`` and ``wte.weight``)."""

    names: List[str]  # every name, in module order; gradtrace reports it under the first
    requires_grad: bool = True
    shape: List[Count] = field(default_factory=list)


@dataclass
class Contribution(ReadsLikeADict):
    """One parameter's share of an inner product: ``sum(g_a * g_b)`` over its elements."""

    param: str
    contribution: float
    share: float  # contribution / |dot|, with the contribution's sign


@dataclass
class InnerProduct(ReadsLikeADict):
    """``<g_a, g_b>`` of two passes' gradients (``watch(keep_grads=True)`` and ``trace.diff``),
    optionally preconditioned by Adam's second moment."""

    a: str
    b: str
    preconditioned: bool
    dot: float
    cosine: Optional[float]  # None when a gradient is zero, and for a preconditioned product
    norm_a: Magnitude
    norm_b: Magnitude
    top: List[Contribution]  # the parameters that dominate the dot, largest |contribution| first
    numel_b: Optional[Count] = None  # elements of b's gradient over the parameters both passes reached
    norm_a_pre: Optional[Magnitude] = None  # norms of the preconditioned gradients
    norm_b_pre: Optional[Magnitude] = None
    optimizer: Optional[str] = None  # the optimizer whose state preconditioned it ("AdamW")

    def __post_init__(self) -> None:
        if self.preconditioned and None in (self.norm_a_pre, self.norm_b_pre, self.optimizer):
            raise ValueError("a preconditioned inner product needs norm_a_pre, norm_b_pre and optimizer")


@dataclass(eq=False)
class TraceMeta(collections.abc.MutableMapping):
    """How a trace was recorded: the watch's options, what happened outside the passes, the merge.

    Known fields are attributes (``trace.meta.dropped_passes``); None means not
    recorded. It also reads and writes like the dict it used to be:
    ``trace.meta["dropped_passes"]``, ``trace.meta.get("world_size")``, and keys
    of your own (``trace.meta["run_id"] = ...``, saved with the trace as free-form
    JSON). As a mapping it holds the known fields that are set, then your keys.
    """

    FREE_FORM_FIELD: ClassVar[str] = "_extra"  # the schema puts a file's unknown keys here
    _KNOWN: ClassVar[Tuple[str, ...]] = ()  # the stored fields, in order (set below the class)

    torch: Optional[str] = None  # torch.__version__ of the recording process
    model: Optional[str] = None  # type of the watched module
    cuts: Optional[CutsMode] = None  # watch(cuts=...)
    keep_grads: Optional[bool] = None
    max_passes: Optional[Count] = None
    dropped_passes: Optional[Count] = None  # passes dropped by max_passes
    wrapper: Optional[Wrapper] = None  # the distributed wrapper the model was in
    name_prefix: Optional[str] = None  # what the wrapper adds to parameter names ("module." under DDP)
    find_unused_parameters: Optional[bool] = None  # DDP's option
    zero_stage: Optional[Count] = None  # DeepSpeed's ZeRO stage (0-3)
    # FSDP1 with use_orig_params=False: the names are FSDP's flat parameters (one per wrapped unit),
    # not the model's own
    flat_params: Optional[bool] = None
    forward_calls: Optional[Count] = None  # forward calls of the watched module
    frozen_while_watched: Optional[List[str]] = None  # parameters frozen by the time the watch closed
    replaced_params: Optional[Dict[str, Replacement]] = None  # parameters lost while watched, and how
    ran_with_grad: Optional[AbstractSet[str]] = None  # modules seen running with grad enabled
    # Modules whose output the watched model returned as one of its outputs (an auxiliary head's logits):
    # when none of their parameters get a gradient while others do, the loss did not use that output.
    returned_by_model: Optional[AbstractSet[str]] = None
    error: Optional[str] = None  # the exception the watched block ended with
    error_cause: Optional[FailureCause] = None  # the culprit behind ``error``, where gradtrace could name it
    # Modules that ran inside the watched model's forward without being its submodules.
    unregistered_modules: Optional[List[UnregisteredModule]] = None
    # Tensors that require grad, held by the model's modules without being registered parameters.
    loose_tensors: Optional[List[LooseTensor]] = None
    ignored_freezes: Optional[List[IgnoredFreeze]] = None  # modules "frozen" by a plain attribute
    # Watched parameters with a tensor hook of the user's (Tensor.register_hook) when the watch last looked:
    # what such a hook returns is the gradient (a pruning mask, a g * 0), so it can explain a zero one.
    user_hooked: Optional[List[Name]] = None
    compiled: Optional[bool] = None  # torch.compile traced the watched model (None: not seen)
    tied_params: Optional[List[TiedParams]] = None  # parameters reachable under several names
    world_size: Optional[Count] = None  # ranks merged by gather()
    ranks: Optional[List[Count]] = None  # their global rank numbers, in group order (gather(group=...))
    _extra: Dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, meta: Optional[Mapping[str, Any]]) -> "TraceMeta":
        """A new TraceMeta from a mapping (a dict, or another TraceMeta: copied)."""
        out = cls()
        out.update(meta or {})
        return out

    def __getitem__(self, key: str) -> Any:
        if key in self._KNOWN:
            value = getattr(self, key)
            if value is None:
                raise KeyError(key)
            return value
        return self._extra[key]

    def __setitem__(self, key: str, value: Any) -> None:
        if key in self._KNOWN:
            setattr(self, key, value)
        else:
            self._extra[key] = value

    def __delitem__(self, key: str) -> None:
        if key in self._KNOWN:
            if getattr(self, key) is None:
                raise KeyError(key)
            setattr(self, key, None)
        else:
            del self._extra[key]

    def __iter__(self) -> Iterator[str]:
        yield from (name for name in self._KNOWN if getattr(self, name) is not None)
        yield from self._extra

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def copy(self) -> "TraceMeta":
        return TraceMeta.of(self)

    def __repr__(self) -> str:
        return f"TraceMeta({dict(self)!r})"


TraceMeta._KNOWN = tuple(f.name for f in dataclasses.fields(TraceMeta) if stored(f))
