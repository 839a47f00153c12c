"""The OpenAI-compatible server: a real `qwen-native serve` process on 127.0.0.1 (a tiny checkpoint), driven
through the official `openai` client and raw HTTP; a few cases in-process through FastAPI's test client."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import qwen_native  # noqa: E402
from conftest import build_model_dir  # noqa: E402

GREEDY = dict(temperature=0)


def start(model_dir, *args, env=None):
    """A server process on a free port; (process, base URL). Waits until it answers."""
    p = subprocess.Popen([sys.executable, "-m", "qwen_native", "serve", "--model", str(model_dir), "--port", "0",
                          "--threads", "1", *args], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                         env=env)
    line = p.stderr.readline()
    m = re.search(r"on (http://127\.0\.0\.1:\d+)/v1", line)
    assert m, line + p.stderr.read() if p.poll() is not None else line
    url = m.group(1)
    for _ in range(200):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return p, url
        except httpx.HTTPError:
            time.sleep(0.05)
    p.kill()
    raise AssertionError("the server did not answer")


def stop(p):
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    p.stderr.close()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # deep enough (48 layers) that a long answer takes seconds: a disconnect or SIGTERM lands mid-generation
    return build_model_dir(tmp_path_factory.mktemp("serve") / "model", tie_word_embeddings=False,
                           max_position_embeddings=512, num_hidden_layers=48)


@pytest.fixture(scope="module")
def server(model_dir):
    p, url = start(model_dir, "--max-batch", "4")
    yield url
    stop(p)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def local(model_dir):
    m = qwen_native.load(model_dir, num_threads=1)
    yield m
    m.close()


def model_id(client):
    return client.models.list().data[0].id


def test_models_and_health(client, server, model_dir):
    ids = [m.id for m in client.models.list().data]
    assert ids == [str(model_dir)]
    h = httpx.get(server + "/health").json()
    assert h["status"] == "ok" and h["max_batch"] == 4 and h["running"] == 0


def test_chat_completion_is_generate(client, local):
    msgs = [{"role": "user", "content": "Tell me a story"}]
    r = client.chat.completions.create(model=model_id(client), messages=msgs, max_tokens=12, **GREEDY)
    ref = local.generate(msgs, max_new_tokens=12, temperature=0)
    c = r.choices[0]
    assert c.message.role == "assistant" and c.message.content == ref.text and c.finish_reason == ref.finish_reason
    assert r.usage.prompt_tokens == ref.prompt_tokens and r.usage.completion_tokens == len(ref.token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")


def test_streamed_chat_joins_to_the_same_text_with_usage(client):
    msgs = [{"role": "user", "content": "Count to ten"}]
    full = client.chat.completions.create(model=model_id(client), messages=msgs, max_tokens=16, **GREEDY)
    chunks = list(client.chat.completions.create(model=model_id(client), messages=msgs, max_tokens=16, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_completions_plain_and_streamed(client, local):
    r = client.completions.create(model=model_id(client), prompt="Where is the sea", max_tokens=10, **GREEDY)
    ref = local.generate("Where is the sea", chat_template=False, max_new_tokens=10, temperature=0)
    assert r.choices[0].text == ref.text and r.object == "text_completion"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=model_id(client), prompt="Where is the sea", max_tokens=10, stream=True, **GREEDY) if c.choices)
    assert streamed == ref.text


def test_n_stop_and_seed(client, local):
    msgs = [{"role": "user", "content": "Name a colour"}]
    r = client.chat.completions.create(model=model_id(client), messages=msgs, max_tokens=10, n=3, temperature=1.0,
                                       seed=7)
    assert [c.index for c in r.choices] == [0, 1, 2]
    again = client.chat.completions.create(model=model_id(client), messages=msgs, max_tokens=10, n=3,
                                           temperature=1.0, seed=7)
    assert [c.message.content for c in r.choices] == [c.message.content for c in again.choices]
    ref = local.generate(msgs, max_new_tokens=20, temperature=0)
    stop = ref.text[3:6]
    s = client.chat.completions.create(model=model_id(client), messages=msgs, max_tokens=20, stop=[stop], **GREEDY)
    assert s.choices[0].finish_reason == "stop" and s.choices[0].message.content == ref.text[:ref.text.index(stop)]


def test_logprobs(client, local):
    msgs = [{"role": "user", "content": "Why is the sky blue"}]
    r = client.chat.completions.create(model=model_id(client), messages=msgs, max_tokens=6, logprobs=True,
                                       top_logprobs=2, **GREEDY)
    ref = local.generate(msgs, max_new_tokens=6, temperature=0, logprobs=True, top_logprobs=2)
    got = r.choices[0].logprobs.content
    assert [x.token for x in got] == [x.token for x in ref.logprobs]
    assert all(abs(a.logprob - b.logprob) < 1e-5 for a, b in zip(got, ref.logprobs))
    assert all(len(x.top_logprobs) == 2 and x.top_logprobs[0].logprob >= x.top_logprobs[1].logprob for x in got)
    c = client.completions.create(model=model_id(client), prompt="Write a poem", max_tokens=5, logprobs=2, **GREEDY)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5 and lp.text_offset[0] == 0


@pytest.mark.parametrize("kw, status, param, code", [
    (dict(messages=[]), 400, "messages", None),
    (dict(messages=[{"role": "wizard", "content": "hi"}]), 400, "messages", None),
    (dict(max_tokens=-1), 400, "max_tokens", None),
    (dict(temperature=-1), 400, "temperature", None),
    (dict(top_p=5), 400, "top_p", None),
    (dict(n=0), 400, "n", None),
    (dict(top_logprobs=3), 400, "top_logprobs", None),
    (dict(presence_penalty=9), 400, "presence_penalty", None),
    (dict(max_tokens=100000), 400, "messages", "context_length_exceeded"),
    (dict(messages=[{"role": "user", "content": "word " * 800}]), 400, "messages", "context_length_exceeded"),
    (dict(model="gpt-4"), 404, "model", "model_not_found"),
])
def test_bad_requests_are_4xx_in_openai_shape(server, client, kw, status, param, code):
    body = dict(model=model_id(client), messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    body.update(kw)
    r = httpx.post(server + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["param"] == param and err["code"] == code
    with pytest.raises(openai.APIStatusError) as e:  # and the official client sees it as such
        client.chat.completions.create(**body)
    assert e.value.status_code == status


def test_malformed_json_and_bodies(server):
    for data in (b"{not json", b"[1, 2]", b"\xff\xfe"):
        r = httpx.post(server + "/v1/chat/completions", content=data, headers={"content-type": "application/json"})
        assert r.status_code == 400 and "error" in r.json()


def test_client_disconnect_frees_the_slot(server, client):
    body = dict(model=model_id(client), prompt="Tell me a story", max_tokens=480, stream=True, temperature=1.0,
                seed=1)
    with httpx.stream("POST", server + "/v1/completions", timeout=30, json=body) as r:
        lines = r.iter_lines()
        for _ in range(4):
            next(lines)
        assert httpx.get(server + "/health").json()["running"] == 1
    t0 = time.perf_counter()  # the client has gone
    for _ in range(100):  # cancelled within a step once the server notices
        if httpx.get(server + "/health").json()["running"] == 0:
            break
        time.sleep(0.02)
    freed = time.perf_counter() - t0
    assert httpx.get(server + "/health").json()["running"] == 0
    t1 = time.perf_counter()
    full = client.completions.create(**dict(body, stream=False))  # the whole answer takes longer
    # (1x, not more: on a loaded 2-core CI machine the server notices a closed socket only at a later write, and
    # its steps slow down while the background builds run; a slot held to the end would take the full time again)
    assert full.usage.completion_tokens == 480 and time.perf_counter() - t1 > freed


def in_threads(n, fn, timeout=120):
    """fn(0) .. fn(n - 1) at once, one thread each; the exceptions they raised."""
    errors = []

    def run(i):
        try:
            fn(i)
        except Exception as e:  # pragma: no cover - reported by the caller
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    return errors


def test_32_concurrent_clients(client):
    results = {}

    def one(i):
        r = client.chat.completions.create(model=model_id(client), max_tokens=8, temperature=0.8, seed=i,
                                           messages=[{"role": "user", "content": f"Count to {i}"}])
        results[i] = r.choices[0].message.content

    errors = in_threads(32, one)
    assert not errors and len(results) == 32


def test_more_streams_than_executor_threads_all_stream_at_once(model_dir):
    """12 open streams (more than asyncio's default executor has threads on a small machine): every one gets its
    first text before any of them ends, none waits for another to finish."""
    p, url = start(model_dir, "--max-batch", "12")
    try:
        # the disconnect test's request: it runs its full 480 tokens (other seeds may sample an EOS early)
        body = dict(prompt="Tell me a story", max_tokens=480, stream=True, temperature=1.0, seed=1)
        firsts, ends = [], []

        def one(i):
            first = None
            with httpx.stream("POST", url + "/v1/completions", timeout=120, json=body) as r:
                for line in r.iter_lines():
                    if first is None and line.startswith("data: {") and '"text": ""' not in line:
                        first = time.perf_counter()  # the first chunk with text
            firsts.append(first)
            ends.append(time.perf_counter())

        errors = in_threads(12, one)
        assert not errors and len(ends) == 12, errors
        assert None not in firsts and max(firsts) < min(ends), (sorted(firsts), min(ends))
    finally:
        stop(p)


def test_api_key_and_queue_limit(model_dir, local, monkeypatch):
    from fastapi.testclient import TestClient

    from qwen_native.server import create_app

    app = create_app(local, "tiny", api_key="sekret", max_queue=2)
    with TestClient(app) as tc:
        body = dict(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert tc.post("/v1/chat/completions", json=body).status_code == 401
        assert tc.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer nope"}).status_code == 401
        ok = tc.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer sekret"})
        assert ok.status_code == 200
        assert tc.get("/health").status_code == 200  # open without the key
        monkeypatch.setattr(local._scheduler, "load", lambda: (4, 2))  # a full queue
        busy = tc.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer sekret"})
        assert busy.status_code == 429 and busy.json()["error"]["code"] == "rate_limit_exceeded"


def test_sigterm_during_generation_exits_cleanly(model_dir):
    p, url = start(model_dir, "--max-batch", "2")
    try:
        with httpx.stream("POST", url + "/v1/completions", timeout=30,
                          json=dict(prompt="Tell me a story", max_tokens=480, stream=True, temperature=1.0)) as r:
            lines = r.iter_lines()
            next(lines)
            t = time.perf_counter()
            p.send_signal(signal.SIGTERM)
            try:
                for _ in lines:
                    pass
            except httpx.HTTPError:
                pass
        assert p.wait(timeout=20) == 0 and time.perf_counter() - t < 10
    finally:
        stop(p)


def test_startup_failures_are_one_line(tmp_path, model_dir):
    def run(*args):
        r = subprocess.run([sys.executable, "-m", "qwen_native", "serve", "--threads", "1", *args],
                           capture_output=True, text=True, timeout=120)
        return r.returncode, r.stderr.strip().splitlines()

    rc, err = run("--model", str(tmp_path / "missing"), "--port", "0")
    assert rc == 1 and len(err) == 1 and "no such directory" in err[0]
    bad = build_model_dir(tmp_path / "bad", chat_template="{% for m in messages %}{{ m.content }")
    rc, err = run("--model", str(bad), "--port", "0")
    assert rc == 1 and len(err) == 1 and "template" in err[0]
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        rc, err = run("--model", str(model_dir), "--port", str(s.getsockname()[1]))
    assert rc == 1 and len(err) == 1 and "cannot listen" in err[0]
    rc, err = run("--max-batch", "zero")
    assert rc == 2 and len(err) == 1 and "--max-batch" in err[0]
