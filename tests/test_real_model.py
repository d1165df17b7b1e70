"""Slow tier: the real pretrained default (SmolLM2-135M from its GGUF file) through the whole pipeline.

The GGUF source ends in the same kind of Hugging Face folder a hub snapshot is (pretrained tokenizer, chat
template, real module names), so this is also the path `model=phi3_mini_4k` takes after its download.
Few training steps: the test checks real-tokenizer behaviour and the gates, not the headline accuracy.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from workspace import copy_repo, make

from slmkit import inference
from slmkit.config import compose, load_params
from slmkit.data import read_split, sha256_file
from slmkit.gguf import resolve
from slmkit.paths import onnx_metrics_key
from slmkit.prompt import build_prompt, stop_marker

pytestmark = pytest.mark.slow


BUILT = onnx_metrics_key(compose().builder.precision)  # the default builder's model: int4_onnx


# The shipped default, exactly as `make finetune` runs it (data=tones, 120 steps, builder=int4_grid_cpu): the
# parity gate and the aims are checked on the recipe users get. A 30-step adapter was tried here
# first (then with int4): 0.5608 vs merged 0.6455 (8.5 points) with the chat template, so the gate only
# holds for a trained adapter; the chat template's tokens are checked below without a run.
@pytest.fixture(scope="module")
def real(tmp_path_factory) -> Path:
    ws = copy_repo(tmp_path_factory.mktemp("real"), tiny=False)
    result = make("finetune", ws)
    (ws / "finetune.log").write_text(result.stdout + result.stderr)
    return ws


def test_base_is_the_converted_gguf_with_its_hash(real: Path):
    cfg = load_params(real / "params.yaml")
    assert cfg.model.name == "smollm2_135m" and cfg.model.source == "gguf"
    base = json.loads((real / "artifacts/base/base.json").read_text())
    assert base["gguf_sha256"] == sha256_file(resolve(cfg.model.path))
    lineage = json.loads((real / "artifacts/base/lineage.json").read_text())
    assert lineage["inputs_sha256"] == {base["gguf_file"]: base["gguf_sha256"]}
    assert "requirements/models.txt" in lineage["lock_sha256"]
    card = (real / "artifacts/quantize/model/README.md").read_text()
    assert base["gguf_file"] in card and base["gguf_sha256"][:12] in card
    assert base["parameters"] == cfg.model.architecture["num_parameters"]
    folder = real / "artifacts/base/model"
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()


def test_genai_and_hugging_face_tokenize_every_test_prompt_alike(real: Path):
    from transformers import AutoTokenizer

    test = read_split(real / "artifacts/prepare/test.jsonl")
    genai = inference.GenaiModel(real / "artifacts/quantize/model")
    hf = AutoTokenizer.from_pretrained(real / "artifacts/merge/model")
    for data in (load_params(real / "params.yaml").data, compose(["data=tones_chat"]).data):
        prompts = [build_prompt(data, e.text) for e in test]
        assert [genai.encode(p) for p in prompts] == [hf(p, add_special_tokens=False)["input_ids"] for p in prompts]
    # No BOS surprise: neither side adds a token the text did not have (the chat turn starts <|im_start|>).
    assert genai.encode(prompts[0])[0] == hf.convert_tokens_to_ids("<|im_start|>")
    assert genai.encode("### Text: x")[0] != hf.bos_token_id


def test_label_tokens_and_the_stop_marker_come_from_the_models_template(real: Path):
    from transformers import AutoTokenizer

    cfg = compose(["data=tones_chat"])  # the model's own template
    hf = AutoTokenizer.from_pretrained(real / "artifacts/merge/model")
    genai = inference.GenaiModel(real / "artifacts/quantize/model")
    assert stop_marker(cfg.data) == "<|im_end|>"
    prompt = build_prompt(cfg.data, "The lights went out and something breathed behind me.")
    encode = lambda text: hf(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    candidates, end_id = inference.label_token_ids(encode, cfg.data, prompt, hf.eos_token_id)
    assert (candidates, end_id) == inference.label_token_ids(genai.encode, cfg.data, prompt, genai.eos_id)
    # The label ends with the template's <|im_end|>: one special token, the model's own end of turn.
    assert end_id == hf.convert_tokens_to_ids("<|im_end|>") == hf.eos_token_id == genai.eos_id
    assert [hf.decode(c) for c in candidates] == list(cfg.data.labels)
    # Constrained decoding needs one forward pass when first tokens differ: they do for these labels.
    assert len({c[0] for c in candidates}) == len(candidates)


def test_parity_gate_and_the_bar(real: Path):
    metrics = json.loads((real / "metrics/eval.json").read_text())
    tolerance = load_params(real / "params.yaml").evaluate.parity_tolerance
    assert tolerance == 0.02
    built = metrics[BUILT]["accuracy"]
    assert built >= metrics["merged_pytorch"]["accuracy"] - tolerance
    # The aims for the default: >= 0.85, 10 points above bag-of-words, every output a label.
    assert built >= 0.85 and built >= metrics["bag_of_words"]["accuracy"] + 0.10
    verdict = json.loads((real / "artifacts/evaluate/gate.json").read_text())
    assert verdict["verdict"] == "passed" and verdict["accuracy"] == built, verdict
    assert "Test accuracy" in (real / "finetune.log").read_text()


def test_stop_decoding_writes_the_label_then_the_end_of_turn(real: Path):
    clf = inference.load(real / "artifacts/quantize/model")
    phrases = ["I can't stop smiling today!", "Nobody came to the funeral."]
    preds = clf.classify(phrases, decoding="stop")
    assert all(p.label in clf.data.labels for p in preds), preds


def test_a_copy_in_another_folder_reproduces_the_committed_data_and_base(real: Path):
    """The committed dvc.lock's prepare and base outputs, byte for byte, from a copy in a temporary folder.

    These two stages do no floating-point training: any machine reproduces them. The stages after them
    reproduce the committed hashes on a machine of the same CPU kind and thread count (the two-folder
    rebuild in tests/test_versioning.py checks that on whatever machine runs the tests)."""
    import yaml
    from workspace import REPO_ROOT

    committed = yaml.safe_load((REPO_ROOT / "dvc.lock").read_text())["stages"]
    ran = yaml.safe_load((real / "dvc.lock").read_text())["stages"]
    for stage in ("prepare", "base"):
        assert ran[stage]["outs"] == committed[stage]["outs"], stage
    assert (real / "params.yaml").read_text() == (REPO_ROOT / "params.yaml").read_text()


def test_the_served_adapter_on_the_shared_base_labels_every_test_phrase_as_the_built_model(real: Path):
    """The adapter stage's base + adapter, through `slmkit serve`'s app (the request's model picks it), give
    the label the built model gives to every test phrase; the base alone (no adapter) is another model."""
    from test_serve import call

    from slmkit.adapters import read_base
    from slmkit.serve import Server, ServeSettings, create_app

    adapter = real / "artifacts/adapter/adapter"
    manifest = json.loads((adapter / "adapter.json").read_text())
    assert manifest["gate"]["verdict"] == "passed" and manifest["rank"] == 16
    assert manifest["base_sha256"] == read_base(real / "artifacts/adapter/base")["sha256"]
    texts = [e.text for e in read_split(real / "artifacts/prepare/test.jsonl")]
    expected = [p.label for p in inference.load(real / "artifacts/quantize/model").classify(texts)]
    served = inference.load(real / "artifacts/adapter/base", adapters={"tones": adapter})
    with Server(create_app(served, ServeSettings(max_wait_ms=20))) as server:
        labels = []
        for start in range(0, len(texts), 64):
            body = json.dumps({"model": "tones", "phrases": texts[start : start + 64]}).encode()
            status, answer = call(server.url, "/classify", body)
            assert status == 200, answer
            labels += [row["label"] for row in answer["results"]]
    assert labels == expected
