"""Where the benchmarks write their results: the one rule for every benchmark.

``--out DIR`` when given, else ``./benchmarks/results`` under the current working directory,
never a folder derived from this package's location (an installed wheel would write into
site-packages). Run from the repository root, that is the committed ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

DEFAULT_RESULTS = Path("benchmarks") / "results"  # relative to the current working directory


def results_dir(out: str | os.PathLike | None = None) -> Path:
    """``out`` if given, else ``$PWD/benchmarks/results`` (not created here)."""
    return Path(out) if out else Path.cwd() / DEFAULT_RESULTS


def add_out_arg(p: argparse.ArgumentParser, *aliases: str) -> None:
    """``--out DIR`` (and any older spellings in ``aliases``) -> ``args.out``."""
    p.add_argument(
        "--out",
        *aliases,
        dest="out",
        default=None,
        metavar="DIR",
        help=f"results folder (default: ./{DEFAULT_RESULTS.as_posix()} under the current directory)",
    )
