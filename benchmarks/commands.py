"""CLI for benchmarks/: ``singlepass bench accuracy``, ``singlepass bench loso``, ``singlepass bench
response``, ``singlepass bench latency`` and ``singlepass bench serve`` (same flags as ``python -m
singlepass.benchmarks.accuracy`` / ``.loso`` / ``.response`` / ``.latency`` / ``.serve_bench``)."""

from __future__ import annotations

import argparse


def _command(name: str) -> str | None:
    """The command line as typed, from the benchmark's name on (recorded in the results)."""
    import sys

    return f"singlepass bench {name} " + " ".join(sys.argv[sys.argv.index(name) + 1 :]) if name in sys.argv else None


def cmd_accuracy(args: argparse.Namespace) -> int:
    from singlepass.benchmarks.accuracy import run

    args.command = _command("accuracy")
    return run(args)


def cmd_loso(args: argparse.Namespace) -> int:
    from singlepass.benchmarks.loso import run

    args.command = _command("loso")
    return run(args)


def cmd_response(args: argparse.Namespace) -> int:
    from singlepass.benchmarks.response import run

    args.command = _command("response")
    return run(args)


def cmd_latency(args: argparse.Namespace) -> int:
    from singlepass.benchmarks.latency import run

    args.command = _command("latency")
    return run(args)


def cmd_serve(args: argparse.Namespace) -> int:
    from singlepass.benchmarks.serve_bench import run

    args.command = _command("serve")
    return run(args)


def cmd_peers(args: argparse.Namespace) -> int:
    from singlepass.benchmarks.peers import run

    args.command = _command("peers")
    return run(args)


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks (writes ./benchmarks/results/*.md, or --out DIR)")
    benches = p.add_subparsers(dest="bench", required=True, metavar="BENCH")
    from singlepass.benchmarks.accuracy import build_parser
    from singlepass.benchmarks.latency import build_parser as latency_parser
    from singlepass.benchmarks.serve_bench import build_parser as serve_parser

    a = benches.add_parser("accuracy", help="probes vs MULI and fixed-readout baselines: accuracy table")
    build_parser(a)
    a.set_defaults(func=cmd_accuracy)
    from singlepass.benchmarks.loso import build_parser as loso_parser

    lo = benches.add_parser(
        "loso", help="safety probes vs MULI and the MiniLM guard, leave-one-source-out: loso.md / loso.json"
    )
    loso_parser(lo)
    lo.set_defaults(func=cmd_loso)
    from singlepass.benchmarks.response import build_parser as response_parser

    rp = benches.add_parser(
        "response",
        help="streaming response probes vs the MiniLM guard after generation: response.md / response.json",
    )
    response_parser(rp)
    rp.set_defaults(func=cmd_response)
    lp = benches.add_parser("latency", help="single pass with fused probes vs guard-then-serve: latency and memory")
    latency_parser(lp)
    lp.set_defaults(func=cmd_latency)
    sp = benches.add_parser(
        "serve", help="the OpenAI-compatible server under concurrent streams: batching, guard-then-serve, soak"
    )
    serve_parser(sp)
    sp.set_defaults(func=cmd_serve)
    from singlepass.benchmarks.peers import build_parser as peers_parser

    pp = benches.add_parser(
        "peers", help="int4/fp32 artifacts vs llama.cpp and onnxruntime-genai: prefill, decode, memory, quality"
    )
    peers_parser(pp)
    pp.set_defaults(func=cmd_peers)
