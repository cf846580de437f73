"""The accuracy table: cells, seed counts and target verdicts from stored runs (no training)."""

from singlepass.benchmarks.accuracy import render, targets


def run(dataset, method, seed, **evals):
    return {
        "dataset": dataset,
        "method": method,
        "seed": seed,
        "trainable_parameters": 577,
        "train_seconds": 1.0,
        "search_seconds": 2.0,
        "trials": 1,
        "best_epoch": 1,
        "params": {},
        "machine": "m",
        "hparams": {"lr": 1e-3, "batch_size": 32, "weight_decay": 0.0, "epochs": 2},
        "subsets": {"train_rows": 10, "validation_rows": 5},
        "command": "cmd",
        "eval": {k.replace("__", "/"): v for k, v in evals.items()},
    }


def tc(f1):
    return {"toxicchat__test_human": {"f1": f1, "auprc": 0.5}}


def test_targets_and_cells_follow_the_stored_runs():
    runs = [run("toxicchat", "pooling", s, **tc(0.40)) for s in range(3)]
    runs += [run("toxicchat", "gate", s, **tc(0.50 + 0.02 * s)) for s in range(3)]
    runs += [run("toxicchat", "mha", s, **tc(0.58)) for s in range(2)]
    runs += [run("toxicchat", "muli", s, **tc(0.55)) for s in range(3)]
    runs += [run("sst2", "gate", 0, sst2__test={"accuracy": 0.91})]
    out = targets(runs)
    assert out[0].startswith("- ToxicChat ordering") and ": met (40.0 < 52.0 < 58.0)" in out[0]
    assert "MHA ahead of MULI by >= 5 F1 points on ToxicChat: missed (+3.0)" in out[1]
    assert "SST-2 >= 90% for the best probe: met (best: gate 91.0%" in out[2]
    assert out[3].endswith("not run yet")
    table = render(runs, "cmd")
    assert "| gate | 577 | 52.0 ± 1.6 |" in table  # mean ± population std over 3 seeds
    assert "58.0 ± 0.0 (n=2)" in table  # fewer than 3 seeds is marked
    assert "| mean-final | — |" in table  # a method without runs is listed, not dropped
    for r in runs[3:6]:  # gate below pooling now
        r["eval"]["toxicchat/test_human"]["f1"] = 0.30
    assert ": missed" in targets(runs)[0]


def test_table_only_reproduces_the_committed_table(tmp_path, capsys):
    """accuracy.md is a function of the stored runs alone: --table-only over a copy of the
    committed runs writes the committed table into --out."""
    import shutil
    from pathlib import Path

    import pytest

    from singlepass.benchmarks.accuracy import load_runs, main, runs_dir

    results = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
    if not (results / "accuracy").is_dir() or not (results / "accuracy.md").is_file():
        pytest.skip("no committed accuracy results")
    pytest.importorskip("torch")  # `run` sets torch's thread count
    assert load_runs(runs_dir(results)), "the committed runs are found under RESULTS/accuracy"
    shutil.copytree(results / "accuracy", tmp_path / "accuracy")
    assert main(["--table-only", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "accuracy.md").read_text() == (results / "accuracy.md").read_text()
    assert f"wrote {tmp_path / 'accuracy.md'}" in capsys.readouterr().out
