"""Feature statistics: input standardisation of hidden states, and folding a scaling into a head."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from singlepass.models.batches import StateData
from singlepass.models.probes import rms_normalise

if TYPE_CHECKING:
    from singlepass.models.cache import StateCache


@torch.no_grad()
def input_statistics(cache: "StateCache", max_rows: int = 1000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer, per-dimension mean and std [L+1, d] of the RMS-normalised real tokens of (a
    seeded sample of at most ``max_rows`` rows of) a hidden-state cache, accumulated in float64."""
    rows = np.arange(len(cache))
    if len(rows) > max_rows:
        rows = np.sort(np.random.default_rng(seed).choice(rows, max_rows, replace=False))
    data = StateData(cache, rows, max_tokens=4096)
    s1 = s2 = None
    n = 0
    for mb in data.micro(np.arange(len(data))):
        states, mask = cache.batch(rows[mb])  # [L+1, b, T, d], [b, T]
        x = rms_normalise(states.float()).double() * mask[None, :, :, None]  # [L+1, b, T, d], padding 0
        s1 = x.sum((1, 2)) if s1 is None else s1 + x.sum((1, 2))  # [L+1, d]
        s2 = x.pow(2).sum((1, 2)) if s2 is None else s2 + x.pow(2).sum((1, 2))  # [L+1, d]
        n += int(mask.sum())
    mean = s1 / n  # [L+1, d]
    return mean.float(), (s2 / n - mean**2).clamp_min(0).sqrt().float()


@torch.no_grad()
def fold_scaling(head: nn.Linear, mean: torch.Tensor, std: torch.Tensor) -> None:
    """head((x - mean) / std) == head'(x) with W' = W / std, b' = b - W' mean (in place).
    mean, std [F]; head.weight [C', F]."""
    head.weight.div_(std)
    head.bias.sub_(head.weight @ mean)
