"""A plain training loop under one gradtrace.watch: a pass per step, metrics per step, a plot at the end."""
import torch
from torch import nn

import gradtrace

torch.manual_seed(0)


class Net(nn.Module):
    def __init__(self, depth=12, width=16):
        super().__init__()
        self.embed = nn.Linear(8, width)
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.head = nn.Linear(width, 1)
        self.aux_head = nn.Linear(width, 1)  # registered, trainable, never used: gets nothing

    def forward(self, x, step):
        h = torch.tanh(self.embed(x))
        for i, block in enumerate(self.blocks):
            h = h + torch.tanh(block(h))
            if step >= 3 and i == 5:
                h = h.detach()  # the bug, from step 3 on: blocks 0-5 and embed stop learning
        return self.head(h)


model = Net()
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
x, y = torch.randn(32, 8), torch.randn(32, 1)

with gradtrace.watch(model, max_passes=50) as trace:  # keep the newest 50 steps
    for step in range(5):
        opt.zero_grad()
        with trace.pass_(f"step-{step}"):
            for xb, yb in zip(x.split(16), y.split(16), strict=False):  # two microbatches, one pass
                (model(xb, step) - yb).pow(2).mean().backward()
        m = trace.metrics(passes="last")  # the same keys every step: log them anywhere
        print(f"step {step}: coverage {m['gradtrace/coverage']:.3f}  total norm {m['gradtrace/total_norm']:.3e}"
              f"  errors {m['gradtrace/errors']:.0f}")
        opt.step()

print()
print(trace.report().split("\n\n")[0])  # the diagnosis line
trace.plot("docs/images/flow.png", kind="flow", passes=["step-2", "step-3"])
trace.plot("docs/images/coverage.png", kind="coverage")
trace.save("plain_loop.json")
