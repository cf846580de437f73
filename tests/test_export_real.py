"""The real default model: export SmolLM2-135M with a (quickly) trained probe, validate it and
run the TensorRT pre-flight. The export itself is the session fixture ``real_artifact``
(conftest.py, ~3-4 min on 2 CPU cores), shared with the runtime's real-model test."""

import json

import pytest

from singlepass.cli import main

pytestmark = pytest.mark.real


def test_export_validate_and_preflight_smollm2(real_artifact):
    assert real_artifact.train_acc >= 0.9
    out, summary = real_artifact.path, real_artifact.summary
    m = json.loads((out / "manifest.json").read_text())
    assert m["backbone"]["num_layers"] == 30 and m["backbone"]["num_hidden_states"] == 31
    assert m["graph"]["kv_cache"] and len(m["graph"]["past_names"]) == 60
    v = m["validation"]
    assert v["passed"] and v["max_abs_diff"]["sentiment/probs"] <= 1e-4 and v["max_abs_diff"]["logits"] <= 1e-3
    assert 450e6 < summary["bytes"] < 650e6  # fp32 weights, tied embedding stored once
    print(f"\nSmolLM2 export: {real_artifact.seconds:.0f} s, {summary['bytes'] / 2**20:.0f} MiB, {summary}")
    assert main(["validate", str(out)]) == 0
    assert (
        main(["build-engine", str(out), "--check-only", "--precision", "fp16", "--max-batch", "4", "--max-seq", "1024"])
        == 0
    )
    r = json.loads((out / "tensorrt_preflight.json").read_text())
    fr = r["fp16_range"]
    assert 1e4 < max(fr["hidden_states_max"]) < 65504  # SmolLM2's massive activations (~2.5e4) fit fp16
    assert r["ok"]


def test_int4_export_of_smollm2(real_int4_artifact, real_artifact):
    """The default export: 4-bit layers (the GGUF's Q4_1 grid, GPTQ-rounded), 8-bit lm_head (Q8_0 carried over),
    validated against the reference holding the same weights; it generates what the fp32 artifact
    generates, with the same labels; TensorRT refuses it with the way out."""
    from singlepass.runtime.api import load

    out, summary = real_int4_artifact.path, real_int4_artifact.summary
    m = json.loads((out / "manifest.json").read_text())
    w, v = m["graph"]["weights"], m["validation"]
    assert summary["weights"] == "int4" and w["matmuls"] == 211  # 30 layers x 7 projections + the lm_head
    assert w["params"]["lm_head.weight"] == 8 and w["bytes_after"] < w["bytes_before"] / 5
    assert w["rounding"] == "gptq" and w["calibration"]["rows"] == 256  # the default: calibrated 4-bit codes
    assert m["graph"]["kv_update"] == "inplace"  # and the in-place KV cache (GroupQueryAttention)
    assert m["graph"]["fused_kernels"] == {"skip_rmsnorm": 60, "packed_qkv_rotary": 30}  # export/ortfuse.py
    assert v["passed"] and v["precision"] == "int4" and v["token_agreement"] >= 0.9
    assert 150e6 < summary["bytes"] < 300e6  # int4 layers + the fp32 embedding table of the Gather
    print(f"\nSmolLM2 int4 export: {real_int4_artifact.seconds:.0f} s, {summary['bytes'] / 2**20:.0f} MiB, {summary}")
    prompts = ["What is the capital of France?", "I loved this film, it was wonderful.", "A dull, boring mess."]
    q, f = load(out).generate(prompts, 12), load(real_artifact.path).generate(prompts, 12)
    assert "Paris" in q[0].text
    for a, b in zip(q, f):
        assert a.labels["sentiment"].label == b.labels["sentiment"].label
        assert abs(a.labels["sentiment"].score - b.labels["sentiment"].score) < 0.2  # a 16-sentence probe
    assert main(["build-engine", str(out), "--check-only"]) == 2
