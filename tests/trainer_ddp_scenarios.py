"""What every rank runs in tests/test_trainer_ddp.py: real Trainers under DDP on gloo, two ranks.

One spawn runs every scenario (starting processes and importing transformers
costs seconds). The group is initialised from a file (``file://``), so no port
is chosen and none can be taken by another process; accelerate finds it
initialised and uses it. Each rank writes what it saw to ``<out>/rank<r>.json``.
The oracle is the Trainer itself: the ``grad_norm`` it logs on every rank is the
norm of the all-reduced gradients.
"""
from __future__ import annotations

import contextlib
import datetime
import io
import json
import os
import traceback
import warnings

import torch
import torch.distributed as dist

STEPS = 2


def _quiet():
    warnings.filterwarnings("ignore")
    import transformers
    transformers.logging.set_verbosity_error()


def _lm_trainer(out_dir, callbacks, **overrides):
    import transformers
    from tiny_trainer import lm_data, make_llama, make_tokenizer, training_args, with_lora
    tokenizer = make_tokenizer()
    args = training_args(out_dir, max_steps=STEPS, **overrides)
    return transformers.Trainer(model=with_lora(make_llama(len(tokenizer))), args=args,
                                train_dataset=lm_data(tokenizer, n=16),
                                data_collator=transformers.default_data_collator, callbacks=callbacks)


def _run(trainer, callback):
    """Train; what the callback printed (stdout also holds the Trainer's own log lines)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        callback.attach(trainer)
        trainer.train()
    lines = out.getvalue().splitlines()
    assert all(line in lines for line in callback.printed)
    return callback.printed


def trainer_norms(rank, world, out):
    """LoRA, accumulation 2: every step's figures equal the Trainer's grad_norm, on every rank."""
    from gradtrace.integrations.transformers import GradtraceCallback
    from tiny_trainer import LogCollector
    collector = LogCollector()
    callback = GradtraceCallback(save_dir=os.path.join(out, "traces"), save_every=1)
    trainer = _lm_trainer(os.path.join(out, "lm"), [collector], gradient_accumulation_steps=2)
    printed = _run(trainer, callback)
    trace = callback.trace
    return {"grad_norm": {str(k): v for k, v in collector.grad_norms().items()},
            "traced": {n: p.total_norm for n, p in trace.passes.items()},
            "scopes": sorted({p.scope for p in trace.passes.values()}),
            "runs": [p.runs for p in trace.passes.values()],
            "wrapper": trace.meta.get("wrapper"),
            "find_unused_parameters": trace.meta.get("find_unused_parameters"),
            "ddp_find_unused_parameters": bool(trainer.model_wrapped.find_unused_parameters),
            "logged_total_norm": [logs.get("gradtrace/total_norm") for _, logs in collector.logs if "grad_norm" in logs],
            "errors": [str(v) for v in trace.verdicts() if v.severity in ("error", "warning")],
            "printed": printed,
            "merged_passes": list(callback.merged.passes) if callback.merged is not None else None,
            "files": sorted(os.listdir(os.path.join(out, "traces")))}


def nan_on_rank_1(rank, world, out):
    """A NaN in rank 1's loss at step 2: after DDP's all-reduce it is every rank's; every rank says so."""
    from gradtrace.integrations.transformers import GradtraceCallback
    from tiny_trainer import LogCollector
    collector = LogCollector()
    callback = GradtraceCallback()
    trainer = _lm_trainer(os.path.join(out, "nan"), [collector])
    compute_loss = trainer.compute_loss

    def poisoned(model, inputs, *args, **kwargs):
        loss = compute_loss(model, inputs, *args, **kwargs)
        if rank == 1 and trainer.state.global_step == 1:  # step 2 is being computed
            loss = loss * float("nan")
        return loss

    trainer.compute_loss = poisoned
    printed = _run(trainer, callback)
    trace = callback.trace
    return {"grad_norm": {str(k): v for k, v in collector.grad_norms().items()},
            "nonfinite": {n: p.nonfinite for n, p in trace.passes.items()},
            "printed": printed}


def grpo_norms(rank, world, out):
    """TRL's GRPOTrainer under DDP: the figures equal its grad_norm on every rank; no false finding."""
    from gradtrace.integrations.transformers import GradtraceCallback
    from tiny_trainer import LogCollector, grpo_trainer, make_llama, make_tokenizer, with_lora
    tokenizer = make_tokenizer()
    collector = LogCollector()
    trainer = grpo_trainer(os.path.join(out, "grpo"), with_lora(make_llama(len(tokenizer))), tokenizer,
                           [collector], per_device_train_batch_size=4, num_generations=4)
    callback = GradtraceCallback()
    printed = _run(trainer, callback)
    trace = callback.trace
    return {"grad_norm": {str(k): v for k, v in collector.grad_norms().items()},
            "traced": {n: p.total_norm for n, p in trace.passes.items()},
            "scopes": sorted({p.scope for p in trace.passes.values()}),
            "tensors": sorted(trace.tensors),
            "errors": [str(v) for v in trace.verdicts() if v.severity in ("error", "warning")],
            "printed": printed}


def minimal_run_end(rank, world, out):
    """The issue's minimal repro: a ``read_at="run_end"`` pass over DDP, with and without bucket views and
    accumulation (no_sync first): the figures are ``.grad`` after backward() returned, i.e. averaged."""
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel as DDP

    import gradtrace
    cases = []
    for bucket_view in (False, True):
        for accumulate in (1, 2):
            torch.manual_seed(0)
            ddp = DDP(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).double(),
                      gradient_as_bucket_view=bucket_view)
            g = torch.Generator().manual_seed(rank)
            with gradtrace.watch(ddp) as trace:
                with trace.pass_("s", step_start=True, read_at="run_end"):
                    for micro in range(accumulate):
                        x = torch.randn(5, 4, generator=g, dtype=torch.float64)
                        sync = contextlib.nullcontext() if micro == accumulate - 1 else ddp.no_sync()
                        with sync:
                            ddp(x).pow(2).mean().backward()
            p = trace.passes["s"]
            cases.append({"bucket_view": bucket_view, "accumulate": accumulate, "scope": p.scope,
                          "expected_scope": "reduced",
                          "norms": {n: r.norm for n, r in p.records.items()},
                          "grad_norms": {f"module.{n}": float(q.grad.norm()) for n, q in
                                         ddp.module.named_parameters()}})
    return cases


SCENARIOS = {"minimal_run_end": minimal_run_end, "trainer_norms": trainer_norms, "nan_on_rank_1": nan_on_rank_1, "grpo_norms": grpo_norms}


def worker(rank: int, world: int, store: str, out: str, here: str) -> None:
    import sys
    sys.path.insert(0, here)  # tiny_trainer
    torch.set_num_threads(1)
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(world), "OMP_NUM_THREADS": "1"})
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    _quiet()
    results = {}
    try:
        for name, scenario in SCENARIOS.items():
            try:
                results[name] = scenario(rank, world, os.path.join(out, name))
            except Exception:  # the test shows the traceback; the other scenarios still run
                results[name] = {"crashed": traceback.format_exc()}
            dist.barrier()
    finally:
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(results, f, default=str)
        if dist.is_initialized():
            dist.destroy_process_group()
