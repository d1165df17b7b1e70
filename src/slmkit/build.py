"""The quantize stage's model build, shared with `make bench-formats`: Olive's ModelBuilder (+ int8), checked.

One function so that what the bench measures is what the stage ships: the same Olive config, the same int8
step (slmkit.int8) and the same checks of what the tools wrote (they can exit 0 having ignored an option).
"""

from __future__ import annotations

from pathlib import Path

from slmkit import int8, olive_config, olive_run
from slmkit.config import Config


def build_onnx(cfg: Config, work: Path, base_path: str | Path, adapter: Path | None, merged: Path) -> Path:
    """Build cfg.builder's ONNX model in `work`; return the folder (Olive's output, checked).

    builder.adapter=separate builds from `base_path` + `adapter` (the LoRA branches beside the base, in full
    precision); merged builds from `merged`."""
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
    if b.exclude:
        olive_run.check_excluded(output, list(b.exclude), log_path)
    if b.adapter == "separate" and adapter is not None:
        names = olive_run.tensor_names([adapter / "adapter_model.safetensors"], "LoRA training", log_path)
        matrices = [n for n in names if "lora_A" in n or "lora_B" in n]
        olive_run.check_lora_branches(output, branch_count(matrices), log_path)
    return output


def branch_count(matrices: list[str]) -> int:
    """LoRA-branch MatMuls ModelBuilder makes for the adapter's LoRA matrices: one per matrix, and one per
    part for a packed projection (Phi-3's qkv_proj and gate_up_proj, split into q/k/v and gate/up)."""
    count = 0
    for name in matrices:
        module = name.split(".lora_", 1)[0].rsplit(".", 1)[-1]
        count += len(olive_config.PACKED_PARTS.get(module, (module,)))
    return count
