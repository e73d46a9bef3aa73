"""Each pinned verdict code on a small scenario that really produces the fault, and the ranking."""
import os

import pytest
import torch
from torch import nn

import gradtrace

from cut_helpers import codes

HERE = os.path.basename(__file__)


class Policy(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.Tanh())
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.body(x))


def first(trace, code):
    return next(v for v in trace.verdicts() if v.code == code)


@pytest.fixture
def policy():
    torch.manual_seed(0)
    return Policy()


def x_pass(trace, model, n=2):
    with trace.pass_("X"):
        for _ in range(n):
            model(torch.randn(5, 4)).logsumexp(-1).mean().backward()


def test_healthy_probe_has_no_error(policy):
    with gradtrace.watch(policy) as trace:
        policy.zero_grad()
        x_pass(trace, policy)
        with trace.pass_("Y"):
            S = trace.tensor("S", policy(torch.randn(6, 4)).log_softmax(-1)[:, 0])
            A = trace.tensor("A", torch.randn(2, 3))
            torch.autograd.grad((S * A.flatten()).sum(), list(policy.parameters()), allow_unused=True)
        trace.scalar("deltaH1", 0.0123)
    assert [v for v in trace.verdicts() if v.severity == "error"] == []
    assert trace.report().startswith("gradtrace: no problems found.")


def test_no_grad_subnetwork_is_a_graph_cut_before_the_gap(policy):
    with gradtrace.watch(policy) as trace:
        x_pass(trace, policy)
        with trace.pass_("Y"):
            with torch.no_grad():
                h = policy.body(torch.randn(5, 4))
            S = trace.tensor("S", policy.head(h).sum(-1))
            torch.autograd.grad(S.sum(), list(policy.parameters()), allow_unused=True)
    found = codes(trace)
    assert found[0] == "GRAPH_CUT"
    assert found.index("GRAPH_CUT") < found.index("COVERAGE_GAP")
    cut = first(trace, "GRAPH_CUT").evidence
    assert cut["kind"] == "no_grad" and cut["module"] == "body"
    assert HERE in cut["location"]
    assert set(cut["lost"]) == {"body.0.weight", "body.0.bias"}
    assert trace.passes["Y"].missing == {"body.0.weight", "body.0.bias"}


def test_tensor_built_under_no_grad(policy):
    with gradtrace.watch(policy) as trace:
        with trace.pass_("Y"):
            with torch.no_grad():
                S = trace.tensor("S", policy(torch.randn(5, 4)).sum(-1))
    v = trace.verdicts()[0]
    assert v.code == "TENSOR_NO_GRAD" and v.evidence["tensor"] == "S"
    assert v.evidence["kind"] == "no_grad" and v.evidence["module"] == ""
    assert HERE in v.evidence["location"]
    assert not S.requires_grad


def test_inference_mode_tensor(policy):
    with gradtrace.watch(policy) as trace:
        with torch.inference_mode():
            out = policy(torch.randn(5, 4))
        trace.tensor("S", out.sum(-1))
    v = trace.verdicts()[0]
    assert v.code == "TENSOR_NO_GRAD" and v.evidence["kind"] == "inference_mode"
    assert "torch.inference_mode()" in v.message


def test_data_tensors_that_do_not_require_grad_are_not_errors(policy):
    with gradtrace.watch(policy) as trace:
        trace.tensor("mask", torch.ones(2, 5, dtype=torch.bool))
        trace.tensor("rewards", torch.randn(4, 3))
    assert codes(trace) == []
    mask, rewards = trace.tensors["mask"], trace.tensors["rewards"]  # recorded as data, with their facts
    assert (mask.requires_grad, mask.shape, mask.dtype) == (False, [2, 5], "bool")
    assert (rewards.requires_grad, rewards.shape, rewards.grad_fn) == (False, [4, 3], None)


def test_expect_grad_makes_a_plain_tensor_an_error(policy):
    with gradtrace.watch(policy) as trace:
        trace.tensor("S", torch.randn(3), expect_grad=True)
    assert codes(trace) == ["TENSOR_NO_GRAD"]


def test_no_coverage_when_only_an_input_carries_grad(policy):
    x = torch.randn(5, 4, requires_grad=True)
    with gradtrace.watch(policy) as trace:
        with trace.pass_("Y"):
            with torch.no_grad():
                h = policy(torch.randn(5, 4))
            S = trace.tensor("S", (h * x[:, :3]).sum(-1))
            torch.autograd.grad(S.sum(), [x])
    found = codes(trace)
    assert "NO_COVERAGE" in found and found[0] == "GRAPH_CUT"
    assert first(trace, "NO_COVERAGE").evidence["pass"] == "Y"
    assert trace.passes["Y"].runs == 1 and trace.passes["Y"].covered == set()


def test_tensor_not_reached(policy):
    with gradtrace.watch(policy) as trace:
        with trace.pass_("Y"):
            trace.tensor("S", policy(torch.randn(5, 4)).sum(-1))
            policy(torch.randn(5, 4)).sum().backward()
    v = first(trace, "TENSOR_NOT_REACHED")
    assert v.evidence == {"tensor": "S", "passes": ["Y"], "upstream": sorted(n for n, _ in policy.named_parameters())}


def test_zero_variance_advantages_lead_before_zero_upstream(policy):
    rewards = torch.tensor([[1.0, 1.0, 1.0], [0.5, 0.5, 0.5]])
    advantages = (rewards - rewards.mean(-1, keepdim=True)) / (rewards.std(-1, keepdim=True) + 1e-6)
    with gradtrace.watch(policy) as trace:
        with trace.pass_("Y"):
            trace.tensor("rewards", rewards)
            A = trace.tensor("A", advantages)
            S = trace.tensor("S", policy(torch.randn(6, 4)).log_softmax(-1)[:, 0])
            torch.autograd.grad((S * A.flatten()).sum(), list(policy.parameters()))
    found = codes(trace)
    assert found[0] == "CONSTANT_ROWS"
    assert first(trace, "CONSTANT_ROWS").evidence["fraction"] == 1.0
    assert found.index("CONSTANT_ROWS") < found.index("ZERO_UPSTREAM") < found.index("ZERO_GRADS")
    assert first(trace, "ZERO_GRADS").severity == "error"


def test_partial_constant_rows_is_a_warning():
    with gradtrace.watch(nn.Linear(2, 2)) as trace:
        trace.tensor("A", torch.tensor([[1.0, 1.0], [1.0, 2.0], [0.0, 3.0]]))
    v = first(trace, "CONSTANT_ROWS")
    assert v.severity == "info" and abs(v.evidence["fraction"] - 1 / 3) < 1e-9


def test_empty_mask(policy):
    with gradtrace.watch(policy) as trace:
        trace.tensor("gen_mask", torch.zeros(2, 6, dtype=torch.bool))
        trace.tensor("empty", torch.zeros(0))
    found = trace.verdicts()
    # the bool mask's rows say the same from the row side: every one of its 2 rows is empty
    assert [v.code for v in found] == ["ALL_ZERO_VALUES", "ALL_ZERO_VALUES", "EMPTY_ROWS"]
    assert "selects nothing" in found[0].message and "empty" in found[1].message
    assert found[2].evidence["tensor"] == "gen_mask" and found[2].evidence["empty_rows"] == 2


def test_tiny_grads_and_rounds_to_zero(policy):
    with gradtrace.watch(policy) as trace:
        with trace.pass_("X"):
            (policy(torch.randn(5, 4)).sum() * 1e-12).backward()
        trace.scalar("deltaH1", -3e-9)
    found = codes(trace)
    assert found == ["ROUNDS_TO_ZERO", "TINY_GRADS"]
    assert trace.scalars["deltaH1"].prints_as_zero
    assert first(trace, "TINY_GRADS").evidence["max_abs"] < 5e-7


def test_nonfinite_names_the_first_parameter_in_backward_order(policy):
    with gradtrace.watch(policy) as trace:
        with trace.pass_("X"):
            out = policy(torch.randn(5, 4))
            (out.sum() * torch.tensor(float("nan"))).backward()
    v = trace.verdicts()[0]
    assert v.code == "NONFINITE" and v.evidence["pass"] == "X"
    assert v.evidence["parameter"] in ("head.bias", "head.weight")  # the last layer is reached first


def test_stale_grads_at_a_pass_that_starts_an_optimizer_step(policy):
    with gradtrace.watch(policy) as trace:
        x_pass(trace, policy, n=1)
        with trace.pass_("X2", step_start=True):  # no zero_grad in between
            policy(torch.randn(5, 4)).sum().backward()
    v = trace.verdicts()[0]
    assert v.code == "STALE_GRADS" and v.evidence["pass"] == "X2"
    assert set(v.evidence["parameters"]) == {n for n, _ in policy.named_parameters()}


def test_accumulation_across_unmarked_passes_is_not_stale(policy):
    """Regression: gradient accumulation, one pass per microbatch, gave STALE_GRADS and 'call zero_grad()'."""
    with gradtrace.watch(policy) as trace:
        for micro in range(3):
            with trace.pass_(f"micro{micro}"):
                policy(torch.randn(5, 4)).sum().backward()
    assert codes(trace) == []
    assert trace.report().startswith("gradtrace: no problems found")


def test_the_first_pass_after_an_optimizer_step_is_judged_for_stale_grads(policy):
    opt = torch.optim.SGD(policy.parameters(), lr=0.1)
    with gradtrace.watch(policy, optimizer=opt) as trace:
        for micro in range(2):  # accumulation: legitimate
            with trace.pass_(f"a{micro}"):
                policy(torch.randn(5, 4)).sum().backward()
        opt.step()  # ... and no zero_grad before the next step's first pass
        with trace.pass_("b0"):
            policy(torch.randn(5, 4)).sum().backward()
        opt.zero_grad()
        opt.step()
        with trace.pass_("c0"):
            policy(torch.randn(5, 4)).sum().backward()
    stale = [v for v in trace.verdicts() if v.code == "STALE_GRADS"]
    assert [v.evidence["pass"] for v in stale] == ["b0"]
    assert trace.passes["b0"].step_start and trace.passes["c0"].step_start
    assert not trace.passes["a1"].step_start


def test_zeroed_but_not_none_grads_are_not_stale(policy):
    with gradtrace.watch(policy) as trace:
        x_pass(trace, policy, n=1)
        policy.zero_grad(set_to_none=False)
        with trace.pass_("X2"):
            policy(torch.randn(5, 4)).sum().backward()
    assert "STALE_GRADS" not in codes(trace)
    names = {n for n, _ in policy.named_parameters()}  # both passes recorded, X2 from zeroed .grad
    assert trace.passes["X"].covered == trace.passes["X2"].covered == names
    assert not trace.passes["X2"].stale


def test_unused_params():
    model = nn.ModuleDict({"used": nn.Linear(2, 2), "unused_head": nn.Linear(2, 2)})
    with gradtrace.watch(model) as trace:
        model["used"](torch.randn(3, 2)).sum().backward()
    v = first(trace, "UNUSED_PARAMS")
    assert v.severity == "warning"
    assert set(v.evidence["parameters"]) == {"unused_head.weight", "unused_head.bias"}
    assert v.evidence["modules"] == ["unused_head"]


def test_coverage_gap_groups_by_module():
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3)) for _ in range(3)])
    with gradtrace.watch(model) as trace:
        with trace.pass_("X"):
            model(torch.randn(2, 3)).sum().backward()
        with trace.pass_("Y"):
            loss = model(torch.randn(2, 3)).sum()
            torch.autograd.grad(loss, [p for n, p in model.named_parameters() if n.endswith(".0.weight")])
    v = first(trace, "COVERAGE_GAP")
    assert v.evidence["a"] == "X" and v.evidence["b"] == "Y"
    assert len(v.evidence["only_a"]) == 9
    assert v.evidence["modules_only_a"] == ["*.0", "*.1"]


def test_single_pass_detach_seen_at_op_level_explains_what_the_pass_missed(policy):
    with gradtrace.watch(policy, cuts="ops") as trace:
        with trace.pass_("Y"):
            h = policy.body(torch.randn(5, 4)).detach()
            S = trace.tensor("S", policy.head(h).sum(-1))
            torch.autograd.grad(S.sum(), list(policy.parameters()), allow_unused=True)
    v = trace.verdicts()[0]
    assert v.code == "GRAPH_CUT" and v.evidence["kind"] == "detach" and v.evidence["op"] == "detach"
    assert set(v.evidence["lost"]) == {"body.0.weight", "body.0.bias"}
    assert HERE in v.evidence["location"]


def test_generation_under_no_grad_outside_passes_does_not_blame_an_unused_head():
    torch.manual_seed(0)
    model = nn.ModuleDict({"body": nn.Linear(4, 4), "unused_head": nn.Linear(4, 2)})
    with gradtrace.watch(model) as trace:
        with torch.no_grad():  # rollout / generation, outside any pass
            model["body"](torch.randn(3, 4))
        with trace.pass_("X"):
            model["body"](torch.randn(3, 4)).sum().backward()
    assert [v.code for v in trace.verdicts()] == ["UNUSED_PARAMS"]


def test_unlabelled_accumulation_is_not_stale_and_reports_grad_as_left(policy):
    with gradtrace.watch(policy) as trace:
        for _ in range(3):  # gradient accumulation without pass labels
            policy(torch.randn(5, 4)).sum().backward()
    assert list(trace.passes) == ["backward-1", "backward-2", "backward-3"]
    assert "STALE_GRADS" not in codes(trace)
    last = trace.passes["backward-3"]
    for name, p in policy.named_parameters():
        assert last.records[name].norm == pytest.approx(p.grad.norm().item(), rel=1e-6)


def test_no_coverage_names_the_registered_tensor_that_carries_no_grad(policy):
    for p in policy.parameters():
        p.requires_grad_(False)
    policy.head.weight.requires_grad_(True)
    with gradtrace.watch(policy) as trace:
        with trace.pass_("Y"):  # the trainable head is bypassed: S carries no gradient, backward cannot run
            S = trace.tensor("S", policy.body(torch.randn(5, 4)).sum(-1))
            with pytest.raises(RuntimeError):
                torch.autograd.grad(S.sum(), [policy.head.weight])
    v = first(trace, "NO_COVERAGE")
    assert v.evidence["pass"] == "Y" and v.evidence["runs"] == 0
    assert "'S'" in v.message and "do not require grad" in v.message


def test_max_passes_keeps_the_newest_for_long_loops(policy):
    with gradtrace.watch(policy, max_passes=3, keep_grads=True) as trace:
        for step in range(10):
            policy.zero_grad()
            with trace.pass_(f"step{step}"):
                policy(torch.randn(5, 4)).sum().backward()
        assert list(trace.passes) == ["step7", "step8", "step9"]
        assert set(trace._recording.kept) == {"step7", "step8", "step9"}  # dropped passes free their gradients
        assert trace.diff("step8", "step9").dot is not None
    assert trace.meta["dropped_passes"] == 7
    with pytest.raises(gradtrace.GradtraceError, match="max_passes"):
        with gradtrace.watch(policy, max_passes=0):
            pass


def test_rounds_to_zero_after_a_preconditioned_diff_of_passes_sharing_no_parameter(policy):
    """Regression: `_why_small` formatted an RMS of None (TypeError) when the passes had no parameter in common."""
    opt = torch.optim.Adam(policy.parameters(), lr=1e-3)
    policy(torch.randn(5, 4)).sum().backward()
    opt.step()
    with gradtrace.watch(policy, keep_grads=True) as trace:
        with trace.pass_("X"):  # reaches only the head
            policy.head(torch.randn(5, 8)).sum().backward()
        with trace.pass_("Y"):  # reaches only the body
            torch.autograd.grad(policy.body(torch.randn(5, 4)).sum(), list(policy.body.parameters()))
        trace.diff("X", "Y", precondition=opt)
        trace.scalar("deltaH1", -1e-9)
    verdict = first(trace, "ROUNDS_TO_ZERO")
    assert "no parameter in common" in verdict.message
    assert "ROUNDS_TO_ZERO" in trace.report()
