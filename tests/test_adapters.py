"""LoRA adapters at run time on a shared base (slmkit.adapters): export with Olive's ExtractAdapters, load with
onnxruntime-genai (and PEFT), mismatches refused, several served by one process. Tiny Phi-3 models here; the
slow tier runs the pipeline's own adapter stage (tests/test_pipeline.py)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import PHRASES, TINY_SERVING

from slmkit import adapters
from slmkit.adapters import AdapterMismatch
from slmkit.build import weights_as_inputs
from slmkit.gate import NotShipped
from slmkit.inference import GenaiModel, load, save_prompt_config

TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
PASSED = {"verdict": "passed", "metric": "accuracy", "model": "fp32_onnx", "accuracy": 0.9, "reference": "merged"}


def _peft(base_hf: Path, out: Path, r: int, seed: int, targets: list[str]) -> Path:
    """A PEFT LoRA adapter on the tiny base with random (non-zero) B matrices: it changes the outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_hf)
    peft = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets))
    for name, weight in peft.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(weight, std=0.05)
    peft.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def kit(tmp_path_factory, tiny_tokenizer, _composed) -> dict[str, Path]:
    """Tiny base models and adapters, each adapter built as its own model (ModelBuilder fp32, LoRA apart, as
    builder.adapter=separate does) and exported: {name: adapter folder}, "base" (of a and b), "base_o" (of the
    o_proj-only adapter), "other_base" (of an adapter of another base model), "<name>_model" (dedicated)."""
    from onnxruntime_genai.models.builder import create_model

    from slmkit.tiny import build_model, seed_everything

    root = tmp_path_factory.mktemp("adapters")
    out: dict[str, Path] = {}
    hf = {}
    for base_name, seed in (("main", 0), ("other", 1)):
        seed_everything(seed)
        model = build_model(TINY_SERVING, len(tiny_tokenizer), tiny_tokenizer.eos_token_id)
        hf[base_name] = root / f"hf_{base_name}"
        model.save_pretrained(hf[base_name])
        tiny_tokenizer.save_pretrained(hf[base_name])
    specs = {
        "a": ("main", 4, 1, TARGETS),
        "b": ("main", 2, 2, TARGETS),
        "o": ("main", 4, 3, ["o_proj"]),
        "x": ("other", 4, 4, TARGETS),
    }
    bases = {"a": "base", "b": "base_b", "o": "base_o", "x": "other_base"}
    for name, (base_name, r, seed, targets) in specs.items():
        peft = _peft(hf[base_name], root / f"peft_{name}", r, seed, targets)
        plain = root / f"{name}_plain"
        create_model("", str(hf[base_name]), str(plain), "fp32", "cpu", str(root / "cache"), prune_lm_head=True,
                     adapter_path=str(peft))  # fmt: skip
        save_prompt_config(_composed.data, plain)
        built = weights_as_inputs(_composed, plain, root / f"work_{name}")  # as build_onnx does
        folder = root / f"adapter_{name}"
        manifest = adapters.split(_composed, built, root / bases[name], folder)
        (folder / adapters.MANIFEST).write_text(json.dumps(adapters.adapter_manifest(manifest, r, 2 * r, PASSED)))
        save_prompt_config(_composed.data, folder)
        for file in adapters.PEFT_FILES:
            shutil.copy2(peft / file, folder / file)
        out[name], out[f"{name}_model"] = folder, built
        out[bases[name]] = root / bases[name]
    out["hf"] = hf["main"]
    return out


def test_every_rank_of_one_base_model_and_recipe_gets_the_same_base(kit):
    """r=4 and r=2 adapters: ModelBuilder folds the scale into lora_B, Olive makes the rank dynamic and the
    kit drops the rank from the graph's recorded shapes, so their bases are the same bytes."""
    assert adapters.base_fingerprint(kit["base"]) == adapters.base_fingerprint(kit["base_b"])
    assert adapters.base_fingerprint(kit["base"]) != adapters.base_fingerprint(kit["base_o"])
    inputs = adapters.read_base(kit["base"])["inputs"]
    assert all(adapters.RANK_DIM in shape for shape in inputs.values())


def test_the_built_model_with_weights_as_inputs_computes_what_it_did_with_them_constant(kit):
    """weights_as_inputs changes how onnxruntime holds the LoRA weights, not what the model computes."""
    prompts = [PHRASES[1], PHRASES[2]]
    built, plain = GenaiModel(kit["a_model"]), GenaiModel(kit["a_model"].parent.parent / "a_plain")
    for prompt in prompts:
        ids = [built.encode(prompt)]
        assert np.abs(np.asarray(built.first_logits(ids)) - np.asarray(plain.first_logits(ids))).max() < 1e-4
    assert adapters.graph_inputs(kit["a_model"] / "model.onnx")  # the weights are inputs


def test_an_adapter_on_the_shared_base_computes_its_own_model(kit):
    prompts = ["### Text: I can't stop smiling today.\n### The tone is:\n", PHRASES[2]]
    for name in ("a", "b"):
        file = kit[name] / adapters.ADAPTER_FILE
        assert adapters.same_logits(kit[f"{name}_model"], kit["base"], file, prompts) == 0.0
    # and the adapter matters: without it the base computes something else
    ids = [GenaiModel(kit["base"]).encode(prompts[0])]
    alone = np.asarray(GenaiModel(kit["base"]).first_logits(ids))
    built = np.asarray(GenaiModel(kit["a_model"]).first_logits(ids))
    assert np.abs(alone - built).max() > 1e-2


def test_load_with_adapters_runs_each_on_one_model_in_memory(kit):
    served = load(kit["base"], adapters={"a": kit["a"], "b": kit["b"] / adapters.ADAPTER_FILE})
    assert list(served) == ["a", "b"]
    assert served["a"].model.model is served["b"].model.model  # one og.Model: the base's weights once
    for name in ("a", "b"):
        dedicated = load(kit[f"{name}_model"])
        expected = [p.label for p in dedicated.classify(PHRASES)]
        assert [p.label for p in served[name].classify(PHRASES)] == expected
        assert served[name].constrained_batch(["x"])[1] == dedicated.constrained_batch(["x"])[1]


def test_an_adapter_of_another_base_is_refused_saying_what_differs(kit, tmp_path, _composed):
    with pytest.raises(AdapterMismatch, match="built for another base") as err:
        load(kit["base"], adapters={"x": kit["x"]})
    assert adapters.read_base(kit["base"])["sha256"][:12] in str(err.value)
    with pytest.raises(AdapterMismatch, match=r"target modules: \['o_proj'\] \(adapter\)"):
        load(kit["base"], adapters={"o": kit["o"]})
    # the recipe differs: named by its config key
    folder = tmp_path / "recipe"
    shutil.copytree(kit["a"], folder)
    manifest = json.loads((folder / adapters.MANIFEST).read_text())
    manifest["base_sha256"] = "0" * 64
    manifest["base_recipe"]["builder.precision"] = "fp16"
    (folder / adapters.MANIFEST).write_text(json.dumps(manifest))
    base = _composed.builder.precision  # the default builder's, which the kit's bases record
    assert base != "fp16"
    with pytest.raises(AdapterMismatch, match=rf"builder.precision: 'fp16' \(adapter\) vs '{base}' \(base\)"):
        load(kit["base"], adapters={"r": folder})


def test_weights_the_base_has_no_input_for_or_of_another_shape_are_refused(kit, tmp_path):
    import onnxruntime as ort

    params = ort.AdapterFormat.read_adapter(str(kit["a"] / adapters.ADAPTER_FILE)).get_parameters()
    name = next(iter(params))
    for case, (key, value) in {
        "unknown": (re.sub(r"layers\.\d+", "layers.9", name), params[name].numpy()),
        "shape": (name, np.zeros([s + 1 for s in params[name].shape()], dtype=np.float32)),
    }.items():
        folder = tmp_path / case
        shutil.copytree(kit["a"], folder)
        changed = {k: v.numpy() for k, v in params.items() if k != name} | {key: value}
        fmt = ort.AdapterFormat()
        fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in changed.items()})
        fmt.export_adapter(str(folder / adapters.ADAPTER_FILE))
        expected = "no adapter inputs for" if case == "unknown" else "has shape"
        with pytest.raises(AdapterMismatch, match=expected):
            load(kit["base"], adapters={case: folder})


def test_an_adapter_loads_only_with_a_passed_verdict_unless_ungated(kit, tmp_path):
    for verdict, expected in ((None, "carries no parity-gate verdict"), ({**PASSED, "verdict": "refused",
                              "reference_accuracy": 0.95, "gap": 0.05, "tolerance": 0.02}, "refused")):  # fmt: skip
        folder = tmp_path / str(bool(verdict))
        shutil.copytree(kit["a"], folder)
        manifest = json.loads((folder / adapters.MANIFEST).read_text())
        (folder / adapters.MANIFEST).write_text(json.dumps({**manifest, "gate": verdict}))
        with pytest.raises(NotShipped, match=expected):
            load(kit["base"], adapters={"a": folder})
        assert list(load(kit["base"], adapters={"a": folder}, ungated=True)) == ["a"]


def test_what_is_not_an_adapter_or_a_base_for_one_is_refused_clearly(kit, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load(kit["base"], adapters={"a": tmp_path / "nowhere"})
    with pytest.raises(FileNotFoundError, match="has no adapter.json"):
        load(kit["base"], adapters={"a": tmp_path})
    with pytest.raises(AdapterMismatch, match="takes no adapters"):
        load(kit["a_model"], adapters={"a": kit["a"]})  # a model with the adapter built in
    changed = tmp_path / "changed"
    shutil.copytree(kit["base"], changed)
    data = (changed / "model.onnx.data").read_bytes()
    (changed / "model.onnx.data").write_bytes(bytes([data[0] ^ 1]) + data[1:])
    with pytest.raises(AdapterMismatch, match="changed since"):
        load(changed, adapters={"a": kit["a"]})
    with pytest.raises(ValueError, match="NAME=PATH"):
        adapters.parse_spec("no-equals-sign")


def test_pytorch_runs_the_same_adapters_with_peft(kit):
    """The PyTorch backend: the adapter folders' PEFT files on the Hugging Face base, PEFT's multi-adapter
    model; each view computes what that adapter alone on the base computes."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    served = load(kit["hf"], adapters={"a": kit["a"], "b": kit["b"]})
    ids = torch.tensor([served["a"].model.encode(PHRASES[1])])
    for name in ("b", "a", "b"):  # switching back and forth
        alone = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(kit["hf"]), kit[name]).eval()
        with torch.no_grad():
            expected = alone(input_ids=ids).logits[0, -1]
            got = served[name].model.model(input_ids=ids).logits[0, -1]
        assert torch.allclose(got, expected, atol=1e-5)
    onnx = load(kit["base"], adapters={"a": kit["a"]})["a"]
    assert [p.label for p in served["a"].classify(PHRASES)] == [p.label for p in onnx.classify(PHRASES)]


def test_one_server_serves_each_adapter_by_name(kit):
    from test_serve import call

    from slmkit.serve import Batcher, Server, ServeSettings, create_app

    served = load(kit["base"], adapters={"a": kit["a"], "b": kit["b"]})
    # What a server of the dedicated model answers (labels and label scores: random tiny adapters mostly
    # agree on the label, never on the scores).
    expected = {name: Batcher(load(kit[f"{name}_model"]), ServeSettings()).classify(PHRASES) for name in ("a", "b")}
    assert expected["a"] != expected["b"]  # so that picking the wrong adapter would show
    with Server(create_app(served, ServeSettings(max_wait_ms=20))) as server:
        status, body = call(server.url, "/v1/models")
        assert status == 200 and [m["id"] for m in body["data"]] == ["a", "b"]
        for name in ("b", "a"):
            status, body = call(server.url, "/classify", json.dumps({"model": name, "phrases": PHRASES}).encode())
            assert status == 200 and body["results"] == expected[name]
        status, body = call(server.url, "/classify", json.dumps({"phrases": PHRASES}).encode())
        assert status == 422 and 'name one with "model"' in body["error"]
        status, body = call(server.url, "/classify", json.dumps({"model": "c", "phrases": ["x"]}).encode())
        assert status == 404 and "['a', 'b']" in body["error"]
        chat = {"model": "b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        status, body = call(server.url, "/v1/chat/completions", json.dumps(chat).encode())
        assert status == 200 and body["model"] == "b"
        status, body = call(server.url, "/v1/chat/completions", json.dumps({**chat, "model": "c"}).encode())
        assert status == 404 and "'a', 'b'" in body["error"]["message"] and body["error"]["code"] == "model_not_found"
        status, body = call(server.url, "/health")
        assert status == 200 and set(body["models"]) == {"a", "b"} and body["models"]["b"]["batches"] >= 1


def test_the_command_line_runs_each_adapter_and_refuses_a_mismatch(kit, capsys):
    from slmkit.cli import main

    args = ["classify", "--model", str(kit["base"]), "--adapter", f"a={kit['a']}", "--adapter", f"b={kit['b']}"]
    assert main([*args, "--json", *PHRASES[:2]]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["model"], r["text"]) for r in rows] == [(m, p) for m in ("a", "b") for p in PHRASES[:2]]
    labels = [p.label for p in load(kit["b_model"]).classify(PHRASES[:2])]
    assert [r["label"] for r in rows[2:]] == labels
    assert main(["classify", "--model", str(kit["base"]), "--adapter", f"x={kit['x']}", "hi"]) == 1
    assert "built for another base" in capsys.readouterr().err
    assert main(["classify", "--model", str(kit["base"]), "--adapter", f"a={kit['a']}", "--adapter", "a=b", "hi"]) == 1
    assert "given twice" in capsys.readouterr().err


def test_a_classifier_and_a_question_answering_adapter_share_one_server(kit, tmp_path, _composed):
    """One adapter labels phrases, the other (a generative prompt, as data=qa writes) answers in free text:
    /classify goes to the classifier without naming it, chat completions to whichever the request names."""
    from test_serve import call

    from slmkit.config import DataConfig
    from slmkit.serve import Server, ServeSettings, create_app

    qa = tmp_path / "qa"
    shutil.copytree(kit["b"], qa)
    save_prompt_config(DataConfig(path="", labels=[], template="Q: {text}\nA: {label}", answer_tokens=4), qa)
    served = load(kit["base"], adapters={"tones": kit["a"], "qa": qa})
    assert not served["tones"].generative and served["qa"].generative
    with Server(create_app(served, ServeSettings(max_wait_ms=5))) as server:
        status, body = call(server.url, "/classify", json.dumps({"phrases": PHRASES[:2]}).encode())
        assert status == 200 and [r["label"] in _composed.data.labels for r in body["results"]] == [True, True]
        status, body = call(server.url, "/classify", json.dumps({"model": "qa", "phrases": ["x"]}).encode())
        assert status == 404 and "free text" in body["error"]
        for name in ("qa", "tones"):
            chat = {"model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
            status, body = call(server.url, "/v1/chat/completions", json.dumps(chat).encode())
            assert status == 200 and body["model"] == name, body
