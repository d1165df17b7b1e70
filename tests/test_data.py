"""Reading, validating, deduplicating and splitting the JSON-lines data; atomic stage output folders."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest

from slmkit.config import Config, DataConfig
from slmkit.data import (
    SPLITS,
    DataError,
    Example,
    label_counts,
    read_examples,
    read_split,
    sha256_file,
    split_examples,
    write_split,
)
from slmkit.files import atomic_dir

REPO_ROOT = Path(__file__).resolve().parents[1]


def _error(path: Path, data: DataConfig) -> str:
    with pytest.raises(DataError) as err:
        read_examples(path, data)
    return str(err.value)


# --- valid files ----------------------------------------------------------------------------------


def test_valid_file_is_read(write_jsonl, valid_rows, data_cfg: DataConfig):
    examples, repeats = read_examples(write_jsonl(valid_rows), data_cfg)
    assert repeats == 0
    assert len(examples) == len(valid_rows)
    assert [(e.text, e.label) for e in examples] == [
        (r[data_cfg.text_column], r[data_cfg.label_column]) for r in valid_rows
    ]
    assert [e.line for e in examples] == list(range(1, len(valid_rows) + 1))


def test_path_may_be_a_string(write_jsonl, valid_rows, data_cfg: DataConfig):
    examples, _ = read_examples(str(write_jsonl(valid_rows)), data_cfg)
    assert len(examples) == len(valid_rows)


def test_blank_lines_are_skipped_and_line_numbers_kept(write_jsonl, row, data_cfg: DataConfig):
    label = data_cfg.labels[0]
    path = write_jsonl(["", json.dumps(row("first", label)), "   ", json.dumps(row("second", label))])
    examples, _ = read_examples(path, data_cfg)
    assert [(e.text, e.line) for e in examples] == [("first", 2), ("second", 4)]


def test_crlf_line_endings(tmp_path: Path, row, data_cfg: DataConfig):
    label = data_cfg.labels[0]
    path = tmp_path / "crlf.jsonl"
    path.write_bytes("\r\n".join(json.dumps(row(t, label)) for t in ("a", "b")).encode() + b"\r\n")
    examples, _ = read_examples(path, data_cfg)
    assert [e.text for e in examples] == ["a", "b"]


def test_labels_in_any_case_get_the_configured_spelling(write_jsonl, row, data_cfg: DataConfig):
    variants = [str.lower, str.upper, str.swapcase, lambda s: f" {s} "]
    rows = [row(f"p{i}-{j}", v(label)) for i, label in enumerate(data_cfg.labels) for j, v in enumerate(variants)]
    examples, _ = read_examples(write_jsonl(rows), data_cfg)
    assert Counter(e.label for e in examples) == {label: len(variants) for label in data_cfg.labels}


def test_whitespace_in_phrase_is_collapsed(write_jsonl, row, data_cfg: DataConfig):
    examples, _ = read_examples(write_jsonl([row("  two\tspaces \n here  ", data_cfg.labels[0])]), data_cfg)
    assert examples[0].text == "two spaces here"


def test_exact_repeats_are_dropped_and_counted(write_jsonl, row, data_cfg: DataConfig):
    a, b = data_cfg.labels[:2]
    rows = [
        row("I am fine", a),
        row("I am fine", a),  # exact repeat
        row("i AM   fine ", a.lower()),  # differs only in case and whitespace
        row("Something else", b),
        row("something ELSE", b),
    ]
    examples, repeats = read_examples(write_jsonl(rows), data_cfg)
    assert repeats == 3
    assert [(e.text, e.label, e.line) for e in examples] == [("I am fine", a, 1), ("Something else", b, 4)]


def test_phrase_at_max_chars_is_accepted(write_jsonl, row, data_cfg: DataConfig):
    examples, _ = read_examples(write_jsonl([row("x" * data_cfg.max_chars, data_cfg.labels[0])]), data_cfg)
    assert len(examples[0].text) == data_cfg.max_chars


def test_over_long_phrase_refusal_says_how_to_truncate_instead(write_jsonl, row, data_cfg: DataConfig):
    assert data_cfg.on_too_long == "refuse"
    message = _error(write_jsonl([row("x" * (data_cfg.max_chars + 1), data_cfg.labels[0])]), data_cfg)
    assert "data.on_too_long=truncate" in message


def test_over_long_phrases_are_truncated_and_marked_when_configured(write_jsonl, row, data_cfg: DataConfig):
    data = dataclasses.replace(data_cfg, max_chars=10, on_too_long="truncate")
    rows = [
        row("short", data.labels[0]),
        row("a much longer phrase", data.labels[1]),
        row("exactly 10", data.labels[0]),
    ]
    examples, _ = read_examples(write_jsonl(rows), data)
    assert [(e.text, e.truncated) for e in examples] == [("short", False), ("a much lon", True), ("exactly 10", False)]


def test_phrases_equal_after_truncation_with_two_labels_say_so(write_jsonl, row, data_cfg: DataConfig):
    data = dataclasses.replace(data_cfg, max_chars=10, on_too_long="truncate")
    path = write_jsonl([row("same start, ending one", data.labels[0]), row("same start, ending two", data.labels[1])])
    message = _error(path, data)
    assert f"{path}:2" in message and "line 1" in message and "after truncating" in message


def test_custom_column_names(write_jsonl, data_cfg: DataConfig):
    data = dataclasses.replace(data_cfg, text_column="sentence", label_column="y")
    examples, _ = read_examples(write_jsonl([{"sentence": "hello", "y": data.labels[0]}]), data)
    assert examples[0] == Example(text="hello", label=data.labels[0], line=1)


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\x85"], ids=["U+2028", "U+2029", "U+0085"])
def test_unicode_line_separators_inside_a_phrase(write_jsonl, row, data_cfg: DataConfig, separator: str):
    label = data_cfg.labels[0]
    path = write_jsonl([row(f"first part{separator}second part", label), row("next", label)])
    examples, _ = read_examples(path, data_cfg)
    assert [(e.text, e.line) for e in examples] == [("first part second part", 1), ("next", 2)]


# --- bad files: DataError naming the file (and line) ----------------------------------------------


def test_missing_file(tmp_path: Path, data_cfg: DataConfig):
    path = tmp_path / "nope.jsonl"
    message = _error(path, data_cfg)
    assert str(path) in message
    assert "data.path" in message


@pytest.mark.parametrize("content", [b"", b"\n\n", b"   \n\t\n"], ids=["empty", "newlines", "whitespace"])
def test_empty_file(tmp_path: Path, data_cfg: DataConfig, content: bytes):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)
    message = _error(path, data_cfg)
    assert str(path) in message
    assert "no examples" in message


def test_not_utf8(tmp_path: Path, row, data_cfg: DataConfig):
    path = tmp_path / "latin.jsonl"
    good = json.dumps(row("fine", data_cfg.labels[0])).encode()
    path.write_bytes(good + b"\n" + b'{"x": "\xff\xfe caf\xe9"}\n')
    message = _error(path, data_cfg)
    assert f"{path}:2" in message
    assert "UTF-8" in message


def _bad_line_cases(data: DataConfig) -> dict[str, tuple[str, list[str]]]:
    """name -> (the bad JSON line, substrings its error must contain besides file:line)."""
    t, lab, label = data.text_column, data.label_column, data.labels[0]
    too_long = "x" * (data.max_chars + 1)
    return {
        "not json": ('{"' + t + '": "unclosed', ["JSON"]),
        "trailing garbage": (json.dumps({t: "a", lab: label}) + " extra", ["JSON"]),
        "json list": (json.dumps([t, lab]), ["object", "list"]),
        "json string": (json.dumps("just text"), ["object", "str"]),
        "json null": ("null", ["object"]),
        "missing label column": (json.dumps({t: "a"}), ["missing", lab]),
        "missing text column": (json.dumps({lab: label}), ["missing", t]),
        "extra column": (json.dumps({t: "a", lab: label, "source": "web"}), ["source"]),
        "phrase not string": (json.dumps({t: 42, lab: label}), [t, "string", "int"]),
        "phrase null": (json.dumps({t: None, lab: label}), [t, "string"]),
        "phrase list": (json.dumps({t: ["a"], lab: label}), [t, "string"]),
        "label not string": (json.dumps({t: "a", lab: 1}), [lab, "string"]),
        "empty phrase": (json.dumps({t: "", lab: label}), [t, "empty"]),
        "whitespace phrase": (json.dumps({t: " \t\u3000 ", lab: label}), [t, "empty"]),
        "over-long phrase": (json.dumps({t: too_long, lab: label}), [str(data.max_chars), "data.max_chars"]),
        "unknown label": (json.dumps({t: "a", lab: "Bored"}), ["Bored", *data.labels]),
        "empty label": (json.dumps({t: "a", lab: ""}), ["unknown label", *data.labels]),
    }


_CASE_NAMES = list(_bad_line_cases(DataConfig(path="", labels=["A", "B"], template="{text}{label}")))


@pytest.mark.parametrize("case", _CASE_NAMES)
def test_bad_line_names_file_and_line(case: str, write_jsonl, row, data_cfg: DataConfig):
    bad, expected = _bad_line_cases(data_cfg)[case]
    # A valid line, a blank line (still counted), then the bad one: line 3.
    path = write_jsonl(
        [json.dumps(row("fine", data_cfg.labels[0])), "", bad, json.dumps(row("ok", data_cfg.labels[0]))]
    )
    message = _error(path, data_cfg)
    assert f"{path}:3" in message
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"


def test_unknown_label_suggests_close_match(write_jsonl, row, data_cfg: DataConfig):
    for label in data_cfg.labels:
        typo = label[:-1] if len(label) > 3 else label + label[-1]
        message = _error(write_jsonl([row("a", typo)]), data_cfg)
        assert f"Did you mean '{label}'?" in message


def test_unknown_label_far_from_any_gives_no_suggestion(write_jsonl, row, data_cfg: DataConfig):
    message = _error(write_jsonl([row("a", "zzzzzzzzzzzz")]), data_cfg)
    assert "Did you mean" not in message


def test_unknown_label_suggestion_ignores_case(write_jsonl, row, data_cfg: DataConfig):
    label = max(data_cfg.labels, key=len)
    message = _error(write_jsonl([row("a", label.upper()[:-1])]), data_cfg)
    assert f"Did you mean '{label}'?" in message


def test_same_phrase_with_two_labels_names_both_lines(write_jsonl, row, data_cfg: DataConfig):
    a, b = data_cfg.labels[:2]
    rows = [row("The same phrase", a), row("unrelated", a), row("the same  PHRASE", b)]
    path = write_jsonl(rows)
    message = _error(path, data_cfg)
    assert f"{path}:3" in message
    assert "line 1" in message
    assert f"'{a}'" in message
    assert f"'{b}'" in message


# --- splits ---------------------------------------------------------------------------------------

PER_LABEL = 60


@pytest.fixture
def examples(data_cfg: DataConfig) -> list[Example]:
    out, line = [], 0
    for label in data_cfg.labels:
        for i in range(PER_LABEL):
            line += 1
            out.append(Example(text=f"{label} phrase number {i}", label=label, line=line))
    return out


def _texts(split: dict[str, list[Example]]) -> dict[str, list[str]]:
    return {name: [e.text for e in split[name]] for name in SPLITS}


def test_split_has_the_three_splits(examples, data_cfg: DataConfig):
    assert set(split_examples(examples, data_cfg, seed=1)) == set(SPLITS)


def test_split_is_deterministic(examples, data_cfg: DataConfig):
    assert _texts(split_examples(examples, data_cfg, 1)) == _texts(split_examples(examples, data_cfg, 1))


def test_split_does_not_depend_on_input_order(examples, data_cfg: DataConfig):
    assert _texts(split_examples(examples[::-1], data_cfg, 1)) == _texts(split_examples(examples, data_cfg, 1))


def test_split_depends_on_seed(examples, data_cfg: DataConfig):
    first, second = split_examples(examples, data_cfg, 1), split_examples(examples, data_cfg, 2)
    assert {n: set(v) for n, v in _texts(first).items()} != {n: set(v) for n, v in _texts(second).items()}


def test_split_is_a_partition(examples, data_cfg: DataConfig):
    split = split_examples(examples, data_cfg, 3)
    texts = [e.text.casefold() for name in SPLITS for e in split[name]]
    assert len(texts) == len(set(texts)), "a phrase is in two splits"
    assert Counter(e for name in SPLITS for e in split[name]) == Counter(examples)


def test_split_is_stratified(examples, data_cfg: DataConfig):
    split = split_examples(examples, data_cfg, 4)
    fractions = {
        "test": data_cfg.test_fraction,
        "val": data_cfg.val_fraction,
        "train": 1 - data_cfg.test_fraction - data_cfg.val_fraction,
    }
    for name in SPLITS:
        counts = label_counts(split[name])
        for label in data_cfg.labels:
            assert counts.get(label, 0) >= 1, f"{label} missing from {name}"
            assert abs(counts[label] / PER_LABEL - fractions[name]) <= 1.5 / PER_LABEL, (name, label, counts)


@pytest.mark.parametrize("count", [0, 1, 2])
def test_split_label_with_too_few_examples(examples, data_cfg: DataConfig, count: int):
    scarce = data_cfg.labels[-1]
    kept = [e for e in examples if e.label != scarce] + [e for e in examples if e.label == scarce][:count]
    with pytest.raises(DataError) as err:
        split_examples(kept, data_cfg, 1)
    assert f"'{scarce}'" in str(err.value)


def test_split_that_succeeds_has_a_non_empty_val(data_cfg: DataConfig):
    outcomes = {}
    for per_label in range(1, 30):
        small = [Example(f"{label} {i}", label, 0) for label in data_cfg.labels for i in range(per_label)]
        try:
            split = split_examples(small, data_cfg, 1)
        except DataError:
            outcomes[per_label] = "refused"
            continue
        outcomes[per_label] = "split"
        assert split["val"], f"{per_label} examples per label: empty val split and no DataError"
    # Both sides of the boundary were seen, and it is one boundary: refused below some size, split above.
    order = list(outcomes.values())
    assert order[0] == "refused" and order[-1] == "split", outcomes
    assert order == sorted(order, key=lambda o: o == "split"), outcomes


def test_write_and_read_split_round_trip(tmp_path: Path, examples):
    path = tmp_path / "train.jsonl"
    write_split(path, examples[:5])
    back = read_split(path)
    assert [(e.text, e.label) for e in back] == [(e.text, e.label) for e in examples[:5]]
    # Fixed keys, whatever the source file's columns were called.
    assert set(json.loads(path.read_text(encoding="utf-8").splitlines()[0])) == {"text", "label"}


def test_sha256_file(tmp_path: Path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"abc" * 1000)
    assert sha256_file(path) == hashlib.sha256(b"abc" * 1000).hexdigest()


# --- the shipped data set -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shipped(_composed: Config) -> tuple[list[Example], int]:
    path = Path(_composed.data.path)
    return read_examples(path if path.is_absolute() else REPO_ROOT / path, _composed.data)


def test_shipped_data_reads_cleanly(shipped, data_cfg: DataConfig):
    examples, _ = shipped
    assert len(examples) >= 800
    assert set(label_counts(examples)) == set(data_cfg.labels)


def test_shipped_data_splits_with_every_label_everywhere(shipped, cfg: Config):
    split = split_examples(shipped[0], cfg.data, cfg.seed)
    for name in SPLITS:
        assert set(label_counts(split[name])) == set(cfg.data.labels), name


# --- stage.atomic_dir -----------------------------------------------------------------------------


@pytest.fixture
def stage_parent(tmp_path: Path) -> Path:
    parent = tmp_path / "artifacts"
    parent.mkdir()
    return parent


def _tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): p.read_text() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_atomic_dir_creates_final(stage_parent: Path):
    final = stage_parent / "prepare"
    with atomic_dir(final) as out:
        assert out != final
        assert not final.exists(), "final must not appear before the block succeeds"
        (out / "a.txt").write_text("new")
        (out / "sub").mkdir()
        (out / "sub" / "b.txt").write_text("deep")
    assert _tree(final) == {"a.txt": "new", "sub/b.txt": "deep"}
    assert [p.name for p in stage_parent.iterdir()] == ["prepare"]


def test_atomic_dir_replaces_previous(stage_parent: Path):
    final = stage_parent / "prepare"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with atomic_dir(final) as out:
        (out / "a.txt").write_text("new")
        assert (final / "old.txt").read_text() == "old", "previous output stays until the block succeeds"
    assert _tree(final) == {"a.txt": "new"}
    assert [p.name for p in stage_parent.iterdir()] == ["prepare"]


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_atomic_dir_failure_keeps_previous(stage_parent: Path, exc: type[BaseException]):
    final = stage_parent / "prepare"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(exc), atomic_dir(final) as out:
        (out / "half.txt").write_text("half-written")
        raise exc("boom")
    assert _tree(final) == {"old.txt": "old"}
    assert [p.name for p in stage_parent.iterdir()] == ["prepare"]


def test_atomic_dir_failure_without_previous_leaves_nothing(stage_parent: Path):
    final = stage_parent / "prepare"
    with pytest.raises(ValueError), atomic_dir(final) as out:
        (out / "half.txt").write_text("half-written")
        raise ValueError("boom")
    assert list(stage_parent.iterdir()) == []
