"""builder=int8_cpu: ModelBuilder's fp32 model with its base projections in int8 (slmkit.int8)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from slmkit import int8, olive_config
from slmkit.config import ConfigError, compose
from slmkit.stage import StageError


def _graph(nodes: list[tuple[str, str]], weighted: bool = True):
    """A graph of MatMul-like nodes, each with a constant weight (or, weighted=False, two activations)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(np.ones((1, 1), np.float32), f"w{i}") for i in range(len(nodes))]
    return helper.make_graph(
        [
            helper.make_node(op, ["x", f"w{i}" if weighted else "x"], [f"y{i}"], name=name)
            for i, (op, name) in enumerate(nodes)
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1])],
        [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [1, 1]) for i in range(len(nodes))],
        inits,
    )


NODES = [
    ("MatMul", "/model/layers.0/attn/q_proj/MatMul"),
    ("MatMul", "/model/layers.0/attn/q_proj/lora_A/MatMul"),
    ("MatMul", "/model/layers.0/attn/q_proj/lora_B/MatMul"),
    ("MatMul", "/model/layers.0/mlp/down_proj/MatMul"),
    ("MatMul", "/model/layers.0/mlp/up_proj/MatMul"),
    ("MatMul", "/lm_head/MatMul"),
]


def test_the_base_projections_are_quantized_and_lora_branches_and_excluded_modules_are_not():
    graph = _graph(NODES)
    assert int8.to_quantize(graph, ["down_proj"]) == [
        "/model/layers.0/attn/q_proj/MatMul",
        "/model/layers.0/mlp/up_proj/MatMul",
        "/lm_head/MatMul",
    ]
    assert int8.to_quantize(graph, ["lm_head"]) == [
        "/model/layers.0/attn/q_proj/MatMul",
        "/model/layers.0/mlp/down_proj/MatMul",
        "/model/layers.0/mlp/up_proj/MatMul",
    ]
    # A product of two activations (attention's) has no weight to quantize.
    assert int8.to_quantize(_graph(NODES[:1], weighted=False), []) == []


def _saved(path: Path, nodes) -> Path:
    import onnx
    from onnx import helper

    path.mkdir(parents=True)
    onnx.save(helper.make_model(_graph(nodes)), str(path / "model.onnx"))
    return path


def test_check_fails_on_a_quantized_lora_branch_or_a_missing_projection(tmp_path: Path):
    good = [("DynamicQuantizeMatMul", "/model/layers.0/attn/q_proj/MatMul_quant"), NODES[1]]
    int8.check_int8(_saved(tmp_path / "good", good), 1, tmp_path / "log")
    with pytest.raises(StageError, match="2 int8 MatMuls where 1 were quantized"):
        int8.check_int8(_saved(tmp_path / "extra", [*good, ("MatMulInteger", "/model/x/MatMul")]), 1, tmp_path / "l")
    lora = [good[0], ("DynamicQuantizeMatMul", "/model/layers.0/attn/q_proj/lora_A/MatMul_quant")]
    with pytest.raises(StageError, match="1 of them LoRA branches"):
        int8.check_int8(_saved(tmp_path / "lora", lora), 2, tmp_path / "log")


def test_int8_builds_fp32_with_modelbuilder_and_needs_the_cpu():
    cfg = compose(["model=smollm2_135m", "builder=int8_cpu"])
    assert cfg.builder.precision == "int8" and cfg.builder.exclude == ["down_proj"]
    built = olive_config.builder_pass(cfg, "unused")
    assert built["precision"] == "fp32" and not any(k.startswith("int4") for k in built)
    with pytest.raises(ConfigError, match="builder.: int8 runs on CPU only"):
        compose(["builder=int8_cpu", "builder.execution_provider=cuda"])
    with pytest.raises(ConfigError, match="builder.int4_block_size.*only applies to precision=int4"):
        compose(["builder=int8_cpu", "+builder.int4_block_size=32"])
    with pytest.raises(ConfigError, match="builder.exclude.*only applies to precision=int4 or int8"):
        compose(["builder=fp32_cpu", "+builder.exclude=[down_proj]"])


def test_int8_model_runs_with_genai_and_keeps_fp32s_answers(tiny_model_dirs, tmp_path: Path):
    """On real ModelBuilder output: the tiny model in fp32, then int8 but its down projections."""
    import numpy as np
    import onnx
    from onnxruntime_genai.models.builder import create_model

    from slmkit.inference import GenaiModel
    from slmkit.olive_run import check_excluded

    fp32 = tmp_path / "fp32"
    create_model("", str(tiny_model_dirs["pytorch"]), str(fp32), "fp32", "cpu", str(tmp_path / "c"), prune_lm_head=True)
    folder = tmp_path / "int8"
    shutil.copytree(fp32, folder)
    quantized = int8.quantize(folder, ["down_proj"], tmp_path / "work")
    assert quantized > 0
    int8.check_int8(folder, quantized, tmp_path / "log")
    check_excluded(folder, ["down_proj"], tmp_path / "log")
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    assert [n.op_type for n in graph.node].count("MatMulInteger") == quantized
    # u8 weights: u8 x s8 saturates on CPUs without VNNI (0.3069 for 0.8783 measured); check_int8 refuses s8
    assert int8.weight_types(graph) == {"UINT8"}
    for weight in (t for t in graph.initializer if t.data_type == onnx.TensorProto.UINT8):
        weight.data_type = onnx.TensorProto.INT8
    onnx.save(onnx.ModelProto(graph=graph, opset_import=[onnx.helper.make_opsetid("", 17)]), str(tmp_path / "s8.onnx"))
    signed = tmp_path / "signed"
    signed.mkdir()
    shutil.copy(tmp_path / "s8.onnx", signed / "model.onnx")
    with pytest.raises(StageError, match="u8 x s8 saturates"):
        int8.check_int8(signed, quantized, tmp_path / "log")
    assert (folder / "model.onnx.data").stat().st_mode & 0o044  # readable by others, as the rest of the folder
    # Smaller than fp32 (int8 weights), and the same next token on the test prompts.
    size = sum(f.stat().st_size for f in folder.glob("model.onnx*"))
    assert size < 0.6 * sum(f.stat().st_size for f in fp32.glob("model.onnx*"))
    a, b = GenaiModel(fp32, threads=1), GenaiModel(folder, threads=1)
    # One activation scale per tensor: a row's result depends on its batch mates, so it runs alone.
    assert a.batch_invariant and not b.batch_invariant
    prompts = [a.encode(t) for t in ("I love this", "This is awful", "Well, fine")]
    la, lb = np.asarray(a.first_logits(prompts[:1])), np.asarray(b.first_logits(prompts[:1]))
    assert la.argmax() == lb.argmax()
    assert np.abs(la - lb).max() < 0.1 * np.abs(la).max()


def test_a_batch_dependent_model_classifies_one_prompt_a_pass(tiny_model_dirs):
    from slmkit.inference import Classifier, GenaiModel, load_prompt_config

    model = GenaiModel(tiny_model_dirs["onnx"], threads=1)
    clf = Classifier(model, load_prompt_config(tiny_model_dirs["onnx"]), batch_size=4)
    prompts = ["a", "b", "c", "d", "e"]
    assert clf.batch_invariant and max(len(b) for b in clf.batches(prompts)) > 1  # int4: batched (one length)
    clf.batch_invariant = False  # as for an int8 folder (batch_invariant() read its graph)
    assert clf.batches(prompts) == [[0], [1], [2], [3], [4]]
    clf.allow_batch_variance = True  # only make bench-formats measures what batching it would give
    assert max(len(b) for b in clf.batches(prompts)) > 1
