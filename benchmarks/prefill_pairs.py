"""Prefill time of artifacts against a base, paired prompt by prompt in one process.

    python -m singlepass.benchmarks.prefill_pairs BASE ARTIFACT [ARTIFACT ...] [--rounds 30]
        [--prompts 24] [--threads 2] [--data-dir DIR]

``bench peers`` times each engine over the whole prompt set per repeat (medians of 3-5): on this
VM, whose speed drifts by several percent within minutes, a probe's 1-5% prefill overhead moves by
a point or two between runs. Here every prompt (the first ``--prompts`` ToxicChat test prompts,
the artifacts' chat template) is prefilled at batch 1 by every artifact in turn, the order rotated
prompt by prompt, so drift hits all of them alike, each prefill after an idle ``machine.SETTLE_S`` (the
last artifact's threads asleep: an ONNX Runtime session's spinning threads slow the next one by tens of
percent); each round sums a prompt set's prefills per
artifact. Prints, per artifact, the median round and, over rounds, the median and interquartile
range of (round / the base's round - 1). The artifacts must share a tokenizer (the base's encodes).
Nothing else should run meanwhile.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def pair_rounds(folders: list[str], texts: list[str], rounds: int, threads: int) -> dict[str, np.ndarray]:
    """-> folder -> [rounds] seconds: the sum of one round's prefills of every text."""
    from singlepass.benchmarks.machine import settle
    from singlepass.runtime.api import load
    from singlepass.runtime.passes import prefill

    rts = [load(f, threads=threads) for f in folders]
    ids = [rts[0].encode(t, truncate=True)[0] for t in texts]
    for rt in rts:  # warm-up
        for s in ids[:4]:
            prefill(rt.backend, rt.manifest, [s])
    total = np.zeros((len(rts), rounds))  # [artifacts, rounds]
    for r in range(rounds):
        for k, s in enumerate(ids):
            for j in np.roll(np.arange(len(rts)), -(k + r)):  # rotated: no artifact always first
                settle()  # the last artifact's threads asleep first
                t = time.perf_counter()
                prefill(rts[j].backend, rts[j].manifest, [s])
                total[j, r] += time.perf_counter() - t
    return dict(zip(folders, total))


def table(rounds: dict[str, np.ndarray]) -> str:
    base = next(iter(rounds.values()))
    lines = [
        "| artifact | median round (ms) | over the base: median | interquartile range |",
        "| --- | ---: | ---: | ---: |",
    ]
    for f, x in rounds.items():
        q25, q50, q75 = np.percentile(x / base - 1, [25, 50, 75]) * 100
        lines.append(f"| {f} | {np.median(x) * 1e3:.1f} | {q50:+.2f}% | {q25:+.2f}% to {q75:+.2f}% |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from singlepass.benchmarks.machine import ort_machine
    from singlepass.models.data import load_dataset

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("artifacts", nargs="+", help="the base artifact first, then the ones to compare with it")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--prompts", type=int, default=24, help="ToxicChat test prompts per round")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data-dir", default=None)
    a = p.parse_args(argv)
    if len(a.artifacts) < 2 or a.rounds < 1 or a.prompts < 1:
        p.error("give a base and at least one artifact, and at least one round and one prompt")
    texts = load_dataset("toxicchat", "test", a.data_dir, limit=a.prompts).texts
    print(ort_machine(), flush=True)
    print(f"{len(texts)} prompts x {a.rounds} rounds, batch 1, {a.threads} threads", flush=True)
    print(table(pair_rounds(a.artifacts, texts, a.rounds, a.threads)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
