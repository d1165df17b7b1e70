"""A model's layout without its weights: built on PyTorch's meta device from the config, so LoRA targets
and sizes are checked before any download or training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slmkit.config import Config, ConfigError, ModelConfig


def hf_config(model: ModelConfig) -> Any | None:
    """transformers config of the model: from the tiny sizes, model.architecture, a GGUF file's header or a
    local config.json.

    None for a hub model whose layout is not written in the config (nothing can be checked offline)."""
    from transformers import AutoConfig

    if model.source == "tiny" and model.tiny is not None:
        from slmkit.tiny import phi3_config

        return phi3_config(model.tiny, model.tiny.vocab_size, eos_id=0)
    if model.architecture:
        fields = {k: v for k, v in model.architecture.items() if k not in ("model_type", "num_parameters")}
        # Phi3Config's default pad id (32000) is not a layout field and breaks small vocabularies.
        fields.setdefault("pad_token_id", None)
        try:
            return AutoConfig.for_model(model.architecture["model_type"], **fields)
        except (KeyError, ValueError, TypeError) as err:
            raise ConfigError(f"config key 'model.architecture': cannot build a model config: {err}") from None
    if model.source == "gguf" and model.path:
        from slmkit import gguf

        info = gguf.check_config(model)
        return gguf.layout(info) if info is not None else None
    if model.source == "local" and model.path and (Path(model.path) / "config.json").is_file():
        return AutoConfig.from_pretrained(model.path, trust_remote_code=model.trust_remote_code)
    return None


def meta_model(model: ModelConfig):
    """The model with every tensor on the meta device (no memory, no weights), or None if unknown."""
    import torch
    from transformers import AutoModelForCausalLM

    config = hf_config(model)
    if config is None:
        return None
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=model.trust_remote_code)


def adaptable_modules(net) -> set[str]:
    """Last name components of the layers PEFT's LoRA can adapt (linear and embedding layers)."""
    import torch

    kinds = (torch.nn.Linear, torch.nn.Embedding)
    return {name.rsplit(".", 1)[-1] for name, module in net.named_modules() if name and isinstance(module, kinds)}


def parameter_count(net) -> int:
    return sum(p.numel() for p in net.parameters())


def check(cfg: Config) -> dict[str, Any] | None:
    """Check cfg.lora.target_modules (and model.architecture.num_parameters) against the model's layout.

    A GGUF file (model.source=gguf) is checked first: it exists, is GGUF and of a supported family
    (slmkit.families), and model.architecture (when given) names that family's model_type.

    Returns {"parameters", "modules"} or None when the layout is unknown (hub model without architecture)."""
    from slmkit import gguf

    info = gguf.check_config(cfg.model)
    family = info.family if info is not None else None
    declared = (cfg.model.architecture or {}).get("model_type")
    if family is not None and declared is not None and declared != family.model_type:
        raise ConfigError(
            f"config key 'model.architecture': model_type '{declared}', but model.path={cfg.model.path} is a "
            f"{family.name} file (model_type '{family.model_type}'); fix the fields or set model.architecture=null"
        )
    net = meta_model(cfg.model)
    if net is None:
        return None
    names = adaptable_modules(net)
    targets = cfg.lora.target_modules or []
    missing = sorted(set(targets) - names)
    if missing:
        hint = f"; the {family.name} family's LoRA targets are {list(family.target_modules)}" if family else ""
        raise ConfigError(
            f"config key 'lora.target_modules': {missing} not in model {cfg.model.name}; "
            f"its adaptable layers are {sorted(names)}{hint}"
        )
    count = parameter_count(net)
    expected = (cfg.model.architecture or {}).get("num_parameters")
    if expected is not None and expected != count:
        raise ConfigError(
            f"config key 'model.architecture': these fields build a model of {count:,} parameters, "
            f"but num_parameters says {expected:,}: a layout field is wrong"
        )
    return {"parameters": count, "modules": sorted(names)}


def build_random(model: ModelConfig, tokenizer, seed: int, out_dir: Path) -> int:
    """Save the model of `model.architecture` with random weights (bf16, like the hub checkpoints) and
    `tokenizer` to out_dir; return its parameter count. A real layout at full size, no download."""
    import torch
    from transformers import AutoModelForCausalLM

    config = hf_config(model)
    eos = tokenizer.eos_token_id
    config.bos_token_id = config.eos_token_id = config.pad_token_id = eos
    torch.manual_seed(seed)
    net = AutoModelForCausalLM.from_config(config, torch_dtype=torch.bfloat16)
    net.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return parameter_count(net)
