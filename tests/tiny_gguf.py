"""Tiny GGUF checkpoints of each family's real layout with random weights, written with the gguf package's
GGUFWriter the way llama.cpp's convert_hf_to_gguf.py writes them (tensor names from gguf's own name map,
llama's rotary permutation of q/k, Gemma's norm offset), so transformers' GGUF loader reads them back.

The tokenizer is the kit's tiny byte-level BPE (slmkit.tiny.train_tokenizer, as experiment=tiny trains
it) on the shipped tone phrases, stored as a GPT-2 style GGUF vocabulary (tokens, merges, token types)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from slmkit.families import Family

REPO_ROOT = Path(__file__).resolve().parents[1]
VOCAB = 600  # an upper bound for the BPE; it differs from every linear width below (ModelBuilder finds
# the LM head by its width)
HIDDEN, LAYERS, HEADS, KV_HEADS, INTERMEDIATE, CONTEXT = 64, 2, 4, 2, 96, 512
ROPE_THETA = 50000.0

# Each family's own chat turn, written into the file as tokenizer.chat_template.
CHAT_TEMPLATES = {
    "chatml": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    "phi3": "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}",
    "gemma": "{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}",
}
TEMPLATE_OF = {"phi3": "phi3", "gemma2": "gemma", "gemma3": "gemma"}
# Untied (an output.weight tensor) for some families, tied for others: both paths of the loader run.
UNTIED = ("phi3", "qwen2", "starcoder2")


def _texts() -> list[str]:
    lines = (REPO_ROOT / "data" / "tones.jsonl").read_text(encoding="utf-8").splitlines()
    texts = [json.loads(line)["phrase"] for line in lines if line.strip()]
    return texts + ["### Text:", "### The tone is:", "Sadness Joy Fear Surprise"]


def tokenizer(family: Family | None = None):
    """The family's kind of tokenizer, tiny and trained on the shipped tone phrases (deterministic):
    SentencePiece-style BPE (spaces as ▁, byte fallback) for Gemma, whose files carry that kind and whose
    transformers tokenizer class reads no other; else the kit's byte-level BPE (slmkit.tiny.train_tokenizer)."""
    if family is not None and family.name in SENTENCEPIECE:
        return _sentencepiece_tokenizer()
    from slmkit.tiny import train_tokenizer

    tok = train_tokenizer(_texts(), VOCAB)
    # Real GGUF vocabularies name an unknown token.
    tok.add_special_tokens({"unk_token": "<unk>"})
    return tok


SENTENCEPIECE = ("gemma2", "gemma3")
SP_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
SP_BYTES = [f"<0x{b:02X}>" for b in range(256)]


def _sentencepiece_tokenizer():
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB + len(SP_BYTES), special_tokens=SP_SPECIALS + SP_BYTES, show_progress=False
    )
    tok.train_from_iterator(_texts(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="<mask>",
        clean_up_tokenization_spaces=False,
    )


def hf_config(family: Family, vocab_size: int, eos_id: int):
    """The family's transformers config at tiny sizes."""
    from transformers import AutoConfig

    fields = dict(
        vocab_size=vocab_size,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=CONTEXT,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        tie_word_embeddings=family.name not in UNTIED,
    )
    if family.name == "phi3":
        fields["original_max_position_embeddings"] = CONTEXT
    if family.name in ("gemma2", "gemma3"):
        # The file carries head_dim (attention.key_length) and the window; query_pre_attn_scalar and the
        # soft-capping stay at the defaults the loader assumes (Gemma-2/3's own: 256, 50, 30).
        fields["head_dim"] = HIDDEN // HEADS
        fields["sliding_window"] = CONTEXT
    # qwen3: the loader reads no head_dim and assumes Qwen3Config's 128 (every Qwen3 dense model's), so the
    # tiny layout has it too.
    config = AutoConfig.for_model(family.model_type, **fields)
    config.architectures = [family.hf_class]
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    if "rope_theta" in config.rope_parameters and "rope.freq_base" in GGUF_CONFIG_MAPPING[family.gguf_architecture]:
        # Not the default 10000: a builder that misses the file's rotary base then computes other logits.
        # (starcoder2's loader reads no rotary base: its file keeps the default.)
        config.rope_parameters["rope_theta"] = ROPE_THETA
    return config


def random_model(family: Family, tok, seed: int = 0):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(family, len(tok), tok.eos_token_id), dtype=torch.float32)
    # Random norms (not all ones): a norm written without Gemma's offset would then show in the logits.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(torch.rand_like(param) * 0.5 + 0.75 - (1.0 if family.name.startswith("gemma") else 0.0))
    return model.eval()


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's rotary permutation of q/k rows (transformers' loader reverses it)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    if "full_attention" in params:
        params = params["full_attention"]
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def write(family: Family, model, tok, path: Path, name: str | None = None) -> Path:
    """`model` (of `family`) and `tok` as a GGUF file at `path`, fp32 tensors."""
    from gguf import GGUFWriter, TokenType
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING
    from transformers.modeling_gguf_pytorch_utils import TensorProcessor, get_gguf_hf_weights_map

    arch, config = family.gguf_architecture, model.config
    writer = GGUFWriter(str(path), arch)
    writer.add_name(name or f"tiny-{family.name}")
    for gguf_key, hf_key in GGUF_CONFIG_MAPPING.get(arch, {}).items():
        if hf_key == "rope_theta":
            writer.add_float32(f"{arch}.{gguf_key}", _rope_theta(config))
        elif gguf_key == "rope.dimension_count":
            writer.add_uint32(f"{arch}.{gguf_key}", config.hidden_size // config.num_attention_heads)
        elif hf_key and getattr(config, hf_key, None) is not None:
            value = getattr(config, hf_key)
            if isinstance(value, float):
                writer.add_float32(f"{arch}.{gguf_key}", value)
            elif isinstance(value, int):
                writer.add_uint32(f"{arch}.{gguf_key}", value)
    vocab = tok.backend_tokenizer.get_vocab(with_added_tokens=True)
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = set(tok.all_special_tokens) | {t.content for t in tok.added_tokens_decoder.values()}
    if family.name in SENTENCEPIECE:
        # llama.cpp's "llama" (SentencePiece) vocabulary: no merges, a score per token (the file's order
        # is the merge order), byte tokens for the fallback.
        writer.add_tokenizer_model("llama")
        writer.add_token_list(tokens)
        writer.add_token_scores([-float(i) for i in range(len(tokens))])
        kinds = {"<unk>": TokenType.UNKNOWN, **{b: TokenType.BYTE for b in SP_BYTES}}
        writer.add_token_types([kinds.get(t, TokenType.CONTROL if t in special else TokenType.NORMAL) for t in tokens])
        writer.add_bos_token_id(tok.bos_token_id)
        writer.add_add_bos_token(True)
    else:
        merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_types([TokenType.CONTROL if t in special else TokenType.NORMAL for t in tokens])
        writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
        writer.add_bos_token_id(tok.eos_token_id)
        writer.add_add_bos_token(False)
    writer.add_eos_token_id(tok.eos_token_id)
    writer.add_pad_token_id(tok.pad_token_id)
    writer.add_unk_token_id(tok.unk_token_id)
    writer.add_chat_template(CHAT_TEMPLATES[TEMPLATE_OF.get(family.name, "chatml")])

    names = {hf: gg for gg, hf in get_gguf_hf_weights_map(model, TensorProcessor(), family.gguf_architecture).items()}
    tied = config.tie_word_embeddings
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue
        gguf_name = names[hf_name]
        data = tensor.detach().float().numpy().copy()
        if family.gguf_architecture == "llama" and ".attn_q." in gguf_name:
            data = _permute(data, config.num_attention_heads)
        elif family.gguf_architecture == "llama" and ".attn_k." in gguf_name:
            data = _permute(data, config.num_key_value_heads)
        elif family.gguf_architecture in ("gemma2", "gemma3") and "norm.weight" in gguf_name:
            data = data + 1
        writer.add_tensor(gguf_name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
