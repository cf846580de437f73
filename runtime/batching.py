"""Padding a batch of token-id lists, shared by extraction (torch) and the runtime (numpy).

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
