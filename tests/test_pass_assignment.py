"""PassAssigner: one test per row of the table in its docstring (capture/passes.py).

Runs are described as the engine numbers them (graph-task ids in start order);
``FakeRun`` stands for an open run with its task id, nesting and pass.
"""
from dataclasses import dataclass

from gradtrace.capture import stats
from gradtrace.capture.assign import PassAssigner
from gradtrace.capture.passes import Pass, Watched


@dataclass
class FakeRun:
    task: int
    nested: bool
    pass_: Pass


class Events:
    """The event sink a live trace is: names labelled passes hold, and the passes that finished."""

    def __init__(self, taken=()):
        self.taken = set(taken)
        self.finished = []

    def name_taken(self, name):
        return name in self.taken

    def pass_finished(self, pass_):
        self.finished.append(pass_)


def assigner(taken=()):
    events = Events(taken)
    return PassAssigner(Watched([], [], False, stats.HOST, events)), events.finished


def label_(name, a):
    return Pass(a.watched, name)


def test_row1_nested_run_joins_its_open_outer_run():
    a, _ = assigner()
    outer = a.assign(10, nested=False, accumulates=True, open_runs=[])
    runs = [FakeRun(10, False, outer)]
    assert a.assign(11, nested=True, accumulates=True, open_runs=runs) is outer
    assert outer.runs == 1  # a nested run is not counted


def test_row2_consecutive_nested_runs_share_one_stand_in():
    a, _ = assigner()
    first = a.assign(11, nested=True, accumulates=True, open_runs=[])
    assert a.assign(12, nested=True, accumulates=True, open_runs=[]) is first
    assert first.runs == 1


def test_row2_a_gap_in_task_ids_is_another_outer_run():
    a, _ = assigner()
    first = a.assign(11, nested=True, accumulates=True, open_runs=[])
    second = a.assign(14, nested=True, accumulates=True, open_runs=[])
    assert second is not first


def test_row3_nested_run_under_a_label_counts_as_a_run_of_the_labelled_pass():
    a, _ = assigner()
    label = a.active = label_("X", a)
    assert a.assign(11, nested=True, accumulates=True, open_runs=[]) is label
    assert label.runs == 1 and a.standin.pass_ is label and a.orphan is None


def test_row4_nested_run_without_label_opens_an_orphan_automatic_pass():
    a, finished = assigner()
    state = a.assign(11, nested=True, accumulates=True, open_runs=[])
    assert state.auto and state.name == "backward-1" and state.runs == 1
    assert a.orphan is state and finished == []


def test_row5_the_outer_run_seen_after_its_nested_runs_claims_their_pass():
    a, finished = assigner()
    nested = a.assign(11, nested=True, accumulates=True, open_runs=[])
    assert a.assign(10, nested=False, accumulates=True, open_runs=[]) is nested
    assert nested.runs == 1 and a.orphan is None and finished == []  # owned by the outer run now
    assert a.standin.claimed


def test_row6_top_level_run_under_a_label_joins_it():
    a, _ = assigner()
    label = a.active = label_("X", a)
    assert a.assign(5, nested=False, accumulates=True, open_runs=[]) is label
    assert a.assign(6, nested=False, accumulates=False, open_runs=[]) is label
    assert label.runs == 2


def test_row7_unlabelled_top_level_runs_are_passes_of_their_own_and_finish_the_orphan():
    a, finished = assigner()
    orphan = a.assign(11, nested=True, accumulates=True, open_runs=[])
    first = a.assign(20, nested=False, accumulates=False, open_runs=[])
    assert finished == [orphan]  # a new automatic pass finishes the orphan
    second = a.assign(21, nested=False, accumulates=None, open_runs=[])
    assert (first.name, second.name) == ("grad-2", "run-3") and first is not second


def test_automatic_names_skip_names_a_labelled_pass_holds():
    a, _ = assigner(taken={"backward-1", "backward-2"})
    assert a.assign(1, nested=False, accumulates=True, open_runs=[]).name == "backward-3"


def test_a_labelled_pass_named_like_an_automatic_one_is_not_replaced_by_a_later_run():
    import torch
    import gradtrace

    model = torch.nn.Linear(2, 1)
    with gradtrace.watch(model) as trace:
        with trace.pass_("backward-1"):
            model(torch.ones(1, 2)).sum().backward()
            model(torch.ones(1, 2)).sum().backward()
        model(torch.ones(1, 2)).sum().backward()  # unlabelled: must get a name of its own
    assert list(trace.passes) == ["backward-1", "backward-2"]
    assert trace.passes["backward-1"].runs == 2 and not trace.passes["backward-1"].auto
    assert trace.passes["backward-2"].auto
