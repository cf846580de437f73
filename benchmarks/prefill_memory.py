"""Peak memory of an artifact's long prefill: each artifact alone in a fresh process.

    python -m singlepass.benchmarks.prefill_memory ARTIFACT [ARTIFACT ...] [--batch 1 4] [--tokens 400]
        [--steps 32] [--threads 2]

Per artifact and batch size, a fresh process evicts the artifact's files from the page cache (a cold start:
``latency_worker.evict_page_cache``), loads the artifact through the runtime (``runtime.api.load``,
so ONNX Runtime's session options are the runtime's own), prefills ``--batch`` rows of ``--tokens``
tokens, runs ``--steps`` decode passes, twice, and reports its peak RSS (``VmHWM``) right after
loading and at the end. What a fused prompt probe adds over the base artifact is the difference of
the last column; ``bench peers`` reports the same peak on its shorter benchmark prompts.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys


def _child(art: str, batch: int, tokens: int, steps: int, threads: int) -> dict:
    import numpy as np

    from singlepass.benchmarks.latency_worker import evict_page_cache, peak_rss_mib  # VmHWM: ru_maxrss survives exec
    from singlepass.runtime.api import load
    from singlepass.runtime.passes import decode_one_token, prefill

    evict_page_cache([art])  # every artifact from the same cold start
    rt = load(art, backend="cpu", threads=threads)
    ids = rt.encode("hello " * tokens, truncate=True)[0][:tokens]  # [T]: the same token ids in every row
    if len(ids) < tokens:
        raise SystemExit(f"{art}: the prompt encodes to {len(ids)} tokens, fewer than {tokens}")
    loaded = peak_rss_mib()
    for _ in range(2):
        _, state = prefill(rt.backend, rt.manifest, [ids] * batch)
        for _ in range(steps):
            _, state = decode_one_token(rt.backend, rt.manifest, state, np.full(batch, ids[-1]))
    return {"loaded_mib": loaded, "peak_mib": peak_rss_mib()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("artifacts", nargs="+")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--tokens", type=int, default=400)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(_child(a.artifacts[0], a.batch[0], a.tokens, a.steps, a.threads)))
        return 0
    from singlepass.benchmarks.machine import ort_machine

    print(ort_machine(), flush=True)
    print("| artifact | batch | tokens per row | RSS after loading (MiB) | peak RSS (MiB) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for b in a.batch:
        for art in a.artifacts:
            cmd = [sys.executable, "-m", "singlepass.benchmarks.prefill_memory", art, "--child", "--batch", str(b)]
            cmd += ["--tokens", str(a.tokens), "--steps", str(a.steps), "--threads", str(a.threads)]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode:
                print(r.stderr[-2000:], file=sys.stderr)
                return r.returncode
            m = json.loads(r.stdout.strip().splitlines()[-1])
            print(f"| {art} | {b} | {a.tokens} | {m['loaded_mib']:.0f} | {m['peak_mib']:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
