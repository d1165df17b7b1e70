"""`slmkit classify|summary|lineage`: use the fine-tuned model from the command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from slmkit.stage import EVAL_JSON, stage_dir

DEFAULT_MODEL = stage_dir("quantize") / "model"


def _classify(args: argparse.Namespace) -> int:
    from slmkit.inference import load

    texts = args.text or [line.strip() for line in sys.stdin if line.strip()]
    if not texts:
        print("slmkit classify: give a phrase as an argument or on stdin", file=sys.stderr)
        return 2
    try:
        clf = load(args.model, max_new_tokens=args.max_new_tokens)
    except FileNotFoundError as err:
        print(f"slmkit classify: error: {err}", file=sys.stderr)
        return 1
    for pred in clf.classify(texts):
        if args.json:
            print(json.dumps({"text": pred.text, "label": pred.label, "output": pred.output}, ensure_ascii=False))
        else:
            print(f"{pred.label or '(no valid label: ' + repr(pred.output) + ')'}\t{pred.text}")
    return 0


def _summary(args: argparse.Namespace) -> int:
    if not EVAL_JSON.exists():
        print(f"{EVAL_JSON} not found: run `make finetune`", file=sys.stderr)
        return 1
    metrics = json.loads(EVAL_JSON.read_text())
    print(f"\nModel: {DEFAULT_MODEL}/  (onnxruntime-genai folder)")
    print("Test accuracy:")
    for name, m in metrics.items():
        extra = f"  (invalid outputs {m['invalid_rate']:.1%})" if "invalid_rate" in m else ""
        print(f"  {name:<16} {m['accuracy']:.4f}{extra}")
    print('Try it: make classify TEXT="I can\'t stop smiling"')
    return 0


def _lineage(args: argparse.Namespace) -> int:
    from slmkit.lineage import chain, format_chain

    try:
        records = chain(args.path)
    except FileNotFoundError as err:
        print(f"slmkit lineage: error: {err}", file=sys.stderr)
        return 1
    if not records:
        print(f"slmkit lineage: no lineage records for {args.path}; run `make finetune`", file=sys.stderr)
        return 1
    print(json.dumps(records, indent=2) if args.json else format_chain(records))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="slmkit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("classify", help="label phrases with the fine-tuned model")
    p.add_argument("text", nargs="*", help="phrase(s); read from stdin (one per line) when none")
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="model folder (ONNX or PyTorch)")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--json", action="store_true", help="one JSON object per phrase")
    p.set_defaults(func=_classify)
    s = sub.add_parser("summary", help="where the model is and its test accuracy")
    s.set_defaults(func=_summary)
    lin = sub.add_parser("lineage", help="where an artifact came from: each stage's data, config, code, versions")
    lin.add_argument("path", nargs="?", type=Path, default=DEFAULT_MODEL)
    lin.add_argument("--json", action="store_true", help="the full records")
    lin.set_defaults(func=_lineage)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
