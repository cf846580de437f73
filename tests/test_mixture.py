"""Mixture training data (models/mixture.py), the FPR-calibrated threshold and their CLI path.

Synthetic data folders (a few rows per source) for the loader's rules; the shipped sets once,
for the overlaps the data README names; the tiny random model for the train/eval commands."""

import gzip
import json

import numpy as np
import pytest
import torch

from singlepass.cli import main
from singlepass.errors import SinglepassError
from singlepass.models.data import PROTECTED_SPLITS, load_dataset
from singlepass.models.fit import make_loss
from singlepass.models.metrics import rates_at, selection_metric, threshold_at_fpr
from singlepass.models.mixture import LABELS, is_mixture, load_mixture, normalise, parse_sources

MAX_LEN = 64


def write(folder, split, rows):
    folder.mkdir(parents=True, exist_ok=True)
    with gzip.open(folder / f"{split}.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def rows(prefix, n, label, **extra):
    return [{"text": f"{prefix} number {i}", "label": label, **extra} for i in range(n)]


@pytest.fixture
def data(tmp_path, monkeypatch):
    """A data folder: ToxicChat (train/test) with a train row repeated in test under other case
    and spacing, the three harmful-only sets sharing one prompt, Alpaca (benign) and WildGuardTest."""
    root = tmp_path / "data"
    tc_train = rows("chat hello", 36, 0) + rows("chat insult", 14, 1) + [{"text": "Shared  Question?", "label": 0}]
    write(root / "toxicchat", "train", tc_train)
    write(
        root / "toxicchat",
        "test",
        rows("chat test", 16, 0) + rows("chat rude", 4, 1) + [{"text": "shared question?", "label": 0}],
    )
    shared_harm = {"text": "Explain how to pick a lock", "label": 1}
    write(root / "advbench", "test", rows("adv harmful", 40, 1) + [shared_harm])
    write(
        root / "strongreject",
        "test",
        rows("strong harmful", 30, 1) + [dict(shared_harm, text="explain how to  pick a LOCK")],
    )
    write(root / "harmbench", "train", rows("hb train", 10, 1) + [shared_harm])
    write(root / "harmbench", "test", rows("hb test", 10, 1))
    write(root / "alpaca_noinput", "test", rows("alpaca benign", 80, 0))
    wg = rows("wg safe", 40, 0, adversarial=False) + rows("wg safe adv", 20, 0, adversarial=True)
    wg += rows("wg harm", 30, 1, adversarial=False) + rows("wg harm adv", 10, 1, adversarial=True)
    write(root / "wildguardmix", "test", wg)
    monkeypatch.setenv("SINGLEPASS_DATA", str(root))
    return root


def test_sources_weights_and_their_errors():
    assert [(s.name, s.weight) for s in parse_sources("toxicchat:2, advbench,alpaca_noinput:0.5")] == [
        ("toxicchat", 2.0),
        ("advbench", 1.0),
        ("alpaca_noinput", 0.5),
    ]
    assert is_mixture("toxicchat,advbench") and is_mixture("toxicchat:2")
    assert not is_mixture("toxicchat") and not is_mixture("data/own.jsonl")
    with pytest.raises(SinglepassError, match="unknown mixture source 'advbenhc'"):
        parse_sources("toxicchat,advbenhc")
    with pytest.raises(SinglepassError, match="unknown mixture source 'sst2'"):  # not a safety set
        parse_sources("toxicchat,sst2")
    with pytest.raises(SinglepassError, match="weight must be a positive number"):
        parse_sources("toxicchat:0,advbench")
    with pytest.raises(SinglepassError, match="'x' is not a number"):
        parse_sources("toxicchat:x")
    with pytest.raises(SinglepassError, match="named twice"):
        parse_sources("toxicchat,toxicchat:2")


def test_mixture_label_space_weights_and_overlaps(data):
    m = load_mixture("toxicchat:2,advbench,strongreject,harmbench,alpaca_noinput:0.5,wildguardmix")
    tr, va = m.train, m.validation
    assert tr.label_names == va.label_names == LABELS and tr.task == "safety"
    src = np.asarray(tr.columns["mixture_source"])
    # one-sided sources keep their side; wildguardmix trains on its train part, never its untouched one
    assert set(tr.labels[src == "advbench"]) == {1} and set(tr.labels[src == "alpaca_noinput"]) == {0}
    assert set(np.asarray(tr.columns["mixture_split"])[src == "wildguardmix"]) == {"train"}
    assert "wildguardmix" in set(va.columns["mixture_source"])
    assert not set(tr.columns["mixture_split"]) & PROTECTED_SPLITS
    # weights: per row, mean 1, in the ratio given
    w = np.asarray(tr.columns["mixture_weight"])
    assert w.mean() == pytest.approx(1.0)
    assert w[src == "toxicchat"][0] / w[src == "advbench"][0] == pytest.approx(2.0)
    assert w[src == "alpaca_noinput"][0] / w[src == "advbench"][0] == pytest.approx(0.5)
    # overlaps on normalised text: the ToxicChat train row that is also a test row is gone; the
    # prompt the three harmful sets share is in training at most once, and never if held out
    keys = [normalise(t) for t in tr.texts]
    assert "shared question?" not in keys
    assert len(keys) == len(set(keys))
    held_out = {normalise(t) for t in va.texts}
    for name in ("toxicchat", "advbench", "strongreject", "harmbench", "alpaca_noinput"):
        held_out |= {normalise(t) for t in load_dataset(name, "test").texts}
    held_out |= {normalise(t) for t in load_dataset("wildguardmix", "test_untouched").texts}
    assert not set(keys) & held_out
    assert keys.count("explain how to pick a lock") == int("explain how to pick a lock" not in held_out)
    assert m.report["toxicchat"]["train_dropped_held_out"] >= 1
    # deterministic
    again = load_mixture("toxicchat:2,advbench,strongreject,harmbench,alpaca_noinput:0.5,wildguardmix")
    assert again.train.texts == tr.texts and again.validation.texts == va.texts


def test_per_source_limits_and_balanced_loss_of_weighted_rows(data):
    m = load_mixture("toxicchat,alpaca_noinput:3", limit=20, val_limit=5)
    src = np.asarray(m.train.columns["mixture_source"])
    assert (src == "toxicchat").sum() <= 20 and (src == "alpaca_noinput").sum() == 20
    assert 0 < m.train.labels[src == "toxicchat"].sum() < 20  # stratified: both classes kept
    # class balancing on the weighted totals: each class carries half of the loss weight
    y, w = m.train.labels, np.asarray(m.train.columns["mixture_weight"])
    loss = make_loss(2, y, "balanced", w)
    z = torch.zeros(len(y), 1)  # every row's BCE is log 2: the sum is the weighted class mass
    per_class = [float(loss(z[y == c], torch.as_tensor(y[y == c]), torch.as_tensor(w[y == c]).float())) for c in (0, 1)]
    assert per_class[0] == pytest.approx(per_class[1], rel=1e-5)
    # weights of 1 give exactly the unweighted loss
    z = torch.randn(len(y), 1)
    ones = make_loss(2, y, "balanced", np.ones(len(y)))
    plain = make_loss(2, y, "balanced")
    yt = torch.as_tensor(y)
    assert float(ones(z, yt, torch.ones(len(y)))) == pytest.approx(float(plain(z, yt)), rel=1e-6)


def test_balanced_limit_keeps_a_rare_class_whole(data):
    """--balance-classes: a capped source takes equal class shares, a rarer class whole (water-filling),
    seeded; validation keeps its proportions; the CLI records it."""
    from singlepass.models.data import Dataset, limit_rows

    y = np.array([1] * 10 + [0] * 90)
    ds = Dataset("toy", "train", [f"t{i}" for i in range(100)], y, ("safe", "unsafe"), "safety")
    for limit, want in ((40, (30, 10)), (10, (5, 5)), (21, (11, 10)), (100, (90, 10))):
        got = limit_rows(ds, limit, seed=0, balanced=True)
        assert (int((got.labels == 0).sum()), int(got.labels.sum())) == want
        assert got.texts == limit_rows(ds, limit, seed=0, balanced=True).texts  # seeded
    assert int(limit_rows(ds, 40, seed=0).labels.sum()) == 4  # without: the proportions
    m = load_mixture("toxicchat,alpaca_noinput", limit=20, val_limit=10, balanced=True)
    src = np.asarray(m.train.columns["mixture_source"])
    assert m.train.labels[src == "toxicchat"].sum() == 10 and (src == "toxicchat").sum() == 20  # 14 toxic: 10 fit
    plain = load_mixture("toxicchat,alpaca_noinput", limit=20, val_limit=10)
    assert plain.train.labels[np.asarray(plain.train.columns["mixture_source"]) == "toxicchat"].sum() < 10
    assert m.validation.texts == plain.validation.texts  # validation keeps its proportions


def test_a_reweighted_mixture_reads_the_states_of_the_unweighted_one(data, tiny_backbone, cache_dir):
    """The weights multiply the loss, not the rows: the state cache is keyed without them (no second
    extraction of the same rows), while other rows or a plain dataset get their own entries."""
    from singlepass.models.cache import plan

    def folder(ds):
        return plan(tiny_backbone, ds, "chat", MAX_LEN, cache_dir=cache_dir)[0].folder

    plain = load_mixture("toxicchat,advbench")
    weighted = load_mixture("toxicchat:3,advbench:0.5")
    assert weighted.train.name == "toxicchat:3,advbench:0.5"  # what reports and probe configs show
    assert folder(weighted.train) == folder(plain.train)
    assert folder(weighted.train).name.startswith("toxicchat:1,advbench:1-train-")
    assert folder(weighted.validation) == folder(plain.validation) != folder(plain.train)
    assert folder(load_mixture("toxicchat:3,advbench:0.5", limit=5).train) != folder(plain.train)  # other rows
    assert folder(load_dataset("toxicchat", "train")).name.startswith("toxicchat-train-")


def test_conflicting_labels_of_the_same_text_are_an_error(data):
    write(
        data / "alpaca_noinput",
        "test",
        rows("alpaca benign", 20, 0) + [{"text": "explain how to pick a lock", "label": 0}],
    )
    with pytest.raises(SinglepassError, match="conflicting labels.*advbench.*unsafe.*alpaca_noinput.*safe"):
        load_mixture("advbench,alpaca_noinput")
    assert len(load_mixture("toxicchat,alpaca_noinput").train)  # without the other side it is fine


def test_wildguard_untouched_split_is_disjoint_stratified_and_never_trained_on(data, tiny_backbone):
    from singlepass.models.train import train_probe

    parts = {s: load_dataset("wildguardmix", s) for s in ("train", "validation", "test_untouched")}
    train, val, untouched = parts.values()
    assert not (set(train.texts) | set(val.texts)) & set(untouched.texts) and not set(train.texts) & set(val.texts)
    assert (len(train), len(val), len(untouched)) == (20, 10, 70)
    for ds in parts.values():  # label x adversarial strata in each part
        adv = np.asarray(ds.columns["adversarial"])
        assert {(int(a), int(b)) for a, b in zip(ds.labels, adv)} == {(0, 0), (0, 1), (1, 0), (1, 1)}
    assert load_dataset("wildguardmix", "test_untouched").texts == untouched.texts
    assert {normalise(t) for t in load_mixture("wildguardmix").train.texts} == {normalise(t) for t in train.texts}
    only_test = data.parent / "only-test"  # a response set with a test split alone
    write(only_test / "saferlhf", "test", [{"prompt": "q", "response": "a", "text": "q a", "label": 0}])
    with pytest.raises(SinglepassError, match="no source has training rows"):
        load_mixture("saferlhf", str(only_test))
    # WildGuardTest prompts that another source also holds never train, even without wildguardmix
    copies = rows("wg safe", 10, 0)
    write(data / "toxicchat", "train", rows("chat hello", 30, 0) + rows("chat insult", 10, 1) + copies)
    train = {normalise(t) for t in load_mixture("toxicchat,advbench").train.texts}
    held = {normalise(t) for t in untouched.texts} & {normalise(r["text"]) for r in copies}
    assert held and not train & held
    with pytest.raises(SinglepassError, match="test_untouched is held out"):
        train_probe("gate", tiny_backbone, untouched, val, max_length=MAX_LEN, progress=False)


def test_shipped_mixture_removes_the_known_overlaps():
    """The data README: advbench and strongreject share 25 prompts; ToxicChat repeats 196 texts
    between train and test. None of them may reach training twice or from a held-out part."""
    m = load_mixture("toxicchat,advbench,harmbench,strongreject,alpaca_noinput,wildguardmix")
    keys = [normalise(t) for t in m.train.texts]
    assert len(keys) == len(set(keys))
    adv = {normalise(t) for split in ("train", "validation", "test") for t in load_dataset("advbench", split).texts}
    sr = {normalise(t) for split in ("train", "validation", "test") for t in load_dataset("strongreject", split).texts}
    assert len(adv & sr) == 25
    assert len(adv & sr & set(keys)) <= 25 and sum(k in adv & sr for k in keys) == len(adv & sr & set(keys))
    tc_test = {normalise(t) for t in load_dataset("toxicchat", "test").texts}
    held = {normalise(t) for t in m.validation.texts} | tc_test
    held |= {normalise(t) for t in load_dataset("wildguardmix", "test_untouched").texts}
    for name in ("advbench", "harmbench", "strongreject", "alpaca_noinput"):
        held |= {normalise(t) for t in load_dataset(name, "test").texts}
    assert not set(keys) & held
    assert m.report["toxicchat"]["train_dropped_held_out"] > 0 and m.report["strongreject"]["train_dropped_repeats"] > 0


def test_selection_is_the_mean_over_sources_with_accuracy_for_one_sided_ones():
    from sklearn.metrics import f1_score

    y = np.array([0, 0, 1, 1, 1, 1, 0, 0, 0])
    z = torch.tensor([[-1.0], [1.0], [1.0], [-1.0], [1.0], [1.0], [1.0], [-1.0], [-1.0]])
    groups = np.array(["tc"] * 4 + ["adv"] * 2 + ["alpaca"] * 3)
    pred = (z[:, 0] > 0).long().numpy()
    want = np.mean([f1_score(y[:4], pred[:4]), 1.0, 2 / 3])
    assert selection_metric("safety", y, z, groups) == pytest.approx(want)
    assert selection_metric("safety", y, z) == pytest.approx(f1_score(y, pred))


def test_threshold_at_fpr_is_the_roc_curve_point_with_the_most_tpr_under_the_target():
    from sklearn.metrics import roc_curve

    rng = np.random.default_rng(0)
    y = (rng.random(2000) < 0.3).astype(int)
    p = np.clip(0.25 * y + rng.random(2000) * 0.75, 0, 1).round(3)  # ties included
    for target in (0.01, 0.05, 0.2):
        t = threshold_at_fpr(y, p, target)
        fpr, tpr, thr = roc_curve(y, p, drop_intermediate=False)
        ok = fpr <= target
        assert t == thr[ok][-1]  # the last (lowest) ROC threshold within the target
        got = rates_at(y, p, t)
        assert got["fpr"] <= target and got["tpr"] == pytest.approx(tpr[ok].max())
        lower = p[p < t].max()  # the next distinct score below exceeds the target
        assert rates_at(y, p, lower)["fpr"] > target
    # a target no threshold meets admits nothing: just above the highest negative
    t0 = threshold_at_fpr(y, p, 0.0)
    assert t0 > p[y == 0].max() and rates_at(y, p, t0)["fpr"] == 0.0
    neg_only = threshold_at_fpr(np.zeros(200, int), np.linspace(0, 1, 200), 0.05)
    assert rates_at(np.zeros(200, int), np.linspace(0, 1, 200), neg_only)["fpr"] == pytest.approx(0.05)
    with pytest.raises(SinglepassError, match="needs negative rows"):
        threshold_at_fpr(np.ones(5, int), np.ones(5), 0.01)
    with pytest.raises(SinglepassError, match=r"must be in \[0, 1\)"):
        threshold_at_fpr(y, p, 1.5)


def test_scores_are_float64_probabilities_of_the_logits_so_confident_rows_stay_apart():
    """A confident probe's logits (the MHA's reach +-40) all read P = 1.0 in float32; the scores that
    metrics, thresholds and the runtime's labels use are float64, where a threshold separates them."""
    from singlepass.models.metrics import tpr_at_fpr
    from singlepass.models.probes import host_probabilities, probabilities
    from singlepass.runtime.contract import FusedProbe, class_probs
    from singlepass.runtime.passes import labels_from

    z = torch.tensor([[-40.0], [-3.0], [0.0], [18.0], [22.0], [26.0], [30.0]])  # float32 logits [N, 1]
    y = np.array([0, 0, 0, 0, 1, 1, 1])  # the confident negative at 18 sits below every positive
    p32 = probabilities(z)[:, 1].numpy()
    assert (p32[3:] == 1.0).all() and tpr_at_fpr(y, p32, 0.0) == 0.0  # tied with it: nothing separable
    p = host_probabilities(z)
    assert p.dtype == np.float64 and (np.diff(p[:, 1]) > 0).all()  # strictly increasing with the logit
    np.testing.assert_allclose(p, probabilities(z.double()).numpy(), rtol=0, atol=1e-15)
    assert tpr_at_fpr(y, p[:, 1], 0.0) == 1.0
    t = threshold_at_fpr(y, p[:, 1], 0.0)
    assert rates_at(y, p[:, 1], t) == {"fpr": 0.0, "tpr": 1.0, "negatives": 4, "positives": 3}
    multi = torch.tensor([[0.0, 30.0, -5.0], [1.0, 2.0, 3.0]])  # softmax classes, in float64 too
    np.testing.assert_allclose(class_probs(multi.numpy()), torch.softmax(multi.double(), -1).numpy(), atol=1e-15)
    # the runtime decides from the graph's logits output (float32, as the graph returns it), not its probs

    class OneProbe:
        def reading(self, reads):
            return [FusedProbe("safety", "mha", ("safe", "unsafe"), t, "hidden_states", outputs, "chat", 64)]

    outputs = {"logits": "safety/logits", "probs": "safety/probs"}
    out = {"safety/logits": z.numpy(), "safety/probs": probabilities(z).numpy()}
    labels = [row["safety"] for row in labels_from(OneProbe(), out)]
    assert [lab.label == "unsafe" for lab in labels] == [bool(v) for v in y]
    assert [lab.score for lab in labels] == p[:, 1].tolist()


def test_train_and_eval_a_mixture_with_a_calibrated_threshold(
    data, tiny_model_dir, tiny_backbone, cache_dir, tmp_path, capsys
):
    from cli_args import on_model

    from singlepass.models.probe_io import read_config

    out = tmp_path / "mix"
    argv = ["train", *on_model(tiny_model_dir, cache_dir), "--max-length", str(MAX_LEN), "--probe", "pooling"]
    argv += ["--dataset", "toxicchat,advbench:2,alpaca_noinput,wildguardmix", "--out", str(out)]
    argv += ["--trials", "1", "--epochs", "2", "--threshold-at-fpr", "0.05", "--no-progress", "--json"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "validation wildguardmix" in printed and "operating point fpr@0.05" in printed
    cfg = read_config(out)
    summary = json.loads(printed.strip().splitlines()[-1])
    assert summary["operating_points"] == cfg["operating_points"]
    assert summary["validation_by_source"] == cfg["validation_by_source"]
    assert cfg["label_names"] == list(LABELS) and cfg["operating_point"] == "fpr@0.05"
    points = cfg["operating_points"]
    assert set(points) == {"f1", "fpr@0.05"} and cfg["threshold"] == points["fpr@0.05"]["threshold"]
    assert points["fpr@0.05"]["fpr"] <= 0.05
    assert set(cfg["validation_by_source"]) == {"toxicchat", "advbench", "alpaca_noinput", "wildguardmix"}
    assert cfg["validation_by_source"]["alpaca_noinput"]["tpr_at_threshold"] is None  # no positives there
    assert "mean over sources" in cfg["training"]["selection_metric"]
    assert cfg["data"]["mixture"]["advbench"]["weight"] == 2.0
    # the weights reach the loss: the same rows with every weight 1 train another probe
    from singlepass.models.probe_io import load_probe
    from singlepass.models.train import train_probe

    m = load_mixture("toxicchat,advbench:2,alpaca_noinput,wildguardmix")
    m.train.columns["mixture_weight"] = [1.0] * len(m.train)
    kw = dict(max_length=MAX_LEN, trials=1, max_epochs=2, cache_dir=cache_dir, progress=False, log=lambda *a: None)
    unweighted, _ = train_probe("pooling", tiny_backbone, m.train, m.validation, **kw)
    saved, _ = load_probe(out)
    assert not torch.allclose(unweighted.head.weight, saved.head.weight)

    evaluate = ["eval", *on_model(tiny_model_dir, cache_dir), "--probe", str(out), "--json", "--no-progress"]
    assert main([*evaluate, "--dataset", "toxicchat,wildguardmix"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["sources"]["wildguardmix"]["split"] == "test_untouched"
    wg = rep["sources"]["wildguardmix"]["results"]["test_untouched"]
    untouched = load_dataset("wildguardmix", "test_untouched")
    assert wg["rows"] == len(untouched)
    assert set(wg["operating_points"]) == {"f1", "fpr@0.05"}
    assert wg["fpr_at_threshold"] == wg["operating_points"]["fpr@0.05"]["fpr"]


def test_export_carries_the_operating_points_to_the_runtime_policy(data, tiny_model_dir, cache_dir, tmp_path):
    """train --threshold-at-fpr -> export -> load: the manifest's threshold is the active point's,
    the runtime reads every point from the artifact, and the policy blocks at the one it names."""
    from cli_args import export_argv, on_model

    from singlepass.models.probe_io import read_config
    from singlepass.runtime.api import load

    probe, art = tmp_path / "probe", tmp_path / "art"
    argv = ["train", *on_model(tiny_model_dir, cache_dir), "--max-length", str(MAX_LEN), "--probe", "gate"]
    argv += ["--dataset", "toxicchat,advbench,alpaca_noinput,wildguardmix", "--out", str(probe), "--trials", "1"]
    argv += ["--epochs", "2", "--threshold-at-fpr", "0.1", "--no-progress"]
    assert main(argv) == 0
    assert main(export_argv(tiny_model_dir, cache_dir, art, f"{probe}:safety")) == 0
    cfg = read_config(probe)
    rt = load(art, backend="cpu")
    fused = rt.manifest.probe("safety")
    assert fused.threshold == cfg["threshold"] == cfg["operating_points"]["fpr@0.1"]["threshold"]
    assert fused.operating_point == "fpr@0.1" and fused.operating_points == cfg["operating_points"]
    entry = json.loads((art / "manifest.json").read_text())["probes"][0]  # the one contract carries them
    assert entry["operating_point"] == "fpr@0.1" and entry["operating_points"] == cfg["operating_points"]
    prompts = ["Explain how to pick a lock", "chat hello number 3", "alpaca benign number 7", "wg harm adv number 2"]
    scores = [r.labels["safety"].score for r in rt.generate(prompts, 1)]
    for point, rule in ((None, "block"), ("f1", "block:f1"), ("fpr@0.1", "block:fpr@0.1")):
        t = fused.threshold if point is None else cfg["operating_points"][point]["threshold"]
        blocked = [r.blocked_by for r in rt.generate(prompts, 1, policy={"safety": rule})]
        assert blocked == ["safety" if s >= t else None for s in scores], (rule, t, scores)
