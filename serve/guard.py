"""Guard-then-serve inside the server: ``singlepass serve BASE --guard DIR``.

A separate classifier scores each completion prompt (the user's text, before the chat template:
what such a guard is trained on) BEFORE the prompt is admitted to the engine. A flagged prompt is
refused as a policy block would refuse it (the refusal text, ``finish_reason: content_filter``,
``singlepass.blocked_by: "guard"``) and never reaches the LLM; any other prompt is queued as
usual, with the guard's label (``safe``/``unsafe``, score = P(unsafe)) beside the probes' labels
under the key ``guard``. This is the pipeline a fused probe replaces, served by the same code, so
the serving benchmark (``singlepass bench serve``) can compare the two through one server.

``DIR`` is a ``ClassifierGuard`` folder (``benchmarks/guards.py``: config.json + model.onnx +
tokenizer.json, e.g. the benchmark's fine-tuned MiniLM under ``$SINGLEPASS_CACHE/guards``). Any
object with ``score(texts) -> P(unsafe) [B]`` and a ``threshold`` can stand in for it
(``create_app(..., guard=obj)``).

The guard runs on one thread of its own that scores every prompt waiting at that moment in one
batch (at most ``max_batch``), so concurrent requests share guard passes the way they share
decode passes. Its ONNX Runtime session does not spin idle threads: it shares the process's
cores with the LLM's session. Moderations are not guarded (they report the probes only).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from singlepass.errors import SinglepassError
from singlepass.runtime.passes import Label
from singlepass.serve.engine import WorkerThread

log = logging.getLogger("singlepass.serve")

KEY = "guard"  # its name in ``singlepass.labels`` and ``blocked_by``
LABELS = ("safe", "unsafe")


class Scorer(Protocol):
    threshold: float

    def score(self, texts: list[str]) -> np.ndarray: ...


@dataclass
class Verdict:
    flagged: bool
    score: float  # P(unsafe)
    seconds: float  # queued + scored

    @property
    def label(self) -> Label:
        return Label(LABELS[int(self.flagged)], self.score, [1.0 - self.score, self.score])


def check_folder(folder: str | os.PathLike) -> Path:
    """Fail fast (before listening) on a folder that cannot be a guard."""
    folder = Path(folder)
    missing = [f for f in ("config.json", "model.onnx", "tokenizer.json") if not (folder / f).is_file()]
    if missing:
        raise SinglepassError(
            f"--guard {folder}: not a guard folder ({', '.join(missing)} missing); it needs config.json, "
            "model.onnx and tokenizer.json as benchmarks/guards.py writes them"
        )
    return folder


def load_scorer(folder: str | os.PathLike, threads: int | None = None) -> Scorer:
    """The ``ClassifierGuard`` of a folder, its session without idle-thread spinning."""
    from singlepass.benchmarks.guards import ClassifierGuard
    from singlepass.runtime.backends import ort_session

    guard = ClassifierGuard(check_folder(folder), threads)
    guard.sess = ort_session(guard.folder / "model.onnx", threads, spinning=False, arena=False)
    return guard


class GuardStage(WorkerThread):
    """Scores prompts on its own thread, batching whatever is waiting (see the module docstring)."""

    thread_name = "singlepass-guard"

    def __init__(self, scorer: Scorer, max_batch: int = 64):
        self.scorer, self.max_batch = scorer, max(1, int(max_batch))
        self.threshold = float(scorer.threshold)
        self.name = str(getattr(scorer, "folder", type(scorer).__name__))
        self._cv = threading.Condition()
        self._waiting: deque[tuple[str, asyncio.AbstractEventLoop, asyncio.Future, float]] = deque()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.stats = {"batches": 0, "scored": 0, "flagged": 0}

    async def check(self, text: str) -> Verdict:
        """The guard's verdict on one prompt (awaits its batch)."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        with self._cv:
            if self._stop:
                raise SinglepassError("the guard is not running")
            self._waiting.append((text, loop, fut, time.perf_counter()))
            self._cv.notify_all()
        return await fut

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not self._waiting:
                    self._cv.wait()
                if self._stop:
                    left = list(self._waiting)
                    self._waiting.clear()
                    break
                n = min(self.max_batch, len(self._waiting))
                batch = [self._waiting.popleft() for _ in range(n)]
            texts = [b[0] for b in batch]
            try:
                scores = np.asarray(self.scorer.score(texts), dtype=np.float64).reshape(-1)
                if scores.shape[0] != len(texts):
                    raise SinglepassError(f"the guard returned {scores.shape[0]} scores for {len(texts)} prompts")
            except Exception as e:  # noqa: BLE001 - each waiting request fails, the stage goes on
                log.exception("the guard failed")
                for _, loop, fut, _ in batch:
                    _resolve(loop, fut, error=e)
                continue
            now = time.perf_counter()
            self.stats["batches"] += 1
            self.stats["scored"] += len(texts)
            for (_, loop, fut, t0), p in zip(batch, scores):
                v = Verdict(bool(p >= self.threshold), float(p), now - t0)
                self.stats["flagged"] += v.flagged
                _resolve(loop, fut, value=v)
        for _, loop, fut, _ in left:
            _resolve(loop, fut, error=SinglepassError("the server is shutting down"))


def _resolve(loop: asyncio.AbstractEventLoop, fut: asyncio.Future, value=None, error=None) -> None:
    def done() -> None:
        if fut.done():  # the request is gone (cancelled)
            return
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(value)

    try:
        loop.call_soon_threadsafe(done)
    except RuntimeError:  # the loop is closed: nobody is waiting
        pass
