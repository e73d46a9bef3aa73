"""DeepSpeed ZeRO 0-3 under gradtrace (gloo, two CPU ranks): exact figures or unknown with the reason.

One spawn runs every scenario of ``ds_scenarios`` for every stage; each test reads
one scenario's result. Skipped where deepspeed is not installed (it is in the
``test`` and ``distributed`` extras, never a dependency of gradtrace itself).
"""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch.distributed as dist

import ds_scenarios
from spawn_ranks import result, run_ranks

# Looked up, not imported: importing deepspeed takes seconds, and collection of the dev loop pays for it.
HAVE_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
pytestmark = [pytest.mark.slow,  # real subprocesses: run by the full suite, not the dev loop
              pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")]
WORLD = 2
STAGES = ds_scenarios.STAGES
ZERO = (1, 2, 3)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    if not HAVE_DEEPSPEED:
        pytest.skip("deepspeed is not installed (pip install gradtrace[distributed])")
    only = [n for n in os.environ.get("GRADTRACE_DS_ONLY", "").split(",") if n]
    return run_ranks(ds_scenarios.worker, WORLD, str(tmp_path_factory.mktemp("deepspeed")), (only,))


def test_watching_a_model_never_imports_deepspeed():
    code = ("import sys, torch, gradtrace\n"
            "m = torch.nn.Linear(2, 2)\n"
            "with gradtrace.watch(m) as t:\n"
            "    m(torch.randn(3, 2)).sum().backward()\n"
            "t.report()\n"
            "assert 'deepspeed' not in sys.modules, 'gradtrace imported deepspeed'\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


@pytest.mark.parametrize("stage", STAGES)
def test_a_pass_per_optimizer_step_equals_deepspeeds_own_figures(ranks, stage):
    for r in result(ranks, f"one_pass_per_step/{stage}"):
        assert r["wrapper"] == "DeepSpeed" and r["zero_stage"] == stage
        assert r["scope"] == ("reduced" if stage == 0 else "sharded")
        assert r["runs"] == 2 and r["covered"] == 6
        assert r["bad_vs_deepspeed"] == [] and r["bad_vs_hand"] == []  # safe_get_full_grad, and by hand
        assert ds_scenarios.close(r["total"], r["hand_total"])
        if stage:  # ZeRO-0 with a plain optimizer computes no global norm
            assert ds_scenarios.close(r["total"], r["engine_norm"])
        assert r["codes"] == []


@pytest.mark.parametrize("stage", STAGES)
def test_zero_3_names_and_full_shapes(ranks, stage):
    shapes = {"0.weight": [8, 4], "0.bias": [8], "2.weight": [8, 8], "2.bias": [8], "4.weight": [1, 8], "4.bias": [1]}
    for r in result(ranks, f"one_pass_per_step/{stage}"):
        assert r["params"] == list(shapes) and r["shapes"] == shapes
        assert r["local_shapes"] == {f"module.{n}": s for n, s in shapes.items()}  # never the [0] placeholders


@pytest.mark.parametrize("stage", STAGES)
def test_a_pass_per_micro_step_is_exact_or_says_why_not(ranks, stage):
    for r in result(ranks, f"per_micro_step/{stage}"):
        assert r["errors"] == []
        # The second micro-step's pass finds the first one's gradient in DeepSpeed's buffers.
        assert r["mb1"]["cleared"] == 6 and r["mb1"]["because"]
        if stage in (1, 2):  # nothing readable before the accumulation boundary
            assert r["mb0"]["cleared"] == 6 and "accumulation boundary" in r["mb0"]["because"]
        else:  # ZeRO-0: .grad holds the local gradient; ZeRO-3 reduces every micro-step
            assert r["mb0"]["cleared"] == 0
        if stage == 3:
            assert r["mb0_bad"] == []
        assert r["codes"] == ["FIGURES_UNKNOWN"]


@pytest.mark.parametrize("stage", STAGES)
def test_unlabelled_engine_backward_is_one_exact_pass_per_call(ranks, stage):
    for r in result(ranks, f"unlabelled/{stage}"):
        assert r["passes"] == ["backward-1", "backward-2"]
        assert r["bad"] == [[], []] and r["codes"] == []


@pytest.mark.parametrize("stage", ZERO)
def test_a_plain_loss_backward_is_read_after_deepspeeds_reduction(ranks, stage):
    for r in result(ranks, f"plain_backward/{stage}"):
        assert r["bad"] == [] and r["unknown"]["cleared"] == 0 and r["codes"] == []


@pytest.mark.parametrize("stage", ZERO)
def test_the_engines_module_watched_gives_unknown_figures_and_says_to_watch_the_engine(ranks, stage):
    for r in result(ranks, f"module_watched/{stage}"):
        assert r["unknown"]["cleared"] == 6 and "Watch the engine" in r["unknown"]["because"]
        assert r["codes"] == ["FIGURES_UNKNOWN"] and r["errors"] == []
        if stage == 3:
            assert r["shapes"]["0.weight"] == [8, 4]


@pytest.mark.parametrize("stage", ds_scenarios.TRAINER_STAGES)
def test_the_hf_trainer_with_deepspeed_gives_its_own_grad_norm(ranks, stage):
    for r in result(ranks, f"trainer/{stage}"):
        assert r["engine"] == "DeepSpeedEngine" and r["wrapper"] == "DeepSpeed"
        assert list(r["traced"]) == ["step-1", "step-2"] and r["unknown"] == [0, 0]
        for step, norm in r["grad_norm"].items():
            assert ds_scenarios.close(r["traced"][f"step-{step}"], norm, 1e-5), (step, r)
        assert r["codes"] == []


def test_gradtraces_own_trainer_callback_watches_the_engine(ranks):
    for r in result(ranks, "callback/3"):
        assert r["wrapper"] == "DeepSpeed" and r["zero_stage"] == 3
        assert len(r["merged"]) == len(r["grad_norm"]) == 2
        for traced, norm in zip(r["merged"], r["grad_norm"], strict=True):
            assert ds_scenarios.close(traced, norm, 1e-5), r
        assert r["logged_keys"] == ["gradtrace/shard_total_norm"]  # per step, before gather: a shard's
        assert r["codes"] == []
