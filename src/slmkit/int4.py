"""builder.int4_algo=grid: ModelBuilder's fp32 model with its base MatMuls in int4 blocks fitted to each block's
own minimum and maximum (MatMulNBits, float zero points), written by the kit.

Each block of `builder.int4_block_size` weights along a projection's input dimension gets scale
(max - min) / 15 and zero point -min / scale, kept as a float: the block's values are min + scale * q for q in
0..15. A base read from a GGUF file in Q4_1 (the default model's) already is exactly that: llama.cpp's Q4_1
stores each block of 32 as min + d * q, its minimum at q = 0 and its maximum at q = 15. So this recipe puts the
file's own 4-bit values back into int4 without rounding them again (measured: every projection of SmolLM2-135M
reproduced to 0.0), where ModelBuilder's int4 (symmetric, or integer zero points) rounds a 4-bit grid onto
another one: that second rounding was the int4 recipe's gap to its merged model (docs/int4.md). On weights not
on such a grid it is plain asymmetric round-to-nearest; the stage logs the error it measured either way
(`max_error`, relative to the projection's largest weight).

onnxruntime's CPU MatMulNBits computes with float zero points by dequantizing its blocks (measured: the same
output as fp32 to 6.5e-7 at every accuracy level), so activations are not quantized: a batch gives each phrase
the labels it gets alone. The 8-bit blocks (uint8 zero points: the CPU kernel takes no float ones in 8 bits)
are written at accuracy level 1 for the same reason (EIGHT_BIT_ACCURACY_LEVEL). The LoRA branches of a
separate build and builder.exclude's projections stay fp32 (slmkit.int8.to_quantize picks the same MatMuls as
the int8 recipe).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from slmkit.int8 import check_quantized, to_quantize
from slmkit.stage import StageError

log = logging.getLogger(__name__)

# What this module writes for a quantized MatMul (its node keeps the MatMul's name plus this suffix).
NODE_SUFFIX = "_Q"
# 8-bit blocks compute in fp32: at accuracy level 4 onnxruntime quantizes their input to int8 per block (the
# LM head's logits moved by 0.04 in tests/test_int4.py), while 4-bit blocks with float zero points compute
# exactly at every level (level 4, builder.int4_accuracy_level's default, measured the fastest).
EIGHT_BIT_ACCURACY_LEVEL = 1
# A weight reproduced within this share of its projection's largest weight counts as not rounded again.
LOSSLESS = 1e-6


@dataclass(frozen=True)
class Blocks:
    """One projection's int4 blocks, as MatMulNBits takes them (N rows of K/block_size blocks)."""

    bits: int
    packed: np.ndarray  # uint8 (N, blocks, block_size * bits / 8): 4-bit values two a byte, the first low
    scales: np.ndarray  # float32 (N * blocks,)
    zero_points: np.ndarray  # float32 (N * blocks,) for 4 bits; uint8 for 8 (the CPU kernel takes no float ones)
    max_error: float  # the largest |dequantized - weight|, over the largest |weight|


def _blocks(weight: np.ndarray, block_size: int) -> np.ndarray:
    """A MatMul weight (K x N: input by output features) as N rows of K / block_size blocks (MatMulNBits' layout);
    a last partial block repeats its row's last value, which leaves its minimum, maximum and peak as they were."""
    k, n = weight.shape
    rows = np.ascontiguousarray(weight.T, dtype=np.float32)
    pad = (-k) % block_size
    if pad:
        rows = np.concatenate([rows, np.repeat(rows[:, -1:], pad, axis=1)], axis=1)
    return rows.reshape(n, -1, block_size)


def fit(weight: np.ndarray, block_size: int, bits: int) -> Blocks:
    """Quantize a MatMul weight to `bits`-bit blocks along its input dimension: 4 bits on each block's minimum
    and maximum (Q4_1's grid: min + scale * q, q in 0..15), 8 bits symmetric on each block's largest magnitude
    (Q8_0's grid: scale * (q - 128), q in 1..255)."""
    k, n = weight.shape
    blocks = _blocks(weight, block_size)
    if bits == 4:
        low = blocks.min(axis=2, keepdims=True)
        scale = (blocks.max(axis=2, keepdims=True) - low) / 15
        scale[scale == 0] = 1.0  # a constant block: every value is `low`, q = 0
        zero = (-low / scale).astype(np.float32)
        q = np.clip(np.rint((blocks - low) / scale), 0, 15).astype(np.uint8)
        packed = q[:, :, 0::2] | (q[:, :, 1::2] << 4)
    elif bits == 8:
        scale = np.abs(blocks).max(axis=2, keepdims=True) / 127
        scale[scale == 0] = 1.0
        zero = np.full(scale.shape, 128, dtype=np.uint8)
        q = (np.clip(np.rint(blocks / scale), -127, 127) + 128).astype(np.uint8)
        packed = q
    else:
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    restored = ((q - zero.astype(np.float32)) * scale).reshape(n, -1)[:, :k]
    peak = float(np.abs(weight).max()) or 1.0
    return Blocks(
        bits=bits,
        packed=packed.astype(np.uint8),
        scales=scale.reshape(-1).astype(np.float32),
        zero_points=zero.reshape(-1),
        max_error=float(np.abs(restored - weight.T).max()) / peak,
    )


def fit_grid(weight: np.ndarray, block_size: int) -> Blocks:
    """The weight's own grid: 4-bit min/max blocks if they reproduce it, else 8-bit symmetric blocks if those
    do (a GGUF's Q8_0 tensors: the tied embedding that is the LM head), else the 4-bit round to nearest."""
    four = fit(weight, block_size, 4)
    if four.max_error <= LOSSLESS:
        return four
    eight = fit(weight, block_size, 8)
    return eight if eight.max_error <= LOSSLESS else four


def quantize(folder: Path, exclude: list[str], block_size: int, accuracy_level: int) -> dict:
    """Rewrite folder/model.onnx(+.data) with its base projections in min/max int4; return what it measured:
    how many MatMuls, the worst relative weight error, and whether every weight came back exactly."""
    import onnx
    from onnx import helper, numpy_helper

    path = folder / "model.onnx"
    model = onnx.load(str(path))
    graph = model.graph
    names = set(to_quantize(graph, exclude))
    if not names:
        raise StageError(f"int4: {path} has no projection MatMul left to quantize (builder.exclude)")
    log.info("int4 on the weights' grid (blocks of %d): quantizing %d MatMuls", block_size, len(names))
    weights = {t.name: t for t in graph.initializer}
    users: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            users[name] = users.get(name, 0) + 1
    worst = 0.0
    bits: dict[int, int] = {}
    nodes = []
    for node in graph.node:
        if node.name not in names:
            nodes.append(node)
            continue
        weight = numpy_helper.to_array(weights[node.input[1]])
        b = fit_grid(weight, block_size)
        worst = max(worst, b.max_error)
        bits[b.bits] = bits.get(b.bits, 0) + 1
        prefix = node.input[1]
        graph.initializer.extend(
            [
                numpy_helper.from_array(b.packed, f"{prefix}_Q{b.bits}"),
                numpy_helper.from_array(b.scales, f"{prefix}_scales"),
                numpy_helper.from_array(b.zero_points, f"{prefix}_zero_points"),
            ]
        )
        if users[prefix] == 1:
            graph.initializer.remove(weights[prefix])
        nodes.append(
            helper.make_node(
                "MatMulNBits",
                [node.input[0], f"{prefix}_Q{b.bits}", f"{prefix}_scales", f"{prefix}_zero_points"],
                list(node.output),
                name=node.name + NODE_SUFFIX,
                domain="com.microsoft",
                K=weight.shape[0],
                N=weight.shape[1],
                bits=b.bits,
                block_size=block_size,
                accuracy_level=accuracy_level if b.bits == 4 else EIGHT_BIT_ACCURACY_LEVEL,
            )
        )
    del graph.node[:]
    graph.node.extend(nodes)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    for name in ("model.onnx", "model.onnx.data"):
        (folder / name).unlink(missing_ok=True)
    onnx.save_model(
        model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="model.onnx.data"
    )
    report = {"matmuls": len(names), "bits": bits, "max_error": worst, "lossless": worst <= LOSSLESS}
    log.info(
        "int4: %d MatMuls (%s), largest weight error %.3g of the projection's largest weight (%s)",
        len(names),
        ", ".join(f"{n} in {b} bits" for b, n in sorted(bits.items())),
        worst,
        "the weights' own grid: nothing rounded again" if report["lossless"] else "rounded to nearest",
    )
    return report


def check_int4(model: Path, expected: int, log_path: Path) -> None:
    """Fail unless `expected` MatMuls became the kit's MatMulNBits and no LoRA branch did."""
    import onnx

    graph = onnx.load(str(model / "model.onnx"), load_external_data=False).graph
    check_quantized(graph, ("MatMulNBits",), "int4", expected, model, log_path)
