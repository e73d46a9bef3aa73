"""GradtraceCallback under lightning.Trainer: gradient accumulation, metrics in the logger, JSON traces on disk."""
import lightning.pytorch as pl
import torch
from torch import nn

from gradtrace.integrations.lightning import GradtraceCallback


class Regressor(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh())
        self.head = nn.Linear(16, 1)
        self.aux = nn.Linear(16, 1)  # never used in training_step: gradtrace reports it

    def training_step(self, batch, batch_idx):
        x, y = batch
        return (self.head(self.body(x)).squeeze(-1) - y).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


torch.manual_seed(0)
x = torch.randn(64, 4)
data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(-1)), batch_size=8)
gradtrace_cb = GradtraceCallback(every=2, save_dir="gradtraces", save_every=2)
trainer = pl.Trainer(max_steps=4, accumulate_grad_batches=2, gradient_clip_val=1.0, callbacks=[gradtrace_cb],
                     logger=pl.loggers.CSVLogger("logs"), enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=1)
trainer.fit(Regressor(), data)

print({k: round(float(v), 4) for k, v in trainer.logged_metrics.items()})
p = gradtrace_cb.trace.passes["step-2"]
print(f"step-2: {p.runs} backward runs in one pass, {len(p.covered)}/{len(p.params)} covered, "
      f"missing {sorted(p.missing)}")
