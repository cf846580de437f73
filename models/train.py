"""Train any probe or baseline on cached hidden states (or first-token logits): the whole job.

Recipe (paper notes): a bounded random search (``trials``, models/search.py) whose trial 0 is
always the documented default; each trial runs the loop of models/fit.py (AdamW, cosine
schedule, early stopping on the validation selection metric: F1 of the positive class at 0.5
for safety tasks, accuracy otherwise); the best trial is kept, with a validation-chosen
decision threshold for binary tasks. A family with a fixed recipe (MULI: SGD lr 5e-4, batch 32,
500 epochs, weighted BCE + 1e-3 L1) is not searched.

Families whose only trainable part is the head (``Family.head_only``: pooling, the fixed
readouts, MULI) are trained on features computed once (the parameter-free part of the module),
which is the same function as running the whole module each step; hidden-state features are
standardised with the training statistics and the scaling is folded into the head afterwards
(as scikit-learn's StandardScaler + LogisticRegression, in one Linear). Everything is seeded; a
given seed gives identical weights on the same machine.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
from torch import nn

from singlepass.errors import SinglepassError
from singlepass.models.batches import Data, FeatureData, StateData, compute_features, predict_logits
from singlepass.models.data import PROTECTED_SPLITS
from singlepass.models.family import Family
from singlepass.models.fit import fit
from singlepass.models.metrics import choose_threshold, compute_metrics, rates_at, threshold_at_fpr
from singlepass.models.probes import count_parameters, host_probabilities
from singlepass.models.prompts import DEFAULT_MAX_RESPONSE_TOKENS
from singlepass.models.registry import get_family, head_only
from singlepass.models.search import HParams, trial_plan
from singlepass.models.stats import fold_scaling, input_statistics

if TYPE_CHECKING:
    from singlepass.models.backbone import Backbone
    from singlepass.models.cache import StateCache
    from singlepass.models.data import Dataset

# Bumped whenever a change alters what training produces from the same data and seed (stored
# benchmark probes of an older recipe are retrained). 2: standardised head features (folded
# into the head) and input_norm="standard" as the gate / MHA default. 3: stage 1 trains on the states as
# they are (``Probe.features`` through ``tokens_raw``: the same function, rounded differently). 4: the input
# statistics summed unpadded in float32 chunks (``models.stats.input_statistics``: rounded differently).
RECIPE = 4


@dataclass
class Prepared:
    """Train/validation inputs for one family, built once and shared by all trials."""

    family: Family
    train_src: "StateCache | torch.Tensor"  # a hidden-state cache, or logits [N, V] for "logits" families
    val_src: "StateCache | torch.Tensor"
    y_train: np.ndarray  # [N]
    y_val: np.ndarray
    feature_memo: dict = field(default_factory=dict)
    input_stats: tuple | None = None  # (mean, std) [L+1, d] for input_norm="standard", computed once
    sample_weight: np.ndarray | None = None  # [N] per-row loss weights (a mixture's source weights)
    val_groups: np.ndarray | None = None  # [N_val] source of each validation row (a mixture)


def prepare(
    method: str,
    backbone: "Backbone",
    train_ds: "Dataset",
    val_ds: "Dataset",
    prompt_format: str,
    max_length: int,
    cache_dir: Path | None = None,
    progress: bool = True,
    log: Callable[..., None] = print,
    sources: tuple | None = None,
    max_response_tokens: int = DEFAULT_MAX_RESPONSE_TOKENS,
) -> Prepared:
    """``sources``: the (train, validation) hidden-state caches already built for these rows
    (e.g. ``cache.StateView``s over per-source caches); logit families then read their
    last-token final states from them instead of running the model. ``max_response_tokens``:
    the response tokens read per row of a response set (Dataset.reads)."""
    from singlepass.models import cache as state_cache
    from singlepass.models.extract import first_token_logits

    family = get_family(method)
    response = {"max_response_tokens": max_response_tokens}
    if sources is not None:
        for src, ds in zip(sources, (train_ds, val_ds)):
            if len(src) != len(ds) or not np.array_equal(src.labels, ds.labels):
                raise SinglepassError(f"{ds.name}/{ds.split}: the given hidden-state rows do not match the dataset")
        if family.input == "logits":
            h = [torch.from_numpy(src.last_token_final()) for src in sources]  # [N, d] each
            sources = tuple(first_token_logits(backbone.model, x) for x in h)  # [N, V] each
        srcs = tuple(sources)
    elif family.input == "logits":
        srcs = []
        for ds in (train_ds, val_ds):
            h = state_cache.last_hidden(
                backbone, ds, prompt_format, max_length, cache_dir, progress=progress, log=log, **response
            )
            srcs.append(first_token_logits(backbone.model, h))  # [N, V]
        srcs = tuple(srcs)
    else:
        srcs = tuple(
            state_cache.build(
                backbone, ds, prompt_format, max_length, cache_dir=cache_dir, progress=progress, log=log, **response
            )
            for ds in (train_ds, val_ds)
        )
    weight, groups = train_ds.columns.get("mixture_weight"), val_ds.columns.get("mixture_source")
    return Prepared(
        family,
        *srcs,
        train_ds.labels,
        val_ds.labels,
        sample_weight=None if weight is None else np.asarray(weight, dtype=np.float64),
        val_groups=None if groups is None else np.asarray(groups),
    )


STREAM_LOSSES = ("whole", "stop")


def check_stream_loss(hp: HParams, method: str, reads: str, num_classes: int, num_layers: int, hidden: int) -> None:
    """``stream_loss=stop`` (models/streaming.py ``stop_loss``): a binary response probe trained through its
    states (not head-only) that streams with these parameters, without random prefixes (it reads every prefix
    already); a clear error else, before any hidden state is extracted."""
    from singlepass.models.registry import get_family

    if hp.stream_loss not in STREAM_LOSSES:
        raise SinglepassError(f"stream_loss must be one of {', '.join(STREAM_LOSSES)}, not {hp.stream_loss!r}")
    if hp.stream_loss == "whole":
        return
    why = None
    if reads != "response":
        why = "applies to response probes (a prompt probe is read once, on the whole prompt)"
    elif num_classes != 2:
        why = f"trains a binary label (safe / unsafe), not {num_classes} classes"
    elif get_family(method).head_only:
        why = f"trains through the states; the {method} probe trains its head on features computed once per row"
    elif hp.prefixes:
        why = f"reads every prefix already: drop prefixes={hp.prefixes:g}"
    if why:
        raise SinglepassError(f"stream_loss=stop {why}")
    try:  # a probe of these parameters (an invalid one is reported by run_trial)
        module = get_family(method).build(num_layers, hidden, num_classes, **hp.params)
    except (TypeError, ValueError):
        return
    try:
        module.check_streamable()
    except ValueError as e:
        raise SinglepassError(f"stream_loss=stop needs a streaming probe: {e}") from None


def make_data(
    prep: Prepared, module: nn.Module, params: dict, progress: bool = False, prefixes: float = 0.0, seed: int = 0
) -> tuple[Data, Data, tuple[torch.Tensor, torch.Tensor] | None]:
    """-> (train data, val data, scaling) for this module (features memoised per module parameters).

    Head-only probes on hidden states train on standardised features (scaling = (mean, std));
    run_trial folds the scaling into the head afterwards, so the saved module is unchanged in
    form. Measured: on SST-2 mean-pooled features the unscaled head trailed scikit-learn's
    standardised logistic regression (0.60 vs 0.67-0.73 accuracy, 200 rows). ``prefixes``:
    ``HParams.prefixes`` (the training rows of a probe trained through its states only)."""
    family = prep.family
    if not family.head_only:
        train = StateData(prep.train_src, max_attn=family.max_attn, prefixes=prefixes, seed=seed)
        # selected on whole rows; validation runs between training steps, so both read into one buffer
        return train, StateData(prep.val_src, max_attn=family.max_attn, scratch=train.scratch), None
    if prefixes:
        raise SinglepassError(
            f"prefixes={prefixes:g}: the {family.name} probe trains its head on features computed once per "
            "row, so it has no random prefixes; use a probe trained through its states (gate, mha)"
        )
    if not head_only(module):
        raise RuntimeError(f"family {family.name!r} is declared head-only but trains parameters outside .head")
    key = (family.name, tuple(sorted((k, str(v)) for k, v in params.items())))
    if family.fit_buffers is not None:
        family.fit_buffers(module, prep.train_src)  # buffers: exported with the module
    if key not in prep.feature_memo:
        prep.feature_memo.clear()
        prep.feature_memo[key] = tuple(
            compute_features(module, s, progress, f"features ({split})")  # [N, F] each
            for s, split in ((prep.train_src, "train"), (prep.val_src, "validation"))
        )
    Xt, Xv = prep.feature_memo[key]
    if family.fit_buffers is not None:  # standardised inside the module already (its buffers)
        return FeatureData(Xt), FeatureData(Xv), None
    return FeatureData.standardised(Xt, Xv)


def run_trial(
    prep: Prepared,
    hp: HParams,
    num_layers: int,
    hidden_size: int,
    num_classes: int,
    task: str,
    seed: int,
    vocab_size: int | None = None,
    progress: bool = False,
    desc: str = "train",
) -> tuple[nn.Module, dict, dict]:
    """-> (trained module, its constructor parameters, history)."""
    family = prep.family
    params = dict(hp.params)
    backbone_dims = {"vocab_size": vocab_size}
    for name in family.from_backbone:
        params.setdefault(name, backbone_dims[name])
    torch.manual_seed(seed)
    try:
        module = family.build(num_layers, hidden_size, num_classes, **params)
    except (TypeError, ValueError) as e:
        raise SinglepassError(f"invalid {family.name} parameters {params}: {e}") from None
    if getattr(module, "input_norm", None) == "standard":
        if prep.input_stats is None:
            prep.input_stats = input_statistics(prep.train_src)
        module.set_input_statistics(*prep.input_stats)
    train, val, scaling = make_data(prep, module, params, progress, hp.prefixes, seed)
    hist = fit(
        module,
        train,
        prep.y_train,
        val,
        prep.y_val,
        hp,
        task,
        num_classes,
        seed,
        progress,
        desc,
        sample_weight=prep.sample_weight,
        val_groups=prep.val_groups,
    )
    hist["val_logits"] = predict_logits(module, val)  # [N_val, C']
    if scaling is not None:
        fold_scaling(module.head, *scaling)
    return module, params, hist


def check_trainable(ds: "Dataset") -> None:
    """No training path reads a held-out split (wildguardmix's ``test_untouched``)."""
    splits = {ds.split, *(ds.columns.get("mixture_split") or [])}
    held = sorted(splits & PROTECTED_SPLITS)
    if held:
        raise SinglepassError(f"{ds.name}: split {', '.join(held)} is held out for testing and is never trained on")


def operating_points(y: np.ndarray, p: np.ndarray, fpr_target: float | None, log: Callable[..., None] = print) -> dict:
    """Validation thresholds on P(positive): ``f1`` (F1-optimal) and, with ``fpr_target``,
    ``fpr@<target>`` (the lowest threshold whose validation FPR is <= target), each with the FPR
    and TPR it gives on validation. -> {"active": name, "points": {name: {...}}}."""
    t_f1 = choose_threshold(y, p)
    points = {"f1": {"threshold": t_f1, **rates_at(y, p, t_f1)}}
    active = "f1"
    if fpr_target is not None:
        t = threshold_at_fpr(y, p, fpr_target)
        active = f"fpr@{fpr_target:g}"
        points[active] = {"threshold": t, "target_fpr": fpr_target, **rates_at(y, p, t)}
        negatives = int((np.asarray(y) == 0).sum())
        if negatives * fpr_target < 1:
            log(
                f"note: {negatives} validation negatives cannot resolve an FPR of {fpr_target:g} "
                f"(one false positive is {1 / max(negatives, 1):.2%}); the threshold admits none"
            )
    return {"active": active, "points": points}


def set_determinism(threads: int | None = None) -> None:
    torch.use_deterministic_algorithms(True, warn_only=True)
    if threads:
        torch.set_num_threads(threads)


def train_probe(
    method: str,
    backbone: "Backbone",
    train_ds: "Dataset",
    val_ds: "Dataset",
    *,
    prompt_format: str = "chat",
    max_length: int = 512,
    seed: int = 0,
    trials: int = 1,
    max_epochs: int = 10,
    overrides: dict | None = None,
    hparams: HParams | None = None,
    cache_dir: Path | None = None,
    progress: bool = True,
    log: Callable[..., None] = print,
    threshold_fpr: float | None = None,
    sources: tuple | None = None,
    max_response_tokens: int = DEFAULT_MAX_RESPONSE_TOKENS,
) -> tuple[nn.Module, dict]:
    """Search ``trials`` configurations (or train the given ``hparams``) and return the best
    module with its artifact config. -> (module, config dict).

    ``threshold_fpr``: make the active threshold the one that gives this false-positive rate on
    validation (binary probes; the F1-optimal one is stored beside it); for a streaming response
    probe the rate is the stop rule's over every decode pass (``stop-fpr@RATE``, models/streaming.py:
    the share of safe validation responses it would stop), the whole-response point stored beside
    it. A mixture (rows with a ``source`` column) is selected on the mean over sources and its
    validation metrics are stored per source. ``sources``: prebuilt (train, validation) hidden-state caches of these
    rows (``prepare``).

    A response set (``Dataset.reads == "response"``) trains a response probe: its sequence is the
    first ``max_response_tokens`` response tokens, read after the prompt (models/prompts.py);
    the config then records ``"reads": "response"`` and ``max_response_tokens`` (a prompt probe's
    config records neither: a missing ``reads`` means "prompt")."""
    family = get_family(method)
    check_trainable(train_ds)
    reads = train_ds.reads
    if val_ds.reads != reads:
        raise SinglepassError(
            f"{train_ds.name}/{train_ds.split} is a {reads} set but "
            f"{val_ds.name}/{val_ds.split} is a {val_ds.reads} set"
        )
    if threshold_fpr is not None and len(train_ds.label_names) != 2:
        raise SinglepassError("--threshold-at-fpr applies to binary probes only")
    if tuple(train_ds.label_names) != tuple(val_ds.label_names):
        raise SinglepassError("train and validation label sets differ")
    for ds in (train_ds, val_ds):
        if len(np.unique(ds.labels)) < 2:
            raise SinglepassError(f"{ds.name}/{ds.split}: needs at least two classes present ({len(ds)} rows)")
    set_determinism()
    num_classes, task = len(train_ds.label_names), train_ds.task
    L1, d = backbone.num_layers + 1, backbone.hidden_size
    vocab = backbone.model.config.vocab_size
    plan = [hparams] if hparams is not None else trial_plan(method, d, trials, seed, max_epochs, overrides, task)
    for hp in plan:  # --epochs, --set epochs=N or a stored configuration
        if hp.epochs < 1:
            raise SinglepassError(f"--epochs must be at least 1, got {hp.epochs}")
        if not 0.0 <= hp.prefixes <= 1.0:
            raise SinglepassError(f"prefixes must be a share between 0 and 1, not {hp.prefixes:g}")
        if hp.prefixes and train_ds.reads != "response":
            raise SinglepassError(
                f"prefixes={hp.prefixes:g} applies to response probes (a prompt probe reads the whole prompt)"
            )
        check_stream_loss(hp, method, train_ds.reads, num_classes, L1, d)
    prep = prepare(
        method,
        backbone,
        train_ds,
        val_ds,
        prompt_format,
        max_length,
        cache_dir,
        progress,
        log,
        sources,
        max_response_tokens,
    )
    t_all = time.perf_counter()
    best = None
    summary = []
    for i, hp in enumerate(plan):
        module, params, hist = run_trial(
            prep, hp, L1, d, num_classes, task, seed, vocab, progress, desc=f"{method} trial {i + 1}/{len(plan)}"
        )
        row = {
            "trial": i,
            **{k: v for k, v in asdict(hp).items() if k != "params"},
            "params": params,
            "val": hist["best_val"],
            "best_epoch": hist["best_epoch"],
            "epochs_run": hist["epochs_run"],
            "seconds": round(hist["seconds"], 2),
        }
        summary.append(row)
        log(
            f"trial {i + 1}/{len(plan)}: val {'F1' if task == 'safety' else 'accuracy'}"
            f"{' (mean over sources)' if prep.val_groups is not None else ''} {hist['best_val']:.4f} "
            f"(epoch {hist['best_epoch']}/{hist['epochs_run']}, {hist['seconds']:.1f} s) "
            f"lr={hp.lr:.2e} bs={hp.batch_size} wd={hp.weight_decay:.3f} {params}"
        )
        if best is None or hist["best_val"] > best[3]["best_val"]:
            best = (module, hp, params, hist)
        else:
            del module
    module, hp, params, hist = best
    module.eval()
    probs = host_probabilities(hist["val_logits"])  # [N_val, C] float64
    ops = operating_points(prep.y_val, probs[:, 1], threshold_fpr, log) if num_classes == 2 else None
    if ops and threshold_fpr is not None and reads == "response" and getattr(module, "streamable", False):
        # a streaming response probe acts through the stop rule after every pass: calibrate that
        from singlepass.models.streaming import stop_operating_point

        ops["active"] = f"stop-fpr@{threshold_fpr:g}"
        ops["points"][ops["active"]] = stop_operating_point(module, prep.val_src, prep.y_val, threshold_fpr)
        pt = ops["points"][ops["active"]]
        log(
            f"stop rule calibrated on validation ({pt['consecutive']} passes in a row): threshold "
            f"{pt['threshold']:.4f} stops {pt['fpr']:.1%} of safe and {pt['tpr']:.1%} of unsafe responses"
        )
    threshold = ops["points"][ops["active"]]["threshold"] if ops else None
    val_metrics = compute_metrics(prep.y_val, probs, threshold)
    by_source = None
    if prep.val_groups is not None:
        by_source = {
            str(g): compute_metrics(prep.y_val[prep.val_groups == g], probs[prep.val_groups == g], threshold)
            for g in dict.fromkeys(prep.val_groups.tolist())
        }
    hp_dict = {k: v for k, v in asdict(hp).items() if k != "params"}
    cfg = {
        "probe": method,
        "input": family.input,
        "params": params,
        "num_layers": L1,
        "hidden_size": d,
        "label_names": list(train_ds.label_names),
        "task": task,
        "threshold": threshold,  # the active operating point's (what export and the runtime use)
        "operating_point": ops["active"] if ops else None,
        "operating_points": ops["points"] if ops else None,
        "prompt_format": prompt_format,
        "max_length": max_length,
        **({"reads": "response", "max_response_tokens": max_response_tokens} if reads == "response" else {}),
        "backbone": backbone.fingerprint,
        "seed": seed,
        "recipe": RECIPE,
        "hparams": hp_dict,
        "trainable_parameters": count_parameters(module),
        "data": {
            "dataset": train_ds.name,
            "train_split": train_ds.split,
            "train_rows": len(train_ds),
            "validation_split": val_ds.split,
            "validation_rows": len(val_ds),
        },
        "training": {
            "selection_metric": ("f1" if task == "safety" else "accuracy")
            + (" (mean over sources; accuracy for one-sided sources)" if prep.val_groups is not None else ""),
            "best_val": hist["best_val"],
            "best_epoch": hist["best_epoch"],
            "epochs_run": hist["epochs_run"],
            "seconds": round(hist["seconds"], 2),
            "search_seconds": round(time.perf_counter() - t_all, 2),
            "trials": summary,
            "history": hist["history"],
        },
        "validation": val_metrics,
        "validation_by_source": by_source,
    }
    return module, cfg
