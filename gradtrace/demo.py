"""A self-contained entropy probe on a tiny LoRA policy, and the bugs that break it.

The probe asks how much one optimizer step on the policy-gradient loss would
change the policy's entropy, to first order::

    X pass:  H.backward() over microbatches          -> g_X = dH/dtheta   (in .grad)
    Y pass:  autograd.grad(L_Y(S), params)            -> g_Y = dL_Y/dtheta
    U_cross = sum_p  g_X * g_Y / (sqrt(v_hat) + eps)  (Adam's preconditioner)
    deltaH1 = -lr * U_cross

``H`` is the mean token entropy over the generated tokens, ``S`` the sequence
log-probabilities of sampled completions, ``A`` group-normalised advantages and
``L_Y = -mean(A * S) + beta * KL(policy || reference)`` (a GRPO-style loss).

Everything is plain torch: a two-layer causal transformer with LoRA adapters
(``lora_B`` starts at zero, as in peft; base weights frozen), left-padded
prompts, sampled completions, a verifier-free reward, a few warm-up Adam steps
so the optimizer has state. Each entry of :data:`BUGS` changes one setting of
that pipeline; the fault then arises from the code path it selects, never from
editing records. :func:`run_probe` runs the probe under ``gradtrace.watch``.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, replace
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .errors import GradtraceError
from .live import watch

PAD, BOS, EOS = 0, 1, 2

# name -> what goes wrong (one line, shown by `python -m gradtrace demo --help`)
BUGS: Dict[str, str] = {
    "tiny_lr": "the optimizer's learning rate is 1e-9: deltaH1 is real but prints as -0.000000",
    "empty_mask": "prompt_len read from the generated sequences' width: the generation mask selects nothing",
    "zero_variance": "the reward function is handed the prompt slice: every group's rewards are identical, A == 0",
    "adapters_bypassed": "the Y pass scores S with the adapters disabled (reference-model code path)",
    "nan": "the PAD token is banned with -inf: the entropy computes 0 * -inf = NaN",
    "stale_grads": "optimizer.zero_grad() forgotten before the X pass: .grad still holds the last step",
    "s_no_grad": "S is scored under torch.no_grad() (the rollout scorer); only the KL term carries gradient",
    "inference_mode": "S is scored under torch.inference_mode(); only the KL term carries gradient",
    "detach": "S is built from logits.detach(); only the KL term carries gradient",
    "reentrant_checkpoint": "blocks use torch.utils.checkpoint(use_reentrant=True): autograd.grad cannot see inside",
    "precondition": "warm-up steps backpropagate a 2**16 loss scale: Adam's v_hat is 2**32 too large, deltaH1 ~ 0",
}

# name -> the verdict code gradtrace should put first (the tests check it)
EXPECTED: Dict[str, str] = {
    "tiny_lr": "ROUNDS_TO_ZERO",
    "empty_mask": "ALL_ZERO_VALUES",
    "zero_variance": "CONSTANT_ROWS",
    "adapters_bypassed": "COVERAGE_GAP",
    "nan": "NONFINITE",
    "stale_grads": "STALE_GRADS",
    "s_no_grad": "TENSOR_NO_GRAD",
    "inference_mode": "TENSOR_NO_GRAD",
    "detach": "TENSOR_NO_GRAD",
    "reentrant_checkpoint": "GRAPH_CUT",
    "precondition": "ROUNDS_TO_ZERO",
}


# What `python -m gradtrace demo` shows with no flag: the symptom that started gradtrace
# (the probe's log says "deltaH1: -0.000000") with one realistic hidden cause, the warm-up's
# loss scale never unscaled. The seed is the one whose deltaH1 is negative, as in that log.
STORY_BUG = "precondition"
STORY_SEED = 1

# One line per figure the probe prints, for the demo's output.
GLOSSARY = (
    "deltaH1 = -lr * U_cross: the first-order change in mean token entropy that one Adam step on the "
    "Y loss would make",
    "U_cross = sum over parameters of g_X * g_Y / (sqrt(v_hat) + eps): the entropy gradient (pass X) against "
    "the loss gradient (pass Y), preconditioned as Adam would; gradtrace's own copy is the "
    "\"inner product <X, Y> preconditioned by Adam\" table below",
)


@dataclass(frozen=True)
class Settings:
    """Every knob of the pipeline; a bug is a set of overrides of the healthy values."""

    vocab: int = 64
    d_model: int = 32
    n_heads: int = 2
    n_layers: int = 2
    d_mlp: int = 64
    max_len: int = 32
    lora_rank: int = 4
    lora_alpha: float = 8.0
    n_prompts: int = 4
    group_size: int = 4
    max_prompt: int = 6
    max_new_tokens: int = 8
    micro_batch: int = 8
    lr: float = 1e-3
    adam_eps: float = 1e-8
    warmup_steps: int = 3
    kl_beta: float = 0.04
    adv_eps: float = 1e-4
    # the code paths the bugs select
    loss_scale: float = 1.0  # warm-up multiplies the loss by it and never unscales
    zero_grad_before_x: bool = True
    prompt_len_from: str = "prompt"  # "prompt" or "sequences"
    reward_span: str = "completion"  # "completion" or "prompt"
    ban_fill: str = "finfo_min"  # "finfo_min" or "-inf"
    y_adapters: bool = True
    s_mode: str = "grad"  # "grad", "no_grad", "inference_mode", "detach"
    checkpointing: bool = False


_BUG_SETTINGS: Dict[str, dict] = {
    "tiny_lr": {"lr": 1e-9},
    "empty_mask": {"prompt_len_from": "sequences"},
    "zero_variance": {"reward_span": "prompt"},
    "adapters_bypassed": {"y_adapters": False},
    "nan": {"ban_fill": "-inf"},
    "stale_grads": {"zero_grad_before_x": False},
    "s_no_grad": {"s_mode": "no_grad"},
    "inference_mode": {"s_mode": "inference_mode"},
    "detach": {"s_mode": "detach"},
    "reentrant_checkpoint": {"checkpointing": True},
    "precondition": {"loss_scale": 2.0 ** 16},
}


def settings_for(bug: Optional[str] = None) -> Settings:
    if bug is None:
        return Settings()
    if bug not in _BUG_SETTINGS:
        raise GradtraceError(f"unknown demo bug {bug!r}; choose one of: {', '.join(BUGS)}")
    return replace(Settings(), **_BUG_SETTINGS[bug])


# ----------------------------------------------------------------------------- model


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a low-rank update ``B @ A`` (``B`` starts at zero)."""

    def __init__(self, d_in: int, d_out: int, rank: int, alpha: float):
        super().__init__()
        self.base = nn.Linear(d_in, d_out)
        self.lora_A = nn.Linear(d_in, rank, bias=False)
        self.lora_B = nn.Linear(rank, d_out, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.scaling = alpha / rank
        self.disabled = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.disabled:
            return out
        return out + self.lora_B(self.lora_A(x)) * self.scaling


class Block(nn.Module):
    def __init__(self, s: Settings):
        super().__init__()
        lora = dict(rank=s.lora_rank, alpha=s.lora_alpha)
        self.n_heads = s.n_heads
        self.ln1 = nn.LayerNorm(s.d_model)
        self.q = LoRALinear(s.d_model, s.d_model, **lora)
        self.k = LoRALinear(s.d_model, s.d_model, **lora)
        self.v = LoRALinear(s.d_model, s.d_model, **lora)
        self.o = LoRALinear(s.d_model, s.d_model, **lora)
        self.ln2 = nn.LayerNorm(s.d_model)
        self.fc = LoRALinear(s.d_model, s.d_mlp, **lora)
        self.proj = LoRALinear(s.d_mlp, s.d_model, **lora)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.ln1(x)
        q, k, v = (m(h).view(b, t, self.n_heads, -1).transpose(1, 2) for m in (self.q, self.k, self.v))
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.size(-1))
        # finfo.min, not -inf: a left-pad query row has no allowed key at all
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        att = scores.softmax(-1) @ v
        x = x + self.o(att.transpose(1, 2).reshape(b, t, d))
        return x + self.proj(F.gelu(self.fc(self.ln2(x))))


class TinyPolicy(nn.Module):
    """A two-layer causal LM with LoRA adapters on every attention and MLP projection."""

    def __init__(self, s: Settings):
        super().__init__()
        self.tok = nn.Embedding(s.vocab, s.d_model)
        self.pos = nn.Embedding(s.max_len, s.d_model)
        self.blocks = nn.ModuleList(Block(s) for _ in range(s.n_layers))
        self.ln_f = nn.LayerNorm(s.d_model)
        self.lm_head = nn.Linear(s.d_model, s.vocab, bias=False)
        self.gradient_checkpointing = False

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        t = ids.size(1)
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # left padding
        h = self.tok(ids)
        checkpointing = self.gradient_checkpointing and torch.is_grad_enabled()
        if checkpointing:
            # what transformers' enable_input_require_grads does: with frozen
            # embeddings a reentrant checkpoint would otherwise see no input
            # that requires grad and cut everything
            h.requires_grad_(True)
        h = h + self.pos(positions)
        causal = torch.ones(t, t, dtype=torch.bool, device=ids.device).tril()
        allowed = causal[None, None] & attention_mask.bool()[:, None, None, :]
        for block in self.blocks:
            if checkpointing:
                h = checkpoint(block, h, allowed, use_reentrant=True)
            else:
                h = block(h, allowed)
        return self.lm_head(self.ln_f(h))

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model only (like peft's ``disable_adapter``)."""
        layers = [m for m in self.modules() if isinstance(m, LoRALinear)]
        for m in layers:
            m.disabled = True
        try:
            yield
        finally:
            for m in layers:
                m.disabled = False


def build_policy(s: Settings) -> TinyPolicy:
    """Random base weights, frozen; LoRA adapters and the final norm trainable."""
    policy = TinyPolicy(s)
    for name, p in policy.named_parameters():
        p.requires_grad_(".lora_" in name or name.startswith("ln_f."))
    policy.gradient_checkpointing = s.checkpointing
    return policy


# ----------------------------------------------------------------------------- rollout


def policy_logits(policy: TinyPolicy, ids, attention_mask, s: Settings) -> torch.Tensor:
    """Logits with PAD banned: the distribution the sampler draws from."""
    logits = policy(ids, attention_mask)
    fill = float("-inf") if s.ban_fill == "-inf" else torch.finfo(logits.dtype).min
    banned = torch.zeros(logits.size(-1), dtype=torch.bool, device=logits.device)
    banned[PAD] = True
    return logits.masked_fill(banned, fill)


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log p(ids[t+1] | ids[:t+1]), shape [B, T-1]."""
    logp = logits[:, :-1].float().log_softmax(-1)
    return logp.gather(-1, ids[:, 1:, None]).squeeze(-1)


def generation_mask(seq: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """True on generated tokens up to and including the first EOS."""
    after_prompt = torch.arange(seq.size(1), device=seq.device) >= prompt_len
    eos = (seq == EOS) & after_prompt
    eos_before = (eos.long().cumsum(-1) - eos.long()) > 0
    return after_prompt & ~eos_before


def masked_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # where, not multiply: a -inf or NaN outside the mask must not leak in
    return torch.where(mask, x, torch.zeros_like(x)).sum(-1)


@dataclass
class Rollout:
    seq: torch.Tensor  # [B, T] left-padded prompt + completion
    attn: torch.Tensor  # [B, T]
    prompt_width: int
    gen_mask: torch.Tensor  # [B, T] bool, the trainer's mask
    ref_logprobs: torch.Tensor  # [B, T-1] reference model (adapters off)
    rewards: torch.Tensor  # [n_prompts, group_size]
    advantages: torch.Tensor  # [B]


def make_prompts(s: Settings, gen: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    ids = torch.full((s.n_prompts, s.max_prompt), PAD, dtype=torch.long)
    attn = torch.zeros_like(ids)
    lengths = torch.randint(3, s.max_prompt + 1, (s.n_prompts,), generator=gen)
    for i, n in enumerate(lengths.tolist()):
        body = torch.randint(3, s.vocab, (n - 1,), generator=gen)
        ids[i, s.max_prompt - n:] = torch.cat([torch.tensor([BOS]), body])
        attn[i, s.max_prompt - n:] = 1
    return ids, attn


@torch.no_grad()
def generate(policy: TinyPolicy, ids, attn, s: Settings, gen: torch.Generator):
    done = torch.zeros(ids.size(0), dtype=torch.bool)
    for _ in range(s.max_new_tokens):
        probs = policy_logits(policy, ids, attn, s)[:, -1].softmax(-1)
        nxt = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
        nxt = torch.where(done, torch.full_like(nxt, PAD), nxt)
        ids = torch.cat([ids, nxt[:, None]], 1)
        attn = torch.cat([attn, torch.ones_like(attn[:, :1])], 1)
        done |= nxt == EOS
    return ids, attn


def reward_fn(tokens: torch.Tensor, mask: torch.Tensor, target: torch.Tensor, vocab: int) -> torch.Tensor:
    """1 - |mean token id / vocab - target|: a smooth stand-in for a reward model.

    The toy task: the completion's mean token id should be the prompt's token
    sum modulo the vocabulary size.
    """
    m = mask.float()
    mean_id = (tokens.float() * m).sum(-1) / m.sum(-1).clamp(min=1)
    return 1.0 - (mean_id / vocab - target).abs()


@torch.no_grad()
def rollout(policy: TinyPolicy, s: Settings, gen: torch.Generator) -> Rollout:
    prompts, prompt_attn = make_prompts(s, gen)
    ids = prompts.repeat_interleave(s.group_size, 0)
    attn = prompt_attn.repeat_interleave(s.group_size, 0)
    width = ids.size(1)
    seq, attn = generate(policy, ids, attn, s, gen)
    gen_mask = generation_mask(seq, width)
    with policy.disable_adapter():
        ref = token_logprobs(policy_logits(policy, seq, attn, s), seq)
    target = ((prompts * prompt_attn).sum(-1) % s.vocab).float() / s.vocab
    target = target.repeat_interleave(s.group_size)
    if s.reward_span == "prompt":
        span, span_mask = seq[:, :width], attn[:, :width]
    else:
        span, span_mask = seq[:, width:], gen_mask[:, width:]
    rewards = reward_fn(span, span_mask, target, s.vocab).view(s.n_prompts, s.group_size)
    centred = rewards - rewards.mean(-1, keepdim=True)
    advantages = (centred / (rewards.std(-1, keepdim=True) + s.adv_eps)).reshape(-1)
    return Rollout(seq, attn, width, gen_mask, ref, rewards, advantages)


# ----------------------------------------------------------------------------- losses


def microbatches(n: int, size: int) -> List[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    logp = logits[:, :-1].float().log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)  # 0 * log 0: finite only if banned logits are finite


def kl_to_reference(tok_logp, ref_logp, mask) -> torch.Tensor:
    """k3 estimator per sequence, summed over the mask."""
    d = torch.where(mask, ref_logp - tok_logp, torch.zeros_like(tok_logp))
    return masked_sum(d.exp() - d - 1.0, mask)


def score_s(policy, seq, attn, mask, s: Settings) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sequence log-probs ``S`` and per-token log-probs, as the Y pass builds them."""
    logits = policy_logits(policy, seq, attn, s)
    tok = token_logprobs(logits, seq)
    if s.s_mode == "grad":
        return masked_sum(tok, mask), tok
    if s.s_mode == "detach":  # S logged to the dashboard from detached logits, then reused
        return masked_sum(token_logprobs(logits.detach(), seq), mask), tok
    # S taken from the rollout scorer, which runs under no_grad / inference_mode
    scorer = torch.no_grad if s.s_mode == "no_grad" else torch.inference_mode
    with scorer():
        S = masked_sum(token_logprobs(policy_logits(policy, seq, attn, s), seq), mask)
    return S, tok


def grpo_loss(policy, r: Rollout, mb: slice, mask, n_tokens, s: Settings, trace=None):
    """``L_Y`` for one microbatch, scaled so the microbatches sum to the batch loss."""
    seq, attn = r.seq[mb], r.attn[mb]
    S, tok = score_s(policy, seq, attn, mask[mb, 1:], s)
    if trace is not None:
        S = trace.tensor("S", S, expect_grad=True)
    A = r.advantages[mb]
    kl = kl_to_reference(tok, r.ref_logprobs[mb], mask[mb, 1:])
    batch = r.seq.size(0)
    return -(A * S).sum() / batch + s.kl_beta * kl.sum() / n_tokens


def warm_up(policy, opt, r: Rollout, s: Settings) -> None:
    """A few real training steps, so ``lora_B`` moves off zero and Adam has state."""
    n_tokens = r.gen_mask[:, 1:].sum().clamp(min=1)
    train = replace(s, s_mode="grad")  # the trainer's own scoring is fine
    for _ in range(s.warmup_steps):
        opt.zero_grad(set_to_none=True)
        for mb in microbatches(r.seq.size(0), s.micro_batch):
            (grpo_loss(policy, r, mb, r.gen_mask, n_tokens, train) * s.loss_scale).backward()
        opt.step()


# ----------------------------------------------------------------------------- probe


@dataclass
class ProbeResult:
    bug: Optional[str]
    delta_h1: float
    u_cross: float
    lr: float
    entropy: float
    reward_mean: float

    def __str__(self) -> str:
        return (f"deltaH1: {self.delta_h1:.6f}  (U_cross {self.u_cross:.3e}, lr {self.lr:.1e}, "
                f"entropy {self.entropy:.4f}, mean reward {self.reward_mean:.4f})")


def adam_cross(opt: torch.optim.Adam, params, g_x, g_y) -> torch.Tensor:
    """sum over params of g_X * g_Y / (sqrt(v_hat) + eps), v_hat bias-corrected."""
    group = opt.param_groups[0]
    beta2, eps = group["betas"][1], group["eps"]
    total = torch.zeros((), dtype=torch.float64)
    for p, gx, gy in zip(params, g_x, g_y, strict=False):
        if gx is None or gy is None:
            continue
        state = opt.state[p]
        v_hat = state["exp_avg_sq"] / (1 - beta2 ** float(state["step"]))
        total += (gx * gy / (v_hat.sqrt() + eps)).sum().double()
    return total


def probe(policy, opt, r: Rollout, s: Settings, trace) -> Tuple[float, float, float]:
    """The entropy probe itself; returns (deltaH1, U_cross, entropy)."""
    params = [p for p in policy.parameters() if p.requires_grad]
    prompt_len = r.seq.size(1) if s.prompt_len_from == "sequences" else r.prompt_width
    mask = trace.tensor("gen_mask", generation_mask(r.seq, prompt_len), role="completion_mask",
                        attention_mask=r.attn)
    trace.tensor("attention_mask", r.attn, role="attention_mask")
    trace.tensor("rewards", r.rewards, role="group")
    trace.tensor("A", r.advantages.view(s.n_prompts, s.group_size), role="group")
    n_tokens = mask[:, 1:].sum().clamp(min=1)
    batches = microbatches(r.seq.size(0), s.micro_batch)

    if s.zero_grad_before_x:
        opt.zero_grad(set_to_none=True)
    entropy = 0.0
    with trace.pass_("X", step_start=True):  # the probe's step begins here: .grad must be zero
        for mb in batches:
            logits = policy_logits(policy, r.seq[mb], r.attn[mb], s)
            H = masked_sum(token_entropy(logits), mask[mb, 1:]).sum() / n_tokens
            H.backward()
            entropy += H.item()
    g_x = [p.grad for p in params]

    g_y: List[Optional[torch.Tensor]] = [None] * len(params)
    adapters = contextlib.nullcontext() if s.y_adapters else policy.disable_adapter()
    with trace.pass_("Y"), adapters:
        for mb in batches:
            loss = grpo_loss(policy, r, mb, mask, n_tokens, s, trace)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            g_y = [g if acc is None else (acc if g is None else acc + g) for acc, g in zip(g_y, grads, strict=False)]

    lr = opt.param_groups[0]["lr"]
    u_cross = adam_cross(opt, params, g_x, g_y).item()
    delta_h1 = -lr * u_cross
    trace.scalar("deltaH1", delta_h1)
    return delta_h1, u_cross, entropy


def run_probe(bug: Optional[str] = None, seed: int = 0, cuts: str = "modules"):
    """Build, roll out, warm up, and run the entropy probe under ``gradtrace.watch``.

    Returns ``(trace, ProbeResult)``. ``bug`` is a key of :data:`BUGS` or None
    for the healthy run. The global RNG state is left as it was.
    """
    s = settings_for(bug)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        policy = build_policy(s)
        r = rollout(policy, s, gen)
        opt = torch.optim.Adam([p for p in policy.parameters() if p.requires_grad], lr=s.lr, eps=s.adam_eps)
        warm_up(policy, opt, r, s)
        with watch(policy, cuts=cuts, keep_grads=True) as trace:
            delta_h1, u_cross, entropy = probe(policy, opt, r, s, trace)
            # gradtrace's own U_cross: the same sum, from the gradients it kept
            trace.diff("X", "Y", precondition=opt)
    result = ProbeResult(bug, delta_h1, u_cross, s.lr, entropy, r.rewards.mean().item())
    return trace, result
