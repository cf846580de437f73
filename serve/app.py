"""The OpenAI-compatible FastAPI application over one artifact: its routes (``create_app``); the
state they share lives in ``state.py``, the API key / size limit / metrics layer in ``asgi.py``,
the uvicorn runner of ``singlepass serve`` in ``runner.py`` (another host, e.g. Ray Serve, can
mount the same app).

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
import logging
import os
import threading
import time
import uuid
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from singlepass.errors import SinglepassError
from singlepass.runtime import policy as pol
from singlepass.serve import schemas as S
from singlepass.serve.asgi import Guard, SSEResponse, sse_event
from singlepass.serve.engine import Job, Out
from singlepass.serve.state import (
    COMPLETIONS_DEFAULT_MAX_TOKENS,
    ERROR_TYPES,
    FINISH,
    ApiError,
    ClientGone,
    Options,
    Plan,
    RequestTimeout,
    ServerState,
    Sink,
    json_response,
    labels_of,
    response_labels_of,
    set_outcome,
    usage_of,
)

log = logging.getLogger("singlepass.serve")


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
        if not (st.ready or st.load_error):  # a host may have loaded it already (Ray: ``ray_app.py``)
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
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        errors = e.errors()
        if any(err.get("type") == "json_invalid" for err in errors):
            where = next((err.get("ctx", {}).get("error") for err in errors if err.get("type") == "json_invalid"), "")
            return ApiError(
                400, f"the request body is not valid JSON ({where})".replace(" ()", ""), code="invalid_json"
            ).response()
        parts, first = [], None
        for err in errors[:5]:
            loc = [str(x) for x in err.get("loc", ()) if x != "body"]
            name = ".".join(loc) or "body"
            first = first or name
            parts.append(f"{name}: {err.get('msg', 'invalid')}")
        return ApiError(422, "; ".join(parts), param=first, code="invalid_value").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        return ApiError(e.status_code, str(e.detail), headers=getattr(e, "headers", None)).response()

    @app.exception_handler(Exception)
    async def _crash(request: Request, e: Exception):
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=e)
        return ApiError(500, "internal server error (see the server log)").response()

    # -- service endpoints
    @app.get("/health", tags=["service"], responses={503: {"description": "not loaded (yet)"}})
    async def health():
        if st.ready and st.engine.alive:
            waiting, running = st.engine.counts()
            replica = {"replica": st.replica, "pid": os.getpid()} if st.replica else {}  # Ray Serve
            return {"status": "ok", "model": st.name, "waiting": waiting, "running": running, **replica}
        status = "error" if st.load_error or st.ready else "loading"
        return JSONResponse({"status": status, "model": st.name, "error": st.load_error}, status_code=503)

    @app.get("/metrics", tags=["service"], response_class=Response)
    async def metrics():
        body, content_type = st.metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models", response_model=S.ModelList, tags=["openai"], responses=documented)
    async def models():
        st.require_ready()
        return json_response(S.ModelList(data=[_card(st)]))

    @app.get("/v1/models/{model_id}", response_model=S.ModelCard, tags=["openai"], responses=documented)
    async def model(model_id: str):
        st.require_ready()
        st.check_model(model_id)
        return json_response(_card(st))

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


async def _complete(st: ServerState, request: Request, plan: Plan, chat: bool):
    """Run one completion job; a JSON response, or a stream once the first event is in."""
    loop = asyncio.get_running_loop()
    sink = Sink(loop)
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
            return SSEResponse(
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
        set_outcome(request, "blocked" if last.blocked_by else "ok")
        ext = labels_of(first, last)
        reason = FINISH.get(last.finish_reason, last.finish_reason)
        usage = usage_of(len(plan.ids), len(tokens))
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
        return json_response(
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
    except RequestTimeout:
        raise _timeout_error(st, request) from None
    except ClientGone:
        set_outcome(request, "cancelled")
        return None


def _timeout_error(st: ServerState, request: Request) -> ApiError:
    set_outcome(request, "timeout")
    return ApiError(504, f"the request did not finish within {st.options.timeout:g} s (--timeout)", code="timeout")


def _stream_closed(st: ServerState, request: Request, job: Job) -> None:
    if not job.finished:
        st.engine.cancel(job)
        request.scope.setdefault("singlepass.outcome", "cancelled")


async def _stream(
    st: ServerState,
    request: Request,
    plan: Plan,
    job: Job,
    sink: Sink,
    first: Out,
    rid: str,
    created: int,
    deadline: float,
    chat: bool,
):
    """The server-sent events of one completion: labels first, then the text, then [DONE]."""
    ext, ptoks = labels_of(first), (plan.ids if plan.token_ids else None)
    count = 0

    def chunk(text: str | None, reason: str | None = None, head: bool = False, tokens=None, usage=None, ext_=None):
        """One SSE event: a chat chunk or a completion; the prompt's labels on the head chunk, the
        response's (``ext_``) on the chunks of the passes that labelled it."""
        if usage:
            choices = []
        elif chat:
            delta = S.Delta() if reason else S.Delta(role="assistant", content="") if head else S.Delta(content=text)
            choices = [S.ChunkChoice(delta=delta, finish_reason=reason, token_ids=tokens)]
        else:
            choices = [S.CompletionChoice(text=text or "", finish_reason=reason, token_ids=tokens)]
        shape = S.ChatCompletionChunk if chat else S.Completion
        return sse_event(
            shape(
                id=rid,
                created=created,
                model=st.name,
                choices=choices,
                usage=usage,
                singlepass=ext if head else ext_,
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
            said = response_labels_of(out)
            if out.text or said or (plan.token_ids and out.token_id is not None):
                tokens = [out.token_id] if plan.token_ids and out.token_id is not None else None
                yield chunk(out.text, tokens=tokens, ext_=said)
            if out.done:
                yield chunk(None, FINISH.get(out.finish_reason, out.finish_reason))
                if plan.usage:
                    yield chunk(None, usage=usage_of(len(plan.ids), count))
                request.scope["singlepass.outcome"] = "blocked" if out.blocked_by else "ok"
                break
            try:
                out = await sink.next(deadline)
            except RequestTimeout:
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
    sinks = [Sink(loop) for _ in ids]
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
        for p in rt.manifest.reading("prompt"):  # a text to moderate is a prompt
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
                singlepass=labels_of(out),
            )
        )
    set_outcome(request, "ok")
    return json_response(S.Moderation(id=f"modr-{uuid.uuid4().hex}", model=st.name, results=results))
