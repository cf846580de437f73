"""The model's own benign answers as a response source (models/answers.py, ``singlepass answer``),
a user's prompt/response file as a response set, and such a file in a response mixture, trained
on end to end on the tiny model."""

import gzip
import json

import numpy as np
import pytest
import torch
from cli_args import on_model

from singlepass.cli import main
from singlepass.errors import SinglepassError
from singlepass.models import cache as state_cache
from singlepass.models.answers import cut_at_eos, eos_ids, generate_answers
from singlepass.models.data import VALIDATION_FRACTION, load_dataset, load_file, stratified_split
from singlepass.models.mixture import describe_mixture, is_mixture, load_mixture, parse_sources
from singlepass.models.prompts import encode_one

PROMPTS = [
    "What is the capital of France?",
    "fox",
    "Tell me how to build something dangerous. " * 3,  # the longest: most left padding for the others
    "This movie was wonderful",
    "The quick brown fox",
]
MAX_LEN = 96


def greedy_alone(backbone, prompt: str, max_new_tokens: int) -> str:
    """A direct greedy ``model.generate`` of one prompt, unbatched and unpadded, cut at EOS."""
    ids, _ = encode_one(backbone.tokenizer, prompt, "chat")
    eos = eos_ids(backbone)
    with torch.no_grad():
        out = backbone.model.generate(
            input_ids=torch.tensor([ids]),  # [1, T]
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos,
            pad_token_id=backbone.tokenizer.pad_token_id,
        )
    new, _ = cut_at_eos(out[0, len(ids) :].tolist(), set(eos))
    return backbone.tokenizer.decode(new, skip_special_tokens=True)


def test_batched_answers_are_each_prompts_greedy_answer_alone(tiny_backbone, monkeypatch):
    stats = {}
    got = generate_answers(tiny_backbone, PROMPTS, max_new_tokens=10, batch_size=3, progress=False, stats=stats)
    assert got == [greedy_alone(tiny_backbone, p, 10) for p in PROMPTS]
    assert any(a.strip() for a in got) and stats == {"prompts_truncated": 0, "answers_at_max_new_tokens": 5}
    # an answer ends at the first EOS: make the token the model emits third for PROMPTS[0] an EOS
    ids, _ = encode_one(tiny_backbone.tokenizer, PROMPTS[0], "chat")
    with torch.no_grad():
        third = tiny_backbone.model.generate(
            input_ids=torch.tensor([ids]), do_sample=False, max_new_tokens=3, pad_token_id=0
        )[0, -1].item()
    monkeypatch.setattr(
        tiny_backbone.model.generation_config, "eos_token_id", [tiny_backbone.tokenizer.eos_token_id, third]
    )
    cut = generate_answers(tiny_backbone, PROMPTS, max_new_tokens=10, batch_size=2, progress=False)
    assert cut == [greedy_alone(tiny_backbone, p, 10) for p in PROMPTS]
    assert len(tiny_backbone.tokenizer(cut[0], add_special_tokens=False)["input_ids"]) <= 2 < len(got[0])
    assert cut_at_eos([5, 7, 2, 9, 2], {2}) == ([5, 7], True) and cut_at_eos([5], {2}) == ([5], False)


def answer_argv(tiny_model_dir, cache_dir, out, *extra):
    return [
        "answer",
        *on_model(tiny_model_dir, cache_dir),
        "--max-new-tokens",
        "6",
        "--out",
        str(out),
        "--no-progress",
        *extra,
    ]


def test_answer_writes_the_file_and_its_provenance_and_refuses_what_it_cannot_label(
    tiny_backbone, tiny_model_dir, cache_dir, tmp_path, capsys
):
    out = tmp_path / "answers.jsonl.gz"
    argv = answer_argv(tiny_model_dir, cache_dir, out, "--dataset", "alpaca_noinput", "--limit", "8")
    assert main([*argv, "--batch-size", "3", "--json"]) == 0
    prov = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    with gzip.open(out, "rt") as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == prov["rows"] and prov["rows"] + prov["dropped"] == 8
    assert json.loads((tmp_path / "answers.jsonl.gz.json").read_text()) == {k: v for k, v in prov.items() if k != "out"}
    assert prov["model"]["sha256"] == tiny_backbone.fingerprint["sha256"]
    assert (prov["source"], prov["split"], prov["limit"], prov["max_new_tokens"]) == ("alpaca_noinput", "train", 8, 6)
    src = load_dataset("alpaca_noinput", "train", limit=8)
    answers = generate_answers(tiny_backbone, src.texts, 6, progress=False)
    assert [(r["prompt"], r["response"]) for r in rows] == [(p, a) for p, a in zip(src.texts, answers) if a.strip()]
    for r in rows:
        assert r["label"] == 0 and r["text"] == f"User: {r['prompt']}\nAssistant: {r['response']}"
    ds = load_dataset(str(out), "file")  # the file reads back as a response set
    assert ds.reads == "response" and ds.columns["response"] == [r["response"] for r in rows]
    # refusals, each before the model loads
    assert main([*argv]) == 2
    assert "exists (use --force to overwrite)" in capsys.readouterr().err
    other = tmp_path / "other.jsonl.gz"
    for dataset, message in (
        ("advbench", "rows are labelled 'unsafe': answers to harmful prompts cannot be labelled safe"),
        ("beavertails", "is a response set"),
        (str(out), "is a response set"),
        ("nosuch", "unknown dataset 'nosuch'"),
        ("sst2", "sst2 is not a safety set"),
    ):
        assert main(answer_argv(tiny_model_dir, cache_dir, other, "--dataset", dataset, "--limit", "4")) == 2
        assert message in capsys.readouterr().err, dataset
    assert main(answer_argv(tiny_model_dir, cache_dir, tmp_path / "a.jsonl", "--dataset", "alpaca_noinput")) == 2
    assert "name it *.jsonl.gz" in capsys.readouterr().err
    assert not other.exists()


def write_answers(path, n=40, tag=""):
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [
        {
            "prompt": f"Write a haiku about the sea, number {i}.",
            "response": f"Waves fold into foam {i}{tag}.",
            "label": 0,
        }
        for i in range(n)
    ]
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return path


def test_a_prompt_response_file_is_a_response_set(tmp_path):
    ds = load_file(write_answers(tmp_path / "a.jsonl.gz", 4))  # no 'text' column needed
    assert ds.reads == "response" and ds.task == "safety" and ds.label_names == ("safe", "unsafe")
    assert ds.texts[1] == f"User: {ds.columns['prompt'][1]}\nAssistant: {ds.columns['response'][1]}"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "hi", "response": " ", "label": 0}) + "\n")
    with pytest.raises(SinglepassError, match=r"bad.jsonl: row 1: 'response' is empty"):
        load_dataset(str(bad), "file")
    bad.write_text(json.dumps({"prompt": "hi", "response": "ok", "label": "harmful"}) + "\n")
    with pytest.raises(SinglepassError, match=r"row 1: unknown label 'harmful' \(expected one of: safe, unsafe\)"):
        load_file(bad)
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"text": "hi", "label": 0, "response": "ok"}) + "\n")
    assert load_file(plain).reads == "prompt"  # a prompt file keeps its columns


def test_a_response_mixture_takes_an_answers_file_carved_90_10(tiny_backbone, tmp_path):
    path = write_answers(tmp_path / "odd:folder" / "answers.jsonl.gz")  # a path may hold ':'
    assert not is_mixture(str(path)) and is_mixture(f"{path}:2") and is_mixture(f"beavertails,{path}")
    assert [(s.name, s.weight, s.path) for s in parse_sources(f"beavertails,{path}:2")] == [
        ("beavertails", 1.0, None),
        ("answers.jsonl.gz", 2.0, str(path)),
    ]
    m = load_mixture(f"beavertails,{path}", limit=50, val_limit=20)  # the file: under both caps
    assert m.train.reads == m.validation.reads == "response"
    r = m.report["answers.jsonl.gz"]
    assert (r["train_rows"], r["validation_rows"], r["test_split"]) == (36, 4, None)
    keep, held = stratified_split(np.zeros(40, dtype=np.int64), VALIDATION_FRACTION, seed=0)
    for ds, rows in ((m.train, keep), (m.validation, held)):
        mine = [row for src, row in zip(ds.columns["mixture_source"], ds.columns["row"]) if src == "answers.jsonl.gz"]
        assert mine == rows.tolist()
    assert m.train.name == "beavertails:1,answers.jsonl.gz:1" and "no test part" in "\n".join(describe_mixture(m))
    # caches are keyed on the rows: a regenerated file of the same name is another entry
    again = load_mixture(f"beavertails,{write_answers(tmp_path / 'b' / 'answers.jsonl.gz', tag='!')}", limit=30)
    plans = [state_cache.plan(tiny_backbone, d.train, "chat", MAX_LEN, cache_dir=tmp_path)[0] for d in (m, again)]
    assert plans[0].folder != plans[1].folder
    with pytest.raises(
        SinglepassError, match=r"mixes prompt sets \(alpaca_noinput\) with response sets \(answers.jsonl.gz\)"
    ):
        load_mixture(f"alpaca_noinput,{path}")
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text(json.dumps({"text": "hi", "label": 0}) + "\n")
    with pytest.raises(SinglepassError, match="a file in a mixture must be a response set"):
        parse_sources(f"beavertails,{prompts_file}")
    with pytest.raises(SinglepassError, match="unknown mixture source"):
        parse_sources(f"beavertails,{tmp_path / 'missing.jsonl.gz'}")


def test_train_a_response_probe_on_beavertails_and_the_answers(tiny_model_dir, cache_dir, tmp_path, capsys):
    from singlepass.models.probe_io import read_config

    path = write_answers(tmp_path / "answers.jsonl.gz")
    out = tmp_path / "probe"
    argv = ["train", *on_model(tiny_model_dir, cache_dir), "--dataset", f"beavertails,{path}", "--limit", "20"]
    argv += ["--val-limit", "10", "--max-length", str(MAX_LEN), "--max-response-tokens", "16", "--probe", "gate"]
    assert main([*argv, "--trials", "1", "--epochs", "2", "--no-progress", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "answers.jsonl.gz (weight 1): train 20 rows" in printed and "no test part" in printed
    cfg = read_config(out)
    assert cfg["reads"] == "response" and cfg["data"]["mixture"]["answers.jsonl.gz"]["validation_rows"] == 4
    assert set(cfg["validation_by_source"]) == {"beavertails", "answers.jsonl.gz"}
    # eval of the mixture: the shipped sources' test parts; the file has none and is skipped, said so
    ev = ["eval", "--probe", str(out), *on_model(tiny_model_dir, cache_dir), "--dataset", f"beavertails,{path}"]
    assert main([*ev, "--limit", "10", "--no-progress", "--json"]) == 0
    printed = capsys.readouterr()
    assert list(json.loads(printed.out)["sources"]) == ["beavertails"]
    assert "answers.jsonl.gz: a file source has no test part of its own" in printed.err  # --json: notes on stderr
