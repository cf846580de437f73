"""Baselines in the same harness as the probes: two fixed-readout linear probes and MULI.

Two input conventions (config.json says which under ``"input"``; each descriptor declares it):

- ``"hidden_states"``: ``forward(states [L+1, B, T, d], mask [B, T]) -> logits [B, C']`` — the
  three probe families (models/probes.py) and the fixed-readout linear probes below.
- ``"logits"``: ``forward(logits [B, V]) -> logits [B, C']`` — MULI, which reads the LLM's
  full-vocabulary logits of the *first response token* (the next-token logits at the last
  prompt position, chat template + generation prompt). Its feature transform and
  standardisation statistics are buffers, so the whole baseline traces into ONNX.

Every module exposes ``features(...) -> [B, F]`` and ``head``; here the head holds all the
trainable parameters, so training runs on precomputed features (``head_only`` descriptors).
"""

from __future__ import annotations

import torch
from torch import nn

from singlepass.models.family import Family
from singlepass.models.probes import check_layer_count, fp32, out_dim, rms_normalise


def last_token_onehot(mask: torch.Tensor) -> torch.Tensor:
    """mask [B, T] -> one-hot [B, T] of each row's last real token (left or right padding)."""
    T = mask.shape[1]
    pos = torch.arange(T, device=mask.device)[None, :] * (mask > 0)  # [B, T]
    last = pos.argmax(-1, keepdim=True)  # [B, 1]
    return (torch.arange(T, device=mask.device)[None, :] == last).to(torch.float32)


class FixedReadoutProbe(nn.Module):
    """Linear probe on one fixed readout of one layer (default: the final layer, after the
    final norm): its last real token (``readout="last"``) or its masked token mean
    (``readout="mean"``). Trainable: the head only (d + 1 parameters for binary tasks)."""

    def __init__(
        self,
        num_layers: int,
        hidden_size: int,
        num_classes: int,
        readout: str = "last",
        layer: int = -1,
        input_norm: str = "rms",
    ):
        super().__init__()
        if readout not in ("last", "mean"):
            raise ValueError(f"readout must be 'last' or 'mean', not {readout!r}")
        if input_norm not in ("rms", "none"):
            raise ValueError(f"input_norm must be 'rms' or 'none', not {input_norm!r}")
        if not -num_layers <= layer < num_layers:
            raise ValueError(f"layer {layer} is outside the {num_layers} stacked states")
        self.num_layers, self.hidden_size, self.num_classes = num_layers, hidden_size, num_classes
        self.readout, self.layer, self.input_norm = readout, layer, input_norm
        self.head = nn.Linear(hidden_size, out_dim(num_classes))

    def features(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.read_layer(states[self.layer], mask)

    def read_layer(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x = the chosen layer [B, T, d] -> v [B, d]."""
        x = fp32(x)
        if self.input_norm == "rms":
            x = rms_normalise(x)
        m = mask.to(torch.float32)  # [B, T]
        w = last_token_onehot(mask) if self.readout == "last" else m / m.sum(1, keepdim=True).clamp_min(1.0)
        return torch.einsum("bt,btd->bd", w, x)  # [B, d]

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(states, mask))

    def forward_layers(self, layers: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        """``forward(torch.stack(layers), mask)`` on the L+1 layer tensors [B, T, d]: reads its one layer."""
        check_layer_count(layers, self.num_layers)
        return self.head(self.read_layer(layers[self.layer], mask))


LAST_TOKEN = Family(
    "last-token",
    input="hidden_states",
    head_only=True,
    build=lambda L1, d, C, **p: FixedReadoutProbe(L1, d, C, readout="last", **p),
)
MEAN_FINAL = Family(
    "mean-final",
    input="hidden_states",
    head_only=True,
    build=lambda L1, d, C, **p: FixedReadoutProbe(L1, d, C, readout="mean", **p),
)


class MuliProbe(nn.Module):
    """MULI ("Toxicity Detection for Free", NeurIPS 2024): a sparse linear model on the
    first response token's full-vocabulary distribution.

    features(logits [B, V]) = standardise(log p - log(1 - p)), p = softmax(logits) clamped to
    [eps, 1 - eps]; standardisation mean / inverse std are buffers fitted on the training set,
    features with zero std are dropped (inverse std 0). Trainable: the head (V + 1 for binary).
    """

    def __init__(self, vocab_size: int, num_classes: int, eps: float = 1e-16):
        super().__init__()
        self.vocab_size, self.num_classes, self.eps = vocab_size, num_classes, eps
        self.register_buffer("mean", torch.zeros(vocab_size))  # [V]
        self.register_buffer("inv_std", torch.ones(vocab_size))  # [V]; 0 = dropped feature
        self.head = nn.Linear(vocab_size, out_dim(num_classes))

    def transform(self, logits: torch.Tensor) -> torch.Tensor:
        """log p - log(1 - p), the official recipe's features before standardisation. [B, V]"""
        p = torch.softmax(logits.float(), dim=-1)
        return torch.log(p.clamp_min(self.eps)) - torch.log((1 - p).clamp_min(self.eps))

    @torch.no_grad()
    def fit_standardisation(self, raw: torch.Tensor, min_std: float = 1e-8) -> int:
        """raw = transform(train logits) [N, V]. -> number of features kept."""
        std = raw.std(0, unbiased=False)
        keep = std > min_std
        self.mean.copy_(raw.mean(0))
        self.inv_std.copy_(torch.where(keep, 1.0 / std.clamp_min(min_std), torch.zeros_like(std)))
        return int(keep.sum())

    def standardise(self, raw: torch.Tensor) -> torch.Tensor:
        return (raw - self.mean) * self.inv_std

    def features(self, logits: torch.Tensor) -> torch.Tensor:
        return self.standardise(self.transform(logits))

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(logits))


def fit_muli_standardisation(module: MuliProbe, logits: torch.Tensor) -> None:
    """Standardisation buffers from the training logits [N, V] (in chunks of 256 rows)."""
    raw = torch.cat([module.transform(logits[i : i + 256]) for i in range(0, len(logits), 256)])  # [N, V]
    module.fit_standardisation(raw)


# The official recipe, not searched: SGD lr 5e-4, batch 32, 500 epochs, class-balanced BCE + 1e-3 L1.
MULI = Family(
    "muli",
    input="logits",
    head_only=True,
    build=lambda L1, d, C, **p: MuliProbe(num_classes=C, **p),
    recipe={
        "lr": 5e-4,
        "batch_size": 32,
        "weight_decay": 0.0,
        "epochs": 500,
        "patience": 0,
        "optimizer": "sgd",
        "l1": 1e-3,
        "class_weight": "balanced",
        "eval_every": 10,
    },
    from_backbone=("vocab_size",),
    fit_buffers=fit_muli_standardisation,
)
