"""The server's state and vocabulary, shared by the routes (``app.py``) and the ASGI layer
(``asgi.py``): options, the API error, a request's plan, the engine sink, the loaded artifact."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from singlepass.errors import SinglepassError
from singlepass.runtime import policy as pol
from singlepass.runtime.passes import Label
from singlepass.runtime.sampling import Sampling
from singlepass.serve import schemas as S
from singlepass.serve.engine import EngineStopped, Job, Out, QueueFull
from singlepass.serve.metrics import Metrics

log = logging.getLogger("singlepass.serve")


ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/moderations", "/v1/models", "/health", "/metrics")
FINISH = {
    "eos": "stop",
    "stop": "stop",
    "blocked": "content_filter",
    "max_tokens": "length",
    "max_total_length": "length",
    "engine_max_seq": "length",
}
OUTCOMES = {
    400: "invalid",
    401: "unauthorized",
    404: "not_found",
    405: "invalid",
    408: "cancelled",
    413: "too_large",
    422: "invalid",
    429: "queue_full",
    503: "unavailable",
    504: "timeout",
}
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
    504: "timeout_error",
}
MAX_STOPS = 4
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


@dataclass
class Options:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_queue: int = 128
    max_batch: int | None = None
    prefill_tokens: int = 512  # prompt tokens prefilled per engine iteration while rows decode
    timeout: float = 300.0  # seconds per request, arrival to the last token
    max_body_bytes: int = 1 << 20
    model_name: str | None = None  # default: the artifact folder's name
    backend: str = "auto"
    engine: str | None = None
    threads: int | None = None
    policy: dict | list | None = None
    refusal: str = pol.DEFAULT_REFUSAL
    ignore_eos: bool = False  # every request generates its whole budget (fixed work, for benchmarks)
    guard: str | None = None  # a ClassifierGuard folder: guard-then-serve (guard.py)
    guard_threads: int | None = None  # its ONNX Runtime threads (default: --threads)
    memory_arena: bool = False  # ONNX Runtime's CPU arena: off, or RSS grows with every shape served


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers
        self.type = type or ERROR_TYPES.get(status, "server_error")

    def response(self) -> JSONResponse:
        """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
        body = S.ErrorResponse(
            error=S.ErrorBody(message=self.message, type=self.type, param=self.param, code=self.code)
        )
        return JSONResponse(body.model_dump(), status_code=self.status, headers=self.headers)


def json_response(model) -> Response:
    return Response(model.model_dump_json(), media_type="application/json")


def set_outcome(request: Request, outcome: str) -> None:
    request.scope["singlepass.outcome"] = outcome


class RequestTimeout(Exception):
    pass


class ClientGone(Exception):
    pass


# ----------------------------------------------------------------------------- server state


@dataclass
class Plan:
    """One request, checked: what the engine job and the response need."""

    ids: list[int]
    budget: int
    why: str
    sampling: Sampling
    stops: tuple[str, ...]
    stream: bool
    usage: bool
    token_ids: bool
    text: str | None = None  # the user's text, for the guard (before the prompt format)


@dataclass
class ServerState:
    options: Options
    artifact: object = None
    runtime: object = None
    engine: object = None
    name: str = "singlepass"
    created: int = field(default_factory=lambda: int(time.time()))
    metrics: Metrics = field(default_factory=Metrics)
    ready: bool = False
    load_error: str | None = None
    on_load_error: object = None
    scorer: object = None  # a guard given as an object (tests); else loaded from options.guard
    guard: object = None  # the GuardStage, when there is a guard
    replica: str | None = None  # under Ray Serve: this replica's id (a response header, /health)

    # -- loading (a thread: /health answers 503 meanwhile)
    def load(self) -> None:
        from singlepass.runtime.api import load
        from singlepass.serve.engine import Engine

        o = self.options
        try:
            rt = self.runtime or load(
                self.artifact,
                backend=o.backend,
                engine=o.engine,
                threads=o.threads,
                policy=o.policy,
                refusal=o.refusal,
                memory_arena=o.memory_arena,
            )
            self.runtime = rt
            if self.scorer is not None or o.guard:
                from singlepass.serve.guard import KEY, GuardStage, load_scorer

                if KEY in rt.probe_names:
                    raise SinglepassError(f"--guard: the artifact has a probe named {KEY!r}; the guard needs that name")
                scorer = self.scorer or load_scorer(o.guard, o.guard_threads or o.threads)
                self.guard = GuardStage(scorer, max_batch=o.max_queue).start()
            self.engine = Engine(
                rt, o.max_batch, o.max_queue, self.metrics, ignore_eos=o.ignore_eos, prefill_tokens=o.prefill_tokens
            ).start()
            self.ready = True
            log.info(
                "serving %s (%s, probes: %s; max batch %d, max queue %d%s%s)",
                self.name,
                rt.backend.name,
                ", ".join(rt.probe_names) or "none",
                self.engine.max_batch,
                self.engine.max_queue,
                f"; guard {self.guard.name}" if self.guard else "",
                "; EOS ignored" if o.ignore_eos else "",
            )
        except Exception as e:  # noqa: BLE001 - reported by /health and the CLI
            self.load_error = str(e) if isinstance(e, SinglepassError) else f"{type(e).__name__}: {e}"
            log.error("cannot load the artifact: %s", self.load_error, exc_info=not isinstance(e, SinglepassError))
            if self.on_load_error:
                self.on_load_error(e)

    def require_ready(self) -> None:
        if self.load_error:
            raise ApiError(503, f"the artifact could not be loaded: {self.load_error}")
        if not self.ready:
            raise ApiError(503, "the model is still loading; retry when GET /health answers 200")
        if not self.engine.alive:
            raise ApiError(503, "the engine is not running (the server is shutting down or failed; see its log)")

    def check_model(self, model: str | None, required: bool = True) -> None:
        if model is None and not required:
            return
        if model != self.name:
            raise ApiError(
                404,
                f"the model {model!r} does not exist; this server serves {self.name!r} (GET /v1/models)",
                param="model",
                code="model_not_found",
            )

    # -- requests -> jobs
    async def encode(self, text: str, param: str) -> list[int]:
        """The prompt's token ids through the artifact's prompt format (in a worker thread: a long
        text must not hold the event loop); 400 naming the limit."""
        return await asyncio.to_thread(self._encode, text, param)

    def _encode(self, text: str, param: str) -> list[int]:
        rt = self.runtime
        try:
            ids, _ = rt.tokenizer.encode(text, sys.maxsize)
        except SinglepassError as e:
            raise ApiError(400, f"{param}: {e}", param=param) from None
        if len(ids) > rt.max_prompt_length:
            raise ApiError(
                400,
                f"{param}: the prompt is {len(ids)} tokens (after the prompt format); this "
                f"artifact's limit is {rt.max_prompt_length} tokens: shorten it",
                param=param,
                code="context_length_exceeded",
            )
        return ids

    def plan(self, req: S._Sampled, ids: list[int], max_tokens: int | None, default_max: int | None) -> Plan:
        limit, lim_name = self.engine.token_limit(len(ids))
        if max_tokens is None:
            want = limit if default_max is None else default_max
            budget, why = (want, "max_tokens") if want <= limit else (limit, lim_name)
        elif max_tokens > limit:
            raise ApiError(
                400,
                f"max_tokens={max_tokens} is over this artifact's limit for this prompt: at most "
                f"{limit} new tokens (limits.max_total_length "
                f"{self.runtime.manifest.limits.max_total_length} - {len(ids)} prompt tokens)"
                if lim_name == "max_total_length"
                else f"max_tokens={max_tokens} is over the engine's limit for this prompt: at most {limit} new tokens",
                param="max_tokens",
                code="context_length_exceeded",
            )
        else:
            budget, why = max_tokens, "max_tokens"
        t = 1.0 if req.temperature is None else req.temperature
        top_p, top_k = (1.0, 0) if t == 0 else (1.0 if req.top_p is None else req.top_p, req.top_k or 0)
        try:
            sampling = Sampling(float(t), int(top_k), float(top_p), req.seed)
        except SinglepassError as e:
            raise ApiError(400, str(e)) from None
        stops = req.stop
        stops = () if stops is None else (stops,) if isinstance(stops, str) else tuple(stops)
        if len(stops) > MAX_STOPS:
            raise ApiError(400, f"stop: at most {MAX_STOPS} stop strings, not {len(stops)}", param="stop")
        if any(not s for s in stops):
            raise ApiError(400, "stop: a stop string must not be empty", param="stop")
        usage = bool(req.stream_options and req.stream_options.include_usage)
        if req.stream_options is not None and not req.stream:
            raise ApiError(400, "stream_options is only allowed with stream: true", param="stream_options")
        return Plan(ids, budget, why, sampling, stops, bool(req.stream), usage, bool(req.return_token_ids))

    async def screen(self, plan: Plan, job: Job, sink: "Sink") -> Label | None:
        """With a guard: its label for the prompt; a flagged prompt gets the refusal (in ``sink``)
        and never reaches the engine. Without one: None."""
        if self.guard is None or plan.text is None:
            return None
        from singlepass.serve.guard import KEY

        verdict = await self.guard.check(plan.text)
        self.metrics.guarded(verdict.label.label, verdict.seconds, verdict.flagged)
        if verdict.flagged:
            text = self.runtime.refusal
            job.finished = True
            sink(
                Out(
                    0,
                    text=text,
                    done=True,
                    finish_reason="blocked",
                    final_text=text,
                    blocked_by=KEY,
                    labels={KEY: verdict.label},
                    prompt_tokens=len(plan.ids),
                )
            )
        return verdict.label

    def submit(self, jobs: list[Job]) -> None:
        try:
            self.engine.submit(jobs)
        except QueueFull as e:
            raise ApiError(429, str(e), code="queue_full", headers={"Retry-After": "1"}) from None
        except EngineStopped as e:
            raise ApiError(503, f"{e}; retry later") from None


class Sink:
    """Hands a job's events from the engine thread to the request's event loop."""

    POLL = 0.25  # seconds between checks that the client is still there

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.queue = loop, asyncio.Queue()
        self.checked = time.monotonic()

    def __call__(self, out: Out) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, out)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    async def next(self, deadline: float, request: Request | None = None) -> Out:
        """The next event; RequestTimeout past the deadline; with ``request``, ClientGone once the client left."""
        while True:
            now = time.monotonic()
            if now >= deadline:
                raise RequestTimeout()
            if request is not None and now - self.checked >= self.POLL:  # events may keep coming: check anyway
                self.checked = now
                if await request.is_disconnected():
                    raise ClientGone()
            wait = deadline - now if request is None else min(deadline - now, self.POLL)
            try:
                return await asyncio.wait_for(self.queue.get(), wait)
            except asyncio.TimeoutError:
                pass


def _label_outs(labels: dict) -> dict[str, S.LabelOut]:
    return {k: S.LabelOut(label=v.label, score=v.score) for k, v in labels.items()}


def labels_of(out: Out, last: Out | None = None) -> S.Singlepass:
    """The extension of a response (``last``: its final event) or of a stream's head chunk."""
    end = last or out
    return S.Singlepass(
        labels=_label_outs(out.labels or {}),
        blocked_by=end.blocked_by or out.blocked_by,
        response_labels=_label_outs(end.response) if end.response else None,
    )


def response_labels_of(out: Out) -> S.Singlepass | None:
    """A stream chunk's extension: the response so far (and the probe that stopped it)."""
    if not out.response:
        return None
    return S.Singlepass(response_labels=_label_outs(out.response), blocked_by=out.blocked_by)


def usage_of(prompt: int, completion: int) -> S.Usage:
    return S.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)
