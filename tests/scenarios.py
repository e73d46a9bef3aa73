"""Realistic gradient bugs, rebuilt in miniature, each with its fixed twin.

Each scenario reproduces a bug users report in public threads (PyTorch forum,
GitHub issues of transformers / peft / TRL): ``run(fixed=False)`` makes the bug
really happen on a small model under ``gradtrace.watch`` and returns the trace;
``run(fixed=True)`` is the same code with the one-line fix. ``expect`` is the
code the first printed line must carry and ``names`` the words it must contain
(the module, tensor, parameter or fix that is the cause).

Used by ``tests/test_scenarios.py`` (the assertions) and by
``python tests/scenarios.py`` (first-line accuracy of the whole suite, also
runnable against another gradtrace with PYTHONPATH, to measure before/after).
Only public gradtrace API is used here, so an older gradtrace runs it too.
"""
from __future__ import annotations

import contextlib
import os
from collections import OrderedDict
import sys
from dataclasses import dataclass
from typing import Callable, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import gradtrace


@dataclass
class Scenario:
    name: str
    source: str  # where users report it
    run: Callable[[bool], "gradtrace.Trace"]
    expect: str
    names: Tuple[str, ...]
    slow: bool = False


SCENARIOS: List[Scenario] = []


def scenario(expect: str, names: Tuple[str, ...], source: str, slow: bool = False):
    def register(fn):
        SCENARIOS.append(Scenario(fn.__name__, source, fn, expect, names, slow))
        return fn
    return register


def seeded(seed: int = 0) -> None:
    torch.manual_seed(seed)


class Tower(nn.Module):
    """embed -> block -> head, the shape of most small models in bug reports."""

    def __init__(self, detach: bool = False, encoder_no_grad: bool = False):
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.block = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)
        self.detach, self.encoder_no_grad = detach, encoder_no_grad

    def forward(self, x):
        if self.encoder_no_grad:
            with torch.no_grad():  # "freeze the encoder" -- but it was meant to be fine-tuned
                h = self.embed(x)
        else:
            h = self.embed(x)
        h = torch.tanh(self.block(h))
        if self.detach:
            h = h.detach()  # "to save memory" / a stale copy-paste
        return self.head(h)


def batch(n: int = 6):
    return torch.randn(n, 8), torch.randint(0, 4, (n,))


def train_steps(model, steps=2, lr=0.1, opt=None, zero_grad=True, **watch):
    opt = opt or torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    with gradtrace.watch(model, **watch) as trace:
        for _ in range(steps):
            x, y = batch()
            if zero_grad:
                opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    return trace


# ---- cuts in the forward -----------------------------------------------------------------------------


@scenario("DETACHED_OUTPUT", ("'block'",), "forum: 'grad is None for the first layers' (a .detach() in forward)")
def detach_in_forward(fixed):
    seeded()
    return train_steps(Tower(detach=not fixed))


@scenario("GRAPH_CUT", ("embed", "no_grad"), "forum: 'encoder weights never change' (torch.no_grad in forward)")
def no_grad_in_forward(fixed):
    seeded()
    return train_steps(Tower(encoder_no_grad=not fixed))


@scenario("DETACHED_OUTPUT", ("'embed'",),
          "issue 19 item 1: a rollout under no_grad, then a .detach() on the path of the loss")
def rollout_then_detach(fixed):
    seeded()
    model = Tower()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradtrace.watch(model) as trace:
        for step in range(2):
            with trace.pass_(f"step-{step}"):
                x, y = batch()
                with torch.no_grad():  # generation / rollout: data only
                    model(x).argmax(-1)
                h = model.embed(x)
                h = h if fixed else h.detach()
                F.cross_entropy(model.head(torch.tanh(model.block(h))), y).backward()
            opt.step()
            opt.zero_grad()
    return trace


@scenario("DETACHED_OUTPUT", ("model", "argmax"), "forum: 'loss does not require grad' after argmax in the loss")
def argmax_in_loss(fixed):
    seeded()
    model = Tower()
    with gradtrace.watch(model) as trace:
        x, y = batch()
        logits = model(x)
        with contextlib.suppress(RuntimeError):
            with trace.pass_("step"):
                if fixed:
                    F.cross_entropy(logits, y).backward()
                else:  # "accuracy as a loss": argmax has no gradient
                    (logits.argmax(-1) != y).float().mean().backward()
    return trace


@scenario("NO_PASSES", ("model", ".item()"), "forum: 'loss = torch.tensor(loss.item(), requires_grad=True)'")
def loss_rebuilt_from_item(fixed):
    seeded()
    model = Tower()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradtrace.watch(model) as trace:
        for _ in range(2):
            x, y = batch()
            loss = F.cross_entropy(model(x), y)
            if not fixed:
                loss = torch.tensor(loss.item(), requires_grad=True)  # "fix" for 'does not require grad'
            opt.zero_grad()
            loss.backward()
            opt.step()
    return trace


@scenario("GRAPH_CUT", ("no_grad",), "forum: torch.set_grad_enabled(False) left on after validation")
def grad_left_disabled_after_validation(fixed):
    seeded()
    model = Tower()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradtrace.watch(model) as trace:
        torch.set_grad_enabled(False)  # validation
        model(batch()[0])
        if fixed:
            torch.set_grad_enabled(True)
        try:
            with contextlib.suppress(RuntimeError):
                with trace.pass_("train-step"):
                    x, y = batch()
                    F.cross_entropy(model(x), y).backward()
                    opt.step()
        finally:
            torch.set_grad_enabled(True)
    return trace


@scenario("PASS_FAILED", ("in place",), "forum: 'modified by an inplace operation' (ReLU(inplace=True) on a saved tensor)")
def inplace_on_saved_tensor(fixed):
    seeded()
    model = Tower()
    with gradtrace.watch(model) as trace:
        with contextlib.suppress(RuntimeError):
            with trace.pass_("step"):
                x, y = batch()
                h = torch.sigmoid(model.embed(x))  # sigmoid saves its output for backward
                if fixed:
                    h = h * 2
                else:
                    h.mul_(2)
                F.cross_entropy(model.head(model.block(h)), y).backward()
    return trace


@scenario("PASS_FAILED", (".detach()", "hidden state"), "forum: 'Trying to backward through the graph a second time' (RNN state)")
def rnn_state_not_detached(fixed):
    seeded()
    rnn, head = nn.GRUCell(8, 8), nn.Linear(8, 4)
    model = nn.ModuleDict({"rnn": rnn, "head": head})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    h = torch.randn(4, 8)
    with gradtrace.watch(model) as trace:
        with contextlib.suppress(RuntimeError):
            for step in range(3):
                with trace.pass_(f"step-{step}"):
                    h = rnn(torch.randn(4, 8), h.detach() if fixed else h)
                    opt.zero_grad()
                    F.cross_entropy(head(h), torch.randint(0, 4, (4,))).backward()
                    opt.step()
    return trace


class Checkpointed(nn.Module):
    def __init__(self, reentrant):
        super().__init__()
        self.embed = nn.Embedding(20, 16)
        self.embed.weight.requires_grad_(False)  # frozen embeddings, adapters/blocks trained
        self.block = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)
        self.reentrant = reentrant

    def forward(self, ids):
        h = self.embed(ids)
        h = torch.utils.checkpoint.checkpoint(self.block, h, use_reentrant=self.reentrant)
        return self.head(h).mean(1)


@scenario("GRAPH_CUT", ("checkpoint", "enable_input_require_grads"),
          "transformers/peft: gradient checkpointing with frozen embeddings -> 'None of the inputs have requires_grad'")
def checkpointing_with_frozen_embeddings(fixed):
    seeded()
    model = Checkpointed(reentrant=not fixed)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return train_steps_ids(model)


def train_steps_ids(model, steps=2):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with gradtrace.watch(model) as trace:
        for _ in range(steps):
            opt.zero_grad()
            F.cross_entropy(model(torch.randint(0, 20, (4, 5))), torch.randint(0, 4, (4,))).backward()
            opt.step()
    return trace


# ---- the optimizer ------------------------------------------------------------------------------------


@scenario("STALE_GRADS", ("zero_grad",), "forum: 'loss explodes' -- optimizer.zero_grad() never called")
def forgot_zero_grad(fixed):
    seeded()
    return train_steps(Tower(), steps=3, zero_grad=fixed)


@scenario("NOT_IN_OPTIMIZER", ("embed", "unfrozen"), "forum: 'unfrozen layers do not train' (optimizer built before unfreezing)")
def optimizer_built_before_unfreezing(fixed):
    seeded()
    model = Tower()
    model.embed.requires_grad_(False)
    opt = None if fixed else torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.embed.requires_grad_(True)  # stage 2: unfreeze the backbone
    opt = opt or torch.optim.SGD(model.parameters(), lr=0.1)
    return train_steps(model, opt=opt)


@scenario("NOT_IN_OPTIMIZER", ("another copy",), "forum: optimizer built from a deepcopy of the model")
def optimizer_of_another_copy(fixed):
    import copy
    seeded()
    model = Tower()
    opt = torch.optim.Adam((model if fixed else copy.deepcopy(model)).parameters(), lr=1e-3)
    return train_steps(model, opt=opt)


@scenario("WEIGHTS_UNCHANGED", ("zero_grad", "between backward() and step()"),
          "forum: 'model not learning' -- optimizer.zero_grad() between loss.backward() and optimizer.step()")
def zero_grad_between_backward_and_step(fixed):
    seeded()
    model = Tower()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with gradtrace.watch(model) as trace:
        for _ in range(3):
            x, y = batch()
            if fixed:
                opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            if not fixed:
                opt.zero_grad()
            opt.step()
    return trace


@scenario("FROZEN_WHILE_WATCHED", ("embed", "momentum"),
          "forum: 'frozen layers still update' -- requires_grad=False with SGD momentum and zeroed grads")
def frozen_layer_still_updates(fixed):
    seeded()
    model = Tower()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with gradtrace.watch(model) as trace:
        for step in range(3):
            x, y = batch()
            opt.zero_grad(set_to_none=False)
            F.cross_entropy(model(x), y).backward()
            opt.step()
            if step == 0 and not fixed:
                model.embed.requires_grad_(False)  # stage 2: freeze the embedding
    return trace


@scenario("WEIGHTS_UNCHANGED", ("lr", "0"), "forum: 'weights do not change' -- LambdaLR returning 0")
def scheduler_stuck_at_zero(fixed):
    seeded()
    model = Tower()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 if fixed else 0.0 * step)
    with gradtrace.watch(model) as trace:
        for _ in range(3):
            x, y = batch()
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()
    return trace


@scenario("WEIGHTS_UNCHANGED", ("bfloat16",), "forum: 'pure bf16 training: loss does not decrease'")
def bf16_weights_small_lr(fixed):
    seeded()
    model = Tower()
    if not fixed:
        model = model.to(torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5 if not fixed else 1e-3)
    with gradtrace.watch(model) as trace:
        for _ in range(2):
            x, y = batch()
            opt.zero_grad()
            F.cross_entropy(model(x.to(next(model.parameters()).dtype)).float(), y).backward()
            opt.step()
    return trace


@scenario("TINY_UPDATES", ("lr",), "forum: 'model does not learn' -- learning rate 1e-9 (a typo for 1e-4)")
def learning_rate_typo(fixed):
    seeded()
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1e-3)  # small weights: updates of 1e-9 still show (a tiny, not a rounded-away, step)
    return train_steps(model, lr=1e-4 if fixed else 1e-11, opt=None if fixed else torch.optim.SGD(model.parameters(), lr=1e-11))


@scenario("CLIP_BEFORE_UNSCALE", ("unscale_",), "forum: AMP -- clip_grad_norm_ called before scaler.unscale_")
def clip_before_unscale(fixed):
    seeded()
    model = Tower()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    with gradtrace.watch(model) as trace:
        for _ in range(2):
            x, y = batch()
            opt.zero_grad()
            scaler.scale(F.cross_entropy(model(x), y)).backward()
            if fixed:
                scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            scaler.step(opt)
            scaler.update()
    return trace


class GAN(nn.Module):
    def __init__(self):
        super().__init__()
        self.G = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8))
        self.D = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))


@scenario("NOT_IN_OPTIMIZER", ("D.",), "forum: GAN -- the discriminator's optimizer built from the generator's parameters")
def gan_wrong_optimizer(fixed):
    seeded()
    gan = GAN()
    opt_g = torch.optim.Adam(gan.G.parameters(), lr=1e-3)
    opt_d = torch.optim.Adam((gan.D if fixed else gan.G).parameters(), lr=1e-3)
    bce = nn.BCEWithLogitsLoss()
    with gradtrace.watch(gan) as trace:
        for _ in range(2):  # the DCGAN loop: one pass per optimizer step
            real, z = torch.randn(6, 8), torch.randn(6, 4)
            gan.D.zero_grad()
            (bce(gan.D(real), torch.ones(6, 1)) + bce(gan.D(gan.G(z).detach()), torch.zeros(6, 1))).backward()
            opt_d.step()
            gan.G.zero_grad()
            bce(gan.D(gan.G(z)), torch.ones(6, 1)).backward()
            opt_g.step()
    return trace


# ---- registered tensors: GRPO-shaped losses ----------------------------------------------------------------


class Policy(nn.Module):
    def __init__(self, vocab=12, dim=16):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.body = nn.Linear(dim, dim)
        self.lm_head = nn.Linear(dim, vocab)

    def forward(self, ids):
        return self.lm_head(torch.tanh(self.body(self.embed(ids))))


def grpo_steps(policy, rewards_for, *, steps=3, s_no_grad_at=None, mask_for=None, register_s=True):
    """A GRPO step in miniature: generate under no_grad, score, group-normalise, -(A * S) masked mean."""
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    groups, size, length = 2, 4, 5
    with gradtrace.watch(policy) as trace:
        for step in range(steps):
            with trace.pass_(f"step-{step}", step_start=True):
                ids = torch.randint(0, 12, (groups * size, length))
                with torch.no_grad():  # generation: data only
                    policy(ids).argmax(-1)
                rewards = rewards_for(step, groups * size)
                grouped = rewards.view(groups, size)
                adv = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4))
                trace.tensor("rewards", grouped, role="group")
                A = trace.tensor("A", adv, role="group").reshape(-1)
                mask = mask_for(step) if mask_for else torch.ones(groups * size, length, dtype=torch.bool)
                trace.tensor("completion_mask", mask, role="mask")
                with torch.no_grad() if s_no_grad_at == step else contextlib.nullcontext():
                    logps = torch.log_softmax(policy(ids), -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
                S = trace.tensor("S", logps) if register_s else logps
                loss = -((A.unsqueeze(1) * S) * mask).sum() / mask.sum().clamp(min=1)
                if loss.requires_grad:
                    loss.backward()
            opt.step()
            opt.zero_grad()
    return trace


def varied(step, n):
    return torch.arange(n, dtype=torch.float32) % 3 + step


@scenario("CONSTANT_ROWS", ("'rewards'", "2 of 2 groups", "step-1"),
          "TRL issues: 'GRPO loss is zero' (every group's rewards equal)")
def grpo_rewards_saturate(fixed):
    seeded()
    return grpo_steps(Policy(), lambda step, n: varied(step, n) if fixed or step == 0 else torch.ones(n))


@scenario("ALL_ZERO_VALUES", ("completion_mask", "step-2"), "TRL issues: completion mask empty (prompt length mismatch)")
def grpo_mask_empty_at_step(fixed):
    seeded()
    full = torch.ones(8, 5, dtype=torch.bool)
    return grpo_steps(Policy(), varied, mask_for=lambda step: full if fixed or step < 2 else torch.zeros_like(full))


@scenario("TENSOR_NO_GRAD", ("'S'", "no_grad"), "issue 19: sequence log-probs computed under torch.no_grad()")
def grpo_logprobs_under_no_grad(fixed):
    seeded()
    return grpo_steps(Policy(), varied, steps=1, s_no_grad_at=None if fixed else 0)


@scenario("NONFINITE", ("rewards",), "TRL issues: NaN rewards from a reward function")
def grpo_nan_rewards(fixed):
    seeded()

    def rewards(step, n):
        r = varied(step, n)
        if not fixed and step == 1:
            r[0] = float("nan")
        return r
    return grpo_steps(Policy(), rewards)


@scenario("STALE_GRADS", ("zero_grad", "accumulate=True"), "issue 19 item 7: a probe that forgets zero_grad() before its X pass")
def probe_forgets_zero_grad(fixed):
    seeded()
    model = Tower()
    with gradtrace.watch(model) as trace:
        x, y = batch()
        F.cross_entropy(model(x), y).backward()  # a warm-up / sanity check left .grad filled
        if fixed:
            model.zero_grad()
        with trace.pass_("X"):
            F.cross_entropy(model(x), y).backward()
    return trace


# ---- transformers / peft ---------------------------------------------------------------------------------------


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    seeded()
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    return LlamaForCausalLM(config)


def lora(model):
    from peft import LoraConfig, get_peft_model
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            lora_dropout=0.0))


@scenario("NO_COVERAGE", ("adapters", "disable_adapter"),
          "peft/TRL: policy log-probs computed inside disable_adapter() (the reference model's context)", slow=True)
def lora_policy_with_adapters_disabled(fixed):
    model = lora(tiny_llama())
    ids = torch.randint(0, 64, (2, 6))
    with gradtrace.watch(model) as trace:
        with contextlib.suppress(RuntimeError):
            with trace.pass_("step-1"):
                with torch.no_grad(), model.disable_adapter():
                    model(input_ids=ids)  # the reference forward: fine
                with contextlib.nullcontext() if fixed else model.disable_adapter():
                    out = model(input_ids=ids, labels=ids)
                out.loss.backward()
    return trace


@scenario("NOT_IN_OPTIMIZER", ("lora_A", "lora_B"),
          "peft issues: 'LoRA weights not updating' -- the optimizer was built before get_peft_model", slow=True)
def lora_optimizer_built_before_peft(fixed):
    base = tiny_llama()
    opt = torch.optim.AdamW(base.parameters(), lr=1e-3)
    model = lora(base)  # freezes the base, adds adapters the optimizer has never seen
    if fixed:
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    with gradtrace.watch(model) as trace:
        for _ in range(2):
            ids = torch.randint(0, 64, (2, 6))
            opt.zero_grad()
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
    return trace


@scenario("WEIGHTS_UNCHANGED", ("step() called before backward()",),
          "forum: 'loss does not decrease' -- optimizer.step() before loss.backward()")
def step_before_backward(fixed):
    seeded()
    model = Tower()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradtrace.watch(model) as trace:
        for _ in range(3):
            x, y = batch()
            opt.zero_grad()
            if not fixed:
                opt.step()
            F.cross_entropy(model(x), y).backward()
            if fixed:
                opt.step()
    return trace


@scenario("FROZEN_WHILE_WATCHED", ("lora",), "peft issues: 'LoRA weights not updating' -- a callback froze the adapters",
          slow=True)
def lora_frozen_by_callback(fixed):
    model = lora(tiny_llama())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    with gradtrace.watch(model) as trace:
        for step in range(2):
            ids = torch.randint(0, 64, (2, 6))
            with contextlib.suppress(RuntimeError):
                with trace.pass_(f"step-{step}"):
                    model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
            if not fixed:  # "freeze the base model" written as a loop over every parameter
                for p in model.parameters():
                    p.requires_grad_(False)
    return trace


@scenario("GRAPH_CUT", ("layers.0", "detach"), "transformers forum: a forward hook that returns output.detach()", slow=True)
def llama_hook_detaches_a_layer(fixed):
    model = tiny_llama()
    handle = None
    if not fixed:
        handle = model.model.layers[0].register_forward_hook(
            lambda m, a, out: tuple(o.detach() if torch.is_tensor(o) else o for o in out)
            if isinstance(out, tuple) else out.detach())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    try:
        with gradtrace.watch(model) as trace:
            for _ in range(2):
                ids = torch.randint(0, 64, (2, 6))
                opt.zero_grad()
                model(input_ids=ids, labels=ids).loss.backward()
                opt.step()
    finally:
        if handle is not None:
            handle.remove()
    return trace


# ---- TRL's GRPOTrainer (a real GRPO loop: generation, rewards, group advantages, LoRA) ------------------------


def grpo_run(fixed_kwargs, bug_kwargs, fixed, reward=None, freeze_at=None):
    """A real trl.GRPOTrainer run on a tiny random Llama with LoRA; attach() registers the rewards, advantages,
    masks and S by itself."""
    import tempfile
    import warnings

    from gradtrace.integrations.transformers import GradtraceCallback
    from tiny_trainer import characters, grpo_trainer, make_llama, make_tokenizer, with_lora

    tokenizer = make_tokenizer()
    callbacks = [FreezeAdapters(freeze_at)] if freeze_at is not None and not fixed else []
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = grpo_trainer(tmp, with_lora(make_llama(len(tokenizer))), tokenizer, callbacks,
                               reward_funcs=reward if reward is not None and not fixed else characters,
                               **(fixed_kwargs if fixed else bug_kwargs))
        callback = GradtraceCallback(print_errors=False).attach(trainer)
        with contextlib.redirect_stdout(open(os.devnull, "w")):
            trainer.train()
    return callback.trace


def _freeze_adapters_class():
    import transformers

    class _FreezeAdapters(transformers.TrainerCallback):
        """A user callback meant to freeze the base model; its loop also freezes the adapters."""

        def __init__(self, at):
            self.at = at

        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if state.global_step == self.at:
                for p in model.parameters():
                    p.requires_grad_(False)
    return _FreezeAdapters


def FreezeAdapters(at):
    return _freeze_adapters_class()(at)


def constant_reward(completions, **kwargs):
    """A reward that cannot tell completions apart (a parser that always fails): every group's std is 0."""
    return [1.0 for _ in completions]


@scenario("CONSTANT_ROWS", ("'rewards/constant_reward'", "frac_reward_zero_std", "(100%"),
          "TRL issues: 'GRPO loss is always 0' (a reward with no variance)", slow=True)
def trl_grpo_constant_reward(fixed):
    return grpo_run({}, {}, fixed, reward=constant_reward)


@scenario("ALL_ZERO_VALUES", ("every completion hit max_completion_length", "completion_mask",
                              "Raise max_completion_length"),
          "TRL issues: 'loss is 0 with mask_truncated_completions' (max_completion_length too short)", slow=True)
def trl_grpo_every_completion_truncated(fixed):
    return grpo_run({"mask_truncated_completions": True},
                    {"mask_truncated_completions": True, "max_completion_length": 2}, fixed)


@scenario("WEIGHTS_UNCHANGED", ("learning rate is 0",), "TRL/transformers: learning_rate=0 in the config", slow=True)
def trl_grpo_lr_zero(fixed):
    return grpo_run({}, {"learning_rate": 0.0}, fixed)


@scenario("TINY_UPDATES", ("lr",), "TRL issues: 'LoRA weights do not change' -- learning_rate=1e-9", slow=True)
def trl_grpo_lr_tiny(fixed):
    return grpo_run({}, {"learning_rate": 1e-9}, fixed)


@scenario("FROZEN_WHILE_WATCHED", ("lora",), "peft/TRL: a callback freezing 'the base model' froze the adapters",
          slow=True)
def trl_grpo_adapters_frozen(fixed):
    return grpo_run({"max_steps": 3}, {"max_steps": 3}, fixed, freeze_at=1)


# ---- initialisation, schedules and accumulation loops ----------------------------------------------------------


class InjectedLoRA(nn.Module):
    """cloneofsimo/lora's LoraInjectedLinear: a frozen linear plus lora_up(lora_down(x)), lora_up zero."""

    def __init__(self, d_in, d_out, r=2, down_zero=False):
        super().__init__()
        self.linear = nn.Linear(d_in, d_out)
        self.linear.requires_grad_(False)
        self.lora_down = nn.Linear(d_in, r, bias=False)
        self.lora_up = nn.Linear(r, d_out, bias=False)
        nn.init.zeros_(self.lora_up.weight)
        if down_zero:
            nn.init.zeros_(self.lora_down.weight)  # "init both to zero so training starts at the base model"
        else:
            nn.init.normal_(self.lora_down.weight, std=1 / r)

    def forward(self, x):
        return self.linear(x) + self.lora_up(self.lora_down(x))


@scenario("ZERO_GRADS", ("every one", "lora_down", "lora_up", "all zeros"),
          "cloneofsimo/lora issues: 'LoRA weights never change' -- lora_down and lora_up both initialised to zero")
def lora_both_factors_zero(fixed):
    seeded()
    model = nn.Sequential(InjectedLoRA(8, 16, down_zero=not fixed), nn.Tanh(), InjectedLoRA(16, 4, down_zero=not fixed))
    return train_steps(model, steps=2)


def _schedule_run(make_scheduler, steps, per_batch=True, opt=torch.optim.AdamW, lr=1e-3, epochs=1):
    seeded()
    model = Tower()
    optimizer = opt(model.parameters(), lr=lr)
    scheduler = make_scheduler(optimizer)
    with gradtrace.watch(model) as trace:
        for _ in range(epochs):
            for _ in range(steps):
                x, y = batch()
                optimizer.zero_grad()
                F.cross_entropy(model(x), y).backward()
                optimizer.step()
                if per_batch:
                    scheduler.step()
            if not per_batch:
                scheduler.step()
    return trace


@scenario("WEIGHTS_UNCHANGED", ("from step 2 on", "lr is 0.0", "num_training_steps"),
          "transformers forum: 'loss stops changing after the first step' -- get_linear_schedule_with_warmup given "
          "num_training_steps=len(dataloader) // accumulation for a multi-epoch run (t_total too small)")
def linear_schedule_wrong_total(fixed):
    from transformers import get_linear_schedule_with_warmup
    return _schedule_run(lambda opt: get_linear_schedule_with_warmup(opt, 0, num_training_steps=8 if fixed else 1), 8)


@scenario("TINY_UPDATES", ("from step 5 on", "lr fell to 1.0e-09", "per batch"),
          "PyTorch forum: 'model stops learning after a few iterations' -- StepLR(step_size=1, gamma=0.1) stepped "
          "every batch instead of every epoch")
def steplr_stepped_per_batch(fixed):
    return _schedule_run(lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1), 4,
                         per_batch=not fixed, opt=torch.optim.SGD, lr=1e-2, epochs=2)


@scenario("ACCUMULATION_RESET", ("zero_grad", "'backward-1'", "once per optimizer step"),
          "PyTorch forum / HF forum: 'gradient accumulation does not change anything' -- optimizer.zero_grad() "
          "called before every microbatch's backward, step() every N microbatches")
def zero_grad_inside_accumulation(fixed):
    seeded()
    model = Tower()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    accumulation = 4
    with gradtrace.watch(model) as trace:
        for i in range(3 * accumulation):
            x, y = batch()
            if not fixed:
                opt.zero_grad()
            (F.cross_entropy(model(x), y) / accumulation).backward()
            if (i + 1) % accumulation == 0:
                opt.step()
                if fixed:
                    opt.zero_grad()
    return trace


# ---- more public bug reports: the loss, the forward, the optimizer -------------------------------------------


def _loop(model, loss_of, steps=2, opt=None, raise_ok=False, before_step=None):
    """zero_grad, loss_of(model, x, y).backward(), [before_step(model)], step; a RuntimeError from backward ends
    the watch (as it would end the user's script) and is swallowed outside it."""
    opt = opt or torch.optim.SGD(model.parameters(), lr=0.1)
    trace = None
    with contextlib.suppress(RuntimeError) if raise_ok else contextlib.nullcontext():
        with gradtrace.watch(model) as trace:
            for _ in range(steps):
                x, y = batch()
                opt.zero_grad()
                loss_of(model, x, y).backward()
                if before_step is not None:
                    before_step(model)
                opt.step()
    return trace


@scenario("NO_PASSES", ("torch.tensor(...)", "torch.stack"),
          "PyTorch forum 23261: 'gradient is lost when use torch.tensor([t1, t2])' -- per-sample outputs gathered "
          "with torch.tensor(..., requires_grad=True)")
def outputs_rebuilt_with_torch_tensor(fixed):
    seeded()

    def loss_of(model, x, y):
        outs = [model(x[i:i + 1]).squeeze(0) for i in range(len(x))]
        preds = torch.stack(outs) if fixed else torch.tensor([o.tolist() for o in outs], requires_grad=True)
        return F.cross_entropy(preds, y)
    return _loop(Tower(), loss_of)


@scenario("NO_PASSES", (".numpy()", "rebuilt"),
          "PyTorch forum: 'loss decreases but weights never change' -- the loss computed in numpy and wrapped back "
          "with torch.tensor(loss, requires_grad=True)")
def loss_computed_in_numpy(fixed):
    import numpy as np
    seeded()

    def loss_of(model, x, y):
        out, target = model(x), F.one_hot(y, 4).float()
        if fixed:
            return F.mse_loss(out, target)
        return torch.tensor(np.mean((out.detach().numpy() - target.numpy()) ** 2), requires_grad=True)
    return _loop(Tower(), loss_of)


class _ScaledTanh(torch.autograd.Function):
    """tanh(x * scale) written by hand (a fused kernel's Python twin); ``fixed`` says whether its backward
    returns the scale's gradient or, as the forum posts' first drafts do, None for it."""

    @staticmethod
    def forward(ctx, x, scale, fixed):
        y = torch.tanh(x * scale)
        ctx.save_for_backward(x, scale, y)
        ctx.fixed = fixed
        return y

    @staticmethod
    def backward(ctx, g):
        x, scale, y = ctx.saved_tensors
        local = g * (1 - y * y)
        grad_scale = (local * x).sum(0) if ctx.fixed else None  # the bug: "scale is a parameter, not an input"
        return local * scale, grad_scale, None


class _LearnedScaleActivation(nn.Module):
    def __init__(self, fixed: bool):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(16))
        self.fixed = fixed

    def forward(self, x):
        return _ScaledTanh.apply(x, self.scale, self.fixed)


@scenario("UNUSED_PARAMS", ("act (1 param)", "returned None", "autograd.Function"),
          "PyTorch forum: 'custom autograd Function: the parameter's .grad is None' -- a learnable activation "
          "whose hand-written backward returns None for its parameter")
def custom_function_returns_none_for_its_parameter(fixed):
    seeded()
    model = nn.Sequential(OrderedDict(embed=nn.Linear(8, 16), act=_LearnedScaleActivation(fixed),
                                      head=nn.Linear(16, 4)))
    return _loop(model, lambda m, x, y: F.cross_entropy(m(x), y))


class _ListOfWeights(nn.Module):
    """A mixture of per-head scales, as first drafts write it: a Python list of nn.Parameter."""

    def __init__(self, fixed: bool):
        super().__init__()
        self.embed = nn.Linear(8, 16)
        scales = [nn.Parameter(torch.ones(16)) for _ in range(3)]
        self.scales = nn.ParameterList(scales) if fixed else scales
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        h = torch.tanh(self.embed(x))
        return self.head(sum(h * s for s in self.scales))


@scenario("UNREGISTERED_PARAM", ("self.scales", "nn.ParameterList"),
          "PyTorch forum: 'parameters in a list are not updated' -- nn.Parameter objects kept in a plain Python "
          "list are not registered, so model.parameters() and the optimizer never see them")
def parameters_in_a_python_list(fixed):
    seeded()
    return _loop(_ListOfWeights(fixed), lambda m, x, y: F.cross_entropy(m(x), y))


class _TemperatureAttribute(nn.Module):
    def __init__(self, fixed: bool):
        super().__init__()
        self.encoder = nn.Linear(8, 4)
        temperature = torch.ones(1, requires_grad=True)  # "learnable temperature"
        self.temperature = nn.Parameter(temperature.detach()) if fixed else temperature

    def forward(self, x):
        return self.encoder(x) / self.temperature


@scenario("UNREGISTERED_PARAM", ("self.temperature", "nn.Parameter("),
          "PyTorch forum: 'learnable temperature does not change' -- torch.ones(1, requires_grad=True) assigned as a "
          "module attribute instead of nn.Parameter")
def learnable_tensor_not_a_parameter(fixed):
    seeded()
    return _loop(_TemperatureAttribute(fixed), lambda m, x, y: F.cross_entropy(m(x), y))


@scenario("WEIGHTS_UNCHANGED", ("zeroed in place", "clip_grad_norm_"),
          "PyTorch forum: 'model does not learn after adding gradient clipping' -- clip_grad_norm_ called with a "
          "max_norm of 0 (a config default meant as 'no clipping') multiplies every gradient by 0")
def clip_grad_norm_to_zero(fixed):
    seeded()
    max_grad_norm = 1.0 if fixed else 0.0
    return _loop(Tower(), lambda m, x, y: F.cross_entropy(m(x), y),
                 before_step=lambda m: torch.nn.utils.clip_grad_norm_(m.parameters(), max_grad_norm))


@scenario("FREEZE_IGNORED", ("module 'embed'", "requires_grad_(False)"),
          "PyTorch forum: 'model.requires_grad = False does not freeze the layer' -- an attribute set on the module "
          "object instead of calling requires_grad_(False): the 'frozen' encoder keeps training")
def freeze_by_attribute(fixed):
    seeded()
    model = Tower()
    if fixed:
        model.embed.requires_grad_(False)
    else:
        model.embed.requires_grad = False
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    return _loop(model, lambda m, x, y: F.cross_entropy(m(x), y), opt=opt)


@scenario("ZERO_GRADS", ("2 (1 param)", "tensor hook of yours"),
          "PyTorch forum: 'masking gradients with register_hook, the layer stops learning' -- a pruning mask built "
          "with the wrong threshold is all zeros, and the hook multiplies the weight's gradient by it")
def pruning_mask_hook_all_zeros(fixed):
    seeded()
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    weight = model[2].weight
    threshold = 0.05 if fixed else 5.0  # |w| > 5 keeps nothing of a default-initialised layer
    mask = (weight.detach().abs() > threshold).float()
    weight.register_hook(lambda g: g * mask)
    return _loop(model, lambda m, x, y: F.cross_entropy(m(x), y))


@scenario("ZERO_GRADS", ("every one of the", "softmax over a dimension of size 1"),
          "PyTorch forum: 'loss does not change, gradients are all zero' -- a binary classifier with one output "
          "unit normalised by softmax(dim=1), which is 1.0 whatever the logit (sigmoid was meant)")
def softmax_over_a_single_logit(fixed):
    seeded()
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))

    def loss_of(m, x, y):
        logit = m(x)
        prob = torch.sigmoid(logit) if fixed else F.softmax(logit, dim=1)
        return F.binary_cross_entropy(prob.squeeze(1), (y % 2).float())
    return _loop(model, loss_of)


@torch.no_grad()
def _encode_for_logging(model, x):  # written for evaluation, decorated with no_grad, reused by training
    return model.embed(x)


@scenario("GRAPH_CUT", ("'embed'", "no_grad"),
          "nayeon7lee/bert-summarization#7: 'no gradient during training?' -- a helper decorated with "
          "@torch.no_grad() called from the training step")
def no_grad_decorated_helper_in_training(fixed):
    seeded()

    def loss_of(model, x, y):
        h = model.embed(x) if fixed else _encode_for_logging(model, x)
        return F.cross_entropy(model.head(torch.tanh(model.block(h))), y)
    return _loop(Tower(), loss_of)


@scenario("ZERO_GRADS", ("input of '4' was all zeros", "ReLU"),
          "dying ReLU (forum, blog reports): 'the first layers never learn' -- a layer's bias pushed far negative, "
          "its ReLU outputs 0 for every input")
def dead_relu_before_the_head(fixed):
    seeded()
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    if not fixed:
        nn.init.constant_(model[2].bias, -100.0)  # e.g. after one huge update
    return train_steps(model)


class _DataLayer(nn.Module):
    def __init__(self, fixed):
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.fixed = fixed

    def forward(self, x):
        return self.fc(x if self.fixed else x.data)  # ".data to avoid an in-place error"


@scenario("DETACHED_OUTPUT", ("'0'", ".data"),
          "PyTorch 0.4 migration notes / forum: x.data inside a custom layer's forward silently cuts the graph")
def data_attribute_in_forward(fixed):
    seeded()
    return train_steps(nn.Sequential(nn.Linear(8, 16), nn.Tanh(), _DataLayer(fixed), nn.Linear(16, 4)))


class _MaskedLinear(nn.Module):
    """A pruning layer: weight times a fixed mask."""

    def __init__(self, fixed):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 16) * 0.1)
        self.register_buffer("mask", (torch.rand(4, 16) > 0.5).float())
        self.fixed = fixed

    def forward(self, x):
        w = self.weight * self.mask if self.fixed else nn.Parameter(self.weight * self.mask)
        return x @ w.t()


@scenario("DETACHED_OUTPUT", ("'2'", "nn.Parameter(...)", "inside its forward"),
          "PyTorch forum (pruning): 'masked weights are not updated' -- nn.Parameter(weight * mask) built in forward "
          "is a new leaf, cut from the registered weight")
def parameter_rewrapped_in_forward(fixed):
    seeded()
    return train_steps(nn.Sequential(nn.Linear(8, 16), nn.Tanh(), _MaskedLinear(fixed)))


@scenario("ZERO_GRADS", ("every one", "torch.round", "straight-through"),
          "PyTorch forum 28628: 'torch.round() gradient' -- rounded predictions in the loss give zero gradients")
def round_in_the_loss(fixed):
    seeded()

    def loss_of(model, x, y):
        p = torch.sigmoid(model(x))
        return F.mse_loss(p if fixed else torch.round(p), F.one_hot(y, 4).float())
    return _loop(Tower(), loss_of)


@scenario("PASS_FAILED", ("does not require grad", "argmax"),
          "PyTorch forum 123877: 'retaining grad_fn for one-hot encoded tensors' -- MSE on one_hot(argmax(logits))")
def mse_on_one_hot_of_argmax(fixed):
    seeded()

    def loss_of(model, x, y):
        out = model(x)
        pred = out.softmax(-1) if fixed else F.one_hot(out.argmax(-1), 4).float()
        return F.mse_loss(pred, F.one_hot(y, 4).float())
    return _loop(Tower(), loss_of, raise_ok=True)


@scenario("NONFINITE", ("'head.bias'", "cuts=\"ops\""),
          "pytorch/pytorch#23395, #36923: torch.where backpropagates NaN from the branch it did not take "
          "(sqrt of negatives)")
def where_with_nan_in_the_unused_branch(fixed):
    seeded()

    def loss_of(model, x, y):
        out = model(x)
        safe = out.clamp(min=0) if fixed else out
        return torch.where(out > 0, torch.sqrt(safe), torch.zeros_like(out)).sum()
    return _loop(Tower(), loss_of)


@scenario("STALE_GRADS", ("D.0", "optimizer.zero_grad()", "the zero_grad() of Adam#0"),
          "Lightning-AI/pytorch-lightning#557, ajbrock/BigGAN-PyTorch#25: the discriminator's gradients are never "
          "zeroed (zero_grad on the generator's optimizer) and pile up step after step")
def gan_zero_grad_on_the_wrong_optimizer(fixed):
    seeded()
    gan = GAN()
    opt_g, opt_d = torch.optim.Adam(gan.G.parameters(), 1e-3), torch.optim.Adam(gan.D.parameters(), 1e-3)
    bce = nn.BCEWithLogitsLoss()
    with gradtrace.watch(gan) as trace:
        for _ in range(3):
            real, z = torch.randn(6, 8), torch.randn(6, 4)
            (opt_d if fixed else opt_g).zero_grad()
            (bce(gan.D(real), torch.ones(6, 1)) + bce(gan.D(gan.G(z).detach()), torch.zeros(6, 1))).backward()
            opt_d.step()
            opt_g.zero_grad()
            bce(gan.D(gan.G(z)), torch.ones(6, 1)).backward()
            opt_g.step()
    return trace


@scenario("NONFINITE", ("optimizer Adam#0", "eps", "float16"),
          "pytorch/pytorch#147437, afiaka87/glide-finetune#5: model.half() with Adam -- NaN weights after the first "
          "step although the gradients are finite (eps=1e-8 is 0 in float16)")
def half_precision_adam_default_eps(fixed):
    seeded()
    model = Tower().half()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, eps=1e-4 if fixed else 1e-8)
    with gradtrace.watch(model) as trace:
        for _ in range(3):
            x, y = batch()
            opt.zero_grad()
            F.cross_entropy(model(x.half()).float(), y).backward()
            opt.step()
    return trace


# ---- the forward and the module tree (issue 20, items 5-8) ------------------------------------------------


class FeedForward(nn.Module):
    """T5's DenseReluDense: in float16, ``wo`` is where T5 overflows."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.wi, self.wo = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        return self.wo(torch.relu(self.wi(x)))


@scenario("NONFINITE", ("'ffn.wo'", "float16 max 65504"),
          "transformers issues: 'T5 fp16 gives NaN loss' (the feed-forward output passes 65504)")
def fp16_feedforward_overflow(fixed):
    seeded()
    model = nn.Sequential()
    model.add_module("embed", nn.Linear(8, 16))
    model.add_module("ffn", FeedForward())
    model.add_module("head", nn.Linear(16, 4))
    with torch.no_grad():
        model.ffn.wo.weight.mul_(1e5)  # outputs past 1e5: fine in float32, inf in float16
    model = model.float() if fixed else model.half()  # the fix users apply: keep that block in float32 / bf16
    with gradtrace.watch(model) as trace:
        x = torch.randn(6, 8, generator=torch.Generator().manual_seed(1)) * 8
        model(x.to(next(model.parameters()).dtype)).float().pow(2).mean().backward()
    return trace


class PaddedEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 4)

    def forward(self, x, padding):
        h = self.embed(x)
        return self.head(self.attn(h, h, h, key_padding_mask=padding)[0].mean(1))


@scenario("NONFINITE", ("'attn'", "fully masked softmax row", "key_padding_mask"),
          "forum: 'nn.MultiheadAttention returns NaN' (a sequence that is all padding)")
def all_padding_sequence(fixed):
    seeded()
    model = PaddedEncoder()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradtrace.watch(model) as trace:
        x, y = torch.randn(3, 5, 8), torch.tensor([0, 1, 2])
        padding = torch.zeros(3, 5, dtype=torch.bool)
        padding[2, 1 if fixed else 0:] = True  # an empty sequence in the batch (fixed: it keeps one token)
        F.cross_entropy(model(x, padding), y).backward()
        opt.step()
    return trace


class ListEncoder(nn.Module):
    def __init__(self, registered: bool):
        super().__init__()
        self.embed, self.head = nn.Linear(8, 16), nn.Linear(16, 4)
        layers = [nn.Linear(16, 16) for _ in range(2)]
        self.layers = nn.ModuleList(layers) if registered else layers

    def forward(self, x):
        h = self.embed(x)
        for layer in self.layers:
            h = torch.relu(layer(h))
        return self.head(h)


@scenario("UNREGISTERED_MODULE", ("self.layers", "nn.ModuleList"),
          "forum: 'my layers are not updating / not in model.parameters()' (layers in a Python list)")
def layers_in_a_python_list(fixed):
    seeded()
    return train_steps(ListEncoder(registered=fixed))


class TiedTower(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(12, 16)
        self.block = nn.Linear(16, 16)
        self.head = nn.Linear(16, 12)
        self.head.weight = self.embed.weight  # tied, as in GPT-2

    def forward(self, ids):
        return self.head(torch.tanh(self.block(self.embed(ids))))


@scenario("TIED_FROZEN", ("'head.weight'", "'embed.weight'", "tied"),
          "transformers forum: 'freezing the embeddings froze lm_head' (tie_word_embeddings)")
def freeze_embeddings_freezes_tied_head(fixed):
    seeded()
    model = TiedTower()
    if fixed:
        model.head.weight = nn.Parameter(model.embed.weight.detach().clone())  # untied: the head trains alone
    model.embed.weight.requires_grad_(False)  # "freeze the input embeddings"
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with gradtrace.watch(model) as trace:
        ids = torch.randint(0, 12, (4, 5), generator=torch.Generator().manual_seed(2))
        F.cross_entropy(model(ids).reshape(-1, 12), ids.reshape(-1)).backward()
        opt.step()
    return trace


class RotaryCache(nn.Module):
    def __init__(self):
        super().__init__()
        self.cos_cached = None

    def forward(self, x):
        if self.cos_cached is None or self.cos_cached.shape[0] < x.shape[1]:
            self.cos_cached = (torch.arange(x.shape[1], dtype=x.dtype)[:, None] * torch.ones(x.shape[-1])).cos()
        return self.cos_cached[: x.shape[1]]


class RotaryLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.rotary, self.q, self.head = nn.Linear(8, 16), RotaryCache(), nn.Linear(16, 16), \
            nn.Linear(16, 4)

    def forward(self, x):
        h = self.embed(x)
        return self.head((self.q(h) * self.rotary(h)).mean(1))


@scenario("PASS_FAILED", ("'rotary'", "inference tensor", "inference_mode()"),
          "transformers/peft issues: 'Inference tensors cannot be saved for backward' after evaluation")
def inference_mode_cache_reused(fixed):
    seeded()
    model = RotaryLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradtrace.watch(model) as trace:
        with (torch.no_grad() if fixed else torch.inference_mode()):  # evaluation before training
            model(torch.randn(2, 6, 8))
        with contextlib.suppress(RuntimeError):
            with trace.pass_("train"):
                x, y = torch.randn(2, 6, 8), torch.tensor([0, 3])
                F.cross_entropy(model(x), y).backward()
                opt.step()
    return trace


# ---- healthy runs that must stay clean (no error, no warning) ------------------------------------------------

HEALTHY: List[Tuple[str, Callable[[], "gradtrace.Trace"]]] = []


def healthy(fn):
    HEALTHY.append((fn.__name__, fn))
    return fn


@healthy
def trl_grpo_beta_kl_and_accumulation():
    """beta > 0: the reference forward runs with the adapters disabled under no_grad, every step."""
    return grpo_run({"beta": 0.04, "gradient_accumulation_steps": 2}, {}, True)


@healthy
def trl_grpo_gradient_checkpointing():
    return grpo_run({"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False}},
                    {}, True)


@healthy
def trainer_warmup_from_zero():
    """A linear warmup starts at lr 0: the first step moves nothing, by design."""
    import tempfile
    import warnings

    import transformers

    from gradtrace.integrations.transformers import GradtraceCallback
    from tiny_trainer import lm_data, make_llama, make_tokenizer, training_args, with_lora
    tokenizer = make_tokenizer()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = transformers.Trainer(model=with_lora(make_llama(len(tokenizer))),
                                       args=training_args(tmp, warmup_steps=2, max_steps=3, max_grad_norm=1.0),
                                       train_dataset=lm_data(tokenizer), data_collator=transformers.default_data_collator)
        callback = GradtraceCallback(print_errors=False).attach(trainer)
        with contextlib.redirect_stdout(open(os.devnull, "w")):
            trainer.train()
    return callback.trace


@healthy
def bf16_autocast_with_float32_weights():
    seeded()
    model = Tower()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    with gradtrace.watch(model) as trace:
        for _ in range(2):
            x, y = batch()
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x).float(), y)
            loss.backward()
            opt.step()
    return trace


@healthy
def actor_critic_two_optimizers():
    seeded()
    actor, critic = nn.Linear(4, 2), nn.Linear(4, 1)
    both = nn.ModuleDict({"actor": actor, "critic": critic})
    opt_a, opt_c = torch.optim.Adam(actor.parameters(), 1e-3), torch.optim.Adam(critic.parameters(), 1e-3)
    with gradtrace.watch(both) as trace:
        for _ in range(3):
            s, r = torch.randn(6, 4), torch.randn(6)
            value = critic(s).squeeze(-1)
            opt_c.zero_grad()
            F.mse_loss(value, r).backward()
            opt_c.step()
            logp = torch.log_softmax(actor(s), -1)[:, 0]
            opt_a.zero_grad()
            (-(logp * (r - critic(s).squeeze(-1)).detach()).mean()).backward()
            opt_a.step()
    return trace


@healthy
def sparse_embedding_rows_with_adam():
    """Most embedding rows get no gradient in a step: Adam leaves them alone, that is not WEIGHTS_UNCHANGED."""
    seeded()
    model = nn.Sequential(nn.Embedding(1000, 8), nn.Flatten(), nn.Linear(24, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with gradtrace.watch(model) as trace:
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(model(torch.randint(0, 5, (4, 3))), torch.randint(0, 2, (4,))).backward()
            opt.step()
    return trace


@healthy
def peft_embedding_lora_first_steps():
    """peft's Embedding LoRA: lora_embedding_A starts at zero, so lora_embedding_B's first gradient is exactly zero
    (a warmup from lr 0 keeps A at zero for a second step)."""
    from peft import LoraConfig, get_peft_model
    from transformers import get_linear_schedule_with_warmup
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"],
                                                    lora_dropout=0.0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    scheduler = get_linear_schedule_with_warmup(opt, 2, num_training_steps=4)
    with gradtrace.watch(model) as trace:
        for _ in range(4):
            ids = torch.randint(0, 64, (2, 6))
            opt.zero_grad()
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            scheduler.step()
    return trace


@healthy
def schedules_used_as_meant():
    """A warmup from lr 0 then a cosine decay to a small final lr, per step; StepLR per epoch; OneCycleLR."""
    from transformers import get_cosine_schedule_with_warmup
    traces = [_schedule_run(lambda opt: get_cosine_schedule_with_warmup(opt, 3, num_training_steps=16), 16),
              _schedule_run(lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1), 4,
                            per_batch=False, opt=torch.optim.SGD, lr=1e-2, epochs=3),
              _schedule_run(lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=24), 24),
              _schedule_run(lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=24), 24)]
    return Merged(traces)


class Merged:
    """Several traces judged as one healthy run: their verdicts together."""

    def __init__(self, traces):
        self.traces = traces

    def verdicts(self):
        return [v for t in self.traces for v in t.verdicts()]


@healthy
def grad_norm_probe_then_training_backward():
    """A gradient-norm probe: backward, read the norm, zero_grad(), then the training backward and step."""
    seeded()
    model = Tower()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradtrace.watch(model) as trace:
        for _ in range(3):
            x, y = batch()
            loss = F.cross_entropy(model(x), y)
            loss.backward(retain_graph=True)
            torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))  # the probe reads the norm
            opt.zero_grad()
            loss.backward()
            opt.step()
            opt.zero_grad()
    return trace


@healthy
def two_loss_terms_in_labelled_passes_one_step():
    """A generator whose two loss terms are backpropagated in two labelled passes, then one optimizer step."""
    seeded()
    gan = GAN()
    opt_g = torch.optim.Adam(gan.G.parameters(), lr=1e-3)
    with gradtrace.watch(gan.G) as trace:
        for step in range(3):
            z = torch.randn(6, 4)
            fake = gan.G(z)
            opt_g.zero_grad()
            with trace.pass_(f"g_adv-{step}"):
                F.binary_cross_entropy_with_logits(gan.D(fake), torch.ones(6, 1)).backward(retain_graph=True)
            with trace.pass_(f"g_lat-{step}"):
                fake.pow(2).mean().backward()
            opt_g.step()
    return trace


@healthy
def training_in_eval_mode():
    """model.eval() during training (dropout off, BatchNorm on running statistics) is not a gradient bug: every
    parameter gets its gradient."""
    seeded()
    model = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.5), nn.BatchNorm1d(16), nn.Linear(16, 4))
    model.eval()
    return train_steps(model)


@healthy
def frozen_batchnorm_in_train_mode():
    """BatchNorm's affine parameters frozen, the module left in train mode: its running statistics still move (a
    buffer, not a gradient), every trainable parameter gets its gradient."""
    seeded()
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))
    model[1].requires_grad_(False)
    return train_steps(model)


# ---- running the suite --------------------------------------------------------------------------------------


def first_line(trace) -> str:
    return trace.report().splitlines()[0]


def judge(s: Scenario, trace) -> Tuple[bool, str]:
    line = first_line(trace)
    ok = line.startswith(f"gradtrace diagnosis: {s.expect}:") and all(n in line for n in s.names)
    return ok, line


def serious(trace) -> list:
    return [v for v in trace.verdicts() if v.severity in ("error", "warning")]


def accuracy(include_slow: bool = True) -> Tuple[int, int, int, int]:
    """(bugs named on the first line, bugs, fixed twins with no error/warning, twins); prints each."""
    named = clean = total = 0
    for s in SCENARIOS:
        if s.slow and not include_slow:
            continue
        total += 1
        try:
            ok, line = judge(s, s.run(False))
        except Exception as e:  # an older gradtrace may lack an option a scenario uses
            ok, line = False, f"raised {type(e).__name__}: {e}"
        try:
            healthy = not serious(s.run(True))
        except Exception as e:
            healthy, line = False, line + f" | fixed twin raised {type(e).__name__}: {e}"
        named += ok
        clean += healthy
        print(f"{'OK ' if ok else 'BAD'} {'clean' if healthy else 'NOISY'} {s.name}: {line[:160]}")
    return named, total, clean, total


def healthy_runs() -> Tuple[int, int]:
    """(healthy runs with no error or warning, healthy runs); prints each finding."""
    clean = 0
    for name, run in HEALTHY:
        try:
            found = [str(v)[:160] for v in serious(run())]
        except Exception as e:
            found = [f"raised {type(e).__name__}: {e}"]
        clean += not found
        print(f"{'clean' if not found else 'NOISY'} {name}: {found}")
    return clean, len(HEALTHY)


if __name__ == "__main__":
    named, total, clean, twins = accuracy(include_slow="--fast" not in sys.argv)
    quiet, runs = healthy_runs() if "--fast" not in sys.argv else (0, 0)
    print(f"\nfirst line names the cause: {named}/{total}; fixed twins with no error or warning: {clean}/{twins}; "
          f"other healthy runs clean: {quiet}/{runs}")
    print(f"gradtrace from {os.path.dirname(gradtrace.__file__)}")
