"""The ASGI layer around the routes: the API key, the body size limit and the request metrics
(``Guard``, outermost), and the server-sent-events response that frees a stream's row on close."""

from __future__ import annotations

import hmac
import time

from fastapi.responses import StreamingResponse

from singlepass.serve.state import ENDPOINTS, OUTCOMES, ApiError, ServerState

REPLICA_HEADER = b"x-singlepass-replica"


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
        path, root = scope.get("path", ""), scope.get("root_path", "")
        if root and path.startswith(root):  # mounted under a prefix (e.g. a Ray Serve route_prefix)
            path = path[len(root) :] or "/"
        endpoint = path if path in ENDPOINTS else "other"
        status = {}

        async def send_status(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                if self.st.replica:  # which replica answered (Ray Serve)
                    message = {
                        **message,
                        "headers": [*message.get("headers", []), (REPLICA_HEADER, self.st.replica.encode())],
                    }
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
                    await ApiError(401, msg, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}).response()(
                        scope, receive, send_status
                    )
                    return
            if scope.get("method") in ("POST", "PUT", "PATCH"):
                limit = self.st.options.max_body_bytes
                too_big = ApiError(
                    413,
                    f"the request body is over the limit of {limit} bytes (--max-body-bytes)",
                    code="request_too_large",
                ).response()
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


class SSEResponse(StreamingResponse):
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


def sse_event(model) -> str:
    return f"data: {model.model_dump_json()}\n\n"
