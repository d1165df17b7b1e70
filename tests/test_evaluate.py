"""Default tier: evaluation metrics and label-constrained decoding (the parity gate: tests/test_gate.py)."""

from __future__ import annotations

import pytest

from slmkit.evaluate import INVALID, report
from slmkit.inference import label_token_ids, pick_label

LABELS = ["Sadness", "Joy", "Fear", "Surprise"]


def test_report_matches_sklearn():
    from sklearn.metrics import f1_score, precision_recall_fscore_support

    gold = ["Joy", "Joy", "Fear", "Sadness", "Surprise", "Fear", "Joy", "Sadness"]
    pred = ["Joy", "Fear", "Fear", None, "Surprise", "Joy", "Joy", "Sadness"]
    r = report(gold, pred, LABELS)
    filled = [p or INVALID for p in pred]
    assert r["accuracy"] == pytest.approx(5 / 8, abs=1e-4)
    assert r["macro_f1"] == pytest.approx(f1_score(gold, filled, labels=LABELS, average="macro"), abs=1e-3)
    precision, recall, _, support = precision_recall_fscore_support(gold, filled, labels=LABELS, zero_division=0)
    for i, label in enumerate(LABELS):
        assert r["per_class"][label]["precision"] == pytest.approx(precision[i], abs=1e-4)
        assert r["per_class"][label]["recall"] == pytest.approx(recall[i], abs=1e-4)
        assert r["per_class"][label]["support"] == support[i]
    assert r["invalid_rate"] == pytest.approx(1 / 8)
    assert r["confusion"]["labels"] == [*LABELS, INVALID]
    matrix = r["confusion"]["matrix"]
    assert matrix[LABELS.index("Sadness")][-1] == 1  # the invalid output
    assert sum(map(sum, matrix)) == len(gold)


def test_pick_label_follows_the_best_allowed_token():
    # Token 9 scores highest overall but is not a label's first token: constrained decoding ignores it.
    logits = [0.0] * 10
    logits[9], logits[3], logits[5] = 10.0, 2.0, 1.0
    assert pick_label([[5], [3, 4], [6]], end_id=0, logits=logits, advance=None) == 1


def test_pick_label_walks_shared_prefixes_and_stops_at_end():
    steps = {7: [0.0, 5.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]}  # after token 7: "end" (1) beats token 2

    def advance(token):
        return steps[token]

    first = [0.0] * 8
    first[7] = 3.0
    assert pick_label([[7, 2], [7], [4]], end_id=1, logits=first, advance=advance) == 1


def test_label_token_ids_in_context(tiny_tokenizer, any_data_cfg):
    from slmkit.prompt import build_prompt, build_training_text

    def encode(text):
        return tiny_tokenizer(text, add_special_tokens=False)["input_ids"]

    prompt = build_prompt(any_data_cfg, "Something moved in the dark hallway.")
    candidates, end_id = label_token_ids(encode, any_data_cfg, prompt, tiny_tokenizer.eos_token_id)
    assert len(candidates) == len(any_data_cfg.labels) and all(candidates)
    for label, ids in zip(any_data_cfg.labels, candidates, strict=True):
        full = encode(build_training_text(any_data_cfg, "Something moved in the dark hallway.", label, ""))
        assert full[len(encode(prompt)) :][: len(ids)] == ids
    # The end token is what training put after the label: the chat template's <|end|>, else EOS.
    expected = "<|end|>" if any_data_cfg.template.endswith("<|end|>") else tiny_tokenizer.eos_token
    assert tiny_tokenizer.convert_ids_to_tokens(end_id) == expected
