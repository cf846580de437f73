"""An OpenAI-compatible HTTP server over an exported artifact, with continuous batching.

    singlepass serve ART [--host 127.0.0.1] [--port 8000] [--policy NAME=RULE ...] [--api-key KEY]
                         [--guard DIR] [--ignore-eos]

Endpoints: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (both also as server-sent
events with ``stream: true``), ``POST /v1/moderations``, ``GET /v1/models``, ``GET /health`` and
``GET /metrics`` (Prometheus). Every completion carries each fused probe's label and score in a
``"singlepass"`` field beside the standard ones (on the first chunk of a stream).

The parts: ``engine.py`` (the one engine loop: continuous, iteration-level batching over
``runtime/passes.py``; numpy only), ``schemas.py`` (the OpenAI request/response shapes as pydantic
models and the checks of unsupported fields), ``app.py`` (the FastAPI routes), ``state.py`` (their
shared state: options, errors, a request's plan), ``asgi.py`` (auth, body limit, request metrics,
the SSE response), ``runner.py`` (the uvicorn runner of ``singlepass serve``), ``metrics.py`` (the
Prometheus metrics), ``guard.py`` (``--guard DIR``: guard-then-serve, a separate classifier in front
of the engine, to compare with a fused probe as ``singlepass bench serve`` does); ``ray_app.py``
(``singlepass serve --ray``: the same app as a Ray Serve deployment, replicas and autoscaling) with
``ray_proxy.py`` (the proxy middleware that ends a dead replica's requests explicitly) and
``ray_config.yaml`` (a ``serve run``/``serve deploy`` config). FastAPI, uvicorn,
pydantic and prometheus-client are the ``serve`` extra (``pip install singlepass[serve]``); none of
them (nor Ray, the ``ray`` extra) is imported by ``import singlepass`` or ``singlepass --help``, only by
the ``serve`` command.
"""
