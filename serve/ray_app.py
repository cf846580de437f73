"""``singlepass serve`` on Ray Serve: the same FastAPI app (``app.create_app``), hosted by a Ray
Serve deployment whose replicas each run their own continuous-batching engine.

    singlepass serve ART --ray [--replicas N | --autoscale MIN:MAX] [--ray-address auto]
    serve run singlepass.serve.ray_app:build artifact=/shared/art         # Ray's own CLI
    serve run serve/ray_config.yaml                                        # or a config file

One implementation of the routes, two hosts: uvicorn (``runner.py``) or Ray Serve (here). Ray's
HTTP proxy routes each request to a replica (a Ray actor, one process) and holds what a replica
cannot take yet: a replica accepts ``max_ongoing_requests`` at once (its engine batches them),
the rest wait in Ray's queue, bounded by ``max_queued_requests`` (then a 503 at once).

The artifact reaches each replica by path: on one machine the folder itself; on a cluster, a path
that is the same on every node (a shared file system, or the folder copied to each node). The
driver fingerprints the folder (``artifact_digest``: every file's content hash) and each replica
checks the folder it sees against it, then loads the artifact and its engine, before it reports
healthy: a node with another copy, or a half-copied one, fails its replica with an error naming
the file, and never serves. ``check_health`` reports a replica whose engine loop died.

A replica that dies (killed, out of memory) must not leave clients hanging: Ray starts a
replacement and routes new requests to the live replicas, and the proxy middleware of
``ray_proxy.py`` turns the requests it was serving into a 503 (nothing sent yet) or a final error
event (a stream cut mid-way). Metrics: each replica's ``/metrics`` (as the plain server's) and the
same numbers as Ray metrics tagged by replica (``RayMetrics``), which Ray's metrics agent exports
for the whole cluster on each node's metrics port.

Ray is the ``ray`` extra (``pip install 'singlepass[ray]'``); only this module imports it.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path

from ray import serve

from singlepass.errors import SinglepassError
from singlepass.serve.metrics import LATENCY_BUCKETS, Metrics

log = logging.getLogger("singlepass.serve")

DEPLOYMENT = "singlepass"
APP = "singlepass"


# ----------------------------------------------------------------------------- the artifact


def artifact_digest(folder: str | os.PathLike) -> dict[str, str]:
    """{relative path: sha256} of every file in an artifact folder (the graph, its weights, the
    tokenizer, the probes, the manifest): what a replica must find at its path."""
    from singlepass.files import sha256_file

    root = Path(folder)
    if not root.is_dir():
        raise SinglepassError(f"artifact folder {folder} does not exist")
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


def check_digest(folder: str | os.PathLike, want: dict[str, str]) -> None:
    """Raise naming the first file that differs from the driver's fingerprint (or is missing/extra)."""
    got = artifact_digest(folder)
    for name in sorted(set(want) | set(got)):
        if name not in got:
            raise SinglepassError(f"artifact {folder} on this node lacks {name} (the driver's copy has it)")
        if name not in want:
            raise SinglepassError(f"artifact {folder} on this node has {name}, which the driver's copy lacks")
        if got[name] != want[name]:
            raise SinglepassError(
                f"artifact {folder} on this node differs from the driver's: {name} has sha256 "
                f"{got[name][:12]}, expected {want[name][:12]} (copy the same artifact to every node)"
            )


def digest_id(want: dict[str, str]) -> str:
    """One short id for a fingerprint (logs, /health)."""
    return hashlib.sha256("".join(f"{k}:{v};" for k, v in sorted(want.items())).encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------- metrics


class RayMetrics(Metrics):
    """The server's Prometheus metrics, and the same numbers as Ray metrics tagged by replica
    (names ``ray_singlepass_*`` on the metrics port of every node: the cluster's view)."""

    def __init__(self, replica: str):
        super().__init__()
        from ray.util import metrics as m

        tags = ("replica",)
        self.r = {
            "requests": m.Counter(
                "singlepass_requests", "HTTP requests by endpoint and outcome", tag_keys=(*tags, "endpoint", "outcome")
            ),
            "queue": m.Gauge("singlepass_queue_depth", "requests waiting for a batch row", tag_keys=tags),
            "running": m.Gauge("singlepass_running_sequences", "sequences in the running batch", tag_keys=tags),
            "ttft": m.Histogram(
                "singlepass_time_to_first_token_seconds",
                "arrival to the first token",
                boundaries=list(LATENCY_BUCKETS),
                tag_keys=tags,
            ),
            "prompt": m.Counter("singlepass_prompt_tokens", "prompt tokens prefilled", tag_keys=tags),
            "generated": m.Counter("singlepass_generated_tokens", "tokens generated", tag_keys=tags),
            "labels": m.Counter(
                "singlepass_labels", "labels given to served prompts", tag_keys=(*tags, "probe", "label")
            ),
            "blocks": m.Counter("singlepass_blocks", "prompts refused by the label policy", tag_keys=(*tags, "probe")),
        }
        self.tags = {"replica": replica}

    def queue(self, waiting: int, running: int) -> None:
        super().queue(waiting, running)
        self.r["queue"].set(waiting, self.tags)
        self.r["running"].set(running, self.tags)

    def first(self, job, out, seconds: float) -> None:
        super().first(job, out, seconds)
        self.r["ttft"].observe(seconds, self.tags)
        self.r["prompt"].inc(len(job.ids), self.tags)
        for name, lb in (out.labels or {}).items():
            self.r["labels"].inc(1, {**self.tags, "probe": name, "label": lb.label})
        if out.blocked_by:
            self.r["blocks"].inc(1, {**self.tags, "probe": out.blocked_by})

    def generated(self, n: int) -> None:
        super().generated(n)
        if n:
            self.r["generated"].inc(n, self.tags)

    def request(self, endpoint: str, outcome: str, seconds: float | None) -> None:
        super().request(endpoint, outcome, seconds)
        self.r["requests"].inc(1, {**self.tags, "endpoint": endpoint, "outcome": outcome})


# ----------------------------------------------------------------------------- the deployment


@serve.deployment(name=DEPLOYMENT)
@serve.ingress()
class SinglepassReplica:
    """One replica: checks the artifact against the driver's fingerprint, loads it and starts its
    engine (synchronously: Ray routes nothing to a replica before its constructor returns), then
    serves ``create_app``'s routes."""

    def __init__(self, artifact: str, options, digest: dict[str, str] | None = None):
        from singlepass.serve.app import create_app

        if digest is not None:
            check_digest(artifact, digest)
        ctx = serve.get_replica_context()
        replica = ctx.replica_id.unique_id if ctx is not None else f"pid{os.getpid()}"
        if options.threads is None:  # ONNX Runtime threads: the replica's CPUs, not the node's
            import ray

            cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
            options = replace(options, threads=max(1, int(cpus or 1)))
        self.asgi = create_app(artifact=artifact, options=options)  # ("app" is Ray's)
        st = self.st = self.asgi.state.singlepass
        st.replica, st.metrics = replica, RayMetrics(replica)
        st.load()  # the lifespan then finds it loaded
        if st.load_error:
            raise SinglepassError(f"replica {replica}: cannot serve {artifact}: {st.load_error}")
        log.info("replica %s serving %s (artifact %s)", replica, artifact, digest_id(digest) if digest else "unchecked")

    def __serve_build_asgi_app__(self):
        return self.asgi

    def check_health(self) -> None:
        st = self.st
        if not (st.ready and st.engine is not None and st.engine.alive):
            why = getattr(st.engine, "error", None) or st.load_error or "stopped"
            raise RuntimeError(f"replica {st.replica}: the engine loop is not running ({why})")


# ----------------------------------------------------------------------------- building the application


@dataclass
class Scaling:
    """How many replicas, and what each takes (the deployment options of Ray Serve)."""

    replicas: int = 1
    autoscale: tuple[int, int] | None = None  # (min, max) replicas: autoscaling instead of ``replicas``
    target_ongoing_requests: float | None = None  # autoscaling target per replica (default: max batch / 2)
    max_ongoing_requests: int | None = None  # requests a replica takes at once (default: 2 x its max batch)
    max_queued_requests: int = 256  # requests Ray holds for busy replicas; more: 503 at once
    num_cpus: float = 1.0  # each replica's CPU reservation (Ray schedules replicas by it)
    health_check_period_s: float = 5.0
    health_check_timeout_s: float = 30.0

    def ongoing(self, max_batch: int) -> int:
        """Requests one replica takes at once (``max_ongoing_requests``; default 2 x its max batch)."""
        return self.max_ongoing_requests or 2 * max_batch

    def deployment_options(self, max_batch: int) -> dict:
        opts = dict(
            max_ongoing_requests=self.ongoing(max_batch),
            max_queued_requests=self.max_queued_requests,
            ray_actor_options={"num_cpus": self.num_cpus},
            health_check_period_s=self.health_check_period_s,
            health_check_timeout_s=self.health_check_timeout_s,
        )
        if self.autoscale:
            lo, hi = self.autoscale
            opts["autoscaling_config"] = {
                "min_replicas": lo,
                "max_replicas": hi,
                "target_ongoing_requests": self.target_ongoing_requests or max(1.0, max_batch / 2),
            }
            opts["num_replicas"] = None
        else:
            opts["num_replicas"] = self.replicas
        return opts


def check_scaling(s: Scaling) -> None:
    if s.autoscale:
        lo, hi = s.autoscale
        if not 0 <= lo <= hi or hi < 1:
            raise SinglepassError(f"--autoscale MIN:MAX needs 0 <= MIN <= MAX and MAX >= 1, not {lo}:{hi}")
    elif s.replicas < 1:
        raise SinglepassError(f"--replicas must be >= 1, not {s.replicas}")
    if s.max_queued_requests < 1 and s.max_queued_requests != -1:
        raise SinglepassError("max_queued_requests must be >= 1 (or -1: unbounded, not recommended)")
    if s.num_cpus <= 0:
        raise SinglepassError(f"num_cpus must be > 0, not {s.num_cpus}")


def application(artifact: str | os.PathLike, options, scaling: Scaling | None = None):
    """The Ray Serve application for an artifact (``serve.run`` it, or return it from a builder).
    The artifact is checked here, on the driver, then fingerprinted for the replicas."""
    from singlepass.serve.runner import check_options

    scaling = scaling or Scaling()
    check_scaling(scaling)
    folder = str(Path(artifact).resolve())
    manifest = check_options(folder, options)
    max_batch = options.max_batch or manifest.limits.max_batch
    # every replica's engine takes what Ray lets through: Ray queues the rest
    opts = replace(options, max_queue=max(options.max_queue, scaling.ongoing(max_batch)))
    return SinglepassReplica.options(**scaling.deployment_options(max_batch)).bind(
        folder, opts, artifact_digest(folder)
    )


def build(args: dict):
    """Ray's application builder (``serve run singlepass.serve.ray_app:build artifact=DIR``, or a
    config file's ``import_path``). ``args``: ``artifact`` (required), any ``singlepass serve``
    option by its field name (``policy`` a list or comma-separated ``PROBE=RULE``s, ``max_batch``,
    ``timeout``, ...), and the scaling fields of ``Scaling`` (``replicas``, ``autoscale`` "MIN:MAX",
    ``max_ongoing_requests``, ...). A config file's ``deployments:`` section overrides the scaling."""
    from dataclasses import fields

    from singlepass.runtime.policy import parse_specs
    from singlepass.serve.state import Options

    args = dict(args or {})
    artifact = args.pop("artifact", None)
    if not artifact:
        raise SinglepassError("the application needs artifact=DIR (the artifact folder, the same path on every node)")
    o_fields = {f.name: f for f in fields(Options)}
    s_fields = {f.name: f for f in fields(Scaling)}
    o, s = {}, {}
    for key, value in args.items():
        if key == "policy":
            o["policy"] = parse_specs(value.split(",") if isinstance(value, str) else list(value))
        elif key == "autoscale":
            s["autoscale"] = parse_autoscale(value) if isinstance(value, str) else tuple(value)
        elif key in o_fields and key not in ("host", "port"):
            o[key] = _typed(key, value, o_fields[key].default)
        elif key in s_fields:
            s[key] = _typed(key, value, s_fields[key].default)
        else:
            known = sorted([*o_fields, *s_fields, "artifact"])
            raise SinglepassError(f"unknown application argument {key!r} (known: {', '.join(known)})")
    if "api_key" not in o and os.environ.get("SINGLEPASS_API_KEY"):
        o["api_key"] = os.environ["SINGLEPASS_API_KEY"]
    return application(artifact, Options(**o), Scaling(**s))


NUMERIC_NONE_DEFAULT = {"max_batch": int, "threads": int, "guard_threads": int, "max_ongoing_requests": int}
NUMERIC_NONE_DEFAULT["target_ongoing_requests"] = float


def _typed(key: str, value, default):
    """``serve run``'s key=value arguments are strings: convert them like the field's default."""
    kind = NUMERIC_NONE_DEFAULT.get(key) or (type(default) if isinstance(default, (bool, int, float)) else None)
    if not isinstance(value, str) or kind is None:
        return value
    try:
        if kind is bool:
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(value)
            return value.lower() in ("true", "1")
        return kind(value)
    except ValueError:
        raise SinglepassError(f"application argument {key}={value!r} is not a {kind.__name__}") from None


def parse_autoscale(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in text.split(":"))
    except ValueError:
        raise SinglepassError(f"--autoscale takes MIN:MAX replicas (e.g. 1:4), not {text!r}") from None
    return lo, hi


# ----------------------------------------------------------------------------- singlepass serve --ray


def init_local(**ray_init) -> None:
    """Start a local Ray cluster whose HTTP proxy has ``ray_proxy``'s middleware (the proxy, a
    process the cluster starts, inherits the variable)."""
    import ray

    from singlepass.serve.ray_proxy import CALLBACK, CALLBACK_ENV

    os.environ.setdefault(CALLBACK_ENV, CALLBACK)
    ray.init(include_dashboard=False, log_to_driver=False, **ray_init)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def deployment_message() -> str:
    """What Ray says about the deployment (a failed replica's error), for an error message."""
    try:
        message = serve.status().applications[APP].deployments[DEPLOYMENT].message
    except Exception:  # noqa: BLE001 - no status to add
        return ""
    return f"\n{message.strip()}" if message else ""


def run(artifact, options, scaling: Scaling, address: str | None = None, metrics_port: int | None = None) -> int:
    """``singlepass serve ART --ray``: the application on a Ray cluster (``address``: an existing
    one, e.g. "auto"; default: a local one started here, with the proxy middleware configured and
    Ray's Prometheus metrics on ``metrics_port``), served on ``options.host:options.port`` until
    interrupted (Ctrl-C or SIGTERM: the application and a local cluster are shut down)."""
    import signal
    import sys
    import time

    import ray

    from singlepass.serve.ray_proxy import CALLBACK, CALLBACK_ENV
    from singlepass.serve.runner import log_to_stderr, warn_if_open

    log_to_stderr()
    app = application(artifact, options, scaling)  # every check before Ray starts
    warn_if_open(options)
    if address is None:
        init_local(**({} if metrics_port is None else {"_metrics_export_port": metrics_port}))
    else:
        if os.environ.get(CALLBACK_ENV) != CALLBACK:
            log.warning(
                "connecting to a running Ray cluster: its nodes need %s=%s in their environment (ray start) "
                "for requests of a failed replica to end with an error instead of a cut",
                CALLBACK_ENV,
                CALLBACK,
            )
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    signal.signal(signal.SIGTERM, _interrupt)  # a graceful stop, as on Ctrl-C
    try:
        serve.start(http_options={"host": options.host, "port": options.port})
        shown = f"[{options.host}]" if ":" in options.host else options.host
        how = f"autoscaling {scaling.autoscale[0]}-{scaling.autoscale[1]}" if scaling.autoscale else scaling.replicas
        print(
            f"singlepass serve --ray: starting {how} replica(s) of {Path(artifact).name}; "
            f"http://{shown}:{options.port}/v1 once they are up",
            file=sys.stderr,
            flush=True,
        )
        serve.run(app, name=APP, route_prefix="/", blocking=False)
        port = ray._private.worker.global_worker.node.metrics_export_port
        print(
            f"singlepass serve --ray: ready on http://{shown}:{options.port}/v1 "
            f"(Ray metrics of all replicas: http://127.0.0.1:{port}/metrics on this node)",
            file=sys.stderr,
            flush=True,
        )
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    except Exception as e:  # noqa: BLE001 - a replica that cannot start: its error, not Ray's traceback
        raise SinglepassError(f"cannot serve {artifact} on Ray: {e}{deployment_message()}") from None
    finally:
        serve.shutdown()
        ray.shutdown()
