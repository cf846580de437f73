"""Every ``--probe`` choice, by name: the family descriptors and the one constructor for any config.

A family lives in one module with its descriptor (models/family.py); listing the descriptor in
``FAMILIES`` below makes it a ``--probe`` choice for training, evaluation and export.
"""

from __future__ import annotations

from torch import nn

from singlepass.errors import SinglepassError
from singlepass.models.baselines import LAST_TOKEN, MEAN_FINAL, MULI
from singlepass.models.family import Family
from singlepass.models.probes import GATE, MHA, POOLING

FAMILIES: dict[str, Family] = {f.name: f for f in (POOLING, GATE, MHA, MULI, LAST_TOKEN, MEAN_FINAL)}
METHODS = tuple(FAMILIES)  # every --probe choice, in this order


def _unknown(name: str) -> str:
    return f"unknown probe type {name!r} (use one of {', '.join(METHODS)})"


def get_family(name: str) -> Family:
    """The descriptor of a --probe choice (a SinglepassError for an unknown name)."""
    if name not in FAMILIES:
        raise SinglepassError(_unknown(name))
    return FAMILIES[name]


def input_kind(method: str) -> str:
    """ "hidden_states" or "logits": what the family's forward reads."""
    return get_family(method).input


def build_method(method: str, num_layers: int, hidden_size: int, num_classes: int, **params) -> nn.Module:
    """A fresh module for any --probe choice. num_layers is the number of stacked states, L+1."""
    if method not in FAMILIES:
        raise ValueError(_unknown(method))
    return FAMILIES[method].build(num_layers, hidden_size, num_classes, **params)


def build_any(cfg: dict) -> nn.Module:
    """Module for a probe config (config.json of an artifact)."""
    return build_method(cfg["probe"], cfg["num_layers"], cfg["hidden_size"], len(cfg["label_names"]), **cfg["params"])


def head_only(module: nn.Module) -> bool:
    """True when every trainable parameter is in ``module.head`` (what a head_only descriptor claims)."""
    head = {id(p) for p in module.head.parameters()}
    return all(id(p) in head for p in module.parameters() if p.requires_grad)
