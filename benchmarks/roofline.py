"""How close the engine's passes run to this machine's matrix-multiply throughput (a roofline).

    python -m singlepass.benchmarks.roofline ART [--threads 2] [--serve-json FILE] [--out DIR]

kernel   the artifact's own decoder MatMulNBits nodes (every 4-bit layer, not the lm_head) in one
         graph, each reading an input of M rows: what ONNX Runtime's kernel does for M tokens
         with nothing else in the way (no attention, norms, probes, copies) -> GOP/s at
         2 * M * K * N per node, M = 1, 16, 64, 256, 512 (median of ``--repeats`` runs).
passes   one prefill (B x T tokens) and one decode step (R rows of W tokens) of the artifact
         itself, profiled by ONNX Runtime: each op type's share of the kernel time, and the linear
         layers' GOP/s over the whole pass.
serving  with ``--serve-json`` (``singlepass bench serve``'s record): each batched run's work from
         the server's own counters (prompt tokens prefilled, decode tokens, requests) in
         linear-layer GOP, and the tokens/s that work allows if every pass ran its linear layers at
         the kernel's best rate and nothing else: a ceiling (attention, norms, probes, copies cost
         on top), beside the tokens/s measured and the 1-stream run's.

Writes ``roofline.md`` + ``roofline.json``. Nothing else should run meanwhile.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

ROWS = (1, 16, 64, 256, 512)


def linear_nodes(model, vocab: int) -> tuple[list, object]:
    """-> (the decoder's MatMulNBits nodes, the lm_head's: the one whose N is the vocabulary), for
    an artifact exported with ``--weights int4`` or ``int8``."""
    from singlepass.errors import SinglepassError

    nodes = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    head = [n for n in nodes if attrs(n)["N"] == vocab]
    if not nodes or len(head) != 1:
        raise SinglepassError(
            "the roofline measures artifacts whose linear layers and lm_head are MatMulNBits: export with "
            "--weights int4 or int8"
        )
    return [n for n in nodes if n is not head[0]], head[0]


def attrs(node) -> dict:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def gop(nodes) -> float:
    """Giga-operations per token (a multiply-add = 2) of these MatMulNBits nodes."""
    return sum(2 * attrs(n)["K"] * attrs(n)["N"] for n in nodes) / 1e9


def kernel_graph(model, nodes) -> bytes:
    """The nodes alone, each reading ``x_<K>`` [M, K], with their own initializers."""
    import onnx
    from onnx import TensorProto, helper

    inits = {t.name: t for t in model.graph.initializer}
    ks = sorted({attrs(n)["K"] for n in nodes})
    new, used, outs = [], {}, []
    for i, n in enumerate(nodes):
        a = attrs(n)
        ins = [f"x_{a['K']}"] + list(n.input[1:])
        for name in n.input[1:]:
            if name:
                used[name] = inits[name]
        new.append(helper.make_node("MatMulNBits", ins, [f"y{i}"], domain="com.microsoft", **a))
        outs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, ["M", a["N"]]))
    x = [helper.make_tensor_value_info(f"x_{k}", TensorProto.FLOAT, ["M", k]) for k in ks]
    g = helper.make_graph(new, "linear_layers", x, outs, list(used.values()))
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return onnx.helper.make_model(g, opset_imports=opsets).SerializeToString()


def kernel_rates(model, nodes, threads: int, repeats: int) -> dict[int, float]:
    """M -> GOP/s of the nodes alone for M rows."""
    from singlepass.benchmarks.engine_steps import median_s
    from singlepass.runtime.backends import ort_session

    sess = ort_session(kernel_graph(model, nodes), threads, arena=False)
    rng = np.random.default_rng(0)
    ks = sorted({attrs(n)["K"] for n in nodes})
    rates = {}
    for m in ROWS:
        feed = {f"x_{k}": rng.standard_normal((m, k), dtype=np.float32) for k in ks}
        sess.run(None, feed)  # warm-up
        rates[m] = m * gop(nodes) / median_s(lambda f=feed: sess.run(None, f), repeats)
    return rates


def profile_passes(art: str, threads: int, batch: int, tokens: int, rows: int, width: int, repeats: int) -> dict:
    """ONNX Runtime's profile of the artifact's prefill (batch x tokens) and decode step (rows of
    width), each in a session of its own: the last ``repeats`` runs' time and their nodes' time by
    op type (an ``If``'s includes the probe nodes inside it, which are also counted by their own type)."""
    from singlepass.runtime.api import load
    from singlepass.runtime.backends import ort_session
    from singlepass.runtime.passes import decode_one_token, prefill

    rt = load(art, threads=threads, memory_arena=False)
    m = rt.manifest
    folder = Path(tempfile.mkdtemp(prefix="singlepass-roofline-"))
    out = {}
    for name, b, t in (("prefill", batch, tokens), ("decode", rows, width)):
        rt.backend.release()
        rt.backend.session = ort_session(m.folder / m.graph.file, threads, arena=False, profile=str(folder / name))
        seqs = [[1] + [100 + (7 * i) % 20000 for i in range(t - 1)]] * b
        _, state = prefill(rt.backend, m, seqs)
        step = np.ones(b, np.int64)
        state = decode_one_token(rt.backend, m, state, step)[1]  # the in-place cache has its spare columns
        for _ in range(repeats):
            if name == "prefill":
                prefill(rt.backend, m, seqs)
            else:
                decode_one_token(rt.backend, m, state, step)
        profile = Path(rt.backend.session.end_profiling())
        events = json.loads(profile.read_text())
        profile.unlink()
        runs = [e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"][-repeats:]
        ops = collections.Counter()
        for e in events:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                if any(r["ts"] <= e["ts"] <= r["ts"] + r["dur"] for r in runs):
                    ops[e["args"]["op_name"]] += e["dur"]
        out[name] = {
            "rows": b,
            "tokens": t,
            "pass_ms": statistics.median(r["dur"] for r in runs) / 1000,
            "ops_ms": {k: v / 1000 / len(runs) for k, v in ops.most_common()},
            "matmulnbits_share": ops["MatMulNBits"] / sum(r["dur"] for r in runs),
        }
    folder.rmdir()
    return out


def serving_rows(serve: dict, f_layers: float, f_head: float, peak: float) -> list[dict]:
    """Per batched run of ``bench serve``: its linear-layer work from the engine's counters, the
    tokens/s it allows at the kernel's best rate, and what was measured."""
    rows = []
    for r in serve["runs"]:
        e = r.get("engine") or {}
        if r["config"] != "batched" or "tokens:prefill" not in e:
            continue
        work = e["tokens:prefill"] * f_layers + r["sent"] * f_head + e["tokens:decode"] * (f_layers + f_head)
        rows.append(
            {
                "streams": r["concurrency"],
                "repeat": r["repeat"],
                "prompt_tokens_per_request": e["tokens:prefill"] / r["sent"],
                "completion_tokens_per_request": r["tokens"] / r["sent"],
                "gop_per_request": work / r["sent"],
                "ceiling_tokens_per_s": r["tokens"] / (work / peak),
                "tokens_per_s": r["tokens_per_s"],
            }
        )
    return rows


def main(argv=None) -> int:
    import onnx

    from singlepass.benchmarks.machine import ort_machine
    from singlepass.benchmarks.outputs import add_out_arg, results_dir
    from singlepass.runtime.contract import read_artifact

    p = argparse.ArgumentParser(prog="python -m singlepass.benchmarks.roofline", description=__doc__.split("\n")[0])
    p.add_argument("artifact")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--prefill", type=int, nargs=2, default=(4, 128), metavar=("B", "T"))
    p.add_argument("--decode", type=int, nargs=2, default=(16, 128), metavar=("R", "W"))
    p.add_argument("--serve-json", default=None, help="singlepass bench serve's serve.json: the serving ceiling")
    add_out_arg(p)
    a = p.parse_args(argv)

    mach = ort_machine()
    print(mach, flush=True)
    m = read_artifact(a.artifact)
    model = onnx.load(str(m.folder / m.graph.file))
    layers, head = linear_nodes(model, int(m.backbone["vocab_size"]))
    f_layers, f_head = gop(layers), gop([head])
    print(f"{len(layers)} MatMulNBits layers: {f_layers:.3f} GOP per token; lm_head {f_head:.3f} GOP", flush=True)
    rates = kernel_rates(model, layers, a.threads, a.repeats)
    for k, v in rates.items():
        print(f"kernel alone, {k} rows: {v:.0f} GOP/s", flush=True)
    peak = max(rates.values())
    passes = profile_passes(a.artifact, a.threads, *a.prefill, *a.decode, a.repeats)
    for name, rec in passes.items():
        n = rec["rows"] * (rec["tokens"] if name == "prefill" else 1)
        work = n * f_layers + rec["rows"] * f_head
        rec["linear_gop_per_s"] = work / (rec["pass_ms"] / 1000)
        print(f"{name}: {rec['pass_ms']:.1f} ms, linear layers {rec['linear_gop_per_s']:.0f} GOP/s", flush=True)
    serve = json.loads(Path(a.serve_json).read_text()) if a.serve_json else None
    rows = serving_rows(serve, f_layers, f_head, peak) if serve else []
    record = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": mach,
        "artifact": str(a.artifact),
        "threads": a.threads,
        "gop_per_token": {"layers": f_layers, "lm_head": f_head, "nodes": len(layers)},
        "kernel_gop_per_s": rates,
        "passes": passes,
        "serve_json": a.serve_json,
        "serving": rows,
    }
    out = results_dir(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "roofline.json").write_text(json.dumps(record, indent=1))
    (out / "roofline.md").write_text(report(record, serve))
    print(report(record, serve))
    print(f"wrote {out / 'roofline.md'}, roofline.json")
    return 0


def report(r: dict, serve: dict | None) -> str:
    mach, g = r["machine"], r["gop_per_token"]
    peak = max(r["kernel_gop_per_s"].values())
    lines = [
        "# Roofline: the engine's passes against ONNX Runtime's MatMulNBits alone",
        "",
        f"Command: `python -m singlepass.benchmarks.roofline {r['artifact']} --threads {r['threads']}"
        + (f" --serve-json {r['serve_json']}`" if r["serve_json"] else "`"),
        "",
        f"Measured {r['date']} on {mach['cpu']}, {mach['cpu_count']} cores, onnxruntime {mach['onnxruntime']}, "
        f"{r['threads']} threads; load average before {', '.join(f'{x:.2f}' for x in mach['loadavg'])}.",
        "",
        f"Linear-layer work: {g['nodes']} MatMulNBits nodes, {g['layers']:.3f} GOP per token "
        f"(a multiply-add = 2 operations), the lm_head {g['lm_head']:.3f} GOP per token it runs on "
        "(a prefill's last position, every decode step).",
        "",
        "| rows (M) | the kernel alone (GOP/s) |",
        "| ---: | ---: |",
    ]
    lines += [f"| {k} | {v:.0f} |" for k, v in r["kernel_gop_per_s"].items()]
    lines += [
        "",
        "| pass | shape | pass (ms) | linear layers in the pass (GOP/s) | of the kernel's best | "
        "MatMulNBits share of the pass | top other ops (ms) |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, p in r["passes"].items():
        others = [f"{k} {v:.1f}" for k, v in p["ops_ms"].items() if k != "MatMulNBits"][:4]
        shape = f"{p['rows']} x {p['tokens']} tokens" if name == "prefill" else f"{p['rows']} rows at {p['tokens']}"
        lines.append(
            f"| {name} | {shape} | {p['pass_ms']:.1f} | {p['linear_gop_per_s']:.0f} | "
            f"{p['linear_gop_per_s'] / peak:.0%} | {p['matmulnbits_share']:.0%} | {', '.join(others)} |"
        )
    if r["serving"]:
        lines += [
            "",
            f"Serving (`{r['serve_json']}`, measured {serve['date']}): each batched run's linear-layer work "
            "from the server's counters; the ceiling is the tokens/s that work allows at the kernel's best "
            f"rate ({peak:.0f} GOP/s) with nothing else in any pass. Medians over repeats.",
            "",
            "| streams | prompt tokens / request | completion tokens / request | GOP / request | "
            "ceiling tokens/s | measured tokens/s | measured / ceiling |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        by = collections.defaultdict(list)
        for row in r["serving"]:
            by[row["streams"]].append(row)
        for s, rs in sorted(by.items()):
            med = {k: statistics.median(x[k] for x in rs) for k in rs[0] if k not in ("streams", "repeat")}
            lines.append(
                f"| {s} | {med['prompt_tokens_per_request']:.1f} | {med['completion_tokens_per_request']:.1f} | "
                f"{med['gop_per_request']:.1f} | {med['ceiling_tokens_per_s']:.0f} | {med['tokens_per_s']:.1f} | "
                f"{med['tokens_per_s'] / med['ceiling_tokens_per_s']:.0%} |"
            )
        one = [x["tokens_per_s"] for x in r["serving"] if x["streams"] == 1]
        if one:
            single = statistics.median(one)
            lines += [
                "",
                f"1 stream measured {single:.1f} tokens/s: 3x is {3 * single:.0f} tokens/s; the ceilings above "
                "at 16 and more streams divided by it give the most any scheduler could reach on this "
                "machine with this kernel and this workload.",
            ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
