"""The OpenAI-compatible HTTP API, end to end: a real uvicorn server on 127.0.0.1 in front of
the real `AsyncEngine` serving a tiny checkpoint written by `modelgen`, driven by the official
`openai` client (and raw `httpx` where the wire format itself is the point: SSE framing,
malformed JSON). Each server runs in a background thread of this process and is stopped at
teardown, so a fault can be injected into its engine; refusals are also compared with
`elasticmoe serve --devices 2` (executor processes) run as a user runs it."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from typing import Any, AsyncIterator, Iterator

import httpx
import openai
import pytest
from fastapi import testclient

import testprocs
from elasticmoe_worker import modelgen
from elasticmoe_worker.engine import async_engine
from elasticmoe_worker.engine import engine as engine_mod
from elasticmoe_worker.engine import types
from elasticmoe_worker.server import api

SERVED_NAME = "tiny-moe"
MAX_MODEL_LEN = 256
PROMPT = "The quick brown fox"


@dataclasses.dataclass
class Served:
    base_url: str
    engine: async_engine.AsyncEngine

    def client(self, **kw: Any) -> openai.OpenAI:
        # NOTE: max_retries=0: the client would otherwise retry 429/503 and hide them.
        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key="unused", max_retries=0, timeout=60, **kw)

    def metrics_text(self) -> str:
        r = httpx.get(f"{self.base_url}/metrics", timeout=10)
        assert r.status_code == 200, r.text
        return r.text


@contextlib.contextmanager
def _serve(model_dir, *, max_waiting_s: float | None = None, **engine_kw: Any) -> Iterator[Served]:
    config = engine_mod.EngineConfig(dtype="float32", **engine_kw)
    engine = async_engine.AsyncEngine.from_model_dir(model_dir, config)
    app = api.build_app(engine, max_waiting_s=max_waiting_s, served_model_name=SERVED_NAME)
    server = api.make_server(app, "127.0.0.1", 0, log_level="warning", graceful_shutdown_s=2)
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive(), "uvicorn exited during startup; see the log above"
            assert time.monotonic() < deadline, "uvicorn did not start within 30 s"
            time.sleep(0.02)
        port = server.servers[0].sockets[0].getsockname()[1]
        yield Served(f"http://127.0.0.1:{port}", engine)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        engine.shutdown()
        assert not thread.is_alive(), "uvicorn did not stop within 30 s"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return modelgen.make_model("qwen3_moe", "tiny", tmp_path_factory.mktemp("api") / "qwen3_moe", progress=False)


@pytest.fixture(scope="module")
def served(model_dir) -> Iterator[Served]:
    with _serve(model_dir, max_model_len=MAX_MODEL_LEN) as s:
        yield s


def _sample(name: str, labels: str, text: str) -> float:
    """The value of one sample in an exposition text (`labels` like '{outcome="stop"}' or '')."""
    m = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.MULTILINE)
    assert m, f"{name}{labels} not in the scrape:\n{text}"
    return float(m.group(1))


def _wait_for(predicate, what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(0.05)


def _assert_still_serves(served: Served) -> None:
    out = served.client().completions.create(model=SERVED_NAME, prompt="ok", max_tokens=1, temperature=0)
    assert out.usage.completion_tokens == 1


# ------------------------------------------------------------------ happy paths


def test_models_and_health(served):
    models = served.client().models.list()
    assert [m.id for m in models.data] == [SERVED_NAME]
    assert httpx.get(f"{served.base_url}/health").json() == {"status": "ok"}
    unknown = httpx.get(f"{served.base_url}/v1/nothing-here")
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "not_found"


def test_completion_greedy_is_deterministic_and_counts_tokens(served):
    client = served.client()
    a = client.completions.create(model=SERVED_NAME, prompt=PROMPT, max_tokens=8, temperature=0,
                                  extra_body={"ignore_eos": True})
    b = client.completions.create(model=SERVED_NAME, prompt=PROMPT, max_tokens=8, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert a.object == "text_completion" and a.model == SERVED_NAME
    assert a.choices[0].text == b.choices[0].text and a.choices[0].text
    assert a.choices[0].finish_reason == "length"
    num_prompt = len(served.engine.tokenize(PROMPT))
    assert (a.usage.prompt_tokens, a.usage.completion_tokens, a.usage.total_tokens) == (num_prompt, 8, num_prompt + 8)


def test_completion_accepts_token_ids_and_a_one_string_list(served):
    client = served.client()
    ids = served.engine.tokenize(PROMPT)
    by_text = client.completions.create(model=SERVED_NAME, prompt=PROMPT, max_tokens=4, temperature=0)
    by_ids = client.completions.create(model=SERVED_NAME, prompt=ids, max_tokens=4, temperature=0)
    by_list = client.completions.create(model=SERVED_NAME, prompt=[PROMPT], max_tokens=4, temperature=0)
    assert by_text.choices[0].text == by_ids.choices[0].text == by_list.choices[0].text


def test_stop_string_cuts_the_output(served):
    client = served.client()
    full = client.completions.create(model=SERVED_NAME, prompt=PROMPT, max_tokens=12, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    words = re.findall(r"[A-Za-z]{2,}", full[1:])
    assert words, f"no word to stop at in {full!r}"
    stop = words[-1]
    cut = client.completions.create(model=SERVED_NAME, prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True})
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == full[: full.index(stop)]


def test_seeded_sampling_repeats(served):
    client = served.client()
    kw = dict(model=SERVED_NAME, prompt=PROMPT, max_tokens=6, temperature=1.0, top_p=0.9, seed=7,
              extra_body={"top_k": 50, "ignore_eos": True})
    assert client.completions.create(**kw).choices[0].text == client.completions.create(**kw).choices[0].text


def test_omitted_max_tokens_fills_the_remaining_context(served):
    ids = [5] * (MAX_MODEL_LEN - 3)
    out = served.client().completions.create(model=SERVED_NAME, prompt=ids, temperature=0,
                                             extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 3 and out.choices[0].finish_reason == "length"


def test_completion_streaming_matches_non_streaming(served):
    client = served.client()
    full = client.completions.create(model=SERVED_NAME, prompt=PROMPT, max_tokens=8, temperature=0,
                                     extra_body={"ignore_eos": True})
    chunks = list(client.completions.create(model=SERVED_NAME, prompt=PROMPT, max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    text_chunks, usage_chunk = chunks[:-1], chunks[-1]
    assert "".join(c.choices[0].text for c in text_chunks) == full.choices[0].text
    assert [c.choices[0].finish_reason for c in text_chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == 8
    assert usage_chunk.usage.prompt_tokens == full.usage.prompt_tokens


def test_chat_non_streaming_and_streaming_agree(served):
    client = served.client()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    full = client.chat.completions.create(model=SERVED_NAME, messages=messages, max_completion_tokens=8,
                                          temperature=0, extra_body={"ignore_eos": True})
    assert full.object == "chat.completion"
    assert full.choices[0].message.role == "assistant" and full.choices[0].finish_reason == "length"
    assert full.usage.completion_tokens == 8
    assert full.usage.prompt_tokens == len(served.engine.apply_chat_template(messages))
    chunks = list(client.chat.completions.create(model=SERVED_NAME, messages=messages, max_tokens=8,
                                                 temperature=0, stream=True, extra_body={"ignore_eos": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:])
    assert chunks[-1].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full.choices[0].message.content


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"prompt": PROMPT}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
])
def test_raw_sse_framing_ends_with_done(served, path, body):
    body = dict(body, model=SERVED_NAME, max_tokens=4, stream=True, stream_options={"include_usage": True})
    with httpx.stream("POST", served.base_url + path, json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]", raw
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1]), raw
    assert payloads[-1]["usage"]["completion_tokens"] == 4 and payloads[-1]["choices"] == []
    assert payloads[-2]["choices"][0]["finish_reason"] in ("stop", "length")


# ------------------------------------------------------------------ bad requests

_LONG_IDS = [5] * (MAX_MODEL_LEN + 10)
_CHAT = [{"role": "user", "content": "hi"}]

# (endpoint, request fields, status, param, code)
BAD_REQUESTS = [
    ("completions", {"prompt": PROMPT, "max_tokens": 0}, 400, "max_tokens", None),
    ("completions", {"prompt": PROMPT, "max_tokens": -3}, 400, "max_tokens", None),
    ("completions", {"prompt": PROMPT, "max_tokens": "5"}, 400, "max_tokens", None),
    ("completions", {"prompt": PROMPT, "temperature": "hot"}, 400, "temperature", None),
    ("completions", {"prompt": PROMPT, "stream": "yes"}, 400, "stream", None),
    ("completions", {"prompt": 5}, 400, "prompt", None),
    ("completions", {"prompt": ["a", "b"]}, 400, "prompt", None),
    ("completions", {"prompt": [2**20]}, 400, "prompt", None),  # outside the vocabulary
    ("completions", {"prompt": _LONG_IDS, "max_tokens": 1}, 400, "prompt", "context_length_exceeded"),
    ("completions", {"prompt": PROMPT, "max_tokens": MAX_MODEL_LEN}, 400, "max_tokens", "context_length_exceeded"),
    ("completions", {"prompt": PROMPT, "temperature": 3.0}, 400, "temperature", None),
    ("completions", {"prompt": PROMPT, "top_p": 0.0}, 400, "top_p", None),
    ("completions", {"prompt": PROMPT, "extra_body": {"top_k": -1}}, 400, "top_k", None),
    ("completions", {"prompt": PROMPT, "seed": -1}, 400, "seed", None),
    ("completions", {"prompt": PROMPT, "stop": [str(i) for i in range(9)]}, 400, "stop", None),
    ("completions", {"prompt": PROMPT, "n": 2}, 400, "n", "unsupported_field"),
    ("completions", {"prompt": PROMPT, "echo": True}, 400, "echo", "unsupported_field"),
    ("completions", {"prompt": PROMPT, "logprobs": 2}, 400, "logprobs", "unsupported_field"),
    ("completions", {"model": "gpt-4", "prompt": PROMPT}, 404, "model", "model_not_found"),
    ("chat", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role", None),
    ("chat", {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content", None),
    ("chat", {"messages": []}, 400, "messages", None),
    ("chat", {"messages": [{"role": "user", "content": "hi " * MAX_MODEL_LEN}]}, 400, "messages",
     "context_length_exceeded"),
    ("chat", {"messages": _CHAT, "max_completion_tokens": 0}, 400, "max_completion_tokens", None),
    ("chat", {"messages": _CHAT, "max_tokens": MAX_MODEL_LEN}, 400, "max_tokens", "context_length_exceeded"),
    ("chat", {"messages": _CHAT, "logprobs": True}, 400, "logprobs", "unsupported_field"),
    ("chat", {"messages": _CHAT, "n": 3}, 400, "n", "unsupported_field"),
    ("chat", {"model": "nope", "messages": _CHAT}, 404, "model", "model_not_found"),
]


@pytest.mark.parametrize("endpoint,fields,status,param,code", BAD_REQUESTS,
                         ids=[f"{e}-{p}-{i}" for i, (e, _, _, p, _) in enumerate(BAD_REQUESTS)])
def test_bad_request_is_refused_naming_the_field(served, endpoint, fields, status, param, code):
    client = served.client()
    create = client.completions.create if endpoint == "completions" else client.chat.completions.create
    with pytest.raises(openai.APIStatusError) as info:
        create(**{"model": SERVED_NAME, **fields})
    err = info.value
    assert err.status_code == status, err.body
    assert err.param == param, err.body
    assert err.type == "invalid_request_error", err.body
    assert code is None or err.code == code, err.body
    assert param.split("[")[0] in err.message
    if code == "model_not_found":
        assert SERVED_NAME in err.message and fields["model"] in err.message
    if code == "context_length_exceeded":
        assert str(MAX_MODEL_LEN) in err.message  # the numbers are in the message
    _assert_still_serves(served)


@pytest.mark.parametrize("content,param", [
    (b'{"model": "tiny-moe", "prompt": "x",', None),  # malformed JSON
    (b"[1, 2, 3]", None),  # JSON, but not an object
    (b'{"prompt": "x"}', "model"),  # a required field missing
    (b'{"model": "tiny-moe"}', "prompt"),
])
def test_malformed_body_is_400(served, content, param):
    r = httpx.post(f"{served.base_url}/v1/completions", content=content,
                   headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["message"]
    _assert_still_serves(served)


@pytest.fixture(scope="module")
def devices_url(model_dir, tmp_path_factory) -> Iterator[str]:
    """`elasticmoe serve --devices 2` on the same checkpoint, name and max_model_len as `served`;
    started once (executor processes take seconds), stopped with Ctrl-C at teardown."""
    work = tmp_path_factory.mktemp("serve-devices")
    port = testprocs.free_port()
    argv = testprocs.elasticmoe("--log-level", "warning", "serve", "--devices", "2", "--model", str(model_dir),
                                "--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", str(port),
                                "--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN), "--kv-cache-mb", "8")
    log_path = work / "serve.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(argv, env={**os.environ, "ELASTICMOE_CACHE_DIR": str(work / "cache")},
                                stdout=log, stderr=subprocess.STDOUT, preexec_fn=testprocs.die_with_test)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_for(lambda: proc.poll() is not None or testprocs.healthy(base), "serve --devices 2 to come up", 120)
        assert proc.poll() is None, f"serve --devices 2 exited:\n{log_path.read_text()}"
        yield base
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _outcomes(base_url: str) -> tuple[float, float]:
    """(requests rejected, requests that ended in an engine error) so far."""
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    rejected = sum(float(v) for v in re.findall(r"^elasticmoe_requests_rejected_total\{.*\} (\S+)$", text, re.M))
    return rejected, _sample("elasticmoe_requests_finished_total", '{outcome="error"}', text)


_OUT_OF_VOCAB = {"prompt": [99999999], "max_tokens": 2}

# (endpoint, request fields, status, param): the engine itself refuses the first two (its
# vocabulary), the HTTP layer the rest; streaming or not, the answer is a JSON error.
REFUSALS = [
    ("completions", _OUT_OF_VOCAB, 400, "prompt"),
    ("completions", {**_OUT_OF_VOCAB, "stream": True}, 400, "prompt"),
    ("completions", {"prompt": ""}, 400, "prompt"),
    ("completions", {"prompt": PROMPT, "top_p": 2.0}, 400, "top_p"),
    ("completions", {"prompt": PROMPT, "temperature": 3.0, "stream": True}, 400, "temperature"),
    ("completions", {"prompt": _LONG_IDS, "max_tokens": 1}, 400, "prompt"),
    ("completions", {"prompt": PROMPT, "max_tokens": MAX_MODEL_LEN}, 400, "max_tokens"),
    ("chat/completions", {"messages": _CHAT, "top_p": 2.0, "stream": True}, 400, "top_p"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi " * MAX_MODEL_LEN}]}, 400, "messages"),
]


@pytest.fixture(params=["serve", "serve --devices 2"])
def server_url(request) -> str:
    if request.param == "serve":
        return request.getfixturevalue("served").base_url
    return request.getfixturevalue("devices_url")


@pytest.mark.parametrize("endpoint,fields,status,param", REFUSALS,
                         ids=[f"{e}-{p}-{i}" for i, (e, _, _, p) in enumerate(REFUSALS)])
def test_refusal_names_the_field_alike_from_one_engine_and_from_executors(served, server_url, endpoint, fields,
                                                                          status, param):
    def post(base_url: str) -> httpx.Response:
        return httpx.post(f"{base_url}/v1/{endpoint}", json={"model": SERVED_NAME, **fields}, timeout=60)

    before = _outcomes(server_url)
    r = post(server_url)
    assert (r.status_code, r.headers["content-type"]) == (status, "application/json"), r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param, err
    assert err["message"].startswith(f"{param}: "), err
    rejected, errors = _outcomes(server_url)
    assert (rejected, errors) == (before[0] + 1, before[1]), "counted as a refusal, not as an engine failure"
    assert testprocs.healthy(server_url)
    if server_url != served.base_url:
        one_engine = post(served.base_url)
        assert (r.status_code, r.text) == (one_engine.status_code, one_engine.text)


class _FullQueueEngine:
    """An engine client whose every request meets a full queue after it was sent, the way an
    executor's refusal arrives (an in-process engine raises `EngineOverloaded` up front)."""

    model_name = SERVED_NAME
    max_model_len = MAX_MODEL_LEN

    def __init__(self, refuse_up_front: bool) -> None:
        self.refuse_up_front = refuse_up_front

    def tokenize(self, text: str) -> list[int]:
        return [1] * len(text.split())

    def apply_chat_template(self, messages) -> list[int]:
        return [1, 2, 3]

    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: types.SamplingParams) -> AsyncIterator[types.RequestOutput]:
        full = types.EngineOverloaded("server busy: 4 requests already waiting (max_waiting=4)")
        if self.refuse_up_front:
            raise full
        yield types.refusal(request_id, full, len(prompt_token_ids))

    def abort(self, request_id: str) -> None:
        pass

    def stats(self) -> types.EngineStats:
        return types.EngineStats(num_running=0, num_waiting=4, kv_blocks_used=0, kv_blocks_total=8,
                                 num_preemptions_total=0, healthy=True)


@pytest.mark.parametrize("stream", [False, True])
def test_full_queue_is_429_whether_refused_up_front_or_after_sending(stream):
    answers = []
    for up_front in (True, False):
        engine = _FullQueueEngine(refuse_up_front=up_front)
        with testclient.TestClient(api.build_app(engine)) as client:
            r = client.post("/v1/completions", json={"model": SERVED_NAME, "prompt": PROMPT, "stream": stream})
        assert r.status_code == 429, r.text
        answers.append((r.headers["retry-after"], r.headers["content-type"], r.json()))
    assert answers[0] == answers[1]
    retry_after, content_type, body = answers[0]
    assert (retry_after, content_type, body["error"]["code"]) == ("1", "application/json", "engine_overloaded")
    assert "4 requests already waiting" in body["error"]["message"]


def test_unknown_fields_are_ignored(served):
    out = served.client().completions.create(model=SERVED_NAME, prompt=PROMPT, max_tokens=2, user="someone",
                                             extra_body={"not_a_field": {"x": 1}})
    assert out.usage.completion_tokens <= 2


# ------------------------------------------------------------------ metrics


def test_metrics_scrape_passes_promtool_and_counts(served):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool not found on PATH: install the Debian package `prometheus` "
                    "(apt-get install -y prometheus) to check the /metrics exposition")
    client = served.client()
    client.completions.create(model=SERVED_NAME, prompt=PROMPT, max_tokens=3, temperature=0)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt=PROMPT, max_tokens=3)
    text = served.metrics_text()
    check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, f"promtool check metrics failed:\n{check.stdout}{check.stderr}"
    assert _sample("elasticmoe_prompt_tokens_total", "", text) > 0
    assert _sample("elasticmoe_generation_tokens_total", "", text) >= 3
    assert _sample("elasticmoe_time_to_first_token_seconds_count", "", text) >= 1
    assert _sample("elasticmoe_time_per_output_token_seconds_count", "", text) >= 1
    assert _sample("elasticmoe_e2e_request_latency_seconds_count", "", text) >= 1
    assert _sample("elasticmoe_requests_finished_total", '{outcome="length"}', text) >= 1
    assert _sample("elasticmoe_requests_rejected_total", '{reason="model_not_found"}', text) >= 1
    assert _sample("elasticmoe_healthy", "", text) == 1
    assert _sample("elasticmoe_kv_cache_total_blocks", "", text) > 0
    for name in ("elasticmoe_num_requests_running", "elasticmoe_num_requests_waiting",
                 "elasticmoe_kv_cache_used_blocks", "elasticmoe_preemptions_total",
                 "elasticmoe_recomputed_tokens_total"):
        _sample(name, "", text)
    for name in ("time_to_first_token_seconds", "time_per_output_token_seconds", "e2e_request_latency_seconds"):
        assert f"# HELP elasticmoe_{name} " in text and f"# TYPE elasticmoe_{name} histogram" in text


# ------------------------------------------------------------------ load, disconnects, failures


@pytest.fixture(scope="module")
def busy(tmp_path_factory) -> Iterator[Served]:
    """One request runs at a time and one may wait; a waiter gets 3 s to see a first token.

    The small preset, not the tiny one: its 2000-token occupant must outlast the waiter's 3 s
    for sure (the tiny model decodes 2000 tokens in about that time on an idle machine)."""
    small = modelgen.make_model("qwen3_moe", "small", tmp_path_factory.mktemp("api-busy") / "qwen3_moe",
                                progress=False)
    with _serve(small, max_waiting_s=3.0, max_num_seqs=1, max_waiting=1, max_model_len=2048) as s:
        yield s


def _finished(served: Served, outcome: str) -> float:
    return _sample("elasticmoe_requests_finished_total", f'{{outcome="{outcome}"}}', served.metrics_text())


def _running(served: Served) -> float:
    return _sample("elasticmoe_num_requests_running", "", served.metrics_text())


def test_overload_queue_timeout_and_disconnect_abort(busy):
    client = busy.client()
    # An occupant that would run for minutes: the only running slot is taken.
    occupant = client.completions.create(model=SERVED_NAME, prompt=PROMPT, max_tokens=2000, stream=True,
                                         extra_body={"ignore_eos": True})
    next(iter(occupant))
    aborts_before = _finished(busy, "abort")

    # The next request waits in the queue; no token within max_waiting_s -> 429 + Retry-After.
    waiter_result: dict[str, Any] = {}
    waiter = threading.Thread(target=lambda: waiter_result.update(r=httpx.post(
        f"{busy.base_url}/v1/completions", json={"model": SERVED_NAME, "prompt": PROMPT, "max_tokens": 2},
        timeout=60)))
    waiter.start()
    _wait_for(lambda: _sample("elasticmoe_num_requests_waiting", "", busy.metrics_text()) >= 1,
              "the second request to wait in the engine queue")
    # With the queue full, a third request is refused at once: 429 + Retry-After.
    with pytest.raises(openai.RateLimitError) as info:
        client.completions.create(model=SERVED_NAME, prompt=PROMPT, max_tokens=2)
    assert int(info.value.response.headers["retry-after"]) >= 1
    assert info.value.code == "engine_overloaded"
    waiter.join(timeout=60)
    timed_out = waiter_result["r"]
    assert timed_out.status_code == 429, timed_out.text
    assert int(timed_out.headers["retry-after"]) >= 1
    assert timed_out.json()["error"]["code"] == "queue_timeout"

    # The client of the stream goes away: the engine aborts it and frees the slot.
    occupant.close()
    _wait_for(lambda: _running(busy) == 0, "the abandoned stream to be aborted")
    assert _finished(busy, "abort") >= aborts_before + 1

    # Same for a non-streaming request whose client gives up.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{busy.base_url}/v1/completions", timeout=httpx.Timeout(60, read=1.0),
                   json={"model": SERVED_NAME, "prompt": PROMPT, "max_tokens": 2000, "ignore_eos": True})
    _wait_for(lambda: _finished(busy, "abort") >= aborts_before + 2, "the abandoned request to be aborted")
    _wait_for(lambda: _running(busy) == 0, "the abandoned request to leave the engine")

    text = busy.metrics_text()
    assert _sample("elasticmoe_requests_rejected_total", '{reason="overloaded"}', text) >= 1
    assert _sample("elasticmoe_requests_rejected_total", '{reason="queue_timeout"}', text) >= 1
    assert _sample("elasticmoe_requests_finished_total", '{outcome="length"}', text) == 0
    _assert_still_serves(busy)


def test_dead_engine_is_503_with_retry_after(model_dir):
    with _serve(model_dir, max_model_len=MAX_MODEL_LEN) as s:
        client = s.client()
        _assert_still_serves(s)

        def broken_step():
            raise RuntimeError("injected step failure")

        s.engine.engine.step = broken_step  # the next step fails: the engine marks itself dead
        with pytest.raises(openai.InternalServerError) as info:
            client.completions.create(model=SERVED_NAME, prompt=PROMPT, max_tokens=4)
        assert info.value.status_code == 503 and "injected step failure" in info.value.message
        assert int(info.value.response.headers["retry-after"]) >= 1

        with pytest.raises(openai.APIStatusError) as info:
            client.completions.create(model=SERVED_NAME, prompt=PROMPT, max_tokens=4)
        assert info.value.status_code == 503 and info.value.code == "engine_dead"
        assert int(info.value.response.headers["retry-after"]) >= 1
        health = httpx.get(f"{s.base_url}/health")
        assert health.status_code == 503 and "injected step failure" in health.json()["error"]
        text = s.metrics_text()
        assert _sample("elasticmoe_healthy", "", text) == 0
        assert _sample("elasticmoe_requests_finished_total", '{outcome="error"}', text) == 1
        assert _sample("elasticmoe_requests_rejected_total", '{reason="engine_dead"}', text) == 1
