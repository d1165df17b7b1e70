"""Property test: random JSON-lines files through the real `prepare` stage (scripts/prepare.py's run()).

Every file either prepares with consistent counts (train + val + test = the distinct valid phrases, no
phrase in two splits) or fails with a DataError that names the file (and the line) — never another
exception. An independent model of the documented rules says which outcome each file must have.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import json
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from slmkit.config import Config, DataConfig, compose, to_yaml
from slmkit.data import SPLITS, DataError

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = 500  # the slow tier; the default tier runs QUICK_EXAMPLES
QUICK_EXAMPLES = 20
MAX_CHARS = 40  # small, so over-long phrases are generated often


def _load_prepare():
    spec = importlib.util.spec_from_file_location("prepare_script", REPO_ROOT / "scripts" / "prepare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def prepare():
    return _load_prepare()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("prepare-property")


BASE = compose([f"data.max_chars={MAX_CHARS}"])  # composed once: Hydra takes ~0.1 s a compose


@functools.cache
def _params_yaml(path: Path, on_too_long: str) -> str:
    return to_yaml(_cfg(path, on_too_long))


def _cfg(path: Path, on_too_long: str) -> Config:
    return dataclasses.replace(BASE, data=dataclasses.replace(BASE.data, path=str(path), on_too_long=on_too_long))


# --- what the documented rules say the outcome must be -------------------------------------------


def _expected(lines: list[str], data: DataConfig) -> tuple[str, int | None, dict[str, str], int]:
    """('ok'|'error', first bad line or None, {casefolded phrase: label}, exact repeats)."""
    cols = {data.text_column, data.label_column}
    labels = {label.casefold(): label for label in data.labels}
    seen: dict[str, str] = {}
    repeats = 0
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            return "error", n, seen, repeats
        if not isinstance(row, dict) or set(row) != cols:
            return "error", n, seen, repeats
        text, label = row[data.text_column], row[data.label_column]
        if not isinstance(text, str) or not isinstance(label, str):
            return "error", n, seen, repeats
        text = " ".join(text.split())
        if not text:
            return "error", n, seen, repeats
        if len(text) > data.max_chars:
            if data.on_too_long == "refuse":
                return "error", n, seen, repeats
            text = text[: data.max_chars].rstrip()
        if label.strip().casefold() not in labels:
            return "error", n, seen, repeats
        label = labels[label.strip().casefold()]
        key = text.casefold()
        if key in seen:
            if seen[key] != label:
                return "error", n, seen, repeats
            repeats += 1
            continue
        seen[key] = label
    return ("ok" if seen else "error"), None, seen, repeats


def _splittable(seen: dict[str, str], data: DataConfig) -> bool:
    for label in data.labels:
        count = sum(1 for v in seen.values() if v == label)
        n_test, n_val = round(count * data.test_fraction), round(count * data.val_fraction)
        if n_test < 1 or n_val < 1 or count - n_test - n_val < 1:
            return False
    return True


# --- random files --------------------------------------------------------------------------------

LABELS = compose().data.labels
words = st.text(alphabet=st.sampled_from("ab c\tDé\u3000ß!\u2028"), min_size=0, max_size=MAX_CHARS + 5)
good_labels = st.one_of(
    st.sampled_from(LABELS),
    st.sampled_from(LABELS).map(str.upper),
    st.sampled_from(LABELS).map(lambda s: f" {s.lower()} "),
)
label_values = st.one_of(good_labels, st.sampled_from(["Angry", "Joyy", "", "sadness?"]), st.sampled_from(LABELS))
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=5,
)


@st.composite
def rows(draw, clean: bool = False) -> str:
    """One line; with clean=True, a line the rules accept (over-long phrases aside)."""
    if clean:
        phrase = draw(words) + draw(st.sampled_from("xyz"))
        label = draw(good_labels)
        return json.dumps({"phrase": phrase, "tone": label}, ensure_ascii=draw(st.booleans()))
    kind = draw(st.sampled_from(["valid"] * 25 + ["blank", "not json", "value", "keys", "types"]))
    if kind == "valid":
        return json.dumps({"phrase": draw(words), "tone": draw(label_values)}, ensure_ascii=draw(st.booleans()))
    if kind == "blank":
        return draw(st.sampled_from(["", "   ", "\t"]))
    if kind == "not json":
        return draw(st.text(alphabet=st.sampled_from('{}[]":, abc'), min_size=1, max_size=20))
    if kind == "value":
        return json.dumps(draw(json_values))
    if kind == "keys":
        row = draw(st.dictionaries(st.sampled_from(["phrase", "tone", "source", "Phrase"]), st.text(max_size=5)))
        return json.dumps(row)
    return json.dumps({"phrase": draw(json_values), "tone": draw(json_values)})


@st.composite
def files(draw) -> tuple[list[str], bytes | None]:
    """Lines of a JSON-lines file: a balanced valid core (so some files split) plus random lines."""
    core = [
        json.dumps({"phrase": f"{label} phrase {i}", "tone": label})
        for label in LABELS
        for i in range(draw(st.integers(6, 14) | st.integers(0, 14)))
    ]
    extra = draw(st.lists(rows(clean=draw(st.booleans())), max_size=8))
    lines = draw(st.permutations(core + extra))
    repeated = draw(st.lists(st.sampled_from(lines), max_size=3)) if lines else []
    broken = draw(st.sampled_from([None] * 8 + [b"\xff\xfe", b"caf\xe9"]))
    return lines + repeated, broken


SETTINGS = dict(
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)
CASES = dict(case=files(), on_too_long=st.sampled_from(["refuse", "truncate"]))


@settings(max_examples=QUICK_EXAMPLES, **SETTINGS)
@given(**CASES)
def test_prepare_on_random_files_quick(prepare, workdir, case, on_too_long):
    """Default tier: a quick sample of the property below."""
    _check(prepare, workdir, case, on_too_long)


@pytest.mark.slow
@settings(max_examples=EXAMPLES, **SETTINGS)
@given(**CASES)
def test_prepare_succeeds_consistently_or_fails_with_a_documented_error(prepare, workdir, case, on_too_long):
    _check(prepare, workdir, case, on_too_long)


def _check(prepare, workdir: Path, case: tuple[list[str], bytes | None], on_too_long: str) -> None:
    lines, broken = case
    path = workdir / "data.jsonl"
    body = "".join(line + "\n" for line in lines).encode("utf-8")
    if broken is not None:
        body += b'{"phrase": "' + broken + b'", "tone": "Joy"}\n'
    path.write_bytes(body)
    cfg = _cfg(path, on_too_long)
    (workdir / "params.yaml").write_text(_params_yaml(path, on_too_long), encoding="utf-8")
    out = workdir / "artifacts" / "prepare"
    before = sorted(p.name for p in out.iterdir()) if out.exists() else None
    manifest_before = (out / "manifest.json").read_text() if out.exists() else None

    outcome, bad_line, seen, repeats = _expected(lines, cfg.data)
    if broken is not None:
        outcome = "error"
        bad_line = len(lines) + 1  # the UTF-8 check reads the whole file first
    with contextlib.chdir(workdir):
        try:
            prepare.run()
        except DataError as err:
            message = str(err)
            event("refused: " + ("line error" if bad_line else "no examples" if not seen else "split"))
            assert message.startswith(str(path)), message
            assert outcome == "error" or not _splittable(seen, cfg.data), f"refused a valid file: {message}"
            if bad_line is not None:
                assert message.startswith(f"{path}:"), message
                line = int(message[len(str(path)) + 1 :].split(":", 1)[0])
                assert line <= bad_line, (message, bad_line)
            # A refused run leaves the previous output exactly as it was.
            assert (sorted(p.name for p in out.iterdir()) if out.exists() else None) == before
            assert ((out / "manifest.json").read_text() if out.exists() else None) == manifest_before
            return
    assert outcome == "ok" and _splittable(seen, cfg.data), f"accepted a file it should refuse (line {bad_line})"
    event("prepared")
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["examples"] == len(seen)
    assert manifest["repeats_dropped"] == repeats
    split_texts = {}
    for name in SPLITS:
        rows_ = [json.loads(x) for x in (out / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()]
        assert len(rows_) == manifest["splits"][name]["count"] >= len(LABELS), name
        split_texts[name] = {r["text"].casefold() for r in rows_}
        assert len(split_texts[name]) == len(rows_), f"a phrase twice in {name}"
        assert all(seen[r["text"].casefold()] == r["label"] for r in rows_)
    assert sum(len(v) for v in split_texts.values()) == len(seen)
    assert set().union(*split_texts.values()) == set(seen), "train + val + test != the distinct valid phrases"
    assert not [p for p in os.listdir(out.parent) if p.startswith(".")], "temporary folder left behind"
