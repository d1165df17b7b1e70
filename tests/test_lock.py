"""The environment cannot drift: pyproject pins == lock files == what the Dockerfile installs."""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO_ROOT = Path(__file__).resolve().parents[1]
LOCKS = {"cpu": REPO_ROOT / "requirements/cpu.txt", "cuda": REPO_ROOT / "requirements/cuda.txt"}


def _pyproject() -> dict:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def _lock(extra: str) -> dict[str, str]:
    pins = {}
    for line in LOCKS[extra].read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
        if m:
            pins[canonicalize_name(m.group(1))] = m.group(2)
    return pins


def _requirements(extra: str) -> list[Requirement]:
    project = _pyproject()["project"]
    reqs = project["dependencies"] + project["optional-dependencies"][extra] + project["optional-dependencies"]["dev"]
    return [Requirement(r) for r in reqs]


@pytest.mark.parametrize("extra", sorted(LOCKS))
def test_every_pyproject_requirement_is_locked_and_satisfied(extra: str):
    lock = _lock(extra)
    for req in _requirements(extra):
        name = canonicalize_name(req.name)
        assert name in lock, f"{req.name} is in pyproject.toml but not in {LOCKS[extra].name}: run `make lock`"
        # A local label (2.13.0+cpu) satisfies ==2.13.0, as pip itself decides.
        assert req.specifier.contains(lock[name], prereleases=True), (
            f"{LOCKS[extra].name} has {req.name}=={lock[name]}, pyproject.toml wants {req.specifier}: run `make lock`"
        )


def test_the_locks_agree_on_shared_pins():
    cpu, cuda = _lock("cpu"), _lock("cuda")
    for req in _requirements("cpu"):
        name = canonicalize_name(req.name)
        if str(req.specifier).startswith("==") and name in cuda:
            assert cpu[name].split("+")[0] == cuda[name].split("+")[0], f"{name}: cpu {cpu[name]} vs cuda {cuda[name]}"


def test_cpu_lock_has_no_cuda_wheels():
    """An unpinned or wrong torch would pull GBs of CUDA libraries into the CPU environment."""
    cpu = _lock("cpu")
    assert not [n for n in cpu if n.startswith(("nvidia-", "cuda-", "triton"))]
    assert "onnxruntime-gpu" not in cpu and "onnxruntime" in cpu


def test_cuda_lock_keeps_the_one_consistent_cuda_set():
    """onnxruntime-genai-cuda 0.14.1 (what Olive 0.13's ModelBuilder works with) links CUDA 12 and needs
    onnxruntime-gpu >= 1.26; 1.26.0 is the last CUDA 12 build on PyPI. >= 0.15 breaks Olive 0.13."""
    cuda = _lock("cuda")
    assert cuda["onnxruntime-genai-cuda"] == "0.14.1"
    assert cuda["onnxruntime-gpu"] == "1.26.0"
    assert "onnxruntime" not in cuda, "CPU onnxruntime beside onnxruntime-gpu shadows the CUDA provider"


def test_dockerfile_installs_from_the_same_script_and_lock():
    dockerfile = (REPO_ROOT / "docker/Dockerfile").read_text()
    assert "COPY requirements/ requirements/" in dockerfile
    assert "COPY scripts/setup.sh scripts/setup.sh" in dockerfile
    assert re.search(r'RUN SLMKIT_DEPS_ONLY=1 scripts/setup.sh "\$\{EXTRA\}"', dockerfile), "deps before code"
    assert dockerfile.index("SLMKIT_DEPS_ONLY=1") < dockerfile.index("COPY src/ src/")
    assert re.search(r'^RUN scripts/setup.sh "\$\{EXTRA\}"', dockerfile, re.M)
    setup = (REPO_ROOT / "scripts/setup.sh").read_text()
    assert 'lock="requirements/${extra}.txt"' in setup
    makefile = (REPO_ROOT / "Makefile").read_text()
    assert "scripts/setup.sh $(EXTRA) $(VENV)" in makefile


def test_dockerfile_base_is_ubuntu_22_04_with_the_cuda_major_onnxruntime_gpu_needs():
    dockerfile = (REPO_ROOT / "docker/Dockerfile").read_text()
    m = re.search(r"ARG BASE_IMAGE=nvidia/cuda:(\d+)\.(\d+)\.(\d+)-cudnn-runtime-ubuntu22\.04\n", dockerfile)
    assert m, "base image must be a pinned nvidia/cuda:<x.y.z>-cudnn-runtime-ubuntu22.04 tag"
    # onnxruntime-gpu 1.26.0 is a CUDA 12 build (1.27+ need CUDA 13).
    assert _lock("cuda")["onnxruntime-gpu"] == "1.26.0" and m.group(1) == "12"
    assert "uv:0." in dockerfile, "uv is pinned"
    assert re.search(r"^USER \$\{USER_UID\}$", dockerfile, re.M), "runs as a non-root user"


def _setup_calls(tmp_path: Path, extra: str) -> list[list[str]]:
    """The pip commands scripts/setup.sh runs for `extra`, recorded by a stand-in interpreter (no install)."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    log = tmp_path / "calls"
    stub = venv / "bin" / "python"
    stub.write_text(f'#!/usr/bin/env bash\nprintf "%s\\0" "$@" >> {log}\nprintf "\\n" >> {log}\n')
    stub.chmod(0o755)
    subprocess.run(["bash", "scripts/setup.sh", extra, str(venv)], cwd=REPO_ROOT, check=True, capture_output=True)
    return [line.strip("\0").split("\0") for line in log.read_text().splitlines() if line]


def test_setup_installs_the_cpu_torch_from_pytorchs_index_and_the_rest_from_pypi(tmp_path: Path):
    """The CPU lock's torch (+cpu) exists only on PyTorch's own index: the set-up names it, for that package
    alone (a machine with PyPI and that index, nothing preinstalled, installs the lock)."""
    cpu_torch = f"torch=={_lock('cpu')['torch']}"
    assert cpu_torch.endswith("+cpu")
    calls = _setup_calls(tmp_path, "cpu")
    first = calls[0]
    assert first[-1] == cpu_torch and "--no-deps" in first
    assert first[first.index("--extra-index-url") + 1] == "https://download.pytorch.org/whl/cpu"
    assert calls[1][-2:] == ["-r", "requirements/cpu.txt"]
    assert not any("--extra-index-url" in call or "--index-url" in call for call in calls[1:])
    # The CUDA lock's torch is PyPI's own build: no second index.
    assert not any("--extra-index-url" in call for call in _setup_calls(tmp_path / "cuda", "cuda"))
    # One place names the index: not the Dockerfile, not the Makefile (both run setup.sh).
    local = [n for extra in LOCKS for n, v in _lock(extra).items() if "+" in v]
    assert local == ["torch"], f"packages only a non-PyPI index has: {local}"
    for path in ("docker/Dockerfile", "Makefile"):
        assert (
            "download.pytorch.org" not in (REPO_ROOT / path).read_text()
            and "INDEX_URL" not in (REPO_ROOT / path).read_text()
        ), path


@pytest.mark.parametrize("extra", sorted(LOCKS))
def test_the_lock_holds_what_the_editable_install_builds_with(extra: str):
    """setup.sh installs the project with --no-build-isolation: its build requirements come from the lock."""
    lock = _lock(extra)
    for spec in _pyproject()["build-system"]["requires"]:
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        assert name in lock and req.specifier.contains(lock[name]), f"{spec} not locked in {LOCKS[extra].name}"
