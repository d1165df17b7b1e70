"""GPU tier (`pytest -m gpu`, device machine only, never in CI): the real Phi-3-mini-4k layout (3.8 B
parameters, random weights built on the machine, no download) through LoRA and QLoRA, merge and the
int4 CUDA build; each run's numbers go to metrics/gpu.json for docs/scaling.md.

Needs the CUDA lock installed in the running interpreter (requirements/cuda.txt: olive-ai, bitsandbytes,
onnxruntime-gpu, onnxruntime-genai-cuda) and a CUDA GPU."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.workspace import REPO_ROOT, copy_repo, make

pytestmark = pytest.mark.gpu
torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU", allow_module_level=True)

# The reference recipe's shape on the real layout, 30 steps: enough for steady step times.
ARGS = "model=phi3_mini_4k model.source=random train=reference train.max_steps=30 builder=int4_cuda"


def _stage_seconds(log: str) -> dict[str, float]:
    """Each stage's wall time from its closing log line ("stage merge: done in 11.2 s")."""
    return {m[1]: float(m[2]) for m in re.finditer(r"stage (\w+): done in ([\d.]+) s", log)}


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_phi3_mini_layout_to_int4_cuda(method: str, tmp_path: Path):
    ws = copy_repo(tmp_path)
    result = make("finetune", ws, f"ARGS={ARGS} lora={method}")
    seconds = _stage_seconds(result.stdout + result.stderr)
    stats = json.loads((ws / "artifacts/train/train_stats.json").read_text())
    assert stats["device"] == "cuda" and stats["peak_gpu_memory_gib"] > 0
    genai = json.loads((ws / "artifacts/quantize/model/genai_config.json").read_text())
    assert "cuda" in json.dumps(genai["model"]["decoder"]["session_options"]).lower()
    size = sum(p.stat().st_size for p in (ws / "artifacts/quantize/model").iterdir())
    eval_json = json.loads((ws / "metrics/eval.json").read_text())
    record = {
        "method": method,
        "gpu": torch.cuda.get_device_name(0),
        "train": stats,
        "stage_seconds": seconds,
        "int4_folder_bytes": size,
        "eval": eval_json,
    }
    out = REPO_ROOT / "metrics" / "gpu.json"
    results = json.loads(out.read_text()) if out.exists() else {}
    results[method] = record
    out.write_text(json.dumps(results, indent=2) + "\n")
    assert size < 3.0e9  # int4: about 2.2 GB for 3.8 B parameters
