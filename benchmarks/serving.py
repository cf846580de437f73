"""The configurations the latency benchmark serves, all on one backend and one code path: the
runtime (``singlepass.runtime``: ONNX Runtime on CPU, numpy, tokenizers; no torch).

* ``LLM``: an exported artifact (base, or with fused probes) served by ``runtime.Runtime``:
  chat template, left-padded batch, one prefill pass (next token + every fused probe's label,
  policy ``report``), then greedy KV-cache decode passes. The runtime is opened with
  ``ignore_eos=True`` so that every request generates exactly ``max_new_tokens`` (the same work
  in every configuration).
* ``Pipeline``: guard-then-serve: a separate guard scores the prompts, then the LLM runs
  (always: the latency of the common, safe case; a refused request would skip the LLM).

Every LLM session here is the runtime's ``OrtBackend`` with ``threads`` intra-op threads and
``spinning=False`` (no busy-waiting), because several sessions share one measuring process (the
alternating runs, a guard and its LLM) and an idle session's spinning pool must not take the
cores of the one that runs.
"""

from __future__ import annotations

import os

import numpy as np

from singlepass.runtime.api import Result, Runtime, load
from singlepass.runtime.backends import OrtBackend
from singlepass.runtime.contract import Manifest, read_artifact
from singlepass.runtime.passes import last_logits, prefill
from singlepass.runtime.tokenize import PromptTokenizer


def ort_backend(manifest: Manifest, threads: int | None) -> OrtBackend:
    """The runtime's ONNX Runtime CPU backend, idle threads not spinning (sessions share the cores)."""
    return OrtBackend(manifest.folder / manifest.graph.file, manifest, "cpu", threads, spinning=False)


class LLM:
    """One artifact in one runtime (one ONNX Runtime session)."""

    def __init__(self, folder: str | os.PathLike, threads: int | None = None):
        manifest = read_artifact(folder)
        # ignore_eos: fixed work, every request generates max_new_tokens tokens
        self.rt: Runtime = load(manifest, backend=ort_backend(manifest, threads), ignore_eos=True)
        self.manifest: Manifest = self.rt.manifest
        self.folder = manifest.folder

    @property
    def probe_names(self) -> list[str]:
        return self.rt.probe_names

    @property
    def tokenizer(self) -> PromptTokenizer:
        return self.rt.tokenizer

    @property
    def max_prompt_length(self) -> int:
        return self.rt.max_prompt_length

    @property
    def pad_id(self) -> int:
        return self.rt.pad_id

    def encode(self, text: str) -> list[int]:
        return self.rt.encode(text, truncate=True)[0]

    def __call__(self, texts: list[str], max_new_tokens: int = 1) -> list[Result]:
        """-> the runtime's Results (tokens, text, labels of every fused probe)."""
        return self.rt.generate(list(texts), max_new_tokens, truncate=True, batch_size=len(texts))

    def first_logits(self, seqs: list[list[int]]) -> np.ndarray:
        """One prefill pass over token ids (left-padded) -> next-token logits [B, V] (what a verdict reads)."""
        out, _ = prefill(self.rt.backend, self.manifest, seqs)
        return last_logits(self.manifest, out)  # [B, V]


class Pipeline:
    """guard-then-serve: ``guard(texts)`` (verdicts), then the LLM on the same texts."""

    def __init__(self, guard, llm: LLM):
        self.guard, self.llm = guard, llm

    def __call__(self, texts: list[str], max_new_tokens: int = 1) -> tuple[np.ndarray, list[Result]]:
        verdicts = self.guard(texts)  # bool [B]
        return verdicts, self.llm(texts, max_new_tokens)
