"""GradtraceCallback under DDP: two gloo ranks on 127.0.0.1-free file rendezvous, real Trainers (issue 22).

Before: the callback watched the unwrapped model and read ``.grad`` at the end of
each engine run, before DDP's ``finalize_backward`` had written the averaged
gradient: each rank logged its own local norm (labelled local), a NaN on one
rank was silent on the other, and every rank wrote the same ``gradtrace.json``.
"""
from __future__ import annotations

import json
import os
import time

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("transformers")
pytest.importorskip("peft")

import trainer_ddp_scenarios  # noqa: E402

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")]
WORLD = 2
SPAWN_TIMEOUT_S = 300
REL = 1e-5


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("trainer_ddp")
    store = str(out / "rendezvous")  # a file: no port to choose, none to race for
    here = os.path.dirname(os.path.abspath(__file__))
    ctx = mp.start_processes(trainer_ddp_scenarios.worker, args=(WORLD, store, str(out), here), nprocs=WORLD,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the {WORLD} ranks did not finish within {SPAWN_TIMEOUT_S} s")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)], out


def result(ranks, name):
    results, _ = ranks
    for r, per_rank in enumerate(results):
        assert "crashed" not in per_rank[name], f"rank {r}:\n{per_rank[name]['crashed']}"
    return [per_rank[name] for per_rank in results]


def test_trainer_figures_are_the_reduced_gradients_on_every_rank(ranks):
    seen = result(ranks, "trainer_norms")
    for r in seen:
        assert sorted(r["grad_norm"]) == ["1", "2"]
        for step, logged in r["grad_norm"].items():
            assert r["traced"][f"step-{step}"] == pytest.approx(logged, rel=REL)
        assert r["logged_total_norm"] == pytest.approx(list(r["grad_norm"].values()), rel=REL)
        assert r["scopes"] == ["reduced"] and r["wrapper"] == "DDP"
        assert r["find_unused_parameters"] == r["ddp_find_unused_parameters"]  # read from the wrapper watched
        assert r["runs"] == [2, 2]  # both microbatches (the first under no_sync) in the step's pass
        assert r["errors"] == [] and r["printed"] == []
    assert seen[0]["grad_norm"] == seen[1]["grad_norm"]  # the oracle itself agrees across ranks


def test_files_are_per_rank_and_rank_0_writes_the_merged_trace(ranks):
    seen = result(ranks, "trainer_norms")
    _, out = ranks
    files = sorted(os.listdir(out / "trainer_norms" / "traces"))
    assert files == ["gradtrace.json", "gradtrace.rank0.json", "gradtrace.rank1.json", "step-1.rank0.json",
                     "step-1.rank1.json", "step-2.rank0.json", "step-2.rank1.json"]
    assert all(r["merged_passes"] == ["step-1", "step-2"] for r in seen)
    import gradtrace
    merged = gradtrace.load(out / "trainer_norms" / "traces" / "gradtrace.json")
    assert merged.meta["world_size"] == WORLD
    assert merged.passes["step-2"].total_norm == pytest.approx(float(seen[0]["grad_norm"]["2"]), rel=REL)


def test_a_nan_on_rank_1_is_reported_on_every_rank_with_its_rank(ranks):
    seen = result(ranks, "nan_on_rank_1")
    for rank, r in enumerate(seen):
        assert r["nonfinite"]["step-1"] == 0 and r["nonfinite"]["step-2"] > 0
        first = r["printed"][0]
        assert first.startswith(f"[rank {rank}] gradtrace step 2: NONFINITE: "), r["printed"]


def test_minimal_ddp_run_end_pass_reads_the_averaged_gradient(ranks):
    """``DDP(net)``; ``pass_("s", read_at="run_end")``: the figures were the local ones, labelled reduced."""
    for r in result(ranks, "minimal_run_end"):
        for case in r:
            assert case["scope"] == case["expected_scope"], case
            assert case["norms"] == pytest.approx(case["grad_norms"], rel=1e-12), case


def test_grpo_figures_are_the_reduced_gradients_on_every_rank(ranks):
    for r in result(ranks, "grpo_norms"):
        assert sorted(r["grad_norm"]) == ["1", "2"]
        for step, logged in r["grad_norm"].items():
            assert r["traced"][f"step-{step}"] == pytest.approx(logged, rel=REL)
        assert r["scopes"] == ["reduced"]
        assert {"advantages", "S", "completion_mask", "rewards/characters"} <= set(r["tensors"])
        assert r["errors"] == [] and r["printed"] == []
