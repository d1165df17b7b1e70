"""`slmkit serve`'s OpenAI-compatible API on the int4 tiny model, driven by the official `openai` client and
by raw HTTP on 127.0.0.1: models, chat completions whole and streamed, stop strings, limits, the API key."""

from __future__ import annotations

import json
import logging
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from email.message import Message

import openai
import pytest
from conftest import PHRASES
from hypothesis import given
from hypothesis import strategies as st

from slmkit.inference import Piece, load
from slmkit.openai_api import cut_at_stops
from slmkit.prompt import build_prompt, stop_marker
from slmkit.serve import Server, ServeSettings, create_app

KEY = "test-key-0123456789"
# On the tiny model this phrase's reply is several tokens ending in the template's stop marker ("\n");
# the others' replies end on end-of-sequence.
LONG = PHRASES[2]


@pytest.fixture(scope="module")
def clf(tiny_model_dirs):
    return load(tiny_model_dirs["onnx"], batch_size=4, threads=1)


@pytest.fixture(scope="module")
def server(clf):
    settings = ServeSettings(max_phrases=8, max_chars=120, max_tokens=64, api_key=KEY)
    with Server(create_app(clf, settings, "tiny")) as running:
        yield running


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def http(url: str, path: str, body=None, key: str | None = KEY, timeout: float = 60) -> tuple[int, Message, bytes]:
    """(status, headers, body bytes) of one request; a POST when there is a body (a dict is sent as JSON)."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(url + path, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers, err.read()


def expected_reply(clf, text: str, max_tokens: int = 64) -> str:
    """What `slmkit chat` writes, cut before the template's stop marker (the API leaves it out)."""
    return clf.chat(text, max_tokens).split(stop_marker(clf.data))[0]


def test_models_lists_the_served_model(client):
    models = client.models.list()
    assert [(m.id, m.object, m.owned_by) for m in models.data] == [("tiny", "model", "slmkit")]
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError, match="this server serves 'tiny'"):
        client.models.retrieve("gpt-4o")


@pytest.mark.parametrize("text", PHRASES)
def test_a_completion_is_what_slmkit_chat_writes_without_the_stop_marker(client, clf, text: str):
    reply = client.chat.completions.create(model="tiny", messages=user(text))
    choice = reply.choices[0]
    assert reply.object == "chat.completion" and reply.model == "tiny" and reply.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and choice.finish_reason == "stop"
    assert choice.message.content == expected_reply(clf, text)
    pieces = list(clf.chat_stream(text, 64))
    prompt_tokens = len(clf.model.encode(build_prompt(clf.data, text)))
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (prompt_tokens, len(pieces))
    assert reply.usage.total_tokens == prompt_tokens + len(pieces)


def test_the_tiny_replies_cover_both_ends_the_api_must_handle(clf):
    """The completion test above would not see the stop marker cut if no reply ended on it."""
    marker = stop_marker(clf.data)
    assert clf.chat(LONG, 64).endswith(marker) and len(expected_reply(clf, LONG)) > 1
    assert not clf.chat(PHRASES[0], 64).endswith(marker)


@pytest.mark.parametrize("text", [PHRASES[0], LONG])
def test_a_streamed_completion_joins_to_the_whole_one(client, clf, text: str):
    whole = client.chat.completions.create(model="tiny", messages=user(text))
    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=user(text), stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(deltas) == whole.choices[0].message.content == expected_reply(clf, text)
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert reasons[-1] == "stop" and set(reasons[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    if text == LONG:  # several tokens: several content chunks
        assert len([d for d in deltas if d]) > 1


def test_greedy_values_of_the_sampling_fields_and_earlier_turns_are_accepted_and_change_nothing(client, clf):
    alone = expected_reply(clf, LONG)
    conversation = [
        {"role": "system", "content": "Answer with a tone."},
        {"role": "user", "content": PHRASES[0], "name": "ann"},
        {"role": "assistant", "content": "Joy"},
        {"role": "user", "content": LONG},
    ]
    greedy = {"temperature": 0, "top_p": 1, "presence_penalty": 0, "frequency_penalty": 0.0, "n": 1}
    reply = client.chat.completions.create(model="tiny", messages=conversation, **greedy)
    assert reply.choices[0].message.content == alone
    reply = client.chat.completions.create(model="tiny", messages=user(LONG), temperature=None, stop=None)
    assert reply.choices[0].message.content == alone


def test_the_stream_is_server_sent_events_ending_with_done(server):
    body = {"model": "tiny", "messages": user(LONG), "stream": True}
    status, headers, raw = http(server.url, "/v1/chat/completions", body)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = raw.decode().split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    for event in events[:-2]:
        assert event.startswith("data: ") and "\n" not in event
        assert json.loads(event[len("data: ") :])["object"] == "chat.completion.chunk"


def test_max_tokens_ends_the_reply_by_length(client, clf):
    pieces = [p.text for p in clf.chat_stream(LONG, 64)]
    assert len(pieces) > 3
    reply = client.chat.completions.create(model="tiny", messages=user(LONG), max_tokens=2)
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 2
    assert reply.choices[0].message.content == "".join(pieces[:2])
    chunks = list(client.chat.completions.create(model="tiny", messages=user(LONG), max_tokens=2, stream=True))
    assert chunks[-1].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "".join(pieces[:2])
    # max_completion_tokens, the newer name, is the same setting
    newer = client.chat.completions.create(model="tiny", messages=user(LONG), max_completion_tokens=2)
    assert newer.choices[0].message.content == reply.choices[0].message.content


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings_cut_the_reply_before_the_first_one(client, clf, stream: bool):
    full = expected_reply(clf, LONG)
    assert full.index("tone") < full.index("e is")
    # "e is" spans two tokens (" tone", " is"): a streamed "e" must be held back until " is" drops it
    for stop, cut in [(["zzz", "tone"], full.split("tone")[0]), ("e is", full.split("e is")[0])]:
        answer = client.chat.completions.create(model="tiny", messages=user(LONG), stop=stop, stream=stream)
        if stream:
            chunks = list(answer)
            content = "".join(c.choices[0].delta.content or "" for c in chunks)
            reason = chunks[-1].choices[0].finish_reason
        else:
            content, reason = answer.choices[0].message.content, answer.choices[0].finish_reason
        assert (content, reason) == (cut, "stop") and len(cut) < len(full)


def test_an_absent_key_and_a_wrong_key_get_401(server, client):
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="not-the-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="the API key is wrong") as refused:
        wrong.chat.completions.create(model="tiny", messages=user("hi"))
    assert refused.value.status_code == 401 and refused.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    for path, body in [("/v1/models", None), ("/v1/chat/completions", {"model": "tiny", "messages": user("hi")})]:
        status, headers, raw = http(server.url, path, body, key=None)
        assert status == 401 and headers["www-authenticate"] == "Bearer"
        assert json.loads(raw)["error"]["message"].startswith("no API key was sent")
    # /classify keeps its own error shape; /health stays open
    status, _, raw = http(server.url, "/classify", {"phrases": ["hi"]}, key=None)
    assert status == 401 and json.loads(raw)["error"].startswith("no API key was sent")
    assert http(server.url, "/classify", {"phrases": ["hi"]}, key="Bearer")[0] == 401
    assert http(server.url, "/classify", {"phrases": ["hi"]})[0] == 200
    assert http(server.url, "/health", key=None)[0] == 200


@pytest.mark.parametrize(
    ("fields", "error", "param", "says"),
    [
        ({"max_tokens": 0}, openai.BadRequestError, "max_tokens", "from 1 to 64 (the server's --max-tokens)"),
        ({"max_tokens": 65}, openai.BadRequestError, "max_tokens", "got 65"),
        ({"temperature": 2}, openai.BadRequestError, "temperature", "greedily only"),
        ({"top_p": 0.5}, openai.BadRequestError, "top_p", "greedily only"),
        ({"n": 2}, openai.BadRequestError, "n", "one choice per request"),
        ({"stop": ["a", "b", "c", "d", "e"]}, openai.BadRequestError, "stop", "1 to 4 strings"),
        ({"extra_body": {"top_k": 5}}, openai.BadRequestError, "top_k", "unknown field(s) ['top_k']"),
        ({"messages": []}, openai.BadRequestError, "messages", '"messages" must be a non-empty list'),
        (
            {"messages": [*user("hi"), {"role": "assistant", "content": "Joy"}]},
            openai.BadRequestError,
            "messages[1].role",
            "the last message must be the user's",
        ),
        (
            {"messages": [{"role": "system", "content": "Be brief."}]},
            openai.BadRequestError,
            "messages[0].role",
            "the last message must be the user's",
        ),
        ({"messages": [{"role": "tool", "content": "x"}]}, openai.BadRequestError, "messages[0].role", "use one of"),
        ({"messages": user("  ")}, openai.BadRequestError, "messages[0].content", "non-empty string"),
        ({"messages": user("x" * 121)}, openai.BadRequestError, "messages[0].content", "the limit is 120"),
        ({"model": "gpt-4o"}, openai.NotFoundError, "model", "this server serves 'tiny'"),
    ],
)
def test_a_field_out_of_bounds_gets_a_4xx_naming_it(client, fields: dict, error, param: str, says: str):
    request = {"model": "tiny", "messages": user("hi"), **fields}
    with pytest.raises(error) as refused:
        client.chat.completions.create(**request)
    assert refused.value.body["param"] == param and says in refused.value.body["message"]
    assert refused.value.body["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("body", "status", "param", "says"),
    [
        (b"not json", 400, None, "the body is not JSON"),
        (b'["a list"]', 400, None, "must be a JSON object"),
        ({"messages": user("hi")}, 400, "model", '"model" is required'),
        ({"model": "tiny", "messages": user("hi"), "max_tokens": True}, 400, "max_tokens", "whole number"),
        ({"model": "tiny", "messages": user("hi"), "temperature": "0"}, 400, "temperature", "must be a number"),
        ({"model": "tiny", "messages": user("hi"), "presence_penalty": 0.5}, 400, "presence_penalty", "greedily"),
        ({"model": "tiny", "messages": user("hi"), "frequency_penalty": -1}, 400, "frequency_penalty", "greedily"),
        ({"model": "tiny", "messages": user("hi"), "stream": "yes"}, 400, "stream", "true or false"),
        ({"model": "tiny", "messages": user("hi"), "stop": [""]}, 400, "stop", "stop[0] must be a non-empty"),
        (
            {"model": "tiny", "messages": user("hi"), "stream_options": {"include_usage": True}},
            400,
            "stream_options",
            "only allowed with stream true",
        ),
        (
            {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]},
            400,
            "messages[0].content",
            "content parts",
        ),
        ({"model": "tiny", "messages": [{"role": "user"}]}, 400, "messages[0].content", "non-empty string"),
        ({"model": "tiny", "messages": [{**user("hi")[0], "x": 1}]}, 400, "messages[0]", "unknown key(s) ['x']"),
        (
            b'{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}',
            400,
            "messages[0].content",
            "lone",
        ),
        (b'{"model": "tiny", "messages": ' + b"[" * 5000, 400, None, "nested too deeply"),
    ],
)
def test_bad_bodies_over_raw_http_get_an_openai_error(server, body, status: int, param, says: str):
    got, _, raw = http(server.url, "/v1/chat/completions", body)
    error = json.loads(raw)["error"]
    assert got == status and error["param"] == param and says in error["message"], error
    assert error["type"] == "invalid_request_error" and error["code"] is None


def test_a_body_over_the_limit_and_an_unknown_route_answer_in_openai_shape(server):
    status, _, raw = http(server.url, "/v1/chat/completions", b" " * 200_000)
    assert status == 413 and "(--max-body-bytes)" in json.loads(raw)["error"]["message"]
    status, _, raw = http(server.url, "/v1/completions", {"model": "tiny", "prompt": "hi"})
    assert status == 404 and "POST /v1/chat/completions" in json.loads(raw)["error"]["message"]
    status, _, raw = http(server.url, "/v1/chat/completions")  # a GET
    assert status == 405 and "Method Not Allowed" in json.loads(raw)["error"]["message"]


# --- the model's worker thread ----------------------------------------------------------------------


class StandIn:
    """The tiny classifier whose model streams through `stream` below: records the lock and thread it runs
    under, can fail, or can write one token per `step_s` until `max_tokens` (a model that is slow)."""

    def __init__(self, clf):
        self.clf, self.model = clf, self  # both the classifier and its model
        self.seen: list[tuple[bool, str]] = []  # (model lock held, thread name) per generation
        self.failing = False
        self.step_s = 0.0
        self.closed = threading.Event()
        self.linger = threading.Event()  # cleared: a closed stream waits for it, as a slow clean-up would
        self.linger.set()
        self.lock: threading.Lock | None = None

    def __getattr__(self, name: str):
        return getattr(self.clf, name) if hasattr(self.clf, name) else getattr(self.clf.model, name)

    def stream(self, prompt: str, max_tokens: int, stop: str | None = None):
        self.seen.append((self.lock.locked(), threading.current_thread().name))
        if self.failing == "later":  # after the answer began
            yield Piece("x")
        if self.failing:
            raise RuntimeError("out of memory")
        try:
            if not self.step_s:
                yield from self.clf.model.stream(prompt, max_tokens, stop)
            while True:  # until closed: only a consumer that stops reading ends it
                time.sleep(self.step_s)  # the time a real model takes per token
                yield Piece("x")
        finally:
            self.closed.set()
            self.linger.wait(30)


@pytest.fixture
def stand_in(clf):
    model = StandIn(clf)
    # --max-tokens over the tiny model's context (512 tokens)
    app = create_app(model, ServeSettings(queue_size=1, max_tokens=1000), "tiny")
    model.lock = app.state.batcher.model_lock
    with Server(app) as running:
        yield model, app, running


def test_generation_runs_on_the_model_thread_under_the_model_lock(stand_in, clf):
    model, _, running = stand_in
    reply = openai.OpenAI(base_url=running.url + "/v1", api_key="-", max_retries=0).chat.completions.create(
        model="tiny", messages=user(PHRASES[1])
    )
    assert reply.choices[0].message.content == expected_reply(clf, PHRASES[1])
    assert model.seen == [(True, model.seen[0][1])] and model.seen[0][1].startswith("slmkit-model")


def test_a_reply_that_cannot_fit_the_models_context_is_refused_naming_max_tokens(stand_in, clf):
    model, _, running = stand_in
    client = openai.OpenAI(base_url=running.url + "/v1", api_key="-", max_retries=0)
    prompt_tokens = len(clf.model.encode(build_prompt(clf.data, "hi")))
    assert clf.model.context_length == 512
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="tiny", messages=user("hi"), max_tokens=600, stream=stream)
        assert refused.value.body["param"] == "max_tokens"
        assert (
            f"the prompt is {prompt_tokens} tokens and max_tokens 600 over the model's context of 512 tokens"
            in (refused.value.body["message"])
        )
    # without max_tokens the reply may use what the context leaves: the server's 1000 does not apply whole
    reply = client.chat.completions.create(model="tiny", messages=user("hi"))
    assert reply.choices[0].finish_reason == "stop"
    reply = client.chat.completions.create(model="tiny", messages=user("hi"), max_tokens=512 - prompt_tokens)
    assert reply.choices[0].finish_reason == "stop"


def test_a_model_failure_is_a_500_or_an_error_event_and_the_server_goes_on(stand_in):
    model, _, running = stand_in
    client = openai.OpenAI(base_url=running.url + "/v1", api_key="-", max_retries=0)
    model.failing = True
    with pytest.raises(openai.InternalServerError, match="RuntimeError: out of memory"):
        client.chat.completions.create(model="tiny", messages=user("hi"))
    with pytest.raises(openai.InternalServerError, match="RuntimeError: out of memory"):
        list(client.chat.completions.create(model="tiny", messages=user("hi"), stream=True))
    model.failing = "later"
    chunks = []
    with pytest.raises(openai.APIError, match="RuntimeError: out of memory") as failed:
        chunks.extend(client.chat.completions.create(model="tiny", messages=user("hi"), stream=True))
    assert failed.value.body["type"] == "server_error" and [c.choices[0].delta.content for c in chunks] == ["", "x"]
    model.failing = False
    assert client.chat.completions.create(model="tiny", messages=user("hi")).choices[0].finish_reason == "stop"


def test_a_client_that_leaves_a_stream_stops_the_decoding(stand_in):
    """The stand-in writes tokens until its stream is closed; closing the connection after the first chunk
    must close it, and free the model for the next request."""
    model, _, running = stand_in
    model.step_s = 0.005
    host, port = running.url.removeprefix("http://").split(":")
    body = json.dumps({"model": "tiny", "messages": user("hi"), "stream": True}).encode()
    head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        received = b""
        while b'"content": "x"' not in received:
            received += sock.recv(4096)
    assert model.closed.wait(30), "the model went on decoding for a client that had left"
    model.step_s = 0.0
    assert http(running.url, "/classify", {"phrases": ["hi"]}, key=None)[0] == 200


def test_chat_requests_beyond_the_queue_get_503(stand_in):
    """queue_size 1: with the model held, one request waits and the next is refused at once."""
    _, app, running = stand_in
    client = openai.OpenAI(base_url=running.url + "/v1", api_key="-", max_retries=0)
    replies: list = []
    with app.state.batcher.model_lock:
        first = threading.Thread(
            target=lambda: replies.append(client.chat.completions.create(model="tiny", messages=user("hi")))
        )
        first.start()
        _wait_for(lambda: app.state.chats.pending == 1)
        with pytest.raises(openai.InternalServerError, match="busy: 1 chat requests") as refused:
            client.chat.completions.create(model="tiny", messages=user("hi"))
        assert refused.value.status_code == 503
    first.join(60)
    assert replies and replies[0].choices[0].finish_reason == "stop"
    _wait_for(lambda: app.state.chats.pending == 0)


def test_an_answered_request_no_longer_counts_against_the_queue(stand_in):
    """queue_size 1: a client that sends its next request as soon as the last is answered, while the last
    one's job is still winding up on the worker thread, waits its turn instead of getting 503."""
    model, app, running = stand_in
    client = openai.OpenAI(base_url=running.url + "/v1", api_key="-", max_retries=0)
    model.linger.clear()
    assert client.chat.completions.create(model="tiny", messages=user("hi")).choices[0].finish_reason == "stop"
    replies: list = []

    def send() -> None:
        try:
            replies.append(client.chat.completions.create(model="tiny", messages=user("hi")))
        except openai.APIError as err:
            replies.append(err)

    second = threading.Thread(target=send)
    second.start()
    _wait_for(lambda: replies or app.state.chats.pending == 1)  # admitted (or refused)
    model.linger.set()
    second.join(60)
    assert replies and not isinstance(replies[0], openai.APIError), replies
    assert replies[0].choices[0].finish_reason == "stop"


def _wait_for(condition, seconds: float = 30) -> None:
    end = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < end, "the server did not reach the expected state"
        time.sleep(0.01)


# --- the stop strings, the backends, the command line ---------------------------------------------------


@given(
    st.lists(st.text(alphabet="ab\n<|>", max_size=4), max_size=12),
    st.lists(st.text(alphabet="ab\n<|>", min_size=1, max_size=4), max_size=4),
    st.sampled_from(["stop", "length"]),
)
def test_cut_at_stops_sends_what_the_whole_text_cut_at_the_first_stop_is(texts: list[str], stops: list[str], end: str):
    """Streamed with text held back, the reply equals the reference: after each token, the text so far cut
    before the first stop string found in it, once one is."""
    pieces = [Piece(t, end if i == len(texts) - 1 else None) for i, t in enumerate(texts)]
    deltas = list(cut_at_stops(iter(pieces), stops))
    text, expected = "", None
    for count, piece in enumerate(texts, 1):
        text += piece
        hits = [text.find(s) for s in stops if s in text]
        if hits:
            expected = (text[: min(hits)], "stop", count)
            break
    expected = expected or (text, end if texts else "length", len(texts))
    assert ("".join(d.text for d in deltas), deltas[-1].finish_reason, deltas[-1].tokens) == expected
    assert all(d.finish_reason is None for d in deltas[:-1])
    if not stops:  # nothing to hold back: each token's text goes out with that token
        assert [(d.text, d.tokens) for d in deltas if d.text] == [(t, i) for i, t in enumerate(texts, 1) if t]


def test_the_pytorch_stream_writes_what_hugging_face_generate_writes(tiny_model_dirs):
    """TorchModel.stream is its own greedy loop: it must match `generate()` (the former implementation)."""
    torch_clf = load(tiny_model_dirs["pytorch"], threads=1)
    model = torch_clf.model
    for text, template in [(p, True) for p in PHRASES] + [(p, False) for p in PHRASES[:3]]:
        prompt = build_prompt(torch_clf.data, text) if template else text
        stop = stop_marker(torch_clf.data) if template else None
        enc = model.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        out = model.model.generate(
            **enc,
            max_new_tokens=20,
            do_sample=False,
            pad_token_id=model.tokenizer.pad_token_id,
            stop_strings=[stop] if stop else None,
            tokenizer=model.tokenizer,
        )
        expected = model.tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        assert torch_clf.chat(text, 20, template=template) == expected


def test_slmkit_chat_prints_each_token_as_it_comes(tiny_model_dirs, clf, monkeypatch, capsys):
    from slmkit.cli import main

    writes: list[str] = []
    real_write = sys.stdout.write
    monkeypatch.setattr(sys.stdout, "write", lambda s: (writes.append(s), real_write(s))[1])
    assert main(["chat", "--model", str(tiny_model_dirs["onnx"]), LONG]) == 0
    assert capsys.readouterr().out == clf.chat(LONG, 64) + "\n"  # as before streaming
    pieces = [p.text for p in clf.chat_stream(LONG, 64) if p.text]
    assert [w for w in writes if w][: len(pieces)] == pieces and len(pieces) > 1


def test_serve_takes_the_key_from_the_flag_else_the_environment_and_never_logs_it(
    tiny_model_dirs, monkeypatch, caplog, capsys
):
    import uvicorn

    from slmkit import cli

    seen = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.append(app))
    model = ["serve", "--model", str(tiny_model_dirs["onnx"]), "--threads", "1"]
    monkeypatch.setenv("SLMKIT_API_KEY", "from-the-environment")
    with caplog.at_level(logging.INFO, logger="slmkit.serve"):
        assert cli.main(model) == 0
        assert cli.main([*model, "--api-key", "from-the-flag"]) == 0
    keys = [m.kwargs["key"] for app in seen for m in app.user_middleware]
    assert keys == ["from-the-environment", "from-the-flag"]
    assert "an API key required" in caplog.text and "from-the" not in caplog.text
    monkeypatch.delenv("SLMKIT_API_KEY")
    assert cli.main(model) == 0 and not seen[-1].user_middleware
    assert cli.main([*model, "--api-key", " "]) == 2
    assert "--api-key is empty" in capsys.readouterr().err


def test_slmkit_serve_with_the_key_in_its_environment_refuses_requests_without_it(
    tiny_model_dirs, tmp_path, monkeypatch
):
    """The command line in its own process, as `make serve` runs it, with the key only in its environment."""
    from slmkit.bench import free_port, start_server

    monkeypatch.setenv("SLMKIT_API_KEY", KEY)
    port, log = free_port(), tmp_path / "serve.log"
    proc = start_server(tiny_model_dirs["onnx"], port, ["--threads", "1", "--served-model-name", "tones"], log=log)
    try:
        url = f"http://127.0.0.1:{port}"
        assert http(url, "/v1/models", key=None)[0] == 401
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == ["tones"]
        reply = client.chat.completions.create(model="tones", messages=user(PHRASES[0]))
        assert reply.choices[0].finish_reason == "stop"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    text = log.read_text()
    assert "Application startup complete." in text and KEY not in text
