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

STEPS = 30
DEVICE = torch.device("cpu")  # cuda:<rank> under NCCL (set by the worker)
# What also runs under NCCL (two GPUs): the scenarios whose models are plain or DDP-wrapped.
NCCL_SCENARIOS = ["ddp_figures", "ddp_autograd_grad", "nan_on_rank_1", "stale_on_rank_1", "union_and_divergence",
                  "find_unused", "mismatched_passes", "missing_rank"]


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
    expected = {f"module.{n}": float(g.double().norm()) for (n, _), g in zip(ddp.module.named_parameters(), grads)}
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


def full_gradient(world: int, step: int = 0) -> Dict[str, torch.Tensor]:
    """The gradient FSDP averages, by hand: the mean over ranks of each rank's loss, on one unsharded copy."""
    reference = fsdp_model()
    (sum(reference(data(r, step).double()).sum() for r in range(world)) / world).backward()
    return {n: p.grad for n, p in reference.named_parameters()}


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
            "failure_points_to": failed.evidence.get("explained_by")}


def missing_rank(rank: int, world: int) -> Dict:
    """Last: rank 1 never calls gather; rank 0 must get an error naming it, not a 30-minute hang."""
    model = six_params()
    with gradtrace.watch(model) as trace:
        model(data(rank)).sum().backward()
    if rank != 0:
        time.sleep(5)  # alive but elsewhere: rank 0 must time out, not see a closed connection
        return {}
    start = datetime.datetime.now()
    message = expect_error(lambda: trace.gather(timeout=2))
    return {"message": message, "seconds": (datetime.datetime.now() - start).total_seconds()}


SCENARIOS = [ddp_figures, ddp_no_sync, ddp_autograd_grad, fsdp2, fsdp1, nan_on_rank_1, stale_on_rank_1,
             union_and_divergence,
             lambda rank, world: union_and_divergence(rank, world, find_unused=True), wrapper_prefix,
             mismatched_passes, expected_reduction, missing_rank]
NAMES = ["ddp_figures", "ddp_no_sync", "ddp_autograd_grad", "fsdp2", "fsdp1", "nan_on_rank_1", "stale_on_rank_1",
         "union_and_divergence", "find_unused", "wrapper_prefix", "mismatched_passes", "expected_reduction",
         "missing_rank"]


def worker(rank: int, world: int, port: int, out: str, only: List[str], backend: str = "gloo") -> None:
    global DEVICE
    torch.set_num_threads(1)
    os.environ["GRADTRACE_TEST_OUT"] = out
    if backend == "nccl":
        DEVICE = torch.device("cuda", rank)
        torch.cuda.set_device(DEVICE)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    results = {}
    try:
        for name, scenario in zip(NAMES, SCENARIOS):
            if only and name not in only:
                continue
            try:
                results[name] = scenario(rank, world)
            except Exception:  # the test shows the traceback; the other scenarios still run
                results[name] = {"crashed": traceback.format_exc()}
            if name != "missing_rank":
                dist.barrier()
    finally:
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(results, f, default=str)
        dist.destroy_process_group()
