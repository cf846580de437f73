"""Evaluation: metrics against scikit-learn, artifacts (round trip, errors), eval and plot CLIs."""

import json
import shutil

import numpy as np
import pytest
import torch
from cli_args import probe_argv, train_argv

from singlepass.cli import main
from singlepass.errors import SinglepassError
from singlepass.models.data import load_dataset
from singlepass.models.evaluate import check_labels
from singlepass.models.metrics import compute_metrics, tpr_at_fpr
from singlepass.models.probe_io import load_probe, read_config, save_probe
from singlepass.models.registry import METHODS, build_method

MAX_LEN = 96


def test_binary_metrics_match_sklearn_and_a_brute_force_tpr():
    from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

    rng = np.random.default_rng(0)
    y = (rng.random(3000) < 0.1).astype(int)
    s = np.clip(0.35 * y + rng.random(3000) * 0.7, 0, 1)
    m = compute_metrics(y, np.stack([1 - s, s], 1), threshold=0.6)
    assert m["f1"] == pytest.approx(f1_score(y, s >= 0.5))
    assert m["f1_at_threshold"] == pytest.approx(f1_score(y, s >= 0.6))
    assert m["auprc"] == pytest.approx(average_precision_score(y, s))
    assert m["roc_auc"] == pytest.approx(roc_auc_score(y, s))
    for target in (0.01, 0.001):  # brute force: best TPR over thresholds whose FPR <= target
        best = max(((s[y == 1] >= t).mean() for t in np.unique(s) if (s[y == 0] >= t).mean() <= target), default=0)
        assert m[f"tpr_at_{target:g}_fpr"] == pytest.approx(best)
    assert tpr_at_fpr(np.zeros(5, int), np.ones(5), 0.01) is None


def test_multiclass_metrics_are_accuracy_and_macro_scores():
    from sklearn.metrics import f1_score, roc_auc_score

    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, 400)
    p = rng.dirichlet(np.ones(4), 400)
    p[np.arange(400), y] += 0.5
    p /= p.sum(1, keepdims=True)
    m = compute_metrics(y, p)
    assert m["accuracy"] == pytest.approx((p.argmax(1) == y).mean())
    assert m["macro_f1"] == pytest.approx(f1_score(y, p.argmax(1), average="macro"))
    assert m["roc_auc"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr"))
    assert "tpr_at_0.01_fpr" not in m and "f1" not in m


def _config(method, L1=3, d=16, labels=("non-toxic", "toxic")):
    params = {"vocab_size": 40} if method == "muli" else {"factor": 4, "heads": 2} if method == "mha" else {}
    return {
        "probe": method,
        "input": "logits" if method == "muli" else "hidden_states",
        "params": params,
        "num_layers": L1,
        "hidden_size": d,
        "label_names": list(labels),
        "task": "safety",
        "threshold": 0.4,
        "prompt_format": "chat",
        "max_length": 64,
        "backbone": {"name": "x", "sha256": "ab" * 32, "num_hidden_layers": 2, "hidden_size": d},
    }


@pytest.mark.parametrize("method", METHODS)
def test_save_load_round_trip_gives_identical_outputs(method, tmp_path):
    torch.manual_seed(0)
    cfg = _config(method)
    m = build_method(method, 3, 16, 2, **cfg["params"]).eval()
    if method == "muli":
        m.fit_standardisation(m.transform(torch.randn(20, 40)))
        x = (torch.randn(4, 40) * 3,)
    else:
        x = (torch.randn(3, 4, 7, 16), torch.tensor([[1] * 7, [0, 0, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0, 0], [1] * 7]))
    save_probe(tmp_path / "p", m, cfg)
    assert not list(tmp_path.glob("*.pkl")) and sorted(f.name for f in (tmp_path / "p").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]
    loaded, cfg2 = load_probe(tmp_path / "p", cfg["backbone"])
    assert cfg2["threshold"] == 0.4 and cfg2["input"] == cfg["input"]
    torch.testing.assert_close(loaded(*x), m(*x), rtol=0, atol=0)


def test_config_json_always_carries_the_input_kind(tmp_path):
    """save_probe writes "input"; an older folder without it reads back with it (from the family)."""
    for method in METHODS:
        cfg = _config(method)
        want = cfg.pop("input")
        p = save_probe(tmp_path / method, build_method(method, 3, 16, 2, **cfg["params"]), cfg)
        raw = json.loads((p / "config.json").read_text())
        assert raw["input"] == want
        del raw["input"]  # a folder from before "input" was recorded
        (p / "config.json").write_text(json.dumps(raw))
        assert read_config(p)["input"] == want and load_probe(p)[1]["input"] == want
    raw["probe"] = "svm"
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.json").write_text(json.dumps(raw))
    with pytest.raises(SinglepassError, match="old.*unknown probe type 'svm'"):
        read_config(tmp_path / "old")


def test_corrupt_or_foreign_artifacts_are_clear_errors(tmp_path):
    cfg = _config("gate")
    good = save_probe(tmp_path / "good", build_method("gate", 3, 16, 2), cfg)
    other = dict(cfg["backbone"], sha256="cd" * 32, name="other-model")
    with pytest.raises(SinglepassError, match="trained on backbone 'x'.*retrain"):
        load_probe(good, other)
    cases = {
        "no-weights": lambda p: (p / "model.safetensors").unlink(),
        "truncated-weights": lambda p: (p / "model.safetensors").write_bytes(
            (p / "model.safetensors").read_bytes()[:50]
        ),
        "bad-json": lambda p: (p / "config.json").write_text("{not json"),
        "unknown-type": lambda p: (p / "config.json").write_text(
            json.dumps({**json.loads((p / "config.json").read_text()), "probe": "svm"})
        ),
        "wrong-shape": lambda p: (p / "config.json").write_text(
            json.dumps({**json.loads((p / "config.json").read_text()), "hidden_size": 32})
        ),
    }
    for name, corrupt in cases.items():
        p = tmp_path / name
        shutil.copytree(good, p)
        corrupt(p)
        with pytest.raises(SinglepassError, match=str(p.name)):
            load_probe(p)


def test_label_sets_must_match_or_be_binary_of_the_same_task():
    cfg = _config("gate")
    tc = load_dataset("toxicchat", "test", limit=10)
    assert check_labels(cfg, tc) is None
    assert "'harmful' as 'toxic'" in check_labels(cfg, load_dataset("wildguardmix", "test", limit=10))
    with pytest.raises(SinglepassError, match="labelled"):
        check_labels(cfg, load_dataset("emotion", "test", limit=10))
    with pytest.raises(SinglepassError, match="labelled"):
        check_labels(cfg, load_dataset("sst2", "test", limit=10))  # binary, but sentiment is not safety


@pytest.fixture(scope="module")
def gate_probe(tiny_model_dir, cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("probes") / "gate"
    argv = train_argv(tiny_model_dir, cache_dir, "gate", MAX_LEN, "--out", out, "--trials", 1, "--epochs", 2)
    assert main(argv) == 0
    return out


def test_eval_cli_reports_toxicchat_full_and_human_test_sets(gate_probe, tiny_model_dir, cache_dir, capsys):
    args = probe_argv("eval", gate_probe, tiny_model_dir, cache_dir, 80)
    assert main(args + ["--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    human = sum(bool(v) for v in load_dataset("toxicchat", "test", limit=80).columns["human_annotation"])
    assert set(rep["results"]) == {"test", "test_human"}
    assert rep["results"]["test"]["rows"] == 80 and rep["results"]["test_human"]["rows"] == human < 80
    for key in ("accuracy", "f1", "f1_at_threshold", "auprc", "roc_auc", "tpr_at_0.01_fpr", "tpr_at_0.001_fpr"):
        assert key in rep["results"]["test"]
    assert rep["threshold"] == read_config(gate_probe)["threshold"]
    assert main(args) == 0
    assert "test_human" in capsys.readouterr().out  # the human-readable table


def test_eval_cli_errors_without_tracebacks(gate_probe, tiny_model_dir, cache_dir, tmp_path, capsys):
    from tiny import build_tiny_llama

    other = build_tiny_llama(tmp_path / "other", seed=1)
    base = ["eval", "--probe", str(gate_probe), "--cache-dir", str(cache_dir), "--split", "test", "--limit", "20"]
    assert main(base + ["--model", str(other), "--dataset", "toxicchat"]) == 2
    assert "retrain the probe" in capsys.readouterr().err
    assert main(base + ["--model", str(tiny_model_dir), "--dataset", "emotion"]) == 2
    assert "labelled" in capsys.readouterr().err
    assert main(["eval", "--probe", str(tmp_path / "nothing"), "--dataset", "toxicchat"]) == 2
    err = capsys.readouterr().err
    assert "no such folder" in err and "Traceback" not in err


def test_plot_layers_writes_the_gate_figure(gate_probe, tiny_model_dir, cache_dir, tmp_path, capsys):
    png = tmp_path / "fig.png"
    assert main(probe_argv("plot-layers", gate_probe, tiny_model_dir, cache_dir, 60, "--out", png)) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert "non-toxic, correct" in capsys.readouterr().out


def test_plot_layer_weights_are_the_gate_stage_2_softmax(gate_probe, tiny_backbone, cache_dir):
    from singlepass.models import cache as state_cache
    from singlepass.models.plots import group_means, layer_weights

    module, cfg = load_probe(gate_probe)
    ds = load_dataset("toxicchat", "test", limit=30)
    c = state_cache.build(tiny_backbone, ds, "chat", MAX_LEN, cache_dir=cache_dir, progress=False)
    W, pred = layer_weights(module, cfg, c)
    assert W.shape == (30, tiny_backbone.num_layers + 1)
    np.testing.assert_allclose(W.sum(1), 1.0, rtol=1e-5)
    assert W.max() / W.min() <= np.e**2 + 1e-6  # tanh-bounded scores: weights differ by at most e^2
    groups = group_means(W, ds.labels, pred, cfg["label_names"])
    assert sum(n for _, n, _ in groups) == 30


def test_plot_layers_refuses_other_probes(tmp_path, capsys):
    cfg = _config("mha")
    p = save_probe(tmp_path / "mha", build_method("mha", 3, 16, 2, factor=4, heads=2), cfg)
    assert main(["plot-layers", "--probe", str(p), "--dataset", "toxicchat"]) == 2
    assert "needs a gate probe" in capsys.readouterr().err
