"""`slmkit classify|generate|chat|serve|gate|summary|lineage`: use the fine-tuned model from the command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from slmkit.config import DECODINGS
from slmkit.inference import DEFAULT_BATCH_SIZE, DEFAULT_DECODING
from slmkit.paths import EVAL_JSON, stage_dir

DEFAULT_MODEL = stage_dir("quantize") / "model"
ADAPTER_BASE = stage_dir("adapter") / "base"  # the base --adapter runs on unless --model says otherwise
ADAPTER_HELP = (
    "NAME=PATH: a fine-tune to run on --model as the shared base (repeatable; default base: the adapter "
    "stage's artifacts/adapter/base; PATH: an adapter folder, e.g. artifacts/adapter/adapter)"
)
# --model accepts a folder or one of these names for the pipeline's outputs.
# Phrases of a file classified before their labels are printed (in input order).
PRINT_CHUNK = 1024
API_KEY_ENV = "SLMKIT_API_KEY"
UNGATED = "use the pipeline's model even though the parity gate did not pass it (slmkit gate says why)"
MODELS_HELP = "a model folder, or onnx (default: the built model, int8 or int4 by builder), merged or base"
# int4 and int8: earlier names of `onnx`, whatever precision the builder gave it (lineage.json says which).
MODEL_NAMES = {
    "onnx": DEFAULT_MODEL,
    "int8": DEFAULT_MODEL,
    "int4": DEFAULT_MODEL,
    "merged": stage_dir("merge") / "model",
    "base": None,
}


def _resolve_model(name: str) -> tuple[Path, object]:
    """A --model value -> (folder, prompt config or None when the folder carries its own)."""
    if name not in MODEL_NAMES:
        return Path(name), None
    from slmkit.config import load_params

    if name == "base":  # the base has no slmkit_prompt.json: it never saw the prompt; use params.yaml's
        from slmkit.files import read_json

        base = stage_dir("base") / "base.json"
        if not base.exists():
            raise FileNotFoundError(f"{base} not found: run `make finetune` (or `make base`) first")
        return Path(read_json(base)["model_path"]), load_params().data
    return MODEL_NAMES[name], None


def _read_phrases(args: argparse.Namespace) -> list[str]:
    """Phrases from the arguments, a file (JSON lines or plain text, one per line) or stdin."""
    if args.text:
        return list(args.text)
    if args.file:
        lines = args.file.read_text(encoding="utf-8").splitlines()
        source = str(args.file)
    else:
        lines, source = sys.stdin.read().splitlines(), "stdin"
    texts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{source}:{number}: not valid JSON ({err.msg})") from None
            keys = [args.text_key] if args.text_key else [k for k, v in row.items() if isinstance(v, str)][:1]
            if not keys or not isinstance(row.get(keys[0]), str):
                raise ValueError(f"{source}:{number}: no text field {args.text_key or ''!r}; use --text-key NAME")
            texts.append(row[keys[0]])
        else:
            texts.append(line.strip())
    return texts


def _adapters(args: argparse.Namespace) -> dict[str, str]:
    """--adapter NAME=PATH values, by name (ValueError for a bad or repeated one)."""
    from slmkit.adapters import parse_spec

    found: dict[str, str] = {}
    for spec in getattr(args, "adapter", None) or []:
        name, path = parse_spec(spec)
        if name in found:
            raise ValueError(f"--adapter {name}=...: the name {name!r} is given twice; give each adapter its own name")
        found[name] = path
    return found


def _load(args: argparse.Namespace, command: str):
    """The model --model names ({name: model} with --adapter, on --model as the base), or None after
    printing, on one line, why it cannot be loaded (exit 1)."""
    from slmkit.adapters import AdapterMismatch
    from slmkit.gate import NotShipped
    from slmkit.inference import load

    try:
        adapters = _adapters(args)
        # With adapters, the default model is the base the adapter stage writes (it takes adapter inputs).
        path, data = (ADAPTER_BASE, None) if adapters and args.model == "onnx" else _resolve_model(args.model)
    except (FileNotFoundError, ValueError) as err:
        print(f"slmkit {command}: error: {err}", file=sys.stderr)
        return None
    try:
        return load(
            path,
            data,
            max_new_tokens=args.max_new_tokens,
            decoding=getattr(args, "decoding", DEFAULT_DECODING),
            batch_size=getattr(args, "batch_size", DEFAULT_BATCH_SIZE),
            threads=getattr(args, "threads", 0) or None,
            ungated=args.ungated,
            adapters=adapters or None,
        )
    except (FileNotFoundError, NotShipped, AdapterMismatch) as err:  # slmkit's own: missing, gate, mismatch
        reason = str(err)
    except Exception as err:  # onnxruntime-genai, transformers, safetensors and json each raise their own types
        cause = f"{type(err).__name__}: {str(err).rstrip('.')}"
        reason = f"cannot load the model in {path}: {cause}; is the folder complete? (`make finetune` writes one)"
    print(f"slmkit {command}: error: {' '.join(reason.split())}", file=sys.stderr)
    return None


def _inputs(args: argparse.Namespace, command: str) -> list[str] | int:
    """The phrases or questions to run on, or the exit code after saying why there are none."""
    try:
        texts = _read_phrases(args)
    except (OSError, ValueError) as err:
        print(f"slmkit {command}: error: {err}", file=sys.stderr)
        return 2
    if not texts:
        print(f"slmkit {command}: give {args.what} as arguments, with --file, or on stdin", file=sys.stderr)
        return 2
    return texts


def _kind_error(clf, command: str) -> str | None:
    """Why this model cannot do `command` (a classifier cannot answer questions, nor the reverse)."""
    if command == "classify" and clf.generative:
        return "this model answers questions in free text (no label set): use `slmkit generate`"
    if command == "generate" and not clf.generative:
        return f"this model is a classifier ({', '.join(clf.data.labels)}): use `slmkit classify`"
    return None


def _ready(args: argparse.Namespace, command: str):
    """(inputs, {name: model}) for `command` (one model named "" without --adapter), or the exit code after
    saying on one line why not."""
    texts = _inputs(args, command)
    if isinstance(texts, int):
        return texts
    loaded = _load(args, command)
    if loaded is None:
        return 1
    models = loaded if isinstance(loaded, dict) else {"": loaded}
    for name, clf in models.items():
        if error := _kind_error(clf, command):
            print(f"slmkit {command}: error: {f'adapter {name!r}: ' if name else ''}{error}", file=sys.stderr)
            return 2
    return texts, models


def _classify(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    ready = _ready(args, "classify")
    if isinstance(ready, int):
        return ready
    texts, models = ready
    # Printed a chunk at a time, in input order: a chunk is large enough for the classifier to fill its
    # batches with phrases of one token length. The bar goes to stderr (results stay clean on stdout) and
    # only for files and stdin, on a terminal. Several adapters: each labels every phrase, named on its line.
    total = len(texts) * len(models)
    with tqdm(total=total, desc="classify", unit="phrase", disable=None if not args.text else True) as bar:
        for start in range(0, len(texts), PRINT_CHUNK):
            for name, clf in models.items():
                for pred in clf.classify(texts[start : start + PRINT_CHUNK], progress=bar.update):
                    if args.json:
                        row = {"text": pred.text, "label": pred.label, "output": pred.output}
                        print(json.dumps({"model": name, **row} if name else row, ensure_ascii=False), flush=True)
                    else:
                        label = pred.label or f"(no valid label: {pred.output!r})"
                        print(f"{name + chr(9) if len(models) > 1 else ''}{label}\t{pred.text}", flush=True)
    return 0


def _generate(args: argparse.Namespace) -> int:
    """Greedy answers, in input order: one line each (its own lines joined by spaces), or JSON lines."""
    from tqdm import tqdm

    ready = _ready(args, "generate")
    if isinstance(ready, int):
        return ready
    texts, models = ready
    total = len(texts) * len(models)
    with tqdm(total=total, desc="generate", unit="question", disable=None if not args.text else True) as bar:
        for start in range(0, len(texts), PRINT_CHUNK):
            chunk = texts[start : start + PRINT_CHUNK]
            for name, clf in models.items():
                if args.max_new_tokens:
                    clf.max_new_tokens = args.max_new_tokens
                for question, answer in zip(chunk, clf.generate(chunk, progress=bar.update), strict=True):
                    if args.json:
                        row = {"question": question, "answer": answer}
                        print(json.dumps({"model": name, **row} if name else row, ensure_ascii=False), flush=True)
                    else:
                        print(f"{name + chr(9) if len(models) > 1 else ''}{' '.join(answer.split())}", flush=True)
    return 0


def _serve(args: argparse.Namespace) -> int:
    import os

    from slmkit.serve import ServeSettings, serve

    # The flag wins; the environment keeps the key out of the process list (`ps` shows a flag's value).
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV)
    if api_key is not None and not api_key.strip():
        source = "--api-key" if args.api_key is not None else API_KEY_ENV
        print(f"slmkit serve: error: {source} is empty; give a key, or unset it to serve without one", file=sys.stderr)
        return 2
    clf = _load(args, "serve")
    if clf is None:
        return 1
    settings = ServeSettings(
        max_phrases=args.max_phrases,
        max_chars=args.max_chars,
        max_wait_ms=args.max_wait_ms,
        queue_size=args.queue_size,
        max_body_bytes=args.max_body_bytes,
        max_tokens=args.max_tokens,
        api_key=api_key,
    )
    if isinstance(clf, dict) and args.served_model_name:
        print("slmkit serve: error: with --adapter, each adapter is served under its NAME", file=sys.stderr)
        return 2
    serve(clf, settings, args.host, args.port, model_name=args.served_model_name or str(args.model))
    return 0


def _chat(args: argparse.Namespace) -> int:
    if len(getattr(args, "adapter", None) or []) > 1:
        print("slmkit chat: error: chat with one adapter at a time (one --adapter)", file=sys.stderr)
        return 2
    clf = _load(args, "chat")
    if clf is None:
        return 1
    if isinstance(clf, dict):
        (clf,) = clf.values()
    interactive = not args.message
    messages = [" ".join(args.message)] if args.message else iter(lambda: _prompt_line(), None)
    for message in messages:
        if args.json:  # one object per reply: printed once the reply is complete
            reply = clf.chat(message, max_new_tokens=args.max_new_tokens, template=not args.raw)
            print(json.dumps({"message": message, "reply": reply}, ensure_ascii=False), flush=True)
        else:  # each token's text as it is decoded; the same text, then a newline, as the whole reply
            for piece in clf.chat_stream(message, max_new_tokens=args.max_new_tokens, template=not args.raw):
                print(piece.text, end="", flush=True)
            print(flush=True)
        if not interactive:
            break
    return 0


def _prompt_line() -> str | None:
    """One line from the user (a `> ` prompt on a terminal); None at end of input."""
    try:
        line = input("> " if sys.stdin.isatty() else "")
    except EOFError:
        return None
    return line if line.strip() else _prompt_line()


def _gate(args: argparse.Namespace) -> int:
    """The parity gate's verdict on a model folder: exit 0 only when it may ship."""
    from slmkit.gate import NotShipped, check, describe

    try:
        record = check(args.path)
    except NotShipped as err:
        print(f"slmkit gate: not shippable: {err}", file=sys.stderr)
        return 1
    if record is None:
        print(f"slmkit gate: {args.path} was not built by this pipeline: no gate applies", file=sys.stderr)
        return 1
    print(f"{args.path}: parity gate {describe(record)}")
    return 0


def _summary(args: argparse.Namespace) -> int:
    if not EVAL_JSON.exists():
        print(f"{EVAL_JSON} not found: run `make finetune`", file=sys.stderr)
        return 1
    metrics = json.loads(EVAL_JSON.read_text())
    print(f"\nModel: {DEFAULT_MODEL}/  (onnxruntime-genai folder)")
    if "exact_match" in metrics.get("merged_pytorch", {}):
        print("Test answers (greedy): exact match, token F1, ROUGE-L")
        for name, m in metrics.items():
            if isinstance(m, dict) and "exact_match" in m:
                print(f"  {name:<18} {m['exact_match']:.4f}  {m['token_f1']:.4f}  {m['rouge_l']:.4f}")
        try_it = 'make generate TEXT="Ana has 3 cats and 2 dogs. How many dogs does Ana have?"'
    else:
        print(f"Test accuracy ({metrics.get('decoding', 'stop')} decoding):")
        for name, m in metrics.items():
            if not isinstance(m, dict) or "accuracy" not in m:
                continue
            extra = f"  macro-F1 {m['macro_f1']:.4f}" if "macro_f1" in m else ""
            print(f"  {name:<16} {m['accuracy']:.4f}{extra}")
        try_it = 'make classify TEXT="I can\'t stop smiling"'
    print("Details: metrics/eval.json; a page with plots: make report")
    print(f"Try it: {try_it}")
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
    from slmkit.gate import describe, gate_file

    file = gate_file(args.path)
    verdict = json.loads(file.read_text()) if file and file.exists() else None
    if args.json:
        print(json.dumps({"stages": records, "gate": verdict}, indent=2))
    else:
        print(format_chain(records))
        if file:
            print(f"gate      {describe(verdict) if verdict else 'not judged (run `make evaluate`)'}")
    return 0


def _positive(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: give a whole number >= 1")
    return int(value)


def _input_args(parser: argparse.ArgumentParser, what: str) -> None:
    """What `classify` and `generate` share: where the inputs come from, the model, and how it runs."""
    parser.add_argument("text", nargs="*", help=f"{what}(s); else --file, else stdin (one per line)")
    parser.add_argument("--file", type=Path, help=f"{what}s, one per line: plain text or JSON lines")
    parser.add_argument("--text-key", help=f"JSON lines: the field holding the {what} (default: the first text field)")
    parser.add_argument("--model", default="onnx", help=MODELS_HELP)
    parser.add_argument("--adapter", action="append", metavar="NAME=PATH", help=ADAPTER_HELP)
    parser.add_argument("--ungated", action="store_true", help=UNGATED)
    parser.add_argument(
        "--batch-size", type=_positive, default=DEFAULT_BATCH_SIZE, help=f"{what}s per forward pass (%(default)s)"
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="compute threads (default 0: one per core, or OMP_NUM_THREADS)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="slmkit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    models = MODELS_HELP
    p = sub.add_parser("classify", help="label phrases with the fine-tuned model")
    _input_args(p, "phrase")
    p.add_argument("--decoding", choices=DECODINGS, default=DEFAULT_DECODING, help="default: %(default)s")
    p.add_argument("--max-new-tokens", type=int, default=8, help="for --decoding stop")
    p.add_argument("--json", action="store_true", help="one JSON object per phrase")
    p.set_defaults(func=_classify, what="phrases")
    gen = sub.add_parser("generate", help="answer questions with a fine-tuned generative model (data=qa)")
    _input_args(gen, "question")
    gen.add_argument(
        "--max-new-tokens", type=_positive, help="longest answer (default: the model's data.answer_tokens)"
    )
    gen.add_argument("--json", action="store_true", help='one {"question", "answer"} object per question')
    gen.set_defaults(func=_generate, what="questions")
    c = sub.add_parser("chat", help="free generation with the fine-tuned model (interactive without a message)")
    c.add_argument("message", nargs="*", help="one message; without it, read messages line by line")
    c.add_argument("--model", default="onnx", help=models)
    c.add_argument("--adapter", action="append", metavar="NAME=PATH", help=ADAPTER_HELP)
    c.add_argument("--ungated", action="store_true", help=UNGATED)
    c.add_argument("--raw", action="store_true", help="send the text as is, not inside the training prompt")
    c.add_argument("--max-new-tokens", type=int, default=64)
    c.add_argument("--json", action="store_true", help="one JSON object per reply")
    c.set_defaults(func=_chat)
    v = sub.add_parser("serve", help="the model behind an HTTP JSON API: POST /classify, GET /health")
    v.add_argument("--model", default="onnx", help=models)
    v.add_argument("--adapter", action="append", metavar="NAME=PATH", help=ADAPTER_HELP)
    v.add_argument("--ungated", action="store_true", help=UNGATED)
    v.add_argument("--host", default="127.0.0.1", help="%(default)s: this machine only; 0.0.0.0 to expose it")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument("--batch-size", type=_positive, default=DEFAULT_BATCH_SIZE, help="phrases per forward pass")
    v.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a batch waits for more requests")
    v.add_argument("--queue-size", type=_positive, default=32, help="waiting requests before 503 (%(default)s)")
    v.add_argument("--max-phrases", type=_positive, default=64, help="phrases per request (%(default)s)")
    v.add_argument("--max-chars", type=_positive, help="longest phrase (default: the model folder's data.max_chars)")
    v.add_argument(
        "--max-body-bytes", type=_positive, help="request body (default: what --max-phrases x --max-chars can need)"
    )
    v.add_argument(
        "--threads", type=int, default=0, help="compute threads (default 0: one per core, or OMP_NUM_THREADS)"
    )
    v.add_argument(
        "--max-tokens", type=_positive, default=64, help="new tokens per chat completion at most (%(default)s)"
    )
    v.add_argument(
        "--api-key",
        help=f"require `Authorization: Bearer KEY` on every request but /health (default: ${API_KEY_ENV}, else none)",
    )
    v.add_argument("--served-model-name", help="the model's name in the OpenAI API (default: the --model value)")
    v.set_defaults(func=_serve, max_new_tokens=8)
    g = sub.add_parser("gate", help="the parity gate's verdict on the built model (exit 1 unless it may ship)")
    g.add_argument("path", nargs="?", type=Path, default=DEFAULT_MODEL)
    g.set_defaults(func=_gate)
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
