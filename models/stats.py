"""Feature statistics: input standardisation of hidden states, and folding a scaling into a head."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from singlepass.models.cache import Scratch
from singlepass.models.probes import inv_rms

if TYPE_CHECKING:
    from singlepass.models.cache import StateCache


@torch.no_grad()
def input_statistics(
    cache: "StateCache", max_rows: int = 1000, seed: int = 0, chunk_tokens: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer, per-dimension mean and std [L+1, d] of the RMS-normalised real tokens of (a
    seeded sample of at most ``max_rows`` rows of) a hidden-state cache. The rows' tokens are read
    as they are stored, token-major and unpadded, ``chunk_tokens`` at a time: each chunk's sums in
    float32, the totals in float64 (on the demo's cache ~8x faster than padded layer-first batches
    summed in float64, which took 37 s of a 154 s training run). Each chunk is read and normalised in
    one reused buffer (``Scratch``: fresh memory per chunk cost the kernel's page faults on every byte)."""
    rows = np.arange(len(cache))
    if len(rows) > max_rows:
        rows = np.sort(np.random.default_rng(seed).choice(rows, max_rows, replace=False))
    s1 = s2 = 0.0
    n = 0
    scratch = Scratch()

    def add(blocks: list[np.ndarray]) -> None:
        nonlocal s1, s2, n
        x = scratch.take(sum(len(b) for b in blocks), *blocks[0].shape[1:])  # [n_tok, L+1, d] float32
        at = 0
        with warnings.catch_warnings():  # read-only memmap views: torch only reads them
            warnings.simplefilter("ignore", UserWarning)
            for b in blocks:
                x[at : at + len(b)].copy_(torch.from_numpy(b))  # fp16 -> fp32
                at += len(b)
        x.mul_(inv_rms(x))  # RMS-normalised in place
        s1 = s1 + x.sum(0).double()  # [L+1, d]
        s2 = s2 + x.square_().sum(0).double()  # [L+1, d]
        n += x.shape[0]

    blocks, held = [], 0
    for r in rows:
        blocks.append(cache.row(int(r)))  # [T_r, L+1, d] view of the stored tokens
        held += len(blocks[-1])
        if held >= chunk_tokens:
            add(blocks)
            blocks, held = [], 0
    if blocks:
        add(blocks)
    mean = s1 / n  # [L+1, d]
    return mean.float(), (s2 / n - mean**2).clamp_min(0).sqrt().float()


@torch.no_grad()
def fold_scaling(head: nn.Linear, mean: torch.Tensor, std: torch.Tensor) -> None:
    """head((x - mean) / std) == head'(x) with W' = W / std, b' = b - W' mean (in place).
    mean, std [F]; head.weight [C', F]."""
    head.weight.div_(std)
    head.bias.sub_(head.weight @ mean)
