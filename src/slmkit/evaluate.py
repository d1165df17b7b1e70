"""Metrics for a classifier on the test split, and the bag-of-words baseline beside it."""

from __future__ import annotations

import time

from slmkit.data import Example
from slmkit.inference import Classifier


def accuracy(gold: list[str], pred: list[str | None]) -> float:
    return sum(g == p for g, p in zip(gold, pred, strict=True)) / len(gold)


def score(name: str, clf: Classifier, test: list[Example], progress_every: int = 50) -> tuple[dict, list[dict]]:
    """Classify the test split; return (metrics, per-example rows)."""
    import logging

    log = logging.getLogger(__name__)
    start = time.perf_counter()
    preds = []
    for i in range(0, len(test), progress_every):
        chunk = test[i : i + progress_every]
        preds += clf.classify([e.text for e in chunk])
        log.info("%s: %d/%d classified", name, len(preds), len(test))
    seconds = time.perf_counter() - start
    gold = [e.label for e in test]
    labels = [p.label for p in preds]
    metrics = {
        "accuracy": round(accuracy(gold, labels), 4),
        "invalid_rate": round(sum(label is None for label in labels) / len(test), 4),
        "n": len(test),
        "seconds_per_example": round(seconds / len(test), 5),
    }
    rows = [
        {"text": e.text, "label": e.label, f"{name}_pred": p.label, f"{name}_output": p.output}
        for e, p in zip(test, preds, strict=True)
    ]
    return metrics, rows


def bag_of_words_baseline(train: list[Example], test: list[Example], seed: int) -> dict:
    """Logistic regression on word and word-pair counts: the bar a fine-tuned LM should clear."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    model = make_pipeline(
        TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1),
        LogisticRegression(max_iter=2000, C=10.0, random_state=seed),
    )
    model.fit([e.text for e in train], [e.label for e in train])
    pred = list(model.predict([e.text for e in test]))
    return {"accuracy": round(accuracy([e.label for e in test], pred), 4), "n": len(test)}
