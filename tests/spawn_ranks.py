"""Starting ranks for the multi-process tests: loopback only, no port race, bounded in time.

The rendezvous store is served from the test process on a port the OS picked while
binding it (asking for a free port, closing it and letting rank 0 bind it later is a
race: another process can take the port in between, and under load one did). Each
rank gets the port and connects as a client; the store lives until the ranks are done.
"""
from __future__ import annotations

import datetime
import json
import os
import time
from typing import Callable, List, Sequence

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp


def loopback_store() -> dist.TCPStore:
    return dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)


def connect(rank: int, world: int, port: int, backend: str = "gloo", timeout_s: float = 120) -> None:
    """In a rank: join the group the test process serves on ``port``."""
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=timeout_s))
    dist.init_process_group(backend, store=store, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))


def run_ranks(worker: Callable, world: int, out: str, args: Sequence = (), timeout_s: float = 600) -> List[dict]:
    """``worker(rank, world, port, out, *args)`` on ``world`` spawned ranks; each rank's ``<out>/rank<r>.json``."""
    store = loopback_store()  # kept alive until the ranks are done
    ctx = mp.start_processes(worker, args=(world, store.port, out, *args), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the {world} ranks did not finish within {timeout_s} s")
    return [json.loads(open(os.path.join(out, f"rank{r}.json")).read()) for r in range(world)]


def result(ranks: List[dict], name: str) -> List[dict]:
    """One scenario's result on every rank (a crash on any rank fails with its traceback)."""
    if name not in ranks[0]:
        pytest.skip(f"{name} does not run here")
    for r, results in enumerate(ranks):
        assert "crashed" not in results[name], f"rank {r}:\n{results[name]['crashed']}"
    return [results[name] for results in ranks]
