"""CLI for serve/: ``singlepass serve ART`` (FastAPI and uvicorn are imported by the handler only)."""

from __future__ import annotations

import os

from singlepass.errors import SinglepassError


def cmd_serve(args) -> int:
    try:
        from singlepass.serve.runner import serve
        from singlepass.serve.state import Options
    except ImportError as e:
        raise SinglepassError(
            f"the server needs the serve extra ({e.name} is not installed): pip install 'singlepass[serve]'"
        ) from None
    from singlepass.runtime.policy import DEFAULT_REFUSAL, parse_specs

    key = args.api_key if args.api_key is not None else os.environ.get("SINGLEPASS_API_KEY") or None
    opts = Options(
        host=args.host,
        port=args.port,
        api_key=key,
        max_queue=args.max_queue,
        max_batch=args.max_batch,
        prefill_tokens=args.prefill_tokens,
        timeout=args.timeout,
        max_body_bytes=args.max_body_bytes,
        model_name=args.model_name,
        backend=args.backend,
        engine=args.engine,
        threads=args.threads,
        policy=parse_specs(args.policy),
        refusal=args.refusal or DEFAULT_REFUSAL,
        ignore_eos=args.ignore_eos,
        guard=args.guard,
        guard_threads=args.guard_threads,
        memory_arena=args.memory_arena,
    )
    if not args.ray:
        if args.replicas is not None or args.autoscale or args.ray_address or args.ray_metrics_port:
            raise SinglepassError("--replicas, --autoscale, --ray-address and --ray-metrics-port need --ray")
        return serve(args.artifact, opts, log_level=args.log_level)
    try:
        from singlepass.serve import ray_app
    except ImportError as e:
        raise SinglepassError(
            f"--ray needs the ray extra ({e.name} is not installed): pip install 'singlepass[ray]'"
        ) from None
    if args.replicas is not None and args.autoscale:
        raise SinglepassError("give --replicas N or --autoscale MIN:MAX, not both")
    scaling = ray_app.Scaling(
        replicas=args.replicas or 1,
        autoscale=ray_app.parse_autoscale(args.autoscale) if args.autoscale else None,
        max_ongoing_requests=args.max_ongoing_requests,
        num_cpus=args.replica_cpus,
    )
    return ray_app.run(args.artifact, opts, scaling, address=args.ray_address, metrics_port=args.ray_metrics_port)


def register(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server with continuous batching (labels on every completion)",
        description="Serve an artifact over HTTP: /v1/chat/completions, /v1/completions (both also "
        "streamed), /v1/moderations, /v1/models, /health, /metrics. Requests share one "
        "continuously batched engine; every completion carries each fused probe's label "
        "in a 'singlepass' field. Needs the serve extra (fastapi, uvicorn).",
    )
    p.add_argument("artifact", help="artifact folder written by `singlepass export`")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: %(default)s, this machine "
        "only; another address needs an API key to be safe)",
    )
    p.add_argument("--port", type=int, default=8000, help="(default: %(default)s; 0 = any free port)")
    p.add_argument(
        "--policy",
        action="append",
        metavar="PROBE=RULE",
        help="label policy (repeatable): PROBE=report (default), PROBE=block, PROBE=block:0.8, "
        "PROBE=block:LABEL[,LABEL]; a blocked prompt gets the refusal with finish_reason "
        "content_filter",
    )
    p.add_argument("--refusal", default=None, help="text returned for a blocked prompt")
    p.add_argument(
        "--api-key",
        default=None,
        metavar="KEY",
        help="require 'Authorization: Bearer KEY' on every endpoint but /health (default: "
        "$SINGLEPASS_API_KEY; prefer the variable, a command line is visible to other users)",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=128,
        help="requests waiting for a batch row; more are refused with 429 (default: %(default)s)",
    )
    p.add_argument(
        "--max-batch", type=int, default=None, help="rows decoded together (default: the artifact's limits.max_batch)"
    )
    p.add_argument(
        "--prefill-tokens",
        type=int,
        default=512,
        help="prompt tokens prefilled per engine iteration while other rows decode (more: newcomers "
        "start sooner, running streams stall longer; default: %(default)s)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        help="seconds a request may take, queue included; then 504 (default: %(default)s)",
    )
    p.add_argument(
        "--max-body-bytes",
        type=int,
        default=1 << 20,
        help="request body limit; more is refused with 413 (default: %(default)s)",
    )
    p.add_argument("--model-name", default=None, help="the model id clients send (default: the artifact folder's name)")
    p.add_argument(
        "--backend",
        choices=["auto", "cpu", "cuda", "tensorrt"],
        default="auto",
        help="as for `singlepass generate` (default: %(default)s)",
    )
    p.add_argument("--engine", default=None, help="TensorRT engine file of the artifact (default: the last built)")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: all cores)")
    p.add_argument(
        "--memory-arena",
        action="store_true",
        help="keep ONNX Runtime's CPU memory arena (default: off; the arena keeps the memory of every batch "
        "size and width served, and the server's RSS grows with it: 223 -> 1,295 MiB over 60 mixed passes "
        "here, ~0.5 GiB without it, at the same step time)",
    )
    p.add_argument(
        "--guard",
        default=None,
        metavar="DIR",
        help="guard-then-serve: a separate classifier folder (config.json, model.onnx, tokenizer.json; "
        "benchmarks/guards.py's ClassifierGuard) scores each completion prompt before it reaches the "
        "engine; a flagged prompt gets the refusal with finish_reason content_filter and blocked_by "
        "'guard' (for comparing a fused probe with a guard; serve a base artifact)",
    )
    p.add_argument(
        "--guard-threads", type=int, default=None, help="the guard's ONNX Runtime threads (default: --threads)"
    )
    p.add_argument(
        "--ignore-eos",
        action="store_true",
        help="for benchmarks: every request generates its whole max_tokens budget (EOS does not end it), "
        "so each request is the same work",
    )
    ray = p.add_argument_group(
        "Ray Serve", "--ray: replicas behind one endpoint on a Ray cluster (the ray extra; see serve/ray_app.py)"
    )
    ray.add_argument("--ray", action="store_true", help="serve on Ray Serve (a local cluster unless --ray-address)")
    ray.add_argument("--replicas", type=int, default=None, help="replicas, each with its own engine (default: 1)")
    ray.add_argument("--autoscale", default=None, metavar="MIN:MAX", help="autoscale between MIN and MAX replicas")
    ray.add_argument(
        "--max-ongoing-requests",
        type=int,
        default=None,
        help="requests a replica takes at once; Ray queues the rest (default: 2 x the max batch)",
    )
    ray.add_argument(
        "--replica-cpus",
        type=float,
        default=1.0,
        help="CPUs reserved per replica; also its ONNX Runtime threads unless --threads (default: %(default)s)",
    )
    ray.add_argument(
        "--ray-metrics-port",
        type=int,
        default=None,
        help="the local cluster's Prometheus port for Ray's metrics (every replica's, tagged; default: Ray's choice)",
    )
    ray.add_argument(
        "--ray-address", default=None, help="a running Ray cluster ('auto', or HOST:PORT); default: start a local one"
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="(default: %(default)s)",
    )
    p.set_defaults(func=cmd_serve)
