"""Stage `quantize`: build the ONNX model for onnxruntime-genai with Olive's ModelBuilder (slmkit.build).

    python scripts/quantize.py   (reads params.yaml, artifacts/merge/ or, with builder.adapter=separate,
                                  artifacts/base/ + artifacts/train/; writes artifacts/quantize/)

artifacts/quantize/model/ runs with onnxruntime-genai alone: model.onnx(+.data), genai_config.json,
tokenizer files, slmkit_prompt.json (the prompt the model was trained with) and README.md (model card).
"""

import csv
import shutil

from slmkit import lineage, olive_run, resources
from slmkit.build import build_onnx
from slmkit.config import load_params
from slmkit.files import atomic_dir, read_json
from slmkit.inference import GenaiModel, save_prompt_config
from slmkit.paths import TRAIN_LOSS_CSV, stage_dir
from slmkit.stage import StageError, log, main

# Olive's bookkeeping, not part of the model folder.
OLIVE_FILES = ("footprint.json", "output_footprint.json", "model_config.json", "run_history.txt")


def run() -> None:
    cfg = load_params()
    resources.preflight("quantize", cfg, stage_dir("merge") / "model")
    work = olive_run.scratch("quantize")
    base_path = read_json(stage_dir("base") / "base.json")["model_path"]
    output = build_onnx(cfg, work, base_path, stage_dir("train") / "adapter", stage_dir("merge") / "model")
    with atomic_dir(stage_dir("quantize")) as out:
        model = out / "model"
        shutil.copytree(output, model, ignore=shutil.ignore_patterns(*OLIVE_FILES))
        save_prompt_config(cfg.data, model)
        if cfg.builder.execution_provider == "cpu":
            # Check before accepting: the folder must load and generate with onnxruntime-genai.
            try:
                GenaiModel(model).generate("check", max_new_tokens=2)
            except Exception as err:
                raise StageError(f"the built model does not run with onnxruntime-genai: {err}") from err
        olive_run.keep_record(work, out, "quantize")
        manifest = read_json(stage_dir("prepare") / "manifest.json")
        sections = ("seed", "data", "model", "lora", "train", "builder")
        record = lineage.write(out, "quantize", cfg, sections, manifest)
        with open(TRAIN_LOSS_CSV, encoding="utf-8") as f:
            last = [row for row in csv.DictReader(f) if row["loss"]][-1]
        card = lineage.model_card(cfg, read_json(stage_dir("base") / "base.json"), manifest, last, record)
        (model / "README.md").write_text(card, encoding="utf-8")
    size = sum(p.stat().st_size for p in (stage_dir("quantize") / "model").iterdir())
    log.info("%s model: %.1f MB in %s", cfg.builder.precision, size / 1e6, stage_dir("quantize") / "model")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main("quantize", run)
