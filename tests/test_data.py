import gzip
import json

import numpy as np
import pytest

from singlepass.errors import SinglepassError
from singlepass.models.data import DATASETS, PARTITION_SEED, load_dataset, load_file, partition_rows


@pytest.mark.parametrize("name", list(DATASETS))
def test_shipped_datasets_load_with_label_names(name):
    spec = DATASETS[name]
    ds = load_dataset(name, spec.splits[-1], limit=50)
    assert len(ds) == 50 and ds.label_names == spec.label_names
    assert set(np.unique(ds.labels)) <= set(range(len(spec.label_names)))
    assert all(isinstance(t, str) and t.strip() for t in ds.texts)


def test_toxicchat_validation_is_stratified_disjoint_and_seeded():
    train, val = load_dataset("toxicchat", "train"), load_dataset("toxicchat", "validation")
    assert len(train) + len(val) == 5082
    assert not set(train.columns["row"]) & set(val.columns["row"])
    # stratified: toxic rate of the held-out 10% is within 1 point of train's 7.56%
    assert abs(val.labels.mean() - 384 / 5082) < 0.01
    assert load_dataset("toxicchat", "validation").texts == val.texts  # same split every time


def test_toxicchat_human_annotated_test_rows():
    ds = load_dataset("toxicchat", "test_human")
    assert len(ds) == 2853 and int(ds.labels.sum()) == 362  # the paper's test set


def test_official_validation_split_is_used_where_it_exists():
    assert len(load_dataset("sst2", "validation")) == 872


def test_data_dir_is_configurable(tmp_path, monkeypatch):
    monkeypatch.setenv("SINGLEPASS_DATA", str(tmp_path))
    with pytest.raises(SinglepassError, match="not found.*SINGLEPASS_DATA"):
        load_dataset("sst2", "validation")
    (tmp_path / "sst2").mkdir()
    with gzip.open(tmp_path / "sst2" / "validation.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": "fine", "label": 1}) + "\n")
    assert load_dataset("sst2", "validation").texts == ["fine"]


def test_data_folder_is_the_flag_then_the_environment_then_the_nearest_shared_data(tmp_path, monkeypatch):
    """--data-dir, else $SINGLEPASS_DATA, else the first shared/data beside the working directory
    or beside one of its parents (never a path derived from where the package is installed)."""
    from singlepass.models.data import data_dir, find_shared_data

    monkeypatch.delenv("SINGLEPASS_DATA", raising=False)
    work = tmp_path / "ci" / "clone" / "repo" / "tests"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    far = tmp_path / "ci" / "shared" / "data"  # beside ci/clone, a parent of the working directory
    far.mkdir(parents=True)
    assert data_dir() == far == find_shared_data()
    near = tmp_path / "ci" / "clone" / "shared" / "data"  # beside the checkout: nearer, so it wins
    near.mkdir(parents=True)
    assert data_dir() == near
    (tmp_path / "ci" / "clone" / "repo" / "shared").mkdir()  # shared/ without data/ is not a data folder
    assert data_dir() == near
    monkeypatch.setenv("SINGLEPASS_DATA", str(tmp_path / "env"))
    assert data_dir() == tmp_path / "env"
    assert data_dir(str(tmp_path / "flag")) == tmp_path / "flag"

    monkeypatch.delenv("SINGLEPASS_DATA")
    lonely = tmp_path / "elsewhere" / "checkout"
    lonely.mkdir(parents=True)
    monkeypatch.chdir(lonely)
    assert find_shared_data() is None
    with pytest.raises(SinglepassError, match=r"\$SINGLEPASS_DATA.*--data-dir"):
        load_dataset("sst2", "validation")
    assert load_file(write_jsonl(lonely / "own.jsonl", [{"text": "a", "label": 0}])).texts == ["a"]  # no folder needed


def test_unknown_dataset_and_split():
    with pytest.raises(SinglepassError, match="unknown dataset"):
        load_dataset("nope", "train")
    with pytest.raises(SinglepassError, match="no split 'dev'"):
        load_dataset("toxicchat", "dev")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_user_jsonl_and_csv(tmp_path):
    ds = load_file(write_jsonl(tmp_path / "a.jsonl", [{"text": "x", "label": "spam"}, {"text": "y", "label": "ham"}]))
    assert ds.label_names == ("ham", "spam") and ds.labels.tolist() == [1, 0]
    (tmp_path / "b.csv").write_text("text,label\nhello,0\nworld,1\n")
    ds = load_file(tmp_path / "b.csv")
    assert ds.texts == ["hello", "world"] and ds.labels.tolist() == [0, 1]


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"text": "ok", "label": 0}, {"txt": "no", "label": 1}], "row 2 has no 'text' column"),
        ([{"text": "ok", "label": 0}, {"text": 5, "label": 1}], "row 2: 'text' is int, not a string"),
        ([{"text": "  ", "label": 0}], "row 1: 'text' is empty"),
        ([{"text": "ok"}], "row 1 has no 'label' column"),
    ],
)
def test_bad_rows_name_file_and_row(tmp_path, rows, message):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(SinglepassError, match=message) as e:
        load_file(path)
    assert "bad.jsonl" in str(e.value)


def test_unknown_label_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "l.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": 7}])
    with pytest.raises(SinglepassError, match="row 2: unknown label 7"):
        load_file(path, label_names=("neg", "pos"))
    path = write_jsonl(tmp_path / "s.jsonl", [{"text": "a", "label": "maybe"}])
    with pytest.raises(SinglepassError, match="unknown label 'maybe'"):
        load_file(path, label_names=("neg", "pos"))


def test_missing_file_and_bad_json(tmp_path):
    with pytest.raises(SinglepassError, match="no such file"):
        load_file(tmp_path / "none.jsonl")
    (tmp_path / "x.jsonl").write_text('{"text": "a", "label": 0}\n{broken\n')
    with pytest.raises(SinglepassError, match="row 2 is not valid JSON"):
        load_file(tmp_path / "x.jsonl")


@pytest.mark.parametrize("name, total", [("advbench", 520), ("strongreject", 313), ("wildguardmix", 1699)])
def test_one_file_sets_are_carved_into_disjoint_seeded_parts(name, total):
    """advbench / strongreject: train, validation, test = 70/10/20% of the one file;
    wildguardmix: train 20% + validation 10% + test_untouched 70% of the official test file, the
    untouched part the same rows as when the first 30% was all validation."""
    from singlepass.models.data import DATASETS

    parts = {split: load_dataset(name, split) for split in DATASETS[name].partition}
    rows = [set(ds.columns["row"]) for ds in parts.values()]
    assert sum(map(len, rows)) == total == len(set().union(*rows))  # disjoint and complete
    for split, ds in parts.items():
        assert abs(len(ds) - DATASETS[name].partition[split] * total) <= 2
        assert load_dataset(name, split).texts == ds.texts  # the same split every time
    if name == "wildguardmix":
        assert len(load_dataset(name, "test")) == total  # the official file stays whole
        # the untouched part is the 70% a {validation: 0.3, test_untouched: 0.7} cut left untouched
        whole = load_dataset(name, "test")
        strata = whole.labels * 2 + np.asarray([bool(a) for a in whole.columns["adversarial"]], dtype=np.int64)
        before = partition_rows(strata, {"validation": 0.3, "test_untouched": 0.7}, PARTITION_SEED)
        assert parts["test_untouched"].columns["row"] == before["test_untouched"].tolist()
        for ds in parts.values():  # stratified by label and adversarial: within a point of the file's rates
            assert abs(ds.labels.mean() - 754 / 1699) < 0.01
            assert abs(np.mean([bool(a) for a in ds.columns["adversarial"]]) - 796 / 1699) < 0.01
    with pytest.raises(SinglepassError, match="no split 'test_untouched'"):
        load_dataset("toxicchat", "test_untouched")
