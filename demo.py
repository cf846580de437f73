"""``singlepass demo``: the README's main job, end to end on the embedded default model."""

from __future__ import annotations


def cmd_demo(args) -> int:
    from singlepass.models.commands import cmd_extract

    print("== 1/1 extract: SmolLM2-135M hidden states for SST-2 validation")
    ns = type("A", (), dict(model=args.model, cache_dir=args.cache_dir, prompt_format="chat", max_length=512,
                             dataset="sst2", split="validation", data_dir=args.data_dir, limit=None,
                             dtype="float16", layers=None, token_cap=None, batch_size=8, no_progress=False,
                             json=False))()
    return cmd_extract(ns)


def register(sub) -> None:
    from singlepass.models.backbone import DEFAULT_MODEL

    p = sub.add_parser("demo", help="run the main job end to end on the default model and shipped data")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--data-dir", default=None)
    p.set_defaults(func=cmd_demo)
