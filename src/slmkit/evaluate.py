"""Metrics on the test split: a classifier's (accuracy, macro-F1, per class, confusion) and a generative model's
(exact match, token F1, ROUGE-L, held-out loss), and the floor each should clear (bag-of-words; nearest
neighbour)."""

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


def progress_log(message: str, total: int, every: int):
    """A progress callback (n more done) that logs `message` % (done, total) every `every` and at the end."""
    done = logged = 0

    def progress(n: int) -> None:
        nonlocal done, logged
        done += n
        if done - logged >= every or done == total:
            log.info(message, done, total)
            logged = done

    return progress


def score(
    name: str, clf: Classifier, test: list[Example], decoding: str, progress_every: int = 50
) -> tuple[dict, list[dict], float]:
    """Classify the test split with one decoding; return (metrics, per-example rows, seconds per example).

    The time is apart from the metrics: it differs on every run, the metrics do not (DVC tracks them)."""
    start = time.perf_counter()
    progress = progress_log(f"{name} ({decoding} decoding): %d/%d classified", len(test), progress_every)
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


# Generative models. Exact match and token F1 are SQuAD's (torchmetrics.functional.text.squad): both strings
# lower-cased, punctuation and the articles a/an/the removed, whitespace collapsed; F1 over the remaining
# words. ROUGE-L is torchmetrics' F-measure over the longest common subsequence of words.
GENERATIVE_METRICS = ("exact_match", "token_f1", "rouge_l")


def answer_scores(prediction: str, reference: str) -> dict[str, float]:
    """One answer's exact match (0 or 1), token F1 and ROUGE-L F-measure, each in [0, 1]."""
    from torchmetrics.functional.text import rouge_score, squad

    sq = squad(
        [{"prediction_text": prediction, "id": "0"}],
        [{"answers": {"answer_start": [0], "text": [reference]}, "id": "0"}],
    )
    rouge = rouge_score(prediction, reference, rouge_keys="rougeL")["rougeL_fmeasure"]
    return {
        "exact_match": float(sq["exact_match"]) / 100,
        "token_f1": float(sq["f1"]) / 100,
        "rouge_l": float(rouge),
    }


def answer_report(references: list[str], predictions: list[str]) -> tuple[dict, list[dict]]:
    """(the means over the test split, rounded to 4 places like accuracy; each answer's scores)."""
    per = [answer_scores(p, r) for p, r in zip(predictions, references, strict=True)]
    means = {key: round(sum(x[key] for x in per) / len(per), 4) for key in GENERATIVE_METRICS}
    return {
        **means,
        "empty_rate": round(sum(not p.strip() for p in predictions) / len(predictions), 4),
        "n": len(per),
    }, per


def score_answers(
    name: str, clf: Classifier, test: list[Example], progress_every: int = 50
) -> tuple[dict, list[dict], float]:
    """A generative model's greedy answers to the test questions: (metrics, per-example rows, seconds each)."""
    start = time.perf_counter()
    progress = progress_log(f"{name}: %d/%d answered", len(test), progress_every)

    # A conversation (data.format=chat) is answered with its earlier turns, as it was trained.
    questions = [e.messages()[:-1] if e.history or e.system is not None else e.text for e in test]
    answers = clf.generate(questions, progress=progress)
    seconds = time.perf_counter() - start
    metrics, per = answer_report([e.label for e in test], answers)
    rows = [{name: a, f"{name}_exact_match": int(x["exact_match"])} for a, x in zip(answers, per, strict=True)]
    return metrics, rows, round(seconds / len(test), 5)


def nearest_neighbour_baseline(train: list[Example], test: list[Example]) -> tuple[dict, list[str]]:
    """The floor for a generative model: each test question gets the answer of the most similar training
    question (TF-IDF over words and word pairs, cosine similarity; the first on a tie)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.metrics.pairwise import linear_kernel

    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
    known = vectorizer.fit_transform([e.text for e in train])
    nearest = linear_kernel(vectorizer.transform([e.text for e in test]), known).argmax(axis=1)
    answers = [train[int(i)].label for i in nearest]
    return answer_report([e.label for e in test], answers)[0], answers


def heldout_loss(model, prompts: list[str], completions: list[str]) -> float:
    """Mean cross-entropy per completion token (nats) of a PyTorch model (inference.TorchModel) on held-out
    prompt/completion pairs, each tokenized the way training tokenizes them (prompt and completion apart)."""
    import torch

    total, count = 0.0, 0
    for prompt, completion in zip(prompts, completions, strict=True):
        p, c = model.encode(prompt), model.encode(completion)
        ids = torch.tensor([p + c])
        with torch.no_grad():
            logits = model.model(input_ids=ids).logits[0, len(p) - 1 : -1]
        total += float(torch.nn.functional.cross_entropy(logits.float(), torch.tensor(c), reduction="sum"))
        count += len(c)
    return round(total / count, 4)
