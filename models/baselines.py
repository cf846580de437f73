"""Baselines in the same harness as the probes, and the one constructor for any probe config."""

from __future__ import annotations

from singlepass.models.probes import PROBE_TYPES, build_probe


def build_any(cfg: dict):
    """Module for a probe config (config.json of an artifact)."""
    kind = cfg["probe"]
    if kind in PROBE_TYPES:
        return build_probe(kind, cfg["num_layers"], cfg["hidden_size"], len(cfg["label_names"]), **cfg["params"])
    raise ValueError(f"unknown probe type {kind!r}")
