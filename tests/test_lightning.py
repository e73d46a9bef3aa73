"""GradtraceCallback under a real lightning.Trainer on CPU, checked against the gradients Lightning steps with."""
import math

import pytest
import torch
from torch import nn

pl = pytest.importorskip("lightning.pytorch")

import gradtrace  # noqa: E402
from gradtrace.integrations.lightning import GradtraceCallback  # noqa: E402

pytestmark = pytest.mark.slow


class Regressor(pl.LightningModule):
    def __init__(self, detach_head_input=False):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.Tanh())
        self.head = nn.Linear(8, 1)
        self.detach_head_input = detach_head_input

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = self.body(x)
        if self.detach_head_input:
            h = h.detach()
        return (self.head(h).squeeze(-1) - y).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class GradOracle(pl.Callback):
    """What the optimizer is handed: the norm of every .grad, read in on_before_optimizer_step."""

    def __init__(self):
        self.norms = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad.double() for p in pl_module.parameters() if p.grad is not None]
        self.norms[trainer.global_step] = math.sqrt(sum(g.pow(2).sum().item() for g in grads))


def loader(n=16, batch=2):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    data = torch.utils.data.TensorDataset(x, x.sum(-1))
    return torch.utils.data.DataLoader(data, batch_size=batch)


def fit(model, callbacks, **options):
    settings = dict(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    settings.update(options)
    trainer = pl.Trainer(callbacks=callbacks, **settings)
    trainer.fit(model, loader())
    return trainer


@pytest.mark.parametrize("accumulate", [1, 2], ids=["no_accumulation", "accumulate_2"])
def test_one_pass_per_optimizer_step_matches_the_optimizers_gradients(accumulate):
    torch.manual_seed(0)
    callback, oracle = GradtraceCallback(), GradOracle()
    trainer = fit(Regressor(), [callback, oracle], accumulate_grad_batches=accumulate,
                  gradient_clip_val=1e-3)  # clipping must not change what is traced: it comes after
    assert sorted(oracle.norms) == [0, 1, 2]
    assert [list(t.passes) for t in callback.traces] == [["step-0"], ["step-1"], ["step-2"]]
    for step, trace in enumerate(callback.traces):
        p = trace.passes[f"step-{step}"]
        assert p.runs == accumulate  # every microbatch of the step in the one pass
        assert p.total_norm == pytest.approx(oracle.norms[step], rel=1e-6)
        assert oracle.norms[step] > 1e-3  # so the clipped norm would have differed
        assert [v for v in trace.verdicts() if v.severity == "error"] == []
    logged = trainer.callback_metrics
    assert float(logged["gradtrace/total_norm"]) == pytest.approx(oracle.norms[2], rel=1e-5)
    assert float(logged["gradtrace/coverage"]) == 1.0 and float(logged["gradtrace/errors"]) == 0.0
    assert float(logged["gradtrace/traced_step"]) == 2


def test_every_max_passes_and_save_dir(tmp_path):
    torch.manual_seed(0)
    callback, oracle = GradtraceCallback(every=2, max_passes=2, save_dir=str(tmp_path)), GradOracle()
    fit(Regressor(), [callback, oracle], max_steps=6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-0.json", "step-2.json", "step-4.json"]
    assert [list(t.passes) for t in callback.traces] == [["step-2"], ["step-4"]]  # the newest two
    loaded = gradtrace.load(tmp_path / "step-4.json")
    assert loaded.passes["step-4"].total_norm == pytest.approx(oracle.norms[4], rel=1e-6)
    assert callback.trace is callback.traces[-1]


def test_hooks_are_gone_between_traced_steps():
    """A step that is not traced runs with no gradtrace hook: a plain watch() may open on the model."""
    torch.manual_seed(0)
    model = Regressor()
    seen = []

    class Probe(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.global_step % 2:  # untraced step: gradtrace's watch must be closed by now
                with gradtrace.watch(pl_module):
                    seen.append(trainer.global_step)

    fit(model, [GradtraceCallback(every=2), Probe()], max_steps=4)
    assert seen == [1, 3]


def test_detached_head_input_is_diagnosed():
    torch.manual_seed(0)
    callback = GradtraceCallback()
    trainer = fit(Regressor(detach_head_input=True), [callback], max_steps=1)
    p = callback.trace.passes["step-0"]
    assert p.missing == {"body.0.weight", "body.0.bias"}
    assert float(trainer.callback_metrics["gradtrace/coverage"]) == pytest.approx(2 / 4)
    assert "body" in callback.trace.report()


def test_missing_lightning_says_what_to_install(monkeypatch):
    import importlib
    import sys
    for name in ("lightning.pytorch", "pytorch_lightning"):
        monkeypatch.setitem(sys.modules, name, None)  # as if neither package were installed
    monkeypatch.delitem(sys.modules, "gradtrace.integrations.lightning")
    with pytest.raises(gradtrace.GradtraceError, match=r'pip install "gradtrace\[lightning\]"'):
        importlib.import_module("gradtrace.integrations.lightning")


def test_bad_options():
    with pytest.raises(gradtrace.GradtraceError, match="every"):
        GradtraceCallback(every=0)
