"""GPU tier (`pytest -m gpu`, device machine only, never in CI): the real Phi-3-mini-4k layout (3.8 B
parameters, random weights built on the machine, no download) through LoRA and QLoRA, merge and the
int4 CUDA build; each run's numbers go to $SLMKIT_GPU_RESULTS (a JSON file; the device run points it
at its $OUT), else to the session's temporary folder: never into the working tree.

Needs the CUDA lock installed in the running interpreter (requirements/cuda.txt: olive-ai, bitsandbytes,
onnxruntime-gpu, onnxruntime-genai-cuda) and a CUDA GPU."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from workspace import copy_repo, make

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
    stats = json.loads((ws / "artifacts/runs/train/train_stats.json").read_text())
    assert stats["device"] == "cuda" and stats["peak_gpu_memory_gib"] > 0
    genai = json.loads((ws / "artifacts/quantize/model/genai_config.json").read_text())
    assert "cuda" in json.dumps(genai["model"]["decoder"]["session_options"]).lower()
    size = sum(p.stat().st_size for p in (ws / "artifacts/quantize/model").iterdir())
    eval_json = json.loads((ws / "metrics/eval.json").read_text())
    decode = _int4_cuda_vs_torch_bf16(ws)
    record = {
        "method": method,
        "gpu": torch.cuda.get_device_name(0),
        "train": stats,
        "stage_seconds": seconds,
        "int4_folder_bytes": size,
        "eval": eval_json,
        "decode": decode,
    }
    _record(method, record)
    assert size < 3.0e9  # int4: about 2.2 GB for 3.8 B parameters
    assert decode["int4_cuda"]["device"] == "cuda" and decode["torch_bf16"]["device"] == "cuda"


def _int4_cuda_vs_torch_bf16(ws: Path) -> dict:
    """onnxruntime-genai-cuda int4 vs PyTorch bf16 `generate` on the same 16 test prompts, same GPU.

    Random weights: the tokens are meaningless, the speed is the real layout's (every run generates
    exactly the requested number of tokens)."""
    from slmkit import bench
    from slmkit.config import load_params
    from slmkit.data import read_split
    from slmkit.prompt import build_prompt

    cfg = load_params(ws / "params.yaml")
    prompts = [build_prompt(cfg.data, e.text) for e in read_split(ws / "artifacts/prepare/test.jsonl")[:16]]
    models = {"int4_cuda": ws / "artifacts/quantize/model", "torch_bf16": ws / "artifacts/merge/model"}
    settings = {"label_tokens": 3, "decode_tokens": 128, "repeats": 2, "threads": 4, "device": "cuda"}
    out = {name: bench.measure_in_subprocess(path, prompts, **settings) for name, path in models.items()}
    out["int4_vs_torch_decode_speedup"] = round(
        out["int4_cuda"]["decode_tokens_per_s"] / out["torch_bf16"]["decode_tokens_per_s"], 2
    )
    out["int4_vs_torch_ttft_speedup"] = round(out["torch_bf16"]["ttft_p50_ms"] / out["int4_cuda"]["ttft_p50_ms"], 2)
    return out


def _record(key: str, record: dict) -> None:
    import os
    import tempfile

    out = Path(os.environ.get("SLMKIT_GPU_RESULTS") or Path(tempfile.gettempdir()) / "slmkit-gpu.json")
    results = json.loads(out.read_text()) if out.exists() else {}
    results[key] = record
    out.write_text(json.dumps(results, indent=2) + "\n")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="data-parallel training needs 2+ GPUs")
def test_data_parallel_lora_on_every_gpu(tmp_path: Path):
    """train.nproc_per_node = every GPU: NCCL ranks, each step N x the examples; step time vs one GPU."""
    gpus = torch.cuda.device_count()
    ws = copy_repo(tmp_path)
    result = make("train", ws, f"ARGS={ARGS} train.nproc_per_node={gpus}")  # up to train: no build
    log = result.stdout + result.stderr
    assert f"in {gpus} data-parallel processes (cuda)" in log
    assert f"all {gpus} data-parallel ranks hold the same adapter" in log
    stats = json.loads((ws / "artifacts/runs/train/train_stats.json").read_text())
    assert stats["processes"] == gpus and stats["peak_gpu_memory_gib"] > 0
    _record(f"lora_ddp_{gpus}", {"gpu": torch.cuda.get_device_name(0), "gpus": gpus, "train": stats})
