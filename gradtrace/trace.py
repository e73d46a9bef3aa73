"""The plain trace: what ``gradtrace.load`` returns and what every trace answers.

A ``Trace`` holds only plain records (``records.py``): passes, registered
tensors, scalars, cuts, inner products and, after ``gather``, per-rank
coverage. Reading never changes it. The live trace that ``watch`` yields
(``live.LiveTrace``) is a ``Trace`` that also records; this module never
imports the capture code, so loading and analysing a trace needs none of it.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Mapping, Optional

from . import analysis, render, storage
from .analysis import metrics
from .errors import GradtraceError
from .records import Cut, InnerProduct, OptimizerRecord, PassTrace, ScalarRecord, TensorRecord, TraceMeta, Verdict


class PassTable(dict):
    """``{name: PassTrace or None}`` in the order names were taken (None: reserved, not finished yet).

    ``finished()`` is what ``trace.passes`` shows. A training loop reads
    ``trace.passes[name]`` every step while every step also reserves, finishes
    and (under ``max_passes``) drops a pass, so the finished view is kept up to
    date change by change: a pass that finishes after every finished one is
    appended, a dropped one removed; only an out-of-order finish rebuilds it.
    """

    __slots__ = ("_finished", "_seq", "_next_seq", "_last_finished_seq")

    def __init__(self, *args, **kwargs):
        super().__init__()
        self._finished: Optional[Dict[str, PassTrace]] = {}
        self._seq: Dict[str, int] = {}  # reservation order of every name held
        self._next_seq = 0
        self._last_finished_seq = -1
        for name, value in dict(*args, **kwargs).items():
            self[name] = value

    def __setitem__(self, name, value) -> None:
        if name not in self._seq:
            self._seq[name] = self._next_seq
            self._next_seq += 1
        super().__setitem__(name, value)
        finished = self._finished
        if finished is None:
            return
        if value is None:
            finished.pop(name, None)
        elif name in finished:
            finished[name] = value
        elif self._seq[name] > self._last_finished_seq:
            finished[name] = value
            self._last_finished_seq = self._seq[name]
        else:
            self._finished = None  # finished out of order: rebuilt at the next read

    def __delitem__(self, name) -> None:
        super().__delitem__(name)
        self._forget(name)

    def pop(self, name, *default):
        value = super().pop(name, *default)
        self._forget(name)
        return value

    def _forget(self, name) -> None:
        self._seq.pop(name, None)
        if self._finished is not None:
            self._finished.pop(name, None)

    def update(self, *args, **kwargs) -> None:
        for name, value in dict(*args, **kwargs).items():
            self[name] = value

    def setdefault(self, name, value=None):
        if name not in self:
            self[name] = value
        return self[name]

    def popitem(self):
        name, value = super().popitem()
        self._forget(name)
        return name, value

    def clear(self) -> None:
        super().clear()
        self._seq.clear()
        self._finished = {}
        self._last_finished_seq = -1

    def finished(self) -> Dict[str, PassTrace]:
        """A new dict of the finished passes, in order (a C-level copy of the kept one)."""
        if self._finished is None:
            self._finished = {name: p for name, p in self.items() if p is not None}
            self._last_finished_seq = max((self._seq[n] for n in self._finished), default=-1)
        return self._finished.copy()


class Trace:
    """Gradients recorded while ``watch`` was open: passes, tensors, scalars, cuts."""

    def __init__(self, params: Iterable[str], param_shapes: Optional[Dict[str, List[int]]] = None,
                 meta: Optional[Mapping[str, Any]] = None, *, passes: Optional[Dict[str, PassTrace]] = None,
                 tensors: Optional[Dict[str, TensorRecord]] = None,
                 scalars: Optional[Dict[str, ScalarRecord]] = None, cuts: Optional[List[Cut]] = None,
                 inner_products: Optional[List[InnerProduct]] = None,
                 rank_coverage: Optional[Dict[str, Dict[int, List[str]]]] = None,
                 rank_figures: Optional[Dict[str, Dict[int, Dict[str, List[float]]]]] = None,
                 optimizers: Optional[Dict[str, OptimizerRecord]] = None):
        self.params = tuple(params)
        self.param_shapes: Dict[str, List[int]] = dict(param_shapes or {})
        self.meta = TraceMeta.of(meta)
        self._passes = PassTable(passes or {})
        self._tensors: Dict[str, TensorRecord] = dict(tensors or {})
        self.scalars: Dict[str, ScalarRecord] = dict(scalars or {})
        self._cuts: List[Cut] = list(cuts or [])
        self.inner_products: List[InnerProduct] = list(inner_products or [])
        self.rank_coverage = rank_coverage  # {pass: {rank: [covered parameters]}}, filled by gather()
        # {pass: {rank: {parameter: [norm, max |g|, non-finite, stale]}}} for passes whose figures differ across
        # ranks (local gradients, shards); a pass absent here had the same figures on every rank.
        self.rank_figures = rank_figures or {}
        self._optimizers: Dict[str, OptimizerRecord] = dict(optimizers or {})

    # ---- reading -----------------------------------------------------------
    @property
    def passes(self) -> Dict[str, PassTrace]:
        """Ordered ``{name: PassTrace}``."""
        return self._passes.finished()

    @property
    def tensors(self) -> Dict[str, TensorRecord]:
        return self._tensors

    @property
    def meta(self) -> TraceMeta:
        """How the trace was recorded: attributes for what gradtrace reads, and a dict for anything else."""
        return self._meta

    @meta.setter
    def meta(self, value) -> None:
        self._meta = value if isinstance(value, TraceMeta) else TraceMeta.of(value)  # a plain dict stays usable

    @property
    def cuts(self) -> List[Cut]:
        return self._cuts

    @property
    def optimizers(self) -> Dict[str, OptimizerRecord]:
        """``{name: OptimizerRecord}``: the optimizers seen stepping while watched ("AdamW#0", ...)."""
        return self._optimizers

    def diff(self, a: str, b: str, precondition: Any = None) -> analysis.Diff:
        """What pass ``a`` reached that ``b`` did not, and how their magnitudes compare."""
        passes = self._named_passes(a, b)
        if precondition is not None:
            raise GradtraceError(f"diff({a!r}, {b!r}, precondition=...) needs both passes' gradients, which a "
                                 "saved trace does not hold: run it live under "
                                 "gradtrace.watch(model, keep_grads=True)")
        result = render.rendered(analysis.diff(passes[a], passes[b]))
        result.inner = next((s for s in self.inner_products
                             if s.a == a and s.b == b and not s.preconditioned), None)
        return result

    def verdicts(self) -> List[Verdict]:
        return analysis.verdicts(self)

    def report(self) -> str:
        return render.report(self)

    def metrics(self, prefix="gradtrace/", per_module=False, passes=None, verdicts=True) -> Dict[str, float]:
        """Flat ``{name: float}`` figures for any tracker (wandb, TensorBoard, MLflow, Lightning)."""
        return metrics.metrics(self, prefix, per_module, passes, verdicts)

    def plot(self, path=None, kind="flow", **options):
        """A matplotlib Figure (gradient flow, coverage map, inner-product contributions)."""
        from .render.plot import plot  # matplotlib, an optional extra: only when asked for
        return plot(self, path, kind, **options)

    def save(self, path) -> None:
        storage.save(self, path)

    def gather(self, group=None, timeout=None) -> "Trace":
        """Under torch.distributed: every rank of ``group`` calls it and gets the same merged trace.

        Coverage is the union over ranks (per rank in ``rank_coverage``), sharded passes get global
        figures, ``rank_figures`` keeps each rank's own where they differ. ``timeout`` (seconds or a
        ``timedelta``, default 5 minutes) bounds the wait for the other ranks; a rank that does not
        come, or ranks that watch other parameters or hold other passes, raise ``GradtraceError``
        naming them.
        """
        from . import distributed  # torch.distributed only when asked for
        return distributed.gather(self, Trace, group=group, timeout=timeout)

    # ---- recording: only a live trace records ---------------------------------
    def pass_(self, name: str):
        raise self._read_only("pass_")

    def tensor(self, name: str, t, expect_grad: Optional[bool] = None, **row_options):
        raise self._read_only("tensor")

    def scalar(self, name: str, value: Any) -> float:
        raise self._read_only("scalar")

    @staticmethod
    def _read_only(what: str) -> GradtraceError:
        return GradtraceError(f"trace.{what}() records, but this trace was loaded or merged (read-only); "
                              "record inside `with gradtrace.watch(model) as trace:`")

    def _named_passes(self, *names: str) -> Dict[str, PassTrace]:
        passes = self.passes
        for name in names:
            if name not in passes:
                have = ", ".join(repr(n) for n in passes) if passes else "no passes yet"
                raise GradtraceError(f"no pass named {name!r}; this trace has {have}")
        return passes

    def __repr__(self) -> str:
        return (f"<gradtrace.Trace {len(self.params)} params, passes={list(self._passes)}, "
                f"tensors={list(self._tensors)}, cuts={len(self.cuts)}>")


def load(path) -> Trace:
    """Read a trace written by ``Trace.save``. Raises GradtraceError for anything else; never runs code."""
    return storage.read(path, Trace)
