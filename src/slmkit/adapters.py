"""Many fine-tunes on one base: LoRA adapters loaded at run time by onnxruntime-genai (and PEFT).

A separate build (builder.adapter=separate) ships its LoRA weights as graph inputs that default to the run's
weights (slmkit.build.weights_as_inputs, Olive's ExtractAdapters pass). The `adapter` stage splits that model
(`split`): the same graph with empty defaults (rank 0: the base alone) and the weights as an `.onnx_adapter`
file. What is left is a base that any adapter of the same base model, builder recipe and target set can run
on: ModelBuilder folds the LoRA scale (alpha / r) into lora_B, Olive makes the rank a dynamic dimension and
`rank_free` drops it from the recorded shapes, so neither is in the base's bytes, and the base is the same
file for every such run (DVC's cache keeps it once).

Each side records what ties them (`slmkit_base.json` in the base, `adapter.json` beside the adapter file): the
base's fingerprint (sha256 of its files) and the recipe it came from. Loading an adapter on another base is
refused with what differs, before onnxruntime-genai would fail on an input name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ADAPTER_FILE = "adapter.onnx_adapter"
MANIFEST = "adapter.json"  # beside the adapter file
BASE_MANIFEST = "slmkit_base.json"  # in the base folder
# The PEFT adapter, beside the ONNX one in an adapter folder: the same folder runs on a PyTorch base.
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")
# The base's files whose bytes the fingerprint covers (the rest: tokenizer, configs, cards).
GRAPH_SUFFIXES = (".onnx", ".data")
RANK_DIM = "lora_r"  # Olive's name for the dynamic rank dimension of the adapter inputs


class AdapterMismatch(ValueError):
    """An adapter that does not fit the base it was asked to run on; the message says what differs."""


@dataclass(frozen=True)
class Adapter:
    name: str
    folder: Path
    file: Path
    manifest: dict[str, Any]


def base_fingerprint(base: Path) -> str:
    """sha256 over the base's graph files (model.onnx and its external data): what an adapter is tied to."""
    import hashlib

    from slmkit.data import sha256_file

    files = sorted(p for p in Path(base).iterdir() if p.is_file() and p.suffix in GRAPH_SUFFIXES)
    listing = "".join(f"{p.name}\0{sha256_file(p)}\n" for p in files)
    return hashlib.sha256(listing.encode()).hexdigest()


def base_recipe(cfg) -> dict[str, Any]:
    """The settings a base's bytes follow from (not the rank, the alpha or the data): an adapter trained with
    other values of these cannot run on it. The target set is checked by input names (check)."""
    b = cfg.builder
    return {
        "model.name": cfg.model.name,
        "model.source": cfg.model.source,
        "model.path": cfg.model.path,
        "model.hub_id": cfg.model.hub_id,
        "model.revision": cfg.model.revision,
        "builder.precision": b.precision,
        "builder.execution_provider": b.execution_provider,
        "builder.exclude": list(b.exclude) if b.exclude else None,
        "builder.int4_block_size": b.int4_block_size,
        "builder.int4_accuracy_level": b.int4_accuracy_level,
        "builder.int4_algo": b.int4_algo,
        "builder.prune_lm_head": b.prune_lm_head,
    }


def graph_inputs(model_file: Path) -> dict[str, list]:
    """The LoRA weight inputs of a graph file: name -> shape (a dimension is an int or a symbolic name)."""
    import onnx

    return lora_inputs(onnx.load(str(model_file), load_external_data=False).graph)


def lora_inputs(graph) -> dict[str, list]:
    """The LoRA weight inputs of a loaded graph: name -> shape (a dimension is an int or a symbolic name)."""
    shapes = {}
    for value in graph.input:
        if is_lora_weight(value.name):
            dims = value.type.tensor_type.shape.dim
            shapes[value.name] = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in dims]
    return shapes


def adapter_parameters(file: Path) -> dict[str, list[int]]:
    """name -> shape of the tensors in an .onnx_adapter file (onnxruntime's reader)."""

    return {name: list(value.shape()) for name, value in _read_adapter(file).items()}


def lora_module(param: str) -> str:
    """The module a LoRA weight adapts, from Olive's name (model.layers.3.attn.q_proj.lora_A.weight -> q_proj)."""
    head = param.split(".lora_")[0]
    return head.rsplit(".", 1)[-1]


def read_base(base: Path) -> dict[str, Any]:
    file = Path(base) / BASE_MANIFEST
    if not file.is_file():
        raise AdapterMismatch(
            f"{base} takes no adapters ({BASE_MANIFEST} is missing): load adapters on the base the `adapter` "
            "stage writes (artifacts/adapter/base, `make adapter`); a model with the adapter built in takes none"
        )
    return json.loads(file.read_text(encoding="utf-8"))


def resolve(name: str, path: str | Path) -> Adapter:
    """An adapter folder (adapter.json + adapter.onnx_adapter), or the .onnx_adapter file inside one."""
    path = Path(path)
    folder = path.parent if path.suffix == ".onnx_adapter" else path
    manifest_file = folder / MANIFEST
    if not folder.is_dir():
        raise FileNotFoundError(f"adapter {name!r}: {path}: no such folder; `make adapter` writes artifacts/adapter/")
    if not manifest_file.is_file():
        raise FileNotFoundError(
            f"adapter {name!r}: {folder} has no {MANIFEST}: give the folder the `adapter` stage writes "
            "(artifacts/adapter/adapter)"
        )
    manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
    if not manifest.get("exported", True):
        raise AdapterMismatch(f"adapter {name!r}: {folder}: {manifest.get('reason', 'no adapter was exported')}")
    file = folder / ADAPTER_FILE
    if not file.is_file():
        raise FileNotFoundError(f"adapter {name!r}: {file} is missing; rerun `make adapter`")
    return Adapter(name, folder, file, manifest)


def _differences(theirs: dict, ours: dict) -> list[str]:
    keys = sorted(set(theirs) | set(ours))
    return [f"{k}: {theirs.get(k)!r} (adapter) vs {ours.get(k)!r} (base)" for k in keys if theirs.get(k) != ours.get(k)]


def check(base: Path, adapter: Adapter, base_manifest: dict | None = None) -> None:
    """Refuse, saying what differs, an adapter that was not built for `base`: another base model or builder
    recipe (the fingerprints differ), or weights the base has no inputs for, or of other shapes."""
    base_manifest = base_manifest or read_base(base)
    ours, theirs = base_manifest["sha256"], adapter.manifest.get("base_sha256")
    if theirs != ours:
        what = _differences(adapter.manifest.get("base_recipe", {}), base_manifest.get("recipe", {}))
        targets = adapter.manifest.get("target_modules"), base_manifest.get("target_modules")
        if targets[0] != targets[1]:
            what.append(f"target modules: {targets[0]} (adapter) vs {targets[1]} (base)")
        detail = "; ".join(what) if what else "same recipe, other bytes (built by another version of the tools?)"
        raise AdapterMismatch(
            f"adapter {adapter.name!r} ({adapter.folder}) was built for another base: base sha256 "
            f"{str(theirs)[:12]} (adapter) vs {ours[:12]} ({base}); {detail}. Train it with the same model and "
            "builder settings, or load it on its own base"
        )
    inputs = base_manifest["inputs"]
    params = adapter_parameters(adapter.file)
    unknown = sorted(set(params) - set(inputs))
    if unknown:
        modules = sorted({lora_module(p) for p in unknown})
        raise AdapterMismatch(
            f"adapter {adapter.name!r} adapts {modules}, which this base has no adapter inputs for ({len(unknown)} "
            f"weights, e.g. {unknown[0]}); the base takes {sorted(base_manifest.get('target_modules', []))}: train "
            "with lora.target_modules within those"
        )
    for name, shape in params.items():
        expected = inputs[name]
        fixed_differ = any(isinstance(e, int) and e != s for e, s in zip(expected, shape, strict=False))
        if len(expected) != len(shape) or fixed_differ:
            raise AdapterMismatch(
                f"adapter {adapter.name!r}: {name} has shape {shape}; the base takes {expected} "
                "(a dimension named by a string is the rank, any size)"
            )


def gate_problem(adapter: Adapter) -> str | None:
    """Why the adapter may not ship (its model's parity-gate verdict), or None when it passed."""
    from slmkit.gate import HOW_ANYWAY, PASSED, describe

    record = adapter.manifest.get("gate")
    if not record:
        return f"adapter {adapter.name!r} ({adapter.folder}) carries no parity-gate verdict; {HOW_ANYWAY}"
    if record.get("verdict") != PASSED:
        return f"adapter {adapter.name!r} ({adapter.folder}): its model's parity gate {describe(record)}; {HOW_ANYWAY}"
    return None


def rank_free(graph_model) -> None:
    """Make a graph independent of the rank it was built with: ModelBuilder records the shape of each lora_A
    output, rank included, in the graph's value_info; Olive makes the weights' rank dynamic but leaves those.
    Each such rank becomes the weights' symbolic `lora_r`, so every rank's base is the same bytes."""
    for value in graph_model.graph.value_info:
        if "/lora_A/" in value.name and value.type.tensor_type.shape.dim:
            last = value.type.tensor_type.shape.dim[-1]
            if last.HasField("dim_value"):
                last.Clear()
                last.dim_param = RANK_DIM


def split(cfg, model: Path, base: Path, folder: Path) -> dict[str, Any]:
    """A built model whose LoRA weights are inputs with defaults (weights_as_inputs) -> `base`: the same graph
    with empty defaults (rank 0: the base model alone), its tokenizer and genai_config.json, BASE_MANIFEST; and
    `folder`/ADAPTER_FILE: the defaults' values in onnxruntime's adapter format. Returns the base manifest."""
    import shutil

    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    graph_model = onnx.load(str(Path(model) / "model.onnx"))
    shapes = lora_inputs(graph_model.graph)
    params = {}
    for tensor in graph_model.graph.initializer:
        if tensor.name in shapes:
            params[tensor.name] = numpy_helper.to_array(tensor)
            empty = [0 if isinstance(d, str) else d for d in shapes[tensor.name]]
            tensor.CopyFrom(numpy_helper.from_array(np.zeros(empty, dtype=params[tensor.name].dtype), tensor.name))
    if not params:
        raise AdapterMismatch(
            f"{model} has no LoRA weights as inputs: build with builder.adapter=separate (int8_cpu, int4_cpu)"
        )
    base.mkdir(parents=True)
    folder.mkdir(parents=True, exist_ok=True)
    save_graph(graph_model, base)
    for path in Path(model).iterdir():
        if path.is_file() and path.suffix not in GRAPH_SUFFIXES and path.name != "README.md":
            shutil.copy2(path, base / path.name)
    adapter = ort.AdapterFormat()
    adapter.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in sorted(params.items())})
    adapter.export_adapter(str(folder / ADAPTER_FILE))
    manifest = {
        "sha256": base_fingerprint(base),
        "recipe": base_recipe(cfg),
        "target_modules": sorted({lora_module(p) for p in params}),
        "inputs": shapes,
    }
    (base / BASE_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def _read_adapter(file: Path) -> dict:
    import onnxruntime as ort

    return ort.AdapterFormat.read_adapter(str(file)).get_parameters()


def is_lora_weight(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def save_graph(graph_model, folder: Path) -> None:
    """model.onnx with every tensor over 1 KiB in model.onnx.data (ModelBuilder's layout)."""
    import onnx

    onnx.save(
        graph_model,
        str(folder / "model.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="model.onnx.data",
        size_threshold=1024,
    )


def adapter_manifest(base_manifest: dict, rank: int, alpha: float, gate: dict | None) -> dict[str, Any]:
    """adapter.json: the base the adapter is tied to (fingerprint, recipe, targets), its rank and scale, and
    the parity gate's verdict on the model it was taken from (None: never judged)."""
    return {
        "exported": True,
        "base_sha256": base_manifest["sha256"],
        "base_recipe": base_manifest["recipe"],
        "target_modules": base_manifest["target_modules"],
        "rank": rank,
        "alpha": alpha,
        "weights": len(base_manifest["inputs"]),
        "gate": gate,
    }


def same_logits(model: Path, base: Path, adapter_file: Path, prompts: list[str]) -> float:
    """The largest difference between the built model's next-token logits after each prompt and those of
    the base running the adapter extracted from it (0 when the two compute the same)."""
    import numpy as np

    from slmkit.inference import GenaiModel

    built = GenaiModel(model)
    shared = GenaiModel(base).with_adapter(adapter_file, "check")
    worst = 0.0
    for prompt in prompts:
        ids = [built.encode(prompt)]
        a, b = np.asarray(built.first_logits(ids)), np.asarray(shared.first_logits(ids))
        worst = max(worst, float(np.abs(a - b).max()))
    return worst


def parse_spec(spec: str) -> tuple[str, str]:
    """`NAME=PATH` (a command-line --adapter value) -> (name, path)."""
    name, sep, path = spec.partition("=")
    if not sep or not name.strip() or not path.strip():
        raise ValueError(f"--adapter {spec!r}: give NAME=PATH (e.g. tones=artifacts/adapter/adapter)")
    return name.strip(), path.strip()
