"""One configuration's optimisation loop: seeded, early-stopped, best validation epoch kept.

AdamW (0.9, 0.999) or SGD, a cosine schedule to zero over ``epochs`` epochs, the validation
selection metric every ``eval_every`` epochs with ``patience``, an optional L1/L2 penalty on the
head weight. Gradients of a batch accumulate over its micro-batches, so a batch is one step
whatever memory budget splits it.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np
import torch
from torch import nn

from singlepass.errors import SinglepassError
from singlepass.models.batches import Data, FeatureData, predict_logits
from singlepass.models.metrics import selection_metric
from singlepass.models.search import HParams

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]  # (logits, y, row weights)


def class_totals(
    num_classes: int, labels: np.ndarray, class_weight: str, sample_weight: np.ndarray | None = None
) -> np.ndarray:
    """[C] each class's row count, or its total ``sample_weight``; a clear error for a bad class_weight."""
    if class_weight not in ("none", "balanced"):
        raise SinglepassError(f"class_weight must be 'none' or 'balanced', not {class_weight!r}")
    if sample_weight is None:
        return np.bincount(labels, minlength=num_classes).astype(np.float64)
    return np.bincount(labels, weights=np.asarray(sample_weight, np.float64), minlength=num_classes)


def positive_weight(counts: np.ndarray) -> float:
    """A binary task's balanced weight of the positive rows: negatives / positives."""
    return float(counts[0] / max(counts[1], 1.0))


def make_loss(
    num_classes: int, labels: np.ndarray, class_weight: str, sample_weight: np.ndarray | None = None
) -> LossFn:
    """-> fn(logits [b, C'], y [b], w [b] or None) returning the *sum* of per-row losses.

    ``sample_weight`` [N] (a mixture's per-source weights) multiplies each row's loss, and
    ``balanced`` then balances the weighted class totals (the plain counts when it is None)."""
    counts = class_totals(num_classes, labels, class_weight, sample_weight)  # [C]
    if num_classes == 2:
        pw = torch.tensor(positive_weight(counts), dtype=torch.float32) if class_weight == "balanced" else None
        if sample_weight is None:
            bce = nn.BCEWithLogitsLoss(pos_weight=pw, reduction="sum")
            return lambda z, y, w=None: bce(z[:, 0], y.float())
        bce_rows = nn.BCEWithLogitsLoss(pos_weight=pw, reduction="none")
        return lambda z, y, w: (bce_rows(z[:, 0], y.float()) * w).sum()
    cw = None
    if class_weight == "balanced":
        cw = torch.tensor(counts.sum() / (num_classes * np.maximum(counts, 1.0)), dtype=torch.float32)  # [C]
    if sample_weight is None:
        ce = nn.CrossEntropyLoss(weight=cw, reduction="sum")  # sum_i w_{y_i} * CE_i; the caller divides by batch rows
        return lambda z, y, w=None: ce(z, y)
    ce_rows = nn.CrossEntropyLoss(weight=cw, reduction="none")
    return lambda z, y, w: (ce_rows(z, y) * w).sum()


def cosine(step_total: int) -> Callable[[int], float]:
    return lambda step: 0.5 * (1 + math.cos(math.pi * min(step, step_total) / max(step_total, 1)))


def fit(
    module: nn.Module,
    train: Data,
    y_train: np.ndarray,
    val: Data,
    y_val: np.ndarray,
    hp: HParams,
    task: str,
    num_classes: int,
    seed: int,
    progress: bool = False,
    desc: str = "train",
    sample_weight: np.ndarray | None = None,
    val_groups: np.ndarray | None = None,
) -> dict:
    """Train ``module`` in place (best validation epoch kept). -> history dict.

    ``sample_weight`` [N_train]: per-row loss weights (make_loss); ``val_groups`` [N_val]: the
    source of each validation row, selection then scores the mean over sources (selection_metric)."""
    weights = {"sample_weight": sample_weight, "val_groups": val_groups}
    if isinstance(train, FeatureData):  # small ops: one thread avoids OpenMP oversubscription stalls
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return _fit(module, train, y_train, val, y_val, hp, task, num_classes, seed, progress, desc, **weights)
        finally:
            torch.set_num_threads(threads)
    return _fit(module, train, y_train, val, y_val, hp, task, num_classes, seed, progress, desc, **weights)


def _fit(
    module, train, y_train, val, y_val, hp, task, num_classes, seed, progress, desc, sample_weight=None, val_groups=None
) -> dict:
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    params = [p for p in module.parameters() if p.requires_grad]
    if hp.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=hp.lr, betas=(0.9, 0.999), weight_decay=hp.weight_decay)
    elif hp.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=hp.lr, weight_decay=hp.weight_decay)
    else:
        raise SinglepassError(f"optimizer must be 'adamw' or 'sgd', not {hp.optimizer!r}")
    n_batches = math.ceil(len(train) / hp.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine(hp.epochs * n_batches))
    if hp.stream_loss == "stop":  # the logits after every decode pass, for the stop rule
        from singlepass.models.streaming import stop_loss

        counts = class_totals(num_classes, y_train, hp.class_weight, sample_weight)
        pw = positive_weight(counts) if hp.class_weight == "balanced" else 1.0

        def batch_loss(mb, y, w):
            return stop_loss(*train.prefix_logits(module, mb), y, pw, w)
    else:
        loss_fn = make_loss(num_classes, y_train, hp.class_weight, sample_weight)

        def batch_loss(mb, y, w):
            return loss_fn(train.logits(module, mb), y, w)

    y_t = torch.as_tensor(y_train)  # [N]
    w_t = None if sample_weight is None else torch.as_tensor(np.asarray(sample_weight), dtype=torch.float32)  # [N]
    head_w = module.head.weight  # [C', F]
    best, best_state, best_epoch, bad, history = -1.0, None, 0, 0, []
    t0 = time.perf_counter()
    bar = tqdm(total=hp.epochs * n_batches, desc=desc, unit="step", disable=not progress, leave=False)
    for epoch in range(1, hp.epochs + 1):
        module.train()
        total = 0.0
        for rows in train.order(hp.batch_size, g):
            opt.zero_grad(set_to_none=True)
            for mb in train.micro(rows):
                at = torch.as_tensor(mb)
                loss = batch_loss(mb, y_t[at], None if w_t is None else w_t[at]) / len(rows)
                loss.backward()
                total += float(loss.detach()) * len(rows)
            if hp.l1 or hp.l2:
                pen = hp.l1 * head_w.abs().sum() + hp.l2 * head_w.pow(2).sum()
                pen.backward()
            opt.step()
            sched.step()
            bar.update(1)
        if epoch % hp.eval_every and epoch != hp.epochs:
            continue
        score = selection_metric(task, y_val, predict_logits(module, val), val_groups)
        history.append({"epoch": epoch, "train_loss": total / len(train), "val": score})
        bar.set_postfix(epoch=epoch, val=f"{score:.4f}")
        if score > best:
            best, best_epoch, bad = score, epoch, 0
            best_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        else:
            bad += 1
            if hp.patience and bad >= hp.patience:
                break
    bar.close()
    module.load_state_dict(best_state)
    return {
        "best_val": best,
        "best_epoch": best_epoch,
        "epochs_run": history[-1]["epoch"],
        "seconds": time.perf_counter() - t0,
        "history": history,
    }
