"""Graph feeds for one pass, from the manifest alone (numpy; shared by the runtime, parity
validation and the TensorRT pre-flight).

Prefill: input_ids [B, T], attention_mask [B, P + T], position_ids [B, T], past tensors
[B, num_kv_heads, P, head_dim] where P is 0 (ONNX Runtime: empty past) or the number of masked
dummy slots (the TensorRT profiles want P >= 1). Decode (KV cache): input_ids [B, 1], the mask
grows by one column, position_ids = last + 1, past = the previous pass's presents. Without a
KV cache every pass recomputes the whole sequence.
"""

from __future__ import annotations

import numpy as np

from singlepass.runtime.batching import align_rows
from singlepass.runtime.contract import Manifest


def empty_past(manifest: Manifest, batch: int, length: int = 0) -> list[np.ndarray]:
    """Zero past tensors [B, num_kv_heads, length, head_dim], one per past input."""
    heads, head_dim = manifest.kv_shape
    shape = (batch, heads, length, head_dim)  # [B, kv_heads, P, head_dim]
    return [np.zeros(shape, np.float32) for _ in manifest.graph.past_names]


def empty_stream(manifest: Manifest, batch: int) -> list[np.ndarray]:
    """The response probes' state before any response token (``FusedProbe.state``): each tensor
    at its recorded shape with ``batch`` rows, filled with its empty value (0 for sums and counts,
    a very negative number for running maxima)."""
    return [
        np.full([batch if d == "batch" else int(d) for d in s["shape"]], s["fill"], np.float32)
        for s in manifest.stream_states
    ]


def make_feed(
    manifest: Manifest,
    ids: np.ndarray,
    mask: np.ndarray,
    pos: np.ndarray | None,
    past: list[np.ndarray] | None = None,
    dummy: int = 0,
    stream: list[np.ndarray] | None = None,
    response: np.ndarray | None = None,
) -> dict:
    """One pass's feed. ``past=None`` means prefill: ``dummy`` masked past slots (0 = empty past),
    whose zero columns are prepended to ``mask``; later passes already carry them in ``mask``.

    Response probes (``graph.response_mask``): ``stream`` is their state from the last pass (None:
    empty) and ``response`` [B, T] marks this pass's tokens they fold in (None: none, as for a
    prompt's prefill)."""
    g = manifest.graph
    if g.response_mask:
        B, T = ids.shape
        feed_r = {g.response_mask: np.zeros((B, T), np.int64) if response is None else np.asarray(response, np.int64)}
        states = empty_stream(manifest, B) if stream is None else stream
        feed_r.update(zip((s["past"] for s in manifest.stream_states), states))
    else:
        feed_r = {}
    if g.kv_cache and past is None and dummy:
        mask = np.concatenate([np.zeros((mask.shape[0], dummy), np.int64), mask], 1)  # [B, dummy + T]
    feed = {g.input_ids: ids, g.attention_mask: mask}
    if g.position_ids:
        feed[g.position_ids] = pos
    if g.kv_cache:
        feed.update(zip(g.past_names, past if past is not None else empty_past(manifest, ids.shape[0], dummy)))
    return feed | feed_r


SPARE = 64


def spare_columns(width: int, cap: int | None = None) -> int:
    """The columns a growing batch gets for rows of ``width`` columns: room for the next
    max(SPARE, width / 2) tokens, so that it is copied once per that many steps, not every step;
    at most ``cap`` (an in-place artifact's ``max_total_length``: no row grows longer, and its
    attention's rotary tables cover that many positions), never fewer than ``width``."""
    spare = width + max(SPARE, width // 2)
    return max(width, min(spare, cap)) if cap else spare


def widen(mask: np.ndarray, past: list[np.ndarray], cols: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Prefix rows (the in-place layout) in ``cols`` columns: mask [B, cols] (zeros appended), past
    [B, kv_heads, cols, head_dim] (zeros appended). One copy of the cache."""
    grown = [align_rows([(p, None)], cols, 2, 0, prefix=True) for p in past]  # [B, kv_heads, cols, head_dim]
    return align_rows([(mask, None)], cols, 1, 0, prefix=True), grown


def advance(
    manifest: Manifest,
    nxt: np.ndarray,
    ids: np.ndarray,
    mask: np.ndarray,
    pos: np.ndarray,
    present: list[np.ndarray] | None,
):
    """The next decode pass's (ids, mask, pos, past) after tokens ``nxt`` [B] were chosen.

    ``mask`` is the whole mask fed last time (dummy slots included); with a KV cache the past is
    the presents just returned and only the new token is fed. In the in-place layout
    (``graph.inplace``) rows are prefixes of the mask: row b's new token takes column ``len_b`` of
    the mask and of the cache buffers (widened when a row reaches their capacity), position
    ``len_b``; the graph writes its keys/values there, in place."""
    if manifest.graph.inplace:
        lens = mask.sum(1)  # [B] tokens so far per row
        need = int(lens.max()) + 1
        if need > mask.shape[1]:
            mask, present = widen(mask, present, spare_columns(need, manifest.limits.max_total_length))
        else:
            mask = mask.copy()
        mask[np.arange(mask.shape[0]), lens] = 1  # [B, C]
        return nxt[:, None].astype(np.int64), mask, lens[:, None].astype(np.int64), present
    mask = np.concatenate([mask, np.ones((mask.shape[0], 1), np.int64)], 1)  # [B, total + 1]
    if manifest.graph.kv_cache:
        return nxt[:, None].astype(np.int64), mask, pos[:, -1:] + 1, present  # ids [B, 1], pos [B, 1]
    ids = np.concatenate([ids, nxt[:, None].astype(np.int64)], 1)  # [B, T + 1]
    return ids, mask, np.clip(np.cumsum(mask, 1) - 1, 0, None), None
