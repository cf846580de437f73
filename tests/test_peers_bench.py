"""``singlepass bench peers``: the measuring worker on real (tiny) artifacts, and the ratios and
target marks of its report from a known result. The peers themselves (llama.cpp,
onnxruntime-genai's builder output) are measured by the benchmark, not here."""

from __future__ import annotations

import json

import pytest

from singlepass.benchmarks import peers


@pytest.fixture(scope="module")
def tiny_arts(tmp_path_factory, tiny_backbone):
    from export_helpers import make_probe

    from singlepass.export.pipeline import export_artifact

    root = tmp_path_factory.mktemp("peers")
    probe = make_probe(root / "p", tiny_backbone, "gate")
    base = export_artifact(root / "base", [], backbone=tiny_backbone, log=lambda m: None)["artifact"]
    gate = export_artifact(root / "gate", [f"{probe}:gate"], backbone=tiny_backbone, log=lambda m: None)["artifact"]
    return {"base": base, "gate": gate}


def test_timing_and_memory_workers_run_every_engine_on_every_prompt(tiny_arts):
    engines = {n: {"kind": "singlepass", "path": p} for n, p in tiny_arts.items()}
    prompts = [[1, 5, 7, 9], [3, 4], [8, 8, 8, 8, 8, 8]]
    spec = {
        "mode": "timing",
        "threads": 1,
        "engines": engines,
        "prefill": prompts[:2],
        "decode": prompts[2:],
        "new_tokens": 3,
        "repeats": 2,
    }
    raw = peers.worker(spec)
    assert set(raw) == {"base", "gate"}
    for r in raw.values():
        assert [len(rep) for rep in r["prefill"]] == [2, 2] and [len(rep) for rep in r["decode"]] == [1, 1]
        assert all(t > 0 for rep in r["prefill"] for t in rep)
    s = peers.summarise(raw, prompts[:2], 3)
    assert s["base"]["prefill_tok_s"] > 0 and s["gate"]["decode_tok_s"] > 0
    mem = peers.worker({"mode": "memory", "threads": 1, "engine": engines["gate"], "prompts": prompts, "new_tokens": 2})
    assert mem["peak_rss_mib"] >= mem["loaded_rss_mib"] > 0
    assert mem["end_rss_mib"]["anon"] > 0 and mem["end_rss_mib"]["file"] > 0


def test_unknown_engine_is_a_clear_error(tiny_arts):
    from singlepass.benchmarks.peer_runners import make_runner
    from singlepass.errors import SinglepassError

    with pytest.raises(SinglepassError, match="unknown engine 'vllm'"):
        make_runner({"kind": "vllm", "path": tiny_arts["base"]}, 1)


def _engine(prefill_s: list[float], decode_s: list[float]) -> dict:
    return {
        "prefill_tok_s": 100 / prefill_s[0],
        "decode_tok_s": 10 / decode_s[0],
        "ttft_ms": 1.0,
        "prefill_s_per_repeat": prefill_s,
        "decode_s_per_repeat": decode_s,
    }


def test_ratios_pair_repeats_and_mark_targets(tmp_path):
    """Ratios are medians of same-repeat ratios; a missed target says so."""
    speed = {
        "singlepass fp32": _engine([1.0, 1.0, 1.0], [4.0, 4.0, 4.0]),
        "singlepass int4": _engine([0.5, 0.6, 0.5], [1.0, 1.2, 1.0]),
        "singlepass int4 + pooling": _engine([0.5, 0.6, 0.5], [1.0, 1.2, 1.0]),
        "singlepass int4 + gate": _engine([0.51, 0.612, 0.51], [1.0, 1.2, 1.0]),
        "singlepass int4 + mha": _engine([0.55, 0.66, 0.55], [1.1, 1.32, 1.1]),
        "llama.cpp": _engine([1.5, 1.8, 1.5], [1.5, 1.8, 1.5]),  # decode: int4 + gate is 1.5x faster
        "onnxruntime-genai int4": _engine([0.4, 0.48, 0.4], [0.5, 0.6, 0.5]),
    }
    mem = {n: {"peak_rss_mib": 100.0} for n in speed}
    mem["singlepass int4 + mha"] = {"peak_rss_mib": 110.0}
    res = {"speed": {"2": speed}, "memory": mem}
    d = peers.derived(res)
    assert d["decode_vs_llama_cpp"]["singlepass int4 + gate"] == pytest.approx(1.5)
    assert d["prefill_vs_llama_cpp"]["singlepass int4 + gate"] == pytest.approx(1.5 / 0.51)
    assert d["overhead_prefill"]["gate"] == pytest.approx(0.02)
    assert d["overhead_prefill"]["pooling"] == pytest.approx(0.0)
    assert d["overhead_decode"]["mha"] == pytest.approx(0.1)
    assert d["memory_over_base"]["mha"] == pytest.approx(0.1)
    assert d["decode_vs_genai"] == pytest.approx(0.5)
    res.update(
        command="singlepass bench peers",
        machine={"cpu": "test", "cpu_count": 2, "loadavg": [0, 0, 0]},
        versions={"onnxruntime": "x", "onnxruntime_genai": "y", "llama_cpp": "z", "llama_cpp_cpu": "AVX2 FMA"},
        n_prefill=24,
        prefill_tokens=2400,
        n_decode=8,
        new_tokens=64,
        repeats=3,
        seconds=1.0,
    )
    peers.write_report(res, tmp_path)
    md = (tmp_path / "peers.md").read_text()
    assert "| decode tok/s, singlepass int4 + gate / llama.cpp | 1.50x | >= 1.2x | met |" in md
    assert "| gate probe: prefill time over the int4 base (batch 1) | +2.0% | <= 1% | **missed** |" in md
    assert "| mha probe: peak RSS over the int4 base | +10.0% | <= 5% | **missed** |" in md
    assert "llama-cpp-python z (CPU kernels: AVX2 FMA)" in md
    assert (tmp_path / "peers.png").stat().st_size > 0
    json.dumps(res)  # the stored result is plain JSON
    # measured in one session too (benchmarks/switch.py): the prefill targets are judged on that
    res["switched"] = {
        m: {
            "batch 1": {
                "off_ms": 70.0,
                "on_ms": 70.0 * (1 + pct / 100),
                "overhead_ms": 0.7 * pct,
                "overhead_pct": pct,
                "overhead_pct_iqr": [pct - 1, pct + 1],
                "null_pct": 0.1,
                "pairs": 240,
                "prompts": 24,
                "context_tokens": 64.5,
            }
        }
        for m, pct in (("pooling", 0.4), ("gate", 0.8), ("mha", 3.5))
    }
    peers.write_report(res, tmp_path)
    md = (tmp_path / "peers.md").read_text()
    assert "| gate probe: prefill time, probe on over off in one session (batch 1) | +0.80% | <= 1% | met |" in md
    assert "| mha probe: prefill time, probe on over off in one session (batch 1) | +3.50% | <= 3% | **missed** |" in md
    assert "| gate probe: prefill time over the int4 base, two sessions (batch 1) | +2.0% | | |" in md
    assert "## Prefill cost in one session" in md and "| gate | 70.00 | 70.56 | +0.560 | +0.80% |" in md


def test_llama_cpp_cpu_names_the_kernels_llama_cpp_was_built_with():
    """llama-cpp-python 0.3.36's system info on an AVX-512 build: the flags set to 1, in order."""
    info = (
        "CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | AVX512 = 1 | "
        "AVX512_VBMI = 1 | AVX512_VNNI = 1 | AVX512_BF16 = 1 | AMX_INT8 = 0 | LLAMAFILE = 1 | OPENMP = 1 | "
        "REPACK = 1 | "
    )
    assert peers.llama_cpp_cpu(info) == (
        "SSE3 SSSE3 AVX AVX2 F16C FMA BMI2 AVX512 AVX512_VBMI AVX512_VNNI AVX512_BF16 LLAMAFILE OPENMP REPACK"
    )


def test_prefill_memory_reports_each_artifact_from_a_fresh_process(tiny_arts, capsys):
    from singlepass.benchmarks import prefill_memory

    arts = [tiny_arts["base"], tiny_arts["gate"]]
    assert prefill_memory.main([*arts, "--batch", "1", "2", "--tokens", "24", "--steps", "2", "--threads", "1"]) == 0
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| /")]
    assert [(r.split(" | ")[0][2:], int(r.split(" | ")[1])) for r in rows] == [(a, b) for b in (1, 2) for a in arts]
    for r in rows:
        loaded, peak = (float(x) for x in r.strip(" |").split(" | ")[3:5])
        assert 50 < loaded <= peak < 4000


def test_prefill_pairs_times_every_artifact_on_every_prompt_against_the_base(tiny_arts, capsys, monkeypatch):
    from singlepass.benchmarks import prefill_pairs
    from singlepass.runtime import passes

    calls = []
    real = passes.prefill
    monkeypatch.setattr(passes, "prefill", lambda b, m, seqs, **kw: calls.append(m.folder) or real(b, m, seqs, **kw))
    arts = [tiny_arts["base"], tiny_arts["gate"]]
    assert prefill_pairs.main([*arts, "--rounds", "2", "--prompts", "3", "--threads", "1"]) == 0
    rows = [r.strip(" |").split(" | ") for r in capsys.readouterr().out.splitlines() if r.startswith("| /")]
    assert [r[0] for r in rows] == [str(a) for a in arts] and rows[0][2] == "+0.00%"
    assert all(float(r[1]) > 0 for r in rows)
    assert len(calls) == 2 * (3 + 2 * 3)  # per artifact: a warm-up prefill per prompt (at most 4), 3 prompts x 2 rounds
    with pytest.raises(SystemExit):
        prefill_pairs.main([arts[0]])  # no artifact to compare


def test_roofline_counts_the_linear_layers_and_bounds_the_serving_runs(tiny_arts, tiny_backbone, tmp_path):
    """The linear-layer work per token against the model's shapes (an oracle independent of the
    graph), the kernel and pass measurements present, and each batched serving run's ceiling from
    its counters (the guard's runs are not the fused engine's)."""
    from singlepass.benchmarks import roofline

    cfg = tiny_backbone.model.config
    h, i, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    kv = cfg.num_key_value_heads * getattr(cfg, "head_dim", h // cfg.num_attention_heads)
    want = 2 * layers * (h * h + 2 * h * kv + h * h + 3 * h * i) / 1e9  # q, k, v, o; gate, up, down

    def run(streams, sent, tokens, prefill, decode, config="batched"):
        engine = {"tokens:prefill": prefill, "tokens:decode": decode}
        return {"config": config, "concurrency": streams, "repeat": 0, "sent": sent, "tokens": tokens}, engine

    runs = []
    for r, e in (run(1, 4, 40, 120, 36), run(16, 8, 208, 300, 200), run(16, 8, 208, 300, 200, "guard")):
        runs.append({**r, "tokens_per_s": 10.0, "engine": e})
    (tmp_path / "serve.json").write_text(json.dumps({"date": "2026-01-01", "runs": runs}))
    args = ["--threads", "1", "--repeats", "2", "--prefill", "1", "8", "--decode", "2", "8"]
    assert (
        roofline.main([tiny_arts["gate"], *args, "--serve-json", str(tmp_path / "serve.json"), "--out", str(tmp_path)])
        == 0
    )
    r = json.loads((tmp_path / "roofline.json").read_text())
    f_layers, f_head = r["gop_per_token"]["layers"], r["gop_per_token"]["lm_head"]
    assert f_layers == pytest.approx(want) and f_head == pytest.approx(2 * h * cfg.vocab_size / 1e9)
    peak = max(r["kernel_gop_per_s"].values())
    assert peak > 0 and sorted(map(int, r["kernel_gop_per_s"])) == list(roofline.ROWS)
    for p in r["passes"].values():
        assert p["pass_ms"] > 0 and 0 < p["matmulnbits_share"] <= 1 and "MatMulNBits" in p["ops_ms"]
    assert [x["streams"] for x in r["serving"]] == [1, 16]
    work = 300 * f_layers + 8 * f_head + 200 * (f_layers + f_head)
    assert r["serving"][1]["ceiling_tokens_per_s"] == pytest.approx(208 / (work / peak))
    assert "| 16 | 37.5 | 26.0 |" in (tmp_path / "roofline.md").read_text()


def test_roofline_refuses_an_artifact_without_matmulnbits(tmp_path):
    from onnx import TensorProto, helper

    from singlepass.benchmarks import roofline
    from singlepass.errors import SinglepassError

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    g = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [x],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    with pytest.raises(SinglepassError, match="--weights int4 or int8"):
        roofline.linear_nodes(helper.make_model(g), 32)


def _fs_type(path) -> str:
    """The type of the filesystem holding ``path`` (the longest matching mount point in /proc/mounts)."""
    import os

    best, kind = "", ""
    for line in open("/proc/mounts"):
        _, mount, fs = line.split()[:3]
        if os.path.realpath(path).startswith(mount.rstrip("/") + "/") and len(mount) > len(best):
            best, kind = mount, fs
    return kind


def _cached_pages(path) -> int:
    """Pages of ``path`` in the page cache (mincore on a private mapping of it)."""
    import ctypes
    import mmap
    import os

    size = os.path.getsize(path)
    pages = -(-size // mmap.PAGESIZE)
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)
    try:
        buf = ctypes.c_char.from_buffer(mm)
        vec = (ctypes.c_ubyte * pages)()
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        assert libc.mincore(ctypes.addressof(buf), size, vec) == 0, os.strerror(ctypes.get_errno())
        del buf
        return sum(v & 1 for v in vec)
    finally:
        mm.close()


def test_memory_workers_start_cold_with_the_files_evicted_from_the_page_cache(tmp_path):
    """``evict_page_cache`` (every memory worker calls it first) drops a folder's files from the page
    cache, written or read a moment ago, so no measurement depends on what an earlier one left there."""
    from singlepass.benchmarks.latency_worker import evict_page_cache

    if _fs_type(tmp_path) == "tmpfs":  # tmpfs pages are the files themselves: nothing to evict to
        pytest.skip("the test folder is on tmpfs")
    art = tmp_path / "art"
    (art / "sub").mkdir(parents=True)
    a, b = art / "model.onnx.data", art / "sub" / "x.bin"
    a.write_bytes(b"\1" * (4 << 20))
    b.write_bytes(b"\2" * (1 << 20))
    a.read_bytes(), b.read_bytes()
    assert _cached_pages(a) > 0 and _cached_pages(b) > 0
    assert evict_page_cache([art]) == 2
    assert _cached_pages(a) == 0 and _cached_pages(b) == 0
    b.read_bytes()
    assert evict_page_cache([b]) == 1 and _cached_pages(b) == 0
