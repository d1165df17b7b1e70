"""dvc.yaml's code deps are derived, not hand-picked: each stage lists its script and exactly the slmkit
modules that script imports (transitively), so a code change reruns every stage it can affect and no other."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import yaml

from slmkit.paths import STAGES

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "slmkit"


def _module_file(name: str) -> Path | None:
    """The file of slmkit module `name` (dotted), or None if `name` is not a module (an attribute, say)."""
    parts = name.split(".")
    if parts[0] != "slmkit":
        return None
    path = PACKAGE.joinpath(*parts[1:])
    for candidate in (path / "__init__.py", path.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def _imports(path: Path, lazy: bool) -> set[Path]:
    """The slmkit files importing `path` runs: its own imports, with every package on the way.

    lazy: also the imports inside functions (a stage may call any function of a module it imports).
    """
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree) if lazy else tree.body:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            # `from slmkit import lineage` imports a module; `from slmkit.stage import log` an attribute.
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}: relative import; slmkit uses absolute imports (this walk reads those)")
    files = set()
    for name in names:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing slmkit.x runs slmkit/__init__.py first
            file = _module_file(".".join(parts[:i]))
            if file:
                files.add(file)
    return files


def code_deps(script: Path) -> set[str]:
    """The script and every slmkit file it imports, transitively, as repo-relative paths."""
    seen = {script}
    todo = [script]
    while todo:
        path = todo.pop()
        # slmkit/__init__.py runs on every slmkit import; its one lazy import (inference, in `slmkit.load`)
        # serves users of the library, and no stage calls it: only its top-level imports count.
        for dep in _imports(path, lazy=path != PACKAGE / "__init__.py"):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return {p.relative_to(ROOT).as_posix() for p in seen}


def _stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]


def _script(stage: dict) -> Path:
    cmd = stage["cmd"].split()
    assert cmd[0] == "python" and cmd[1].startswith("scripts/"), f"unexpected cmd {stage['cmd']!r}"
    return ROOT / cmd[1]


def test_every_stage_lists_exactly_the_code_it_imports():
    problems = []
    for name, stage in _stages().items():
        listed = {d for d in stage["deps"] if d.startswith(("scripts/", "src/"))}
        needed = code_deps(_script(stage))
        for missing in sorted(needed - listed):
            problems.append(f"dvc.yaml stage {name}: add `- {missing}` to deps (scripts/{name}.py imports it)")
        for extra in sorted(listed - needed):
            problems.append(f"dvc.yaml stage {name}: remove `- {extra}` from deps (scripts/{name}.py never imports it)")
    assert not problems, "\n".join(problems)


def test_the_walk_follows_imports_transitively_and_inside_functions(tmp_path: Path, monkeypatch):
    # A check that cannot fail proves nothing: the walk must find an import two levels down and a lazy one.
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    package = tmp_path / "src" / "slmkit"
    package.mkdir(parents=True)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", package)
    (package / "__init__.py").write_text("def load():\n    from slmkit import heavy\n")
    (package / "heavy.py").write_text("")
    (package / "a.py").write_text("from slmkit.b import thing\n")
    (package / "b.py").write_text("thing = 1\ndef f():\n    import slmkit.c\n")
    (package / "c.py").write_text("")
    (tmp_path / "scripts").mkdir()
    script = tmp_path / "scripts" / "s.py"
    script.write_text("from slmkit import a\n")
    assert code_deps(script) == {
        "scripts/s.py",
        "src/slmkit/__init__.py",
        "src/slmkit/a.py",
        "src/slmkit/b.py",
        "src/slmkit/c.py",
    }


def test_stages_are_read_from_dvc_yaml_in_its_order(tmp_path: Path, monkeypatch):
    from slmkit import paths

    assert tuple(_stages()) == STAGES
    dvc_yaml = tmp_path / "dvc.yaml"
    dvc_yaml.write_text("stages:\n  b:\n    cmd: x\n  a:\n    cmd: y\n")
    assert paths._pipeline_stages(dvc_yaml) == ("b", "a")
    assert paths._pipeline_stages(tmp_path / "absent.yaml") == ()
    # Installed from a folder without dvc.yaml (the container's /build): the pipeline's, where it runs.
    monkeypatch.setattr(paths, "DVC_YAML", tmp_path / "build" / "dvc.yaml")
    monkeypatch.chdir(tmp_path)
    assert paths._pipeline_stages() == ("b", "a")
    dvc_yaml.unlink()
    assert paths._pipeline_stages() == ()


def test_makefile_stage_targets_come_from_dvc_yaml():
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert " ".join(STAGES) not in makefile, "the Makefile spells the stage list out: derive it from dvc.yaml"
    shown = subprocess.run(["make", "-s", "help"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert " ".join(STAGES) in shown
    # The Makefile's own STAGES, as make expands it (no recipe runs: --eval adds a target that only prints).
    expanded = subprocess.run(
        ["make", "-s", "--eval=_print_stages: ; @echo $(STAGES)", "_print_stages"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert tuple(expanded) == STAGES
