"""CLI for models/: train, eval, plot-layers, extract and answer."""

from __future__ import annotations

import argparse

TRIALS, EPOCHS = 4, 10  # train's search budget and maximum epochs per trial
DATASET_HELP = (
    "toxicchat, wildguardmix, sst2, imdb, emotion, advbench, harmbench, strongreject, alpaca_noinput or a "
    ".jsonl/.csv path; or a response set (a probe reading the response after the prompt): beavertails, "
    "gptfuzz, saferlhf, wildguardmix_response; train, eval and extract (its train or validation rows) also "
    "take a safety mixture of one kind: comma-separated sources, each with an optional weight, e.g. "
    "toxicchat:2,advbench,alpaca_noinput:0.5 or beavertails,gptfuzz; a response mixture also takes "
    "response files (every row with prompt and response, e.g. from `singlepass answer`): "
    "beavertails,gptfuzz,/path/answers.jsonl.gz:0.5"
)
DATA_DIR_HELP = (
    "datasets folder (default: $SINGLEPASS_DATA, else the nearest shared/data beside the working "
    "directory or beside a folder above it)"
)


def add_model_args(p: argparse.ArgumentParser) -> None:
    """--model and --cache-dir: which backbone, and where converted models and caches live."""
    from singlepass.models.backbone import DEFAULT_MODEL

    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="model name (smollm2-135m), Hugging Face folder or .gguf file (default: %(default)s)",
    )
    p.add_argument("--cache-dir", default=None, help="cache folder (default: $SINGLEPASS_CACHE or ~/.cache/singlepass)")


def add_backbone_args(p: argparse.ArgumentParser) -> None:
    from singlepass.models.prompts import DEFAULT_MAX_LENGTH, DEFAULT_MAX_RESPONSE_TOKENS, PROMPT_FORMATS

    add_model_args(p)
    p.add_argument(
        "--prompt-format",
        choices=PROMPT_FORMATS,
        default="chat",
        help="chat template with generation prompt (serving view) or raw text (default: %(default)s)",
    )
    p.add_argument(
        "--max-length",
        type=int,
        default=DEFAULT_MAX_LENGTH,
        help="tokens per prompt; longer prompts are truncated and counted (default: %(default)s)",
    )
    p.add_argument(
        "--max-response-tokens",
        type=int,
        default=DEFAULT_MAX_RESPONSE_TOKENS,
        help="response sets: the first N response tokens a response probe reads; longer responses are "
        "cut and counted (default: %(default)s)",
    )


BALANCE_HELP = (
    "with --limit: equal shares of the classes in the train rows (a mixture: per source) instead of their "
    "proportions; a rarer class is kept whole (validation keeps the proportions)"
)


def add_data_args(p: argparse.ArgumentParser, split_default: str = "train") -> None:
    p.add_argument("--dataset", required=True, help=DATASET_HELP)
    p.add_argument("--split", default=split_default, help="split name (default: %(default)s)")
    p.add_argument("--data-dir", default=None, help=DATA_DIR_HELP)
    p.add_argument("--limit", type=int, default=None, help="use a seeded stratified subset of this many rows")


def parse_layers(text: str | None) -> list[int] | None:
    from singlepass.errors import SinglepassError

    if not text:
        return None
    out = []
    try:
        for part in text.split(","):
            if "-" in part:
                a, b = part.split("-")
                out.extend(range(int(a), int(b) + 1))
            else:
                out.append(int(part))
    except ValueError:
        raise SinglepassError(f"--layers takes indices and ranges like 0,10-20,30, not {text!r}") from None
    return out


def load_backbone_logged(model: str, cache_dir: str | None):
    """``load_backbone`` with the line ``singlepass extract`` prints."""
    import time

    from singlepass.models.backbone import load_backbone

    t0 = time.perf_counter()
    bb = load_backbone(model, cache_dir)
    print(
        f"loaded {bb.source.name} ({bb.fingerprint['model_type']}, {bb.num_layers} layers, d={bb.hidden_size}) "
        f"in {time.perf_counter() - t0:.1f} s"
    )
    return bb


def extract_cache(
    bb,
    ds,
    prompt_format: str,
    max_length: int,
    dtype: str,
    layers,
    token_cap,
    batch_size: int,
    cache_dir: str | None,
    progress: bool = True,
    max_response_tokens: int | None = None,
) -> dict:
    """Fill the hidden-state cache of ``ds``, print what ``singlepass extract`` prints -> its summary."""
    import time
    from pathlib import Path

    from singlepass.models import cache as state_cache

    t0 = time.perf_counter()
    c = state_cache.build(
        bb,
        ds,
        prompt_format,
        max_length,
        dtype,
        layers,
        token_cap,
        batch_size,
        cache_dir=cache_dir and Path(cache_dir),
        progress=progress,
        **({} if max_response_tokens is None else {"max_response_tokens": max_response_tokens}),
    )
    dt = time.perf_counter() - t0
    n_tok = int(c.lengths.sum())
    shape = (c.num_layers, len(c), int(c.lengths.max()), c.d)  # [L+1, B, T, d]
    size = (c.folder / "states.bin").stat().st_size
    summary = {
        "cache": str(c.folder),
        "stacked_shape": list(shape),
        "rows": len(c),
        "tokens": n_tok,
        "seconds": round(dt, 2),
        "tokens_per_s": round(n_tok / max(dt, 1e-9), 1),
        "bytes": size,
        "bytes_per_token": c.meta["bytes_per_token"],
        "truncated": c.meta["n_truncated"],
        "dtype": c.meta["dtype"],
    }
    if "n_response_truncated" in c.meta:
        summary["responses_truncated"] = c.meta["n_response_truncated"]
    longest = "response" if "n_response_truncated" in c.meta else "prompt"
    print(f"stacked hidden states [L+1, B, T, d] = {tuple(shape)} (T = longest {longest}; rows stored unpadded)")
    print(
        f"{n_tok:,} tokens in {dt:.1f} s = {summary['tokens_per_s']:,.0f} tokens/s; cache {size / 2**20:,.1f} MiB "
        f"({summary['bytes_per_token']:,} bytes/token) at {c.folder}"
    )
    return summary


def extract_dataset(dataset: str, split: str, data_dir: str | None, limit: int | None, balanced: bool = False):
    """The rows ``singlepass extract`` caches: a split of one dataset, or of a safety mixture its
    ``train`` or ``validation`` rows exactly as ``singlepass train --dataset MIXTURE --limit N``
    (or ``--val-limit N``; ``balanced``: ``--balance-classes``) reads them, so train finds them cached."""
    from singlepass.errors import SinglepassError
    from singlepass.models.data import limit_rows, load_dataset
    from singlepass.models.mixture import is_mixture, load_mixture

    if not is_mixture(dataset):
        if balanced and split == "train":
            return limit_rows(load_dataset(dataset, split, data_dir), limit, 0, balanced)
        return load_dataset(dataset, split, data_dir, limit=limit)
    if split not in ("train", "validation"):
        raise SinglepassError(
            f"a mixture has train and validation rows (each source's test part is its own); not {split!r}"
        )
    train, val = (limit, None) if split == "train" else (None, limit)
    m = load_mixture(dataset, data_dir, train, val, balanced=balanced)
    return m.train if split == "train" else m.validation


def cmd_extract(args) -> int:
    import json

    import torch

    from singlepass.models.data import describe

    torch.set_num_threads(max(1, torch.get_num_threads()))
    ds = extract_dataset(args.dataset, args.split, args.data_dir, args.limit, args.balance_classes)
    print(describe(ds))
    bb = load_backbone_logged(args.model, args.cache_dir)
    summary = extract_cache(
        bb,
        ds,
        args.prompt_format,
        args.max_length,
        args.dtype,
        parse_layers(args.layers),
        args.token_cap,
        args.batch_size,
        args.cache_dir,
        progress=not args.no_progress,
        max_response_tokens=args.max_response_tokens,
    )
    if args.json:
        print(json.dumps(summary))
    return 0


def run_answer(bb, ds, dataset: str, split: str, limit, max_new_tokens: int, out, batch_size: int, progress: bool):
    """Write the backbone's answers to ``ds``'s prompts to ``out``; print what ``singlepass answer``
    prints -> the provenance."""
    from singlepass.models.answers import provenance_path, write_answers

    prov = write_answers(bb, ds, dataset, split, limit, max_new_tokens, out, batch_size, progress=progress)
    n = prov["rows"] + prov["dropped"]
    print(
        f"wrote {prov['rows']} answers to {out} ({prov['dropped']} empty dropped, "
        f"{prov['answers_at_max_new_tokens']} cut at {max_new_tokens} new tokens) in {prov['seconds']:.1f} s "
        f"({prov['seconds'] / max(n, 1):.2f} s per prompt); provenance {provenance_path(out)}"
    )
    return prov


def cmd_answer(args) -> int:
    import json

    from singlepass.models.answers import benign_prompts, check_out
    from singlepass.models.data import describe

    out = check_out(args.out, args.force)  # every refusal comes before the model loads
    ds = benign_prompts(args.dataset, args.split, args.limit, args.data_dir)
    print(describe(ds))
    bb = load_backbone_logged(args.model, args.cache_dir)
    prov = run_answer(
        bb, ds, args.dataset, args.split, args.limit, args.max_new_tokens, out, args.batch_size, not args.no_progress
    )
    if args.json:
        print(json.dumps({"out": str(out), **prov}))
    return 0


def parse_sets(items: list[str] | None) -> dict:
    """--set key=value (repeatable) -> dict with ints/floats parsed where they parse."""
    from singlepass.errors import SinglepassError

    out = {}
    for item in items or []:
        if "=" not in item:
            raise SinglepassError(f"--set takes key=value, not {item!r}")
        k, v = item.split("=", 1)
        for cast in (int, float):
            try:
                v = cast(v)
                break
            except ValueError:
                pass
        out[k.strip()] = v
    return out


def _train_val(args):
    """Train and validation datasets: official/carved splits, a mixture of safety sources
    (models/mixture.py), or a user file split 90/10. -> (train, validation, mixture report or None)."""
    import numpy as np

    from singlepass.models.data import DATASETS, VALIDATION_FRACTION, limit_rows, load_dataset, stratified_split
    from singlepass.models.mixture import describe_mixture, is_mixture, load_mixture

    if is_mixture(args.dataset):
        m = load_mixture(args.dataset, args.data_dir, args.limit, args.val_limit, balanced=args.balance_classes)
        print(f"mixture of {len(m.sources)} sources, labels safe/unsafe; overlaps removed on normalised text:")
        print("\n".join(describe_mixture(m)))
        return m.train, m.validation, m.report
    if args.dataset in DATASETS:
        tr = load_dataset(args.dataset, "train", args.data_dir, limit=None if args.balance_classes else args.limit)
        tr = limit_rows(tr, args.limit, 0, args.balance_classes)
        va = load_dataset(args.dataset, "validation", args.data_dir, limit=args.val_limit)
        return tr, va, None
    ds = load_dataset(args.dataset, "file", args.data_dir)
    keep, held = stratified_split(ds.labels, VALIDATION_FRACTION, seed=0)
    tr, va = ds.subset(keep), ds.subset(held)
    tr.split, va.split = "train", "validation"
    if args.limit and args.limit < len(tr) and args.balance_classes:
        tr = limit_rows(tr, args.limit, 0, True)
    elif args.limit and args.limit < len(tr):
        tr = tr.subset(np.sort(np.random.default_rng(0).permutation(len(tr))[: args.limit]))
    if args.val_limit and args.val_limit < len(va):
        va = va.subset(np.sort(np.random.default_rng(0).permutation(len(va))[: args.val_limit]))
    return tr, va, None


def save_trained(out, module, cfg: dict, limit: int | None, val_limit: int | None, balanced: bool = False) -> dict:
    """Save a trained probe and print what ``singlepass train`` prints -> its validation metrics."""
    from singlepass.models.probe_io import save_probe

    cfg["data"].update({"limit": limit, "validation_limit": val_limit, "balance_classes": balanced})
    save_probe(out, module, cfg)
    v = cfg["validation"]
    key = "f1" if cfg["task"] == "safety" else "accuracy"
    print(
        f"saved {cfg['probe']} probe ({cfg['trainable_parameters']:,} trainable parameters) to {out}: "
        f"validation {key} {v[key]:.4f}"
        + (f", threshold {cfg['threshold']:.4f}" if cfg["threshold"] is not None else "")
        + (f" ({cfg['operating_point']})" if cfg.get("operating_point") not in (None, "f1") else "")
        + f"; {cfg['training']['search_seconds']:.1f} s"
    )
    for name, p in (cfg.get("operating_points") or {}).items():
        print(
            f"  operating point {name}: threshold {p['threshold']:.4f}, "
            f"validation FPR {_rate(p['fpr'])}, TPR {_rate(p['tpr'])}"
        )
    for src, m in (cfg.get("validation_by_source") or {}).items():
        print(
            f"  validation {src:<15} rows {m['rows']:>5}  f1 {_rate(m.get('f1_at_threshold'))}  "
            f"fpr {_rate(m.get('fpr_at_threshold'))}  tpr {_rate(m.get('tpr_at_threshold'))}  "
            f"auprc {_rate(m.get('auprc'))}"
        )
    return v


def _rate(v) -> str:
    return "—" if v is None else f"{v:.4f}"


def cmd_train(args) -> int:
    import json
    from pathlib import Path

    import torch

    from singlepass.errors import SinglepassError
    from singlepass.models.backbone import load_backbone
    from singlepass.models.data import describe
    from singlepass.models.probe_io import read_config
    from singlepass.models.search import HParams
    from singlepass.models.train import train_probe

    out = Path(args.out)
    if out.exists() and not args.force:
        raise SinglepassError(f"{out} exists (use --force to overwrite)")
    if args.threads:
        torch.set_num_threads(args.threads)
    hparams = None
    if args.hparams_from:
        src = read_config(args.hparams_from)
        if src["probe"] != args.probe:
            raise SinglepassError(f"--hparams-from {args.hparams_from} is a {src['probe']!r} probe, not {args.probe!r}")
        if args.trials is not None:
            raise SinglepassError(
                "--hparams-from trains its one configuration; drop --trials (or drop --hparams-from to search)"
            )
        hparams = HParams.from_dict({**src["hparams"], "params": src["params"]})
        if args.epochs is not None:  # the maximum epochs still apply (the cosine schedule spans them)
            hparams.epochs = args.epochs
        if args.set:
            from singlepass.models.search import apply_overrides

            hparams = apply_overrides(hparams, parse_sets(args.set))
    tr, va, mixture = _train_val(args)
    print(describe(tr))
    print(describe(va))
    bb = load_backbone(args.model, args.cache_dir)
    module, cfg = train_probe(
        args.probe,
        bb,
        tr,
        va,
        prompt_format=args.prompt_format,
        max_length=args.max_length,
        seed=args.seed,
        trials=TRIALS if args.trials is None else args.trials,
        max_epochs=EPOCHS if args.epochs is None else args.epochs,
        overrides=parse_sets(args.set),
        hparams=hparams,
        cache_dir=args.cache_dir and Path(args.cache_dir),
        progress=not args.no_progress,
        threshold_fpr=args.threshold_at_fpr,
        max_response_tokens=args.max_response_tokens,
    )
    if mixture is not None:
        cfg["data"]["mixture"] = mixture
    v = save_trained(out, module, cfg, args.limit, args.val_limit, args.balance_classes)
    if args.json:
        print(
            json.dumps(
                {
                    "out": str(out),
                    "validation": v,
                    "trainable_parameters": cfg["trainable_parameters"],
                    "training": {k: cfg["training"][k] for k in ("seconds", "search_seconds", "best_epoch")},
                    "operating_point": cfg.get("operating_point"),
                    "operating_points": cfg.get("operating_points"),
                    "validation_by_source": cfg.get("validation_by_source"),
                }
            )
        )
    return 0


def cmd_eval(args) -> int:
    import json
    import sys

    from singlepass.models.evaluate import evaluate, evaluate_sources, format_report, format_sources
    from singlepass.models.mixture import is_mixture

    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print  # stdout: the JSON only
    mixture = is_mixture(args.dataset)
    rep = (evaluate_sources if mixture else evaluate)(
        args.probe,
        args.dataset,
        args.split,
        args.model,
        args.cache_dir,
        args.data_dir,
        args.limit,
        progress=not args.no_progress,
        log=log,
    )
    print(json.dumps(rep, indent=2) if args.json else (format_sources if mixture else format_report)(rep))
    return 0


def cmd_plot_layers(args) -> int:
    from singlepass.models.plots import plot_layers

    res = plot_layers(
        args.probe,
        args.dataset,
        args.split,
        args.out,
        args.model,
        args.cache_dir,
        args.data_dir,
        args.limit,
        progress=not args.no_progress,
    )
    for g, v in res["groups"].items():
        w = v["mean_weight"]
        print(f"{g:<28} n={v['rows']:<5} heaviest layer {max(range(len(w)), key=w.__getitem__)}")
    print(f"wrote {res['png']}")
    return 0


class _ProbeMethods:
    """``--probe`` choices, read from models/registry.py (torch) only when ``train`` parses or
    prints them: building the parser must not import torch (``singlepass generate`` never does)."""

    def _methods(self):
        from singlepass.models.registry import METHODS

        return METHODS

    def __contains__(self, item) -> bool:
        return item in self._methods()

    def __iter__(self):
        return iter(self._methods())


def register(sub) -> None:
    from singlepass.models.answers import ANSWER_BATCH
    from singlepass.models.prompts import EXTRACT_BATCH

    p = sub.add_parser("train", help="train a probe (or a baseline) on cached hidden states")
    add_backbone_args(p)
    p.add_argument("--dataset", required=True, help=DATASET_HELP)
    p.add_argument("--data-dir", default=None, help=DATA_DIR_HELP)
    p.add_argument(
        "--probe",
        required=True,
        choices=_ProbeMethods(),
        metavar="METHOD",
        help="probe family or baseline: %(choices)s",
    )
    p.add_argument("--out", required=True, help="artifact folder to write (config.json + model.safetensors)")
    p.add_argument("--seed", type=int, default=0, help="training seed (data subsets always use seed 0)")
    p.add_argument(
        "--trials",
        type=int,
        default=None,
        help=f"hyperparameter search budget: configurations tried, the first being the default (default: {TRIALS})",
    )
    p.add_argument(
        "--epochs",
        type=int,
        default=None,
        help=f"maximum epochs per trial (default: {EPOCHS}; with --hparams-from, the stored value)",
    )
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="fix a hyperparameter (lr, batch_size, weight_decay, epochs, patience, class_weight, ...) "
        "or a probe parameter (factor, heads, pool, query (tokens, learned: an MHA that streams), "
        "token_pool (mean, max, topk), top_k, layer_pool, input_norm) "
        "in every trial",
    )
    p.add_argument(
        "--hparams-from",
        default=None,
        metavar="DIR",
        help="train once with the hyperparameters of an existing artifact (e.g. the searched seed-0 probe)",
    )
    p.add_argument(
        "--limit", type=int, default=None, help="seeded stratified subset of the train split (a mixture: per source)"
    )
    p.add_argument(
        "--val-limit",
        type=int,
        default=None,
        help="seeded stratified subset of the validation split (a mixture: per source)",
    )
    p.add_argument("--balance-classes", action="store_true", help=BALANCE_HELP)
    p.add_argument(
        "--threshold-at-fpr",
        type=float,
        default=None,
        metavar="RATE",
        help="make the active threshold the one giving this false-positive rate on validation, e.g. 0.01 "
        "(binary probes; the F1-optimal threshold is stored beside it)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--force", action="store_true", help="overwrite --out")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="also print a JSON summary line")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a probe artifact on a dataset split")
    p.add_argument("--probe", required=True, help="probe artifact folder")
    p.add_argument("--model", default=None, help="backbone (default: the one named in the probe's config)")
    p.add_argument("--cache-dir", default=None, help="cache folder (default: $SINGLEPASS_CACHE or ~/.cache/singlepass)")
    add_data_args(p, "test")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print the full report as JSON")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("plot-layers", help="gate probe: mean Stage-2 weight per layer by class x correctness (PNG)")
    p.add_argument("--probe", required=True, help="gate probe artifact folder")
    p.add_argument("--model", default=None, help="backbone (default: the one named in the probe's config)")
    p.add_argument("--cache-dir", default=None, help="cache folder (default: $SINGLEPASS_CACHE or ~/.cache/singlepass)")
    add_data_args(p, "test")
    p.add_argument("--out", default=None, help="PNG path (default: PROBE/layer_weights-DATASET-SPLIT.png)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_plot_layers)

    p = sub.add_parser("extract", help="cache the [L+1, B, T, d] hidden states of a dataset split")
    add_backbone_args(p)
    add_data_args(p, "validation")
    p.add_argument("--balance-classes", action="store_true", help=BALANCE_HELP)
    p.add_argument(
        "--dtype", default="float16", choices=["float16", "float32"], help="cache dtype (default: %(default)s)"
    )
    p.add_argument("--layers", default=None, help="layer subset to store, e.g. 0,10-20,30 (default: all L+1)")
    p.add_argument("--token-cap", type=int, default=None, help="store only each prompt's last N tokens")
    p.add_argument(
        "--batch-size", type=int, default=EXTRACT_BATCH, help="prompts per forward pass (default: %(default)s)"
    )
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="also print a JSON summary line")
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser(
        "answer",
        help="write the model's own greedy answers to benign prompts: a response set labelled safe",
        description="Answer each prompt of an all-safe prompt set (alpaca_noinput) greedily with the model, "
        "rendered as served (chat template + generation prompt), and write the pairs as a gzipped JSONL "
        "response file (prompt, response, label 0, text) with its provenance in OUT.json; the file loads "
        "as a response set and joins response mixtures, e.g. --dataset beavertails,gptfuzz,OUT.",
    )
    add_model_args(p)
    p.add_argument(
        "--dataset",
        required=True,
        help="a prompt set whose rows are all safe (alpaca_noinput), or a .jsonl/.csv file of prompts labelled 0",
    )
    p.add_argument("--split", default="train", help="split name (default: %(default)s)")
    p.add_argument("--data-dir", default=None, help=DATA_DIR_HELP)
    p.add_argument("--limit", type=int, default=None, help="answer a seeded subset of this many prompts")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens per answer at most (default: %(default)s)")
    p.add_argument("--out", required=True, help="answers file to write (*.jsonl.gz; provenance beside it as OUT.json)")
    p.add_argument(
        "--batch-size", type=int, default=ANSWER_BATCH, help="prompts generated together (default: %(default)s)"
    )
    p.add_argument("--force", action="store_true", help="overwrite --out")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="also print the provenance as a JSON line")
    p.set_defaults(func=cmd_answer)
