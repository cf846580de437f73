"""Pure helpers of the latency benchmark: statistics over alternating runs, the markdown
tables and the chart. No torch, no onnxruntime (tests/test_latency_bench.py runs them on
made-up numbers)."""

from __future__ import annotations

import math

import numpy as np

MIB = 2 ** 20


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
    return {"median_ms": 1e3 * median(pooled), "p90_ms": 1e3 * percentile(pooled, 90),
            "throughput_rps": median(thr) if thr else math.nan, "samples": len(pooled), "repeats": len(runs)}


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
        rows.append([c["label"], fmt(s["median_ms"]), fmt(s["p90_ms"]), fmt(s["throughput_rps"], 2),
                     "1.000" if c["name"] == "base" else
                     (f"{r['ratio']:.3f} ({r['min']:.3f}–{r['max']:.3f})" if r else "—"),
                     fmt(peak(mem, 1), 0), c.get("f1_human", "—"), c.get("f1_full", "—")])
    return rows


def peak(mem: dict, batch: int | None = 1) -> float | None:
    """A memory record's peak RSS (MiB) up to ``batch`` (its overall peak when not recorded)."""
    if not mem:
        return None
    by = mem.get("peak_by_batch_mib") or {}
    return by.get(str(batch), mem.get("peak_rss_mib"))


LAT_HEADER = ["configuration", "median latency / request (ms)", "p90 (ms)", "throughput (req/s)",
              "latency vs base (median of per-repeat ratios, range)", "peak RSS, batch 1 (MiB)",
              "ToxicChat F1 (human test)", "ToxicChat F1 (full test)"]


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
                rows.append([f"{name}: peak memory (batch 1) <= base + 1%", f"{100 * d:+.2f}%",
                             target_check(d <= 0.01)])
        for name in ("guard-classifier", "guard-llm"):
            if name in mem:
                d = peak(mem[name]) - b
                rows.append([f"{name}: adds its whole weights", f"+{d:,.0f} MiB (weights "
                             f"{mem[name].get('guard_weights_mib', float('nan')):,.0f} MiB)", "(reported)"])
    return rows


def chart(res: dict, configs: list[dict], path) -> None:
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
