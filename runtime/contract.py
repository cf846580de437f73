"""The artifact contract as everything reads it: manifest.json as one typed view.

An artifact folder::

    manifest.json                    this contract (``Manifest``)
    model.onnx (+ model.onnx.data)   the fused graph
    tokenizer.json, ...              copied from the backbone folder
    probes/<name>/                   each fused probe's own artifact (config.json + model.safetensors)
    validation.json                  the parity report of the last `singlepass validate`

This module is torch-free (the runtime reads it; ``export/manifest.py`` writes what it reads
and imports the names from here, never the other way round). ``read_artifact`` checks a folder
completely before anything is served, so a missing file or a manifest of another version is
one clear error instead of a failure mid-generation. Everyone (runtime, export, validation,
benchmarks) reads the manifest through ``Manifest``; ``Manifest.raw`` is the JSON it came from,
for the writers that update it (validation, engine builds).
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np

from singlepass.errors import SinglepassError

FORMAT = "singlepass-artifact"
VERSION = 1
MANIFEST = "manifest.json"
GRAPH = "model.onnx"
GRAPH_DATA = "model.onnx.data"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)
REQUIRED = ("format", "version", "graph", "backbone", "tokenizer", "prompt", "limits", "probes")
INPUT_KINDS = ("hidden_states", "logits")
READS = ("prompt", "response")  # what a probe labels: the prompt (prefill pass) or the response so far
RESPONSE_MASK = "response_mask"  # graph input [B, T]: 1 = a response token the response probes fold in


def class_probs(logits) -> np.ndarray:
    """A probe's logits [B, C'] -> class probabilities [B, C] in float64 (binary, C' = 1: [1 - p, p]
    with p = sigmoid; else softmax): what every label, score, metric and threshold is computed from,
    here and in training (``models.probes.host_probabilities``). The graph's own ``probs`` output is
    float32, where a sigmoid reads exactly 1.0 beyond a logit of ~17; a confident probe (the MHA's
    logits reach +-40) puts many rows there, tied, and no threshold could tell them apart (its TPR
    at 1% FPR read 0). float64 keeps them apart up to a logit of about 37."""
    z = np.asarray(logits, np.float64)
    if z.ndim != 2:
        raise ValueError(f"class_probs takes logits [B, C'], not an array of shape {z.shape}")
    if z.shape[-1] == 1:
        e = np.exp(-np.abs(z))  # stable both ways: exp never overflows
        p = np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
        return np.concatenate([1.0 - p, p], axis=-1)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@dataclass(frozen=True)
class FusedProbe:
    """One probe fused into the graph: the single description that export, the manifest,
    validation and the runtime share.

    ``input``: what the probe reads, "hidden_states" (the stacked [L+1, B, T, d] states and the
    step's mask) or "logits" (the next-token logits [B, V], MULI). ``outputs``: graph output
    names, ``{"logits": "<name>/logits", "probs": "<name>/probs"}``."""

    name: str
    probe: str  # the family (pooling, gate, mha, muli, ...)
    label_names: tuple[str, ...]
    threshold: float | None
    input: str
    outputs: dict
    prompt_format: str
    max_length: int | None
    task: str | None = None
    params: dict = field(default_factory=dict)
    sha256: str | None = None  # of the probe's model.safetensors
    backbone_sha256: str | None = None
    folder: str | None = None  # probes/<name>, inside the artifact
    source: str | None = None  # where the probe was exported from
    # Validation thresholds by name ("f1", "fpr@0.01": {"threshold": ..., "fpr": ..., "tpr": ...});
    # ``threshold`` is the active one's, named by ``operating_point`` (models/train.py).
    operating_point: str | None = None
    operating_points: dict = field(default_factory=dict)
    # "prompt": labelled on the prefill pass. "response": a streaming probe whose running aggregate
    # over the generated tokens is carried between passes like the KV cache; ``state`` lists its
    # tensors: {"name", "past" (graph input), "present" (graph output), "fill" (the empty state's
    # value), "batch_axis", "shape" (with "batch" at batch_axis)}.
    reads: str = "prompt"
    state: list = field(default_factory=list)

    def __post_init__(self):
        if self.input not in INPUT_KINDS:
            raise SinglepassError(
                f"probe {self.name!r}: input kind {self.input!r} is not fusable (supported: {', '.join(INPUT_KINDS)})"
            )
        if self.reads not in READS:
            raise SinglepassError(f"probe {self.name!r}: reads {self.reads!r} (supported: {', '.join(READS)})")
        if self.reads == "response" and not self.state:
            raise SinglepassError(f"probe {self.name!r}: a response probe needs its streaming state in the manifest")

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    @property
    def probs(self) -> str:
        return self.outputs["probs"]

    @property
    def logits(self) -> str:
        return self.outputs["logits"]

    def decide(self, probs: np.ndarray, threshold: float | None = None) -> tuple[str, float]:
        """One row's probabilities [C] -> (label, score). Binary: label_names[1] when P(positive)
        reaches the threshold (score = P(positive)); multi-class: the argmax and its probability."""
        if self.num_classes == 2:
            thr = self.threshold if threshold is None else threshold
            score = float(probs[1])
            return (self.label_names[1] if score >= (0.5 if thr is None else thr) else self.label_names[0]), score
        k = int(np.argmax(probs))
        return self.label_names[k], float(probs[k])

    def point_threshold(self, point: str) -> float:
        """The threshold of a stored operating point (a policy's ``block:fpr@0.01``)."""
        if point not in self.operating_points:
            raise SinglepassError(
                f"probe {self.name!r} has no operating point {point!r} (stored: "
                f"{', '.join(self.operating_points) or 'none; retrain it with --threshold-at-fpr'})"
            )
        return float(self.operating_points[point]["threshold"])

    def to_dict(self) -> dict:
        d = asdict(self)
        d["label_names"] = list(self.label_names)
        d["num_classes"] = self.num_classes
        d["decision"] = (
            "positive (label_names[1]) when probs[:, 1] >= threshold" if self.num_classes == 2 else "argmax over probs"
        )
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "FusedProbe":
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        kw["label_names"] = tuple(kw["label_names"])
        return cls(**kw)


@dataclass(frozen=True)
class GraphSpec:
    """The graph's input/output contract (``manifest["graph"]``)."""

    file: str
    inputs: list
    outputs: list
    logits: str
    logits_last_position_only: bool
    kv_cache: bool
    past_names: list
    present_names: list
    input_ids: str
    attention_mask: str
    position_ids: str | None
    hidden_states: str | None = None
    external_data: str | None = None
    opset: int | None = None
    weights: dict | None = None  # export/quantize.py's QuantSummary; absent in artifacts older than --weights
    response_mask: str | None = None  # RESPONSE_MASK when a response probe is fused
    min_prefill_tokens: int = 1  # 2: prompt probes run in passes of 2+ tokens only (prefill pads to 2)
    kv_update: str = "concat"  # "inplace": rows are prefixes (right padding), presents written into the pasts

    @property
    def inplace(self) -> bool:
        return self.kv_cache and self.kv_update == "inplace"

    @property
    def precision(self) -> str:
        """The decoder's weight precision: fp32, int8 or int4."""
        return (self.weights or {}).get("weights", "fp32")

    @property
    def input_names(self) -> list[str]:
        return [i["name"] for i in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [o["name"] for o in self.outputs]

    def input_dtype(self, name: str) -> str | None:
        return next((i["dtype"] for i in self.inputs if i["name"] == name), None)


@dataclass(frozen=True)
class Limits:
    max_batch: int
    max_prompt_length: int  # the one prompt limit (the longest max_length of the fused probes)
    max_total_length: int  # prompt + generated tokens


@dataclass(frozen=True)
class TokenizerSpec:
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None
    bos_token_id: int | None

    @property
    def pad_id(self) -> int:
        """The one padding rule: the tokenizer's pad id, else the smallest EOS id, else 0 (padded
        positions are masked, so the id only has to be a valid token)."""
        if self.pad_token_id is not None:
            return int(self.pad_token_id)
        return int(min(self.eos_token_ids)) if self.eos_token_ids else 0


@dataclass
class Manifest:
    """A checked manifest.json (see the module docstring)."""

    folder: Path
    raw: dict
    graph: GraphSpec
    probes: list[FusedProbe]
    limits: Limits
    tokenizer: TokenizerSpec

    @property
    def backbone(self) -> dict:
        return self.raw["backbone"]

    @property
    def prompt(self) -> dict:
        return self.raw["prompt"]

    @property
    def engines(self) -> list[dict]:
        return self.raw.get("engines") or []

    @property
    def probe_names(self) -> list[str]:
        return [p.name for p in self.probes]

    def reading(self, what: str) -> list[FusedProbe]:
        """The probes that label the prompt (``"prompt"``) or the response (``"response"``)."""
        return [p for p in self.probes if p.reads == what]

    @functools.cached_property
    def stream_states(self) -> list[dict]:
        """Every response probe's state tensors, in the order passes carry them (computed once: a
        manifest's probes do not change)."""
        return [s for p in self.reading("response") for s in p.state]

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_id

    @property
    def kv_shape(self) -> tuple[int, int]:
        """(num_kv_heads, head_dim) of each past/present tensor [B, num_kv_heads, S, head_dim]."""
        return int(self.backbone["num_kv_heads"]), int(self.backbone["head_dim"])

    def probe(self, name: str) -> FusedProbe:
        for p in self.probes:
            if p.name == name:
                return p
        raise SinglepassError(
            f"{self.folder}: no probe named {name!r} (probes: {', '.join(self.probe_names) or 'none'})"
        )

    @classmethod
    def from_dict(cls, folder: str | os.PathLike, m: dict) -> "Manifest":
        """Type and cross-check a manifest dict (``read`` has checked format and version)."""
        folder = Path(folder)
        g = m["graph"]
        lacking = [f.name for f in fields(GraphSpec) if f.default is MISSING and f.name not in g]
        if lacking:
            raise SinglepassError(f"{folder}: manifest.json graph section lacks {', '.join(lacking)}")
        graph = GraphSpec(**{f.name: g.get(f.name, f.default) for f in fields(GraphSpec)})
        lim = m["limits"]
        for k in ("max_batch", "max_prompt_length", "max_total_length"):
            if not isinstance(lim.get(k), int) or isinstance(lim.get(k), bool) or lim[k] < 1:
                raise SinglepassError(
                    f"{folder}: manifest.json limits.{k} must be a positive integer, not {lim.get(k)!r}"
                )
        tk = m["tokenizer"]
        try:
            probes = [with_operating_points(folder, FusedProbe.from_dict(p)) for p in m["probes"]]
        except (KeyError, TypeError) as e:
            raise SinglepassError(f"{folder}: manifest.json has a malformed probe entry ({e})") from None
        return cls(
            folder,
            m,
            graph,
            probes,
            Limits(lim["max_batch"], lim["max_prompt_length"], lim["max_total_length"]),
            TokenizerSpec(
                tuple(int(e) for e in tk.get("eos_token_ids") or []), tk.get("pad_token_id"), tk.get("bos_token_id")
            ),
        )


def with_operating_points(folder: Path, probe: FusedProbe) -> FusedProbe:
    """``probe`` with its operating points: from the manifest entry, else from the probe's own
    config.json inside the artifact (probes/<name>/, copied by export), whose ``threshold`` is the
    same active threshold the manifest carries."""
    if probe.operating_points or not probe.folder:
        return probe
    path = folder / probe.folder / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        return probe
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SinglepassError(f"{folder}: {probe.folder}/config.json is corrupt ({e})") from None
    points = cfg.get("operating_points") if isinstance(cfg, dict) else None
    if not points:
        return probe
    return replace(probe, operating_points=dict(points), operating_point=cfg.get("operating_point"))


def read(folder: str | os.PathLike) -> dict:
    """manifest.json of an artifact folder as a dict, checked for format, version and required keys."""
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
        raise SinglepassError(
            f"{folder}: manifest version {m.get('version')} is not supported (want {VERSION}); "
            "re-export the artifact with this singlepass version"
        )
    missing = [k for k in REQUIRED if k not in m]
    if missing:
        raise SinglepassError(f"{folder}: manifest.json lacks {', '.join(missing)}")
    if not (folder / m["graph"]["file"]).is_file():
        raise SinglepassError(f"{folder}: {m['graph']['file']} is missing")
    return m


def read_artifact(folder: str | os.PathLike) -> Manifest:
    """Read and check an artifact folder: manifest version, graph keys, every file the runtime opens."""
    folder = Path(folder)
    m = Manifest.from_dict(folder, read(folder))
    g = m.graph
    missing = []
    if g.external_data and not (folder / g.external_data).is_file():
        # save_graph always writes the weights to the external data file (size_threshold=1024)
        missing.append(g.external_data)
    if not (folder / "tokenizer.json").is_file():
        missing.append("tokenizer.json")
    if missing:
        raise SinglepassError(
            f"{folder}: the artifact is incomplete, missing {', '.join(missing)}; re-export it or copy the whole folder"
        )
    if g.kv_update not in ("concat", "inplace"):
        raise SinglepassError(f"{folder}: manifest.json graph.kv_update must be concat or inplace, not {g.kv_update!r}")
    if g.kv_cache and len(g.past_names) != len(g.present_names):
        raise SinglepassError(
            f"{folder}: manifest.json has {len(g.past_names)} past inputs but {len(g.present_names)} present outputs"
        )
    outputs, inputs = set(g.output_names), set(g.input_names)
    states = m.stream_states
    if states and not (g.kv_cache and g.response_mask):
        raise SinglepassError(f"{folder}: response probes need a KV-cache graph with a {RESPONSE_MASK} input")
    need_out = (
        [g.logits]
        + (list(g.present_names) if g.kv_cache else [])
        + [n for p in m.probes for n in (p.logits, p.probs)]
        + [s["present"] for s in states]
    )
    need_in = (
        [g.input_ids, g.attention_mask]
        + ([g.position_ids] if g.position_ids else [])
        + (list(g.past_names) if g.kv_cache else [])
        + ([g.response_mask] if states else [])
        + [s["past"] for s in states]
    )
    bad = [n for n in need_out if n not in outputs] + [n for n in need_in if n not in inputs]
    if bad:
        raise SinglepassError(
            f"{folder}: manifest.json names graph tensors the graph does not list: {', '.join(bad[:6])}"
        )
    return m
