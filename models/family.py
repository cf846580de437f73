"""What one probe family (one ``--probe`` choice) declares about itself.

Each family's module defines its ``nn.Module`` and, beside it, a ``Family`` descriptor; the
registry (models/registry.py) lists the descriptors. Training, evaluation, plotting and the
exporter ask the descriptor (or config.json, which records ``"input"``) and never test a
family's name or class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

INPUT_KINDS = ("hidden_states", "logits")


def no_params(hidden_size: int) -> dict:
    return {}


@dataclass(frozen=True)
class Family:
    name: str  # the --probe choice; "probe" in config.json
    # "hidden_states": forward(states [L+1, B, T, d], mask [B, T]) -> logits [B, C'];
    # "logits": forward(logits [B, V]) -> logits [B, C'] (the first response token's next-token logits)
    input: str
    # every trainable parameter is in ``module.head``: train the head on features computed once
    # (``module.features``, the parameter-free part), the same function as running the module each step
    head_only: bool
    build: Callable[..., Any]  # (num_layers L+1, hidden_size d, num_classes C, **params) -> a fresh module
    default_params: Callable[[int], dict] = no_params  # d -> constructor parameters of trial 0
    # (d, rng) -> constructor parameters of one search draw; None: always the defaults
    sample_params: Callable[[int, Any], dict] | None = None
    recipe: dict | None = None  # a fixed training recipe (HParams fields): one trial, no search
    from_backbone: tuple[str, ...] = ()  # constructor parameters taken from the backbone when absent
    # Families that standardise their own features (buffers, exported with the module) fit them
    # here on the training source before features are computed; the trainer then leaves the
    # features as they are. Otherwise head-only features are standardised by the trainer.
    fit_buffers: Callable[[Any, Any], None] | None = None
    max_attn: int | None = None  # micro-batch budget of B*T*T (attention over tokens); None: no limit
    layer_weights: bool = False  # has ``layer_weights(states, mask) -> [B, L+1]`` (plot-layers)

    def __post_init__(self):
        if self.input not in INPUT_KINDS:
            raise ValueError(f"family {self.name!r}: input must be one of {', '.join(INPUT_KINDS)}, not {self.input!r}")
