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
