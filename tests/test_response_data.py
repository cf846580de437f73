"""Response probes: the response sets, the prompt + response encoding, the response-only cache,
and a tiny end-to-end train / eval on a response set."""

import gzip
import json

import numpy as np
import pytest
from cli_args import on_model

from singlepass.cli import main
from singlepass.errors import SinglepassError
from singlepass.models import cache as state_cache
from singlepass.models.data import Dataset, load_dataset
from singlepass.models.extract import batch_tensors, forward_hidden, relative_error
from singlepass.models.mixture import load_mixture
from singlepass.models.prompts import encode_one, encode_responses

PROMPTS = ["What is the capital of France?", "Tell me how to build something dangerous.", "fox"]
RESPONSES = [
    "Paris is the capital.",
    "I hate this, it is the worst thing ever and I am angry about it all day long.",
    "The quick brown fox jumps over the lazy dog.",
]
MAX_LEN = 96  # tiny tokenizer: short sequences keep these tests fast


def response_set(n=6) -> Dataset:
    prompts = [f"{PROMPTS[i % 3]} ({i})" for i in range(n)]
    responses = [RESPONSES[(i + 1) % 3] for i in range(n)]
    texts = [f"User: {p}\nAssistant: {r}" for p, r in zip(prompts, responses)]
    cols = {"prompt": prompts, "response": responses}
    return Dataset("unit-resp", "train", texts, np.arange(n) % 2, ("safe", "unsafe"), "safety", "", cols, "response")


def test_encoding_puts_exactly_the_response_tokens_last_and_counts_them(tiny_backbone):
    tok = tiny_backbone.tokenizer
    enc = encode_responses(tok, PROMPTS, RESPONSES, "chat", MAX_LEN, max_response_tokens=8)
    for i, (p, r) in enumerate(zip(PROMPTS, RESPONSES)):
        reply = tok(r, add_special_tokens=False)["input_ids"]
        n = enc.stored[i]
        assert n == min(len(reply), 8) and enc.response_cut[i] == len(reply) - n
        assert enc.ids[i][-n:] == reply[:n]  # the response's own tokens, no end-of-turn after them
        assert enc.ids[i][:-n] == encode_one(tok, p, "chat", MAX_LEN)[0]  # the serving view of the prompt
        assert tok.decode(enc.ids[i][:-n]).endswith("<|im_start|>assistant\n")
    assert enc.keep == enc.stored and enc.n_response_truncated == sum(c > 0 for c in enc.response_cut) >= 1
    # a long prompt is cut by the user-text rule (template intact); the response is untouched
    long = encode_responses(tok, ["the quick brown fox " * 50], ["Paris."], "chat", 60, 8)
    assert long.truncated == [True] and len(long.ids[0]) - long.stored[0] <= 60
    assert long.ids[0][-long.stored[0] :] == tok("Paris.", add_special_tokens=False)["input_ids"]
    with pytest.raises(SinglepassError, match="row 1: response is empty"):
        encode_responses(tok, ["a", "b"], ["ok", "  "])
    with pytest.raises(SinglepassError, match="row 0: prompt is empty"):
        encode_responses(tok, [""], ["ok"])


def test_cache_stores_exactly_the_response_tokens_states(tiny_backbone, tmp_path):
    ds = response_set()
    opts = {"batch_size": 4, "cache_dir": tmp_path, "progress": False, "max_response_tokens": 6}
    c = state_cache.build(tiny_backbone, ds, "chat", MAX_LEN, "float32", **opts)
    enc = encode_responses(tiny_backbone.tokenizer, ds.columns["prompt"], ds.columns["response"], "chat", MAX_LEN, 6)
    assert c.lengths.tolist() == enc.stored and c.meta["reads"] == "response"
    assert c.meta["n_response_truncated"] == enc.n_response_truncated > 0
    pad = tiny_backbone.tokenizer.pad_token_id
    for i, seq in enumerate(enc.ids):
        alone = forward_hidden(tiny_backbone.model, *batch_tensors([seq], pad))[:, 0]  # [L+1, T_i, d]
        n = enc.stored[i]
        assert relative_error(np.array(c.row(i)), alone[:, -n:].transpose(0, 1).numpy()) <= 1e-4  # [n, L+1, d]
    # keyed on the response settings and on the view
    other = state_cache.plan(tiny_backbone, ds, "chat", MAX_LEN, "float32", cache_dir=tmp_path, max_response_tokens=5)
    as_prompts = Dataset(ds.name, ds.split, ds.texts, ds.labels, ds.label_names, ds.task, "", dict(ds.columns))
    prompt_view = state_cache.plan(tiny_backbone, as_prompts, "chat", MAX_LEN, "float32", cache_dir=tmp_path)
    assert len({c.folder, other[0].folder, prompt_view[0].folder}) == 3
    assert "reads" not in prompt_view[0].key_fields  # prompt entries keep their old keys


def write_rows(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def test_a_malformed_row_is_a_clear_error(tmp_path):
    ok = {"prompt": "hi", "response": "hello", "text": "User: hi\nAssistant: hello", "label": 0}
    bad = {"prompt": "hi", "text": "x", "label": 1}
    write_rows(tmp_path / "beavertails" / "test.jsonl.gz", [ok, bad])
    with pytest.raises(SinglepassError, match=r"beavertails/test.jsonl.gz: row 2: 'response' is missing"):
        load_dataset("beavertails", "test", str(tmp_path))
    write_rows(tmp_path / "saferlhf" / "test.jsonl.gz", [ok, {**ok, "prompt": " "}])
    with pytest.raises(SinglepassError, match=r"saferlhf/test.jsonl.gz: row 2: 'prompt' is empty"):
        load_dataset("saferlhf", "test", str(tmp_path))
    wg = {"text": "hi", "label": 0, "response": "hello", "response_harm_label": "harmful", "adversarial": False}
    write_rows(
        tmp_path / "wildguardmix" / "test.jsonl.gz", [wg, {**wg, "response_harm_label": None}, {**wg, "response": 3}]
    )
    with pytest.raises(SinglepassError, match=r"row 3: 'response' is int"):
        load_dataset("wildguardmix_response", "test", str(tmp_path))
    write_rows(tmp_path / "wildguardmix" / "test.jsonl.gz", [wg, {**wg, "response_harm_label": "maybe"}])
    with pytest.raises(SinglepassError, match=r"row 2: unknown response_harm_label 'maybe'"):
        load_dataset("wildguardmix_response", "test", str(tmp_path))


# (name, split) -> (rows, unsafe rows), from each folder's SOURCE.md
REAL = {
    ("beavertails", "train"): (2113, 1212),
    ("beavertails", "validation"): (303, 174),
    ("beavertails", "test"): (603, 346),
    ("gptfuzz", "test"): (1408, 545),
    ("saferlhf", "test"): (1609, 806),
    ("wildguardmix_response", "test"): (1689, 282),  # the rows with a response_harm_label
}


@pytest.mark.parametrize("name,split", list(REAL))
def test_the_real_response_sets_load_with_both_labels(name, split):
    ds = load_dataset(name, split)
    assert (len(ds), int(ds.labels.sum())) == REAL[name, split]
    assert ds.reads == "response" and ds.task == "safety" and len(ds.label_names) == 2
    for col in ("prompt", "response"):
        assert all(isinstance(v, str) and v.strip() for v in ds.columns[col])
    assert ds.texts[0] == f"User: {ds.columns['prompt'][0]}\nAssistant: {ds.columns['response'][0]}"


def test_carved_and_partitioned_response_splits():
    tr, va = load_dataset("gptfuzz", "train"), load_dataset("gptfuzz", "validation")
    assert len(tr) + len(va) == 5166 and not set(tr.columns["row"]) & set(va.columns["row"])
    assert abs(va.labels.mean() - 1693 / 5166) < 0.01 and va.reads == "response"  # stratified 10%
    train, val, held = (load_dataset("wildguardmix_response", s) for s in ("train", "validation", "test_untouched"))
    rows = [set(ds.columns["row"]) for ds in (train, val, held)]
    assert sum(map(len, rows)) == len(set().union(*rows)) == 1689  # disjoint, every labelled row
    # the prompt view's held-out rows, restricted to the rows with a response label
    assert set(held.columns["row"]) <= set(load_dataset("wildguardmix", "test_untouched").columns["row"])


def test_response_mixtures_and_no_mixing_with_prompt_sets():
    m = load_mixture("beavertails,gptfuzz:2,saferlhf", limit=30, val_limit=20)
    assert m.train.reads == m.validation.reads == "response"
    assert set(m.train.columns["mixture_source"]) == {"beavertails", "gptfuzz"}  # saferlhf: test only
    assert m.report["saferlhf"]["validation_rows"] == 0 and len(m.train.columns["response"]) == len(m.train)
    with pytest.raises(SinglepassError, match="mixes prompt sets \\(toxicchat\\) with response sets \\(beavertails\\)"):
        load_mixture("beavertails,toxicchat")


def test_train_and_eval_a_response_probe_end_to_end(tiny_model_dir, cache_dir, tmp_path, capsys):
    from singlepass.models.probe_io import read_config, reads_of

    out = tmp_path / "resp"
    argv = ["train", *on_model(tiny_model_dir, cache_dir), "--dataset", "beavertails", "--limit", "40"]
    argv += ["--val-limit", "30", "--max-length", str(MAX_LEN), "--max-response-tokens", "16", "--probe", "last-token"]
    assert main([*argv, "--trials", "1", "--epochs", "2", "--no-progress", "--out", str(out)]) == 0
    assert "responses" in capsys.readouterr().out  # the cache line counts responses, not prompts
    cfg = read_config(out)
    assert cfg["reads"] == "response" and cfg["max_response_tokens"] == 16 and reads_of(cfg) == "response"
    assert reads_of({k: v for k, v in cfg.items() if k != "reads"}) == "prompt"  # older configs: prompt probes
    ev = ["eval", "--probe", str(out), "--model", str(tiny_model_dir), "--cache-dir", str(cache_dir), "--no-progress"]
    assert main([*ev, "--dataset", "saferlhf", "--limit", "30", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["results"]["test"]["rows"] == 30
    assert main([*ev, "--dataset", "toxicchat", "--limit", "30"]) == 2
    assert "reads the response but toxicchat/test is a prompt set" in capsys.readouterr().err


def test_random_prefixes_keep_the_first_k_real_tokens():
    """Prefix augmentation: a cut row keeps its first k real tokens, k uniform in 1..n, on either
    padding side; share 0 changes nothing, share 1 cuts every row."""
    import torch

    from singlepass.models.batches import random_prefixes

    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 1]])  # left, right padding
    rng = np.random.default_rng(0)
    assert torch.equal(random_prefixes(mask, 0.0, rng), mask)
    seen = {0: set(), 1: set()}
    for _ in range(200):
        cut = random_prefixes(mask, 1.0, rng)
        assert torch.equal(cut * mask, cut) and cut[2].tolist() == mask[2].tolist()  # one token: kept
        for r in (0, 1):
            real = mask[r].nonzero().flatten().tolist()
            kept = cut[r].nonzero().flatten().tolist()
            assert kept == real[: len(kept)] and len(kept) >= 1  # a prefix of the real tokens
            seen[r].add(len(kept))
    assert seen == {0: {1, 2, 3, 4}, 1: {1, 2, 3}}  # every k in 1..n is drawn
    half = [int((random_prefixes(mask[:2].repeat(50, 1), 0.5, rng) != mask[:2].repeat(50, 1)).any(1).sum())]
    assert 25 <= half[0] <= 75  # about half of 100 rows cut (a cut to k = n changes nothing)


def test_prefix_training_is_for_response_probes_trained_through_states(tiny_model_dir, cache_dir, tmp_path, capsys):
    from singlepass.models.probe_io import read_config

    base = ["train", *on_model(tiny_model_dir, cache_dir), "--limit", "24", "--val-limit", "16"]
    base += ["--max-length", str(MAX_LEN), "--trials", "1", "--epochs", "1", "--no-progress"]
    resp = ["--dataset", "beavertails", "--max-response-tokens", "16"]
    out = tmp_path / "gate"
    assert main([*base, *resp, "--probe", "gate", "--set", "prefixes=0.5", "--out", str(out)]) == 0
    assert read_config(out)["hparams"]["prefixes"] == 0.5
    capsys.readouterr()
    pooled = [*base, *resp, "--probe", "pooling", "--set", "prefixes=0.5", "--out", str(tmp_path / "p")]
    assert main(pooled) == 2 and "no random prefixes" in capsys.readouterr().err
    prompt = [*base, "--dataset", "toxicchat", "--probe", "gate", "--set", "prefixes=0.5", "--out", str(tmp_path / "q")]
    assert main(prompt) == 2 and "applies to response probes" in capsys.readouterr().err
    bad = [*base, *resp, "--probe", "gate", "--set", "prefixes=2", "--out", str(tmp_path / "b")]
    assert main(bad) == 2 and "between 0 and 1" in capsys.readouterr().err


def test_stop_loss_training_is_for_streaming_response_probes(tiny_model_dir, cache_dir, tmp_path, capsys, monkeypatch):
    """train --set stream_loss=stop: a streaming response probe trained on its logits after every pass (through
    ``stop_loss``); a clear error for a prompt probe, a head-only or non-streaming probe, random prefixes or an
    unknown loss."""
    from singlepass.models import streaming
    from singlepass.models.probe_io import read_config

    calls = []
    real_loss = streaming.stop_loss
    monkeypatch.setattr(streaming, "stop_loss", lambda z, *a, **k: calls.append(z.shape) or real_loss(z, *a, **k))

    base = ["train", *on_model(tiny_model_dir, cache_dir), "--limit", "24", "--val-limit", "16"]
    base += ["--max-length", str(MAX_LEN), "--trials", "1", "--epochs", "1", "--no-progress"]
    resp = ["--dataset", "beavertails", "--max-response-tokens", "16"]
    out = tmp_path / "gate"
    assert main([*base, *resp, "--probe", "gate", "--set", "stream_loss=stop", "--out", str(out)]) == 0
    cfg = read_config(out)
    assert cfg["hparams"]["stream_loss"] == "stop" and np.isfinite(cfg["training"]["history"][0]["train_loss"])
    assert calls and all(len(shape) == 2 for shape in calls)  # [b, T]: the logits after every pass
    capsys.readouterr()
    for extra, why in [
        (["--probe", "pooling", "--set", "stream_loss=stop"], "trains its head on features"),
        (["--probe", "mha", "--set", "stream_loss=stop"], "needs a streaming probe"),
        (["--probe", "gate", "--set", "stream_loss=stop", "--set", "prefixes=0.5"], "drop prefixes"),
        (["--probe", "gate", "--set", "stream_loss=last"], "stream_loss must be one of whole, stop"),
    ]:
        assert main([*base, *resp, *extra, "--out", str(tmp_path / "x")]) == 2
        assert why in capsys.readouterr().err, extra
    prompt = [*base, "--dataset", "toxicchat", "--probe", "gate", "--set", "stream_loss=stop"]
    assert (
        main([*prompt, "--out", str(tmp_path / "q")]) == 2 and "applies to response probes" in capsys.readouterr().err
    )


def test_threshold_at_fpr_of_a_streaming_response_probe_bounds_the_stops(tiny_model_dir, cache_dir, tmp_path):
    """A streaming response probe's --threshold-at-fpr is calibrated on the stop rule over every
    pass: replaying the validation responses, the rule stops at most that share of the safe ones
    (the whole-response point is stored beside it)."""
    from singlepass.models import cache as state_cache
    from singlepass.models.mixture import load_mixture
    from singlepass.models.probe_io import load_probe, read_config
    from singlepass.models.streaming import stop_statistic, stream_scores

    out = tmp_path / "gate"
    argv = ["train", *on_model(tiny_model_dir, cache_dir), "--dataset", "beavertails", "--limit", "30"]
    argv += ["--val-limit", "40", "--max-length", str(MAX_LEN), "--max-response-tokens", "12", "--probe", "gate"]
    assert (
        main([*argv, "--trials", "1", "--epochs", "1", "--no-progress", "--threshold-at-fpr", "0.2", "--out", str(out)])
        == 0
    )
    cfg = read_config(out)
    point = cfg["operating_points"]["stop-fpr@0.2"]
    assert cfg["operating_point"] == "stop-fpr@0.2" and cfg["threshold"] == point["threshold"]
    assert point["consecutive"] == 2 and point["fpr"] <= 0.2 and "fpr@0.2" in cfg["operating_points"]
    from singlepass.models.backbone import load_backbone

    bb = load_backbone(str(tiny_model_dir), str(cache_dir))
    val = load_mixture("beavertails", None, 30, 40).validation
    c = state_cache.build(bb, val, "chat", MAX_LEN, cache_dir=cache_dir, progress=False, max_response_tokens=12)
    stat = stop_statistic(stream_scores(load_probe(out)[0], c), 2)
    stopped_safe = float((stat[val.labels == 0] >= cfg["threshold"]).mean())
    assert stopped_safe == pytest.approx(point["fpr"]) and stopped_safe <= 0.2
