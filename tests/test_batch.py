"""Batched inference gives the labels (and outputs) of the one-at-a-time path, in both backends.

A tiny Phi-3 model is built here, briefly warmed up so its outputs are not uniform, saved as a PyTorch
folder and built into an int4 onnxruntime-genai folder with the same builder Olive's ModelBuilder pass runs.
Phrases of very different lengths make the left padding matter.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from slmkit.config import DataConfig, TinyModelConfig
from slmkit.inference import Classifier, GenaiModel, TorchModel, save_prompt_config
from slmkit.prompt import build_prompt

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

TINY = TinyModelConfig(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, warmup_steps=30
)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tiny_tokenizer, _composed) -> dict[str, Path]:
    """{"pytorch": HF folder, "onnx": int4 genai folder} of one tiny model."""
    from onnxruntime_genai.models.builder import create_model

    from slmkit.tiny import build_model, seed_everything, warm_up

    root = tmp_path_factory.mktemp("batch")
    seed_everything(0)
    model = build_model(TINY, len(tiny_tokenizer), tiny_tokenizer.eos_token_id)
    warm_up(model, tiny_tokenizer, [build_prompt(_composed.data, p) + "Joy" for p in PHRASES], TINY, seed=0)
    torch_dir = root / "pytorch"
    model.save_pretrained(torch_dir)
    tiny_tokenizer.save_pretrained(torch_dir)
    onnx_dir = root / "onnx"
    create_model("", str(torch_dir), str(onnx_dir), "int4", "cpu", str(root / "cache"))
    for folder in (torch_dir, onnx_dir):  # the prompt a shipped model folder carries
        save_prompt_config(_composed.data, folder)
    return {"pytorch": torch_dir, "onnx": onnx_dir}


@pytest.fixture(scope="module", params=["pytorch", "onnx"])
def backend(request, model_dirs):
    path = model_dirs[request.param]
    return GenaiModel(path) if request.param == "onnx" else TorchModel(path)


def test_padded_batch_logits_match_each_prompt_alone(backend, any_data_cfg: DataConfig):
    prompts = [backend.encode(build_prompt(any_data_cfg, p)) for p in PHRASES]
    assert len({len(p) for p in prompts}) > 3, "the phrases must give prompts of different lengths"
    batch = np.asarray(backend.first_logits(prompts), dtype=np.float64)
    for i, ids in enumerate(prompts):
        alone = np.asarray(backend.first_logits([ids]), dtype=np.float64)[0]
        np.testing.assert_allclose(batch[i], alone, rtol=1e-3, atol=1e-3)
        assert batch[i].argmax() == alone.argmax()


@pytest.mark.parametrize("decoding", ["constrained", "stop"])
def test_batched_classify_equals_one_at_a_time(backend, any_data_cfg: DataConfig, decoding: str):
    clf = Classifier(backend, any_data_cfg, max_new_tokens=6, decoding=decoding)
    one = clf.classify(PHRASES, batch_size=1)
    for size in (4, len(PHRASES)):
        seen: list[int] = []
        batched = clf.classify(PHRASES, batch_size=size, progress=seen.append)
        assert [p.label for p in batched] == [p.label for p in one]
        assert [p.output for p in batched] == [p.output for p in one]
        assert sum(seen) == len(PHRASES) and max(seen) == size
    if decoding == "constrained":
        assert all(p.label in any_data_cfg.labels for p in one)


def test_labels_sharing_a_first_token_fall_back_to_one_at_a_time(backend, data_cfg: DataConfig):
    """Labels that begin alike need a second token: the batch defers those prompts to the single path."""
    data = dataclasses.replace(data_cfg, labels=["Sad", "Sadness", "Joy", "Joyful"])
    clf = Classifier(backend, data)
    one = clf.classify(PHRASES, batch_size=1)
    assert [p.label for p in clf.classify(PHRASES, batch_size=len(PHRASES))] == [p.label for p in one]
    picks, scores = clf.constrained_batch([build_prompt(data, p) for p in PHRASES])
    assert [data.labels[i] for i in picks] == [p.label for p in one]


def test_label_scores_are_a_distribution_led_by_the_label(backend, data_cfg: DataConfig):
    clf = Classifier(backend, data_cfg)
    picks, scores = clf.constrained_batch([build_prompt(data_cfg, p) for p in PHRASES])
    for pick, row in zip(picks, scores, strict=True):
        assert row is not None and len(row) == len(data_cfg.labels)
        assert abs(sum(row) - 1) < 1e-3
        assert row[pick] == max(row)


def test_batch_size_below_one_is_refused(backend, data_cfg: DataConfig):
    with pytest.raises(ValueError, match="batch_size"):
        Classifier(backend, data_cfg, batch_size=0)


def test_cli_classify_file_in_batches_prints_the_same_labels(model_dirs, tmp_path: Path, capsys):
    from slmkit.cli import main

    phrases = tmp_path / "phrases.txt"
    phrases.write_text("\n".join(PHRASES) + "\n", encoding="utf-8")
    printed = {}
    for size in ("1", "4"):
        args = ["classify", "--file", str(phrases), "--json", "--model", str(model_dirs["onnx"]), "--batch-size", size]
        assert main(args) == 0
        printed[size] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["text"] for r in printed["4"]] == PHRASES
    assert printed["4"] == printed["1"]
