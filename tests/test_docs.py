"""The README and docs/ say what is true: links resolve, documented commands compose, figures are sourced.

The figure rule (README.md and every docs/*.md page):

- A *figure* is a number with a unit (ms, s, seconds, min, minutes, MB, GB, GiB, %, points, req/s,
  requests/s, tokens/s, steps, phrases; × or x written right after it, as in 3.2×), any number with a
  decimal point, and a number in a table cell whose column header names a unit (`p50 ms`, `size MB`,
  `requests/s`, `(s)`, `ratio`). A whole number with no unit (`189 test phrases`, `16 clients`, a status
  code) is not one.
- Not figures: inline code and fenced code in bash/python/json/yaml/toml (commands and inputs; a `#`
  comment in a shell block is read as text), link targets, HTML comments, numbers inside a word or a
  date (`int4`, `Phi-3`, `SmolLM2-135M`, `2026-11-30`, `2-core`), and versions, which are written with
  three parts (`0.13.0`) or in inline code. Untagged fenced blocks are program output and are read.
- Each figure must equal, at the precision written, a value in a committed file: metrics/*.json (eval,
  bench, the recorded runs of `make record`), metrics/train_loss.csv, params.yaml or conf/ (config values
  such as a preset's dropout). With a unit, the value must sit under a key for that unit: `ms` under `*_ms`
  keys (or `*_s` keys times 1000), `MB` under `*_mb`, `%` a share, rate or score times 100, `points` an
  accuracy, macro-F1, exact match, gate gap or tolerance times 100 (or a `*_points` key as is), `×` a
  ratio, speedup or share, `steps`
  a steps key, `phrases` under `n`, `phrases`, `batch_size` or `support`. "At the precision written" means
  0.8677 matches 0.86771 and 223 MB matches 223.1: the value is within half a unit of the last digit
  written.

A figure that no committed file holds is dropped from the docs, not marked: that is the rule's point.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
README = REPO_ROOT / "README.md"
DOC_PAGES = sorted((REPO_ROOT / "docs").glob("*.md"))
DOC_FILES = [README, *DOC_PAGES]


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO_ROOT))


def _without_code(text: str) -> str:
    """Markdown with fenced blocks and inline code blanked (links in them are not links)."""
    text = re.sub(r"(?ms)^```.*?^```", "", text)
    return re.sub(r"`[^`\n]*`", "", text)


# --- the README is the front door ------------------------------------------------------------------


def test_readme_is_a_front_door():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; move detail to a page in docs/"
    sections = [line[3:] for line in lines if line.startswith("## ")]
    assert sections[0] == "The two commands", sections
    first = "\n".join(lines).split("## The two commands", 1)[1].split("## ", 1)[0]
    block = first.split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [line.split("#", 1)[0].strip() for line in block.splitlines()]
    assert commands == ["make finetune", "make test"], block


# --- links -------------------------------------------------------------------------------------------


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"(?ms)^```.*?^```", "", path.read_text(encoding="utf-8"))
    return {_slug(m.group(1)) for m in re.finditer(r"(?m)^#{1,6} (.+)$", text)}


def _links(path: Path) -> list[str]:
    return re.findall(r"\]\(([^)\s]+)\)", _without_code(path.read_text(encoding="utf-8")))


def test_link_finder_finds_links():
    assert "docs/configuration.md" in _links(README)
    assert _slug("Versioned by the data's hash, shared through a DVC remote") == (
        "versioned-by-the-datas-hash-shared-through-a-dvc-remote"
    )


@pytest.mark.parametrize("page", DOC_FILES, ids=_rel)
def test_every_relative_link_points_at_a_file_and_heading_that_exist(page: Path):
    broken = []
    for target in _links(page):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if not dest.exists():
            broken.append(f"{target} (no file {dest})")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target} (no heading #{anchor} in {_rel(dest)})")
    assert not broken, f"{_rel(page)}: broken links: {broken}"


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(REPO_ROOT / t.partition("#")[0]).resolve() for t in _links(README)}
    missing = [_rel(p) for p in DOC_PAGES if p.resolve() not in linked]
    assert not missing, f"docs pages the README does not link: {missing}"


# --- documented commands compose ---------------------------------------------------------------------

COMPOSE_SCRIPT = REPO_ROOT / "scripts" / "compose.py"
# Targets whose recipe composes ARGS with scripts/compose.py (the stage targets are dvc.yaml's stages);
# `sweep` hands them to Hydra's multirun.
STAGE_TARGETS = set(yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"])
COMPOSE_TARGETS = {"finetune", "params", "config", "olive-config", *STAGE_TARGETS}
# An ARGS value that shows a pattern rather than a command: `...`, a <placeholder>, a `key=` stand-in.
PATTERN = re.compile(r"\.\.\.|^<\w+>$|(?<![\w.])key=")


@dataclass(frozen=True)
class Command:
    where: str  # file:line
    target: str
    args: str  # ARGS as make holds it: after the user's shell

    @property
    def overrides(self) -> list[str]:
        """What the recipe's shell passes on: make puts $(ARGS) unquoted into a bash command line."""
        return shlex.split(self.args)


def _documented_commands() -> list[Command]:
    found = []
    for path in DOC_FILES:
        text = path.read_text(encoding="utf-8")
        for m in re.finditer(r"""ARGS=(?:"((?:[^"\\]|\\[\s\S])*)"|'([^']*)')""", text):
            line_start = text.rfind("\n", 0, m.start()) + 1
            # A command continued with a backslash: join its lines, as the user's shell does.
            before = text[line_start : m.start()]
            while line_start > 0 and text[: line_start - 1].endswith("\\"):
                prev = text.rfind("\n", 0, line_start - 1) + 1
                before = text[prev : line_start - 2] + " " + before
                line_start = prev
            make = re.findall(r"\bmake\s+([\w-]+)", before)
            if m.group(1) is not None:  # the user's shell, in double quotes: \" \\ \$ \` and line continuations
                args = re.sub(r'\\([\\"$`])', r"\1", m.group(1).replace("\\\n", ""))
            else:
                args = m.group(2)
            if PATTERN.search(args):
                continue
            lineno = text.count("\n", 0, m.start()) + 1
            found.append(Command(f"{_rel(path)}:{lineno}", make[-1] if make else "finetune", args))
    return found


COMMANDS = _documented_commands()


def test_the_command_finder_sees_the_documented_commands():
    assert len(COMMANDS) >= 20, COMMANDS
    gguf = [c for c in COMMANDS if "model.path=" in c.args and ".gguf" in c.args]  # continued over 3 lines
    assert gguf and all("model.chat_template=" in c.args for c in gguf), gguf
    assert any(c.target == "sweep" for c in COMMANDS)


def _compose_script():
    spec = importlib.util.spec_from_file_location("slmkit_compose_script_docs", COMPOSE_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def dry_run(tmp_path: Path, monkeypatch, capsys):
    """`make config ARGS=...` in this process: compose, validate, check the layout, plan the stages.

    In a folder with dvc.yaml and no dvc.lock, so the plan needs no `dvc status` (every stage "never run")."""
    shutil.copy(REPO_ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    monkeypatch.chdir(tmp_path)
    script = _compose_script()

    def run(overrides: list[str]) -> tuple[int, str]:
        code = script.main(["--dry-run", *[_stand_in(o, tmp_path) for o in overrides]])
        return code, capsys.readouterr().err

    return run


def _stand_in(override: str, folder: Path) -> str:
    """A documented model.path=<file>.gguf that is not on this machine, as a header-only GGUF file of the
    family its name says: `make config` opens the file (a missing one is refused), and reads its header."""
    import numpy as np
    from gguf import GGUFWriter

    from slmkit import families

    key, _, value = override.partition("=")
    if key != "model.path" or not value.endswith(".gguf") or Path(value).exists():
        return override
    name = re.sub(r"[^a-z0-9]", "", Path(value).name.lower())
    arch = next((f.gguf_architecture for f in families.supported() if f.gguf_architecture in name), None)
    assert arch, f"documented model.path={value}: name a supported family in the file name"
    writer = GGUFWriter(str(folder / Path(value).name), arch)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return f"model.path={folder / Path(value).name}"


def _first_values(overrides: list[str]) -> tuple[list[str], list[str]]:
    """Hydra's own overrides and the job's, each sweep cut to its first value (what job 0 composes)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep

    hydra_side, job = [], []
    for override in OverridesParser.create().parse_overrides(overrides):  # raises on one Hydra cannot parse
        if not override.is_sweep_override():
            text = override.input_line
        else:
            sweep = override.value()
            if isinstance(sweep, ChoiceSweep):
                first = sweep.list[0]
            elif isinstance(sweep, (RangeSweep, IntervalSweep)):
                first = sweep.start
            else:
                raise AssertionError(f"{override.input_line}: a sweep kind this test does not compose")
            text = f"{override.get_key_element()}={first}"
        (hydra_side if override.key_or_group.startswith("hydra") else job).append(text)
    return hydra_side, job


@pytest.mark.parametrize("command", COMMANDS, ids=[c.where for c in COMMANDS])
def test_documented_command_composes(command: Command, dry_run):
    """Every `make <target> ARGS="..."` in the README and docs/ composes as make would pass it.

    The ARGS string goes through the two shells it meets: the user's (double-quoted: \\" and \\\\ unescaped)
    and the recipe's (make puts $(ARGS) unquoted into a bash line: shlex.split). For the composing targets
    (finetune, params, config, the stages, olive-config) the overrides go through `make config`'s dry run in
    this process: compose, schema, value rules, the layout check on the meta device. A sweep's overrides
    must parse with Hydra's override parser; with each sweep cut to its first value, the hydra/ group
    choices and hydra.* keys compose with Hydra's own config, and the job's overrides go through the same
    dry run. A data file the commands name is not opened (the prepare stage reads it), so its path composes
    as written on any machine; a .gguf file is (`make config` refuses a missing one and reads the header),
    so one not on this machine is stood in for by a header-only file of the family its name says."""
    assert command.target in COMPOSE_TARGETS | {"sweep"}, f"{command.where}: make {command.target} takes no ARGS"
    overrides = command.overrides
    if command.target == "sweep":
        from hydra import compose as hydra_compose
        from hydra import initialize_config_dir

        from slmkit.config import CONF_DIR

        hydra_side, overrides = _first_values(overrides)
        for choice in hydra_side:
            if choice.startswith("hydra/launcher=ray_cluster"):
                assert (CONF_DIR / "hydra/launcher/ray_cluster.yaml").exists()
                if importlib.util.find_spec("hydra_plugins.hydra_ray_launcher") is None:
                    pytest.skip("hydra-ray-launcher is the unlocked `cluster` extra: pip install -e .[cluster]")
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            hydra_compose(config_name="config", overrides=[*hydra_side, *overrides], return_hydra_config=True)
    code, stderr = dry_run(overrides)
    assert code == 0, f"{command.where}: make {command.target} ARGS={command.args!r} does not compose: {stderr}"


def test_documented_templates_compose_with_newlines():
    """A template written in a command line with \\n means the lines it shows, not a literal backslash-n."""
    from slmkit.config import compose

    templated = [c for c in COMMANDS if "template=" in c.args]
    assert templated
    for command in templated:
        cfg = compose(command.overrides)
        for template in (cfg.data.template, cfg.model.chat_template):
            assert "\\n" not in template, f"{command.where}: {template!r}"
        assert cfg.data.template.count("\n") >= 2, f"{command.where}: {cfg.data.template!r}"


# --- figures come from committed files ----------------------------------------------------------------

UNIT_WORDS = r"requests/s|tokens/s|req/s|minutes|seconds|points|phrases|steps|min|ms|MB|GB|GiB|s|%"
FIGURE = re.compile(
    r"(?<![\w.\-/:#+$−])"  # not inside a word, a version, a date, a path, an anchor
    r"(?P<num>\d+(?:\.\d+)?)(?P<more>(?:\.\d+)+)?"  # more dotted parts: a version (0.13.0), not a figure
    rf"(?:(?P<times>[×x])(?![A-Za-z])|\s?(?P<unit>{UNIT_WORDS})(?![A-Za-z]))?"
    r"(?![\w\-])"
)
HEADER_UNIT = re.compile(rf"(?<![A-Za-z])({UNIT_WORDS}|ratio)(?![A-Za-z])")
NUMERIC_CELL = re.compile(rf"^[~≈]?(?P<num>\d+(?:\.\d+)?)\s?(?P<unit>[×x]|{UNIT_WORDS})?$")
SKIPPED_FENCES = {"bash", "sh", "shell", "console", "python", "json", "jsonl", "yaml", "toml"}
SHELL_FENCES = {"bash", "sh", "shell", "console"}


@dataclass(frozen=True)
class Figure:
    where: str
    text: str  # as written, e.g. "0.8677"
    unit: str  # "" for none; "×" for ratios

    @property
    def value(self) -> float:
        return float(self.text)

    @property
    def decimals(self) -> int:
        return len(self.text.partition(".")[2])


def _prose_figures(text: str, where: str) -> list[Figure]:
    out = []
    for m in FIGURE.finditer(text):
        if m.group("more"):
            continue
        unit = "×" if m.group("times") else (m.group("unit") or "")
        if unit or "." in m.group("num"):
            out.append(Figure(where, m.group("num"), unit))
    return out


def _figures(path: Path) -> list[Figure]:
    figures: list[Figure] = []
    text = re.sub(r"(?s)<!--.*?-->", "", path.read_text(encoding="utf-8"))
    fence: str | None = None
    header: list[str] | None = None
    for lineno, line in enumerate(text.splitlines(), 1):
        where = f"{_rel(path)}:{lineno}"
        if line.startswith("```"):
            fence = None if fence is not None else line[3:].strip()
            continue
        if fence is not None:
            if fence in SHELL_FENCES and "#" in line:
                figures += _prose_figures(line.split("#", 1)[1], where)
            elif fence not in SKIPPED_FENCES:
                figures += _prose_figures(line, where)
            continue
        line = re.sub(r"`[^`]*`", "", line)  # inline code: keys, commands, messages
        line = re.sub(r"\]\([^)]*\)", "]", line)  # link targets
        if not line.startswith("|"):
            header = None
            figures += _prose_figures(line, where)
            continue
        cells = [c.strip().replace("**", "") for c in line.strip().strip("|").split("|")]
        if all(re.fullmatch(r":?-+:?", c) for c in cells):
            continue
        if header is None:
            header = cells
            figures += _prose_figures(line, where)
            continue
        for i, cell in enumerate(cells):
            numeric = NUMERIC_CELL.match(cell)
            if not numeric:
                figures += _prose_figures(cell, where)
                continue
            unit = numeric.group("unit") or ""
            if not unit and i < len(header) and (found := HEADER_UNIT.search(header[i])):
                unit = found.group(1)
            unit = "×" if unit in ("x", "ratio") else unit
            if unit or "." in numeric.group("num"):
                figures.append(Figure(where, numeric.group("num"), unit))
    return figures


def _walk(node, path: tuple[str, ...] = ()):
    """(key path, number) for every number in a parsed JSON/YAML tree (numeric dict keys included)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if isinstance(key, str) and re.fullmatch(r"\d+(?:\.\d+)?", key):
                yield path, float(key)
            yield from _walk(value, (*path, str(key)))
    elif isinstance(node, list):
        for item in node:
            yield from _walk(item, path)
    elif isinstance(node, (int, float)) and not isinstance(node, bool):
        yield path, float(node)


def _committed_values() -> list[tuple[str, float]]:
    """(key, value) from the committed metrics, params.yaml and conf/; key is the dotted path to the value."""
    trees = [json.loads(p.read_text(encoding="utf-8")) for p in sorted((REPO_ROOT / "metrics").glob("*.json"))]
    trees.append(yaml.safe_load((REPO_ROOT / "params.yaml").read_text(encoding="utf-8")))
    trees += [yaml.safe_load(p.read_text(encoding="utf-8")) for p in sorted((REPO_ROOT / "conf").rglob("*.yaml"))]
    values = [(".".join(k for k in path if not k.isdigit()), v) for tree in trees for path, v in _walk(tree)]
    with (REPO_ROOT / "metrics" / "train_loss.csv").open(encoding="utf-8") as f:
        for row in csv.DictReader(f):
            values += [(column, float(cell)) for column, cell in row.items() if cell]
    return values


def _is(key: str, *parts: str) -> bool:
    return any(part in key for part in parts)


def _seconds(key: str) -> bool:
    return key.endswith("_s") or "seconds" in key


def _candidates(unit: str, key: str, value: float) -> list[float]:
    """The values a figure with `unit` may be, from one committed value at `key` (its dotted path)."""
    key = key.lower()
    if unit == "ms":
        return [value] if "_ms" in key else [value * 1000] if _seconds(key) else []
    if unit in ("s", "seconds"):
        return [value] if _seconds(key) else [value / 1000] if "_ms" in key else []
    if unit in ("min", "minutes"):
        return [value / 60] if _seconds(key) else []
    if unit == "MB":
        return [value] if key.endswith("_mb") else []
    if unit == "GB":
        return [value] if key.endswith("_gb") else [value / 1000] if key.endswith("_mb") else []
    if unit == "GiB":
        return [value] if key.endswith("_gib") else []
    if unit == "tokens/s":
        return [value] if "tokens_per_s" in key else []
    if unit in ("req/s", "requests/s"):
        return [value] if "requests_per_s" in key else []
    if unit == "×":
        return [value] if _is(key, "speedup", "ratio", "_vs_", "share") else []
    if unit == "%":
        return [value * 100] if _is(key, "share", "rate", "accuracy", "f1", "precision", "recall", "fraction") else []
    if unit == "points":
        if key.endswith("_points"):  # already in points (make bench-family's gaps)
            return [value]
        return [value * 100] if key.endswith(("accuracy", "macro_f1", "tolerance", "exact_match", "gap")) else []
    if unit == "steps":
        return [value] if "step" in key else []
    if unit == "phrases":
        return [value] if key.rsplit(".", 1)[-1] in ("n", "phrases", "batch_size", "support") else []
    # No unit: any value that is not a time, size or rate (those carry their unit in the key).
    return [] if _seconds(key) or _is(key, "_ms", "_mb", "_gb", "per_s") else [value]


COMMITTED = _committed_values()


def _sourced(figure: Figure) -> bool:
    tolerance = 0.5 * 10**-figure.decimals + 1e-9
    return any(
        abs(candidate - figure.value) <= tolerance
        for key, value in COMMITTED
        for candidate in _candidates(figure.unit, key, value)
    )


def test_figure_rule_reads_what_it_should():
    """The extraction and matching the rule above describes, on lines that show each case."""
    found = _prose_figures("int4 0.8677, 223 MB, 3.2× faster, 38.4 ms/phrase, Olive 0.13.0, int4, 2026-11-30", "x")
    assert [(f.text, f.unit) for f in found] == [("0.8677", ""), ("223", "MB"), ("3.2", "×"), ("38.4", "ms")]
    assert not _prose_figures("189 test phrases, 16 clients, Phi-3, SmolLM2-135M, 2-core, 128+N, 4 x 512", "x")
    assert _sourced(Figure("x", "0.8783", "")) and _sourced(Figure("x", "223", "MB"))
    assert _sourced(Figure("x", "657", "MB")) and not _sourced(Figure("x", "544", "MB"))
    assert _sourced(Figure("x", "38.4", "ms")) and not _sourced(Figure("x", "38.2", "ms"))
    assert _sourced(Figure("x", "120", "steps")) and not _sourced(Figure("x", "121", "steps"))
    assert _sourced(Figure("x", "2", "points"))  # evaluate.parity_tolerance 0.02
    assert not _sourced(Figure("x", "223", "ms"))  # a size is no latency


@pytest.mark.parametrize("page", DOC_FILES, ids=_rel)
def test_every_figure_comes_from_a_committed_file(page: Path):
    unsourced = [f"{f.where}: {f.text}{(' ' + f.unit) if f.unit else ''}" for f in _figures(page) if not _sourced(f)]
    assert not unsourced, (
        "figures no committed metrics file, params.yaml or conf/ holds (drop them, or commit the run that "
        f"measured them): {unsourced}"
    )
