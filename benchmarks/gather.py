"""What ``trace.gather()`` costs, and what ``watch`` adds to a DDP step (gloo, loopback).

    python benchmarks/gather.py --ranks 2,4 --params 1000,4000,16000 --passes 1,10

For each world size it starts that many processes on 127.0.0.1 and measures,
as medians over ``--repeats`` after a warm-up:

* ``gather()`` of a trace with each of ``--params`` parameters and 1 or 10 passes, in
  two cases: figures that differ on every rank (local gradients, shards: the
  full figures travel) and figures identical on every rank (DDP's reduced
  ``.grad``: only digests travel); bytes each rank receives, computed from the
  tensors' sizes;
* the old way for comparison: ``all_gather_object`` of each rank's whole
  trace as a dict (pickled) and rank 0's trace rebuilt from it, and the
  pickled size;
* one DDP step (forward, backward, zero_grad) with and without ``watch``
  (interleaved, so load on the machine hits both alike).

Prints a table and, with ``--json``, writes the rows.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pickle
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the gradtrace of this checkout, in every rank

import gradtrace  # noqa: E402
from gradtrace import storage  # noqa: E402
from gradtrace.distributed import WIDTH  # noqa: E402
from gradtrace import distributed  # noqa: E402
from gradtrace.records import PassColumns, PassTrace  # noqa: E402


# Digests each rank sends in the handshake (2 before NaN origins travelled): this script also measures older code.
DIGESTS = getattr(distributed, "DIGESTS", 2)


def synthetic_trace(params: int, passes: int, rank: int, identical: bool) -> gradtrace.Trace:
    names = [f"layers.{i // 2}.{'weight' if i % 2 == 0 else 'bias'}" for i in range(params)]
    g = torch.Generator().manual_seed(0 if identical else rank + 1)
    out = {}
    for k in range(passes):
        norms = torch.rand(params, generator=g, dtype=torch.float64).tolist()
        # Columns, as a pass recorded by watch holds them (records are built only when asked for).
        columns = PassColumns(name=list(names), hits=[1] * params, norm=norms, max_abs=[v / 3 for v in norms],
                              zero=[False] * params, nonfinite=[0] * params, via=["backward"] * params,
                              order=list(range(params)), stale=[False] * params, cleared=[False] * params)
        out[f"step-{k}"] = PassTrace.from_columns(columns, name=f"step-{k}", params=tuple(names), runs=1,
                                                  kinds=["backward"])
    return gradtrace.Trace(names, {n: [4, 4] if n.endswith("weight") else [4] for n in names}, {}, passes=out)


def old_gather(as_dict, world: int):
    """What gather() did before: pickle every rank's whole trace, rebuild rank 0's."""
    gathered = [None] * world
    dist.all_gather_object(gathered, as_dict)
    return storage.from_dict(gathered[0], gradtrace.Trace, "rank 0")


def timed(fn, repeats: int):
    """(wall ms, this thread's CPU ms): medians after a warm-up. The CPU time leaves out waiting for the
    other ranks (and gloo's own threads): on an oversubscribed machine it is the steadier of the two."""
    walls, cpus = [], []
    for _ in range(repeats + 1):  # the first is a warm-up
        dist.barrier()
        start, cpu = time.perf_counter(), time.thread_time()
        fn()
        walls.append(time.perf_counter() - start)
        cpus.append(time.thread_time() - cpu)
    return statistics.median(walls[1:]) * 1e3, statistics.median(cpus[1:]) * 1e3


def gather_rows(rank, world, params_list, passes_list, repeats, with_old=True):
    rows = []
    for params, passes in ((n, k) for n in params_list for k in passes_list):
        for identical in (False, True):
            trace = synthetic_trace(params, passes, rank, identical)
            ms, cpu_ms = timed(lambda trace=trace: trace.gather(), repeats)
            received = world * (DIGESTS * 32 + (0 if identical else passes * params * WIDTH * 8))
            as_dict = storage.to_dict(trace)
            pickled = len(pickle.dumps(as_dict))
            old_ms = (timed(lambda as_dict=as_dict: old_gather(as_dict, world), repeats)[0] if with_old
                      else float("nan"))
            rows.append({"ranks": world, "params": params, "passes": passes,
                         "figures": "identical" if identical else "differ", "gather_ms": ms, "cpu_ms": cpu_ms,
                         "ms_per_pass": ms / passes, "bytes_received": received,
                         "old_ms": old_ms, "old_bytes_received": world * pickled,
                         "less_data": world * pickled / received})
    return rows


def ddp_step_rows(rank, world, steps):
    """Two identical DDP models, one watched for the whole loop (as in training), stepped alternately."""
    def build():
        torch.manual_seed(0)
        return nn.parallel.DistributedDataParallel(nn.Sequential(*[nn.Linear(64, 64) for _ in range(8)]))

    plain, watched = build(), build()
    x = torch.randn(32, 64)
    times = {"plain": [], "watched": []}

    def step(name, ddp):
        dist.barrier()
        start = time.perf_counter()
        ddp(x).sum().backward()
        ddp.zero_grad()
        times[name].append(time.perf_counter() - start)

    with gradtrace.watch(watched, max_passes=4):
        for i in range(steps):
            order = (("plain", plain), ("watched", watched)) if i % 2 == 0 else (("watched", watched), ("plain", plain))
            for name, ddp in order:
                step(name, ddp)
    base = statistics.median(times["plain"][2:]) * 1e3
    with_watch = statistics.median(times["watched"][2:]) * 1e3
    return [{"ranks": world, "ddp_step_ms": base, "watched_step_ms": with_watch, "ratio": with_watch / base}]


def worker(rank, world, port, args, out):
    torch.set_num_threads(1)
    # The parent serves the rendezvous on `port` (bound before the ranks started: no port race).
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=300))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    try:
        rows = gather_rows(rank, world, args["params"], args["passes"], args["repeats"], args["old"])
        if args["steps"]:  # --steps 0: gather only
            rows += ddp_step_rows(rank, world, args["steps"])
        if rank == 0:
            with open(out, "w") as f:
                json.dump(rows, f)
    finally:
        dist.destroy_process_group()


def loopback_store() -> dist.TCPStore:
    """The ranks' rendezvous, served from this process on a port the OS picked while binding it
    (a port found free, closed and bound again later by rank 0 can be taken in between)."""
    return dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", default="2,4")
    parser.add_argument("--params", default="2000", help="parameter counts, comma-separated")
    parser.add_argument("--passes", default="1,10")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--timeout", type=float, default=600, help="seconds for each world size")
    parser.add_argument("--no-old", dest="old", action="store_false",
                        help="skip the pickled all_gather_object comparison (the slow part of a large run)")
    parser.add_argument("--json")
    a = parser.parse_args(argv)
    args = {"params": [int(n) for n in a.params.split(",")], "passes": [int(p) for p in a.passes.split(",")],
            "repeats": a.repeats, "old": a.old,
            "steps": a.steps}
    rows = []
    for world in (int(r) for r in a.ranks.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "rows.json")
            store = loopback_store()  # kept alive until the ranks are done
            ctx = mp.start_processes(worker, args=(world, store.port, args, out), nprocs=world, join=False,
                                     start_method="spawn")
            deadline = time.monotonic() + a.timeout
            while not ctx.join(timeout=1):
                if time.monotonic() > deadline:
                    for p in ctx.processes:
                        p.kill()
                    raise SystemExit(f"{world} ranks did not finish within {a.timeout} s")
            rows += json.loads(open(out).read())
    from tabulate import tabulate
    print(tabulate([r for r in rows if "gather_ms" in r], headers="keys", floatfmt=".3g"))
    print()
    print(tabulate([r for r in rows if "ddp_step_ms" in r], headers="keys", floatfmt=".3g"))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
