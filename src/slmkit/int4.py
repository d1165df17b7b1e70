"""builder.int4_algo=grid: ModelBuilder's fp32 model with its base MatMuls in int4 blocks on the weights' own
grid, written by the kit as onnxruntime MatMulNBits with integer zero points (its packed kernels).

A base read from a GGUF file in Q4_1 (the default model's) stores each block of 32 weights along a projection's
inputs as min + d * q, q in 0..15, its minimum at q = 0 and its maximum at q = 15. ModelBuilder's int4
(symmetric, or integer zero points fitted anew) rounds that 4-bit grid onto another one: that second rounding was
the int4 recipe's gap to its merged model (docs/int4.md). This recipe keeps the file's own values:

- a block on a min/max grid is written as d * q (MatMulNBits, zero point 0) plus its minimum, added back by
  one small product: the input's sum over each block (x @ an indicator, K x K/32, shared by the MatMuls that
  read the same input) times the blocks' minimums (K/32 x N). The same weights as float zero points
  (zero point -min/d), but onnxruntime's CPU kernel unpacks float zero points to fp32 on every call (3.5 tokens/s
  decoding: metrics/formats_avx2_run.json), where integer ones run on its packed kernels;
- a block on a symmetric 8-bit grid (Q8_0: the tied embedding that is the LM head) as two 4-bit MatMuls on the
  same input: with q + 128 = 16 h + l, the weight d * q is 16 d * (h - 8) + d * l, both halves exact in int4;
- weights on no such grid get plain min/max round-to-nearest in the first form.

The stage logs the largest weight error it measured (`max_error`, relative to the projection's largest weight).
At accuracy level 1 the kernels compute in fp32, so the model computes what the fp32 model computes up to
summation order; at level 4 they round each block of the input to int8 (builder.int4_accuracy_level). The LoRA
branches of a separate build and builder.exclude's projections stay fp32 (slmkit.int8.to_quantize picks the
same MatMuls as the int8 recipe).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from slmkit.int8 import check_quantized, to_quantize
from slmkit.stage import StageError

log = logging.getLogger(__name__)

# What this module writes for a quantized MatMul: its MatMulNBits nodes keep the MatMul's name plus a suffix.
NODE_SUFFIX = "_Q"
# A weight reproduced within this share of its projection's largest weight counts as not rounded again.
LOSSLESS = 1e-6


@dataclass(frozen=True)
class Blocks:
    """One projection's blocks (N rows of K/block_size blocks, MatMulNBits' layout), the weight being
    scales * q + offsets (4 bits: q in 0..15, offsets the blocks' minimums) or scales * (q - 128) (8 bits)."""

    bits: int
    q: np.ndarray  # uint8 (N, blocks, block_size)
    scales: np.ndarray  # float32 (N, blocks)
    offsets: np.ndarray | None  # float32 (N, blocks) for 4 bits
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
        q = np.clip(np.rint((blocks - low) / scale), 0, 15).astype(np.uint8)
        restored, offsets = q * scale + low, low[:, :, 0]
    elif bits == 8:
        scale = np.abs(blocks).max(axis=2, keepdims=True) / 127
        scale[scale == 0] = 1.0
        q = (np.clip(np.rint(blocks / scale), -127, 127) + 128).astype(np.uint8)
        restored, offsets = (q.astype(np.float32) - 128) * scale, None
    else:
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    peak = float(np.abs(weight).max()) or 1.0
    return Blocks(
        bits=bits,
        q=q,
        scales=scale[:, :, 0].astype(np.float32),
        offsets=None if offsets is None else offsets.astype(np.float32),
        max_error=float(np.abs(restored.reshape(n, -1)[:, :k] - weight.T).max()) / peak,
    )


def fit_grid(weight: np.ndarray, block_size: int) -> Blocks:
    """The weight's own grid: 4-bit min/max blocks if they reproduce it, else 8-bit symmetric blocks if those
    do (a GGUF's Q8_0 tensors: the tied embedding that is the LM head), else the 4-bit round to nearest."""
    four = fit(weight, block_size, 4)
    if four.max_error <= LOSSLESS:
        return four
    eight = fit(weight, block_size, 8)
    return eight if eight.max_error <= LOSSLESS else four


def pack(q: np.ndarray) -> np.ndarray:
    """4-bit values (N, blocks, block_size) two a byte, the first in the low half (MatMulNBits' layout)."""
    return (q[:, :, 0::2] | (q[:, :, 1::2] << 4)).astype(np.uint8)


def _zero_points(n: int, blocks: int) -> np.ndarray:
    """Zero points of 0 for N rows of `blocks` 4-bit blocks, two a byte, each row's bytes padded."""
    return np.zeros(n * ((blocks + 1) // 2), np.uint8)


class _Writer:
    """Writes MatMulNBits nodes (and their initializers) in place of a graph's MatMuls."""

    def __init__(self, graph, block_size: int, accuracy_level: int):
        self.graph, self.block_size, self.level = graph, block_size, accuracy_level
        self.nodes: list = []
        self.block_sums: dict[str, str] = {}  # input tensor -> its sums over each block

    def _init(self, array: np.ndarray, name: str) -> str:
        from onnx import numpy_helper

        self.graph.initializer.append(numpy_helper.from_array(array, name))
        return name

    def _nbits(self, x: str, out: str, name: str, k: int, q: np.ndarray, scales: np.ndarray, zero: bool) -> None:
        from onnx import helper

        n, blocks, _ = q.shape
        inputs = [x, self._init(pack(q), f"{name}_Q4"), self._init(scales.reshape(-1), f"{name}_scales")]
        if zero:  # without zero points the kernel takes 8 for every block
            inputs.append(self._init(_zero_points(n, blocks), f"{name}_zero_points"))
        self.nodes.append(
            helper.make_node(
                "MatMulNBits",
                inputs,
                [out],
                name=name,
                domain="com.microsoft",
                K=k,
                N=n,
                bits=4,
                block_size=self.block_size,
                accuracy_level=self.level,
            )
        )

    def _block_sums(self, x: str, k: int) -> str:
        """x's sum over each block of its last dimension: x @ indicator (K x blocks), once per input."""
        from onnx import helper

        if x not in self.block_sums:
            blocks = -(-k // self.block_size)
            indicator = np.zeros((k, blocks), np.float32)
            indicator[np.arange(k), np.arange(k) // self.block_size] = 1.0
            name = f"int4_block_indicator_{k}_{self.block_size}"
            if not any(t.name == name for t in self.graph.initializer):
                self._init(indicator, name)
            out = f"{x}_block_sums"
            self.nodes.append(helper.make_node("MatMul", [x, name], [out], name=f"{out}/MatMul"))
            self.block_sums[x] = out
        return self.block_sums[x]

    def replace(self, node, weight: np.ndarray, b: Blocks) -> None:
        """Nodes computing node's output from its input with `b` in place of `weight`."""
        from onnx import helper

        k = weight.shape[0]
        x, out, name = node.input[0], node.output[0], node.name + NODE_SUFFIX
        if b.bits == 8:  # q + 128 = 16 h + l: d * q = 16 d * (h - 8) + d * l
            high, low = b.q >> 4, b.q & 15
            self._nbits(x, f"{out}_high", f"{name}_high", k, high, 16 * b.scales, zero=False)
            self._nbits(x, f"{out}_low", f"{name}_low", k, low, b.scales, zero=True)
            self.nodes.append(helper.make_node("Add", [f"{out}_high", f"{out}_low"], [out], name=f"{name}_add"))
            return
        self._nbits(x, f"{out}_scaled", name, k, b.q, b.scales, zero=True)
        offsets = self._init(np.ascontiguousarray(b.offsets.T), f"{name}_offsets")  # blocks x N
        sums = self._block_sums(x, k)
        self.nodes.append(helper.make_node("MatMul", [sums, offsets], [f"{out}_offsets"], name=f"{name}_offsets"))
        self.nodes.append(helper.make_node("Add", [f"{out}_scaled", f"{out}_offsets"], [out], name=f"{name}_add"))


def quantize(folder: Path, exclude: list[str], block_size: int, accuracy_level: int) -> dict:
    """Rewrite folder/model.onnx(+.data) with its base projections in int4 on their own grid; return what it
    measured: how many MatMuls in which width, the MatMulNBits nodes written, the worst relative weight error,
    and whether every weight came back exactly."""
    import onnx
    from onnx import helper, numpy_helper

    path = folder / "model.onnx"
    model = onnx.load(str(path))
    graph = model.graph
    names = set(to_quantize(graph, exclude))
    if not names:
        raise StageError(f"int4: {path} has no projection MatMul left to quantize (builder.exclude)")
    log.info(
        "int4 on the weights' grid (blocks of %d, accuracy level %d): quantizing %d MatMuls",
        block_size,
        accuracy_level,
        len(names),
    )
    weights = {t.name: t for t in graph.initializer}
    users: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            users[name] = users.get(name, 0) + 1
    worst = 0.0
    bits: dict[int, int] = {}
    writer = _Writer(graph, block_size, accuracy_level)
    for node in graph.node:
        if node.name not in names:
            writer.nodes.append(node)
            continue
        weight = numpy_helper.to_array(weights[node.input[1]])
        b = fit_grid(weight, block_size)
        worst = max(worst, b.max_error)
        bits[b.bits] = bits.get(b.bits, 0) + 1
        if users[node.input[1]] == 1:
            graph.initializer.remove(weights[node.input[1]])
        writer.replace(node, weight, b)
    del graph.node[:]
    graph.node.extend(writer.nodes)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    for name in ("model.onnx", "model.onnx.data"):
        (folder / name).unlink(missing_ok=True)
    onnx.save_model(
        model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="model.onnx.data"
    )
    report = {
        "matmuls": len(names),
        "bits": bits,
        "nodes": len(names) + bits.get(8, 0),  # an 8-bit MatMul is two 4-bit ones
        "max_error": worst,
        "lossless": worst <= LOSSLESS,
    }
    log.info(
        "int4: %d MatMuls (%s) as %d MatMulNBits, largest weight error %.3g of the projection's largest weight (%s)",
        len(names),
        ", ".join(f"{n} on {b}-bit grids" for b, n in sorted(bits.items())),
        report["nodes"],
        worst,
        "the weights' own grid: nothing rounded again" if report["lossless"] else "rounded to nearest",
    )
    return report


def check_int4(model: Path, expected: int, log_path: Path) -> None:
    """Fail unless `expected` MatMulNBits nodes are in the model and none of them is a LoRA branch."""
    import onnx

    graph = onnx.load(str(model / "model.onnx"), load_external_data=False).graph
    check_quantized(graph, ("MatMulNBits",), "int4", expected, model, log_path)
