"""Merge every rank's trace under torch.distributed: coverage per rank.

Each rank records its own coverage; ``gather`` collects every rank's trace as
a JSON-able dict through ``all_gather_object`` (which pickles: every rank
trusts its peers, see the README's security section) and returns a plain
trace with rank 0's records and every rank's coverage, whose verdicts include
``RANK_DIVERGENCE``.
"""
from __future__ import annotations

from typing import Dict, List

import torch.distributed as dist

from . import storage
from .errors import GradtraceError


def gather(trace, factory):
    """Every rank calls this; every rank gets the merged trace back (rank 0's records + per-rank coverage)."""
    if not (dist.is_available() and dist.is_initialized()):
        raise GradtraceError("trace.gather() needs torch.distributed to be initialised "
                             "(dist.init_process_group); on one process use the trace itself")
    local = {
        "rank": dist.get_rank(),
        "coverage": {name: sorted(p.covered) for name, p in trace.passes.items()},
        "trace": storage.to_dict(trace),
    }
    gathered: List[Dict] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    merged = storage.from_dict(gathered[0]["trace"], factory, "rank 0")
    coverage: Dict[str, Dict[int, List[str]]] = {}
    for item in gathered:
        for pass_name, covered in item["coverage"].items():
            coverage.setdefault(pass_name, {})[item["rank"]] = covered
    merged.rank_coverage = coverage
    merged.meta["world_size"] = len(gathered)
    return merged
