"""Compose conf/ with Hydra overrides, validate it, and write params.yaml (what DVC tracks).

python scripts/compose.py [override ...]      e.g.  lora.r=8 data.path=/data/other.jsonl
python scripts/compose.py --check             exit 1 if params.yaml is not what conf/ composes to
python scripts/compose.py --dry-run [override ...]   print the config and the stages it would rerun (make config)
"""

import sys
from pathlib import Path

from slmkit import arch
from slmkit.config import ConfigError, compose, to_yaml
from slmkit.files import write_text

PARAMS = Path("params.yaml")
# This checkout's conf/ (beside this script), not the conf/ of wherever the slmkit package is installed
# from: a copy of the repo (a test workspace, a sweep job) composes its own configs.
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def main(argv: list[str]) -> int:
    check, dry_run = "--check" in argv, "--dry-run" in argv
    overrides = [a for a in argv if a not in ("--check", "--dry-run")]
    try:
        cfg = compose(overrides, conf_dir=CONF_DIR)
        arch.check(cfg)  # LoRA targets exist in the model (built on the meta device, no weights)
        text = to_yaml(cfg)
    except ConfigError as err:
        print(f"slmkit params: error: {err}", file=sys.stderr)
        return 1
    if dry_run:
        from slmkit.plan import stages_to_rerun

        print(text)
        rerun = stages_to_rerun(cfg)
        print("stages `make finetune" + (f' ARGS="{" ".join(overrides)}"' if overrides else "") + "` would run:")
        for stage, reasons in rerun.items():
            print(f"  {stage:<9} {'; '.join(reasons)}")
        if not rerun:
            print("  none: every stage is up to date with this config")
        if cfg.train.nproc_per_node > 1:
            from slmkit.distributed import launch_command
            from slmkit.olive_run import scratch_dir

            cmd = launch_command(cfg.train.nproc_per_node, scratch_dir("train") / "olive_config.json")
            print(f"train runs {cfg.train.nproc_per_node} data-parallel processes:\n  {' '.join(cmd)}")
        return 0
    if check:
        if not PARAMS.exists() or PARAMS.read_text(encoding="utf-8") != text:
            print(f"{PARAMS} is stale: run `make params` and commit it", file=sys.stderr)
            return 1
        return 0
    if PARAMS.exists() and PARAMS.read_text(encoding="utf-8") == text:
        print(f"{PARAMS}: unchanged")
        return 0
    write_text(PARAMS, text)
    print(f"{PARAMS}: written" + (f" with overrides {' '.join(overrides)}" if overrides else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
