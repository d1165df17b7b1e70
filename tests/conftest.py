"""Shared fixtures for the default test tier: the composed config, tmp data files, a tiny tokenizer."""

from __future__ import annotations

import os

# No network in tests: any Hugging Face hub lookup must fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OLIVE_DISABLE_TELEMETRY", "1")

import copy
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from slmkit.config import Config, DataConfig, TinyModelConfig, compose, to_dict, validate

# A Phi-3-style chat template: the label is closed by <|end|>, so that is the stop marker.
CHAT_TEMPLATE = "<|user|>\n{text}<|end|>\n<|assistant|>\n{label}<|end|>"


@pytest.fixture(scope="session")
def chat_template() -> str:
    return CHAT_TEMPLATE


@pytest.fixture(scope="session")
def _composed() -> Config:
    return compose()


@pytest.fixture
def cfg(_composed: Config) -> Config:
    """The default composed config (conf/ with no overrides); a private copy per test."""
    return copy.deepcopy(_composed)


@pytest.fixture
def data_cfg(cfg: Config) -> DataConfig:
    return cfg.data


@pytest.fixture
def chat_data_cfg(cfg: Config, chat_template: str) -> DataConfig:
    """The default data config with a chat-style template, validated like any user config."""
    raw = to_dict(cfg)
    raw["data"]["template"] = chat_template
    return validate(raw).data


@pytest.fixture(params=["default", "chat"])
def any_data_cfg(request, data_cfg: DataConfig, chat_data_cfg: DataConfig) -> DataConfig:
    """Both templates: the shipped one and a chat-style one."""
    return data_cfg if request.param == "default" else chat_data_cfg


@pytest.fixture
def row(data_cfg: DataConfig) -> Callable[[str, str], dict]:
    """A valid JSON-lines row with the configured column names."""

    def make(text: str, label: str) -> dict:
        return {data_cfg.text_column: text, data_cfg.label_column: label}

    return make


@pytest.fixture
def write_jsonl(tmp_path: Path) -> Callable[..., Path]:
    """Write rows (dicts -> JSON, str -> verbatim line) to a tmp .jsonl file; return its path."""

    def write(rows: list, name: str = "data.jsonl") -> Path:
        path = tmp_path / name
        lines = [r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in rows]
        path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        return path

    return write


@pytest.fixture
def valid_rows(data_cfg: DataConfig, row) -> list[dict]:
    """Three distinct phrases for every configured label."""
    return [row(f"phrase {i} for {label}", label) for label in data_cfg.labels for i in range(3)]


@pytest.fixture(scope="session")
def tiny_tokenizer(_composed: Config):
    """A byte-level BPE tokenizer trained in memory on a handful of rendered training texts."""
    from slmkit.prompt import build_training_text
    from slmkit.tiny import EOS, train_tokenizer

    sentences = [
        "I can't stop smiling today.",
        "The letter never came and the house feels empty.",
        "Something moved in the dark hallway.",
        "They threw me a party I knew nothing about!",
    ]
    data = _composed.data
    texts = [build_training_text(data, s, label, EOS) for s in sentences for label in data.labels]
    return train_tokenizer(texts, vocab_size=400)


# Phrases of very different lengths (padding in a batch matters) for the tiny model below.
PHRASES = [
    "Hi!",
    "I can't stop smiling today.",
    "The letter never came and the house feels empty, every room of it, every single evening since June.",
    "Something moved in the dark hallway.",
    "They threw me a party I knew nothing about!",
    "Why?",
    "We lost the dog on the motorway and nobody stopped to help us look for him.",
    "A knock at three in the morning.",
    "Wow",
]

TINY_SERVING = TinyModelConfig(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, warmup_steps=30
)


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory, tiny_tokenizer, _composed: Config) -> dict[str, Path]:
    """One tiny model, briefly warmed up so its outputs vary: {"pytorch": HF folder, "onnx": int4 genai folder}.

    The int4 folder comes from onnxruntime-genai's builder, the one Olive's ModelBuilder pass runs; both
    folders carry the prompt file a shipped model folder has.
    """
    from onnxruntime_genai.models.builder import create_model

    from slmkit.inference import save_prompt_config
    from slmkit.prompt import build_prompt
    from slmkit.tiny import build_model, seed_everything, warm_up

    root = tmp_path_factory.mktemp("tiny_model")
    seed_everything(0)
    model = build_model(TINY_SERVING, len(tiny_tokenizer), tiny_tokenizer.eos_token_id)
    texts = [build_prompt(_composed.data, p) + "Joy" for p in PHRASES]
    warm_up(model, tiny_tokenizer, texts, TINY_SERVING, seed=0)
    torch_dir = root / "pytorch"
    model.save_pretrained(torch_dir)
    tiny_tokenizer.save_pretrained(torch_dir)
    onnx_dir = root / "onnx"
    # The LM head pruned to the last position, as the kit builds (builder.prune_lm_head).
    create_model("", str(torch_dir), str(onnx_dir), "int4", "cpu", str(root / "cache"), prune_lm_head=True)
    for folder in (torch_dir, onnx_dir):
        save_prompt_config(_composed.data, folder)
    return {"pytorch": torch_dir, "onnx": onnx_dir}


# The slow tier's finished tiny run (shared, read-only) and private copies of it (tests/workspace.py).
from workspace import _finished_run, finished_run, private_run  # noqa: E402,F401
