"""Padding a batch of token-id lists, shared by extraction (torch) and the runtime (numpy);
aligning a batch's rows to a width (``align_rows``: the in-place KV cache's growth, the server's
batches).

Position ids count real tokens only (``cumsum(mask) - 1``), so a prompt gets the same
positions alone or inside a left- or right-padded batch.
"""

from __future__ import annotations

import numpy as np


def pad_batch(seqs: list[list[int]], pad_id: int, side: str = "left", min_width: int = 1):
    """-> input_ids [B, T] int64, attention_mask [B, T] int64, position_ids [B, T] int64, with
    T >= ``min_width`` (extra columns are padding, masked)."""
    if side not in ("left", "right"):
        raise ValueError(f"padding side must be 'left' or 'right', not {side!r}")
    if not seqs or any(len(s) == 0 for s in seqs):
        raise ValueError("cannot pad an empty batch or an empty sequence")
    B, T = len(seqs), max(min_width, max(len(s) for s in seqs))
    ids = np.full((B, T), pad_id, dtype=np.int64)
    mask = np.zeros((B, T), dtype=np.int64)
    for b, s in enumerate(seqs):
        sl = slice(T - len(s), T) if side == "left" else slice(0, len(s))
        ids[b, sl] = s
        mask[b, sl] = 1
    pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    return ids, mask, pos


def align_rows(
    parts: list[tuple[np.ndarray, list[int] | None]], cols: int, axis: int, fill, prefix: bool = False
) -> np.ndarray:
    """Stack the parts' rows (all, or those listed) along axis 0, each aligned on the right to
    ``cols`` along ``axis``: its leading columns cut, or ``fill`` columns prepended (``prefix``:
    aligned on the left, trailing columns cut or appended). One allocation and one copy (fresh
    memory is what costs on a CPU: no temporaries)."""
    first = parts[0][0]
    shape = list(first.shape)
    shape[0] = sum(a.shape[0] if rows is None else len(rows) for a, rows in parts)
    shape[axis] = cols
    out = np.empty(shape, first.dtype)

    def span(start, stop):
        return (slice(None),) * axis + (slice(start, stop),)

    at = 0
    for a, rows in parts:
        c, b = a.shape[axis], a.shape[0] if rows is None else len(rows)
        n = min(c, cols)
        dst = out[at : at + b]
        src, to = (span(0, n), span(0, n)) if prefix else (span(c - n, c), span(cols - n, cols))
        dst[span(n, cols) if prefix else span(0, cols - n)] = fill
        if rows is None:
            dst[to] = a[src]
        else:
            np.take(a[src], rows, axis=0, out=dst[to], mode="clip")
        at += b
    return out
