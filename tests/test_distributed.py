"""trace.gather() under torch.distributed (gloo, loopback, two processes): coverage per rank."""
import json
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import gradtrace

pytestmark = pytest.mark.slow  # real subprocesses / the whole demo: run by the full suite, not the dev loop


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Linear(3, 3)
        self.a = nn.Linear(3, 1)
        self.b = nn.Linear(3, 1)

    def forward(self, x, use_b: bool):
        h = self.trunk(x)
        return self.a(h) + (self.b(h) if use_b else 0)


def worker(rank: int, world: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = TwoHeads()
        with gradtrace.watch(model) as trace:
            with trace.pass_("X"):
                # Rank 1 takes a data-dependent branch that skips head b (DDP would hang or error here).
                model(torch.randn(4, 3), use_b=(rank == 0)).sum().backward()
        merged = trace.gather()
        if rank == 0:
            with open(out, "w") as f:
                json.dump({"codes": [v.code for v in merged.verdicts()],
                           "evidence": [v.evidence for v in merged.verdicts() if v.code == "RANK_DIVERGENCE"],
                           "world": merged.meta["world_size"]}, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_gather_reports_rank_divergence(tmp_path):
    out = str(tmp_path / "result.json")
    mp.start_processes(worker, args=(2, free_port(), out), nprocs=2, join=True, start_method="spawn")
    result = json.loads(open(out).read())
    assert result["world"] == 2
    assert "RANK_DIVERGENCE" in result["codes"]
    (evidence,) = result["evidence"]
    assert evidence["pass"] == "X" and evidence["ranks"] == [1]
    assert evidence["parameters"] == ["b.bias", "b.weight"]


def test_gather_without_a_process_group_is_a_clear_error():
    model = nn.Linear(2, 2)
    with gradtrace.watch(model) as trace:
        pass
    with pytest.raises(gradtrace.GradtraceError, match="init_process_group"):
        trace.gather()
