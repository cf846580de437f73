"""The one decode path: ``prefill`` + ``decode_one_token`` on any backend (numpy, no torch).

The runtime, export validation, the server and the benchmarks all run passes through these
two functions, so what is validated is what is served.

    out, state = prefill(backend, manifest, seqs)              # padded prompts
    out, state = decode_one_token(backend, manifest, state, tokens)   # tokens [B] just chosen
    last_logits(manifest, out)   -> [B, V]
    labels_from(manifest, out)   -> per row {probe: Label}: the prompt probes (prefill pass)
    labels_from(manifest, out, "response")  -> the response probes: the response so far

A response probe folds each token it is fed after the prompt into a running state carried in
``State.stream`` like the KV cache (the prefill pass leaves it empty), so the decode pass that
feeds generated token k returns the label of tokens 1..k. On an in-place artifact a decode pass
writes it into the arrays it was fed (``Backend.run(carry=...)``), as it writes the cache.

Batches are left-padded with position ids ``cumsum(mask) - 1``; the feeds follow
``runtime/feeds.py`` (prefill carries the backend's dummy past slots, if any). An artifact with the
in-place KV cache (``graph.inplace``, ``export/kvcache.py``) takes right-padded batches instead (each
row a prefix of its mask): its decode passes write the new keys/values into the state's cache
buffers, which are bound as both past inputs and present outputs (``Backend.run(inplace=...)``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

from singlepass.runtime.backends import Backend
from singlepass.runtime.batching import pad_batch
from singlepass.runtime.contract import Manifest, class_probs
from singlepass.runtime.feeds import advance, make_feed


@dataclass
class Label:
    label: str
    score: float
    probs: list[float]

    def to_dict(self) -> dict:
        return {"label": self.label, "score": self.score}


@dataclass
class State:
    """What the next pass needs. ids [B, S] (S = 1 with a KV cache), mask [B, dummy + total],
    pos [B, S], past: one [B, num_kv_heads, dummy + total - S, head_dim] per past input (in place:
    [B, num_kv_heads, C, head_dim] buffers, C = the mask's width, the capacity); stream:
    the response probes' state tensors, each with its batch axis at ``axes[i]``."""

    ids: np.ndarray
    mask: np.ndarray
    pos: np.ndarray
    past: list[np.ndarray] | None
    stream: list[np.ndarray] = field(default_factory=list)
    axes: tuple[int, ...] = ()

    def keep(self, rows: list[int]) -> "State":
        """Drop finished rows from the batch."""
        take = np.asarray(rows)
        return State(
            self.ids[take],
            self.mask[take],
            self.pos[take],
            None if self.past is None else [p[take] for p in self.past],
            [np.take(s, take, axis=a) for s, a in zip(self.stream, self.axes)],
            self.axes,
        )


def output_names(manifest: Manifest, extra: tuple[str, ...] = ()) -> list[str]:
    """What a pass fetches: the logits, the presents, every probe's logits (its labels are computed
    from them in float64: ``labels_from``), the response probes' states (and ``extra``). One list
    per manifest and ``extra``, the same object every pass (a decode step's Python runs with cold
    CPU caches, after the weights went through them): nothing may modify it."""
    return _pass_io(manifest, tuple(extra))[0]


def _pass_io(manifest: Manifest, extra: tuple[str, ...]) -> tuple[list[str], dict[str, str], dict[str, str]]:
    """(output names, in-place cache {present: past}, carried response state {present: past}), kept on
    the manifest per ``extra`` (in its ``__dict__``, as ``functools.cached_property`` keeps a value)."""
    memo = vars(manifest).setdefault("_pass_io", {})
    if extra not in memo:
        g, states = manifest.graph, manifest.stream_states
        names = [g.logits] + (list(g.present_names) if g.kv_cache else []) + [p.logits for p in manifest.probes]
        names += [s["present"] for s in states]
        names += [n for n in extra if n not in names]
        memo[extra] = (names, dict(zip(g.present_names, g.past_names)), {s["present"]: s["past"] for s in states})
    return memo[extra]


def prefill(
    backend: Backend,
    manifest: Manifest,
    seqs: list[list[int]],
    pad_id: int | None = None,
    side: str | None = None,
    extra: tuple[str, ...] = (),
) -> tuple[dict, State]:
    """First pass over padded prompts -> (outputs, state after it). ``side``: the layout's
    (left; right for the in-place KV cache); the other is for parity checks only: generation
    continues from the layout's own."""
    if manifest.graph.inplace and side == "left":
        raise ValueError("an artifact with the in-place KV cache takes right-padded prompts (rows are prefixes)")
    side = side or ("right" if manifest.graph.inplace else "left")
    pad = manifest.pad_id if pad_id is None else pad_id
    # [B, T] each; pos = cumsum(mask) - 1; at least the graph's prefill width (prompt probes skip 1-token passes)
    ids, mask, pos = pad_batch(seqs, pad, side, manifest.graph.min_prefill_tokens)
    feed = make_feed(manifest, ids, mask, pos, None, backend.dummy_past if manifest.graph.kv_cache else 0)
    # a new state: the backend lets go of the last decode pass's buffers (their owner may have moved
    # on; held, they would sit beside this pass's activations at its peak); a running batch's next
    # decode pass binds them again
    backend.release()
    out = backend.run(feed, output_names(manifest, extra))
    return out, _after(manifest, out, ids, feed[manifest.graph.attention_mask], pos)


@functools.cache
def _ones(shape: tuple) -> np.ndarray:
    """A decode pass's response mask (every fed token is a response token): one array per shape,
    shared by every thread and runtime, so a backend that binds its inputs binds it once. Nothing
    may write into it."""
    return np.ones(shape, np.int64)


def decode_one_token(
    backend: Backend, manifest: Manifest, state: State, tokens: np.ndarray, extra: tuple[str, ...] = ()
) -> tuple[dict, State]:
    """Feed the tokens [B] just chosen -> (outputs, state after this pass). Every fed token is a
    response token (the response probes fold it in). The state passed in is used up: an in-place
    artifact writes the new keys/values and the response state into its arrays (a pass run twice
    from one state folds its token in twice)."""
    ids, mask, pos, past = advance(manifest, tokens, state.ids, state.mask, state.pos, state.past)
    names, inplace, carry = _pass_io(manifest, tuple(extra))
    response = _ones(ids.shape) if manifest.graph.response_mask else None  # [B, 1]
    if response is not None and len(state.stream) != len(carry):
        raise ValueError("the state carries no response-probe state: build it with prefill / decode_one_token")
    feed = make_feed(manifest, ids, mask, pos, past, stream=state.stream or None, response=response)
    if manifest.graph.inplace:  # the cache written in place, the response probes' state copied back into its arrays
        out = backend.run(feed, names, inplace, carry)
    else:
        out = backend.run(feed, names)
    return out, _after(manifest, out, ids, mask, pos)


def _after(manifest: Manifest, out: dict, ids, mask, pos) -> State:
    g = manifest.graph
    states = manifest.stream_states
    return State(
        ids,
        mask,
        pos,
        [out[n] for n in g.present_names] if g.kv_cache else None,
        [out[s["present"]] for s in states],
        tuple(int(s["batch_axis"]) for s in states),
    )


def last_logits(manifest: Manifest, out: dict) -> np.ndarray:
    """[B, 1 or S, V] -> [B, V]: the last position, a real token for every left-padded row (the
    in-place layout's graph gathers each row's last token itself: logits [B, 1, V])."""
    return out[manifest.graph.logits][:, -1]


def labels_from(manifest: Manifest, out: dict, reads: str = "prompt") -> list[dict[str, Label]]:
    """The label and score per row of a pass of the probes that read ``reads``: the prompt probes
    (read them from the prefill pass) or the response probes (the response so far). Scores are the
    float64 probabilities of the probe's logits (``contract.class_probs``), not the graph's float32
    ``probs`` output, which ties every confident row at 1.0."""
    rows: list[dict[str, Label]] | None = None
    for p in manifest.reading(reads):
        probs = class_probs(out[p.logits])  # [B, C] float64
        rows = rows or [{} for _ in range(probs.shape[0])]
        for b, pr in enumerate(probs):
            label, score = p.decide(pr)
            rows[b][p.name] = Label(label, score, [float(x) for x in pr])
    return rows or []
