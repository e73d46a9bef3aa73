"""gradtrace under DDP: every rank records, gather() merges, rank 0 prints the diagnosis.

    python -m torch.distributed.run --nproc_per_node=2 examples/ddp_probe.py [--out merged.json]

Runs on CPU (gloo) or, when every rank has a GPU, on CUDA (NCCL). Every rank
but rank 0 takes a data-dependent branch that skips head ``b``: DDP is built with
``find_unused_parameters=True`` (the branching is declared), so the merged
report shows RANK_DIVERGENCE as a warning naming ``b`` and rank 1 (the rank that
missed it; every rank above 0 with more processes), with per-rank coverage.
"""
import argparse
import datetime
import os

import torch
import torch.distributed as dist
from torch import nn

import gradtrace


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Linear(16, 16)
        self.a = nn.Linear(16, 1)
        self.b = nn.Linear(16, 1)

    def forward(self, x, use_b: bool):
        h = torch.tanh(self.trunk(x))
        return self.a(h) + (self.b(h) if use_b else 0)


def probe(device: torch.device, steps: int = 3):
    """Every rank: train ``steps`` steps under watch; the merged trace (every rank gets it)."""
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(TwoHeads().to(device), find_unused_parameters=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradtrace.watch(model) as trace:
        for step in range(steps):
            optimizer.zero_grad()
            with trace.pass_(f"step-{step}"):
                x = torch.randn(8, 16, device=device)
                model(x, use_b=(rank == 0)).pow(2).mean().backward()
            optimizer.step()
    return trace.gather(timeout=60)  # every rank calls it; every rank gets the merged trace


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", help="save the merged trace here (rank 0)")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=5))
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    try:
        merged = probe(device, args.steps)
        if dist.get_rank() == 0:
            print(merged.report())
            if args.out:
                merged.save(args.out)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
