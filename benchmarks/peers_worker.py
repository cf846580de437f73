"""Measuring processes of ``singlepass bench peers`` (``python -m singlepass.benchmarks.peers_worker
SPEC.json OUT.json``), started by ``benchmarks/peers.py``:

* ``timing``: every engine loaded in one process with the same thread count, then, for each
  repeat and each prompt, every engine runs the prompt once in an order rotated from prompt to
  prompt (A, B, C, B, C, A, ...), so each ratio compares runs that saw the same machine state.
  Prefill prompts: the prefill pass and its first token (time to first token). Decode prompts:
  the same, then ``new_tokens`` greedy steps, timed apart.
* ``memory``: ONE engine in a fresh process, its files first evicted from the page cache (a cold
  start: ``latency_worker.evict_page_cache``): resident memory after loading, the peak (VmHWM)
  after serving the memory prompts (the longest among them) with ``new_tokens`` steps, and the
  resident memory at the end by kind (anonymous, mapped files).

No torch is imported.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from singlepass.benchmarks.latency_worker import evict_page_cache, log, peak_rss_mib, rss_mib, rss_split_mib
from singlepass.benchmarks.machine import settle
from singlepass.benchmarks.peer_runners import make_runner


def one(runner, ids: list[int], new_tokens: int) -> tuple[float, float]:
    """-> (seconds to the first token, seconds of the ``new_tokens`` decode steps after it)."""
    t0 = time.perf_counter()
    tok = runner.prefill(ids)
    t1 = time.perf_counter()
    for _ in range(new_tokens):
        tok = runner.decode(tok)
    return t1 - t0, time.perf_counter() - t1


def run_timing(spec: dict) -> dict:
    names = list(spec["engines"])
    runners = {}
    for n in names:
        log(f"loading {n} ({spec['threads']} threads) ...")
        runners[n] = make_runner(spec["engines"][n], spec["threads"])
    for n in names:  # warm-up: first-run allocations and kernel selection are not timed
        one(runners[n], spec["prefill"][0], 4)
    out = {n: {"prefill": [], "decode": []} for n in names}  # per repeat: list of per-prompt records
    k = 0
    for rep in range(spec["repeats"]):
        pre = {n: [] for n in names}
        dec = {n: [] for n in names}
        for ids in spec["prefill"]:
            for n in names[k % len(names) :] + names[: k % len(names)]:
                settle()  # the last engine's threads asleep first
                pre[n].append(one(runners[n], ids, 0)[0])
            k += 1
        for ids in spec["decode"]:
            for n in names[k % len(names) :] + names[: k % len(names)]:
                settle()  # the last engine's threads asleep first
                dec[n].append(one(runners[n], ids, spec["new_tokens"]))
            k += 1
        for n in names:
            out[n]["prefill"].append(pre[n])
            out[n]["decode"].append(dec[n])
        log(f"repeat {rep + 1}/{spec['repeats']} done")
    return out


def run_memory(spec: dict) -> dict:
    evict_page_cache([spec["engine"]["path"]])  # every engine from the same cold start
    start = rss_mib()
    runner = make_runner(spec["engine"], spec["threads"])
    loaded = rss_mib()
    for ids in spec["prompts"]:
        one(runner, ids, spec["new_tokens"])
    return {
        "start_rss_mib": start,
        "loaded_rss_mib": loaded,
        "peak_rss_mib": peak_rss_mib(),
        "end_rss_mib": rss_split_mib(),
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(argv[0]).read_text())
    result = run_timing(spec) if spec["mode"] == "timing" else run_memory(spec)
    Path(argv[1]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
