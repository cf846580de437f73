"""The one command line, ``singlepass``; its subcommands mirror the repository folders.

Each folder registers its own subcommands (``models/commands.py``, ``export/commands.py``,
``runtime/commands.py``, ``benchmarks/commands.py``) and imports heavy libraries only inside
the handlers, so ``singlepass --help`` and the runtime never load torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from singlepass.errors import SinglepassError

COMMAND_MODULES = (
    "singlepass.models.commands",
    "singlepass.export.commands",
    "singlepass.runtime.commands",
    "singlepass.benchmarks.commands",
    "singlepass.demo",
    "singlepass.serve.commands",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="singlepass", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except SinglepassError as e:
        print(f"singlepass {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"singlepass {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
