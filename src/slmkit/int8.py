"""builder.precision=int8: ModelBuilder's fp32 model with its base MatMuls in int8 (onnxruntime dynamic quantization).

Weights 8-bit per output channel; activations quantized to 8 bits per tensor at run time: quantize_dynamic
writes DynamicQuantizeLinear + MatMulInteger, which onnxruntime fuses at load into DynamicQuantizeMatMul.

The weights are unsigned (QUInt8: u8 activations x u8 weights), not onnxruntime's default signed QInt8. On a
CPU without VNNI, onnxruntime computes u8 x s8 with AVX2's vpmaddubsw, which adds pairs of products in 16 bits
and saturates: measured on a 2-core AMD EPYC with AVX2 only, the default run's model scored 0.3069 with QInt8
weights, 0.8519 with QInt8 in 7 bits (reduce_range: refused by the gate), 0.8836 with QUInt8, against 0.8783
merged (metrics/int8_no_vnni_run.json). u8 x u8 widens to 16 bits first and is exact on every CPU, so the same
artifact gives the same answers on any machine (the built model must not depend on where it runs).

The LoRA branches of a separate build (builder.adapter=separate) and the projections builder.exclude names
stay fp32. Olive's OnnxDynamicQuantization pass calls the same onnxruntime function, but on a model with LoRA
branches it logs "Model has adapters which should not be quantized", returns the model unquantized and
succeeds; so the stage calls onnxruntime's quantize_dynamic itself and checks the result (check_int8).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from slmkit.olive_config import LM_HEAD
from slmkit.stage import StageError

log = logging.getLogger(__name__)

# u8 weights (QuantType.QUInt8, by name: onnxruntime is imported where it is used): exact on every CPU.
WEIGHT_TYPE_NAME = "QUInt8"
# What quantize_dynamic makes of a MatMul it quantized (MatMulInteger; fused forms where it fuses them).
INT8_OPS = ("DynamicQuantizeMatMul", "MatMulInteger")


def is_lora(name: str) -> bool:
    return "/lora_A/" in name or "/lora_B/" in name


def _is_excluded(name: str, exclude: list[str]) -> bool:
    if name.startswith("/lm_head/"):
        return LM_HEAD in exclude
    return any(f"/{module}/" in name for module in exclude)


def weight_matmuls(graph) -> list[str]:
    """Names of the graph's MatMuls with a constant weight (a projection, not attention's products)."""
    weights = {t.name for t in graph.initializer}
    return [n.name for n in graph.node if n.op_type == "MatMul" and len(n.input) == 2 and n.input[1] in weights]


def to_quantize(graph, exclude: list[str]) -> list[str]:
    """The base projections to put in int8: every weighted MatMul but LoRA branches and builder.exclude's."""
    return [n for n in weight_matmuls(graph) if not is_lora(n) and not _is_excluded(n, exclude)]


def quantize(folder: Path, exclude: list[str], work: Path) -> int:
    """Rewrite folder/model.onnx(+.data) with its base projections in int8; return how many were quantized."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    nodes = to_quantize(graph, exclude)
    if not nodes:
        raise StageError(f"int8: {folder / 'model.onnx'} has no projection MatMul left to quantize (builder.exclude)")
    log.info("int8: quantizing %d MatMuls (onnxruntime dynamic quantization, u8 weights per channel)", len(nodes))
    out = work / "int8"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    quantize_dynamic(
        folder / "model.onnx",
        out / "model.onnx",
        weight_type=getattr(QuantType, WEIGHT_TYPE_NAME),
        per_channel=True,
        op_types_to_quantize=["MatMul"],
        nodes_to_quantize=nodes,
        use_external_data_format=True,
    )
    for name in ("model.onnx", "model.onnx.data"):
        (folder / name).unlink(missing_ok=True)
    for f in out.iterdir():
        os.chmod(f, 0o644)  # onnxruntime writes the data file owner-only
        shutil.move(str(f), folder / f.name)
    return len(nodes)


def check_int8(model: Path, expected: int, log_path: Path) -> None:
    """Fail unless `expected` MatMuls became int8 ones and no LoRA branch did."""
    import onnx

    graph = onnx.load(str(model / "model.onnx"), load_external_data=False).graph
    check_quantized(graph, INT8_OPS, "int8", expected, model, log_path)
    signed = sorted(weight_types(graph) - {"UINT8"})
    if signed:
        raise StageError(
            f"int8: {model / 'model.onnx'} has {signed} int8 weights where u8 ({WEIGHT_TYPE_NAME}) were asked for: "
            f"u8 x s8 saturates on CPUs without VNNI (slmkit.int8).\n  full log: {log_path}"
        )


def check_quantized(graph, ops: tuple[str, ...], kind: str, expected: int, model: Path, log_path: Path) -> None:
    """Fail unless `expected` of the graph's nodes are quantized ones (`ops`) and no LoRA branch is among them."""
    quantized = [n.name for n in graph.node if n.op_type in ops]
    lora = [n for n in quantized if is_lora(n)]
    if len(quantized) != expected or lora:
        raise StageError(
            f"{kind}: {model / 'model.onnx'} has {len(quantized)} {kind} MatMuls where {expected} were quantized, "
            f"{len(lora)} of them LoRA branches ({lora[:3]}).\n  full log: {log_path}"
        )


def weight_types(graph) -> set[str]:
    """The element types of the quantized MatMuls' weights (MatMulInteger's second input)."""
    from onnx import TensorProto

    types = {t.name: TensorProto.DataType.Name(t.data_type) for t in graph.initializer}
    return {types[n.input[1]] for n in graph.node if n.op_type == "MatMulInteger" and n.input[1] in types}
