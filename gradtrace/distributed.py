"""Merge every rank's trace under torch.distributed into one view, with fixed-size tensors.

``gather`` runs in four steps, every rank taking part in each:

1. arrival: every rank of the group must reach ``gather`` within ``timeout``,
   checked through the process group's store (below), else ``GradtraceError``
   on every rank naming the ranks that did not come;
2. handshake, one round of three SHA-256 per rank: one of the watched
   parameters (names without the wrapper's prefix, shapes) and the pass names,
   one of all the figures, one of where NaN/Inf gradients were born
   (``cuts="ops"``). Names travel only when the first differs, as UTF-8
   bytes in a uint8 tensor (never pickled), to say which ranks differ and how;
3. figures: when the second digest differs on some rank (local gradients,
   shards), every rank's figures are all-gathered as a float64 tensor
   (passes x parameters x 4), and the passes that differ keep every rank's
   rows; figures bit-identical everywhere (DDP's reduced ``.grad``) move
   nothing more. Origins of NaN/Inf travel (as JSON) only when they differ;
4. merge: every rank builds the same merged trace (below), with numpy over the
   gathered rows: no Python object per rank and parameter is made until
   someone reads ``rank_figures`` / ``rank_coverage`` (``PerRank``).

The merged trace: coverage is the union over ranks; a sharded pass's figures
are global (norm = sqrt of the sum of the shards' sums of squares, max |g| the
largest, non-finite counts summed); a replicated pass (local or reduced) keeps
the largest figure any rank saw, and ``rank_figures`` holds every rank's own
figures where they differ. ``rank_coverage`` maps pass -> rank -> covered.
A pass's NaN/Inf origin names the ranks whose own backward made it.
Registered tensors, scalars and cuts are this rank's own.

Ranks are named by their global rank numbers everywhere (keys, verdicts,
errors), also under ``gather(group=...)``; ``meta.ranks`` lists them in group
order.

Arrival, through the store every process group has: each rank counts its own
calls (so the n-th call of every rank meets the others' n-th), sets a key
saying it is here, and waits for the others' keys until ``timeout``. Then it
writes what it saw (who was late; nobody, usually) and, if it saw everyone,
reads what every other rank saw: a rank whose wait ended first may have given
up on a rank that came just after. So every rank raises naming the same late
ranks, the late one included, instead of one naming them and the others
blaming the rank that checks arrivals.
"""
from __future__ import annotations

import array
import dataclasses
import datetime
import hashlib
import json
from collections.abc import Mapping
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist

from . import _torch_compat
from .errors import GradtraceError
from .gc_pause import gc_paused
from .records import NonfiniteOrigin, PassColumns, PassTrace

# torch 2.13 renamed all_gather_into_tensor (now deprecated) to all_gather_single.
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
DEFAULT_TIMEOUT = datetime.timedelta(minutes=5)
# Per parameter and pass: sum of squares, max |g|, non-finite count, and the
# packed integers below (exact in a float64 up to 2**53).
WIDTH = 4
ZERO, STALE, UNKNOWN = 1, 2, 4  # flag bits (UNKNOWN: the figure could not be read, PassTrace.cleared)
VIA_SHIFT = 3
VIA = ("backward", "grad", "both")  # two bits above the flags
FLAG_BITS = VIA_SHIFT + 2
HITS_BITS, ORDER_SHIFT = 16, FLAG_BITS + 16
_NEVER = 1 << 40  # a backward order larger than any real one
DIGESTS = 3  # SHA-256 digests every rank sends in the handshake: description, figures, NaN origins


def gather(trace, factory, group=None, timeout=None):
    """Every rank of ``group`` calls this; every rank gets the same merged trace back."""
    if not (dist.is_available() and dist.is_initialized()):
        raise GradtraceError("trace.gather() needs torch.distributed to be initialised "
                             "(dist.init_process_group); on one process use the trace itself")
    ring = Ring(group, _as_timedelta(timeout))
    ring.arrive()
    with gc_paused():  # a list or two per parameter and pass: no cycles, many collections otherwise
        return _gather(trace, factory, ring)


def _gather(trace, factory, ring: "Ring"):
    local = LocalView(trace)
    figures = local.figures()
    origins = local.origins()
    # One round for the three digests: on a busy machine every round trip costs more than the bytes.
    digests = ring.all_gather(_digests([json.dumps(local.description()).encode("utf-8"), figures.tobytes(),
                                        json.dumps(origins, sort_keys=True).encode("utf-8")]))  # (world, 3, 32)
    same = (digests == digests[0]).all(axis=(0, 2))
    if not same[0]:
        raise GradtraceError(_mismatch_message(ring.all_gather_json(local.description()), ring.ranks))
    differing, per_rank = np.zeros(0, dtype=np.int64), None
    if not same[1]:  # same passes everywhere now: same shapes
        everything = ring.all_gather(torch.from_numpy(figures))  # (world, passes, params, WIDTH)
        differing = np.flatnonzero(~(everything == everything[0]).all(axis=(0, 2, 3)))
        per_rank = everything[:, differing]
    every_origin = ring.all_gather_json(origins) if not same[2] else [origins] * ring.world
    return _merged(trace, factory, local, differing, per_rank, every_origin, ring.ranks)


def _as_timedelta(timeout) -> datetime.timedelta:
    if timeout is None:
        return DEFAULT_TIMEOUT
    if isinstance(timeout, datetime.timedelta):
        return timeout
    if isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and timeout > 0:
        return datetime.timedelta(seconds=timeout)
    raise GradtraceError(f"gather(timeout=...) takes seconds or a datetime.timedelta, got {timeout!r}")


# ---- the process group ---------------------------------------------------------
class Ring:
    """The collectives ``gather`` needs, on the group's device (NCCL moves CUDA tensors only)."""

    def __init__(self, group, timeout: datetime.timedelta):
        self.group = group
        self.timeout = timeout
        self.rank = dist.get_rank(group)  # in the group
        self.world = dist.get_world_size(group)
        # Global rank numbers, in group order: what every message and key says.
        self.ranks: List[int] = list(dist.get_process_group_ranks(group if group is not None else dist.group.WORLD))
        self.backend = str(dist.get_backend(group))
        self.device = (torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl"
                       else torch.device("cpu"))

    @property
    def me(self) -> int:
        return self.ranks[self.rank]

    def arrive(self) -> None:
        """Every rank is here, or GradtraceError on every rank naming the ones that are not (instead of a hang)."""
        late, seen_by = Arrival(self.ranks, self.me, self.timeout).late()
        if late:
            raise GradtraceError(self._late_message(late, seen_by))

    def _late_message(self, late: List[int], seen_by: List[int]) -> str:
        who = ", ".join(map(str, late))
        group = ("" if self.ranks == list(range(self.world))
                 else f" (global ranks {', '.join(map(str, self.ranks))})")
        if self.me in late:
            where = (f"this rank (rank {self.me}) arrived after rank(s) {', '.join(map(str, seen_by))} "
                     "had stopped waiting")
        else:
            where = f"seen from rank {self.me}"
        return (f"trace.gather(): rank(s) {who} of the {self.world}-rank group{group} did not call gather() "
                f"within {self.timeout.total_seconds():g} s ({where}). Every rank must call "
                f"trace.gather() the same number of times; a rank that raised earlier never arrives.")

    def all_gather(self, t: torch.Tensor) -> np.ndarray:
        """Every rank's ``t`` (same shape and dtype on every rank) stacked along a new first dim, as numpy."""
        t = t.to(self.device).contiguous()
        out = torch.empty((self.world * t.shape[0],) + tuple(t.shape[1:]), dtype=t.dtype, device=self.device)
        _ALL_GATHER(out, t, group=self.group)  # ranks' tensors end to end along dim 0
        return out.cpu().numpy().reshape((self.world,) + tuple(t.shape))

    def all_gather_json(self, value: Any) -> List[Any]:
        """Every rank's JSON-able ``value``: UTF-8 bytes behind a length header, decoded with json."""
        data = json.dumps(value, sort_keys=True).encode("utf-8")
        sizes = self.all_gather(torch.tensor([len(data)], dtype=torch.int64))[:, 0].tolist()
        padded = torch.zeros(max(sizes), dtype=torch.uint8)
        padded[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        rows = self.all_gather(padded)
        return [json.loads(rows[r, :sizes[r]].tobytes().decode("utf-8")) for r in range(self.world)]


class Arrival:
    """One gather() call's arrival check, through the default process group's store (see the module doc)."""

    def __init__(self, ranks: List[int], me: int, timeout: datetime.timedelta):
        _torch_compat.require("gather")
        self.store = _torch_compat.default_store()
        self.ranks, self.me, self.timeout = ranks, me, timeout
        self.tag = "gradtrace/gather/" + "-".join(map(str, ranks))
        self.call = self.store.add(f"{self.tag}/calls/{me}", 1)  # this rank's n-th gather on this group

    def key(self, what: str, rank: int, call: Optional[int] = None) -> str:
        return f"{self.tag}/{self.call if call is None else call}/{what}/{rank}"

    def late(self) -> Tuple[List[int], List[int]]:
        """(the ranks that did not come in time, the ranks that said so); both empty when all came."""
        store, ranks = self.store, self.ranks
        store.set(self.key("here", self.me), "1")
        try:
            store.wait([self.key("here", r) for r in ranks], self.timeout)
            missing: List[int] = []
        except RuntimeError:  # the store's timeout (DistStoreError)
            missing = [r for r in ranks if not store.check([self.key("here", r)])]
        store.set(self.key("late", self.me), json.dumps(missing))
        if missing:
            return missing, [self.me]
        # Everyone came, as this rank saw it; a rank whose wait ended earlier may have given up on the
        # last one just before it came. Every rank that came says what it saw within its own timeout.
        try:
            store.wait([self.key("late", r) for r in ranks], self.timeout)
            said = [json.loads(v) for v in store.multi_get([self.key("late", r) for r in ranks])]
        except RuntimeError:  # a rank came and then vanished before saying anything
            said = [json.loads(store.get(self.key("late", r))) if store.check([self.key("late", r)]) else [r]
                    for r in ranks]
        late = sorted({r for seen in said for r in seen})
        if not late:
            self._forget_previous_call()
        return late, [r for r, seen in zip(ranks, said, strict=False) if seen]

    def _forget_previous_call(self) -> None:
        """Every rank is past its previous call now: that call's keys of this rank are read by nobody."""
        if self.call > 1:
            for what in ("here", "late"):
                self.store.delete_key(self.key(what, self.me, self.call - 1))


# ---- this rank's view, in a rank-independent order ----------------------------------------
def normalised_name(name: str, prefix: str) -> str:
    """The name every rank agrees on: without the wrapper's prefix (DDP's ``module.``)."""
    return name[len(prefix):] if prefix and name.startswith(prefix) else name


class LocalView:
    """This rank's passes as fixed-size rows over the normalised parameter names."""

    def __init__(self, trace):
        prefix = trace.meta.name_prefix or ""
        self.names = [normalised_name(n, prefix) for n in trace.params]
        shapes = trace.param_shapes
        self.shapes = [shapes.get(n, ()) for n in trace.params]  # read only: no copy each
        self.local_names = list(trace.params)
        self.passes: Dict[str, PassTrace] = trace.passes
        self.pass_names = list(self.passes)

    def description(self) -> Dict[str, Any]:
        return {"params": [[n, s] for n, s in zip(self.names, self.shapes, strict=False)], "passes": self.pass_names}

    def figures(self) -> np.ndarray:
        """(passes, parameters, WIDTH) float64; zeros for a parameter a pass did not reach."""
        out = np.zeros((len(self.pass_names), len(self.names), WIDTH), dtype=np.float64)
        position = {n: i for i, n in enumerate(self.local_names)}
        for k, p in enumerate(self.passes.values()):
            names = p.column("name")
            if names:
                where = np.fromiter(map(position.__getitem__, names), dtype=np.int64, count=len(names))
                rows = np.empty((len(names), WIDTH), dtype=np.float64)
                rows[:, 0] = np.square(np.asarray(p.column("norm"), dtype=np.float64))
                rows[:, 1] = np.asarray(p.column("max_abs"), dtype=np.float64)
                rows[:, 2] = np.asarray(p.column("nonfinite"), dtype=np.float64)
                rows[:, 3] = _pack(p)
                out[k, where] = rows
        return out

    def origins(self) -> Dict[str, Dict[str, Any]]:
        """``{pass: its NaN/Inf origin as a dict}`` for the passes where this rank found one (cuts="ops")."""
        return {name: dataclasses.asdict(p.nonfinite_origin) for name, p in self.passes.items()
                if p.nonfinite_origin is not None}


def _pack(p: PassTrace) -> np.ndarray:
    """Hits (at least 1: reached), backward order and flags in one integer per parameter, exact in a float64."""
    via = {name: i for i, name in enumerate(VIA)}
    flags = (np.asarray(p.column("zero"), dtype=np.int64) * ZERO
             + np.asarray(p.column("stale"), dtype=np.int64) * STALE
             + np.asarray(p.column("cleared"), dtype=np.int64) * UNKNOWN
             + (np.fromiter(map(via.__getitem__, p.column("via")), dtype=np.int64) << VIA_SHIFT))
    hits = np.clip(np.asarray(p.column("hits"), dtype=np.int64), 1, (1 << HITS_BITS) - 1)
    order = np.asarray(p.column("order"), dtype=np.int64)
    return ((((order << HITS_BITS) + hits) << FLAG_BITS) + flags).astype(np.float64)


def _digests(blobs: List[bytes]) -> torch.Tensor:
    """One SHA-256 per blob, as a (len, 32) uint8 tensor."""
    rows = b"".join(hashlib.sha256(blob).digest() for blob in blobs)
    return torch.frombuffer(bytearray(rows), dtype=torch.uint8).reshape(len(blobs), 32)


def _mismatch_message(descriptions: List[Dict[str, Any]], ranks: List[int]) -> str:
    """Which ranks watch other parameters or hold other passes than the group's first, by global rank."""
    base, first = descriptions[0], ranks[0]
    lines = []
    base_params = {n: s for n, s in base["params"]}
    for rank, d in zip(ranks[1:], descriptions[1:], strict=False):
        params = {n: s for n, s in d["params"]}
        only_here = sorted(set(params) - set(base_params))
        only_base = sorted(set(base_params) - set(params))
        shapes = sorted(n for n in set(params) & set(base_params) if params[n] != base_params[n])
        for what, names in ((f"only rank {rank} watches", only_here), (f"rank {rank} does not watch", only_base),
                            (f"shapes differ on rank {rank} for", shapes)):
            if names:
                lines.append(f"{what} {len(names)} parameter(s): {', '.join(names[:5])}"
                             f"{', ...' if len(names) > 5 else ''}")
        if d["passes"] != base["passes"]:
            lines.append(f"passes differ: rank {first} has {base['passes']}, rank {rank} has {d['passes']}")
    detail = "; ".join(lines) or "the parameter lists differ in order"
    return (f"trace.gather(): the ranks' traces do not match ({detail}). Every rank must watch the same "
            "parameters (the same model, wrapped the same way or not at all) and record the same passes "
            "under the same names.")


# ---- every rank's own figures, read only when asked for ------------------------------------
def _unpack(packed: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    ints = packed.astype(np.int64)
    flags = ints & ((1 << FLAG_BITS) - 1)
    hits = (ints >> FLAG_BITS) & ((1 << HITS_BITS) - 1)
    order = ints >> ORDER_SHIFT
    return hits, order, flags


class PerRank(Mapping):
    """``{global rank: what that rank recorded in one pass}``, built per rank on first read.

    ``gather`` keeps every rank's rows (ranks x parameters x WIDTH) as one array;
    a dict per rank and parameter (what ``rank_figures`` and ``rank_coverage``
    hold) costs a Python object each, so it is made only for the passes and
    ranks someone reads (a verdict, the report, ``save``).
    """

    def __init__(self, rows: np.ndarray, names: Sequence[str], ranks: Sequence[int]):
        self._rows, self._names, self._ranks = rows, names, list(ranks)
        self._built: Dict[int, Any] = {}

    def __getitem__(self, rank: int):
        if rank not in self._built:
            try:
                k = self._ranks.index(rank)
            except ValueError:
                raise KeyError(rank) from None
            self._built[rank] = self._build(self._rows[k])
        return self._built[rank]

    def __iter__(self) -> Iterator[int]:
        return iter(self._ranks)

    def __len__(self) -> int:
        return len(self._ranks)

    def _reached(self, rows: np.ndarray) -> np.ndarray:
        return np.flatnonzero(_unpack(rows[:, 3])[0] > 0)

    def _build(self, rows: np.ndarray):
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({dict(self)!r})"


class RankFigures(PerRank):
    """``{rank: {parameter: [norm, max |g|, non-finite, stale (0/1)]}}`` for each parameter the rank reached."""

    def _build(self, rows: np.ndarray) -> Dict[str, List[float]]:
        idx = self._reached(rows)
        picked = rows[idx]
        flags = _unpack(picked[:, 3])[2]
        unknown = (flags & UNKNOWN) > 0  # not read on that rank: no number rather than a zero
        norm = np.where(unknown, np.nan, np.sqrt(picked[:, 0])).tolist()
        max_abs = np.where(unknown, np.nan, picked[:, 1]).tolist()
        nonfinite = picked[:, 2].astype(np.int64).tolist()
        stale = ((flags & STALE) > 0).astype(np.int64).tolist()
        names = self._names
        rows = zip(idx.tolist(), norm, max_abs, nonfinite, stale, strict=False)
        return {names[i]: [n, m, b, s] for i, n, m, b, s in rows}


class RankCoverage(PerRank):
    """``{rank: [parameters the rank reached, in model order]}``."""

    def _build(self, rows: np.ndarray) -> List[str]:
        names = self._names
        return [names[i] for i in self._reached(rows).tolist()]


# ---- the merged trace ------------------------------------------------------------
def _with_columns(p: PassTrace, columns: PassColumns, names: Sequence[str], **changes) -> PassTrace:
    """``p`` (every field it has, whatever they are) over ``columns`` and the normalised names."""
    return dataclasses.replace(p, params=tuple(names), kept_grads=False, _columns=columns, _records=None,
                               _covered=None, **changes)


def _merged_pass(p: PassTrace, rows: np.ndarray, names: Sequence[str], origin: Dict[str, Any]) -> PassTrace:
    """One pass over every rank: ``rows`` is (world, params, WIDTH)."""
    sumsq, max_abs, nonfinite = rows[..., 0], rows[..., 1], rows[..., 2]
    hits, order, flags = _unpack(rows[..., 3])
    reached = hits > 0
    covered = reached.any(0)
    if p.scope == "sharded":  # shards of one gradient: sums of squares and counts add up
        norm, bad = np.sqrt(sumsq.sum(0)), nonfinite.sum(0)
    else:  # replicas (or per-rank local gradients): the largest any rank saw
        norm, bad = np.sqrt(sumsq.max(0)), nonfinite.max(0)
    top = max_abs.max(0)
    # One rank's figure unknown: a shard of the whole, or the rank that may hold the largest: unknown.
    unknown = ((flags & UNKNOWN) > 0).any(0)
    norm, top = np.where(unknown, 0.0, norm), np.where(unknown, 0.0, top)
    zero = covered & ~unknown & (top == 0) & (bad == 0) & ((flags & ZERO) > 0).any(0)  # an empty shard never is
    first = np.where(reached, order, _NEVER).min(0)
    via_rank = reached.argmax(0)  # the lowest rank that reached it
    via = np.take_along_axis(flags, via_rank[None], 0)[0] >> VIA_SHIFT
    stale = ((flags & STALE) > 0).any(0)
    idx = np.flatnonzero(covered)
    idx = idx[np.argsort(first[idx], kind="stable")]  # backward order, ties in model order
    listed = idx.tolist()
    columns = PassColumns(
        name=[names[i] for i in listed], hits=hits.max(0)[idx].tolist(), norm=_doubles(norm[idx]),
        max_abs=_doubles(top[idx]), zero=zero[idx].tolist(), nonfinite=bad[idx].astype(np.int64).tolist(),
        via=[VIA[v] for v in via[idx].tolist()], order=range(len(listed)), stale=stale[idx].tolist(),
        cleared=unknown[idx].tolist())
    # ``expected`` (parameters reachable from registered tensors) is this rank's, like its tensors: not kept.
    return _with_columns(p, columns, names, expected=None, expected_partial=False, **origin)


def _doubles(values: np.ndarray) -> array.array:
    """A float column as the live trace keeps it: 8 bytes a value, no Python float each."""
    return array.array("d", np.ascontiguousarray(values, dtype=np.float64).tobytes())


def _renamed(p: PassTrace, local: LocalView, origin: Dict[str, Any]) -> PassTrace:
    """This rank's pass under the normalised names (its figures were the same on every rank)."""
    columns = PassColumns(**{f: p.column(f) for f in PassColumns.__dataclass_fields__})
    if local.names != local.local_names:
        rename = dict(zip(local.local_names, local.names, strict=False))
        columns.name = list(map(rename.__getitem__, columns.name))
        expected = sorted(rename.get(n, n) for n in p.expected) if p.expected is not None else None
    else:
        expected = list(p.expected) if p.expected is not None else None
    return _with_columns(p, columns, local.names, expected=expected, **origin)


def _merged_origin(name: str, every_origin: List[Dict[str, Any]], ranks: List[int]) -> Dict[str, Any]:
    """Where a pass's NaN/Inf was born: the first rank's finding, and every rank that found one."""
    found = [(rank, origins[name]) for rank, origins in zip(ranks, every_origin, strict=False) if name in origins]
    if not found:
        return {"nonfinite_origin": None, "nonfinite_ranks": None}
    return {"nonfinite_origin": NonfiniteOrigin(**found[0][1]), "nonfinite_ranks": [rank for rank, _ in found]}


def _merged(trace, factory, local: LocalView, differing: np.ndarray, per_rank: Optional[np.ndarray],
            every_origin: List[Dict[str, Any]], ranks: List[int]):
    names = local.names
    passes, coverage, rank_figures = {}, {}, {}
    column_of = {int(k): j for j, k in enumerate(differing)}
    for k, (pass_name, p) in enumerate(local.passes.items()):
        origin = _merged_origin(pass_name, every_origin, ranks)
        j = column_of.get(k)
        if j is None:  # bit-identical on every rank: this rank's pass is the merged one
            passes[pass_name] = _renamed(p, local, origin)
            reached = passes[pass_name].covered
            covered = [n for n in names if n in reached]
            coverage[pass_name] = {r: covered for r in ranks}
            continue
        rows = per_rank[:, j]
        rank_figures[pass_name] = RankFigures(rows, names, ranks)
        coverage[pass_name] = RankCoverage(rows, names, ranks)
        passes[pass_name] = _merged_pass(p, rows, names, origin)
    meta = trace.meta.copy()
    meta.world_size, meta.ranks, meta.name_prefix = len(ranks), list(ranks), ""
    shapes = {n: list(s) for n, s in zip(names, local.shapes, strict=False)}
    return factory(names, shapes, meta, passes=passes, tensors=dict(trace.tensors), scalars=dict(trace.scalars),
                   cuts=list(trace.cuts), inner_products=list(trace.inner_products), rank_coverage=coverage,
                   rank_figures=rank_figures)
