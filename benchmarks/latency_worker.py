"""Measuring processes of the latency benchmark (``python -m singlepass.benchmarks.latency_worker
SPEC.json OUT.json``), started by ``benchmarks/latency.py``:

* ``memory``: ONE configuration in a fresh process: load it, serve the memory prompts at every
  setting, report the resident memory after loading and the peak (``VmHWM``: ``peak_rss_mib``).
* ``latency``: ALL configurations in one process, interleaved at the finest grain: for every
  batch of prompts each configuration runs once, in an order rotated from batch to batch, so
  every ratio compares runs that saw the same machine state (A, B, C, A, B, C, ...). Repeated.
* ``torch``: ONNX Runtime vs eager PyTorch prefill of the same token ids (alternating), and the
  hidden-state extraction throughput of ``singlepass.models.extract``.

The first two import no torch.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from collections.abc import Callable  # not typing: the memory mode measures the start RSS
from pathlib import Path

MIB = 2**20


def status_mib(*keys: str) -> list[float]:
    """Memory fields of /proc/self/status (VmRSS, VmHWM, RssAnon, ...), in MiB (nan where absent)."""
    with open("/proc/self/status") as f:
        got = {k: int(v.split()[0]) / 1024 for k, v in (line.split(":", 1) for line in f if ":" in line) if k in keys}
    return [got.get(k, float("nan")) for k in keys]


def rss_mib() -> float:
    return status_mib("VmRSS")[0]


def peak_rss_mib() -> float:
    """Peak resident memory of this process image: /proc/self/status VmHWM. (``ru_maxrss`` is not
    usable here: Linux keeps it across fork and execve, so a worker started by the benchmark's
    process, which holds torch and the backbone, would report that process's peak.)"""
    peak = status_mib("VmHWM")[0]
    return peak if peak == peak else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def rss_split_mib() -> dict[str, float]:
    """This process's resident memory now, by kind: ``anon`` (its own allocations) and ``file``
    (pages of mapped files: libraries, and the weights ONNX Runtime and llama.cpp map from their
    files)."""
    anon, file = status_mib("RssAnon", "RssFile")
    return {"anon": anon, "file": file}


def evict_page_cache(paths) -> int:
    """Drop the files under ``paths`` (files or folders) from the kernel's page cache (flushed first;
    ``posix_fadvise(DONTNEED)``, no privileges needed) -> the files evicted. A process that maps
    weights counts the mapped pages it touches in its RSS, and how many pages a touch maps depends on
    what the page cache holds (here the same int4 artifact peaked at 371 MiB just after its export, at 327 MiB
    hours later, and at 275 MiB with its files evicted first), so each memory measurement starts from
    the same cold state."""
    os.sync()
    files = [f for p in map(Path, paths) for f in ([p] if p.is_file() else sorted(p.rglob("*"))) if f.is_file()]
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return len(files)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build(spec: dict, threads: int, shared: dict | None = None) -> Callable[[list[str], int], object]:
    """A configuration spec -> callable(texts, max_new_tokens). ``shared`` reuses the serving
    LLM's session between configurations of one process (the guard's own LLM never is)."""
    from singlepass.benchmarks.serving import LLM, Pipeline

    def serving(path: str) -> LLM:
        if shared is None:
            return LLM(path, threads)
        if path not in shared:
            shared[path] = LLM(path, threads)
        return shared[path]

    llm = serving(spec["artifact"])
    g = spec.get("guard")
    if not g:
        return llm
    if g["type"] == "classifier":
        from singlepass.benchmarks.guards import ClassifierGuard

        guard = ClassifierGuard(g["folder"], threads)
        guard.threshold = g["threshold"]
    elif g["type"] == "llm":
        from singlepass.benchmarks.llm_guard import LLMGuard

        guard = LLMGuard(LLM(g["artifact"], threads), g["threshold"])  # a second instance
    else:
        raise ValueError(f"unknown guard type {g['type']!r}")
    return Pipeline(guard, llm)


def batches_of(texts: list[str], b: int) -> list[list[str]]:
    """Consecutive batches of ``b`` texts (the last one may be shorter), in order."""
    return [texts[i : i + b] for i in range(0, len(texts), b)]


def config_files(config: dict) -> list[str]:
    """The files a configuration loads: its artifact, and its guard's folder or artifact."""
    g = config.get("guard") or {}
    return [config["artifact"]] + [g[k] for k in ("folder", "artifact") if g.get(k)]


def run_memory(spec: dict) -> dict:
    evict_page_cache(config_files(spec["config"]))  # a cold start (see evict_page_cache)
    base_rss = rss_mib()
    import numpy  # noqa: F401
    import onnxruntime  # noqa: F401
    import tokenizers  # noqa: F401

    imports_rss = rss_mib()
    t0 = time.perf_counter()
    cfg = build(spec["config"], spec["threads"])
    load_s = time.perf_counter() - t0
    loaded_rss = rss_mib()
    seconds = {}  # per setting: serving the memory prompts once (the benchmark's ETA is built from it)
    peaks = {}  # the high-water mark after every setting of batch size <= b (smallest batches first)
    for st in sorted(spec["settings"], key=lambda x: (x["batch"], x["new_tokens"])):
        t1 = time.perf_counter()
        for batch in batches_of(spec["texts"], st["batch"]):
            cfg(batch, st["new_tokens"])
        seconds[f"{st['batch']},{st['new_tokens']}"] = time.perf_counter() - t1
        peaks[str(st["batch"])] = peak_rss_mib()
    return {
        "name": spec["config"]["name"],
        "rss_start_mib": base_rss,
        "rss_imports_mib": imports_rss,
        "rss_loaded_mib": loaded_rss,
        "peak_rss_mib": peak_rss_mib(),
        "end_rss_mib": rss_split_mib(),
        "peak_by_batch_mib": peaks,
        "load_seconds": load_s,
        "prompts": len(spec["texts"]),
        "serve_seconds": seconds,
    }


def run_latency(spec: dict) -> dict:
    from singlepass.benchmarks.machine import settle

    threads = spec["threads"]
    shared: dict = {}
    t0 = time.perf_counter()
    cfgs = {c["name"]: build(c, threads, shared) for c in spec["configs"]}
    names = list(cfgs)
    log(
        f"latency: {len(names)} configurations loaded in {time.perf_counter() - t0:.1f} s "
        f"(load average {os.getloadavg()[0]:.2f})"
    )
    out = {"settings": [], "loadavg_start": os.getloadavg()}
    for st in spec["settings"]:
        texts = spec["texts"][: st["n"]]
        batches = batches_of(texts, st["batch"])
        for name in names:  # warm-up: one untimed pass over the first and the longest batch
            cfgs[name](batches[0], st["new_tokens"])
            cfgs[name](max(batches, key=lambda b: max(len(t) for t in b)), st["new_tokens"])
        runs = {n: [] for n in names}
        t_set = time.perf_counter()
        for r in range(spec["repeats"]):
            cur = {n: [] for n in names}
            for j, batch in enumerate(batches):
                k = (r * len(batches) + j) % len(names)
                for name in names[k:] + names[:k]:  # rotated order
                    settle()  # the last configuration's threads asleep first
                    t1 = time.perf_counter()
                    cfgs[name](batch, st["new_tokens"])
                    cur[name].append(time.perf_counter() - t1)
            for n in names:
                runs[n].append(cur[n])
            done = (r + 1) / spec["repeats"]
            el = time.perf_counter() - t_set
            log(
                f"  batch {st['batch']}, {st['new_tokens']} new tokens: repeat {r + 1}/{spec['repeats']} "
                f"({el:.0f} s, ETA {el / done - el:.0f} s for this setting; load average {os.getloadavg()[0]:.2f})"
            )
        out["settings"].append(
            {
                "batch": st["batch"],
                "new_tokens": st["new_tokens"],
                "n": len(texts),
                "batch_sizes": [len(b) for b in batches],
                "runs": runs,
                "seconds": time.perf_counter() - t_set,
            }
        )
    out["loadavg_end"] = os.getloadavg()
    return out


def run_torch(spec: dict) -> dict:
    import numpy as np
    import torch

    from singlepass.benchmarks.serving import LLM
    from singlepass.models.backbone import load_backbone
    from singlepass.models.extract import extract
    from singlepass.models.prompts import encode
    from singlepass.runtime.batching import pad_batch

    threads = spec["threads"]
    torch.set_num_threads(threads)
    bb = load_backbone(spec["model"], spec.get("cache_dir"))
    llm = LLM(spec["artifact"], threads)
    texts = spec["texts"]
    seqs = [llm.encode(t) for t in texts]
    ref = encode(bb.tokenizer, texts, "chat", llm.max_prompt_length).ids
    mismatched = sum(a != b for a, b in zip(seqs, ref))
    pad = llm.pad_id

    def eager(seq: list[int]) -> torch.Tensor:
        ids, mask, pos = (torch.from_numpy(a) for a in pad_batch([seq], pad, "left"))  # [1, T] each
        with torch.no_grad():
            out = bb.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].argmax(-1)  # [1]

    def ort(seq: list[int]) -> np.ndarray:
        return llm.first_logits([seq]).argmax(-1)  # [1]

    # eager PyTorch at `threads` and at 1 thread: OpenMP with 2 threads collapses (10x) when another
    # job shares the 2 cores, so the faster of the two is PyTorch's number (the fairest to it)
    eager_threads = sorted({threads, 1}, reverse=True)
    same = 0
    for s in seqs[:4]:  # warm-up, and the same next token from both
        for th in eager_threads:
            torch.set_num_threads(th)
            e = int(eager(s)[0])
        same += int(e == int(ort(s)[0]))
    o_runs, e_runs = [], {th: [] for th in eager_threads}
    t_set = time.perf_counter()
    for r in range(spec["repeats"]):
        o, e = [], {th: [] for th in eager_threads}
        for j, s in enumerate(seqs):
            calls = [("ort", None)] + [("eager", th) for th in eager_threads]
            k = (r + j) % len(calls)
            for name, th in calls[k:] + calls[:k]:
                if th:
                    torch.set_num_threads(th)
                t1 = time.perf_counter()
                ort(s) if name == "ort" else eager(s)
                (o if name == "ort" else e[th]).append(time.perf_counter() - t1)
        o_runs.append(o)
        for th in eager_threads:
            e_runs[th].append(e[th])
        log(f"  ORT vs eager: repeat {r + 1}/{spec['repeats']} ({time.perf_counter() - t_set:.0f} s)")
    med = {th: float(np.median([x for run in e_runs[th] for x in run])) for th in eager_threads}
    best = min(med, key=med.get)
    torch.set_num_threads(best)
    # extraction throughput: the stacked [L+1, B, T, d] states the probes are trained on
    n_tok = sum(len(s) for s in ref)
    ext = []
    for _ in range(spec.get("extract_repeats", 1)):
        t1 = time.perf_counter()
        states, mask, enc = extract(bb, texts, batch_size=8)
        ext.append(time.perf_counter() - t1)
        del states, mask
    return {
        "ort": o_runs,
        "eager": e_runs[best],
        "eager_by_threads": {str(k): v for k, v in e_runs.items()},
        "eager_median_by_threads": {str(k): v for k, v in med.items()},
        "tokens": [len(s) for s in seqs],
        "encoder_mismatches": mismatched,
        "same_first_token": f"{same}/4",
        "extract_seconds": ext,
        "extract_tokens": n_tok,
        "extract_batch_size": 8,
        "torch_threads": best,
        "states_bytes_per_token": (bb.num_layers + 1) * bb.hidden_size * 4,
        "np": np.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    argv = argv or sys.argv[1:]
    spec = json.loads(Path(argv[0]).read_text())
    fn = {"memory": run_memory, "latency": run_latency, "torch": run_torch}[spec["mode"]]
    res = fn(spec)
    res["mode"] = spec["mode"]
    from singlepass.files import atomic_write  # after the measurement: the memory mode counts imports

    atomic_write(argv[1], json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
