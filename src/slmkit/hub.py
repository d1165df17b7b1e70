"""Fetch a pinned Hugging Face hub model (or use a local folder), honouring offline mode."""

from __future__ import annotations

from pathlib import Path

from slmkit.config import ModelConfig
from slmkit.stage import StageError

# Files a Phi-3-class model needs; skips other formats (gguf, onnx, original checkpoints) in the repo.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.py", "*.txt"]


def model_path(model: ModelConfig) -> Path:
    """Local folder holding the model's weights and tokenizer, downloading at the pinned revision if needed."""
    if model.source == "local":
        path = Path(model.path or "")
        if not (path / "config.json").is_file():
            raise StageError(
                f"model.path={model.path}: no config.json there; point model.path at a Hugging Face model folder"
            )
        return path
    if model.source != "hub":
        raise StageError(f"model.source={model.source} is not a downloadable model")

    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    from huggingface_hub.utils import HfHubHTTPError

    try:
        return Path(snapshot_download(repo_id=model.hub_id, revision=model.revision, allow_patterns=ALLOW_PATTERNS))
    except LocalEntryNotFoundError:
        raise StageError(
            f"model {model.hub_id}@{model.revision} is not in the Hugging Face cache and the hub cannot be reached "
            "(offline mode or no network). Download it on a connected machine with "
            f"`huggingface-cli download {model.hub_id} --revision {model.revision}` and copy the cache "
            "(HF_HOME), or set model.source=local with model.path=/path/to/model"
        ) from None
    except HfHubHTTPError as err:
        raise StageError(f"model {model.hub_id}@{model.revision}: hub error: {err}") from None
