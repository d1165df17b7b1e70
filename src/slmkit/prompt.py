"""THE prompt builder: training text, inference prompt and label parsing, from one template."""

from __future__ import annotations

from slmkit.config import DataConfig, is_generative


def _split(template: str) -> tuple[str, str]:
    """Template -> (prompt part with {text}, suffix after {label})."""
    head, suffix = template.split("{label}")
    return head, suffix


def build_prompt(data: DataConfig, text: str) -> str:
    """The text the model sees before it writes the label (same for training and inference)."""
    head, _ = _split(data.template)
    return head.replace("{text}", text)


# Between the turns of a conversation (data.format=chat): ChatML's and Phi-3's turns are joined by one newline.
TURN_SEPARATOR = "\n"


def build_conversation_prompt(
    data: DataConfig, text: str, history: tuple | list = (), system: str | None = None
) -> str:
    """The prompt for the next answer in a conversation: each earlier (user, assistant) turn in the template,
    closed by its end-of-turn marker, then the last user message's prompt. A system message goes before the
    first user message's text, a blank line between (the single-turn templates have no system slot).

    With no history and no system message it is build_prompt(data, text)."""
    turns = [*history, (text, None)]
    parts = []
    for i, (user, answer) in enumerate(turns):
        if i == 0 and system is not None:
            user = f"{system}\n\n{user}"
        parts.append(build_prompt(data, user) + ("" if answer is None else answer + label_suffix(data)))
    return TURN_SEPARATOR.join(parts)


def conversation_turns(messages: list[dict]) -> tuple[str | None, list[str]]:
    """A chat-format conversation as (its system message or None, what user and assistant said, in turn)."""
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
    return system, [m["content"] for m in messages if m["role"] != "system"]


def build_completion(data: DataConfig, label: str, eos_token: str) -> str:
    """What the model learns to write after the prompt: label + template suffix + EOS.

    The EOS teaches the model to stop right after the label.
    """
    _, suffix = _split(data.template)
    return label + suffix + eos_token


def build_training_text(data: DataConfig, text: str, label: str, eos_token: str) -> str:
    """Prompt + completion: one training example as plain text.

    No BOS: onnxruntime-genai's tokenizer does not prepend one at inference, so neither do we here.
    """
    return build_prompt(data, text) + build_completion(data, label, eos_token)


def label_suffix(data: DataConfig) -> str:
    """What the template puts right after the label (empty when the label ends the template)."""
    _, suffix = _split(data.template)
    return suffix


def stop_marker(data: DataConfig) -> str:
    """What ends the label in generated text: the template's suffix, or a newline if it has none."""
    _, suffix = _split(data.template)
    return suffix.strip() or "\n"


def normalize_label(data: DataConfig, value: str) -> str | None:
    """Map a label in any case to its configured spelling; None if it is not a label."""
    wanted = value.strip().casefold()
    for label in data.labels:
        if label.casefold() == wanted:
            return label
    return None


def parse_output(data: DataConfig, generated: str) -> str | None:
    """Read the label out of generated text; None when the output is not a valid label. Generative data: the
    answer, all the text before the end-of-turn marker, stripped (its own lines kept)."""
    before = generated.split(stop_marker(data), 1)[0]
    if is_generative(data):
        return before.strip()
    lines = [line for line in before.splitlines() if line.strip()]
    return normalize_label(data, lines[0]) if lines else None
