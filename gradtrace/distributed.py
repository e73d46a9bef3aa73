"""Merge every rank's trace under torch.distributed into one view, with fixed-size tensors.

``gather`` runs in four steps, every rank taking part in each:

1. arrival: every rank of the group must reach ``gather`` within ``timeout``
   (gloo: ``monitored_barrier``; other backends: a check in the store), else
   ``GradtraceError`` naming the ranks that did not come;
2. handshake, one round of two SHA-256 per rank: one of the watched
   parameters (names without the wrapper's prefix, shapes) and the pass names,
   one of all the figures. Names travel only when the first differs, as UTF-8
   bytes in a uint8 tensor (never pickled), to say which ranks differ and how;
3. figures: when the second digest differs on some rank (local gradients,
   shards), every rank's figures are all-gathered as a float64 tensor
   (passes x parameters x 4), and ``rank_figures`` keeps the passes that
   differ; figures bit-identical everywhere (DDP's reduced ``.grad``) move
   nothing more;
4. merge: every rank builds the same merged trace (below).

The merged trace: coverage is the union over ranks; a sharded pass's figures
are global (norm = sqrt of the sum of the shards' sums of squares, max |g| the
largest, non-finite counts summed); a replicated pass (local or reduced) keeps
the largest figure any rank saw, and ``rank_figures`` holds every rank's own
figures where they differ. ``rank_coverage`` maps pass -> int rank -> covered.
Registered tensors, scalars and cuts are this rank's own.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist

from . import _torch_compat
from .errors import GradtraceError
from .records import PassColumns, PassTrace

# torch 2.13 renamed all_gather_into_tensor (now deprecated) to all_gather_single.
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
DEFAULT_TIMEOUT = datetime.timedelta(minutes=5)
# Per parameter and pass: sum of squares, max |g|, non-finite count, and the
# packed integers below (exact in a float64 up to 2**53).
WIDTH = 4
ZERO, STALE = 1, 2  # flag bits
VIA = ("backward", "grad", "both")  # two bits above the flags
HITS_BITS, ORDER_SHIFT = 16, 4 + 16


def gather(trace, factory, group=None, timeout=None):
    """Every rank of ``group`` calls this; every rank gets the same merged trace back."""
    if not (dist.is_available() and dist.is_initialized()):
        raise GradtraceError("trace.gather() needs torch.distributed to be initialised "
                             "(dist.init_process_group); on one process use the trace itself")
    ring = Ring(group, _as_timedelta(timeout))
    ring.arrive()
    local = LocalView(trace)
    figures = local.figures()
    # One round for both digests: on a busy machine every round trip costs more than the bytes.
    digests = ring.all_gather(_digests([json.dumps(local.description()).encode("utf-8"),
                                        figures.numpy().tobytes()]))  # (world, 2, 32)
    if not bool((digests[:, 0] == digests[0, 0]).all()):
        raise GradtraceError(_mismatch_message(ring.all_gather_json(local.description())))
    differing, per_rank = [], None
    if not bool((digests[:, 1] == digests[0, 1]).all()):  # same passes everywhere now: same shapes
        everything = ring.all_gather(figures)  # (world, passes, params, WIDTH)
        differing = [k for k in range(len(figures)) if not bool((everything[:, k] == everything[0, k]).all())]
        per_rank = everything[:, differing]
    return _merged(trace, factory, local, figures, differing, per_rank, ring.world)


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
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.backend = str(dist.get_backend(group))
        self.device = (torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl"
                       else torch.device("cpu"))

    def arrive(self) -> None:
        """Every rank is here, or GradtraceError naming the ones that are not (instead of a hang)."""
        if self.backend == "gloo":
            try:
                dist.monitored_barrier(self.group, timeout=self.timeout, wait_all_ranks=True)
            except RuntimeError as e:
                raise GradtraceError(self._late_message(_ranks_in(str(e)), str(e))) from None
        else:
            late = _torch_compat.store_arrival(self.group, self.rank, self.world, self.timeout)
            if late:
                raise GradtraceError(self._late_message(late, ""))

    def _late_message(self, late: List[int], detail: str) -> str:
        who = (f"rank(s) {', '.join(map(str, late))}" if late
               else "rank 0 (which checks arrivals)" if self.rank != 0 else "some rank")
        return (f"trace.gather(): {who} of the {self.world}-rank group did not call gather() within "
                f"{self.timeout.total_seconds():g} s (seen from rank {self.rank}). Every rank must call "
                f"trace.gather() the same number of times; a rank that raised earlier never arrives. "
                f"{detail}".rstrip())

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """Stack every rank's ``t`` (same shape and dtype on every rank) along a new first dim."""
        t = t.to(self.device).contiguous()
        out = torch.empty((self.world * t.shape[0],) + tuple(t.shape[1:]), dtype=t.dtype, device=self.device)
        _ALL_GATHER(out, t, group=self.group)  # ranks' tensors end to end along dim 0
        return out.cpu().view((self.world,) + tuple(t.shape))

    def all_gather_json(self, value: Any) -> List[Any]:
        """Every rank's JSON-able ``value``: UTF-8 bytes behind a length header, decoded with json."""
        data = json.dumps(value).encode("utf-8")
        sizes = self.all_gather(torch.tensor([len(data)], dtype=torch.int64))[:, 0].tolist()
        padded = torch.zeros(max(sizes), dtype=torch.uint8)
        padded[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        rows = self.all_gather(padded)
        return [json.loads(bytes(rows[r, :sizes[r]].tolist()).decode("utf-8")) for r in range(self.world)]


def _ranks_in(message: str) -> List[int]:
    """The ranks a ``monitored_barrier`` error names ("Ranks 1, 3 failed to pass monitoredBarrier")."""
    match = re.search(r"Ranks? ([\d, ]+) failed", message)
    return [int(r) for r in re.findall(r"\d+", match.group(1))] if match else []


# ---- this rank's view, in a rank-independent order ----------------------------------------
def normalised_name(name: str, prefix: str) -> str:
    """The name every rank agrees on: without the wrapper's prefix (DDP's ``module.``)."""
    return name[len(prefix):] if prefix and name.startswith(prefix) else name


class LocalView:
    """This rank's passes as fixed-size rows over the normalised parameter names."""

    def __init__(self, trace):
        prefix = trace.meta.name_prefix or ""
        self.names = [normalised_name(n, prefix) for n in trace.params]
        self.shapes = [list(trace.param_shapes.get(n, [])) for n in trace.params]
        self.local_names = list(trace.params)
        self.passes: Dict[str, PassTrace] = trace.passes
        self.pass_names = list(self.passes)

    def description(self) -> Dict[str, Any]:
        return {"params": [[n, s] for n, s in zip(self.names, self.shapes)], "passes": self.pass_names}

    def figures(self) -> torch.Tensor:
        """(passes, parameters, WIDTH) float64; zeros for a parameter a pass did not reach."""
        out = torch.zeros(len(self.pass_names), len(self.names), WIDTH, dtype=torch.float64)
        position = {n: i for i, n in enumerate(self.local_names)}
        for k, p in enumerate(self.passes.values()):
            names = p.column("name")
            if names:
                # numpy reads Python lists several times faster than torch.tensor does.
                rows = np.empty((len(names), WIDTH), dtype=np.float64)
                rows[:, 0] = np.square(np.array(p.column("norm"), dtype=np.float64))
                rows[:, 1] = np.array(p.column("max_abs"), dtype=np.float64)
                rows[:, 2] = np.array(p.column("nonfinite"), dtype=np.float64)
                rows[:, 3] = _pack(p)
                out[k, torch.from_numpy(np.array([position[n] for n in names], dtype=np.int64))] = \
                    torch.from_numpy(rows)
        return out


def _pack(p: PassTrace) -> np.ndarray:
    """Hits (at least 1: reached), backward order and flags in one integer per parameter, exact in a float64."""
    via = {name: i for i, name in enumerate(VIA)}
    flags = (np.array(p.column("zero"), dtype=np.int64) * ZERO
             + np.array(p.column("stale"), dtype=np.int64) * STALE
             + (np.array([via[v] for v in p.column("via")], dtype=np.int64) << 2))
    hits = np.clip(np.array(p.column("hits"), dtype=np.int64), 1, (1 << HITS_BITS) - 1)
    order = np.array(p.column("order"), dtype=np.int64)
    return (((order << HITS_BITS) + hits) * 16 + flags).astype(np.float64)


def _digests(blobs: List[bytes]) -> torch.Tensor:
    """One SHA-256 per blob, as a (len, 32) uint8 tensor."""
    rows = b"".join(hashlib.sha256(blob).digest() for blob in blobs)
    return torch.frombuffer(bytearray(rows), dtype=torch.uint8).reshape(len(blobs), 32)


def _mismatch_message(descriptions: List[Dict[str, Any]]) -> str:
    """Which ranks watch other parameters or hold other passes than rank 0, by name."""
    base = descriptions[0]
    lines = []
    base_params = {n: s for n, s in base["params"]}
    for rank, d in enumerate(descriptions[1:], start=1):
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
            lines.append(f"passes differ: rank 0 has {base['passes']}, rank {rank} has {d['passes']}")
    detail = "; ".join(lines) or "the parameter lists differ in order"
    return (f"trace.gather(): the ranks' traces do not match ({detail}). Every rank must watch the same "
            "parameters (the same model, wrapped the same way or not at all) and record the same passes "
            "under the same names.")


# ---- the merged trace ------------------------------------------------------------
def _unpack(packed: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ints = packed.to(torch.int64)
    flags = ints & 15
    hits = (ints >> 4) & ((1 << HITS_BITS) - 1)
    order = ints >> ORDER_SHIFT
    return hits, order, flags


def _merged_pass(p: PassTrace, rows: torch.Tensor, names: Sequence[str]) -> PassTrace:
    # ``expected`` (parameters reachable from registered tensors) is this rank's, like its tensors: not kept.
    """One pass over every rank: ``rows`` is (world, params, WIDTH)."""
    sumsq, max_abs, nonfinite = rows[..., 0], rows[..., 1], rows[..., 2]
    hits, order, flags = _unpack(rows[..., 3])
    reached = hits > 0
    covered = reached.any(0)
    if p.scope == "sharded":  # shards of one gradient: sums of squares and counts add up
        norm, bad = sumsq.sum(0).sqrt(), nonfinite.sum(0)
    else:  # replicas (or per-rank local gradients): the largest any rank saw
        norm, bad = sumsq.max(0).values.sqrt(), nonfinite.max(0).values
    top = max_abs.max(0).values
    zero = covered & (top == 0) & (bad == 0) & ((flags & ZERO) > 0).any(0)  # an empty shard never is
    first = torch.where(reached, order, torch.full_like(order, 1 << 40)).min(0).values
    via_rank = reached.to(torch.int64).argmax(0)  # the lowest rank that reached it
    via = flags.gather(0, via_rank[None])[0] >> 2
    stale = ((flags & STALE) > 0).any(0)
    # Host lists once: indexing tensors element by element costs microseconds each.
    first, covered = first.tolist(), covered.tolist()
    idx = sorted((i for i in range(len(names)) if covered[i]), key=lambda i: (first[i], i))
    most_hits, norm, top, zero = hits.max(0).values.tolist(), norm.tolist(), top.tolist(), zero.tolist()
    bad, via, stale = bad.tolist(), via.tolist(), stale.tolist()
    columns = PassColumns(
        name=[names[i] for i in idx], hits=[most_hits[i] for i in idx], norm=[norm[i] for i in idx],
        max_abs=[top[i] for i in idx], zero=[zero[i] for i in idx], nonfinite=[int(bad[i]) for i in idx],
        via=[VIA[via[i]] for i in idx], order=list(range(len(idx))), stale=[stale[i] for i in idx],
        # Not carried over the wire: a cleared figure is 0 and not "zero" (its ZERO flag is unset) on its rank.
        cleared=[False] * len(idx))
    return PassTrace.from_columns(columns, name=p.name, params=tuple(names), runs=p.runs, kinds=list(p.kinds),
                                  auto=p.auto, kept_grads=False, scope=p.scope, step_start=p.step_start,
                                  failed=p.failed)


def _renamed(p: PassTrace, local: LocalView) -> PassTrace:
    """This rank's pass under the normalised names."""
    rename = dict(zip(local.local_names, local.names))
    columns = PassColumns(**{f: p.column(f) for f in PassColumns.__dataclass_fields__})
    columns.name = [rename[n] for n in columns.name]
    merged = PassTrace.from_columns(columns, name=p.name, params=tuple(local.names), runs=p.runs,
                                    kinds=list(p.kinds), auto=p.auto, kept_grads=False, scope=p.scope,
                                    step_start=p.step_start, failed=p.failed)
    merged.expected = sorted(rename.get(n, n) for n in p.expected) if p.expected is not None else None
    merged.expected_partial = p.expected_partial
    return merged


def _rank_figures(rows: torch.Tensor, names: Sequence[str]) -> Dict[int, Dict[str, List[float]]]:
    """Every rank's own [norm, max |g|, non-finite, stale (0/1)] per parameter it reached."""
    hits, _, flags = _unpack(rows[..., 3])
    reached, norm = (hits > 0).tolist(), rows[..., 0].sqrt().tolist()
    max_abs, nonfinite = rows[..., 1].tolist(), rows[..., 2].to(torch.int64).tolist()
    stale = ((flags & STALE) > 0).to(torch.int64).tolist()
    return {rank: {names[i]: [norm[rank][i], max_abs[rank][i], nonfinite[rank][i], stale[rank][i]]
                   for i in range(len(names)) if reached[rank][i]}
            for rank in range(rows.shape[0])}


def _merged(trace, factory, local: LocalView, figures: torch.Tensor, differing: List[int],
            per_rank: Optional[torch.Tensor], world: int):
    names = local.names
    passes, coverage, rank_figures = {}, {}, {}
    for k, (pass_name, p) in enumerate(local.passes.items()):
        if k not in differing:  # bit-identical on every rank: this rank's pass is the merged one
            passes[pass_name] = _renamed(p, local)
            reached = passes[pass_name].covered
            covered = [n for n in names if n in reached]
            coverage[pass_name] = {r: covered for r in range(world)}
            continue
        rows = per_rank[:, differing.index(k)]
        rank_figures[pass_name] = _rank_figures(rows, names)
        passes[pass_name] = _merged_pass(p, rows, names)
        reached = (_unpack(rows[..., 3])[0] > 0).tolist()
        coverage[pass_name] = {r: [n for n, hit in zip(names, reached[r]) if hit] for r in range(world)}  # model order
    meta = trace.meta.copy()
    meta.world_size, meta.name_prefix = world, ""
    shapes = dict(zip(names, local.shapes))
    return factory(names, shapes, meta, passes=passes, tensors=dict(trace.tensors), scalars=dict(trace.scalars),
                   cuts=list(trace.cuts), inner_products=list(trace.inner_products), rank_coverage=coverage,
                   rank_figures=rank_figures)
