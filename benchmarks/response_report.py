"""response.md, the response benchmark's report, from what response.json stores
(``benchmarks/response.py`` trains, evaluates and times; ``--table-only`` re-renders from the JSON):
the F1 table, the issue's target rows, every metric, early detection, the cost phase's tables, the
data and the commands. A function of the stored doc alone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from singlepass.benchmarks.response import (
    CONSECUTIVE,
    GUARD_RECIPE,
    GUARD_VIEW,
    IN_DIST,
    METHODS,
    MIXTURE,
    OOD,
    STOP_FPR,
    STREAMING,
    TESTS,
    WITHIN,
)
from singlepass.files import atomic_write

# test set -> its name in the tables
SHOWN = {
    "beavertails": "BeaverTails",
    "gptfuzz": "GPTFuzz",
    "saferlhf": "SafeRLHF (OOD)",
    "wildguardmix_response": "WildGuardTest (OOD)",
}
# method -> what it reads, as the F1 table describes it
READS = {
    "pooling": "streaming (token mean, layer mean)",
    "pooling-max": "streaming (token max, layer mean)",
    "gate": "streaming (softmax gate over running sums)",
    "gate-prefix": "streaming (softmax gate over running sums), trained with random response prefixes",
    "mha-stream": "streaming (MHA, query=learned: attention pooling, learned query per head)",
    "gate-stop": "streaming gate, trained for the stop rule (its logits after every decode pass)",
    "mha-stream-stop": "streaming MHA (query=learned), trained for the stop rule (its logits after every decode pass)",
    "mha": "not streaming (reference): MHA self-attention over the whole cut response",
    "last-token": "last response token, final layer (linear probe)",
    "guard": "MiniLM guard, once on the finished cut response",
}
GUARD_SHOWN = GUARD_VIEW.replace("\n", "\\n")  # as the report prints it


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}"


def _num(v, digits: int = 0) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def values(runs, method: str, test: str, key: str, early: bool | str = False) -> list[float]:
    """``key`` of each run of ``method`` on ``test``; ``early``: of its early-detection record
    (True: "early", at the stored threshold; or that record's name, e.g. "early_stop_fpr")."""
    out = []
    for r in runs:
        if r["method"] != method or test not in r["tests"]:
            continue
        t = r["tests"][test].get("early" if early is True else early) if early else r["tests"][test]
        if t is not None and t.get(key) is not None:
            out.append(float(t[key]))
    return out


def mean_of(runs, method, test, key, early=False) -> float | None:
    v = values(runs, method, test, key, early)
    return float(np.mean(v)) if v else None


def cell(runs, method, test, key, scale=100.0, digits=1, early=False) -> str:
    v = values(runs, method, test, key, early)
    if not v:
        return "—"
    a = np.asarray(v) * scale
    return f"{a.mean():.{digits}f}" if len(a) == 1 else f"{a.mean():.{digits}f} ± {a.std():.{digits}f} (n={len(a)})"


def detection_table(runs, tests, methods, early: bool | str) -> list[str]:
    """The early-detection table of the streaming methods' ``early`` records."""
    lines = [
        f"| test set | method | harmful rows | median tokens | p90 tokens | flagged <= {WITHIN} | never flagged | "
        f"safe rows | false stops | false stops <= {WITHIN} |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for t in tests:
        for m in methods:
            if m not in STREAMING or not values(runs, m, t, "harmful_rows", early):
                continue

            def e(k, scale=100.0, digits=1, m=m, t=t):
                return cell(runs, m, t, k, scale, digits, early=early)

            lines.append(
                f"| {SHOWN[t]} | {m} | {e('harmful_rows', 1, 0)} | {e('median_tokens', 1, 1)} | "
                f"{e('p90_tokens', 1, 1)} | {e('flagged_within')} | {e('never_flagged')} | {e('safe_rows', 1, 0)} | "
                f"{e('false_stop')} | {e('false_stop_within')} |"
            )
    return lines


def by_pass_table(runs, tests, methods) -> list[str]:
    """The ROC AUC of the streaming methods' scores after pass k (``separation_by_pass``), for the runs that
    stored it; nothing when none did."""
    passes = sorted({b["pass"] for r in runs for t in r["tests"].values() for b in t.get("by_pass") or []})
    if not passes:
        return []
    lines = [
        "",
        "### What a probe can tell after k tokens",
        "",
        "ROC AUC of the score after decode pass k alone, over the test responses still running at k (their count "
        "in the last row of each set): the separation any stop rule on these scores starts from.",
        "",
        "| test set | method | " + " | ".join(f"k = {k}" for k in passes) + " |",
        "| --- | --- | " + " | ".join("---:" for _ in passes) + " |",
    ]
    for t in tests:
        for m in methods:
            recs = [r["tests"][t]["by_pass"] for r in runs if r["method"] == m and r["tests"].get(t, {}).get("by_pass")]
            if not recs:
                continue
            auc = {
                k: [b["auroc"] for rec in recs for b in rec if b["pass"] == k and b["auroc"] is not None]
                for k in passes
            }
            cells = [f"{np.mean(auc[k]):.3f}" if auc[k] else "—" for k in passes]
            lines.append(f"| {SHOWN[t]} | {m} | " + " | ".join(cells) + " |")
        rows = {b["pass"]: b["rows"] for r in runs for b in r["tests"].get(t, {}).get("by_pass") or []}
        if rows:
            lines.append(f"| {SHOWN[t]} | (rows running) | " + " | ".join(str(rows.get(k, "—")) for k in passes) + " |")
    return lines


def best_streaming(runs) -> tuple[str | None, dict]:
    """The streaming method with the highest mean in-distribution F1 (BeaverTails, GPTFuzz), and every
    streaming method's mean."""
    means = {}
    for m in STREAMING:
        f1 = [mean_of(runs, m, t, "f1") for t in IN_DIST]
        if all(v is not None for v in f1):
            means[m] = 100 * float(np.mean(f1))
    return (max(means, key=means.get) if means else None), means


def targets(doc: dict) -> list[str]:
    """The issue's targets, judged from the stored runs and the cost phase (means over seeds)."""
    runs, cost = doc["runs"], doc.get("cost")
    best, means = best_streaming(runs)
    out = []
    if best is None:
        out.append("- best streaming method: not run (no streaming probe has results on BeaverTails and GPTFuzz)")
    else:
        out.append(
            f"- best streaming method (highest mean F1 on BeaverTails and GPTFuzz, of {', '.join(STREAMING)}; "
            f"mha, the self-attention MHA, does not stream: it is the reference): **{best}** ("
            + ", ".join(f"{m} {v:.1f}" for m, v in means.items())
            + ")"
        )

    def f1(method, test):
        v = mean_of(runs, method, test, "f1")
        return None if v is None else 100 * v

    def judged(tests, ok, what):
        pairs = [(t, f1(best, t), f1("guard", t)) for t in tests]
        if best is None or any(a is None or g is None for _, a, g in pairs):
            missing = "the guard" if best is not None else "the streaming probes"
            return f"{what}: not run ({missing} not run on {', '.join(SHOWN[t] for t in tests)})"
        verdict = "met" if all(ok(a, g) for _, a, g in pairs) else "missed"
        return f"{what}: {verdict} (" + "; ".join(f"{SHOWN[t]} {a:.1f} vs {g:.1f}" for t, a, g in pairs) + ")"

    out.append("- " + judged(IN_DIST, lambda a, g: a >= g, "best streaming F1 >= the MiniLM guard's in distribution"))
    out.append(
        "- "
        + judged(OOD, lambda a, g: g - a <= 10, "best streaming F1 within 10 points of the guard's out of distribution")
    )
    ref = [(t, f1("mha", t), f1("guard", t)) for t, _ in TESTS]
    if all(a is not None and g is not None for _, a, g in ref):
        out.append(
            "- (reference, not streaming) MHA on the whole cut response vs the guard: "
            + "; ".join(f"{SHOWN[t]} {a:.1f} vs {g:.1f}" for t, a, g in ref)
        )
    if best is None:
        out.append(f"- median detection within {WITHIN} tokens: not run")
    else:
        med = {t: mean_of(runs, best, t, "median_tokens", early=True) for t, _ in TESTS}
        done = all(any(r["method"] == best and t in r["tests"] for r in runs) for t, _ in TESTS)
        verdict = (
            "not run" if not done else "met" if all(v is not None and v <= WITHIN for v in med.values()) else "missed"
        )
        out.append(
            f"- median detection within {WITHIN} tokens ({best}, harmful test rows it flags): {verdict} ("
            + "; ".join(
                f"{SHOWN[t]} {_num(v)} (flagged within {WITHIN}: "
                f"{_pct(mean_of(runs, best, t, 'flagged_within', True))}%, "
                f"false stops {_pct(mean_of(runs, best, t, 'false_stop', True))}%)"
                for t, v in med.items()
            )
            + ")"
        )
    if not cost:
        out.append("- decode-step overhead of the streaming probe <= 2%: not run (the `--cost` phase)")
    else:
        switched = cost.get("switched") or {}
        for m in cost["probes"]:
            d = {k: v["probes"][m] for k, v in cost["decode"].items()}
            two = "; ".join(
                f"{k} {p['min_overhead_pct']:+.2f}%, median of block ratios {p['overhead_pct']:+.2f}%"
                for k, p in d.items()
            )
            tag = f"the streaming {m} probe{' (the best)' if m == best else ''}"
            if m in switched:  # judged in one session (benchmarks/switch.py); two sessions listed beside it
                ok = cost_met(cost, m)
                out.append(
                    f"- decode-step overhead of {tag} <= 2% (one session, the probe switched on and off): "
                    f"{'met' if ok else 'missed'} ("
                    + "; ".join(
                        f"{k} {p['overhead_pct']:+.2f}% ({1e3 * p['overhead_ms']:+.0f} us; null {p['null_pct']:+.2f}%)"
                        for k, p in switched[m].items()
                    )
                    + f"; two sessions, fastest blocks: {two})"
                )
            else:
                ok = all(p["min_overhead_pct"] <= 2.0 for p in d.values())
                out.append(
                    f"- decode-step overhead of {tag} <= 2% (fastest blocks): {'met' if ok else 'missed'} ({two})"
                )
    every = [m for m in STREAMING if meets_every_target(runs, cost, m)]
    out.append(
        "- streaming methods that meet every target above on their own (F1 vs the guard in and out of "
        f"distribution, median detection, decode-step overhead in one session): {', '.join(every) or 'none'}"
    )
    return out


def cost_met(cost: dict | None, method: str) -> bool | None:
    """The decode-step target for ``method`` from the in-session measurement: None where it was not run."""
    sw = (cost or {}).get("switched") or {}
    if method not in sw:
        return None
    return all(p["overhead_pct"] <= 2.0 for p in sw[method].values())


def meets_every_target(runs, cost, method: str) -> bool:
    """``method``'s mean F1 >= the guard's on each in-distribution test set and within 10 points of it on
    each out-of-distribution one, its median detection within ``WITHIN`` tokens on every test set, and its
    in-session decode-step overhead <= 2% at every batch size measured."""

    def f1(m, t):
        return mean_of(runs, m, t, "f1")

    pairs = [(t, f1(method, t), f1("guard", t)) for t, _ in TESTS]
    if any(a is None or g is None for _, a, g in pairs):
        return False
    med = [mean_of(runs, method, t, "median_tokens", early=True) for t, _ in TESTS]
    return (
        all(a >= g for t, a, g in pairs if t in IN_DIST)
        and all(100 * (g - a) <= 10 for t, a, g in pairs if t in OOD)
        and all(v is not None and v <= WITHIN for v in med)
        and bool(cost_met(cost, method))
    )


def render(doc: dict) -> str:
    runs, s, data = doc["runs"], doc["settings"], doc["data"]
    n = s["max_response_tokens"]
    methods = [m for m in METHODS if any(r["method"] == m for r in runs)]
    tests = [t for t, _ in TESTS]
    cut = sum(data[k]["responses_cut"] for k in data)
    rows = sum(data[k]["rows"] for k in data)
    lines = [
        f"# Response probes: streaming moderation of the response vs a guard after generation ({doc['model']})",
        "",
    ]
    lines += [
        f"Every probe reads at most the first **{n} response tokens** (after the prompt, in the serving view), and the "
        f"MiniLM guard sees the same cut response decoded back to text (`{GUARD_SHOWN}`), "
        f"so both judge the same evidence: {cut:,} of {rows:,} responses (train, validation and test) are longer and "
        f"were cut. Metrics in % at the threshold stored from validation (F1-optimal), AUPRC in [0, 1]; "
        f"mean over seeds ({', '.join(map(str, s['seeds']))}). `—` = not run.",
        "",
        "## F1 (test)",
        "",
        "| method | reads | " + " | ".join(SHOWN[t] for t in tests) + " | trainable params | train (s) |",
        "| --- | --- | " + " | ".join("---:" for _ in tests) + " | ---: | ---: |",
    ]
    for m in methods:
        rs = [r for r in runs if r["method"] == m]
        params = sorted({r["parameters"] for r in rs})
        secs = np.mean([r["train_seconds"] for r in rs])
        lines.append(
            f"| {m} | {READS[m]} | "
            + " | ".join(cell(runs, m, t, "f1") for t in tests)
            + f" | {', '.join(f'{p:,}' for p in params)} | {secs:.0f} |"
        )
    lines += ["", "## Targets", ""] + targets(doc)
    lines += [
        "",
        "## Every metric",
        "",
        "| test set (rows, unsafe) | method | F1 | AUPRC | TPR @ 1% FPR | recall @ thr. | FPR @ thr. | thr. |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for t in tests:
        for m in methods:
            if not values(runs, m, t, "rows"):
                continue
            lines.append(
                f"| {SHOWN[t]} ({data[t]['rows']}, {data[t]['unsafe']}) | {m} | {cell(runs, m, t, 'f1')} | "
                f"{cell(runs, m, t, 'auprc', 1, 3)} | {cell(runs, m, t, 'tpr_at_1pct_fpr')} | "
                f"{cell(runs, m, t, 'recall')} | {cell(runs, m, t, 'fpr')} | {cell(runs, m, t, 'threshold', 1, 3)} |"
            )
    lines += [
        "",
        "## Early detection (streaming methods)",
        "",
        f"Each test response replayed token by token through the probe's streaming state; the runtime's stop rule "
        f"(runtime/policy.py `Streaks`: P(unsafe) >= the stored threshold on {CONSECUTIVE} decode passes in a row, "
        f"pass k having seen response tokens 1..k) gives the pass that would stop it. Harmful rows: median and p90 "
        f"of the generated tokens until flagged (over the flagged rows), the share flagged within {WITHIN} tokens and "
        f"the share never flagged within the response (at most {n} tokens); safe rows: the share the rule would stop "
        f"(false stops), at all and within {WITHIN} tokens. A rule that stops everything is not detection: read the "
        f"two sides together. (A response of one token can never be stopped: the rule needs {CONSECUTIVE} passes.)",
        "",
    ] + detection_table(runs, tests, methods, True)
    if any(values(runs, m, t, "harmful_rows", "early_stop_fpr") for m in methods for t in tests):
        pts = {r["method"]: r["stop_point"] for r in runs if r.get("stop_point")}
        lines += [
            "",
            f"### At the stop-calibrated threshold (at most {STOP_FPR:.0%} of safe validation responses stopped)",
            "",
            f"The same replays with each probe's threshold chosen on its validation responses, replayed the same way, "
            f"as the highest-recall threshold at which the stop rule stops at most {STOP_FPR:.0%} of the safe ones "
            "(models/streaming.py `stop_operating_point`: what `singlepass train --threshold-at-fpr "
            f"{STOP_FPR:g}` stores for a streaming response probe). Thresholds: "
            + ", ".join(
                f"{m} {p['threshold']:.3f} (validation: {p['fpr']:.1%} of safe, {p['tpr']:.1%} of unsafe stopped)"
                for m, p in pts.items()
            )
            + ".",
            "",
        ]
        lines += detection_table(runs, tests, methods, "early_stop_fpr")
    lines += by_pass_table(runs, tests, methods)
    checks = [r["tests"][t].get("stream_vs_whole_max_abs_diff") for r in runs for t in r["tests"]]
    checks = [c for c in checks if c is not None]
    if checks:
        lines += [
            "",
            f"The streaming replay's last score equals the probe run over the whole cut response: max |P difference| "
            f"{max(checks):.1e} over every streaming run and test row.",
        ]
    lines += ["", "## Cost", ""]
    cost = doc.get("cost")
    if not cost:
        lines.append("Not run: `--cost` (a separate phase; run it alone on a quiet machine).")
    else:
        first = next(iter(cost["decode"].values()))
        lines += [
            "Decode step of the base model vs the base + one streaming response probe ("
            + ", ".join(cost["probes"])
            + "; one artifact each), all exported with "
            f"{cost['weights']} weights (`export_artifact`), opened with "
            f"`runtime.api.load(threads={cost['threads']})`; "
            f"one prompt prefilled (repeated for batch 8) and a few greedy steps, then blocks of "
            + (
                f"(after {cost['settle_s']} s idle, the other artifacts' threads asleep, and an untimed prefill) "
                if cost.get("settle_s")
                else ""
            )
            + f"one untimed and {first['steps']} chained `decode_one_token` steps, the artifacts alternating block by "
            f"block (order rotated every block); times are medians of {first['repeats']} blocks, the overhead "
            "the median over blocks of (probe block / the base block of the same rotation - 1), with its interquartile "
            "range (the machine's noise), and the fastest probe block over the fastest base block (noise only "
            "ever adds time, so the minima are the least disturbed estimate; the target is judged on them where "
            "the in-session measurement below was not run). "
            "Target: <= 2% per step. Before each block, one timed prefill of the prompt (no response token in "
            "it: the probe's fold is skipped), its overhead the median of the paired ratios likewise.",
            "",
            "| batch | context (tokens) | base (ms / step) | probe | + probe (ms / step) | overhead (ms) | overhead "
            "| overhead IQR | overhead, fastest blocks | prefill base / + probe (ms) | prefill overhead |",
            "| ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for v in cost["decode"].values():
            for m, p in v["probes"].items():
                lo, hi = p["overhead_pct_iqr"]
                lines.append(
                    f"| {v['batch']} | {v['context_tokens']} | {v['base_ms']:.2f} | {m} | {p['probe_ms']:.2f} | "
                    f"{p['overhead_ms']:+.3f} | {p['overhead_pct']:+.2f}% | {lo:+.1f}% to {hi:+.1f}% | "
                    f"{p['min_overhead_pct']:+.2f}% | {_prefill_cells(v, p)} |"
                )
        switched = cost.get("switched") or {}
        if switched:
            first = next(iter(next(iter(switched.values())).values()))
            lines += [
                "",
                "The same probes measured inside one session (`benchmarks/switch.py`; the target is judged on "
                "this): two sessions of one artifact differ by up to ~6% here (their buffers land elsewhere), "
                "more than the 2% asked, so each probe artifact is copied with its probe behind a graph input "
                "(`singlepass/probe_on`: off, the decode form's `If` returns the state unchanged and zero labels) "
                f"and {first['pairs']} rounds of three decode steps from one state alternate on, off and off "
                "again, each round in one of the 6 orders in turn. Overhead: the median over rounds of "
                "(on - off), over the median off step; null: the same for the second off step (the method's "
                "own error). A lower bound of the cost over the base: off still runs the probe's `If`, the "
                "switch's inner `If` and its pass-through (an Identity per state tensor and a zero fill per "
                "label), which the overhead leaves out.",
                "",
                "| batch | context (tokens) | probe | off (ms / step) | on (ms / step) | overhead (ms) | overhead | "
                "overhead IQR | null (off vs off) |",
                "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
            ]
            for m, by in switched.items():
                for v in by.values():
                    lo, hi = v["overhead_pct_iqr"]
                    lines.append(
                        f"| {v['batch']} | {v['context_tokens']} | {m} | {v['off_ms']:.2f} | {v['on_ms']:.2f} | "
                        f"{v['overhead_ms']:+.3f} | {v['overhead_pct']:+.2f}% | {lo:+.1f}% to {hi:+.1f}% | "
                        f"{v['null_pct']:+.2f}% |"
                    )
        g = cost["guard"]
        b1 = cost["decode"].get("batch 1")
        lines += [
            "",
            f"Guard re-run every {g['every']} generated tokens (ceil(tokens / {g['every']}) MiniLM calls at batch 1 on "
            f"the prefix texts, each the median of {g['repeats']} runs) vs once on the finished response, over "
            f"{g['rows']} test responses generated up to {g['max_tokens']} tokens (their own length when shorter; "
            f"mean {g['mean_tokens']:.1f} tokens). The probes' accuracy above reads the first {n}; the cost of "
            "re-running grows with the generation, the streaming probe's per-token cost does not:",
            "",
            "| guard schedule | calls per response | ms per response | ms per generated token |",
            "| --- | ---: | ---: | ---: |",
            f"| once, after generation | 1 | {g['once_ms_per_response']:.1f} | {g['once_ms_per_token']:.3f} |",
            f"| re-run every {g['every']} tokens | {g['mean_calls']:.2f} | {g['rerun_ms_per_response']:.1f} | "
            f"{g['rerun_ms_per_token']:.3f} |",
        ]
        for m, p in (b1["probes"] if b1 else {}).items():
            p = switched.get(m, {}).get("batch 1", p)  # the in-session overhead where measured
            lines.append(f"| (streaming {m} probe, batch 1) | — | — | {p['overhead_ms']:+.3f} (decode-step overhead) |")
        m = cost["machine"]
        lines += [
            "",
            f"Machine (cost phase): {m['cpu']}, {m['cpu_count']} cores, {m['memory_gib']} GiB, onnxruntime "
            f"{m['onnxruntime']}; load average {', '.join(f'{x:.2f}' for x in m['loadavg'])} before, "
            f"{', '.join(f'{x:.2f}' for x in cost['loadavg_end'])} after.",
        ]
    lines += ["", "## Data", ""]
    lines.append(
        f"- Training: the mixture `{MIXTURE}` (train parts, at most {s['limit']} rows per source; validation parts, "
        f"at most {s['val_limit']} per source; seeded, stratified, after overlaps with every test part are removed): "
        f"{data['train']['rows']} training rows ({data['train']['unsafe']} unsafe), {data['validation']['rows']} "
        f"validation rows ({data['validation']['unsafe']} unsafe). Selection: validation F1 at 0.5, the mean over "
        f"the two sources; threshold: F1-optimal on the pooled validation rows (guard likewise)."
    )
    for k in ("train", "validation", *tests):
        d = data[k]
        name = {"train": "Mixture training rows", "validation": "Mixture validation rows"}.get(k) or SHOWN[k]
        lines.append(
            f"- {name} ({d['split']}): {d['rows']} rows, {d['unsafe']} unsafe; {d['responses_cut']} responses cut to "
            f"their first {n} tokens ({d['response_tokens_dropped']:,} tokens dropped), {d['response_tokens']:,} "
            "response tokens read."
        )
    lines.append(
        "- Test parts: all rows" if s["test_limit"] is None else f"- Test parts: at most {s['test_limit']} rows each"
    )
    lines[-1] += (
        " (seeded, stratified); WildGuardTest: the rows of its untouched 70% with a response label "
        "(never used for anything else); SafeRLHF and WildGuardTest are never trained or selected on."
    )
    lines.append(
        f"- Probes: {s['epochs']} epochs max (early stopping), search budget {s['trials']} (pooling, pooling-max, "
        f"last-token) / {s['trials_heavy']} (gate, MHA); pooling-max pools the tokens by max and the layers by mean; "
        "mha-stream is MHA with query=learned (stage 1 attention pooling with one learned query per head and "
        "layer, an online softmax when streamed), mha the paper's self-attention (query=tokens). "
        f"Prompts capped at {s['max_length']} tokens. Guard: all-MiniLM-L6-v2 fine-tuned (benchmarks/guards.py "
        f"recipe, {GUARD_RECIPE['max_length']} MiniLM tokens, truncated on the left so the cut response is always "
        "kept whole and a long prompt loses its beginning)."
    )
    commands = sorted(
        {r.get("command") or doc["command"] for r in runs}
        | ({cost["command"]} if cost else set())
        | ({cost["switched_command"]} if cost and cost.get("switched_command") else set())
    )
    machines = sorted({r["machine"] for r in runs})
    lines += ["", "## Reproduce", "", "The commands that produced the stored runs (a rerun skips them):", ""]
    lines += ["```", *(commands or [doc["command"]]), "```", ""]
    lines += ["Machine: " + ("; ".join(machines) if machines else doc["machine"]), ""]
    return "\n".join(lines)


def write_results(results: Path, doc: dict) -> Path:
    """response.json, and response.md rendered from what was written (so --table-only is identical)."""
    results.mkdir(parents=True, exist_ok=True)
    text = json.dumps(doc, indent=1)
    atomic_write(results / "response.json", text)
    atomic_write(results / "response.md", render(json.loads(text)))
    return results / "response.md"


def redraw(results: Path) -> Path:
    """response.md re-rendered from the stored response.json (``--table-only``)."""
    doc = json.loads((results / "response.json").read_text())
    atomic_write(results / "response.md", render(doc))
    return results / "response.md"


def _prefill_cells(v: dict, p: dict) -> str:
    """The prefill columns of a cost row (runs before the prefill timing have none)."""
    if "prefill_ms" not in p:
        return "— | —"
    return f"{v['base_prefill_ms']:.2f} / {p['prefill_ms']:.2f} | {p['prefill_overhead_pct']:+.2f}%"
