"""``singlepass bench peers``: singlepass artifacts against llama.cpp and onnxruntime-genai on the
same weights, same token ids, same thread counts (writes ``peers.md``, ``peers.json``, ``peers.png``).

Engines (all batch 1, greedy, end-of-sequence ignored, ``benchmarks/peer_runners.py``):

* singlepass fp32 (the GGUF dequantised) and int4 (``--weights int4``), without a probe and with
  the pooling, gate or MHA probe fused (the latency benchmark's ToxicChat probes);
* llama.cpp (``llama-cpp-python``) on the GGUF file itself;
* onnxruntime-genai running its own model builder's int4 build of the same weights.

Speed: for each thread count, one process holds every engine and runs each prompt on each in a
rotated order, ``--repeats`` times (``benchmarks/peers_worker.py``): prefill tokens/s and time to
first token over ``--n-prefill`` ToxicChat test prompts (chat template), decode tokens/s over
``--n-decode`` prompts x ``--new-tokens``; medians over repeats. Memory: each engine alone in a
fresh process, from a cold start (its files evicted from the page cache): peak resident memory.
Quality: the int4 artifact's labels, F1 and next-token choices against the fp32 artifact's on
``--quality-limit`` ToxicChat test prompts.

The peers are installed by ``make peers`` (never needed by ``make test`` or ``make demo``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from singlepass.benchmarks.outputs import add_out_arg, results_dir

PROBES = ("pooling", "gate", "mha")
TARGETS = {  # the issue's targets
    "decode_vs_llama_cpp": 1.2,  # int4 + probe decode tokens/s over llama.cpp's, 2 threads
    "prefill_vs_llama_cpp": 2.0,
    "overhead": {"pooling": 0.01, "gate": 0.01, "mha": 0.03},  # batch-1 prefill time over the base's
    "mha_memory": 0.05,  # MHA artifact's peak RSS over the base's
    "label_agreement": 0.99,  # int4 vs fp32 artifact, per probe
}


def log(msg: str) -> None:
    print(msg, flush=True)


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="python -m singlepass.benchmarks.peers", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--n-prefill", type=int, default=24, help="prompts for prefill / time to first token")
    p.add_argument("--n-decode", type=int, default=8, help="prompts for decode")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--quality-limit", type=int, default=500, help="ToxicChat test prompts for the quality table")
    p.add_argument("--skip-quality", action="store_true")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--data-dir", default=None)
    add_out_arg(p)
    p.add_argument("--table-only", action="store_true", help="rewrite peers.md/png from peers.json")
    p.add_argument(
        "--quality-only", action="store_true", help="rerun only the quality table into the stored peers.json"
    )
    p.add_argument(
        "--switched-rounds",
        type=int,
        default=240,
        help="rounds of the in-session prefill measurement per probe (probe on, off, off again; the prefill "
        "prompts in turn) (default: %(default)s)",
    )
    p.add_argument(
        "--switched-only",
        action="store_true",
        help="rerun only the in-session prefill measurement into the stored peers.json",
    )
    return p


# --- preparation ---------------------------------------------------------------------------------


def prepare(args: argparse.Namespace) -> dict:
    """-> {"engines": name -> runner spec, "artifacts": ..., "probes": ..., "gguf": path}."""
    from singlepass.benchmarks.latency_prepare import ensure_artifacts, ensure_probes
    from singlepass.benchmarks.peer_genai import build_genai_int4
    from singlepass.errors import SinglepassError
    from singlepass.models.backbone import load_backbone

    bb = load_backbone(args.model, args.cache_dir)
    if bb.source.kind != "gguf":
        raise SinglepassError(f"bench peers compares engines on one GGUF file; {args.model} is not a GGUF model")
    probes = ensure_probes(args, bb, results_dir(args.out) / "accuracy" / "toxicchat")
    spec = {m: f"{probes[m]['dir']}:{m}" for m in PROBES}
    int4 = ensure_artifacts(args, bb, probes, {"base": [], **{m: [spec[m]] for m in PROBES}}, "int4")
    quality = {"all": [spec[m] for m in PROBES]}
    fp32 = ensure_artifacts(
        args, bb, probes, {"base": [], **quality} if not args.skip_quality else {"base": []}, "fp32"
    )
    int4_all = ensure_artifacts(args, bb, probes, quality, "int4") if not args.skip_quality else {}
    genai = build_genai_int4(bb, args.cache_root / "genai" / f"{bb.source.name}-int4", cache_dir=args.cache_dir)
    engines = {
        "singlepass fp32": {"kind": "singlepass", "path": str(fp32["base"])},
        "singlepass int4": {"kind": "singlepass", "path": str(int4["base"])},
        **{f"singlepass int4 + {m}": {"kind": "singlepass", "path": str(int4[m])} for m in PROBES},
        "llama.cpp": {"kind": "llama.cpp", "path": str(bb.source.path)},
        "onnxruntime-genai int4": {"kind": "onnxruntime-genai", "path": str(genai)},
    }
    return {
        "engines": engines,
        "quality": {"fp32": str(fp32.get("all", "")), "int4": str(int4_all.get("all", ""))},
        "probes": probes,
        "gguf": str(bb.source.path),
    }


def switched_prefill(args: argparse.Namespace, paths: dict, pre: list[list[int]]) -> dict:
    """Each probe's prefill cost inside one session (``benchmarks/switch.py``): its int4 artifact copied
    with the probe behind ``singlepass/probe_on``, batch-1 prefills of the prompts in turn, probe on, off
    and off again per round, at the largest thread count. -> probe -> ``switched_overhead``'s result."""
    from singlepass.benchmarks.switch import switchable, switched_overhead

    out = {}
    for m in PROBES:
        log(f"prefill in one session: {m} switched on / off / off, {args.switched_rounds} rounds ...")
        sw = switchable(paths[m], args.cache_root / "bench-artifacts" / "int4" / f"{m}-switch")
        out[m] = switched_overhead(sw, pre, max(args.threads), (1,), args.switched_rounds, "prefill")
        v = out[m]["batch 1"]
        log(f"  {m}: {v['overhead_ms']:+.3f} ms ({v['overhead_pct']:+.2f}%; null {v['null_pct']:+.2f}%)")
    return out


def prompt_ids(args: argparse.Namespace, artifact: str) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
    """ToxicChat test prompts through the artifact's chat template -> (prefill, decode, memory)
    token ids; memory = the decode prompts + the two longest of the first 500 test prompts."""
    from singlepass.models.data import load_dataset
    from singlepass.runtime.contract import read_artifact
    from singlepass.runtime.tokenize import PromptTokenizer

    m = read_artifact(artifact)
    tok = PromptTokenizer(m.folder, m)
    texts = load_dataset("toxicchat", "test", args.data_dir, limit=500).texts
    ids = [tok.encode(t, m.limits.max_prompt_length, truncate=True)[0] for t in texts]
    pre = ids[: args.n_prefill]
    dec = ids[args.n_prefill : args.n_prefill + args.n_decode]
    longest = sorted(ids, key=len)[-2:]
    return pre, dec, dec + longest


def worker(spec: dict) -> dict:
    """One measuring process (``peers_worker``) -> its JSON result."""
    from singlepass.benchmarks.latency import worker as run_worker

    return run_worker(spec, module="singlepass.benchmarks.peers_worker")


# --- measurement ---------------------------------------------------------------------------------


def summarise(raw: dict, pre: list[list[int]], new_tokens: int) -> dict:
    """Per engine: medians over repeats of prefill tokens/s, decode tokens/s, time to first token."""
    n_pre = sum(len(i) for i in pre)
    out = {}
    for name, r in raw.items():
        prefill = [n_pre / sum(rep) for rep in r["prefill"]]
        decode = [len(rep) * new_tokens / sum(d for _, d in rep) for rep in r["decode"]]
        ttft = [statistics.median(rep) for rep in r["prefill"]]
        out[name] = {
            "prefill_tok_s": statistics.median(prefill),
            "decode_tok_s": statistics.median(decode),
            "ttft_ms": 1000 * statistics.median(ttft),
            "prefill_s_per_repeat": [sum(rep) for rep in r["prefill"]],
            "decode_s_per_repeat": [sum(d for _, d in rep) for rep in r["decode"]],
        }
    return out


def ratio(a: list[float], b: list[float]) -> float:
    """Median over repeats of a[i] / b[i] (each pair from the same repeat)."""
    return statistics.median(x / y for x, y in zip(a, b))


def quality(args: argparse.Namespace, arts: dict, gguf: str) -> dict:
    """int4 vs fp32 artifact (the three probes fused): labels, F1, next-token agreement."""
    import numpy as np

    from singlepass.benchmarks.peer_runners import LlamaCppRunner
    from singlepass.models.data import load_dataset
    from singlepass.models.metrics import compute_metrics
    from singlepass.runtime.backends import OrtBackend
    from singlepass.runtime.contract import class_probs, read_artifact
    from singlepass.runtime.passes import last_logits, prefill
    from singlepass.runtime.tokenize import PromptTokenizer

    ds = load_dataset("toxicchat", "test", args.data_dir, limit=args.quality_limit)
    side = {}
    for w in ("fp32", "int4"):
        m = read_artifact(arts[w])
        tok = PromptTokenizer(m.folder, m)
        be = OrtBackend(m.folder / m.graph.file, m, "cpu", max(args.threads))
        ids = [tok.encode(t, m.limits.max_prompt_length, truncate=True)[0] for t in ds.texts]
        probs = {p.name: [] for p in m.reading("prompt")}  # a response probe has no label after a prefill
        top1 = []
        for i in range(len(ids)):
            out, _ = prefill(be, m, [ids[i]])
            top1.append(int(last_logits(m, out)[0].argmax()))
            for p in m.reading("prompt"):
                probs[p.name].append(class_probs(out[p.logits])[0])
        side[w] = {"m": m, "ids": ids, "top1": np.array(top1), "probs": {k: np.stack(v) for k, v in probs.items()}}
        log(f"quality: {w} artifact scored {len(ids)} prompts")
    res = {"n": len(ds.texts), "probes": {}}
    m = side["int4"]["m"]
    for p in m.probes:
        lab = {w: np.array([p.decide(r)[0] == p.label_names[1] for r in side[w]["probs"][p.name]]) for w in side}
        f1 = {
            w: compute_metrics(ds.labels, side[w]["probs"][p.name], p.threshold or 0.5)["f1_at_threshold"] for w in side
        }
        res["probes"][p.name] = {
            "label_agreement": float((lab["fp32"] == lab["int4"]).mean()),
            "f1_fp32": f1["fp32"],
            "f1_int4": f1["int4"],
            "max_abs_prob_diff": float(np.abs(side["fp32"]["probs"][p.name] - side["int4"]["probs"][p.name]).max()),
        }
    res["next_token_agreement_int4"] = float((side["fp32"]["top1"] == side["int4"]["top1"]).mean())
    llm = LlamaCppRunner(gguf, max(args.threads))
    n = min(200, len(ds.texts))
    cpp = np.array([llm.prefill(i) for i in side["fp32"]["ids"][:n]])
    res["next_token_agreement_llama_cpp"] = float((side["fp32"]["top1"][:n] == cpp).mean())
    res["llama_cpp_n"] = n
    return res


# --- report --------------------------------------------------------------------------------------


def derived(res: dict) -> dict:
    """Ratios and target checks at the largest thread count measured."""
    t = str(max(int(k) for k in res["speed"]))
    s = res["speed"][t]
    cpp, og, base = s["llama.cpp"], s["onnxruntime-genai int4"], s["singlepass int4"]
    d = {
        "threads": int(t),
        "decode_vs_llama_cpp": {
            n: ratio([1 / x for x in s[n]["decode_s_per_repeat"]], [1 / x for x in cpp["decode_s_per_repeat"]])
            for n in s
            if n.startswith("singlepass")
        },
        "prefill_vs_llama_cpp": {
            n: ratio(cpp["prefill_s_per_repeat"], s[n]["prefill_s_per_repeat"]) for n in s if n.startswith("singlepass")
        },
        "decode_vs_genai": ratio(og["decode_s_per_repeat"], s[f"singlepass int4 + {PROBES[1]}"]["decode_s_per_repeat"]),
        "prefill_vs_genai": ratio(
            og["prefill_s_per_repeat"], s[f"singlepass int4 + {PROBES[1]}"]["prefill_s_per_repeat"]
        ),
        "overhead_prefill": {
            m: ratio(s[f"singlepass int4 + {m}"]["prefill_s_per_repeat"], base["prefill_s_per_repeat"]) - 1
            for m in PROBES
        },
        "overhead_decode": {
            m: ratio(s[f"singlepass int4 + {m}"]["decode_s_per_repeat"], base["decode_s_per_repeat"]) - 1
            for m in PROBES
        },
    }
    if res.get("switched"):  # the probe switched on and off inside one session (benchmarks/switch.py)
        d["overhead_prefill_switched"] = {m: v["batch 1"]["overhead_pct"] / 100 for m, v in res["switched"].items()}
    mem = res.get("memory", {})
    if mem:
        d["memory_over_base"] = {
            m: mem[f"singlepass int4 + {m}"]["peak_rss_mib"] / mem["singlepass int4"]["peak_rss_mib"] - 1
            for m in PROBES
        }
    return d


def write_report(res: dict, out: Path) -> None:
    from singlepass.files import atomic_write

    d = derived(res)
    lines = [
        "# singlepass vs llama.cpp and onnxruntime-genai (`singlepass bench peers`)",
        "",
        f"Command: `{res['command']}`  ",
        f"Machine: {res['machine']['cpu']}, {res['machine']['cpu_count']} cores, load average at start "
        f"{res['machine']['loadavg']}; onnxruntime {res['versions']['onnxruntime']}, onnxruntime-genai "
        f"{res['versions']['onnxruntime_genai']}, llama-cpp-python {res['versions']['llama_cpp']}"
        + (f" (CPU kernels: {res['versions']['llama_cpp_cpu']})" if res["versions"].get("llama_cpp_cpu") else "")
        + "  ",
        f"Prompts: {res['n_prefill']} ToxicChat test prompts ({res['prefill_tokens']} tokens, chat template) for "
        f"prefill; {res['n_decode']} x {res['new_tokens']} greedy tokens for decode; batch 1; medians over "
        f"{res['repeats']} repeats of alternating runs; {res['seconds']:.0f} s in all.",
        "",
    ]
    for t, s in sorted(res["speed"].items(), key=lambda kv: int(kv[0])):
        lines += [f"## {t} thread{'s' if t != '1' else ''}", ""]
        lines += ["| engine | prefill tok/s | decode tok/s | time to first token (ms) | peak RSS (MiB) |"]
        lines += ["|---|---:|---:|---:|---:|"]
        for n, r in s.items():
            mem = res.get("memory", {}).get(n, {}).get("peak_rss_mib")
            lines.append(
                f"| {n} | {r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} | {r['ttft_ms']:.1f} | "
                f"{f'{mem:.0f}' if mem else '-'} |"
            )
        lines.append("")
    if res.get("memory"):
        lines += [
            "## Memory",
            "",
            "Each engine alone in a fresh process, its files evicted from the page cache first (a cold start, the "
            "same for every engine: the pages of mapped weight files a process touches count in its RSS, and how "
            "many a touch maps depends on what the page cache holds), serving the memory prompts "
            "(the decode prompts and the two longest of the first 500 test prompts) with 16 new tokens each. "
            "At the end: resident memory by kind, the process's own allocations and its mapped files "
            "(libraries and mapped weights).",
            "",
            "| engine | after loading (MiB) | peak RSS (MiB) | at the end: anonymous / mapped files (MiB) |",
            "|---|---:|---:|---:|",
        ]
        for n, r in res["memory"].items():
            end = r.get("end_rss_mib")
            split = f"{end['anon']:.0f} / {end['file']:.0f}" if end else "-"
            loaded = f"{r['loaded_rss_mib']:.0f}" if "loaded_rss_mib" in r else "-"
            lines.append(f"| {n} | {loaded} | {r['peak_rss_mib']:.0f} | {split} |")
        lines.append("")
    T = TARGETS
    gate = "singlepass int4 + gate"

    def mark(ok: bool) -> str:
        return "met" if ok else "**missed**"

    def target(v: float, tgt: float | None) -> str:
        return f">= {tgt}x | {mark(v >= tgt)} |" if tgt else " | |"

    lines += [
        f"## Ratios and targets ({d['threads']} threads)",
        "",
        "| measure | value | target | |",
        "|---|---:|---:|---|",
    ]
    for n in (gate, "singlepass int4 + mha", "singlepass int4", "singlepass fp32"):
        v = d["decode_vs_llama_cpp"][n]
        tgt = T["decode_vs_llama_cpp"] if n == gate else None
        lines.append(f"| decode tok/s, {n} / llama.cpp | {v:.2f}x | {target(v, tgt)}")
    for n in (gate, "singlepass fp32"):
        v = d["prefill_vs_llama_cpp"][n]
        tgt = T["prefill_vs_llama_cpp"] if n == gate else None
        lines.append(f"| prefill tok/s, {n} / llama.cpp | {v:.2f}x | {target(v, tgt)}")
    lines.append(f"| decode tok/s, {gate} / onnxruntime-genai int4 | {d['decode_vs_genai']:.2f}x | | |")
    lines.append(f"| prefill tok/s, {gate} / onnxruntime-genai int4 | {d['prefill_vs_genai']:.2f}x | | |")
    one = d.get("overhead_prefill_switched", {})
    for m in PROBES:
        v, tgt = d["overhead_prefill"][m], T["overhead"][m]
        if m in one:  # judged in one session; the two-session ratio beside it, no verdict
            w = one[m]
            lines.append(
                f"| {m} probe: prefill time, probe on over off in one session (batch 1) | {w:+.2%} | <= {tgt:.0%} | "
                f"{mark(w <= tgt)} |"
            )
            lines.append(f"| {m} probe: prefill time over the int4 base, two sessions (batch 1) | {v:+.1%} | | |")
        else:
            lines.append(
                f"| {m} probe: prefill time over the int4 base (batch 1) | {v:+.1%} | <= {tgt:.0%} | {mark(v <= tgt)} |"
            )
        lines.append(f"| {m} probe: decode time over the int4 base | {d['overhead_decode'][m]:+.1%} | | |")
    for m, v in d.get("memory_over_base", {}).items():
        tgt = T["mha_memory"] if m == "mha" else None
        lines.append(
            f"| {m} probe: peak RSS over the int4 base | {v:+.1%} | {f'<= {tgt:.0%}' if tgt else ''} | "
            f"{mark(v <= tgt) if tgt else ''} |"
        )
    lines.append("")
    sw = res.get("switched")
    if sw:
        first = next(iter(sw.values()))["batch 1"]
        lines += [
            "## Prefill cost in one session",
            "",
            "Two sessions of one artifact differ by up to ~6% on this VM (`benchmarks/switch.py`), more than "
            "the 1% targets, so the prefill targets are judged inside one session: each probe's int4 artifact "
            "copied with its probe behind the graph input `singlepass/probe_on` (off, every `If` the probe's "
            f"surgery added takes its no-op branch), then {first['pairs']} rounds of three batch-1 prefills of "
            f"one prompt (the {first['prompts']} prefill prompts in turn, {first['context_tokens']:.1f} tokens "
            "on average), probe on, off and off again, each round in one of the 6 orders in turn. Overhead: the "
            "median over rounds of (on - off) over the median off pass; null: the same for the second off pass. "
            "A lower bound of the cost over the base: off still runs the probe's `If` shells (their no-op "
            "branches), an `And` per `If` and the nodes computing the pass's shape."
            + (f" Measured by `{res['switched_command']}`." if res.get("switched_command") else "")
            + (
                f" Machine: {sm['cpu']}, {sm['cpu_count']} cores, load average before it "
                f"{' / '.join(f'{x:.2f}' for x in sm['loadavg'])} (this section "
                "may come from a later run than the tables above: compare it with those only as ratios)."
                if (sm := res.get("switched_machine"))
                else ""
            ),
            "",
            "| probe | off (ms) | on (ms) | overhead (ms) | overhead | overhead IQR | null (off vs off) |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for m, by in sw.items():
            v = by["batch 1"]
            lo, hi = v["overhead_pct_iqr"]
            lines.append(
                f"| {m} | {v['off_ms']:.2f} | {v['on_ms']:.2f} | {v['overhead_ms']:+.3f} | {v['overhead_pct']:+.2f}% | "
                f"{lo:+.1f}% to {hi:+.1f}% | {v['null_pct']:+.2f}% |"
            )
        lines.append("")
    q = res.get("quality")
    if q:
        lines += [
            f"## Quality: int4 artifact vs fp32 artifact ({q['n']} ToxicChat test prompts)",
            "",
            *(
                [f"Measured by `{res['quality_command']}` (the speed tables above by the command at the top).", ""]
                if res.get("quality_command")
                else []
            ),
            "| probe | label agreement | F1 fp32 | F1 int4 | max |Δ P(toxic)| | |",
            "|---|---:|---:|---:|---:|---|",
        ]
        for name, r in q["probes"].items():
            ok = r["label_agreement"] >= T["label_agreement"]
            lines.append(
                f"| {name} | {r['label_agreement']:.1%} | {r['f1_fp32']:.3f} | {r['f1_int4']:.3f} | "
                f"{r['max_abs_prob_diff']:.3f} | {mark(ok)} (>= {T['label_agreement']:.0%}) |"
            )
        lines += [
            "",
            f"Next-token (greedy, after the prompt) agreement with the fp32 artifact: int4 artifact "
            f"{q['next_token_agreement_int4']:.1%} ({q['n']} prompts); llama.cpp on the Q4_1 file "
            f"{q['next_token_agreement_llama_cpp']:.1%} ({q['llama_cpp_n']} prompts).",
            "",
        ]
    atomic_write(out / "peers.md", "\n".join(lines) + "\n")
    plot(res, out / "peers.png")


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    threads = sorted(res["speed"], key=int)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    names = list(res["speed"][threads[0]])
    width = 0.8 / len(threads)
    for ax, key, title in (
        (axes[0], "prefill_tok_s", "prefill tokens/s"),
        (axes[1], "decode_tok_s", "decode tokens/s"),
    ):
        for k, t in enumerate(threads):
            vals = [res["speed"][t][n][key] for n in names]
            ax.barh([i + k * width for i in range(len(names))], vals, height=width, label=f"{t} thread(s)")
        ax.set_yticks([i + width * (len(threads) - 1) / 2 for i in range(len(names))], names, fontsize=8)
        ax.invert_yaxis()
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.suptitle("singlepass vs llama.cpp and onnxruntime-genai, SmolLM2-135M, batch 1 (higher is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- entry ---------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    from singlepass.benchmarks.machine import ort_machine
    from singlepass.files import atomic_write_json
    from singlepass.models.backbone import cache_root

    out = results_dir(args.out)
    command = getattr(args, "command", None) or "python -m singlepass.benchmarks.peers " + " ".join(sys.argv[1:])
    if args.table_only:
        write_report(json.loads((out / "peers.json").read_text()), out)
        print((out / "peers.md").read_text())
        return 0
    out.mkdir(parents=True, exist_ok=True)
    args.cache_root = cache_root(args.cache_dir)
    if args.switched_only:
        from singlepass.benchmarks.latency_prepare import ensure_artifacts, ensure_probes
        from singlepass.models.backbone import load_backbone

        res = json.loads((out / "peers.json").read_text())
        bb = load_backbone(args.model, args.cache_dir)
        probes = ensure_probes(args, bb, out / "accuracy" / "toxicchat")
        paths = ensure_artifacts(args, bb, probes, {m: [f"{probes[m]['dir']}:{m}"] for m in PROBES}, "int4")
        pre = prompt_ids(args, str(paths[PROBES[0]]))[0]
        machine = ort_machine()  # the load average right before the measurement (after any re-export)
        res["switched"] = switched_prefill(args, paths, pre)
        res["switched_command"] = command
        res["switched_machine"] = machine
        atomic_write_json(out / "peers.json", res)
        write_report(res, out)
        print((out / "peers.md").read_text())
        return 0
    if args.quality_only:
        res = json.loads((out / "peers.json").read_text())
        prep = prepare(args)
        res["quality"] = quality(args, prep["quality"], prep["gguf"])
        res["quality_command"] = command
        atomic_write_json(out / "peers.json", res)
        write_report(res, out)
        print((out / "peers.md").read_text())
        return 0
    machine = ort_machine()
    log(f"machine: {machine['cpu']}, {machine['cpu_count']} cores, load average {machine['loadavg']}")
    t0 = time.perf_counter()
    prep = prepare(args)
    pre, dec, mem = prompt_ids(args, prep["engines"]["singlepass int4"]["path"])
    res = {
        "command": command,
        "machine": machine,
        "versions": versions(),
        "engines": prep["engines"],
        "probes": {m: {k: prep["probes"][m][k] for k in ("source", "f1_human", "f1_full")} for m in PROBES},
        "n_prefill": len(pre),
        "prefill_tokens": sum(len(i) for i in pre),
        "n_decode": len(dec),
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "speed": {},
        "memory": {},
    }
    t_measure = time.perf_counter()
    for t in args.threads:
        log(f"timing {len(prep['engines'])} engines at {t} thread(s) ...")
        spec = {
            "mode": "timing",
            "threads": t,
            "engines": prep["engines"],
            "prefill": pre,
            "decode": dec,
            "new_tokens": args.new_tokens,
            "repeats": args.repeats,
        }
        res["speed"][str(t)] = summarise(worker(spec), pre, args.new_tokens)
    for name, eng in prep["engines"].items():
        log(f"memory: {name} ...")
        spec = {"mode": "memory", "threads": max(args.threads), "engine": eng, "prompts": mem, "new_tokens": 16}
        res["memory"][name] = worker(spec)
    paths = {m: prep["engines"][f"singlepass int4 + {m}"]["path"] for m in PROBES}
    res["switched"] = switched_prefill(args, paths, pre)
    if not args.skip_quality:
        res["quality"] = quality(args, prep["quality"], prep["gguf"])
    res["seconds"] = time.perf_counter() - t_measure
    res["total_seconds"] = time.perf_counter() - t0
    atomic_write_json(out / "peers.json", res)
    write_report(res, out)
    print((out / "peers.md").read_text())
    return 0


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for key, dist in (
        ("onnxruntime", "onnxruntime"),
        ("onnxruntime_genai", "onnxruntime-genai"),
        ("llama_cpp", "llama-cpp-python"),
    ):
        try:
            out[key] = version(dist)
        except PackageNotFoundError:
            out[key] = None
    out["llama_cpp_cpu"] = llama_cpp_cpu() if out["llama_cpp"] else None
    return out


def llama_cpp_cpu(info: str | None = None) -> str:
    """The CPU kernels the installed llama.cpp was compiled with ("SSE3 ... AVX2 F16C FMA AVX512 ..."),
    from its system info (``info``: that text, read from llama.cpp when None): its build flags
    (``make peers``) set its speed as much as the CPU does, so the report names them."""
    if info is None:
        import llama_cpp

        info = llama_cpp.llama_print_system_info().decode()  # "CPU : SSE3 = 1 | AVX2 = 1 | ... |"
    cpu = info.split("CPU :", 1)[-1].split("\n", 1)[0]
    return " ".join(k.strip() for k, _, v in (f.partition("=") for f in cpu.split("|")) if v.strip() == "1")


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
