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


class Unzeroed(Regressor):
    """Never zeroes the gradients: every step adds to the last one's."""

    def optimizer_zero_grad(self, epoch, batch_idx, optimizer):
        pass


class FailsAtStep2(Regressor):
    def training_step(self, batch, batch_idx):
        if self.trainer.global_step == 1:
            raise ValueError("bad batch")
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize("accumulate", [1, 2], ids=["no_accumulation", "accumulate_2"])
def test_one_pass_per_optimizer_step_matches_the_optimizers_gradients(accumulate):
    torch.manual_seed(0)
    callback, oracle = GradtraceCallback(), GradOracle()
    trainer = fit(Regressor(), [callback, oracle], accumulate_grad_batches=accumulate,
                  gradient_clip_val=1e-3)  # clipping must not change what is traced: it comes after
    assert sorted(oracle.norms) == [0, 1, 2]
    trace = callback.trace  # one watch for the whole run: one pass per optimizer step
    assert list(trace.passes) == ["step-1", "step-2", "step-3"]
    for global_step, norm in oracle.norms.items():
        p = trace.passes[f"step-{global_step + 1}"]  # step-<n>: n counts optimizer steps from 1
        assert p.runs == accumulate  # every microbatch of the step in the one pass
        assert p.total_norm == pytest.approx(norm, rel=1e-6)
        assert norm > 1e-3  # so the clipped norm would have differed
    assert [v for v in trace.verdicts() if v.severity in ("error", "warning")] == []
    assert callback.printed == []
    logged = trainer.callback_metrics
    assert float(logged["gradtrace/total_norm"]) == pytest.approx(oracle.norms[2], rel=1e-5)
    assert float(logged["gradtrace/coverage"]) == 1.0 and float(logged["gradtrace/errors"]) == 0.0
    assert float(logged["gradtrace/traced_step"]) == 3


def test_every_max_passes_save_dir_and_save_every(tmp_path):
    torch.manual_seed(0)
    callback, oracle = GradtraceCallback(every=2, max_passes=2, save_dir=str(tmp_path), save_every=2), GradOracle()
    trainer = fit(Regressor(), [callback, oracle], max_steps=6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gradtrace.json", "step-2.json", "step-4.json",
                                                            "step-6.json"]
    assert list(callback.trace.passes) == ["step-5", "step-6"]  # the newest two of one trace
    assert callback.trace.meta["dropped_passes"] == 4
    loaded = gradtrace.load(tmp_path / "step-4.json")
    assert loaded.passes["step-4"].total_norm == pytest.approx(oracle.norms[3], rel=1e-6)
    assert list(gradtrace.load(tmp_path / "gradtrace.json").passes) == ["step-5", "step-6"]
    assert float(trainer.callback_metrics["gradtrace/traced_step"]) == 6  # judged: 1, 2, 4, 6


def test_cross_step_verdicts_work_in_lightning_too():
    """One trace per run: stale gradients (never zeroed) are seen at the next step's start."""
    torch.manual_seed(0)
    callback = GradtraceCallback()
    fit(Unzeroed(), [callback], max_steps=2)
    stale = [v for v in callback.trace.verdicts() if v.code == "STALE_GRADS"]
    assert stale and stale[0].evidence["pass"] == "step-2"
    assert callback.printed[0].startswith("gradtrace step 2: STALE_GRADS: ")


def test_a_failed_step_is_pass_failed_and_the_hooks_go():
    torch.manual_seed(0)
    model, callback = FailsAtStep2(), GradtraceCallback()
    with pytest.raises(ValueError, match="bad batch"):
        fit(model, [callback], max_steps=3)
    assert callback.trace.passes["step-2"].failed == "ValueError: bad batch"
    assert callback.printed[0].startswith("gradtrace step 2: PASS_FAILED: ")
    with gradtrace.watch(model):  # refused while another watch holds these parameters: the hooks are gone
        pass


def test_detached_head_input_is_diagnosed():
    torch.manual_seed(0)
    callback = GradtraceCallback()
    trainer = fit(Regressor(detach_head_input=True), [callback], max_steps=1)
    p = callback.trace.passes["step-1"]
    assert p.missing == {"body.0.weight", "body.0.bias"}
    assert float(trainer.callback_metrics["gradtrace/coverage"]) == pytest.approx(2 / 4)
    assert "body" in callback.trace.report()
    assert callback.printed and "body" in callback.printed[0]


def test_missing_lightning_says_what_to_install(monkeypatch):
    import importlib
    import sys
    for name in ("lightning.pytorch", "pytorch_lightning"):
        monkeypatch.setitem(sys.modules, name, None)  # as if neither package were installed
    monkeypatch.delitem(sys.modules, "gradtrace.integrations.lightning")
    with pytest.raises(gradtrace.GradtraceError, match=r'pip install "gradtrace\[lightning\]"'):
        importlib.import_module("gradtrace.integrations.lightning")


@pytest.mark.parametrize("options, says", [
    (dict(every=0), "every=...) is a positive int"),
    (dict(max_passes=0), "max_passes=...) is a positive int"),
    (dict(max_passes="10"), "max_passes=...) is a positive int"),
    (dict(cuts="bogus"), "cuts='bogus') is one of"),
    (dict(prefix=None), "prefix=...) is a string"),
    (dict(log="yes"), "log=...) is True or False"),
])
def test_bad_options_are_refused_at_construction(options, says):
    import re
    with pytest.raises(gradtrace.GradtraceError, match=re.escape(says)):
        GradtraceCallback(**options)
