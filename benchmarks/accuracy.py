"""Accuracy benchmark: the three probe families against MULI and two fixed-readout probes.

    python -m singlepass.benchmarks.accuracy [--datasets toxicchat sst2 emotion imdb]
        [--methods pooling gate mha muli last-token mean-final] [--seeds 0 1 2] [--trials 4]
    (or: singlepass bench accuracy ...)

For each dataset and method: a bounded hyperparameter search (``--trials`` configurations on
seed 0, selected on validation), then the selected configuration retrained with the other seeds;
every seed's probe is evaluated on the test split(s). ToxicChat probes are also evaluated on
WildGuardTest (out of distribution). Each finished (dataset, method, seed) is stored as JSON
under ``RESULTS/accuracy/`` and skipped on a rerun, so the benchmark resumes; the table
``RESULTS/accuracy.md`` is rewritten from every stored run after each one. ``RESULTS`` is
``--out DIR``, by default ``./benchmarks/results`` under the current directory (the committed
results, from the repository root). Probe artifacts go to ``$SINGLEPASS_CACHE/bench-probes``
(not the repository).

Subsets (fixed, seeded, stratified; documented in the table) keep the hidden-state caches within
a 2-core CPU machine's disk and time: see SUBSETS.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from singlepass.benchmarks.machine import torch_machine
from singlepass.benchmarks.outputs import add_out_arg, results_dir
from singlepass.files import atomic_write

METHOD_ORDER = ("pooling", "gate", "mha", "muli", "last-token", "mean-final")
HEAVY = ("gate", "mha")  # trained through the whole [L+1, B, T, d] tensor every step (CPU-bound)

# dataset -> (train limit, validation limit, [(test split, test limit)]); None = all rows.
SUBSETS = {
    "toxicchat": (None, None, [("test", 1000)]),  # test: also reports its human-annotated rows
    "sst2": (1000, 400, [("test", 500)]),
    "emotion": (2000, 500, [("test", 500)]),
    "imdb": (300, 100, [("test", 200)]),  # reviews average ~290 tokens: a small documented subset
}
OOD = {"toxicchat": [("wildguardmix", "test", 500)]}  # extra evaluations of the same probes


def runs_dir(results: Path) -> Path:
    """Where the stored runs live under a results folder: ``RESULTS/accuracy/<dataset>/``."""
    return results / "accuracy"


def table_path(results: Path) -> Path:
    return results / "accuracy.md"


def run_key(runs: Path, dataset: str, method: str, seed: int) -> Path:
    """The stored run of (dataset, method, seed) under ``runs`` (``runs_dir(RESULTS)``)."""
    return runs / dataset / f"{method}-seed{seed}.json"


def probe_dir(cache_root: Path, dataset: str, method: str, seed: int) -> Path:
    return cache_root / "bench-probes" / dataset / f"{method}-seed{seed}"


def trials_for(args, method: str) -> int:
    return args.trials_heavy if method in HEAVY else args.trials


def bench_tag(args, dataset: str, method: str, seed: int) -> dict:
    """What a stored probe must have been trained with to be reused."""
    from singlepass.models.train import RECIPE

    train_limit, val_limit, _ = SUBSETS[dataset]
    return {
        "recipe": RECIPE,
        "seed": seed,
        "first_seed": args.seeds[0],
        "trials": trials_for(args, method),
        "epochs": args.epochs,
        "train_limit": train_limit,
        "validation_limit": val_limit,
    }


def train_one(args, bb, dataset: str, method: str, seed: int, log) -> Path:
    """Train (search on the first seed, reuse its hyperparameters for the others) and save;
    an artifact already trained with the same settings is reused."""
    from singlepass.errors import SinglepassError
    from singlepass.models.data import load_dataset
    from singlepass.models.probe_io import read_config, save_probe
    from singlepass.models.search import HParams
    from singlepass.models.train import train_probe

    out = probe_dir(args.cache_root, dataset, method, seed)
    tag = bench_tag(args, dataset, method, seed)
    try:
        if read_config(out).get("bench") == tag:
            return out
    except SinglepassError:
        pass
    train_limit, val_limit, _ = SUBSETS[dataset]
    tr = load_dataset(dataset, "train", args.data_dir, limit=train_limit)
    va = load_dataset(dataset, "validation", args.data_dir, limit=val_limit)
    hparams = None
    if seed != args.seeds[0]:
        src = read_config(train_one(args, bb, dataset, method, args.seeds[0], log))
        hparams = HParams.from_dict({**src["hparams"], "params": src["params"]})
    log(f"=== train {dataset} / {method} / seed {seed}  ({time.strftime('%H:%M:%S')})")
    module, cfg = train_probe(
        method,
        bb,
        tr,
        va,
        seed=seed,
        trials=trials_for(args, method),
        max_epochs=args.epochs,
        hparams=hparams,
        cache_dir=args.cache_dir,
        progress=not args.no_progress,
        log=log,
    )
    cfg["data"].update({"limit": train_limit, "validation_limit": val_limit})
    cfg["bench"] = tag
    save_probe(out, module, cfg)
    return out


def run_one(args, bb, dataset: str, method: str, seed: int, log) -> dict:
    """Train (or reuse) the probe, then evaluate it on the test split(s) and OOD sets."""
    from singlepass.models.data import load_dataset
    from singlepass.models.evaluate import check_labels, predict_proba, report_subsets
    from singlepass.models.metrics import compute_metrics
    from singlepass.models.probe_io import load_probe

    train_limit, val_limit, tests = SUBSETS[dataset]
    out = train_one(args, bb, dataset, method, seed, log)
    log(f"=== eval {dataset} / {method} / seed {seed}  ({time.strftime('%H:%M:%S')})")
    module, cfg = load_probe(out, bb.fingerprint)  # evaluate exactly what was saved
    evals = {}
    for ds_name, split, limit in [(dataset, s, lim) for s, lim in tests] + OOD.get(dataset, []):
        ds = load_dataset(ds_name, split, args.data_dir, limit=limit)
        check_labels(cfg, ds)
        probs = predict_proba(module, cfg, bb, ds, args.cache_dir, progress=not args.no_progress, log=log)
        for name, idx in report_subsets(ds).items():
            evals[f"{ds_name}/{name}"] = compute_metrics(ds.labels[idx], probs[idx], cfg["threshold"])
            evals[f"{ds_name}/{name}"]["limit"] = limit
    return {
        "dataset": dataset,
        "method": method,
        "seed": seed,
        "probe": str(out),
        "trainable_parameters": cfg["trainable_parameters"],
        "params": cfg["params"],
        "hparams": cfg["hparams"],
        "threshold": cfg["threshold"],
        "train_seconds": cfg["training"]["seconds"],
        "search_seconds": cfg["training"]["search_seconds"],
        "trials": len(cfg["training"]["trials"]),
        "best_epoch": cfg["training"]["best_epoch"],
        "validation": cfg["validation"],
        "subsets": {
            "train": train_limit,
            "validation": val_limit,
            "train_rows": cfg["data"]["train_rows"],
            "validation_rows": cfg["data"]["validation_rows"],
        },
        "eval": evals,
        "machine": torch_machine(),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }


# --- the table ------------------------------------------------------------------------------------


def load_runs(runs: Path) -> list[dict]:
    """Every stored run under ``runs`` (``runs_dir(RESULTS)``), in path order."""
    return [json.loads(p.read_text()) for p in sorted(runs.glob("*/*.json"))]


def stat(vals, scale=100.0, digits=1) -> str:
    if not vals:
        return "—"
    a = np.asarray(vals, dtype=np.float64) * scale
    n = f" (n={len(a)})" if len(a) != 3 else ""
    return f"{a.mean():.{digits}f} ± {a.std(ddof=0):.{digits}f}{n}"


def values(runs, dataset, method, key, metric) -> list[float]:
    """One metric of every stored seed of (dataset, method) that has the eval ``key``."""
    rs = [r for r in runs if r["dataset"] == dataset and r["method"] == method and key in r["eval"]]
    return [v for v in (r["eval"][key].get(metric) for r in rs) if v is not None]


def cell(runs, dataset, method, key, metric, scale=100.0, digits=1) -> str:
    return stat(values(runs, dataset, method, key, metric), scale, digits)


COLUMNS = [  # (header, dataset the probe is trained on, eval key, metric, scale, digits)
    ("ToxicChat F1 (test, human-annotated rows)", "toxicchat", "toxicchat/test_human", "f1", 100, 1),
    ("ToxicChat AUPRC (test, human-annotated rows)", "toxicchat", "toxicchat/test_human", "auprc", 1, 3),
    ("ToxicChat F1 (test, all rows)", "toxicchat", "toxicchat/test", "f1", 100, 1),
    ("ToxicChat AUPRC (test, all rows)", "toxicchat", "toxicchat/test", "auprc", 1, 3),
    ("WildGuardTest F1 (OOD)", "toxicchat", "wildguardmix/test", "f1", 100, 1),
    ("SST-2 acc", "sst2", "sst2/test", "accuracy", 100, 1),
    ("Emotion acc", "emotion", "emotion/test", "accuracy", 100, 1),
    ("IMDB acc", "imdb", "imdb/test", "accuracy", 100, 1),
]
EXTRA = [
    ("ToxicChat F1 @ val. threshold (human)", "toxicchat", "toxicchat/test_human", "f1_at_threshold", 100, 1),
    ("ToxicChat TPR @ 1% FPR (human)", "toxicchat", "toxicchat/test_human", "tpr_at_0.01_fpr", 100, 1),
    ("ToxicChat TPR @ 0.1% FPR (human)", "toxicchat", "toxicchat/test_human", "tpr_at_0.001_fpr", 100, 1),
    ("ToxicChat ROC-AUC (human)", "toxicchat", "toxicchat/test_human", "roc_auc", 1, 3),
    ("WildGuardTest AUPRC", "toxicchat", "wildguardmix/test", "auprc", 1, 3),
    ("Emotion macro-F1", "emotion", "emotion/test", "macro_f1", 100, 1),
]


def mean_of(runs, dataset, method, key, metric):
    vals = values(runs, dataset, method, key, metric)
    return float(np.mean(vals)) * 100 if vals else None


def targets(runs: list[dict]) -> list[str]:
    """The issue's targets, judged from the stored runs (means over seeds)."""
    f1 = {m: mean_of(runs, "toxicchat", m, "toxicchat/test_human", "f1") for m in METHOD_ORDER}
    probes = ("pooling", "gate", "mha")

    def verdict(ok):
        return "not run yet" if ok is None else "met" if ok else "missed"

    order = None if any(f1[m] is None for m in probes) else f1["pooling"] < f1["gate"] < f1["mha"]
    out = [
        f"- ToxicChat ordering pooling < gate < MHA (F1, human-annotated rows): {verdict(order)}"
        + ("" if order is None else f" ({' < '.join(f'{f1[m]:.1f}' for m in probes)})")
    ]
    gap = None if f1["mha"] is None or f1["muli"] is None else f1["mha"] - f1["muli"]
    out.append(
        f"- MHA ahead of MULI by >= 5 F1 points on ToxicChat: {verdict(None if gap is None else gap >= 5)}"
        + ("" if gap is None else f" ({gap:+.1f})")
    )
    for ds, key, goal, name in (("sst2", "sst2/test", 90, "SST-2"), ("emotion", "emotion/test", 85, "Emotion")):
        accs = {m: mean_of(runs, ds, m, key, "accuracy") for m in probes}
        accs = {m: a for m, a in accs.items() if a is not None}
        best = max(accs.items(), key=lambda kv: kv[1]) if accs else None
        out.append(
            f"- {name} >= {goal}% for the best probe: {verdict(None if best is None else best[1] >= goal)}"
            + ("" if best is None else f" (best: {best[0]} {best[1]:.1f}%, of the probes run)")
        )
    return out


def render(runs: list[dict], command: str) -> str:
    methods = list(METHOD_ORDER)  # a method with no stored run shows as a row of `—`
    lines = ["# Accuracy: probes vs MULI and fixed-readout baselines (SmolLM2-135M)", ""]
    lines += [
        "Mean ± std (population) over seeds; F1 and accuracy in %, AUPRC in [0, 1]; F1 at 0.5. "
        "`(n=k)` marks a cell with k != 3 finished seeds; `—` = not run yet. Test sets are the seeded, "
        "stratified subsets listed under Data (ToxicChat: its human-annotated rows and all rows of the "
        "subset).",
        "",
    ]
    lines.append("| method | trainable params | " + " | ".join(c[0] for c in COLUMNS) + " | train time (s) |")
    lines.append("| --- | ---: | " + " | ".join("---:" for _ in COLUMNS) + " | ---: |")
    for m in methods:
        rs = [r for r in runs if r["method"] == m]
        tc = [r for r in rs if r["dataset"] == "toxicchat"] or rs
        params = sorted({r["trainable_parameters"] for r in tc})
        p = "—" if not params else f"{params[0]:,}" if len(params) == 1 else f"{params[0]:,}–{params[-1]:,}"
        t = stat([r["train_seconds"] for r in rs if r["dataset"] == "toxicchat"], 1, 0)
        lines.append(f"| {m} | {p} | " + " | ".join(cell(runs, c[1], m, *c[2:]) for c in COLUMNS) + f" | {t} |")
    lines += [
        "",
        "Trainable parameters: the ToxicChat probe (binary head). Train time: ToxicChat, the selected "
        "configuration's training run (early stopping included), per seed; the search is listed below.",
        "",
    ]
    lines.append("| method | " + " | ".join(c[0] for c in EXTRA) + " |")
    lines.append("| --- | " + " | ".join("---:" for _ in EXTRA) + " |")
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(cell(runs, c[1], m, *c[2:]) for c in EXTRA) + " |")
    lines += ["", "## Targets (SmolLM2-135M)", ""] + targets(runs)
    lines += [
        "",
        "## Selected configurations (first-seed search)",
        "",
        "| dataset | method | trials | search time (s) | lr | batch | weight decay | epochs (best) | params |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in sorted((r for r in runs if r["seed"] == 0), key=lambda r: (r["dataset"], METHOD_ORDER.index(r["method"]))):
        h = r["hparams"]
        prm = {k: v for k, v in r["params"].items() if k != "vocab_size"}
        lines.append(
            f"| {r['dataset']} | {r['method']} | {r['trials']} | {r['search_seconds']:.0f} | {h['lr']:.2e} | "
            f"{h['batch_size']} | {h['weight_decay']:.3f} | {h['epochs']} ({r['best_epoch']}) | "
            f"{json.dumps(prm) if prm else '—'} |"
        )
    lines += ["", "## Data", ""]
    for ds, (tl, vl, tests) in SUBSETS.items():
        rs = [r for r in runs if r["dataset"] == ds]
        rows = (
            f" ({rs[0]['subsets']['train_rows']} train / {rs[0]['subsets']['validation_rows']} validation rows)"
            if rs
            else ""
        )
        t = ", ".join(f"{s} {'all rows' if lim is None else f'{lim} rows'}" for s, lim in tests)
        lines.append(
            f"- {ds}: train {'all' if tl is None else tl}, validation {'all' if vl is None else vl}, {t}"
            f"{rows}; subsets are seeded (seed 0) and stratified."
        )
    lines.append(
        "- wildguardmix: test, "
        + ", ".join(f"{lim or 'all'} rows" for _, _, lim in OOD["toxicchat"])
        + ", scored by the ToxicChat probes (harmful read as toxic)."
    )
    lines += [
        "- Validation where a dataset has none: a stratified 10% of train (ToxicChat, IMDB).",
        "- Prompts (chat template) are capped at 512 tokens; extraction counts and logs the truncated ones "
        "(IMDB: 56 of the 300 training reviews; ToxicChat train: 18 of 4,573).",
        "",
        "## Reproduce",
        "",
        "The commands that produced the stored runs (each skips the runs already stored; "
        "`--table-only` redraws this file from them):",
        "",
        "```",
    ]
    lines += sorted({r.get("command") or command for r in runs} or {command}) + ["```", ""]
    machines = sorted({r["machine"] for r in runs})
    lines += ["Machine: " + ("; ".join(machines) if machines else torch_machine()), ""]
    return "\n".join(lines)


def write_table(results: Path, command: str) -> Path:
    """Rewrite ``RESULTS/accuracy.md`` from every stored run -> its path."""
    path = table_path(results)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, render(load_runs(runs_dir(results)), command))
    return path


# --- main ---------------------------------------------------------------------------------------------


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(
        prog="python -m singlepass.benchmarks.accuracy", description=__doc__.splitlines()[0]
    )
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--datasets", nargs="+", default=list(SUBSETS), choices=list(SUBSETS))
    p.add_argument("--methods", nargs="+", default=list(METHOD_ORDER), choices=list(METHOD_ORDER))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument(
        "--trials",
        type=int,
        default=4,
        help="search budget per (dataset, method) on the first seed (default: %(default)s)",
    )
    p.add_argument(
        "--trials-heavy",
        type=int,
        default=2,
        help="search budget for gate and MHA, which train on the full tensor (default: %(default)s)",
    )
    p.add_argument(
        "--phase",
        choices=["all", "train"],
        default="all",
        help="train: only train (and store) the probes; all: train or reuse, then evaluate",
    )
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: %(default)s)")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--data-dir", default=None)
    p.add_argument(
        "--drop-caches",
        action="store_true",
        help="delete the hidden-state caches this run created once a dataset is done (disk)",
    )
    add_out_arg(p)
    p.add_argument("--table-only", action="store_true", help="only rewrite the table from stored runs")
    p.add_argument("--no-progress", action="store_true")
    return p


def run(args: argparse.Namespace) -> int:
    import torch

    from singlepass.models.backbone import cache_root, load_backbone

    torch.set_num_threads(args.threads)
    command = (
        "python -m singlepass.benchmarks.accuracy " + " ".join(sys.argv[1:]) if args.command is None else args.command
    )
    results = results_dir(args.out)
    runs = runs_dir(results)
    if args.table_only:
        print(f"wrote {write_table(results, command)}")
        return 0
    args.cache_root = cache_root(args.cache_dir)
    args.cache_dir = Path(args.cache_dir) if args.cache_dir else None
    bb = load_backbone(args.model, args.cache_dir)
    states = args.cache_root / "states"
    for dataset in args.datasets:
        before = set(states.iterdir()) if states.is_dir() else set()
        for method in args.methods:
            for seed in args.seeds:
                key = run_key(runs, dataset, method, seed)
                if key.is_file():
                    continue
                log = lambda *a: print(*a, flush=True)  # noqa: E731
                if args.phase == "train":
                    train_one(args, bb, dataset, method, seed, log)
                    continue
                res = run_one(args, bb, dataset, method, seed, log)
                res["command"] = command
                key.parent.mkdir(parents=True, exist_ok=True)
                atomic_write(key, json.dumps(res, indent=1))
                ev = {
                    k: round(v.get("f1" if "toxic" in k or "wild" in k else "accuracy", 0), 4)
                    for k, v in res["eval"].items()
                }
                print(f"--- {dataset} / {method} / seed {seed}: {ev} (train {res['train_seconds']:.0f} s)", flush=True)
                write_table(results, command)
        if args.drop_caches and args.phase == "all" and states.is_dir():
            for folder in set(states.iterdir()) - before:
                shutil.rmtree(folder, ignore_errors=True)
                print(f"dropped cache {folder.name}")
    print(f"wrote {write_table(results, command)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.command = None
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
