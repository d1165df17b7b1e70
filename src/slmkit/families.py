"""The model families a GGUF checkpoint may come from: one row per family, the one table the kit reads.

A row says how a GGUF file of that family becomes a trainable, buildable model: the GGUF architecture name
(`general.architecture`) and the transformers model_type it loads as, the class ModelBuilder dispatches on,
the LoRA targets (every linear projection of the layout), where its chat template comes from, how tied
embeddings are handled, whether `builder.adapter=separate` builds, and the config fields ModelBuilder
(onnxruntime-genai 0.14.1) reads under names transformers 5.x no longer writes (`builder_fields`).

A family whose chain fails is listed with `refused` (why): a GGUF file of it is refused when the config is
composed, before any training. tests/test_families.py runs every supported row through base, train,
merge and quantize (tiny layouts, random weights); adding a family is one row here and one entry there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Family:
    name: str  # the family, as docs/models.md lists it
    gguf_architecture: str  # general.architecture in the GGUF file
    model_type: str  # transformers' model_type of the converted model (config.json)
    hf_class: str  # config.architectures[0]: the class ModelBuilder dispatches on
    # Every linear projection of one decoder layer: the LoRA targets a GGUF model of this family gets.
    target_modules: tuple[str, ...]
    # Where the chat template of the converted folder comes from (the GGUF file's tokenizer.chat_template).
    chat_template: str = "the GGUF file's tokenizer.chat_template (the base stage copies it)"
    # Tied embeddings: transformers ties the LM head when the file has no output.weight tensor; ModelBuilder
    # reads config.tie_word_embeddings. The same for every family here.
    tied_embeddings: str = "from the file: no output.weight tensor means tied"
    separate_adapter: bool = True  # builder.adapter=separate builds (LoRA branches kept beside the base)
    # config.json fields the base stage adds for ModelBuilder: name -> (how it is derived, see builder_values).
    builder_fields: dict[str, str] = field(default_factory=dict)
    refused: str | None = None  # why this family cannot run the chain; None: supported
    # Packed projections: one linear layer whose output ModelBuilder splits, naming the LoRA branch of each
    # part after the part (slmkit.olive_config keeps every such branch out of int4).
    packed: dict[str, tuple[str, ...]] = field(default_factory=dict)


LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

FAMILIES: tuple[Family, ...] = (
    Family("llama", "llama", "llama", "LlamaForCausalLM", LLAMA_TARGETS),
    Family("qwen2", "qwen2", "qwen2", "Qwen2ForCausalLM", LLAMA_TARGETS),
    Family("qwen3", "qwen3", "qwen3", "Qwen3ForCausalLM", LLAMA_TARGETS),
    Family(
        "phi3",
        "phi3",
        "phi3",
        "Phi3ForCausalLM",
        ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
        # The GGUF header has no original context length: transformers leaves Phi3Config's 4096, and
        # ModelBuilder takes any other max_position_embeddings for a LongRoPE model (KeyError 'multi_cache').
        builder_fields={"original_max_position_embeddings": "max_position_embeddings"},
        packed={"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")},
    ),
    Family(
        "gemma2",
        "gemma2",
        "gemma2",
        "Gemma2ForCausalLM",
        LLAMA_TARGETS,
        # ModelBuilder builds it (an fp32 build gives transformers' logits); the tokenizer does not carry over.
        refused="onnxruntime-genai 0.14.1 tokenizes the GemmaTokenizer folder converted from the file "
        "differently from transformers (no BOS token, other pieces; measured on a tiny Gemma-2 file): the "
        "built model would read prompts other than the ones it was trained on",
    ),
    Family(
        "gemma3",
        "gemma3",
        "gemma3_text",
        "Gemma3ForCausalLM",
        LLAMA_TARGETS,
        refused="ModelBuilder (onnxruntime-genai 0.14.1) builds Gemma-3 from config.rope_local_base_freq and "
        "config.rope_theta, which transformers 5.x folds into rope_parameters when it loads config.json "
        "(AttributeError: no attribute 'rope_local_base_freq'): no config field can carry them",
    ),
    Family(
        "mistral",
        "mistral",
        "mistral",
        "MistralForCausalLM",
        LLAMA_TARGETS,
        refused="transformers cannot load a GGUF file whose architecture is 'mistral' (the gguf package has no "
        "tensor-name map for it); llama.cpp writes Mistral-7B files as 'llama', and those load as llama",
    ),
    Family(
        "starcoder2",
        "starcoder2",
        "starcoder2",
        "Starcoder2ForCausalLM",
        ("q_proj", "k_proj", "v_proj", "o_proj", "c_fc", "c_proj"),
        refused="ModelBuilder (onnxruntime-genai 0.14.1) has no Starcoder2 builder: the quantize stage cannot build it",
    ),
)

BY_ARCHITECTURE = {f.gguf_architecture: f for f in FAMILIES}


def supported() -> tuple[Family, ...]:
    return tuple(f for f in FAMILIES if f.refused is None)


def for_architecture(architecture: str) -> Family | None:
    """The family of a GGUF file's general.architecture, or None when the table has no row for it."""
    return BY_ARCHITECTURE.get(architecture)


def for_model_type(model_type: str) -> Family | None:
    return next((f for f in FAMILIES if f.model_type == model_type), None)


def refusal(architecture: str) -> str | None:
    """Why a GGUF file of this architecture cannot be fine-tuned here, or None when it can."""
    family = for_architecture(architecture)
    names = ", ".join(f.gguf_architecture for f in supported())
    if family is None:
        return f"architecture '{architecture}' is not a family slmkit supports (supported: {names})"
    if family.refused:
        return f"architecture '{architecture}' ({family.name}) is refused: {family.refused} (supported: {names})"
    return None


def packed_parts() -> dict[str, tuple[str, ...]]:
    """Every family's packed projections and their parts (the tiny Phi-3 and hub Phi-3 models included)."""
    return {name: parts for f in FAMILIES for name, parts in f.packed.items()}


def builder_values(family: Family, config: Any) -> dict[str, Any]:
    """The config.json fields ModelBuilder needs for this family, from the transformers config."""
    values = {}
    for name, source in family.builder_fields.items():
        values[name] = _derive(source, config)
    return values


def _derive(source: str, config: Any) -> Any:
    """`source` is a dotted path into the config, e.g. rope_parameters.sliding_attention.rope_theta."""
    value: Any = config
    for part in source.split("."):
        value = value[part] if isinstance(value, dict) else getattr(value, part)
    return value
