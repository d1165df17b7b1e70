"""Latency, throughput, memory and size of the shipped model formats, and a medium Phi-3-layout model for them.

The measurement of one model runs in its own process (`python -m slmkit.bench MODEL_DIR ...`) so its
peak memory is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from slmkit.config import TinyModelConfig


@dataclass
class MediumModel:
    """The real Phi-3 layout (vocab 32064, untied embeddings, fused qkv/gate_up) at a medium size."""

    hidden_size: int = 1024
    num_hidden_layers: int = 12
    num_attention_heads: int = 16
    intermediate_size: int = 2816
    vocab_size: int = 32064  # Phi-3's: 32000 BPE tokens + 64 added
    max_position_embeddings: int = 4096


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def build_medium(out_dir: Path, texts: list[str], seed: int, layout: MediumModel | None = None) -> dict:
    """A random-weight Phi-3 model of `layout` plus a tokenizer padded to its vocabulary, saved HF-style."""
    import torch

    from slmkit.tiny import build_model, seed_everything, train_tokenizer

    layout = layout or MediumModel()
    seed_everything(seed)
    tokenizer = train_tokenizer(texts, vocab_size=2000)
    # Pad with added tokens (as Phi-3 does for its chat markers) so token ids and vocab agree.
    tokenizer.add_tokens([f"<|placeholder{i}|>" for i in range(layout.vocab_size - len(tokenizer))])
    sizes = TinyModelConfig(
        hidden_size=layout.hidden_size,
        num_hidden_layers=layout.num_hidden_layers,
        num_attention_heads=layout.num_attention_heads,
        intermediate_size=layout.intermediate_size,
        max_position_embeddings=layout.max_position_embeddings,
    )
    model = build_model(sizes, len(tokenizer), tokenizer.eos_token_id).to(torch.float32).eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return {"parameters": sum(p.numel() for p in model.parameters()), "layout": vars(layout)}


def peak_rss_kb() -> int:
    """This process's peak resident memory. VmHWM, not ru_maxrss: after fork+exec Linux's ru_maxrss still
    counts the parent's memory at fork time, so every child would report at least the parent's peak."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


class _Genai:
    def __init__(self, path: Path, threads: int):
        from slmkit.inference import GenaiModel

        self.genai = GenaiModel(path, threads=threads)  # loaded and threaded as slmkit.load does
        self.model = self.genai.model

    def encode(self, text: str) -> list[int]:
        return self.genai.encode(text)

    def run(self, ids: list[int], new_tokens: int) -> list[float]:
        """Greedy-generate exactly `new_tokens` tokens; return the time stamp of each."""
        og = self.genai.og
        params = og.GeneratorParams(self.model)
        n = len(ids) + new_tokens
        params.set_search_options(max_length=n, min_length=n, do_sample=False)
        gen = og.Generator(self.model, params)
        stamps = []
        gen.append_tokens(ids)
        while not gen.is_done():
            gen.generate_next_token()
            stamps.append(time.perf_counter())
        return stamps


class _Torch:
    def __init__(self, path: Path, threads: int, device: str = "cpu", dtype: str | None = None):
        """fp32 on the CPU, bf16 on a GPU (what a PyTorch user would serve there), unless `dtype` says."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(threads)
        self.torch = torch
        self.device = device
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        dtype = dtype or ("bfloat16" if device == "cuda" else "float32")
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(device).eval()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def run(self, ids: list[int], new_tokens: int) -> list[float]:
        """Hugging Face `generate` (what slmkit's TorchModel runs), greedy, exactly `new_tokens` tokens."""
        from transformers.generation.streamers import BaseStreamer

        stamps: list[float] = []

        class Stamp(BaseStreamer):
            first = True

            def put(self, value):  # generate() hands over each token on the CPU (a GPU sync)
                if self.first:  # generate() streams the prompt first
                    self.first = False
                else:
                    stamps.append(time.perf_counter())

            def end(self):
                pass

        with self.torch.no_grad():
            self.model.generate(
                input_ids=self.torch.tensor([ids], device=self.device),
                attention_mask=self.torch.ones((1, len(ids)), dtype=self.torch.long, device=self.device),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=self.tokenizer.pad_token_id,
                streamer=Stamp(),
            )
        return stamps


def measure(
    path: Path,
    prompts: list[str],
    label_tokens: int,
    decode_tokens: int,
    repeats: int,
    threads: int,
    device: str = "cpu",
) -> dict:
    """Per-phrase latency (prompt + `label_tokens` tokens), time to first token, decode tokens/s, peak RSS.

    `threads`: compute threads for either runtime. On a machine shared with other work, more threads than
    free cores makes both runtimes several times slower (measured: torch 2.8 vs 13 tok/s), so pin it.
    `device`: where a PyTorch model runs (cuda: bf16); an ONNX folder runs where its genai_config says.
    """
    start = time.perf_counter()
    genai = (path / "genai_config.json").exists()
    runner = _Genai(path, threads) if genai else _Torch(path, threads, device)
    load_s = time.perf_counter() - start
    encoded = [runner.encode(p) for p in prompts]
    for ids in encoded:  # warm-up: the first request at each new prompt length is slow
        runner.run(ids, 2)
    latency, ttft, decode = [], [], []
    for _ in range(repeats):
        for ids in encoded:
            t0 = time.perf_counter()
            stamps = runner.run(ids, label_tokens)
            latency.append(stamps[-1] - t0)
            ttft.append(stamps[0] - t0)
    for ids in encoded[: max(1, len(encoded) // 4)]:
        stamps = runner.run(ids, decode_tokens)
        decode.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    return {
        "load_s": round(load_s, 3),
        "latency_p50_ms": round(1000 * percentile(latency, 0.5), 2),
        "latency_p95_ms": round(1000 * percentile(latency, 0.95), 2),
        "ttft_p50_ms": round(1000 * percentile(ttft, 0.5), 2),
        "decode_tokens_per_s": round(statistics.median(decode), 1),
        "peak_rss_mb": round(peak_rss_kb() / 1024, 1),
        "size_mb": round(folder_size(path) / 1e6, 1),
        "phrases": len(prompts),
        "label_tokens": label_tokens,
        "decode_tokens": decode_tokens,
        "repeats": repeats,
        "threads": threads,
        "device": _genai_device(path) if genai else device,
        # Other processes on the machine slow every figure: the 1-minute load average when done.
        "load_average": round(os.getloadavg()[0], 2),
    }


def _genai_device(path: Path) -> str:
    """cuda if the ONNX folder's genai_config puts the model on the CUDA execution provider, else cpu."""
    options = json.loads((path / "genai_config.json").read_text())["model"]["decoder"].get("session_options", {})
    return "cuda" if "cuda" in json.dumps(options.get("provider_options", [])).lower() else "cpu"


def measure_in_subprocess(path: Path, prompts: list[str], **settings) -> dict:
    """`measure(path, prompts, **settings)` in a fresh Python process, so peak memory and warm caches are
    the model's own. settings: label_tokens, decode_tokens, repeats, threads and optionally device."""
    args = [sys.executable, "-m", "slmkit.bench", str(path)]
    for key, value in settings.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    result = subprocess.run(args, input=json.dumps(prompts), capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"benchmark of {path} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def ratios(name: str, built: dict, torch: dict, fp32_onnx: dict) -> dict:
    """The quantized ONNX model (`name`: int8_onnx, int4_onnx) against PyTorch and fp32 ONNX."""
    q = name.removesuffix("_onnx")
    return {
        f"{q}_vs_torch_decode_speedup": round(built["decode_tokens_per_s"] / torch["decode_tokens_per_s"], 2),
        f"{q}_vs_torch_latency_speedup": round(torch["latency_p50_ms"] / built["latency_p50_ms"], 2),
        f"{q}_vs_fp32_onnx_decode_speedup": round(built["decode_tokens_per_s"] / fp32_onnx["decode_tokens_per_s"], 2),
        f"{q}_size_share_of_fp32_onnx": round(built["size_mb"] / fp32_onnx["size_mb"], 3),
        f"{q}_size_share_of_torch": round(built["size_mb"] / torch["size_mb"], 3),
        f"{q}_vs_torch_peak_rss": round(built["peak_rss_mb"] / torch["peak_rss_mb"], 3),
    }


def batch_vs_loop(
    path: Path, texts: list[str], batch_size: int, threads: int | None, decoding: str = "constrained"
) -> dict:
    """Classification of `texts` one at a time vs in batches of `batch_size`, in one run.

    Fails if a label differs: a batch must give what one at a time gives.
    """
    from slmkit.inference import default_threads, load

    clf = load(path, batch_size=batch_size, threads=threads, decoding=decoding, ungated=True)  # measured, not used
    clf.classify(texts[:batch_size])  # warm-up of both paths (first calls allocate)
    clf.classify(texts[:2], batch_size=1)
    start = time.perf_counter()
    one = clf.classify(texts, batch_size=1)
    loop_s = time.perf_counter() - start
    start = time.perf_counter()
    batched = clf.classify(texts)
    batch_s = time.perf_counter() - start
    differ = [p.text for p, q in zip(one, batched, strict=True) if p.label != q.label]
    if differ:
        raise RuntimeError(f"{path}: batched labels differ from one at a time on {len(differ)} phrases: {differ[:3]}")
    return {
        "phrases": len(texts),
        "decoding": decoding,
        "batch_size": batch_size,
        "threads": threads or default_threads(),
        "loop_ms_per_phrase": round(1000 * loop_s / len(texts), 2),
        "batch_ms_per_phrase": round(1000 * batch_s / len(texts), 2),
        "speedup": round(loop_s / batch_s, 2),
        "labels_identical": True,
        "load_average": round(os.getloadavg()[0], 2),
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(
    model: Path, port: int, extra: list[str], timeout_s: float = 180, log: Path | None = None
) -> subprocess.Popen:
    """`slmkit serve` on 127.0.0.1:`port` in its own process; returns once /health answers. Its log goes
    to `log`, else to a temporary file (shown if the server does not start)."""
    import tempfile
    import urllib.request

    cmd = [sys.executable, "-m", "slmkit.cli", "serve", "--model", str(model), "--port", str(port), *extra]
    # The server's log to a file, not a pipe: an unread pipe that fills up would stall the server. The
    # child keeps its own handle on the file after this one closes.
    with log.open("w+") if log else tempfile.TemporaryFile(mode="w+") as log_file:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log_file, text=True)
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if proc.poll() is not None:
                log_file.seek(0)
                raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{log_file.read()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    return proc
            except OSError:
                time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{' '.join(cmd)} did not answer /health within {timeout_s:.0f} s")


def process_peak_rss_mb(pid: int) -> float:
    """The peak resident memory of a running process so far (Linux: VmHWM in /proc/<pid>/status), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError(f"/proc/{pid}/status has no VmHWM: peak memory is measured on Linux only")


def classify_all(url: str, phrases: list[str], model: str | None = None, per_request: int = 64) -> list[str]:
    """Every phrase's label from a running `slmkit serve`, `per_request` phrases a POST (`model`: which one)."""
    import urllib.request

    labels: list[str] = []
    for start in range(0, len(phrases), per_request):
        body: dict = {"phrases": phrases[start : start + per_request]}
        if model:
            body["model"] = model
        request = urllib.request.Request(
            url + "/classify", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=600) as response:
            labels += [row["label"] for row in json.loads(response.read())["results"]]
    return labels


def load_test(
    url: str, phrases: list[str], concurrency: int, requests: int, max_seconds: float, models: list[str] | None = None
) -> dict:
    """`concurrency` clients each sending one phrase per POST /classify, back to back, until `requests`
    answers or `max_seconds`: requests/s and latency percentiles (errors counted, not timed). `models`: the
    requests name these served models in turn (adapters on one base), else none."""
    import threading
    import urllib.error
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    lock = threading.Lock()
    sent = [0]
    latencies: list[float] = []
    errors: dict[str, int] = {}
    deadline = time.monotonic() + max_seconds

    def client() -> None:
        while time.monotonic() < deadline:
            with lock:
                if sent[0] >= requests:
                    return
                i = sent[0]
                sent[0] += 1
            payload: dict = {"phrases": [phrases[i % len(phrases)]]}
            if models:
                payload["model"] = models[i % len(models)]
            body = json.dumps(payload).encode()
            request = urllib.request.Request(url + "/classify", data=body, headers={"Content-Type": "application/json"})
            t0 = time.perf_counter()
            try:
                with urllib.request.urlopen(request, timeout=max_seconds) as response:
                    response.read()
                with lock:
                    latencies.append(time.perf_counter() - t0)
            except (urllib.error.HTTPError, OSError) as err:
                with lock:
                    key = str(getattr(err, "code", type(err).__name__))
                    errors[key] = errors.get(key, 0) + 1

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(client) for _ in range(concurrency)]:
            future.result()  # a client's own bug surfaces here instead of a silent zero
    elapsed = time.perf_counter() - start
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "errors": errors,
        "seconds": round(elapsed, 2),
        "requests_per_s": round(len(latencies) / elapsed, 1),
        "latency_p50_ms": round(1000 * percentile(latencies, 0.5), 2) if latencies else None,
        "latency_p95_ms": round(1000 * percentile(latencies, 0.95), 2) if latencies else None,
        "load_average": round(os.getloadavg()[0], 2),
    }


def _main() -> None:
    parser = argparse.ArgumentParser(description="measure one model folder; prompts as a JSON list on stdin")
    parser.add_argument("path", type=Path)
    parser.add_argument("--label-tokens", type=int, required=True)
    parser.add_argument("--decode-tokens", type=int, required=True)
    parser.add_argument("--repeats", type=int, required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args()
    prompts = json.loads(sys.stdin.read())
    result = measure(args.path, prompts, args.label_tokens, args.decode_tokens, args.repeats, args.threads, args.device)
    print(json.dumps(result))


if __name__ == "__main__":
    _main()


def machine() -> dict:
    """The CPU model and its instruction sets (AMX, AVX-512 bf16, VNNI: they decide which kernels run, and
    int4 at accuracy level 4 rounds differently on each), cores, memory and Python version a figure was
    measured on."""
    import psutil

    from slmkit.formats import cpu_features

    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines() if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "features": cpu_features(),
    }
