"""Training: the scikit-learn oracle, determinism, the search plan, the CLI, one real run."""

import json

import numpy as np
import pytest
import torch
from cli_args import train_argv

from singlepass.cli import main
from singlepass.errors import SinglepassError
from singlepass.models import cache as state_cache
from singlepass.models.batches import FeatureData, compute_features
from singlepass.models.data import load_dataset
from singlepass.models.fit import fit
from singlepass.models.probes import mha_choices
from singlepass.models.registry import METHODS, build_method
from singlepass.models.search import BATCH_SIZES, HParams, trial_plan
from singlepass.models.train import train_probe

MAX_LEN = 96  # tiny tokenizer: short prompts keep these tests fast


@pytest.fixture(scope="module")
def sst2_cache(tiny_backbone, cache_dir):
    ds = load_dataset("sst2", "validation", limit=120)
    return ds, state_cache.build(tiny_backbone, ds, "chat", MAX_LEN, cache_dir=cache_dir, progress=False)


def numpy_readout(cache, readout: str) -> np.ndarray:
    """Final layer, RMS-normalised per token, last token or token mean: computed independently."""
    rows = []
    for i in range(len(cache)):
        r = np.asarray(cache.row(i), dtype=np.float64)[:, -1]  # [T_i, d]
        r = r / np.sqrt((r**2).mean(-1, keepdims=True) + 1e-6)
        rows.append(r[-1] if readout == "last-token" else r.mean(0))
    return np.stack(rows)


@pytest.mark.parametrize("method", ["last-token", "mean-final"])
def test_fixed_readout_probe_agrees_with_sklearn_logistic_regression(method, tiny_backbone, sst2_cache):
    """The oracle (as EleutherAI's elk does): our harness, full-batch with an L2 penalty, reaches
    the optimum scikit-learn's LogisticRegression finds on the same features."""
    from sklearn.linear_model import LogisticRegression

    ds, cache = sst2_cache
    probe = build_method(method, tiny_backbone.num_layers + 1, tiny_backbone.hidden_size, 2)
    X = compute_features(probe, cache)
    Xn = numpy_readout(cache, method)
    np.testing.assert_allclose(X.numpy(), Xn, rtol=1e-4, atol=1e-4)
    N, l2 = len(X), 0.01
    # ours: mean log-loss + l2 * |w|^2  ==  sklearn: C * sum log-loss + |w|^2 / 2  with C = 1 / (2 N l2)
    sk = LogisticRegression(C=1 / (2 * N * l2), tol=1e-10, max_iter=10_000).fit(Xn, ds.labels)
    hp = HParams(lr=0.1, batch_size=N, weight_decay=0.0, epochs=2000, patience=0, l2=l2, eval_every=2000)
    fit(probe, FeatureData(X), ds.labels, FeatureData(X), ds.labels, hp, "classification", 2, seed=0)
    with torch.no_grad():
        ours = torch.sigmoid(probe.head(torch.tensor(Xn, dtype=torch.float32)))[:, 0].numpy()
    theirs = sk.predict_proba(Xn)[:, 1]
    assert 0.2 < (theirs > 0.5).mean() < 0.8  # a non-trivial fit
    np.testing.assert_allclose(ours, theirs, atol=1e-2)
    np.testing.assert_allclose(probe.head.weight.detach().numpy()[0], sk.coef_[0], atol=5e-2)
    decided = np.abs(theirs - 0.5) > 0.01
    assert ((ours > 0.5) == (theirs > 0.5))[decided].all()


def test_input_statistics_match_numpy_and_folded_scaling_keeps_the_function(sst2_cache):
    from singlepass.models.stats import fold_scaling, input_statistics

    _, cache = sst2_cache
    mean, std = input_statistics(cache, max_rows=len(cache))
    toks = np.concatenate([np.asarray(cache.row(i), dtype=np.float64) for i in range(len(cache))])  # [N_tok, L+1, d]
    toks = toks / np.sqrt((toks**2).mean(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(mean.numpy(), toks.mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(std.numpy(), toks.std(0), rtol=1e-3, atol=1e-5)
    sub_mean, _ = input_statistics(cache, max_rows=30)  # a seeded row sample: same every call
    assert torch.equal(sub_mean, input_statistics(cache, max_rows=30)[0]) and not torch.equal(sub_mean, mean)

    Xt, Xv = torch.randn(50, 8) * 40 + 7, torch.randn(20, 8) * 40 + 7
    tr, va, (mu, sd) = FeatureData.standardised(Xt, Xv)
    assert tr.X.mean(0).abs().max() < 1e-5 and (tr.X.std(0, unbiased=False) - 1).abs().max() < 1e-4
    head = torch.nn.Linear(8, 1)
    with torch.no_grad():
        before = head(va.X)
        fold_scaling(head, mu, sd)
        torch.testing.assert_close(head(Xv), before, rtol=1e-4, atol=1e-4)


def test_search_plan_is_seeded_bounded_and_starts_from_the_default():
    a = trial_plan("mha", 576, 6, seed=3)
    assert [vars(h) for h in a] == [vars(h) for h in trial_plan("mha", 576, 6, seed=3)]
    assert [vars(h) for h in a] != [vars(h) for h in trial_plan("mha", 576, 6, seed=4)]
    assert a[0].lr == 1e-3 and a[0].batch_size == 32
    for hp in a[1:]:
        assert 1e-5 <= hp.lr <= 1e-3 and hp.batch_size in BATCH_SIZES and 0 <= hp.weight_decay <= 0.05
        f, h = hp.params["factor"], hp.params["heads"]
        assert 576 % f == 0 and (576 // f) % h == 0
    assert len(trial_plan("muli", 576, 9, seed=0)) == 1  # MULI: the official recipe, no search
    assert (32, 8) in mha_choices(3072) and (4, 16) in mha_choices(3072)
    assert all(f != 32 or h == 6 for f, h in mha_choices(576))  # d_inner 18: no paper head count divides it
    over = trial_plan("gate", 64, 3, seed=0, overrides={"lr": 3e-4, "epochs": 2})
    assert all(h.lr == 3e-4 and h.epochs == 2 for h in over)
    with pytest.raises(SinglepassError):
        trial_plan("gate", 64, 0, seed=0)


def _train(method, backbone, cache_dir, seed=0, **kw):
    tr = load_dataset("toxicchat", "train", limit=60)
    va = load_dataset("toxicchat", "validation", limit=40)
    return train_probe(
        method,
        backbone,
        tr,
        va,
        max_length=MAX_LEN,
        seed=seed,
        cache_dir=cache_dir,
        progress=False,
        log=lambda *a: None,
        **kw,
    )


def test_training_is_deterministic_and_leaves_the_backbone_alone(tiny_backbone, cache_dir):
    before = {k: v.clone() for k, v in tiny_backbone.model.state_dict().items()}
    a, cfg_a = _train("gate", tiny_backbone, cache_dir, seed=1, max_epochs=2)
    b, _ = _train("gate", tiny_backbone, cache_dir, seed=1, max_epochs=2)
    c, _ = _train("gate", tiny_backbone, cache_dir, seed=2, max_epochs=2)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    assert not torch.equal(a.token_gates, c.token_gates)
    after = tiny_backbone.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in tiny_backbone.model.parameters())
    assert cfg_a["training"]["epochs_run"] <= 2 and cfg_a["seed"] == 1


def test_unknown_probe_and_single_class_data_are_clear_errors(tiny_backbone, cache_dir):
    with pytest.raises(SinglepassError, match="unknown probe type 'svm'"):
        _train("svm", tiny_backbone, cache_dir)
    tr = load_dataset("toxicchat", "train", limit=60)
    one = tr.subset(np.flatnonzero(tr.labels == 0))
    with pytest.raises(SinglepassError, match="two classes"):
        train_probe("gate", tiny_backbone, one, one, max_length=MAX_LEN, cache_dir=cache_dir, progress=False)


@pytest.mark.parametrize("method", METHODS)
def test_train_cli_writes_a_loadable_artifact(method, tiny_model_dir, cache_dir, tmp_path, capsys):
    from singlepass.models.probe_io import REQUIRED, load_probe

    out = tmp_path / method
    argv = train_argv(tiny_model_dir, cache_dir, method, MAX_LEN, "--out", out, "--trials", 2, "--epochs", 2, "--json")
    if method == "muli":
        argv += ["--set", "epochs=20"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    module, cfg = load_probe(out)
    assert all(k in cfg for k in REQUIRED)
    assert cfg["probe"] == method and cfg["input"] == ("logits" if method == "muli" else "hidden_states")
    assert cfg["label_names"] == ["non-toxic", "toxic"] and cfg["task"] == "safety"
    assert 0 < cfg["threshold"] < 1 and cfg["max_length"] == MAX_LEN
    assert len(cfg["training"]["trials"]) == (1 if method == "muli" else 2)
    assert summary["trainable_parameters"] == cfg["trainable_parameters"] > 0
    assert main(argv) == 2  # exists, no --force
    assert "exists" in capsys.readouterr().err


def test_train_cli_hparams_from_keeps_the_configuration_and_honours_epochs(tiny_model_dir, cache_dir, tmp_path, capsys):
    from singlepass.models.probe_io import read_config

    common = train_argv(tiny_model_dir, cache_dir, "last-token", MAX_LEN)
    assert main([*common, "--out", str(tmp_path / "searched"), "--trials", "2", "--epochs", "3"]) == 0
    src = read_config(tmp_path / "searched")
    assert (
        main(
            [
                *common,
                "--out",
                str(tmp_path / "again"),
                "--hparams-from",
                str(tmp_path / "searched"),
                "--seed",
                "1",
                "--epochs",
                "2",
            ]
        )
        == 0
    )
    cfg = read_config(tmp_path / "again")
    assert len(cfg["training"]["trials"]) == 1 and cfg["seed"] == 1
    assert cfg["hparams"] == {**src["hparams"], "epochs": 2}  # the stored configuration, with the given epochs
    capsys.readouterr()
    assert (
        main([*common, "--out", str(tmp_path / "x"), "--hparams-from", str(tmp_path / "searched"), "--trials", "3"])
        == 2
    )
    assert "--trials" in capsys.readouterr().err
    assert main([*common, "--out", str(tmp_path / "y"), "--epochs", "0"]) == 2
    assert "--epochs must be at least 1" in capsys.readouterr().err


@pytest.mark.real
def test_short_real_training_run_beats_the_majority_class(real_backbone, cache_dir):
    """SmolLM2-135M, a gate probe on 160 SST-2 sentences: must beat always-the-majority-label."""
    from singlepass.models.evaluate import predict_proba
    from singlepass.models.metrics import compute_metrics

    tr = load_dataset("sst2", "train", limit=160)
    va = load_dataset("sst2", "validation", limit=60)
    te = load_dataset("sst2", "test", limit=120)
    # lr 1e-2: with 40 steps the default 1e-3 stays at chance (measured: 200 rows, 6 epochs, val 0.51 vs
    # 0.68); scikit-learn's logistic regression on these features reaches ~0.7 with 200 rows.
    module, cfg = train_probe(
        "gate",
        real_backbone,
        tr,
        va,
        seed=0,
        max_epochs=8,
        overrides={"lr": 1e-2},
        cache_dir=cache_dir,
        progress=False,
        log=lambda *a: None,
    )
    probs = predict_proba(module, cfg, real_backbone, te, cache_dir, progress=False, log=lambda *a: None)
    m = compute_metrics(te.labels, probs, cfg["threshold"])
    majority = np.bincount(te.labels).max() / len(te)
    assert m["accuracy"] > majority + 0.1, (m, majority)
