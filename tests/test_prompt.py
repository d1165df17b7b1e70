"""One template -> training text, inference prompt and label parsing, consistently."""

from __future__ import annotations

from pathlib import Path

import pytest

from slmkit.config import DataConfig
from slmkit.inference import Classifier, load_prompt_config, save_prompt_config
from slmkit.prompt import (
    build_completion,
    build_prompt,
    build_training_text,
    normalize_label,
    parse_output,
    stop_marker,
)
from slmkit.tiny import EOS

TEXTS = [
    "I can't stop smiling today.",
    "  leading and trailing spaces  ",
    "braces {label} and {text} stay as written",
    "unicode: café, naïve, 😀",
]


def _filled(template: str, text: str, label: str) -> str:
    """The documented meaning of a template: {text} and {label} filled in."""
    return template.replace("{label}", label).replace("{text}", text)


@pytest.mark.parametrize("text", TEXTS)
def test_training_text_is_prompt_plus_completion(any_data_cfg: DataConfig, text: str):
    for label in any_data_cfg.labels:
        prompt = build_prompt(any_data_cfg, text)
        completion = build_completion(any_data_cfg, label, EOS)
        training = build_training_text(any_data_cfg, text, label, EOS)
        assert training == prompt + completion
        assert text in prompt
        assert completion.startswith(label)
        assert completion.endswith(EOS)


@pytest.mark.parametrize("text", TEXTS)
def test_training_text_is_the_filled_template_then_eos(any_data_cfg: DataConfig, text: str):
    for label in any_data_cfg.labels:
        training = build_training_text(any_data_cfg, text, label, EOS)
        assert training == _filled(any_data_cfg.template, text, label) + EOS


def test_no_bos_and_one_eos_at_the_end(any_data_cfg: DataConfig):
    label = any_data_cfg.labels[0]
    training = build_training_text(any_data_cfg, "some text", label, EOS)
    # Nothing is prepended: the text starts exactly where the template starts.
    assert training.startswith(any_data_cfg.template.split("{text}")[0])
    assert not training.startswith(EOS)
    assert training.count(EOS) == 1
    assert training.endswith(EOS)


def test_prompt_does_not_depend_on_label_and_has_no_placeholders(any_data_cfg: DataConfig):
    prompt = build_prompt(any_data_cfg, "some text")
    assert "{text}" not in prompt
    assert "{label}" not in prompt
    for label in any_data_cfg.labels:
        assert build_training_text(any_data_cfg, "some text", label, EOS).startswith(prompt)


def test_prompt_keeps_user_text_verbatim(any_data_cfg: DataConfig):
    text = TEXTS[2]
    assert build_prompt(any_data_cfg, text).count(text) == 1


def test_chat_template_prompt_and_stop_marker(chat_data_cfg: DataConfig):
    label = chat_data_cfg.labels[0]
    prompt = build_prompt(chat_data_cfg, "hi")
    assert prompt == "<|user|>\nhi<|end|>\n<|assistant|>\n"
    assert build_completion(chat_data_cfg, label, EOS) == f"{label}<|end|>{EOS}"
    assert stop_marker(chat_data_cfg) == "<|end|>"


def test_stop_marker_ends_every_label(any_data_cfg: DataConfig):
    marker = stop_marker(any_data_cfg)
    assert marker
    for label in any_data_cfg.labels:
        assert marker not in label


def test_default_template_without_suffix_stops_at_newline(data_cfg: DataConfig):
    if not data_cfg.template.endswith("{label}"):
        pytest.skip("the shipped template has a suffix after {label}")
    assert stop_marker(data_cfg) == "\n"


# --- normalize_label / parse_output ---------------------------------------------------------------


def test_normalize_label_any_case_gives_configured_spelling(data_cfg: DataConfig):
    for label in data_cfg.labels:
        for variant in (label, label.lower(), label.upper(), label.swapcase(), f"  {label}\t"):
            assert normalize_label(data_cfg, variant) == label


@pytest.mark.parametrize("value", ["", "   ", "not a label", "label"])
def test_normalize_label_rejects_non_labels(data_cfg: DataConfig, value: str):
    assert normalize_label(data_cfg, value) is None


def test_normalize_label_rejects_label_with_extra_characters(data_cfg: DataConfig):
    for label in data_cfg.labels:
        assert normalize_label(data_cfg, label + "s") is None
        assert normalize_label(data_cfg, label[:-1]) is None


def test_parse_output_reads_each_label(any_data_cfg: DataConfig):
    marker = stop_marker(any_data_cfg)
    for label in any_data_cfg.labels:
        outputs = [
            label,
            label.lower(),
            label.upper(),
            f" {label} ",
            label + marker,
            label + marker + "### Text: and the model keeps going",
            label + "\n" + "extra text on the next line",
            label + "\n\n",
        ]
        for output in outputs:
            assert parse_output(any_data_cfg, output) == label, repr(output)


def test_parse_output_reads_the_trained_completion(any_data_cfg: DataConfig):
    # What the model learned to write (without the EOS, which decoding drops), then anything after it.
    for label in any_data_cfg.labels:
        completion = build_completion(any_data_cfg, label, eos_token="")
        assert parse_output(any_data_cfg, completion) == label
        assert parse_output(any_data_cfg, completion + "\nmore text") == label


def test_parse_output_invalid_is_none(any_data_cfg: DataConfig):
    marker = stop_marker(any_data_cfg)
    first, second = any_data_cfg.labels[:2]
    for output in [
        "",
        "   ",
        "\n",
        marker,
        "not a label",
        f"{first}ful",
        f"{first} {second}",
        f"{first}, obviously",
    ]:
        assert parse_output(any_data_cfg, output) is None, repr(output)


# --- the prompt travels with the model folder (inference.py) --------------------------------------


def test_prompt_config_round_trip(chat_data_cfg: DataConfig, tmp_path: Path):
    save_prompt_config(chat_data_cfg, tmp_path)
    loaded = load_prompt_config(tmp_path)
    assert loaded.template == chat_data_cfg.template
    assert list(loaded.labels) == list(chat_data_cfg.labels)
    assert build_prompt(loaded, "x") == build_prompt(chat_data_cfg, "x")
    assert stop_marker(loaded) == stop_marker(chat_data_cfg)


def test_load_prompt_config_missing_file(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_prompt_config(tmp_path)


class _EchoModel:
    """Stands in for a model: records what it was asked and answers with a fixed output."""

    one_length_batches = False

    def __init__(self, output: str):
        self.output = output
        self.calls: list[tuple[str, int, str | None]] = []

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def generate(self, prompt: str, max_new_tokens: int, stop: str | None = None) -> str:
        self.calls.append((prompt, max_new_tokens, stop))
        return self.output

    def generate_batch(self, prompts: list[str], max_new_tokens: int, stop: str | None = None) -> list[str]:
        return [self.generate(prompt, max_new_tokens, stop) for prompt in prompts]


def test_classifier_uses_the_training_prompt_and_stop_marker(any_data_cfg: DataConfig):
    label = any_data_cfg.labels[-1]
    model = _EchoModel(label.lower() + stop_marker(any_data_cfg) + "junk")
    clf = Classifier(model, any_data_cfg, max_new_tokens=5, decoding="stop")
    for size in (1, 2):  # one at a time and batched ask the model the same
        model.calls.clear()
        preds = clf.classify(["one", "two"], batch_size=size)
        assert [p.label for p in preds] == [label, label]
        assert [p.text for p in preds] == ["one", "two"]
        assert model.calls == [
            (build_prompt(any_data_cfg, "one"), 5, stop_marker(any_data_cfg)),
            (build_prompt(any_data_cfg, "two"), 5, stop_marker(any_data_cfg)),
        ]


def test_classifier_reports_invalid_output_as_none(data_cfg: DataConfig):
    preds = Classifier(_EchoModel("no idea"), data_cfg, decoding="stop").classify(["x"])
    assert preds[0].label is None
    assert preds[0].output == "no idea"
