"""`singlepass bench serve` on a tiny artifact: the load generator's accounting against the real
server (a ``singlepass serve`` child process on a free loopback port), the soak's RSS samples,
the whole command end to end (three servers, two levels, a 2-second soak), and the report
rendered from a stored result. Counts are asserted, never timings."""

from __future__ import annotations

import asyncio
import json

import pytest
from export_helpers import serving_artifact
from test_serve import PROMPTS, tiny_guard

from singlepass.benchmarks import serve_report as rep
from singlepass.benchmarks.serve_load import ServerProcess, check_loopback, run_load, soak
from singlepass.cli import main
from singlepass.errors import SinglepassError

MODEL = "art"


@pytest.fixture(scope="module")
def art(tmp_path_factory, tiny_model_dir, tiny_backbone, cache_dir):
    root = tmp_path_factory.mktemp("serve-bench")
    return serving_artifact(root, MODEL, tiny_backbone, tiny_model_dir, cache_dir, 256, muli=False)[0]


@pytest.fixture(scope="module")
def guard(tmp_path_factory, tiny_model_dir):
    bad, safe = PROMPTS[4], [p for p in PROMPTS if p != PROMPTS[4]]
    assert "dangerous" in bad
    # " dangerous" (one token of the tiny vocabulary) flags about half of the ToxicChat prompts: both paths run
    return tiny_guard(tmp_path_factory.mktemp("guard") / "g", tiny_model_dir / "tokenizer.json", " dangerous", safe)


def test_load_generator_accounting_against_the_real_server(art):
    prompts = PROMPTS * 2
    with ServerProcess(art, MODEL, ["--threads", "1", "--ignore-eos", "--policy", "safety=block:0.99"]) as s:
        assert check_loopback(s.url) == s.url and s.rss_mib() > 0
        for c, n in ((1, 3), (4, 9)):
            res = asyncio.run(run_load(s.url, MODEL, prompts, c, n, 5, duration=300, keep=True))
            assert res["concurrency"] == c and res["sent"] == n == len(res["outcomes"])
            assert res["answered"] == n and res["errors"] == 0 and not res["error_kinds"]
            served = res["answered"] - res["blocked"]
            assert res["tokens"] == 5 * served  # --ignore-eos: every served request is max_tokens tokens
            for o in res["outcomes"]:
                assert o["ok"] and o["status"] == 200 and o["finish"] in ("length", "content_filter")
                assert o["ttft"] is not None and o["ttft"] <= o["latency"]
            assert res["ttft_p50_ms"] <= res["ttft_p99_ms"] and res["latency_p50_ms"] <= res["latency_p99_ms"]
            # every served request lands in exactly one prompt-length bin, with its own token count
            assert sum(b["n"] for b in res["ttft_by_prompt"]) == served
            assert all(o["prompt_tokens"] and o["prompt_tokens"] > 0 for o in res["outcomes"])
        # every failure is counted: sent == answered + errors
        bad = asyncio.run(run_load(s.url, "no-such-model", prompts, 2, 4, 5, duration=300))
        assert bad["sent"] == bad["errors"] == 4 and bad["answered"] == 0 and bad["tokens"] == 0
        assert any("HTTP 404" in k for k in bad["error_kinds"])
        # the duration bound: no request starts after it, each one started is answered
        short = asyncio.run(run_load(s.url, MODEL, prompts, 2, 10_000, 5, duration=0.2))
        assert 2 <= short["sent"] < 10_000 and short["answered"] == short["sent"]
        # the soak: nothing lost, the server's VmRSS sampled while it ran
        sk = asyncio.run(soak(s, prompts, 4, 2.0, 5, interval=0.25))
        assert sk["lost"] == 0 and sk["errors"] == 0 and sk["sent"] == sk["answered"] > 0
        assert len(sk["rss"]) >= 2 and all(mib > 0 for _, mib in sk["rss"])
    assert s.proc.returncode is not None and s.rss_mib() is None
    with pytest.raises(SinglepassError, match="127.0.0.1"):
        check_loopback("http://example.com:80")


def test_bench_serve_end_to_end(art, guard, tmp_path):
    out = tmp_path / "results"
    argv = ["bench", "serve", "--artifact", str(art), "--base-artifact", str(art), "--guard", str(guard)]
    argv += ["--levels", "1", "4", "--requests", "4", "--repeats", "1", "--max-tokens", "4", "--warmup", "2"]
    argv += ["--soak-seconds", "2", "--soak-concurrency", "4", "--rss-interval", "0.5", "--threads", "1"]
    argv += ["--prompts", "80", "--prefill-tokens", "64", "--out", str(out)]
    assert main(argv) == 0
    res = json.loads((out / "serve.json").read_text())
    assert {c["name"] for c in res["configs"]} == {"batched", "one-at-a-time", "guard"}
    cards = {c["name"]: c["card"] for c in res["configs"]}
    assert cards["one-at-a-time"]["limits"]["max_batch"] == 1 and cards["batched"]["limits"]["max_batch"] == 8
    assert "guard" in cards["guard"] and cards["batched"]["policy"]["safety"] == "block"
    assert all("--ignore-eos" in c["command"] and "--prefill-tokens 64" in c["command"] for c in res["configs"])
    assert len(res["runs"]) == 3 * 2
    for r in res["runs"]:
        assert r["sent"] == r["answered"] == 4 and r["errors"] == 0, r
        assert r["tokens"] == 4 * (r["answered"] - r["blocked"])
    guarded = [r for r in res["runs"] if r["config"] == "guard"]
    assert 0 < sum(r["blocked"] for r in guarded) < sum(r["answered"] for r in guarded)
    sk = res["soak"]
    assert sk["config"] == "batched" and sk["lost"] == 0 and sk["errors"] == 0 and sk["rss"]
    assert all(c["exit_status"] in (0, -15) for c in res["configs"])
    md = (out / "serve.md").read_text()
    assert "## Targets" in md and "## Soak" in md and (out / "serve.png").stat().st_size > 0
    assert "| engine time prefilling | engine time joining |" in md
    assert "not measured" in md  # no 16-stream level in this run: its targets are not judged
    # --table-only re-renders from serve.json
    (out / "serve.md").unlink()
    assert main(["bench", "serve", "--table-only", "--out", str(out)]) == 0
    assert (out / "serve.md").read_text() == md


def fake_result(tps16: float, p99: float, lost: int) -> dict:
    """A stored result with made-up numbers (2 repeats, levels 1 and 16)."""
    runs = []
    for repeat in range(2):
        for cfg, scale in (("batched", 1.0), ("one-at-a-time", 0.5), ("guard", 0.8)):
            for level, tps in ((1, 10.0), (16, tps16)):
                runs.append(
                    {
                        "config": cfg,
                        "repeat": repeat,
                        "concurrency": level,
                        "sent": 8,
                        "answered": 8,
                        "errors": 0,
                        "error_kinds": {},
                        "blocked": 1,
                        "wall_s": 2.0,
                        "requests_per_s": 4.0 * scale,
                        "tokens": 100,
                        "tokens_per_s": (tps + repeat) * scale,
                        "ttft_p50_ms": 100.0,
                        "ttft_p99_ms": p99 if level == 16 else 120.0,
                        "latency_p50_ms": 900.0,
                        "latency_p99_ms": 1000.0,
                    }
                )
    soak_res = {
        "config": "batched",
        "concurrency": 32,
        "seconds": 10,
        "interval_s": 1,
        "wall_s": 10.2,
        "sent": 50,
        "answered": 50 - lost,
        "lost": lost,
        "errors": lost,
        "error_kinds": {"ReadTimeout": lost} if lost else {},
        "tokens_per_s": 80.0,
        "ttft_p50_ms": 200.0,
        "ttft_p99_ms": 300.0,
        "rss": [[float(t), 500.0 + t] for t in range(11)],
    }
    machine = {"cpu": "cpu", "cpu_count": 2, "memory_gib": 8, "system": "Linux", "python": "3", "onnxruntime": "1"}
    return {
        "title": "tiny",
        "date": "today",
        "machine": {**machine, "loadavg": [1.0, 1.0, 1.0]},
        "loadavg_end": [2.0, 2.0, 2.0],
        "command": "singlepass bench serve",
        "protocol": {
            "levels": [1, 16],
            "repeats": 2,
            "max_tokens": 32,
            "requests": {"1": 16, "16": 64},
            "duration_s": 60,
            "warmup": 8,
            "threads": 2,
            "fused_policy": "block",
            "prompts": {
                "loaded": 10,
                "used": 9,
                "skipped_too_long": 1,
                "tokens_median": 30,
                "tokens_p90": 50,
                "tokens_max": 60,
            },
        },
        "artifacts": {"source": "given"},
        "configs": [
            {"name": n, "label": n, "artifact": "a", "card": {"limits": {"max_batch": 64}}, "rss_loaded_mib": 400.0}
            for n in ("batched", "one-at-a-time", "guard")
        ],
        "runs": runs,
        "soak": soak_res,
    }


def test_report_judges_the_targets(tmp_path):
    good = fake_result(tps16=40.0, p99=150.0, lost=0)
    t = {x["name"].split(" ")[0]: x for x in rep.targets(good)}
    assert [x["met"] for x in rep.targets(good)] == [True, True, True]
    assert t["aggregate"]["value"].startswith("3.86")  # the median of 40/10 and 41/11, within each repeat
    bad = fake_result(tps16=20.0, p99=300.0, lost=2)
    assert [x["met"] for x in rep.targets(bad)] == [False, False, False]
    md = rep.render(bad)
    assert md.count("| **no** |") == 3 and "was missed" in md and "ReadTimeout" in md
    assert "| batched | 16 |" in md
    # ratios within repeats: batched / one-at-a-time = 2x at every level
    rows = {r[0]: r for r in rep.compare_rows(good)}
    assert rows["1"][1].startswith("2.0") and rows["16"][2].startswith("0.8")
    head, samples = rep.soak_rows(good)
    assert head[0][3:7] == ["50", "50", "0", "0"] and "500 → 510 (max 510)" in head[0][-1]
    assert len(samples) <= 11 and samples[-1] == ["10", "510.0"] and rep.rss_summary(good["soak"])["growth_late"] == 7
    rep.write_report(good, tmp_path)
    assert (tmp_path / "serve.png").stat().st_size > 0 and "![serving](serve.png)" in (
        tmp_path / "serve.md"
    ).read_text()
    no_soak = {**good, "soak": None}
    assert rep.targets(no_soak)[2]["met"] is None and "## Soak" not in rep.render(no_soak)


def test_prepare_reuses_the_latency_artifacts_and_widens_a_narrow_one(tmp_path, monkeypatch):
    """Without --artifact: the latency benchmark's probes and exports (asked for max_batch = the
    highest level); a cached export with fewer rows is exported once more with enough."""
    from types import SimpleNamespace

    import singlepass.benchmarks.guards as guards
    import singlepass.benchmarks.latency_prepare as lp
    import singlepass.export.pipeline as pipeline
    import singlepass.models.backbone as backbone
    import singlepass.runtime.contract as contract
    from singlepass.benchmarks.serve_bench import build_parser, prepare

    made = {"gate": tmp_path / "gate", "base": tmp_path / "base"}
    rows = {made["gate"]: 8, made["base"]: 64}  # the gate artifact was cached by the latency benchmark
    calls = {}
    monkeypatch.setattr(backbone, "load_backbone", lambda *a: SimpleNamespace(fingerprint={"sha256": "s"}))
    probes = {m: {"dir": f"/probes/{m}", "source": "test"} for m in ("pooling", "gate", "mha")}
    monkeypatch.setattr(lp, "ensure_probes", lambda args, bb, runs: probes)
    monkeypatch.setattr(lp, "ensure_artifacts", lambda args, bb, pr: calls.setdefault("batch", args.batch) and made)
    monkeypatch.setattr(lp, "artifact_current", lambda *a: False)
    monkeypatch.setattr(contract, "read_artifact", lambda f: SimpleNamespace(limits=SimpleNamespace(max_batch=rows[f])))

    def export(folder, specs, backbone, force, max_batch, log):
        calls["export"] = (folder, specs, max_batch)
        rows[folder] = max_batch

    monkeypatch.setattr(pipeline, "export_artifact", export)
    monkeypatch.setattr(guards, "ensure_classifier", lambda *a, **k: tmp_path / "guard")
    args = build_parser().parse_args(["--cache-dir", str(tmp_path / "cache")])
    arts = prepare(args, tmp_path)
    wide = tmp_path / "cache" / "bench-artifacts" / "serve-gate"
    assert calls["batch"] == [64] and calls["export"] == (wide, ["/probes/gate:gate"], 64)
    assert arts["fused"] == str(wide) and arts["base"] == str(made["base"]) and arts["guard"] == str(tmp_path / "guard")
