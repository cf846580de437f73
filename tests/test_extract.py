import json

import numpy as np
import pytest
import torch

from singlepass.errors import SinglepassError
from singlepass.models import cache as state_cache
from singlepass.models.data import Dataset
from singlepass.models.extract import batch_tensors, extract, forward_hidden, plan_batches, relative_error
from singlepass.models.prompts import encode, encode_one, render

TEXTS = [
    "What is the capital of France?",
    "This movie was wonderful.",
    "I hate this, it is the worst thing ever and I am angry about it all day long.",
    "fox",
]


def test_stacked_shape_and_semantics(tiny_backbone):
    hs, mask, enc = extract(tiny_backbone, TEXTS)
    L1, B, T, d = hs.shape
    assert (L1, B, d) == (3, 4, 64) and T == max(len(s) for s in enc.ids) and mask.shape == (B, T)
    assert mask.sum(1).tolist() == [len(s) for s in enc.ids]
    model = tiny_backbone.model
    # index 0 = embeddings; index L = final-norm output, which the lm_head turns into logits
    ids, m, pos = batch_tensors(enc.ids, tiny_backbone.tokenizer.pad_token_id)
    assert torch.allclose(hs[0][m.bool()], model.get_input_embeddings()(ids)[m.bool()])
    logits = model(input_ids=ids, attention_mask=m, position_ids=pos).logits
    assert torch.allclose(model.lm_head(hs[-1])[m.bool()], logits[m.bool()], atol=1e-4)


@pytest.mark.parametrize("side", ["left", "right"])
def test_states_do_not_depend_on_batch_or_padding(tiny_backbone, side):
    enc = encode(tiny_backbone.tokenizer, TEXTS)
    pad = tiny_backbone.tokenizer.pad_token_id
    ids, mask, pos = batch_tensors(enc.ids, pad, side)
    batch = forward_hidden(tiny_backbone.model, ids, mask, pos)
    for b, seq in enumerate(enc.ids):
        alone = forward_hidden(tiny_backbone.model, *batch_tensors([seq], pad))[:, 0]  # [L+1, n, d]
        real = batch[:, b][:, mask[b].bool()]
        assert relative_error(real, alone) <= 1e-4


def test_prompt_format_and_truncation_is_counted(tiny_backbone):
    tok = tiny_backbone.tokenizer
    assert render(tok, "hi", "raw") == "hi"
    assert render(tok, "hi", "chat").endswith("<|im_start|>assistant\n")
    long = "the quick brown fox " * 50
    ids, cut = encode_one(tok, long, "chat", max_length=60)
    assert cut and len(ids) <= 60
    assert tok.decode(ids).endswith("<|im_end|>\n<|im_start|>assistant\n")  # template kept intact
    enc = encode(tok, [long, "short"], max_length=60)
    assert enc.truncated == [True, False] and enc.n_truncated == 1
    with pytest.raises(SinglepassError, match="over the maximum of 60"):
        encode_one(tok, long, max_length=60, truncate=False)
    with pytest.raises(SinglepassError, match="prompt 1: prompt is empty"):
        encode(tok, ["ok", "   "])
    with pytest.raises(SinglepassError, match="too short for the prompt template"):
        encode_one(tok, "hello", max_length=3)


def test_plan_batches_covers_every_row_once():
    lengths = [5, 50, 7, 50, 3, 20, 20, 1]
    batches = plan_batches(lengths, batch_size=3, max_batch_tokens=100)
    assert sorted(r for b in batches for r in b) == list(range(len(lengths)))
    assert all(len(b) <= 3 and max(lengths[r] for r in b) * len(b) <= 100 for b in batches)


def dataset(n=12):
    texts = [f"{TEXTS[i % 4]} number {i}" for i in range(n)]
    return Dataset("unit", "train", texts, np.arange(n) % 2, ("a", "b"))


def test_cache_roundtrip_reuse_and_key(tiny_backbone, tmp_path):
    ds = dataset()
    c = state_cache.build(tiny_backbone, ds, dtype="float32", batch_size=4, cache_dir=tmp_path, progress=False)
    assert isinstance(c.states, np.memmap) and len(c) == len(ds)
    hs, mask, enc = extract(tiny_backbone, ds.texts, padding_side="right")
    for i in range(len(ds)):
        n = len(enc.ids[i])
        assert np.allclose(c.row(i), hs[:, i, :n].transpose(0, 1).numpy(), rtol=1e-5, atol=1e-4)
    states, m = c.batch([0, 5, 7])
    assert states.shape[:2] == (3, 3) and m.sum(1).tolist() == [int(c.lengths[r]) for r in (0, 5, 7)]
    # read into a reused buffer: the same values, the padding zeroed over what the last read left there
    scratch = state_cache.Scratch()
    scratch.take(states.numel() * 2).fill_(7.0)
    for side in ("right", "left"):
        fresh, fresh_mask = c.batch([0, 5, 7], side=side)
        again, m2 = c.batch([0, 5, 7], side=side, scratch=scratch)
        assert again.data_ptr() == scratch.buf.data_ptr()
        assert torch.equal(again, fresh) and torch.equal(m2, fresh_mask)
    log = []
    again = state_cache.build(tiny_backbone, ds, dtype="float32", cache_dir=tmp_path, log=log.append)
    assert again.folder == c.folder and log == [f"cache hit: {c.folder}"]
    other = state_cache.plan(tiny_backbone, ds, "raw", 512, "float32", cache_dir=tmp_path)[0]
    shorter = state_cache.plan(tiny_backbone, ds, "chat", 64, "float32", cache_dir=tmp_path)[0]
    half = state_cache.plan(tiny_backbone, ds, "chat", 512, "float16", cache_dir=tmp_path)[0]
    assert len({c.folder, other.folder, shorter.folder, half.folder}) == 4


def test_cache_resumes_after_interruption_without_duplicates(tiny_backbone, tmp_path):
    ds = dataset(10)
    with pytest.raises(KeyboardInterrupt):
        state_cache.build(
            tiny_backbone, ds, batch_size=2, cache_dir=tmp_path / "a", progress=False, stop_after_batches=2
        )
    p = state_cache.plan(tiny_backbone, ds, "chat", 512, cache_dir=tmp_path / "a")[0]
    record = json.loads((p.folder / "progress.json").read_text())
    assert record == {"batches_done": 2, "batch_size": 2, "max_batch_tokens": state_cache.MAX_BATCH_TOKENS}
    with pytest.raises(SinglepassError, match="incomplete"):
        state_cache.StateCache(p.folder)
    log = []
    # resumed with another batch size: the committed batches' plan is replayed, not the new one's
    resumed = state_cache.build(
        tiny_backbone, ds, batch_size=3, cache_dir=tmp_path / "a", progress=False, log=log.append
    )
    assert any("after 2 committed batches (batch size 2)" in line for line in log)
    fresh = state_cache.build(tiny_backbone, ds, batch_size=2, cache_dir=tmp_path / "b", progress=False)
    assert np.array_equal(np.asarray(resumed.states), np.asarray(fresh.states))
    assert resumed.states.shape[0] == int(fresh.lengths.sum())  # no duplicated rows


def test_a_progress_file_without_a_plan_resumes_with_the_8_row_batches_it_was_written_with(tiny_backbone, tmp_path):
    """A progress file from before batch plans were recorded holds only the batch count: every such run
    batched 8 rows, so that plan is replayed (today's default, 32 rows, would skip unwritten rows)."""
    ds = dataset(10)
    with pytest.raises(KeyboardInterrupt):
        state_cache.build(
            tiny_backbone, ds, batch_size=8, cache_dir=tmp_path / "a", progress=False, stop_after_batches=1
        )
    p = state_cache.plan(tiny_backbone, ds, "chat", 512, cache_dir=tmp_path / "a")[0]
    (p.folder / "progress.json").write_text(json.dumps({"batches_done": 1}))  # the old format
    resumed = state_cache.build(tiny_backbone, ds, cache_dir=tmp_path / "a", progress=False)
    fresh = state_cache.build(tiny_backbone, ds, batch_size=8, cache_dir=tmp_path / "b", progress=False)
    assert np.array_equal(np.asarray(resumed.states), np.asarray(fresh.states))


@pytest.mark.parametrize("commit_bytes,committed", [(1, 3), (2**40, 0)])
def test_progress_names_only_committed_batches_when_a_run_dies(
    tiny_backbone, tmp_path, monkeypatch, commit_bytes, committed
):
    """Batches are committed (synced, then named in progress.json) every COMMIT_BYTES: a run that dies after
    3 batches resumes after the last commit (3 with a commit per batch, 0 before the first), without gaps."""
    ds = dataset(10)
    real = state_cache.iter_hidden

    def dies_after_3(*a, **k):
        for i, item in enumerate(real(*a, **k)):
            if i == 3:
                raise RuntimeError("killed")
            yield item

    monkeypatch.setattr(state_cache, "COMMIT_BYTES", commit_bytes)
    monkeypatch.setattr(state_cache, "iter_hidden", dies_after_3)
    with pytest.raises(RuntimeError, match="killed"):
        state_cache.build(tiny_backbone, ds, batch_size=2, cache_dir=tmp_path / "a", progress=False)
    p = state_cache.plan(tiny_backbone, ds, "chat", 512, cache_dir=tmp_path / "a")[0]
    assert json.loads((p.folder / "progress.json").read_text())["batches_done"] == committed
    monkeypatch.setattr(state_cache, "iter_hidden", real)
    resumed = state_cache.build(tiny_backbone, ds, batch_size=2, cache_dir=tmp_path / "a", progress=False)
    fresh = state_cache.build(tiny_backbone, ds, batch_size=2, cache_dir=tmp_path / "b", progress=False)
    assert np.array_equal(np.asarray(resumed.states), np.asarray(fresh.states))


def test_layer_subset_token_cap_and_fp16(tiny_backbone, tmp_path):
    ds = dataset(6)
    full = state_cache.build(tiny_backbone, ds, dtype="float32", cache_dir=tmp_path, progress=False)
    sub = state_cache.build(tiny_backbone, ds, layers=[0, 2], token_cap=5, cache_dir=tmp_path, progress=False)
    assert sub.states.dtype == np.float16 and sub.num_layers == 2 and sub.lengths.max() == 5
    ref = full.row(3)[-5:][:, [0, 2]]  # the last 5 tokens of layers 0 and 2
    assert relative_error(np.asarray(sub.row(3), dtype=np.float32), ref) < 1e-3
    with pytest.raises(SinglepassError, match="layer subset"):
        state_cache.plan(tiny_backbone, ds, "chat", 512, layers=[7], cache_dir=tmp_path)


def test_corrupt_cache_is_a_clear_error(tiny_backbone, tmp_path):
    c = state_cache.build(tiny_backbone, dataset(4), cache_dir=tmp_path, progress=False)
    with open(c.folder / "states.bin", "ab") as f:
        f.write(b"junk")
    with pytest.raises(SinglepassError, match="wrong size"):
        state_cache.StateCache(c.folder)


def test_extract_cli(tiny_model_dir, tmp_path, capsys):
    from singlepass.cli import main

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": i % 2}) + "\n" for i, t in enumerate(TEXTS)))
    rc = main(
        [
            "extract",
            "--model",
            str(tiny_model_dir),
            "--dataset",
            str(data),
            "--cache-dir",
            str(tmp_path / "c"),
            "--no-progress",
            "--json",
        ]
    )
    out = capsys.readouterr().out
    summary = json.loads(out.strip().splitlines()[-1])
    assert rc == 0 and summary["stacked_shape"][:2] == [3, 4] and summary["stacked_shape"][3] == 64
    assert "tokens/s" in out and "bytes/token" in out
    assert main(["extract", "--model", str(tmp_path / "missing"), "--dataset", str(data)]) == 2
    assert "not found" in capsys.readouterr().err


@pytest.mark.parametrize("side", ["left", "right"])
def test_shared_first_tokens_run_once_with_the_same_states(tiny_backbone, side, monkeypatch):
    """The chat template's system turn, shared by every row, runs once; each batch runs its rows' own tokens on
    a copy of its keys and values: the states equal whole-row passes, in the same padded layout."""
    from singlepass.models import extract as ex

    enc = encode(tiny_backbone.tokenizer, TEXTS)
    P = ex.shared_prefix(enc.ids)
    assert P >= ex.MIN_SHARED_PREFIX and all(s[:P] == enc.ids[0][:P] for s in enc.ids)
    assert ex.shared_prefix([[1, 2, 3], [1, 2, 3]]) == 2 and ex.shared_prefix([[1, 2]]) == 0
    batches = [[0, 2], [1, 3]]
    runs, run_prefix = [], ex.run_prefix
    monkeypatch.setattr(ex, "run_prefix", lambda *a: runs.append(a) or run_prefix(*a))
    shared = list(ex.iter_hidden(tiny_backbone, enc.ids, padding_side=side, batches=batches))
    whole = list(ex.iter_hidden(tiny_backbone, enc.ids, padding_side=side, batches=batches, share_prefix=False))
    assert len(runs) == 1  # once for every batch
    for (rows, hs, mask), (rows_w, hs_w, mask_w) in zip(shared, whole):
        assert rows == rows_w and torch.equal(mask, mask_w) and hs.shape == hs_w.shape
        assert relative_error(hs[:, mask.bool()], hs_w[:, mask_w.bool()]) <= 1e-5
