"""Data in cloud storage: `make import-data` / `make update-data` (dvc import-url / dvc update) against Azurite.

The slow test runs Azurite, the Azure Storage emulator (npm package pinned in tests/azurite/package-lock.json,
installed by `npm ci` on first use into the git-ignored tests/azurite/node_modules/), on 127.0.0.1 and talks
to it the way a user's workspace talks to Azure: DVC's azure:// filesystem (dvc-azure) with the connection
string in AZURE_STORAGE_CONNECTION_STRING. The argument checks of the make targets are default tier.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import selectors
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from workspace import REPO_ROOT, VENV, _env, copy_repo, make, run, run_group

from slmkit.config import compose

AZURITE = REPO_ROOT / "tests" / "azurite"
# Azurite's well-known development account (the emulator accepts only it; not a secret).
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def _no_azure_env(**extra: str) -> dict[str, str]:
    """This process's environment without Azure settings (a developer's own must not leak into a test)."""
    return {**{k: v for k, v in _env().items() if not k.startswith("AZURE_")}, **extra}


def _make_args(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`make` in the repo itself with the environment taken as set up (-o env): only the argument checks run."""
    cmd = ["make", "--no-print-directory", "-o", "env", f"VENV={VENV}", *args]
    return run_group(cmd, 60, cwd=REPO_ROOT, env=env or _no_azure_env(AZURE_STORAGE_ACCOUNT="acct"))


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("", "usage: make import-data URL=azure://"),
        ("https://example.com/tones.jsonl", "unsupported URL 'https://example.com/tones.jsonl'"),
        ("azure://container-only", "unsupported URL 'azure://container-only'"),
        ("gs://bucket/tones.jsonl", "unsupported URL 'gs://bucket/tones.jsonl'"),
        ("azure://data/tones/", "ends in /: name the local copy, TO=data/<name>"),
    ],
)
def test_import_data_refuses_a_missing_or_unsupported_url_before_dvc_runs(url: str, message: str):
    before = sorted(p.name for p in (REPO_ROOT / "data").iterdir())
    result = _make_args("import-data", f"URL={url}")
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr
    assert "dvc import-url" not in result.stdout
    assert sorted(p.name for p in (REPO_ROOT / "data").iterdir()) == before


def test_import_data_names_the_local_copy_after_the_url_and_update_data_targets_its_dvc_file():
    dry = _make_args("-n", "import-data", "URL=s3://bucket/some/path/tones.jsonl?versionid=3")
    assert 'dvc import-url "s3://bucket/some/path/tones.jsonl?versionid=3" "data/tones.jsonl"\n' in dry.stdout
    dry = _make_args("-n", "import-data", "URL=azure://c/p/x.jsonl", "TO=data/cloud/y.jsonl")
    assert '"azure://c/p/x.jsonl" "data/cloud/y.jsonl"' in dry.stdout
    for to in ("data/y.jsonl", "data/y.jsonl.dvc"):
        assert "dvc update data/y.jsonl.dvc" in _make_args("-n", "update-data", f"TO={to}").stdout


def test_import_data_records_the_azure_account_name_and_nothing_secret():
    conn = f"DefaultEndpointsProtocol=https;AccountName=fromconn;AccountKey={AZURITE_KEY};EndpointSuffix=x"
    for env, account in [
        (_no_azure_env(AZURE_STORAGE_ACCOUNT="acct"), "acct"),
        (_no_azure_env(AZURE_STORAGE_CONNECTION_STRING=conn), "fromconn"),
        (_no_azure_env(AZURE_STORAGE_CONNECTION_STRING=conn, AZURE_STORAGE_ACCOUNT="acct"), "acct"),
    ]:
        dry = _make_args("-n", "import-data", "URL=azure://c/p/x.jsonl", env=env)
        # After the URL: --fs-config takes every word that follows it.
        assert f'dvc import-url "azure://c/p/x.jsonl" "data/x.jsonl" --fs-config account_name={account}\n' in dry.stdout
        assert AZURITE_KEY not in dry.stdout
    dry = _make_args("-n", "import-data", "URL=azure://c/p/x.jsonl", "AZURE_ACCOUNT=given", env=_no_azure_env())
    assert "--fs-config account_name=given" in dry.stdout
    # s3:// and remote:// (the remote's own config holds its settings) record nothing.
    assert "--fs-config" not in _make_args("-n", "import-data", "URL=s3://b/x.jsonl", env=_no_azure_env()).stdout
    refused = _make_args("import-data", "URL=azure://c/p/x.jsonl", env=_no_azure_env())
    assert refused.returncode == 2 and "no Azure storage account name: set AZURE_STORAGE_ACCOUNT" in refused.stderr


def test_update_data_without_imports_says_what_to_do():
    assert not [p for p in (REPO_ROOT / "data").glob("*.dvc") if "deps:" in p.read_text()]
    result = _make_args("update-data")
    assert result.returncode == 2 and "nothing imported under data/" in result.stderr


def test_azurite_is_pinned_by_its_npm_lock():
    pinned = json.loads((AZURITE / "package.json").read_text())["dependencies"]["azurite"]
    lock = json.loads((AZURITE / "package-lock.json").read_text())
    assert re.fullmatch(r"\d+\.\d+\.\d+", pinned), f"tests/azurite/package.json: pin azurite exactly, not {pinned}"
    assert lock["packages"]["node_modules/azurite"]["version"] == pinned
    assert lock["packages"]["node_modules/azurite"]["integrity"].startswith("sha512-")
    ignored = subprocess.run(["git", "check-ignore", "-q", "tests/azurite/node_modules/x"], cwd=REPO_ROOT)
    assert ignored.returncode == 0, "tests/azurite/node_modules/ must be git-ignored"


def test_without_node_the_azurite_test_skips_and_says_why(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(pytest.skip.Exception, match="needs node and npm on PATH"):
        _azurite_blob()


# ---- slow: the real round trip through Azurite -------------------------------------------------------------


def _azurite_blob() -> Path:
    """tests/azurite/node_modules/.bin/azurite-blob, installed from the npm lock (again when the lock changed)."""
    npm, node = shutil.which("npm"), shutil.which("node")
    if not (npm and node):
        pytest.skip("Azurite (the Azure Storage emulator) needs node and npm on PATH; this machine lacks them")
    lock_sha = hashlib.sha256((AZURITE / "package-lock.json").read_bytes()).hexdigest()
    stamp = AZURITE / "node_modules" / ".slmkit-lock-sha256"
    if not stamp.is_file() or stamp.read_text() != lock_sha:
        run([npm, "ci", "--no-audit", "--no-fund", "--prefix", str(AZURITE)], AZURITE, timeout=600)
        stamp.write_text(lock_sha)
    return AZURITE / "node_modules" / ".bin" / "azurite-blob"


def _wait_for_port(proc: subprocess.Popen, timeout: float) -> int:
    """The port Azurite reports once it listens (it was given port 0: no race for a free port)."""
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline and sel.select(deadline - time.monotonic()):
        line = proc.stdout.readline()
        if not line:  # exited
            break
        seen.append(line)
        m = re.search(r"listens on http://127\.0\.0\.1:(\d+)", line)
        if m:
            return int(m.group(1))
    raise AssertionError(f"Azurite did not start listening within {timeout:.0f} s:\n{''.join(seen)}")


@pytest.fixture
def azurite(tmp_path: Path) -> Iterator[str]:
    """A running Azurite blob service on 127.0.0.1 (its data under tmp_path); yields its connection string."""
    exe = _azurite_blob()
    location = tmp_path / "azurite"
    location.mkdir()
    cmd = [str(exe), "--blobHost", "127.0.0.1", "--blobPort", "0", "--location", str(location)]
    # --skipApiVersionCheck: the pinned Azurite need not know the newest API version azure-storage-blob sends.
    cmd += ["--skipApiVersionCheck", "--loose", "--silent", "--disableTelemetry"]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, env=_env()
    )
    try:
        port = _wait_for_port(proc, timeout=60)
        yield (
            f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
            f"BlobEndpoint=http://127.0.0.1:{port}/{AZURITE_ACCOUNT};"
        )
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
        proc.stdout.close()


def _rows(per_label: int) -> bytes:
    """The first `per_label` rows of each label of the shipped data, in its own JSON-lines format."""
    data = compose().data
    counts = dict.fromkeys(data.labels, 0)
    out = []
    for line in (REPO_ROOT / data.path).read_text(encoding="utf-8").splitlines():
        label = json.loads(line)[data.label_column]
        if counts.get(label, per_label) < per_label:
            counts[label] += 1
            out.append(line + "\n")
    assert set(counts.values()) == {per_label}, counts
    return "".join(out).encode()


def _dvc_file(ws: Path) -> dict:
    return yaml.safe_load((ws / "data/cloud.jsonl.dvc").read_text())


def _ran(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Running stage")]


@pytest.mark.slow
def test_import_from_azure_prepare_then_update_reruns_prepare(azurite: str, tmp_path: Path):
    from azure.storage.blob import BlobServiceClient

    blob = BlobServiceClient.from_connection_string(azurite).get_container_client("corpus")
    blob.create_container()
    blob = blob.get_blob_client("tones/v/cloud.jsonl")
    first, second = _rows(10), _rows(12)
    blob.upload_blob(first)

    ws = copy_repo(tmp_path / "ws")
    env = _no_azure_env(AZURE_STORAGE_CONNECTION_STRING=azurite)
    make("import-data", ws, "URL=azure://corpus/tones/v/cloud.jsonl", env=env)
    rec = _dvc_file(ws)
    assert rec["deps"][0]["path"] == "azure://corpus/tones/v/cloud.jsonl"
    assert rec["deps"][0]["fs_config"] == {"account_name": AZURITE_ACCOUNT}
    assert rec["deps"][0]["etag"] == blob.get_blob_properties().etag
    assert rec["outs"][0]["md5"] == hashlib.md5(first).hexdigest()
    assert (ws / "data/cloud.jsonl").read_bytes() == first
    # The connection string is read from the environment, never written into the workspace.
    dvc_files = [ws / "data/cloud.jsonl.dvc", *(ws / ".dvc").glob("config*")]
    assert not [p for p in dvc_files if AZURITE_KEY in p.read_text()]
    # A teammate without Azure credentials can still run the pipeline: DVC loads the import from the
    # account name recorded in the .dvc file (frozen: its source is only read by `dvc update`).
    dvc = str(VENV / "bin" / "dvc")
    run([dvc, "status"], ws, env=_no_azure_env())

    prepared = make("prepare", ws, "ARGS=data.path=data/cloud.jsonl", env=env)
    assert "Running stage 'prepare'" in prepared.stdout
    manifest = json.loads((ws / "artifacts/prepare/manifest.json").read_text())
    assert manifest["source"] == {"path": "data/cloud.jsonl", "sha256": hashlib.sha256(first).hexdigest()}
    assert manifest["examples"] == len(first.splitlines())

    # The source unchanged: nothing to download, nothing to rerun.
    same = make("update-data", ws, env=env)
    assert "didn't change" in same.stdout + same.stderr
    assert _dvc_file(ws) == rec
    assert _ran(make("prepare", ws, env=env)) == []

    blob.upload_blob(second, overwrite=True)
    make("update-data", ws, "TO=data/cloud.jsonl", env=env)
    new = _dvc_file(ws)
    assert new["deps"][0]["etag"] == blob.get_blob_properties().etag != rec["deps"][0]["etag"]
    assert new["outs"][0]["md5"] == hashlib.md5(second).hexdigest() != rec["outs"][0]["md5"]
    assert (ws / "data/cloud.jsonl").read_bytes() == second
    assert new["deps"][0]["fs_config"] == {"account_name": AZURITE_ACCOUNT}

    status = run([dvc, "status", "prepare"], ws, env=env)
    assert "modified:" in status.stdout and "data/cloud.jsonl" in status.stdout, status.stdout
    assert _ran(make("prepare", ws, env=env)) == ["Running stage 'prepare':"]
    manifest = json.loads((ws / "artifacts/prepare/manifest.json").read_text())
    assert manifest["source"]["sha256"] == hashlib.sha256(second).hexdigest()
    assert manifest["examples"] == len(second.splitlines())

    # The other route: a DVC remote, its account name committed, the secret in .dvc/config.local only.
    run([dvc, "remote", "add", "cloud", "azure://corpus/tones"], ws)
    run([dvc, "remote", "modify", "cloud", "account_name", AZURITE_ACCOUNT], ws)
    run([dvc, "remote", "modify", "--local", "cloud", "connection_string", azurite], ws)
    make("import-data", ws, "URL=remote://cloud/v/cloud.jsonl", "TO=data/via-remote.jsonl", env=_no_azure_env())
    assert (ws / "data/via-remote.jsonl").read_bytes() == second
    assert AZURITE_KEY not in (ws / ".dvc/config").read_text() + (ws / "data/via-remote.jsonl.dvc").read_text()
