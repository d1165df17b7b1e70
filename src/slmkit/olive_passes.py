"""slmkit's Olive passes: Olive's LoRA, QLoRA and DoRA, scoring only the positions the loss reads.

A causal LM's forward computes logits (hidden size x vocabulary: a fifth of SmolLM2-135M's work per token)
at every position, and the cross-entropy then discards every position whose label is -100: here the
prompt's, which is most of each example (olive_data.py masks it out). These passes hand the model two
more inputs in each batch, both transformers' own:

- `logits_to_keep`: the positions where any row of the batch has a label to predict;
- `shift_labels`: the labels of those positions, already shifted, so the loss needs no full-length logits.

The loss is the same sum over the same tokens (equal to float rounding) and so are the gradients; only the
work on positions that the loss ignores is gone. Everything else is Olive's pass, unchanged: they are
subclasses registered through Olive's own extension point, the package config (`olive run
--package-config`), under the names in olive_config.OLIVE_PASS. A model whose forward does not take
both inputs trains on Olive's full-length batches, with a log line saying so.
"""

from __future__ import annotations

import inspect
import json
import logging
from pathlib import Path
from typing import Any

from olive.data.constants import IGNORE_INDEX
from olive.package_config import OlivePackageConfig
from olive.passes.pytorch import lora as olive_lora

from slmkit.files import write_text
from slmkit.olive_config import OLIVE_PASS

log = logging.getLogger(__name__)

# Where write_package_config puts it, beside the workflow's olive_config.json.
PACKAGE_CONFIG = "olive_package_config.json"


def collate_completion(batch: list[dict], tokenizer) -> dict[str, Any]:
    """Olive's padded batch, plus the positions the loss reads and their (shifted) labels."""
    import torch

    out = olive_lora.LoRA.collate_batch(batch, tokenizer)
    # Position p predicts token p + 1: the label of position p is labels[:, p + 1] (-100 past the end).
    shifted = torch.nn.functional.pad(out["labels"], (0, 1), value=IGNORE_INDEX)[:, 1:]
    keep = (shifted != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)
    out["logits_to_keep"] = keep
    out["shift_labels"] = shifted[:, keep].contiguous()
    return out


def _base_model(model):
    """The transformers model under a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def takes_completion_inputs(model) -> bool:
    """Whether the model's forward takes logits_to_keep and passes other keywords (shift_labels) on."""
    params = inspect.signature(_base_model(model).forward).parameters
    return "logits_to_keep" in params and any(p.kind is p.VAR_KEYWORD for p in params.values())


class _CompletionLoss:
    """Mixin over an Olive LoRA-family pass: its trainer gets collate_completion when the model allows."""

    def train_and_save_new_model(self, model, tokenizer, config, output_model, output_model_path):
        if takes_completion_inputs(model):
            self.collate_batch = collate_completion
        else:
            log.warning(
                "%s's forward takes no logits_to_keep: training on logits at every position (slower, same loss)",
                type(_base_model(model)).__name__,
            )
        return super().train_and_save_new_model(model, tokenizer, config, output_model, output_model_path)


class CompletionLoRA(_CompletionLoss, olive_lora.LoRA):
    """Olive's LoRA pass; the loss's logits only where labels are."""


class CompletionQLoRA(_CompletionLoss, olive_lora.QLoRA):
    """Olive's QLoRA pass; the loss's logits only where labels are."""


class CompletionDoRA(_CompletionLoss, olive_lora.DoRA):
    """Olive's DoRA pass; the loss's logits only where labels are."""


def package_config() -> dict[str, Any]:
    """Olive's own package config plus slmkit's passes, each with its Olive parent's registration."""
    with open(OlivePackageConfig.get_default_config_path(), encoding="utf-8") as f:
        config = json.load(f)
    passes = config["passes"]
    for name in OLIVE_PASS.values():
        parent = globals()[name].__mro__[2].__name__  # (the class, _CompletionLoss, Olive's pass, ...)
        passes[name] = {**passes[parent], "module_path": f"{__name__}.{name}"}
    return config


def write_package_config(folder: Path) -> Path:
    """Write package_config() into `folder` for Olive (`olive run --package-config`); return the file."""
    path = Path(folder) / PACKAGE_CONFIG
    write_text(path, json.dumps(package_config(), indent=2) + "\n")
    return path
