"""Stage `merge`: fold the LoRA adapter into the base model with Olive's MergeAdapterWeights.

python scripts/merge.py      (reads params.yaml, artifacts/base/, artifacts/train/; writes artifacts/merge/)
"""

import shutil

from slmkit import lineage, olive_config, olive_run, resources
from slmkit.config import load_params
from slmkit.files import atomic_dir, read_json
from slmkit.inference import save_prompt_config
from slmkit.paths import stage_dir
from slmkit.stage import main


def run() -> None:
    cfg = load_params()
    base_path = read_json(stage_dir("base") / "base.json")["model_path"]
    resources.preflight("merge", cfg, base_path)
    work = olive_run.scratch("merge")
    workflow = olive_config.merge_workflow(cfg, base_path, stage_dir("train") / "adapter", work)
    output = olive_run.run_workflow(workflow, work, "adapter merge")
    model = output / "model"
    olive_run.require([model / "config.json", model / "tokenizer_config.json"], "adapter merge", work / "olive.log")
    if not any(model.glob("*.safetensors")):
        olive_run.require([model / "model.safetensors"], "adapter merge", work / "olive.log")
    olive_run.check_merged(model, work / "olive.log")

    with atomic_dir(stage_dir("merge")) as out:
        shutil.copytree(model, out / "model")
        save_prompt_config(cfg.data, out / "model")
        olive_run.keep_record(work, out, "merge")
        lineage.write(out, "merge", cfg, ("seed", "data", "model", "lora", "train"))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main("merge", run)
