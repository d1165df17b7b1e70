"""Load a fine-tuned model (int4 ONNX via onnxruntime-genai, or a PyTorch folder) and classify or generate."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from slmkit.config import DECODINGS, DataConfig
from slmkit.prompt import build_prompt, label_suffix, parse_output, stop_marker

# Written into every model folder the pipeline ships, so a folder is usable on its own.
PROMPT_FILE = "slmkit_prompt.json"
# DECODINGS: stop = greedy generation cut at end-of-sequence or the template's stop marker, then parsed
# (may be invalid); constrained = greedy decoding restricted to the label set's token sequences.
# Measured on the tiny model (README, "Evaluation"): constrained decoding is never worse and never invalid.
DEFAULT_DECODING = "constrained"


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


def pick_label(candidates: list[list[int]], end_id: int, logits, advance) -> int:
    """Greedy decoding restricted to `candidates` (token sequences); returns the chosen index.

    `logits` scores the next token after the prompt; `advance(token)` appends a token and returns the
    next logits. Once one candidate is left the rest is forced, so most labels cost one forward pass.
    `end_id` (the token that ends a label) decides when one label is a prefix of another.
    """
    alive = list(range(len(candidates)))
    pos = 0
    while True:
        options: dict[int, list[int]] = {}
        finished = [i for i in alive if len(candidates[i]) == pos]
        for i in alive:
            if len(candidates[i]) > pos:
                options.setdefault(candidates[i][pos], []).append(i)
        if finished and (not options or logits[end_id] >= max(logits[t] for t in options)):
            return finished[0]
        token = max(options, key=lambda t: float(logits[t]))
        alive = options[token]
        if len(alive) == 1:
            return alive[0]
        logits = advance(token)
        pos += 1


def label_token_ids(encode, data: DataConfig, prompt: str, eos_id: int) -> tuple[list[list[int]], int]:
    """Each label's token ids as the model writes them after `prompt`, and the id that ends a label.

    Encoded in context (prompt + label, minus the prompt's ids) because BPE merges across the seam.
    """
    head = encode(prompt)
    candidates = []
    for label in data.labels:
        full = encode(prompt + label)
        candidates.append(full[len(head) :] if full[: len(head)] == head else encode(label))
    end_id = eos_id
    suffix = label_suffix(data)
    if suffix:
        with_label = encode(prompt + data.labels[0])
        after = encode(prompt + data.labels[0] + suffix)[len(with_label) :]
        end_id = after[0] if after else eos_id
    return candidates, end_id


class GenaiModel:
    """An onnxruntime-genai model folder (genai_config.json), decoded greedily."""

    kind = "onnx"

    def __init__(self, path: Path):
        import onnxruntime_genai as og

        self._og = og
        self.model = og.Model(str(path))
        self.tokenizer = og.Tokenizer(self.model)
        eos = json.loads((Path(path) / "genai_config.json").read_text(encoding="utf-8"))["model"]["eos_token_id"]
        self.eos_id = int(eos[0] if isinstance(eos, list) else eos)

    def encode(self, text: str) -> list[int]:
        return [int(i) for i in self.tokenizer.encode(text)]

    def constrained(self, prompt: str, data: DataConfig) -> str:
        """The label that greedy decoding restricted to the label set writes after `prompt`."""
        og = self._og
        candidates, end_id = label_token_ids(self.encode, data, prompt, self.eos_id)
        ids = self.encode(prompt)
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(ids) + max(map(len, candidates)) + 1, do_sample=False)
        gen = og.Generator(self.model, params)
        gen.append_tokens(ids)

        def advance(token: int):
            gen.append_tokens([token])
            return gen.get_logits()[0, -1]

        return data.labels[pick_label(candidates, end_id, gen.get_logits()[0, -1], advance)]

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

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def constrained(self, prompt: str, data: DataConfig) -> str:
        """The label that greedy decoding restricted to the label set writes after `prompt`."""
        torch = self._torch
        candidates, end_id = label_token_ids(self.encode, data, prompt, self.tokenizer.eos_token_id)
        ids = self.encode(prompt)

        def forward(tokens: list[int]):
            with torch.no_grad():
                return self.model(input_ids=torch.tensor([tokens])).logits[0, -1]

        def advance(token: int):
            ids.append(token)
            return forward(ids)

        return data.labels[pick_label(candidates, end_id, forward(ids), advance)]

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

    def __init__(
        self,
        model: GenaiModel | TorchModel,
        data: DataConfig,
        max_new_tokens: int = 8,
        decoding: str = DEFAULT_DECODING,
    ):
        if decoding not in DECODINGS:
            raise ValueError(f"decoding {decoding!r}: use one of {', '.join(DECODINGS)}")
        self.model = model
        self.data = data
        self.max_new_tokens = max_new_tokens
        self.decoding = decoding

    def classify(self, texts: list[str], decoding: str | None = None) -> list[Prediction]:
        """One prediction per text; `decoding` overrides the classifier's (stop | constrained)."""
        decoding = decoding or self.decoding
        stop = stop_marker(self.data)
        preds = []
        for text in texts:
            prompt = build_prompt(self.data, text)
            if decoding == "constrained":
                out = self.model.constrained(prompt, self.data)
            else:
                out = self.model.generate(prompt, self.max_new_tokens, stop=stop)
            preds.append(Prediction(text=text, label=parse_output(self.data, out), output=out))
        return preds

    def chat(self, message: str, max_new_tokens: int = 64, template: bool = True) -> str:
        """Free generation, greedy: `message` inside the training prompt (up to its stop marker), or as is."""
        if template:
            return self.model.generate(build_prompt(self.data, message), max_new_tokens, stop=stop_marker(self.data))
        return self.model.generate(message, max_new_tokens)


def load(
    path: str | Path,
    data: DataConfig | None = None,
    max_new_tokens: int = 8,
    trust_remote_code: bool = False,
    decoding: str = DEFAULT_DECODING,
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
    return Classifier(model, data, max_new_tokens, decoding)
