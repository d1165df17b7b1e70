"""Config -> Olive workflow configs that Olive itself accepts; the completion-only data component."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from olive.data.constants import IGNORE_INDEX
from olive.hardware.accelerator import AcceleratorSpec
from olive.package_config import OlivePackageConfig
from olive.workflows.run.config import RunConfig

from slmkit import olive_config, olive_passes
from slmkit.config import Config, compose
from slmkit.olive_data import NAME as PRE_PROCESS_NAME
from slmkit.olive_data import tokenize_pair
from slmkit.prompt import build_completion, build_prompt

# Builder variants the config allows, to check each produces a valid ModelBuilder config.
BUILDER_VARIANTS = {
    "default": [],
    "int4_cpu": ["builder=int4_cpu"],
    "int8_cpu": ["builder=int8_cpu"],
    "fp32_cpu": ["builder=fp32_cpu"],
    "fp16_cuda": ["builder=fp16_cuda"],
    "int4_cuda": ["builder=int4_cuda"],
}


@pytest.fixture(scope="module")
def olive_package():
    """Olive's package config with slmkit's passes, as the train stage hands it to Olive."""
    return OlivePackageConfig.parse_file_or_obj(olive_passes.package_config())


@pytest.fixture
def paths(tmp_path: Path) -> dict[str, Path]:
    return {
        "base": tmp_path / "base",
        "adapter": tmp_path / "adapter",
        "merged": tmp_path / "merged",
        "train": tmp_path / "train_text.jsonl",
        "val": tmp_path / "val_text.jsonl",
        "work": tmp_path / "work",
    }


def _workflows(cfg: Config, paths: dict[str, Path]) -> dict[str, dict]:
    if cfg.builder.adapter == "separate":
        _adapter_and_base(paths, ["q_proj", "o_proj"], layers=2)
        quantize = olive_config.quantize_workflow(cfg, paths["base"], paths["work"], paths["adapter"])
    else:
        _merged(paths, layers=2)
        quantize = olive_config.quantize_workflow(cfg, paths["merged"], paths["work"])
    return {
        "train": olive_config.train_workflow(cfg, paths["base"], paths["train"], paths["val"], paths["work"]),
        "merge": olive_config.merge_workflow(cfg, paths["base"], paths["adapter"], paths["work"]),
        "quantize": quantize,
    }


def _only_pass(workflow: dict) -> dict:
    assert len(workflow["passes"]) == 1
    return next(iter(workflow["passes"].values()))


def _accelerator(workflow: dict) -> AcceleratorSpec:
    acc = workflow["systems"][workflow["host"]]["accelerators"][0]
    return AcceleratorSpec(accelerator_type=acc["device"], execution_provider=acc["execution_providers"][0])


def _olive_pass_config(workflow: dict, olive_package):
    """Validate the workflow with Olive's RunConfig, then its pass with the pass's own config class."""
    run = RunConfig.parse_file_or_obj(copy.deepcopy(workflow))
    (name,) = run.passes
    run_pass = run.passes[name][0]
    pass_cls = olive_package.import_pass_module(run_pass.type)
    accelerator = _accelerator(workflow)
    # Olive only warns about (and drops) parameters its pass does not know: fail on them here.
    known = set(pass_cls.default_config(accelerator))
    unknown = set(_only_pass(workflow)) - {"type"} - known
    assert not unknown, f"{pass_cls.__name__} does not know {sorted(unknown)}: Olive would ignore them"
    return pass_cls.generate_config(accelerator, run_pass.config, {}, True)


# --- the passes carry the config ------------------------------------------------------------------


def test_train_workflow_lora_pass(cfg: Config, paths):
    workflow = olive_config.train_workflow(cfg, paths["base"], paths["train"], paths["val"], paths["work"])
    lora = _only_pass(workflow)
    assert lora["type"] == "CompletionLoRA"
    assert lora["r"] == cfg.lora.r
    assert lora["alpha"] == cfg.lora.alpha
    assert lora["lora_dropout"] == cfg.lora.dropout
    assert lora["target_modules"] == list(cfg.lora.target_modules)
    assert lora["torch_dtype"] == cfg.train.torch_dtype
    args = lora["training_args"]
    assert args["learning_rate"] == cfg.train.learning_rate
    assert args["max_steps"] == cfg.train.max_steps
    assert args["seed"] == cfg.seed
    assert args["per_device_train_batch_size"] == cfg.train.batch_size
    assert Path(args["output_dir"]).is_relative_to(paths["work"])
    assert workflow["input_model"]["model_path"] == str(paths["base"])
    assert Path(workflow["output_dir"]).is_relative_to(paths["work"])
    assert Path(workflow["cache_dir"]).is_relative_to(paths["work"])


def test_train_workflow_follows_overrides(paths):
    cfg = compose(
        [
            "lora.r=4",
            "lora.alpha=8",
            "lora.dropout=0.2",
            "lora.target_modules=[o_proj]",
            "train.learning_rate=0.0005",
            "train.max_steps=17",
            "seed=3",
        ]
    )
    lora = _only_pass(olive_config.train_workflow(cfg, paths["base"], paths["train"], paths["val"], paths["work"]))
    assert (lora["r"], lora["alpha"], lora["lora_dropout"], lora["target_modules"]) == (
        4,
        8.0,
        0.2,
        ["o_proj"],
    )
    args = lora["training_args"]
    assert (args["learning_rate"], args["max_steps"], args["seed"]) == (0.0005, 17, 3)


def test_train_workflow_data_configs(cfg: Config, paths):
    workflow = olive_config.train_workflow(cfg, paths["base"], paths["train"], paths["val"], paths["work"])
    lora = _only_pass(workflow)
    by_name = {d["name"]: d for d in workflow["data_configs"]}
    assert by_name[lora["train_data_config"]]["load_dataset_config"]["data_files"] == str(paths["train"])
    assert by_name[lora["eval_data_config"]]["load_dataset_config"]["data_files"] == str(paths["val"])
    for data in by_name.values():
        assert Path(data["user_script"]).is_file()
        assert Path(data["user_script"]).resolve() == olive_config.OLIVE_DATA_SCRIPT.resolve()
        pre = data["pre_process_data_config"]
        assert pre["type"] == PRE_PROCESS_NAME
        assert pre["max_seq_len"] == cfg.model.max_length
        assert (pre["prompt_col"], pre["completion_col"]) == (
            olive_config.PROMPT_COLUMN,
            olive_config.COMPLETION_COLUMN,
        )


def test_merge_workflow(cfg: Config, paths):
    workflow = olive_config.merge_workflow(cfg, paths["base"], paths["adapter"], paths["work"])
    assert _only_pass(workflow)["type"] == "MergeAdapterWeights"
    assert workflow["input_model"]["model_path"] == str(paths["base"])
    assert workflow["input_model"]["adapter_path"] == str(paths["adapter"])


@pytest.mark.parametrize("variant", BUILDER_VARIANTS)
def test_quantize_workflow(variant: str, paths):
    cfg = compose(BUILDER_VARIANTS[variant])
    workflow = _workflows(cfg, paths)["quantize"]
    builder = _only_pass(workflow)
    assert builder["type"] == "ModelBuilder"
    # int8 and the kit's int4 (grid): ModelBuilder builds fp32 and the quantize stage quantizes it
    assert builder["precision"] == ("fp32" if olive_config.kit_quantized(cfg.builder) else cfg.builder.precision)
    source = paths["base"] if cfg.builder.adapter == "separate" else paths["merged"]
    assert workflow["input_model"]["model_path"] == str(source)
    if builder["precision"] == "int4":
        assert builder["int4_block_size"] == cfg.builder.int4_block_size
        assert builder["int4_accuracy_level"] == cfg.builder.int4_accuracy_level
        assert builder["int4_algo_config"] == cfg.builder.int4_algo
    else:
        assert not any(key.startswith("int4") for key in builder)
    provider = _accelerator(workflow).execution_provider
    assert provider.lower().startswith(cfg.builder.execution_provider)


def test_training_and_merge_run_on_cpu_whatever_the_builder(paths):
    cfg = compose(BUILDER_VARIANTS["fp16_cuda"])
    workflows = _workflows(cfg, paths)
    assert _accelerator(workflows["train"]).execution_provider == "CPUExecutionProvider"
    assert _accelerator(workflows["merge"]).execution_provider == "CPUExecutionProvider"
    assert _accelerator(workflows["quantize"]).execution_provider == "CUDAExecutionProvider"


# --- Olive accepts the configs --------------------------------------------------------------------


@pytest.mark.parametrize("variant", BUILDER_VARIANTS)
@pytest.mark.parametrize("stage", ["train", "merge", "quantize"])
def test_workflow_validates_with_olive(stage: str, variant: str, paths, olive_package):
    workflow = _workflows(compose(BUILDER_VARIANTS[variant]), paths)[stage]
    json.dumps(workflow)  # written to olive_config.json by the stage
    _olive_pass_config(workflow, olive_package)


def test_olive_rejects_a_broken_config(cfg: Config, paths, olive_package):
    """The validation above has teeth: a missing user_script and a bad pass value are caught."""
    workflow = _workflows(cfg, paths)["train"]
    broken = copy.deepcopy(workflow)
    broken["data_configs"][0]["user_script"] = str(paths["work"] / "missing.py")
    with pytest.raises(ValueError):
        RunConfig.parse_file_or_obj(broken)
    broken = copy.deepcopy(workflow)
    broken["passes"]["lora"]["r"] = "sixteen"
    with pytest.raises(ValueError):
        _olive_pass_config(broken, olive_package)
    broken = copy.deepcopy(workflow)
    broken["passes"]["lora"]["dropout"] = 0.1
    with pytest.raises(AssertionError, match="dropout"):
        _olive_pass_config(broken, olive_package)


@pytest.fixture(scope="module")
def olive_training_args(_composed: Config, tmp_path_factory, olive_package):
    """transformers.TrainingArguments exactly as Olive's LoRA pass builds them from our config."""
    work = tmp_path_factory.mktemp("olive")
    workflow = olive_config.train_workflow(_composed, work / "base", work / "t.jsonl", work / "v.jsonl", work)
    return _olive_pass_config(workflow, olive_package).training_args.create_training_args()


def test_olive_training_args_carry_the_config(olive_training_args, cfg: Config):
    args, t = olive_training_args, cfg.train
    assert args.learning_rate == t.learning_rate
    assert args.max_steps == t.max_steps
    assert args.seed == cfg.seed
    assert args.data_seed == cfg.seed
    assert args.per_device_train_batch_size == t.batch_size
    assert args.per_device_eval_batch_size == t.batch_size
    assert args.gradient_accumulation_steps == t.gradient_accumulation_steps
    assert args.lr_scheduler_type == t.lr_scheduler_type
    assert args.weight_decay == t.weight_decay
    assert args.max_grad_norm == t.max_grad_norm
    assert args.logging_steps == t.logging_steps
    assert args.eval_steps == t.eval_steps
    assert args.train_sampling_strategy == t.sampling
    # One checkpoint, at the last step (its trainer_state.json holds the loss curve).
    assert args.save_steps == t.max_steps
    assert args.save_total_limit == 1


def test_grouped_sampling_reaches_the_trainer(tmp_path: Path, olive_package):
    cfg = compose(["train.sampling=group_by_length"])
    workflow = olive_config.train_workflow(cfg, tmp_path / "base", tmp_path / "t.jsonl", tmp_path / "v.jsonl", tmp_path)
    args = _olive_pass_config(workflow, olive_package).training_args.create_training_args()
    assert args.train_sampling_strategy == "group_by_length"


def test_olive_training_args_carry_warmup(olive_training_args, cfg: Config):
    assert cfg.train.warmup_ratio > 0
    expected = math.ceil(cfg.train.max_steps * cfg.train.warmup_ratio)
    assert olive_training_args.get_warmup_steps(cfg.train.max_steps) == expected


def test_lora_targets_exist_in_the_tiny_model():
    cfg = compose(["experiment=tiny"])
    import torch

    from slmkit.tiny import build_model

    tiny = cfg.model.tiny
    with torch.device("meta"):
        model = build_model(tiny, vocab_size=tiny.vocab_size, eos_id=0)
    # The layer types PEFT's LoRA can adapt.
    adaptable = (torch.nn.Linear, torch.nn.Embedding)
    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, adaptable)}
    missing = set(cfg.lora.target_modules) - names
    assert not missing, f"lora.target_modules {sorted(missing)} are not layers LoRA can adapt ({sorted(names)})"


# --- olive_data: loss on the completion only ------------------------------------------------------


@pytest.fixture
def pair(tiny_tokenizer, data_cfg):
    text = "The letter never came and the house feels empty."
    prompt = build_prompt(data_cfg, text)
    completion = build_completion(data_cfg, data_cfg.labels[0], tiny_tokenizer.eos_token)
    p = tiny_tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c = tiny_tokenizer(completion, add_special_tokens=False)["input_ids"]
    assert len(p) > 4 and c
    return prompt, completion, p, c


def test_ignore_index_is_what_the_loss_ignores():
    import torch

    assert torch.nn.CrossEntropyLoss().ignore_index == IGNORE_INDEX


def test_tokenize_pair_masks_the_prompt(tiny_tokenizer, pair):
    prompt, completion, p, c = pair
    out = tokenize_pair(tiny_tokenizer, prompt, completion, max_len=len(p) + len(c) + 10)
    assert out["input_ids"] == p + c
    assert out["labels"] == [IGNORE_INDEX] * len(p) + c
    assert out["attention_mask"] == [1] * (len(p) + len(c))


def test_tokenize_pair_exact_fit_is_not_truncated(tiny_tokenizer, pair):
    prompt, completion, p, c = pair
    assert tokenize_pair(tiny_tokenizer, prompt, completion, max_len=len(p) + len(c))["input_ids"] == p + c


@pytest.mark.parametrize("keep", [0, 1, 3])
def test_tokenize_pair_truncates_the_prompt_start(tiny_tokenizer, pair, keep: int):
    prompt, completion, p, c = pair
    out = tokenize_pair(tiny_tokenizer, prompt, completion, max_len=len(c) + keep)
    assert len(out["input_ids"]) == len(c) + keep
    assert out["input_ids"] == p[len(p) - keep :] + c
    assert out["labels"] == [IGNORE_INDEX] * keep + c
    assert len(out["attention_mask"]) == len(out["input_ids"])


def test_tokenize_pair_has_no_bos(tiny_tokenizer, pair):
    prompt, completion, p, _ = pair
    out = tokenize_pair(tiny_tokenizer, prompt, completion, max_len=1000)
    assert out["input_ids"][: len(p)] == p
    assert out["input_ids"].count(tiny_tokenizer.eos_token_id) == 1


def test_olive_loads_the_rendered_data_through_our_component(cfg: Config, tiny_tokenizer, tmp_path, monkeypatch):
    """Olive's own LoRA data path (user_script -> registered pre-process -> dataset) on a tiny file."""
    import datasets.config
    from olive.passes.pytorch.train_utils import get_training_dataset

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    base = tmp_path / "base"
    tiny_tokenizer.save_pretrained(base)
    pairs = [
        (
            build_prompt(cfg.data, f"phrase number {i}"),
            build_completion(cfg.data, label, tiny_tokenizer.eos_token),
        )
        for i, label in enumerate(cfg.data.labels)
    ]
    for split in ("train", "val"):
        with open(tmp_path / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for prompt, completion in pairs:
                row = {olive_config.PROMPT_COLUMN: prompt, olive_config.COMPLETION_COLUMN: completion}
                f.write(json.dumps(row) + "\n")
    workflow = olive_config.train_workflow(cfg, base, tmp_path / "train.jsonl", tmp_path / "val.jsonl", tmp_path)
    run = RunConfig.parse_file_or_obj(copy.deepcopy(workflow))
    train_name = _only_pass(workflow)["train_data_config"]
    (data_config,) = [d for d in run.data_configs if d.name == train_name]
    dataset = get_training_dataset(data_config)
    assert len(dataset) == len(pairs)
    for i, (prompt, completion) in enumerate(pairs):
        expected = tokenize_pair(tiny_tokenizer, prompt, completion, cfg.model.max_length)
        row = dataset[i]
        for key in ("input_ids", "attention_mask", "labels"):
            assert row[key].tolist() == expected[key], key


@pytest.mark.parametrize("method", ["lora", "qlora", "dora"])
def test_each_adapter_method_is_its_olive_pass(method: str, paths, olive_package):
    """lora.method maps one to one onto slmkit's LoRA / QLoRA / DoRA pass (Olive's, subclassed), every key
    known to the pass."""
    cfg = compose([f"lora={method}", *(["builder.adapter=merged"] if method == "dora" else [])])
    workflow = olive_config.train_workflow(cfg, paths["base"], paths["train"], paths["val"], paths["work"])
    olive_pass = _only_pass(workflow)
    assert olive_pass["type"] == olive_config.OLIVE_PASS[method]
    checked = _olive_pass_config(workflow, olive_package)
    if method == "qlora":
        assert (checked.quant_type, checked.double_quant) == ("nf4", True)
    else:
        assert checked.target_modules == list(cfg.model.target_modules)
    assert checked.training_args.create_training_args().optim == cfg.train.optim


@pytest.mark.parametrize("adapter", ["separate", "merged"])
def test_ejected_workflow_chains_the_stage_passes(adapter: str, paths):
    """`make olive-config`: one Olive config with exactly the train, merge and quantize stages' passes
    (separate: LoRA straight into ModelBuilder, which receives the adapter and keeps it apart)."""
    cfg = compose([f"builder.adapter={adapter}"])
    _adapter_and_base(paths, list(cfg.lora.target_modules), layers=cfg.model.architecture["num_hidden_layers"])
    args = (cfg, paths["base"], paths["train"], paths["val"], paths["work"])
    single = olive_config.single_workflow(*args)
    assert single["passes"]["lora"] == olive_config.train_workflow(*args)["passes"]["lora"]
    if adapter == "separate":
        assert list(single["passes"]) == ["lora", "builder"]
        build = olive_config.quantize_workflow(cfg, paths["base"], paths["work"], paths["adapter"])
    else:
        assert list(single["passes"]) == ["lora", "merge", "builder"]
        merge = olive_config.merge_workflow(cfg, paths["base"], paths["work"] / "adapter", paths["work"])
        assert single["passes"]["merge"] == merge["passes"]["merge"]
        build = olive_config.quantize_workflow(cfg, paths["base"], paths["work"])
    assert single["passes"]["builder"] == build["passes"]["builder"]
    assert single["data_configs"] == olive_config.train_workflow(*args)["data_configs"]
    assert single["systems"] == build["systems"]
    RunConfig.parse_file_or_obj(copy.deepcopy(single))  # a valid Olive config as written


_TELEMETRY_PROBE = (
    "import os; from slmkit.olive_run import opt_out_of_telemetry; opt_out_of_telemetry(); "
    "from olive.telemetry.telemetry import Telemetry; t = Telemetry(); "
    "print(t._logger is None, t._cache_handler is None, os.environ.get('CI'))"
)


# Opted out (slmkit's default): no heartbeat queued, no logger left to wait for at exit, CI untouched.
# Not opted out: Olive's telemetry is left as Olive sets it up (CI=1 keeps this probe off the network).
_TELEMETRY_CASES = {
    "opted-out": ({"OLIVE_DISABLE_TELEMETRY": "1"}, "True True None"),
    "olive-default": ({"OLIVE_DISABLE_TELEMETRY": "0", "CI": "1"}, "False False 1"),
}


@pytest.fixture(scope="module")
def telemetry_probes() -> dict[str, subprocess.Popen]:
    """Both probes started at once: each is a new Python importing Olive (~5 s), and they need not wait in turn."""
    base = {k: v for k, v in os.environ.items() if k not in ("CI", "OLIVE_DISABLE_TELEMETRY")}
    probes = {
        case: subprocess.Popen(
            [sys.executable, "-c", _TELEMETRY_PROBE],
            env={**base, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for case, (env, _) in _TELEMETRY_CASES.items()
    }
    yield probes
    for proc in probes.values():
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("case", _TELEMETRY_CASES)
def test_olive_telemetry_opt_out_is_complete(case: str, telemetry_probes: dict[str, subprocess.Popen]):
    stdout, stderr = telemetry_probes[case].communicate(timeout=120)
    assert telemetry_probes[case].returncode == 0, stderr
    assert stdout.split("\n")[-2] == _TELEMETRY_CASES[case][1]


# --- builder.adapter=separate: the base in int4, the LoRA branches beside it in full precision ------------


def _merged(paths, layers: int) -> None:
    paths["merged"].mkdir(parents=True, exist_ok=True)
    (paths["merged"] / "config.json").write_text(json.dumps({"num_hidden_layers": layers}))


def _adapter_and_base(paths, targets: list[str], layers: int) -> None:
    paths["adapter"].mkdir(parents=True, exist_ok=True)
    (paths["adapter"] / "adapter_config.json").write_text(json.dumps({"target_modules": targets}))
    paths["base"].mkdir(parents=True, exist_ok=True)
    (paths["base"] / "config.json").write_text(json.dumps({"num_hidden_layers": layers}))


def test_separate_adapter_builds_from_the_base_with_its_branches_kept_out_of_int4(paths, olive_package):
    cfg = compose(["model=smollm2_135m", "builder=int4_cpu", "builder.adapter=separate"])
    _adapter_and_base(paths, ["q_proj", "down_proj"], layers=2)
    workflow = olive_config.quantize_workflow(cfg, paths["base"], paths["work"], paths["adapter"])
    assert workflow["input_model"]["model_path"] == str(paths["base"])
    assert workflow["input_model"]["adapter_path"] == str(paths["adapter"])
    kept = set(_only_pass(workflow)["int4_nodes_to_exclude"])
    for layer in (0, 1):
        for module in ("q_proj", "down_proj"):
            for part in ("lora_A", "lora_B"):
                assert any(name.startswith(f"/model/layers.{layer}/") and f"/{module}/{part}/" in name for name in kept)
    assert not any("/layers.2/" in name or "/k_proj/" in name for name in kept)
    _olive_pass_config(workflow, olive_package)  # ModelBuilder knows int4_nodes_to_exclude


def test_separate_adapter_names_the_parts_of_packed_projections():
    names = olive_config.lora_branch_nodes(["qkv_proj", "gate_up_proj"], num_layers=1)
    for part in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "qkv_proj"):
        assert f"/model/layers.0/attn/{part}/lora_A/MatMul" in names


def test_merged_build_has_no_exclusions(paths):
    cfg = compose(["model=smollm2_135m", "builder.adapter=merged", "builder.exclude=[]"])
    _merged(paths, layers=2)
    workflow = olive_config.quantize_workflow(cfg, paths["merged"], paths["work"])
    assert "int4_nodes_to_exclude" not in _only_pass(workflow)
    assert "adapter_path" not in workflow["input_model"]


@pytest.mark.parametrize("adapter", ["merged", "separate"])
def test_exclude_keeps_those_projections_full_precision_in_every_layer(paths, olive_package, adapter: str):
    overrides = [f"builder.adapter={adapter}", "builder.exclude=[down_proj,v_proj]"]
    cfg = compose(["model=smollm2_135m", "builder=int4_cpu", *overrides])
    _merged(paths, layers=3)
    _adapter_and_base(paths, ["q_proj"], layers=3)
    source = paths["merged"] if adapter == "merged" else paths["base"]
    workflow = olive_config.quantize_workflow(
        cfg, source, paths["work"], paths["adapter"] if adapter == "separate" else None
    )
    kept = set(_only_pass(workflow)["int4_nodes_to_exclude"])
    for layer in range(3):
        assert f"/model/layers.{layer}/mlp/down_proj/MatMul" in kept
        assert f"/model/layers.{layer}/attn/v_proj/MatMul" in kept
    assert not any("/q_proj/MatMul" in name or "/layers.3/" in name for name in kept)
    assert any("/q_proj/lora_A/" in name for name in kept) == (adapter == "separate")
    _olive_pass_config(workflow, olive_package)


def _onnx_with(path: Path, nodes: list[tuple[str, str]]) -> Path:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node(op, ["x", "x"], [f"y{i}"], name=name) for i, (op, name) in enumerate(nodes)],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1])],
        [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [1, 1]) for i in range(len(nodes))],
    )
    path.mkdir(parents=True, exist_ok=True)
    onnx.save(helper.make_model(graph), str(path / "model.onnx"))
    return path


def test_lora_branch_check_fails_on_a_quantized_or_missing_branch(tmp_path: Path):
    from slmkit.olive_run import check_lora_branches
    from slmkit.stage import StageError

    good = [
        ("MatMul", "/model/layers.0/attn/q_proj/lora_A/MatMul"),
        ("MatMul", "/model/layers.0/attn/q_proj/lora_B/MatMul"),
    ]
    check_lora_branches(_onnx_with(tmp_path / "good", good), 2, tmp_path / "olive.log")
    quantized = [good[0], ("MatMulNBits", "/model/layers.0/attn/q_proj/lora_B/MatMul_Q4")]
    with pytest.raises(StageError, match="1 of them quantized"):
        check_lora_branches(_onnx_with(tmp_path / "q", quantized), 2, tmp_path / "olive.log")
    with pytest.raises(StageError, match="builder.adapter=merged"):
        check_lora_branches(_onnx_with(tmp_path / "missing", good[:1]), 2, tmp_path / "olive.log")


def test_builder_prunes_the_lm_head_unless_told_not_to(paths, olive_package):
    _merged(paths, layers=2)
    workflow = olive_config.quantize_workflow(compose(["builder.adapter=merged"]), paths["merged"], paths["work"])
    assert _only_pass(workflow)["extra_options"] == {"prune_lm_head": True}
    _olive_pass_config(workflow, olive_package)  # Olive's ModelBuilder pass takes extra_options
    cfg = compose(["builder.adapter=merged", "builder.prune_lm_head=false"])
    assert "extra_options" not in _only_pass(olive_config.quantize_workflow(cfg, paths["merged"], paths["work"]))


def test_logits_check_fails_when_the_build_ignored_prune_lm_head(tiny_model_dirs, tmp_path: Path):
    """On real ModelBuilder output: the pruned tiny model (conftest) and the same model built without it."""
    from onnxruntime_genai.models.builder import create_model

    from slmkit.olive_run import check_logits
    from slmkit.stage import StageError

    pruned = tiny_model_dirs["onnx"]
    check_logits(pruned, True, tmp_path / "olive.log")
    with pytest.raises(StageError, match="builder.prune_lm_head=false"):
        check_logits(pruned, False, tmp_path / "olive.log")
    full = tmp_path / "full"
    create_model("", str(tiny_model_dirs["pytorch"]), str(full), "int4", "cpu", str(tmp_path / "cache"))
    check_logits(full, False, tmp_path / "olive.log")
    with pytest.raises(StageError, match="'sequence_length' positions.*was not pruned"):
        check_logits(full, True, tmp_path / "olive.log")


def test_exclude_names_each_layers_matmuls_and_the_lm_head():
    from slmkit.olive_config import excluded_nodes

    assert excluded_nodes(["down_proj"], 2) == [
        "/model/layers.0/attn/down_proj/MatMul",
        "/model/layers.0/mlp/down_proj/MatMul",
        "/model/layers.1/attn/down_proj/MatMul",
        "/model/layers.1/mlp/down_proj/MatMul",
    ]
    assert excluded_nodes(["lm_head"], 2) == ["/lm_head/MatMul"]
    assert excluded_nodes(["o_proj", "lm_head"], 1)[-1] == "/lm_head/MatMul"


def test_branch_count_splits_packed_projections():
    """ModelBuilder builds a packed projection's LoRA branch once per part (q/k/v, gate/up)."""
    from slmkit.build import branch_count

    layer = "base_model.model.model.layers.0"
    names = [
        f"{layer}.self_attn.qkv_proj.lora_A.weight",
        f"{layer}.self_attn.qkv_proj.lora_B.weight",
        f"{layer}.mlp.gate_up_proj.lora_A.weight",
        f"{layer}.self_attn.o_proj.lora_B.weight",
        f"{layer}.self_attn.q_proj.lora_A.weight",
    ]
    assert branch_count(names) == 3 + 3 + 2 + 1 + 1
