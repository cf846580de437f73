"""CLI for models/: extract (train, eval and plot-layers are registered here too)."""

from __future__ import annotations

import argparse


def add_backbone_args(p: argparse.ArgumentParser) -> None:
    from singlepass.models.backbone import DEFAULT_MODEL
    from singlepass.models.prompts import DEFAULT_MAX_LENGTH, PROMPT_FORMATS

    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="model name (smollm2-135m), Hugging Face folder or .gguf file (default: %(default)s)")
    p.add_argument("--cache-dir", default=None, help="cache folder (default: $SINGLEPASS_CACHE or ~/.cache/singlepass)")
    p.add_argument("--prompt-format", choices=PROMPT_FORMATS, default="chat",
                   help="chat template with generation prompt (serving view) or raw text (default: %(default)s)")
    p.add_argument("--max-length", type=int, default=DEFAULT_MAX_LENGTH,
                   help="tokens per prompt; longer prompts are truncated and counted (default: %(default)s)")


def add_data_args(p: argparse.ArgumentParser, split_default: str = "train") -> None:
    p.add_argument("--dataset", required=True, help="toxicchat, wildguardmix, sst2, imdb, emotion or a .jsonl/.csv path")
    p.add_argument("--split", default=split_default, help="split name (default: %(default)s)")
    p.add_argument("--data-dir", default=None, help="datasets folder (default: $SINGLEPASS_DATA or ../shared/data)")
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


def cmd_extract(args) -> int:
    import json
    import time

    import torch

    from singlepass.models import cache as state_cache
    from singlepass.models.backbone import load_backbone
    from singlepass.models.data import describe, load_dataset

    torch.set_num_threads(max(1, torch.get_num_threads()))
    ds = load_dataset(args.dataset, args.split, args.data_dir, limit=args.limit)
    print(describe(ds))
    t0 = time.perf_counter()
    bb = load_backbone(args.model, args.cache_dir)
    print(f"loaded {bb.source.name} ({bb.fingerprint['model_type']}, {bb.num_layers} layers, d={bb.hidden_size}) "
          f"in {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    c = state_cache.build(bb, ds, args.prompt_format, args.max_length, args.dtype, parse_layers(args.layers),
                          args.token_cap, args.batch_size, cache_dir=args.cache_dir and __import__("pathlib").Path(args.cache_dir),
                          progress=not args.no_progress)
    dt = time.perf_counter() - t0
    n_tok = int(c.lengths.sum())
    shape = (c.num_layers, len(c), int(c.lengths.max()), c.d)
    size = (c.folder / "states.bin").stat().st_size
    summary = {"cache": str(c.folder), "stacked_shape": list(shape), "rows": len(c), "tokens": n_tok,
               "seconds": round(dt, 2), "tokens_per_s": round(n_tok / max(dt, 1e-9), 1),
               "bytes": size, "bytes_per_token": c.meta["bytes_per_token"], "truncated": c.meta["n_truncated"],
               "dtype": c.meta["dtype"]}
    print(f"stacked hidden states [L+1, B, T, d] = {tuple(shape)} (T = longest prompt; rows stored unpadded)")
    print(f"{n_tok:,} tokens in {dt:.1f} s = {summary['tokens_per_s']:,.0f} tokens/s; cache {size / 2**20:,.1f} MiB "
          f"({summary['bytes_per_token']:,} bytes/token) at {c.folder}")
    if args.json:
        print(json.dumps(summary))
    return 0


def register(sub) -> None:
    p = sub.add_parser("extract", help="cache the [L+1, B, T, d] hidden states of a dataset split")
    add_backbone_args(p)
    add_data_args(p, "validation")
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"], help="cache dtype (default: %(default)s)")
    p.add_argument("--layers", default=None, help="layer subset to store, e.g. 0,10-20,30 (default: all L+1)")
    p.add_argument("--token-cap", type=int, default=None, help="store only each prompt's last N tokens")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="also print a JSON summary line")
    p.set_defaults(func=cmd_extract)
