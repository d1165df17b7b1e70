"""Stage `prepare`: validate the data, drop exact repeats, split train/val/test, write a manifest.

python scripts/prepare.py        (reads params.yaml; writes artifacts/prepare/)
"""

from slmkit import lineage
from slmkit.config import is_generative, load_params
from slmkit.data import SPLITS, DataError, label_counts, read_examples, sha256_file, split_examples, write_split
from slmkit.files import atomic_dir, write_json
from slmkit.paths import stage_dir
from slmkit.stage import log, main


def run() -> None:
    cfg = load_params()
    examples, repeats = read_examples(cfg.data.path, cfg.data)
    truncated = sum(e.truncated for e in examples)
    if repeats:
        log.warning("dropped %d exact repeat(s) of a phrase before splitting", repeats)
    if truncated:
        log.warning("truncated %d phrase(s) to data.max_chars=%d characters", truncated, cfg.data.max_chars)
    try:
        splits = split_examples(examples, cfg.data, cfg.seed)
    except DataError as err:
        raise DataError(f"{cfg.data.path}: {err}") from None
    with atomic_dir(stage_dir("prepare")) as out:
        manifest = {
            "source": {"path": cfg.data.path, "sha256": sha256_file(cfg.data.path)},
            "examples": len(examples),
            "repeats_dropped": repeats,
            "truncated": truncated,
            "splits": {},
        }
        for name in SPLITS:
            path = out / f"{name}.jsonl"
            write_split(path, splits[name], chat=cfg.data.format == "chat")
            manifest["splits"][name] = {
                "file": path.name,
                "sha256": sha256_file(path),
                "count": len(splits[name]),
            }
            if not is_generative(cfg.data):  # answers are free text: nothing to count
                manifest["splits"][name]["labels"] = label_counts(splits[name])
        write_json(out / "manifest.json", manifest)
        lineage.write(out, "prepare", cfg, ("seed", "data"), manifest)
    log.info(
        "%d examples (%d repeats dropped, %d truncated): %s",
        len(examples),
        repeats,
        truncated,
        ", ".join(f"{n} {len(splits[n])}" for n in SPLITS),
    )


if __name__ == "__main__":
    main("prepare", run)
