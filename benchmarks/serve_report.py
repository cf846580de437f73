"""serve.md, serve.png and the console tables of the serving benchmark, from what serve.json
stores (``benchmarks/serve_bench.py`` measures; ``--table-only`` re-renders from the JSON).

Every number in a table is the median over the alternating repeats of one run's figure (its
range in brackets where repeats differ); ratios are taken within a repeat, then their median.
"""

from __future__ import annotations

import os
from pathlib import Path
from statistics import median

from singlepass.benchmarks.latency_report import fmt, table, target_check
from singlepass.files import atomic_write

SCALE_LEVEL, TAIL_LEVEL = 16, 16  # the targets: at 16 concurrent streams
SCALE_GOAL, TAIL_GOAL = 3.0, 2.0
COLORS = {"batched": "tab:blue", "one-at-a-time": "tab:gray", "guard": "tab:red"}


# --- numbers ---------------------------------------------------------------------------------------


def cell(res: dict, config: str, level: int) -> list[dict]:
    """The runs of one configuration at one level, by repeat."""
    return sorted(
        (r for r in res["runs"] if r["config"] == config and r["concurrency"] == level), key=lambda r: r["repeat"]
    )


def stat(runs: list[dict], key) -> dict | None:
    """Median, min, max over runs of ``key`` (a field, or a function of the run)."""
    get = key if callable(key) else (lambda r: r.get(key))
    xs = [x for x in map(get, runs) if x is not None]
    return {"median": median(xs), "min": min(xs), "max": max(xs), "n": len(xs)} if xs else None


def ranged(s: dict | None, digits: int = 1) -> str:
    if s is None:
        return "—"
    if s["n"] < 2 or s["min"] == s["max"]:
        return fmt(s["median"], digits)
    return f"{fmt(s['median'], digits)} [{fmt(s['min'], digits)}–{fmt(s['max'], digits)}]"


def paired(res: dict, a: tuple[str, int], b: tuple[str, int], key: str) -> dict | None:
    """Median over repeats of run a's ``key`` / run b's ``key`` in the same repeat."""
    ra = {r["repeat"]: r.get(key) for r in cell(res, *a)}
    rb = {r["repeat"]: r.get(key) for r in cell(res, *b)}
    per = [ra[k] / rb[k] for k in ra if ra[k] is not None and rb.get(k)]
    return {"median": median(per), "min": min(per), "max": max(per), "n": len(per)} if per else None


def targets(res: dict) -> list[dict]:
    """The issue's targets, judged: [{name, goal, value, met (None: not measured)}]."""
    out = []
    s = paired(res, ("batched", SCALE_LEVEL), ("batched", 1), "tokens_per_s")
    out.append(
        {
            "name": f"aggregate tokens/s at {SCALE_LEVEL} streams vs 1 stream (batched)",
            "goal": f">= {SCALE_GOAL:g}x",
            "value": "not measured" if s is None else f"{ranged(s, 2)}x",
            "met": None if s is None else s["median"] >= SCALE_GOAL,
        }
    )
    d = paired(res, ("batched", SCALE_LEVEL), ("batched", 1), "decode_tokens_per_s")
    if d is not None:  # runs measured since the engine reports its time by phase
        out.append(
            {
                "name": f"decode tokens/s inside the engine's decode passes at {SCALE_LEVEL} streams vs 1 (batched)",
                "goal": f">= {SCALE_GOAL:g}x",
                "value": f"{ranged(d, 2)}x",
                "met": d["median"] >= SCALE_GOAL,
            }
        )
    runs = cell(res, "batched", TAIL_LEVEL)
    per = [r["ttft_p99_ms"] / r["ttft_p50_ms"] for r in runs if r.get("ttft_p99_ms") and r.get("ttft_p50_ms")]
    t = {"median": median(per), "min": min(per), "max": max(per), "n": len(per)} if per else None
    out.append(
        {
            "name": f"p99 / median TTFT at {TAIL_LEVEL} streams (batched)",
            "goal": f"<= {TAIL_GOAL:g}x",
            "value": "not measured" if t is None else f"{ranged(t, 2)}x",
            "met": None if t is None else t["median"] <= TAIL_GOAL,
        }
    )
    sk = res.get("soak")
    out.append(
        {
            "name": "soak loses nothing (sent == answered, 0 errors)",
            "goal": "0 lost, 0 errors",
            "value": "not run" if not sk else f"{sk['lost']} lost, {sk['errors']} errors of {sk['sent']} sent",
            "met": None if not sk else sk["lost"] == 0 and sk["errors"] == 0,
        }
    )
    return out


def rss_summary(soak: dict) -> dict | None:
    rss = [x[1] for x in soak.get("rss") or []]
    if not rss:
        return None
    quarter = next((mib for t, mib in soak["rss"] if t >= soak["rss"][-1][0] / 4), rss[0])
    return {
        "first": rss[0],
        "last": rss[-1],
        "max": max(rss),
        "growth": rss[-1] - rss[0],
        "growth_late": rss[-1] - quarter,  # over the last three quarters (after the arenas grew)
        "samples": len(rss),
    }


# --- tables ----------------------------------------------------------------------------------------

MAIN_HEADER = [
    "configuration",
    "streams",
    "req/s",
    "tokens/s",
    "TTFT p50 (ms)",
    "TTFT p99 (ms)",
    "latency p50 (ms)",
    "latency p99 (ms)",
    "sent / answered / errors",
    "refused",
    "decode passes tokens/s",
    "engine time prefilling",
    "engine time joining",
]


def main_rows(res: dict) -> list[list[str]]:
    rows = []
    for c in res["configs"]:
        for level in res["protocol"]["levels"]:
            runs = cell(res, c["name"], level)
            if not runs:
                continue
            rows.append(
                [
                    c["name"],
                    str(level),
                    ranged(stat(runs, "requests_per_s"), 2),
                    ranged(stat(runs, "tokens_per_s")),
                    ranged(stat(runs, "ttft_p50_ms"), 0),
                    ranged(stat(runs, "ttft_p99_ms"), 0),
                    ranged(stat(runs, "latency_p50_ms"), 0),
                    ranged(stat(runs, "latency_p99_ms"), 0),
                    " / ".join(str(sum(r[k] for r in runs)) for k in ("sent", "answered", "errors")),
                    str(sum(r["blocked"] for r in runs)),
                    ranged(stat(runs, "decode_tokens_per_s"), 0),
                    _share(stat(runs, "prefill_share")),
                    _share(stat(runs, lambda r: phase_share(r.get("engine"), "join"))),
                ]
            )
    return rows


def engine_seconds(engine: dict | None) -> dict[str, float]:
    """A run's engine counters (``seconds:<phase>``, ``tokens:<phase>``) -> seconds by phase."""
    return {k.split(":", 1)[1]: v for k, v in (engine or {}).items() if k.startswith("seconds:")}


def phase_share(engine: dict | None, phase: str) -> float | None:
    """A run's engine counters -> the share of the engine loop's time spent in ``phase`` (prefill,
    join, decode, tidy); None without counters."""
    secs = engine_seconds(engine)
    total = sum(secs.values())
    return secs.get(phase, 0.0) / total if total else None


def _share(s: dict | None) -> str:
    return "—" if s is None else f"{100 * s['median']:.0f}%"


COMPARE_HEADER = [
    "streams",
    "tokens/s: batched / one-at-a-time",
    "tokens/s: guard / batched",
    "TTFT p50: guard / batched",
    "latency p50: guard / batched",
]


def ratio(res: dict, a: str, b: str, level: int, key: str) -> str:
    s = paired(res, (a, level), (b, level), key)
    return "—" if s is None else f"{ranged(s, 2)}x"


def compare_rows(res: dict) -> list[list[str]]:
    return [
        [
            str(v),
            ratio(res, "batched", "one-at-a-time", v, "tokens_per_s"),
            ratio(res, "guard", "batched", v, "tokens_per_s"),
            ratio(res, "guard", "batched", v, "ttft_p50_ms"),
            ratio(res, "guard", "batched", v, "latency_p50_ms"),
        ]
        for v in res["protocol"]["levels"]
    ]


def prompt_rows(res: dict, config: str = "batched") -> tuple[list[str], list[list[str]]]:
    """TTFT p50 / p99 by prompt length per level (median over repeats; n summed)."""
    levels = [v for v in res["protocol"]["levels"] if any(r.get("ttft_by_prompt") for r in cell(res, config, v))]
    if not levels:
        return [], []
    bins = [
        b["tokens"] for b in next(r for r in cell(res, config, levels[0]) if r.get("ttft_by_prompt"))["ttft_by_prompt"]
    ]
    rows = []
    for v in levels:
        runs = [r for r in cell(res, config, v) if r.get("ttft_by_prompt")]
        row = [str(v)]
        for i in range(len(bins)):
            per = [r["ttft_by_prompt"][i] for r in runs]
            n = sum(b["n"] for b in per)
            p50 = [b["p50"] for b in per if b["p50"] is not None]
            p99 = [b["p99"] for b in per if b["p99"] is not None]
            row.append(f"{fmt(median(p50), 0)} / {fmt(median(p99), 0)} (n {n})" if p50 else "—")
        rows.append(row)
    return ["streams"] + [f"{b} prompt tokens: p50 / p99 (ms)" for b in bins], rows


def target_rows(res: dict) -> list[list[str]]:
    return [[t["name"], t["goal"], t["value"], target_check(t["met"])] for t in targets(res)]


def soak_rows(res: dict) -> tuple[list[list[str]], list[list[str]]]:
    sk = res["soak"]
    rs = rss_summary(sk) or {}
    head = [
        [
            sk["config"],
            f"{sk['concurrency']}",
            f"{sk['wall_s']:.0f}",
            str(sk["sent"]),
            str(sk["answered"]),
            str(sk["lost"]),
            str(sk["errors"]),
            fmt(sk["tokens_per_s"]),
            fmt(sk["ttft_p50_ms"], 0),
            fmt(sk["ttft_p99_ms"], 0),
            f"{fmt(rs.get('first'), 0)} → {fmt(rs.get('last'), 0)} (max {fmt(rs.get('max'), 0)})",
        ]
    ]
    rss = sk.get("rss") or []
    step = max(1, -(-len(rss) // 10))  # at most ~10 rows
    picks = rss[::step] + ([rss[-1]] if rss and (len(rss) - 1) % step else [])
    return head, [[f"{t:.1f}" if sk["interval_s"] < 1 else f"{t:.0f}", fmt(mib, 1)] for t, mib in picks]


SOAK_HEADER = [
    "configuration",
    "streams",
    "seconds",
    "sent",
    "answered",
    "lost",
    "errors",
    "tokens/s",
    "TTFT p50 (ms)",
    "TTFT p99 (ms)",
    "server VmRSS (MiB)",
]


def render(res: dict) -> str:
    P, m = res["protocol"], res["machine"]
    ps = P["prompts"]
    end = res.get("loadavg_end") or []
    L = [f"# Serving: continuous batching, one at a time, fused probe vs guard-then-serve ({res['title']})", ""]
    L += [
        f"Measured {res['date']} on {m['cpu']}, {m['cpu_count']} cores ({P['threads']} ONNX Runtime threads per "
        f"server), {m['memory_gib']} GiB RAM, {m['system']}, Python {m['python']}, onnxruntime {m['onnxruntime']}. "
        f"Load average (1/5/15 min) before: {', '.join(f'{x:.2f}' for x in m['loadavg'])}; at the end: "
        f"{', '.join(f'{x:.2f}' for x in end)}. The load generator runs on the same machine as the servers.",
        "",
        f"Command: `{res['command']}`",
        "",
        f"Protocol: streamed chat completions (one user turn, chat template, greedy, `max_tokens` "
        f"{P['max_tokens']}, the server started with `--ignore-eos` so that every request generates exactly "
        f"{P['max_tokens']} tokens) from closed-loop clients at {', '.join(map(str, P['levels']))} concurrent "
        f"streams; per run {', '.join(f'{v} requests at {k}' for k, v in P['requests'].items())} (no request "
        f"starts after {P['duration_s']:g} s); {P['repeats']} alternating repeats (every level runs every "
        f"configuration, in a rotating order, within each repeat), after {P['warmup']} warm-up requests per "
        f"server. Prompts: {ps['used']} ToxicChat test prompts (of a {ps['loaded']}-row stratified subset; "
        f"{ps['skipped_too_long']} too long for the artifact's limits with {P['max_tokens']} new tokens), used "
        f"in order, the same sequence for every configuration; {ps['tokens_median']:.0f} prompt tokens median "
        f"(p90 {ps['tokens_p90']:.0f}, max {ps['tokens_max']}). Fused probes' policy: `{P['fused_policy']}`.",
        "",
        "Definitions: TTFT = request sent → the stream's first event (the server sends it once the prefill pass "
        "has chosen the first token, or the refusal); latency = request sent → `[DONE]`; tokens/s = completion "
        "tokens of the answered requests / the run's wall time (aggregate over all streams); req/s = answered / "
        "wall time. TTFT and latency cover the requests the LLM served: a refused prompt (`content_filter`, "
        "counted under *refused*) never reached it. An error is anything but a complete 200 stream (HTTP error, "
        "error event, cut stream, client timeout). From the server's own counters (`/metrics` "
        "`singlepass_engine_{seconds,tokens}_total{phase}`, read before and after each run): decode passes "
        "tokens/s = tokens generated by decode passes / the engine's time in them (the decode throughput, "
        "prefill excluded; a request's first token comes from its prefill pass); engine time prefilling = the "
        "prefill passes' share of the engine loop's time (prefill, join, decode, tidy); engine time joining = "
        "the share spent writing newcomers' KV caches into the batch (widening or growing it when they do not fit).",
        "",
        "## Configurations",
        "",
    ]
    for c in res["configs"]:
        lim = (c.get("card") or {}).get("limits", {})
        L.append(
            f"* **{c['name']}**: {c['label']}; `{c.get('command', c['artifact'])}`; engine max batch "
            f"{lim.get('max_batch', '?')}; VmRSS after loading {fmt(c.get('rss_loaded_mib'), 0)} MiB."
        )
    capped = [
        f"{c['name']} ({(c.get('card') or {}).get('limits', {}).get('max_batch')} rows)"
        for c in res["configs"]
        if c["name"] != "one-at-a-time"
        and (c.get("card") or {}).get("limits", {}).get("max_batch", max(P["levels"])) < max(P["levels"])
    ]
    if capped:
        L += [
            "",
            f"Note: {', '.join(capped)}: fewer engine rows than the highest level; the streams beyond them wait "
            "in the queue (their TTFT includes the wait).",
        ]
    L += ["", f"Artifacts: {res['artifacts'].get('source', '')}.", "", "## Results", ""]
    L += [table(MAIN_HEADER, main_rows(res), ["---", "---:"] + ["---:"] * (len(MAIN_HEADER) - 2)), ""]
    L += ["Within-repeat ratios (median [range] over repeats):", "", table(COMPARE_HEADER, compare_rows(res)), ""]
    head, rows = prompt_rows(res)
    if rows:
        L += [
            "TTFT by prompt length (batched; median over repeats of each run's p50 / p99; n = requests): a long "
            "prompt's own prefill is part of its TTFT, so the spread over mixed lengths is not all waiting.",
            "",
            table(head, rows),
            "",
        ]
    L += ["## Targets", "", table(["target", "goal", "measured", "met"], target_rows(res)), ""]
    if any(t["met"] is False for t in targets(res)):
        L += ["A target marked **no** was missed on this machine; the numbers above are as measured.", ""]
    if res.get("soak"):
        sk = res["soak"]
        head, samples = soak_rows(res)
        L += [
            "## Soak",
            "",
            f"{sk['seconds']:g} s at concurrency {sk['concurrency']} against `{sk['config']}`, the server's VmRSS "
            f"(`/proc/PID/status`) sampled every {sk['interval_s']:g} s.",
            "",
            table(SOAK_HEADER, head),
            "",
            table(["seconds", "VmRSS (MiB)"], samples),
            "",
        ]
        rs = rss_summary(sk)
        if rs:
            L += [
                f"VmRSS grew {rs['growth']:+,.0f} MiB over the soak, {rs['growth_late']:+,.0f} MiB over its last "
                "three quarters (the first minutes include the batch growing to its working set: up to the max "
                "batch of rows, their KV caches and each pass's copies; and, for a server started with "
                "`--memory-arena`, ONNX Runtime's arena growing to the shapes seen).",
                "",
            ]
        if sk.get("error_kinds"):
            L += [f"Soak errors: {sk['error_kinds']}", ""]
    errs = {f"{r['config']} c={r['concurrency']}": r["error_kinds"] for r in res["runs"] if r.get("error_kinds")}
    if errs:
        L += ["Errors by run: " + "; ".join(f"{k}: {v}" for k, v in errs.items()), ""]
    L += ["![serving](serve.png)", ""]
    return "\n".join(L)


# --- the chart ------------------------------------------------------------------------------------


def chart(res: dict, path: str | os.PathLike) -> None:
    """tokens/s, TTFT and latency against concurrency per configuration; the soak's VmRSS."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    levels = res["protocol"]["levels"]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    panels = [
        (axes[0, 0], [("tokens_per_s", "-")], "aggregate tokens/s", False),
        (axes[0, 1], [("ttft_p50_ms", "-"), ("ttft_p99_ms", "--")], "TTFT (ms): median solid, p99 dashed", True),
        (axes[1, 0], [("latency_p50_ms", "-"), ("latency_p99_ms", "--")], "latency (ms): median, p99 dashed", True),
    ]
    for ax, keys, title, logy in panels:
        for c in res["configs"]:
            for key, style in keys:
                pts = [(v, stat(cell(res, c["name"], v), key)) for v in levels]
                pts = [(v, s["median"]) for v, s in pts if s]
                if pts:
                    ax.plot(*zip(*pts), style, marker="o", color=COLORS.get(c["name"]), label=c["name"])
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(v) for v in levels])
        if logy:
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("concurrent streams")
        ax.set_title(title, fontsize=10)
        handles, labels = ax.get_legend_handles_labels()
        seen = dict(zip(labels, handles))
        ax.legend(seen.values(), seen.keys(), fontsize=8)
    ax = axes[1, 1]
    sk = res.get("soak")
    if sk and sk.get("rss"):
        t, mib = zip(*sk["rss"])
        ax.plot(t, mib, color=COLORS.get(sk["config"], "tab:blue"))
        ax.set_xlabel("seconds")
        ax.set_ylabel("VmRSS (MiB)")
        ax.set_title(
            f"soak: {sk['config']} at {sk['concurrency']} streams, {sk['answered']}/{sk['sent']} answered, "
            f"{sk['errors']} errors",
            fontsize=10,
        )
    else:
        ax.set_axis_off()
        ax.text(0.5, 0.5, "no soak", ha="center")
    fig.suptitle(res.get("title", "singlepass serving benchmark"), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_tables(res: dict) -> None:
    m = res["machine"]
    la = [", ".join(f"{x:.2f}" for x in v) for v in (m["loadavg"], res.get("loadavg_end") or [])]
    print(f"\n{res['title']} - {m['cpu']}, {m['cpu_count']} cores, load average {la[0]} -> {la[1]}")
    print(table(MAIN_HEADER, main_rows(res)))
    print()
    print(table(COMPARE_HEADER, compare_rows(res)))
    print()
    print(table(["target", "goal", "measured", "met"], target_rows(res)))
    if res.get("soak"):
        head, samples = soak_rows(res)
        print()
        print(table(SOAK_HEADER, head))
        print(table(["seconds", "VmRSS (MiB)"], samples))


def write_report(res: dict, out_dir: str | os.PathLike) -> None:
    """serve.md and serve.png in ``out_dir`` from a result (what serve.json stores)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / "serve.md", render(res))
    chart(res, out_dir / "serve.png")
