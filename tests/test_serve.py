"""`slmkit serve`: the int4 tiny model behind the HTTP API on 127.0.0.1, driven by a real HTTP client."""

from __future__ import annotations

import asyncio
import http.client
import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import pytest
from conftest import PHRASES

from slmkit.inference import load
from slmkit.serve import (
    Batcher,
    RequestError,
    Server,
    ServeSettings,
    create_app,
    default_max_body_bytes,
    parse_request,
)


def call(url: str, path: str, body: bytes | None = None, timeout: float = 60) -> tuple[int, dict]:
    """(status, JSON body) of one request; a POST when there is a body."""
    request = urllib.request.Request(url + path, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def post(url: str, payload, timeout: float = 60) -> tuple[int, dict]:
    return call(url, "/classify", json.dumps(payload).encode(), timeout)


@pytest.fixture(scope="module")
def clf(tiny_model_dirs):
    return load(tiny_model_dirs["onnx"], batch_size=4)


@pytest.fixture(scope="module")
def server(clf):
    with Server(create_app(clf, ServeSettings(max_phrases=8, max_chars=120), "tiny")) as running:
        yield running


def test_health_names_the_labels_and_limits(server, clf):
    status, body = call(server.url, "/health")
    assert status == 200 and body["status"] == "ok"
    assert body["labels"] == list(clf.data.labels) and body["backend"] == "onnx"
    assert body["limits"]["max_phrases"] == 8 and body["limits"]["max_chars"] == 120
    assert body["limits"]["max_body_bytes"] == default_max_body_bytes(8, 120)


def test_the_default_body_limit_takes_the_largest_request_the_phrase_limits_accept():
    """8 phrases of 120 characters, each an emoji JSON writes as a 12-byte escaped surrogate pair, indented."""
    body = json.dumps({"phrases": ["\U0001f600" * 120] * 8}, indent=2).encode()
    assert len(body) <= default_max_body_bytes(8, 120) < 2 * len(body)


def test_classify_returns_the_classifiers_labels_with_scores(server, clf):
    phrases = PHRASES[:8]
    status, body = post(server.url, {"phrases": phrases})
    assert status == 200, body
    expected = [p.label for p in clf.classify(phrases, decoding="constrained", batch_size=1)]
    assert [r["text"] for r in body["results"]] == phrases
    assert [r["label"] for r in body["results"]] == expected
    for result in body["results"]:
        assert set(result["scores"]) == set(clf.data.labels)
        assert abs(sum(result["scores"].values()) - 1) < 1e-3
        assert max(result["scores"], key=result["scores"].get) == result["label"]


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(server, clf):
    expected = {p.text: p.label for p in clf.classify(PHRASES, batch_size=1)}
    before = call(server.url, "/health")[1]["batches"]
    with ThreadPoolExecutor(len(PHRASES)) as pool:
        answers = list(pool.map(lambda p: post(server.url, {"phrases": [p]}), PHRASES))
    for phrase, (status, body) in zip(PHRASES, answers, strict=True):
        assert status == 200
        assert body["results"] == [{**body["results"][0], "text": phrase, "label": expected[phrase]}]
    # Fewer model batches than requests: some requests shared a batch.
    assert call(server.url, "/health")[1]["batches"] - before < len(PHRASES)


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        (b"not json", 400, "not JSON"),
        (b'["a list"]', 422, '"phrases" list'),
        (b'{"text": "hi"}', 422, '"phrases" list'),
        (b'{"phrases": "one string"}', 422, "must be a list"),
        (b'{"phrases": []}', 422, "is empty"),
        (b'{"phrases": ["ok", 3]}', 422, "phrases[1] must be a non-empty string"),
        (b'{"phrases": ["ok", "  "]}', 422, "phrases[1] must be a non-empty string"),
        (json.dumps({"phrases": ["x" * 121]}).encode(), 422, "121 characters; the limit is 120"),
        (json.dumps({"phrases": ["x"] * 9}).encode(), 413, "9 phrases in one request; the limit is 8"),
        (b'{"phrases": ["ok"], "top_k": 2}', 422, "unknown key"),
        (b'{"phrases": ["ok"]', 400, "not JSON (Expecting ',' delimiter at character 18)"),
        (b'{"phrases": ["\xff"]}', 400, "not UTF-8"),
        (b"[" * 5000, 400, "nested too deeply"),
        (b'{"phrases": [' + b"1" * 5000 + b"]}", 400, "number too long"),
        (b'{"phrases": ["ok", "\\ud800"]}', 400, "phrases[1] holds a lone surrogate"),
    ],
)
def test_bad_requests_get_a_4xx_that_says_what_is_wrong(server, body: bytes, status: int, says: str):
    got, answer = call(server.url, "/classify", body)
    assert got == status
    assert says in answer["error"]


def test_100000_nested_brackets_are_a_400_not_a_crash():
    """Over the test server's body limit, so parse_request reads them directly."""
    with pytest.raises(RequestError, match="nested too deeply") as refused:
        parse_request(b"[" * 100_000, ServeSettings(), max_chars=120)
    assert refused.value.status == 400


@pytest.mark.parametrize("path", ["/docs", "/redoc", "/openapi.json"])
def test_fastapis_generated_api_pages_are_off(server, path: str):
    assert call(server.url, path)[0] == 404


def post_huge_body(url: str, size: int, chunked: bool) -> tuple[int, dict, float]:
    """POST /classify with `size` bytes of body, sent from a thread while this one waits for the answer, as
    a client streaming an upload does: (status, JSON body, seconds from the request head to the answer)."""
    parts = urlsplit(url)
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {size}"
    head = f"POST /classify HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n{framing}\r\n\r\n"
    piece = b"[" * 2**20
    piece = b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece

    def send_body() -> None:
        try:
            for _ in range(size // 2**20):
                sock.sendall(piece)
            if chunked:
                sock.sendall(b"0\r\n\r\n")  # the last chunk: the body is complete
        except OSError:  # the socket shut once the answer was read
            pass

    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        start = time.monotonic()
        sock.sendall(head.encode())
        sender = threading.Thread(target=send_body)
        sender.start()
        response = http.client.HTTPResponse(sock)
        response.begin()
        seconds = time.monotonic() - start
        answer = json.loads(response.read())
        sock.shutdown(socket.SHUT_RDWR)
        sender.join(30)
    return response.status, answer, seconds


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_64_mb_body_gets_413_before_it_is_read_and_the_server_stays_healthy(server, chunked: bool):
    status, answer, seconds = post_huge_body(server.url, 64 * 2**20, chunked)
    limit = default_max_body_bytes(8, 120)
    assert status == 413 and f"over the limit of {limit} bytes (--max-body-bytes)" in answer["error"]
    assert seconds < 1, f"413 after {seconds:.2f} s"
    assert call(server.url, "/health")[0] == 200
    status, answer = post(server.url, {"phrases": PHRASES[:2]})
    assert status == 200 and [r["text"] for r in answer["results"]] == PHRASES[:2]


def test_under_load_with_bad_requests_mixed_in_each_request_gets_its_own_answer(server, clf):
    """Eight clients at once, good requests between oversized, malformed and over-limit ones: every request
    gets an answer within its timeout, each bad one the 4xx naming its fault, each good one its labels."""
    expected = {p.text: p.label for p in clf.classify(PHRASES, batch_size=1)}
    too_long_body = json.dumps({"phrases": ["x" * 20_000]}).encode()
    # (body maker, status, what the error says or the phrase sent); makers, as an iterator body is used up once
    bad = [
        (lambda: too_long_body, 413, "--max-body-bytes"),
        (lambda: iter([b"[" * 10_000] * 3), 413, "--max-body-bytes"),  # urllib sends an iterator chunked
        (lambda: b'{"phrases": ["Hi!"', 400, "not JSON"),
        (lambda: b"[" * 5000, 400, "nested too deeply"),
        (lambda: json.dumps({"phrases": PHRASES[:1] * 9}).encode(), 413, "--max-phrases"),
        (lambda: json.dumps({"phrases": ["x" * 121]}).encode(), 422, "the limit is 120"),
    ]
    jobs = []
    for n, phrase in enumerate(PHRASES * 3):
        jobs.append((lambda p=phrase: json.dumps({"phrases": [p]}).encode(), 200, phrase))
        if n % 2:
            jobs.append(bad[n // 2 % len(bad)])
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(call, server.url, "/classify", body(), 30) for body, _, _ in jobs]
        answers = [future.result(timeout=60) for future in futures]
    for (_, status, detail), (got, answer) in zip(jobs, answers, strict=True):
        assert got == status, (detail, answer)
        if status == 200:
            assert [(r["text"], r["label"]) for r in answer["results"]] == [(detail, expected[detail])]
        else:
            assert detail in answer["error"]


def test_a_full_queue_answers_503_and_the_waiting_requests_still_finish(clf):
    """Hold the model so one request is in flight and one waits; the next finds the queue full."""
    app = create_app(clf, ServeSettings(queue_size=1, max_wait_ms=0))
    batcher = app.state.batcher
    with Server(app) as running:
        replies: list = []
        with batcher.model_lock:
            first = threading.Thread(target=lambda: replies.append(post(running.url, {"phrases": ["one"]})))
            first.start()
            _wait_for(lambda: batcher.in_flight == 1)
            second = threading.Thread(target=lambda: replies.append(post(running.url, {"phrases": ["two"]})))
            second.start()
            _wait_for(lambda: batcher.queue.qsize() == 1)
            status, body = post(running.url, {"phrases": ["three"]})
            assert status == 503 and "busy" in body["error"]
        first.join(60)
        second.join(60)
    assert sorted(r[1]["results"][0]["text"] for r in replies) == ["one", "two"]
    assert all(r[0] == 200 for r in replies)


def _wait_for(condition, seconds: float = 30) -> None:
    end = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < end, "the server did not reach the expected state"
        time.sleep(0.01)


class FailingModel:
    """The tiny classifier, whose forward pass raises while `failing` is set: a model failure on the path
    the server runs (Batcher.classify -> constrained_batch)."""

    def __init__(self, clf):
        self.clf, self.failing = clf, False

    def __getattr__(self, name: str):
        return getattr(self.clf, name)

    def constrained_batch(self, prompts: list[str]):
        if self.failing:
            raise RuntimeError("out of memory")
        return self.clf.constrained_batch(prompts)


async def _until(condition, seconds: float = 30) -> None:
    end = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < end, "the batcher did not reach the expected state"
        await asyncio.sleep(0.01)


def test_a_failed_batch_with_a_cancelled_request_answers_500_and_the_batcher_goes_on(clf):
    """Two requests in one batch; one is cancelled (as uvicorn cancels requests past its graceful-shutdown
    timeout) while the model fails the batch."""
    model = FailingModel(clf)

    async def scenario() -> list[dict]:
        batcher = Batcher(model, ServeSettings(max_wait_ms=1000, max_batch=2))
        await batcher.start()
        try:
            with batcher.model_lock:  # the batch waits for the model while the test arranges it
                gone = asyncio.create_task(batcher.submit(["gone"]))
                waiting = asyncio.create_task(batcher.submit(["waiting"]))
                await _until(lambda: batcher.in_flight == 2)
                gone.cancel()
                await asyncio.wait([gone])
                model.failing = True
            with pytest.raises(RequestError, match=r"model failed .*RuntimeError: out of memory") as failed:
                await asyncio.wait_for(waiting, 10)
            assert failed.value.status == 500
            model.failing = False
            return await asyncio.wait_for(batcher.submit(PHRASES[:2]), 10)
        finally:
            await batcher.stop()

    expected = [p.label for p in clf.classify(PHRASES[:2], decoding="constrained")]
    assert [r["label"] for r in asyncio.run(scenario())] == expected


def test_a_failed_batch_answers_a_json_500_over_http(clf):
    model = FailingModel(clf)
    with Server(create_app(model, ServeSettings())) as running:
        model.failing = True
        status, body = post(running.url, {"phrases": ["hello"]})
        assert status == 500 and "RuntimeError: out of memory" in body["error"]
        model.failing = False
        assert post(running.url, {"phrases": ["hello"]})[0] == 200


def test_a_dead_batcher_fails_health_and_requests_get_503_instead_of_hanging(clf):
    app = create_app(clf, ServeSettings(max_wait_ms=0))
    batcher = app.state.batcher
    with Server(app) as running:
        replies: list = []
        with batcher.model_lock:  # one request in flight when the batcher dies
            first = threading.Thread(target=lambda: replies.append(post(running.url, {"phrases": ["one"]}, 10)))
            first.start()
            _wait_for(lambda: batcher.in_flight == 1)
            task = batcher._task  # killed from outside: no bug in the batcher is known that would end it
            task.get_loop().call_soon_threadsafe(task.cancel)
            first.join(10)
        status, health = call(running.url, "/health")
        assert status == 503 and health["status"] == "error" and "batcher stopped" in health["error"]
        assert replies and replies[0][0] == 503 and "restart the server" in replies[0][1]["error"]
        status, body = post(running.url, {"phrases": ["two"]}, 10)
        assert status == 503 and body["error"] == health["error"]


def test_load_test_counts_every_answer_and_stops_at_the_request_budget(server):
    from slmkit.bench import load_test

    result = load_test(server.url, PHRASES, concurrency=3, requests=7, max_seconds=60)
    assert result["requests"] == 7 and result["errors"] == {}
    assert result["latency_p50_ms"] <= result["latency_p95_ms"]


def test_load_test_counts_refusals_as_errors(server):
    from slmkit.bench import load_test

    result = load_test(server.url, ["x" * 500], concurrency=2, requests=4, max_seconds=60)
    assert result["requests"] == 0 and result["errors"] == {"422": 4}


def test_batch_vs_loop_reports_identical_labels(tiny_model_dirs):
    from slmkit.bench import batch_vs_loop

    result = batch_vs_loop(tiny_model_dirs["onnx"], PHRASES, batch_size=4, threads=1)
    assert result["labels_identical"] and result["phrases"] == len(PHRASES) and result["threads"] == 1


def test_slmkit_serve_command_starts_answers_and_stops(tiny_model_dirs, tmp_path):
    """The command line (`slmkit serve`, what `make serve` runs) in its own process, as bench-serve uses it."""
    from slmkit.bench import free_port, start_server

    port = free_port()
    flags = ["--max-phrases", "2", "--max-body-bytes", "5000", "--threads", "1"]
    log = tmp_path / "serve.log"
    proc = start_server(tiny_model_dirs["onnx"], port, flags, log=log)
    try:
        url = f"http://127.0.0.1:{port}"
        limits = call(url, "/health")[1]["limits"]
        assert limits["max_phrases"] == 2 and limits["max_body_bytes"] == 5000
        assert call(url, "/classify", b" " * 5001)[0] == 413
        status, body = post(url, {"phrases": PHRASES[:2]})
        assert status == 200 and [r["text"] for r in body["results"]] == PHRASES[:2]
        assert post(url, {"phrases": PHRASES[:3]})[0] == 413
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    # uvicorn shuts down on SIGTERM (the lifespan's end included), then re-raises the signal: killed any
    # other way, or before its handler was in place, the log would not end that way
    assert proc.returncode == -signal.SIGTERM
    assert "Application shutdown complete." in log.read_text()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_slmkit_serve_without_a_model_folder_fails_naming_it(tmp_path):
    from slmkit.bench import free_port, start_server

    with pytest.raises(RuntimeError, match="no such model folder"):
        start_server(tmp_path / "missing", free_port(), [], timeout_s=60)


def _broken_copy(tiny_model_dirs, tmp_path, folder: str, file: str):
    """A copy of one tiny model folder with `file` cut short, as an interrupted copy leaves it."""
    broken = tmp_path / folder
    shutil.copytree(tiny_model_dirs[folder], broken)
    (broken / file).write_bytes((broken / file).read_bytes()[:10])
    return broken


@pytest.mark.parametrize(
    ("folder", "file", "cause"),
    [
        ("onnx", "genai_config.json", "RuntimeError: Error encountered while parsing"),
        ("onnx", "model.onnx", "Protobuf parsing failed"),
        ("onnx", "slmkit_prompt.json", "slmkit_prompt.json is not valid JSON"),
        ("pytorch", "config.json", "is not a valid JSON file"),
        ("pytorch", "model.safetensors", "SafetensorError"),
    ],
)
def test_a_model_folder_that_cannot_load_is_one_line_naming_it_and_the_cause(
    tiny_model_dirs, tmp_path, capfd, folder: str, file: str, cause: str
):
    from slmkit.cli import main

    broken = _broken_copy(tiny_model_dirs, tmp_path, folder, file)
    assert main(["classify", "--model", str(broken), "hello"]) == 1
    err = capfd.readouterr().err
    assert err.startswith(f"slmkit classify: error: cannot load the model in {broken}: ") and cause in err
    assert err.endswith("is the folder complete? (`make finetune` writes one)\n")
    assert err.count("\n") == 1, err


def test_slmkit_serve_with_a_broken_model_exits_1_with_one_line(tiny_model_dirs, tmp_path):
    """As a process: whatever onnxruntime prints goes to the same stderr."""
    from slmkit.bench import free_port

    broken = _broken_copy(tiny_model_dirs, tmp_path, "onnx", "model.onnx")
    command = [sys.executable, "-m", "slmkit.cli", "serve", "--model", str(broken), "--port", str(free_port())]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"slmkit serve: error: cannot load the model in {broken}: ")
