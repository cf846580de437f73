"""The runtime on the exported SmolLM2-135M artifact (the session fixture ``real_artifact``):
the same token ids as models/prompts.py, the same greedy text as transformers' ``generate`` for
20 tokens, and the same labels as the PyTorch probe."""

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.real

PROMPTS = [
    "What is the capital of France?",
    "I loved this film, it was wonderful.",
    "A dull and lifeless performance, I was bored the whole time.",
]


def test_smollm2_runtime_matches_transformers_and_the_probe(real_artifact, real_backbone):
    from singlepass.models.extract import extract
    from singlepass.models.probe_io import load_probe
    from singlepass.models.probes import probabilities
    from singlepass.models.prompts import encode_one
    from singlepass.runtime.api import load

    tok, model = real_backbone.tokenizer, real_backbone.model
    rt = load(real_artifact.path, backend="cpu")
    long_text = "Tell me everything about the history of the sea and its ships. " * 80
    for text in PROMPTS + ["héllo wörld ✓ 日本語 🙂", long_text]:
        assert rt.encode(text, truncate=True)[0] == encode_one(tok, text, "chat", 512, True)[0]

    results = rt.generate(PROMPTS, 20)  # one left-padded batch
    probe, cfg = load_probe(real_artifact.probe, real_backbone.fingerprint)
    states, mask, _ = extract(real_backbone, PROMPTS)
    with torch.no_grad():
        ref_probs = probabilities(probe(states.float(), mask)).numpy()
    for k, (text, r) in enumerate(zip(PROMPTS, results)):
        ids, _ = encode_one(tok, text)
        ref = model.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False)[0, len(ids) :].tolist()
        assert r.token_ids == ref, (text, r.text, tok.decode(ref))
        assert r.text == tok.decode(ref, skip_special_tokens=True)
        lb = r.labels["sentiment"]
        assert lb.score == pytest.approx(float(ref_probs[k, 1]), abs=1e-4)
        assert lb.label == cfg["label_names"][int(ref_probs[k, 1] >= cfg["threshold"])]
        np.testing.assert_allclose(lb.probs, ref_probs[k], atol=1e-4)
    assert "Paris" in results[0].text
    print(
        f"\nSmolLM2 runtime: {[r.text for r in results]}, prefill {results[0].prefill_seconds:.2f} s, "
        f"batch of 3 x 20 tokens {max(r.seconds for r in results):.2f} s"
    )
