"""The parity gate's verdict: what `evaluate` decided about the built model, and the check before it is used.

The evaluate stage writes artifacts/evaluate/gate.json: the built model's score (a classifier's accuracy, a
generative model's exact match) against the merged model's, the tolerance, the verdict and the sha256 of the
model folder it judged. `slmkit classify|generate|serve|chat`, `slmkit.load()` and `make push` read it before
they use a model the quantize stage built: a model the gate refused, one it never judged (evaluate not run,
or run on another build) and one judged by a gate loosened past MAX_TOLERANCE are not used unless the
caller says so (`--ungated`, `ungated=True`).
Folders the pipeline did not build (a copy elsewhere, a test model) carry no verdict and are not checked.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

GATE_FILE = "gate.json"  # in the evaluate stage's output folder
# Beyond 5 points the gate judges nothing a user would call parity: such a pass is recorded, not shipped.
MAX_TOLERANCE = 0.05
PASSED, REFUSED, LOOSE = "passed", "refused", "loose"
HOW_ANYWAY = "to use it anyway: `--ungated` (slmkit classify/serve/chat), `slmkit.load(..., ungated=True)`"


class NotShipped(Exception):
    """The model folder has no passing verdict of the parity gate; the message says why and what to do."""


def fingerprint(folder: Path) -> str:
    """sha256 over a folder's files (relative path and each file's sha256, in sorted order): the model a
    verdict judged."""
    from slmkit.data import sha256_file

    files = sorted(p for p in Path(folder).rglob("*") if p.is_file())
    listing = "".join(f"{p.relative_to(folder).as_posix()}\0{sha256_file(p)}\n" for p in files)
    return hashlib.sha256(listing.encode()).hexdigest()


def verdict(
    model: str, score: float, reference: str, reference_score: float, tolerance: float, metric: str = "accuracy"
) -> dict:
    """The gate's record for a built model: `model` (e.g. int4_onnx) against `reference` (merged_pytorch), on
    `metric` (accuracy, or exact_match for a generative model), both in [0, 1].

    The evaluate stage adds `model_sha256` (fingerprint of the folder it judged) before writing it."""
    gap = reference_score - score
    within = gap <= tolerance + 1e-9
    status = REFUSED if not within else LOOSE if tolerance > MAX_TOLERANCE + 1e-9 else PASSED
    return {
        "verdict": status,
        "metric": metric,
        "model": model,
        metric: score,
        "reference": reference,
        f"reference_{metric}": reference_score,
        "gap": round(gap, 6),
        "tolerance": tolerance,
        "max_tolerance": MAX_TOLERANCE,
    }


def describe(record: dict) -> str:
    """One line: the verdict and its figures."""
    metric = record.get("metric", "accuracy")  # verdicts written before generative models had no `metric`
    figures = (
        f"{record['model']} {record[metric]:.4f} vs {record['reference']} {record[f'reference_{metric}']:.4f} "
        f"{metric.replace('_', ' ')}, {100 * record['gap']:.1f} points below, tolerance "
        f"{100 * record['tolerance']:.1f} points"
    )
    if record["verdict"] == LOOSE:
        return (
            f"loose: {figures}, wider than the {100 * record['max_tolerance']:.0f}-point bound "
            "(evaluate.parity_tolerance): not judged for shipping"
        )
    return f"{record['verdict']}: {figures}"


def gate_file(model_dir: Path) -> Path | None:
    """Where the verdict on `model_dir` lives, when the pipeline's quantize stage built it; else None.

    artifacts/quantize/model is recognised by the lineage record the stage writes beside it, so a workspace
    in any folder (a clone, a sweep job) finds its own artifacts/evaluate/gate.json.
    """
    lineage = Path(model_dir).parent / "lineage.json"
    try:
        stage = json.loads(lineage.read_text(encoding="utf-8")).get("stage")
    except (OSError, ValueError):
        return None
    if stage != "quantize":
        return None
    return Path(model_dir).parent.parent / "evaluate" / GATE_FILE


def check(model_dir: Path) -> dict | None:
    """The passing verdict on `model_dir`; None when no gate applies; NotShipped when it did not pass."""
    file = gate_file(model_dir)
    if file is None:
        return None
    if not file.exists():
        raise NotShipped(
            f"{model_dir} has not been through the parity gate ({file} is missing): run `make finetune` "
            f"(or `make evaluate`); {HOW_ANYWAY}"
        )
    try:
        record = json.loads(file.read_text(encoding="utf-8"))
        status = record["verdict"]
    except (ValueError, KeyError, TypeError) as err:
        raise NotShipped(f"{file}: not a gate record ({err}); run `make evaluate`") from None
    if status != PASSED:
        what = "the parity gate refused it" if status == REFUSED else "its gate was loosened"
        raise NotShipped(
            f"{model_dir}: {what} ({describe(record)}; {file}). Try other builder settings (builder.*, "
            f"docs/int4.md); {HOW_ANYWAY}"
        )
    if record.get("model_sha256") != fingerprint(model_dir):
        raise NotShipped(
            f"{model_dir} is not the model the parity gate judged ({file} records another build): run "
            f"`make evaluate`; {HOW_ANYWAY}"
        )
    return record
