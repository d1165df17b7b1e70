"""Metrics for a classifier on the test split (accuracy, macro-F1, per class, confusion), parity, baseline."""

from __future__ import annotations

import logging
import time

from slmkit.data import Example
from slmkit.inference import Classifier

# The confusion matrix's extra column: outputs that are not one of the labels.
INVALID = "(invalid)"

log = logging.getLogger(__name__)


def accuracy(gold: list[str], pred: list[str | None]) -> float:
    return sum(g == p for g, p in zip(gold, pred, strict=True)) / len(gold)


def report(gold: list[str], pred: list[str | None], labels: list[str]) -> dict:
    """Accuracy, macro-F1, per-class precision/recall/F1 and the confusion matrix.

    An invalid output (None) counts as wrong for its true class and as nobody's prediction, so it
    lowers recall but not the precision of any label.
    """
    columns = [*labels, INVALID]
    matrix = {g: dict.fromkeys(columns, 0) for g in labels}
    for g, p in zip(gold, pred, strict=True):
        matrix[g][p if p in labels else INVALID] += 1
    per_class = {}
    for label in labels:
        tp = matrix[label][label]
        predicted = sum(matrix[g][label] for g in labels)
        support = sum(matrix[label].values())
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[label] = {
            "precision": round(precision, 4),
            "recall": round(recall, 4),
            "f1": round(f1, 4),
            "support": support,
        }
    macro_f1 = sum(c["f1"] for c in per_class.values()) / len(labels)
    return {
        "accuracy": round(accuracy(gold, pred), 4),
        "macro_f1": round(macro_f1, 4),
        "invalid_rate": round(sum(p is None for p in pred) / len(gold), 4),
        "n": len(gold),
        "per_class": per_class,
        "confusion": {"labels": columns, "matrix": [[matrix[g][c] for c in columns] for g in labels]},
    }


# The evaluate stage's seconds per phrase, by model and decoding, in its run folder (slmkit.lineage.run_dir).
TIMINGS_FILE = "timings.json"


def score(
    name: str, clf: Classifier, test: list[Example], decoding: str, progress_every: int = 50
) -> tuple[dict, list[dict], float]:
    """Classify the test split with one decoding; return (metrics, per-example rows, seconds per example).

    The time is apart from the metrics: it differs on every run, the metrics do not (DVC tracks them)."""
    start = time.perf_counter()
    classified = logged = 0

    def progress(n: int) -> None:
        nonlocal classified, logged
        classified += n
        if classified - logged >= progress_every or classified == len(test):
            log.info("%s (%s decoding): %d/%d classified", name, decoding, classified, len(test))
            logged = classified

    # All at once: the classifier forms its batches from phrases of like token lengths.
    preds = clf.classify([e.text for e in test], decoding=decoding, progress=progress)
    seconds = time.perf_counter() - start
    metrics = report([e.label for e in test], [p.label for p in preds], list(clf.data.labels))
    rows = [{f"{name}_pred": p.label, f"{name}_output": p.output} for p in preds]
    return metrics, rows, round(seconds / len(test), 5)


def bag_of_words_baseline(train: list[Example], test: list[Example], seed: int, labels: list[str]) -> dict:
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
    return report([e.label for e in test], pred, labels)
