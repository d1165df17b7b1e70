"""Load a fine-tuned model (int4 ONNX via onnxruntime-genai, or a PyTorch folder) and classify or generate."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from slmkit.config import DataConfig
from slmkit.prompt import build_prompt, parse_output, stop_marker

# Written into every model folder the pipeline ships, so a folder is usable on its own.
PROMPT_FILE = "slmkit_prompt.json"


@dataclass
class Prediction:
    text: str
    label: str | None  # None: the model's output was not one of the labels
    output: str  # raw generated text


def save_prompt_config(data: DataConfig, model_dir: Path) -> None:
    spec = {"template": data.template, "labels": list(data.labels)}
    (model_dir / PROMPT_FILE).write_text(json.dumps(spec, indent=2) + "\n", encoding="utf-8")


def load_prompt_config(model_dir: Path) -> DataConfig:
    path = model_dir / PROMPT_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: {model_dir} is not a model folder written by slmkit")
    spec = json.loads(path.read_text(encoding="utf-8"))
    return DataConfig(path="", labels=spec["labels"], template=spec["template"])


class GenaiModel:
    """An onnxruntime-genai model folder (genai_config.json), decoded greedily."""

    kind = "onnx"

    def __init__(self, path: Path):
        import onnxruntime_genai as og

        self._og = og
        self.model = og.Model(str(path))
        self.tokenizer = og.Tokenizer(self.model)

    def generate(self, prompt: str, max_new_tokens: int, stop: str | None = None) -> str:
        og = self._og
        ids = self.tokenizer.encode(prompt)
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(ids) + max_new_tokens, do_sample=False)
        gen = og.Generator(self.model, params)
        gen.append_tokens(ids)
        out: list[int] = []
        while not gen.is_done():
            gen.generate_next_token()
            out.append(int(gen.get_next_tokens()[0]))
            if stop and stop in self.tokenizer.decode(out):
                break
        return self.tokenizer.decode(out)


class TorchModel:
    """A Hugging Face PyTorch model folder, decoded greedily with `generate`."""

    kind = "pytorch"

    def __init__(self, path: Path, trust_remote_code: bool = False):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self._torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        self.model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code).eval()

    def generate(self, prompt: str, max_new_tokens: int, stop: str | None = None) -> str:
        # add_special_tokens=False: the same token ids as onnxruntime-genai's tokenizer (no BOS).
        enc = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        with self._torch.no_grad():
            out = self.model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=self.tokenizer.pad_token_id,
                stop_strings=[stop] if stop else None,
                tokenizer=self.tokenizer,
            )
        return self.tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


class Classifier:
    """A model plus the prompt it was trained with."""

    def __init__(self, model: GenaiModel | TorchModel, data: DataConfig, max_new_tokens: int = 8):
        self.model = model
        self.data = data
        self.max_new_tokens = max_new_tokens

    def classify(self, texts: list[str]) -> list[Prediction]:
        stop = stop_marker(self.data)
        preds = []
        for text in texts:
            out = self.model.generate(build_prompt(self.data, text), self.max_new_tokens, stop=stop)
            preds.append(Prediction(text=text, label=parse_output(self.data, out), output=out))
        return preds


def load(
    path: str | Path, data: DataConfig | None = None, max_new_tokens: int = 8, trust_remote_code: bool = False
) -> Classifier:
    """Load a model folder: ONNX if it has genai_config.json, else PyTorch. The prompt comes from the folder."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such model folder; run `make finetune` first")
    data = data or load_prompt_config(path)
    model: GenaiModel | TorchModel
    if (path / "genai_config.json").exists():
        model = GenaiModel(path)
    else:
        model = TorchModel(path, trust_remote_code=trust_remote_code)
    return Classifier(model, data, max_new_tokens)
