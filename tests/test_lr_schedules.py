"""Learning-rate schedules judged step by step: one that kills the updates part-way is named on the first line;
schedules used as meant (a warmup from lr 0, a cosine or linear decay to a small lr, StepLR per epoch,
OneCycleLR) stay clean. Oracles: the optimizer's own lr per step and the weights before and after each step.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradtrace
from gradtrace.records import OptimizerRecord

transformers = pytest.importorskip("transformers")


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def run(make_scheduler, steps, opt_cls=torch.optim.AdamW, lr=1e-3, per_batch=True, epochs=1, **watch):
    net = model()
    opt = opt_cls(net.parameters(), lr=lr)
    scheduler = make_scheduler(opt)
    lrs, moved = [], []
    with gradtrace.watch(net, **watch) as trace:
        for _ in range(epochs):
            for _ in range(steps):
                x, y = torch.randn(6, 8), torch.randint(0, 4, (6,))
                opt.zero_grad()
                F.cross_entropy(net(x), y).backward()
                before = [p.detach().clone() for p in net.parameters()]
                lrs.append(opt.param_groups[0]["lr"])
                opt.step()
                moved.append(any(not torch.equal(b, p) for b, p in zip(before, net.parameters(), strict=True)))
                if per_batch:
                    scheduler.step()
            if not per_batch:
                scheduler.step()
    return trace, lrs, moved


def serious(trace):
    return [v for v in trace.verdicts() if v.severity in ("error", "warning")]


def test_a_schedule_given_too_few_steps_is_named_from_the_step_its_lr_reached_zero():
    trace, lrs, moved = run(lambda o: transformers.get_linear_schedule_with_warmup(o, 0, num_training_steps=1), 8)
    assert lrs[0] > 0 and lrs[1:] == [0.0] * 7 and moved == [True] + [False] * 7  # the oracle
    first = trace.verdicts()[0]
    assert first.code == "WEIGHTS_UNCHANGED" and first.evidence["from_step"] == 2
    assert first.message.startswith("optimizer AdamW#0: from step 2 on (7 of 8 steps), its lr is 0.0")
    assert "num_training_steps" in first.message
    history = trace.optimizers["AdamW#0"].history
    assert [row[1] for row in history] == lrs and [row[4] == row[3] > 0 for row in history] == [not m for m in moved]


def test_without_update_sampling_an_lr_of_zero_still_says_so():
    trace, _, _ = run(lambda o: transformers.get_linear_schedule_with_warmup(o, 0, num_training_steps=1), 6,
                      updates=False)
    first = trace.verdicts()[0]
    assert first.code == "WEIGHTS_UNCHANGED" and "from step 2 on (5 of 6 steps)" in first.message
    assert "no step can change a weight" in first.message


def test_steplr_stepped_per_batch_is_named_with_its_lr_and_the_drop():
    trace, lrs, _ = run(lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.1), 8,
                        opt_cls=torch.optim.SGD, lr=1e-2)
    assert lrs[-1] == pytest.approx(1e-9)
    first = trace.verdicts()[0]
    assert first.code == "TINY_UPDATES" and first.evidence["from_step"] == 5
    assert first.message.startswith("optimizer SGD#0: from step 5 on (4 of 8 steps) its lr fell to 1.0e-09")
    assert "stepped once per batch" in first.message


@pytest.mark.parametrize("make, steps, opt_cls, lr, per_batch, epochs", [
    (lambda o: transformers.get_linear_schedule_with_warmup(o, 2, num_training_steps=10), 10, torch.optim.AdamW,
     1e-3, True, 1),
    (lambda o: transformers.get_cosine_schedule_with_warmup(o, 3, num_training_steps=16), 16, torch.optim.AdamW,
     1e-3, True, 1),
    (lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=24), 24, torch.optim.AdamW, 1e-3, True, 1),
    (lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=1e-2, total_steps=30), 30, torch.optim.SGD, 1e-2,
     True, 1),
    (lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.1), 4, torch.optim.SGD, 1e-2, False, 3),
    (lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda step: 1.0), 3, torch.optim.AdamW, 1e-3, True, 1),
], ids=["linear-warmup-from-0", "cosine-warmup", "cosine-annealing", "one-cycle", "steplr-per-epoch", "constant"])
def test_schedules_used_as_meant_stay_clean(make, steps, opt_cls, lr, per_batch, epochs):
    trace, lrs, _ = run(make, steps, opt_cls=opt_cls, lr=lr, per_batch=per_batch, epochs=epochs)
    assert serious(trace) == [], [str(v) for v in serious(trace)]


def test_the_history_keeps_the_first_and_the_newest_steps():
    head, tail = OptimizerRecord.HISTORY_HEAD, OptimizerRecord.HISTORY_TAIL
    net = nn.Linear(2, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    steps = head + tail + 50
    with gradtrace.watch(net, max_passes=4) as trace:
        for _ in range(steps):
            opt.zero_grad()
            net(torch.randn(3, 2)).sum().backward()
            opt.step()
    history = trace.optimizers["SGD#0"].history
    numbers = [int(row[0]) for row in history]
    assert numbers == list(range(1, head + 1)) + list(range(steps - tail + 1, steps + 1))


def test_a_decay_judged_from_a_saved_trace(tmp_path):
    trace, _, _ = run(lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.1), 8,
                      opt_cls=torch.optim.SGD, lr=1e-2)
    trace.save(tmp_path / "t.json")
    loaded = gradtrace.load(tmp_path / "t.json")
    assert loaded.optimizers["SGD#0"].history == trace.optimizers["SGD#0"].history
    assert loaded.verdicts()[0].message == trace.verdicts()[0].message
