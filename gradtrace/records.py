"""Plain records: what a trace knows, with no torch objects in it.

Everything here is a dataclass of Python numbers and strings, so the analysis
and the renderer work the same on a live trace and on one loaded from JSON.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Dict, FrozenSet, List, Mapping, Optional, Sequence, Tuple

SEVERITIES = ("error", "warning", "info")

# What ``trace.tensor(name, t, role=...)`` accepts: masks get row lengths, attention masks their
# padding side, completion masks their alignment with an attention mask, groups a per-row std histogram.
TENSOR_ROLES = ("mask", "attention_mask", "completion_mask", "group")

# What ``capture.values.value_stats`` computes for a registered tensor, in order;
# ``ValueStats.merge`` reads them by name. ``mean`` and ``m2`` (the sum of squared
# deviations from that mean) are over the finite elements.
VALUE_FIELDS = ("numel", "mean", "m2", "min", "max", "zeros", "nonfinite", "rows", "constant_rows")


@dataclass
class GradRecord:
    """One parameter's gradient in one pass (only parameters that were reached).

    ``norm`` and ``max_abs`` describe the gradient the pass produced: for
    ``.backward()`` what ``.grad`` gained during the pass, for
    ``torch.autograd.grad`` the sum of the gradients handed back.
    """

    name: str
    hits: int = 0  # engine deliveries: hook fires, one per run that reached it
    norm: float = 0.0
    max_abs: float = 0.0
    zero: bool = False  # reached, and every element exactly zero
    nonfinite: int = 0  # NaN/Inf elements
    via: str = "backward"  # "backward" (.grad written), "grad" (handed back), "both"
    order: int = 0  # position in backward order within the pass (0 = first reached)
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
        return {values[0]: GradRecord(*values) for values in zip(*fields)}


@dataclass
class PassTrace:
    """Everything recorded for one labelled pass (or one unlabelled engine run)."""

    name: str
    params: Tuple[str, ...]  # every trainable parameter watched, in model order
    runs: int = 0  # top-level engine runs (nested reentrant runs are not counted)
    kinds: List[str] = field(default_factory=list)  # "backward" and/or "grad"
    expected: Optional[List[str]] = None  # parameters reachable from registered tensors
    expected_partial: bool = False  # a checkpoint node hid part of the graph
    auto: bool = False  # named automatically (run outside any pass_)
    kept_grads: bool = False  # the live trace kept this pass's gradients
    step_start: bool = False  # the pass began an optimizer step: stale .grad is judged here only
    failed: Optional[str] = None  # the exception the pass's block ended with, if any
    # cuts="ops": where the first NaN/Inf gradient was born: {"op", "node", "module", "location",
    # "forward": "finite" | "nonfinite" | "unknown"} (see capture.opcuts.NonfiniteOrigins)
    nonfinite_origin: Optional[Dict[str, Any]] = None
    # What the figures are: "local" (this process's gradients: autograd.grad, no wrapper, DDP's
    # no_sync), "reduced" (.grad after DDP's all-reduce) or "sharded" (FSDP: this rank's shard,
    # global only after gather()).
    scope: str = "local"
    _columns: Optional[PassColumns] = field(default=None, repr=False, compare=False)
    _records: Optional[Dict[str, GradRecord]] = field(default=None, repr=False, compare=False)
    _covered: Optional[FrozenSet[str]] = field(default=None, repr=False, compare=False)

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
        self._records, self._columns, self._covered = value, None, None

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

    @property
    def zero(self) -> set:
        return {n for n, r in self.records.items() if r.zero}

    @property
    def stale(self) -> set:
        return {n for n, r in self.records.items() if r.stale}

    @property
    def cleared(self) -> set:
        """Reached parameters whose gradient was cleared before it could be read (figures unknown)."""
        return {n for n, r in self.records.items() if r.cleared}

    def column(self, attribute: str) -> list:
        """One ``GradRecord`` field over every reached parameter, without building the records."""
        if self._records is None and self._columns is not None:
            return getattr(self._columns, attribute)
        return [getattr(r, attribute) for r in self.records.values()]

    @property
    def total_norm(self) -> float:
        return sum(n * n for n in self.column("norm")) ** 0.5

    @property
    def max_abs(self) -> float:
        return max(self.column("max_abs"), default=0.0)

    @property
    def nonfinite(self) -> int:
        return sum(self.column("nonfinite"))

    def in_backward_order(self) -> List[GradRecord]:
        return sorted(self.records.values(), key=lambda r: r.order)


@dataclass
class TensorGradFacts:
    """What backward did at a registered tensor during one pass."""

    hits: int = 0  # how many times backward reached it (one per microbatch and run)
    norm: float = 0.0  # sqrt of the summed squares of every incoming gradient
    max_abs: float = 0.0
    nonfinite: int = 0

    @property
    def reached(self) -> bool:
        return self.hits > 0

    @property
    def zero(self) -> bool:
        return self.hits > 0 and self.max_abs == 0.0 and self.nonfinite == 0


@dataclass
class ValueStats:
    """Value facts of a registered tensor, aggregated over every call with its name."""

    numel: int = 0
    min: float = 0.0
    max: float = 0.0
    mean: float = 0.0
    std: float = 0.0
    zeros: int = 0  # elements exactly zero
    nonfinite: int = 0
    rows: int = 0  # rows along the last dim (only when that dim has >= 2 elements)
    constant_rows: int = 0  # rows whose elements are all equal (zero variance)

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
class TensorRecord:
    """A tensor the user named with ``trace.tensor(name, t)``."""

    name: str
    calls: int = 0
    requires_grad: bool = False  # on every call
    requires_grad_calls: int = 0  # calls on which it required grad
    grad_fn: Optional[str] = None  # name of the first grad_fn seen
    is_leaf: bool = True
    inference: bool = False  # an inference-mode tensor
    shape: List[int] = field(default_factory=list)  # shape of the first call
    dtype: str = ""
    device: str = ""
    expect_grad: Optional[bool] = None
    values: ValueStats = field(default_factory=ValueStats)
    grads: Dict[str, TensorGradFacts] = field(default_factory=dict)  # per pass
    passes: List[str] = field(default_factory=list)  # passes open when it was registered
    cuts: List[int] = field(default_factory=list)  # Cut.seq of the cuts seen while it was built
    reachable: Optional[List[str]] = None  # trainable parameters its graph reaches
    reach_partial: bool = False  # a checkpoint node hid part of its graph
    trainable_upstream: bool = False  # its graph reaches at least one watched parameter
    role: Optional[str] = None  # what the user said it is: TENSOR_ROLES
    # Per-row facts summed over calls (``capture.values.row_facts``): "rows", "empty_rows",
    # "selected_min/max/sum", "left_padded", "right_padded", "on_padding", "empty_with_tokens", "std ..." bins.
    row_facts: Dict[str, float] = field(default_factory=dict)

    def merge_row_facts(self, facts: Mapping[str, float]) -> None:
        for key, value in facts.items():
            old = self.row_facts.get(key)
            if old is None:
                self.row_facts[key] = value
            elif key.endswith("_min"):
                self.row_facts[key] = min(old, value)
            elif key.endswith("_max"):
                self.row_facts[key] = max(old, value)
            else:
                self.row_facts[key] = old + value

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

    kind: str  # no_grad, inference_mode, detach, non_differentiable, checkpoint
    module: str  # module path as named_modules() gives it ("" is the root)
    op: Optional[str] = None  # the op, when op-level detection saw it
    location: str = ""  # file:line of the user's code
    library_location: str = ""  # file:line of the innermost library frame (transformers, trl...), if any
    inputs_require_grad: Optional[bool] = None  # checkpoint cuts: did any input of the segment require grad?
    pass_name: Optional[str] = None  # pass open when it happened (None: outside any pass)
    module_type: str = ""
    count: int = 1  # how many times the same cut was seen
    params: int = 0  # trainable parameters inside the module
    seq: int = 0  # order of recording


@dataclass
class ScalarRecord:
    name: str
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
    severity: str  # "error", "warning" or "info"
    message: str
    evidence: dict = field(default_factory=dict)

    def __str__(self) -> str:
        return f"[{self.severity}] {self.code}: {self.message}"
