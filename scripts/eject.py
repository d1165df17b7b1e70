"""Eject: write the pipeline's model path as one Olive config that `olive run` runs alone.

    python scripts/eject.py [OUT_DIR]          (make olive-config; needs `make base` done; OUT_DIR=olive-config)

Writes OUT_DIR/olive_config.json (LoRA/QLoRA/DoRA -> MergeAdapterWeights -> ModelBuilder, the same
passes, data configs and training arguments as the train, merge and quantize stages), the package config
that registers slmkit's LoRA passes (slmkit.olive_passes) and the rendered training data. Then, from the
repo root:  olive run --config OUT_DIR/olive_config.json --package-config OUT_DIR/olive_package_config.json
"""

import json
import sys
from pathlib import Path

from slmkit import olive_config, olive_passes
from slmkit.config import load_params
from slmkit.data import read_split
from slmkit.files import read_json, write_text
from slmkit.paths import stage_dir
from slmkit.stage import StageError, log, main


def run() -> None:
    from transformers import AutoTokenizer

    out = Path(sys.argv[1] if len(sys.argv) > 1 else "olive-config")
    cfg = load_params()
    base_json = stage_dir("base") / "base.json"
    if not base_json.exists():
        raise StageError(f"{base_json} not found: run `make base` first (the ejected config starts from it)")
    base_path = read_json(base_json)["model_path"]
    eos = AutoTokenizer.from_pretrained(base_path, trust_remote_code=cfg.model.trust_remote_code).eos_token
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        olive_config.render_split(
            cfg.data, read_split(stage_dir("prepare") / f"{split}.jsonl"), eos, out / f"{split}_text.jsonl"
        )
    workflow = olive_config.single_workflow(cfg, base_path, out / "train_text.jsonl", out / "val_text.jsonl", out)
    write_text(out / "olive_config.json", json.dumps(workflow, indent=2) + "\n")
    package = olive_passes.write_package_config(out)
    log.info(
        "wrote %s: run it with `olive run --config %s --package-config %s`",
        out / "olive_config.json",
        out / "olive_config.json",
        package,
    )


if __name__ == "__main__":
    main("eject", run)
