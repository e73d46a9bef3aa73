"""What every rank runs in the distributed tests: one process group, every scenario in turn.

Starting processes and a gloo group costs seconds on a busy machine, so one
spawn of two ranks runs every scenario here and writes what each rank saw to
``<out>/rank<r>.json``; the tests read it. Every figure is compared on the rank
itself against an oracle: ``.grad`` after ``backward()`` returned, or the full
gradient computed by hand on an unwrapped copy of the model.
"""
from __future__ import annotations

import datetime
import json
import os
import time
import traceback
from typing import Callable, Dict, List

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import gradtrace
from spawn_ranks import connect

STEPS = 30
DEVICE = torch.device("cpu")  # cuda:<rank> under NCCL (set by the worker)
# What also runs under NCCL (two GPUs): the scenarios whose models are plain or DDP-wrapped.
NCCL_SCENARIOS = ["ddp_figures", "ddp_autograd_grad", "ddp_microbatches", "nan_on_rank_1", "stale_on_rank_1",
                  "union_and_divergence", "find_unused", "mismatched_passes", "late_rank"]


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Linear(3, 3)
        self.a = nn.Linear(3, 1)
        self.b = nn.Linear(3, 1)

    def forward(self, x, use_b: bool = True):
        h = self.trunk(x)
        return self.a(h) + (self.b(h) if use_b else 0)


def six_params() -> nn.Module:
    torch.manual_seed(0)  # the same initial weights on every rank, as DDP requires
    # float64: the oracles computed by hand sum in another order than an all-reduce does
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1)).double().to(DEVICE)


def data(rank: int, step: int = 0, rows: int = 5, width: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * step + rank)  # different data on every rank
    return torch.randn(rows, width, generator=g, dtype=torch.float64).to(DEVICE)


def grad_norms(model: nn.Module, prefix: str = "") -> Dict[str, float]:
    return {prefix + n: float(p.grad.double().norm()) for n, p in model.named_parameters() if p.grad is not None}


def close(a: float, b: float, rel: float = 1e-10) -> bool:
    return abs(a - b) <= rel * max(abs(a), abs(b), 1e-300)


def mismatches(trace_pass, expected: Dict[str, float]) -> List[str]:
    got = {r.name: r.norm for r in trace_pass.records.values()}
    return sorted(n for n in set(got) | set(expected) if not (n in got and n in expected
                                                                and close(got[n], expected[n])))


# ---- DDP: figures are .grad after backward() returned ------------------------------
def ddp_figures(rank: int, world: int) -> Dict:
    out = {}
    for bucket_view in (True, False):
        for labelled in (False, True):
            ddp = DDP(six_params(), gradient_as_bucket_view=bucket_view)
            bad, scopes = [], set()
            with gradtrace.watch(ddp) as trace:
                for step in range(STEPS):
                    ddp.zero_grad()
                    name = f"step-{step}"
                    if labelled:
                        with trace.pass_(name):
                            ddp(data(rank, step)).sum().backward()
                    else:
                        ddp(data(rank, step)).sum().backward()
                        name = list(trace.passes)[-1]
                    p = trace.passes[name]
                    bad += mismatches(p, grad_norms(ddp))
                    scopes.add(p.scope)
            out[f"bucket_view={bucket_view},labelled={labelled}"] = {"mismatches": len(bad), "scopes": sorted(scopes),
                                                                    "passes": len(trace.passes)}
    return out


def ddp_no_sync(rank: int, world: int) -> Dict:
    """Accumulation under no_sync(): local while it lasts, the averaged sum after the synced step."""
    model = six_params()
    reference = six_params()
    ddp = DDP(model)
    with gradtrace.watch(ddp) as trace:
        with ddp.no_sync():
            ddp(data(rank, 0)).sum().backward()  # unlabelled, local
        local = grad_norms(ddp)
        unlabelled = trace.passes[list(trace.passes)[-1]]
        ddp.zero_grad()
        with trace.pass_("step"):
            with ddp.no_sync():
                ddp(data(rank, 1)).sum().backward()
            ddp(data(rank, 2)).sum().backward()  # this one all-reduces the accumulated sum
    # By hand: every rank's microbatches, summed, averaged over ranks.
    total = sum(reference(data(r, s)).sum() for r in range(world) for s in (1, 2)) / world
    total.backward()
    return {"local_scope": unlabelled.scope, "local_mismatches": mismatches(unlabelled, local),
            "step_scope": trace.passes["step"].scope,
            "step_mismatches": mismatches(trace.passes["step"], grad_norms(reference, "module.")),
            "stale": sorted(trace.passes["step"].stale)}


def ddp_autograd_grad(rank: int, world: int) -> Dict:
    """autograd.grad on ddp.module: the local gradients handed back; gathered, each rank's own."""
    ddp = DDP(six_params())
    with gradtrace.watch(ddp) as trace:
        with trace.pass_("Y"):
            params = list(ddp.module.parameters())
            grads = torch.autograd.grad(ddp.module(data(rank)).sum(), params)
    named = zip(ddp.module.named_parameters(), grads, strict=True)
    expected = {f"module.{n}": float(g.double().norm()) for (n, _), g in named}
    merged = trace.gather()
    mine = merged.rank_figures["Y"][rank]
    return {"scope": trace.passes["Y"].scope, "mismatches": mismatches(trace.passes["Y"], expected),
            "rank_figures_match": all(close(mine[n[len("module."):]][0], v) for n, v in expected.items()),
            "ranks": sorted(merged.rank_figures["Y"])}


# ---- FSDP: global figures after gather --------------------------------------------
def fsdp_model() -> nn.Module:
    torch.manual_seed(0)
    # Linear(4, 1): a (1, 4) weight and a (1,) bias; on two ranks rank 1's shards are empty.
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 1)).double()


def full_gradient(world: int, step=0, make: Callable[[], nn.Module] = None) -> Dict[str, torch.Tensor]:
    """The gradient a wrapper averages, by hand: the mean over ranks of each rank's loss (summed over the
    microbatches ``step``: one or a list), on one unwrapped copy."""
    reference = (make or fsdp_model)()
    steps = step if isinstance(step, (list, tuple)) else [step]
    (sum(reference(data(r, s).double()).sum() for r in range(world) for s in steps) / world).backward()
    return {n: p.grad for n, p in reference.named_parameters()}


def local_gradient(rank: int, step, make: Callable[[], nn.Module] = None) -> Dict[str, float]:
    """This rank's own gradient norms (no averaging) over the microbatches ``step``, by hand."""
    reference = (make or fsdp_model)()
    steps = step if isinstance(step, (list, tuple)) else [step]
    sum(reference(data(rank, s).double()).sum() for s in steps).backward()
    return {n: float(p.grad.norm()) for n, p in reference.named_parameters()}


def unknown_figures(p) -> Dict:
    """What a pass whose figures a wrapper made unknown says about them."""
    records = p.records.values()
    return {"cleared": sorted(p.cleared), "covered": len(p.covered), "because": p.unknown_because,
            "no_numbers": all(r.norm == 0.0 and r.max_abs == 0.0 and not r.zero for r in records if r.cleared)}


def global_figures_match(merged, name: str, full: Dict[str, torch.Tensor]) -> List[str]:
    bad = []
    records = merged.passes[name].records
    for n, g in full.items():
        r = records.get(n)
        if r is None or not (close(r.norm, float(g.norm()), 1e-10) and r.max_abs == float(g.abs().max())
                             and r.nonfinite == 0 and not r.zero):
            bad.append(n)
    return bad


def fsdp2(rank: int, world: int) -> Dict:
    from torch.distributed.fsdp import fully_shard

    model = fsdp_model()
    for layer in (model[0], model[2], model[4]):
        fully_shard(layer)
    fully_shard(model)
    with gradtrace.watch(model) as trace:
        model(data(rank, 0).double()).sum().backward()  # unlabelled
        model.zero_grad()
        with trace.pass_("X"):
            model(data(rank, 1).double()).sum().backward()
    local = trace.passes["backward-1"]
    merged = trace.gather()
    return {"passes": list(trace.passes), "runs": local.runs, "scope": local.scope,
            "local_codes": [v.code for v in trace.verdicts()],
            "local_report_says_shard_local": "shard-local" in trace.report(),
            "empty_shards_zero": sorted(n for n in local.zero),
            "unlabelled_bad": global_figures_match(merged, "backward-1", full_gradient(world, 0)),
            "labelled_bad": global_figures_match(merged, "X", full_gradient(world, 1)),
            "merged_codes": [v.code for v in merged.verdicts()],
            "merged_report_says_global": "global (gathered shards)" in merged.report()}


def fsdp1(rank: int, world: int) -> Dict:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    model = FSDP(fsdp_model(), use_orig_params=True, device_id=torch.device("cpu"))
    with gradtrace.watch(model) as trace:
        model(data(rank, 0).double()).sum().backward()
        with trace.pass_("X"):
            model.zero_grad()
            model(data(rank, 1).double()).sum().backward()
    merged = trace.gather()
    return {"params": list(trace.params), "scope": trace.passes["backward-1"].scope,
            "local_codes": [v.code for v in trace.verdicts()],
            "unlabelled_bad": global_figures_match(merged, "backward-1", full_gradient(world, 0)),
            "labelled_bad": global_figures_match(merged, "X", full_gradient(world, 1)),
            "merged_codes": [v.code for v in merged.verdicts()]}


# ---- one pass per microbatch during gradient accumulation ----------------------------------
def ddp_microbatches(rank: int, world: int) -> Dict:
    """DDP accumulation, one pass per microbatch: a no_sync pass is local and exact; the synced pass after it
    finds this rank's unsynced gradient in .grad and the all-reduce averages both: its own share is unknown
    (never the per-rank value under "reduced"); one pass over the whole accumulation is exact."""
    ddp = DDP(six_params())
    with gradtrace.watch(ddp) as trace:
        with trace.pass_("mb0"):
            with ddp.no_sync():
                ddp(data(rank, 0)).sum().backward()
        with trace.pass_("mb1"):
            ddp(data(rank, 1)).sum().backward()
        ddp.zero_grad()
        with trace.pass_("step"):
            with ddp.no_sync():
                ddp(data(rank, 2)).sum().backward()
            ddp(data(rank, 3)).sum().backward()
        ddp.zero_grad()
        with trace.pass_("synced0"):  # every microbatch synced: the second finds an averaged .grad
            ddp(data(rank, 4)).sum().backward()
        with trace.pass_("synced1"):
            ddp(data(rank, 5)).sum().backward()
        ddp.zero_grad()
        with ddp.no_sync():
            ddp(data(rank, 6)).sum().backward()
        ddp.zero_grad()  # the unsynced gradient is gone: nothing to mix with
        with trace.pass_("after_zero"):
            ddp(data(rank, 7)).sum().backward()
    passes = trace.passes

    def reduced(steps):
        return {f"module.{n}": float(g.norm()) for n, g in full_gradient(world, steps, six_params).items()}

    local = {f"module.{n}": v for n, v in local_gradient(rank, 0, six_params).items()}
    return {"scopes": {n: p.scope for n, p in passes.items()},
            "mb0_bad": mismatches(passes["mb0"], local), "mb1": unknown_figures(passes["mb1"]),
            "step_bad": mismatches(passes["step"], reduced([2, 3])),
            "synced_bad": mismatches(passes["synced0"], reduced(4)) + mismatches(passes["synced1"], reduced(5)),
            "after_zero_bad": mismatches(passes["after_zero"], reduced(7)),
            "codes": {c: [v.evidence.get("pass") for v in trace.verdicts() if v.code == c]
                      for c in {v.code for v in trace.verdicts()}},
            "errors": [v.code for v in trace.verdicts() if v.severity == "error"]}


def ddp_module_watched(rank: int, world: int) -> Dict:
    """watch(ddp.module): the DDP around it is found at its forward; its figures are labelled as they are."""
    ddp = DDP(six_params())
    with gradtrace.watch(ddp.module) as trace:
        with trace.pass_("alone"):  # the module's own forward, outside DDP: local
            ddp.module(data(rank, 9)).sum().backward()
        ddp.zero_grad()
        with trace.pass_("mb0"):
            with ddp.no_sync():
                ddp(data(rank, 0)).sum().backward()
        local = grad_norms(ddp.module)
        ddp.zero_grad()
        with trace.pass_("step"):
            ddp(data(rank, 1)).sum().backward()
        reduced = grad_norms(ddp.module)
    # Inside another wrapper (as Lightning's DDP strategy wraps the LightningModule): still found.
    model = six_params()
    outer = DDP(Wrapped(model))
    with gradtrace.watch(model) as inner_trace:
        with inner_trace.pass_("step"):
            outer(data(rank, 1)).sum().backward()
    return {"wrapper": trace.meta.wrapper, "scopes": {n: p.scope for n, p in trace.passes.items()},
            "mb0_bad": mismatches(trace.passes["mb0"], local), "step_bad": mismatches(trace.passes["step"], reduced),
            "step_vs_hand": mismatches(trace.passes["step"], {n: float(g.norm())
                                                              for n, g in full_gradient(world, 1, six_params).items()}),
            "inner": [inner_trace.meta.wrapper, inner_trace.passes["step"].scope,
                      mismatches(inner_trace.passes["step"], grad_norms(model))]}


class Wrapped(nn.Module):
    """A module around the model, the way Lightning's strategy wraps a LightningModule before DDP, calling
    the model's children rather than the model (as a ``training_step`` may)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.inner = model

    def forward(self, x):
        for layer in self.inner:
            x = layer(x)
        return x


def fsdp1_no_sync(rank: int, world: int) -> Dict:
    """FSDP1: a no_sync pass holds this rank's full local gradient (scope local, never summed as shards);
    the synced pass after it also reduces the no_sync microbatch: unknown; one pass over both is exact."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    model = FSDP(fsdp_model(), use_orig_params=True, device_id=torch.device("cpu"))
    with gradtrace.watch(model) as trace:
        with trace.pass_("mb0"):
            with model.no_sync():
                model(data(rank, 0).double()).sum().backward()
        with trace.pass_("mb1"):
            model(data(rank, 1).double()).sum().backward()
        model.zero_grad()
        with trace.pass_("step"):
            with model.no_sync():
                model(data(rank, 2).double()).sum().backward()
            model(data(rank, 3).double()).sum().backward()
    merged = trace.gather()
    return {"scopes": {n: p.scope for n, p in trace.passes.items()},
            "mb0_bad": mismatches(trace.passes["mb0"], local_gradient(rank, 0)),
            "merged_mb0_scope": merged.passes["mb0"].scope,
            "merged_mb0_rank_bad": sorted(n for n, v in merged.rank_figures["mb0"][rank].items()
                                          if not close(v[0], local_gradient(rank, 0)[n])),
            "mb1": unknown_figures(trace.passes["mb1"]), "merged_mb1": unknown_figures(merged.passes["mb1"]),
            "step_bad": global_figures_match(merged, "step", full_gradient(world, [2, 3])),
            "merged_codes": sorted({v.code for v in merged.verdicts()})}


def fsdp2_sync_off(rank: int, world: int) -> Dict:
    """FSDP2 with set_requires_gradient_sync(False): the run is seen (through the unsharded copies), its
    gradient stays inside FSDP: covered, counted, local, figures unknown; never NO_COVERAGE."""
    from torch.distributed.fsdp import fully_shard

    model = fsdp_model()
    for layer in (model[0], model[2], model[4]):
        fully_shard(layer)
    fully_shard(model)
    with gradtrace.watch(model) as trace:
        with trace.pass_("mb0"):
            model.set_requires_gradient_sync(False)
            model(data(rank, 0).double()).sum().backward()
        with trace.pass_("mb1"):
            model.set_requires_gradient_sync(True)
            model(data(rank, 1).double()).sum().backward()
        model.zero_grad()
        with trace.pass_("step"):
            model.set_requires_gradient_sync(False)
            model(data(rank, 2).double()).sum().backward()
            model.set_requires_gradient_sync(True)
            model(data(rank, 3).double()).sum().backward()
    merged = trace.gather()
    return {"scopes": {n: p.scope for n, p in trace.passes.items()},
            "runs": {n: p.runs for n, p in trace.passes.items()},
            "mb0": unknown_figures(trace.passes["mb0"]), "mb1": unknown_figures(trace.passes["mb1"]),
            "step_bad": global_figures_match(merged, "step", full_gradient(world, [2, 3])),
            "local_codes": sorted({v.code for v in trace.verdicts()}),
            "merged_codes": sorted({v.code for v in merged.verdicts()})}


def fsdp1_flat(rank: int, world: int) -> Dict:
    """FSDP1 without use_orig_params: only flat parameters exist; the trace says so."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    model = FSDP(fsdp_model(), use_orig_params=False, device_id=torch.device("cpu"))
    with gradtrace.watch(model) as trace:
        model(data(rank).double()).sum().backward()
    found = trace.verdicts()
    return {"params": list(trace.params), "flat_params": trace.meta.flat_params,
            "codes": [(v.code, v.severity) for v in found],
            "message": next((v.message for v in found if v.code == "FLAT_PARAMS"), ""),
            "report_first_line": trace.report().splitlines()[0]}


def nan_under_ddp(rank: int, world: int) -> Dict:
    """A NaN born on rank 1 under DDP: the all-reduce puts it in every rank's .grad; the merged NONFINITE
    names rank 1, where cuts="ops" found the op that made it, and keeps the op."""
    ddp = DDP(six_params())
    with gradtrace.watch(ddp, cuts="ops") as trace:
        with trace.pass_("X"):
            x = data(rank)
            if rank == 1:
                x[0, 0] = float("nan")
            ddp(x).sum().backward()
    local = [v for v in trace.verdicts() if v.code == "NONFINITE"]
    merged = trace.gather()
    nonfinite = [v for v in merged.verdicts() if v.code == "NONFINITE"]
    return {"local_origin": bool(trace.passes["X"].nonfinite_origin), "local_count": len(local),
            "ranks": [v.evidence.get("ranks") for v in nonfinite],
            "seen_on": [v.evidence.get("seen_on_ranks") for v in nonfinite],
            "origin_kept": [bool(v.evidence.get("origin")) for v in nonfinite],
            "messages": [v.message for v in nonfinite],
            "first_line": merged.report().splitlines()[0]}


# ---- the merged view ------------------------------------------------------------------
def nan_on_rank_1(rank: int, world: int) -> Dict:
    model = six_params()
    with gradtrace.watch(model) as trace:
        with trace.pass_("X"):
            x = data(rank)
            if rank == 1:
                x[0, 0] = float("nan")
            model(x).sum().backward()
    merged = trace.gather()
    nonfinite = [v for v in merged.verdicts() if v.code == "NONFINITE"]
    return {"ranks": [v.evidence.get("ranks") for v in nonfinite], "messages": [v.message for v in nonfinite],
            "report_has_per_rank": "per-rank figures in 'X'" in merged.report()}


def stale_on_rank_1(rank: int, world: int) -> Dict:
    """Rank 1 forgot zero_grad: the merged STALE_GRADS names rank 1 only."""
    model = six_params()
    if rank == 1:
        model(data(rank, 9)).sum().backward()  # leftover gradients, before watch
    with gradtrace.watch(model) as trace:
        with trace.pass_("X", step_start=True):  # a step begins: .grad should be zero
            model(data(rank)).sum().backward()
    merged = trace.gather()
    return {"ranks": [v.evidence.get("ranks") for v in merged.verdicts() if v.code == "STALE_GRADS"]}


def union_and_divergence(rank: int, world: int, find_unused: bool = False) -> Dict:
    torch.manual_seed(0)
    model = TwoHeads().double().to(DEVICE)
    target = DDP(model, find_unused_parameters=True) if find_unused else model
    with gradtrace.watch(target) as trace:
        with trace.pass_("X"):
            target(data(rank, width=3), use_b=(rank == 1)).sum().backward()
    merged = trace.gather()
    found = merged.verdicts()
    path = os.path.join(os.environ["GRADTRACE_TEST_OUT"], f"merged{rank}.json")
    merged.save(path)
    loaded = gradtrace.load(path)
    divergence = [v for v in found if v.code == "RANK_DIVERGENCE"]
    return {"codes": [v.code for v in found], "unused": [v.evidence for v in found if v.code == "UNUSED_PARAMS"],
            "divergence": [[v.severity, v.evidence["pass"], v.evidence["ranks"], v.evidence["parameters"]]
                           for v in divergence],
            "loaded_rank_keys": {p: sorted(r) for p, r in loaded.rank_coverage.items()},
            "loaded_key_types": sorted({type(k).__name__ for r in loaded.rank_coverage.values() for k in r}),
            "loaded_codes": [v.code for v in loaded.verdicts()],
            "report_world": "merged over 2 ranks" in merged.report()}


def wrapper_prefix(rank: int, world: int) -> Dict:
    """Rank 0 watches the DDP wrapper, rank 1 the module inside: the same parameters."""
    ddp = DDP(six_params())
    with gradtrace.watch(ddp if rank == 0 else ddp.module) as trace:
        with trace.pass_("X"):
            ddp(data(rank)).sum().backward()
    merged = trace.gather()
    return {"codes": [v.code for v in merged.verdicts()], "params": list(merged.params)}


def expect_error(make: Callable[[], None]) -> str:
    try:
        make()
    except gradtrace.GradtraceError as e:
        return str(e)
    return "no error"


def mismatched_passes(rank: int, world: int) -> Dict:
    def differing_names():
        model = six_params()
        with gradtrace.watch(model) as trace:
            with trace.pass_("X" if rank == 0 else "Y"):
                model(data(rank)).sum().backward()
        trace.gather()

    def extra_pass():
        model = six_params()
        with gradtrace.watch(model) as trace:
            for _ in range(1 + rank):
                model(data(rank)).sum().backward()
        trace.gather()

    def other_params():
        model = six_params()
        with gradtrace.watch(model if rank == 0 else model[2]) as trace:
            model(data(rank)).sum().backward()
        trace.gather()

    return {"names": expect_error(differing_names), "extra": expect_error(extra_pass),
            "params": expect_error(other_params)}


def expected_reduction(rank: int, world: int) -> Dict:
    """DDP without find_unused_parameters and a head no rank uses: the next forward raises; the trace stays."""
    torch.manual_seed(0)
    ddp = DDP(TwoHeads().double())
    error = ""
    try:
        with gradtrace.watch(ddp) as trace:
            for step in range(2):
                ddp(data(rank, step, width=3), use_b=False).sum().backward()
    except RuntimeError as e:
        error = str(e)
    first, failed = trace.verdicts()[0], next(v for v in trace.verdicts() if v.code == "PASS_FAILED")
    return {"error": "Expected to have finished reduction" in error,
            "missing": {name: sorted(p.missing) for name, p in trace.passes.items()},
            "first": [first.code, first.severity, sorted(first.evidence.get("parameters", []))],
            "failure_points_to": failed.evidence.get("explained_by"), "failure": failed.message}


def late_rank(rank: int, world: int, late: int = None) -> Dict:
    """Last: rank ``late`` (the highest) comes to gather after the others gave up: every rank's error names
    it, the ranks that came on time and the late one itself, not a 30-minute hang."""
    late = world - 1 if late is None else late
    model = six_params()
    with gradtrace.watch(model) as trace:
        model(data(rank)).sum().backward()
    if rank == late:
        time.sleep(5)  # alive but elsewhere: the others must time out, not see a closed connection
    start = datetime.datetime.now()
    message = expect_error(lambda: trace.gather(timeout=2))
    return {"message": message, "seconds": (datetime.datetime.now() - start).total_seconds()}


def example_probe(rank: int, world: int) -> Dict:
    """examples/ddp_probe.py: what its docstring promises is what the merged trace says."""
    import importlib.util
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "ddp_probe.py")
    spec = importlib.util.spec_from_file_location("ddp_probe", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    merged = example.probe(DEVICE, steps=2)
    return {"divergence": [[v.severity, v.evidence["ranks"], v.evidence["parameters"]]
                           for v in merged.verdicts() if v.code == "RANK_DIVERGENCE"],
            "docstring": example.__doc__}


# ---- a group of some ranks (a world of 3) -----------------------------------------------------
def subgroup(rank: int, world: int) -> Dict:
    """gather(group=...) over global ranks 1 and 2: keys, verdicts and errors name them 1 and 2, not 0 and 1."""
    group = dist.new_group([1, 2])  # every rank of the world takes part in making it
    if rank == 0:
        return {}
    torch.manual_seed(0)
    model = TwoHeads().double()
    with gradtrace.watch(model) as trace:
        with trace.pass_("X"):
            model(data(rank, width=3), use_b=(rank == 1)).sum().backward()
        with trace.pass_("N"):
            x = data(rank, width=3)
            if rank == 2:
                x[0, 0] = float("nan")
            model(x).sum().backward()
    merged = trace.gather(group=group)

    def mismatched():
        with gradtrace.watch(model) as other:
            with other.pass_("A" if rank == 1 else "B"):
                model(data(rank, width=3)).sum().backward()
        other.gather(group=group)

    found = merged.verdicts()
    return {"coverage_keys": sorted(merged.rank_coverage["X"]), "figure_keys": sorted(merged.rank_figures["X"]),
            "meta_ranks": merged.meta.ranks, "world_size": merged.meta.world_size,
            "divergence": [v.evidence["ranks"] for v in found if v.code == "RANK_DIVERGENCE"],
            "nonfinite": [v.evidence.get("ranks") for v in found if v.code == "NONFINITE"],
            "mismatch": expect_error(mismatched)}


SCENARIOS = [ddp_figures, ddp_no_sync, ddp_autograd_grad, fsdp2, fsdp1, ddp_microbatches, ddp_module_watched,
             fsdp1_no_sync,
             fsdp2_sync_off, fsdp1_flat, nan_under_ddp, nan_on_rank_1, stale_on_rank_1,
             union_and_divergence,
             lambda rank, world: union_and_divergence(rank, world, find_unused=True), wrapper_prefix,
             mismatched_passes, expected_reduction, example_probe, late_rank]
NAMES = ["ddp_figures", "ddp_no_sync", "ddp_autograd_grad", "fsdp2", "fsdp1", "ddp_microbatches", "ddp_module_watched",
         "fsdp1_no_sync",
         "fsdp2_sync_off", "fsdp1_flat", "nan_under_ddp", "nan_on_rank_1", "stale_on_rank_1",
         "union_and_divergence", "find_unused", "wrapper_prefix", "mismatched_passes", "expected_reduction",
         "example_probe", "late_rank"]
# A world of 3: a group of two of its ranks, and a late rank among three.
TRIO_SCENARIOS = [subgroup, late_rank]
TRIO_NAMES = ["subgroup", "late_rank"]


def worker(rank: int, world: int, port: int, out: str, only: List[str], backend: str = "gloo",
           suite: str = "pair") -> None:
    global DEVICE
    torch.set_num_threads(1)
    os.environ["GRADTRACE_TEST_OUT"] = out
    if backend == "nccl":
        DEVICE = torch.device("cuda", rank)
        torch.cuda.set_device(DEVICE)
    connect(rank, world, port, backend)  # the test process serves the rendezvous (spawn_ranks)
    results = {}
    try:
        names, scenarios = (TRIO_NAMES, TRIO_SCENARIOS) if suite == "trio" else (NAMES, SCENARIOS)
        for name, scenario in zip(names, scenarios, strict=True):
            if only and name not in only:
                continue
            try:
                results[name] = scenario(rank, world)
            except Exception:  # the test shows the traceback; the other scenarios still run
                results[name] = {"crashed": traceback.format_exc()}
            if name != "late_rank":
                dist.barrier()
    finally:
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(results, f, default=str)
        dist.destroy_process_group()
