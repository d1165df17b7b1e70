"""Stage `base`: build (tiny) or locate (hub/local) the base model and its tokenizer.

    python scripts/base.py       (reads params.yaml and artifacts/prepare/; writes artifacts/base/)

For model.source=tiny it trains a byte-level BPE tokenizer on the training split, builds a Phi-3
model and warms it up briefly on the training phrases, all from the seed. source=gguf converts a .gguf
checkpoint (model.path) into a Hugging Face folder with its tokenizer and chat template. source=random builds the
model of model.architecture (e.g. the real Phi-3-mini layout) with random weights and the same kind of
tokenizer. For hub models the weights stay in the Hugging Face cache at the pinned revision;
base.json points at them.
"""

from slmkit import gguf, hub, lineage, resources
from slmkit.config import load_params
from slmkit.data import read_split
from slmkit.files import atomic_dir, write_json
from slmkit.paths import stage_dir
from slmkit.prompt import build_training_text
from slmkit.stage import log, main


def run() -> None:
    cfg = load_params()
    prepared = stage_dir("prepare")
    resources.preflight("base", cfg, cfg.model.path)
    with atomic_dir(stage_dir("base")) as out:
        train = read_split(prepared / "train.jsonl")
        # The tokenizer sees the prompt scaffolding and labels too, so they become few tokens.
        texts = [build_training_text(cfg.data, e.text, e.label, "") for e in train]
        if cfg.model.source == "tiny":
            from slmkit.tiny import build_tiny_base

            info = build_tiny_base(cfg.model.tiny, texts, [e.text for e in train], cfg.seed, out / "model")
            log.info("tiny Phi-3: %d parameters, vocab %d", info["parameters"], info["vocab_size"])
            base = {
                "source": "tiny",
                "model_path": str(stage_dir("base") / "model"),
                "parameters": info["parameters"],
                "vocab_size": info["vocab_size"],
                "warmup_final_loss": round(info["warmup_loss"][-1], 4),
            }
        elif cfg.model.source == "random":
            from slmkit.arch import build_random
            from slmkit.tiny import seed_everything, train_tokenizer

            seed_everything(cfg.seed)
            tokenizer = train_tokenizer(texts, min(cfg.model.architecture["vocab_size"], 4000))
            n_params = build_random(cfg.model, tokenizer, cfg.seed, out / "model")
            log.info("%s layout with random weights: %d parameters", cfg.model.name, n_params)
            base = {"source": "random", "model_path": str(stage_dir("base") / "model"), "parameters": n_params}
        elif cfg.model.source == "gguf":
            facts = gguf.convert(cfg.model.path, out / "model")
            log.info("%s: %d parameters, vocab %d", cfg.model.path, facts["parameters"], facts["vocab_size"])
            base = {"source": "gguf", "model_path": str(stage_dir("base") / "model"), **facts}
        else:
            path = hub.model_path(cfg.model)
            base = {
                "source": cfg.model.source,
                "model_path": str(path),
                "hub_id": cfg.model.hub_id,
                "revision": cfg.model.revision,
            }
        write_json(out / "base.json", base)
        inputs = {base["gguf_file"]: base["gguf_sha256"]} if "gguf_sha256" in base else None
        lineage.write(out, "base", cfg, ("seed", "model", "data"), inputs=inputs)


if __name__ == "__main__":
    main("base", run)
