"""A dataset-level, memory-mapped, resumable cache of hidden states for probe training.

Layout of one entry (a folder named by the hash of everything that changes its content):

    meta.json      key fields, shapes, dtype, layer subset, token cap, byte counts
    lengths.npy    int64 [N]  stored tokens per row (the last ones; after the token cap)
    offsets.npy    int64 [N]  first token of each row in states.bin
    labels.npy     int64 [N]
    states.bin     dtype [n_tokens, L', d], token-major (one row's tokens are contiguous)
    progress.json  {"batches_done": k, "batch_size": b, "max_batch_tokens": m}; present only while
                   the entry is incomplete (b and m fix the batch plan a resumed run replays)

Rows are written at fixed offsets in a preallocated file, batch by batch in a deterministic
order, and progress is committed (fsync, then an atomic rename) every ``COMMIT_BYTES``, in a
background thread while the next batches run: an interrupted run resumes at the first
uncommitted batch of the same plan (whatever ``--batch-size`` it is given), with no corrupt or
duplicated rows.
Reading never loads the file into RAM: ``np.memmap`` pages in only the rows a batch needs.

A row stores the last tokens of its sequence: every token of a prompt, or, for a response set
(``Dataset.reads == "response"``), only the response tokens that end the prompt + response
sequence (``Encoded.stored``); the prompt's tokens condition them but are not stored.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from singlepass.errors import SinglepassError
from singlepass.files import atomic_write, atomic_write_json
from singlepass.models.extract import iter_hidden, plan_batches
from singlepass.models.prompts import DEFAULT_MAX_RESPONSE_TOKENS, EXTRACT_BATCH, Encoded, encode, encode_responses

CACHE_VERSION = 1
DTYPES = {"float16": np.float16, "float32": np.float32}
# fp16 holds SmolLM2's ~2.5e4 massive activations (max 65504) at half fp32's disk cost;
# benchmarks/cache_dtype.py measures what a probe sees from it (see README).
DEFAULT_DTYPE = "float16"
# An interrupted extraction resumes after the last commit (states synced to disk, then the progress file):
# one every this many bytes, where one per batch made every batch wait for the disk; the commit runs beside
# the extraction (``Committer``), which otherwise waited ~1 s per commit for 256 MiB to reach a 267 MB/s disk.
COMMIT_BYTES = 256 * 2**20
MAX_BATCH_TOKENS = 4096
# The plan of a progress file that records none (written before plans were): every such run batched 8 rows.
LEGACY_PLAN = {"batch_size": 8, "max_batch_tokens": MAX_BATCH_TOKENS}


class Scratch:
    """One float32 buffer that batch reads reuse (``StateCache.batch(scratch=...)``): a batch read into fresh
    memory pays the kernel's page faults and zeroing on every byte of it, each time. Measured on the demo's
    prompt cache, 32 length-sorted rows ([31, 32, T, 576]): 84 ms a read into fresh memory (41k page faults),
    25 ms into this. A view it hands out is valid until the next ``take``: read a batch, use it (its backward
    included), then read the next."""

    def __init__(self):
        self.buf = torch.empty(0)

    def take(self, *shape: int) -> torch.Tensor:
        n = int(np.prod(shape))
        if self.buf.numel() < n:
            self.buf = torch.empty(0)  # the old one freed before the larger one is made
            self.buf = torch.empty(n)
        return self.buf[:n].view(shape)


def content_key(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def texts_digest(texts: list[str], labels) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\x00")
    h.update(np.asarray(labels, dtype=np.int64).tobytes())
    return h.hexdigest()


@dataclass
class CachePlan:
    folder: Path
    key_fields: dict
    n_rows: int
    n_tokens: int
    bytes_per_token: int

    @property
    def total_bytes(self) -> int:
        return self.n_tokens * self.bytes_per_token


class StateCache:
    """Read side: rows as [T_i, L', d] views, batches as layer-first [L', B, T, d] tensors."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        try:
            self.meta = json.loads((self.folder / "meta.json").read_text())
            self.lengths = np.load(self.folder / "lengths.npy")
            self.offsets = np.load(self.folder / "offsets.npy")
            self.labels = np.load(self.folder / "labels.npy")
        except (OSError, ValueError) as e:
            raise SinglepassError(
                f"hidden-state cache {self.folder} is unreadable ({e}); delete it to rebuild"
            ) from None
        if (self.folder / "progress.json").exists():
            raise SinglepassError(f"hidden-state cache {self.folder} is incomplete; rerun extraction to resume it")
        m = self.meta
        self.num_layers, self.d = m["num_stored_layers"], m["hidden_size"]
        expect = m["n_tokens"] * m["bytes_per_token"]
        if (self.folder / "states.bin").stat().st_size != expect:
            raise SinglepassError(
                f"hidden-state cache {self.folder}: states.bin has the wrong size; delete it to rebuild"
            )
        self.states = np.memmap(
            self.folder / "states.bin",
            dtype=DTYPES[m["dtype"]],
            mode="r",
            shape=(m["n_tokens"], self.num_layers, self.d),
        )

    def __len__(self) -> int:
        return len(self.lengths)

    def row(self, i: int) -> np.ndarray:
        o, n = self.offsets[i], self.lengths[i]
        return self.states[o : o + n]  # [T_i, L', d] view into the memmap

    def batch(
        self, rows, side: str = "right", layers: list[int] | None = None, scratch: Scratch | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> states [L', B, T, d] float32 (never pooled in fp16), mask [B, T] int64.

        ``layers`` (indices into the stored layers) reads only those, e.g. ``[-1]`` for the last.
        ``scratch``: the states are a view of its buffer (valid until its next use), not fresh memory.
        """
        rows = list(rows)
        T = int(max(self.lengths[r] for r in rows))
        n_l = self.num_layers if layers is None else len(layers)
        shape = (n_l, len(rows), T, self.d)
        out = torch.empty(shape) if scratch is None else scratch.take(*shape)
        mask = torch.zeros(len(rows), T, dtype=torch.int64)
        with warnings.catch_warnings():  # read-only memmap views: torch only reads them
            warnings.simplefilter("ignore", UserWarning)
            for j, r in enumerate(rows):
                n = int(self.lengths[r])
                sl = slice(T - n, T) if side == "left" else slice(0, n)
                pad = slice(0, T - n) if side == "left" else slice(n, T)
                block = self.row(r) if layers is None else self.row(r)[:, layers]  # [T_i, L', d]
                out[:, j, sl].copy_(torch.from_numpy(np.ascontiguousarray(block)).transpose(0, 1))  # fp16 -> fp32
                out[:, j, pad] = 0
                mask[j, sl] = 1
        return out, mask

    def has_final_layer(self) -> bool:
        return self.meta["layers"][-1] == self.meta["num_layers_total"] - 1

    def last_token_final(self) -> np.ndarray:
        """Final-layer state at each row's last stored token [N, d] float32."""
        if not self.has_final_layer():
            raise SinglepassError(f"hidden-state cache {self.folder} does not hold the final layer")
        return np.stack(
            [np.array(self.states[o + n - 1, -1], dtype=np.float32) for o, n in zip(self.offsets, self.lengths)]
        ).reshape(len(self), self.d)


class StateView(StateCache):
    """Rows of several complete caches read as one cache (same read interface as StateCache):
    ``segments`` [(cache, rows)] in order. A dataset assembled from parts that are cached already
    (a leave-one-source-out fold of a mixture) trains without a second copy of their states."""

    def __init__(self, segments: list[tuple[StateCache, np.ndarray]]):
        if not segments:
            raise SinglepassError("a state view needs at least one cache")
        first = segments[0][0]
        for c, _ in segments:
            if (c.num_layers, c.d, c.meta["layers"], c.meta["dtype"]) != (
                first.num_layers,
                first.d,
                first.meta["layers"],
                first.meta["dtype"],
            ):
                raise SinglepassError(f"hidden-state caches {first.folder} and {c.folder} store different layers")
        self.caches = [c for c, _ in segments]
        self.folder = first.folder
        self.meta = {**first.meta, "view_of": [str(c.folder) for c in self.caches]}
        self.num_layers, self.d = first.num_layers, first.d
        rows = [np.asarray(r, dtype=np.int64) for _, r in segments]
        self.segment = np.concatenate([np.full(len(r), k, dtype=np.int64) for k, r in enumerate(rows)])  # [N]
        self.local = np.concatenate(rows)  # [N] row in its cache
        self.lengths = np.concatenate([c.lengths[r] for c, r in zip(self.caches, rows)])
        self.labels = np.concatenate([c.labels[r] for c, r in zip(self.caches, rows)])

    def row(self, i: int) -> np.ndarray:
        return self.caches[self.segment[i]].row(int(self.local[i]))

    def has_final_layer(self) -> bool:
        return self.caches[0].has_final_layer()

    def last_token_final(self) -> np.ndarray:
        finals = [c.last_token_final() for c in self.caches]
        return np.stack([finals[s][r] for s, r in zip(self.segment, self.local)]).reshape(len(self), self.d)


def encode_rows(
    tokenizer, dataset, prompt_format: str, max_length: int, max_response_tokens: int = DEFAULT_MAX_RESPONSE_TOKENS
) -> Encoded:
    """The token ids of ``dataset``'s rows: its prompts, or (a response set) prompt + response."""
    if getattr(dataset, "reads", "prompt") == "response":
        c = dataset.columns
        return encode_responses(tokenizer, c["prompt"], c["response"], prompt_format, max_length, max_response_tokens)
    return encode(tokenizer, dataset.texts, prompt_format, max_length)


def stored_lengths(enc: Encoded, token_cap: int | None) -> list[int]:
    """Tokens stored per row: the last ``enc.keep[i]`` (the response, or all), at most ``token_cap``."""
    return [min(n, token_cap) if token_cap else n for n in enc.keep]


def states_name(dataset) -> str:
    """The name a dataset's states are cached (keyed and foldered) under: its own, but a safety
    mixture's (models/mixture.py, "source:weight,...") with every weight 1. The weights multiply
    the loss and leave the rows, and so their states, alone: a reweighted mixture reads the states
    cached for the unweighted one instead of extracting them again (the key's text digest still
    tells different rows apart)."""
    from singlepass.models.mixture import unweighted_name

    return unweighted_name(dataset.name) if "mixture_weight" in dataset.columns else dataset.name


def plan(
    backbone,
    dataset,
    prompt_format: str,
    max_length: int,
    dtype: str = DEFAULT_DTYPE,
    layers: list[int] | None = None,
    token_cap: int | None = None,
    cache_dir: Path | None = None,
    max_response_tokens: int = DEFAULT_MAX_RESPONSE_TOKENS,
):
    """Tokenise, key and size a cache entry without running the model. -> (CachePlan, Encoded).
    ``max_response_tokens`` applies to response sets only (and keys only their entries)."""
    from singlepass.models.backbone import cache_root

    if dtype not in DTYPES:
        raise SinglepassError(f"unknown cache dtype {dtype!r} (use {', '.join(DTYPES)})")
    L1 = backbone.num_layers + 1
    layers = list(range(L1)) if layers is None else sorted(set(layers))
    if not layers or min(layers) < 0 or max(layers) >= L1:
        raise SinglepassError(f"layer subset must be within 0..{L1 - 1}, got {layers}")
    if token_cap is not None and token_cap <= 0:
        raise SinglepassError(f"token cap must be positive, got {token_cap}")
    response = getattr(dataset, "reads", "prompt") == "response"
    enc = encode_rows(backbone.tokenizer, dataset, prompt_format, max_length, max_response_tokens)
    digested = [*dataset.columns["prompt"], *dataset.columns["response"]] if response else dataset.texts
    key_fields = {
        "version": CACHE_VERSION,
        "model": backbone.fingerprint["sha256"],
        "dataset": states_name(dataset),
        "split": dataset.split,
        "data": texts_digest(digested, dataset.labels),
        "prompt_format": prompt_format,
        "max_length": max_length,
        "dtype": dtype,
        "layers": layers,
        "token_cap": token_cap,
    }
    if response:  # prompt entries keep their keys (and so their existing caches)
        key_fields.update({"reads": "response", "max_response_tokens": max_response_tokens})
    name = f"{key_fields['dataset'].replace('/', '_')}-{dataset.split}-{content_key(key_fields)[:16]}"
    folder = (cache_dir or cache_root()) / "states" / name
    stored = stored_lengths(enc, token_cap)
    bpt = len(layers) * backbone.hidden_size * np.dtype(DTYPES[dtype]).itemsize
    return CachePlan(folder, key_fields, len(stored), int(sum(stored)), bpt), enc


class Committer:
    """Commits an extraction's progress beside it: ``submit(k)`` syncs the states file, then names k batches
    done in the progress file, in one background thread, while the caller runs the next batches (fsync
    releases the GIL). One commit is in flight at most: the next ``submit`` waits for it, so they land in
    order, and progress never names a batch whose rows are not on disk (the sync covers every row written
    before the commit was submitted). ``close`` waits for the last one and re-raises its error."""

    def __init__(self, fd: int, progress: Path, plan_args: dict):
        from concurrent.futures import ThreadPoolExecutor

        self.fd, self.progress, self.plan_args = fd, progress, plan_args
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="cache-commit")
        self.pending = None

    def _commit(self, batches_done: int) -> None:
        os.fsync(self.fd)
        atomic_write_json(self.progress, {"batches_done": batches_done, **self.plan_args}, fsync=True)

    def wait(self) -> None:
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.result()

    def submit(self, batches_done: int) -> None:
        self.wait()
        self.pending = self.pool.submit(self._commit, batches_done)

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.pool.shutdown()


def build(
    backbone,
    dataset,
    prompt_format: str = "chat",
    max_length: int = 512,
    dtype: str = DEFAULT_DTYPE,
    layers: list[int] | None = None,
    token_cap: int | None = None,
    batch_size: int = EXTRACT_BATCH,
    cache_dir: Path | None = None,
    progress: bool = True,
    log=print,
    stop_after_batches: int | None = None,
    max_response_tokens: int = DEFAULT_MAX_RESPONSE_TOKENS,
) -> StateCache:
    """Extract (or resume, or reuse) the cache entry for one dataset split and return it."""
    p, enc = plan(
        backbone, dataset, prompt_format, max_length, dtype, layers, token_cap, cache_dir, max_response_tokens
    )
    folder, prog = p.folder, p.folder / "progress.json"
    if (folder / "meta.json").exists() and not prog.exists():
        log(f"cache hit: {folder}")
        return StateCache(folder)
    L1, d = backbone.num_layers + 1, backbone.hidden_size
    layers = p.key_fields["layers"]
    lengths = np.array(stored_lengths(enc, token_cap), dtype=np.int64)  # [N]
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)  # [N]
    response = enc.stored is not None
    log(
        f"{dataset.name}/{dataset.split}: {p.n_rows} {'responses' if response else 'prompts'}, "
        f"{p.n_tokens:,} tokens stored, "
        f"{len(layers)} of {L1} layers x d={d} in {dtype}: {p.bytes_per_token:,} bytes/token, "
        f"{p.total_bytes / 2**30:.2f} GiB total; {enc.n_truncated} prompt(s) truncated to {max_length} tokens"
        + (
            f"; {enc.n_response_truncated} response(s) cut to their first {max_response_tokens} tokens "
            f"({sum(enc.response_cut):,} tokens dropped); prompt tokens run but not stored"
            if response
            else ""
        )
        + (f"; token cap {token_cap} (last tokens kept)" if token_cap else "")
    )
    free = shutil.disk_usage(folder.parent if folder.parent.exists() else Path.home()).free
    if not prog.exists() and p.total_bytes > free:
        raise SinglepassError(
            f"the cache needs {p.total_bytes / 2**30:.1f} GiB but only {free / 2**30:.1f} GiB "
            "is free: use --layers or --token-cap, or another --cache-dir"
        )
    folder.mkdir(parents=True, exist_ok=True)
    meta = {
        **p.key_fields,
        "n_rows": p.n_rows,
        "n_tokens": p.n_tokens,
        "num_stored_layers": len(layers),
        "num_layers_total": L1,
        "hidden_size": d,
        "bytes_per_token": p.bytes_per_token,
        "label_names": list(dataset.label_names),
        "task": dataset.task,
        "n_truncated": enc.n_truncated,
        "backbone": backbone.fingerprint,
    }
    if response:
        meta.update({"n_response_truncated": enc.n_response_truncated, "response_tokens_cut": sum(enc.response_cut)})
    done, plan_args = 0, {"batch_size": batch_size, "max_batch_tokens": MAX_BATCH_TOKENS}
    if prog.exists():
        record = json.loads(prog.read_text())
        done = record["batches_done"]
        # the plan the committed batches followed (a progress file without one: ``LEGACY_PLAN``)
        plan_args = {k: int(record.get(k, v)) for k, v in LEGACY_PLAN.items()}
        log(f"resuming {folder.name} after {done} committed batches (batch size {plan_args['batch_size']})")
    else:
        np.save(folder / "lengths.npy", lengths)
        np.save(folder / "offsets.npy", offsets)
        np.save(folder / "labels.npy", np.asarray(dataset.labels, dtype=np.int64))
        atomic_write_json(folder / "meta.json", meta, fsync=True)
        with open(folder / "states.bin", "wb") as f:
            f.truncate(p.total_bytes)  # preallocate (sparse); rows go to fixed offsets
        atomic_write_json(prog, {"batches_done": 0, **plan_args}, fsync=True)
    torch_dtype = getattr(torch, dtype)
    batches = plan_batches([len(s) for s in enc.ids], plan_args["batch_size"], plan_args["max_batch_tokens"])
    layer_idx = None if layers == list(range(L1)) else torch.tensor(layers)
    fd = os.open(folder / "states.bin", os.O_RDWR)
    commits = Committer(fd, prog, plan_args)
    unsynced = 0  # bytes written since the last commit
    try:
        for k, (rows, hs, _) in enumerate(
            iter_hidden(backbone, enc.ids, padding_side="left", progress=progress, batches=batches[done:])
        ):
            hs = hs if layer_idx is None else hs.index_select(0, layer_idx)  # [L', B, T, d]
            T = hs.shape[2]
            for j, row in enumerate(rows):
                n = int(lengths[row])  # left padding: a row's last n tokens (its response) end at T
                block = torch.empty(n, hs.shape[0], hs.shape[3], dtype=torch_dtype)  # [n, L', d]
                block.copy_(hs[:, j, T - n :].transpose(0, 1))  # one pass: transposed and cast
                os.pwrite(fd, block.numpy().tobytes(), int(offsets[row]) * p.bytes_per_token)
                unsynced += block.numel() * block.element_size()
            last = done + k + 1 == len(batches)
            stop = stop_after_batches is not None and k + 1 >= stop_after_batches
            if unsynced >= COMMIT_BYTES or last or stop:  # progress names only batches on disk
                commits.submit(done + k + 1)
                unsynced = 0
            if stop:
                raise KeyboardInterrupt("stopped on request (test hook)")
    finally:
        try:
            commits.close()  # the commit in flight lands (or fails loudly) before the file is closed
        finally:
            os.close(fd)
    prog.unlink()
    return StateCache(folder)


def last_hidden(
    backbone,
    dataset,
    prompt_format: str = "chat",
    max_length: int = 512,
    cache_dir: Path | None = None,
    batch_size: int = EXTRACT_BATCH,
    progress: bool = True,
    log=print,
    max_response_tokens: int = DEFAULT_MAX_RESPONSE_TOKENS,
) -> np.ndarray:
    """Final-layer state at each prompt's last token (a response set: the response's last
    token), [N, d] float32 rounded through float16.

    ``lm_head`` of it gives the first response token's logits (what MULI reads). Read from the
    full hidden-state cache when that exists (fp16), else computed with the model and rounded to
    fp16 likewise, so both routes give the same features; stored as a small .npy keyed like
    the state cache.
    """
    from singlepass.models.backbone import cache_root

    p, enc = plan(
        backbone, dataset, prompt_format, max_length, cache_dir=cache_dir, max_response_tokens=max_response_tokens
    )
    key = {**p.key_fields, "kind": "last-hidden"}
    name = f"{p.folder.name.rsplit('-', 1)[0]}-{content_key(key)[:16]}.npy"
    path = (cache_dir or cache_root()) / "last_hidden" / name
    if path.is_file():
        return np.load(path)
    if (p.folder / "meta.json").exists() and not (p.folder / "progress.json").exists():
        h = StateCache(p.folder).last_token_final()
    else:
        log(f"{dataset.name}/{dataset.split}: computing last-token final-layer states for {len(enc.ids)} prompts")
        h = np.zeros((len(enc.ids), backbone.hidden_size), dtype=np.float32)
        for rows, hs, _ in iter_hidden(backbone, enc.ids, batch_size, padding_side="left", progress=progress):
            h[rows] = hs[-1, :, -1].numpy().astype(np.float16).astype(np.float32)  # left padding: last = T-1
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.save(buf, h)
    atomic_write(path, buf.getvalue())
    return h
