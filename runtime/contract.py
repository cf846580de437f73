"""The artifact contract as the runtime reads it: manifest.json, its version, the files it names.

This module is the torch-free half of the contract (``export/manifest.py`` writes manifests and
imports the constants and ``read`` from here, never the other way round). ``load`` checks an
artifact folder completely before anything is served, so a missing file or a manifest of
another version is one clear error naming the problem instead of a failure mid-generation.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from singlepass.errors import SinglepassError

FORMAT = "singlepass-artifact"
VERSION = 1
MANIFEST = "manifest.json"
GRAPH = "model.onnx"
GRAPH_DATA = "model.onnx.data"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")
REQUIRED = ("format", "version", "graph", "backbone", "tokenizer", "prompt", "limits", "probes")
GRAPH_KEYS = ("file", "inputs", "outputs", "logits", "logits_last_position_only", "kv_cache", "past_names",
              "present_names", "input_ids", "attention_mask", "position_ids")


def read(folder: str | os.PathLike) -> dict:
    """manifest.json of an artifact folder, checked for format, version and required keys."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SinglepassError(f"{folder}: no such artifact folder")
    path = folder / MANIFEST
    try:
        m = json.loads(path.read_text())
    except FileNotFoundError:
        raise SinglepassError(f"{folder}: manifest.json is missing; not a singlepass artifact") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SinglepassError(f"{folder}: manifest.json is corrupt ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise SinglepassError(f"{folder}: manifest.json is not a {FORMAT} manifest")
    if m.get("version") != VERSION:
        raise SinglepassError(f"{folder}: manifest version {m.get('version')} is not supported (want {VERSION}); "
                              "re-export the artifact with this singlepass version")
    missing = [k for k in REQUIRED if k not in m]
    if missing:
        raise SinglepassError(f"{folder}: manifest.json lacks {', '.join(missing)}")
    if not (folder / m["graph"]["file"]).is_file():
        raise SinglepassError(f"{folder}: {m['graph']['file']} is missing")
    return m


@dataclass
class Artifact:
    """An artifact folder checked for serving."""

    folder: Path
    manifest: dict

    @property
    def graph(self) -> dict:
        return self.manifest["graph"]

    @property
    def probes(self) -> list[dict]:
        return self.manifest["probes"]

    @property
    def probe_names(self) -> list[str]:
        return [p["name"] for p in self.manifest["probes"]]

    @property
    def limits(self) -> dict:
        return self.manifest["limits"]

    def probe(self, name: str) -> dict:
        for p in self.manifest["probes"]:
            if p["name"] == name:
                return p
        raise SinglepassError(f"{self.folder}: no probe named {name!r} (probes: {', '.join(self.probe_names) or 'none'})")


def load(folder: str | os.PathLike) -> Artifact:
    """Read and check an artifact folder: manifest version, graph keys, every file the runtime opens."""
    folder = Path(folder)
    m = read(folder)
    g = m["graph"]
    lacking = [k for k in GRAPH_KEYS if k not in g]
    if lacking:
        raise SinglepassError(f"{folder}: manifest.json graph section lacks {', '.join(lacking)}")
    missing = []
    data = g.get("external_data")
    if data and not (folder / data).is_file():
        # save_graph always writes the weights to the external data file (size_threshold=1024)
        missing.append(data)
    if not (folder / "tokenizer.json").is_file():
        missing.append("tokenizer.json")
    if missing:
        raise SinglepassError(f"{folder}: the artifact is incomplete, missing {', '.join(missing)}; re-export it or "
                              "copy the whole folder")
    if g["kv_cache"] and len(g["past_names"]) != len(g["present_names"]):
        raise SinglepassError(f"{folder}: manifest.json has {len(g['past_names'])} past inputs but "
                              f"{len(g['present_names'])} present outputs")
    outputs = {o["name"] for o in g["outputs"]}
    inputs = {i["name"] for i in g["inputs"]}
    need_out = [g["logits"]] + (list(g["present_names"]) if g["kv_cache"] else []) + \
        [p["outputs"]["probs"] for p in m["probes"]]
    need_in = [g["input_ids"], g["attention_mask"]] + ([g["position_ids"]] if g["position_ids"] else []) + \
        (list(g["past_names"]) if g["kv_cache"] else [])
    bad = [n for n in need_out if n not in outputs] + [n for n in need_in if n not in inputs]
    if bad:
        raise SinglepassError(f"{folder}: manifest.json names graph tensors the graph does not list: "
                              f"{', '.join(bad[:6])}")
    lim = m["limits"]
    for k in ("max_batch", "max_prompt_length", "max_total_length"):
        if not isinstance(lim.get(k), int) or lim[k] < 1:
            raise SinglepassError(f"{folder}: manifest.json limits.{k} must be a positive integer, not {lim.get(k)!r}")
    return Artifact(folder, m)
