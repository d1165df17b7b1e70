"""Read, validate, deduplicate, split and hash the labelled JSON-lines data."""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter, defaultdict
from dataclasses import dataclass
from difflib import get_close_matches
from pathlib import Path

from slmkit.config import DataConfig, is_generative
from slmkit.prompt import conversation_turns, normalize_label

SPLITS = ("train", "val", "test")


class DataError(ValueError):
    """A problem in the user's data file: the message names file, line and the fix."""


@dataclass(frozen=True)
class Example:
    text: str  # the phrase; a question; in a conversation (data.format=chat), the last user message
    label: str  # its label; the answer; the last assistant message
    line: int  # 1-based line in the source file
    truncated: bool = False  # cut to data.max_chars (data.on_too_long=truncate)
    # A conversation's earlier (user, assistant) turns and its system message (data.format=chat).
    history: tuple[tuple[str, str], ...] = ()
    system: str | None = None

    def messages(self) -> list[dict[str, str]]:
        """The example in OpenAI's chat format."""
        out = [{"role": "system", "content": self.system}] if self.system is not None else []
        for user, assistant in (*self.history, (self.text, self.label)):
            out += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        return out


CHAT_ROLES = ("system", "user", "assistant")


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_examples(path: str | Path, data: DataConfig) -> tuple[list[Example], int]:
    """Read and validate every line; return (unique examples, number of exact repeats dropped).

    Any problem is a DataError naming the file and line. Exact repeats of a phrase with the same label
    are dropped; the same phrase with two different labels is an error. A phrase over data.max_chars is
    an error, or (data.on_too_long=truncate) cut to max_chars and marked `truncated`.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file not found (config key data.path); point data.path at a JSON-lines file")
    raw = path.read_bytes()
    try:
        content = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte {err.start}); save the file as UTF-8") from None

    if data.format == "chat":
        return _read_conversations(path, content, data)
    cols = {data.text_column, data.label_column}
    examples: list[Example] = []
    seen: dict[str, Example] = {}
    repeats = 0
    for lineno, where, row in _json_lines(path, content):
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object with keys {sorted(cols)}, got {type(row).__name__}")
        missing, extra = cols - row.keys(), row.keys() - cols
        if missing:
            raise DataError(f"{where}: missing key(s) {sorted(missing)}; each line needs {sorted(cols)}")
        # Question/answer files in the wild carry more columns (ids, sources, other answers): read the two.
        if extra and not is_generative(data):
            raise DataError(
                f"{where}: unexpected key(s) {sorted(extra)}; each line has exactly {sorted(cols)} "
                "(set data.text_column / data.label_column if your columns are named differently)"
            )
        text, label_raw = row[data.text_column], row[data.label_column]
        if not isinstance(text, str):
            raise DataError(f"{where}: '{data.text_column}' must be a string, got {type(text).__name__}")
        if not isinstance(label_raw, str):
            raise DataError(f"{where}: '{data.label_column}' must be a string, got {type(label_raw).__name__}")
        text = " ".join(text.split())  # one line, single spaces: the prompt format depends on it
        if not text:
            raise DataError(f"{where}: '{data.text_column}' is empty; remove the line or fill it in")
        truncated = len(text) > data.max_chars
        if truncated and data.on_too_long == "truncate":
            text = text[: data.max_chars].rstrip()
        elif truncated:
            raise DataError(
                f"{where}: '{data.text_column}' has {len(text)} characters, over data.max_chars={data.max_chars}; "
                "shorten it, raise data.max_chars, or set data.on_too_long=truncate"
            )
        if is_generative(data):
            # An answer keeps its own lines (a free-text answer may have several); the template's end-of-turn
            # marker, not a newline, ends it.
            label = label_raw.strip()
            if not label:
                raise DataError(f"{where}: '{data.label_column}' is empty; write the answer or remove the line")
        else:
            label = normalize_label(data, label_raw)
        if label is None:
            folded = {label.casefold(): label for label in data.labels}
            close = get_close_matches(label_raw.strip().casefold(), list(folded), n=1, cutoff=0.6)
            hint = f" Did you mean '{folded[close[0]]}'?" if close else ""
            raise DataError(
                f"{where}: unknown label '{label_raw}'; allowed: {', '.join(data.labels)} "
                f"(config key data.labels).{hint}"
            )
        key = text.casefold()
        if key in seen:
            first = seen[key]
            if first.label != label:
                cut = " (after truncating to data.max_chars)" if truncated or first.truncated else ""
                kind = "answer" if is_generative(data) else "label"
                raise DataError(
                    f"{where}: '{data.text_column}' also appears at line {first.line}{cut} with {kind} "
                    f"'{first.label}', here '{label}'; keep one {kind} per {data.text_column}"
                )
            repeats += 1
            continue
        ex = Example(text=text, label=label, line=lineno, truncated=truncated)
        seen[key] = ex
        examples.append(ex)
    if not examples:
        raise DataError(
            f"{path}: no examples (the file is empty); add JSON lines like "
            f'{{"{data.text_column}": "...", "{data.label_column}": "{data.labels[0]}"}}'
        )
    return examples, repeats


def _json_lines(path: Path, content: str):
    """(line number, "file:line", parsed object) for each non-blank line; a DataError for one that is not JSON."""
    # split on "\n" only: str.splitlines() also breaks on U+2028/U+0085, which are legal inside JSON strings.
    for lineno, line in enumerate(content.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            yield lineno, where, json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: not valid JSON ({err.msg}); each line must be one JSON object") from None


def _read_conversations(path: Path, content: str, data: DataConfig) -> tuple[list[Example], int]:
    """data.format=chat: one conversation a line, {"messages": [{"role", "content"}, ...]}: an optional system
    message first, then user and assistant turns in turn, ending with the assistant's. Each message's text
    is checked against data.max_chars (refused, or cut with data.on_too_long=truncate)."""
    examples: list[Example] = []
    seen: set[str] = set()
    repeats = 0
    for lineno, where, row in _json_lines(path, content):
        shape = '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}'
        if not isinstance(row, dict) or set(row) != {"messages"} or not isinstance(row["messages"], list):
            raise DataError(f"{where}: expected one conversation, {shape} (data.format=chat)")
        messages = row["messages"]
        if not messages:
            raise DataError(f"{where}: 'messages' is empty; a conversation needs a user and an assistant turn")
        cut = False
        turns: list[tuple[str, str]] = []
        for i, msg in enumerate(messages):
            at = f"{where}: messages[{i}]"
            if not isinstance(msg, dict) or not {"role", "content"} <= msg.keys() or msg.keys() - {"role", "content"}:
                raise DataError(f'{at}: expected {{"role": ..., "content": ...}}, got {json.dumps(msg)[:80]}')
            role, text = msg["role"], msg["content"]
            if role not in CHAT_ROLES:
                raise DataError(f"{at}: unknown role {role!r}; use one of {', '.join(CHAT_ROLES)}")
            if not isinstance(text, str):
                raise DataError(f"{at}: 'content' must be a string, got {type(text).__name__}")
            text = text.strip()
            if not text:
                raise DataError(f"{at}: 'content' is empty; write the {role} message or remove it")
            if len(text) > data.max_chars:
                if data.on_too_long != "truncate":
                    raise DataError(
                        f"{at}: {len(text)} characters, over data.max_chars={data.max_chars}; shorten it, raise "
                        "data.max_chars, or set data.on_too_long=truncate"
                    )
                text, cut = text[: data.max_chars].rstrip(), True
            if role == "system":
                if i != 0:
                    raise DataError(f"{at}: a system message comes first, before the first user message")
                continue
            want = "assistant" if turns and len(turns[-1]) == 1 else "user"
            if role != want:
                raise DataError(
                    f"{at}: the {role}'s message where the {want}'s turn is due; user and assistant take turns"
                )
            if role == "user":
                turns.append((text,))  # type: ignore[arg-type]
            else:
                turns[-1] = (turns[-1][0], text)
        if not turns or len(turns[-1]) != 2:
            raise DataError(f"{where}: the conversation must end with an assistant message (what the model learns)")
        system = messages[0]["content"].strip() if messages[0]["role"] == "system" else None
        if system is not None and len(system) > data.max_chars:
            system = system[: data.max_chars].rstrip()
        key = json.dumps([system, turns]).casefold()
        if key in seen:
            repeats += 1
            continue
        seen.add(key)
        (user, answer), history = turns[-1], tuple(turns[:-1])
        examples.append(Example(user, answer, lineno, cut, history, system))  # type: ignore[arg-type]
    if not examples:
        raise DataError(f"{path}: no conversations (the file is empty); add lines like {shape}")
    return examples, repeats


def split_examples(examples: list[Example], data: DataConfig, seed: int) -> dict[str, list[Example]]:
    """Deterministic train/val/test split (same input + seed => same split), stratified by label for a
    classifier; generative data (free-text answers) is one group."""
    by_label: dict[str, list[Example]] = defaultdict(list)
    for ex in examples:
        by_label["" if is_generative(data) else ex.label].append(ex)
    rng = random.Random(seed)
    out: dict[str, list[Example]] = {name: [] for name in SPLITS}
    for label in data.labels or [""]:
        group = sorted(by_label.get(label, []), key=lambda e: e.text)
        rng.shuffle(group)
        n_test = round(len(group) * data.test_fraction)
        n_val = round(len(group) * data.val_fraction)
        if n_test < 1 or n_val < 1 or len(group) - n_test - n_val < 1:
            what = f"label {label!r}" if label else "the data"
            raise DataError(
                f"{what} has {len(group)} example(s): too few to put at least one in each of train, val "
                f"(data.val_fraction={data.val_fraction}) and test (data.test_fraction={data.test_fraction}); "
                f"add examples{f' of {label!r}' if label else ''}"
            )
        out["test"] += group[:n_test]
        out["val"] += group[n_test : n_test + n_val]
        out["train"] += group[n_test + n_val :]
    for name in SPLITS:
        rng.shuffle(out[name])
    return out


def write_split(path: Path, examples: list[Example], chat: bool = False) -> None:
    """Write a split with fixed keys text/label, so later stages need not know the source's column names;
    conversations (chat) as {"messages": [...]}."""
    with open(path, "w", encoding="utf-8") as f:
        for ex in examples:
            row = {"messages": ex.messages()} if chat else {"text": ex.text, "label": ex.label}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _from_row(row: dict, line: int) -> Example:
    if "messages" not in row:
        return Example(text=row["text"], label=row["label"], line=line)
    system, said = conversation_turns(row["messages"])
    turns = list(zip(said[0::2], said[1::2], strict=True))
    return Example(text=turns[-1][0], label=turns[-1][1], line=line, history=tuple(turns[:-1]), system=system)


def read_split(path: str | Path) -> list[Example]:
    """Read a split written by `prepare` (already validated)."""
    with open(path, encoding="utf-8") as f:
        return [_from_row(row, i) for i, row in enumerate(map(json.loads, f), 1)]


def label_counts(examples: list[Example]) -> dict[str, int]:
    return dict(sorted(Counter(e.label for e in examples).items()))
