"""trace.gather() and capture under torch.distributed (gloo, loopback, two processes).

One spawn runs every scenario of ``dist_scenarios`` (each rank checks its own
figures against an oracle there); each test below reads one scenario's result.
"""
import json
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import gradtrace

import dist_scenarios

pytestmark = [pytest.mark.slow,  # real subprocesses: run by the full suite, not the dev loop
              pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")]
WORLD = 2
SPAWN_TIMEOUT_S = 600


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(out: str, only=(), backend: str = "gloo") -> list:
    """Every scenario on WORLD ranks, bounded in time; each rank's results."""
    ctx = mp.start_processes(dist_scenarios.worker, args=(WORLD, free_port(), out, list(only), backend),
                             nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the {WORLD} ranks did not finish within {SPAWN_TIMEOUT_S} s")
    return [json.loads(open(os.path.join(out, f"rank{r}.json")).read()) for r in range(WORLD)]


@pytest.fixture(scope="module", params=[
    "gloo", pytest.param("nccl", marks=pytest.mark.skipif(torch.cuda.device_count() < WORLD or not dist.is_nccl_available(),
                                                          reason=f"NCCL needs {WORLD} GPUs"))])
def ranks(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    only = [n for n in os.environ.get("GRADTRACE_DIST_ONLY", "").split(",") if n]
    if request.param == "nccl":
        only = [n for n in dist_scenarios.NCCL_SCENARIOS if not only or n in only]
    return run_ranks(str(out), only, request.param)


def result(ranks, name):
    if name not in ranks[0]:
        pytest.skip(f"{name} does not run on this backend")
    for r, results in enumerate(ranks):
        assert "crashed" not in results[name], f"rank {r}:\n{results[name]['crashed']}"
    return [results[name] for results in ranks]


def test_ddp_figures_are_grad_after_backward_returns(ranks):
    for r in result(ranks, "ddp_figures"):
        assert set(r) == {f"bucket_view={b},labelled={l}" for b in (True, False) for l in (True, False)}
        for case in r.values():
            assert case == {"mismatches": 0, "scopes": ["reduced"], "passes": dist_scenarios.STEPS}


def test_no_sync_accumulation_is_local_then_the_averaged_sum(ranks):
    for r in result(ranks, "ddp_no_sync"):
        assert r["local_scope"] == "local" and r["local_mismatches"] == []
        assert r["step_scope"] == "reduced" and r["step_mismatches"] == []
        assert r["stale"] == []


def test_autograd_grad_on_the_module_gives_local_gradients(ranks):
    for r in result(ranks, "ddp_autograd_grad"):
        assert r["scope"] == "local" and r["mismatches"] == []
        assert r["rank_figures_match"] and r["ranks"] == [0, 1]


@pytest.mark.parametrize("name", ["fsdp2", "fsdp1"])
def test_fsdp_gather_gives_global_figures(ranks, name):
    results = result(ranks, name)
    for r in results:
        assert r["scope"] == "sharded"
        assert r["unlabelled_bad"] == [] and r["labelled_bad"] == []
        assert "ZERO_GRADS" not in r["local_codes"] and "NO_COVERAGE" not in r["local_codes"]
        assert r["merged_codes"] == []


def test_fsdp2_local_trace_counts_runs_and_says_it_is_shard_local(ranks):
    for r in result(ranks, "fsdp2"):
        assert r["passes"] == ["backward-1", "X"] and r["runs"] == 1
        assert r["local_report_says_shard_local"] and r["merged_report_says_global"]
        assert r["empty_shards_zero"] == []


def test_fsdp1_names_are_the_users(ranks):
    for r in result(ranks, "fsdp1"):
        assert r["params"] == [n for n, _ in dist_scenarios.fsdp_model().named_parameters()]


def test_nonfinite_on_one_rank_is_in_the_merged_verdicts_naming_it(ranks):
    for r in result(ranks, "nan_on_rank_1"):
        assert r["ranks"] == [[1]] and "on rank(s) 1" in r["messages"][0]
        assert r["report_has_per_rank"]


def test_stale_grads_on_one_rank_name_it(ranks):
    for r in result(ranks, "stale_on_rank_1"):
        assert r["ranks"] == [[1]]


def test_merged_view_uses_the_union_and_names_the_diverging_rank(ranks):
    for r in result(ranks, "union_and_divergence"):
        assert "UNUSED_PARAMS" not in r["codes"]  # rank 1 used head b
        assert r["divergence"] == [["error", "X", [0], ["b.bias", "b.weight"]]]
        assert r["loaded_rank_keys"] == {"X": [0, 1]} and r["loaded_key_types"] == ["int"]
        assert "RANK_DIVERGENCE" in r["loaded_codes"] and r["report_world"]


def test_declared_branching_makes_divergence_a_warning(ranks):
    for r in result(ranks, "find_unused"):
        assert r["divergence"] == [["warning", "X", [0], ["b.bias", "b.weight"]]]


def test_a_wrapper_prefix_on_one_rank_is_not_divergence(ranks):
    for r in result(ranks, "wrapper_prefix"):
        assert r["codes"] == []
        assert r["params"] == [n for n, _ in dist_scenarios.six_params().named_parameters()]


def test_ranks_that_differ_are_named(ranks):
    for r in result(ranks, "mismatched_passes"):
        assert "passes differ: rank 0 has ['X'], rank 1 has ['Y']" in r["names"]
        assert "rank 1 has ['backward-1', 'backward-2']" in r["extra"]
        assert ("only rank 1 watches 2 parameter(s): bias, weight; rank 1 does not watch 6 parameter(s): "
                "0.bias, 0.weight, 2.bias, 2.weight, 4.bias, ...") in r["params"]


def test_the_local_trace_survives_ddps_unfinished_reduction_error(ranks):
    for r in result(ranks, "expected_reduction"):
        assert r["error"]
        assert r["missing"] == {"backward-1": ["module.b.bias", "module.b.weight"]}
        # the first line names the cause: the head no rank used, not the failure it led to
        assert r["first"] == ["UNUSED_PARAMS", "error", ["module.b.bias", "module.b.weight"]]
        assert r["failure_points_to"] == ["UNUSED_PARAMS"]


def test_a_rank_that_never_gathers_is_named_within_the_timeout(ranks):
    r = result(ranks, "missing_rank")[0]
    assert "rank(s) 1 of the 2-rank group did not call gather() within 2 s" in r["message"]
    assert r["seconds"] < 30


def test_gather_without_a_process_group_is_a_clear_error():
    model = nn.Linear(2, 2)
    with gradtrace.watch(model) as trace:
        pass
    with pytest.raises(gradtrace.GradtraceError, match="init_process_group"):
        trace.gather()
