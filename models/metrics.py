"""Scores of class probabilities, with scikit-learn's metrics (shared by training and evaluation).

Binary tasks: accuracy and F1 of the positive class at 0.5 and at the probe's validation
threshold, AUPRC (average precision), ROC-AUC, and TPR at 1% and 0.1% FPR. Multi-class:
accuracy, macro-F1, macro one-vs-rest AUPRC and ROC-AUC.
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
    from sklearn.metrics import (
        accuracy_score,
        average_precision_score,
        f1_score,
        precision_score,
        recall_score,
        roc_auc_score,
    )
    from sklearn.preprocessing import label_binarize

    y = np.asarray(y)
    probs = np.asarray(probs, dtype=np.float64)
    C = probs.shape[1]
    both = len(np.unique(y)) > 1
    out = {"rows": int(len(y)), "accuracy": float(accuracy_score(y, probs.argmax(1)))}
    if C == 2:
        s = probs[:, 1]
        pred = (s >= 0.5).astype(int)
        out.update(
            {
                "positives": int(y.sum()),
                "f1": float(f1_score(y, pred, zero_division=0)),
                "precision": float(precision_score(y, pred, zero_division=0)),
                "recall": float(recall_score(y, pred, zero_division=0)),
                "auprc": float(average_precision_score(y, s)) if y.sum() else None,
                "roc_auc": float(roc_auc_score(y, s)) if both else None,
            }
        )
        out["accuracy"] = float(accuracy_score(y, pred))
        for t in FPR_TARGETS:
            out[f"tpr_at_{t:g}_fpr"] = tpr_at_fpr(y, s, t)
        if threshold is not None:
            out["threshold"] = float(threshold)
            out["f1_at_threshold"] = float(f1_score(y, (s >= threshold).astype(int), zero_division=0))
            out["accuracy_at_threshold"] = float(accuracy_score(y, (s >= threshold).astype(int)))
            rates = rates_at(y, s, threshold)
            out["fpr_at_threshold"], out["tpr_at_threshold"] = rates["fpr"], rates["tpr"]
    else:
        Y = label_binarize(y, classes=list(range(C)))  # [N, C]
        present = Y.sum(0) > 0
        out["macro_f1"] = float(f1_score(y, probs.argmax(1), average="macro", labels=list(range(C)), zero_division=0))
        out["auprc"] = float(np.mean([average_precision_score(Y[:, c], probs[:, c]) for c in range(C) if present[c]]))
        out["roc_auc"] = (
            float(roc_auc_score(y, probs, multi_class="ovr", labels=list(range(C)))) if present.all() else None
        )
    return out


def choose_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """Decision threshold on P(positive) [N] that maximises F1 on validation (0.5 when undefined)."""
    from sklearn.metrics import precision_recall_curve

    if len(np.unique(y)) < 2:
        return 0.5
    prec, rec, thr = precision_recall_curve(y, p)
    f1 = 2 * prec[:-1] * rec[:-1] / np.maximum(prec[:-1] + rec[:-1], 1e-12)
    return float(thr[int(np.argmax(f1))])


def threshold_at_fpr(y: np.ndarray, p: np.ndarray, target: float) -> float:
    """The lowest threshold on P(positive) [N] whose false-positive rate on (y, p) is <= target,
    i.e. the operating point with the highest TPR under that FPR (scikit-learn's ROC curve with
    every threshold kept; a row is positive when p >= threshold). If even the highest score
    gives too many false positives, the next float above the highest negative score."""
    from sklearn.metrics import roc_curve

    if not 0.0 <= target < 1.0:
        raise SinglepassError(f"--threshold-at-fpr must be in [0, 1), not {target}")
    y, p = np.asarray(y), np.asarray(p, dtype=np.float64)
    if not (y == 0).any():
        raise SinglepassError("a threshold at a target FPR needs negative rows in validation; there are none")
    if not (y == 1).any():  # no ROC curve: just above the highest negative that must not pass
        neg = np.sort(p[y == 0])[::-1]
        return float(np.nextafter(neg[int(np.floor(target * len(neg) + 1e-9))], np.inf))
    fpr, _, thr = roc_curve(y, p, drop_intermediate=False)
    i = int(np.flatnonzero(fpr <= target).max())
    if not np.isfinite(thr[i]):  # only the "nothing is positive" point qualifies
        return float(np.nextafter(p[y == 0].max(), np.inf))
    return float(thr[i])


def rates_at(y: np.ndarray, p: np.ndarray, threshold: float) -> dict:
    """FPR and TPR a threshold actually gives (None where a class is absent)."""
    y, pred = np.asarray(y), np.asarray(p) >= threshold
    neg, pos = y == 0, y == 1
    return {
        "fpr": float(pred[neg].mean()) if neg.any() else None,
        "tpr": float(pred[pos].mean()) if pos.any() else None,
        "negatives": int(neg.sum()),
        "positives": int(pos.sum()),
    }


def _score(task: str, labels: np.ndarray, pred: np.ndarray, binary: bool) -> float:
    from sklearn.metrics import accuracy_score, f1_score

    if task == "safety":
        return float(f1_score(labels, pred, average="binary" if binary else "macro", zero_division=0))
    return float(accuracy_score(labels, pred))


def selection_metric(task: str, labels: np.ndarray, logits: torch.Tensor, groups: np.ndarray | None = None) -> float:
    """Validation score early stopping and the search maximise: F1 of the positive class at 0.5
    (macro-F1 if multi-class) for safety tasks, accuracy otherwise. logits [N, C'].

    With ``groups`` (a mixture's source per row) it is the MEAN over sources of each source's
    score, where a one-sided source (a single class, e.g. all-harmful AdvBench or all-benign
    Alpaca) scores its accuracy, since its F1 is undefined or only recall. The mean, not the worst
    source: the smallest validation parts are a few rows (HarmBench: 8), so the worst source
    would move by 1/8 per row and early stopping would chase that noise; every source still
    counts equally whatever its size, and each source's metrics are stored beside it."""
    if logits.shape[-1] == 1:
        pred = (logits[:, 0] > 0).long().numpy()
    else:
        pred = logits.argmax(-1).numpy()
    binary = logits.shape[-1] == 1
    if groups is None:
        return _score(task, labels, pred, binary)
    groups, labels = np.asarray(groups), np.asarray(labels)
    scores = []
    for g in dict.fromkeys(groups.tolist()):
        at = groups == g
        one_sided = len(np.unique(labels[at])) < 2
        scores.append(
            float((pred[at] == labels[at]).mean()) if one_sided else _score(task, labels[at], pred[at], binary)
        )
    return float(np.mean(scores))
