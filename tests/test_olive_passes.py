"""slmkit's LoRA passes: logits only where the loss reads them, the same loss and gradients as Olive's."""

from __future__ import annotations

import pytest
import torch
from olive.data.constants import IGNORE_INDEX
from olive.package_config import OlivePackageConfig
from olive.passes.pytorch import lora as olive_lora
from peft import LoraConfig, get_peft_model
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from slmkit import olive_config, olive_passes
from slmkit.olive_data import tokenize_pair
from slmkit.tiny import seed_everything

PAIRS = [
    ("### Text: the flight was cancelled\n### The tone is:\n", "Sadness</s>"),
    ("### Text: a surprise party, for me?\n### The tone is:\n", "Surprise</s>"),
    ("### Text: ok\n### The tone is:\n", "Joy</s>"),
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A real byte-level BPE tokenizer, trained here on the phrases (no hub)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<pad>", "</s>"])
    tok.train_from_iterator([p + c for p, c in PAIRS] * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    path = tmp_path_factory.mktemp("tok")
    fast.save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


@pytest.fixture
def batch(tokenizer):
    rows = [tokenize_pair(tokenizer, p, c, 128) for p, c in PAIRS]
    return [{k: torch.tensor(v) for k, v in row.items()} for row in rows]


def lora_model(vocab: int):
    seed_everything(0)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero: make the adapter do something
            torch.nn.init.normal_(param, std=0.02)
    return model


def test_collate_keeps_the_positions_that_predict_a_label(batch, tokenizer):
    full = olive_lora.LoRA.collate_batch(batch, tokenizer)
    kept = olive_passes.collate_completion(batch, tokenizer)
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(kept[key], full[key])  # Olive's batch, unchanged
    labels = full["labels"]
    # Position p is kept exactly when some row's token p + 1 is a label.
    wanted = [p for p in range(labels.shape[1] - 1) if (labels[:, p + 1] != IGNORE_INDEX).any()]
    assert kept["logits_to_keep"].tolist() == wanted
    assert len(wanted) < labels.shape[1] // 2  # the prompts are most of the batch
    for row in range(labels.shape[0]):
        for i, p in enumerate(wanted):
            assert kept["shift_labels"][row, i] == labels[row, p + 1]


def test_same_loss_and_gradients_as_olives_full_batch(batch, tokenizer):
    grads = {}
    losses = {}
    for name, collate in (("full", olive_lora.LoRA.collate_batch), ("kept", olive_passes.collate_completion)):
        model = lora_model(len(tokenizer))
        loss = model(**collate(batch, tokenizer)).loss
        loss.backward()
        losses[name] = loss.item()
        grads[name] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert losses["kept"] == pytest.approx(losses["full"], rel=1e-6)
    assert grads["kept"].keys() == grads["full"].keys() and grads["full"]
    for name, grad in grads["full"].items():
        torch.testing.assert_close(grads["kept"][name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_a_model_without_logits_to_keep_trains_on_full_batches(tokenizer):
    class Legacy(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None, labels=None):
            raise AssertionError("not called")

    assert olive_passes.takes_completion_inputs(lora_model(len(tokenizer)))
    assert not olive_passes.takes_completion_inputs(Legacy())


@pytest.mark.parametrize("method", sorted(olive_config.OLIVE_PASS))
def test_each_pass_is_registered_as_its_olive_parent(method: str):
    """The package config resolves slmkit's pass names to the subclasses, with the parent's registration."""
    name = olive_config.OLIVE_PASS[method]
    config = olive_passes.package_config()
    package = OlivePackageConfig.parse_file_or_obj(config)
    cls = package.import_pass_module(name)
    assert cls is getattr(olive_passes, name)
    parent = cls.__mro__[2]
    assert issubclass(cls, parent) and parent.__module__ == olive_lora.__name__
    default = OlivePackageConfig.load_default_config().passes[parent.__name__.lower()]
    assert package.passes[name.lower()].extra_dependencies == default.extra_dependencies
    # Olive's own passes are all still there (the stage's other passes resolve as before).
    assert set(OlivePackageConfig.load_default_config().passes) <= set(package.passes)
