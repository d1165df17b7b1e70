"""The run report: one self-contained HTML page (figures embedded as PNG) from the metrics and lineage files."""

from __future__ import annotations

import base64
import csv
import html
import io
from pathlib import Path


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def loss_figure(csv_path: Path):
    import matplotlib.pyplot as plt

    with open(csv_path, encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for key, style in (("loss", "-"), ("eval_loss", "o-")):
        points = [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]
        if points:
            ax.plot(*zip(*points, strict=True), style, label={"loss": "train", "eval_loss": "validation"}[key])
    ax.set_xlabel("step")
    ax.set_yscale("log")  # the first steps' loss is ~100x the last: linear hides where training ends
    ax.set_ylabel("loss (label + EOS tokens, log scale)")
    ax.set_title("LoRA training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def confusion_figure(models: dict[str, dict]):
    """One heat map per model: rows = actual label, columns = predicted label (+ invalid outputs)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 4.0), squeeze=False)
    for ax, (name, m) in zip(axes[0], models.items(), strict=True):
        columns, matrix = m["confusion"]["labels"], m["confusion"]["matrix"]
        rows = columns[: len(matrix)]
        ax.imshow(matrix, cmap="Blues", vmin=0, vmax=max(max(r) for r in matrix) or 1)
        ax.set_xticks(range(len(columns)), columns, rotation=40, ha="right")
        ax.set_yticks(range(len(rows)), rows)
        peak = max(max(r) for r in matrix) or 1
        for i, row in enumerate(matrix):
            for j, value in enumerate(row):
                ax.text(j, i, value, ha="center", va="center", color="white" if value > peak / 2 else "black")
        ax.set_title(f"{name}\naccuracy {m['accuracy']:.3f}, macro-F1 {m['macro_f1']:.3f}", fontsize=10)
        ax.set_xlabel("predicted")
        ax.set_ylabel("actual")
    fig.tight_layout()
    return fig


def _formats(section: dict) -> list[str]:
    """The models a bench section measured: PyTorch, then the ONNX formats (fp32_onnx, int8_onnx, int4_onnx)."""
    onnx = sorted((k for k in section if k.endswith("_onnx")), key=lambda k: (k != "fp32_onnx", k))
    return [n for n in ("pytorch", *onnx) if n in section]


def bench_figure(bench: dict):
    """Decode speed and size on disk for each model format, the pipeline's model and the medium one side by side."""
    import matplotlib.pyplot as plt

    sizes = [s for s in ("pipeline", "medium") if s in bench]
    fig, axes = plt.subplots(2, len(sizes), figsize=(4.6 * len(sizes), 6.0), squeeze=False)
    for col, size in enumerate(sizes):
        names = _formats(bench[size])
        colors = ["#888888", "#4c72b0", "#dd8452", "#55a868"][: len(names)]
        for row, (key, label) in enumerate(
            (("decode_tokens_per_s", "decode tokens/s"), ("size_mb", "size on disk (MB)"))
        ):
            ax = axes[row][col]
            values = [bench[size][n][key] for n in names]
            bars = ax.bar(names, values, color=colors)
            ax.bar_label(bars, labels=[f"{v:.0f}" if v >= 100 else f"{v:.1f}" for v in values])
            ax.set_ylabel(label)
            ax.set_ylim(0, max(values) * 1.18)
            if row == 0:
                layout = bench[size].get("layout")
                extra = (
                    f"\n(random weights, hidden {layout['hidden_size']}, {layout['num_hidden_layers']} layers)"
                    if layout
                    else ""
                )
                ax.set_title(f"{size} model{extra}")
    fig.tight_layout()
    return fig


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _layout(layout: dict) -> str:
    return (
        f"hidden {layout['hidden_size']}, {layout['num_hidden_layers']} layers, {layout['num_attention_heads']} heads, "
        f"intermediate {layout['intermediate_size']}, vocab {layout['vocab_size']}"
    )


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}pre{background:#f7f7f7;padding:.8em;overflow-x:auto;
font-size:.85em}img{max-width:100%}.note{color:#555;font-size:.92em}
"""


def classifier_parts(eval_metrics: dict, eval_seconds: dict, parity_tolerance: float, figures: dict) -> list[str]:
    """A classifier's sections: headline, metrics, decodings, per class, confusion matrices."""
    import matplotlib.pyplot as plt

    models = {k: v for k, v in eval_metrics.items() if isinstance(v, dict) and "confusion" in v}
    parts: list[str] = []
    quantized = next((n for n in models if n.endswith("_onnx")), None)
    if quantized and "merged_pytorch" in models:
        q, r = models[quantized]["accuracy"], models["merged_pytorch"]["accuracy"]
        parts.append(
            f"<p><b>{html.escape(quantized)}</b> (artifacts/quantize/model): test accuracy <b>{q:.4f}</b>, "
            f"merged PyTorch model {r:.4f} ({100 * (q - r):+.1f} points), base zero-shot "
            f"{models.get('base_pytorch', {}).get('accuracy', float('nan')):.4f}. "
            + (
                f"Within the parity tolerance ({100 * parity_tolerance:.1f} points)."
                if r - q <= parity_tolerance + 1e-9
                else f"<b>Outside the parity tolerance ({100 * parity_tolerance:.1f} points): the gate failed.</b>"
            )
            + "</p>"
        )

    parts.append("<h2>Test metrics</h2>")
    rows = [
        [
            name,
            f"{m['accuracy']:.4f}",
            f"{m['macro_f1']:.4f}",
            _pct(m["invalid_rate"]),
            m["n"],
            f"{1000 * eval_seconds[name]:.1f}" if name in eval_seconds else "",
        ]
        for name, m in models.items()
    ]
    parts.append(_table(["model", "accuracy", "macro-F1", "invalid outputs", "n", "ms / phrase"], rows))
    parts.append(f'<p class="note">Decoding: {html.escape(str(eval_metrics.get("decoding")))}.</p>')
    comparison = eval_metrics.get("decoding_comparison", {})
    if comparison:
        rows = [
            [name, dec, f"{c['accuracy']:.4f}", f"{c['macro_f1']:.4f}", _pct(c["invalid_rate"])]
            for name, by in comparison.items()
            for dec, c in by.items()
        ]
        parts.append("<h3>Stop-based vs label-constrained decoding</h3>")
        parts.append(_table(["model", "decoding", "accuracy", "macro-F1", "invalid outputs"], rows))
    labels = next(iter(models.values()))["per_class"].keys() if models else []
    header = ["label"] + [f"{n} {k}" for n in models for k in ("P", "R")]
    rows = [
        [label] + [f"{models[n]['per_class'][label][k]:.2f}" for n in models for k in ("precision", "recall")]
        for label in labels
    ]
    parts.append("<h3>Per class (P = precision, R = recall)</h3>" + _table(header, rows))

    fig = confusion_figure(models)
    figures["confusion.png"] = _png(fig)
    plt.close(fig)
    parts.append("<h2>Confusion matrices</h2>" + _img(figures["confusion.png"], "confusion matrices"))

    return parts


# Rows of the generative report's table of answers: the ones a model got wrong or the models disagree on.
MAX_SHOWN_ANSWERS = 30


def answer_parts(eval_metrics: dict, eval_seconds: dict, predictions: list[dict], parity_tolerance: float) -> list[str]:
    """A generative model's sections: headline, exact match / token F1 / ROUGE-L per model against the
    nearest-neighbour floor, and the test questions some model got wrong or the models answered differently."""
    models = {k: v for k, v in eval_metrics.items() if isinstance(v, dict) and "exact_match" in v}
    parts: list[str] = []
    quantized = next((n for n in models if n.endswith("_onnx")), None)
    gate = eval_metrics.get("gate", {})
    if quantized and "merged_pytorch" in models:
        q, r = models[quantized]["exact_match"], models["merged_pytorch"]["exact_match"]
        parts.append(
            f"<p><b>{html.escape(quantized)}</b> (artifacts/quantize/model): exact match <b>{q:.4f}</b>, merged "
            f"PyTorch model {r:.4f} ({100 * (q - r):+.1f} points); parity gate "
            f"<b>{html.escape(str(gate.get('verdict', '?')))}</b> (tolerance {100 * parity_tolerance:.1f} points).</p>"
        )
    parts.append("<h2>Test metrics</h2>")
    rows = [
        [
            name,
            f"{m['exact_match']:.4f}",
            f"{m['token_f1']:.4f}",
            f"{m['rouge_l']:.4f}",
            f"{m['heldout_loss']:.4f}" if "heldout_loss" in m else "",
            _pct(m["empty_rate"]),
            m["n"],
            f"{1000 * eval_seconds[name]:.1f}" if name in eval_seconds else "",
        ]
        for name, m in models.items()
    ]
    header = ["model", "exact match", "token F1", "ROUGE-L", "held-out loss", "empty answers", "n", "ms / question"]
    parts.append(_table(header, rows))
    parts.append(
        '<p class="note">Exact match and token F1 after SQuAD normalisation (lower case, no punctuation, no '
        "a/an/the); nearest_neighbour answers each question with the answer of the most similar training "
        "question; held-out loss: nats per answer token.</p>"
    )
    names = [n for n in models if f"{n}_exact_match" in (predictions[0] if predictions else {})]
    shown = [r for r in predictions if any(not r[f"{n}_exact_match"] for n in names) or len({r[n] for n in names}) > 1]
    parts.append(
        f"<h2>Answers some model got wrong or the models disagree on ({len(shown)} of {len(predictions)})</h2>"
    )
    floor = ["nearest_neighbour"] if predictions and "nearest_neighbour" in predictions[0] else []
    rows = [[r["question"], r["reference"]] + [r[n] for n in names + floor] for r in shown[:MAX_SHOWN_ANSWERS]]
    parts.append(_table(["question", "reference", *names, *floor], rows))
    return parts


def render(
    *,
    title: str,
    eval_metrics: dict,
    eval_seconds: dict[str, float],
    loss_csv: Path | None,
    lineage_text: str,
    params_text: str,
    bench: dict | None,
    sizes_mb: dict[str, float],
    parity_tolerance: float,
    predictions: list[dict] | None = None,
) -> tuple[str, dict[str, bytes]]:
    """The report page and its figures (name -> PNG bytes, also embedded in the page).

    eval_seconds: each model's seconds per test phrase in the last evaluate run (its decoding).
    predictions: artifacts/evaluate/predictions.jsonl's rows (a generative run shows the answers it got wrong)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures: dict[str, bytes] = {}
    parts = [f"<h1>{html.escape(title)}</h1>"]
    if "exact_match" in eval_metrics.get("merged_pytorch", {}):
        parts += answer_parts(eval_metrics, eval_seconds, predictions or [], parity_tolerance)
    else:
        parts += classifier_parts(eval_metrics, eval_seconds, parity_tolerance, figures)
    if loss_csv and loss_csv.exists():
        fig = loss_figure(loss_csv)
        figures["loss.png"] = _png(fig)
        plt.close(fig)
        parts.append("<h2>Training</h2>" + _img(figures["loss.png"], "training loss curve"))

    parts.append("<h2>Latency and size</h2>")
    parts.append(_table(["model folder", "size on disk (MB)"], [[k, f"{v:.1f}"] for k, v in sizes_mb.items()]))
    if bench:
        m = bench.get("machine", {})
        where = f"{m.get('cpu')}, {m.get('cores')} cores, {m.get('memory_gb')} GB"
        parts.append(
            f'<p class="note">Measured {html.escape(str(bench.get("created", "")))} on {html.escape(where)}; '
            f"{bench.get('phrases')} test phrases, the same for every model; each model in its own process.</p>"
        )
        keys = ["latency_p50_ms", "latency_p95_ms", "ttft_p50_ms", "decode_tokens_per_s", "peak_rss_mb", "size_mb"]
        keys.append("load_average")
        for size in ("pipeline", "medium"):
            if size not in bench:
                continue
            names = _formats(bench[size])
            rows = [[n] + [bench[size][n].get(k, "") for k in keys] for n in names]
            layout = bench[size].get("layout")
            model = bench[size].get("model")
            extra = f" (random weights, Phi-3 layout: {_layout(layout)})" if layout else f" ({model})"
            parts.append(f"<h3>{size} model{html.escape(extra)}</h3>")
            parts.append(
                _table(
                    [
                        "model",
                        "p50 ms/phrase",
                        "p95 ms/phrase",
                        "TTFT ms",
                        "decode tok/s",
                        "peak RSS MB",
                        "MB",
                        "load avg",
                    ],
                    rows,
                )
            )
            if "ratios" in bench[size]:
                parts.append(_table(["ratio", "value"], [[k, v] for k, v in bench[size]["ratios"].items()]))
        fig = bench_figure(bench)
        figures["bench.png"] = _png(fig)
        plt.close(fig)
        parts.append(_img(figures["bench.png"], "decode speed and size"))
        if "overhead" in bench:
            o = bench["overhead"]
            parts.append("<h3>Pipeline overhead: kit vs bare <code>olive run</code></h3>")
            rows = [[s, o["kit_seconds"][s], o["bare_olive_seconds"][s]] for s in o["kit_seconds"]]
            rows.append(["total", o["kit_total_s"], o["bare_total_s"]])
            parts.append(_table(["stage", "kit (s)", "olive run (s)"], rows))
            parts.append(f"<p>Ratio kit / bare Olive: <b>{o['overhead_ratio']:.3f}</b>")
            if "load_average" in o:
                loads = ", ".join(f"{k} {v}" for k, v in o["load_average"].items())
                parts.append(
                    f' <span class="note">(1-minute load average after each stage: {html.escape(loads)})</span>'
                )
            parts.append("</p>")
    else:
        parts.append('<p class="note">No benchmark yet: run <code>make bench</code>.</p>')

    parts.append("<h2>Lineage</h2><pre>" + html.escape(lineage_text) + "</pre>")
    parts.append("<h2>Config (params.yaml)</h2><pre>" + html.escape(params_text) + "</pre>")
    page = (
        f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{CSS}</style></head><body>{''.join(parts)}</body></html>\n"
    )
    return page, figures
