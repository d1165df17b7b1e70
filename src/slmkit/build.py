"""The quantize stage's model build, shared with `make bench-formats`: Olive's ModelBuilder (+ int8), checked.

One function so that what the bench measures is what the stage ships: the same Olive config, the same int8
step (slmkit.int8) and the same checks of what the tools wrote (they can exit 0 having ignored an option).
"""

from __future__ import annotations

from pathlib import Path

from slmkit import adapters, int4, int8, olive_config, olive_run
from slmkit.config import Config


def build_onnx(cfg: Config, work: Path, base_path: str | Path, adapter: Path | None, merged: Path) -> Path:
    """Build cfg.builder's ONNX model in `work`; return the folder (Olive's output, checked).

    builder.adapter=separate builds from `base_path` + `adapter` (the LoRA branches beside the base, in full
    precision, their weights graph inputs that default to the run's: slmkit.adapters); merged builds from
    `merged`."""
    log_path = work / "olive.log"
    b = cfg.builder
    if b.adapter == "separate":
        if adapter is None:
            raise ValueError("builder.adapter=separate needs the adapter")
        workflow = olive_config.quantize_workflow(cfg, base_path, work, adapter)
    else:
        workflow = olive_config.quantize_workflow(cfg, merged, work)
    output = olive_run.run_workflow(workflow, work, f"ModelBuilder {b.precision}")
    olive_run.require(
        [output / "model.onnx", output / "genai_config.json", output / "tokenizer.json"],
        f"ModelBuilder {b.precision}",
        log_path,
    )
    olive_run.check_logits(output, b.prune_lm_head, log_path)
    if b.precision == "int8":
        int8.check_int8(output, int8.quantize(output, list(b.exclude), work), log_path)
    elif olive_config.kit_quantized(b):  # int4 by the kit's own algorithm (slmkit.int4)
        report = int4.quantize(output, list(b.exclude), b.int4_block_size, b.int4_accuracy_level)
        int4.check_int4(output, report["nodes"], log_path)
    if b.exclude:
        olive_run.check_excluded(output, list(b.exclude), log_path)
    if b.adapter == "separate" and adapter is not None:
        matrices = olive_run.lora_matrices(adapter, log_path)
        olive_run.check_lora_branches(output, branch_count(matrices), log_path)
        # The LoRA weights as inputs defaulting to this run's: the adapter stage's shared base + adapter
        # then computes exactly this model (slmkit.adapters.weights_as_inputs says why it matters).
        output = weights_as_inputs(cfg, output, work / "adapter_inputs")
    return output


def branch_count(matrices: list[str]) -> int:
    """LoRA-branch MatMuls ModelBuilder makes for the adapter's LoRA matrices: one per matrix, and one per
    part for a packed projection (Phi-3's qkv_proj and gate_up_proj, split into q/k/v and gate/up)."""
    return sum(len(olive_config.PACKED_PARTS.get(m, (m,))) for m in map(adapters.lora_module, matrices))


def weights_as_inputs(cfg: Config, model: Path, work: Path) -> Path:
    """The built `model` (LoRA branches apart) with its LoRA weights as graph inputs that default to those
    weights: Olive's ExtractAdapters makes the inputs (and the rank a dynamic dimension), then the defaults are
    set to this run's weights. Returns the folder (work/output), the rest of `model`'s files copied in.

    Why not keep them constant: onnxruntime computes a MatMul with a constant weight on another path than one
    whose weight is an input, and the int8 build's per-tensor activation quantization turns that rounding into
    label changes (measured: logits up to 3.1 apart, 2 of 189 test labels). Built this way, the shipped model
    and the shared base running its adapter (slmkit.adapters.split) compute the same thing exactly."""
    import shutil

    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    log_path = work / "olive.log"
    output = olive_run.run_workflow(olive_config.extract_adapters_workflow(cfg, model, work), work, "ExtractAdapters")
    weights = output / "adapter_weights.onnx_adapter"
    olive_run.require([output / "model.onnx", weights], "ExtractAdapters", log_path)
    read = ort.AdapterFormat.read_adapter(str(weights))
    # Copies: an OrtValue's numpy() is a view of memory its adapter object owns and frees.
    params = {name: np.array(value.numpy(), copy=True) for name, value in read.get_parameters().items()}
    del read
    graph_model = onnx.load(str(output / "model.onnx"))
    defaults = {t.name for t in graph_model.graph.initializer}
    inputs = adapters.lora_inputs(graph_model.graph)
    if not inputs or set(params) != set(inputs) or not set(inputs) <= defaults:
        raise olive_run.StageError(
            f"Olive ExtractAdapters made {len(inputs)} adapter inputs of {model} and wrote {len(params)} weights; "
            f"they must be the same, each with a default, and more than none (full log: {log_path})"
        )
    for tensor in graph_model.graph.initializer:
        if tensor.name in params:
            tensor.CopyFrom(numpy_helper.from_array(params[tensor.name], tensor.name))
    adapters.rank_free(graph_model)
    weights.unlink()
    for path in output.iterdir():
        if path.suffix in adapters.GRAPH_SUFFIXES:
            path.unlink()
    adapters.save_graph(graph_model, output)
    for path in Path(model).iterdir():
        if path.is_file() and path.suffix not in adapters.GRAPH_SUFFIXES:
            shutil.copy2(path, output / path.name)
    return output
