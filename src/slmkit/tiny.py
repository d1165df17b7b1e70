"""The locally built tiny Phi-3 base model: a BPE tokenizer trained on the data, a Phi3 model, a brief warm-up."""

from __future__ import annotations

import logging
import math
import random
from pathlib import Path

import numpy as np
import torch

from slmkit.config import TinyModelConfig

log = logging.getLogger(__name__)

EOS = "<|endoftext|>"
# Phi-3's chat markers are single tokens in the real tokenizer; make them so here too.
CHAT_TOKENS = ["<|user|>", "<|assistant|>", "<|end|>", "<|system|>"]


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch, and ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE (GPT-2 style) trained on `texts`; deterministic for the same texts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, *CHAT_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        pad_token=EOS,
        unk_token=None,
        model_max_length=1024,
        clean_up_tokenization_spaces=False,
    )


def linear_widths(cfg: TinyModelConfig) -> set[int]:
    """Output/input widths of every linear layer of a Phi-3 model with these sizes."""
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    return {
        cfg.hidden_size,
        3 * cfg.num_attention_heads * head_dim,  # qkv_proj
        2 * cfg.intermediate_size,  # gate_up_proj
        cfg.intermediate_size,
    }


def phi3_config(cfg: TinyModelConfig, vocab_size: int, eos_id: int):
    """The transformers Phi3Config of the tiny model (also used to build it on the meta device)."""
    from transformers import Phi3Config

    if cfg.hidden_size % cfg.num_attention_heads:
        raise ValueError(
            f"model.tiny.hidden_size={cfg.hidden_size} must be divisible by "
            f"model.tiny.num_attention_heads={cfg.num_attention_heads}"
        )
    return Phi3Config(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_attention_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        original_max_position_embeddings=cfg.max_position_embeddings,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        tie_word_embeddings=False,
    )


def build_model(cfg: TinyModelConfig, vocab_size: int, eos_id: int):
    from transformers import Phi3ForCausalLM

    if vocab_size in linear_widths(cfg):
        # ModelBuilder finds the LM head by its width; a clash makes it pick the wrong layer.
        raise ValueError(
            f"tokenizer vocab size {vocab_size} equals a linear layer width {sorted(linear_widths(cfg))}; "
            "change model.tiny.vocab_size"
        )
    return Phi3ForCausalLM(phi3_config(cfg, vocab_size, eos_id))


def warm_up(model, tokenizer, texts: list[str], cfg: TinyModelConfig, seed: int) -> list[float]:
    """Brief causal-LM training on plain text so the base knows the vocabulary; returns the loss per step."""
    rng = random.Random(seed)
    ids = [tokenizer(t + EOS, add_special_tokens=False)["input_ids"] for t in texts]
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.warmup_learning_rate, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / cfg.warmup_steps))
    )
    model.train()
    losses = []
    pad = tokenizer.pad_token_id
    for step in range(cfg.warmup_steps):
        batch = rng.sample(ids, min(cfg.warmup_batch_size, len(ids)))
        width = max(map(len, batch))
        input_ids = torch.full((len(batch), width), pad)
        labels = torch.full((len(batch), width), -100)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, seq in enumerate(batch):
            input_ids[i, : len(seq)] = torch.tensor(seq)
            labels[i, : len(seq)] = torch.tensor(seq)
            mask[i, : len(seq)] = 1
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss.item())
        if step % 50 == 0 or step == cfg.warmup_steps - 1:
            log.info("warm-up step %d/%d loss %.3f", step + 1, cfg.warmup_steps, loss.item())
    model.eval()
    return losses


def build_tiny_base(
    cfg: TinyModelConfig, tokenizer_texts: list[str], warmup_texts: list[str], seed: int, out_dir: Path
) -> dict:
    """Train the tokenizer, build and warm up the model, save both to `out_dir` (HF format)."""
    seed_everything(seed)
    tokenizer = train_tokenizer(tokenizer_texts, cfg.vocab_size)
    model = build_model(cfg, len(tokenizer), tokenizer.eos_token_id)
    losses = warm_up(model, tokenizer, warmup_texts, cfg, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    n_params = sum(p.numel() for p in model.parameters())
    return {"vocab_size": len(tokenizer), "parameters": n_params, "warmup_loss": losses}
