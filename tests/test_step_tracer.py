"""The step tracer both trainer callbacks share (gradtrace/integrations/steps.py), driven by a plain loop.

No trainer here: what a step is, when it is judged, what is printed once, which
files are written and what a failed step leaves behind. The adapters' tests
(test_trainer_integration.py, test_lightning.py, test_grpo.py) run the real clients.
"""
from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import gradtrace
from gradtrace.integrations.steps import StepOptions, StepTracer, World, identity
from gradtrace.records import Verdict


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(3, 4)
        self.head = nn.Linear(4, 1)
        self.unused = nn.Linear(4, 1)

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)))


def loop(tracer: StepTracer, model: nn.Module, steps: int, accumulate: int = 1, zero: bool = True,
         fail_at=None):
    torch.manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracer.start(model)
    for step in range(1, steps + 1):
        tracer.begin_step(step)
        try:
            for _ in range(accumulate):
                if step == fail_at:
                    raise ValueError("bad batch")
                model(torch.randn(5, 3)).pow(2).mean().backward()
        except ValueError as e:
            tracer.fail_step(e)
            break
        opt.step()
        if zero:
            opt.zero_grad()
        tracer.end_step()
    tracer.stop()


@pytest.mark.parametrize("options, says", [
    (dict(every=0), "every=...) is a positive int"),
    (dict(every=True), "every=...) is a positive int"),
    (dict(max_passes=0), "max_passes=...) is a positive int or None"),
    (dict(max_passes="10"), "max_passes=...) is a positive int or None"),
    (dict(save_every=0, save_dir="x"), "save_every=...) is a positive int"),
    (dict(save_every=2), "give save_dir too"),
    (dict(save_dir=3), "save_dir=...) is a folder path"),
    (dict(cuts="bogus"), "cuts='bogus') is one of modules, ops, off"),
    (dict(register=1), "register=...) is a function"),
    (dict(print_errors=None), "print_errors=...) is True or False"),
    (dict(gather="no"), "gather=...) is True or False"),
    (dict(prefix=None), "prefix=...) is a string"),
])
def test_options_are_checked_at_construction(options, says):
    with pytest.raises(gradtrace.GradtraceError, match=re.escape(says)):
        StepOptions(**options)


def test_one_watch_one_pass_per_step_and_cross_step_verdicts(capsys):
    tracer = StepTracer(StepOptions())
    model = TwoHeads()
    loop(tracer, model, steps=3, accumulate=2)
    trace = tracer.trace
    assert list(trace.passes) == ["step-1", "step-2", "step-3"]
    assert [p.runs for p in trace.passes.values()] == [2, 2, 2]
    unused = [v for v in trace.verdicts() if v.code == "UNUSED_PARAMS"]
    assert unused and set(unused[0].evidence["parameters"]) == {"unused.weight", "unused.bias"}
    # printed once, at step 1, although every step repeats it
    assert tracer.printed == [line for line in capsys.readouterr().out.splitlines()]
    assert [line for line in tracer.printed if "UNUSED_PARAMS" in line] == [tracer.printed[0]]
    assert tracer.printed[0].startswith("gradtrace step 1: UNUSED_PARAMS: ")
    assert tracer.metrics["gradtrace/traced_step"] == 3.0 and tracer.metrics["gradtrace/warnings"] == 1.0
    with gradtrace.watch(model):  # the run's watch is closed: nothing stays registered
        pass


def test_figures_survive_zero_grad_before_the_step_ends():
    tracer = StepTracer(StepOptions())
    model = TwoHeads()
    loop(tracer, model, steps=1)  # zero_grad() ran before end_step(): read at the end of each run
    p = tracer.trace.passes["step-1"]
    assert p.total_norm > 0 and not p.cleared


def test_every_judges_some_steps_but_records_all():
    tracer = StepTracer(StepOptions(every=2, print_errors=False))
    judged = []
    tracer.on_step_closed.append(lambda name: judged.append((name, tracer.metrics.get("gradtrace/traced_step"))))
    loop(tracer, TwoHeads(), steps=5)
    assert list(tracer.trace.passes) == [f"step-{n}" for n in range(1, 6)]
    assert tracer.metrics["gradtrace/traced_step"] == 4.0  # steps 1, 2, 4 judged; 3 and 5 recorded only
    assert [tracer.judged(n) for n in range(1, 6)] == [True, True, False, True, False]


def test_stale_gradients_are_judged_at_the_next_steps_start(capsys):
    tracer = StepTracer(StepOptions())
    loop(tracer, TwoHeads(), steps=2, zero=False)
    assert tracer.printed[0].startswith("gradtrace step 1: UNUSED_PARAMS")
    assert any(line.startswith("gradtrace step 2: STALE_GRADS: pass 'step-2'") for line in tracer.printed)


def test_a_failed_step_is_pass_failed_printed_and_the_run_still_closes():
    tracer = StepTracer(StepOptions())
    model = TwoHeads()
    loop(tracer, model, steps=3, fail_at=2)
    assert tracer.trace.passes["step-2"].failed == "ValueError: bad batch"
    step_2 = [line for line in tracer.printed if line.startswith("gradtrace step 2: ")]
    assert step_2[0].startswith("gradtrace step 2: PASS_FAILED: pass 'step-2' ended with an exception (ValueError")
    with gradtrace.watch(model):
        pass


def test_files_per_step_and_at_the_end(tmp_path):
    tracer = StepTracer(StepOptions(save_dir=str(tmp_path), save_every=2))
    loop(tracer, TwoHeads(), steps=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gradtrace.json", "step-2.json", "step-4.json"]
    assert list(gradtrace.load(tmp_path / "step-2.json").passes) == ["step-1", "step-2"]


def test_rank_prefix_and_file_names_under_a_world():
    assert World(0, 1).prefix == "" and World(0, 1).file_name("gradtrace") == "gradtrace.json"
    assert World(3, 4).prefix == "[rank 3] " and World(3, 4).file_name("step-7") == "step-7.rank3.json"


def test_identity_ignores_counts_and_pass_names():
    a = Verdict("CONSTANT_ROWS", "warning", "x: 2 of 4", {"tensor": "A", "fraction": 0.5, "pass": "step-1"})
    b = Verdict("CONSTANT_ROWS", "warning", "x: 3 of 4", {"tensor": "A", "fraction": 0.75, "pass": "step-2"})
    c = Verdict("CONSTANT_ROWS", "warning", "x: 3 of 4", {"tensor": "B", "fraction": 0.75})
    d = Verdict("ZERO_GRADS", "error", "y", {"pass": "step-3", "parameters": ["b", "a"]})
    e = Verdict("ZERO_GRADS", "error", "y", {"pass": "step-4", "parameters": ["a", "b"]})
    assert identity(a) == identity(b) != identity(c)
    assert identity(d) == identity(e)
    worse = Verdict("CONSTANT_ROWS", "error", "x: 4 of 4", {"tensor": "A", "fraction": 1.0})
    assert identity(worse) != identity(a)  # a warning that became an error is news


def test_printed_names_are_escaped(capsys):
    tracer = StepTracer(StepOptions())
    model = nn.Sequential()
    model.add_module("used", nn.Linear(2, 1))
    model.add_module("evil\x1b[2J", nn.Linear(2, 1))  # never used: UNUSED_PARAMS names it
    tracer.start(model)
    tracer.begin_step(1)
    model[0](torch.randn(3, 2)).sum().backward()
    tracer.end_step()
    tracer.stop()
    out = capsys.readouterr().out
    assert "UNUSED_PARAMS" in out and "\x1b" not in out and "evil\\x1b[2J" in out


def test_an_unwatchable_model_is_said_and_training_goes_on():
    tracer = StepTracer(StepOptions())
    frozen = nn.Linear(2, 1).requires_grad_(False)
    tracer.start(frozen)
    assert tracer.trace is None and not tracer.running
    tracer.begin_step(1)  # nothing to do, nothing raised
    assert tracer.end_step() is None
    assert tracer.printed[0].startswith("gradtrace: not tracing this run: ") and "no trainable parameter" in \
        tracer.printed[0]


@pytest.mark.slow
def test_the_step_tracer_benchmark_measures_every_variant(capsys):
    """benchmarks/step_tracer.py (what an unjudged step costs): every variant timed, finite positive figures."""
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from benchmarks import step_tracer
    step_tracer.main(["--rounds", "2", "--warmup", "0", "--workloads", "lora"])
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()
            if line.split() and line.split()[0] in step_tracer.VARIANTS}
    assert set(rows) == set(step_tracer.VARIANTS)
    for figures in rows.values():
        assert len(figures) == 4 and all(float(f) > 0 for f in figures)
    assert rows["baseline"][2:] == ["1.000", "1.000"]


def test_a_tensor_it_cannot_record_is_said_once_and_skipped():
    tracer = StepTracer(StepOptions())
    tracer.start(TwoHeads())
    tracer.begin_step(1)
    tracer.observe("mask", "not a tensor")
    tracer.observe("mask", "not a tensor")
    tracer.observe("ok", torch.ones(2, 3), expect_grad=False, role="mask")
    tracer.end_step()
    tracer.stop()
    said = [line for line in tracer.printed if "not recording" in line]
    assert said == ["gradtrace: not recording tensor 'mask': trace.tensor('mask', ...) takes a torch.Tensor, got str"]
    assert "ok" in tracer.trace.tensors and "mask" not in tracer.trace.tensors


def test_a_save_that_fails_is_said_and_training_goes_on(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    tracer = StepTracer(StepOptions(save_dir=str(blocker), save_every=1))
    loop(tracer, TwoHeads(), steps=2)
    said = [line for line in tracer.printed if line.startswith("gradtrace: could not save ")]
    assert len(said) == 3 and str(blocker / "step-1.json") in said[0]  # two steps, then the run's trace
    assert list(tracer.trace.passes) == ["step-1", "step-2"]
