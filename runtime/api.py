"""Tokens and labels from every pass: prefill, then one token per decode pass (numpy, no torch).

    rt = singlepass.runtime.load("artifacts/smollm2")          # checks the folder, opens a backend
    r = rt.generate("What is the capital of France?", 20)        # one prompt -> Result
    r.text, r.token_ids, r.labels["safety"].label, r.labels["safety"].score
    for ev in rt.stream(["hi", "bye"], 20):                      # one Event per prompt per pass
        ev.index, ev.step, ev.token_id, ev.text, ev.labels        # labels on step 0 only

The prefill pass returns the next-token logits (last position only) *and* every fused probe's
``<name>/logits``, read as float64 probabilities (``contract.class_probs``): binary probes give
``label_names[1]`` when ``P(positive) >= threshold`` (score = P(positive)), multi-class probes the
argmax (score = its probability). The label policy
(``policy.py``) is applied right there, before any token is produced.

Batches are left-padded with position ids ``cumsum(mask) - 1``; each row stops at its own
end-of-sequence token, at ``max_new_tokens`` or at the artifact's ``max_total_length``
(finished rows leave the batch), so a prompt's result does not depend on the other prompts.

Bad prompts (not a string, empty, too long without ``truncate``): every prompt is checked before
any pass runs. With a list of prompts, ``on_error="return"`` (the default) gives a bad prompt a
result with ``error`` set and ``finish_reason = "error"`` while the others are served as usual;
``on_error="raise"`` raises one SinglepassError naming every bad prompt before any work. A single
string prompt always raises. Call-level mistakes (unknown backend, bad sampling values, a policy
naming an unknown probe, a batch over the backend's limit) always raise.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from singlepass.errors import SinglepassError
from singlepass.runtime import policy as pol
from singlepass.runtime.backends import Backend, select
from singlepass.runtime.contract import Manifest, read_artifact
from singlepass.runtime.passes import Label, decode_one_token, labels_from, last_logits, prefill
from singlepass.runtime.sampling import Sampling, next_tokens
from singlepass.runtime.text import TextTracker
from singlepass.runtime.tokenize import PromptTokenizer

DEFAULT_MAX_NEW_TOKENS = 64


# ----------------------------------------------------------------------------- results


@dataclass
class Result:
    """One prompt's outcome. ``finish_reason``: eos, max_new_tokens, max_total_length,
    engine_max_seq (a TensorRT profile's sequence limit), blocked or error."""

    index: int
    prompt: object
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    labels: dict[str, Label] = field(default_factory=dict)
    prompt_tokens: int = 0
    truncated: bool = False
    finish_reason: str | None = None
    blocked_by: str | None = None
    error: str | None = None
    prefill_seconds: float | None = None  # wall time of this prompt's batch's prefill pass
    seconds: float | None = None  # wall time of this prompt's batch until this prompt finished
    # Response probes: the label of the response so far after the last decode pass, and each
    # probe's score after every pass (pass k folds in generated tokens 1..k).
    response_labels: dict[str, Label] = field(default_factory=dict)
    response_scores: dict[str, list[float]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict:
        d = {
            "text": self.text,
            "token_ids": list(self.token_ids),
            "labels": {k: v.to_dict() for k, v in self.labels.items()},
            "finish_reason": self.finish_reason,
            "prompt_tokens": self.prompt_tokens,
            "truncated": self.truncated,
        }
        if self.blocked_by:
            d["blocked_by"] = self.blocked_by
        if self.error:
            d["error"] = self.error
        if self.response_labels:
            d["response_labels"] = {k: v.to_dict() for k, v in self.response_labels.items()}
            d["response_scores"] = self.response_scores
        return d


@dataclass
class Event:
    """What one pass produced for one prompt. Step 0 = the prefill pass (labels, first token)."""

    index: int
    step: int
    token_id: int | None = None
    text: str = ""  # the new text (may be "" while a UTF-8 character is incomplete)
    labels: dict[str, Label] | None = None
    done: bool = False
    finish_reason: str | None = None
    blocked_by: str | None = None
    error: str | None = None
    truncated: bool = False
    prompt_tokens: int = 0
    seconds: float = 0.0  # since the batch's prefill started
    response: dict[str, Label] | None = None  # decode passes: the response probes' labels so far

    def to_dict(self) -> dict:
        d = {"index": self.index, "step": self.step, "token_id": self.token_id, "text": self.text}
        if self.labels is not None:
            d["labels"] = {k: v.to_dict() for k, v in self.labels.items()}
        if self.response is not None:
            d["response_labels"] = {k: v.to_dict() for k, v in self.response.items()}
        if self.done:
            d["finish_reason"] = self.finish_reason
        for k in ("blocked_by", "error"):
            if getattr(self, k):
                d[k] = getattr(self, k)
        if self.truncated:
            d["truncated"] = True
        return d


# ----------------------------------------------------------------------------- the runtime


class Runtime:
    """An artifact folder opened for serving (see the module docstring)."""

    def __init__(
        self,
        artifact: str | os.PathLike | Manifest,
        backend: str | Backend = "auto",
        engine: str | None = None,
        threads: int | None = None,
        policy=None,
        refusal: str = pol.DEFAULT_REFUSAL,
        ignore_eos: bool = False,
        memory_arena: bool = True,
    ):
        self.manifest: Manifest = artifact if isinstance(artifact, Manifest) else read_artifact(artifact)
        self.folder: Path = self.manifest.folder
        self.tokenizer = PromptTokenizer(self.folder, self.manifest)
        self.policy = pol.resolve(policy, self.manifest.probes)
        if not isinstance(refusal, str):
            raise SinglepassError(f"the refusal message must be a string, not {type(refusal).__name__}")
        self.refusal = refusal
        self.backend: Backend = (
            backend
            if isinstance(backend, Backend)
            else select(self.folder, self.manifest, backend, engine, threads, arena=memory_arena)
        )
        # ignore_eos: every row generates its full token budget (fixed work, for benchmarks)
        self.eos_ids: frozenset[int] = frozenset() if ignore_eos else frozenset(self.manifest.tokenizer.eos_token_ids)

    # -- limits
    @property
    def kv(self) -> bool:
        return bool(self.manifest.graph.kv_cache)

    @property
    def dummy(self) -> int:
        return self.backend.dummy_past if self.kv else 0

    @property
    def max_batch(self) -> int:
        lim = self.manifest.limits.max_batch
        return min(lim, self.backend.max_batch) if self.backend.max_batch else lim

    @property
    def max_prompt_length(self) -> int:
        n = self.manifest.limits.max_prompt_length
        if self.backend.max_prompt:
            n = min(n, self.backend.max_prompt)
        if self.backend.max_seq:
            n = min(n, self.backend.max_seq - self.dummy)
        return n

    @property
    def pad_id(self) -> int:
        return self.manifest.pad_id

    @property
    def probe_names(self) -> list[str]:
        return self.manifest.probe_names

    def encode(self, prompt, truncate: bool = False) -> tuple[list[int], bool]:
        """-> (token ids, truncated), exactly as ``models/prompts.py`` encodes for training."""
        return self.tokenizer.encode(prompt, self.max_prompt_length, truncate)

    # -- serving
    def generate(self, prompts, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, **kw):
        """-> a Result per prompt (a single Result for a single string). Keyword arguments as
        ``stream``."""
        single = isinstance(prompts, str)
        results: dict[int, Result] = {}
        plist = [prompts] if single else prompts
        for ev in self.stream(prompts, max_new_tokens, pieces=False, **kw):
            r = results.get(ev.index)
            if r is None:
                r = results[ev.index] = Result(
                    ev.index,
                    plist[ev.index],
                    labels=ev.labels or {},
                    prompt_tokens=ev.prompt_tokens,
                    truncated=ev.truncated,
                    prefill_seconds=ev.seconds if ev.error is None else None,
                )
            if ev.token_id is not None:
                r.token_ids.append(ev.token_id)
            if ev.response:
                r.response_labels = ev.response
                for k, v in ev.response.items():
                    r.response_scores.setdefault(k, []).append(v.score)
            if ev.done:
                r.finish_reason, r.blocked_by, r.error, r.seconds = (
                    ev.finish_reason,
                    ev.blocked_by,
                    ev.error,
                    ev.seconds,
                )
                text = self.tokenizer.decode(r.token_ids) if r.token_ids else ""
                # blocked on the prompt: the refusal; stopped mid-response: the text so far + the notice
                r.text = (ev.text if ev.step == 0 else text + ev.text) if ev.blocked_by else text
        out = [results[i] for i in sorted(results)]
        return out[0] if single else out

    def stream(
        self,
        prompts,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        *,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        truncate: bool = False,
        policy=None,
        batch_size: int | None = None,
        on_error: str = "return",
        pieces: bool = True,
    ) -> Iterator[Event]:
        """Yield an Event per prompt per pass as it is produced: step 0 carries the labels (and
        the first token, the refusal of a blocked prompt, or the error of a bad one).

        ``truncate``: cut prompts over the maximum (reported as ``truncated``) instead of
        refusing them. ``policy``: overrides the runtime's policy for this call.
        ``batch_size``: prompts per batch (default: all in one batch, which must fit the
        backend's max batch). ``on_error``: "return" or "raise" (see the module docstring).
        ``pieces``: each event's new text (``generate`` passes False and decodes once at the end)."""
        # Everything about the call is checked here, eagerly, before the first event.
        single = isinstance(prompts, str)
        if single:
            prompts, on_error = [prompts], "raise"
        if not isinstance(prompts, (list, tuple)):
            raise SinglepassError(f"prompts must be a string or a list of strings, not {type(prompts).__name__}")
        if on_error not in ("return", "raise"):
            raise SinglepassError(f"on_error must be 'return' or 'raise', not {on_error!r}")
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
            raise SinglepassError(f"max_new_tokens must be an integer >= 0, not {max_new_tokens!r}")
        sampling = Sampling(temperature, top_k, top_p, seed)
        rules = self.policy if policy is None else pol.resolve(policy, self.manifest.probes)
        if batch_size is not None and (
            not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1
        ):
            raise SinglepassError(f"batch_size must be an integer >= 1, not {batch_size!r}")
        good, bad = [], []
        for i, p in enumerate(prompts):
            try:
                ids, cut = self.encode(p, truncate)
                good.append((i, ids, cut))
            except SinglepassError as e:
                bad.append((i, str(e)))
        if bad and on_error == "raise":
            if single:
                raise SinglepassError(bad[0][1])
            raise SinglepassError("; ".join(f"prompt {i}: {e}" for i, e in bad))
        size = batch_size or max(1, len(good))
        if size > self.max_batch:
            what = "TensorRT profile" if self.backend.max_batch else "artifact's recorded limit (limits.max_batch)"
            raise SinglepassError(
                f"a batch of {size} prompts is larger than the {what} allows (max batch "
                f"{self.max_batch}): pass batch_size <= {self.max_batch} (--batch-size) or fewer "
                "prompts"
            )
        return self._serve(good, bad, max_new_tokens, sampling, rules, size, pieces)

    def _serve(self, good, bad, max_new_tokens, sampling, rules, size, pieces) -> Iterator[Event]:
        for i, e in bad:
            yield Event(i, 0, done=True, finish_reason="error", error=e)
        for start in range(0, len(good), size):
            yield from self._batch(good[start : start + size], max_new_tokens, sampling, rules, pieces)

    def _batch(self, items, max_new_tokens: int, sampling: Sampling, rules: dict, pieces: bool) -> Iterator[Event]:
        """One left-padded batch: prefill, policy, then one decode pass per token; finished rows
        leave the batch."""
        m = self.manifest
        t0 = time.perf_counter()
        B = len(items)
        index = [i for i, _, _ in items]
        plens = [len(ids) for _, ids, _ in items]
        T = max(plens)
        self.backend.check_request(B, T)
        # Per-row token budget and the reason generation ends there.
        total = m.limits.max_total_length
        engine = (self.backend.max_seq - self.dummy - T + 1) if self.backend.max_seq else math.inf
        budget, why = [], []
        for n in plens:
            b, reason = min(
                (max_new_tokens, "max_new_tokens"),
                (max(0, total - n), "max_total_length"),
                (max(0, engine), "engine_max_seq"),
                key=lambda x: x[0],
            )
            budget.append(b)
            why.append(reason)
        rngs = [sampling.generator(i) for i in index]
        watch = [pol.Streaks(rules, m.probes) for _ in items]
        detok = [TextTracker(self.tokenizer.decode) if pieces else None for _ in items]
        count, last, done = [0] * B, [0] * B, [False] * B

        def emit(r: int, step: int, logits: np.ndarray, **head) -> Event:
            """Choose row r's next token from its logits [1, V] -> its Event."""
            tok = int(next_tokens(logits, sampling, [rngs[r]])[0])
            last[r] = tok
            count[r] += 1
            eos = tok in self.eos_ids
            done[r] = eos or count[r] >= budget[r]
            piece = detok[r].add(tok, final=done[r])[0] if pieces else ""
            return Event(
                index[r],
                step,
                token_id=tok,
                text=piece,
                done=done[r],
                finish_reason=("eos" if eos else why[r]) if done[r] else None,
                **head,
            )

        out, state = prefill(self.backend, m, [ids for _, ids, _ in items])
        labels = labels_from(m, out) or [{} for _ in items]
        logits = last_logits(m, out)  # [B, V]
        now = time.perf_counter() - t0
        for r, (i, _, cut) in enumerate(items):
            head = dict(labels=labels[r], truncated=cut, prompt_tokens=plens[r], seconds=now)
            blocker = pol.decide(rules, m.probes, labels[r])
            if blocker:  # the policy acts on the prefill pass, before any token
                done[r] = True
                yield Event(
                    i,
                    0,
                    text=rules[blocker].message or self.refusal,
                    done=True,
                    finish_reason="blocked",
                    blocked_by=blocker,
                    **head,
                )
            elif budget[r] == 0:
                done[r] = True
                yield Event(i, 0, done=True, finish_reason=why[r], **head)
            else:
                yield emit(r, 0, logits[r : r + 1], **head)
        rows = list(range(B))  # the batch rows present in `state`
        try:
            step = 0
            while not all(done):
                step += 1
                live = [r for r in rows if not done[r]]
                if live != rows:  # drop finished rows: they no longer cost anything
                    state = state.keep([rows.index(r) for r in live])
                    rows = live
                tokens = np.array([last[r] for r in rows], np.int64)  # [B_live]
                out, state = decode_one_token(self.backend, m, state, tokens)
                logits = last_logits(m, out)  # [B_live, V]
                response = labels_from(m, out, "response")  # [] without response probes
                now = time.perf_counter() - t0
                for k, r in enumerate(rows):
                    seen = response[k] if response else None  # the response's tokens 1..step
                    fired = watch[r].update(seen)
                    if fired:  # stopped before the next token: the text so far stands, plus the notice
                        done[r] = True
                        text = (detok[r].flush() if pieces else "") + watch[r].notice(fired)
                        yield Event(
                            index[r],
                            step,
                            text=text,
                            done=True,
                            finish_reason="blocked",
                            blocked_by=fired,
                            seconds=now,
                            response=seen,
                        )
                    else:
                        yield emit(r, step, logits[k : k + 1], seconds=now, response=seen)
        finally:
            self.backend.release()  # its hold on this batch's KV buffers


def load(
    artifact: str | os.PathLike | Manifest,
    backend: str | Backend = "auto",
    engine: str | None = None,
    threads: int | None = None,
    policy=None,
    refusal: str = pol.DEFAULT_REFUSAL,
    ignore_eos: bool = False,
    memory_arena: bool = True,
) -> Runtime:
    """Open an artifact folder for serving (checks the folder, the policy and the backend).
    ``memory_arena=False``: ONNX Runtime without its CPU memory arena (``runtime.backends.ort_session``;
    what ``singlepass serve`` uses)."""
    return Runtime(artifact, backend, engine, threads, policy, refusal, ignore_eos, memory_arena)


def generate(
    artifact: str | os.PathLike | Runtime,
    prompts: str | list[str],
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    *,
    backend: str = "auto",
    engine: str | None = None,
    threads: int | None = None,
    policy=None,
    refusal: str = pol.DEFAULT_REFUSAL,
    **kw,
) -> Result | list[Result]:
    """One call: open ``artifact`` (a folder or a Runtime) and generate (see ``Runtime.stream``)."""
    rt = artifact if isinstance(artifact, Runtime) else load(artifact, backend, engine, threads, policy, refusal)
    return rt.generate(prompts, max_new_tokens, **kw)
