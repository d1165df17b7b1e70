"""GGUF checkpoints as a model source: every bad file is refused naming model.path, before any training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGUFReader, GGUFWriter
from gguf import GGMLQuantizationType as Q

from slmkit import gguf
from slmkit.config import ConfigError, compose
from slmkit.stage import StageError


def _write(path: Path, arch: str = "llama", tensor=None, raw_dtype=None) -> Path:
    writer = GGUFWriter(str(path), arch)
    writer.add_tensor("token_embd.weight", np.arange(32, dtype=np.float32).reshape(8, 4))
    if tensor is not None:
        writer.add_tensor("blk.0.attn_q.weight", tensor, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _refused(path: str, *words: str) -> None:
    with pytest.raises(StageError) as err:
        gguf.inspect(path)
    message = str(err.value)
    assert message.startswith(f"model.path={path}:"), message
    for word in words:
        assert word in message, message


def test_a_valid_file_is_read(tmp_path: Path):
    info = gguf.inspect(str(_write(tmp_path / "ok.gguf")))
    assert (info.architecture, info.tensor_types) == ("llama", ("F32",))


def test_missing_file(tmp_path: Path):
    _refused(str(tmp_path / "absent.gguf"), "no such file")


def test_not_gguf(tmp_path: Path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x08\x00\x00\x00{}")
    _refused(str(path), "not a GGUF file", "model.source=local")


@pytest.mark.parametrize("keep", [60, -40])
def test_truncated(tmp_path: Path, keep: int):
    whole = _write(tmp_path / "whole.gguf").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole[:keep])
    _refused(str(cut), "damaged or truncated")


def test_truncated_inside_tensor_data(tmp_path: Path):
    """Cut in the padding-free tail of the last tensor: the reader may map it, the size check may not pass."""
    path = _write(tmp_path / "whole.gguf", tensor=np.zeros((64, 64), np.float32))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 4096])
    _refused(str(path), "truncated")


def test_unsupported_architecture(tmp_path: Path):
    _refused(str(_write(tmp_path / "rwkv.gguf", arch="rwkv6")), "'rwkv6' is not supported", "llama")


def test_unsupported_tensor_type(tmp_path: Path):
    _, type_size = GGML_QUANT_SIZES[Q.Q8_1]
    path = _write(tmp_path / "q81.gguf", tensor=np.zeros((4, type_size), np.uint8), raw_dtype=Q.Q8_1)
    _refused(str(path), "['Q8_1']", "cannot be dequantized")


def test_package_that_is_not_installed():
    _refused("pkg:no_such_package_here/model.gguf", "'no_such_package_here' is not installed", "make setup")


def test_source_gguf_needs_a_path():
    with pytest.raises(ConfigError, match="model.path"):
        compose(["model=smollm2_135m", "model.path=null"])


def test_shipped_smollm2_file_matches_its_config():
    """The wheel pinned in requirements/models.txt holds the layout conf/model/smollm2_135m.yaml declares."""
    model = compose(["model=smollm2_135m"]).model
    info = gguf.inspect(model.path)
    assert info.architecture == model.architecture["model_type"]
    assert "<|im_start|>" in (info.chat_template or "")
    fields = GGUFReader(info.path).fields
    arch = info.architecture
    layout = {
        "hidden_size": f"{arch}.embedding_length",
        "intermediate_size": f"{arch}.feed_forward_length",
        "num_hidden_layers": f"{arch}.block_count",
        "num_attention_heads": f"{arch}.attention.head_count",
        "num_key_value_heads": f"{arch}.attention.head_count_kv",
        "max_position_embeddings": f"{arch}.context_length",
    }
    for key, field in layout.items():
        assert int(fields[field].contents()) == model.architecture[key], key
    assert len(fields["tokenizer.ggml.tokens"].contents()) == model.architecture["vocab_size"]
