"""Name the cause, not the symptom (issue 19): one regression test per item.

Cuts are judged on the path of the forward a pass differentiated; a verdict that
explains another comes first and the effect points to it; registered-tensor facts
are judged per pass and said once per identity; the module named is the one whose
output was cut; alternating optimizers are not compared; a labelled pass on stale
gradients is a warning with both readings.
"""
import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradtrace
from gradtrace.analysis import outermost_cuts
from gradtrace.analysis.explain import identity, order
from gradtrace.records import GradRecord, PassTrace, Verdict

SOURCE = open(__file__).read().splitlines()


def line_of(marker):
    (number,) = [i + 1 for i, text in enumerate(SOURCE) if text.rstrip().endswith(f"# <{marker}>")]
    return f"test_causes.py:{number}"


def codes(trace):
    return [v.code for v in trace.verdicts()]


def first(trace):
    return trace.verdicts()[0]


class Tower(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.block = nn.Linear(8, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.block(self.embed(x))))


# ---- 1. cuts blamed off the path ---------------------------------------------------------------------------


def test_a_no_grad_call_of_a_module_that_then_ran_with_grad_is_not_blamed():
    """The issue's minimal shape: a no_grad forward, then the loss through m[0](x).detach()."""
    m = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    x = torch.randn(3, 4)
    with gradtrace.watch(m) as trace:
        with trace.pass_("X"):
            with torch.no_grad():
                m(x)
            m[1](m[0](x).detach()).sum().backward()
    assert "GRAPH_CUT" not in codes(trace)  # old code: GRAPH_CUT naming the no_grad forward, "compute it outside"
    v = first(trace)
    assert v.code == "DETACHED_OUTPUT" and v.evidence["module"] == "0"
    assert trace.passes["X"].forward_modules == ["0", "1"]  # the grad-enabled calls, in forward order


def test_a_rollout_under_no_grad_that_only_fed_rewards_is_never_blamed():
    model = Tower()
    with gradtrace.watch(model) as trace:
        for step in range(2):
            with trace.pass_(f"step-{step}"):
                x = torch.randn(5, 4)
                with torch.no_grad():
                    rewards = model(x).sum(-1)  # rollout -> rewards: data
                trace.tensor("rewards", rewards)
                h = model.block(model.embed(x)) if step == 0 else model.block(model.embed(x)).detach()
                (model.head(h).sum(-1) * rewards).sum().backward()
    assert not [v for v in trace.verdicts() if v.code in ("GRAPH_CUT", "TENSOR_NO_GRAD")]
    v = first(trace)
    assert v.code == "DETACHED_OUTPUT" and v.evidence["module"] == "block"
    gap = next(x for x in trace.verdicts() if x.code == "COVERAGE_GAP")
    assert gap.evidence["explained_by"] == ["DETACHED_OUTPUT"] and "caused by DETACHED_OUTPUT" in gap.message


def test_cuts_of_one_module_at_two_lines_stay_apart_and_the_bugs_line_is_named():
    model = Tower()
    with gradtrace.watch(model) as trace:
        with trace.pass_("Y"):
            x = torch.randn(3, 4)
            with torch.no_grad():
                model(x)  # <rollout>
            with torch.no_grad():
                logits = model(x)  # <bug>
            S = trace.tensor("S", logits.sum(-1))
            with contextlib.suppress(RuntimeError):
                S.sum().backward()
    roots = [c for c in outermost_cuts(trace.cuts) if c.module == ""]
    assert sorted(c.location.rsplit(":", 1)[1] for c in roots) == sorted(
        line_of(m).rsplit(":", 1)[1] for m in ("rollout", "bug"))
    v = first(trace)
    assert v.code == "TENSOR_NO_GRAD" and v.evidence["location"].endswith(line_of("bug"))


def test_a_tensor_built_after_a_rollout_by_a_detach_is_not_linked_to_the_rollout():
    model = Tower()
    with gradtrace.watch(model) as trace:
        with trace.pass_("Y"):
            x = torch.randn(3, 4)
            with torch.no_grad():
                model(x)  # rollout
            trace.tensor("S", model(x).sum(-1).detach(), expect_grad=True)
    v = next(v for v in trace.verdicts() if v.code == "TENSOR_NO_GRAD")
    assert "kind" not in v.evidence and ".detach()" in v.message  # no cut named: the rollout is off the path


# ---- 2. ranking by explanation ---------------------------------------------------------------------------------


def masked_steps(mask_at, adv_at=None, steps=3):
    """-(A * S) masked mean; the mask empty at step ``mask_at``, the advantages zero at ``adv_at``."""
    model = Tower()
    with gradtrace.watch(model) as trace:
        for step in range(steps):
            with trace.pass_(f"step-{step}"):
                x = torch.randn(4, 4)
                A = torch.zeros(4) if step == adv_at else torch.randn(4)
                mask = torch.zeros(4, 2) if step == mask_at else torch.ones(4, 2)
                trace.tensor("A", A)
                trace.tensor("mask", mask, role="mask")
                S = trace.tensor("S", torch.log_softmax(model(x), -1))
                (-(A[:, None] * S * mask).sum() / mask.sum().clamp(min=1)).backward()
            model.zero_grad()
    return trace


def test_a_mask_empty_in_one_step_explains_that_steps_zero_gradients():
    trace = masked_steps(mask_at=1)
    found = trace.verdicts()
    assert found[0].code == "ALL_ZERO_VALUES" and found[0].evidence["tensor"] == "mask"
    assert found[0].evidence["passes"] == ["step-1"] and "pass 'step-1'" in found[0].message
    for effect in (v for v in found if v.code in ("ZERO_UPSTREAM", "ZERO_GRADS")):
        assert effect.evidence.get("pass") == "step-1" and "caused by ALL_ZERO_VALUES" in effect.message


def test_advantages_all_zero_in_one_step_come_before_the_zero_upstream_they_explain():
    trace = masked_steps(mask_at=None, adv_at=2)
    found = trace.verdicts()
    assert found[0].code == "ALL_ZERO_VALUES" and found[0].evidence["tensor"] == "A"
    assert found[0].evidence["passes"] == ["step-2"]
    upstream = next(v for v in found if v.code == "ZERO_UPSTREAM")
    assert upstream.evidence["pass"] == "step-2" and upstream.evidence["explained_by"] == ["ALL_ZERO_VALUES"]


def grouped_rewards_steps(rewards_at):
    """GRPO in miniature: rewards and group-normalised advantages registered as groups (rows of 4)."""
    model = Tower()
    with gradtrace.watch(model) as trace:
        for step in range(2):
            with trace.pass_(f"step-{step}"):
                rewards = rewards_at(step)
                trace.tensor("rewards", rewards, role="group")
                advantages = (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)
                trace.tensor("advantages", advantages, role="group")
                S = trace.tensor("S", torch.log_softmax(model(torch.randn(8, 4)), -1)[:, 0])
                (-(advantages.reshape(-1) * S).mean()).backward()
            model.zero_grad()
    return trace


def test_rewards_of_one_for_every_completion_lead_as_zero_variance_groups():
    """All-equal groups of 1.0 with role="group" are not a full mask: the rewards are the cause, named with the
    fraction TRL logs as frac_reward_zero_std; the all-zero advantages point to them."""
    trace = grouped_rewards_steps(lambda step: torch.arange(8.0).view(2, 4) if step == 0 else torch.ones(2, 4))
    found = trace.verdicts()
    assert found[0].code == "CONSTANT_ROWS" and found[0].evidence["tensor"] == "rewards"
    assert found[0].evidence["fraction"] == 1.0 and found[0].evidence["passes"] == ["step-1"]
    assert "2 of 2 groups (100%, as TRL's frac_reward_zero_std counts them)" in found[0].message
    advantages = next(v for v in found if v.code == "ALL_ZERO_VALUES")
    assert advantages.evidence["tensor"] == "advantages" and "caused by CONSTANT_ROWS above" in advantages.message


def test_an_all_ones_float_tensor_without_a_role_is_still_a_full_mask():
    model = Tower()
    with gradtrace.watch(model) as trace:
        with trace.pass_("step"):
            trace.tensor("weights", torch.ones(2, 4))
            model(torch.randn(2, 4)).sum().backward()
    assert "CONSTANT_ROWS" not in codes(trace)


def test_every_completion_truncated_and_masked_is_said_plainly():
    from gradtrace.integrations.grpo import TRUNCATION_FLAGS
    model = Tower()
    with gradtrace.watch(model) as trace:
        with trace.pass_("step-1"):
            trace.tensor(TRUNCATION_FLAGS, torch.zeros(4, dtype=torch.bool), expect_grad=False)
            S = trace.tensor("S", torch.log_softmax(model(torch.randn(4, 4)), -1))
            (S * 0.0).sum().backward()
    first = trace.verdicts()[0]
    assert first.code == "ALL_ZERO_VALUES" and first.message.startswith(
        "every completion hit max_completion_length (4 of 4 truncated) and mask_truncated_completions=True "
        "masked them all out of 'completion_mask'")
    assert "Raise max_completion_length" in first.message


def test_ddp_unfinished_reduction_is_explained_by_the_unused_parameter():
    params = ("body.weight", "side.weight")
    ok = PassTrace(name="step-1", params=params, runs=1, kinds=["backward"])
    ok.records = {"body.weight": GradRecord("body.weight", hits=1, norm=1.0, max_abs=1.0)}
    failed = PassTrace(name="step-2", params=params, failed=(
        "RuntimeError: Expected to have finished reduction in the prior iteration before starting a new one."))
    trace = gradtrace.Trace(params, passes={"step-1": ok, "step-2": failed})
    found = trace.verdicts()
    assert [v.code for v in found][:2] == ["UNUSED_PARAMS", "PASS_FAILED"]
    assert found[0].severity == "error" and found[0].evidence["parameters"] == ["side.weight"]
    assert "caused by UNUSED_PARAMS above" in found[1].message and "find_unused_parameters" in found[1].message


def test_data_registered_as_data_is_not_blamed_when_nothing_trained():
    """A pass where nothing trained (adapters bypassed): advantages are data, not TENSOR_NO_GRAD."""
    model = LoraTower()
    with gradtrace.watch(model) as trace:
        with trace.pass_("step"):
            x = torch.randn(3, 4)
            with torch.no_grad():
                model(x)  # rollout
            trace.tensor("A", torch.randn(3), role="group")
            model.bypass = True
            out = model(x).sum()
            with contextlib.suppress(RuntimeError):
                out.backward()
    assert "TENSOR_NO_GRAD" not in codes(trace)
    v = first(trace)
    assert v.code == "NO_COVERAGE" and "adapters did not run" in v.message and "lora_A" in v.message


class LoraLinear(nn.Module):
    """peft's shape: a frozen base layer plus lora_A / lora_B, skipped when adapters are disabled."""

    def __init__(self, owner):
        super().__init__()
        self.base_layer = nn.Linear(4, 4).requires_grad_(False)
        self.lora_A = nn.Linear(4, 2, bias=False)
        self.lora_B = nn.Linear(2, 4, bias=False)
        self.owner = [owner]

    def forward(self, x):
        out = self.base_layer(x)
        return out if self.owner[0].bypass else out + self.lora_B(self.lora_A(x))


class LoraTower(nn.Module):
    def __init__(self):
        super().__init__()
        self.base = nn.Linear(4, 4).requires_grad_(False)
        self.block = LoraLinear(self)
        self.bypass = False

    def forward(self, x):
        return self.block(self.base(x))


# ---- 3. registered-tensor facts per pass, findings once per identity ----------------------------------------


def test_facts_are_per_pass_and_a_finding_reads_the_same_as_it_recurs():
    model = Tower()
    messages = []
    with gradtrace.watch(model, max_passes=3) as trace:
        for step in range(5):
            with trace.pass_(f"step-{step}"):
                mask = torch.ones(8, 3, dtype=torch.bool)
                mask[: step] = False  # one more empty row every step: the count changes
                trace.tensor("mask", mask)
                model(torch.randn(8, 4)).sum().backward()
            model.zero_grad()
            empty = [v for v in trace.verdicts() if v.code == "EMPTY_ROWS"]
            messages.append([(v.severity, v.message) for v in empty])
    facts = trace.tensors["mask"].by_pass
    assert list(facts) == ["step-2", "step-3", "step-4"]  # kept within max_passes
    assert [facts[f"step-{s}"].row_facts["empty_rows"] for s in (2, 3, 4)] == [2, 3, 4]
    assert messages[1] == messages[2] == [("warning", messages[1][0][1])]  # once per identity, stable text
    assert "pass 'step-1'" in messages[1][0][1]
    found = next(v for v in trace.verdicts() if v.code == "EMPTY_ROWS")
    assert found.evidence["passes"] == ["step-2", "step-3", "step-4"]


def test_tensor_facts_of_an_unlabelled_step_belong_to_that_step():
    model = Tower()
    with gradtrace.watch(model) as trace:
        for step in range(3):
            A = torch.zeros(4) if step == 1 else torch.randn(4)
            trace.tensor("A", A)
            (model(torch.randn(4, 4)).sum(-1) * A).sum().backward()
            model.zero_grad()
    v = next(v for v in trace.verdicts() if v.code == "ALL_ZERO_VALUES")
    assert v.evidence["passes"] == ["backward-2"]
    assert first(trace).code == "ALL_ZERO_VALUES"


def test_per_pass_facts_survive_save_and_load(tmp_path):
    trace = masked_steps(mask_at=1)
    trace.save(tmp_path / "t.json")
    loaded = gradtrace.load(tmp_path / "t.json")
    assert [str(v) for v in loaded.verdicts()] == [str(v) for v in trace.verdicts()]
    assert loaded.tensors["mask"].by_pass["step-1"].values.zeros == 8


# ---- 4. the right module -----------------------------------------------------------------------------------------


class WithAuxHead(nn.Module):
    """YOLOX #885 / pytorch #43259: the model returns an auxiliary head's output that the loss ignores."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
        self.head, self.aux_head = nn.Linear(16, 4), nn.Linear(16, 4)

    def forward(self, x):
        f = self.backbone(x)
        return self.head(f), self.aux_head(f)


@pytest.mark.parametrize("fixed", [False, True])
def test_a_returned_output_the_loss_ignores_is_unused_not_detached(fixed):
    torch.manual_seed(0)
    model = WithAuxHead()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 8), torch.randn(8, 4)
    with gradtrace.watch(model) as trace:
        for step in range(2):
            with trace.pass_(f"step-{step}"):
                opt.zero_grad()
                out, aux = model(x)
                loss = F.mse_loss(out, y) + (0.4 * F.mse_loss(aux, y) if fixed else 0)
                loss.backward()
            opt.step()
    first_line = trace.report().splitlines()[0]
    if fixed:
        assert first_line == "gradtrace: no problems found."
        return
    assert first_line.startswith("gradtrace diagnosis: UNUSED_PARAMS: 2 trainable parameter(s) received no "
                                 "gradient in any pass: aux_head (2 params); the model returns the output of "
                                 "'aux_head' and no loss used it"), first_line  # old code: DETACHED_OUTPUT, 'cut'
    assert "DETACHED_OUTPUT" not in {v.code for v in trace.verdicts()}
    assert trace.meta.returned_by_model == {"head", "aux_head"}


def test_returned_by_model_survives_save_and_load(tmp_path):
    model = WithAuxHead()
    with gradtrace.watch(model) as trace:
        model(torch.randn(2, 8))[0].sum().backward()
    trace.save(tmp_path / "t.json")
    loaded = gradtrace.load(tmp_path / "t.json")
    assert set(loaded.meta.returned_by_model) == {"head", "aux_head"}
    assert loaded.report().splitlines()[0] == trace.report().splitlines()[0]


def test_detached_output_names_the_module_whose_output_was_cut_not_the_upstream_victim():
    model = Tower()
    with gradtrace.watch(model) as trace:
        x = torch.randn(3, 4)
        h = model.block(model.embed(x)).detach()
        model.head(h).sum().backward()
    v = first(trace)
    assert v.code == "DETACHED_OUTPUT" and v.evidence["module"] == "block"  # old code: 'embed'
    assert v.evidence["upstream"] == ["embed"] and "embed (2 params)" in v.message


@pytest.mark.slow
def test_rotary_embeddings_are_not_named_as_a_cut_on_a_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1))
    # the cause: a hook cuts the first layer's output, so the embeddings (upstream of rotary_emb) lose theirs
    hook = model.model.layers[0].register_forward_hook(lambda m, a, out: out.detach())
    try:
        with gradtrace.watch(model) as trace:
            ids = torch.randint(0, 32, (2, 5))
            model(input_ids=ids, labels=ids).loss.backward()
    finally:
        hook.remove()
    assert any(c.module == "model.rotary_emb" for c in trace.cuts)  # cos/sin never carry a gradient
    assert not any(v.code == "GRAPH_CUT" and v.evidence["module"] == "model.rotary_emb" for v in trace.verdicts())
    assert first(trace).code == "GRAPH_CUT" and first(trace).evidence["module"] == "model.layers.0"


class _StopGradient(torch.nn.Module):
    def forward(self, x):
        return x.detach()  # a parameter-free wrapper that cuts the data flowing through it


class _Gated(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Linear(4, 4)
        self.stop = _StopGradient()
        self.head = torch.nn.Linear(4, 1)

    def forward(self, x):
        return self.head(self.stop(self.embed(x)))


def test_a_parameter_free_module_that_detaches_its_input_is_the_cut_not_a_weak_one():
    # Unlike rotary cos/sin (fresh data, no gradient by design), its output is its input's own data:
    # the wrapper is where the graph was cut, and the first line names it (not the upstream victim).
    model = _Gated()
    with gradtrace.watch(model) as trace:
        with trace.pass_("X"):
            model(torch.randn(3, 4)).sum().backward()
    v = first(trace)
    assert v.code == "GRAPH_CUT" and v.evidence["module"] == "stop" and v.evidence["kind"] == "detach"
    assert v.evidence["lost"] == ["embed.bias", "embed.weight"]
    assert next(c for c in trace.cuts if c.module == "stop").passes_input is True


def test_an_argmax_loss_names_the_module_and_the_rerun_in_the_default_mode():
    model = Tower()
    w = torch.ones(3, requires_grad=True)
    with gradtrace.watch(model) as trace:
        with trace.pass_("X"):
            x = torch.randn(3, 4)
            pred = model(x).argmax(-1).float()  # <argmax>
            trace.tensor("w", w)
            (pred * w).sum().backward()
    found = [v for v in trace.verdicts() if v.code in ("NO_COVERAGE", "DETACHED_OUTPUT")]
    assert found[0].code == "DETACHED_OUTPUT" and found[0].evidence["module"] == ""
    no_cov = next(v for v in found if v.code == "NO_COVERAGE")
    assert "argmax" in no_cov.message and 'cuts="ops"' in no_cov.message
    with gradtrace.watch(model, cuts="ops") as ops:
        with ops.pass_("X"):
            pred = model(x).argmax(-1).float()  # <argmax-ops>
            ops.tensor("w", w)
            (pred * w).sum().backward()
    assert any(v.evidence.get("op") == "argmax" and v.evidence["location"].endswith(line_of("argmax-ops"))
               for v in ops.verdicts())


# ---- 5. alternating optimizers ---------------------------------------------------------------------------------


def test_a_gan_loop_alternating_optimizers_gives_no_finding():
    torch.manual_seed(0)
    G = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8))
    D = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))
    gan = nn.ModuleDict({"G": G, "D": D})
    opt_g, opt_d = torch.optim.Adam(G.parameters(), 1e-3), torch.optim.Adam(D.parameters(), 1e-3)
    bce = nn.BCEWithLogitsLoss()
    with gradtrace.watch(gan) as trace:
        for i in range(3):
            z, real = torch.randn(6, 4), torch.randn(6, 8)
            with trace.pass_(f"D-{i}"):
                D.zero_grad()
                (bce(D(real), torch.ones(6, 1)) + bce(D(G(z).detach()), torch.zeros(6, 1))).backward()
                opt_d.step()
            with trace.pass_(f"G-{i}"):
                G.zero_grad()
                bce(D(G(z)), torch.ones(6, 1)).backward()  # reaches D too; nothing steps D's .grad now
                opt_g.step()
    assert [v for v in trace.verdicts() if v.severity != "info"] == []  # old code: four COVERAGE_GAP errors
    assert sorted(tuple(o.passes) for o in trace.optimizers.values()) == [
        tuple(f"D-{i}" for i in range(3)), tuple(f"G-{i}" for i in range(3))]


# ---- 7. a labelled pass on earlier runs' gradients ----------------------------------------------------------------


def test_a_labelled_pass_on_gradients_left_by_earlier_runs_is_a_warning_with_both_readings():
    model = Tower()
    with gradtrace.watch(model) as trace:
        model(torch.randn(3, 4)).sum().backward()  # a sanity check that filled .grad
        with trace.pass_("X"):
            model(torch.randn(3, 4)).sum().backward()
    v = next(v for v in trace.verdicts() if v.code == "STALE_GRADS")
    assert v.severity == "warning" and v.evidence["pass"] == "X"
    assert "zero_grad() was forgotten" in v.message and "accumulate=True" in v.message
    with gradtrace.watch(model) as said:
        with said.pass_("X2", accumulate=True):
            model(torch.randn(3, 4)).sum().backward()
    assert "STALE_GRADS" not in codes(said)


def test_where_a_step_began_stale_gradients_are_an_error():
    model = Tower()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradtrace.watch(model) as trace:
        for step in range(2):
            with trace.pass_(f"step-{step}"):
                model(torch.randn(3, 4)).sum().backward()
            opt.step()  # no zero_grad(): the next pass begins a step on these gradients
    v = next(v for v in trace.verdicts() if v.code == "STALE_GRADS")
    assert v.severity == "error" and v.evidence["pass"] == "step-1" and trace.passes["step-1"].step_start


def test_one_labelled_pass_per_microbatch_is_accumulation_not_staleness():
    model = Tower()
    with gradtrace.watch(model) as trace:
        for micro in range(3):
            with trace.pass_(f"micro{micro}"):
                model(torch.randn(3, 4)).sum().backward()
    assert codes(trace) == []


# ---- 8. smaller --------------------------------------------------------------------------------------------------


def test_constant_rows_of_a_float_mask_are_not_called_advantages():
    with gradtrace.watch(nn.Linear(2, 2)) as trace:
        trace.tensor("loss_mask", torch.tensor([[1.0, 1.0, 0.0], [0.5, 0.5, 0.5]]), role="mask")
    assert "CONSTANT_ROWS" not in codes(trace)


def test_all_zero_advantages_say_both_equal_rewards_and_zeroed_nans():
    with gradtrace.watch(nn.Linear(2, 2)) as trace:
        trace.tensor("advantages", torch.zeros(4, 3))
    v = next(v for v in trace.verdicts() if v.code == "ALL_ZERO_VALUES")
    assert "rewards were all equal" in v.message and "NaN" in v.message


def test_order_puts_a_cause_before_its_effect_and_takes_its_severity():
    cause = Verdict("DETACHED_OUTPUT", "warning", "m", {"module": "a", "parameters": ["a.w"], "pass": "X"})
    effect = Verdict("NO_COVERAGE", "error", "n", {"pass": "X", "runs": 1})
    ordered = order([effect, cause])
    assert [v.code for v in ordered] == ["DETACHED_OUTPUT", "NO_COVERAGE"]
    assert ordered[0].severity == "error" and ordered[1].evidence["explained_by"] == ["DETACHED_OUTPUT"]
    assert identity(ordered[0]) == ("DETACHED_OUTPUT", "error", "module", "a")


def test_a_loss_that_needs_no_grad_with_a_frozen_model_is_explained_by_the_freeze():
    model = Tower()
    with gradtrace.watch(model) as trace:
        model.requires_grad_(False)
        with contextlib.suppress(RuntimeError):
            with trace.pass_("step"):
                F.mse_loss(model(torch.randn(2, 4)), torch.zeros(2, 2)).backward()
    assert codes(trace)[:2] == ["FROZEN_WHILE_WATCHED", "PASS_FAILED"]


@pytest.mark.parametrize("bad,says", [
    (lambda m, x: m(x).backward(), "not a scalar"),
    (lambda m, x: m.embed.weight.add_(1.0), "under torch.no_grad()"),
    (lambda m, x: torch.autograd.grad(m.head(torch.randn(3, 8)).sum(), [m.embed.weight]), "allow_unused=True"),
], ids=["non_scalar_loss", "in_place_on_a_parameter", "unused_input"])
def test_a_failed_pass_says_what_its_error_means(bad, says):
    model = Tower()
    with gradtrace.watch(model) as trace:
        with contextlib.suppress(RuntimeError):
            with trace.pass_("X"):
                bad(model, torch.randn(3, 4))
    v = next(v for v in trace.verdicts() if v.code == "PASS_FAILED")
    assert says in v.message


@pytest.mark.parametrize("name, hint", [("mask", False), ("loss_weights", False), ("advantages", True)])
def test_the_rewards_hint_is_only_for_tensors_that_hold_groups(name, hint):
    """A float mask registered without a role (labels != -100 as float) that is all zero selects nothing; the
    'rewards all equal' hint belongs to advantages and rewards only (the old code gave it to any float tensor)."""
    model = nn.Linear(4, 1)
    with gradtrace.watch(model) as trace:
        with trace.pass_("step"):
            weights = trace.tensor(name, torch.zeros(8))
            (model(torch.randn(8, 4)).squeeze(-1) * weights).sum().backward()
    found = next(v for v in trace.verdicts() if v.code == "ALL_ZERO_VALUES")
    assert ("rewards" in found.message) is hint, found.message
    assert ("selects nothing" in found.message) is (name == "mask")
