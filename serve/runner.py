"""``singlepass serve``: the listening socket and the uvicorn runner around ``app.create_app``."""

from __future__ import annotations

import logging
import socket
import sys

from singlepass.errors import SinglepassError
from singlepass.runtime import policy as pol
from singlepass.serve.app import create_app
from singlepass.serve.state import Options, ServerState

log = logging.getLogger("singlepass.serve")


def is_loopback(host: str) -> bool:
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


def check_options(artifact, options: Options):
    """The artifact folder and the options, checked before anything listens -> the Manifest
    (one clear error for a bad folder, policy, limit or guard folder)."""
    from singlepass.runtime.contract import read_artifact

    manifest = read_artifact(artifact)
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
    return manifest


def log_to_stderr() -> None:
    if not logging.getLogger().handlers and not log.handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")


def warn_if_open(options: Options) -> None:
    if not is_loopback(options.host) and not options.api_key:
        log.warning(
            "listening on %s without an API key: anyone who can reach it can use it (set --api-key or "
            "$SINGLEPASS_API_KEY)",
            options.host,
        )


def serve(artifact, options: Options, log_level: str = "info") -> int:
    """``singlepass serve``: check the artifact, listen, load it in the background, serve."""
    import uvicorn

    log_to_stderr()
    manifest = check_options(artifact, options)  # fail fast, before listening
    warn_if_open(options)
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
