"""The OpenAI-compatible API on a real server on loopback: the official `openai` client, raw HTTP for bad
input, keys, a full queue, a client that walks away, and concurrent clients against each one alone."""

import json
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI

from llmd.app.guard import ThreadServer
from llmd.app.keys import create_key
from llmd.app.pool import Request
from llmd.app.server import build_site
from llmd.engine.sampling import SamplingParams
from reference import hf_greedy
from test_pool import make_pool, wait_ready

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
ERROR_KEYS = {"message", "type", "param", "code"}


class Served:
    def __init__(self, pool, server):
        self.pool, self.server = pool, server
        self.url = f"http://127.0.0.1:{server.port}/v1"
        self.model = pool.model_name()

    def client(self, key: str = "none") -> OpenAI:
        return OpenAI(base_url=self.url, api_key=key, max_retries=0, timeout=120)

    def post(self, path: str, body, key: str | None = None, **kw) -> httpx.Response:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers = {"content-type": "application/json", **({"authorization": f"Bearer {key}"} if key else {})}
        return httpx.post(self.url + path, content=content, headers=headers, timeout=120, **kw)


def serve(pool, listen: bool = False) -> ThreadServer:
    server = ThreadServer("127.0.0.1", 0)
    server.start(build_site(pool, server.port, listen, "127.0.0.1", lambda app: app))
    return server


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    pool = make_pool(tmp_path_factory.mktemp("api"), workers=1)
    pool.config.max_waiting = 1
    server = None
    try:
        pool.start(local_agent=False)
        pool.launch_local()
        wait_ready(pool)
        server = serve(pool)
        yield Served(pool, server)
    finally:
        if server:
            server.close()
        pool.close()
        pool.store.close()


def greedy_reply(api: Served, messages=QUESTION, max_tokens: int = 12) -> tuple[list[int], str]:
    text = api.pool.text_model()
    ids = hf_greedy(Path(api.pool.engine.spec.model_dir), text.chat_ids(messages), max_tokens)
    return ids, text.decode(ids)


def test_models_lists_the_running_model(api):
    assert [m.id for m in api.client().models.list().data] == [api.model]


def test_a_chat_completion_is_transformers_greedy_reply_with_its_usage(api):
    ids, expected = greedy_reply(api)
    r = api.client().chat.completions.create(model=api.model, messages=QUESTION, temperature=0, max_tokens=12)
    assert r.object == "chat.completion" and r.choices[0].message.content == expected
    prompt = len(api.pool.text_model().chat_ids(QUESTION))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (prompt, len(ids))
    assert r.usage.total_tokens == prompt + len(ids)
    assert r.choices[0].finish_reason == ("stop" if len(ids) < 12 else "length")
    row = api.pool.store.requests()[-1]
    assert row["status"] == "done" and row["generated_tokens"] == len(ids) and row["cost"] > 0


def test_a_streamed_chat_sends_the_same_text_in_chunks_then_usage_then_done(api):
    _, expected = greedy_reply(api)
    chunks = list(api.client().chat.completions.create(model=api.model, messages=QUESTION, temperature=0,
                                                       max_tokens=12, stream=True,
                                                       stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # streamed, not at once
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")
    raw = api.post("/chat/completions", {"model": api.model, "messages": QUESTION, "max_tokens": 3, "stream": True})
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.text.rstrip().endswith("data: [DONE]")


def test_completions_plain_and_streamed_agree(api):
    client = api.client()
    whole = client.completions.create(model="default", prompt="The capital of France is", temperature=0, max_tokens=8)
    parts = client.completions.create(model=api.model, prompt="The capital of France is", temperature=0, max_tokens=8,
                                      stream=True)
    assert whole.object == "text_completion" and whole.usage.completion_tokens == 8
    assert "".join(c.choices[0].text for c in parts) == whole.choices[0].text != ""


def test_a_stop_string_ends_the_reply_before_it_and_is_never_streamed(api):
    _, expected = greedy_reply(api)
    assert "Paris" in expected  # the greedy reply names it
    client = api.client()
    whole = client.chat.completions.create(model=api.model, messages=QUESTION, temperature=0, max_tokens=12,
                                           stop=["Paris"])
    assert whole.choices[0].message.content == expected[: expected.index("Paris")]
    assert whole.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(model=api.model, messages=QUESTION, temperature=0, max_tokens=12,
                                                 stop=["Paris", "Lyon"], stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content and not any("Par" in (c.choices[0].delta.content or "")
                                                                for c in chunks if c.choices)


def test_the_same_seed_samples_the_same_reply(api):
    client = api.client()

    def sampled(seed: int) -> str:
        r = client.chat.completions.create(model=api.model, temperature=1.0, top_p=0.95, max_tokens=16, seed=seed,
                                           messages=[{"role": "user", "content": "Write a poem about anything."}])
        return r.choices[0].message.content

    assert sampled(7) == sampled(7)
    assert len({sampled(s) for s in (1, 2, 3, 4)}) > 1  # and the seed does choose


def too_long(api: Served) -> dict:
    return {"model": api.model, "messages": [{"role": "user", "content": "hello " * 400}]}


@pytest.mark.parametrize("body,status,says", [
    (b"{", 400, "not valid JSON"),
    (b"\xff\xfe{}", 400, "UTF-8"),
    (b"[1, 2]", 400, "JSON object"),
    (b"[" * 100000, 400, "nests too deeply"),
    ({"messages": QUESTION}, 400, "model"),
    ({"model": "MODEL", "messages": QUESTION, "temperature": "hot"}, 400, "temperature"),
    ({"model": "MODEL", "messages": QUESTION, "temperature": 7}, 400, "temperature"),
    ({"model": "MODEL", "messages": QUESTION, "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "MODEL", "messages": QUESTION, "max_tokens": 1.5}, 400, "max_tokens"),
    ({"model": "MODEL", "messages": QUESTION, "n": 2}, 400, "n must be 1"),
    ({"model": "MODEL", "messages": QUESTION, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"model": "MODEL", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "role"),
    ({"model": "MODEL", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages"),
    ({"model": "MODEL", "messages": []}, 400, "messages"),
    ({"model": "gpt-4o", "messages": QUESTION}, 404, "not served here"),
    ("TOO_LONG", 400, "the context holds 256"),
    (b"x" * (2 << 20), 413, "body over"),
])
def test_bad_requests_get_openai_shaped_4xx_errors(api, body, status, says):
    if body == "TOO_LONG":
        body = too_long(api)
    elif isinstance(body, dict) and body.get("model") == "MODEL":
        body = {**body, "model": api.model}
    before = len(api.pool.store.requests())
    r = api.post("/chat/completions", body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == ERROR_KEYS and says in error["message"]
    assert "hello hello" not in r.text and "hot" not in r.text  # nothing sent is echoed
    if says != "the context holds 256":
        assert len(api.pool.store.requests()) == before  # refused before it was journalled


def test_a_prompt_over_the_context_says_both_lengths(api):
    r = api.post("/chat/completions", too_long(api))
    message = r.json()["error"]["message"]
    assert r.status_code == 400 and "the prompt has" in message and "256" in message
    assert r.json()["error"]["code"] == "context_length_exceeded"


def test_keys_are_required_once_one_exists_and_requests_are_journalled_under_them(api):
    store = api.pool.store
    name, other = f"alice-{time.monotonic_ns()}", f"bob-{time.monotonic_ns()}"
    key = create_key(store, name)
    create_key(store, other)
    try:
        for bad in (None, "llmd-wrong", key + "x"):
            r = api.post("/chat/completions", {"model": api.model, "messages": QUESTION, "max_tokens": 2}, key=bad)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(api.url + "/models").status_code == 401
        with pytest.raises(openai.AuthenticationError):
            api.client("llmd-nope").models.list()
        r = api.client(key).chat.completions.create(model=api.model, messages=QUESTION, max_tokens=2)
        assert r.usage.completion_tokens >= 1
        assert store.requests()[-1]["api_key"] == name
        store.revoke_key(name)
        assert api.post("/chat/completions", {"model": api.model, "messages": QUESTION}, key=key).status_code == 401
    finally:
        for k in store.keys():
            if not k["revoked"]:
                store.revoke_key(k["name"])
    assert api.client().models.list().data  # no live key left: loopback is open again


def test_a_listening_server_always_needs_a_key(api):
    server = serve(api.pool, listen=True)
    try:
        r = httpx.post(f"http://127.0.0.1:{server.port}/v1/chat/completions", json={"model": "default", "messages": QUESTION})
        assert r.status_code == 401 and set(r.json()["error"]) == ERROR_KEYS
    finally:
        server.close()


def test_a_full_queue_answers_429_and_serves_again_once_free(api):
    long = SamplingParams(max_new_tokens=200, greedy=True)
    ids = api.pool.text_model().chat_ids(QUESTION)
    slots = api.pool.engine.spec.slots
    tickets = [api.pool.submit(Request(ids, long)) for _ in range(slots + api.pool.config.max_waiting)]
    try:
        r = api.post("/chat/completions", {"model": api.model, "messages": QUESTION, "max_tokens": 2})
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
        assert "busy" in r.json()["error"]["message"]
    finally:
        for t in tickets:
            t.cancel()
    deadline = time.monotonic() + 60
    while api.pool.running() or api.pool.waiting():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert api.post("/chat/completions", {"model": api.model, "messages": QUESTION, "max_tokens": 2}).status_code == 200


def test_a_client_that_disconnects_mid_stream_frees_its_slot(api):
    body = {"model": api.model, "messages": QUESTION, "max_tokens": 200, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", api.url + "/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]  # a few chunks (and the blank lines between them) arrive
        assert any(x.startswith("data: {") for x in got)
    request_id = api.pool.store.requests()[-1]["id"]
    deadline = time.monotonic() + 30
    while (row := api.pool.store.requests()[-1])["status"] != "cancelled":
        assert row["id"] == request_id and time.monotonic() < deadline, row
        time.sleep(0.05)
    assert row["generated_tokens"] < 200
    while api.pool.running():
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_concurrent_clients_each_get_the_reply_they_get_alone(api):
    questions = ["What is the capital of France?", "Name a colour.", "Count to five.", "Say hello in Spanish."]
    client = api.client()

    def ask(q: str) -> str:
        r = client.chat.completions.create(model=api.model, messages=[{"role": "user", "content": q}],
                                           temperature=0, max_tokens=10)
        return r.choices[0].message.content

    alone = {q: ask(q) for q in questions}
    together: dict[str, str] = {}
    threads = [threading.Thread(target=lambda q=q: together.__setitem__(q, ask(q))) for q in questions]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert together == alone


def test_no_model_running_is_503_saying_why(tmp_path):
    pool = make_pool(tmp_path, workers=1)
    server = serve(pool)
    try:
        r = httpx.post(f"http://127.0.0.1:{server.port}/v1/chat/completions",
                       json={"model": "default", "messages": QUESTION})
        assert r.status_code == 503 and "not ready" in r.json()["error"]["message"]
        assert httpx.get(f"http://127.0.0.1:{server.port}/v1/models").json()["data"] == []
    finally:
        server.close()
        pool.store.close()
