"""Ray Serve scaling and failover (``singlepass bench serve --ray``): 1 vs 2 replicas, and a replica
killed under load.

    singlepass bench serve --ray --artifact ART [--levels 16 64] [--repeats 3] [--max-tokens 32]
                           [--failover-concurrency 16] [--failover-seconds 60] [--kill-at 15]

Configurations, all started first, then measured in alternation (the order rotates per repeat and
level), the same closed-loop streaming load as ``bench serve`` (``serve_load.run_load``):

* ``plain`` (``--with-plain``): ``singlepass serve`` (one process, ONNX Runtime on ``--threads``
  threads): the reference without Ray (a fourth model process: at 64 streams ONNX Runtime's arenas
  of the four outgrew this 24 GiB machine and Ray's memory monitor killed a replica);
* ``ray-1``: the Ray Serve application (``serve/ray_app.py``), 1 replica reserving 1 CPU (so 1
  ONNX Runtime thread);
* ``ray-2``: the same application with 2 replicas of 1 CPU each.

Both Ray applications run in one local Ray cluster started here with 3 logical CPUs (each replica
reserves one; only the configuration being measured gets requests), behind Ray's one HTTP proxy
(route prefixes ``/ray-1`` and ``/ray-2``), with the proxy middleware of ``serve/ray_proxy.py``.

Failover: ``ray-2`` under ``--failover-concurrency`` clients for ``--failover-seconds``;
``--kill-at`` seconds in, one replica's process is SIGKILLed (its pid from ``/health``). Counted:
requests answered, failed with an explicit error (an HTTP 5xx with OpenAI's error body, or a final
error event on a stream) and lost (anything else: a stream cut without an error, a client timeout;
target 0); the seconds from the kill until ``/health`` is answered by the replacement replica and
until the replacement finished its first completion; tokens/s before, during and after.

Writes ``serve_ray.md`` and ``serve_ray.json`` (``--table-only`` redraws the first from the second).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

from singlepass.benchmarks.latency_report import fmt, table
from singlepass.benchmarks.serve_bench import log
from singlepass.benchmarks.serve_report import paired, ranged, stat
from singlepass.errors import SinglepassError
from singlepass.files import atomic_write

CONFIGS = {
    "plain": "singlepass serve, one process ({threads} ONNX Runtime threads)",
    "ray-1": "Ray Serve, 1 replica x 1 CPU",
    "ray-2": "Ray Serve, 2 replicas x 1 CPU",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def add_args(p) -> None:
    g = p.add_argument_group("Ray Serve (--ray)")
    g.add_argument("--ray", action="store_true", help="1 vs 2 Ray Serve replicas and a replica kill (serve_ray.md)")
    g.add_argument("--failover-concurrency", type=int, default=16, help="streams during the kill (default: 16)")
    g.add_argument("--failover-seconds", type=float, default=60.0, help="length of the failover run (default: 60)")
    g.add_argument("--kill-at", type=float, default=15.0, help="seconds into it a replica is killed (default: 15)")
    g.add_argument(
        "--with-plain",
        action="store_true",
        help="also measure the plain server (a 4th model process: at 64 streams the four outgrew 24 GiB here)",
    )


# --- the servers ---------------------------------------------------------------------------------


def start_ray(args, artifact: str, policy: dict) -> str:
    """One local Ray cluster with the ray-1 and ray-2 applications -> the proxy's URL."""
    from ray import serve

    from singlepass.serve.ray_app import Scaling, application, init_local
    from singlepass.serve.state import Options

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    init_local(num_cpus=3)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    for name, n in (("ray-1", 1), ("ray-2", 2)):
        opts = Options(model_name=name, ignore_eos=True, timeout=args.request_timeout, policy=policy)
        serve.run(application(artifact, opts, Scaling(replicas=n, num_cpus=1)), name=name, route_prefix=f"/{name}")
        log(f"  {name}: {n} replica(s) up")
    return f"http://127.0.0.1:{port}"


def health_replicas(url: str, want: int = 1, tries: int = 40, patience: float = 30.0) -> dict[str, int]:
    """{replica id: pid} seen on ``url``/health: rounds of ``tries`` requests until ``want`` replicas
    have answered or ``patience`` seconds have passed (a replica busy finishing the last run's
    requests, or still joining the router, may sit out a round)."""
    from singlepass.benchmarks.serve_load import http_module

    httpx, seen = http_module(), {}
    deadline = time.monotonic() + patience
    while True:
        for _ in range(tries):
            r = httpx.get(url + "/health", timeout=10, trust_env=False)
            if r.status_code == 200:
                seen[r.json()["replica"]] = r.json()["pid"]
        if len(seen) >= want or time.monotonic() > deadline:
            return seen
        time.sleep(0.5)


# --- failover ------------------------------------------------------------------------------------


def explicit(error: str | None) -> bool:
    """An explicit failure: an HTTP 5xx with an error body, or a final error event on a stream."""
    return bool(error) and (error.startswith("HTTP 5") or error.startswith("error event"))


async def failover(args, url: str, model: str, prompts: list[str]) -> dict:
    from singlepass.benchmarks.serve_load import http_module, run_load

    httpx = http_module()
    before = health_replicas(url, want=2)
    if len(before) < 2:
        raise SinglepassError(f"failover needs 2 replicas answering /health, saw {sorted(before)}")
    victim, pid = sorted(before.items())[0]
    health: list[tuple[float, str | None]] = []
    t0 = time.perf_counter()
    done = asyncio.Event()

    async def monitor():
        async with httpx.AsyncClient(timeout=5, trust_env=False) as c:
            while not done.is_set():
                try:
                    r = await c.get(url + "/health")
                    health.append((time.perf_counter() - t0, r.json().get("replica") if r.status_code == 200 else None))
                except (httpx.HTTPError, ValueError):
                    health.append((time.perf_counter() - t0, None))
                await asyncio.sleep(0.1)

    async def killer():
        await asyncio.sleep(args.kill_at)
        os.kill(pid, signal.SIGKILL)
        return time.perf_counter() - t0

    bound = int(args.failover_seconds * 1000) + args.failover_concurrency
    mon = asyncio.create_task(monitor())
    kill = asyncio.create_task(killer())
    res = await run_load(
        url,
        model,
        prompts,
        args.failover_concurrency,
        bound,
        args.max_tokens,
        args.failover_seconds,
        args.request_timeout,
        keep=True,
    )
    done.set()
    await mon
    t_kill = await kill
    outs = res.pop("outcomes")
    new = [(t, rep) for t, rep in health if t > t_kill and rep and rep not in before]
    health_s = new[0][0] - t_kill if new else None
    finished = [o["start"] + o["latency"] for o in outs if o["ok"] and o["replica"] and o["replica"] not in before]
    served_s = min(finished) - t_kill if finished else None
    failed = [o for o in outs if not o["ok"]]
    explicit_n = sum(explicit(o["error"]) for o in failed)
    end = t_kill + (served_s or 0.0)

    def rate(lo: float, hi: float) -> float | None:
        toks = sum(o["tokens"] for o in outs if o["ok"] and lo <= o["start"] + o["latency"] < hi)
        return toks / (hi - lo) if hi > lo else None

    last = max((o["start"] + (o["latency"] or 0.0) for o in outs), default=t_kill)
    return {
        "summary": res,
        "victim": victim,
        "replicas_before": sorted(before),
        "kill_at_s": t_kill,
        "sent": res["sent"],
        "answered": res["answered"],
        "failed_explicit": explicit_n,
        "lost": len(failed) - explicit_n,
        "failure_kinds": res["error_kinds"],
        "replacement_health_s": health_s,
        "replacement_served_s": served_s,
        "tokens_per_s_before": rate(0.0, t_kill),
        "tokens_per_s_until_replaced": rate(t_kill, end) if served_s else None,
        "tokens_per_s_after": rate(end, last) if served_s else None,
    }


# --- the run -------------------------------------------------------------------------------------


def run(args) -> int:
    from singlepass.benchmarks.machine import ort_machine
    from singlepass.benchmarks.outputs import results_dir
    from singlepass.benchmarks.serve_bench import levels, load_prompts, prepare, rotated, server_configs
    from singlepass.benchmarks.serve_load import ServerProcess, run_load

    out_dir = results_dir(args.out)
    if args.table_only:
        res = json.loads((out_dir / "serve_ray.json").read_text())
        write_report(res, out_dir)
        return 0
    if not 0 < args.kill_at < args.failover_seconds:
        raise SinglepassError("--kill-at must be between 0 and --failover-seconds")
    args.levels = levels(args)
    args.configs = ["batched"]  # prepare() and server_configs(): the fused artifact only
    command = getattr(args, "command", None) or "python -m singlepass.benchmarks.serve_bench " + " ".join(sys.argv[1:])
    m = ort_machine()
    log(f"machine: {m['cpu']}, os.cpu_count() = {m['cpu_count']}, {m['memory_gib']} GiB, load {m['loadavg']}")
    arts = prepare(args, out_dir)
    prompts, pstats = load_prompts(args, arts["fused"])
    plain = server_configs(args, arts)[0] if args.with_plain else None
    from singlepass.runtime.contract import read_artifact
    from singlepass.runtime.policy import parse_specs

    fused = read_artifact(arts["fused"])
    policy = (
        parse_specs([f"{p.name}=block" for p in fused.probes if p.num_classes == 2])
        if args.fused_policy == "block"
        else None
    )
    runs, server = [], None
    t1 = time.perf_counter()
    try:
        if plain:
            log(f"starting plain: singlepass serve {plain['artifact']} {' '.join(plain['flags'])}")
            server = ServerProcess(plain["artifact"], "plain", plain["flags"]).start()
        log("starting a local Ray cluster with ray-1 and ray-2 ...")
        proxy = start_ray(args, arts["fused"], policy)
        urls = {"ray-1": f"{proxy}/ray-1", "ray-2": f"{proxy}/ray-2", **({"plain": server.url} if plain else {})}
        cfgs = list(urls)
        for name in cfgs:
            if args.warmup:
                w = asyncio.run(run_load(urls[name], name, prompts, args.warmup, args.warmup, args.max_tokens, 600))
                if w["answered"] == 0:
                    raise SinglepassError(f"{name}: no warm-up request was answered: {w['error_kinds']}")
        for r in range(args.repeats):
            for li, level in enumerate(args.levels):
                for name in rotated(cfgs, r + li):
                    n = args.requests or max(16, 4 * level)
                    res = asyncio.run(
                        run_load(
                            urls[name],
                            name,
                            prompts,
                            level,
                            n,
                            args.max_tokens,
                            args.duration,
                            args.request_timeout,
                        )
                    )
                    res.update(config=name, repeat=r, loadavg=os.getloadavg())
                    runs.append(res)
                    log(
                        f"repeat {r + 1}/{args.repeats} c={level:<3} {name:<6} {res['answered']}/{res['sent']} "
                        f"answered, {res['errors']} errors, {res['tokens_per_s']:.1f} tok/s, TTFT p50 "
                        f"{fmt(res['ttft_p50_ms'], 0)} p99 {fmt(res['ttft_p99_ms'], 0)} ms"
                    )
        log(f"failover: ray-2, {args.failover_concurrency} streams, a replica killed at {args.kill_at:g} s ...")
        fo = asyncio.run(failover(args, urls["ray-2"], "ray-2", prompts))
        log(
            f"  sent {fo['sent']}, answered {fo['answered']}, failed (explicit) {fo['failed_explicit']}, lost "
            f"{fo['lost']}; replacement on /health after {fmt(fo['replacement_health_s'], 1)} s, serving after "
            f"{fmt(fo['replacement_served_s'], 1)} s"
        )
    finally:
        if server is not None:
            server.stop()
        try:
            import ray
            from ray import serve

            if ray.is_initialized():
                serve.shutdown()
                ray.shutdown()
        except ImportError:
            pass
    res = {
        "title": f"Ray Serve scaling on {Path(str(fused.backbone.get('source', 'model'))).name}, "
        f"{args.max_tokens} tokens per request",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": m,
        "loadavg_end": os.getloadavg(),
        "command": command,
        "protocol": {
            "levels": args.levels,
            "repeats": args.repeats,
            "max_tokens": args.max_tokens,
            "duration_s": args.duration,
            "threads_plain": args.threads,
            "prompts": pstats,
            "failover": {"concurrency": args.failover_concurrency, "seconds": args.failover_seconds},
        },
        "configs": {k: v.format(threads=args.threads) for k, v in CONFIGS.items() if k in urls},
        "artifact": arts["fused"],
        "runs": runs,
        "failover": fo,
        "measure_seconds": time.perf_counter() - t1,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / "serve_ray.json", json.dumps(res, indent=1, default=str))
    write_report(res, out_dir)
    log(f"\nwrote {out_dir / 'serve_ray.md'} and serve_ray.json (measurements {res['measure_seconds']:.0f} s)")
    return 0


# --- the report ----------------------------------------------------------------------------------


def write_report(res: dict, out_dir: Path) -> str:
    m, p = res["machine"], res["protocol"]
    load0, load1 = (", ".join(f"{x:.2f}" for x in la) for la in (m["loadavg"], res["loadavg_end"]))
    rows = []
    for level in p["levels"]:
        for name in res["configs"]:
            runs = [r for r in res["runs"] if r["config"] == name and r["concurrency"] == level]
            rows.append(
                [
                    str(level),
                    name,
                    ranged(stat(runs, "tokens_per_s")),
                    ranged(stat(runs, "requests_per_s"), 2),
                    f"{ranged(stat(runs, 'ttft_p50_ms'), 0)} / {ranged(stat(runs, 'ttft_p99_ms'), 0)}",
                    f"{ranged(stat(runs, 'latency_p50_ms'), 0)} / {ranged(stat(runs, 'latency_p99_ms'), 0)}",
                    str(sum(r["errors"] for r in runs)),
                ]
            )
    ratios = []
    pairs = [("ray-2", "ray-1")] + ([("ray-2", "plain"), ("ray-1", "plain")] if "plain" in res["configs"] else [])
    for level in p["levels"]:
        cells = [str(level)]
        for a, b in pairs:
            cells.append(ranged(paired(res, (a, level), (b, level), "tokens_per_s"), 2))
        ratios.append(cells)
    fo = res["failover"]
    lines = [
        f"# {res['title']}",
        "",
        f"{res['date']}; {m['cpu']}, {m['cpu_count']} cores, {m['memory_gib']} GiB; load average at the start "
        f"{load0}, at the end {load1}.",
        "",
        "```bash",
        res["command"],
        "```",
        "",
        "Configurations: " + "; ".join(f"`{k}`: {v}" for k, v in res["configs"].items()) + ". "
        f"{p['repeats']} alternating repeats (order rotated), closed-loop streaming clients, {p['max_tokens']} tokens "
        f"per request (EOS ignored), ToxicChat test prompts ({p['prompts']['used']} used, median "
        f"{p['prompts']['tokens_median']:.0f} tokens). Cells: median over repeats [range].",
        "",
        table(
            ["streams", "config", "tokens/s", "requests/s", "TTFT p50 / p99 (ms)", "latency p50 / p99 (ms)", "errors"],
            rows,
            ["---:", "---", "---:", "---:", "---:", "---:", "---:"],
        ),
        "",
        "Tokens/s ratios within a repeat (median [range]):",
        "",
        table(["streams", *(f"{a} / {b}" for a, b in pairs)], ratios),
        "",
        f"## Failover: a replica of ray-2 killed (SIGKILL) {fo['kill_at_s']:.1f} s into a "
        f"{p['failover']['seconds']:g} s run at {p['failover']['concurrency']} streams",
        "",
        table(
            [
                "sent",
                "answered",
                "failed, explicit error",
                "lost (target 0)",
                "replacement on /health",
                "replacement served",
            ],
            [
                [
                    str(fo["sent"]),
                    str(fo["answered"]),
                    str(fo["failed_explicit"]),
                    str(fo["lost"]),
                    f"{fmt(fo['replacement_health_s'], 1)} s",
                    f"{fmt(fo['replacement_served_s'], 1)} s",
                ]
            ],
            ["---:"] * 6,
        ),
        "",
        f"Tokens/s: {fmt(fo['tokens_per_s_before'])} before the kill, {fmt(fo['tokens_per_s_until_replaced'])} until "
        f"the replacement served, {fmt(fo['tokens_per_s_after'])} after. Failures: "
        + (", ".join(f"{k} ({v})" for k, v in fo["failure_kinds"].items()) or "none")
        + ".",
        "",
    ]
    text = "\n".join(lines)
    atomic_write(out_dir / "serve_ray.md", text)
    print(text)
    return text
