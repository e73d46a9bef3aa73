"""Optimizer steps seen without being told (issue 20, items 1-4).

torch.optim's global step hooks tell gradtrace where steps begin, which
optimizer stepped which pass's gradients and which parameters it owns, and what
the step did to the weights. Checked against the optimizers' own state and the
weights themselves.
"""
import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
import torch.optim.optimizer as optimizer_hooks
from torch import nn

import gradtrace
from gradtrace.capture.optim import SAMPLE
from test_no_perturb import count_host_syncs


def net(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


def steps(model, opt, n=2, zero_grad=True, scheduler=None, **watch):
    with gradtrace.watch(model, **watch) as trace:
        for _ in range(n):
            x, y = torch.randn(5, 6, dtype=next(model.parameters()).dtype), torch.randint(0, 3, (5,))
            if zero_grad:
                opt.zero_grad()
            F.cross_entropy(model(x).float(), y).backward()
            opt.step()
            if scheduler is not None:
                scheduler.step()
    return trace


def codes(trace):
    return [v.code for v in trace.verdicts()]


def test_the_global_step_hooks_are_removed_on_exit_even_when_the_block_raises():
    before = (len(optimizer_hooks._global_optimizer_pre_hooks), len(optimizer_hooks._global_optimizer_post_hooks))
    model = net()
    with pytest.raises(ValueError):
        with gradtrace.watch(model):
            assert len(optimizer_hooks._global_optimizer_pre_hooks) == before[0] + 1
            raise ValueError("boom")
    after = (len(optimizer_hooks._global_optimizer_pre_hooks), len(optimizer_hooks._global_optimizer_post_hooks))
    assert after == before


def test_which_optimizer_stepped_which_pass_and_its_parameters():
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trace = steps(model, opt, n=3)
    (record,) = trace.optimizers.values()
    assert record.name == "SGD#0" and record.steps == 3 and record.lrs == [0.1]
    assert record.params == [n for n, _ in model.named_parameters()]
    assert record.passes == {"backward-1": 1, "backward-2": 1, "backward-3": 1}
    assert [p.step_start for p in trace.passes.values()] == [False, True, True]
    assert codes(trace) == []


def test_a_loop_that_never_calls_zero_grad_is_stale_at_each_step():
    model = net()
    trace = steps(model, torch.optim.SGD(model.parameters(), lr=0.01), n=3, zero_grad=False)
    stale = [v for v in trace.verdicts() if v.code == "STALE_GRADS"]
    assert [v.evidence["pass"] for v in stale] == ["backward-2", "backward-3"]
    assert all(v.severity == "error" and "optimizer.zero_grad()" in v.message for v in stale)
    assert trace.verdicts()[0].code == "STALE_GRADS"


def test_accumulation_between_steps_is_not_stale():
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradtrace.watch(model) as trace:
        for _ in range(2):
            opt.zero_grad()
            for _ in range(3):  # three microbatches per step, each its own unlabelled pass
                model(torch.randn(5, 6)).sum().backward()
            opt.step()
    assert "STALE_GRADS" not in codes(trace)


def test_parameters_unfrozen_after_the_optimizer_was_built_are_not_in_it():
    model = net()
    model[0].requires_grad_(False)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model[0].requires_grad_(True)
    before = copy.deepcopy(model[0].state_dict())
    trace = steps(model, opt, n=2)
    assert torch.equal(model[0].weight, before["weight"])  # the fault is real: they never moved
    v = trace.verdicts()[0]
    assert v.code == "NOT_IN_OPTIMIZER" and v.severity == "error"
    assert v.evidence["parameters"] == ["0.weight", "0.bias"] and v.evidence["optimizers"] == ["Adam#0"]


def test_stale_grads_of_parameters_in_no_optimizer_say_so():
    model = net()
    model[0].requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model[0].requires_grad_(True)
    trace = steps(model, opt, n=3)  # opt.zero_grad() never clears model[0]'s .grad
    stale = next(v for v in trace.verdicts() if v.code == "STALE_GRADS")
    assert "NOT_IN_OPTIMIZER" in stale.message and set(stale.evidence["parameters"]) == {"0.weight", "0.bias"}
    assert codes(trace).index("NOT_IN_OPTIMIZER") < codes(trace).index("STALE_GRADS")


def test_bf16_weights_with_a_small_lr_are_unchanged_and_the_dtype_is_named():
    model = net(torch.bfloat16)
    before = [p.detach().clone() for p in model.parameters()]
    trace = steps(model, torch.optim.AdamW(model.parameters(), lr=1e-5), n=2)
    moved = [not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True)]
    v = trace.verdicts()[0]
    assert v.code == "WEIGHTS_UNCHANGED" and "bfloat16" in v.message and "1.000e-05" in v.message
    names = [n for n, _ in model.named_parameters()]
    # every parameter gradtrace calls unchanged really is (the sample never lies that way round)
    assert all(not moved[names.index(n)] for n in v.evidence["parameters"])


def test_lr_zero_for_several_steps_is_unchanged_but_one_warmup_step_is_not():
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    v = steps(model, opt, n=2).verdicts()[0]
    assert v.code == "WEIGHTS_UNCHANGED" and "learning rate is 0" in v.message
    model = net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: step / 10)  # lr 0 at the first step only
    assert codes(steps(model, opt, n=1, scheduler=warmup)) == []
    assert codes(steps(model, opt, n=3, scheduler=warmup)) == []


def test_a_learning_rate_far_too_small_is_tiny_updates_with_the_ratio_and_lr():
    model = net()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1e-3)
    trace = steps(model, torch.optim.SGD(model.parameters(), lr=1e-11), n=2)
    v = trace.verdicts()[0]
    assert v.code == "TINY_UPDATES" and "1.000e-11" in v.message
    assert v.evidence["max_ratio"] < 1e-7 and set(v.evidence["ratios"]) == {"0", "2"}
    healthy = net()
    assert codes(steps(healthy, torch.optim.SGD(healthy.parameters(), lr=1e-2), n=2)) == []


def test_the_sampled_update_ratio_matches_the_weights_own_change():
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    before = [p.detach().clone() for p in model.parameters()]
    trace = steps(model, opt, n=1)
    (record,) = trace.optimizers.values()
    for (name, p), b in zip(model.named_parameters(), before, strict=True):
        flat_b, flat_a = b.reshape(-1), p.detach().reshape(-1)
        stride = max(1, flat_b.numel() // SAMPLE)
        ub = (flat_a[::stride][:SAMPLE] - flat_b[::stride][:SAMPLE]).double().square().sum().item()
        wb = flat_b[::stride][:SAMPLE].double().square().sum().item()
        assert record.updates[name][2] == pytest.approx(ub) and record.updates[name][3] == pytest.approx(wb)


def test_clipping_before_unscaling_is_found_and_the_right_order_is_not():
    def run(unscale_first):
        model = net()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
        with gradtrace.watch(model) as trace:
            for _ in range(2):
                opt.zero_grad()
                scaler.scale(F.cross_entropy(model(torch.randn(5, 6)), torch.randint(0, 3, (5,)))).backward()
                if unscale_first:
                    scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                scaler.step(opt)
                scaler.update()
        return trace
    v = run(False).verdicts()[0]
    assert v.code == "CLIP_BEFORE_UNSCALE" and v.evidence["scale"] == 2.0 ** 16
    assert "scaler.unscale_(optimizer)" in v.message
    assert codes(run(True)) == []


def test_weights_optimizer_state_and_rng_are_identical_with_and_without_watch():
    def train(watched):
        model = net()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        torch.manual_seed(1)
        if watched:
            steps(model, opt, n=3, updates=True)
        else:
            for _ in range(3):
                x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
        return model, opt, torch.get_rng_state()
    (m1, o1, r1), (m2, o2, r2) = train(False), train(True)
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters(), strict=True))
    s1, s2 = o1.state_dict()["state"], o2.state_dict()["state"]
    assert all(torch.equal(s1[k][f], s2[k][f]) for k in s1 for f in s1[k])
    assert torch.equal(r1, r2)


def test_no_host_sync_inside_an_optimizer_step():
    """gradtrace adds no host read to a step (AdamW reads its own step counters: the same with or without)."""
    def syncs(watched):
        model = net()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        found = []
        with gradtrace.watch(model) if watched else contextlib.nullcontext():
            for _ in range(2):
                opt.zero_grad()
                model(torch.randn(5, 6)).sum().backward()
                with count_host_syncs() as counts:
                    opt.step()
                found.append(dict(counts))
        return found
    assert syncs(True) == syncs(False)


class Custom(torch.optim.Optimizer):
    """An optimizer gradtrace does not know: param groups without an lr."""

    def __init__(self, params):
        super().__init__(params, defaults={"scale": 0.1})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.sub_(group["scale"] * p.grad.sign())


def test_an_optimizer_gradtrace_does_not_know_still_works():
    model = net()
    trace = steps(model, Custom(model.parameters()), n=2)
    (record,) = trace.optimizers.values()
    assert record.name == "Custom#0" and record.lrs == [None] and record.steps == 2
    assert codes(trace) == []


def test_an_optimizer_that_never_stepped_while_watched_gives_no_verdict():
    model = net()
    torch.optim.SGD(model[2].parameters(), lr=0.1)  # built, never stepped
    with gradtrace.watch(model) as trace:
        model(torch.randn(5, 6)).sum().backward()
    assert trace.optimizers == {} and codes(trace) == []


def test_updates_false_measures_nothing_and_a_bad_value_is_refused():
    model = net()
    trace = steps(model, torch.optim.SGD(model.parameters(), lr=0.0), n=2, updates=False)
    (record,) = trace.optimizers.values()
    assert record.updates == {} and "WEIGHTS_UNCHANGED" not in codes(trace)
    with pytest.raises(gradtrace.GradtraceError, match="updates"):
        with gradtrace.watch(model, updates="yes"):
            pass


def test_optimizer_records_survive_save_and_load(tmp_path):
    model = net(torch.bfloat16)
    trace = steps(model, torch.optim.AdamW(model.parameters(), lr=1e-5), n=2)
    trace.save(tmp_path / "t.json")
    loaded = gradtrace.load(tmp_path / "t.json")
    assert loaded.optimizers == trace.optimizers
    assert [str(v) for v in loaded.verdicts()] == [str(v) for v in trace.verdicts()]


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad_between_backward_and_step_leaves_the_weights_unchanged(set_to_none):
    model = net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    with gradtrace.watch(model) as trace:
        for _ in range(2):
            model(torch.randn(5, 6)).sum().backward()
            opt.zero_grad(set_to_none=set_to_none)  # the bug: clears what backward just made
            opt.step()
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
    v = trace.verdicts()[0]
    assert v.code == "WEIGHTS_UNCHANGED" and "between backward() and step()" in v.message
    # set to None: cleared; zeroed in place (set_to_none=False): there, but zero
    assert v.evidence["cleared_before_step"] == set_to_none and v.evidence["zeroed_before_step"] != set_to_none
    assert ("zeroed in place" in v.message) != set_to_none


def test_a_clip_to_a_max_norm_of_zero_is_said_to_zero_the_gradients_in_place():
    """clip_grad_norm_(params, 0.0) (a config's max_grad_norm of 0 meant 'off') multiplies every gradient by
    0: the weights never move. Before, the finding said .grad was cleared by zero_grad()."""
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    with gradtrace.watch(model) as trace:
        for _ in range(2):
            opt.zero_grad()
            model(torch.randn(5, 6)).sum().backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.0)
            opt.step()
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())  # there, and zero
    v = trace.verdicts()[0]
    assert v.code == "WEIGHTS_UNCHANGED" and v.evidence["zeroed_before_step"]
    assert "clip_grad_norm_(..., max_norm=0)" in v.message


def test_a_layer_frozen_with_zeroed_grads_that_momentum_still_moves_is_said():
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with gradtrace.watch(model) as trace:
        for step in range(3):
            opt.zero_grad(set_to_none=False)
            model(torch.randn(5, 6)).sum().backward()
            opt.step()
            if step == 0:
                model[0].requires_grad_(False)  # "freeze the first layer" -- its .grad stays a zero tensor
    frozen_weight = model[0].weight.detach().clone()
    v = next(v for v in trace.verdicts() if v.code == "FROZEN_WHILE_WATCHED")
    assert set(v.evidence["still_updated"]) == {"0.weight", "0.bias"} and "momentum" in v.message
    opt.step()
    assert not torch.equal(frozen_weight, model[0].weight)  # the fault is real: it still moves


def test_a_step_with_a_closure_is_measured_after_the_closure_made_the_gradients():
    """LBFGS and Lightning's automatic optimization run forward and backward inside step(closure)."""
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss
    with gradtrace.watch(model) as trace:
        for _ in range(2):
            opt.step(closure)
    (record,) = trace.optimizers.values()
    assert record.empty_steps == 0 and record.max_ratio > 0
    assert set(record.updates) == {n for n, _ in model.named_parameters()}
    assert codes(trace) == []


def test_a_step_the_grad_scaler_skips_on_overflowed_gradients_is_not_an_error():
    """The scale starts too high: the first step's gradients overflow and GradScaler skips it, as designed."""
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 127, backoff_factor=2.0 ** -120)
    with gradtrace.watch(model) as trace:
        for _ in range(3):
            opt.zero_grad()
            loss = 1e4 * F.cross_entropy(model(torch.randn(5, 6)), torch.randint(0, 3, (5,)))
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    (record,) = trace.optimizers.values()
    assert record.steps == 2 and "backward-1" not in record.passes  # the first step was skipped
    assert trace.passes["backward-1"].nonfinite > 0
    v = next(v for v in trace.verdicts() if v.code == "NONFINITE")
    assert v.severity == "info" and v.evidence["skipped_step"]
    assert [v for v in trace.verdicts() if v.severity != "info"] == []


# ---- steps that make the weights non-finite ----------------------------------------------------------------


def test_a_step_that_turns_finite_weights_nan_is_named_before_the_nan_gradients_it_causes():
    """model.half() with Adam's default eps: eps is 0 in float16, a small gradient's second moment underflows,
    the update divides by zero. The gradients of step 1 are finite; the weights after it are not."""
    model = net(torch.float16)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    trace = steps(model, opt, n=3)
    assert not all(torch.isfinite(p).all() for p in model.parameters())  # the oracle: NaN/Inf weights
    assert trace.passes["backward-1"].nonfinite == 0 and trace.passes["backward-2"].nonfinite > 0
    found = trace.verdicts()
    assert found[0].code == "NONFINITE" and found[0].evidence["updates"] and found[0].evidence["step"] == 1
    assert "eps" in found[0].message and "float16" in found[0].message
    later = [v for v in found if v.code == "NONFINITE" and not v.evidence.get("updates")]
    assert later and all("caused by NONFINITE above" in v.message for v in later)


def test_nan_gradients_that_make_nan_weights_are_not_tiny_updates():
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradtrace.watch(model) as trace:
        for _ in range(2):
            opt.zero_grad()
            out = model(torch.randn(5, 6))
            torch.where(out > 0, torch.sqrt(out), torch.zeros_like(out)).sum().backward()  # NaN from sqrt(<0)
            opt.step()
    assert "NONFINITE" in codes(trace) and "TINY_UPDATES" not in codes(trace)
    assert not [v for v in trace.verdicts() if v.code == "NONFINITE" and v.evidence.get("updates")]


def test_float32_weights_that_do_not_move_because_their_gradients_vanish_say_so():
    """A deep stack of sigmoids: gradients ~1e-8 at the bottom, lr x |g| below float32's resolution of the weights.
    The cause is the gradient flow, not the learning rate (old message: 'lr 0 in their param group, or an update
    that vanishes')."""
    torch.manual_seed(0)
    layers = []
    for _ in range(30):
        layers += [nn.Linear(16, 16), nn.Sigmoid()]
    model = nn.Sequential(*layers, nn.Linear(16, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradtrace.watch(model) as trace:
        for _ in range(2):
            opt.zero_grad()
            F.cross_entropy(model(torch.randn(4, 16)), torch.tensor([0, 1, 0, 1])).backward()
            opt.step()
    first = trace.report().splitlines()[0]
    assert first.startswith("gradtrace diagnosis: WEIGHTS_UNCHANGED: optimizer SGD#0") and "float32" in first
    assert "their gradients vanish: the largest |g| among them is" in first and "saturating activations" in first


@pytest.mark.parametrize("dense_too", [False, True])
def test_sparse_gradients_are_left_unsampled_and_never_break_the_step(dense_too):
    """nn.Embedding(sparse=True): the step hook sampled .grad with a reshape, which sparse tensors refuse, so
    opt.step() raised inside the user's loop. The embedding is left unjudged; a dense layer beside it is not."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Linear(4, 2))
    if not dense_too:
        model[1].requires_grad_(False)
    twin = copy.deepcopy(model)
    opts = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1) for m in (model, twin)]
    batches = [torch.randint(0, 10, (3,)) for _ in range(2)]
    with gradtrace.watch(model) as trace:
        for x in batches:
            opts[0].zero_grad()
            model(x).pow(2).mean().backward()
            opts[0].step()
    for x in batches:
        opts[1].zero_grad()
        twin(x).pow(2).mean().backward()
        opts[1].step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters(), strict=True))
    (record,) = trace.optimizers.values()
    assert record.steps == 2 and "0.weight" not in record.updates
    assert ("1.weight" in record.updates) == dense_too
    assert [v for v in trace.verdicts() if v.severity in ("error", "warning")] == []
