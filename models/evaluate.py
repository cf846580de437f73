"""Evaluate a probe artifact on a dataset split with scikit-learn's metrics.

Binary tasks: accuracy and F1 of the positive class at 0.5 and at the probe's validation
threshold, AUPRC (average precision), ROC-AUC, and TPR at 1% and 0.1% FPR. Multi-class:
accuracy, macro-F1, macro one-vs-rest AUPRC and ROC-AUC. ToxicChat's test split is reported
twice: all rows and the human-annotated rows (``test_human``, the paper's number).
"""

from __future__ import annotations

import numpy as np
import torch

from singlepass.errors import SinglepassError

FPR_TARGETS = (0.01, 0.001)


def tpr_at_fpr(y: np.ndarray, score: np.ndarray, target: float) -> float | None:
    """Highest TPR reachable with FPR <= target (ROC curve with every threshold kept)."""
    from sklearn.metrics import roc_curve

    if len(np.unique(y)) < 2:
        return None
    fpr, tpr, _ = roc_curve(y, score, drop_intermediate=False)
    return float(tpr[fpr <= target].max())


def compute_metrics(y: np.ndarray, probs: np.ndarray, threshold: float | None = None) -> dict:
    """y [N] class indices, probs [N, C] class probabilities -> metrics dict (floats or None)."""
    from sklearn.metrics import (accuracy_score, average_precision_score, f1_score, precision_score,
                                 recall_score, roc_auc_score)
    from sklearn.preprocessing import label_binarize

    y = np.asarray(y)
    probs = np.asarray(probs, dtype=np.float64)
    C = probs.shape[1]
    both = len(np.unique(y)) > 1
    out = {"rows": int(len(y)), "accuracy": float(accuracy_score(y, probs.argmax(1)))}
    if C == 2:
        s = probs[:, 1]
        pred = (s >= 0.5).astype(int)
        out.update({
            "positives": int(y.sum()),
            "f1": float(f1_score(y, pred, zero_division=0)),
            "precision": float(precision_score(y, pred, zero_division=0)),
            "recall": float(recall_score(y, pred, zero_division=0)),
            "auprc": float(average_precision_score(y, s)) if y.sum() else None,
            "roc_auc": float(roc_auc_score(y, s)) if both else None,
        })
        out["accuracy"] = float(accuracy_score(y, pred))
        for t in FPR_TARGETS:
            out[f"tpr_at_{t:g}_fpr"] = tpr_at_fpr(y, s, t)
        if threshold is not None:
            out["threshold"] = float(threshold)
            out["f1_at_threshold"] = float(f1_score(y, (s >= threshold).astype(int), zero_division=0))
            out["accuracy_at_threshold"] = float(accuracy_score(y, (s >= threshold).astype(int)))
    else:
        Y = label_binarize(y, classes=list(range(C)))  # [N, C]
        present = Y.sum(0) > 0
        out["macro_f1"] = float(f1_score(y, probs.argmax(1), average="macro", labels=list(range(C)), zero_division=0))
        out["auprc"] = float(np.mean([average_precision_score(Y[:, c], probs[:, c]) for c in range(C) if present[c]]))
        out["roc_auc"] = float(roc_auc_score(y, probs, multi_class="ovr", labels=list(range(C)))) \
            if present.all() else None
    return out


def check_labels(cfg: dict, ds) -> str | None:
    """A probe reads a dataset with the same label set, or another binary set of the same task
    (e.g. ToxicChat -> WildGuardMix: positive = class 1). -> a note for the mapping, if any."""
    want, have = list(cfg["label_names"]), list(ds.label_names)
    if want == have:
        return None
    if len(want) == len(have) == 2 and cfg.get("task") == ds.task:
        return f"label sets differ: reading {have[1]!r} as {want[1]!r} and {have[0]!r} as {want[0]!r}"
    raise SinglepassError(f"the probe predicts {want} but {ds.name}/{ds.split} is labelled {have}: "
                          "evaluate it on a dataset with the same label set")


def predict_proba(module, cfg: dict, backbone, ds, cache_dir=None, progress: bool = True, log=print) -> np.ndarray:
    """Class probabilities [N, C] for every row of ``ds`` (states or logits from the cache)."""
    from singlepass.models import cache as state_cache
    from singlepass.models.extract import first_token_logits
    from singlepass.models.probes import probabilities
    from singlepass.models.train import StateData, predict_logits

    fmt, max_len = cfg["prompt_format"], cfg["max_length"]
    with torch.no_grad():
        if cfg.get("input", "hidden_states") == "logits":
            h = state_cache.last_hidden(backbone, ds, fmt, max_len, cache_dir, progress=progress, log=log)
            logits = first_token_logits(backbone.model, h)  # [N, V]
            z = torch.cat([module(logits[i:i + 256]) for i in range(0, len(logits), 256)])
        else:
            c = state_cache.build(backbone, ds, fmt, max_len, cache_dir=cache_dir, progress=progress, log=log)
            max_attn = 2 ** 20 if cfg["probe"] == "mha" else None
            z = predict_logits(module, StateData(c, max_tokens=8192, max_attn=max_attn))
    return probabilities(z).numpy()


def report_subsets(ds) -> dict[str, np.ndarray]:
    """Row subsets to report: everything, plus ToxicChat's human-annotated test rows."""
    subsets = {ds.split: np.arange(len(ds))}
    if ds.split == "test" and "human_annotation" in ds.columns:
        subsets["test_human"] = np.flatnonzero([bool(v) for v in ds.columns["human_annotation"]])
    return subsets


def evaluate(probe_dir, dataset: str, split: str, model: str | None = None, cache_dir=None, data_dir=None,
             limit: int | None = None, progress: bool = True, log=print) -> dict:
    from singlepass.models.probe_io import load_probe, read_config
    from singlepass.models.backbone import load_backbone
    from singlepass.models.data import load_dataset

    cfg = read_config(probe_dir)
    backbone = load_backbone(model or cfg["backbone"].get("name") or "smollm2-135m", cache_dir)
    module, cfg = load_probe(probe_dir, backbone.fingerprint)
    ds = load_dataset(dataset, split, data_dir, limit=limit)
    note = check_labels(cfg, ds)
    if note:
        log(note)
    probs = predict_proba(module, cfg, backbone, ds, cache_dir and __import__("pathlib").Path(cache_dir), progress, log)
    results = {name: compute_metrics(ds.labels[idx], probs[idx], cfg["threshold"])
               for name, idx in report_subsets(ds).items() if len(idx)}
    return {"probe": str(probe_dir), "method": cfg["probe"], "dataset": ds.name, "split": split,
            "limit": limit, "label_names": list(ds.label_names), "threshold": cfg["threshold"],
            "label_note": note, "results": results}


def format_report(rep: dict) -> str:
    keys = ["rows", "accuracy", "f1", "f1_at_threshold", "macro_f1", "auprc", "roc_auc",
            "tpr_at_0.01_fpr", "tpr_at_0.001_fpr"]
    names = list(rep["results"])
    lines = [f"{rep['method']} probe {rep['probe']} on {rep['dataset']}/{rep['split']}"
             + (f" (threshold {rep['threshold']:.4f} from validation)" if rep["threshold"] is not None else "")]
    lines.append(f"{'metric':<18}" + "".join(f"{n:>14}" for n in names))
    for k in keys:
        vals = [rep["results"][n].get(k, "absent") for n in names]
        if all(v == "absent" for v in vals):
            continue
        cell = lambda v: "—" if v in (None, "absent") else (f"{v:d}" if isinstance(v, int) else f"{v:.4f}")
        lines.append(f"{k:<18}" + "".join(f"{cell(v):>14}" for v in vals))
    return "\n".join(lines)
