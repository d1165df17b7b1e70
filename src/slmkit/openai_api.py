"""The OpenAI chat-completions API of `slmkit serve`: what a request may ask, where a reply stops, and the
JSON objects the answer is made of. serve.py routes the requests (GET /v1/models, POST /v1/chat/completions).

A model fine-tuned on single turns (slmkit_prompt.json's template; the classifiers, data=qa) sees the last
user message rendered into its template, as `slmkit chat` does; earlier turns and system messages are
checked but not shown to it. A model fine-tuned on conversations (data=chat) sees every turn, rendered as in
training (slmkit.prompt.build_conversation_prompt), and the turns must alternate (check_turns). Decoding is
greedy only, so a request asking for sampling is refused rather than answered greedily as if it had been
honoured.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from slmkit.inference import Piece
from slmkit.serve import RequestError, load_json

EXAMPLE = '{"model": "NAME", "messages": [{"role": "user", "content": "..."}]}'
ROLES = ("system", "user", "assistant")
MAX_STOPS = 4  # as OpenAI's API
KEYS = {
    "model",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "n",
    "stop",
    "stream",
    "stream_options",
    "presence_penalty",
    "frequency_penalty",
}
# The values of the sampling settings that greedy decoding honours (null is the API's "default" too).
GREEDY = {"temperature": 0, "top_p": 1, "presence_penalty": 0, "frequency_penalty": 0}


class ApiError(RequestError):
    """A request error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(status, message)
        self.param = param
        self.code = code


def error_body(err: RequestError) -> dict:
    kind = "invalid_request_error" if err.status < 500 else "server_error"
    return {
        "error": {
            "message": str(err),
            "type": kind,
            "param": getattr(err, "param", None),
            "code": getattr(err, "code", None),
        }
    }


@dataclass
class ChatRequest:
    text: str  # the last user message: what the model's prompt template is filled with
    messages: list[dict]  # every message, {"role", "content"}: a model trained on conversations sees them all
    max_tokens: int | None  # None: as many as the server's --max-tokens and the model's context allow
    max_tokens_param: str  # what the request called it: max_tokens or max_completion_tokens
    stop: list[str]  # the caller's stop strings
    stream: bool
    include_usage: bool  # stream_options.include_usage: one more chunk with the token counts
    model: str = ""  # the served model (an adapter's name) that answers


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _text(value, param: str, what: str) -> str:
    """A non-blank string that is UTF-8 (JSON can spell half a surrogate pair, which is no character)."""
    if not isinstance(value, str) or not value.strip():
        raise ApiError(400, f"{param} must be a non-empty string ({what})", param)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, f"{param} holds a lone surrogate, half of a \\ud800-\\udfff pair", param) from None
    return value


def not_served(name: object, served: list[str]) -> ApiError:
    """The 404 for a model name this server does not serve, naming those it does."""
    names = ", ".join(repr(n) for n in served)
    return ApiError(
        404,
        f"the model {name!r} is not served here; this server serves {names} (GET /v1/models)",
        "model",
        "model_not_found",
    )


def parse_chat_request(body: bytes, models: dict[str, int], max_tokens_limit: int) -> ChatRequest:
    """The parts of a /v1/chat/completions body this server uses, or an ApiError naming the field at fault.

    `models`: the served model names, each with its longest message (its data.max_chars)."""
    payload = load_json(body, EXAMPLE)
    if not isinstance(payload, dict):
        raise ApiError(400, f"the body must be a JSON object: {EXAMPLE}")
    unknown = sorted(set(payload) - KEYS)
    if unknown:
        raise ApiError(
            400, f"unknown field(s) {unknown}: this server takes {sorted(KEYS)} (docs/serving.md)", unknown[0]
        )
    if "model" not in payload:
        first = next(iter(models))
        raise ApiError(400, f'"model" is required: send "model": "{first}" (GET /v1/models)', "model")
    model = payload["model"]
    if not isinstance(model, str) or model not in models:
        raise not_served(model, list(models))
    text = _last_user_message(payload.get("messages"), models[model])

    if "max_tokens" in payload and "max_completion_tokens" in payload:
        raise ApiError(400, "give max_tokens or max_completion_tokens (the same setting), not both", "max_tokens")
    param = "max_completion_tokens" if "max_completion_tokens" in payload else "max_tokens"
    max_tokens = payload.get(param)
    if max_tokens is not None and (not _is_int(max_tokens) or not 1 <= max_tokens <= max_tokens_limit):
        raise ApiError(
            400,
            f"{param} must be a whole number from 1 to {max_tokens_limit} (the server's --max-tokens), "
            f"got {max_tokens!r}",
            param,
        )

    for name, greedy in GREEDY.items():
        value = payload.get(name)
        if value is not None and not _is_number(value):
            raise ApiError(400, f"{name} must be a number, got {value!r}", name)
        if value is not None and value != greedy:
            raise ApiError(
                400,
                f"{name} {value!r}: this server decodes greedily only; send {name} {greedy} or leave it out",
                name,
            )
    n = payload.get("n")
    if n is not None and (not _is_int(n) or n != 1):
        raise ApiError(400, f"n {n!r}: this server writes one choice per request; send n 1 or leave it out", "n")

    stream = payload.get("stream")
    if stream is None:
        stream = False
    elif not isinstance(stream, bool):
        raise ApiError(400, f"stream must be true or false, got {stream!r}", "stream")
    include_usage = _stream_options(payload.get("stream_options"), stream)
    messages = [{"role": m["role"], "content": m["content"]} for m in payload["messages"]]
    stops = _stops(payload.get("stop"))
    return ChatRequest(text, messages, max_tokens, param, stops, stream, include_usage, model)


def check_turns(messages: list[dict]) -> None:
    """For a model trained on conversations (data.format=chat): an optional system message first, then user
    and assistant messages in turn; a 400 naming the first message out of place."""
    for i, message in enumerate(messages):
        role = message["role"]
        said = sum(m["role"] != "system" for m in messages[:i])
        due = "user" if said % 2 == 0 else "assistant"
        if role == "system" and i == 0:
            continue
        if role != due:
            where = "a system message comes only first" if role == "system" else f"the {due}'s turn is due"
            raise ApiError(
                400,
                f"messages[{i}] is a {role} message where {where}: this model was trained on conversations "
                "in which user and assistant take turns",
                f"messages[{i}].role",
            )


def _last_user_message(messages, max_chars: int) -> str:
    if not isinstance(messages, list) or not messages:
        raise ApiError(
            400, f'"messages" must be a non-empty list of {{"role", "content"}} objects: {EXAMPLE}', "messages"
        )
    for i, message in enumerate(messages):
        param = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ApiError(400, f'{param} must be an object {{"role": "user", "content": "..."}}', param)
        extra = sorted(set(message) - {"role", "content", "name"})
        if extra:
            raise ApiError(400, f'{param} has unknown key(s) {extra}: a message takes "role", "content", "name"', param)
        if message.get("role") not in ROLES:
            raise ApiError(400, f"{param}.role {message.get('role')!r}: use one of {', '.join(ROLES)}", f"{param}.role")
        what = "text; content parts, images and tool calls are not supported"
        _text(message.get("content"), f"{param}.content", what)
    last = len(messages) - 1
    if messages[last]["role"] != "user":
        raise ApiError(
            400,
            f"messages[{last}] is a {messages[last]['role']} message; the last message must be the user's, "
            "which the model answers",
            f"messages[{last}].role",
        )
    text = messages[last]["content"]
    if len(text) > max_chars:
        raise ApiError(
            400,
            f"messages[{last}].content has {len(text)} characters; "
            f"the limit is {max_chars} (the model's data.max_chars)",
            f"messages[{last}].content",
        )
    return text


def _stops(stop) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not 1 <= len(stops) <= MAX_STOPS:
        raise ApiError(400, f"stop must be a string or a list of 1 to {MAX_STOPS} strings", "stop")
    for i, value in enumerate(stops):
        if not isinstance(value, str) or not value:
            raise ApiError(400, f"stop[{i}] must be a non-empty string", "stop")
    return stops


def _stream_options(options, stream: bool) -> bool:
    if options is None:
        return False
    if not stream:
        raise ApiError(400, "stream_options is only allowed with stream true", "stream_options")
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise ApiError(400, 'stream_options takes only {"include_usage": true|false}', "stream_options")
    include = options.get("include_usage", False)
    if not isinstance(include, bool):
        raise ApiError(400, "stream_options.include_usage must be true or false", "stream_options.include_usage")
    return include


@dataclass
class Delta:
    text: str  # new reply text ("" on a last delta with nothing left to add)
    finish_reason: str | None  # on the last delta: "stop" or "length"
    tokens: int  # tokens generated so far


def new_tokens(prompt_tokens: int, context_length: int, req: ChatRequest, limit: int) -> int:
    """How many tokens the reply may have: what the request asks, else the server's limit, within the
    model's context (prompt and reply together); a 400 when the request cannot fit."""
    room = context_length - prompt_tokens
    if req.max_tokens is None and room >= 1:
        return min(limit, room)
    if req.max_tokens is not None and req.max_tokens <= room:
        return req.max_tokens
    asked = f"and {req.max_tokens_param} {req.max_tokens} " if req.max_tokens is not None else ""
    param = req.max_tokens_param if req.max_tokens is not None and room >= 1 else "messages"
    raise ApiError(
        400,
        f"the prompt is {prompt_tokens} tokens {asked}over the model's context of {context_length} tokens "
        f"(prompt and reply together); send a shorter message or a smaller {req.max_tokens_param}",
        param,
    )


def cut_at_stops(pieces: Iterable[Piece], stops: list[str]) -> Iterator[Delta]:
    """The reply's text as it grows, ending before the first of `stops` (not included, as OpenAI's `stop`).

    Text that could be the start of a stop string is held back until later tokens settle it, so no part
    of a stop string is ever sent. Stops once a stop string is complete: the caller closes `pieces` then.
    """
    text, sent, tokens = "", 0, 0
    for piece in pieces:
        tokens += 1
        text += piece.text
        hits = [found for found in (text.find(s) for s in stops) if found >= 0]
        if hits:
            yield Delta(text[sent : min(hits)], "stop", tokens)
            return
        if piece.finish_reason:
            yield Delta(text[sent:], piece.finish_reason, tokens)
            return
        held = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        if len(text) - held > sent:
            yield Delta(text[sent : len(text) - held], None, tokens)
            sent = len(text) - held
    # The model's stream ends with a finish reason; an empty one (no token) ends by length.
    yield Delta(text[sent:], "length", tokens)


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def completion(cid: str, model: str, content: str, finish_reason: str, prompt_tokens: int, tokens: int) -> dict:
    return {
        "id": cid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": finish_reason,
                "logprobs": None,
            }
        ],
        "usage": usage(prompt_tokens, tokens),
    }


def chunk(cid: str, created: int, model: str, delta: dict, finish_reason: str | None = None) -> dict:
    return {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
    }


def usage(prompt_tokens: int, tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": tokens, "total_tokens": prompt_tokens + tokens}


def models_list(models: list[str], created: int) -> dict:
    return {"object": "list", "data": [model_card(model, created) for model in models]}


def model_card(model: str, created: int) -> dict:
    return {"id": model, "object": "model", "created": created, "owned_by": "slmkit"}
