"""The OpenAI-compatible FastAPI application over one artifact, and its uvicorn runner.

Requests become engine jobs (``engine.py``): the handler encodes the prompt, checks the limits,
queues the job (429 at once when the queue is full) and awaits its events, which the engine
thread hands to the event loop. Streams are server-sent events ending with ``data: [DONE]``.

What the endpoints do with their input:

* ``/v1/chat/completions`` serves ONE user turn: ``messages`` must be a single ``user`` message
  (a string, or text parts joined by newlines). It is rendered through the artifact's chat
  template exactly as ``Runtime.generate`` renders a prompt (``[{"role": "user", ...}]``), so the
  labels are the probes' trained input. System, developer and assistant messages, and
  conversations of several messages, are a 400 that says so: the template supplies its own system
  prompt and the probes were trained on single user turns, so rendering them would be neither
  faithful to the template nor to the probes.
* ``/v1/completions`` takes one prompt (a string or a list of one string) and formats it the same
  way (the artifact's prompt format: its chat template, or raw text for a raw-format artifact), so
  a completion is ``Runtime.generate(prompt)`` in OpenAI's shape.
* ``/v1/moderations`` runs the prefill pass only (no token): per input, ``categories`` and
  ``category_scores`` keyed by probe. A probe is flagged when its ``block`` policy rule flags the
  prompt, else (no rule) when a binary probe gives its positive label (``label_names[1]``); a
  multi-class probe without a rule is never flagged. Scores: P(positive) for a binary probe, the
  predicted label's probability for a multi-class one; ``singlepass.labels`` has the labels.

Sampling follows OpenAI's defaults: temperature 1, top_p 1 (``temperature: 0`` is greedy; top_p
and top_k change nothing then). ``max_tokens`` defaults to 16 for completions and to the
artifact's limit for chat; a value over the limit (``limits.max_total_length`` - prompt tokens)
is a 400. A finish reason is ``stop`` (EOS or a stop string), ``length`` (the budget or the
artifact's limit) or ``content_filter`` (the label policy, or the ``--guard`` classifier, blocked
the prompt: the refusal text).

Two serving options exist for benchmarks: ``--guard DIR`` (guard-then-serve: a separate classifier
scores each completion prompt before the engine sees it, ``guard.py``) and ``--ignore-eos``
(every request generates its whole ``max_tokens`` budget: fixed work per request).

Errors are OpenAI's ``{"error": {"message", "type", "param", "code"}}``: 400 bad or unsupported
fields (named) and invalid JSON, 401 without the API key, 404 unknown model, 413 body too large,
422 type errors, 429 queue full, 503 not loaded yet, 504 timeout; a 500 says only "internal server
error" (the traceback goes to the server log).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

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


def error_response(
    status: int,
    message: str,
    param: str | None = None,
    code: str | None = None,
    type: str | None = None,
    headers: dict | None = None,
) -> JSONResponse:
    body = S.ErrorResponse(
        error=S.ErrorBody(message=message, type=type or ERROR_TYPES.get(status, "server_error"), param=param, code=code)
    )
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def _json(model) -> Response:
    return Response(model.model_dump_json(), media_type="application/json")


def _set_outcome(request: Request, outcome: str) -> None:
    request.scope["singlepass.outcome"] = outcome


class _Timeout(Exception):
    pass


class _Gone(Exception):
    pass


# ----------------------------------------------------------------------------- server state


@dataclass
class _Plan:
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

    # -- loading (a thread: /health answers 503 meanwhile)
    def load(self) -> None:
        from singlepass.runtime.api import load
        from singlepass.serve.engine import Engine

        o = self.options
        try:
            rt = self.runtime or load(
                self.artifact, backend=o.backend, engine=o.engine, threads=o.threads, policy=o.policy, refusal=o.refusal
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

    def plan(self, req: S._Sampled, ids: list[int], max_tokens: int | None, default_max: int | None) -> _Plan:
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
        return _Plan(ids, budget, why, sampling, stops, bool(req.stream), usage, bool(req.return_token_ids))

    async def screen(self, plan: _Plan, job: Job, sink: "_Sink") -> Label | None:
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


class _Sink:
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
        """The next event; _Timeout past the deadline; with ``request``, _Gone once the client left."""
        while True:
            now = time.monotonic()
            if now >= deadline:
                raise _Timeout()
            if request is not None and now - self.checked >= self.POLL:  # events may keep coming: check anyway
                self.checked = now
                if await request.is_disconnected():
                    raise _Gone()
            wait = deadline - now if request is None else min(deadline - now, self.POLL)
            try:
                return await asyncio.wait_for(self.queue.get(), wait)
            except asyncio.TimeoutError:
                pass


def _labels(out: Out) -> S.Singlepass:
    return S.Singlepass(
        labels={k: S.LabelOut(label=v.label, score=v.score) for k, v in (out.labels or {}).items()},
        blocked_by=out.blocked_by,
    )


def _usage(prompt: int, completion: int) -> S.Usage:
    return S.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


# ----------------------------------------------------------------------------- the ASGI guard


class Guard:
    """Outermost: the API key (all but /health), the body size limit, the request metrics."""

    def __init__(self, app, state: ServerState):
        self.app, self.st = app, state
        key = state.options.api_key
        self.expected = f"Bearer {key}".encode() if key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        path = scope.get("path", "")
        endpoint = path if path in ENDPOINTS else "other"
        status = {}

        async def send_status(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            headers = dict(scope.get("headers") or [])
            if self.expected is not None and path != "/health":
                given = headers.get(b"authorization", b"")
                if not hmac.compare_digest(given, self.expected):
                    msg = (
                        "missing API key: send the header 'Authorization: Bearer <key>'"
                        if not given
                        else "invalid API key"
                    )
                    await error_response(401, msg, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})(
                        scope, receive, send_status
                    )
                    return
            if scope.get("method") in ("POST", "PUT", "PATCH"):
                limit = self.st.options.max_body_bytes
                too_big = error_response(
                    413,
                    f"the request body is over the limit of {limit} bytes (--max-body-bytes)",
                    code="request_too_large",
                )
                try:
                    declared = int(headers.get(b"content-length", b"0") or 0)
                except ValueError:
                    declared = 0
                if declared > limit:
                    await too_big(scope, receive, send_status)
                    return
                chunks, size = [], 0
                while True:
                    message = await receive()
                    if message["type"] != "http.request":  # the client left while sending
                        scope["singlepass.outcome"] = "cancelled"
                        return
                    chunks.append(message.get("body", b""))
                    size += len(chunks[-1])
                    if size > limit:
                        await too_big(scope, receive, send_status)
                        return
                    if not message.get("more_body"):
                        break
                body, replayed = b"".join(chunks), False

                async def replay():
                    nonlocal replayed
                    if not replayed:
                        replayed = True
                        return {"type": "http.request", "body": body, "more_body": False}
                    return await receive()

                await self.app(scope, replay, send_status)
            else:
                await self.app(scope, receive, send_status)
        except BaseException:
            status.setdefault("code", 500)
            raise
        finally:
            code = status.get("code", 500)
            outcome = scope.get("singlepass.outcome") or (
                "ok" if code < 400 else OUTCOMES.get(code, "error" if code >= 500 else "invalid")
            )
            self.st.metrics.request(endpoint, outcome, time.perf_counter() - t0 if endpoint != "other" else None)


class _SSE(StreamingResponse):
    """A server-sent event stream that always runs ``on_close`` (the client may leave mid-stream)."""

    def __init__(self, content, on_close):
        super().__init__(
            content, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def _sse(model) -> str:
    return f"data: {model.model_dump_json()}\n\n"


# ----------------------------------------------------------------------------- the app


def create_app(artifact=None, runtime=None, options: Options | None = None, guard=None) -> FastAPI:
    """The application for an artifact folder (loaded in a thread at startup) or a loaded Runtime.
    ``guard``: a scorer object (``guard.Scorer``) instead of ``options.guard``'s folder."""
    from contextlib import asynccontextmanager

    if (artifact is None) == (runtime is None):
        raise SinglepassError("create_app needs an artifact folder or a Runtime (one of them)")
    o = options or Options()
    st = ServerState(o, artifact=artifact, runtime=runtime, scorer=guard)
    folder = runtime.folder if runtime is not None else getattr(artifact, "folder", artifact)
    st.name = o.model_name or Path(folder).resolve().name

    @asynccontextmanager
    async def lifespan(app):
        threading.Thread(target=st.load, name="singlepass-load", daemon=True).start()
        try:
            yield
        finally:
            if st.guard is not None:
                await asyncio.get_running_loop().run_in_executor(None, st.guard.stop)
            if st.engine is not None:
                await asyncio.get_running_loop().run_in_executor(None, st.engine.stop)

    app = FastAPI(
        title="singlepass",
        version=_version(),
        lifespan=lifespan,
        description="OpenAI-compatible completions with every fused probe's label from the same forward pass.",
    )
    app.state.singlepass = st
    app.add_middleware(Guard, state=st)
    documented = {k: {"model": S.ErrorResponse} for k in (400, 401, 404, 413, 422, 429, 503, 504)}

    # -- errors: OpenAI's shape, never a traceback
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return error_response(e.status, e.message, e.param, e.code, e.type, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        errors = e.errors()
        if any(err.get("type") == "json_invalid" for err in errors):
            where = next((err.get("ctx", {}).get("error") for err in errors if err.get("type") == "json_invalid"), "")
            return error_response(
                400, f"the request body is not valid JSON ({where})".replace(" ()", ""), code="invalid_json"
            )
        parts, first = [], None
        for err in errors[:5]:
            loc = [str(x) for x in err.get("loc", ()) if x != "body"]
            name = ".".join(loc) or "body"
            first = first or name
            parts.append(f"{name}: {err.get('msg', 'invalid')}")
        return error_response(422, "; ".join(parts), param=first, code="invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        return error_response(e.status_code, str(e.detail), headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _crash(request: Request, e: Exception):
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=e)
        return error_response(500, "internal server error (see the server log)")

    # -- service endpoints
    @app.get("/health", tags=["service"], responses={503: {"description": "not loaded (yet)"}})
    async def health():
        if st.ready and st.engine.alive:
            waiting, running = st.engine.counts()
            return {"status": "ok", "model": st.name, "waiting": waiting, "running": running}
        status = "error" if st.load_error or st.ready else "loading"
        return JSONResponse({"status": status, "model": st.name, "error": st.load_error}, status_code=503)

    @app.get("/metrics", tags=["service"], response_class=Response)
    async def metrics():
        body, content_type = st.metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models", response_model=S.ModelList, tags=["openai"], responses=documented)
    async def models():
        st.require_ready()
        return _json(S.ModelList(data=[_card(st)]))

    @app.get("/v1/models/{model_id}", response_model=S.ModelCard, tags=["openai"], responses=documented)
    async def model(model_id: str):
        st.require_ready()
        st.check_model(model_id)
        return _json(_card(st))

    # -- completions
    @app.post("/v1/chat/completions", response_model=S.ChatCompletion, tags=["openai"], responses=documented)
    async def chat_completions(req: S.ChatCompletionRequest, request: Request):
        st.require_ready()
        _check_fields(req)
        st.check_model(req.model)
        text = _chat_text(req)
        if (
            req.max_tokens is not None
            and req.max_completion_tokens is not None
            and req.max_tokens != req.max_completion_tokens
        ):
            raise ApiError(400, "max_tokens and max_completion_tokens differ: give one of them", param="max_tokens")
        mx = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        plan = st.plan(req, await st.encode(text, "messages[0].content"), mx, None)
        plan.text = text
        return await _complete(st, request, plan, chat=True)

    @app.post("/v1/completions", response_model=S.Completion, tags=["openai"], responses=documented)
    async def completions(req: S.CompletionRequest, request: Request):
        st.require_ready()
        _check_fields(req)
        st.check_model(req.model)
        prompt = req.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise ApiError(
                    400,
                    f"prompt: a list of {len(prompt)} prompts is not supported: send one prompt per request",
                    param="prompt",
                )
            prompt = prompt[0]
        plan = st.plan(req, await st.encode(prompt, "prompt"), req.max_tokens, COMPLETIONS_DEFAULT_MAX_TOKENS)
        plan.text = prompt
        return await _complete(st, request, plan, chat=False)

    @app.post("/v1/moderations", response_model=S.Moderation, tags=["openai"], responses=documented)
    async def moderations(req: S.ModerationRequest, request: Request):
        st.require_ready()
        bad = S.unsupported(req)
        if bad:
            raise ApiError(400, bad[1], param=bad[0])
        st.check_model(req.model, required=False)
        inputs = [req.input] if isinstance(req.input, str) else list(req.input)
        if not inputs:
            raise ApiError(400, "input: give a string or a non-empty list of strings", param="input")
        if len(inputs) > st.engine.max_queue:
            raise ApiError(
                400,
                f"input: {len(inputs)} inputs are more than the server queues at once "
                f"({st.engine.max_queue}); split them",
                param="input",
            )
        ids = [
            await st.encode(t, f"input[{i}]" if isinstance(req.input, list) else "input") for i, t in enumerate(inputs)
        ]
        return await _moderate(st, request, ids)

    return app


def _version() -> str:
    from singlepass import __version__

    return __version__


def _card(st: ServerState) -> S.ModelCard:
    rt = st.runtime
    lim = rt.manifest.limits
    return S.ModelCard(
        id=st.name,
        created=st.created,
        singlepass={
            "probes": [
                {"name": p.name, "labels": list(p.label_names), "threshold": p.threshold, "task": p.task}
                for p in rt.manifest.probes
            ],
            "policy": {k: r.action for k, r in rt.policy.items()},
            "limits": {
                "max_prompt_length": rt.max_prompt_length,
                "max_total_length": lim.max_total_length,
                "max_batch": st.engine.max_batch,
            },
            "backend": rt.backend.name,
            **({"guard": {"name": st.guard.name, "threshold": st.guard.threshold}} if st.guard else {}),
        },
    )


def _check_fields(req) -> None:
    bad = S.unsupported(req)
    if bad:
        raise ApiError(400, bad[1], param=bad[0])


def _chat_text(req: S.ChatCompletionRequest) -> str:
    """The one user turn of a chat request (see the module docstring)."""
    msgs = req.messages
    for i, m in enumerate(msgs):
        bad = S.unsupported(m, f"messages[{i}].")
        if bad:
            raise ApiError(400, bad[1], param=bad[0])
    for i, m in enumerate(msgs):
        if m.role in ("system", "developer"):
            raise ApiError(
                400,
                f"messages[{i}]: '{m.role}' messages are not supported: this artifact serves one user "
                "turn through its chat template (the template supplies its own system prompt and the "
                "probes were trained on that format); put the instructions into the user message",
                param=f"messages[{i}].role",
            )
    if len(msgs) != 1:
        raise ApiError(
            400,
            f"messages: a conversation of {len(msgs)} messages is not supported: this artifact serves "
            "one user turn per request (its probes label that turn); send one user message",
            param="messages",
        )
    m = msgs[0]
    if m.role != "user":
        raise ApiError(400, f"messages[0].role must be 'user', not {m.role!r}", param="messages[0].role")
    if isinstance(m.content, list):
        texts = []
        for k, part in enumerate(m.content):
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(
                    400,
                    f'messages[0].content[{k}]: only text parts ({{"type": "text", "text": '
                    f"...}}) are supported, not {part.get('type')!r}",
                    param=f"messages[0].content[{k}]",
                )
            texts.append(part["text"])
        return "\n".join(texts)
    return m.content or ""


async def _complete(st: ServerState, request: Request, plan: _Plan, chat: bool):
    """Run one completion job; a JSON response, or a stream once the first event is in."""
    loop = asyncio.get_running_loop()
    sink = _Sink(loop)
    job = Job(plan.ids, plan.budget, plan.why, plan.sampling, plan.stops, incremental=plan.stream, sink=sink)
    deadline = time.monotonic() + st.options.timeout
    guard_label = None
    if st.guard is not None:
        try:  # the guard's time counts against the request's --timeout
            guard_label = await asyncio.wait_for(st.screen(plan, job, sink), max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise _timeout_error(st, request) from None
    if not job.finished:
        st.submit([job])
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    created = int(time.time())
    handed_over = False
    try:
        first = await _next_output(st, sink, deadline, request)
        if first is None:
            return Response(status_code=408)
        if first.error:
            raise _engine_error(st, first.error)
        if guard_label is not None:
            from singlepass.serve.guard import KEY

            first.labels = {**(first.labels or {}), KEY: guard_label}
        if plan.stream:
            handed_over = True
            return _SSE(
                _stream(st, request, plan, job, sink, first, rid, created, deadline, chat),
                lambda: _stream_closed(st, request, job),
            )
        outs = [first]
        while not outs[-1].done:
            out = await _next_output(st, sink, deadline, request)
            if out is None:
                return Response(status_code=408)
            outs.append(out)
        last = outs[-1]
        if last.error:
            raise _engine_error(st, last.error)
        tokens = [o.token_id for o in outs if o.token_id is not None]
        _set_outcome(request, "blocked" if last.blocked_by else "ok")
        ext = _labels(first)
        reason = FINISH.get(last.finish_reason, last.finish_reason)
        usage = _usage(len(plan.ids), len(tokens))
        ptoks = plan.ids if plan.token_ids else None
        ctoks = tokens if plan.token_ids else None
        text = last.final_text or ""
        if chat:
            shape, choice = (
                S.ChatCompletion,
                S.ChatChoice(message=S.AssistantMessage(content=text), finish_reason=reason, token_ids=ctoks),
            )
        else:
            shape, choice = S.Completion, S.CompletionChoice(text=text, finish_reason=reason, token_ids=ctoks)
        return _json(
            shape(
                id=rid,
                created=created,
                model=st.name,
                usage=usage,
                singlepass=ext,
                prompt_token_ids=ptoks,
                choices=[choice],
            )
        )
    finally:
        if not handed_over:
            st.engine.cancel(job)


def _engine_error(st: ServerState, message: str) -> ApiError:
    """A job the engine failed: 503 while it shuts down, else 500 (the engine's message is generic)."""
    if not st.engine.alive:
        return ApiError(503, f"{message}; retry later")
    return ApiError(500, message, type="server_error")


async def _next_output(st: ServerState, sink, deadline: float, request: Request):
    """The sink's next engine output; past the deadline the API's timeout error; None when the
    client has gone (the request's outcome is then "cancelled")."""
    try:
        return await sink.next(deadline, request)
    except _Timeout:
        raise _timeout_error(st, request) from None
    except _Gone:
        _set_outcome(request, "cancelled")
        return None


def _timeout_error(st: ServerState, request: Request) -> ApiError:
    _set_outcome(request, "timeout")
    return ApiError(504, f"the request did not finish within {st.options.timeout:g} s (--timeout)", code="timeout")


def _stream_closed(st: ServerState, request: Request, job: Job) -> None:
    if not job.finished:
        st.engine.cancel(job)
        request.scope.setdefault("singlepass.outcome", "cancelled")


async def _stream(
    st: ServerState,
    request: Request,
    plan: _Plan,
    job: Job,
    sink: _Sink,
    first: Out,
    rid: str,
    created: int,
    deadline: float,
    chat: bool,
):
    """The server-sent events of one completion: labels first, then the text, then [DONE]."""
    ext, ptoks = _labels(first), (plan.ids if plan.token_ids else None)
    count = 0

    def chunk(text: str | None, reason: str | None = None, head: bool = False, tokens=None, usage=None):
        """One SSE event: a chat chunk or a completion, the extension fields on the head chunk only."""
        if usage:
            choices = []
        elif chat:
            delta = S.Delta() if reason else S.Delta(role="assistant", content="") if head else S.Delta(content=text)
            choices = [S.ChunkChoice(delta=delta, finish_reason=reason, token_ids=tokens)]
        else:
            choices = [S.CompletionChoice(text=text or "", finish_reason=reason, token_ids=tokens)]
        shape = S.ChatCompletionChunk if chat else S.Completion
        return _sse(
            shape(
                id=rid,
                created=created,
                model=st.name,
                choices=choices,
                usage=usage,
                singlepass=ext if head else None,
                prompt_token_ids=ptoks if head else None,
            )
        )

    out = first
    try:
        yield chunk("", head=True)
        while True:
            if out.error:
                yield f"data: {_error_json(500, out.error)}\n\n"
                request.scope["singlepass.outcome"] = "error"
                break
            if out.token_id is not None:
                count += 1
            if out.text or (plan.token_ids and out.token_id is not None):
                yield chunk(out.text, tokens=[out.token_id] if plan.token_ids and out.token_id is not None else None)
            if out.done:
                yield chunk(None, FINISH.get(out.finish_reason, out.finish_reason))
                if plan.usage:
                    yield chunk(None, usage=_usage(len(plan.ids), count))
                request.scope["singlepass.outcome"] = "blocked" if out.blocked_by else "ok"
                break
            try:
                out = await sink.next(deadline)
            except _Timeout:
                st.engine.cancel(job)
                request.scope["singlepass.outcome"] = "timeout"
                yield f"data: {_error_json(504, _timeout_error(st, request).message, 'timeout')}\n\n"
                break
        yield "data: [DONE]\n\n"
    except Exception:  # noqa: BLE001 - the headers are sent: an error event, the trace to the log
        log.exception("streaming a completion failed")
        request.scope["singlepass.outcome"] = "error"
        yield f"data: {_error_json(500, 'internal server error (see the server log)')}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        if not job.finished:
            st.engine.cancel(job)


def _error_json(status: int, message: str, code: str | None = None) -> str:
    return S.ErrorResponse(
        error=S.ErrorBody(message=message, type=ERROR_TYPES.get(status, "server_error"), code=code)
    ).model_dump_json()


async def _moderate(st: ServerState, request: Request, ids: list[list[int]]):
    """Prefill-only jobs (no token, no blocking) -> OpenAI's moderation shape, keyed by probe."""
    loop = asyncio.get_running_loop()
    sinks = [_Sink(loop) for _ in ids]
    jobs = [Job(x, 0, "max_tokens", policy=False, sink=s) for x, s in zip(ids, sinks)]
    deadline = time.monotonic() + st.options.timeout
    st.submit(jobs)
    try:
        outs = []
        for s in sinks:
            out = await _next_output(st, s, deadline, request)
            if out is None:
                return Response(status_code=408)
            outs.append(out)
    finally:
        for j in jobs:
            st.engine.cancel(j)
    rt = st.runtime
    results = []
    for out in outs:
        if out.error:
            raise _engine_error(st, out.error)
        cats, scores = {}, {}
        for p in rt.manifest.probes:
            lb = out.labels[p.name]
            rule = rt.policy[p.name]
            if rule.action == "block":
                cats[p.name] = pol.flagged(rule, p, lb.label, lb.score)
            else:
                cats[p.name] = p.num_classes == 2 and lb.label == p.label_names[1]
            scores[p.name] = lb.score
        results.append(
            S.ModerationResult(
                flagged=any(cats.values()),
                categories=cats,
                category_scores=scores,
                category_applied_input_types={k: ["text"] for k in cats},
                singlepass=_labels(out),
            )
        )
    _set_outcome(request, "ok")
    return _json(S.Moderation(id=f"modr-{uuid.uuid4().hex}", model=st.name, results=results))


# ----------------------------------------------------------------------------- the runner


def _is_loopback(host: str) -> bool:
    return host in ("127.0.0.1", "::1", "localhost") or host.startswith("127.")


def bind(host: str, port: int) -> socket.socket:
    """The listening socket (bound here, so a taken port is one clear error and port 0 works)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise SinglepassError(f"--host {host!r}: cannot resolve it ({e})") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise SinglepassError(
            f"cannot listen on {host}:{port} ({e.strerror or e}); is another server using the port? pass --port"
        ) from None
    sock.listen(2048)  # connections wait in the backlog until uvicorn accepts them (never refused)
    sock.set_inheritable(True)
    return sock


def serve(artifact, options: Options, log_level: str = "info") -> int:
    """``singlepass serve``: check the artifact, listen, load it in the background, serve."""
    import uvicorn

    from singlepass.runtime.contract import read_artifact

    if not logging.getLogger().handlers and not log.handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")
    manifest = read_artifact(artifact)  # fail fast on a bad folder or policy, before listening
    pol.resolve(options.policy, manifest.probes)
    if options.max_batch is not None and not 1 <= options.max_batch <= manifest.limits.max_batch:
        raise SinglepassError(
            f"--max-batch must be between 1 and the artifact's limit {manifest.limits.max_batch}, "
            f"not {options.max_batch}"
        )
    if options.max_queue < 1 or options.timeout <= 0 or options.max_body_bytes < 1:
        raise SinglepassError("--max-queue, --timeout and --max-body-bytes must be positive")
    if options.guard:
        from singlepass.serve.guard import check_folder

        check_folder(options.guard)
    if not _is_loopback(options.host) and not options.api_key:
        log.warning(
            "listening on %s without an API key: anyone who can reach it can use it (set --api-key or "
            "$SINGLEPASS_API_KEY)",
            options.host,
        )
    sock = bind(options.host, options.port)
    app = create_app(artifact=manifest, options=options)
    st: ServerState = app.state.singlepass
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5))
    st.on_load_error = lambda e: setattr(server, "should_exit", True)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(
        f"singlepass serve: {st.name} on http://{shown}:{port}/v1 (loading; GET /health answers 200 when ready)",
        file=sys.stderr,
        flush=True,
    )
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if st.load_error:
        raise SinglepassError(f"cannot serve {artifact}: {st.load_error}")
    return 0
