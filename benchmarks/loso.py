"""Leave-one-source-out (LOSO) benchmark: safety probes on prompts from a source they never saw.

    singlepass bench loso [--sources toxicchat wildguardmix advbench harmbench strongreject alpaca_noinput]
        [--methods pooling pooling-topk gate mha mha-max muli guard] [--limit N] [--epochs 6] [--trials 4]
    (or: python -m singlepass.benchmarks.loso ...)

Folds. For every source S: train on the mixture of the other sources (models/mixture.py: one
safe/unsafe label space, overlaps removed) with every text of every part of S removed from the
training and validation rows (``load_mixture(exclude=(S,))``: e.g. the 25 prompts AdvBench shares
with StrongREJECT leave StrongREJECT's rows when AdvBench is held out), select on the other
sources' validation parts (mean over sources: ``selection_metric``), store the validation
threshold, and test on S's held-out part (WildGuardTest: ``test_untouched``, the 70% never used
for anything else). The in-distribution column is one more fold, ``in-distribution``: trained on
all the sources, tested on each source's held-out part. WildGuardTest trains on its ``train`` 20%
and selects on its ``validation`` 10% where it is not held out (earlier versions kept that 30% all
for validation, so WildGuardTest never trained; ``run_key`` tells the two apart).

Metrics, at the stored (validation, F1-optimal unless ``--threshold-at-fpr``) threshold, by the
kind of the test source (what the labels allow; nothing is computed that the data cannot define):

    mixed (toxicchat, wildguardmix)      F1, AUPRC, TPR at 1% FPR (plus FPR / TPR at the threshold)
    harmful only (advbench, harmbench,   recall (TPR) at the threshold; F1 would be 2r/(1+r) with
      strongreject)                      precision 1 by construction, AUPRC is 1 and TPR@FPR has no
                                         negatives: shown as "n/a"
    benign only (alpaca_noinput)         FPR at the threshold (lower is better); no positives: F1,
                                         AUPRC, TPR are n/a

The targets compare a "primary score" per source: F1 (mixed), recall (harmful only), 1 - FPR
(benign only), all in points.

Methods: the probe families (pooling, gate, MHA), ``pooling-topk`` (the pooling family with
MultiMax-style top-k token pooling on standardised inputs: models/probes.py), ``mha-max`` (MHA with
max instead of mean pooling over the tokens and over the layer summaries; MHA's inputs are
standardised per layer either way), MULI, and ``guard``:
the MiniLM classifier of benchmarks/guards.py fine-tuned on the same fold's rows (same weights,
same selection rule; cached under ``guards/minilm-mixture-<key>``). ``--source-weights
wildguardmix=2`` weighs a source's training rows in the loss as ``train --dataset`` weights do.

Data caps (documented in the table): alpaca_noinput is large (21,926 train / 3,132 validation /
6,265 test rows): its train and validation parts are subsampled to ``CAPS`` before overlaps are
removed, and its test part (like ToxicChat's, as in the accuracy benchmark) to ``TEST_CAPS``.
``--limit N`` caps every part of every source at N rows (quick runs).

Caching and resume: hidden states are extracted once per source part (the capped parts, then the
test parts) and each fold reads its rows out of them (``cache.StateView``: no second copy); each
(fold, method) probe is a normal probe artifact (config.json + model.safetensors) under
``$SINGLEPASS_CACHE/loso/<run key>/<fold>/<method>/`` with its evaluation beside it
(``<method>.json``); a rerun skips what is stored. ``RESULTS/loso.json`` and ``RESULTS/loso.md``
are rewritten after every finished (fold, method).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from singlepass.benchmarks.machine import torch_machine
from singlepass.benchmarks.outputs import add_out_arg, results_dir
from singlepass.files import atomic_write

SOURCES = ("toxicchat", "wildguardmix", "advbench", "harmbench", "strongreject", "alpaca_noinput")
# method -> (--probe family, constructor parameters), or None for the fine-tuned MiniLM guard
METHODS = {
    "pooling": ("pooling", {}),
    "pooling-topk": ("pooling", {"token_pool": "topk", "top_k": 4, "layer_pool": "mean", "input_norm": "standard"}),
    "gate": ("gate", {}),
    "mha": ("mha", {}),
    "mha-max": ("mha", {"pool": "max"}),
    "muli": ("muli", {}),
    "guard": None,
}
PROBES = ("pooling", "pooling-topk", "gate", "mha", "mha-max")  # what "the best probe" is chosen among
HEAVY = ("gate", "mha", "mha-max")  # trained through the whole [L+1, B, T, d] tensor every step
# Caps (seeded, stratified) on a source's train / validation parts, applied before overlaps are removed.
CAPS = {"alpaca_noinput": (2000, 300)}
TEST_CAPS = {"toxicchat": 1000, "alpaca_noinput": 1000}  # held-out test rows (seeded, stratified)
IN_DISTRIBUTION = "in-distribution"
# Test rows broken down by a column of the source's file: what a source-level number hides
# (ToxicChat's jailbreaks; HarmBench's copyright and contextual behaviours; WildGuardTest's
# adversarial prompts).
SLICES = {"toxicchat": "jailbreaking", "harmbench": "functional_category", "wildguardmix": "adversarial"}

# Seconds measured on this 2-core machine for the estimate printed before a run: per training row
# and epoch (gate, MHA, guard), per row and feature pass (pooling: one pass per distinct pooling
# configuration), per training row (MULI's fixed 500-epoch recipe), per evaluated row, and
# extraction tokens per second. MHA and the guard: the --limit 1000 run in loso.md (mixture rows,
# search and validation included); the rest: benchmarks/results/accuracy.md and latency.md
# (ToxicChat train: 4,573 rows, longer than the mixture's rows on average).
COST = {
    "gate": 0.019,
    "mha": 0.019,
    "guard": 0.022,
    "pooling_pass": 0.02,
    "muli": 0.04,
    "eval_states": 0.02,
    "eval_guard": 0.005,
    "extract_tokens_per_s": 800.0,
}
GUARD_EPOCHS = 3


@dataclass(frozen=True)
class Fold:
    name: str  # IN_DISTRIBUTION or the held-out source
    held_out: str | None
    train_sources: tuple[str, ...]
    test_sources: tuple[str, ...]
    weights: tuple[tuple[str, float], ...] = ()  # (source, loss weight) where not 1

    @property
    def mixture(self) -> str:
        """The ``--dataset`` mixture string (models/mixture.py), e.g. ``toxicchat,wildguardmix:2``."""
        w = dict(self.weights)
        return ",".join(f"{s}:{w[s]:g}" if s in w else s for s in self.train_sources)


def parse_weights(items: list[str] | None, sources) -> tuple[tuple[str, float], ...]:
    """``--source-weights wildguardmix=2 ...`` -> ((source, weight), ...), weights != 1 only. The
    weights are read as mixture weights (``models.mixture.parse_sources``: ``wildguardmix:2``)."""
    from singlepass.errors import SinglepassError
    from singlepass.models.mixture import parse_sources

    def bad(item: str, why: str = "") -> SinglepassError:
        return SinglepassError(
            f"--source-weights {item!r}: expected SOURCE=WEIGHT with one of the sources "
            f"({', '.join(sources)}) and a positive number" + (f" ({why})" if why else "")
        )

    as_mixture = []
    for item in items or ():
        name, sep, value = item.partition("=")
        if name not in sources or not sep or not value.strip():
            raise bad(item)
        as_mixture.append(f"{name}:{value}")
    try:
        parsed = parse_sources(",".join(as_mixture)) if as_mixture else []
    except SinglepassError as e:
        raise bad(" ".join(items), str(e)) from None
    return tuple(sorted((s.name, s.weight) for s in parsed if s.weight != 1))


def make_folds(
    sources: list[str] | tuple[str, ...], held_out: list[str] | None = None, weights: tuple = ()
) -> list[Fold]:
    """The in-distribution fold (train on all, test on each), then one fold per held-out source
    (``held_out``: a subset of ``sources``; default all of them; ``["none"]``: the in-distribution
    fold only). ``weights``: ``parse_weights``."""
    from singlepass.errors import SinglepassError

    sources = tuple(sources)
    if len(sources) < 2:
        raise SinglepassError("leave-one-source-out needs at least two sources")
    out = [Fold(IN_DISTRIBUTION, None, sources, sources, weights)]
    if held_out is not None and "none" in held_out:
        if len(held_out) > 1:
            raise SinglepassError("--held-out none runs the in-distribution fold only: give no source beside it")
        return out
    for s in held_out or sources:
        if s not in sources:
            raise SinglepassError(f"--held-out {s!r} is not one of the sources ({', '.join(sources)})")
        out.append(Fold(s, s, tuple(x for x in sources if x != s), (s,), tuple(w for w in weights if w[0] != s)))
    return out


def caps_for(limit: int | None) -> dict:
    """Per-source (train, validation) caps: CAPS, or ``limit`` for every source when it is smaller."""
    if limit is None:
        return dict(CAPS)
    return {s: tuple(limit if c is None else min(c, limit) for c in CAPS.get(s, (None, None))) for s in SOURCES}


def fold_data(fold: Fold, data_dir=None, limit: int | None = None, seed: int = 0, balance: bool = False):
    """-> the fold's Mixture (train and validation rows; ``fold.held_out``'s texts excluded).
    ``balance`` (``--balance-sources``): every training source weighs the same in the loss, whatever
    its row count (``load_mixture(equal_sources=True)``; the class balancing then acts on the weighted
    totals, models/fit.py). Natural proportions let the largest sources (ToxicChat, Alpaca: 1,000
    rows each under --limit 1000) set what "unsafe" looks like; HarmBench's 72 training rows barely
    count."""
    from singlepass.models.mixture import load_mixture

    return load_mixture(
        fold.mixture,
        data_dir,
        seed=seed,
        caps=caps_for(limit),
        exclude=(fold.held_out,) if fold.held_out else (),
        equal_sources=balance,
    )


def test_set(source: str, data_dir=None, limit: int | None = None):
    """A source's held-out test part (``test_untouched`` for WildGuardTest) under safe/unsafe."""
    from singlepass.models.data import load_dataset
    from singlepass.models.mixture import held_out_split, to_safety

    caps = [c for c in (TEST_CAPS.get(source), limit) if c is not None]
    return to_safety(load_dataset(source, held_out_split(source), data_dir, limit=min(caps) if caps else None))


def source_kind(labels: np.ndarray) -> str:
    """ "mixed", "harmful-only" or "benign-only" (from the labels present)."""
    present = set(np.unique(labels).tolist())
    return "mixed" if present == {0, 1} else "harmful-only" if present == {1} else "benign-only"


def source_metrics(y: np.ndarray, p: np.ndarray, threshold: float) -> dict:
    """What the test rows define, at the stored threshold; p = P(unsafe) [N]. Undefined metrics
    are None (shown as n/a), never a number the data cannot support. ``primary``: the score the
    targets compare (F1; recall for harmful-only sets; 1 - FPR for benign-only sets)."""
    from singlepass.models.metrics import compute_metrics

    y, p = np.asarray(y), np.asarray(p, dtype=np.float64)
    kind = source_kind(y)
    m = compute_metrics(y, np.stack([1 - p, p], 1), threshold)
    out = {
        "kind": kind,
        "rows": int(len(y)),
        "positives": int(y.sum()),
        "threshold": float(threshold),
        "f1": None,
        "auprc": None,
        "tpr_at_1pct_fpr": None,
        "roc_auc": None,
        "recall": m["tpr_at_threshold"],
        "fpr": m["fpr_at_threshold"],
    }
    if kind == "mixed":
        out.update(
            f1=m["f1_at_threshold"], auprc=m["auprc"], tpr_at_1pct_fpr=m["tpr_at_0.01_fpr"], roc_auc=m["roc_auc"]
        )
        out["primary"] = out["f1"]
    elif kind == "harmful-only":
        out["primary"] = out["recall"]
    else:
        out["primary"] = 1.0 - out["fpr"]
    return out


def slice_metrics(ds, p: np.ndarray, threshold: float) -> dict:
    """{"<column>=<value>": source_metrics of those rows} for the source's SLICES column, when its
    file has one ({} otherwise); p = P(unsafe) [N], aligned with ``ds``."""
    column = SLICES.get(ds.name)
    if column is None or column not in ds.columns:
        return {}
    values = np.asarray([str(v).lower() for v in ds.columns[column]])  # [N]
    return {
        f"{column}={v}": source_metrics(ds.labels[values == v], np.asarray(p)[values == v], threshold)
        for v in sorted(set(values.tolist()))
    }


# --- keys, paths, the estimate ----------------------------------------------------------------------


def run_key(args, bb_sha: str) -> str:
    from singlepass.models.data import WILDGUARD_PARTS
    from singlepass.models.train import RECIPE

    spec = {
        "sources": list(args.sources),
        "wildguard_parts": WILDGUARD_PARTS,  # runs before WildGuardTest had a train part had no such key
        "caps": caps_for(args.limit),
        "test_caps": TEST_CAPS,
        "limit": args.limit,
        "epochs": args.epochs,
        "trials": args.trials,
        "trials_heavy": args.trials_heavy,
        "seed": args.seed,
        "max_length": args.max_length,
        "threshold_at_fpr": args.threshold_at_fpr,
        "recipe": RECIPE,
        "backbone": bb_sha,
        **({"balance_sources": True} if args.balance_sources else {}),  # absent by default: earlier keys stand
        **({"source_weights": dict(args.weights)} if args.weights else {}),
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def trials_for(args, method: str) -> int:
    return args.trials_heavy if method in HEAVY else args.trials


def pools_needed(folds: list[Fold], data_dir, limit) -> dict:
    """{(source, split): Dataset} of the capped train / validation parts the folds read."""
    from singlepass.models.mixture import source_parts

    out = {}
    for s in dict.fromkeys(x for f in folds for x in f.train_sources):
        for part, ds in source_parts(s, data_dir, caps_for(limit)).items():
            if part != "test":
                out[(s, ds.split)] = ds
    return out


def estimate(args, folds, data, pools, tests, bb) -> dict:
    """Seconds per phase from COST: extraction of the caches not yet built, then each (fold,
    method) not yet stored (early stopping usually finishes sooner)."""
    from singlepass.models import cache as state_cache

    tokens = 0
    for ds in [*pools.values(), *tests.values()]:
        p, _ = state_cache.plan(bb, ds, "chat", args.max_length, cache_dir=args.cache_dir)
        if not ((p.folder / "meta.json").exists() and not (p.folder / "progress.json").exists()):
            tokens += p.n_tokens
    per = {"extract": tokens / COST["extract_tokens_per_s"]}
    for f in folds:
        m = data[f.name]
        n_tr, n_va = len(m.train), len(m.validation)
        n_test = sum(len(tests[s]) for s in f.test_sources)
        for method in args.methods:
            if result_path(args, f, method).is_file():
                continue
            t = trials_for(args, method)
            if method == "guard":
                s = COST["guard"] * n_tr * GUARD_EPOCHS + COST["eval_guard"] * (n_va * GUARD_EPOCHS + n_test)
            elif method in HEAVY:
                s = COST[METHODS[method][0]] * (n_tr + n_va / 2) * args.epochs * t + COST["eval_states"] * n_test
            elif method == "muli":
                s = COST["muli"] * n_tr + COST["eval_states"] * n_test
            else:  # pooling: one feature pass per distinct pooling configuration, the head is free
                passes = min(t, 4) if method == "pooling" else 1
                s = COST["pooling_pass"] * (n_tr + n_va) * passes + COST["eval_states"] * n_test
            per[method] = per.get(method, 0.0) + s
    return {"seconds": per, "total": sum(per.values()), "extract_tokens": tokens}


def fold_dir(args, fold: Fold) -> Path:
    return args.cache_root / "loso" / args.key / fold.name


def result_path(args, fold: Fold, method: str) -> Path:
    return fold_dir(args, fold) / f"{method}.json"


def stored_runs(args, sources: list[str]) -> list[dict]:
    """Every stored (fold, method) of this run key over these sources, whichever invocation (and
    --methods / --held-out) produced it, in fold then method order."""
    out = []
    for f in make_folds(sources):
        for method in METHODS:
            path = result_path(args, f, method)
            if path.is_file():
                out.append(json.loads(path.read_text()))
    return out


# --- one (fold, method) ---------------------------------------------------------------------------


def view_of(ds, pool_caches: dict, pools: dict):
    """The StateView of a mixture's rows over the per-part caches (rows matched by source, split, row)."""
    from singlepass.models.cache import StateView

    index = {
        key: {r: i for i, r in enumerate(pool.columns["row"])} for key, pool in pools.items()
    }  # (source, split) -> {file row: pool row}
    segments: list[tuple] = []
    for src, split, row in zip(ds.columns["mixture_source"], ds.columns["mixture_split"], ds.columns["row"]):
        key = (src, split)
        if segments and segments[-1][0] == key:
            segments[-1][1].append(index[key][row])
        else:
            segments.append((key, [index[key][row]]))
    return StateView([(pool_caches[key], np.asarray(rows)) for key, rows in segments])


def train_probe_fold(args, bb, fold, method, m, pool_caches, pools, log):
    """Train (or reuse) the fold's probe artifact -> (module, cfg)."""
    from singlepass.errors import SinglepassError
    from singlepass.models.cache import texts_digest
    from singlepass.models.probe_io import load_probe, read_config, save_probe
    from singlepass.models.train import RECIPE, train_probe

    family, params = METHODS[method]
    out = fold_dir(args, fold) / method
    tag = {
        "recipe": RECIPE,
        "fold": fold.name,
        "mixture": fold.mixture,
        "trials": trials_for(args, method),
        "epochs": args.epochs,
        "params": params,
        "rows": texts_digest(m.train.texts + m.validation.texts, np.concatenate([m.train.labels, m.validation.labels])),
    }
    try:
        if read_config(out).get("bench") == tag:
            return load_probe(out, bb.fingerprint)
    except SinglepassError:
        pass
    module, cfg = train_probe(
        family,
        bb,
        m.train,
        m.validation,
        max_length=args.max_length,
        seed=args.seed,
        trials=trials_for(args, method),
        max_epochs=args.epochs,
        overrides=params,
        cache_dir=args.cache_dir,
        progress=not args.no_progress,
        log=log,
        threshold_fpr=args.threshold_at_fpr,
        sources=(view_of(m.train, pool_caches, pools), view_of(m.validation, pool_caches, pools)),
    )
    cfg["data"]["mixture"] = m.report
    cfg["bench"] = tag
    save_probe(out, module, cfg)
    return load_probe(out, bb.fingerprint)  # evaluate exactly what was saved


def guard_scores(args, fold, m, tests, log) -> tuple[dict, dict]:
    """Train (or reuse) the fold's MiniLM guard; -> (its config, {source: P(unsafe) [N]})."""
    from singlepass.benchmarks.guards import ClassifierGuard, ensure_mixture_classifier, score_in_batches

    spec = {
        "mixture": fold.mixture,
        "exclude": [fold.held_out] if fold.held_out else [],
        "caps": {k: list(v) for k, v in caps_for(args.limit).items()},
        "seed": args.seed,
    }
    folder = ensure_mixture_classifier(m.train, m.validation, spec, args.cache_dir, args.threads, log)
    guard = ClassifierGuard(folder)
    return guard.cfg, {s: score_in_batches(guard.score, tests[s].texts, 16) for s in fold.test_sources}


def run_one(args, bb, fold, method, m, pool_caches, pools, tests, log) -> dict:
    from singlepass.models.evaluate import predict_proba

    t0 = time.perf_counter()
    if method == "guard":
        cfg, scores = guard_scores(args, fold, m, tests, log)
        threshold = cfg["threshold"]
        info = {
            "parameters": cfg["parameters"],
            "train_seconds": cfg["training"]["seconds"],
            "best_epoch": cfg["training"]["best_epoch"],
            "guard": cfg["name"],
        }
    else:
        module, cfg = train_probe_fold(args, bb, fold, method, m, pool_caches, pools, log)
        threshold = cfg["threshold"]
        scores = {
            s: predict_proba(module, cfg, bb, tests[s], args.cache_dir, progress=not args.no_progress, log=log)[:, 1]
            for s in fold.test_sources
        }
        info = {
            "parameters": cfg["trainable_parameters"],
            "params": {k: v for k, v in cfg["params"].items() if k != "vocab_size"},
            "hparams": cfg["hparams"],
            "train_seconds": cfg["training"]["seconds"],
            "search_seconds": cfg["training"]["search_seconds"],
            "best_epoch": cfg["training"]["best_epoch"],
            "validation_by_source": cfg.get("validation_by_source"),
            "probe": str(fold_dir(args, fold) / method),
        }
    return {
        "fold": fold.name,
        "held_out": fold.held_out,
        "method": method,
        "threshold": threshold,
        "train_rows": len(m.train),
        "validation_rows": len(m.validation),
        "train_sources": list(fold.train_sources),
        "mixture": m.report,
        **info,
        "tests": {
            s: {
                "split": tests[s].split,
                **source_metrics(tests[s].labels, scores[s], threshold),
                "slices": slice_metrics(tests[s], scores[s], threshold),
            }
            for s in fold.test_sources
        },
        "seconds": round(time.perf_counter() - t0, 1),
        "machine": torch_machine(),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }


# --- the table -------------------------------------------------------------------------------------


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}"


def result_of(runs, fold: str, method: str, source: str) -> dict | None:
    for r in runs:
        if r["fold"] == fold and r["method"] == method and source in r["tests"]:
            return r["tests"][source]
    return None


PRIMARY = {"mixed": "F1", "harmful-only": "recall", "benign-only": "FPR"}


def primary_cell(t: dict | None) -> str:
    if t is None:
        return "—"
    return _pct(t["fpr"]) if t["kind"] == "benign-only" else _pct(t["primary"])


def targets(runs, sources, methods) -> list[str]:
    """The issue's targets, judged from the stored runs (primary scores, in points)."""

    def prim(fold, method, s):
        t = result_of(runs, fold, method, s)
        return None if t is None else 100 * t["primary"]

    probes = [p for p in PROBES if p in methods]
    means = {}
    for p in probes:
        vals = [prim(s, p, s) for s in sources]
        if all(v is not None for v in vals):
            means[p] = float(np.mean(vals))
    if not means:
        return ["- not judged yet: no probe has a leave-one-source-out result on every source"]
    best = max(means, key=means.get)
    out = [
        f"- best probe (highest mean leave-one-source-out primary score over the sources): **{best}** "
        f"({means[best]:.1f}; " + ", ".join(f"{p} {v:.1f}" for p, v in means.items()) + ")"
    ]
    gaps, misses = [], []
    for s in sources:
        lo, ind = prim(s, best, s), prim(IN_DISTRIBUTION, best, s)
        if lo is None or ind is None:
            gaps.append(f"{s} not run")
            continue
        gaps.append(f"{s} {lo - ind:+.1f}")
        if ind - lo > 10:
            misses.append(s)
    done = all("not run" not in g for g in gaps)
    out.append(
        "- LOSO within 10 points of in-distribution on every source: "
        + ("not judged yet" if not done else "met" if not misses else f"missed on {', '.join(misses)}")
        + f" (LOSO - in-distribution: {'; '.join(gaps)})"
    )
    wins, total, detail = 0, 0, []
    for s in sources:
        a, g = prim(s, best, s), prim(s, "guard", s)
        if a is None or g is None:
            continue
        total += 1
        wins += a >= g
        detail.append(f"{s} {a:.1f} vs {g:.1f}")
    out.append(
        "- LOSO at or above the MiniLM guard's on most sources: "
        + (
            "not judged yet (no guard runs)"
            if not total
            else f"{'met' if wins > total / 2 else 'missed'} ({wins} of {total}: {'; '.join(detail)})"
        )
    )
    if "wildguardmix" in sources:
        ind = result_of(runs, IN_DISTRIBUTION, best, "wildguardmix")
        lo = result_of(runs, "wildguardmix", best, "wildguardmix")
        verdict = "not judged yet" if ind is None else "met" if ind["f1"] * 100 >= 75 else "missed"
        out.append(
            f"- WildGuardTest untouched part, best probe F1 >= 75: {verdict} (mixture-trained, in-distribution "
            f"fold: {_pct(ind and ind['f1'])}; WildGuardTest held out entirely: {_pct(lo and lo['f1'])}; "
            "the in-distribution fold trains on its train part and selects on its validation part)"
        )
    return out


def render(doc: dict) -> str:
    runs, sources, methods = doc["runs"], doc["sources"], doc["methods"]
    kinds = {s: next((t["kind"] for r in runs for x, t in r["tests"].items() if x == s), None) for s in sources}
    lines = ["# Leave-one-source-out: safety probes on sources they never saw (SmolLM2-135M)", ""]
    lines += [
        "Each cell: **leave-one-source-out / in-distribution**, in %, at the threshold stored from validation. "
        "LOSO: trained on the other sources, every text of the held-out source removed from training and "
        "validation; in-distribution: trained on all the sources. The metric depends on what the source's "
        "labels define: F1 for mixed sets, recall (TPR) for harmful-only sets, FPR for the benign-only set "
        "(lower is better). `—` = not run yet.",
        "",
    ]
    head = [f"{s} ({PRIMARY.get(kinds[s], '?')})" for s in sources]
    lines.append("| method | " + " | ".join(head) + " |")
    lines.append("| --- | " + " | ".join("---:" for _ in sources) + " |")
    for m in methods:
        cells = [
            f"{primary_cell(result_of(runs, s, m, s))} / {primary_cell(result_of(runs, IN_DISTRIBUTION, m, s))}"
            for s in sources
        ]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "## Targets", ""] + targets(runs, sources, methods)
    lines += [
        "",
        "## Every defined metric",
        "",
        "n/a: not defined by the labels (harmful-only sets have no negatives, so no FPR, TPR at 1% FPR or "
        "meaningful AUPRC/F1; the benign-only set has no positives).",
        "",
        "| test source (kind, rows) | method | fold | F1 | AUPRC | TPR @ 1% FPR | recall @ thr. | FPR @ thr. | thr. |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for s in sources:
        for m in methods:
            for fold in (s, IN_DISTRIBUTION):
                t = result_of(runs, fold, m, s)
                if t is None:
                    continue
                auprc = "n/a" if t["auprc"] is None else f"{t['auprc']:.3f}"
                lines.append(
                    f"| {s} ({t['kind']}, {t['rows']}) | {m} | {'LOSO' if fold == s else 'in-dist.'} | "
                    f"{_pct(t['f1'])} | {auprc} | "
                    f"{_pct(t['tpr_at_1pct_fpr'])} | {_pct(t['recall'])} | {_pct(t['fpr'])} | {t['threshold']:.3f} |"
                )
    lines += by_slice(runs, sources, methods)
    lines += [
        "",
        "## Runs",
        "",
        "| fold | method | train rows | validation rows | params | train time (s) | configuration |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    order = {f: i for i, f in enumerate([IN_DISTRIBUTION, *sources])}
    for r in sorted(runs, key=lambda r: (order.get(r["fold"], 99), methods.index(r["method"]))):
        conf = (
            json.dumps(r.get("params")) if r.get("params") else ("MiniLM fine-tune" if r["method"] == "guard" else "—")
        )
        lines.append(
            f"| {r['fold']} | {r['method']} | {r['train_rows']} | {r['validation_rows']} | {r['parameters']:,} | "
            f"{r['train_seconds']:.0f} | {conf} |"
        )
    lines += ["", "## Data", ""]
    caps = doc["caps"]
    lines.append(
        "- Sources: "
        + ", ".join(f"{s} ({kinds[s] or '?'})" for s in sources)
        + "; labels mapped to safe/unsafe (models/mixture.py), overlaps removed on normalised text."
    )
    lines.append(
        "- Caps (seeded, stratified; train / validation parts before overlap removal): "
        + (", ".join(f"{s} {c[0]} / {c[1]}" for s, c in caps.items()) or "none")
        + "; test parts: "
        + ", ".join(f"{s} {c}" for s, c in doc["test_caps"].items())
        + (f"; every part at most {doc['limit']} rows (--limit)" if doc.get("limit") else "")
        + "."
    )
    lines.append(
        "- WildGuardTest: `train` (20%) trains, `validation` (10%) selects, `test_untouched` (70%) is only "
        "tested. Selection: validation F1 at 0.5, the mean over the fold's sources (accuracy for "
        "one-sided ones); threshold: F1-optimal on the pooled validation rows"
        + (f" (here: FPR {doc['threshold_at_fpr']:g} on validation)" if doc.get("threshold_at_fpr") else "")
        + "."
    )
    lines.append(
        "- Source weights: "
        + (
            "balanced (`--balance-sources`: every training source weighs the same in the loss)"
            if doc.get("balance_sources")
            else "natural proportions (every training row weighs the same)"
        )
        + "".join(f"; {k} rows x{v:g} (`--source-weights`)" for k, v in (doc.get("source_weights") or {}).items())
        + "; the loss is class-balanced on the weighted totals."
    )
    commands = sorted({r.get("command") or doc["command"] for r in runs} or {doc["command"]})
    machines = sorted({r["machine"] for r in runs} or {torch_machine()})
    lines += ["", "## Reproduce", "", "The commands that produced the stored runs (a rerun skips them):", ""]
    lines += ["```", *commands, "```", "", "Machine: " + "; ".join(machines), ""]
    return "\n".join(lines)


def by_slice(runs, sources, methods) -> list[str]:
    """The "By slice" section: each SLICES source's rows by the column's value (runs stored before
    slices were recorded have none and are skipped)."""
    rows = []
    for s in sources:
        for m in methods:
            for fold in (s, IN_DISTRIBUTION):
                t = result_of(runs, fold, m, s)
                for name, x in ((t or {}).get("slices") or {}).items():
                    rows.append(
                        f"| {s} | {name} ({x['kind']}, {x['rows']}) | {m} | {'LOSO' if fold == s else 'in-dist.'} | "
                        f"{PRIMARY[x['kind']]} {primary_cell(x)} | {_pct(x['recall'])} | {_pct(x['fpr'])} |"
                    )
    if not rows:
        return []
    head = [
        "",
        "## By slice",
        "",
        "The held-out rows of " + ", ".join(f"{s} by `{c}`" for s, c in SLICES.items() if s in sources) + ", at the "
        "stored threshold (ToxicChat's `jailbreaking` flag marks jailbreak attempts; HarmBench's `copyright` "
        "behaviours ask for song lyrics or book passages, its `contextual` ones carry a context paragraph).",
        "",
        "| source | slice (kind, rows) | method | fold | primary | recall @ thr. | FPR @ thr. |",
        "| --- | --- | --- | --- | ---: | ---: | ---: |",
    ]
    return head + rows


def write_results(results: Path, doc: dict) -> Path:
    results.mkdir(parents=True, exist_ok=True)
    atomic_write(results / "loso.json", json.dumps(doc, indent=1))
    atomic_write(results / "loso.md", render(doc))
    return results / "loso.md"


# --- main ------------------------------------------------------------------------------------------


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="python -m singlepass.benchmarks.loso", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--sources", nargs="+", default=list(SOURCES), choices=list(SOURCES))
    p.add_argument(
        "--held-out",
        nargs="+",
        default=None,
        help="only these leave-one-out folds (default: every source); `none`: the in-distribution fold only",
    )
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--limit", type=int, default=None, help="at most N rows per part of every source (quick runs)")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--trials", type=int, default=4, help="search budget of pooling (default: %(default)s)")
    p.add_argument("--trials-heavy", type=int, default=1, help="search budget of gate and MHA (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument(
        "--threshold-at-fpr", type=float, default=None, help="store the validation threshold at this FPR instead"
    )
    p.add_argument(
        "--balance-sources",
        action="store_true",
        help="weigh every training source the same in the loss (default: natural proportions)",
    )
    p.add_argument(
        "--source-weights",
        nargs="+",
        metavar="SOURCE=WEIGHT",
        help="loss weight of a training source (as `train --dataset toxicchat:2`; default 1 each)",
    )
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: %(default)s)")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--data-dir", default=None)
    add_out_arg(p)
    p.add_argument("--estimate-only", action="store_true", help="print the time estimate and stop")
    p.add_argument("--table-only", action="store_true", help="only rewrite loso.md from loso.json")
    p.add_argument("--no-progress", action="store_true")
    return p


def _fmt(s: float) -> str:
    return f"{s / 3600:.1f} h" if s >= 5400 else f"{s / 60:.0f} min"


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from singlepass.models import cache as state_cache
    from singlepass.models.backbone import cache_root, load_backbone

    command = "python -m singlepass.benchmarks.loso " + " ".join(sys.argv[1:]) if args.command is None else args.command
    results = results_dir(args.out)
    if args.table_only:
        doc = json.loads((results / "loso.json").read_text())
        print(f"wrote {write_results(results, doc)}")
        return 0
    torch.set_num_threads(args.threads)
    log = lambda *a: print(*a, flush=True)  # noqa: E731
    args.cache_root = cache_root(args.cache_dir)
    args.cache_dir = Path(args.cache_dir) if args.cache_dir else None
    sources = [s for s in SOURCES if s in args.sources]
    methods = [m for m in METHODS if m in args.methods]
    args.methods = methods
    args.weights = parse_weights(args.source_weights, sources)
    folds = make_folds(sources, args.held_out, args.weights)
    bb = load_backbone(args.model, args.cache_dir)
    args.key = run_key(args, bb.fingerprint["sha256"])
    data = {f.name: fold_data(f, args.data_dir, args.limit, args.seed, args.balance_sources) for f in folds}
    pools = pools_needed(folds, args.data_dir, args.limit)
    tests = {s: test_set(s, args.data_dir, args.limit) for s in sources}
    est = estimate(args, folds, data, pools, tests, bb)
    log(
        f"leave-one-source-out: {len(folds)} folds ({', '.join(f.name for f in folds)}) x {len(methods)} methods; "
        f"run key {args.key}"
    )
    for f in folds:
        log(f"  {f.name}: train {len(data[f.name].train)} rows, validation {len(data[f.name].validation)} rows")
    log(
        f"estimated time (this 2-core machine, {args.epochs} epochs): {_fmt(est['total'])} in all: "
        + ", ".join(f"{k} {_fmt(v)}" for k, v in est["seconds"].items())
        + f" ({est['extract_tokens']:,} tokens to extract)"
    )
    if args.estimate_only:
        return 0
    doc = {
        "command": command,
        "sources": sources,
        "methods": methods,
        "key": args.key,
        "limit": args.limit,
        "caps": {k: list(v) for k, v in caps_for(args.limit).items() if k in sources and v != (None, None)},
        "test_caps": {k: v for k, v in TEST_CAPS.items() if k in sources},
        "threshold_at_fpr": args.threshold_at_fpr,
        "balance_sources": args.balance_sources,
        "source_weights": dict(args.weights),
        "estimate_seconds": round(est["total"]),
        "runs": [],
    }
    log("== extract: hidden states of every source part the folds read, and of the test parts")
    pool_caches = {}
    for key, ds in tqdm(list(pools.items()), desc="caches", disable=args.no_progress):
        pool_caches[key] = state_cache.build(
            bb, ds, "chat", args.max_length, cache_dir=args.cache_dir, progress=not args.no_progress, log=log
        )
    if any(m != "guard" for m in methods):
        for s in sources:
            state_cache.build(
                bb, tests[s], "chat", args.max_length, cache_dir=args.cache_dir, progress=not args.no_progress, log=log
            )
    units = [(f, m) for f in folds for m in methods]
    bar = tqdm(units, desc="folds x methods", unit="run", disable=args.no_progress)
    for f, method in bar:
        bar.set_postfix(fold=f.name, method=method)
        path = result_path(args, f, method)
        if not path.is_file():
            log(f"=== {f.name} / {method}  ({time.strftime('%H:%M:%S')})")
            res = run_one(args, bb, f, method, data[f.name], pool_caches, pools, tests, log)
            res["command"] = command
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, json.dumps(res, indent=1))
            summary = {
                s: None if t["primary"] is None else round(100 * t["primary"], 1) for s, t in res["tests"].items()
            }
            log(f"--- {f.name} / {method}: primary score {summary} ({res['seconds']:.0f} s)")
        doc["runs"] = stored_runs(args, sources)
        doc["methods"] = [m for m in METHODS if any(r["method"] == m for r in doc["runs"])]
        write_results(results, doc)
    print(f"wrote {write_results(results, doc)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.command = None if argv is None else "python -m singlepass.benchmarks.loso " + " ".join(argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
