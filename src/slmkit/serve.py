"""`slmkit serve`: a model folder behind a small HTTP JSON API (FastAPI on uvicorn).

    POST /classify  {"phrases": ["...", ...]}  ->  {"results": [{"text", "label", "scores"}, ...]}
    GET  /health                               ->  {"status": "ok", "labels", "queued", ...}

Requests that arrive within `max_wait_ms` of each other are classified together, one forward pass per
`batch_size` phrases (constrained decoding, slmkit.inference). The queue is bounded: when `queue_size`
requests wait, a new one gets 503 at once instead of a long wait. A body over `max_body_bytes` is refused
before it is read. Bad requests get a 4xx naming the problem, a batch the model fails a 500 (docs/serving.md
has the table). Should the batcher task ever end, /health answers 503 and so does every request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

# At module level: FastAPI reads the handlers' annotations (strings here) in this module's namespace.
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from slmkit.inference import Classifier
from slmkit.prompt import build_prompt

log = logging.getLogger(__name__)


@dataclass
class ServeSettings:
    max_phrases: int = 64  # phrases in one request (413 above)
    max_chars: int | None = None  # longest phrase (422 above); None: the model folder's data.max_chars
    max_wait_ms: float = 5.0  # how long the first request of a batch waits for others to join it
    max_batch: int = 64  # phrases gathered into one batch at most (then split by the classifier's batch_size)
    queue_size: int = 32  # requests waiting at most (503 above)
    max_body_bytes: int | None = None  # request body (413 above); None: default_max_body_bytes()


# The longest JSON spelling of one character: an escaped surrogate pair, \ud83d\ude00 for one emoji.
JSON_BYTES_PER_CHAR = 12
EXAMPLE = '{"phrases": ["a phrase", ...]}'


def default_max_body_bytes(max_phrases: int, max_chars: int) -> int:
    """The largest body the phrase limits can accept, however its JSON is escaped: max_phrases phrases of
    max_chars characters, each 12 bytes, plus 64 bytes a phrase and 1 KiB for quotes, commas and whitespace."""
    return max_phrases * (max_chars * JSON_BYTES_PER_CHAR + 64) + 1024


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class _Job:
    phrases: list[str]
    future: asyncio.Future = field(repr=False)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, or a 413 as soon as it is known to be over `limit` bytes: from Content-Length
    before reading any of it, else (a chunked body) once the bytes read pass the limit. uvicorn reads at
    most 64 KiB ahead of this loop and discards what is left after the answer.

    Starlette's RequestBodyLimitMiddleware answers the same in plain text; this answer is JSON naming the limit.
    """
    too_large = RequestError(
        413, f"the body is over the limit of {limit} bytes (--max-body-bytes); send fewer phrases per request"
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


def parse_request(body: bytes, settings: ServeSettings, max_chars: int) -> list[str]:
    """The phrases of a /classify body, or a RequestError saying what is wrong with it."""
    try:
        payload = json.loads(body)
    except json.JSONDecodeError as err:
        raise RequestError(400, f"the body is not JSON ({err.msg} at character {err.pos}); send {EXAMPLE}") from None
    except UnicodeDecodeError:
        raise RequestError(400, f"the body is not UTF-8 text; send {EXAMPLE}") from None
    except RecursionError:
        raise RequestError(400, f"the body's JSON is nested too deeply to read; send {EXAMPLE}") from None
    except ValueError:  # Python reads no integer of over 4300 digits (sys.get_int_max_str_digits)
        raise RequestError(400, f"the body's JSON holds a number too long to read; send {EXAMPLE}") from None
    if not isinstance(payload, dict) or "phrases" not in payload:
        raise RequestError(422, 'the body must be a JSON object with a "phrases" list: {"phrases": ["..."]}')
    extra = sorted(set(payload) - {"phrases"})
    if extra:
        raise RequestError(422, f'unknown key(s) {extra}: the body takes only "phrases"')
    phrases = payload["phrases"]
    if not isinstance(phrases, list):
        raise RequestError(422, '"phrases" must be a list of strings')
    if not phrases:
        raise RequestError(422, '"phrases" is empty: give at least one phrase')
    if len(phrases) > settings.max_phrases:
        raise RequestError(
            413, f"{len(phrases)} phrases in one request; the limit is {settings.max_phrases} (--max-phrases)"
        )
    for i, phrase in enumerate(phrases):
        if not isinstance(phrase, str) or not phrase.strip():
            raise RequestError(422, f"phrases[{i}] must be a non-empty string")
        try:
            phrase.encode("utf-8")
        except UnicodeEncodeError:  # JSON can spell half a surrogate pair ("\ud800"): no character, no UTF-8
            raise RequestError(400, f"phrases[{i}] holds a lone surrogate, half of a \\ud800-\\udfff pair") from None
        if len(phrase) > max_chars:
            raise RequestError(
                422, f"phrases[{i}] has {len(phrase)} characters; the limit is {max_chars} (the model's data.max_chars)"
            )
    return phrases


class Batcher:
    """Gathers queued requests into batches and runs them on the model, one batch at a time.

    The model runs in one worker thread (so the event loop keeps accepting requests); `model_lock`
    serialises every use of the model.
    """

    def __init__(self, clf: Classifier, settings: ServeSettings):
        self.clf = clf
        self.settings = settings
        self.queue: asyncio.Queue[_Job] | None = None
        self.in_flight = 0
        self.batches = 0
        self.model_lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="slmkit-model")
        self._task: asyncio.Task | None = None

    def classify(self, phrases: list[str]) -> list[dict]:
        """Label and per-label scores for each phrase (blocking; the worker thread runs it)."""
        clf, labels = self.clf, list(self.clf.data.labels)
        prompts = [build_prompt(clf.data, p) for p in phrases]
        results: list[dict] = [{} for _ in phrases]
        with self.model_lock:
            for batch in clf.batches(prompts):
                picks, scores = clf.constrained_batch([prompts[i] for i in batch])
                for i, pick, row in zip(batch, picks, scores, strict=True):
                    results[i] = {"text": phrases[i], "label": labels[pick]}
                    if row is not None:
                        results[i]["scores"] = dict(zip(labels, row, strict=True))
        return results

    async def start(self) -> None:
        self.queue = asyncio.Queue(maxsize=self.settings.queue_size)
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)

    @property
    def failure(self) -> str | None:
        """Why the batcher task ended, or None while it runs: no request can be answered after it."""
        if self._task is None or not self._task.done():
            return None
        cause = "cancelled" if self._task.cancelled() else repr(self._task.exception())
        return f"the batcher stopped ({cause}); no request can be classified: restart the server (its log says more)"

    async def submit(self, phrases: list[str]) -> list[dict]:
        assert self.queue is not None and self._task is not None, "Batcher.start() first"
        if self.failure:
            raise RequestError(503, self.failure)
        job = _Job(phrases, asyncio.get_running_loop().create_future())
        try:
            self.queue.put_nowait(job)
        except asyncio.QueueFull:
            raise RequestError(
                503, f"busy: {self.settings.queue_size} requests are waiting (--queue-size); retry shortly"
            ) from None
        try:
            # The batcher task too: should it end, this request gets a 503 instead of waiting for ever.
            await asyncio.wait([job.future, self._task], return_when=asyncio.FIRST_COMPLETED)
        finally:
            job.future.cancel()  # a no-op once answered; else no one waits for the answer any more
        if job.future.cancelled():
            raise RequestError(503, self.failure)
        return job.future.result()

    async def _run(self) -> None:
        try:
            while True:
                await self._run_batch()
        except Exception:
            log.exception("the batcher stopped: every request gets 503 until the server restarts")
            raise

    async def _run_batch(self) -> None:
        loop = asyncio.get_running_loop()
        batch = [await self.queue.get()]
        size = len(batch[0].phrases)
        deadline = loop.time() + self.settings.max_wait_ms / 1000
        while size < self.settings.max_batch:
            try:
                job = await asyncio.wait_for(self.queue.get(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                break
            batch.append(job)
            size += len(job.phrases)
        self.in_flight = len(batch)
        phrases = [p for job in batch for p in job.phrases]
        # A job's future is already done when its request was cancelled: no one waits for its answer.
        try:
            results = await loop.run_in_executor(self._executor, self.classify, phrases)
        except Exception as err:  # one bad batch must not stop the server: its requests get a 500
            log.exception("classify failed on a batch of %d phrases", len(phrases))
            message = f"the model failed on this request's batch ({type(err).__name__}: {err}); the server log has more"
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(RequestError(500, message))
        else:
            self.batches += 1
            for job in batch:
                if not job.future.done():
                    job.future.set_result(results[: len(job.phrases)])
                results = results[len(job.phrases) :]
        finally:
            self.in_flight = 0


def create_app(clf: Classifier, settings: ServeSettings | None = None, model_name: str = ""):
    """The FastAPI app serving `clf` (constrained decoding with per-label scores)."""
    settings = settings or ServeSettings()
    max_chars = settings.max_chars or clf.data.max_chars
    max_body_bytes = settings.max_body_bytes or default_max_body_bytes(settings.max_phrases, max_chars)
    batcher = Batcher(clf, settings)

    @asynccontextmanager
    async def lifespan(app):
        # One phrase through the model before the first request, so it does not pay the warm-up.
        await asyncio.get_running_loop().run_in_executor(None, batcher.classify, ["warm-up"])
        await batcher.start()
        yield
        await batcher.stop()

    # No /docs, /redoc or /openapi.json: /classify reads its own body (to bound it first), so the generated
    # schema would show none, and the pages load their scripts from a CDN. docs/serving.md is the reference.
    app = FastAPI(title="slmkit", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.batcher = batcher

    @app.exception_handler(RequestError)
    async def _request_error(request, err: RequestError):
        return JSONResponse({"error": str(err)}, status_code=err.status)

    @app.get("/health")
    async def health():
        failure = batcher.failure
        body = {
            "status": "ok" if failure is None else "error",
            "model": model_name,
            "backend": clf.model.kind,
            "labels": list(clf.data.labels),
            "queued": batcher.queue.qsize() if batcher.queue else 0,
            "in_flight": batcher.in_flight,
            "batches": batcher.batches,
            "limits": {
                "max_phrases": settings.max_phrases,
                "max_chars": max_chars,
                "max_body_bytes": max_body_bytes,
                "queue_size": settings.queue_size,
            },
        }
        if failure:
            body["error"] = failure
        return JSONResponse(body, status_code=200 if failure is None else 503)

    @app.post("/classify")
    async def classify(request: Request):
        phrases = parse_request(await read_body(request, max_body_bytes), settings, max_chars)
        return {"results": await batcher.submit(phrases)}

    return app


class Server:
    """uvicorn serving an app on 127.0.0.1 in a background thread (tests, `slmkit bench --serve`)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        # Bind here so port 0 gives a free port we know before the server starts.
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> Server:
        import time

        self.thread.start()
        while not self.server.started:  # the lifespan (model warm-up) runs before this
            if not self.thread.is_alive():
                raise RuntimeError(f"the server on {self.url} did not start; see the log above")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


def serve(clf: Classifier, settings: ServeSettings, host: str, port: int, model_name: str = "") -> None:
    """Run the API in the foreground until Ctrl-C."""
    import uvicorn

    log.info("serving %s on http://%s:%d (POST /classify, GET /health)", model_name, host, port)
    uvicorn.run(create_app(clf, settings, model_name), host=host, port=port, log_level="info")
