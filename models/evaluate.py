"""Evaluate a probe artifact on a dataset split with the metrics of models/metrics.py.

ToxicChat's test split is reported twice: all rows and the human-annotated rows
(``test_human``, the paper's number).
"""

from __future__ import annotations

import numpy as np
import torch

from singlepass.errors import SinglepassError
from singlepass.models.metrics import compute_metrics, rates_at


def check_labels(cfg: dict, ds) -> str | None:
    """A probe reads a dataset with the same label set, or another binary set of the same task
    (e.g. ToxicChat -> WildGuardMix: positive = class 1). -> a note for the mapping, if any."""
    want, have = list(cfg["label_names"]), list(ds.label_names)
    if want == have:
        return None
    if len(want) == len(have) == 2 and cfg.get("task") == ds.task:
        return f"label sets differ: reading {have[1]!r} as {want[1]!r} and {have[0]!r} as {want[0]!r}"
    raise SinglepassError(
        f"the probe predicts {want} but {ds.name}/{ds.split} is labelled {have}: "
        "evaluate it on a dataset with the same label set"
    )


def view_args(cfg: dict, ds) -> dict:
    """The cache arguments of the view the probe reads (a response probe: its
    ``max_response_tokens``); a response probe reads response sets only, a prompt probe prompt sets."""
    from singlepass.models.probe_io import reads_of

    reads = reads_of(cfg)
    if reads != ds.reads:
        raise SinglepassError(
            f"the probe reads the {reads} but {ds.name}/{ds.split} is a {ds.reads} set: evaluate it on a {reads} set"
        )
    return {"max_response_tokens": cfg["max_response_tokens"]} if reads == "response" else {}


def probe_logits(module, cfg: dict, backbone, ds, cache_dir=None, progress: bool = True, log=print) -> torch.Tensor:
    """The probe's logits [N, C'] (float32, as the graph computes them) for every row of ``ds``
    (states or logits from the cache). ``cfg`` as load_probe returns it (``"input"`` always set)."""
    from singlepass.models import cache as state_cache
    from singlepass.models.batches import StateData, predict_logits
    from singlepass.models.extract import first_token_logits
    from singlepass.models.registry import get_family

    fmt, max_len = cfg["prompt_format"], cfg["max_length"]
    response = view_args(cfg, ds)
    with torch.no_grad():
        if cfg["input"] == "logits":
            h = state_cache.last_hidden(backbone, ds, fmt, max_len, cache_dir, progress=progress, log=log, **response)
            logits = first_token_logits(backbone.model, h)  # [N, V]
            return torch.cat([module(logits[i : i + 256]) for i in range(0, len(logits), 256)])
        c = state_cache.build(backbone, ds, fmt, max_len, cache_dir=cache_dir, progress=progress, log=log, **response)
        max_attn = get_family(cfg["probe"]).max_attn
        return predict_logits(module, StateData(c, max_tokens=8192, max_attn=max_attn))  # [N, C']


def predict_proba(module, cfg: dict, backbone, ds, cache_dir=None, progress: bool = True, log=print) -> np.ndarray:
    """Class probabilities [N, C] (float64, ``host_probabilities``) for every row of ``ds``."""
    from singlepass.models.probes import host_probabilities

    return host_probabilities(probe_logits(module, cfg, backbone, ds, cache_dir, progress, log))


def report_subsets(ds) -> dict[str, np.ndarray]:
    """Row subsets to report: everything, plus ToxicChat's human-annotated test rows."""
    subsets = {ds.split: np.arange(len(ds))}
    if ds.split == "test" and "human_annotation" in ds.columns:
        subsets["test_human"] = np.flatnonzero([bool(v) for v in ds.columns["human_annotation"]])
    return subsets


def evaluate(
    probe_dir,
    dataset: str,
    split: str,
    model: str | None = None,
    cache_dir=None,
    data_dir=None,
    limit: int | None = None,
    progress: bool = True,
    log=print,
    backbone=None,
) -> dict:
    """Metrics of a saved probe on a dataset split. ``backbone``: an already loaded one (else
    ``model``, else the one named in the probe's config, is loaded)."""
    from singlepass.models.data import load_dataset
    from singlepass.models.probe_io import load_probe_and_backbone

    module, cfg, backbone = load_probe_and_backbone(probe_dir, model, cache_dir, backbone)
    ds = load_dataset(dataset, split, data_dir, limit=limit)
    note = check_labels(cfg, ds)
    if note:
        log(note)
    probs = predict_proba(module, cfg, backbone, ds, cache_dir and __import__("pathlib").Path(cache_dir), progress, log)
    results = {
        name: with_operating_points(compute_metrics(ds.labels[idx], probs[idx], cfg["threshold"]), cfg, ds, probs, idx)
        for name, idx in report_subsets(ds).items()
        if len(idx)
    }
    return {
        "probe": str(probe_dir),
        "method": cfg["probe"],
        "dataset": ds.name,
        "split": split,
        "limit": limit,
        "label_names": list(ds.label_names),
        "threshold": cfg["threshold"],
        "operating_point": cfg.get("operating_point"),
        "label_note": note,
        "results": results,
    }


def with_operating_points(metrics: dict, cfg: dict, ds, probs: np.ndarray, idx: np.ndarray) -> dict:
    """``metrics`` plus the FPR and TPR each stored operating point actually gives on these rows."""
    points = cfg.get("operating_points") or {}
    if points and probs.shape[1] == 2:
        y, p = ds.labels[idx], probs[idx, 1]
        metrics["operating_points"] = {name: rates_at(y, p, pt["threshold"]) for name, pt in points.items()}
    return metrics


def evaluate_sources(
    probe_dir,
    dataset: str,
    split: str,
    model: str | None = None,
    cache_dir=None,
    data_dir=None,
    limit: int | None = None,
    progress: bool = True,
    log=print,
) -> dict:
    """``evaluate`` on every source of a mixture (``--dataset a,b:2,...``; weights are ignored):
    ``split`` "test" is each source's held-out test part (wildguardmix: ``test_untouched``).
    A file source (its rows are a mixture's train and validation rows only) is skipped and said so."""
    from singlepass.models.mixture import held_out_split, parse_sources
    from singlepass.models.probe_io import load_probe_and_backbone

    _, _, backbone = load_probe_and_backbone(probe_dir, model, cache_dir)
    reports = {}
    for src in parse_sources(dataset):
        if src.path is not None:
            log(f"{src.name}: a file source has no {split} part of its own (its rows train and validate); skipped")
            continue
        src_split = held_out_split(src.name) if split == "test" else split
        reports[src.name] = evaluate(
            probe_dir, src.name, src_split, model, cache_dir, data_dir, limit, progress, log, backbone
        )
    return {"probe": str(probe_dir), "dataset": dataset, "split": split, "sources": reports}


def format_sources(rep: dict) -> str:
    return "\n\n".join(format_report(r) for r in rep["sources"].values())


def _cell(v) -> str:
    return "—" if v in (None, "absent") else (f"{v:d}" if isinstance(v, int) else f"{v:.4f}")


def format_report(rep: dict) -> str:
    keys = [
        "rows",
        "accuracy",
        "f1",
        "f1_at_threshold",
        "macro_f1",
        "auprc",
        "roc_auc",
        "tpr_at_0.01_fpr",
        "tpr_at_0.001_fpr",
        "fpr_at_threshold",
        "tpr_at_threshold",
    ]
    names = list(rep["results"])
    lines = [
        f"{rep['method']} probe {rep['probe']} on {rep['dataset']}/{rep['split']}"
        + (
            f" (threshold {rep['threshold']:.4f} from validation"
            + (f", operating point {rep['operating_point']})" if rep.get("operating_point") else ")")
            if rep["threshold"] is not None
            else ""
        )
    ]
    lines.append(f"{'metric':<18}" + "".join(f"{n:>14}" for n in names))
    for k in keys:
        vals = [rep["results"][n].get(k, "absent") for n in names]
        if all(v == "absent" for v in vals):
            continue
        lines.append(f"{k:<18}" + "".join(f"{_cell(v):>14}" for v in vals))
    points = rep["results"][names[0]].get("operating_points") if names else None
    for point in points or {}:
        for rate in ("fpr", "tpr"):
            vals = [rep["results"][n]["operating_points"][point][rate] for n in names]
            lines.append(f"{rate + ' @ ' + point:<18}" + "".join(f"{_cell(v):>14}" for v in vals))
    return "\n".join(lines)
