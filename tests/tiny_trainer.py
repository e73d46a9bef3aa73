"""A tiny world for Trainer tests and benchmarks: random-weight Llama, a WordLevel tokenizer, in-memory data.

Nothing is downloaded. Used by tests/test_trainer_integration.py and
benchmarks/trainer_overhead.py.
"""
from __future__ import annotations

import torch
import transformers
import peft
import tokenizers

WORDS = "the a cat dog sat ran on under mat rug red blue big small and then".split()
SEQ = 8


def make_tokenizer():
    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>"] + WORDS)}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    backend.decoder = tokenizers.decoders.WordPiece(prefix="##")  # joins words with spaces
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                                unk_token="<unk>", padding_side="left")


def make_llama(vocab_size):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
        pad_token_id=0, eos_token_id=1, bos_token_id=1, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config)


def make_qwen2(vocab_size):
    torch.manual_seed(0)
    config = transformers.Qwen2Config(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
        pad_token_id=0, eos_token_id=1, bos_token_id=1, tie_word_embeddings=True)
    return transformers.Qwen2ForCausalLM(config)


def with_lora(model, use_dora=False):
    return peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, use_dora=use_dora,
                                                      target_modules=["q_proj", "v_proj"]))


def lm_data(tokenizer, n=12):
    g = torch.Generator().manual_seed(1)
    rows = []
    for _ in range(n):
        words = [WORDS[i] for i in torch.randint(0, len(WORDS), (SEQ,), generator=g)]
        ids = tokenizer(" ".join(words))["input_ids"]
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": ids})
    return rows


def training_args(tmp_path, **overrides):
    """Trainer arguments for the CPU, no reporters, no checkpoints, a log line every step."""
    options = dict(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, learning_rate=1e-2,
                   logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0,
                   dataloader_num_workers=0)
    options.update(overrides)
    return transformers.TrainingArguments(**options)


class LogCollector(transformers.TrainerCallback):
    """What the Trainer hands its reporters: every ``logs`` dict, with the step it belongs to."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append((state.global_step, dict(logs)))

    def grad_norms(self):
        return {step: logs["grad_norm"] for step, logs in self.logs if "grad_norm" in logs}


def characters(completions, **kwargs):
    """Reward: the completion's length in characters (differs between a prompt's completions)."""
    return [float(len(c)) for c in completions]


def grpo_trainer(tmp_dir, model, tokenizer, callbacks=(), reward_funcs=characters, trainer_cls=None, **overrides):
    """TRL's GRPOTrainer (or ``trainer_cls``, e.g. RLOOTrainer): 2 generations per prompt, 8 completion tokens,
    a length reward."""
    import datasets
    import trl

    config_cls = trl.RLOOConfig if trainer_cls is not None and issubclass(trainer_cls, trl.RLOOTrainer) else \
        trl.GRPOConfig
    prompts = datasets.Dataset.from_list([{"prompt": p} for p in ["the cat sat", "a dog ran", "the red mat",
                                                                   "a big rug"] * 8])
    options = dict(output_dir=str(tmp_dir), per_device_train_batch_size=2, num_generations=2,
                   max_completion_length=8, max_steps=2, learning_rate=1e-3, logging_steps=1, report_to=[],
                   use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0)
    options.update(overrides)
    return (trainer_cls or trl.GRPOTrainer)(model=model, reward_funcs=reward_funcs, args=config_cls(**options),
                                            train_dataset=prompts, processing_class=tokenizer,
                                            callbacks=list(callbacks))
