"""Typed config -> Olive workflow configs (the one place Olive's JSON schema is written)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from slmkit import families
from slmkit.config import KIT_INT4_ALGOS, BuilderConfig, Config, DataConfig
from slmkit.prompt import build_completion, build_conversation_prompt

# Columns of the rendered JSON-lines files that Olive's LoRA pass trains on (see olive_data.py).
PROMPT_COLUMN, COMPLETION_COLUMN = "prompt", "completion"
OLIVE_DATA_SCRIPT = Path(__file__).with_name("olive_data.py")
# lora.method -> Olive pass type (one to one; see conf/lora/): Olive's LoRA, QLoRA and DoRA with logits
# only where the loss reads them (slmkit.olive_passes; they need its package config, `package_config()`).
OLIVE_PASS = {"lora": "CompletionLoRA", "qlora": "CompletionQLoRA", "dora": "CompletionDoRA"}


def render_split(data: DataConfig, examples: list, eos: str, path: Path) -> None:
    """Write examples as the prompt/completion JSON lines the LoRA pass trains on (slmkit.prompt renders them).

    A conversation (data.format=chat) gives one pair per assistant turn: the conversation up to that turn is
    the prompt (no loss), the turn the completion, so the loss falls on every assistant turn and only there."""
    with open(path, "w", encoding="utf-8") as f:
        for e in examples:
            turns = [*e.history, (e.text, e.label)]
            for j, (user, answer) in enumerate(turns):
                prompt = build_conversation_prompt(data, user, turns[:j], e.system)
                row = {PROMPT_COLUMN: prompt, COMPLETION_COLUMN: build_completion(data, answer, eos)}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _system(cfg: Config, *, for_builder: bool = False) -> dict[str, Any]:
    ep = cfg.builder.execution_provider if for_builder else "cpu"
    device, provider = ("gpu", "CUDAExecutionProvider") if ep == "cuda" else ("cpu", "CPUExecutionProvider")
    return {"type": "LocalSystem", "accelerators": [{"device": device, "execution_providers": [provider]}]}


def _input_model(cfg: Config, model_path: str | Path, adapter_path: str | Path | None = None) -> dict[str, Any]:
    model: dict[str, Any] = {
        "type": "HfModel",
        "model_path": str(model_path),
        "task": "text-generation",
        "load_kwargs": {"trust_remote_code": cfg.model.trust_remote_code},
    }
    if adapter_path is not None:
        model["adapter_path"] = str(adapter_path)
    return model


def _text_data(cfg: Config, name: str, jsonl: str | Path) -> dict[str, Any]:
    """A data config over a JSON-lines file of prompt/completion pairs rendered by slmkit.prompt.

    Rendering in slmkit (not with Olive's text_template) keeps one prompt builder for training and
    inference. The pre-processing is slmkit's Olive component (olive_data.py): loss on the completion only.
    """
    from slmkit.olive_data import NAME

    return {
        "name": name,
        "type": "HuggingfaceContainer",
        "user_script": str(OLIVE_DATA_SCRIPT),
        "load_dataset_config": {"data_name": "json", "data_files": str(jsonl), "split": "train"},
        "pre_process_data_config": {
            "type": NAME,
            "max_seq_len": cfg.model.max_length,
            "prompt_col": PROMPT_COLUMN,
            "completion_col": COMPLETION_COLUMN,
            "trust_remote_code": cfg.model.trust_remote_code,
        },
    }


def _workflow(
    cfg: Config,
    input_model: dict,
    passes: dict,
    work_dir: Path,
    data_configs: list | None = None,
    *,
    for_builder: bool = False,
) -> dict[str, Any]:
    config: dict[str, Any] = {
        "input_model": input_model,
        "systems": {"local_system": _system(cfg, for_builder=for_builder)},
        "passes": passes,
        "host": "local_system",
        "target": "local_system",
        "evaluate_input_model": False,
        "log_severity_level": 1,
        "cache_dir": str(work_dir / "cache"),
        "output_dir": str(work_dir / "output"),
    }
    if data_configs:
        config["data_configs"] = data_configs
    return config


def training_args(cfg: Config, checkpoint_dir: Path) -> dict[str, Any]:
    t = cfg.train
    return {
        "seed": cfg.seed,
        "data_seed": cfg.seed,
        "learning_rate": t.learning_rate,
        "max_steps": t.max_steps,
        "per_device_train_batch_size": t.batch_size,
        "per_device_eval_batch_size": t.batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "gradient_checkpointing": t.gradient_checkpointing,
        "lr_scheduler_type": t.lr_scheduler_type,
        # transformers 5 dropped `warmup_ratio`; a float < 1 in `warmup_steps` is the fraction of steps.
        # (Olive silently drops fields TrainingArguments does not know, so the old name would be ignored.)
        "warmup_steps": t.warmup_ratio,
        "weight_decay": t.weight_decay,
        "max_grad_norm": t.max_grad_norm,
        "logging_steps": t.logging_steps,
        "eval_strategy": "steps",
        "eval_steps": t.eval_steps,
        # One checkpoint at the last step: its trainer_state.json holds the loss curve.
        "output_dir": str(checkpoint_dir),
        "save_strategy": "steps",
        "save_steps": t.max_steps,
        "save_total_limit": 1,
        "overwrite_output_dir": True,
        "report_to": "none",
        "disable_tqdm": True,
        # Evaluation reads the loss only: without this the Trainer also gathers every eval batch's logits.
        "prediction_loss_only": True,
        "optim": t.optim,
        "train_sampling_strategy": t.sampling,
    }


def train_workflow(
    cfg: Config, base_path: str | Path, train_jsonl: Path, val_jsonl: Path, work_dir: Path
) -> dict[str, Any]:
    """Olive LoRA / QLoRA / DoRA pass over the base model -> adapter."""
    data = [_text_data(cfg, "train_data", train_jsonl), _text_data(cfg, "val_data", val_jsonl)]
    passes = {"lora": adapter_pass(cfg, work_dir / "checkpoints")}
    return _workflow(cfg, _input_model(cfg, base_path), passes, work_dir, data)


def adapter_pass(cfg: Config, checkpoint_dir: Path) -> dict[str, Any]:
    """The fine-tuning pass for cfg.lora.method, with slmkit's data configs and training arguments."""
    lo = cfg.lora
    lora_pass: dict[str, Any] = {
        "type": OLIVE_PASS[lo.method],
        "r": lo.r,
        "alpha": lo.alpha,
        "lora_dropout": lo.dropout,
        "torch_dtype": cfg.train.torch_dtype,
        "train_data_config": "train_data",
        "eval_data_config": "val_data",
        "training_args": training_args(cfg, checkpoint_dir),
    }
    if lo.method == "qlora":
        lora_pass["quant_type"] = lo.quant_type
        lora_pass["double_quant"] = lo.double_quant
    else:
        lora_pass["target_modules"] = list(lo.target_modules or [])
    return lora_pass


def merge_workflow(cfg: Config, base_path: str | Path, adapter_path: str | Path, work_dir: Path) -> dict[str, Any]:
    """Olive MergeAdapterWeights: base + adapter -> one Hugging Face model."""
    passes = {"merge": {"type": "MergeAdapterWeights"}}
    return _workflow(cfg, _input_model(cfg, base_path, adapter_path), passes, work_dir)


def quantize_workflow(
    cfg: Config, model_path: str | Path, work_dir: Path, adapter_path: str | Path | None = None
) -> dict[str, Any]:
    """Olive ModelBuilder -> ONNX model folder for onnxruntime-genai.

    builder.adapter=merged: `model_path` is the merged model. separate: `model_path` is the base and
    `adapter_path` the LoRA adapter; ModelBuilder builds the adapter's branches beside the base's layers."""
    if cfg.builder.adapter == "separate":
        if adapter_path is None:
            raise ValueError("builder.adapter=separate needs the adapter")
        targets = json.loads((Path(adapter_path) / "adapter_config.json").read_text(encoding="utf-8"))["target_modules"]
        passes = {"builder": builder_pass(cfg, model_path, targets)}
        return _workflow(cfg, _input_model(cfg, model_path, adapter_path), passes, work_dir, for_builder=True)
    passes = {"builder": builder_pass(cfg, model_path)}
    return _workflow(cfg, _input_model(cfg, model_path), passes, work_dir, for_builder=True)


# ModelBuilder names a LoRA branch's MatMuls <layer>/<block>/<module>/lora_{A,B}/MatMul; a packed Phi-3
# projection (qkv_proj, gate_up_proj) gets branches under each part's name too.
LORA_BRANCH = "/model/layers.{layer}/{block}/{module}/{part}/MatMul"
PACKED_PARTS = families.packed_parts()


def _num_layers(model_path: str | Path) -> int:
    return int(json.loads((Path(model_path) / "config.json").read_text(encoding="utf-8"))["num_hidden_layers"])


def lora_branch_nodes(targets: list[str], num_layers: int) -> list[str]:
    """Names of every MatMul ModelBuilder may make for LoRA branches on `targets`: kept out of int4.

    A superset (names ModelBuilder does not make are ignored); the quantize stage checks afterwards that
    no branch was quantized (olive_run.check_lora_branches), so a naming change fails loudly."""
    modules = set(targets)
    for packed, parts in PACKED_PARTS.items():
        if packed in modules:
            modules.update(parts)
    return [
        LORA_BRANCH.format(layer=layer, block=block, module=module, part=part)
        for layer in range(num_layers)
        for block in ("attn", "mlp")
        for module in sorted(modules)
        for part in ("lora_A", "lora_B")
    ]


# ModelBuilder names a layer's own projection <layer>/<block>/<module>/MatMul before quantizing it.
BASE_MATMUL = "/model/layers.{layer}/{block}/{module}/MatMul"


# builder.exclude's name for the output projection to the vocabulary (ModelBuilder's /lm_head/MatMul).
LM_HEAD = "lm_head"


def excluded_nodes(modules: list[str], num_layers: int) -> list[str]:
    """The base MatMuls of `modules` (builder.exclude) in every layer, and the LM head's when `lm_head`
    is named: kept out of int4 (a superset, as lora_branch_nodes; the quantize stage checks that each
    module's MatMuls stayed full precision)."""
    nodes = [
        BASE_MATMUL.format(layer=layer, block=block, module=module)
        for layer in range(num_layers)
        for block in ("attn", "mlp")
        for module in modules
        if module != LM_HEAD
    ]
    return nodes + (["/lm_head/MatMul"] if LM_HEAD in modules else [])


def kit_quantized(b: BuilderConfig) -> bool:
    """Whether the quantize stage, not ModelBuilder, quantizes the model (int8, and int4 by the kit's algos)."""
    return b.precision == "int8" or (b.precision == "int4" and b.int4_algo in KIT_INT4_ALGOS)


def builder_pass(cfg: Config, model_path: str | Path, lora_targets: list[str] | None = None) -> dict[str, Any]:
    """ModelBuilder for `model_path`: int4 keeps the adapter's branches (`lora_targets`) and
    builder.exclude out of int4, in each of the model's layers (int8 does the same in slmkit.int8)."""
    b = cfg.builder
    # int8: ModelBuilder builds fp32 and the quantize stage puts the base's MatMuls in int8 (slmkit.int8):
    # ModelBuilder's own int8 precision does not build a runnable model here.
    # The kit's int4 (builder.int4_algo=minmax, slmkit.int4) likewise quantizes ModelBuilder's fp32 model.
    precision = "fp32" if kit_quantized(b) else b.precision
    olive_pass: dict[str, Any] = {"type": "ModelBuilder", "precision": precision}
    if precision == "int4":
        olive_pass["int4_block_size"] = b.int4_block_size
        olive_pass["int4_accuracy_level"] = b.int4_accuracy_level
        olive_pass["int4_algo_config"] = b.int4_algo
        excluded = list(b.exclude or [])
        layers = _num_layers(model_path) if lora_targets or excluded else 0
        keep_out_of_int4 = lora_branch_nodes(lora_targets, layers) if lora_targets else []
        keep_out_of_int4 += excluded_nodes(excluded, layers)
        if keep_out_of_int4:
            olive_pass["int4_nodes_to_exclude"] = keep_out_of_int4
    if b.prune_lm_head:
        olive_pass["extra_options"] = {"prune_lm_head": True}
    return olive_pass


def single_workflow(
    cfg: Config, base_path: str | Path, train_jsonl: Path, val_jsonl: Path, work_dir: Path
) -> dict[str, Any]:
    """The whole model path as ONE Olive config (fine-tune -> merge -> build), for `olive run --config`.

    The same passes, data configs and training arguments as the train, merge and quantize stages, chained
    the way Olive's own Phi-3 example is; `make olive-config` writes it (the eject path)."""
    data = [_text_data(cfg, "train_data", train_jsonl), _text_data(cfg, "val_data", val_jsonl)]
    passes: dict[str, Any] = {"lora": adapter_pass(cfg, work_dir / "checkpoints")}
    if cfg.builder.adapter == "separate":
        # Olive hands the LoRA pass's adapter straight to ModelBuilder, which keeps it apart.
        from slmkit.arch import adaptable_modules, meta_model

        targets = cfg.lora.target_modules or sorted(adaptable_modules(meta_model(cfg.model)))
        passes["builder"] = builder_pass(cfg, base_path, list(targets))
    else:
        passes["merge"] = {"type": "MergeAdapterWeights"}
        passes["builder"] = builder_pass(cfg, base_path)
    return _workflow(cfg, _input_model(cfg, base_path), passes, work_dir, data, for_builder=True)


def extract_adapters_workflow(cfg: Config, model_dir: str | Path, work_dir: Path) -> dict[str, Any]:
    """Olive's ExtractAdapters on a built model whose LoRA branches are apart (builder.adapter=separate): the
    branches' weights become optional graph inputs (empty by default: the base alone; the rank a dynamic
    dimension) and go to an .onnx_adapter file that onnxruntime-genai loads at run time (slmkit.adapters)."""
    model = {"type": "ONNXModel", "model_path": str(model_dir), "onnx_file_name": "model.onnx"}
    passes = {
        "extract": {
            "type": "ExtractAdapters",
            "make_inputs": True,
            "dynamic_lora_r": True,
            "optional_inputs": True,
            "save_format": "onnx_adapter",
            "save_as_external_data": True,
            "all_tensors_to_one_file": True,
            "external_data_name": "model.onnx.data",
        }
    }
    return _workflow(cfg, model, passes, work_dir, for_builder=True)
