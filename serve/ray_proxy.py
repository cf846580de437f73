"""An ASGI middleware for Ray Serve's HTTP proxy: a request whose replica died never ends silently.

Ray Serve's proxy answers a request whose replica died before it answered with an empty 500 (or
nothing at all), and cuts a response that had started: a streaming client would see its stream
stop mid-way. ``ReplicaLost`` sits in front of the proxy and finishes such a response in OpenAI's
terms instead:

* nothing sent yet -> a 503 with OpenAI's error body ("the replica serving this request stopped
  (...); retry"), and ``Retry-After``;
* a server-sent event stream cut -> a last ``data: {"error": ...}`` event and ``data: [DONE]``;
* any other body cut -> its end (the client sees a short body; JSON ones fail to parse).

Ray reads proxy middlewares from the function named by ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``
in the proxy's environment (``middlewares`` below): ``singlepass serve --ray`` sets it for the
cluster it starts; for a cluster started with ``ray start``, set it on every node (the README's
multi-node section). Starlette and the server's pydantic schemas only; no Ray import.
"""

from __future__ import annotations

import logging

log = logging.getLogger("singlepass.serve")

CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
CALLBACK = "singlepass.serve.ray_proxy:middlewares"
LOST = "the replica serving this request stopped before it finished (it failed or was killed); retry"


def error_body(message: str = LOST) -> bytes:
    """OpenAI's error shape, from the server's own schema (pydantic only: no server stack here)."""
    from singlepass.serve.schemas import ErrorBody, ErrorResponse

    err = ErrorBody(message=message, type="service_unavailable", code="replica_lost")
    return ErrorResponse(error=err).model_dump_json().encode()


class ReplicaLost:
    """Finishes the responses the wrapped app (Ray's proxy) leaves unfinished (see the module)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        seen = {"started": False, "status": 0, "sse": False, "ended": False}

        async def watch(message):
            if message["type"] == "http.response.start":
                headers = {k.lower(): v for k, v in message.get("headers", [])}
                seen.update(
                    started=True,
                    status=message["status"],
                    sse=headers.get(b"content-type", b"").startswith(b"text/event-stream"),
                )
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                seen["ended"] = True
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            if not seen["ended"]:
                await self._finish(scope, send, seen)

    @staticmethod
    async def _finish(scope, send, seen) -> None:
        try:
            if not seen["started"]:
                log.warning("a replica stopped before answering %s; answering 503", scope.get("path"))
                await send(
                    {
                        "type": "http.response.start",
                        "status": 503,
                        "headers": [(b"content-type", b"application/json"), (b"retry-after", b"1")],
                    }
                )
                await send({"type": "http.response.body", "body": error_body(), "more_body": False})
            elif seen["sse"]:
                log.warning("a replica stopped mid-stream on %s; ending the stream with an error", scope.get("path"))
                tail = b"data: " + error_body() + b"\n\ndata: [DONE]\n\n"
                await send({"type": "http.response.body", "body": tail, "more_body": False})
            else:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except Exception:  # noqa: BLE001 - the client is gone too: nothing left to tell
            pass


def middlewares():
    """Ray Serve's proxy callback (``CALLBACK_ENV``): the proxy's middlewares."""
    from starlette.middleware import Middleware

    return [Middleware(ReplicaLost)]
