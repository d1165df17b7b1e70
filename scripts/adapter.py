"""Stage `adapter`: the run's LoRA adapter as a file onnxruntime-genai loads at run time on a shared base.

    python scripts/adapter.py   (reads params.yaml, artifacts/quantize/model/, artifacts/evaluate/gate.json;
                                 writes artifacts/adapter/base/ and artifacts/adapter/adapter/)

The quantize stage built the model with its LoRA weights as graph inputs that default to the run's weights
(Olive's ExtractAdapters pass; slmkit.adapters says why). This stage takes them apart:
- base/: the built model with the LoRA weights as optional inputs (without them it is the base model alone),
  its tokenizer and genai_config.json, and slmkit_base.json (its fingerprint, the recipe it follows from and
  the adapter inputs it takes). Every run of the same base model and builder recipe writes the same bytes.
- adapter/: adapter.onnx_adapter (the weights), adapter.json (the base it is tied to, rank, targets, and the
  parity gate's verdict on the model it came from), slmkit_prompt.json (the prompt it was trained with) and
  the PEFT adapter it came from (adapter_config.json, adapter_model.safetensors) for a PyTorch base.
Before writing, the stage checks that the base with the adapter gives the built model's logits.
With builder.adapter=merged the adapter is part of the model's weights: adapter/adapter.json says so.
"""

import shutil

from slmkit import adapters, gate, lineage, olive_run
from slmkit.build import branch_count
from slmkit.config import load_params
from slmkit.data import read_split
from slmkit.files import atomic_dir, read_json, write_json
from slmkit.inference import save_prompt_config
from slmkit.paths import stage_dir
from slmkit.prompt import build_prompt
from slmkit.stage import StageError, log, main

# The base + adapter must give the built model's next-token logits on these test prompts, this close.
CHECK_PROMPTS = 4
CHECK_TOLERANCE = 1e-5  # the same graph and weights: the same numbers
SECTIONS = ("seed", "data", "model", "lora", "train", "builder")


def verdict(model) -> dict | None:
    """The parity gate's record on exactly this built model, or None (not judged, or judged another build)."""
    file = stage_dir("evaluate") / gate.GATE_FILE
    if not file.exists():
        return None
    record = read_json(file)
    return record if record.get("model_sha256") == gate.fingerprint(model) else None


def run() -> None:
    cfg = load_params()
    model = stage_dir("quantize") / "model"
    if cfg.builder.adapter != "separate":
        reason = (
            "builder.adapter=merged built the adapter into the model's weights: there is no adapter to load "
            "at run time; build with builder.adapter=separate (builder=int8_cpu or int4_cpu do)"
        )
        with atomic_dir(stage_dir("adapter")) as out:
            write_json(out / "adapter" / adapters.MANIFEST, {"exported": False, "reason": reason})
            lineage.write(out, "adapter", cfg, SECTIONS)
        log.info("no adapter exported: %s", reason)
        return
    trained = stage_dir("train") / "adapter"
    with atomic_dir(stage_dir("adapter")) as out:
        base, folder = out / "base", out / "adapter"
        base_manifest = adapters.split(cfg, model, base, folder)
        expected = branch_count(olive_run.lora_matrices(trained, stage_dir("quantize") / "olive.log"))
        if len(base_manifest["inputs"]) != expected:
            raise StageError(
                f"{model} takes {len(base_manifest['inputs'])} LoRA weights as inputs; the trained adapter makes "
                f"{expected} LoRA branches: rebuild it (`make quantize`)"
            )
        # The PEFT adapter too: the same folder runs on a PyTorch base (slmkit.load(base, adapters=...)).
        for name in adapters.PEFT_FILES:
            shutil.copy2(trained / name, folder / name)
        record = verdict(model)
        manifest = adapters.adapter_manifest(base_manifest, cfg.lora.r, cfg.lora.alpha, record)
        write_json(folder / adapters.MANIFEST, manifest)
        save_prompt_config(cfg.data, folder)
        if cfg.builder.execution_provider == "cpu":
            test = read_split(stage_dir("prepare") / "test.jsonl")[:CHECK_PROMPTS]
            prompts = [build_prompt(cfg.data, ex.text) for ex in test]
            worst = adapters.same_logits(model, base, folder / adapters.ADAPTER_FILE, prompts)
            if worst > CHECK_TOLERANCE:
                raise StageError(
                    f"the base with the extracted adapter does not compute the built model: next-token logits "
                    f"differ by up to {worst:.3g} (tolerance {CHECK_TOLERANCE}); rebuild it (`make quantize`)"
                )
            log.info("base + adapter = the built model (logits within %.2g on %d test prompts)", worst, len(prompts))
        lineage.write(out, "adapter", cfg, SECTIONS)
    size = (stage_dir("adapter") / "adapter" / adapters.ADAPTER_FILE).stat().st_size
    log.info(
        "adapter: %d weights (rank %d; %s), %.1f MB, for base %s; parity gate: %s",
        expected,
        cfg.lora.r,
        ", ".join(base_manifest["target_modules"]),
        size / 1e6,
        base_manifest["sha256"][:12],
        record["verdict"] if record else "not judged",
    )


if __name__ == "__main__":
    main("adapter", run)
