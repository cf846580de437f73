"""Response benchmark: streaming response probes vs a MiniLM guard run after generation (issue 15).

    singlepass bench response [--methods pooling pooling-max gate gate-prefix mha-stream mha last-token guard
        gate-stop mha-stream-stop] [--seeds 0]
        [--limit 1000] [--val-limit 300] [--test-limit N] [--max-response-tokens 64] [--estimate-only]
    singlepass bench response --cost          (the timing phase alone; run it on a quiet machine)
    singlepass bench response --table-only    (re-render response.md from response.json)
    (or: python -m singlepass.benchmarks.response ...)

Training data: the response mixture ``beavertails,gptfuzz`` (models/mixture.py: one safe/unsafe
label space, overlaps with every test part removed), at most ``--limit`` training and
``--val-limit`` validation rows per source (seeded, stratified). Every probe reads at most the
first ``--max-response-tokens`` response tokens after the prompt in the serving view
(models/prompts.py ``encode_responses``); the guard reads the same cut response, decoded back to
text, as ``"User: <prompt>\\nAssistant: <cut response>"``.

Methods (``METHODS``): the streaming probes ``pooling`` (token mean), ``pooling-max`` (token max,
layer mean), ``gate``, ``gate-prefix`` (the gate trained with prefix augmentation: each time a
training row is drawn, with probability 0.5 it is read as a random prefix of its response,
``HParams.prefixes``; models/batches.py ``random_prefixes``), ``mha-stream`` (MHA with
``query=learned``: attention pooling with a learned query per head, its recurrent variant), and
``gate-stop`` / ``mha-stream-stop`` (the same two trained for the stop rule, ``stream_loss=stop``:
on their logits after every decode pass, every pass of a safe response toward safe, a harmful one's
finished response and best early window toward unsafe; models/streaming.py ``stop_loss``),
evaluated on the finished cut response and replayed token by token through their streaming form
(``stream_update``) for early detection; ``mha`` (the paper's self-attention, ``query=tokens``: no
streaming form, every token attends to every other, so it is evaluated on the whole cut response,
a reference);
``last-token`` (a linear probe on the last response token's final-layer state); ``guard``: the
MiniLM classifier of benchmarks/guards.py fine-tuned on the same rows' text, run once on the
finished cut response. Every probe stores its validation (F1-optimal) threshold; the guard too.

Tests: BeaverTails and GPTFuzz test (in distribution), SafeRLHF test and WildGuardTest's response
rows (``wildguardmix_response`` ``test_untouched``) out of distribution; F1 at the stored
threshold, AUPRC and TPR at 1% FPR (benchmarks/loso.py ``source_metrics``).

Early detection (streaming methods): each test response is replayed through the probe's streaming
state (``separation_by_pass``: the ROC AUC of the score after pass k, k = 1, 2, 4, ..., 64, over
the responses still running at k: how much the probe can tell after k tokens, whatever the rule),
and the runtime's stop rule (runtime/policy.py ``Streaks``: P(unsafe) >= threshold on 2 decode
passes in a row, pass k having seen response tokens 1..k) gives the first pass k that
would stop the response (``stop_pass``). Harmful rows: median / p90 of k over the flagged rows,
the share flagged within 32 tokens and the share never flagged; safe rows: the false-stop rate.

Cost (``--cost``, a separate phase): the decode-step time of the base model and of the base + each
streaming response probe (``--cost-probe``, default the gate and the streaming MHA; one artifact
each), all exported (int4) into the cache and timed alternately with
``runtime.passes.decode_one_token`` at batch 1 and 8; and the guard re-run every 32 tokens:
ceil(tokens / 32) guard calls (batch 1) per response on its prefix texts, vs one call at the end.

Caching and resume: the hidden states of the training, validation and test rows are cached once
(models/cache.py); each (method, seed) is a normal probe artifact (config.json + model.safetensors)
under ``$SINGLEPASS_CACHE/response/<data key>/<method>-seed<S>/`` with its evaluation beside it
(``<method>-seed<S>-<eval key>.json``), the guard under ``guards/minilm-mixture-<key>``, the cost
phase's numbers in ``cost.json``; a rerun skips what is stored. ``RESULTS/response.json`` and
``RESULTS/response.md`` are rewritten after every finished (method, seed); the report is rendered
from the stored doc alone (``benchmarks/response_report.py``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from singlepass.benchmarks.machine import SETTLE_S, settle, torch_machine
from singlepass.benchmarks.outputs import add_out_arg, results_dir
from singlepass.files import atomic_write
from singlepass.models.streaming import EARLY_TOKENS

MIXTURE = "beavertails,gptfuzz"
# (dataset, split): the held-out test parts; the last two are out of distribution
TESTS = (
    ("beavertails", "test"),
    ("gptfuzz", "test"),
    ("saferlhf", "test"),
    ("wildguardmix_response", "test_untouched"),
)
IN_DIST = ("beavertails", "gptfuzz")
OOD = ("saferlhf", "wildguardmix_response")
# method -> (--probe family, constructor parameters), or None for the fine-tuned MiniLM guard
METHODS = {
    "pooling": ("pooling", {"token_pool": "mean", "layer_pool": "mean"}),
    "pooling-max": ("pooling", {"token_pool": "max", "layer_pool": "mean"}),
    "gate": ("gate", {}),
    "gate-prefix": ("gate", {"prefixes": 0.5}),  # half the training rows read as a random response prefix
    "mha-stream": ("mha", {"query": "learned"}),
    # trained for the stop rule: the logits after every decode pass (models/streaming.py stop_loss)
    "gate-stop": ("gate", {"stream_loss": "stop"}),
    "mha-stream-stop": ("mha", {"query": "learned", "stream_loss": "stop"}),
    "mha": ("mha", {}),
    "last-token": ("last-token", {}),
    "guard": None,
}
# replayed token by token (early detection)
STREAMING = ("pooling", "pooling-max", "gate", "gate-prefix", "mha-stream", "gate-stop", "mha-stream-stop")
# trained through the whole [L+1, B, T, d] tensor every step
HEAVY = ("gate", "gate-prefix", "mha-stream", "gate-stop", "mha-stream-stop", "mha")
# trained through every decode pass (stream_loss=stop): a training step's time over a whole-row step's, by family
# (one batch of 64 rows x 64 tokens, forward and backward, 2 threads; session 30); not in the default --methods
STOP_TRAINING = {"gate-stop": 5.0, "mha-stream-stop": 2.6}
CONSECUTIVE = 2  # the runtime's stop rule: flagged on this many decode passes in a row
WITHIN = EARLY_TOKENS  # early-detection window (tokens) and the guard's re-run period
# The stop-calibrated operating point (train --threshold-at-fpr of a streaming response probe): the
# threshold at which the stop rule stops at most this share of the safe validation responses.
STOP_FPR = 0.05
BY_PASS = (1, 2, 4, 8, 16, 32, 64)  # the decode passes whose scores' separation the report shows
# The response guard: the latency benchmark's MiniLM recipe, longer texts truncated on the LEFT so
# the whole cut response is always kept (64 SmolLM2 tokens are at most ~80 MiniLM tokens; a long
# WildGuardTest prompt loses its beginning instead).
GUARD_RECIPE = {"max_length": 256, "truncation": "left"}
GUARD_VIEW = "User: <prompt>\nAssistant: <the first N response tokens, decoded>"
# Seconds for the printed estimate, besides benchmarks/loso.py COST: one streaming replay per test
# row (all its tokens, batched), one validated int4 export (rough), one decode step at batch 1 and 8
# (benchmarks/results/engine_steps.md), one guard call.
REPLAY_ROW = 0.01
EXPORT = 300.0
STEP = {1: 0.02, 8: 0.03}
GUARD_CALL = 0.01


# --- the stop rule and early detection ----------------------------------------------------------------


def separation_by_pass(scores: np.ndarray, labels, passes=BY_PASS) -> list[dict]:
    """How well the score after decode pass k alone separates harmful from safe responses: scores [N, T]
    (``stream_scores``: NaN past a row's end), labels [N] -> per k in ``passes`` (within T) the rows still
    running at k and the ROC AUC of their scores after pass k (None when one class is missing)."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(labels)
    out = []
    for k in (k for k in passes if k <= scores.shape[1]):
        live = ~np.isnan(scores[:, k - 1])
        both = len(np.unique(y[live])) == 2
        auroc = float(roc_auc_score(y[live], scores[live, k - 1])) if both else None
        out.append({"pass": k, "rows": int(live.sum()), "auroc": auroc})
    return out


def stop_pass(scores, threshold: float, consecutive: int = CONSECUTIVE) -> int | None:
    """The first decode pass k (1-based: pass k has seen response tokens 1..k) at which the runtime's
    ``stop`` rule fires on these per-pass P(unsafe) scores, or None if it never does. The rule is
    ``runtime.policy.Streaks`` itself, fed through a one-probe adapter."""
    from singlepass.runtime.passes import Label
    from singlepass.runtime.policy import Rule, Streaks

    probe = SimpleNamespace(name="response", reads="response", threshold=threshold)
    watch = Streaks({"response": Rule("stop", threshold=threshold, consecutive=consecutive)}, [probe])
    for k, s in enumerate(scores, 1):
        if watch.update({"response": Label("", float(s), [])}):
            return k
    return None


def detection(first: list[int | None], labels, within: int = WITHIN) -> dict:
    """Early-detection summary of the stop passes ``first`` (None: never stopped) of one test set:
    on its harmful rows (label 1) the median / p90 pass over the flagged ones, the share flagged
    within ``within`` tokens and the share never flagged; on its safe rows the false-stop rates."""
    y = np.asarray(labels)
    harm = [k for k, lb in zip(first, y) if lb == 1]
    safe = [k for k, lb in zip(first, y) if lb == 0]
    flagged = np.asarray([k for k in harm if k is not None], dtype=np.float64)

    def share(rows, hit):
        return float(np.mean([hit(k) for k in rows])) if rows else None

    return {
        "harmful_rows": len(harm),
        "flagged": int(len(flagged)),
        "median_tokens": float(np.median(flagged)) if len(flagged) else None,
        "p90_tokens": float(np.percentile(flagged, 90)) if len(flagged) else None,
        "within": within,
        "flagged_within": share(harm, lambda k: k is not None and k <= within),
        "never_flagged": share(harm, lambda k: k is None),
        "safe_rows": len(safe),
        "false_stop": share(safe, lambda k: k is not None),
        "false_stop_within": share(safe, lambda k: k is not None and k <= within),
    }


# --- data ---------------------------------------------------------------------------------------------


@dataclass
class Data:
    mixture: object  # models.mixture.Mixture
    tests: dict  # name -> Dataset (safe/unsafe labels)
    plans: dict  # "train" / "validation" / test name -> (CachePlan, Encoded)

    def sets(self) -> dict:
        return {"train": self.mixture.train, "validation": self.mixture.validation, **self.tests}


def load_data(args, bb) -> Data:
    from singlepass.models import cache as state_cache
    from singlepass.models.data import load_dataset
    from singlepass.models.mixture import load_mixture, to_safety

    m = load_mixture(MIXTURE, args.data_dir, limit=args.limit, val_limit=args.val_limit, seed=0)
    tests = {n: to_safety(load_dataset(n, split, args.data_dir, limit=args.test_limit)) for n, split in TESTS}
    data = Data(m, tests, {})
    for key, ds in data.sets().items():
        data.plans[key] = state_cache.plan(
            bb, ds, "chat", args.max_length, cache_dir=args.cache_dir, max_response_tokens=args.max_response_tokens
        )
    return data


def cut_text(tokenizer, prompt: str, ids: list[int]) -> str:
    """The guard's view of a (prompt, response tokens) pair."""
    from singlepass.models.data import pair_text

    return pair_text(prompt, tokenizer.decode(ids))


def response_ids(enc, i: int) -> list[int]:
    """The response tokens a probe reads of row i (the first max_response_tokens)."""
    return enc.ids[i][len(enc.ids[i]) - enc.stored[i] :]


def guard_view(ds, enc, tokenizer):
    """``ds`` with each text replaced by the guard's view of its cut response (other columns kept)."""
    out = ds.subset(np.arange(len(ds)))
    out.texts = [cut_text(tokenizer, p, response_ids(enc, i)) for i, p in enumerate(ds.columns["prompt"])]
    return out


def data_summary(data: Data) -> dict:
    out = {}
    for key, ds in data.sets().items():
        p, enc = data.plans[key]
        out[key] = {
            "split": ds.split,
            "rows": len(ds),
            "unsafe": int(ds.labels.sum()),
            "responses_cut": enc.n_response_truncated,
            "response_tokens_dropped": int(sum(enc.response_cut)),
            "response_tokens": p.n_tokens,
        }
    return out


# --- keys, paths, the estimate ------------------------------------------------------------------------


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def data_key(args, bb, data: Data) -> str:
    from singlepass.models.cache import texts_digest

    m = data.mixture
    spec = {
        "mixture": MIXTURE,
        "limit": args.limit,
        "val_limit": args.val_limit,
        "max_response_tokens": args.max_response_tokens,
        "max_length": args.max_length,
        "backbone": bb.fingerprint["sha256"],
        "rows": texts_digest(m.train.texts + m.validation.texts, np.concatenate([m.train.labels, m.validation.labels])),
    }
    return _hash(spec)


def trials_for(args, method: str) -> int:
    return args.trials_heavy if method in HEAVY else args.trials


def run_dir(args) -> Path:
    return args.cache_root / "response" / args.key


def probe_tag(args, method: str, seed: int) -> dict:
    """What a stored probe (or guard) must have been trained with to be reused."""
    from singlepass.models.train import RECIPE

    if METHODS[method] is None:
        return {"guard": guard_recipe(seed), "spec": guard_spec(args, seed)}
    return {
        "recipe": RECIPE,
        "method": method,
        "params": METHODS[method][1],
        "seed": seed,
        "first_seed": args.seeds[0],
        "trials": trials_for(args, method),
        "epochs": args.epochs,
        "data": args.key,
    }


def result_path(args, method: str, seed: int, data: Data) -> Path:
    from singlepass.models.cache import texts_digest

    spec = {
        "tag": probe_tag(args, method, seed),
        "test_limit": args.test_limit,
        "tests": {n: texts_digest(ds.texts, ds.labels) for n, ds in data.tests.items()},
        "stop_rule": [CONSECUTIVE, WITHIN] + ([STOP_FPR] if method in STREAMING else []),
    }
    return run_dir(args) / f"{method}-seed{seed}-{_hash(spec)}.json"


def cost_path(args) -> Path:
    return run_dir(args) / "cost.json"


def estimate(args, data: Data, methods: list[str]) -> dict:
    """Seconds per phase (benchmarks/loso.py COST, measured on this 2-core machine; early stopping
    usually finishes sooner) and the disk the hidden-state caches not yet built need."""
    from singlepass.benchmarks.loso import COST, GUARD_EPOCHS

    tokens, stored, stored_bytes = 0, 0, 0
    all_bytes = sum(p.total_bytes for p, _ in data.plans.values())
    for p, enc in data.plans.values():
        if not ((p.folder / "meta.json").exists() and not (p.folder / "progress.json").exists()):
            tokens += enc.n_tokens
            stored += p.n_tokens
            stored_bytes += p.total_bytes
    per = {"extract": tokens / COST["extract_tokens_per_s"]}
    n_tr, n_va = len(data.mixture.train), len(data.mixture.validation)
    n_test = sum(len(ds) for ds in data.tests.values())
    for method in methods:
        for seed in args.seeds:
            if result_path(args, method, seed, data).is_file():
                continue
            t = trials_for(args, method)
            if method == "guard":
                s = COST["guard"] * n_tr * GUARD_EPOCHS + COST["eval_guard"] * (n_va * GUARD_EPOCHS + n_test)
            elif method in HEAVY:
                train = (
                    COST[METHODS[method][0]] * n_tr * STOP_TRAINING.get(method, 1.0)
                    + COST[METHODS[method][0]] * n_va / 2
                )
                s = train * args.epochs * t + COST["eval_states"] * n_test
            else:  # pooling / last-token: one feature pass, the head is free
                s = COST["pooling_pass"] * (n_tr + n_va) + COST["eval_states"] * n_test
            if method in STREAMING:
                s += REPLAY_ROW * n_test
            per[method] = per.get(method, 0.0) + s
    n_art = 1 + len(set(args.cost_probe))
    cost = n_art * EXPORT + args.cost_repeats * args.cost_steps * n_art * sum(STEP.values())
    cost += (n_art - 1) * args.cost_pairs * 3 * sum(STEP.values())  # the in-session rounds (benchmarks/switch.py)
    cost += args.cost_rows * 3 * math.ceil(args.cost_tokens / WITHIN) * GUARD_CALL
    return {
        "seconds": per,
        "total": sum(per.values()),
        "extract_tokens": tokens,
        "stored_tokens": stored,
        "cache_bytes": stored_bytes,
        "all_cache_bytes": all_bytes,
        "cost_seconds": cost,
    }


def _fmt(s: float) -> str:
    return f"{s / 3600:.1f} h" if s >= 5400 else f"{s / 60:.0f} min"


# --- one (method, seed) ---------------------------------------------------------------------------------


def ensure_probe(args, bb, method: str, seed: int, data: Data, log):
    """Train (or reuse) the method's probe artifact for this seed -> (module, cfg, folder). Seeds
    after the first reuse the first seed's selected configuration (as bench accuracy)."""
    from singlepass.errors import SinglepassError
    from singlepass.models.probe_io import load_probe, read_config, save_probe
    from singlepass.models.search import HParams
    from singlepass.models.train import train_probe

    family, params = METHODS[method]
    out = run_dir(args) / f"{method}-seed{seed}"
    tag = probe_tag(args, method, seed)
    try:
        if read_config(out).get("bench") == tag:
            module, cfg = load_probe(out, bb.fingerprint)
            return module, cfg, out
    except SinglepassError:
        pass
    hparams = None
    if seed != args.seeds[0]:
        first = read_config(ensure_probe(args, bb, method, args.seeds[0], data, log)[2])
        hparams = HParams.from_dict({**first["hparams"], "params": first["params"]})
    log(f"=== train {method} / seed {seed}  ({time.strftime('%H:%M:%S')})")
    m = data.mixture
    module, cfg = train_probe(
        family,
        bb,
        m.train,
        m.validation,
        max_length=args.max_length,
        seed=seed,
        trials=trials_for(args, method),
        max_epochs=args.epochs,
        overrides=params,
        hparams=hparams,
        cache_dir=args.cache_dir,
        progress=not args.no_progress,
        log=log,
        max_response_tokens=args.max_response_tokens,
    )
    cfg["data"]["mixture"] = m.report
    cfg["bench"] = tag
    save_probe(out, module, cfg)
    module, cfg = load_probe(out, bb.fingerprint)  # evaluate exactly what was saved
    return module, cfg, out


def guard_recipe(seed: int) -> dict:
    from singlepass.benchmarks.guards import CLASSIFIER_RECIPE

    return {**CLASSIFIER_RECIPE, **GUARD_RECIPE, "seed": seed}


def guard_spec(args, seed: int) -> dict:
    return {
        "mixture": MIXTURE,
        "limit": args.limit,
        "val_limit": args.val_limit,
        "max_response_tokens": args.max_response_tokens,
        "max_length": args.max_length,
        "view": GUARD_VIEW,
        "seed": seed,
    }


def ensure_guard(args, bb, seed: int, data: Data, log) -> Path:
    """The MiniLM guard fine-tuned on the mixture's rows as the guard sees them (cut responses)."""
    from singlepass.benchmarks.guards import ensure_mixture_classifier

    tok = bb.tokenizer
    train = guard_view(data.mixture.train, data.plans["train"][1], tok)
    val = guard_view(data.mixture.validation, data.plans["validation"][1], tok)
    return ensure_mixture_classifier(
        train, val, guard_spec(args, seed), args.cache_dir, args.threads, log, recipe=guard_recipe(seed)
    )


def run_one(args, bb, method: str, seed: int, data: Data, log) -> dict:
    from singlepass.benchmarks.loso import source_metrics
    from singlepass.models import cache as state_cache
    from singlepass.models.evaluate import predict_proba
    from singlepass.models.streaming import stop_operating_point, stream_scores

    t0 = time.perf_counter()
    tests = {}
    if METHODS[method] is None:
        from singlepass.benchmarks.guards import ClassifierGuard, score_in_batches

        folder = ensure_guard(args, bb, seed, data, log)
        guard = ClassifierGuard(folder, threads=args.threads)
        threshold = guard.threshold
        for name, ds in data.tests.items():
            texts = guard_view(ds, data.plans[name][1], bb.tokenizer).texts
            p = score_in_batches(guard.score, texts, 16)
            tests[name] = {"split": ds.split, **source_metrics(ds.labels, p, threshold), "early": None}
        cfg = guard.cfg
        info = {
            "parameters": cfg["parameters"],
            "train_seconds": cfg["training"]["seconds"],
            "best_epoch": cfg["training"]["best_epoch"],
            "params": {k: cfg["recipe"][k] for k in ("max_length", "truncation", "epochs", "lr")},
            "artifact": str(folder),
        }
    else:
        module, cfg, folder = ensure_probe(args, bb, method, seed, data, log)
        threshold = cfg["threshold"]
        log(f"=== eval {method} / seed {seed}  ({time.strftime('%H:%M:%S')})")

        def states(ds):
            return state_cache.build(
                bb,
                ds,
                cfg["prompt_format"],
                cfg["max_length"],
                cache_dir=args.cache_dir,
                progress=False,
                log=lambda *a: None,
                max_response_tokens=cfg["max_response_tokens"],
            )

        stop_point = None
        if method in STREAMING:  # the stop rule calibrated on the validation responses, replayed
            val = data.mixture.validation
            stop_point = stop_operating_point(module, states(val), val.labels, STOP_FPR)
        for name, ds in data.tests.items():
            p = predict_proba(module, cfg, bb, ds, args.cache_dir, progress=not args.no_progress, log=log)[:, 1]
            t = {"split": ds.split, **source_metrics(ds.labels, p, threshold), "early": None}
            if method in STREAMING:
                cache = states(ds)
                s = stream_scores(module, cache, progress=not args.no_progress, desc=f"replay {name}")
                last = s[np.arange(len(ds)), cache.lengths - 1]
                t["stream_vs_whole_max_abs_diff"] = float(np.abs(last - p).max())
                t["by_pass"] = separation_by_pass(s, ds.labels)
                t["early"] = detection([stop_pass(r[:n], threshold) for r, n in zip(s, cache.lengths)], ds.labels)
                t["early_stop_fpr"] = detection(
                    [stop_pass(r[:n], stop_point["threshold"]) for r, n in zip(s, cache.lengths)], ds.labels
                )
            tests[name] = t
        info = {
            "parameters": cfg["trainable_parameters"],
            "train_seconds": cfg["training"]["seconds"],
            "search_seconds": cfg["training"]["search_seconds"],
            "best_epoch": cfg["training"]["best_epoch"],
            "params": {k: v for k, v in cfg["params"].items() if k != "vocab_size"},
            "hparams": cfg["hparams"],
            "validation_by_source": cfg.get("validation_by_source"),
            "stop_point": stop_point,
            "artifact": str(folder),
        }
    return {
        "method": method,
        "seed": seed,
        "streaming": method in STREAMING,
        "threshold": threshold,
        "train_rows": len(data.mixture.train),
        "validation_rows": len(data.mixture.validation),
        **info,
        "tests": tests,
        "seconds": round(time.perf_counter() - t0, 1),
        "machine": torch_machine(),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }


def committed(args, results: Path | None) -> dict:
    """The results folder's response.json when it was written for this data key and these settings, else {}."""
    doc = results / "response.json" if results is not None else None
    if doc is None or not doc.is_file():
        return {}
    old = json.loads(doc.read_text())
    return old if old.get("key") == args.key and old.get("settings") == settings_of(args) else {}


def stored_runs(args, data: Data, results: Path | None = None) -> list[dict]:
    """Every stored (method, seed) of this data key and these settings, in method then seed order:
    from the cache, else from the results folder's response.json when it was written for the same
    data key and settings (so a ``--cost`` run on a machine without the cache keeps the committed
    accuracy runs)."""
    kept = {(r["method"], r["seed"]): r for r in committed(args, results).get("runs", [])}
    out = []
    for method in METHODS:
        for seed in args.seeds:
            path = result_path(args, method, seed, data)
            if path.is_file():
                out.append(json.loads(path.read_text()))
            elif (method, seed) in kept:
                out.append(kept[(method, seed)])
    return out


# --- the cost phase ---------------------------------------------------------------------------------------


def _median(v) -> float:
    return float(np.median(np.asarray(v, dtype=np.float64)))


def decode_overhead(
    artifacts: dict, prompt: str, threads: int, batches=(1, 8), repeats: int = 15, steps: int = 8, warmup: int = 8
) -> dict:
    """Decode-step time of each artifact ({name: folder}; the first is the base, the others carry one
    probe each) at each batch size: one prompt (repeated for batch B) prefilled, ``warmup`` greedy
    decode steps, then ``repeats`` blocks, the artifacts alternating block by block (the order rotated
    every repeat). A block: an idle ``machine.SETTLE_S``, an untimed and a timed prefill of the prompt
    ("prefill_ms", a request's other cost), one untimed decode step, then ``steps`` chained decode steps
    from that state, timed.
    -> {"batch B": {"base_ms" (median per step), "base_prefill_ms", "probes": {name: {"probe_ms",
    "overhead_ms", "overhead_pct": the median over repeats of (probe block / base block - 1) x 100,
    "overhead_pct_iqr": its interquartile range, "min_overhead_pct": the fastest probe block over the
    fastest base block, "prefill_ms", "prefill_overhead_pct" (paired, as the decode one)}},
    "block_ms": every block's time per step, ...}}: per-repeat ratios, so a machine drifting during the
    run cancels; the minima, so a noisy one's disturbances (which only ever add time) drop out."""
    from singlepass.runtime.api import load
    from singlepass.runtime.passes import decode_one_token, last_logits, prefill

    rts = {name: load(folder, threads=threads) for name, folder in artifacts.items()}
    names = list(rts)
    prompt_ids = {name: rt.encode(prompt, truncate=True)[0] for name, rt in rts.items()}
    out = {}
    for b in batches:
        start = {}
        for name, rt in rts.items():
            o, st = prefill(rt.backend, rt.manifest, [prompt_ids[name]] * b)
            for _ in range(warmup):
                toks = last_logits(rt.manifest, o).argmax(-1).astype(np.int64)  # [B]
                o, st = decode_one_token(rt.backend, rt.manifest, st, toks)
            start[name] = (st, toks)
        times = {name: [] for name in names}
        pre = {name: [] for name in names}  # the prompt's prefill pass (no response token: the probe's fold skips)
        for r in range(repeats):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                rt, (st, toks), ids = rts[name], start[name], prompt_ids[name]
                settle()  # the other artifacts' threads asleep (machine.SETTLE_S)
                prefill(rt.backend, rt.manifest, [ids] * b)  # untimed: warms this session's threads
                t0 = time.perf_counter()
                prefill(rt.backend, rt.manifest, [ids] * b)
                pre[name].append(time.perf_counter() - t0)
                decode_one_token(rt.backend, rt.manifest, st, toks)  # untimed, as above
                t0 = time.perf_counter()
                for _ in range(steps):
                    _, st = decode_one_token(rt.backend, rt.manifest, st, toks)
                times[name].append((time.perf_counter() - t0) / steps)
        ms = {name: 1e3 * _median(v) for name, v in times.items()}
        base = np.asarray(times[names[0]])
        # per repeat: the probe's block over the base's block of the same rotation, in %
        pct = {name: 100.0 * (np.asarray(times[name]) / base - 1.0) for name in names[1:]}
        pre_pct = {name: 100.0 * (np.asarray(pre[name]) / np.asarray(pre[names[0]]) - 1.0) for name in names[1:]}
        out[f"batch {b}"] = {
            "batch": b,
            "base_ms": ms[names[0]],
            "base_prefill_ms": 1e3 * _median(pre[names[0]]),
            "probes": {
                name: {
                    "probe_ms": ms[name],
                    "overhead_ms": ms[name] - ms[names[0]],
                    "overhead_pct": _median(pct[name]),
                    "overhead_pct_iqr": [float(np.percentile(pct[name], q)) for q in (25, 75)],
                    # the fastest blocks: noise (other processes, the VM's neighbours) only ever adds time
                    "min_overhead_pct": 100.0 * (min(times[name]) / min(times[names[0]]) - 1.0),
                    "prefill_ms": 1e3 * _median(pre[name]),
                    "prefill_overhead_pct": _median(pre_pct[name]),
                }
                for name in names[1:]
            },
            "repeats": repeats,
            "steps": steps,
            "block_ms": {name: [round(1e3 * t, 4) for t in v] for name, v in times.items()},  # per step, in order
            "context_tokens": len(prompt_ids[names[0]]) + warmup,
        }
    return out


def guard_rerun_cost(
    guard_folder, rows: list[tuple[str, list[int]]], tokenizer, threads: int, every: int = WITHIN, repeats: int = 3
) -> dict:
    """The guard re-run every ``every`` generated tokens vs once on the finished response: for each
    (prompt, response token ids) row, ceil(n / every) batch-1 guard calls on the prefix texts (tokens
    1..every, 1..2 x every, ..., 1..n); each call timed as the median of ``repeats``."""
    from singlepass.benchmarks.guards import ClassifierGuard

    guard = ClassifierGuard(guard_folder, threads=threads)
    for _ in range(3):
        guard.score(["User: warm up\nAssistant: ok"])
    per = []
    for prompt, ids in rows:
        n = len(ids)
        cuts = [*range(every, n, every), n]  # ceil(n / every) calls
        call_ms = []
        for k in cuts:
            text = [cut_text(tokenizer, prompt, ids[:k])]
            ts = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                guard.score(text)
                ts.append(time.perf_counter() - t0)
            call_ms.append(1e3 * _median(ts))
        per.append({"tokens": n, "calls": len(cuts), "rerun_ms": sum(call_ms), "once_ms": call_ms[-1]})
    tokens = sum(r["tokens"] for r in per)
    return {
        "rows": len(per),
        "every": every,
        "repeats": repeats,
        "mean_tokens": tokens / len(per),
        "mean_calls": float(np.mean([r["calls"] for r in per])),
        "rerun_ms_per_response": float(np.mean([r["rerun_ms"] for r in per])),
        "once_ms_per_response": float(np.mean([r["once_ms"] for r in per])),
        "rerun_ms_per_token": sum(r["rerun_ms"] for r in per) / tokens,
        "once_ms_per_token": sum(r["once_ms"] for r in per) / tokens,
    }


def cost_rows(data: Data, n: int, tokenizer, max_tokens: int, seed: int = 0) -> list[tuple[str, list[int]]]:
    """``n`` (prompt, response ids) rows drawn evenly from the test sets (seeded): each response's
    first ``max_tokens`` tokens, as a generation of that length would produce them."""
    from singlepass.models.prompts import encode_responses

    rng = np.random.default_rng(seed)
    out = []
    per = max(1, math.ceil(n / len(data.tests)))
    for ds in data.tests.values():
        for i in sorted(rng.choice(len(ds), min(per, len(ds)), replace=False).tolist()):
            p, r = ds.columns["prompt"][i], ds.columns["response"][i]
            out.append((p, response_ids(encode_responses(tokenizer, [p], [r], max_response_tokens=max_tokens), 0)))
    return out[:n]


def switched_phase(args, folders: dict, prompt: str, log) -> dict:
    """Each streaming probe's decode-step cost inside one session (``benchmarks/switch.py``): its artifact
    ({method: folder}) copied with the probe behind ``singlepass/probe_on``, ``--cost-pairs`` rounds of
    on / off / off steps at batch 1 and 8. -> {method: ``switched_overhead``'s result}."""
    from singlepass.benchmarks.switch import switchable, switched_overhead

    log(f"== decode steps in one session, each probe switched on / off / off ({args.cost_pairs} rounds)")
    out = {}
    for m, folder in folders.items():
        sw = switchable(folder, Path(folder).with_name(f"{Path(folder).name}-switch"))
        out[m] = switched_overhead(sw, prompt, args.threads, pairs=args.cost_pairs)
        for k, v in out[m].items():
            log(
                f"  {m}, {k}: off {v['off_ms']:.2f} ms per step, on {v['on_ms']:.2f}: {v['overhead_ms']:+.3f} ms "
                f"({v['overhead_pct']:+.2f}%; null {v['null_pct']:+.2f}%)"
            )
    return out


def cost_phase(args, bb, data: Data, log) -> dict:
    """Export (or reuse) the base and one base + streaming probe artifact per ``--cost-probe``, time
    their decode steps (alternating, one run), time each probe switched on and off inside one session
    (``benchmarks/switch.py``: the judged overhead, free of the ~5% two sessions of one artifact can
    differ by), and time the guard re-run every 32 tokens."""
    from singlepass.benchmarks.latency_prepare import artifact_current
    from singlepass.benchmarks.machine import ort_machine
    from singlepass.export.pipeline import export_artifact
    from singlepass.runtime.contract import read_artifact

    seed = args.seeds[0]
    methods = list(dict.fromkeys(args.cost_probe))
    probes = {m: ensure_probe(args, bb, m, seed, data, log)[1:] for m in methods}  # method -> (cfg, folder)
    guard = ensure_guard(args, bb, seed, data, log)
    root = args.cache_root / "bench-artifacts" / args.weights
    plan = {"base": []} | {m: [f"{probes[m][1]}:response_{m.replace('-', '_')}"] for m in methods}
    folders = {}
    for name, specs in plan.items():
        folder = root / f"response-{name}"
        current = artifact_current(folder, specs, bb.fingerprint["sha256"], args.weights)
        if not (current and read_artifact(folder).limits.max_batch >= 8):
            log(f"exporting artifact {folder.name!r} ({args.weights} weights) -> {folder} ...")
            s = export_artifact(
                folder,
                specs,
                backbone=bb,
                force=True,
                weights=args.weights,
                max_batch=8,
                max_prompt_length=args.max_length,
                log=lambda *a: None,
            )
            log(f"  {folder.name}: {s['seconds']} s, {s['bytes'] / 2**20:,.0f} MiB, validated")
        folders[name] = folder
    machine_before = ort_machine()
    log(f"machine: {machine_before}")
    prompt = data.tests["beavertails"].columns["prompt"][0]
    log(f"== decode steps: base vs base + streaming {', '.join(methods)}, batch 1 and 8, {args.threads} threads")
    decode = decode_overhead(folders, prompt, args.threads, repeats=args.cost_repeats, steps=args.cost_steps)
    for k, v in decode.items():
        log(
            f"  {k}: base {v['base_ms']:.2f} ms per step; "
            + "; ".join(f"+ {m} {p['probe_ms']:.2f} ms ({p['overhead_pct']:+.2f}%)" for m, p in v["probes"].items())
        )
    switched = switched_phase(args, {m: folders[m] for m in methods}, prompt, log)
    n = args.cost_tokens
    log(f"== guard re-run every {WITHIN} tokens on {args.cost_rows} test responses of up to {n} tokens (batch 1)")
    rows = cost_rows(data, args.cost_rows, bb.tokenizer, n)
    rerun = {"max_tokens": n, **guard_rerun_cost(guard, rows, bb.tokenizer, args.threads)}
    log(
        f"  {rerun['rerun_ms_per_response']:.1f} ms per response ({rerun['mean_calls']:.2f} calls) vs "
        f"{rerun['once_ms_per_response']:.1f} ms once"
    )
    return {
        "weights": args.weights,
        "threads": args.threads,
        "settle_s": SETTLE_S,  # idle before each block (decode_cost)
        "probes": {m: {"artifact": str(folder), "threshold": cfg["threshold"]} for m, (cfg, folder) in probes.items()},
        "artifacts": {k: str(v) for k, v in folders.items()},
        "decode": decode,
        "switched": switched,
        "guard": {"folder": str(guard), **rerun},
        "machine": machine_before,
        "loadavg_end": list(os.getloadavg()),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }


# --- the stored doc (benchmarks/response_report.py renders it) ----------------------------------------------


def settings_of(args) -> dict:
    """The run settings the stored doc records (and a stored run must share to be reused)."""
    return {
        "mixture": MIXTURE,
        "limit": args.limit,
        "val_limit": args.val_limit,
        "test_limit": args.test_limit,
        "max_response_tokens": args.max_response_tokens,
        "max_length": args.max_length,
        "epochs": args.epochs,
        "trials": args.trials,
        "trials_heavy": args.trials_heavy,
        "seeds": list(args.seeds),
        "consecutive": CONSECUTIVE,
        "within": WITHIN,
    }


def make_doc(args, bb, data: Data, command: str, results: Path | None = None) -> dict:
    # the cost phase stored in the cache, else the results folder's (a machine without that cache keeps it)
    cost = (
        json.loads(cost_path(args).read_text()) if cost_path(args).is_file() else committed(args, results).get("cost")
    )
    if cost and "probes" not in cost:  # a cost phase of an older format (one probe): rerun --cost
        cost = None
    return {
        "model": bb.fingerprint.get("name") or args.model,
        "command": command,
        "machine": torch_machine(),
        "key": args.key,
        "settings": settings_of(args),
        "data": data_summary(data),
        "mixture": data.mixture.report,
        "runs": stored_runs(args, data, results),
        "cost": cost,
    }


# --- main ---------------------------------------------------------------------------------------------------


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(
        prog="python -m singlepass.benchmarks.response", description=__doc__.splitlines()[0]
    )
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument(
        "--methods",
        nargs="+",
        default=[m for m in METHODS if m not in STOP_TRAINING],
        choices=list(METHODS),
        help="default: all but %s (trained through every decode pass: minutes each, an experiment)"
        % ", ".join(STOP_TRAINING),
    )
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--limit", type=int, default=1000, help="training rows per source (default: %(default)s)")
    p.add_argument("--val-limit", type=int, default=300, help="validation rows per source (default: %(default)s)")
    p.add_argument("--test-limit", type=int, default=None, help="at most N rows per test set (default: all)")
    p.add_argument("--max-response-tokens", type=int, default=64, help="response tokens read (default: %(default)s)")
    p.add_argument("--max-length", type=int, default=512, help="prompt tokens (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--trials", type=int, default=4, help="search budget of pooling / last-token (default: %(default)s)")
    p.add_argument(
        "--trials-heavy", type=int, default=1, help="search budget of gate and the MHAs (default: %(default)s)"
    )
    p.add_argument(
        "--cost",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="run only the timing phase (decode-step overhead, guard re-run cost); run it alone on a quiet machine",
    )
    from singlepass.export.quantize import DEFAULT_WEIGHTS, WEIGHTS

    p.add_argument(
        "--weights",
        default=DEFAULT_WEIGHTS,
        choices=WEIGHTS,
        help="weights of the cost phase's artifacts (default: the export's, %(default)s)",
    )
    p.add_argument(
        "--cost-probe",
        nargs="+",
        default=["pooling", "gate", "mha-stream"],
        choices=list(STREAMING),
        help="the streaming probes the cost phase exports (one artifact each) and times against the base "
        "(default: %(default)s)",
    )
    p.add_argument("--cost-repeats", type=int, default=15, help="timed blocks per artifact (default: %(default)s)")
    p.add_argument("--cost-steps", type=int, default=8, help="decode steps per timed block (default: %(default)s)")
    p.add_argument(
        "--cost-switched-only",
        action="store_true",
        help="with --cost: rerun only the in-session measurement into the stored cost phase (its artifacts)",
    )
    p.add_argument(
        "--cost-pairs",
        type=int,
        default=1000,
        help="rounds of the in-session measurement (probe on, off, off again: one decode step each) per probe "
        "and batch size (default: %(default)s)",
    )
    p.add_argument("--cost-rows", type=int, default=100, help="responses the guard re-run is timed on")
    p.add_argument(
        "--cost-tokens",
        type=int,
        default=256,
        help="generated tokens the guard re-run is timed over: each timed response's first N (default: %(default)s)",
    )
    p.add_argument("--threads", type=int, default=2, help="torch / ONNX Runtime threads (default: %(default)s)")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--data-dir", default=None)
    add_out_arg(p)
    p.add_argument("--estimate-only", action="store_true", help="print the plan and the estimate, then stop")
    p.add_argument("--table-only", action="store_true", help="only rewrite response.md from response.json")
    p.add_argument("--no-progress", action="store_true")
    return p


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from singlepass.benchmarks import response_report as rep
    from singlepass.models.backbone import cache_root, load_backbone

    command = args.command or "python -m singlepass.benchmarks.response " + " ".join(sys.argv[1:])
    results = results_dir(args.out)
    if args.table_only:
        print(f"wrote {rep.redraw(results)}")
        return 0
    torch.set_num_threads(args.threads)
    log = lambda *a: print(*a, flush=True)  # noqa: E731
    args.cache_root = cache_root(args.cache_dir)
    args.cache_dir = Path(args.cache_dir) if args.cache_dir else None
    methods = [m for m in METHODS if m in args.methods]
    bb = load_backbone(args.model, args.cache_dir)
    data = load_data(args, bb)
    args.key = data_key(args, bb, data)
    est = estimate(args, data, methods)
    log(
        f"response benchmark: {len(methods)} methods x {len(args.seeds)} seed(s) ({', '.join(methods)}); key {args.key}"
    )
    for k, d in data_summary(data).items():
        log(
            f"  {k}: {d['rows']} rows ({d['unsafe']} unsafe), {d['response_tokens']:,} response tokens read, "
            f"{d['responses_cut']} responses cut to {args.max_response_tokens} tokens"
        )
    log(
        f"hidden-state caches: {est['all_cache_bytes'] / 2**30:.1f} GiB in all; still to build: "
        f"{est['stored_tokens']:,} response tokens x {data.plans['train'][0].bytes_per_token:,} bytes = "
        f"{est['cache_bytes'] / 2**30:.1f} GiB ({est['extract_tokens']:,} prompt + response tokens to run through "
        "the model)"
    )
    cost_line = (
        f"the --cost phase: ~{_fmt(est['cost_seconds'])} ({1 + len(set(args.cost_probe))} validated "
        f"{args.weights} exports included, if not cached; the {', '.join(args.cost_probe)} probes and the guard "
        "are trained first if not stored)"
    )
    if args.cost:
        log(f"estimated time (this 2-core machine): {cost_line}")
    else:
        log(
            f"estimated time (this 2-core machine, {args.epochs} epochs): {_fmt(est['total'])} in all: "
            + ", ".join(f"{k} {_fmt(v)}" for k, v in est["seconds"].items())
            + f"; {cost_line}"
        )
    if args.estimate_only:
        return 0
    results.mkdir(parents=True, exist_ok=True)
    if args.cost and args.cost_switched_only:  # the stored cost phase, its in-session measurement rerun
        from singlepass.errors import SinglepassError

        if not cost_path(args).is_file():
            raise SinglepassError(f"--cost-switched-only: no stored cost phase ({cost_path(args)}): run --cost first")
        res = json.loads(cost_path(args).read_text())
        probes = [m for m in dict.fromkeys(args.cost_probe) if m in res["artifacts"]]
        if not probes:
            raise SinglepassError(
                f"--cost-switched-only: the stored cost phase has none of {', '.join(args.cost_probe)}"
            )
        prompt = data.tests["beavertails"].columns["prompt"][0]
        res["switched"] = (res.get("switched") or {}) | switched_phase(
            args, {m: res["artifacts"][m] for m in probes}, prompt, log
        )
        res["switched_command"] = command
        atomic_write(cost_path(args), json.dumps(res, indent=1))
    elif args.cost:
        log(f"== cost phase ({time.strftime('%H:%M:%S')})")
        res = cost_phase(args, bb, data, log)
        res["command"] = command
        cost_path(args).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(cost_path(args), json.dumps(res, indent=1))
    else:
        units = [(m, s) for m in methods for s in args.seeds]
        bar = tqdm(units, desc="methods x seeds", unit="run", disable=args.no_progress)
        for method, seed in bar:
            bar.set_postfix(method=method, seed=seed)
            path = result_path(args, method, seed, data)
            if path.is_file():
                continue
            res = run_one(args, bb, method, seed, data, log)
            res["command"] = command
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, json.dumps(res, indent=1))
            f1 = {t: None if v["f1"] is None else round(100 * v["f1"], 1) for t, v in res["tests"].items()}
            log(f"--- {method} / seed {seed}: F1 {f1} ({res['seconds']:.0f} s)")
            rep.write_results(results, make_doc(args, bb, data, command, results))
    print(f"wrote {rep.write_results(results, make_doc(args, bb, data, command, results))}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.command = None if argv is None else "python -m singlepass.benchmarks.response " + " ".join(argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
