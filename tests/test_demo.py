"""``singlepass demo`` without a model: the stages it prints (the commands a user would type),
what it hands from stage to stage (one backbone, one runtime), how a failing stage is reported,
and that its generate output is ``singlepass generate``'s."""

from argparse import Namespace

import pytest

from singlepass import demo
from singlepass.errors import SinglepassError
from singlepass.models.prompts import EXTRACT_BATCH


def _fake_stages(monkeypatch, calls: list, reuse: bool, answers=None):
    bb, rt = object(), object()
    monkeypatch.setattr(demo, "current_recipe", lambda probe, q, dataset: reuse)
    monkeypatch.setattr(
        demo,
        "extract",
        lambda model, cache_dir, data_dir, q, b=None, ds=None: (
            calls.append(("extract", model, q.name, b is bb, ds)) or bb
        ),
    )
    monkeypatch.setattr(demo, "answers_file", lambda b, c: answers)
    monkeypatch.setattr(demo, "answer", lambda b, out, d: calls.append(("answer", b is bb, out)))
    monkeypatch.setattr(demo, "train", lambda b, q, probe, c, d, ds: calls.append(("train", b is bb, q.name, ds)))
    monkeypatch.setattr(demo, "evaluate", lambda b, probe, c, d, *where: calls.append(("eval", b is bb)))
    monkeypatch.setattr(demo, "export", lambda b, probes, art, model, c: calls.append(("export", b is bb, probes)))
    monkeypatch.setattr(demo, "validate", lambda b, art, c: calls.append(("validate", b is bb)))

    def generate(art, policy=None, runtime=None):
        calls.append(("generate", policy, runtime is rt))
        return rt

    monkeypatch.setattr(demo, "generate", generate)


def _commands(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("$ ") or line.startswith("== ")]


@pytest.mark.parametrize("reuse", [False, True])
def test_demo_prints_every_stage_as_its_command(tmp_path, monkeypatch, capsys, reuse):
    calls = []
    answers = tmp_path / "answers.jsonl.gz"
    _fake_stages(monkeypatch, calls, reuse, answers)
    out = tmp_path / "demo"
    probe, rprobe, art = out / "probe-mixture-gate", out / "probe-response-gate", out / "artifact"
    if reuse:
        art.mkdir(parents=True)
        (art / "manifest.json").write_text("{}")
        answers.write_text("")
    args = Namespace(model="smollm2-135m", cache_dir=None, data_dir="/d", out=str(out), fresh=False)
    assert demo.cmd_demo(args) == 0
    text = capsys.readouterr().out
    prompts = " ".join(f"'{p}'" for p in demo.DEMO_PROMPTS)
    m, r = demo.MIXTURE, f"{demo.RESPONSE.dataset},{answers}"
    train = (
        []
        if reuse
        else [
            f"$ singlepass train --model smollm2-135m --data-dir /d --dataset {m} --probe gate "
            f"--out {probe} --limit 800 --val-limit 200 --balance-classes --trials 1 --epochs 6",
            f"$ singlepass train --model smollm2-135m --data-dir /d --dataset {r} --probe gate "
            f"--out {rprobe} --limit 500 --val-limit 150 --max-response-tokens 64 --threshold-at-fpr 0.05 "
            "--trials 1 --epochs 6",
        ]
    )
    stage4 = (
        [f"$ singlepass validate {art}"]
        if reuse
        else [
            f"$ singlepass export --model smollm2-135m --probe {probe}:safety --probe {rprobe}:safety_response "
            f"--out {art} --force"
        ]
    )
    gen = f"$ singlepass generate {art} {prompts} --max-new-tokens 32"
    assert _commands(text) == [
        "== 1/5 extract: hidden states [L+1, B, T, d] of each probe's training rows",
        f"$ singlepass extract --model smollm2-135m --data-dir /d --dataset {m} --split train --limit 800 "
        "--balance-classes",
        *(
            []
            if reuse
            else [
                "$ singlepass answer --model smollm2-135m --data-dir /d --dataset alpaca_noinput --split train "
                f"--limit 150 --max-new-tokens 64 --out {answers}"
            ]
        ),
        f"$ singlepass extract --model smollm2-135m --data-dir /d --dataset {r} --split train --limit 500 "
        "--max-response-tokens 64",
        "== 2/5 train: two quick gate probes, one on prompts, one on responses",
        *train,
        "== 3/5 eval: each probe on held-out test rows, one set out of distribution",
        f"$ singlepass eval --probe {probe} --data-dir /d --dataset toxicchat --split test_human --limit 400",
        f"$ singlepass eval --probe {probe} --data-dir /d --dataset wildguardmix --split test_untouched --limit 200",
        f"$ singlepass eval --probe {rprobe} --data-dir /d --dataset beavertails --split test --limit 150",
        f"$ singlepass eval --probe {rprobe} --data-dir /d --dataset saferlhf --split test --limit 150",
        "== 4/5 export: one graph for tokens + prompt labels + response labels, validated against PyTorch",
        *stage4,
        "== 5/5 generate: text and labels from the same passes (report-only policy)",
        gen,
        gen + " --policy safety=block --policy safety_response=stop",
    ]
    assert (f"reusing {probe}" in text) == reuse and (f"reusing {art}" in text) == reuse
    assert text.count("  (") >= 4 and f"artifact at {art}" in text
    # one backbone from stage 1 for every stage that takes one; one runtime for both generate runs
    assert [c for c in calls if c[0] in ("extract", "answer")] == [
        ("extract", "smollm2-135m", "safety", False, None),
        *([] if reuse else [("answer", True, answers)]),
        ("extract", "smollm2-135m", "safety_response", True, r),
    ]
    specs = [f"{probe}:safety", f"{rprobe}:safety_response"]
    assert [c for c in calls if c[0] in ("train", "eval", "export", "validate")] == (
        [("eval", True)] * 4 + [("validate", True)]
        if reuse
        else [("train", True, "safety", m), ("train", True, "safety_response", r)]
        + [("eval", True)] * 4
        + [("export", True, specs)]
    )
    assert calls[-2:] == [("generate", None, False), ("generate", demo.POLICY, True)]


def test_a_failing_stage_is_reported_as_its_command(tmp_path, monkeypatch, capsys):
    calls = []
    _fake_stages(monkeypatch, calls, reuse=False, answers=tmp_path / "a.jsonl.gz")

    def train(*a):
        raise SinglepassError("no data")

    monkeypatch.setattr(demo, "train", train)
    args = Namespace(model="smollm2-135m", cache_dir=None, data_dir=None, out=str(tmp_path / "d"), fresh=False)
    with pytest.raises(SinglepassError, match=r"stage `singlepass train` failed \(exit 2\)"):
        demo.cmd_demo(args)
    assert "singlepass train: error: no data" in capsys.readouterr().err
    assert [c[0] for c in calls] == ["extract", "answer", "extract"]  # nothing after the failed stage


def test_run_stage_exit_codes(capsys):
    assert demo.run_stage(["x", "a b"], lambda: 7) == 7
    assert capsys.readouterr().out.startswith("$ singlepass x 'a b'\n  (")

    def failed():
        raise demo._Exit(2)

    with pytest.raises(SinglepassError, match=r"stage `singlepass generate` failed \(exit 2\)"):
        demo.run_stage(["generate"], failed)


def test_generate_output_is_singlepass_generates(monkeypatch, capsys):
    from singlepass.runtime import api
    from singlepass.runtime.commands import cmd_generate
    from singlepass.runtime.passes import Label

    results = [
        api.Result(0, "a", text="Paris.", labels={"safety": Label("safe", 0.0123, [0.99, 0.01])}),
        api.Result(
            1,
            "b",
            text="I cannot help.",
            labels={"safety": Label("unsafe", 0.91, [0.09, 0.91])},
            blocked_by="safety",
            finish_reason="blocked",
        ),
        api.Result(2, "c", text="cut", truncated=True, prompt_tokens=512),
        api.Result(3, "", error="prompt is empty", finish_reason="error"),
    ]

    class FakeRuntime:
        def generate(self, prompts, max_new_tokens, **kw):
            return results

    monkeypatch.setattr(api, "load", lambda *a, **kw: FakeRuntime())
    args = Namespace(
        artifact="art",
        prompts=["a", "b", "c", ""],
        backend="auto",
        engine=None,
        threads=None,
        policy=None,
        refusal=None,
        temperature=0.0,
        top_k=0,
        top_p=1.0,
        seed=None,
        truncate=False,
        batch_size=None,
        stream=False,
        json=False,
        max_new_tokens=24,
    )
    assert cmd_generate(args) == 2
    cli = capsys.readouterr()
    assert demo.print_results(results) == 1
    mine = capsys.readouterr()
    assert (mine.out, mine.err) == (cli.out, cli.err)
    assert "[1] blocked by safety" in mine.out and "(prompt truncated to 512 tokens)" in mine.out


def _normalise(text: str) -> str:
    import re

    return re.sub(r"in \d+\.\d s = [\d,]+ tokens/s", "in T s = R tokens/s", text)


def test_extract_and_train_print_what_the_commands_print(tmp_path, monkeypatch, capsys):
    """Same fakes under both: demo.extract / demo.train vs ``singlepass extract`` / ``train``."""
    pytest.importorskip("torch")
    import numpy as np

    from singlepass.models import backbone, cache, data, mixture, probe_io, train
    from singlepass.models.commands import cmd_extract, cmd_train

    class Src:
        name = "SmolLM2-135M-Instruct"

    class BB:
        source, fingerprint, num_layers, hidden_size = Src(), {"model_type": "llama"}, 30, 576

    class Cache:
        lengths, num_layers, d, folder = np.array([3, 5]), 31, 576, tmp_path
        meta = {"bytes_per_token": 35712, "n_truncated": 0, "dtype": "float16"}

        def __len__(self):
            return 2

    (tmp_path / "states.bin").write_bytes(b"x" * 4096)
    seen = []
    monkeypatch.setattr(data, "load_dataset", lambda name, split, d=None, limit=None, **kw: (name, split, limit))
    monkeypatch.setattr(data, "describe", lambda ds: f"{ds[0]}/{ds[1]}: {ds[2]} rows")

    class Mixture:  # the demo's mixture: its train / validation rows named by (spec, part, limit)
        def __init__(self, text, d=None, limit=None, val_limit=None, **kw):
            self.sources = text.split(",")
            self.train, self.validation = (text, "train", limit), (text, "validation", val_limit)
            self.report = {"toxicchat": {"weight": 1.0, "train_rows": limit, "validation_rows": val_limit}}

    monkeypatch.setattr(mixture, "load_mixture", Mixture)
    monkeypatch.setattr(mixture, "describe_mixture", lambda m: [f"  {n}: {r}" for n, r in m.report.items()])
    monkeypatch.setattr(backbone, "load_backbone", lambda *a, **kw: BB())
    monkeypatch.setattr(cache, "build", lambda bb, ds, *a, **kw: seen.append(("build", ds, a, kw)) or Cache())

    def train_probe(method, bb, tr, va, **kw):
        seen.append(("train", method, tr, va, kw))
        return None, {
            "probe": method,
            "data": {},
            "validation": {"f1": 0.61234},
            "task": "safety",
            "trainable_parameters": 1234,
            "threshold": 0.3456,
            "training": {"search_seconds": 12.34},
        }

    monkeypatch.setattr(train, "train_probe", train_probe)
    monkeypatch.setattr(probe_io, "save_probe", lambda out, module, cfg: seen.append(("save", str(out), cfg["data"])))

    ex = Namespace(
        model="smollm2-135m",
        cache_dir=None,
        data_dir="/d",
        dataset=demo.MIXTURE,
        split="train",
        limit=demo.PROMPT.limit,
        balance_classes=demo.PROMPT.balanced,
        prompt_format="chat",
        max_length=512,
        dtype="float16",
        layers=None,
        token_cap=None,
        batch_size=EXTRACT_BATCH,  # the command's default
        no_progress=False,
        json=False,
        max_response_tokens=128,
    )
    assert cmd_extract(ex) == 0
    cli = capsys.readouterr().out
    demo.extract("smollm2-135m", None, "/d", demo.PROMPT)
    assert _normalise(capsys.readouterr().out) == _normalise(cli)
    assert seen[0] == seen[1]  # the same cache request

    probe = tmp_path / "probe"
    tr = Namespace(
        model="smollm2-135m",
        cache_dir=None,
        data_dir="/d",
        dataset=demo.MIXTURE,
        probe="gate",
        out=str(probe),
        seed=0,
        trials=demo.TRIALS,
        epochs=demo.EPOCHS,
        set=None,
        hparams_from=None,
        limit=demo.PROMPT.limit,
        val_limit=demo.PROMPT.val_limit,
        balance_classes=demo.PROMPT.balanced,
        threshold_at_fpr=None,
        threads=None,
        force=False,
        no_progress=False,
        json=False,
        prompt_format="chat",
        max_length=512,
        max_response_tokens=128,
    )
    assert cmd_train(tr) == 0
    cli = capsys.readouterr().out
    demo.train(BB(), demo.PROMPT, probe, None, "/d")
    assert capsys.readouterr().out == cli
    (_, *a), (_, *b) = [s for s in seen if s[0] == "train"]
    assert a == b  # the same training call
    assert [s for s in seen if s[0] == "save"][0] == [s for s in seen if s[0] == "save"][1]
