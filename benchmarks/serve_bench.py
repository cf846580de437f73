"""Serving benchmark: the real OpenAI-compatible server under concurrent streaming load.

    singlepass bench serve [--levels 1 4 16 64] [--max-tokens 32] [--repeats 3] [--soak-seconds 600]
                           [--artifact ART] [--base-artifact BASE] [--guard DIR] [--out DIR] [--table-only]

Writes, to ``--out DIR`` (default: ``./benchmarks/results`` under the current directory),
``serve.md`` (tables, targets met or missed, machine, the command), ``serve.png`` and
``serve.json`` (every run); ``--table-only`` redraws the first two from the third
(``benchmarks/serve_report.py``).

Configurations, each a ``singlepass serve`` child process on a free 127.0.0.1 port
(``benchmarks/serve_load.py``), ``--ignore-eos`` (every request generates exactly
``--max-tokens`` tokens: the same work everywhere), ``--threads`` ONNX Runtime threads:

* ``batched``: the artifact with the fused gate probe, continuous batching (rows up to the
  artifact's ``limits.max_batch``, or ``--max-batch``), its binary probes on ``block``;
* ``one-at-a-time``: the same server with ``--max-batch 1`` (the engine serves one request at a
  time, the others queue);
* ``guard``: guard-then-serve through the same server: the base artifact (no probe) behind
  ``--guard DIR``, the fine-tuned MiniLM classifier (``benchmarks/guards.py``), which scores each
  prompt before the engine admits it; a flagged prompt is refused as a block would refuse it.

Load (``run_load``): closed-loop streaming clients at each concurrency level, each request one
ToxicChat test prompt (``load_dataset("toxicchat", "test", limit=--prompts)``, those that fit the
artifact's limits, in order) through the chat template, greedy. All servers are started first and
warmed up; then, per repeat, every level runs every configuration (the configuration order
rotates), so slow drift of a shared machine hits all of them alike; tables give the median over
repeats. Finally the soak: ``--soak-seconds`` at concurrency 32 against ``batched`` with the
server's VmRSS sampled every ``--rss-interval`` seconds.

Artifacts: ``--artifact`` / ``--base-artifact``, else the latency benchmark's (``latency_prepare``:
probes and exports cached in ``$SINGLEPASS_CACHE/bench-artifacts``; an export made here records
``max_batch`` = the highest level). The guard: ``--guard``, else ``ensure_classifier`` (cached in
``$SINGLEPASS_CACHE/guards``). The demo's ``artifacts/demo/artifact`` (SmolLM2 + gate probe
``safety``) works as ``--artifact``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from singlepass.benchmarks.outputs import add_out_arg, results_dir
from singlepass.errors import SinglepassError

if TYPE_CHECKING:
    from singlepass.models.backbone import Backbone

CONFIGS = {
    "batched": "fused probe, continuous batching",
    "one-at-a-time": "fused probe, one request at a time (--max-batch 1)",
    "guard": "guard-then-serve: separate guard, then the base LLM (continuous batching)",
}


def log(msg: str) -> None:
    print(msg, flush=True)


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(
        prog="python -m singlepass.benchmarks.serve_bench", description=__doc__.split("\n")[0]
    )
    p.add_argument(
        "--levels", type=int, nargs="+", default=None, help="concurrent streams (default: 1 4 16 64; --ray: 16 64)"
    )
    p.add_argument("--max-tokens", type=int, default=32, help="tokens per request, EOS ignored (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="alternating repeats (default: %(default)s)")
    p.add_argument(
        "--requests", type=int, default=0, help="requests per run (default 0: 4 x the concurrency, at least 16)"
    )
    p.add_argument("--duration", type=float, default=60.0, help="no request starts after this many s of a run")
    p.add_argument("--request-timeout", type=float, default=600.0, help="client timeout per request (s)")
    p.add_argument("--warmup", type=int, default=8, help="requests per server before measuring (default: %(default)s)")
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS), help="(default: all)")
    p.add_argument("--soak-seconds", type=float, default=600.0, help="0 = no soak (default: %(default)s)")
    p.add_argument("--soak-concurrency", type=int, default=32)
    p.add_argument("--rss-interval", type=float, default=5.0, help="seconds between VmRSS samples in the soak")
    p.add_argument("--prompts", type=int, default=500, help="ToxicChat test rows to draw prompts from")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="ONNX Runtime threads per server")
    p.add_argument("--max-batch", type=int, default=None, help="engine rows (default: the artifact's limit)")
    p.add_argument(
        "--prefill-tokens",
        type=int,
        default=None,
        help="the servers' `serve --prefill-tokens` (prompt tokens prefilled per engine iteration while rows "
        "decode; default: the server's)",
    )
    p.add_argument(
        "--fused-policy",
        choices=["block", "report"],
        default="block",
        help="the fused artifact's binary probes: block (refuse flagged prompts, as the guard does) or report",
    )
    p.add_argument("--artifact", default=None, help="artifact with the fused probe (default: prepared)")
    p.add_argument("--base-artifact", default=None, help="artifact without probes for `guard` (default: prepared)")
    p.add_argument("--guard", default=None, metavar="DIR", help="ClassifierGuard folder (default: the MiniLM guard)")
    p.add_argument("--model", default="smollm2-135m", help="backbone of the prepared artifacts")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--data-dir", default=None)
    add_out_arg(p)
    p.add_argument("--table-only", action="store_true", help="only rewrite serve.md and serve.png from serve.json")
    from singlepass.benchmarks.serve_ray import add_args

    add_args(p)
    return p


def levels(args: argparse.Namespace) -> list[int]:
    """The concurrency levels: ``--levels``, else 1 4 16 64 (``--ray``: 16 64)."""
    return args.levels or ([16, 64] if getattr(args, "ray", False) else [1, 4, 16, 64])


def requests_for(args: argparse.Namespace, level: int) -> int:
    return args.requests or max(16, 4 * level)


# --- preparation ---------------------------------------------------------------------------------


def prepare(args: argparse.Namespace, out_dir: Path) -> dict:
    """The fused and base artifacts and the guard folder (given, or the latency benchmark's)."""
    need_base = "guard" in args.configs
    arts = {"fused": args.artifact, "base": args.base_artifact, "source": "given (--artifact / --base-artifact)"}
    if not args.artifact or (need_base and not args.base_artifact):
        from singlepass.benchmarks.latency_prepare import ensure_artifacts, ensure_probes
        from singlepass.models.backbone import cache_root, load_backbone

        args.cache_root = cache_root(args.cache_dir)
        rows = max(levels(args) + [args.soak_concurrency])
        args.batch = [rows]  # ensure_artifacts exports with max_batch = max(8, max(batch))
        bb = load_backbone(args.model, args.cache_dir)
        probes = ensure_probes(args, bb, out_dir / "accuracy" / "toxicchat")
        made = ensure_artifacts(args, bb, probes)
        for name in ("gate", "base"):
            made[name] = enough_rows(args, bb, probes, name, Path(made[name]), rows)
        del bb
        arts["fused"] = arts["fused"] or str(made["gate"])
        arts["base"] = arts["base"] or str(made["base"])
        arts["source"] = f"latency benchmark's artifacts (gate probe: {probes['gate']['source']})"
    if need_base:
        if args.guard:
            arts["guard"] = args.guard
        else:
            from singlepass.benchmarks.guards import ensure_classifier

            arts["guard"] = str(ensure_classifier(args.cache_dir, args.data_dir, threads=args.threads, log=log))
    return arts


def enough_rows(args: argparse.Namespace, bb: "Backbone", probes: dict, name: str, folder: Path, rows: int) -> Path:
    """``folder`` when its ``limits.max_batch`` (the engine's row limit) allows ``rows`` streams,
    else the same configuration exported once more with that limit, to
    ``bench-artifacts/serve-NAME`` (an artifact the latency benchmark cached with a smaller one)."""
    from singlepass.benchmarks.latency_prepare import artifact_current, artifact_plan
    from singlepass.runtime.contract import read_artifact

    if read_artifact(folder).limits.max_batch >= rows:
        return folder
    specs = artifact_plan(probes)[name]
    wide = args.cache_root / "bench-artifacts" / f"serve-{name}"
    if artifact_current(wide, specs, bb.fingerprint["sha256"]) and read_artifact(wide).limits.max_batch >= rows:
        return wide
    from singlepass.export.pipeline import export_artifact

    log(f"exporting {name!r} with max_batch {rows} (the cached one allows fewer rows) -> {wide} ...")
    export_artifact(wide, specs, backbone=bb, force=True, max_batch=rows, log=lambda m: None)
    return wide


def load_prompts(args: argparse.Namespace, artifact: str) -> tuple[list[str], dict]:
    """ToxicChat test prompts that fit the artifact with ``--max-tokens`` new tokens (a longer one
    would be a 400), in dataset order -> (prompts, their token statistics)."""
    import numpy as np

    from singlepass.models.data import load_dataset
    from singlepass.runtime.contract import read_artifact
    from singlepass.runtime.tokenize import PromptTokenizer

    m = read_artifact(artifact)
    tok = PromptTokenizer(m.folder, m)
    lim = m.limits
    ds = load_dataset("toxicchat", "test", args.data_dir, limit=args.prompts)
    keep, lengths = [], []
    for text in ds.texts:
        if not text.strip():
            continue
        n = len(tok.encode(text, sys.maxsize)[0])
        if n <= lim.max_prompt_length and n + args.max_tokens <= lim.max_total_length:
            keep.append(text)
            lengths.append(n)
    if not keep:
        raise SinglepassError(f"no ToxicChat prompt fits {artifact}'s limits with --max-tokens {args.max_tokens}")
    stats = {
        "loaded": len(ds),
        "used": len(keep),
        "skipped_too_long": len(ds) - len(keep),
        "tokens_median": float(np.median(lengths)),
        "tokens_p90": float(np.percentile(lengths, 90)),
        "tokens_max": int(max(lengths)),
    }
    return keep, stats


def server_configs(args: argparse.Namespace, arts: dict) -> list[dict]:
    from singlepass.runtime.contract import read_artifact

    common = ["--threads", str(args.threads), "--ignore-eos", "--timeout", str(args.request_timeout)]
    common += ["--max-queue", str(max(128, 2 * max(levels(args) + [args.soak_concurrency])))]
    batch = ["--max-batch", str(args.max_batch)] if args.max_batch else []
    if args.prefill_tokens:
        common += ["--prefill-tokens", str(args.prefill_tokens)]
    fused = read_artifact(arts["fused"])
    policy = []
    if args.fused_policy == "block":
        for p in fused.probes:
            if p.num_classes == 2:
                policy += ["--policy", f"{p.name}=block"]
    flags = {
        "batched": (arts["fused"], common + batch + policy),
        "one-at-a-time": (arts["fused"], common + ["--max-batch", "1"] + policy),
        "guard": (
            arts.get("base"),
            common + batch + ["--guard", str(arts.get("guard")), "--guard-threads", str(args.threads)],
        ),
    }
    return [{"name": n, "label": CONFIGS[n], "artifact": str(flags[n][0]), "flags": flags[n][1]} for n in args.configs]


def rotated(xs: list, k: int) -> list:
    k %= max(1, len(xs))
    return xs[k:] + xs[:k]


def card(url: str, model: str) -> dict:
    """What the server says about itself (GET /v1/models/NAME: limits, probes, policy, guard)."""
    from singlepass.benchmarks.serve_load import http_module

    r = http_module().get(f"{url}/v1/models/{model}", timeout=30, trust_env=False)
    r.raise_for_status()
    return r.json().get("singlepass", {})


# --- measuring ---------------------------------------------------------------------------------


def measure(args: argparse.Namespace, cfgs: list[dict], prompts: list[str]) -> tuple[list[dict], dict | None]:
    """Start every server, warm up, alternate the runs, then soak -> (runs, soak)."""
    from singlepass.benchmarks.serve_load import ServerProcess, counters_delta, run_load, soak

    servers: dict[str, ServerProcess] = {}
    runs: list[dict] = []
    soak_res = None
    try:
        for c in cfgs:
            log(f"starting {c['name']}: singlepass serve {c['artifact']} {' '.join(c['flags'])}")
            t0 = time.perf_counter()
            s = servers[c["name"]] = ServerProcess(c["artifact"], c["name"], c["flags"]).start()
            c.update(command=" ".join(s.command), card=card(s.url, s.model), load_seconds=time.perf_counter() - t0)
            c["rss_loaded_mib"] = s.rss_mib()
            if args.warmup:
                w = asyncio.run(run_load(s.url, s.model, prompts, args.warmup, args.warmup, args.max_tokens, 600))
                if w["answered"] == 0:
                    raise SinglepassError(f"{c['name']}: no warm-up request was answered: {w['error_kinds']}")
            rows = c["card"]["limits"]["max_batch"]
            log(f"  ready on {s.url} in {c['load_seconds']:.1f} s, engine max batch {rows}")
            if c["name"] != "one-at-a-time" and rows < max(args.levels):
                log(
                    f"  note: at most {rows} rows decode together (the artifact's limits.max_batch); more streams queue"
                )
        for r in range(args.repeats):
            for li, level in enumerate(args.levels):
                for c in rotated(cfgs, r + li):
                    s = servers[c["name"]]
                    before = s.engine_counters()
                    res = asyncio.run(
                        run_load(
                            s.url,
                            s.model,
                            prompts,
                            level,
                            requests_for(args, level),
                            args.max_tokens,
                            args.duration,
                            args.request_timeout,
                        )
                    )
                    res.update(config=c["name"], repeat=r, rss_mib=s.rss_mib(), loadavg=os.getloadavg())
                    res["engine"] = counters_delta(before, s.engine_counters())
                    summary = engine_summary(res["engine"])
                    res.update(
                        decode_tokens_per_s=summary["decode_tokens_per_s"], prefill_share=summary["prefill_share"]
                    )
                    runs.append(res)
                    log(
                        f"repeat {r + 1}/{args.repeats} c={level:<3} {c['name']:<14} {res['answered']}/{res['sent']} "
                        f"answered, {res['errors']} errors, {res['requests_per_s']:.2f} req/s, "
                        f"{res['tokens_per_s']:.1f} tok/s, TTFT p50 {_ms(res['ttft_p50_ms'])} "
                        f"p99 {_ms(res['ttft_p99_ms'])}; engine {engine_line(res['engine'])}"
                    )
        target = "batched" if "batched" in servers else next(iter(servers), None)
        for name, s in servers.items():
            if name != target:
                c = next(c for c in cfgs if c["name"] == name)
                c["exit_status"] = s.stop()
        if args.soak_seconds > 0 and target:
            s = servers[target]
            log(f"soak: {target}, concurrency {args.soak_concurrency}, {args.soak_seconds:.0f} s ...")
            soak_res = asyncio.run(
                soak(
                    s,
                    prompts,
                    args.soak_concurrency,
                    args.soak_seconds,
                    args.max_tokens,
                    args.rss_interval,
                    args.request_timeout,
                )
            )
            soak_res["config"] = target
            rss = [x[1] for x in soak_res["rss"]]
            log(
                f"  sent {soak_res['sent']}, answered {soak_res['answered']}, errors {soak_res['errors']}; "
                f"VmRSS {rss[0]:,.0f} -> {rss[-1]:,.0f} MiB (max {max(rss):,.0f})"
                if rss
                else "  (no RSS sample)"
            )
    finally:
        for name, s in servers.items():
            code = s.stop()
            c = next(c for c in cfgs if c["name"] == name)
            c.setdefault("exit_status", code)
    return runs, soak_res


def engine_summary(e: dict[str, float]) -> dict:
    """A run's engine counters -> tokens/s inside decode passes (the engine's decode throughput,
    prefill excluded) and the share of engine time spent prefilling."""
    from singlepass.benchmarks.serve_report import engine_seconds, phase_share

    secs = engine_seconds(e)
    return {
        "decode_tokens_per_s": e.get("tokens:decode", 0.0) / secs["decode"] if secs.get("decode") else None,
        "prefill_share": phase_share(e, "prefill"),
        "engine_seconds": secs,
    }


def engine_line(e: dict[str, float]) -> str:
    """Where the engine spent a run: seconds by phase, and tokens/s inside decode passes."""
    s = engine_summary(e)
    dec = "—" if s["decode_tokens_per_s"] is None else f"{s['decode_tokens_per_s']:.0f}"
    return ", ".join(f"{k} {v:.1f} s" for k, v in sorted(s["engine_seconds"].items())) + f"; decode passes {dec} tok/s"


def _ms(x: float | None) -> str:
    return "—" if x is None else f"{x:,.0f} ms"


def run(args: argparse.Namespace) -> int:
    import json

    from singlepass.benchmarks import serve_report as rep
    from singlepass.benchmarks.machine import ort_machine
    from singlepass.files import atomic_write

    if args.ray:  # 1 vs 2 Ray Serve replicas and a replica kill: serve_ray.md
        from singlepass.benchmarks.serve_ray import run as run_ray

        return run_ray(args)
    args.levels = levels(args)
    out_dir = results_dir(args.out)
    if args.table_only:
        res = json.loads((out_dir / "serve.json").read_text())
        rep.write_report(res, out_dir)
        rep.print_tables(res)
        return 0
    if min(args.levels) < 1 or args.max_tokens < 1 or args.repeats < 1 or args.soak_concurrency < 1:
        raise SinglepassError("--levels, --max-tokens, --repeats and --soak-concurrency must be >= 1")
    command = getattr(args, "command", None) or "python -m singlepass.benchmarks.serve_bench " + " ".join(sys.argv[1:])
    m = ort_machine()
    load = ", ".join(f"{x:.2f}" for x in m["loadavg"])
    log(f"machine: {m['cpu']}, os.cpu_count() = {m['cpu_count']}, {m['memory_gib']} GiB, load average {load}")
    t0 = time.perf_counter()
    arts = prepare(args, out_dir)
    prompts, pstats = load_prompts(args, arts["fused"])
    cfgs = server_configs(args, arts)
    prepare_s = time.perf_counter() - t0
    log(f"{pstats['used']} prompts (of {pstats['loaded']}); configurations: {', '.join(c['name'] for c in cfgs)}")
    t1 = time.perf_counter()
    runs, soak_res = measure(args, cfgs, prompts)
    from singlepass.runtime.contract import read_artifact

    src = Path(str(read_artifact(arts["fused"]).backbone.get("source", "model"))).name
    res = {
        "title": f"{src}, ONNX Runtime CPU ({args.threads} threads), {args.max_tokens} tokens per request",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": m,
        "loadavg_end": os.getloadavg(),
        "command": command,
        "protocol": {
            "levels": args.levels,
            "repeats": args.repeats,
            "max_tokens": args.max_tokens,
            "requests": {str(v): requests_for(args, v) for v in args.levels},
            "duration_s": args.duration,
            "request_timeout_s": args.request_timeout,
            "warmup": args.warmup,
            "threads": args.threads,
            "fused_policy": args.fused_policy,
            "prompts": pstats,
            "soak": {"seconds": args.soak_seconds, "concurrency": args.soak_concurrency, "interval": args.rss_interval},
        },
        "artifacts": arts,
        "configs": cfgs,
        "runs": runs,
        "soak": soak_res,
        "prepare_seconds": prepare_s,
        "measure_seconds": time.perf_counter() - t1,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / "serve.json", json.dumps(res, indent=1, default=str))
    rep.write_report(res, out_dir)
    rep.print_tables(res)
    log(f"\nwrote {out_dir / 'serve.md'}, serve.png, serve.json (measurements {res['measure_seconds']:.0f} s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
