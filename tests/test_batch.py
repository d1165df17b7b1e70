"""Batched inference gives the labels (and outputs) of the one-at-a-time path, in both backends.

The tiny model (conftest.tiny_model_dirs) is a real PyTorch folder and a real int4 onnxruntime-genai folder;
phrases of very different lengths make the padding matter.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import PHRASES

from slmkit.config import DataConfig
from slmkit.inference import Classifier, GenaiModel, TorchModel
from slmkit.prompt import build_prompt

# PHRASES and each with its words in reverse order (one token length, other content), so that one-length
# batches of several prompts form.
VARIED = PHRASES + [" ".join(reversed(p.split())) for p in PHRASES]


@pytest.fixture(scope="module", params=["pytorch", "onnx"])
def backend(request, tiny_model_dirs):
    path = tiny_model_dirs[request.param]
    return GenaiModel(path) if request.param == "onnx" else TorchModel(path)


def test_batch_logits_match_each_prompt_alone(backend, any_data_cfg: DataConfig):
    """Every batch the classifier forms (PyTorch: padded rows of several lengths; onnxruntime-genai: rows of
    one length) scores each prompt as that prompt alone."""
    clf = Classifier(backend, any_data_cfg, batch_size=len(VARIED))
    prompts = [backend.encode(build_prompt(any_data_cfg, p)) for p in VARIED]
    batches = clf.batches([build_prompt(any_data_cfg, p) for p in VARIED])
    assert max(map(len, batches)) > 2, "no batch of several prompts: VARIED needs phrases of like lengths"
    if backend.one_length_batches:
        assert all(len({len(prompts[i]) for i in batch}) == 1 for batch in batches)
    else:
        assert len({len(prompts[i]) for i in batches[0]}) > 3, "the padded batch must mix lengths"
    for batch in batches:
        logits = np.asarray(backend.first_logits([prompts[i] for i in batch]), dtype=np.float64)
        for i, row in zip(batch, logits, strict=True):
            alone = np.asarray(backend.first_logits([prompts[i]]), dtype=np.float64)[0]
            np.testing.assert_allclose(row, alone, rtol=1e-3, atol=1e-3)
            assert row.argmax() == alone.argmax()


def test_genai_refuses_a_batch_of_several_lengths(tiny_model_dirs, data_cfg: DataConfig):
    model = GenaiModel(tiny_model_dirs["onnx"])
    prompts = [model.encode(build_prompt(data_cfg, p)) for p in PHRASES[:2]]
    assert len(prompts[0]) != len(prompts[1])
    with pytest.raises(ValueError, match="one token length"):
        model.first_logits(prompts)


@pytest.mark.parametrize("decoding", ["constrained", "stop"])
def test_batched_classify_equals_one_at_a_time(backend, any_data_cfg: DataConfig, decoding: str):
    clf = Classifier(backend, any_data_cfg, max_new_tokens=6, decoding=decoding)
    one = clf.classify(VARIED, batch_size=1)
    for size in (2, len(VARIED)):
        seen: list[int] = []
        batched = clf.classify(VARIED, batch_size=size, progress=seen.append)
        assert [p.label for p in batched] == [p.label for p in one]
        assert [p.output for p in batched] == [p.output for p in one]
        assert sum(seen) == len(VARIED) and 1 < max(seen) <= size
    if decoding == "constrained":
        assert all(p.label in any_data_cfg.labels for p in one)


def test_labels_sharing_a_first_token_fall_back_to_one_at_a_time(backend, data_cfg: DataConfig):
    """Labels that begin alike need a second token: the batch defers those prompts to the single path."""
    data = dataclasses.replace(data_cfg, labels=["Sad", "Sadness", "Joy", "Joyful"])
    clf = Classifier(backend, data)
    one = clf.classify(PHRASES, batch_size=1)
    assert [p.label for p in clf.classify(PHRASES, batch_size=len(PHRASES))] == [p.label for p in one]
    prompts = [build_prompt(data, p) for p in PHRASES]
    for batch in clf.batches(prompts, len(PHRASES)):
        picks, _ = clf.constrained_batch([prompts[i] for i in batch])
        assert [data.labels[pick] for pick in picks] == [one[i].label for i in batch]


def test_label_scores_are_a_distribution_led_by_the_label(backend, data_cfg: DataConfig):
    clf = Classifier(backend, data_cfg)
    prompts = [build_prompt(data_cfg, p) for p in VARIED]
    picks, scores = [], []
    for batch in clf.batches(prompts):
        batch_picks, batch_scores = clf.constrained_batch([prompts[i] for i in batch])
        picks += batch_picks
        scores += batch_scores
    assert len(scores) == len(VARIED)
    for pick, row in zip(picks, scores, strict=True):
        assert row is not None and len(row) == len(data_cfg.labels)
        assert abs(sum(row) - 1) < 1e-3
        assert row[pick] == max(row)


def test_batch_size_below_one_is_refused(backend, data_cfg: DataConfig):
    with pytest.raises(ValueError, match="batch_size"):
        Classifier(backend, data_cfg, batch_size=0)


def test_cli_classify_file_in_batches_prints_the_same_labels(tiny_model_dirs, tmp_path: Path, capsys):
    from slmkit.cli import main

    phrases = tmp_path / "phrases.txt"
    phrases.write_text("\n".join(PHRASES) + "\n", encoding="utf-8")
    printed = {}
    for size in ("1", "4"):
        args = [
            "classify",
            "--file",
            str(phrases),
            "--json",
            "--model",
            str(tiny_model_dirs["onnx"]),
            "--batch-size",
            size,
        ]
        assert main(args) == 0
        printed[size] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["text"] for r in printed["4"]] == PHRASES
    assert printed["4"] == printed["1"]


def test_a_prompt_holding_the_pad_token_batches_like_one_at_a_time(backend, data_cfg: DataConfig):
    """ChatML models (SmolLM2) end the user turn with <|im_end|>, their end-of-sequence and pad token: a
    prompt may hold the pad id. Here the tiny model's <|endoftext|> (its pad id) plays that part."""
    from slmkit.tiny import EOS

    data = dataclasses.replace(data_cfg, template=f"<|user|>\n{{text}}{EOS}\n<|assistant|>\n{{label}}{EOS}")
    prompt = backend.encode(build_prompt(data, PHRASES[0]))
    assert backend.eos_id in prompt[:-1]  # the tiny model pads with it too (PyTorch's pad_id)
    for decoding in ("constrained", "stop"):
        clf = Classifier(backend, data, max_new_tokens=4, decoding=decoding)
        one = clf.classify(PHRASES, batch_size=1)
        assert [p.output for p in clf.classify(PHRASES, batch_size=len(PHRASES))] == [p.output for p in one]


def test_threads_default_to_the_omp_budget_else_one_per_core(monkeypatch):
    """A parallel sweep gives each job its share of the cores in OMP_NUM_THREADS; without it, every core."""
    import os

    from slmkit.inference import default_threads

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert default_threads() == 1
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert default_threads() == len(os.sched_getaffinity(0))
    monkeypatch.setenv("OMP_NUM_THREADS", "")  # set but empty: no budget
    assert default_threads() == len(os.sched_getaffinity(0))
