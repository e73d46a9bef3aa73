"""A watch left open over a long training loop: a readable report and bounded memory."""
import json
import time
import tracemalloc

import pytest
import torch
from torch import nn

import gradtrace


class Adapter(nn.Module):
    """Named like peft's LoRA: ...q_proj.lora_A.default.weight."""

    def __init__(self, d=4):
        super().__init__()
        self.base_layer = nn.Linear(d, d)
        self.base_layer.requires_grad_(False)
        self.lora_A = nn.ModuleDict({"default": nn.Linear(d, 2, bias=False)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(2, d, bias=False)})

    def forward(self, x):
        return self.base_layer(x) + self.lora_B["default"](self.lora_A["default"](x))


class PeftLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.base_model = nn.Module()
        self.base_model.model = nn.Module()
        self.base_model.model.layers = nn.ModuleList(nn.ModuleDict({"q_proj": Adapter()}) for _ in range(3))

    def forward(self, x):
        for layer in self.base_model.model.layers:
            x = torch.tanh(layer["q_proj"](x))
        return x.sum()


def train(model, steps, trace=None, label=False):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for step in range(steps):
        with torch.no_grad():
            model(torch.randn(2, 4))  # generation: a no_grad forward every step
        if label:
            with trace.pass_(f"step-{step}", step_start=True):
                model(torch.randn(2, 4)).backward()
        else:
            model(torch.randn(2, 4)).backward()
        opt.step()
        opt.zero_grad()


def test_300_unlabelled_steps_make_a_short_report_with_readable_names(tmp_path):
    """Regression: 300 GRPO steps gave a 382 KB, 3,928-line report, widest line 4,765 characters."""
    torch.manual_seed(0)
    model = PeftLike()
    with gradtrace.watch(model, max_passes=None) as trace:
        train(model, 300)
    report = trace.report()
    lines = report.splitlines()
    assert len(trace.passes) == 300
    assert len(lines) < 120 and max(map(len, lines)) < 260 and len(report) < 16_000, \
        (len(lines), max(map(len, lines)), len(report))
    assert "backward-1 .. backward-300 (300 passes)" in report
    assert report.startswith("gradtrace: no problems found")
    assert "lora_A.default" not in report and "base_model.model." not in report
    assert "layers.0.q_proj.lora_A.weight" in report
    trace.save(tmp_path / "t.json")
    saved = json.loads((tmp_path / "t.json").read_text())
    assert "base_model.model.layers.0.q_proj.lora_A.default.weight" in saved["params"]  # full names kept


def test_labelled_steps_keep_one_verdict_and_one_cut_row_per_finding():
    torch.manual_seed(0)
    model = PeftLike()
    with gradtrace.watch(model, max_passes=None) as trace:
        for step in range(40):
            with trace.pass_(f"step-{step}"):
                with torch.no_grad():
                    model(torch.randn(2, 4))
                model(torch.randn(2, 4)).backward()
                model.zero_grad(set_to_none=False)  # inside the pass: figures unknown, every step
    report = trace.report()
    flat = " ".join(report.split())  # messages wrap in the verdict table
    assert report.count("CLEARED_GRADS") == 1 and "the same in 40 passes: step-0 .. step-39" in flat
    assert len({c.pass_name for c in trace.cuts}) == 40 and "40 passes: step-0 .. step-39" in report
    assert len(report.splitlines()) < 80


def test_max_passes_bounds_cuts_and_tensor_links_and_the_trace_still_saves(tmp_path):
    """Regression: cuts were never dropped by max_passes (5,700 kept)."""
    torch.manual_seed(0)
    model = PeftLike()
    with gradtrace.watch(model, max_passes=10) as trace:
        for step in range(50):
            with trace.pass_(f"step-{step}"):
                with torch.no_grad():
                    hidden = model(torch.randn(2, 4))
                trace.tensor("reward", hidden.reshape(1))
                model(torch.randn(2, 4)).backward()
            model.zero_grad()
    assert list(trace.passes) == [f"step-{s}" for s in range(40, 50)]
    per_pass = sum(1 for c in trace.cuts if c.pass_name == "step-49")  # every module of the no_grad forward
    assert {c.pass_name for c in trace.cuts} == set(trace.passes) and len(trace.cuts) == 10 * per_pass
    assert set(trace.tensors["reward"].cuts) <= {c.seq for c in trace.cuts}
    trace.save(tmp_path / "t.json")
    assert gradtrace.load(tmp_path / "t.json").report() == trace.report()


def test_the_default_watch_keeps_a_bounded_number_of_passes():
    model = nn.Linear(2, 1)
    with gradtrace.watch(model) as trace:
        for _ in range(300):
            model(torch.ones(1, 2)).sum().backward()
    assert len(trace.passes) == 256 and trace.meta["dropped_passes"] == 44
    assert "44 older passes were dropped" in trace.report()


@pytest.mark.slow
@pytest.mark.parametrize("bounded", [True, False], ids=["default_max_passes", "max_passes_None"])
def test_memory_and_step_time_stay_flat_over_10000_steps(bounded):
    """Bounded cost: per-step time does not grow with the number of steps, nor memory under the default bound."""
    torch.manual_seed(0)
    model = PeftLike()
    times, memory = [], {}
    tracemalloc.start()
    options = {} if bounded else {"max_passes": None}
    try:
        with gradtrace.watch(model, **options) as trace:
            opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
            x = torch.randn(2, 4)
            for step in range(10_000):
                start = time.thread_time()
                with trace.pass_(f"step-{step}"):
                    model(x).backward()
                opt.step()
                opt.zero_grad()
                times.append(time.thread_time() - start)
                if step + 1 in (1_000, 10_000):
                    _ = trace.passes  # read, as a logger would
                    memory[step + 1] = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    early, late = sorted(times[100:1100]), sorted(times[-1000:])
    # 20th percentiles (a shared machine's load spikes move medians): flat, with a generous bound
    assert late[len(late) // 5] < 1.5 * early[len(early) // 5] + 1e-4, (early[len(early) // 5], late[len(late) // 5])
    if bounded:
        assert memory[10_000] - memory[1_000] < 2_000_000, memory  # bytes: bounded by max_passes, not by steps


def test_reading_passes_every_step_does_not_scan_every_kept_pass():
    """``trace.passes`` was rebuilt from every kept pass on each read: reading it every step of a
    long loop (where each step also reserves, finishes and drops a pass) cost O(passes) per step.
    The finished view is now kept change by change; order and content stay the table's."""
    from gradtrace.trace import PassTable

    table = PassTable()
    for i in range(300):
        table[f"p{i}"] = object()
    table["open"] = None
    first = table.finished()
    assert list(first) == [f"p{i}" for i in range(300)]
    kept = table._finished
    for step in range(5):  # a training loop's step: reserve, finish, drop the oldest, read
        table[f"q{step}"] = None
        table[f"q{step}"] = object()
        table.pop(f"p{step}")
        assert table._finished is kept  # updated in place, never rebuilt
        assert list(table.finished())[-1] == f"q{step}" and f"p{step}" not in table.finished()
    first.pop("p10")  # the caller's copy is theirs to change
    assert "p10" in table.finished()
    table["open"] = "done"  # reserved before q0..q4, finished after them: order is reservation order
    assert table._finished is None
    names = list(table.finished())
    assert names.index("open") < names.index("q0")
    assert names == [n for n, v in table.items() if v is not None]
