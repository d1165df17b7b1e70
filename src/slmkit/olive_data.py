"""An Olive data component (loaded by Olive as a user_script): prompt/completion pairs, loss on the completion.

Olive's built-in text-generation pre-processing trains on every token. For a classifier that
spends the model's capacity on re-writing the input phrases; here the prompt tokens are masked
out of the loss (labels = -100), so the adapter learns only to write the label and stop.
The prompt and the completion are tokenized separately, exactly as the prompt is at inference.
"""

from __future__ import annotations

import torch
from olive.data.component.dataset import ClassificationDataset
from olive.data.constants import IGNORE_INDEX
from olive.data.registry import Registry

NAME = "slmkit_completion_pre_process"


def tokenize_pair(tokenizer, prompt: str, completion: str, max_len: int) -> dict[str, list[int]]:
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c = tokenizer(completion, add_special_tokens=False)["input_ids"]
    # Keep the whole completion: cut the prompt's start if the pair is too long.
    p = p[max(0, len(p) + len(c) - max_len) :]
    ids = p + c
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [IGNORE_INDEX] * len(p) + c}


@Registry.register_pre_process(NAME)
def completion_pre_process(
    dataset,
    model_name: str,
    max_seq_len: int,
    prompt_col: str = "prompt",
    completion_col: str = "completion",
    trust_remote_code: bool | None = None,
    **kwargs,
):
    from datasets import Dataset as HFDataset
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_name, trust_remote_code=trust_remote_code)
    rows = [tokenize_pair(tokenizer, r[prompt_col], r[completion_col], max_seq_len) for r in dataset]
    columns = {k: [torch.tensor(r[k]) for r in rows] for k in ("input_ids", "attention_mask", "labels")}
    hf_dataset = HFDataset.from_dict(columns)
    hf_dataset.set_format("torch", output_all_columns=True)
    return ClassificationDataset(hf_dataset, "labels")
