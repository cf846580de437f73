"""The latency benchmark's pure helpers (no model, no onnxruntime session): the statistics over
alternating runs, the tables, the report, the chart, the results location, and the guard-side
padding/batching helpers."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from singlepass.benchmarks import latency_report as rep

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"  # the committed results


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
    runs = {
        "base": [[1.0, 1.0, 1.0], [2.0, 2.0, 2.0], [1.0, 1.0, 1.0]],
        "probe": [[1.1, 1.1, 1.1], [2.2, 2.2, 2.2], [1.1, 1.1, 1.1]],
    }
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
    cfgs = [
        {"name": "base", "label": "base", "short": "base", "kind": "single-pass"},
        {
            "name": "pooling",
            "label": "+pool",
            "short": "+pool",
            "kind": "single-pass",
            "f1_human": "50.0",
            "f1_full": "40.0",
        },
        {"name": "mha", "label": "+mha", "short": "+mha", "kind": "single-pass"},
        {"name": "guard-classifier", "label": "(a)", "short": "(a)", "kind": "guard"},
    ]
    st = {
        "batch": 1,
        "new_tokens": 1,
        "batch_sizes": [1, 1],
        "runs": {
            "base": [[0.010, 0.010], [0.012, 0.012]],
            "pooling": [[0.0101, 0.0101], [0.0121, 0.0121]],
            "mha": [[0.011, 0.011], [0.013, 0.013]],
            "guard-classifier": [[0.025, 0.025], [0.03, 0.03]],
        },
    }
    mem = {
        "base": {"peak_rss_mib": 1500.0, "peak_by_batch_mib": {"1": 1000.0, "8": 1500.0}},
        "pooling": {"peak_rss_mib": 1001.0},
        "mha": {"peak_rss_mib": 1030.0},
        "guard-classifier": {"peak_rss_mib": 1200.0, "guard_weights_mib": 86.0},
    }
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
    from singlepass.benchmarks.guards import _batches, batch_inputs, score_in_batches

    class E:
        def __init__(self, ids):
            self.ids = ids

    ids, mask = batch_inputs([E([1, 2, 3]), E([4])])
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

    from singlepass.benchmarks.latency import settings_for
    from singlepass.benchmarks.latency_prepare import artifact_plan

    s = settings_for(Namespace(n=200, n_batched=48, n_decode=8, batch=[1, 8], new_tokens=[1, 32]))
    assert [(x["batch"], x["new_tokens"], x["n"]) for x in s] == [(1, 1, 200), (8, 1, 48), (1, 32, 8), (8, 32, 8)]
    s = settings_for(Namespace(n=8, n_batched=48, n_decode=16, batch=[8], new_tokens=[1]))
    assert [(x["batch"], x["new_tokens"], x["n"]) for x in s] == [(8, 1, 8)]
    plan = artifact_plan({m: {"dir": f"/p/{m}"} for m in ("pooling", "gate", "mha")})
    assert plan == {
        "base": [],
        "pooling": ["/p/pooling:pooling"],
        "gate": ["/p/gate:gate"],
        "mha": ["/p/mha:mha"],
        "gate+mha": ["/p/gate:gate", "/p/mha:mha"],
    }


def test_memory_texts_are_the_first_and_the_longest_in_order():
    from singlepass.benchmarks.latency import memory_texts

    texts = ["a", "b", "c", "d", "e", "f"]
    assert memory_texts(texts, [1, 9, 2, 8, 3, 7], 4) == ["a", "b", "d"]  # first 2 | longest 2 (b, d)
    assert memory_texts(texts, [1, 2, 3, 4, 5, 6], 4) == ["a", "b", "e", "f"]


def test_table_only_reproduces_the_committed_report(tmp_path, capsys):
    """latency.md is a function of latency.json alone: --table-only on a copy of the committed
    measurements writes the committed latency.md (and a chart) into --out."""
    if not (RESULTS / "latency.json").is_file() or not (RESULTS / "latency.md").is_file():
        pytest.skip("no committed latency results")
    pytest.importorskip("matplotlib")
    from singlepass.benchmarks.latency import main

    res = json.loads((RESULTS / "latency.json").read_text())
    assert rep.render(res) == (RESULTS / "latency.md").read_text()
    (tmp_path / "latency.json").write_text((RESULTS / "latency.json").read_text())
    assert main(["--table-only", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "latency.md").read_text() == (RESULTS / "latency.md").read_text()
    assert (tmp_path / "latency.png").read_bytes()[:4] == b"\x89PNG"
    first = res["latency_settings"][0]
    assert f"{rep.setting_key(first['batch'], first['new_tokens'])} ({first['n']} prompts)" in capsys.readouterr().out


def test_results_dir_is_out_or_the_working_directory(tmp_path, monkeypatch):
    from singlepass.benchmarks.outputs import results_dir

    monkeypatch.chdir(tmp_path)
    assert results_dir() == tmp_path / "benchmarks" / "results"
    assert results_dir(None) == tmp_path / "benchmarks" / "results"
    assert results_dir(tmp_path / "elsewhere") == tmp_path / "elsewhere"
    assert results_dir("rel") == Path("rel")


def test_machine_record_keys():
    pytest.importorskip("onnxruntime")
    from singlepass.benchmarks.machine import machine_info, ort_machine

    assert list(ort_machine()) == ["cpu", "cpu_count", "memory_gib", "system", "python", "onnxruntime", "loadavg"]
    assert list(machine_info()) == ["cpu", "cpu_count", "memory_gib", "system", "python"]


def test_machine_names_the_vector_isa_behind_the_cpu_name():
    from singlepass.benchmarks.machine import cpu_name, vector_isa

    assert vector_isa({"avx2", "fma"}) == "AVX2, no AVX-512"
    assert vector_isa({"avx2", "avx_vnni"}) == "AVX2 + AVX-VNNI, no AVX-512"
    assert vector_isa({"avx2", "avx512f", "avx512_vnni", "amx_tile"}) == "AVX-512 + VNNI + AMX"
    assert vector_isa({"sse4_2"}) == "no AVX2"
    flags = {f for line in open("/proc/cpuinfo") if line.startswith("flags") for f in line.split(":")[1].split()}
    assert cpu_name().endswith(f"({vector_isa(flags)})")


# --- the serving side on a tiny exported artifact (the runtime's public API only) -------------------


@pytest.fixture(scope="module")
def tiny_art(tmp_path_factory, tiny_backbone):
    """A tiny artifact with one gate probe fused as ``gate`` -> (folder, probe spec)."""
    pytest.importorskip("onnx")
    from export_helpers import make_probe

    from singlepass.export.pipeline import export_artifact

    root = tmp_path_factory.mktemp("bench-art")
    probe = make_probe(root / "gate", tiny_backbone, "gate")
    export_artifact(root / "art", [f"{probe}:gate"], backbone=tiny_backbone, log=lambda m: None)
    return root / "art", f"{probe}:gate"


def test_serving_llm_does_fixed_work_and_reads_first_logits(tiny_art, tiny_backbone):
    from singlepass.benchmarks.serving import LLM, Pipeline

    llm = LLM(tiny_art[0], threads=1)
    texts = ["hello there", "a much longer prompt about the sea and the sky"]
    res = llm(texts, 4)
    assert [len(r.token_ids) for r in res] == [4, 4]  # EOS ignored: every request does the same work
    assert all(r.finish_reason == "max_new_tokens" for r in res) and llm.probe_names == ["gate"]
    assert all(set(r.labels) == {"gate"} for r in res)
    logits = llm.first_logits([llm.encode(t) for t in texts])
    assert logits.shape == (2, tiny_backbone.model.config.vocab_size)  # [B, V]
    assert logits.argmax(-1).tolist() == [r.token_ids[0] for r in res]  # greedy: the same first token
    verdicts, out = Pipeline(lambda ts: np.zeros(len(ts), bool), llm)(texts, 1)
    assert verdicts.tolist() == [False, False] and [len(r.token_ids) for r in out] == [1, 1]


def test_memory_worker_and_artifact_check_on_a_real_artifact(tiny_art, tiny_backbone, monkeypatch):
    from singlepass import files
    from singlepass.benchmarks.latency_prepare import artifact_current
    from singlepass.benchmarks.latency_worker import run_memory

    folder, spec = tiny_art
    sha = tiny_backbone.fingerprint["sha256"]
    assert artifact_current(folder, [spec], sha)
    assert not artifact_current(folder, [spec], "another backbone")
    assert not artifact_current(folder, [spec.rsplit(":", 1)[0] + ":other"], sha)
    assert not artifact_current(folder, [], sha)
    assert not artifact_current(folder.parent / "missing", [spec], sha)
    with monkeypatch.context() as mp:  # built by other export / probe code: stale
        mp.setattr(files, "source_sha256", lambda *packages: "0" * 64)
        assert not artifact_current(folder, [spec], sha)
    r = run_memory(
        {
            "config": {"name": "gate", "artifact": str(folder)},
            "threads": 1,
            "texts": ["hi", "hello you"],
            "settings": [{"batch": 1, "new_tokens": 2}, {"batch": 2, "new_tokens": 1}],
        }
    )
    assert r["name"] == "gate" and r["prompts"] == 2 and set(r["serve_seconds"]) == {"1,2", "2,1"}
    assert set(r["peak_by_batch_mib"]) == {"1", "2"} and r["peak_rss_mib"] >= r["rss_loaded_mib"] > 0
