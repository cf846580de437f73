"""`singlepass serve --ray`: the Ray Serve application on a real local Ray cluster that the tests
start (the real command in a subprocess), two replicas on this machine, driven by the official
openai client and plain HTTP on loopback: the same greedy tokens and labels as the runtime (and so
as the plain server, whose tests check that equality), requests spread over both replicas, the
label policy's content_filter, SSE streaming, per-replica and cluster-wide (Ray) metrics; a
replica killed under a bounded load: every request is answered or gets an explicit error (a 503,
or a final error event on a stream), nothing is cut silently or hangs, and Ray replaces the
replica. Also the config file (against Ray's own schema), the application builder's arguments and
the artifact fingerprint check, without a cluster."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import openai
import pytest
import yaml
from test_serve import MODEL, PROMPTS, assert_labels, client, reason, request, wait_until

from singlepass.benchmarks.serve_ray import health_replicas
from singlepass.errors import SinglepassError
from singlepass.runtime.api import load

REPO = Path(__file__).resolve().parents[1]
START = 150  # seconds for a local cluster and its replicas to come up on 2 busy cores


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def ray_server(artifact, *extra: str):
    """``singlepass serve ART --ray ...`` in a subprocess (its own local Ray cluster) -> namespace(url,
    metrics (Ray's Prometheus endpoint), lines (its stderr so far)); stopped with SIGTERM."""
    port, mport = free_port(), free_port()
    cmd = [sys.executable, "-m", "singlepass.cli", "serve", str(artifact), "--ray", "--port", str(port)]
    cmd += ["--ray-metrics-port", str(mport), *extra]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env, cwd=REPO)
    lines: list[str] = []
    drain = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    drain.start()
    try:
        deadline = time.monotonic() + START
        while not any("singlepass serve --ray: ready" in ln for ln in lines):
            assert proc.poll() is None, "".join(lines)[-3000:]
            assert time.monotonic() < deadline, "the Ray application did not come up:\n" + "".join(lines)[-3000:]
            time.sleep(0.2)
        yield SimpleNamespace(url=f"http://127.0.0.1:{port}", metrics=f"http://127.0.0.1:{mport}", lines=lines)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
            subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "stop", "--force"], capture_output=True)
        drain.join(5)


# ----------------------------------------------------------------------------- a tiny artifact, two replicas


@pytest.fixture(scope="module")
def art(serve_art):
    return serve_art


@pytest.fixture(scope="module")
def rt(art):
    return load(art, backend="cpu", threads=1)


@pytest.fixture(scope="module")
def blocking(rt):
    """An emotion rule that blocks some of PROMPTS and not others (from the runtime's own labels)."""
    got = [rt.generate(p, 1).labels["emotion"].label for p in PROMPTS]
    label = next((x for x in got if 0 < got.count(x) < len(got)), None)
    assert label is not None, f"the tiny emotion probe gives {got}: no label separates the prompts"
    return label, [x == label for x in got]


@pytest.fixture(scope="module")
def cluster(art, blocking):
    args = ["--replicas", "2", "--replica-cpus", "1", "--threads", "1", "--policy", f"emotion=block:{blocking[0]}"]
    with ray_server(art, *args) as s:
        yield s


def test_two_replicas_serve_what_the_runtime_serves(cluster, rt, blocking):
    """Greedy tokens, text, labels and finish reasons equal Runtime.generate's (and so the plain
    server's); blocked prompts get content_filter; requests land on both replicas."""
    c = client(cluster.url)
    seen = set()
    for prompt, blocked in zip(PROMPTS * 3, blocking[1] * 3):
        want = rt.generate(prompt, 12)
        raw = c.completions.with_raw_response.create(
            model=MODEL, prompt=prompt, max_tokens=12, temperature=0, extra_body={"return_token_ids": True}
        )
        seen.add(raw.headers["x-singlepass-replica"])
        out = raw.parse()
        ch = out.choices[0]
        assert_labels(out.model_extra["singlepass"], want)
        if blocked:
            assert ch.finish_reason == "content_filter" and out.model_extra["singlepass"]["blocked_by"] == "emotion"
        else:
            assert ch.model_extra["token_ids"] == want.token_ids and ch.text == want.text
            assert ch.finish_reason == reason(want)
    assert len(seen) == 2, f"every request went to {seen}"


def test_streaming_through_the_ray_proxy(cluster, rt, blocking):
    c = client(cluster.url)
    for prompt, blocked in zip(PROMPTS, blocking[1]):
        want = rt.generate(prompt, 10)
        chunks = list(
            c.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=10, temperature=0, stream=True
            )
        )
        assert_labels(chunks[0].model_extra["singlepass"], want)  # the labels ride on the first chunk
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
        assert finish == ["content_filter" if blocked else reason(want)]
        if not blocked:
            assert text == want.text


def test_errors_health_and_metrics(cluster):
    status, headers, body = request(cluster.url, "POST", "/v1/completions", {"model": MODEL, "prompt": "Hi", "n": 2})
    assert status == 400 and body["error"]["param"] == "n"  # the app's own errors, through the proxy
    with pytest.raises(openai.NotFoundError):
        client(cluster.url).completions.create(model="nope", prompt="Hi", max_tokens=2)
    seen = health_replicas(cluster.url, want=2)
    assert len(seen) == 2 and len(set(seen.values())) == 2  # two processes
    # one replica's own Prometheus page, through the ingress
    status, _, text = request(cluster.url, "GET", "/metrics")
    assert status == 200 and "singlepass_requests_total" in text
    # the cluster's view: Ray's metrics agent exports every replica's numbers, tagged by replica
    pattern = re.compile(r'^ray_singlepass_requests_total\{[^}]*replica="([^"]+)"', re.M)

    def both() -> bool:
        try:
            _, _, text = request(cluster.metrics, "GET", "/metrics", timeout=10)
        except OSError:
            return False
        return set(pattern.findall(text)) >= set(seen)

    wait_until(both, 60)


# ----------------------------------------------------------------------------- without a cluster


def test_config_file_is_valid_and_builds(art):
    from ray.serve import Application
    from ray.serve.schema import ServeDeploySchema

    from singlepass.serve import ray_app

    config = yaml.safe_load((REPO / "serve" / "ray_config.yaml").read_text())
    ServeDeploySchema.model_validate(config)  # Ray's own schema of `serve run` / `serve deploy` files
    spec = config["applications"][0]
    module, name = spec["import_path"].split(":")
    assert (module, name) == ("singlepass.serve.ray_app", "build")
    assert spec["deployments"][0]["name"] == ray_app.DEPLOYMENT
    args = {**spec["args"], "artifact": str(art), "policy": "safety=block:0.5"}
    assert isinstance(ray_app.build(args), Application)


def test_builder_arguments_are_checked(art):
    from singlepass.serve import ray_app

    with pytest.raises(SinglepassError, match="unknown application argument 'replica'"):
        ray_app.build({"artifact": str(art), "replica": "2"})
    with pytest.raises(SinglepassError, match="max_batch='x' is not a int"):
        ray_app.build({"artifact": str(art), "max_batch": "x"})
    with pytest.raises(SinglepassError, match="needs artifact=DIR"):
        ray_app.build({})
    with pytest.raises(SinglepassError, match="probe 'nope'"):
        ray_app.build({"artifact": str(art), "policy": "nope=block"})
    with pytest.raises(SinglepassError, match="--autoscale MIN:MAX"):
        ray_app.build({"artifact": str(art), "autoscale": "3:1"})
    opts = ray_app.Scaling(autoscale=(1, 4)).deployment_options(max_batch=8)
    assert opts["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 4.0}
    assert opts["max_ongoing_requests"] == 16 and opts["max_queued_requests"] == 256 and opts["num_replicas"] is None
    assert ray_app.Scaling(replicas=3).deployment_options(max_batch=8)["num_replicas"] == 3


def test_a_replica_refuses_an_artifact_that_differs(art, tmp_path):
    from singlepass.serve.ray_app import artifact_digest, check_digest

    want = artifact_digest(art)
    assert "manifest.json" in want and "model.onnx" in want
    copy = tmp_path / "copy"
    shutil.copytree(art, copy)
    check_digest(copy, want)  # the same files: accepted
    (copy / "tokenizer.json").write_text((copy / "tokenizer.json").read_text().replace('"', "'", 1))
    with pytest.raises(SinglepassError, match="tokenizer.json has sha256"):
        check_digest(copy, want)
    (copy / "tokenizer.json").unlink()
    with pytest.raises(SinglepassError, match="lacks tokenizer.json"):
        check_digest(copy, want)


def test_cli_checks_before_starting_ray(art, tmp_path):
    cmd = [sys.executable, "-m", "singlepass.cli", "serve"]
    bad = subprocess.run(cmd + [str(tmp_path), "--ray"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "manifest.json is missing" in bad.stderr
    bad = subprocess.run(cmd + [str(art), "--replicas", "2"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "need --ray" in bad.stderr
    bad = subprocess.run(cmd + [str(art), "--ray", "--autoscale", "x"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--autoscale takes MIN:MAX" in bad.stderr


# ----------------------------------------------------------------------------- a replica killed under load


def one_request(url: str, i: int, tokens: int, started=None) -> dict:
    """A completion (streamed for odd i) read to its end with the stdlib: a cut raises.
    ``started(replica, stream)`` is called once the response has begun."""
    import http.client

    body = {"model": "smollm2", "prompt": f"Count to ten, number {i}.", "max_tokens": tokens, "temperature": 0}
    body["stream"] = bool(i % 2)
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    try:
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        r = conn.getresponse()
        replica = r.getheader("x-singlepass-replica")
        if started is not None:
            started(replica, body["stream"])
        text = r.read().decode()  # IncompleteRead on a cut chunked body
        return {"i": i, "status": r.status, "replica": replica, "text": text, "stream": body["stream"]}
    except Exception as e:  # noqa: BLE001 - recorded: the test fails on any
        return {"i": i, "error": f"{type(e).__name__}: {e}"}
    finally:
        conn.close()


def outcome(r: dict, tokens: int) -> str:
    """ok (all tokens), failed (an explicit error) or anything else (the test fails)."""
    if "error" in r:
        return f"client error {r['error']}"
    if not r["stream"]:
        body = json.loads(r["text"])
        if r["status"] == 200:
            return "ok" if body["usage"]["completion_tokens"] == tokens else f"short {body['usage']}"
        return "failed" if r["status"] >= 500 and body["error"]["message"] else f"status {r['status']}"
    events = [ln[6:] for ln in r["text"].split("\n") if ln.startswith("data: ")]
    if r["status"] != 200:
        return "failed" if r["status"] >= 500 else f"status {r['status']}"
    if not events or events[-1] != "[DONE]":
        return "stream without [DONE]"
    last = json.loads(events[-2])
    if "error" in last:
        return "failed"
    return "ok" if last["choices"][0]["finish_reason"] == "length" else f"stream ended {last}"


@pytest.mark.real
def test_killing_a_replica_under_load_loses_nothing(real_artifact):
    """SmolLM2 (slow enough to kill a replica mid-stream): 12 concurrent requests of 64 tokens;
    the replica of the first stream to begin is SIGKILLed at once (its streams have sent their
    labels and first token, 63 tokens are still to come); then Ray's replacement serves."""
    tokens = 64
    args = ["--replicas", "2", "--replica-cpus", "1", "--model-name", "smollm2", "--ignore-eos"]
    with ray_server(real_artifact.path, *args) as s:
        before = health_replicas(s.url, want=2)
        assert len(before) == 2
        results: list[dict] = []
        first: list[str] = []
        streaming = threading.Event()

        def started(replica, stream):
            if stream and replica in before and not streaming.is_set():
                first.append(replica)
                streaming.set()

        threads = [
            threading.Thread(target=lambda i=i: results.append(one_request(s.url, i, tokens, started)))
            for i in range(12)
        ]
        for t in threads:
            t.start()
        assert streaming.wait(120), "no stream began"
        victim = first[0]
        os.kill(before[victim], signal.SIGKILL)
        for t in threads:
            t.join(150)
        assert not any(t.is_alive() for t in threads), "a request hung"
        got = sorted((outcome(r, tokens), r.get("replica") or "-", r.get("status"), r["i"]) for r in results)
        assert len(got) == 12 and all(o in ("ok", "failed") for o, *_ in got), got
        assert any(o == "failed" for o, *_ in got), f"no request was on the killed replica {victim}: {got}"
        # the other replica's requests all finish (a response without the header: nothing was sent)
        assert all(o == "ok" for o, rep, *_ in got if rep not in (victim, "-")), got
        assert any(o == "ok" for o, *_ in got), got

        # Ray replaces the replica; new requests are served meanwhile and after
        def replaced() -> bool:
            now = health_replicas(s.url, want=2, tries=10, patience=0)
            return len(now) == 2 and victim not in now

        wait_until(replaced, 90)
        after = one_request(s.url, 0, 8)
        assert outcome(after, 8) == "ok", after


# ----------------------------------------------------------------------------- the benchmark


def test_bench_serve_ray_end_to_end(art, tmp_path):
    """``singlepass bench serve --ray`` on the tiny artifact: the plain server, ray-1 and ray-2
    measured in alternation, then a replica of ray-2 killed under load. Counts, never timings."""
    from singlepass.cli import main

    out = tmp_path / "results"
    argv = ["bench", "serve", "--ray", "--with-plain", "--artifact", str(art), "--levels", "2", "--requests", "4"]
    argv += ["--repeats", "1", "--max-tokens", "4", "--warmup", "2", "--threads", "1", "--prompts", "80"]
    argv += ["--out", str(out)]
    argv += ["--failover-concurrency", "4", "--failover-seconds", "10", "--kill-at", "2"]
    assert main(argv) == 0
    res = json.loads((out / "serve_ray.json").read_text())
    assert sorted({r["config"] for r in res["runs"]}) == ["plain", "ray-1", "ray-2"]
    assert all(r["answered"] == r["sent"] == 4 and r["errors"] == 0 for r in res["runs"])
    fo = res["failover"]
    assert fo["sent"] == fo["answered"] + fo["failed_explicit"] + fo["lost"] and fo["answered"] > 0
    assert fo["lost"] == 0, fo["failure_kinds"]  # every failure explicit
    assert fo["victim"] in fo["replicas_before"]  # (the replacement's timing: test_killing_a_replica_...)
    text = (out / "serve_ray.md").read_text()
    assert "## Failover" in text and "ray-2 / ray-1" in text
    md = text
    assert main(["bench", "serve", "--ray", "--table-only", "--out", str(out)]) == 0
    assert (out / "serve_ray.md").read_text() == md  # re-rendered from the JSON, byte for byte
