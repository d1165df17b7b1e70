"""data/qa.jsonl: data/make_qa.py regenerates it byte for byte, and it keeps the shape its data card promises."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
QA_FILE = REPO_ROOT / "data" / "qa.jsonl"
GENERATOR = REPO_ROOT / "data" / "make_qa.py"


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return [json.loads(line) for line in QA_FILE.read_text(encoding="utf-8").splitlines()]


def test_generator_reproduces_the_committed_file(tmp_path: Path):
    out = tmp_path / "qa.jsonl"
    subprocess.run([sys.executable, str(GENERATOR), "--out", str(out)], check=True, cwd=tmp_path)
    assert out.read_bytes() == QA_FILE.read_bytes()


def test_generator_writes_the_same_bytes_to_stdout(tmp_path: Path):
    done = subprocess.run([sys.executable, str(GENERATOR)], check=True, capture_output=True, cwd=tmp_path)
    assert done.stdout == QA_FILE.read_bytes()


def test_file_is_utf8_json_lines_with_unix_newlines():
    raw = QA_FILE.read_bytes()
    raw.decode("utf-8")
    assert raw.endswith(b"\n")
    assert b"\r" not in raw
    assert b"\n\n" not in raw


def test_count(rows: list[dict]):
    assert 600 <= len(rows) <= 700


def test_keys_are_exactly_question_and_best_answer(rows: list[dict]):
    for r in rows:
        assert list(r) == ["Question", "Best Answer"]
        assert all(isinstance(v, str) for v in r.values())


def test_no_repeated_question(rows: list[dict]):
    questions = [r["Question"].strip().casefold() for r in rows]
    assert len(set(questions)) == len(questions)


def test_questions_are_short_single_lines(rows: list[dict]):
    for r in rows:
        q = r["Question"]
        assert q == q.strip() and "\n" not in q
        assert q.endswith("?")
        assert len(q) < 200


def test_answers_are_one_to_four_words(rows: list[dict]):
    for r in rows:
        a = r["Best Answer"]
        assert a == a.strip() and "\n" not in a
        assert 1 <= len(a.split()) <= 4
        assert len(a) <= 40
        assert a.split()[0].lower() not in {"a", "an", "the"}


def test_extractive_answers_are_copied_from_the_question(rows: list[dict]):
    """Every answer that is not a number (the sums) appears verbatim, same case, in its question."""
    for r in rows:
        a = r["Best Answer"]
        if not a.isdigit():
            assert a in r["Question"], r


def test_lines_are_shuffled(rows: list[dict]):
    """Not grouped by family: the first 50 questions do not all open with the same word."""
    assert len({r["Question"].split()[0] for r in rows[:50]}) > 10


def test_the_chat_copy_is_the_same_pairs_as_conversations(tmp_path: Path, rows: list[dict]):
    out = tmp_path / "qa_chat.jsonl"
    subprocess.run([sys.executable, str(GENERATOR), "--chat", "--out", str(out)], check=True, cwd=tmp_path)
    committed = GENERATOR.parent / "qa_chat.jsonl"
    assert out.read_bytes() == committed.read_bytes()
    said = []
    for line in committed.read_text(encoding="utf-8").splitlines():
        messages = json.loads(line)["messages"]
        assert messages[0]["role"] == "system"
        assert [m["role"] for m in messages[1:]] in (["user", "assistant"], ["user", "assistant"] * 2)
        said += [m["content"] for m in messages[1:]]
    assert said == [x for r in rows for x in (r["Question"], r["Best Answer"])]
