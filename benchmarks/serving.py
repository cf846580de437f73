"""The configurations the latency benchmark serves, all on one backend and one code path: the
runtime (``singlepass.runtime``: ONNX Runtime on CPU, numpy, tokenizers; no torch).

* ``LLM``: an exported artifact (base, or with fused probes) served by ``runtime.Runtime``:
  chat template, left-padded batch, one prefill pass (next token + every fused probe's label,
  policy ``report``), then greedy KV-cache decode passes. The runtime's EOS set is emptied so
  that every request generates exactly ``max_new_tokens`` (the same work in every
  configuration).
* ``Pipeline``: guard-then-serve: a separate guard scores the prompts, then the LLM runs
  (always: the latency of the common, safe case; a refused request would skip the LLM).

Every LLM session here is the runtime's ``OrtBackend`` with ``threads`` intra-op threads and
``spinning=False`` (no busy-waiting), because several sessions share one measuring process (the
alternating runs, a guard and its LLM) and an idle session's spinning pool must not take the
cores of the one that runs.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def ort_backend(folder: Path, manifest: dict, threads: int | None):
    """The runtime's ONNX Runtime CPU backend, idle threads not spinning (sessions share the cores)."""
    from singlepass.runtime.backends import OrtBackend

    return OrtBackend(folder / manifest["graph"]["file"], manifest, "cpu", threads, spinning=False)


class LLM:
    """One artifact in one runtime (one ONNX Runtime session)."""

    def __init__(self, folder: str | os.PathLike, threads: int | None = None):
        from singlepass.runtime.contract import load
        from singlepass.runtime.generate import Runtime

        art = load(folder)
        self.folder = art.folder
        self.rt = Runtime(art, backend=ort_backend(art.folder, art.manifest, threads))
        self.rt.eos_ids = set()  # fixed work: every request generates max_new_tokens tokens
        self.m = self.rt.manifest

    @property
    def probe_names(self) -> list[str]:
        return self.rt.probe_names

    @property
    def tokenizer(self):
        return self.rt.tokenizer

    @property
    def max_prompt_length(self) -> int:
        return self.rt.max_prompt_length

    def encode(self, text: str) -> list[int]:
        return self.rt.encode(text, truncate=True)[0]

    def __call__(self, texts: list[str], max_new_tokens: int = 1):
        """-> the runtime's Results (tokens, text, labels of every fused probe)."""
        return self.rt.generate(list(texts), max_new_tokens, truncate=True, batch_size=len(texts))

    def first_logits(self, seqs: list[list[int]]) -> np.ndarray:
        """One prefill pass over token ids -> next-token logits [B, V] (what a verdict reads)."""
        from singlepass.runtime.generate import last_logits, prefill

        out, _ = prefill(self.rt.backend, self.m, seqs, self.rt.pad_id)
        return last_logits(self.m, out)


class Pipeline:
    """guard-then-serve: ``guard(texts)`` (verdicts), then the LLM on the same texts."""

    def __init__(self, guard, llm: LLM):
        self.guard, self.llm = guard, llm

    def __call__(self, texts: list[str], max_new_tokens: int = 1):
        verdicts = self.guard(texts)
        return verdicts, self.llm(texts, max_new_tokens)
