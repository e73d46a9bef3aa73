"""trace.metrics() into TensorBoard and wandb (offline); TensorBoard's event file is read back."""
import os
import tempfile

import torch
from torch import nn

import gradtrace

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
logdir = tempfile.mkdtemp()

from torch.utils.tensorboard import SummaryWriter  # noqa: E402

writer = SummaryWriter(logdir)
os.environ["WANDB_MODE"] = "offline"  # no account, no network: the run is written under ./wandb
os.environ["WANDB_SILENT"] = "true"
import wandb  # noqa: E402

run = wandb.init(project="gradtrace-demo", dir=logdir)

with gradtrace.watch(model, max_passes=10) as trace:
    for step in range(3):
        opt.zero_grad()
        model(torch.randn(16, 8)).pow(2).mean().backward()  # unlabelled: passes backward-1, backward-2, ...
        metrics = trace.metrics(passes="last")  # gradtrace/coverage, gradtrace/total_norm, ... every step
        wandb.log(metrics, step=step)
        for key, value in metrics.items():
            writer.add_scalar(key, value, step)
        opt.step()
writer.close()
run.finish()

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

events = EventAccumulator(logdir)
events.Reload()
print("TensorBoard tags:", sorted(events.Tags()["scalars"]))
print("gradtrace/total_norm:", [(e.step, round(e.value, 4)) for e in events.Scalars("gradtrace/total_norm")])
print("last step's metrics:", {k: round(v, 4) for k, v in metrics.items()})
