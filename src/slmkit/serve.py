"""`slmkit serve`: a model folder behind a small HTTP JSON API (FastAPI on uvicorn).

    POST /classify  {"phrases": ["...", ...]}  ->  {"results": [{"text", "label", "scores"}, ...]}
    GET  /health                               ->  {"status": "ok", "labels", "queued", ...}
    GET  /v1/models, POST /v1/chat/completions ->  OpenAI's API (slmkit.openai_api), streamed or whole

Requests that arrive within `max_wait_ms` of each other are classified together, one forward pass per
`batch_size` phrases (constrained decoding, slmkit.inference). The queue is bounded: when `queue_size`
requests wait, a new one gets 503 at once instead of a long wait. A body over `max_body_bytes` is refused
before it is read. Bad requests get a 4xx naming the problem, a batch the model fails a 500 (docs/serving.md
has the table). Should the batcher task ever end, /health answers 503 and so does every request.

A chat completion runs on the same worker thread as the batches, between them, under the same model lock.
With an API key set, every request but GET /health must carry `Authorization: Bearer <key>` (401 otherwise).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

# At module level: FastAPI reads the handlers' annotations (strings here) in this module's namespace.
from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from slmkit.inference import Classifier
from slmkit.prompt import build_prompt, stop_marker

if TYPE_CHECKING:  # openai_api imports this module
    from slmkit.openai_api import ChatRequest

log = logging.getLogger(__name__)


@dataclass
class ServeSettings:
    max_phrases: int = 64  # phrases in one request (413 above)
    max_chars: int | None = None  # longest phrase (422 above); None: the model folder's data.max_chars
    max_wait_ms: float = 5.0  # how long the first request of a batch waits for others to join it
    max_batch: int = 64  # phrases gathered into one batch at most (then split by the classifier's batch_size)
    queue_size: int = 32  # requests waiting at most (503 above)
    max_body_bytes: int | None = None  # request body (413 above); None: default_max_body_bytes()
    max_tokens: int = 64  # new tokens in one chat completion at most, and what a request without max_tokens gets
    api_key: str | None = field(default=None, repr=False)  # None: no authentication; never printed


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


# How much of a body over the limit is read and dropped before the 413 (a lingering close, as nginx does): a client
# still sending when the server closes gets a broken pipe or a reset instead of the answer.
DRAIN_BYTES = 2**20


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, or a 413 once it is known to be over `limit` bytes. A body over the limit is read on
    and dropped up to DRAIN_BYTES, so the client has sent it all when the answer comes; one larger than that
    (from Content-Length, before reading any of it, or once that much is read) is answered at once, and uvicorn
    discards what is left after the answer.

    Starlette's RequestBodyLimitMiddleware answers the same in plain text; this answer is JSON naming the limit.
    """
    too_large = RequestError(
        413, f"the body is over the limit of {limit} bytes (--max-body-bytes); send fewer phrases per request"
    )
    read_at_most = max(limit, DRAIN_BYTES)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > read_at_most:
        raise too_large
    body, size = bytearray(), 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > read_at_most:
            raise too_large
        if size <= limit:
            body += chunk
    if size > limit:
        raise too_large
    return bytes(body)


def load_json(body: bytes, example: str):
    """The body's JSON value, or a 400 saying why it cannot be read and what to send (`example`)."""
    try:
        return json.loads(body)
    except json.JSONDecodeError as err:
        raise RequestError(400, f"the body is not JSON ({err.msg} at character {err.pos}); send {example}") from None
    except UnicodeDecodeError:
        raise RequestError(400, f"the body is not UTF-8 text; send {example}") from None
    except RecursionError:
        raise RequestError(400, f"the body's JSON is nested too deeply to read; send {example}") from None
    except ValueError:  # Python reads no integer of over 4300 digits (sys.get_int_max_str_digits)
        raise RequestError(400, f"the body's JSON holds a number too long to read; send {example}") from None


def pick_model(payload, models: dict[str, Classifier], classifiers: list[str]) -> str:
    """The served model a /classify body names ("model", optional when one classifier is served)."""
    if not isinstance(payload, dict) or "model" not in payload:
        if len(classifiers) == 1:
            return classifiers[0]
        raise RequestError(422, f'several classifiers are served: name one with "model" (one of {classifiers})')
    name = payload["model"]
    if not isinstance(name, str) or name not in models:
        raise RequestError(404, f"the model {name!r} is not served here; this server serves {list(models)}")
    if name not in classifiers:
        raise RequestError(
            404, f"the model {name!r} answers questions in free text (no label set): POST /v1/chat/completions"
        )
    return name


def parse_request(payload, settings: ServeSettings, max_chars: int) -> list[str]:
    """The phrases of a /classify body (its JSON value), or a RequestError saying what is wrong with it."""
    if isinstance(payload, bytes):
        payload = load_json(payload, EXAMPLE)
    if not isinstance(payload, dict) or "phrases" not in payload:
        raise RequestError(422, 'the body must be a JSON object with a "phrases" list: {"phrases": ["..."]}')
    extra = sorted(set(payload) - {"phrases", "model"})
    if extra:
        raise RequestError(422, f'unknown key(s) {extra}: the body takes only "phrases" (and "model")')
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

    def __init__(self, clf: Classifier, settings: ServeSettings, share: Batcher | None = None):
        """`share`: another model's batcher whose thread and lock this one uses (adapters on one base: one
        model in memory, used by one batch at a time); each keeps its own queue, so a batch is one adapter's."""
        self.clf = clf
        self.settings = settings
        self.queue: asyncio.Queue[_Job] | None = None
        self.in_flight = 0
        self.batches = 0
        self.model_lock = share.model_lock if share else threading.Lock()
        self._executor = share._executor if share else ThreadPoolExecutor(1, thread_name_prefix="slmkit-model")
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

    def run_on_model(self, work) -> asyncio.Future:
        """`work()` on the model's worker thread, after what is already queued for it, under model_lock: a
        chat completion takes its turn between batches and never runs beside one."""

        def locked():
            with self.model_lock:
                return work()

        return asyncio.get_running_loop().run_in_executor(self._executor, locked)

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


_END = object()  # what a chat's worker puts last on its queue


class Chats:
    """Chat completions on the model: each runs on the batcher's worker thread (Batcher.run_on_model) and
    hands the reply's deltas (slmkit.openai_api.Delta) to the event loop as tokens are decoded. At most
    `queue_size` wait or run at once (503 above), as for /classify."""

    def __init__(self, batcher: Batcher, queue_size: int):
        self.batcher = batcher
        self.queue_size = queue_size
        self.pending = 0

    def start(self, req: ChatRequest, limit: int) -> AsyncIterator[tuple[int, object]]:
        """(prompt tokens, delta) pairs of the reply to `req` (slmkit.openai_api.ChatRequest): its message
        rendered in the model folder's prompt template, at most `limit` new tokens unless it asks for
        fewer, cut at the first of its stop strings or the template's stop marker. A refusal (503, or 400
        for a prompt over the model's context) comes before the first pair; leaving the iteration stops
        the decoding."""
        from slmkit.openai_api import ApiError, cut_at_stops, new_tokens

        if self.batcher.failure:
            raise ApiError(503, self.batcher.failure)
        if self.pending >= self.queue_size:
            raise ApiError(
                503, f"busy: {self.queue_size} chat requests are waiting or running (--queue-size); retry shortly"
            )
        clf = self.batcher.clf
        if clf.generative and clf.data.format == "chat":  # trained on conversations: it sees every turn
            from slmkit.openai_api import check_turns

            check_turns(req.messages)
            prompt = clf.conversation_prompt(req.messages)
        else:
            prompt = build_prompt(clf.data, req.text)
        # The template's marker ends the reply: like a stop string, it is not part of the content.
        stops = [*req.stop, stop_marker(clf.data)]
        loop = asyncio.get_running_loop()
        deltas: asyncio.Queue = asyncio.Queue()
        gone = threading.Event()  # set once no one reads the deltas any more

        def put(item) -> None:
            if not loop.is_closed():  # closed: the server has stopped and no one reads
                loop.call_soon_threadsafe(deltas.put_nowait, item)

        def work() -> None:
            try:
                if gone.is_set():
                    return
                prompt_tokens = len(clf.model.encode(prompt))
                max_tokens = new_tokens(prompt_tokens, clf.model.context_length, req, limit)
                pieces = clf.model.stream(prompt, max_tokens, stop=stop_marker(clf.data))
                try:
                    for delta in cut_at_stops(pieces, stops):
                        put((prompt_tokens, delta))
                        if gone.is_set():
                            return
                finally:
                    pieces.close()  # stops decoding when the reply ended on a stop string or no one reads it
            except RequestError as err:  # the request's fault: no model failure to log
                put(err)
            except Exception as err:
                log.exception("chat completion failed")
                put(err)
            finally:
                put(_END)

        job = self.batcher.run_on_model(work)
        self.pending += 1
        released = False

        def release(_=None) -> None:
            """Once, when the reply has been read or the job has ended, whichever is first: a client that
            sends its next request on the answer must not find its own last one still counted."""
            nonlocal released
            if not released:
                released = True
                self.pending -= 1

        job.add_done_callback(release)

        async def read() -> AsyncIterator[tuple[int, object]]:
            try:
                while (item := await deltas.get()) is not _END:
                    if isinstance(item, RequestError):
                        raise item
                    if isinstance(item, Exception):
                        name = type(item).__name__
                        raise ApiError(
                            500, f"the model failed on this request ({name}: {item}); the server log has more"
                        )
                    yield item
                    if item[1].finish_reason:  # the reply is complete: what the job does after it is its own
                        return
            finally:
                gone.set()  # a job still queued returns at once when its turn comes
                release()

        return read()


def _error_response(path: str, err: RequestError, headers: dict | None = None) -> JSONResponse:
    """/classify's errors are {"error": "..."}; the OpenAI API's are OpenAI's {"error": {"message", ...}}."""
    from slmkit.openai_api import error_body

    body = error_body(err) if path.startswith("/v1/") else {"error": str(err)}
    return JSONResponse(body, status_code=err.status, headers=headers)


class ApiKeyCheck:
    """ASGI middleware: every HTTP request but /health needs `Authorization: Bearer <key>`, else 401.

    Checked before the body is read or a route is looked up. hmac.compare_digest takes as long for a key
    that is nearly right as for one that is all wrong, so timing does not tell a caller how close it came.
    """

    def __init__(self, app, key: str):
        self.app = app
        self.key = key.encode("utf-8")

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] == "/health":
            return await self.app(scope, receive, send)
        values = [v for k, v in scope["headers"] if k == b"authorization"]
        scheme, _, token = values[0].partition(b" ") if values else (b"", b"", b"")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key):
            return await self.app(scope, receive, send)
        from slmkit.openai_api import ApiError

        why = "the API key is wrong" if values else "no API key was sent"
        message = f"{why}: send the header `Authorization: Bearer <key>` with the key the server was started with"
        err = ApiError(401, message, code="invalid_api_key")
        await _error_response(scope["path"], err, {"WWW-Authenticate": "Bearer"})(scope, receive, send)


def _sse(data: dict | str) -> str:
    """One server-sent event. json.dumps writes no newline, so the data is one `data:` line."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def create_app(clf: Classifier | dict[str, Classifier], settings: ServeSettings | None = None, model_name: str = ""):
    """The FastAPI app serving `clf`: /classify (constrained decoding with per-label scores), /health, and
    OpenAI's chat completions (greedy) with the model called `model_name` ("slmkit" when empty).

    `clf` may be several models by name (adapters on one base, slmkit.load(base, adapters=...)): /v1/models
    lists them, a request's "model" picks one (404 naming those served), and each has its own queue, so a
    batch is one adapter's; they take turns on the one model thread."""
    from slmkit import openai_api as oai

    settings = settings or ServeSettings()
    models = clf if isinstance(clf, dict) else {model_name or "slmkit": clf}
    names = list(models)
    max_chars = {name: settings.max_chars or m.data.max_chars for name, m in models.items()}
    longest = max(max_chars.values())
    max_body_bytes = settings.max_body_bytes or default_max_body_bytes(settings.max_phrases, longest)
    batchers: dict[str, Batcher] = {}
    for name, m in models.items():
        batchers[name] = Batcher(m, settings, share=next(iter(batchers.values()), None))
    chats = {name: Chats(b, settings.queue_size) for name, b in batchers.items()}
    classifiers = [name for name in names if not models[name].generative]
    started = int(time.time())

    def warm_up() -> None:
        for name, m in models.items():
            if m.generative:
                m.model.generate(build_prompt(m.data, "warm-up"), 1)
            else:
                batchers[name].classify(["warm-up"])

    @asynccontextmanager
    async def lifespan(app):
        # One phrase through each model before the first request, so it does not pay the warm-up.
        await asyncio.get_running_loop().run_in_executor(None, warm_up)
        for batcher in batchers.values():
            await batcher.start()
        yield
        for batcher in batchers.values():
            await batcher.stop()

    # No /docs, /redoc or /openapi.json: /classify reads its own body (to bound it first), so the generated
    # schema would show none, and the pages load their scripts from a CDN. docs/serving.md is the reference.
    app = FastAPI(title="slmkit", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.batcher, app.state.chats = batchers[names[0]], chats[names[0]]  # the first (the only one, mostly)
    if settings.api_key:
        app.add_middleware(ApiKeyCheck, key=settings.api_key)

    @app.exception_handler(RequestError)
    async def _request_error(request, err: RequestError):
        return _error_response(request.url.path, err)

    @app.exception_handler(HTTPException)
    async def _http_error(request, err: HTTPException):
        """FastAPI's own 404 and 405, in OpenAI's shape under /v1/ (a client reads the message there)."""
        if not request.url.path.startswith("/v1/"):
            return await http_exception_handler(request, err)
        routes = "this server has GET /v1/models and POST /v1/chat/completions"
        message = f"{request.method} {request.url.path}: {err.detail}; {routes}"
        return _error_response(request.url.path, oai.ApiError(err.status_code, message), err.headers)

    def status(name: str) -> dict:
        m, batcher = models[name], batchers[name]
        return {
            "backend": m.model.kind,
            "task": "generate" if m.generative else "classify",
            "labels": list(m.data.labels),
            "queued": batcher.queue.qsize() if batcher.queue else 0,
            "in_flight": batcher.in_flight,
            "batches": batcher.batches,
        }

    @app.get("/health")
    async def health():
        failure = next((b.failure for b in batchers.values() if b.failure), None)
        first = status(names[0])
        body = {
            "status": "ok" if failure is None else "error",
            "model": model_name if len(names) == 1 else names[0],
            **first,
            "limits": {
                "max_phrases": settings.max_phrases,
                "max_chars": max_chars[names[0]],
                "max_body_bytes": max_body_bytes,
                "queue_size": settings.queue_size,
            },
        }
        if len(names) > 1:
            body["models"] = {name: {**status(name), "max_chars": max_chars[name]} for name in names}
        if failure:
            body["error"] = failure
        return JSONResponse(body, status_code=200 if failure is None else 503)

    @app.post("/classify")
    async def classify(request: Request):
        if not classifiers:
            raise RequestError(
                404, "this model answers questions in free text (no label set): POST /v1/chat/completions"
            )
        payload = load_json(await read_body(request, max_body_bytes), EXAMPLE)
        name = pick_model(payload, models, classifiers)
        phrases = parse_request(payload, settings, max_chars[name])
        return {"results": await batchers[name].submit(phrases)}

    @app.get("/v1/models")
    async def list_models():
        return oai.models_list(names, started)

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        if name not in models:
            raise oai.not_served(name, names)
        return oai.model_card(name, started)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = oai.parse_chat_request(await read_body(request, max_body_bytes), max_chars, settings.max_tokens)
        cid = oai.completion_id()
        served = req.model
        deltas = chats[served].start(req, settings.max_tokens)
        if not req.stream:
            parts = [item async for item in deltas]
            prompt_tokens, last = parts[-1]
            content = "".join(delta.text for _, delta in parts)
            return oai.completion(cid, served, content, last.finish_reason, prompt_tokens, last.tokens)
        # The first delta before the first byte: until then a refusal or a model failure is still a status.
        prompt_tokens, first = await anext(deltas)
        return StreamingResponse(
            _chunks(cid, served, first, prompt_tokens, deltas, req.include_usage),
            media_type="text/event-stream",
            # No caching; X-Accel-Buffering: a proxy such as nginx passes each event on as it comes.
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    return app


async def _chunks(cid: str, model: str, first, prompt_tokens: int, deltas, include_usage: bool) -> AsyncIterator[str]:
    """The server-sent events of a streamed chat completion: the role, a chunk per new piece of text, the
    finish reason, the token counts when asked (stream_options.include_usage), then `data: [DONE]`.

    Starlette's StreamingResponse sends them, not sse-starlette: each event is one JSON line (no framing
    to get wrong), and with uvicorn (ASGI 2.3) Starlette already cancels a stream whose client has gone.
    sse-starlette would add keep-alive comments, but patches uvicorn's exit handler on import and cuts
    open streams at shutdown, where uvicorn otherwise lets these short, bounded replies finish.
    """
    from slmkit import openai_api as oai

    created = int(time.time())
    extra = {"usage": None} if include_usage else {}
    yield _sse({**oai.chunk(cid, created, model, {"role": "assistant", "content": ""}), **extra})
    delta = first
    try:
        while True:
            if delta.text:
                yield _sse({**oai.chunk(cid, created, model, {"content": delta.text}), **extra})
            if delta.finish_reason:
                break
            _, delta = await anext(deltas)
    except RequestError as err:  # the model failed after the answer began: its status is sent, so say it here
        yield _sse(oai.error_body(err))
        return
    finally:
        await deltas.aclose()
    yield _sse({**oai.chunk(cid, created, model, {}, delta.finish_reason), **extra})
    if include_usage:
        yield _sse(
            {**oai.chunk(cid, created, model, {}), "choices": [], "usage": oai.usage(prompt_tokens, delta.tokens)}
        )
    yield _sse("[DONE]")


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


def serve(
    clf: Classifier | dict[str, Classifier], settings: ServeSettings, host: str, port: int, model_name: str = ""
) -> None:
    """Run the API in the foreground until Ctrl-C (several models by name: adapters on one base)."""
    import uvicorn

    # Says whether a key is required, never the key.
    auth = "an API key required" if settings.api_key else "no API key"
    first = next(iter(clf.values())) if isinstance(clf, dict) else clf
    if first.model.kind == "onnx":
        from slmkit.formats import kernel_note, onnx_precision

        log.info("%s", kernel_note(onnx_precision(first.model.path)))
    log.info(
        "serving %s on http://%s:%d (POST /classify, GET /health, /v1/chat/completions, /v1/models; %s)",
        ", ".join(clf) + f" (adapters on {first.model.path})" if isinstance(clf, dict) else model_name,
        host,
        port,
        auth,
    )
    uvicorn.run(create_app(clf, settings, model_name), host=host, port=port, log_level="info")
