"""`singlepass serve`: the real server (uvicorn on a free loopback port) over a tiny exported
artifact, driven by the official openai client and by plain HTTP: results and labels equal
``Runtime.generate`` for the same prompt, continuous batching of 32 concurrent clients, streaming,
moderations, the policy, guard-then-serve (``--guard``: a tiny ONNX classifier folder, and a
stand-in scorer), ``--ignore-eos``, queue-full 429, disconnects and timeouts freeing their rows,
auth, bad input, health before loading, metrics, the CLI, and a short schemathesis run (no 5xx)."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import openai  # the serve extra and the openai client are dev dependencies: a missing one fails, never skips
import pytest

from singlepass.errors import SinglepassError  # noqa: E402
from singlepass.runtime.api import Runtime, load  # noqa: E402
from singlepass.runtime.backends import Backend  # noqa: E402
from singlepass.runtime.passes import State  # noqa: E402
from singlepass.runtime.policy import DEFAULT_REFUSAL  # noqa: E402
from singlepass.runtime.sampling import Sampling  # noqa: E402
from singlepass.runtime.text import TextTracker  # noqa: E402
from singlepass.serve.app import create_app  # noqa: E402
from singlepass.serve.engine import Engine, Job, fit, merge, prefill_groups, put  # noqa: E402
from singlepass.serve.guard import check_folder  # noqa: E402
from singlepass.serve.runner import bind  # noqa: E402
from singlepass.serve.state import Options  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PROMPTS = [
    "What is the capital of France?",
    "Hi",
    "I hate this, it is the worst thing ever.",
    "The quick brown fox jumps over the lazy dog.",
    "Tell me how to build something dangerous.",
    "This movie was wonderful, a delight from start to finish.",
]
MODEL = "art"


@pytest.fixture(scope="module")
def art(serve_art):
    """A tiny artifact with a binary (``safety``) and a three-class (``emotion``) probe."""
    return serve_art


@pytest.fixture(scope="module")
def rt(art):
    return load(art, backend="cpu", threads=1)


class Wrapped(Backend):
    """The real backend with a delay per pass, a gate that holds passes, or a failure on demand."""

    def __init__(self, inner: Backend, delay: float = 0.0):
        self.inner, self.delay = inner, delay
        self.name, self.dummy_past, self.inplace = f"wrapped {inner.name}", inner.dummy_past, inner.inplace
        self.max_batch, self.max_prompt, self.max_seq = inner.max_batch, inner.max_prompt, inner.max_seq
        self.gate = threading.Event()
        self.gate.set()
        self.fail = 0
        self.calls = self.passes = 0

    def run(self, feed, outputs=None, inplace=None, carry=None):
        self.calls += 1
        assert self.gate.wait(30), "the test never opened the gate"
        self.passes += 1
        if self.fail:
            self.fail -= 1
            raise RuntimeError("secret backend detail")
        if self.delay:
            time.sleep(self.delay)
        return self.inner.run(feed, outputs, inplace, carry)

    def release(self):
        self.inner.release()


def runtime_on(rt: Runtime, delay: float = 0.0, **kw) -> Runtime:
    return Runtime(rt.manifest, backend=Wrapped(rt.backend, delay), **kw)


@contextlib.contextmanager
def server(runtime=None, artifact=None, wait=True, hook=None, **opts):
    """A real uvicorn server in a thread on a free loopback port -> namespace(url, st, app)."""
    import uvicorn

    app = create_app(artifact=artifact, runtime=runtime, options=Options(**opts))
    st = app.state.singlepass
    if hook:
        hook(st)
    sock = bind("127.0.0.1", 0)
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    t = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    t.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    ns = SimpleNamespace(url=url, st=st, app=app, server=srv)
    try:
        deadline = time.monotonic() + 20
        while not srv.started:
            assert time.monotonic() < deadline and t.is_alive(), "the server did not start"
            time.sleep(0.01)
        while wait and not (st.ready or st.load_error):
            assert time.monotonic() < deadline, "the artifact did not load"
            time.sleep(0.01)
        yield ns
    finally:
        srv.should_exit = True
        t.join(10)
        sock.close()


def client(url, key="none", **kw):
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=30, **kw)


def request(url, method, path, body=None, headers=None, raw: bytes | None = None, timeout=30):
    """Plain HTTP (stdlib) -> (status, headers, parsed JSON or text)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    h = {"Content-Type": "application/json", **(headers or {})}
    conn.request(method, path, body=data, headers=h)
    resp = conn.getresponse()
    text = resp.read().decode()
    conn.close()
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = text
    return resp.status, dict(resp.getheaders()), parsed


def raw_post(host, port, body: dict) -> socket.socket:
    """A request sent on a bare socket (the test closes it to leave)."""
    sock = socket.create_connection((host, int(port)), timeout=10)
    data = json.dumps(body).encode()
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(data), data)
    )
    return sock


def metric(url, name, **labels) -> float:
    _, _, text = request(url, "GET", "/metrics")
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))  # the exposition sorts them
    for line in text.splitlines():
        if line.startswith(name + ("{" + want + "}" if want else " ")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def wait_until(cond, seconds=10.0):
    deadline = time.monotonic() + seconds
    while not cond():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


def reason(result) -> str:
    """Runtime.generate's finish reason as OpenAI names it."""
    return "stop" if result.finish_reason == "eos" else "length"


def labels_of(result) -> dict:
    return {k: v.label for k, v in result.labels.items()}


def assert_labels(ext: dict, result) -> None:
    assert set(ext["labels"]) == set(result.labels)
    for k, v in result.labels.items():
        assert ext["labels"][k]["label"] == v.label
        assert ext["labels"][k]["score"] == pytest.approx(v.score, abs=1e-5)


@pytest.fixture(scope="module")
def srv(rt):
    with server(runtime=rt) as s:
        yield s


# ----------------------------------------------------------------------------- the engine alone


def test_merge_and_fit_align_rows_on_the_right():
    kv = [np.arange(2 * 1 * 3 * 2, dtype=np.float32).reshape(2, 1, 3, 2) + 1]
    a = State(np.array([[5], [6]]), np.array([[0, 1, 1], [1, 1, 1]]), np.array([[2], [3]]), kv)
    b = State(
        np.array([[7, 8, 9, 4, 4]]),
        np.array([[0, 1, 1, 1, 1]]),
        np.array([[0, 0, 1, 2, 3]]),
        [np.ones((1, 1, 5, 2), np.float32)],
    )
    m = merge(a, b, 0, 0, kv=True)
    assert m.mask.tolist() == [[0, 0, 1, 1], [0, 1, 1, 1], [1, 1, 1, 1]]  # width 4 = the longest row
    assert m.ids.tolist() == [[5], [6], [4]] and m.pos.tolist() == [[2], [3], [3]]
    assert m.past[0].shape == (3, 1, 4, 2)
    np.testing.assert_array_equal(m.past[0][:2, :, 1:], kv[0])  # a's columns, shifted right by one
    assert not m.past[0][:2, :, 0].any()
    np.testing.assert_array_equal(m.past[0][2], np.ones((1, 4, 2)))  # b's leading masked column cut
    # a backend with dummy past slots (TensorRT) keeps them in front of every row
    d = merge(a, b, 1, 0, kv=True)
    assert d.mask.shape == (3, 5) and not d.mask[:, 0].any() and d.past[0].shape[2] == 5
    # without a KV cache the ids and positions follow the mask
    s = fit(State(np.array([[3, 4]]), np.array([[1, 1]]), np.array([[0, 1]]), None), 4, 9, kv=False)
    assert s.ids.tolist() == [[9, 9, 3, 4]] and s.mask.tolist() == [[0, 0, 1, 1]] and s.pos.tolist() == [[0, 0, 0, 1]]
    # a newcomer takes row 0's slot in place: its row is replaced, the other row untouched
    keep1 = m.past[0][1].copy()
    put(m, [0], fit(b, 4, 0, kv=True))
    assert m.mask.tolist()[:2] == [[1, 1, 1, 1], [0, 1, 1, 1]] and m.ids[0, 0] == 4 and m.pos[0, 0] == 3
    np.testing.assert_array_equal(m.past[0][0], np.ones((1, 4, 2)))
    np.testing.assert_array_equal(m.past[0][1], keep1)


def test_prefix_rows_align_on_the_left():
    """The in-place layout: rows are prefixes, so fitting cuts or appends trailing columns."""
    kv = [np.arange(2 * 1 * 3 * 2, dtype=np.float32).reshape(2, 1, 3, 2) + 1]
    a = State(np.array([[5], [6]]), np.array([[1, 1, 0], [1, 1, 1]]), np.array([[1], [2]]), kv)
    b = State(np.array([[4]]), np.array([[1, 1, 1, 1, 0]]), np.array([[3]]), [np.ones((1, 1, 5, 2), np.float32)])
    m = merge(a, b, 0, 0, kv=True, prefix=True)
    assert m.mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]  # width 4 = the longest row
    np.testing.assert_array_equal(m.past[0][:2, :, :3], kv[0])  # a's columns where they were
    assert not m.past[0][:2, :, 3].any()
    np.testing.assert_array_equal(m.past[0][2], np.ones((1, 4, 2)))  # b's trailing masked column cut
    w = fit(m, 6, 0, kv=True, prefix=True)  # spare columns appended
    assert w.mask.shape == (3, 6) and not w.mask[:, 4:].any() and w.past[0].shape[2] == 6
    put(w, [0], fit(b, 6, 0, kv=True, prefix=True))
    assert w.mask[0].tolist() == [1, 1, 1, 1, 0, 0] and w.mask[1].tolist() == [1, 1, 1, 0, 0, 0]


def test_prefill_groups_bound_the_padding():
    jobs = [Job([1] * n, 4) for n in (40, 3, 400, 4, 38, 5, 44)]
    groups = [[len(j.ids) for j in g] for g in prefill_groups(jobs)]
    assert groups == [[3, 4, 5], [38, 40, 44], [400]]  # shortest first; a long prompt alone
    for g in groups:  # padded to the longest, within 25% of the real tokens
        assert len(g) * max(g) <= 1.25 * sum(g)
    assert sorted(n for g in groups for n in g) == sorted(len(j.ids) for j in jobs)


def test_text_tracker_holds_back_stop_prefixes():
    words = {1: "He", 2: "llo", 3: " wo", 4: "rld", 5: "!"}
    t = TextTracker(lambda ids: "".join(words[i] for i in ids), stops=("o w", "!!"))
    assert t.add(1, False) == ("He", False)
    assert t.add(2, False) == ("ll", False)  # "o" may start "o w"
    assert t.add(3, False) == ("", True)  # "Hello wo" holds the stop: cut before it
    assert t.emitted == "Hell"
    t = TextTracker(lambda ids: "".join(words[i] for i in ids), stops=("!!",))
    pieces = [t.add(i, i == 5)[0] for i in (1, 2, 3, 4, 5)]
    assert "".join(pieces) == "Hello world!" and pieces[-1] == "!"


@pytest.fixture(scope="module")
def rt_concat(tmp_path_factory, tiny_model_dir, tiny_backbone, cache_dir):
    """The serving artifact with the Concat KV cache (left padding; the default is in place)."""
    from export_helpers import serving_artifact

    root = tmp_path_factory.mktemp("serve-concat")
    art = serving_artifact(root, "art", tiny_backbone, tiny_model_dir, cache_dir, 96, False, ["--kv-cache", "concat"])
    return load(art[0], backend="cpu", threads=1)


@pytest.mark.parametrize("layout", ["inplace", "concat"])
def test_engine_rows_joining_and_leaving_give_what_each_gets_alone(request, layout):
    """Jobs arriving while others decode (different past lengths merged into one batch) get the
    tokens, text and labels Runtime.generate gives each prompt alone; seeded sampling too. Both
    KV-cache layouts: rows aligned on the right (Concat) and rows as prefixes (in place)."""
    rt = request.getfixturevalue("rt" if layout == "inplace" else "rt_concat")
    assert rt.manifest.graph.kv_update == layout
    rng = np.random.default_rng(0)
    words = "the quick brown fox jumps over lazy dog what is capital of france i hate this movie".split()
    prompts = [" ".join(rng.choice(words, rng.integers(1, 12))) for _ in range(16)]
    budgets = [int(b) for b in rng.integers(1, 40, len(prompts))]
    sampled = {3: 0.7, 8: 1.2}
    eng = Engine(runtime_on(rt, 0.001), max_batch=4).start()
    got = {i: [] for i in range(len(prompts))}
    try:
        for i, (p, b) in enumerate(zip(prompts, budgets)):
            s = Sampling(sampled[i], seed=5) if i in sampled else Sampling()
            eng.submit([Job(rt.encode(p)[0], b, sampling=s, incremental=True, sink=got[i].append)])
            time.sleep(0.004)
        wait_until(lambda: all(g and g[-1].done for g in got.values()), 30)
    finally:
        eng.stop()
    s = eng.stats  # rows joined by merge, by taking a finished row's slot, and the batch compacted
    assert s["merges"] > 0 and s["reused"] > 0 and s["compactions"] > 0 and s["max_rows"] > 1, s
    for i, (p, b) in enumerate(zip(prompts, budgets)):
        kw = dict(temperature=sampled[i], seed=5) if i in sampled else {}
        r = rt.generate(p, b, **kw)
        outs = got[i]
        assert [o.token_id for o in outs] == r.token_ids, i
        assert outs[-1].final_text == r.text == "".join(o.text for o in outs)
        assert outs[-1].finish_reason == r.finish_reason.replace("max_new_tokens", "max_tokens")
        assert {k: v.label for k, v in outs[0].labels.items()} == labels_of(r)


def test_engine_prefill_budget_applies_only_while_rows_decode(rt):
    """With no row decoding, every waiting job is prefilled at once; while rows decode, at most
    ``prefill_tokens`` prompt tokens join per iteration (one job at least)."""
    ids = [rt.encode(p)[0] for p in ("the quick brown fox", "what is the capital", "i hate this")]
    eng = Engine(runtime_on(rt, 0.002), max_batch=8, prefill_tokens=1).start()
    first, later = [[] for _ in ids], [[] for _ in ids]
    try:
        eng.submit([Job(list(x), 60, sink=g.append) for x, g in zip(ids, first)])
        wait_until(lambda: all(first), 10)
        assert eng.stats["admissions"] == 1 and eng.stats["admitted"] == 3, eng.stats
        eng.submit([Job(list(x), 2, sink=g.append) for x, g in zip(ids, later)])
        wait_until(lambda: all(g and g[-1].done for g in later), 10)
        assert not any(g[-1].done for g in first), "the first jobs ended before the budget was tested"
        assert eng.stats["admissions"] == 4 and eng.stats["admitted"] == 6, eng.stats  # one per iteration
        wait_until(lambda: all(g[-1].done for g in first), 30)
    finally:
        eng.stop()


# ----------------------------------------------------------------------------- the OpenAI API


def test_chat_and_completions_equal_the_runtime(srv, rt):
    c = client(srv.url)
    assert [m.id for m in c.models.list().data] == [MODEL]
    for i, p in enumerate(PROMPTS[:4]):
        n = 3 + 4 * i
        r = rt.generate(p, n)
        chat = c.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": p}],
            max_tokens=n,
            temperature=0,
            extra_body={"return_token_ids": True},
        )
        ch = chat.choices[0]
        assert ch.message.role == "assistant" and ch.message.content == r.text
        assert ch.finish_reason == reason(r) and ch.model_extra["token_ids"] == r.token_ids
        assert chat.model_extra["prompt_token_ids"] == rt.encode(p)[0]
        assert chat.usage.prompt_tokens == r.prompt_tokens and chat.usage.completion_tokens == n
        assert_labels(chat.model_extra["singlepass"], r)
        comp = c.completions.create(model=MODEL, prompt=p, max_tokens=n, temperature=0)
        assert comp.choices[0].text == r.text and comp.choices[0].finish_reason == reason(r)
        assert_labels(comp.model_extra["singlepass"], r)
    # the text-parts form of a user message, max_completion_tokens, the completions default of 16 tokens
    chat = c.chat.completions.create(
        model=MODEL,
        max_completion_tokens=4,
        temperature=0,
        messages=[{"role": "user", "content": [{"type": "text", "text": PROMPTS[0]}]}],
    )
    assert chat.choices[0].message.content == rt.generate(PROMPTS[0], 4).text
    comp = c.completions.create(model=MODEL, prompt=[PROMPTS[1]], temperature=0)
    assert comp.usage.completion_tokens == 16 and comp.choices[0].text == rt.generate(PROMPTS[1], 16).text
    # seeded sampling: the same result as Runtime.generate with the same seed, every time
    r = rt.generate(PROMPTS[2], 12, temperature=0.9, top_p=0.9, seed=7)
    for _ in range(2):
        out = c.completions.create(
            model=MODEL,
            prompt=PROMPTS[2],
            max_tokens=12,
            temperature=0.9,
            top_p=0.9,
            seed=7,
            extra_body={"return_token_ids": True},
        )
        assert out.choices[0].model_extra["token_ids"] == r.token_ids
    # chat without max_tokens: up to the artifact's limit (max_total_length - prompt tokens)
    n = rt.manifest.limits.max_total_length - r.prompt_tokens
    ids = rt.encode(PROMPTS[2])[0]
    out = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": PROMPTS[2]}], temperature=0)
    assert out.usage.completion_tokens == n == rt.manifest.limits.max_total_length - len(ids)
    assert out.choices[0].finish_reason == "length"


def test_eos_and_stop_strings(art, rt):
    rt2 = load(art, backend="cpu", threads=1)
    base = rt.generate(PROMPTS[3], 12)
    rt2.eos_ids = frozenset({base.token_ids[4]})
    with server(runtime=rt2) as s:
        out = client(s.url).completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=12, temperature=0)
        assert out.choices[0].finish_reason == "stop"
        assert out.usage.completion_tokens == base.token_ids.index(base.token_ids[4]) + 1
    # a stop string: the text ends before it, finish_reason stop, streamed or not
    kw = dict(temperature=1.5, seed=1)
    text = rt.generate("Hi", 30, **kw).text
    k = next(i for i in range(4, len(text) - 1) if "\ufffd" not in text[i : i + 2] and text[i : i + 2].isprintable())
    stop = text[k : k + 2]
    want = text[: text.index(stop)]
    assert want and len(want) < len(text)
    with server(runtime=rt) as s:
        c = client(s.url)
        out = c.completions.create(model=MODEL, prompt="Hi", max_tokens=30, stop=[stop, "zzzz"], **kw)
        assert out.choices[0].text == want and out.choices[0].finish_reason == "stop"
        assert out.usage.completion_tokens < 30
        chunks = list(c.completions.create(model=MODEL, prompt="Hi", max_tokens=30, stop=stop, stream=True, **kw))
        assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == want
        assert chunks[-1].choices[0].finish_reason == "stop"


def test_streaming_labels_first_then_text_then_done(srv, rt):
    c = client(srv.url)
    r = rt.generate(PROMPTS[0], 9)
    chunks = list(
        c.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": PROMPTS[0]}],
            max_tokens=9,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert_labels(chunks[0].model_extra["singlepass"], r)
    assert all("singlepass" not in ch.model_extra for ch in chunks[1:])
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == r.text
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 9
    assert len({ch.id for ch in chunks}) == 1
    comp = list(c.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=5, temperature=0, stream=True))
    assert_labels(comp[0].model_extra["singlepass"], rt.generate(PROMPTS[1], 5))
    assert "".join(ch.choices[0].text for ch in comp) == rt.generate(PROMPTS[1], 5).text
    # on the wire: server-sent events ending with data: [DONE]
    _, headers, text = request(
        srv.url,
        "POST",
        "/v1/completions",
        {"model": MODEL, "prompt": "Hi", "max_tokens": 2, "temperature": 0, "stream": True},
    )
    assert headers["content-type"].startswith("text/event-stream")
    events = [e for e in text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_moderations_are_the_prefill_labels(srv, rt):
    c = client(srv.url)
    mod = c.moderations.create(input=PROMPTS[:3])
    assert mod.model == MODEL and len(mod.results) == 3
    safety = rt.manifest.probe("safety")
    for p, res in zip(PROMPTS[:3], mod.results):
        r = rt.generate(p, 0)
        cats, scores = res.categories.to_dict(), res.category_scores.to_dict()
        assert cats == {"safety": r.labels["safety"].label == safety.label_names[1], "emotion": False}
        assert scores["safety"] == pytest.approx(r.labels["safety"].score, abs=1e-5)
        assert scores["emotion"] == pytest.approx(r.labels["emotion"].score, abs=1e-5)
        assert res.flagged == any(cats.values())
        assert_labels(res.model_extra["singlepass"], r)
    one = c.moderations.create(input=PROMPTS[4], model=MODEL)
    assert len(one.results) == 1


def test_block_policy_content_filter(art, rt):
    scores = {p: rt.generate(p, 0).labels["safety"].score for p in PROMPTS}
    lo, hi = min(scores.values()), max(scores.values())
    assert hi > lo
    thr = (lo + hi) / 2
    bad, good = max(scores, key=scores.get), min(scores, key=scores.get)
    blocking = load(art, backend="cpu", threads=1, policy={"safety": f"block:{thr}"}, refusal="No.")
    with server(runtime=blocking) as s:
        c = client(s.url)
        out = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": bad}], max_tokens=5)
        assert out.choices[0].finish_reason == "content_filter" and out.choices[0].message.content == "No."
        assert out.model_extra["singlepass"]["blocked_by"] == "safety" and out.usage.completion_tokens == 0
        assert out.model_extra["singlepass"]["labels"]["safety"]["score"] == pytest.approx(scores[bad], abs=1e-5)
        chunks = list(
            c.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": bad}], max_tokens=5, stream=True
            )
        )
        assert chunks[0].model_extra["singlepass"]["blocked_by"] == "safety"
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == "No."
        assert chunks[-1].choices[0].finish_reason == "content_filter"
        ok = c.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": good}], max_tokens=3, temperature=0
        )
        assert ok.choices[0].finish_reason == "length" and "blocked_by" not in ok.model_extra["singlepass"]
        mod = c.moderations.create(input=[bad, good])
        assert [m.flagged for m in mod.results] == [True, False]
        assert metric(s.url, "singlepass_blocks_total", probe="safety") == 2
        assert metric(s.url, "singlepass_requests_total", endpoint="/v1/chat/completions", outcome="blocked") == 2


# ----------------------------------------------------------------------------- guard-then-serve


def tiny_guard(folder: Path, tokenizer_json: Path, flag: str, safe: list[str]) -> Path:
    """A tiny classifier folder as ``benchmarks/guards.py``'s ClassifierGuard reads it (config.json,
    model.onnx, tokenizer.json): P(unsafe) = sigmoid(the largest per-token weight over the prompt),
    +6 for the tokens of ``flag`` that no ``safe`` text has, -6 for every other token."""
    import shutil

    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    tok.no_padding()
    bad = set(tok.encode(flag).ids) - {i for t in safe for i in tok.encode(t).ids}
    assert bad, "the flag word shares all its tokens with the safe texts"
    w = np.full((tok.get_vocab_size(), 1), -6.0, np.float32)
    w[sorted(bad)] = 6.0
    nodes = [
        helper.make_node("Gather", ["w", "input_ids"], ["g"]),  # [B, T, 1]
        helper.make_node("Squeeze", ["g", "axis"], ["s"]),  # [B, T]
        helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
        helper.make_node("Sub", ["m", "one"], ["off"]),  # 0 on tokens, -1 on padding
        helper.make_node("Mul", ["off", "big"], ["pen"]),
        helper.make_node("Add", ["s", "pen"], ["x"]),
        helper.make_node("ReduceMax", ["x"], ["top"], axes=[1], keepdims=0),  # [B]
        helper.make_node("Sigmoid", ["top"], ["prob"]),
    ]
    inits = [
        numpy_helper.from_array(w, "w"),
        numpy_helper.from_array(np.array([2], np.int64), "axis"),
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
        numpy_helper.from_array(np.array(100.0, np.float32), "big"),
    ]
    ids = [helper.make_tensor_value_info(n, TensorProto.INT64, ["B", "T"]) for n in ("input_ids", "attention_mask")]
    prob = helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["B"])
    model = helper.make_model(
        helper.make_graph(nodes, "tiny_guard", ids, [prob], inits), opset_imports=[helper.make_opsetid("", 17)]
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    folder.mkdir(parents=True)
    onnx.save(model, str(folder / "model.onnx"))
    shutil.copy2(tokenizer_json, folder / "tokenizer.json")
    cfg = {"format": "singlepass-guard", "version": 1, "kind": "classifier", "name": "tiny", "threshold": 0.5}
    (folder / "config.json").write_text(
        json.dumps({**cfg, "max_length": 64, "inputs": ["input_ids", "attention_mask"]})
    )
    return folder


def test_guard_then_serve_refuses_before_the_engine(rt, tiny_model_dir, tmp_path):
    """``--guard DIR``: the classifier scores the user's text first; a flagged prompt gets the
    refusal (content_filter, blocked_by guard) and never reaches the engine; the others are served
    as without a guard, the guard's label beside the probes'."""
    from singlepass.benchmarks.guards import ClassifierGuard

    bad, safe = PROMPTS[4], [p for p in PROMPTS if p != PROMPTS[4]]
    folder = tiny_guard(tmp_path / "guard", tiny_model_dir / "tokenizer.json", "dangerous", safe)
    assert ClassifierGuard(folder, threads=1)([bad, *safe]).tolist() == [True] + [False] * len(safe)
    with server(runtime=rt, guard=str(folder), guard_threads=1) as s:
        c = client(s.url)
        out = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": bad}], max_tokens=5)
        ch, ext = out.choices[0], out.model_extra["singlepass"]
        assert ch.finish_reason == "content_filter" and ch.message.content == DEFAULT_REFUSAL
        assert ext["blocked_by"] == "guard" and out.usage.completion_tokens == 0
        assert list(ext["labels"]) == ["guard"] and ext["labels"]["guard"]["label"] == "unsafe"
        assert ext["labels"]["guard"]["score"] > 0.99
        chunks = list(
            c.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": bad}], max_tokens=5, stream=True
            )
        )
        assert chunks[0].model_extra["singlepass"]["blocked_by"] == "guard"
        assert "".join(x.choices[0].delta.content or "" for x in chunks) == DEFAULT_REFUSAL
        assert chunks[-1].choices[0].finish_reason == "content_filter"
        comp = c.completions.create(model=MODEL, prompt=bad, max_tokens=5)
        assert comp.choices[0].finish_reason == "content_filter" and comp.choices[0].text == DEFAULT_REFUSAL
        r = rt.generate(safe[0], 3)
        ok = c.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": safe[0]}], max_tokens=3, temperature=0
        )
        ext = ok.model_extra["singlepass"]
        assert ok.choices[0].message.content == r.text and ok.choices[0].finish_reason == "length"
        assert "blocked_by" not in ext and set(ext["labels"]) == {"safety", "emotion", "guard"}
        assert ext["labels"]["guard"]["label"] == "safe" and ext["labels"]["guard"]["score"] < 0.01
        assert ext["labels"]["safety"]["label"] == r.labels["safety"].label
        assert s.st.engine.stats["admitted"] == 1  # the refused prompts never reached the engine
        assert s.st.guard.stats["scored"] == 4 and s.st.guard.stats["flagged"] == 3
        assert c.models.list().data[0].model_extra["singlepass"]["guard"]["threshold"] == 0.5
        mod = c.moderations.create(input=bad)  # moderations report the probes only
        assert set(mod.results[0].categories.to_dict()) == {"safety", "emotion"}
        assert metric(s.url, "singlepass_blocks_total", probe="guard") == 3
        assert metric(s.url, "singlepass_guard_seconds_count") == 4
        assert metric(s.url, "singlepass_requests_total", endpoint="/v1/chat/completions", outcome="blocked") == 2
    bad_dir = tmp_path / "empty"
    bad_dir.mkdir()
    with pytest.raises(SinglepassError, match="not a guard folder"):
        check_folder(bad_dir)


class StandIn:
    """A guard without a model: P(unsafe) 1 for "dangerous", 0 else; "boom" fails; the first call
    waits for ``gate`` (so the test can queue prompts behind it)."""

    threshold = 0.5

    def __init__(self):
        self.batches: list[list[str]] = []
        self.gate, self.entered = threading.Event(), threading.Event()

    def score(self, texts):
        self.batches.append(list(texts))
        self.entered.set()
        assert self.gate.wait(30), "the test never opened the gate"
        if any("boom" in t for t in texts):
            raise RuntimeError("secret guard detail")
        return np.array([float("dangerous" in t) for t in texts])


def test_guard_stage_batches_waiting_prompts_and_survives_a_failure(rt):
    guard = StandIn()
    with server(runtime=rt, hook=lambda st: setattr(st, "scorer", guard)) as s:
        results = {}

        def call(i, prompt):
            body = {"model": MODEL, "prompt": prompt, "max_tokens": 2, "temperature": 0}
            results[i] = request(s.url, "POST", "/v1/completions", body)

        prompts = PROMPTS[:6]
        threads = [threading.Thread(target=call, args=(0, prompts[0]))]
        threads[0].start()
        assert guard.entered.wait(10)  # the first prompt holds the guard
        threads += [threading.Thread(target=call, args=(i, p)) for i, p in enumerate(prompts) if i]
        for t in threads[1:]:
            t.start()
        wait_until(lambda: len(s.st.guard._waiting) == 5)
        guard.gate.set()
        for t in threads:
            t.join(30)
        assert [len(b) for b in guard.batches] == [1, 5]  # the five waiting ones in one guard pass
        for i, p in enumerate(prompts):
            status, _, body = results[i]
            assert status == 200, body
            want = "content_filter" if "dangerous" in p else "length"
            assert body["choices"][0]["finish_reason"] == want, p
        assert s.st.engine.stats["admitted"] == 5
        status, _, err = request(s.url, "POST", "/v1/completions", {"model": MODEL, "prompt": "boom", "max_tokens": 2})
        assert status == 500 and "secret" not in json.dumps(err)
        status, _, body = request(s.url, "POST", "/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 2})
        assert status == 200 and body["usage"]["completion_tokens"] == 2


def test_ignore_eos_generates_the_whole_budget(art):
    """``--ignore-eos``: EOS does not end a request (fixed work); the tokens are the runtime's with
    ``ignore_eos=True``."""
    ref = load(art, backend="cpu", threads=1, ignore_eos=True).generate(PROMPTS[3], 12)
    rt2 = load(art, backend="cpu", threads=1)
    rt2.eos_ids = frozenset({ref.token_ids[4]})  # an EOS the greedy continuation meets early
    with server(runtime=rt2, ignore_eos=True) as s:
        out = client(s.url).completions.create(
            model=MODEL, prompt=PROMPTS[3], max_tokens=12, temperature=0, extra_body={"return_token_ids": True}
        )
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 12
    assert out.choices[0].model_extra["token_ids"] == ref.token_ids


# ----------------------------------------------------------------------------- continuous batching


def test_32_concurrent_clients_each_get_their_sequential_result(rt):
    rng = np.random.default_rng(1)
    words = "the quick brown fox jumps over lazy dog what is capital of france i hate this movie".split()
    jobs = []
    for i in range(32):
        prompt = " ".join(rng.choice(words, int(rng.integers(1, 14))))
        jobs.append((prompt, int(rng.integers(1, 30)), i % 3 == 0, i % 4 == 1))  # prompt, max_tokens, stream, chat
    want = [rt.generate(p, n) for p, n, _, _ in jobs]  # sequential, one prompt at a time
    slow = runtime_on(rt, delay=0.002)
    with server(runtime=slow, max_batch=8) as s:

        async def one(ac, prompt, n, stream, chat):
            kw = dict(model=MODEL, max_tokens=n, temperature=0, extra_body={"return_token_ids": True})
            if chat:
                kw["messages"] = [{"role": "user", "content": prompt}]
                call = ac.chat.completions.create
            else:
                kw["prompt"] = prompt
                call = ac.completions.create
            if not stream:
                out = await call(**kw)
                ch = out.choices[0]
                return (
                    out.id,
                    ch.message.content if chat else ch.text,
                    ch.model_extra["token_ids"],
                    out.model_extra["singlepass"],
                    ch.finish_reason,
                )
            parts, ids, ext, reason, rid = [], [], None, None, set()
            async for chunk in await call(stream=True, **kw):
                rid.add(chunk.id)
                ext = ext or chunk.model_extra.get("singlepass")
                for c in chunk.choices:
                    parts.append((c.delta.content or "") if chat else c.text)
                    ids += c.model_extra.get("token_ids") or []
                    reason = c.finish_reason or reason
            assert len(rid) == 1
            return rid.pop(), "".join(parts), ids, ext, reason

        async def everyone():
            ac = openai.AsyncOpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=60)
            try:
                return await asyncio.gather(*(one(ac, *j) for j in jobs))
            finally:
                await ac.close()

        got = asyncio.run(everyone())
        stats = s.st.engine.stats

        def ok() -> float:
            return sum(
                metric(s.url, "singlepass_requests_total", endpoint=e, outcome="ok")
                for e in ("/v1/chat/completions", "/v1/completions")
            )

        # the server records a request after its last byte is sent, the engine its gauges after the
        # pass that sent the last token: a client can see its answer a moment before either
        wait_until(lambda: ok() >= 32)
        wait_until(
            lambda: metric(s.url, "singlepass_queue_depth") == metric(s.url, "singlepass_running_sequences") == 0
        )
        count = ok()
        _, _, text = request(s.url, "GET", "/metrics")
    assert len(got) == 32 and len({g[0] for g in got}) == 32 and count == 32  # each answered exactly once
    assert not re.search(r'outcome="(error|timeout|unavailable)"', text)
    for (prompt, *_), r, (_, out_text, ids, ext, finish) in zip(jobs, want, got):
        assert ids == r.token_ids and out_text == r.text and finish == reason(r), prompt
        assert_labels(ext, r)
    # 32 jobs over 8 rows: newcomers joined a batch in flight (into freed slots or appended), in
    # several admissions (how many of each depends on when the requests arrive)
    assert stats["reused"] + stats["merges"] > 0 and stats["admissions"] > 1
    assert 1 < stats["max_rows"] <= 8 and stats["admitted"] == 32


def test_queue_full_is_429_at_once(rt):
    slow = runtime_on(rt)
    backend = slow.backend
    with server(runtime=slow, max_batch=1, max_queue=1) as s:
        backend.gate.clear()  # passes wait here
        results = {}

        def call(name):
            results[name] = request(
                s.url, "POST", "/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 3, "temperature": 0}
            )

        threads = [threading.Thread(target=call, args=(name,)) for name in "ab"]
        threads[0].start()
        wait_until(lambda: backend.calls == 1)  # the first request holds the only row (its prefill waits)
        threads[1].start()
        wait_until(lambda: s.st.engine.counts()[0] == 1)  # the second one waits in the queue
        t0 = time.monotonic()
        with pytest.raises(openai.RateLimitError) as e:
            client(s.url).completions.create(model=MODEL, prompt="Hi", max_tokens=3)
        assert time.monotonic() - t0 < 5
        assert e.value.status_code == 429 and "--max-queue 1" in e.value.message
        assert e.value.response.headers["retry-after"] == "1"
        assert metric(s.url, "singlepass_queue_depth") == 1
        backend.gate.set()
        for t in threads:
            t.join(30)
        assert results["a"][0] == 200 and results["b"][0] == 200
        assert metric(s.url, "singlepass_requests_total", endpoint="/v1/completions", outcome="queue_full") == 1


def test_disconnects_and_timeouts_free_their_rows(rt):
    slow = runtime_on(rt, delay=0.01)
    with server(runtime=slow, timeout=0.6) as s:
        host, port = s.url.removeprefix("http://").split(":")
        sock = raw_post(
            host, port, {"model": MODEL, "prompt": "Hi", "max_tokens": 400, "temperature": 0, "stream": True}
        )
        got = b""
        while b"data: " not in got:
            got += sock.recv(4096)
        assert got.startswith(b"HTTP/1.1 200")
        wait_until(lambda: s.st.engine.counts()[1] == 1)
        passes = slow.backend.passes
        sock.close()  # the client leaves mid-stream
        wait_until(lambda: s.st.engine.counts() == (0, 0), 5)
        assert slow.backend.passes - passes < 100  # it did not generate the other ~400 tokens
        wait_until(
            lambda: metric(s.url, "singlepass_requests_total", endpoint="/v1/completions", outcome="cancelled") == 1, 5
        )
        # a non-streaming client that leaves
        sock = raw_post(host, port, {"model": MODEL, "prompt": "Hi", "max_tokens": 400, "temperature": 0})
        wait_until(lambda: s.st.engine.counts()[1] == 1)
        sock.close()
        wait_until(lambda: s.st.engine.counts() == (0, 0), 5)
        wait_until(
            lambda: metric(s.url, "singlepass_requests_total", endpoint="/v1/completions", outcome="cancelled") == 2, 5
        )
        # the per-request timeout: 504 with a clear message, the row freed; a stream gets an error event
        t0 = time.monotonic()
        status, _, err = request(
            s.url, "POST", "/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 400, "temperature": 0}
        )
        assert status == 504 and "within 0.6 s (--timeout)" in err["error"]["message"]
        assert time.monotonic() - t0 < 3
        wait_until(lambda: s.st.engine.counts() == (0, 0), 5)
        with pytest.raises(openai.APIError, match="--timeout"):
            for _ in client(s.url).chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=400, temperature=0, stream=True
            ):
                pass
        wait_until(lambda: s.st.engine.counts() == (0, 0), 5)
        assert metric(s.url, "singlepass_requests_total", endpoint="/v1/completions", outcome="timeout") == 1
        assert metric(s.url, "singlepass_requests_total", endpoint="/v1/chat/completions", outcome="timeout") == 1
        # the server still serves
        out = client(s.url).completions.create(model=MODEL, prompt="Hi", max_tokens=2, temperature=0)
        assert out.choices[0].text == rt.generate("Hi", 2).text


# ----------------------------------------------------------------------------- security and bad input


def test_api_key(rt):
    with server(runtime=rt, api_key="s3cret") as s:
        with pytest.raises(openai.AuthenticationError) as e:
            client(s.url, key="wrong").models.list()
        assert e.value.status_code == 401 and "invalid API key" in e.value.message
        status, headers, body = request(s.url, "GET", "/v1/models")
        assert status == 401 and "Authorization: Bearer" in body["error"]["message"]
        assert headers["www-authenticate"] == "Bearer"
        for path in ("/metrics", "/docs", "/openapi.json"):
            assert request(s.url, "GET", path)[0] == 401
        status, _, body = request(s.url, "POST", "/v1/completions", {"model": MODEL, "prompt": "Hi"})
        assert status == 401
        assert request(s.url, "GET", "/health")[0] == 200  # no key needed
        ok = client(s.url, key="s3cret")
        assert ok.completions.create(model=MODEL, prompt="Hi", max_tokens=2, temperature=0).usage.completion_tokens == 2
        assert request(s.url, "GET", "/metrics", headers={"Authorization": "Bearer s3cret"})[0] == 200


BAD = [  # (path, body, status, param or None, words the message must contain)
    ("/v1/chat/completions", {"model": MODEL}, 422, "messages", ["messages", "required"]),
    (
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "temperature": "hot"},
        422,
        "temperature",
        ["temperature"],
    ),
    (
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "temperature": 3},
        422,
        "temperature",
        ["temperature", "2"],
    ),
    (
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "n": 2},
        400,
        "n",
        ["'n'", "n=1"],
    ),
    (
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "logprobs": True},
        400,
        "logprobs",
        ["logprobs"],
    ),
    (
        "/v1/chat/completions",
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Hi"}],
            "tools": [{"type": "function", "function": {"name": "f"}}],
        },
        400,
        "tools",
        ["tool"],
    ),
    (
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "frobnicate": 1},
        400,
        "frobnicate",
        ["unsupported field", "frobnicate"],
    ),
    (
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]},
        400,
        "messages[0].role",
        ["'system' messages are not supported"],
    ),
    (
        "/v1/chat/completions",
        {
            "model": MODEL,
            "messages": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "Bye"},
            ],
        },
        400,
        "messages",
        ["3 messages", "one user message"],
    ),
    (
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "assistant", "content": "Hi"}]},
        400,
        "messages[0].role",
        ["'user'"],
    ),
    (
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "Hi", "name": "bob"}]},
        400,
        "messages[0].name",
        ["messages[0].name"],
    ),
    (
        "/v1/chat/completions",
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}],
        },
        400,
        "messages[0].content[0]",
        ["text parts"],
    ),
    (
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "  "}]},
        400,
        "messages[0].content",
        ["empty"],
    ),
    (
        "/v1/chat/completions",
        {"model": "gpt-4o", "messages": [{"role": "user", "content": "Hi"}]},
        404,
        "model",
        ["'gpt-4o' does not exist", MODEL],
    ),
    (
        "/v1/completions",
        {"model": MODEL, "prompt": "Hi", "max_tokens": 100000},
        400,
        "max_tokens",
        ["max_tokens=100000", "limits.max_total_length"],
    ),
    ("/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": -1}, 422, "max_tokens", ["max_tokens"]),
    ("/v1/completions", {"model": MODEL, "prompt": ["a", "b"]}, 400, "prompt", ["2 prompts"]),
    ("/v1/completions", {"model": MODEL, "prompt": [1, 2, 3]}, 422, None, ["prompt"]),
    ("/v1/completions", {"model": MODEL, "prompt": "Hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", ["4"]),
    ("/v1/completions", {"model": MODEL, "prompt": "Hi", "echo": True}, 400, "echo", ["echo"]),
    ("/v1/completions", {"model": MODEL, "prompt": "Hi", "seed": -3}, 422, "seed", ["seed"]),
    (
        "/v1/completions",
        {"model": MODEL, "prompt": "Hi", "stream_options": {"include_usage": True}},
        400,
        "stream_options",
        ["stream: true"],
    ),
    ("/v1/moderations", {"input": []}, 400, "input", ["non-empty"]),
    ("/v1/moderations", {"input": ["ok", ""]}, 400, "input[1]", ["input[1]", "empty"]),
    ("/v1/moderations", {"input": "Hi", "model": "omni-moderation-latest"}, 404, "model", ["does not exist"]),
    ("/v1/moderations", [1, 2], 422, None, ["dictionary"]),
]


def test_bad_inputs_get_clear_errors(srv, rt):
    for path, body, status, param, words in BAD:
        got, _, err = request(srv.url, "POST", path, body)
        assert got == status, (path, body, err)
        e = err["error"]
        assert e["type"] and (param is None or e["param"] == param), (body, e)
        for w in words:
            assert w in e["message"], (body, e["message"])
    # a prompt over the artifact's limit: its token count and the limit
    long = "The quick brown fox jumps over the lazy dog. " * 20
    n = len(rt.tokenizer.encode(long, 10**9)[0])
    got, _, err = request(
        srv.url, "POST", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": long}]}
    )
    assert got == 400 and f"is {n} tokens" in err["error"]["message"] and "limit is 96" in err["error"]["message"]
    # invalid JSON, an unknown path, a method not allowed
    got, _, err = request(srv.url, "POST", "/v1/completions", raw=b'{"model": "art", "prompt": ')
    assert got == 400 and "not valid JSON" in err["error"]["message"]
    assert request(srv.url, "GET", "/v1/nothing")[0] == 404
    assert request(srv.url, "GET", "/v1/completions")[0] == 405
    # the openai client surfaces the message
    with pytest.raises(openai.BadRequestError, match="n=1"):
        client(srv.url).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], n=3)


def test_body_limit_and_no_stack_traces(rt):
    flaky = runtime_on(rt)
    original = flaky.tokenizer.encode

    def encode(text, *a, **kw):
        if text == "boom":
            raise RuntimeError("secret tokenizer detail")
        return original(text, *a, **kw)

    flaky.tokenizer.encode = encode
    with server(runtime=flaky, max_body_bytes=2000) as s:
        big = {"model": MODEL, "prompt": "x" * 3000}
        got, _, err = request(s.url, "POST", "/v1/completions", big)
        assert got == 413 and "2000 bytes" in err["error"]["message"]
        # chunked, without a Content-Length
        host, port = s.url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        conn.request(
            "POST",
            "/v1/completions",
            body=iter([json.dumps(big).encode()]),
            headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"},
            encode_chunked=True,
        )
        assert conn.getresponse().status == 413
        conn.close()
        # a crash in a handler and a failing backend pass: 500 without details, the server goes on
        got, _, err = request(s.url, "POST", "/v1/completions", {"model": MODEL, "prompt": "boom"})
        assert got == 500 and err["error"]["message"] == "internal server error (see the server log)"
        flaky.backend.fail = 1
        got, _, err = request(s.url, "POST", "/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 3})
        assert got == 500 and "secret" not in json.dumps(err) and "Traceback" not in json.dumps(err)
        flaky.backend.fail = 1
        chunks = request(s.url, "POST", "/v1/completions", {"model": MODEL, "prompt": "Hi", "stream": True})
        assert chunks[0] == 500 and "secret" not in json.dumps(chunks[2])
        got, _, out = request(
            s.url, "POST", "/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 3, "temperature": 0}
        )
        assert got == 200 and out["choices"][0]["text"] == rt.generate("Hi", 3).text
        assert metric(s.url, "singlepass_requests_total", endpoint="/v1/completions", outcome="too_large") == 2


# ----------------------------------------------------------------------------- service endpoints


def test_health_is_503_until_loaded_and_metrics(rt):
    release = threading.Event()

    def hold(st):
        load_now = st.load
        st.load = lambda: (release.wait(20), load_now())

    with server(runtime=rt, wait=False, hook=hold) as s:
        status, _, body = request(s.url, "GET", "/health")
        assert status == 503 and body["status"] == "loading"
        status, _, body = request(s.url, "POST", "/v1/completions", {"model": MODEL, "prompt": "Hi"})
        assert status == 503 and "loading" in body["error"]["message"]
        release.set()
        wait_until(lambda: request(s.url, "GET", "/health")[0] == 200)
        client(s.url).completions.create(model=MODEL, prompt="Hi", max_tokens=4, temperature=0)
        client(s.url).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2, temperature=0
        )
        r = rt.generate("Hi", 4)
        assert metric(s.url, "singlepass_generated_tokens_total") == 6
        assert metric(s.url, "singlepass_prompt_tokens_total") == 2 * r.prompt_tokens
        assert metric(s.url, "singlepass_time_to_first_token_seconds_count") == 2
        assert metric(s.url, "singlepass_request_latency_seconds_count", endpoint="/v1/completions") == 2
        assert metric(s.url, "singlepass_labels_total", probe="safety", label=r.labels["safety"].label) == 2
        assert metric(s.url, "singlepass_requests_total", endpoint="/health", outcome="unavailable") >= 1
        assert metric(s.url, "singlepass_requests_total", endpoint="/v1/completions", outcome="unavailable") == 1
        # engine time by phase: 2 prompts prefilled, 4 tokens from decode passes (6 - the 2 first tokens)
        assert metric(s.url, "singlepass_engine_tokens_total", phase="prefill") == 2 * r.prompt_tokens
        assert metric(s.url, "singlepass_engine_tokens_total", phase="decode") == 4
        assert metric(s.url, "singlepass_engine_seconds_total", phase="decode") > 0
        assert metric(s.url, "singlepass_engine_seconds_total", phase="prefill") > 0
        from singlepass.benchmarks.serve_load import engine_counters

        counts = engine_counters(request(s.url, "GET", "/metrics", raw=None)[2])
        assert counts["tokens:decode"] == 4 and counts["seconds:prefill"] > 0


def test_cli_serve_subprocess(art, tmp_path):
    """The real command: a subprocess on a free port, the key from the environment, no fastapi
    imported by `import singlepass` or `singlepass --help`, a graceful shutdown on SIGTERM."""
    code = (
        "import sys, singlepass, singlepass.cli as c\n"
        "try:\n    c.main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'fastapi', 'uvicorn', 'starlette', "
        "'prometheus_client', 'torch', 'ray'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == 0 and out.stdout.strip().splitlines()[-1] == "[]", out.stderr
    env = {**os.environ, "SINGLEPASS_API_KEY": "k"}
    cmd = [sys.executable, "-m", "singlepass.cli", "serve"]
    bad = subprocess.run(cmd + [str(tmp_path)], capture_output=True, text=True, timeout=60, env=env)
    assert bad.returncode == 2 and "manifest.json is missing" in bad.stderr
    args = [str(art), "--port", "0", "--threads", "1", "--policy", "safety=block:0.99"]
    proc = subprocess.Popen(cmd + args, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    lines = [proc.stderr.readline()]
    drain = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    drain.start()
    try:
        url = re.search(r"http://[\d.]+:\d+", lines[0]).group(0)
        wait_until(lambda: request(url, "GET", "/health")[0] == 200, 30)
        assert request(url, "GET", "/v1/models")[0] == 401
        c = client(url, key="k")
        messages = [{"role": "user", "content": "Hi"}]
        out = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=3, temperature=0)
        assert out.usage.completion_tokens == 3
        assert set(out.model_extra["singlepass"]["labels"]) == {"safety", "emotion"}
        assert c.models.list().data[0].model_extra["singlepass"]["policy"]["safety"] == "block"
    finally:
        proc.terminate()
        rc = proc.wait(20)
        drain.join(5)
    # uvicorn shuts down gracefully, then re-raises the signal (the exit status of a SIGTERM)
    assert rc in (0, -15) and "Application shutdown complete" in "".join(lines), lines


def test_schemathesis_finds_no_server_error(srv, tmp_path):
    """A short property-based run over the OpenAPI schema: no input gives a 5xx."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.configuration import set_hypothesis_home_dir

    set_hypothesis_home_dir(tmp_path / "hypothesis")  # its caches, not in the checkout

    schema = schemathesis.openapi.from_dict(srv.app.openapi())
    failures, statuses = [], []
    deadline = time.monotonic() + 60  # a bound (a hang), not a budget: the examples take a few seconds
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/moderations", "/v1/models/{model_id}"):
        for method in schema[path]:
            strategy = schema[path][method].as_strategy()

            @settings(
                max_examples=25,
                deadline=None,
                phases=[Phase.generate],
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            @given(strategy)
            def check(case):
                if time.monotonic() > deadline:
                    return
                if isinstance(case.body, dict):
                    if "model" in case.body and len(statuses) % 2:  # half of them reach the engine
                        case.body["model"] = MODEL
                    for k in ("max_tokens", "max_completion_tokens"):
                        if isinstance(case.body.get(k), int):
                            case.body[k] = min(case.body[k], 8)
                resp = case.call(base_url=srv.url, timeout=20)
                statuses.append(resp.status_code)
                if resp.status_code >= 500:
                    failures.append((case.method, case.path, case.body, resp.status_code, resp.text[:200]))

            check()
    assert not failures, failures[:3]
    assert len(statuses) >= 20 and 200 in statuses, statuses


def test_the_server_loads_the_artifact_without_the_memory_arena(art):
    """``singlepass serve`` opens its session without ONNX Runtime's CPU memory arena (which keeps the memory
    of every batch size and width served); ``--memory-arena`` keeps it; ``load`` keeps it by default."""
    from singlepass.serve.commands import register

    def arena(rt) -> bool:
        return rt.backend.session.get_session_options().enable_cpu_mem_arena

    assert arena(load(art, backend="cpu", threads=1)) is True
    for opts, want in (({}, False), ({"memory_arena": True}, True)):
        with server(artifact=str(art), backend="cpu", threads=1, **opts) as s:
            assert s.st.ready and arena(s.st.runtime) is want
            out = client(s.url).completions.create(model=MODEL, prompt="Hi", max_tokens=3, temperature=0)
            assert out.choices[0].text == load(art, backend="cpu", threads=1).generate("Hi", 3).text
    import argparse

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    assert parser.parse_args(["serve", "x"]).memory_arena is False
    assert parser.parse_args(["serve", "x", "--memory-arena"]).memory_arena is True
