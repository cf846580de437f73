"""The serving benchmark's client side: the real server in a subprocess, a bounded async load
generator, and the server's resident memory over time (``singlepass bench serve``).

* ``ServerProcess``: ``singlepass serve ART --host 127.0.0.1 --port 0 ...`` as a child process
  (its own interpreter, so its memory is its own and the client does not share its GIL); the
  address comes from the server's first line, ``GET /health`` says when it is ready; ``stop``
  sends SIGTERM (uvicorn shuts down gracefully), then SIGKILL after a grace period.
* ``run_load``: ``concurrency`` closed-loop clients (httpx.AsyncClient, loopback only, no proxy)
  send streamed chat completions until ``requests`` were sent or ``duration`` seconds passed,
  whichever comes first; every request sent is awaited (each bounded by its own timeout), so a
  run always ends by itself. Each request is one user turn, ``temperature: 0``, a fixed
  ``max_tokens``, ``stream_options.include_usage``.
* ``sample_rss``: VmRSS of a process from ``/proc/PID/status`` every few seconds.

Accounting, per run: ``sent`` (requests started), ``answered`` (a 200 stream with a finish
reason, a usage chunk and ``data: [DONE]``, no error event), ``errors`` (everything else: HTTP
errors, error events, cut streams, client timeouts), ``blocked`` (answered with finish reason
``content_filter``). ``sent == answered + errors`` always. Time to first token (TTFT) is request
sent -> the stream's first event (the server sends it once the prefill pass has chosen the first
token, or the refusal); latency is request sent -> ``[DONE]``.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from singlepass.errors import SinglepassError

LOOPBACK = "127.0.0.1"


def http_module():
    """The httpx client library: ``httpx``, or ``httpx2`` (the same API, what newer openai clients
    install); one of them comes with the openai client (a dev dependency)."""
    try:
        import httpx
    except ImportError:
        try:
            import httpx2 as httpx
        except ImportError:
            raise SinglepassError(
                "the serving benchmark needs httpx: pip install httpx (the openai client brings it)"
            ) from None
    return httpx


def check_loopback(url: str) -> str:
    """The benchmark talks to 127.0.0.1 only."""
    if urlparse(url).hostname != LOOPBACK:
        raise SinglepassError(f"the serving benchmark only talks to {LOOPBACK}, not {url}")
    return url.rstrip("/")


# --- the server ----------------------------------------------------------------------------------


class ServerProcess:
    """``singlepass serve`` on a free loopback port, as a child process (see the module docstring)."""

    def __init__(self, artifact: str | os.PathLike, model: str, flags: list[str], log_lines: int = 200):
        self.artifact, self.model, self.flags = str(artifact), model, list(flags)
        self.proc: subprocess.Popen | None = None
        self.url: str | None = None
        self.lines: deque[str] = deque(maxlen=log_lines)
        self._drain: threading.Thread | None = None

    @property
    def command(self) -> list[str]:
        return [
            *("singlepass", "serve", self.artifact, "--host", LOOPBACK, "--port", "0", "--model-name", self.model),
            *("--log-level", "warning", *self.flags),
        ]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _fail(self, why: str) -> SinglepassError:
        tail = "".join(self.lines).strip()[-2000:]
        self.stop()
        return SinglepassError(f"the server ({' '.join(self.command)}) {why}" + (f"; its log:\n{tail}" if tail else ""))

    def start(self, timeout: float = 900.0) -> "ServerProcess":
        """Start it and wait until it is ready; on any failure (or an interrupt) it is stopped."""
        cmd = [sys.executable, "-m", "singlepass.cli", *self.command[1:]]
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        try:
            return self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> "ServerProcess":
        deadline = time.monotonic() + timeout
        while self.url is None:
            line = self.proc.stderr.readline()
            if not line:
                raise self._fail(f"exited (status {self.proc.wait()}) before it listened")
            self.lines.append(line)
            found = re.search(r"http://127\.0\.0\.1:\d+", line)
            if found:
                self.url = check_loopback(found.group(0))
        self._drain = threading.Thread(target=lambda: self.lines.extend(self.proc.stderr), daemon=True)
        self._drain.start()
        httpx = http_module()
        while True:
            if self.proc.poll() is not None:
                raise self._fail(f"exited (status {self.proc.returncode}) while loading")
            try:
                if httpx.get(self.url + "/health", timeout=5, trust_env=False).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise self._fail(f"was not ready after {timeout:.0f} s")
            time.sleep(0.2)

    def rss_mib(self) -> float | None:
        return rss_mib(self.pid) if self.proc is not None and self.proc.poll() is None else None

    def engine_counters(self) -> dict[str, float]:
        """The engine's time and tokens by phase so far (``/metrics``), keyed ``seconds:PHASE`` and
        ``tokens:PHASE``: a run's difference says where the engine spent it."""
        return engine_counters(http_module().get(self.url + "/metrics", timeout=30, trust_env=False).text)

    def stop(self, grace: float = 30.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self._drain is not None:
            self._drain.join(5)
        return self.proc.returncode

    def __enter__(self) -> "ServerProcess":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


def engine_counters(text: str) -> dict[str, float]:
    """``singlepass_engine_{seconds,tokens}_total{phase}`` from a Prometheus text page."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        if fam.name in ("singlepass_engine_seconds", "singlepass_engine_tokens"):
            for smp in fam.samples:
                if smp.name.endswith("_total"):
                    out[f"{fam.name.rsplit('_', 1)[1]}:{smp.labels['phase']}"] = smp.value
    return out


def counters_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items()}


def rss_mib(pid: int) -> float | None:
    """VmRSS of a process (MiB), None when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return None


# --- one request -----------------------------------------------------------------------------------


@dataclass
class Outcome:
    ok: bool
    start: float  # seconds since the run began
    ttft: float | None = None
    latency: float | None = None
    tokens: int = 0  # completion tokens (the usage chunk)
    prompt_tokens: int | None = None  # the usage chunk's
    finish: str | None = None
    status: int | None = None
    error: str | None = None
    replica: str | None = None  # the replica that answered (x-singlepass-replica, under Ray Serve)


async def one_request(client, url: str, model: str, prompt: str, max_tokens: int, t_run: float) -> Outcome:
    """One streamed chat completion -> its Outcome (never raises for a failed request)."""
    httpx = http_module()

    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    out = Outcome(False, t0 - t_run)
    done, usage = False, None
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
            out.status, out.replica = r.status_code, r.headers.get("x-singlepass-replica")
            if r.status_code != 200:
                text = (await r.aread()).decode(errors="replace")
                try:
                    text = json.loads(text)["error"]["message"]
                except (ValueError, KeyError, TypeError):
                    pass
                out.error = f"HTTP {r.status_code}: {text[:120]}"
                return out
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                if out.ttft is None:
                    out.ttft = time.perf_counter() - t0
                ev = json.loads(data)
                if "error" in ev:
                    out.error = f"error event: {str(ev['error'].get('message'))[:120]}"
                    continue
                for ch in ev.get("choices") or []:
                    out.finish = ch.get("finish_reason") or out.finish
                usage = ev.get("usage") or usage
    except (httpx.HTTPError, ValueError) as e:
        out.error = f"{type(e).__name__}: {str(e)[:120]}"
        return out
    out.latency = time.perf_counter() - t0
    if out.error is None and not (done and out.finish and usage):
        out.error = "incomplete stream (no finish reason, usage chunk or [DONE])"
    if out.error is None:
        out.ok, out.tokens = True, int(usage["completion_tokens"])
        out.prompt_tokens = usage.get("prompt_tokens")
    return out


# --- a run ---------------------------------------------------------------------------------------


async def run_load(
    url: str,
    model: str,
    prompts: list[str],
    concurrency: int,
    requests: int,
    max_tokens: int,
    duration: float,
    timeout: float = 600.0,
    keep: bool = False,
) -> dict:
    """``concurrency`` closed-loop clients; at most ``requests`` requests, none started after
    ``duration`` seconds -> the run's summary (``summarize``; ``keep``: with every Outcome)."""
    httpx = http_module()

    url = check_loopback(url)
    if concurrency < 1 or requests < 1 or duration <= 0 or not prompts:
        raise SinglepassError("a run needs concurrency >= 1, requests >= 1, duration > 0 and prompts")
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    outcomes: list[Outcome] = []
    sent = 0
    t_run = time.perf_counter()
    stop_at = t_run + duration
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(timeout), trust_env=False) as client:

        async def client_loop() -> None:
            nonlocal sent
            while sent < requests and time.perf_counter() < stop_at:
                i, sent = sent, sent + 1
                outcomes.append(await one_request(client, url, model, prompts[i % len(prompts)], max_tokens, t_run))

        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
    wall = time.perf_counter() - t_run
    res = summarize(outcomes, wall, sent, concurrency)
    if keep:
        res["outcomes"] = [asdict(o) for o in outcomes]
    return res


def pctl(xs: list[float], q: float) -> float | None:
    return float(np.percentile(xs, q)) if xs else None


PROMPT_BINS = (64, 128)  # TTFT by prompt length: <= 64, 65-128, > 128 prompt tokens


def ttft_by_prompt(served: list[Outcome]) -> list[dict]:
    """TTFT percentiles (ms) of the served requests binned by prompt tokens (``PROMPT_BINS``):
    what part of the TTFT spread is the prompts' own prefill work rather than waiting."""
    edges = (0, *PROMPT_BINS, None)
    out = []
    for lo, hi in zip(edges, edges[1:]):
        xs = [1000 * o.ttft for o in served if o.prompt_tokens is not None and lo < o.prompt_tokens <= (hi or 1 << 62)]
        out.append(
            {"tokens": f"{lo + 1}-{hi}" if hi else f">{lo}", "n": len(xs), "p50": pctl(xs, 50), "p99": pctl(xs, 99)}
        )
    return out


def summarize(outcomes: list[Outcome], wall: float, sent: int, concurrency: int) -> dict:
    """Counts, throughput and TTFT/latency percentiles (ms) of one run. The times are those of
    the requests the LLM served: a refused (``content_filter``) one never reached it."""
    ok = [o for o in outcomes if o.ok]
    served = [o for o in ok if o.finish != "content_filter"]  # blocked ones skip the LLM: not in the times
    ttft = [1000 * o.ttft for o in served]
    lat = [1000 * o.latency for o in served]
    tokens = sum(o.tokens for o in ok)
    decode = [(o.tokens - 1) / (o.latency - o.ttft) for o in served if o.tokens > 1 and o.latency > o.ttft]
    errors = [o for o in outcomes if not o.ok]
    return {
        "concurrency": concurrency,
        "sent": sent,
        "answered": len(ok),
        "errors": len(errors),
        "error_kinds": dict(Counter(o.error for o in errors).most_common(5)),
        "blocked": sum(o.finish == "content_filter" for o in ok),
        "wall_s": wall,
        "requests_per_s": len(ok) / wall if wall > 0 else 0.0,
        "tokens": tokens,
        "tokens_per_s": tokens / wall if wall > 0 else 0.0,
        "ttft_p50_ms": pctl(ttft, 50),
        "ttft_p99_ms": pctl(ttft, 99),
        "latency_p50_ms": pctl(lat, 50),
        "latency_p99_ms": pctl(lat, 99),
        "stream_decode_tokens_per_s_p50": pctl(decode, 50),
        "ttft_by_prompt": ttft_by_prompt(served),
    }


# --- the soak ----------------------------------------------------------------------------------------


async def sample_rss(pid: int, interval: float, stop: asyncio.Event, t0: float) -> list[list[float]]:
    """[[seconds since t0, VmRSS MiB], ...] every ``interval`` s until ``stop`` (and once more then)."""
    samples = []
    while True:
        mib = rss_mib(pid)
        if mib is not None:
            samples.append([time.perf_counter() - t0, mib])
        if stop.is_set():
            return samples
        try:
            await asyncio.wait_for(stop.wait(), interval)
        except asyncio.TimeoutError:
            pass


async def soak(
    server: ServerProcess,
    prompts: list[str],
    concurrency: int,
    seconds: float,
    max_tokens: int,
    interval: float,
    timeout: float = 600.0,
    max_requests: int | None = None,
) -> dict:
    """``concurrency`` clients for ``seconds`` (a request bound too), the server's RSS sampled
    meanwhile -> the run's summary + ``rss`` samples + ``lost`` (sent - answered)."""
    stop = asyncio.Event()
    t0 = time.perf_counter()
    sampler = asyncio.create_task(sample_rss(server.pid, interval, stop, t0))
    try:
        bound = max_requests or int(seconds * 1000) + concurrency
        res = await run_load(server.url, server.model, prompts, concurrency, bound, max_tokens, seconds, timeout)
    finally:
        stop.set()
        rss = await sampler
    res.update(rss=rss, seconds=seconds, lost=res["sent"] - res["answered"], interval_s=interval)
    return res
