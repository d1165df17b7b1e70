"""Load a fine-tuned model (int4 ONNX via onnxruntime-genai, or a PyTorch folder) and classify or answer."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from slmkit.config import DECODINGS, DataConfig, is_generative
from slmkit.prompt import (
    build_conversation_prompt,
    build_prompt,
    conversation_turns,
    label_suffix,
    parse_output,
    stop_marker,
)

# Written into every model folder the pipeline ships, so a folder is usable on its own.
log = logging.getLogger(__name__)

PROMPT_FILE = "slmkit_prompt.json"
# DECODINGS: stop = greedy generation cut at end-of-sequence or the template's stop marker, then parsed
# (may be invalid); constrained = greedy decoding restricted to the label set's token sequences.
# Constrained is the default: its answer is always a label (docs/evaluation.md, "Decoding"); stop decoding's
# invalid rate is the opt-in check that a model learned to write a label and stop.
DEFAULT_DECODING = "constrained"
# Phrases per forward pass (evaluate.batch_size in the pipeline); 1 is the one-at-a-time path.
DEFAULT_BATCH_SIZE = 16


@dataclass
class Prediction:
    text: str
    # A classifier's label, None when the output was not one of the labels; a generative model's answer (the
    # text before the template's end-of-turn marker, stripped).
    label: str | None
    output: str  # raw generated text


def save_prompt_config(data: DataConfig, model_dir: Path) -> None:
    # max_chars: the longest phrase the model was trained for; `slmkit serve` refuses longer ones.
    spec = {"template": data.template, "labels": list(data.labels), "max_chars": data.max_chars}
    if is_generative(data):  # a classifier's folder keeps the keys (and bytes) it always had
        spec["answer_tokens"] = data.answer_tokens
        spec["format"] = data.format  # chat: trained on conversations, so the server shows the model all turns
    (model_dir / PROMPT_FILE).write_text(json.dumps(spec, indent=2) + "\n", encoding="utf-8")


def load_prompt_config(model_dir: Path) -> DataConfig:
    path = model_dir / PROMPT_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: {model_dir} is not a model folder written by slmkit")
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from None
    data = DataConfig(path="", labels=spec["labels"], template=spec["template"])
    if "max_chars" in spec:  # folders written before it was recorded keep the default
        data.max_chars = int(spec["max_chars"])
    if "answer_tokens" in spec:
        data.answer_tokens = int(spec["answer_tokens"])
    data.format = spec.get("format", "columns")
    return data


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


def default_threads() -> int:
    """Compute threads when none are asked for: OMP_NUM_THREADS if set (a parallel sweep gives each job its
    share that way), else one per CPU core this process may run on (its affinity, not the host's count)."""
    budget = os.environ.get("OMP_NUM_THREADS", "")
    return int(budget) if budget.isdigit() and int(budget) > 0 else len(os.sched_getaffinity(0))


class Piece(NamedTuple):
    """What one generated token adds to the reply (`stream`): the text it completes, and why decoding ended
    when it is the last token.

    `text` is "" for a token that only starts a character (its bytes complete on a later token) and for an
    end-of-sequence token. `finish_reason` is None until the last piece: "stop" (end-of-sequence, or the
    stop string is in the text) or "length" (max_new_tokens written), as the OpenAI API names them.
    """

    text: str
    finish_reason: str | None = None


class _NeedsMore(Exception):
    """The batch's first-token logits did not settle the label: decode this prompt on its own."""


def _needs_more(token: int):
    raise _NeedsMore


# Operators that quantize activations with one scale per tensor at run time (builder=int8_cpu's dynamic
# quantization): the scale of a batch is its largest value, so a row's result depends on its batch mates.
PER_TENSOR_ACTIVATION_OPS = ("DynamicQuantizeLinear", "DynamicQuantizeMatMul")


def batch_invariant(path: Path) -> bool:
    """Whether a phrase's result in an ONNX model folder is the same in any batch: False when the graph
    quantizes activations per tensor at run time (measured on the shipped data with the int8 build: batched
    in 16s, 5 of 189 test labels differed from one phrase at a time)."""
    import onnx

    graph = onnx.load(str(path / "model.onnx"), load_external_data=False).graph
    return not any(n.op_type in PER_TENSOR_ACTIVATION_OPS for n in graph.node)


class GenaiModel:
    """An onnxruntime-genai model folder (genai_config.json), decoded greedily."""

    kind = "onnx"
    # A batch holds prompts of one token length (_batch_generator says why).
    one_length_batches = True

    def __init__(self, path: Path, threads: int | None = None):
        import onnxruntime_genai as og

        self.og = og
        config = og.Config(str(path))
        # Set always: left to itself, onnxruntime-genai 0.14.1 ran at one thread's speed on 2 cores here.
        options = {"intra_op_num_threads": threads or default_threads(), "inter_op_num_threads": 1}
        config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
        self.model = og.Model(config)
        self.tokenizer = og.Tokenizer(self.model)
        spec = json.loads((Path(path) / "genai_config.json").read_text(encoding="utf-8"))["model"]
        eos = spec["eos_token_id"]
        self.eos_ids = {int(i) for i in eos} if isinstance(eos, list) else {int(eos)}
        self.eos_id = int(eos[0] if isinstance(eos, list) else eos)
        # Prompt and new tokens together at most: a longer generator is refused by onnxruntime-genai.
        self.context_length = int(spec["context_length"])
        self.path = Path(path)
        self.batch_invariant = batch_invariant(self.path)
        # A LoRA adapter loaded at run time (slmkit.adapters): every generator runs with it when set.
        self.adapters = None
        self.adapter: str | None = None

    def with_adapters(self, files: dict[str, Path]) -> dict[str, GenaiModel]:
        """One view of this model per adapter file (name -> .onnx_adapter), all on this one model: the
        weights of the base are in memory once, each view's generators run with its adapter active."""
        import copy

        container = self.og.Adapters(self.model)
        views = {}
        for name, file in files.items():
            container.load(str(file), name)
            view = copy.copy(self)
            view.adapters, view.adapter = container, name
            views[name] = view
        return views

    def with_adapter(self, file: Path, name: str) -> GenaiModel:
        return self.with_adapters({name: file})[name]

    def _generator(self, params):
        gen = self.og.Generator(self.model, params)
        if self.adapter is not None:
            gen.set_active_adapter(self.adapters, self.adapter)
        return gen

    def encode(self, text: str) -> list[int]:
        return [int(i) for i in self.tokenizer.encode(text)]

    def constrained(self, prompt: str, data: DataConfig) -> str:
        """The label that greedy decoding restricted to the label set writes after `prompt`."""
        og = self.og
        candidates, end_id = label_token_ids(self.encode, data, prompt, self.eos_id)
        ids = self.encode(prompt)
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(ids) + max(map(len, candidates)) + 1, do_sample=False)
        gen = self._generator(params)
        gen.append_tokens(ids)

        def advance(token: int):
            gen.append_tokens([token])
            return gen.get_logits()[0, -1]

        return data.labels[pick_label(candidates, end_id, gen.get_logits()[0, -1], advance)]

    def _batch_generator(self, rows: list[list[int]], new_tokens: int):
        """A generator fed a batch of prompts of one token length (no padding).

        One length, because with builder.prune_lm_head the model scores only the batch's last column, which
        would be padding for a shorter row; and without it 0.14.1's attention (GroupQueryAttention) moved a
        left-padded row's logits by ~0.2. Classifier.classify forms such batches.
        """
        import numpy as np

        if len({len(row) for row in rows}) != 1:
            raise ValueError(
                f"an onnxruntime-genai batch holds prompts of one token length, got {sorted({len(r) for r in rows})}"
            )
        og = self.og
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(rows[0]) + new_tokens, do_sample=False, batch_size=len(rows))
        gen = self._generator(params)
        gen.append_tokens(np.asarray(rows, dtype=np.int32))
        return gen

    def first_logits(self, prompts: list[list[int]]):
        """Next-token logits after each prompt, one forward pass for the whole batch (rows x vocab)."""
        return self._batch_generator(prompts, 1).get_logits()[:, -1]

    def generate_batch(self, prompts: list[str], max_new_tokens: int, stop: str | None = None) -> list[str]:
        """`generate` for many prompts at once: runs until every row has ended or written `stop`."""
        rows = [self.encode(p) for p in prompts]
        gen = self._batch_generator(rows, max_new_tokens)
        outs: list[list[int]] = [[] for _ in rows]
        open_rows = set(range(len(rows)))
        while open_rows and not gen.is_done():
            gen.generate_next_token()
            tokens = gen.get_next_tokens()
            for i in sorted(open_rows):
                outs[i].append(int(tokens[i]))
                # Same ends as one at a time: the row's end-of-sequence token, or the stop marker in its text.
                ended = int(tokens[i]) in self.eos_ids or len(outs[i]) >= max_new_tokens
                if ended or (stop and stop in self.tokenizer.decode(outs[i])):
                    open_rows.discard(i)
        return [self.tokenizer.decode(out) for out in outs]

    def stream(self, prompt: str, max_new_tokens: int, stop: str | None = None) -> Iterator[Piece]:
        """Greedy generation after `prompt`, one Piece per token as it is decoded, until end-of-sequence,
        `stop` in the text, or max_new_tokens. Closing the iterator early stops decoding.

        onnxruntime-genai's token stream holds back the bytes of a character split over tokens until it is
        complete, so the pieces join to the text the tokenizer decodes from all the tokens, except that a
        character still incomplete when max_new_tokens ends decoding is left out (decode gives U+FFFD).
        """
        og = self.og
        ids = self.tokenizer.encode(prompt)
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(ids) + max_new_tokens, do_sample=False)
        gen = self._generator(params)
        gen.append_tokens(ids)
        decoder = self.tokenizer.create_stream()
        text, count = "", 0
        while not gen.is_done():
            gen.generate_next_token()
            token = int(gen.get_next_tokens()[0])
            count += 1
            piece = decoder.decode(token)
            text += piece
            if token in self.eos_ids or (stop and stop in text):
                yield Piece(piece, "stop")
                return
            # is_done without end-of-sequence: the generator reached max_length (prompt + max_new_tokens).
            yield Piece(piece, "length" if count >= max_new_tokens or gen.is_done() else None)

    def generate(self, prompt: str, max_new_tokens: int, stop: str | None = None) -> str:
        """The text `stream` writes, whole."""
        return "".join(piece.text for piece in self.stream(prompt, max_new_tokens, stop))


class TorchModel:
    """A Hugging Face PyTorch model folder, decoded greedily with `generate`."""

    kind = "pytorch"
    # Left padding with a mask and position ids: rows of any lengths batch together.
    one_length_batches = False

    def __init__(
        self, path: Path, trust_remote_code: bool = False, threads: int | None = None, dtype: str | None = None
    ):
        """`dtype`: load the weights as this torch dtype (e.g. bfloat16); None: as saved (fp32 here)."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(threads or default_threads())  # process-wide in PyTorch
        self.threads = torch.get_num_threads()
        self._torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        kwargs = {"dtype": getattr(torch, dtype)} if dtype else {}
        self._model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs).eval()
        self.adapter: str | None = None  # PEFT adapter this view runs with (with_adapters)
        # Padded rows agree with a row alone up to fp32 rounding (the labels do: a default test); in bf16 not.
        self.batch_invariant = dtype in (None, "float32")
        self.eos_id = self.tokenizer.eos_token_id
        # What ends generation: the model's generation config (one id or several), as `generate` reads it.
        eos = self.model.generation_config.eos_token_id
        eos = self.eos_id if eos is None else eos
        self.eos_ids = {int(i) for i in eos} if isinstance(eos, list) else {int(eos)}
        # Prompt and new tokens together at most: the positions the model was built for.
        self.context_length = int(getattr(self.model.config, "max_position_embeddings", None) or 2**31)
        # Padding is masked out, so any id does; a tokenizer without a pad token pads with end-of-sequence.
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_id

    @property
    def model(self):
        """The network; with an adapter (with_adapters), that adapter made the active one first."""
        if self.adapter is not None:
            self._model.set_adapter(self.adapter)
        return self._model

    def with_adapters(self, folders: dict[str, Path]) -> dict[str, TorchModel]:
        """One view of this model per PEFT adapter folder (name -> folder), all on this one base, with PEFT's
        own multi-adapter model: the counterpart of GenaiModel.with_adapters, to compare the two backends."""
        import copy

        from peft import PeftModel

        views = {}
        for name, folder in folders.items():
            if isinstance(self._model, PeftModel):
                self._model.load_adapter(str(folder), adapter_name=name)
            else:
                self._model = PeftModel.from_pretrained(self._model, str(folder), adapter_name=name).eval()
            views[name] = copy.copy(self)
            views[name].adapter = name
        for view in views.values():
            view._model = self._model  # every view on the one PeftModel holding all the adapters
        return views

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def constrained(self, prompt: str, data: DataConfig) -> str:
        """The label that greedy decoding restricted to the label set writes after `prompt`."""
        torch = self._torch
        candidates, end_id = label_token_ids(self.encode, data, prompt, self.eos_id)
        ids = self.encode(prompt)

        def forward(tokens: list[int]):
            with torch.no_grad():
                return self.model(input_ids=torch.tensor([tokens])).logits[0, -1].float()

        def advance(token: int):
            ids.append(token)
            return forward(ids)

        return data.labels[pick_label(candidates, end_id, forward(ids), advance)]

    def _left_padded(self, rows: list[list[int]]):
        """Input ids, attention mask and position ids of a left-padded batch.

        Left padding keeps every row's last token in the last column; the position ids restart at 0 on each
        row's first real token, so a padded row sees the positions it would see alone.
        """
        torch = self._torch
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, width - len(row) :] = torch.tensor(row)
            mask[i, width - len(row) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return ids, mask, positions

    def first_logits(self, prompts: list[list[int]]):
        """Next-token logits after each prompt, one forward pass for the whole batch (rows x vocab)."""
        ids, mask, positions = self._left_padded(prompts)
        with self._torch.no_grad():
            return self.model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1].float()

    def generate_batch(self, prompts: list[str], max_new_tokens: int, stop: str | None = None) -> list[str]:
        """`generate` for many prompts at once (left-padded); each row stops at end-of-sequence or `stop`."""
        rows = [self.encode(p) for p in prompts]
        ids, mask, _ = self._left_padded(rows)
        with self._torch.no_grad():
            out = self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=self.pad_id,
                stop_strings=[stop] if stop else None,
                tokenizer=self.tokenizer,
            )
        return [self.tokenizer.decode(row[ids.shape[1] :], skip_special_tokens=True) for row in out]

    def stream(self, prompt: str, max_new_tokens: int, stop: str | None = None) -> Iterator[Piece]:
        """Greedy generation after `prompt`, one Piece per token, ending as GenaiModel.stream does.

        A plain loop over the model with its key-value cache rather than `generate`, which hands tokens out
        only through a callback. A piece is the new part of the decoded text; a character whose bytes are
        not all written yet decodes to U+FFFD and is held back until they are (the last piece flushes it).
        """
        torch = self._torch
        # add_special_tokens=False: the same token ids as onnxruntime-genai's tokenizer (no BOS).
        ids = torch.tensor([self.encode(prompt)])
        cache, out, sent = None, [], ""
        for count in range(1, max_new_tokens + 1):
            with torch.no_grad():
                result = self.model(input_ids=ids, past_key_values=cache, use_cache=True)
            cache = result.past_key_values
            token = int(result.logits[0, -1].argmax())
            out.append(token)
            ids = torch.tensor([[token]])
            text = self.tokenizer.decode(out, skip_special_tokens=True)
            reason = "stop" if token in self.eos_ids or (stop and stop in text) else None
            reason = reason or ("length" if count == max_new_tokens else None)
            piece = text[len(sent) :] if reason or not text.endswith("\ufffd") else ""
            sent += piece
            yield Piece(piece, reason)
            if reason:
                return

    def generate(self, prompt: str, max_new_tokens: int, stop: str | None = None) -> str:
        """The text `stream` writes, whole."""
        return "".join(piece.text for piece in self.stream(prompt, max_new_tokens, stop))


class Classifier:
    """A model plus the prompt it was trained with: a classifier (data.labels) or a generative model (no labels:
    `generate` answers in free text, greedy, up to data.answer_tokens tokens)."""

    def __init__(
        self,
        model: GenaiModel | TorchModel,
        data: DataConfig,
        max_new_tokens: int = 8,
        decoding: str = DEFAULT_DECODING,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ):
        if decoding not in DECODINGS:
            raise ValueError(f"decoding {decoding!r}: use one of {', '.join(DECODINGS)}")
        self.model = model
        self.data = data
        self.generative = is_generative(data)
        # A generative model writes free text: stop decoding (constrained has no label set to choose from).
        self.max_new_tokens = data.answer_tokens if self.generative else max_new_tokens
        self.decoding = "stop" if self.generative else decoding
        if batch_size < 1:
            raise ValueError(f"batch_size {batch_size}: must be >= 1")
        self.batch_size = batch_size
        # True only to measure what batching a batch-dependent model would give (make bench-formats).
        self.allow_batch_variance = False
        self.batch_invariant = getattr(model, "batch_invariant", True)
        if not self.batch_invariant:
            log.info("this model's results depend on the batch (activations quantized per tensor): one prompt a pass")

    def classify(
        self, texts: list[str], decoding: str | None = None, batch_size: int | None = None, progress=None
    ) -> list[Prediction]:
        """One prediction per text; `decoding` overrides the classifier's (stop | constrained).

        Texts go through the model `batch_size` at a time (the classifier's by default; 1 = one at a time,
        the reference path the batched one must match). `progress(n)` is called after each batch of n.
        """
        prompts = [build_prompt(self.data, t) for t in texts]
        return self._predict(texts, prompts, decoding, batch_size, progress)

    def _predict(self, texts: list, prompts: list[str], decoding, batch_size, progress) -> list[Prediction]:
        decoding = "stop" if self.generative else decoding or self.decoding
        size = batch_size or self.batch_size
        preds: list[Prediction | None] = [None] * len(texts)
        for batch in self.batches(prompts, size):
            chunk = [prompts[i] for i in batch]
            outs = self._decode_one(chunk[0], decoding) if size == 1 else self._decode_batch(chunk, decoding)
            for i, out in zip(batch, outs, strict=True):
                preds[i] = Prediction(text=texts[i], label=parse_output(self.data, out), output=out)
            if progress:
                progress(len(batch))
        return preds  # type: ignore[return-value]

    def generate(self, questions: list, batch_size: int | None = None, progress=None) -> list[str]:
        """A generative model's greedy answer to each question (batched like `classify`): a question is a
        string, or a conversation in OpenAI's chat format (a list of {"role", "content"} ending with the
        user's message), whose earlier turns are shown to the model as it was trained on them."""
        if not self.generative:
            raise ValueError(
                f"this model is a classifier ({', '.join(self.data.labels)}): use classify(), or chat() for free text"
            )
        prompts = [build_prompt(self.data, q) if isinstance(q, str) else self.conversation_prompt(q) for q in questions]
        preds = self._predict(questions, prompts, None, batch_size, progress)
        return [p.label or "" for p in preds]

    def conversation_prompt(self, messages: list[dict]) -> str:
        """The prompt for the answer to a conversation's last user message (slmkit.prompt)."""
        system, said = conversation_turns(messages)
        history = list(zip(said[0:-1:2], said[1:-1:2], strict=True))
        return build_conversation_prompt(self.data, said[-1], history, system)

    def batches(self, prompts: list[str], size: int | None = None) -> list[list[int]]:
        """Indices of `prompts`, at most `size` a batch: prompts of similar token lengths together (less
        padding; each row's result does not depend on its neighbours), and of one length where the
        backend needs it (one_length_batches). size 1 keeps the input order; None: the classifier's."""
        size = size or self.batch_size
        if size == 1 or not (self.batch_invariant or self.allow_batch_variance):
            # A model whose rows depend on their batch mates runs one prompt at a time: a label never
            # depends on what else was asked with it (classify, evaluate and serve alike).
            return [[i] for i in range(len(prompts))]
        lengths = [len(self.model.encode(p)) for p in prompts]
        batches: list[list[int]] = []
        for i in sorted(range(len(prompts)), key=lambda i: lengths[i]):
            last = batches[-1] if batches else None
            if last is None or len(last) == size or (self.model.one_length_batches and lengths[last[0]] != lengths[i]):
                batches.append([i])
            else:
                last.append(i)
        return batches

    def _decode_one(self, prompt: str, decoding: str) -> list[str]:
        if decoding == "constrained":
            return [self.model.constrained(prompt, self.data)]
        return [self.model.generate(prompt, self.max_new_tokens, stop=stop_marker(self.data))]

    def _decode_batch(self, prompts: list[str], decoding: str) -> list[str]:
        if decoding == "stop":
            return self.model.generate_batch(prompts, self.max_new_tokens, stop=stop_marker(self.data))
        return [self.data.labels[i] for i in self.constrained_batch(prompts)[0]]

    def constrained_batch(self, prompts: list[str]) -> tuple[list[int], list[list[float] | None]]:
        """Constrained decoding for a batch: (label index per prompt, label scores per prompt or None).

        One forward pass decides every prompt whose best candidate first token is unique among the labels
        (the usual case); a prompt whose choice needs a further token (labels sharing a first token) is
        decoded alone, the same as one at a time. A padded row's logits equal its logits alone up to float
        rounding (tests/test_batch.py), so only an exact tie between two labels could differ. The score is a
        softmax over the labels' first-token logits, from the same forward pass; None when two labels share
        a first token (the first token cannot tell them apart).
        """
        import numpy as np

        encoded = [self.model.encode(p) for p in prompts]
        logits = self.model.first_logits(encoded)
        picks, scores = [], []
        for prompt, row in zip(prompts, logits, strict=True):
            row = np.asarray(row.float() if hasattr(row, "float") else row, dtype=np.float64)
            candidates, end_id = label_token_ids(self.model.encode, self.data, prompt, self.model.eos_id)
            try:
                picks.append(pick_label(candidates, end_id, row, _needs_more))
            except _NeedsMore:
                picks.append(self.data.labels.index(self.model.constrained(prompt, self.data)))
            firsts = [c[0] if c else end_id for c in candidates]
            if len(set(firsts)) == len(firsts):
                z = row[firsts] - row[firsts].max()
                scores.append([round(float(x), 4) for x in np.exp(z) / np.exp(z).sum()])
            else:
                scores.append(None)
        return picks, scores

    def chat(self, message: str, max_new_tokens: int = 64, template: bool = True) -> str:
        """Free generation, greedy: `message` inside the training prompt (up to its stop marker), or as is."""
        return "".join(piece.text for piece in self.chat_stream(message, max_new_tokens, template))

    def chat_stream(self, message: str, max_new_tokens: int = 64, template: bool = True) -> Iterator[Piece]:
        """`chat` one token at a time, as it is decoded (Piece)."""
        if template:
            return self.model.stream(build_prompt(self.data, message), max_new_tokens, stop=stop_marker(self.data))
        return self.model.stream(message, max_new_tokens)


def load(
    path: str | Path,
    data: DataConfig | None = None,
    max_new_tokens: int = 8,
    trust_remote_code: bool = False,
    decoding: str = DEFAULT_DECODING,
    batch_size: int = DEFAULT_BATCH_SIZE,
    threads: int | None = None,
    ungated: bool = False,
    adapters: dict[str, str | Path] | None = None,
) -> Classifier | dict[str, Classifier]:
    """Load a model folder: ONNX if it has genai_config.json, else PyTorch. The prompt comes from the folder.

    `threads`: compute threads (None: default_threads(), one per core unless OMP_NUM_THREADS says otherwise).
    A model the pipeline's quantize stage built loads only with a passed parity-gate verdict (slmkit.gate;
    NotShipped otherwise) unless `ungated`.

    `adapters` (name -> path): fine-tunes that run on `path` as their shared base, loaded once; returns one
    Classifier per name, each with its adapter's own prompt. ONNX: `path` is the base the `adapter` stage
    writes and each path an adapter folder it writes (slmkit.adapters checks that they belong together and
    that the adapter's model passed its gate). PyTorch: `path` is a Hugging Face base model and each path a
    PEFT adapter folder (the train stage's), run with PEFT's multi-adapter model.
    """
    from slmkit import gate

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such model folder; run `make finetune` first")
    if adapters:
        return _load_adapters(
            path, adapters, data, max_new_tokens, trust_remote_code, decoding, batch_size, threads, ungated
        )
    if not ungated:
        gate.check(path)
    data = data or load_prompt_config(path)
    model: GenaiModel | TorchModel
    if (path / "genai_config.json").exists():
        model = GenaiModel(path, threads=threads)
    else:
        model = TorchModel(path, trust_remote_code=trust_remote_code, threads=threads)
    return Classifier(model, data, max_new_tokens, decoding, batch_size)


def _load_adapters(
    path: Path,
    adapters: dict[str, str | Path],
    data: DataConfig | None,
    max_new_tokens: int,
    trust_remote_code: bool,
    decoding: str,
    batch_size: int,
    threads: int | None,
    ungated: bool,
) -> dict[str, Classifier]:
    """`load` with adapters: {name: Classifier} on one base model in memory."""
    from slmkit import adapters as ad
    from slmkit.gate import NotShipped

    views: dict[str, GenaiModel | TorchModel]
    if (path / "genai_config.json").exists():
        base = ad.read_base(path)
        if ad.base_fingerprint(path) != base["sha256"]:
            raise ad.AdapterMismatch(
                f"{path}: its graph files are not the ones {ad.BASE_MANIFEST} describes (changed since the "
                "`adapter` stage wrote them); rerun `make adapter`"
            )
        found = {name: ad.resolve(name, p) for name, p in adapters.items()}
        for adapter in found.values():
            ad.check(path, adapter, base)
            if not ungated and (problem := ad.gate_problem(adapter)):
                raise NotShipped(problem)
        folders = {name: a.folder for name, a in found.items()}
        views = GenaiModel(path, threads=threads).with_adapters({name: a.file for name, a in found.items()})
    else:
        folders = {name: Path(p) for name, p in adapters.items()}
        for name, folder in folders.items():
            if not (folder / "adapter_config.json").is_file():
                raise FileNotFoundError(
                    f"adapter {name!r}: {folder} is not a PEFT adapter folder (no adapter_config.json); on a "
                    "PyTorch base give the train stage's artifacts/train/adapter"
                )
        torch_model = TorchModel(path, trust_remote_code=trust_remote_code, threads=threads)
        views = torch_model.with_adapters(folders)
    return {
        name: Classifier(views[name], data or load_prompt_config(folders[name]), max_new_tokens, decoding, batch_size)
        for name in adapters
    }
