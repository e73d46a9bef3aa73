"""The workloads: a model, one fixed batch, a loss, and how gradients are taken."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

WORKLOADS = ("transformer", "linear_chain", "lora_gpt2", "ypass", "mlp")

# Shapes per size. "full" is the benchmark, "quick" runs in under a minute on a
# 2-core CPU, "tiny" exists for the test suite.
SHAPES = {
    # The plain-torch transformer keeps GPT-2 small's 12 blocks but an 8,192-token
    # vocabulary: with 50,257 the tied embedding's 154 MB gradient, freshly
    # allocated every step (zero_grad(set_to_none=True)), is page-faulted in each
    # time, which on a 2-core VM put a third of the step in the kernel and made
    # step times swing by +-30%. The LoRA model keeps GPT-2's vocabulary: its
    # embedding is frozen and gets no gradient.
    "full": {
        "transformer": dict(n_layer=12, d=768, n_head=12, vocab=8192, seq=64, batch=1),
        "lora_gpt2": dict(n_layer=12, d=768, n_head=12, vocab=50257, seq=64, batch=1),
        "ypass": dict(n_layer=12, d=768, n_head=12, vocab=8192, seq=64, batch=1),
        "linear_chain": dict(n=1000, width=4, batch=8),
        "mlp": dict(n=8, width=16, batch=4, inner=40),
        "rounds": 15, "warmup": 2, "chain_inner": 5, "enter_exit_repeats": 10,
    },
    "quick": {
        "transformer": dict(n_layer=4, d=256, n_head=4, vocab=4096, seq=64, batch=2),
        "lora_gpt2": dict(n_layer=2, d=128, n_head=4, vocab=2048, seq=32, batch=2),
        "ypass": dict(n_layer=4, d=256, n_head=4, vocab=4096, seq=64, batch=2),
        "linear_chain": dict(n=1000, width=4, batch=8),
        "mlp": dict(n=8, width=16, batch=4, inner=20),
        "rounds": 4, "warmup": 1, "chain_inner": 2, "enter_exit_repeats": 5,
    },
    "tiny": {
        "transformer": dict(n_layer=2, d=64, n_head=2, vocab=256, seq=16, batch=2),
        "lora_gpt2": dict(n_layer=2, d=32, n_head=2, vocab=128, seq=16, batch=2),
        "ypass": dict(n_layer=2, d=64, n_head=2, vocab=256, seq=16, batch=2),
        "linear_chain": dict(n=300, width=4, batch=8),  # tests only; the benchmark keeps 1,000
        "mlp": dict(n=8, width=16, batch=4, inner=2),
        "rounds": 2, "warmup": 1, "chain_inner": 1, "enter_exit_repeats": 2,
    },
}


class SkipWorkload(Exception):
    """An optional dependency of a workload is missing."""


class CausalSelfAttention(nn.Module):
    def __init__(self, d: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.c_attn(x).split(d, dim=2)
        q, k, v = (z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.c_fc = nn.Linear(d, 4 * d)
        self.c_proj = nn.Linear(4 * d, d)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, d: int, n_head: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, n_head)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = MLP(d)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """GPT-2's shape in plain torch (tied embedding / head, pre-LayerNorm, no dropout)."""

    def __init__(self, n_layer: int, d: int, n_head: int, vocab: int, seq: int):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(seq, d)
        self.h = nn.ModuleList(Block(d, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx):
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def lm_loss(logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), idx[:, 1:].reshape(-1))


@dataclass
class Workload:
    """A model, one fixed batch, a loss, and how gradients are taken.

    The loss is split into ``forward`` (model, batch) -> output and ``loss_of``
    (output, batch) -> scalar, so that a peer that runs the forward itself
    (torchlens traces it) can still compute the same loss.
    """

    name: str
    model: nn.Module
    batch: torch.Tensor
    forward: Callable[[nn.Module, torch.Tensor], Any]
    loss_of: Callable[[Any, torch.Tensor], torch.Tensor]
    mode: str  # "backward" (.backward() into .grad) or "grad" (torch.autograd.grad)
    inner: int = 1  # steps per variant per round
    shape: str = ""

    def loss(self, model: nn.Module) -> torch.Tensor:
        return self.loss_of(self.forward(model, self.batch), self.batch)


def call_model(model: nn.Module, batch: torch.Tensor) -> Any:
    return model(batch)


def mean_square(out: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    return out.square().mean()


def hf_forward(model: nn.Module, idx: torch.Tensor) -> Any:
    return model(input_ids=idx, labels=idx)


def hf_loss(out: Any, idx: torch.Tensor) -> torch.Tensor:
    return out.loss


def build_workload(name: str, size: str, device: torch.device) -> Workload:
    shapes = SHAPES[size]
    cfg = shapes[name]
    torch.manual_seed(0)
    if name in ("transformer", "ypass"):
        model = GPT(cfg["n_layer"], cfg["d"], cfg["n_head"], cfg["vocab"], cfg["seq"])
        batch = torch.randint(0, cfg["vocab"], (cfg["batch"], cfg["seq"]))
        wl = Workload(name, model, batch, call_model, lm_loss, "grad" if name == "ypass" else "backward",
                      shape=f"{cfg['n_layer']}L d={cfg['d']} V={cfg['vocab']} {cfg['batch']}x{cfg['seq']}")
    elif name == "linear_chain":
        model = nn.Sequential(*(nn.Linear(cfg["width"], cfg["width"]) for _ in range(cfg["n"])))
        batch = torch.randn(cfg["batch"], cfg["width"])
        wl = Workload(name, model, batch, call_model, mean_square, "backward", inner=shapes["chain_inner"],
                      shape=f"{cfg['n']} x Linear({cfg['width']},{cfg['width']}) batch {cfg['batch']}")
    elif name == "mlp":
        # 16 parameters, a sub-millisecond step: what a pass costs apart from its parameters.
        model = nn.Sequential(*(layer for _ in range(cfg["n"])
                                for layer in (nn.Linear(cfg["width"], cfg["width"]), nn.Tanh())))
        batch = torch.randn(cfg["batch"], cfg["width"])
        wl = Workload(name, model, batch, call_model, mean_square, "backward", inner=cfg["inner"],
                      shape=f"{cfg['n']} x (Linear({cfg['width']},{cfg['width']}), Tanh) batch {cfg['batch']}")
    elif name == "lora_gpt2":
        model = build_lora_gpt2(cfg)
        batch = torch.randint(0, cfg["vocab"], (cfg["batch"], cfg["seq"]))
        wl = Workload(name, model, batch, hf_forward, hf_loss, "backward",
                      shape=f"{cfg['n_layer']}L d={cfg['d']} V={cfg['vocab']} {cfg['batch']}x{cfg['seq']} LoRA r=8")
    else:
        raise ValueError(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")
    wl.model.to(device).train()
    wl.batch = wl.batch.to(device)
    return wl


def build_lora_gpt2(cfg: dict) -> nn.Module:
    try:
        import transformers
        from peft import LoraConfig, get_peft_model
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError as exc:
        raise SkipWorkload(f"needs transformers and peft ({exc})") from exc
    transformers.logging.set_verbosity_error()
    config = GPT2Config(
        n_layer=cfg["n_layer"], n_embd=cfg["d"], n_head=cfg["n_head"], vocab_size=cfg["vocab"],
        n_positions=max(cfg["seq"], 64), resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=cfg["vocab"] - 1, eos_token_id=cfg["vocab"] - 1,
    )
    lora = LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["c_attn", "c_proj", "c_fc"],
        fan_in_fan_out=True, task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # peft calls a renamed transformers method
        return get_peft_model(GPT2LMHeadModel(config), lora)


def trainable(model: nn.Module) -> List[Tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]
