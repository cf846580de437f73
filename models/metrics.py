"""Scores of class probabilities, with scikit-learn's metrics (shared by training and evaluation).

Binary tasks: accuracy and F1 of the positive class at 0.5 and at the probe's validation
threshold, AUPRC (average precision), ROC-AUC, and TPR at 1% and 0.1% FPR. Multi-class:
accuracy, macro-F1, macro one-vs-rest AUPRC and ROC-AUC.
"""

from __future__ import annotations

import numpy as np
import torch

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


def selection_metric(task: str, labels: np.ndarray, logits: torch.Tensor) -> float:
    """Validation score early stopping and the search maximise: F1 of the positive class at 0.5
    (macro-F1 if multi-class) for safety tasks, accuracy otherwise. logits [N, C']."""
    from sklearn.metrics import accuracy_score, f1_score

    if logits.shape[-1] == 1:
        pred = (logits[:, 0] > 0).long().numpy()
    else:
        pred = logits.argmax(-1).numpy()
    if task == "safety":
        return float(f1_score(labels, pred, average="binary" if logits.shape[-1] == 1 else "macro", zero_division=0))
    return float(accuracy_score(labels, pred))
