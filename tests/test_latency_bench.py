"""The latency benchmark's pure helpers (no model, no onnxruntime session): the statistics over
alternating runs, the tables, the chart, and the guard-side padding/batching helpers."""

import math

import numpy as np
import pytest

from singlepass.benchmarks import latency_report as rep


def test_per_request_repeats_batch_time_for_every_request():
    assert rep.per_request([0.1, 0.3], [8, 2]) == [0.1] * 8 + [0.3] * 2


def test_summary_pools_repeats_and_counts_requests():
    runs = [[0.010, 0.020, 0.030], [0.010, 0.020, 0.030]]
    s = rep.summary(runs, [1, 1, 1])
    assert s["median_ms"] == pytest.approx(20.0)
    assert s["p90_ms"] == pytest.approx(30.0)
    assert s["throughput_rps"] == pytest.approx(3 / 0.06)
    assert s["samples"] == 6 and s["repeats"] == 2
    s8 = rep.summary([[0.08, 0.04]], [8, 4])  # 12 requests in 0.12 s
    assert s8["throughput_rps"] == pytest.approx(100.0)
    assert s8["median_ms"] == pytest.approx(80.0)  # 8 of the 12 requests waited 80 ms


def test_alternating_ratios_are_taken_within_each_repeat():
    # repeat 2 ran on a machine twice as slow for everyone: within-repeat ratios stay 1.1
    runs = {"base": [[1.0, 1.0, 1.0], [2.0, 2.0, 2.0], [1.0, 1.0, 1.0]],
            "probe": [[1.1, 1.1, 1.1], [2.2, 2.2, 2.2], [1.1, 1.1, 1.1]]}
    r = rep.alternating_ratios(runs, [1, 1, 1])
    assert r["base"]["ratio"] == pytest.approx(1.0)
    assert r["probe"]["ratio"] == pytest.approx(1.1)
    assert r["probe"]["min"] == pytest.approx(1.1) and r["probe"]["max"] == pytest.approx(1.1)
    # pooled medians would mix the slow repeat in: not what the ratio reports
    pooled = rep.summary(runs["probe"], [1, 1, 1])["median_ms"] / rep.summary(runs["base"], [1, 1, 1])["median_ms"]
    assert pooled == pytest.approx(1.1)


def test_alternating_ratio_median_resists_one_noisy_repeat():
    runs = {"base": [[1.0], [1.0], [1.0]], "x": [[1.02], [1.03], [3.0]]}
    r = rep.alternating_ratios(runs, [1])
    assert r["x"]["ratio"] == pytest.approx(1.03)
    assert r["x"]["max"] == pytest.approx(3.0)


def test_alternating_ratios_errors():
    with pytest.raises(KeyError):
        rep.alternating_ratios({"x": [[1.0]]}, [1])
    with pytest.raises(ValueError):
        rep.alternating_ratios({"base": [[1.0], [1.0]], "x": [[1.0]]}, [1])


def test_paired_ratio():
    r = rep.paired_ratio([[2.0, 4.0], [3.0, 3.0]], [[1.0, 1.0], [1.0, 2.0]])
    assert r["per_repeat"] == pytest.approx([3.0, 2.0])
    assert r["ratio"] == pytest.approx(2.5)


def test_formatting_and_table():
    assert rep.fmt(None) == "—" and rep.fmt(math.nan) == "—"
    assert rep.fmt(1234.567, 1) == "1,234.6"
    assert rep.pct(0.8049) == "80.5" and rep.pct(None) == "—"
    assert rep.overhead(1.015) == "+1.5%"
    t = rep.table(["a", "b"], [["x", 1], ["y", 2]])
    assert t.splitlines() == ["| a | b |", "| --- | ---: |", "| x | 1 |", "| y | 2 |"]
    assert rep.setting_key(1, 1) == "batch 1, 1 new token" and rep.setting_key(8, 32) == "batch 8, 32 new tokens"


def _fake():
    cfgs = [{"name": "base", "label": "base", "short": "base", "kind": "single-pass"},
            {"name": "pooling", "label": "+pool", "short": "+pool", "kind": "single-pass", "f1_human": "50.0",
             "f1_full": "40.0"},
            {"name": "mha", "label": "+mha", "short": "+mha", "kind": "single-pass"},
            {"name": "guard-classifier", "label": "(a)", "short": "(a)", "kind": "guard"}]
    st = {"batch": 1, "new_tokens": 1, "batch_sizes": [1, 1],
          "runs": {"base": [[0.010, 0.010], [0.012, 0.012]], "pooling": [[0.0101, 0.0101], [0.0121, 0.0121]],
                   "mha": [[0.011, 0.011], [0.013, 0.013]], "guard-classifier": [[0.025, 0.025], [0.03, 0.03]]}}
    mem = {"base": {"peak_rss_mib": 1500.0, "peak_by_batch_mib": {"1": 1000.0, "8": 1500.0}},
           "pooling": {"peak_rss_mib": 1001.0}, "mha": {"peak_rss_mib": 1030.0},
           "guard-classifier": {"peak_rss_mib": 1200.0, "guard_weights_mib": 86.0}}
    return {"memory": mem, "latency": {rep.setting_key(1, 1): st}, "title": "t"}, cfgs, st


def test_latency_rows_and_targets():
    res, cfgs, st = _fake()
    rows = rep.latency_rows(res, cfgs, st)
    assert [r[0] for r in rows] == ["base", "+pool", "+mha", "(a)"]
    assert rows[0][4] == "1.000" and rows[1][4] == "1.009 (1.008–1.010)"
    assert rows[1][6] == "50.0" and rows[2][6] == "—"
    assert len(rows[0]) == len(rep.LAT_HEADER)
    t = {r[0]: r for r in rep.targets(res, st)}
    assert t["pooling probe overhead <= 2%"][2] == "yes"
    mha = t["mha probe overhead <= 5%"]
    assert mha[1] == "+9.2%" and mha[2] == "**no**"  # median of 1.1 and 1.0833
    assert t["slowest single pass <= 1/2 of guard-classifier pipeline"][2] == "yes"
    assert t["mha: peak memory (batch 1) <= base + 1%"][2] == "**no**"
    assert t["pooling: peak memory (batch 1) <= base + 1%"][2] == "yes"
    assert rows[0][5] == "1,000"  # the batch-1 peak, not the overall one
    assert "+200 MiB" in t["guard-classifier: adds its whole weights"][1]


def test_chart_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    res, cfgs, _ = _fake()
    rep.chart(res, cfgs, tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_guard_helpers():
    from singlepass.benchmarks.guards import _batches, pad_right, score_in_batches

    class E:
        def __init__(self, ids):
            self.ids = ids

    ids, mask = pad_right([E([1, 2, 3]), E([4])])
    assert ids.tolist() == [[1, 2, 3], [4, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    lengths = np.array([5, 1, 3, 2, 4])
    b = _batches(lengths, 2, None)
    assert [x.tolist() for x in b] == [[1, 3], [2, 4], [0]]
    shuffled = _batches(lengths, 2, np.random.default_rng(0))
    assert sorted(np.concatenate(shuffled).tolist()) == [0, 1, 2, 3, 4]
    out = score_in_batches(lambda ts: np.array([len(t) / 10 for t in ts]), ["aaa", "a", "aa"], 2)
    assert out.tolist() == pytest.approx([0.3, 0.1, 0.2])  # back in the input order


def test_settings_and_artifact_plan():
    from argparse import Namespace

    from singlepass.benchmarks.latency import artifact_plan, settings_for

    s = settings_for(Namespace(n=200, n_batched=48, n_decode=8, batch=[1, 8], new_tokens=[1, 32]))
    assert [(x["batch"], x["new_tokens"], x["n"]) for x in s] == [(1, 1, 200), (8, 1, 48), (1, 32, 8), (8, 32, 8)]
    s = settings_for(Namespace(n=8, n_batched=48, n_decode=16, batch=[8], new_tokens=[1]))
    assert [(x["batch"], x["new_tokens"], x["n"]) for x in s] == [(8, 1, 8)]
    plan = artifact_plan({m: {"dir": f"/p/{m}"} for m in ("pooling", "gate", "mha")})
    assert plan == {"base": [], "pooling": ["/p/pooling:pooling"], "gate": ["/p/gate:gate"], "mha": ["/p/mha:mha"],
                    "gate+mha": ["/p/gate:gate", "/p/mha:mha"]}
