"""builder.int4_algo=grid (slmkit.int4): the base's projections as MatMulNBits blocks on the weights' own grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from slmkit import formats, int4, olive_config
from slmkit.config import ConfigError, compose
from slmkit.stage import StageError

K, N = 96, 40  # three blocks of 32 along the input dimension


def _gguf_grid(kind: str, k: int = K, n: int = N, seed: int = 0) -> np.ndarray:
    """A K x N MatMul weight as a GGUF file holds it: llama.cpp's own quantization (the gguf package's
    reference implementation) of random weights, dequantized. GGUF blocks run along each output row's inputs."""
    import gguf.quants
    from gguf import GGMLQuantizationType

    qtype = getattr(GGMLQuantizationType, kind)
    rows = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32) * 0.05
    return gguf.quants.dequantize(gguf.quants.quantize(rows, qtype), qtype).astype(np.float32).T.copy()


def _ort_rounding_error(weight: np.ndarray) -> float:
    """The largest error, over the largest weight, of onnxruntime's default int4 (symmetric blocks of 32:
    what ModelBuilder's int4 writes) on `weight`."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="/proj/MatMul")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, weight.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    quantizer = MatMulNBitsQuantizer(model, algo_config=DefaultWeightOnlyQuantConfig(block_size=32, accuracy_level=1))
    quantizer.process()
    session = ort.InferenceSession(quantizer.model.model.SerializeToString(), providers=["CPUExecutionProvider"])
    restored = session.run(None, {"x": np.eye(weight.shape[0], dtype=np.float32)})[0]
    return float(np.abs(restored - weight).max() / np.abs(weight).max())


def test_q4_1_weights_come_back_exactly_where_symmetric_int4_rounds_them_again():
    weight = _gguf_grid("Q4_1")
    blocks = int4.fit_grid(weight, 32)
    assert blocks.bits == 4 and blocks.max_error <= int4.LOSSLESS
    # ModelBuilder's int4 (onnxruntime's symmetric blocks) rounds the same 4-bit weights onto another grid.
    assert _ort_rounding_error(weight) > 100 * int4.LOSSLESS


def test_q8_0_weights_come_back_exactly_in_8_bits_and_other_weights_are_rounded_in_4():
    q8 = int4.fit_grid(_gguf_grid("Q8_0"), 32)
    assert q8.bits == 8 and q8.max_error <= int4.LOSSLESS and q8.offsets is None
    assert q8.q.dtype == np.uint8 and q8.q.min() >= 1  # q + 128 in 1..255: two 4-bit halves
    plain = np.random.default_rng(1).standard_normal((K, N)).astype(np.float32)
    rounded = int4.fit_grid(plain, 32)
    assert rounded.bits == 4 and 1e-3 < rounded.max_error < 0.1


def test_a_partial_last_block_and_a_constant_block():
    rng = np.random.default_rng(6)
    weight = np.empty((50, N), np.float32)  # 50 inputs: a block of 32 and one of 18, each on a 4-bit grid
    for rows in (slice(0, 32), slice(32, 50)):
        q = rng.integers(0, 16, (rows.stop - rows.start, N))
        q[0], q[1] = 0, 15  # llama.cpp's Q4_1: the block's minimum at 0, its maximum at 15
        weight[rows] = (rng.uniform(-0.1, 0) + rng.uniform(0.001, 0.01) * q).astype(np.float32)
    weight[:32, 0] = 0.25  # a block whose values are all one
    blocks = int4.fit(weight, 32, 4)
    assert int4.pack(blocks.q).shape == (N, 2, 16) and blocks.max_error <= int4.LOSSLESS
    assert blocks.offsets.shape == (N, 2) and blocks.q[0, 0].max() == 0


def _model(folder: Path, weights: dict[str, np.ndarray]) -> Path:
    """A chain of MatMuls named as ModelBuilder names them, one a LoRA branch (kept fp32)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits, prev = [], [], "x"
    for i, (name, w) in enumerate(weights.items()):
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"h{i}"], name=name))
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        prev = f"h{i}"
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, K])],
        [helper.make_tensor_value_info(prev, TensorProto.FLOAT, None)],
        inits,
    )
    folder.mkdir(parents=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(folder / "model.onnx"))
    return folder


def _run(folder: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.mark.parametrize("level", [1, 4])
def test_a_model_on_its_grid_computes_what_its_fp32_model_computes(tmp_path: Path, level: int):
    import onnx
    from onnx import TensorProto

    weights = {
        "/model/layers.0/attn/q_proj/MatMul": _gguf_grid("Q4_1", K, K, seed=2),
        "/model/layers.0/attn/q_proj/lora_A/MatMul": np.random.default_rng(3).standard_normal((K, K)).astype("f"),
        "/lm_head/MatMul": _gguf_grid("Q8_0", K, N, seed=4),
    }
    folder = _model(tmp_path / "model", weights)
    x = np.random.default_rng(5).standard_normal((7, K)).astype(np.float32)
    expected = _run(folder, x)
    report = int4.quantize(folder, [], 32, level)
    assert report == {
        "matmuls": 2,
        "bits": {4: 1, 8: 1},
        "nodes": 3,  # the 8-bit LM head is two 4-bit halves
        "max_error": pytest.approx(0, abs=1e-6),
        "lossless": True,
    }
    int4.check_int4(folder, 3, tmp_path / "log")
    got = _run(folder, x)
    if level == 1:  # fp32 compute: the fp32 model's output up to summation order
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    else:  # the input rounded to int8 per block: close, not equal
        err = np.abs(got - expected).max() / np.abs(expected).max()
        assert 1e-5 < err < 0.02
    graph = onnx.load(str(folder / "model.onnx")).graph
    ops = {n.name: n.op_type for n in graph.node}
    assert {name for name, op in ops.items() if op == "MatMulNBits"} == {
        "/model/layers.0/attn/q_proj/MatMul_Q",
        "/lm_head/MatMul_Q_high",
        "/lm_head/MatMul_Q_low",
    }
    assert ops["/model/layers.0/attn/q_proj/lora_A/MatMul"] == "MatMul"
    # Integer zero points only: onnxruntime unpacks float ones to fp32 on every call.
    types = {t.name: t.data_type for t in graph.initializer}
    assert {types[n.input[3]] for n in graph.node if n.op_type == "MatMulNBits" and len(n.input) > 3} == {
        TensorProto.UINT8
    }
    assert (folder / "model.onnx.data").exists()  # the weights beside the graph, as ModelBuilder writes them
    # What `slmkit serve` logs of it.
    precision = formats.onnx_precision(folder)
    assert precision == (formats.INT4_FP32_COMPUTE if level == 1 else "int4")
    if level == 1:
        note = formats.kernel_note(precision, {"avx2": True})
        assert note.startswith("int4 (fp32 compute) projections: int4 blocks unpacked in fp32 kernels (AVX2);")


def test_matmuls_that_read_one_input_share_its_block_sums(tmp_path: Path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    names = ["q_proj", "k_proj", "v_proj"]
    ws = [_gguf_grid("Q4_1", K, N, seed=i) for i in range(3)]
    nodes = [
        helper.make_node("MatMul", ["x", f"w{i}"], [f"h{i}"], name=f"/model/layers.0/attn/{m}/MatMul")
        for i, m in enumerate(names)
    ]
    nodes.append(helper.make_node("Sum", ["h0", "h1", "h2"], ["y"]))
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, None, K])],  # batch, sequence, hidden
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(ws)],
    )
    folder = tmp_path / "model"
    folder.mkdir()
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(folder / "model.onnx"))
    x = np.random.default_rng(7).standard_normal((2, 5, K)).astype(np.float32)
    expected = sum(x @ w for w in ws)
    int4.quantize(folder, [], 32, 1)
    np.testing.assert_allclose(_run(folder, x), expected, rtol=1e-5, atol=1e-5)
    sums = [n for n in onnx.load(str(folder / "model.onnx")).graph.node if n.name.endswith("_block_sums/MatMul")]
    assert len(sums) == 1


def test_exclude_keeps_a_projection_fp32_and_the_check_fails_on_a_count_or_a_lora_branch(tmp_path: Path):
    weights = {"/model/layers.0/mlp/down_proj/MatMul": _gguf_grid("Q4_1", K, K)}
    with pytest.raises(StageError, match="no projection MatMul left"):
        int4.quantize(_model(tmp_path / "none", weights), ["down_proj"], 32, 4)
    folder = _model(tmp_path / "one", weights)
    assert int4.quantize(folder, [], 32, 4)["nodes"] == 1
    with pytest.raises(StageError, match="1 int4 MatMuls where 2 were quantized"):
        int4.check_int4(folder, 2, tmp_path / "log")
    import onnx

    lora = _model(tmp_path / "lora", {"/model/layers.0/attn/q_proj/lora_B/MatMul": _gguf_grid("Q4_1", K, K)})
    with pytest.raises(StageError, match="no projection MatMul left"):  # it never picks a LoRA branch ...
        int4.quantize(lora, [], 32, 4)
    model = onnx.load(str(lora / "model.onnx"))
    model.graph.node[0].op_type = "MatMulNBits"  # ... so the check is shown one that was
    onnx.save(model, str(lora / "model.onnx"))
    with pytest.raises(StageError, match="1 of them LoRA branches"):
        int4.check_int4(lora, 1, tmp_path / "log")


def test_the_grid_recipe_composes_and_modelbuilder_builds_it_in_fp32():
    cfg = compose(["model=smollm2_135m", "builder=int4_grid_cpu"])
    b = cfg.builder
    assert (b.precision, b.int4_algo, b.int4_block_size, b.exclude, b.adapter) == ("int4", "grid", 32, [], "separate")
    assert olive_config.kit_quantized(b)
    assert olive_config.builder_pass(cfg, "unused")["precision"] == "fp32"
    reference = compose(["model=smollm2_135m", "builder=int4_cpu", "builder.exclude=[]"])
    assert not olive_config.kit_quantized(reference.builder)
    assert olive_config.builder_pass(reference, "unused")["precision"] == "int4"
    with pytest.raises(ConfigError, match="builder.int4_algo.*grid"):
        compose(["model=smollm2_135m", "builder=int4_cpu", "builder.int4_algo=gptq"])
