"""Decode-step and prefill times of artifacts by batch rows and mask width (the engine's costs).

    python -m singlepass.benchmarks.engine_steps ART [ART ...] [--threads 2] [--repeats 5]

Prints, per (width W, rows B) and artifact (alternating, cell by cell): the median decode-step
time over ``--repeats`` runs, tokens/s, the step's time outside ONNX Runtime (the runtime's
Python: ``host_s``), the KV cache size, and what re-aligning
(``serve.engine.fit``, one more column) and dropping a row (``State.keep``) copy; then prefill
times for a few (B, T). Each cell's rows hold W tokens and the step is timed after one decode step
(an in-place cache, ``export --kv-cache inplace``, has then grown its spare columns); prefill
times alternate the artifacts run by run after a warm-up pass. Medians of repeated runs in one
process; nothing else should run meanwhile.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def median_s(f, n: int) -> float:
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[n // 2]


def host_s(rt, f, n: int) -> float:
    """The median over ``n`` calls of ``f`` of its time outside ONNX Runtime (the runtime's own
    Python: feeds, bindings, outputs, state), ``rt``'s session's runs (bound in place or not) timed
    from inside."""
    session = rt.backend.session
    inner = {"s": 0.0}

    def timed(run):
        def call(*args, **kw):
            t = time.perf_counter()
            try:
                return run(*args, **kw)
            finally:
                inner["s"] += time.perf_counter() - t

        return call

    runs = ("run", "run_with_iobinding")
    for name in runs:
        setattr(session, name, timed(getattr(session, name)))
    try:
        ts = []
        for _ in range(n):
            inner["s"], t = 0.0, time.perf_counter()
            f()
            ts.append(time.perf_counter() - t - inner["s"])
    finally:
        for name in runs:  # the instance attributes go: the methods are the class's again
            delattr(session, name)
    return sorted(ts)[n // 2]


def main(argv=None) -> int:
    from pathlib import Path

    from singlepass.benchmarks.machine import ort_machine
    from singlepass.runtime.api import load
    from singlepass.runtime.passes import decode_one_token, prefill
    from singlepass.serve.engine import fit

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("artifacts", nargs="+")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args(argv)
    rts = {Path(f).name: load(f, threads=a.threads) for f in a.artifacts}
    n = a.repeats
    print(ort_machine(), flush=True)
    for name, rt in rts.items():
        print(f"{name}: KV cache {rt.manifest.graph.kv_update}", flush=True)
    print(
        "\n| W | B | artifact | decode step (ms) | tokens/s | outside ONNX Runtime (µs) | KV (MiB) | "
        "fit +1 column (ms) | drop a row (ms) |"
    )
    print("| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for W in (64, 512):
        for B in (1, 4, 16, 32):
            for name, rt in rts.items():
                m, prefix = rt.manifest, rt.manifest.graph.inplace
                out, st = prefill(rt.backend, m, [[1] + [100 + i for i in range(W - 1)]] * B)
                toks = np.ones(B, np.int64)
                st = decode_one_token(rt.backend, m, st, toks)[1]  # [B] rows of W + 1 tokens

                def step(st=st, toks=toks, rt=rt, m=m):
                    return decode_one_token(rt.backend, m, st, toks)

                t, h = median_s(step, n), host_s(rt, step, n)
                kv = sum(x.nbytes for x in st.past or []) / 2**20
                c = median_s(lambda st=st, p=prefix: fit(st, st.mask.shape[1] + 1, 0, True, p), n)
                k = median_s(lambda st=st, B=B: st.keep(list(range(max(1, B - 1)))), n)
                print(
                    f"| {W} | {B} | {name} | {t * 1e3:.1f} | {B / t:.0f} | {h * 1e6:.0f} | {kv:.0f} | {c * 1e3:.1f} | "
                    f"{k * 1e3:.1f} |",
                    flush=True,
                )
    print("\n| prefill B | T | artifact | ms | tokens/s |\n| ---: | ---: | --- | ---: | ---: |")
    for T in (32, 128):
        for B in (1, 4):
            seqs = [[1] + [100 + i for i in range(T - 1)]] * B
            times = {name: [] for name in rts}
            for rt in rts.values():
                prefill(rt.backend, rt.manifest, seqs)  # warm-up: a shape's first pass is slower
            for _ in range(max(3, n)):  # alternating run by run: the VM's speed drifts
                for name, rt in rts.items():
                    times[name].append(median_s(lambda seqs=seqs, rt=rt: prefill(rt.backend, rt.manifest, seqs), 1))
            for name, ts in times.items():
                t = sorted(ts)[len(ts) // 2]
                print(f"| {B} | {T} | {name} | {t * 1e3:.0f} | {B * T / t:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
