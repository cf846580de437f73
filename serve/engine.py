"""The one engine loop: continuous (iteration-level) batching over ``runtime/passes.py`` (numpy).

One background thread owns the backend and runs, until stopped::

    admit   waiting jobs (first come, first served) fill the free rows (max batch - live rows),
            up to ``prefill_tokens`` prompt tokens per iteration while rows decode (the rest
            waits one decode step, so running streams never stall long behind a burst of
            prompts: vLLM's token budget; with no row decoding, all that fit at once);
            they are prefilled in left-padded batches of similar length (``prefill_groups``):
            their labels are read, the label policy is applied, their first token is chosen;
    join    the newcomers take the slots of finished rows, written in place (``put``), or join
            by one merge (``merge``, a copy of the batch);
    decode  one ``passes.decode_one_token`` for every row; a row that is finished (EOS, a stop
            string, its token budget) or cancelled (client gone, timeout) stops at once. Its slot
            rides along (masked work, no copy) while jobs wait to take it; otherwise, or when
            the batch carries many columns no live row needs, the batch is compacted (``_tidy``).

Rows of different lengths share one batch by left padding. The state after a pass holds, per row,
an attention mask and a KV cache ``[B, kv_heads, P, head_dim]`` whose real columns sit on the
right (``runtime/batching.py`` pads on the left); ``fit`` aligns a state on the right to one width,
``dummy + the longest row``: it prepends zero columns (mask 0, zero past) or cuts leading columns
no row uses any more. With the in-place KV cache (``export/kvcache.py``) rows are prefixes
instead (``prefix=True``: aligned on the left, trailing columns appended or cut) and the batch
keeps spare columns, which the decode passes fill in place, one per step; a step then costs what
each row's own length costs, not the widest row's. Position ids are per row ([B, 1], the row's
own count), so the graph sees what it sees for the row alone: masked columns contribute nothing,
and each row draws from its own generator, seeded as ``Runtime.generate`` seeds a single prompt.
A request therefore gets the result it gets alone (greedy: the same tokens and labels).

Jobs come from any thread (``submit``, ``cancel``); each job's events go to its ``sink``, called
on the engine thread (the server hands them to its event loop). No torch, no web framework here.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from singlepass.errors import SinglepassError
from singlepass.runtime import policy as pol
from singlepass.runtime.batching import align_rows
from singlepass.runtime.feeds import SPARE, spare_columns
from singlepass.runtime.passes import Label, State, decode_one_token, labels_from, last_logits, prefill
from singlepass.runtime.sampling import Sampling, sample
from singlepass.runtime.text import TextTracker

log = logging.getLogger("singlepass.serve")

LINGER = 8  # decode steps a finished row's slot waits for a newcomer before the batch is compacted
LINGER_S = 0.5  # seconds an idle engine keeps its batch (every slot free) for the next requests


class QueueFull(SinglepassError):
    """The waiting queue has no room for the job(s): answer 429 at once."""


class EngineStopped(SinglepassError):
    """The engine is not running (shutting down, or its loop failed)."""


@dataclass
class Out:
    """What one pass produced for one job. Step 0 = the prefill pass (labels, first token)."""

    step: int
    token_id: int | None = None
    text: str = ""  # the new text to stream (held back while it may be cut)
    labels: dict[str, Label] | None = None
    prompt_tokens: int = 0
    done: bool = False
    finish_reason: str | None = None  # eos, stop, max_tokens, max_total_length, engine_max_seq, blocked, error
    final_text: str | None = None  # on the last event: the whole text (refusal if blocked)
    blocked_by: str | None = None
    error: str | None = None
    response: dict[str, Label] | None = None  # decode passes: the response probes' labels so far


@dataclass(eq=False)
class Job:
    """One sequence to serve: prompt ids, a token budget (and the finish reason when it is spent),
    sampling, stop strings; ``policy=False`` reports labels without blocking (moderation)."""

    ids: list[int]
    budget: int
    why: str = "max_tokens"
    sampling: Sampling = field(default_factory=Sampling)
    stops: tuple[str, ...] = ()
    policy: bool = True
    incremental: bool = False  # stream text pieces (else the text is decoded once, at the end)
    sink: Callable[[Out], None] | None = None
    arrival: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    finished: bool = False


# ----------------------------------------------------------------------------- batch state


def width(state: State, dummy: int) -> int:
    """The narrowest mask that holds every row: the dummy slots + the longest row's real tokens."""
    return dummy + int(state.mask.sum(1).max())


def stack(parts: list[tuple[State, list[int] | None]], cols: int, pad_id: int, kv: bool, prefix: bool = False) -> State:
    """One batch of the parts' rows (all, or those listed), aligned on the right to ``cols``
    mask columns: leading columns (masked in every row) cut, or masked ones prepended (zero
    past); ``prefix`` (the in-place KV cache: rows are prefixes) on the left, trailing columns
    cut or appended. With a KV cache only the last ids/position column is kept (the next pass
    reads only that); without one the ids and positions follow the mask."""
    mask = align_rows([(s.mask, r) for s, r in parts], cols, 1, 0, prefix)
    if kv:
        ids = align_rows([(s.ids[:, -1:], r) for s, r in parts], 1, 1, pad_id)
        pos = align_rows([(s.pos[:, -1:], r) for s, r in parts], 1, 1, 0)
    else:
        ids = align_rows([(s.ids, r) for s, r in parts], cols, 1, pad_id)
        pos = align_rows([(s.pos, r) for s, r in parts], cols, 1, 0)
    past = parts[0][0].past
    if past is not None:
        past = [align_rows([(s.past[i], r) for s, r in parts], cols, 2, 0, prefix) for i in range(len(past))]
    axes = parts[0][0].axes  # the response probes' state: rows along each tensor's batch axis
    stream = [
        np.concatenate([s.stream[i] if r is None else np.take(s.stream[i], r, axis=ax) for s, r in parts], axis=ax)
        for i, ax in enumerate(axes)
    ]
    return State(ids, mask, pos, past, stream, axes)


def fit(state: State, cols: int, pad_id: int, kv: bool, prefix: bool = False) -> State:
    """A state aligned to ``cols`` mask columns (``stack`` of one part)."""
    return stack([(state, None)], cols, pad_id, kv, prefix)


def merge(
    a: State, b: State, dummy: int, pad_id: int, kv: bool, cols: int | None = None, prefix: bool = False
) -> State:
    """One batch of a's rows then b's, aligned to ``cols`` columns (at least the width both need)."""
    cols = max(width(a, dummy), width(b, dummy), cols or 0)
    return stack([(a, None), (b, None)], cols, pad_id, kv, prefix)


def put(dst: State, slots: list[int], src: State) -> None:
    """Write ``src``'s rows over ``dst``'s rows ``slots``, in place (both at one width): a
    newcomer takes a finished row's place without copying the batch."""
    at = np.asarray(slots)
    dst.ids[at], dst.mask[at], dst.pos[at] = src.ids, src.mask, src.pos
    for d, s in zip(dst.past or [], src.past or []):
        d[at] = s
    for d, s, ax in zip(dst.stream, src.stream, dst.axes):
        np.moveaxis(d, ax, 0)[at] = np.moveaxis(s, ax, 0)  # a view: written in place


def prefill_groups(jobs: list[Job], waste: float = 0.25) -> list[list[Job]]:
    """Newcomers in prefill batches of similar length, shortest first: left padding to the
    longest prompt of a batch costs compute, so a batch grows only while its padded size stays
    within ``1 + waste`` of its real tokens."""
    groups: list[list[Job]] = []
    real = 0
    for job in sorted(jobs, key=lambda j: len(j.ids)):
        n = len(job.ids)  # the longest so far: the batch's padded width
        if groups and (len(groups[-1]) + 1) * n <= (1 + waste) * (real + n):
            groups[-1].append(job)
            real += n
        else:
            groups.append([job])
            real = n
    return groups


# ----------------------------------------------------------------------------- the engine


class Observer:
    """What the engine reports (the server's Prometheus metrics implement it)."""

    def queue(self, waiting: int, running: int) -> None: ...

    def first(self, job: Job, out: Out, seconds: float) -> None: ...

    def generated(self, n: int) -> None: ...

    def batch(self, rows: int) -> None: ...

    def stopped(self, job: Job, probe: str) -> None:
        """A response probe's ``stop`` rule ended the job's generation."""

    def phase(self, name: str, seconds: float, tokens: int = 0) -> None:
        """Engine time by phase: ``prefill`` (passes over newcomers' prompts; tokens = their
        real prompt tokens), ``join`` (newcomers written into the batch), ``decode`` (one pass
        for every row; tokens = the live rows' new tokens), ``tidy`` (compaction)."""


class _Row:
    __slots__ = ("job", "rng", "count", "last", "text", "done", "ended", "watch")

    def __init__(self, job: Job, decode, watch: pol.Streaks):
        self.job, self.rng = job, job.sampling.generator(0)  # index 0: as Runtime.generate seeds one prompt
        self.count, self.last, self.done = 0, 0, False
        self.ended: int | None = None  # the decode step at which the row was seen finished
        self.text = TextTracker(decode, job.stops, job.incremental)
        self.watch = watch  # the response probes' stop rules on this row

    @property
    def live(self) -> bool:
        return not self.done and not self.job.cancelled


class WorkerThread:
    """A daemon thread running ``self._run``; ``stop`` sets ``self._stop`` and wakes it through
    ``self._cv`` (subclasses create both). Shared by the engine loop and the guard stage."""

    thread_name = "singlepass-worker"

    def start(self):
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)


class Engine(WorkerThread):
    """Continuous batching on one runtime (see the module docstring). ``max_batch``: rows decoded
    together (at most the artifact's/backend's limit); ``max_queue``: jobs waiting for a row;
    ``ignore_eos``: every row generates its whole token budget (fixed work, for benchmarks)."""

    thread_name = "singlepass-engine"

    def __init__(
        self,
        runtime,
        max_batch: int | None = None,
        max_queue: int = 128,
        observer: Observer | None = None,
        ignore_eos: bool = False,
        prefill_tokens: int = 512,
    ):
        self.rt = runtime
        limit = runtime.max_batch
        if max_batch is not None and not 1 <= max_batch <= limit:
            raise SinglepassError(f"--max-batch must be between 1 and the artifact's limit {limit}, not {max_batch}")
        if max_queue < 1:
            raise SinglepassError(f"--max-queue must be >= 1, not {max_queue}")
        if prefill_tokens < 1:
            raise SinglepassError(f"--prefill-tokens must be >= 1, not {prefill_tokens}")
        self.max_batch, self.max_queue, self.prefill_tokens = max_batch or limit, max_queue, prefill_tokens
        self.observer = observer or Observer()
        self.kv = bool(runtime.manifest.graph.kv_cache)
        self.prefix = runtime.manifest.graph.inplace  # rows are prefixes of the mask (in-place KV cache)
        self.dummy = runtime.dummy
        self.eos_ids: frozenset[int] = frozenset() if ignore_eos else frozenset(runtime.eos_ids)
        self._cv = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._rows: list[_Row] = []
        self._state: State | None = None
        self._idle = 0.0  # when the last live row finished
        self._stop = False
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.stats = {
            "prefills": 0,
            "decode_steps": 0,
            "merges": 0,
            "reused": 0,
            "widened": 0,
            "compactions": 0,
            "max_rows": 0,
            "admitted": 0,  # jobs prefilled
            "admissions": 0,  # iterations that admitted jobs
        }

    # -- limits
    def token_limit(self, prompt_tokens: int) -> tuple[int, str]:
        """-> (the most new tokens a prompt of this length may get, the limit's name)."""
        b = self.rt.backend
        total = (max(0, self.rt.manifest.limits.max_total_length - prompt_tokens), "max_total_length")
        engine = (max(0, b.max_seq - self.dummy - prompt_tokens + 1), "engine_max_seq") if b.max_seq else (math.inf,)
        return total if total[0] <= engine[0] else engine

    # -- lifecycle
    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stop

    # -- from any thread
    def submit(self, jobs: list[Job]) -> None:
        """Queue jobs (all or none): QueueFull when the queue has no room for them."""
        with self._cv:
            if not self.alive:
                raise EngineStopped("the engine is not running")
            if len(self._waiting) + len(jobs) > self.max_queue:
                raise QueueFull(
                    f"the server is busy: {len(self._waiting)} requests are waiting (--max-queue "
                    f"{self.max_queue}); retry later"
                )
            now = time.perf_counter()
            for j in jobs:
                j.arrival = now
            self._waiting.extend(jobs)
            self._cv.notify_all()
            waiting, running = len(self._waiting), self._live()
        self.observer.queue(waiting, running)

    def cancel(self, job: Job) -> None:
        """The client is gone or out of time: drop the job, waiting or running (idempotent)."""
        if job.finished or job.cancelled:
            return
        job.cancelled = True
        with self._cv:
            try:
                self._waiting.remove(job)
            except ValueError:
                pass  # running: the loop drops it before the next pass
            self._cv.notify_all()

    def counts(self) -> tuple[int, int]:
        """-> (waiting, running) jobs."""
        with self._cv:
            return len(self._waiting), self._live()

    # -- the loop (engine thread only below)
    def _run(self) -> None:
        try:
            while True:
                with self._cv:
                    while not self._stop and not self._waiting and not self._live():
                        if self._state is not None and time.perf_counter() - self._idle >= LINGER_S:
                            self._clear()  # idle: the free slots go
                        self._cv.wait(LINGER_S if self._state is not None else None)
                    if self._stop:
                        break
                    new: list[Job] = []
                    live = self._live()
                    free, tokens = self.max_batch - live, 0
                    # the token budget bounds how long running rows stall; with none running,
                    # every waiting job that fits is prefilled now (nobody would gain by its wait)
                    budget = self.prefill_tokens if live else math.inf
                    while self._waiting and len(new) < free:
                        job = self._waiting[0]
                        if new and tokens + len(job.ids) > budget:
                            break  # the rest waits for the next iteration, after a decode step
                        self._waiting.popleft()
                        if not job.cancelled:
                            new.append(job)
                            tokens += len(job.ids)
                    waiting = len(self._waiting)
                if new:
                    self.stats["admissions"] += 1
                    self._admit(new)
                    self.observer.queue(waiting, self._live())
                if self._live():
                    self._step()
                    self.observer.queue(len(self._waiting), self._live())
        except BaseException as e:  # noqa: BLE001 - the loop must report, not vanish
            log.exception("the engine loop failed")
            self.error = e
        finally:
            with self._cv:
                self._stop = True
                left = list(self._waiting) + [r.job for r in self._rows]
                self._waiting.clear()
                self._clear()
            for job in left:
                self._fail(job, "the server is shutting down" if self.error is None else "internal server error")
            self.observer.queue(0, 0)

    def _clear(self) -> None:
        """No rows: the decode state goes, and with it the backend's hold on its KV buffers."""
        self._rows, self._state = [], None
        self.rt.backend.release()

    def _live(self) -> int:
        return sum(r.live for r in self._rows)

    def _send(self, job: Job, out: Out) -> None:
        if out.done:
            job.finished = True
        if job.sink is not None:
            try:
                job.sink(out)
            except Exception:  # noqa: BLE001 - a broken consumer must not stop the others
                log.exception("delivering an event failed")

    def _fail(self, job: Job, message: str) -> None:
        if not job.finished:
            self._send(job, Out(0, done=True, finish_reason="error", error=message))

    def _emit(self, row: _Row, logits: np.ndarray, **head) -> Out:
        """Choose the row's next token from its logits [V] -> its event (to send)."""
        job = row.job
        tok = sample(logits, job.sampling, row.rng)
        step = row.count
        row.count += 1
        row.last = tok
        eos = tok in self.eos_ids
        done = eos or row.count >= job.budget
        piece, stopped = row.text.add(tok, final=done)
        done = done or stopped
        reason = ("stop" if stopped else "eos" if eos else job.why) if done else None
        row.done = done
        return Out(
            step,
            token_id=tok,
            text=piece,
            done=done,
            finish_reason=reason,
            final_text=row.text.emitted if done else None,
            **head,
        )

    def _admit(self, jobs: list[Job]) -> None:
        """Prefill the newcomers in batches of similar length (``prefill_groups``)."""
        for group in prefill_groups(jobs):
            self._prefill(group)

    def _prefill(self, jobs: list[Job]) -> None:
        """Prefill jobs together, apply the policy, first tokens; the live rows join the batch."""
        rt, m = self.rt, self.rt.manifest
        t0 = time.perf_counter()
        try:
            rt.backend.check_request(len(jobs), max(len(j.ids) for j in jobs))
            out, state = prefill(rt.backend, m, [j.ids for j in jobs])
        except Exception:  # noqa: BLE001 - the clients get an error, the log the trace
            log.exception("prefill failed")
            for job in jobs:
                self._fail(job, "internal server error (see the server log)")
            return
        self.stats["prefills"] += 1
        self.stats["admitted"] += len(jobs)
        self.observer.phase("prefill", time.perf_counter() - t0, sum(len(j.ids) for j in jobs))
        labels = labels_from(m, out) or [{} for _ in jobs]
        logits = last_logits(m, out)  # [B, V]
        now = time.perf_counter()
        rows, keep, tokens = [], [], 0
        for r, job in enumerate(jobs):
            if job.cancelled:
                continue
            head = dict(labels=labels[r], prompt_tokens=len(job.ids))
            blocker = pol.decide(rt.policy, m.probes, labels[r]) if job.policy else None
            if blocker:  # the policy acts on the prefill pass, before any token
                text = rt.policy[blocker].message or rt.refusal
                first = Out(
                    0, text=text, done=True, finish_reason="blocked", final_text=text, blocked_by=blocker, **head
                )
            elif job.budget <= 0:
                first = Out(0, done=True, finish_reason=job.why, final_text="", **head)
            else:
                first = None
            if first is not None:
                self.observer.first(job, first, now - job.arrival)
                self._send(job, first)
                continue
            row = _Row(job, rt.tokenizer.decode, pol.Streaks(rt.policy if job.policy else {}, m.probes))
            first = self._emit(row, logits[r], **head)
            tokens += 1
            self.observer.first(job, first, now - job.arrival)
            self._send(job, first)
            if not row.done:
                rows.append(row)
                keep.append(r)
        self.observer.generated(tokens)
        if not keep:
            return
        t0 = time.perf_counter()
        self._join(state.keep(keep) if len(keep) < len(jobs) else state, rows)
        self.observer.phase("join", time.perf_counter() - t0)
        self.stats["max_rows"] = max(self.stats["max_rows"], sum(r.live for r in self._rows))

    def _join(self, new: State, rows: list[_Row]) -> None:
        """The newcomers join the running batch: into the slots of finished rows, written in place
        (no copy of the batch; a batch too narrow for them is widened first, one copy), the rest
        appended (one copy)."""
        pad, kv, dummy = self.rt.pad_id, self.kv, self.dummy
        w = width(new, dummy)
        if self._state is None:
            self._state, self._rows = fit(new, self._wider(w), pad, kv, self.prefix), rows
            return
        free = [k for k, r in enumerate(self._rows) if not r.live]
        cols = self._state.mask.shape[1]
        if w > cols:
            cols = self._wider(w)
            self._state = fit(self._state, cols, pad, kv, self.prefix)
            self.stats["widened"] += 1
        n = min(len(free), len(rows))
        if n:
            put(self._state, free[:n], stack([(new, list(range(n)))], cols, pad, kv, self.prefix))
            for k, row in zip(free, rows[:n]):
                self._rows[k] = row
            self.stats["reused"] += n
        if n < len(rows):
            self._state = stack([(self._state, None), (new, list(range(n, len(rows))))], cols, pad, kv, self.prefix)
            self._rows = self._rows + rows[n:]
            self.stats["merges"] += 1

    def _wider(self, w: int) -> int:
        """The width of a batch widened for a row of width ``w``, with spare columns so that the
        next newcomers fit in place (within the backend's longest sequence, and for in-place rows
        the artifact's length): a masked column costs a decode step far less than a copy of the
        batch costs once."""
        max_seq = self.rt.backend.max_seq
        caps = [max_seq - 1] if max_seq else []
        if self.prefix:  # in-place rows never outgrow the artifact's length (its rotary tables' rows)
            caps.append(self.rt.manifest.limits.max_total_length)
        return spare_columns(w, min(caps) if caps else None)

    def _tidy(self) -> None:
        """Finished and cancelled rows stop. Their slots stay (masked work, no copy) for newcomers
        to take (``_join``) while jobs wait or for ``LINGER`` decode steps (a client's next request
        is usually on its way); then, or when the batch carries many more columns than its live
        rows need (the longest row left), the batch is compacted: live rows only, at the width
        they need (one copy)."""
        live = [k for k, r in enumerate(self._rows) if r.live]
        if not live:  # every slot free: kept for LINGER_S seconds of idleness (``_run``)
            self._idle = time.perf_counter()
            return
        step = self.stats["decode_steps"]
        for r in self._rows:
            if not r.live and r.ended is None:
                r.ended = step
        stale = not self._waiting and any(not r.live and step - r.ended >= LINGER for r in self._rows)
        cols = self._state.mask.shape[1]
        need = self.dummy + int(self._state.mask[live].sum(1).max())
        max_seq = self.rt.backend.max_seq
        wide = cols - need > max(2 * SPARE, cols // 2) or (max_seq is not None and cols >= max_seq)
        if not (stale or wide):
            return
        t0 = time.perf_counter()
        rows = live if len(live) < len(self._rows) else None
        # the in-place cache keeps spare columns: each decode step writes the next one
        cols = self._wider(need) if self.prefix else need
        self._state = stack([(self._state, rows)], cols, self.rt.pad_id, self.kv, self.prefix)
        self._rows = [self._rows[k] for k in live]
        self.stats["compactions"] += 1
        self.observer.phase("tidy", time.perf_counter() - t0)

    def _step(self) -> None:
        """One decode pass for every row (free slots ride along until reused or compacted)."""
        self._tidy()
        if not self._live():
            return
        tokens = np.array([r.last for r in self._rows], np.int64)  # [B]
        t0 = time.perf_counter()
        try:
            out, state = decode_one_token(self.rt.backend, self.rt.manifest, self._state, tokens)
        except Exception:  # noqa: BLE001
            log.exception("decode pass failed")
            for r in self._rows:
                if r.live:
                    self._fail(r.job, "internal server error (see the server log)")
            self._clear()
            return
        self.stats["decode_steps"] += 1
        live = [k for k, r in enumerate(self._rows) if r.live]
        self.observer.batch(len(live))
        logits = last_logits(self.rt.manifest, out)  # [B, V]
        response = labels_from(self.rt.manifest, out, "response")  # [] without response probes
        self._state = state
        made = 0
        for k in live:
            row = self._rows[k]
            seen = response[k] if response else None  # the response so far (its tokens 1..count)
            fired = row.watch.update(seen)
            if fired:  # stop before the next token: the text streamed so far stands, plus the notice
                row.done = True
                notice = row.watch.notice(fired)
                rest = row.text.flush()  # the text held back so far (all of it, when not streaming)
                text = row.text.emitted + notice
                self.observer.stopped(row.job, fired)
                self._send(
                    row.job,
                    Out(
                        row.count,
                        text=rest + notice,
                        done=True,
                        finish_reason="blocked",
                        final_text=text,
                        blocked_by=fired,
                        response=seen,
                    ),
                )
                continue
            made += 1
            self._send(row.job, self._emit(row, logits[k], response=seen))
        self.observer.generated(made)
        self.observer.phase("decode", time.perf_counter() - t0, made)
        self._tidy()
