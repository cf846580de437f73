"""onnxruntime-genai runs our artifact (genai_config.json written by export) and builds its own peer.

The tiny model's artifact, with a gate probe fused as ``safety``, is driven by ``og.Generator``:
its greedy tokens must equal singlepass's own, and its logits and probe probabilities after every
pass must equal our runtime's passes over the same tokens. Both prefill forms are covered (the
default last-position logits, declared [batch, 1, vocab], and ``--all-logits``).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from export_helpers import make_probe

og = pytest.importorskip("onnxruntime_genai")

PROMPTS = ["What is the capital of France?", "I hate this", "fox"]
NEW_TOKENS = 6


@pytest.fixture(scope="module", params=[False, True], ids=["last-logits", "all-logits"])
def genai_art(request, tmp_path_factory, tiny_model_dir, tiny_backbone, cache_dir):
    from singlepass.export.pipeline import export_artifact

    root = tmp_path_factory.mktemp("genai")
    probe = make_probe(root / "safety", tiny_backbone, "gate")
    out = root / "art"
    export_artifact(
        out,
        [f"{probe}:safety"],
        model_spec=str(tiny_model_dir),
        cache_dir=str(cache_dir),
        backbone=tiny_backbone,
        all_logits=request.param,
        log=lambda *a: None,
    )
    return out


def test_genai_config_matches_the_manifest(genai_art):
    m = json.loads((genai_art / "manifest.json").read_text())
    cfg = json.loads((genai_art / "genai_config.json").read_text())
    assert m["genai"]["config"] == "genai_config.json"
    d, b = cfg["model"]["decoder"], m["backbone"]
    assert (d["num_hidden_layers"], d["num_key_value_heads"], d["head_size"], d["hidden_size"]) == (
        b["num_layers"],
        b["num_kv_heads"],
        b["head_dim"],
        b["hidden_size"],
    )
    L = b["num_layers"]
    ins, outs = d["inputs"], d["outputs"]
    past = [ins[f"past_{k}_names"] % i for i in range(L) for k in ("key", "value")]
    present = [outs[f"present_{k}_names"] % i for i in range(L) for k in ("key", "value")]
    assert past == m["graph"]["past_names"] and present == m["graph"]["present_names"]
    assert cfg["search"]["past_present_share_buffer"] is False
    assert cfg["model"]["eos_token_id"] == m["tokenizer"]["eos_token_ids"]
    assert cfg["search"]["max_length"] == m["limits"]["max_total_length"]


def _og_passes(model, ids: list[int], new_tokens: int):
    """og greedy generation -> (tokens, [(logits [V], safety probs [2]) of every pass that ran])."""
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(ids) + new_tokens)
    gen = og.Generator(model, params)
    gen.append_tokens([ids])  # the prefill pass
    passes = [(gen.get_output("logits")[0, -1].copy(), gen.get_output("safety/probs")[0].copy())]
    tokens = []
    while not gen.is_done():
        gen.generate_next_token()  # from the 2nd call on, it first runs the pass of the previous token
        if tokens:
            passes.append((gen.get_output("logits")[0, -1].copy(), gen.get_output("safety/probs")[0].copy()))
        tokens.append(int(gen.get_next_tokens()[0]))
    return tokens, passes


def _our_passes(rt, ids: list[int], tokens: list[int]):
    """Our runtime's passes over the prompt and then ``tokens[:-1]`` -> [(logits [V], safety probs)]."""
    from singlepass.runtime.passes import decode_one_token, last_logits, prefill

    m = rt.manifest
    probs = ("safety/probs",)  # the graph output genai reads (our labels read the logits)
    out, state = prefill(rt.backend, m, [ids], extra=probs)
    passes = [(last_logits(m, out)[0], out["safety/probs"][0])]
    for t in tokens[:-1]:
        out, state = decode_one_token(rt.backend, m, state, np.array([t], np.int64), extra=probs)
        passes.append((last_logits(m, out)[0], out["safety/probs"][0]))
    return passes


@pytest.mark.parametrize("prompt", PROMPTS)
def test_og_generates_what_singlepass_generates(genai_art, prompt):
    import singlepass.runtime as spr

    rt = spr.load(genai_art)
    ids, _ = rt.encode(prompt)
    ours = rt.generate(prompt, NEW_TOKENS)
    model = og.Model(str(genai_art))
    tokens, og_passes = _og_passes(model, ids, NEW_TOKENS)
    assert tokens == ours.token_ids and len(tokens) >= 1
    # the prefill pass: the probe's probabilities are the prompt's label
    np.testing.assert_allclose(og_passes[0][1], ours.labels["safety"].probs, atol=1e-4, rtol=0)
    mine = _our_passes(rt, ids, tokens)
    assert len(og_passes) == len(mine) == len(tokens)
    for k, ((lg, pr), (lg2, pr2)) in enumerate(zip(og_passes, mine)):
        np.testing.assert_allclose(lg, lg2, atol=1e-4, rtol=0, err_msg=f"logits of pass {k}")
        np.testing.assert_allclose(pr, pr2, atol=1e-4, rtol=0, err_msg=f"safety/probs of pass {k}")


def test_og_tokenizer_reads_the_artifact(genai_art):
    from tokenizers import Tokenizer

    text = "What is the capital of France? <|im_end|>"
    want = Tokenizer.from_file(str(genai_art / "tokenizer.json")).encode(text).ids
    assert list(og.Tokenizer(og.Model(str(genai_art))).encode(text)) == want


def test_no_config_where_og_would_misread_the_graph():
    from singlepass.export.genai import genai_config, layer_pattern

    assert layer_pattern(["past_key_values.0.key", "past_key_values.1.key"]) == "past_key_values.%d.key"
    assert layer_pattern(["layer0_past_k", "layer1_past_k"]) == "layer%d_past_k"
    assert layer_pattern(["past_a", "past_b"]) is None  # no layer number
    assert layer_pattern(["past.0.k", "past.2.k"]) is None
    m = {
        "graph": {
            "file": "model.onnx",
            "kv_cache": True,
            "past_names": ["past_key_values.0.key", "past_key_values.0.value"],
            "present_names": ["present.0.key", "present.0.value"],
            "input_ids": "input_ids",
            "attention_mask": "attention_mask",
            "position_ids": "position_ids",
            "logits": "logits",
            "logits_last_position_only": True,
            "outputs": [{"name": "logits", "dtype": "float32", "dims": ["batch", "sequence", 300]}],
        },
        "backbone": {"num_layers": 1, "num_kv_heads": 2, "head_dim": 16, "hidden_size": 64},
        "tokenizer": {"eos_token_ids": [2], "pad_token_id": 2, "bos_token_id": 1},
        "limits": {"max_total_length": 128},
    }
    reason = genai_config(m)
    assert isinstance(reason, str) and "--all-logits" in reason  # sliced logits not declared [batch, 1, vocab]
    m["graph"]["kv_cache"] = False
    assert "KV cache" in genai_config(m)


def test_genai_int4_peer_builds_and_generates(tmp_path, tiny_backbone, cache_dir):
    from singlepass.benchmarks.peer_genai import STAMP, build_genai_int4
    from singlepass.benchmarks.peer_runners import make_runner

    out = build_genai_int4(tiny_backbone, tmp_path / "int4", cache_dir=str(cache_dir))
    cfg = json.loads((out / "genai_config.json").read_text())
    assert cfg["model"]["decoder"]["num_hidden_layers"] == tiny_backbone.num_layers
    stamp = (out / STAMP).stat().st_mtime_ns
    assert build_genai_int4(tiny_backbone, out, cache_dir=str(cache_dir)) == out  # built once
    assert (out / STAMP).stat().st_mtime_ns == stamp
    runner = make_runner({"kind": "onnxruntime-genai", "path": str(out)}, 1)  # as bench peers runs it
    vocab = tiny_backbone.model.config.vocab_size
    for p in PROMPTS[:2]:
        tokens = [runner.prefill(tiny_backbone.tokenizer(p)["input_ids"])]
        for _ in range(3):  # end-of-sequence never stops it: every engine does the same work
            tokens.append(runner.decode(tokens[-1]))
        assert len(tokens) == 4 and all(0 <= t < vocab for t in tokens)
