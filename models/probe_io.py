"""Probe artifacts: a folder with ``config.json`` + ``model.safetensors`` (no pickle anywhere).

config.json holds what serving needs to use the probe correctly: its type and constructor
parameters, what it reads (``"input"``: "hidden_states" or "logits"), label names, decision
threshold, prompt format and max length, the task, and the fingerprint of the backbone it was
trained on (loading it onto another backbone is an error). Folders written before ``"input"``
was recorded get it from the probe family's descriptor when read.

A response probe (trained on a response set) also records ``"reads": "response"`` and
``max_response_tokens`` (the response tokens it reads after the prompt); a config without
``"reads"`` is a prompt probe (``reads_of``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from singlepass.errors import SinglepassError
from singlepass.files import staged_folder
from singlepass.runtime.contract import READS

FORMAT = "singlepass-probe"
VERSION = 1
REQUIRED = (
    "format",
    "version",
    "probe",
    "params",
    "num_layers",
    "hidden_size",
    "label_names",
    "threshold",
    "prompt_format",
    "max_length",
    "backbone",
)


def with_input(cfg: dict, where: str = "probe") -> dict:
    """``cfg`` with ``"input"`` set (in place), from its family's descriptor where it is absent."""
    if "input" not in cfg:
        from singlepass.models.registry import FAMILIES

        family = FAMILIES.get(cfg["probe"])
        if family is None:
            raise SinglepassError(
                f'{where}: config.json has no "input" and names an unknown probe type '
                f"{cfg['probe']!r} (known: {', '.join(FAMILIES)})"
            )
        cfg["input"] = family.input
    return cfg


def reads_of(cfg: dict) -> str:
    """What a probe reads: "prompt" (also every config written before response probes) or "response"."""
    return cfg.get("reads", "prompt")


def check_reads(cfg: dict, where: str = "probe") -> None:
    reads = reads_of(cfg)
    if reads not in READS:
        raise SinglepassError(f"{where}: config.json reads {reads!r} (known: {', '.join(READS)})")
    n = cfg.get("max_response_tokens")
    if reads == "response" and (not isinstance(n, int) or isinstance(n, bool) or n <= 0):
        raise SinglepassError(f"{where}: a response probe's config.json needs a positive max_response_tokens")


def save_probe(folder: str | os.PathLike, module, config: dict, overwrite: bool = True) -> Path:
    """Write atomically: a half-written folder is never left behind."""
    from safetensors.torch import save_file

    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise SinglepassError(f"{folder} exists (use --force to overwrite)")
    cfg = {"format": FORMAT, "version": VERSION, **config}
    missing = [k for k in REQUIRED if k not in cfg]
    if missing:
        raise ValueError(f"probe config lacks {missing}")
    with_input(cfg, f"probe {folder}")
    check_reads(cfg, f"probe {folder}")
    with staged_folder(folder) as tmp:
        state = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    return folder


def read_config(folder: str | os.PathLike) -> dict:
    folder = Path(folder)
    path = folder / "config.json"
    if not folder.is_dir():
        raise SinglepassError(f"probe {folder}: no such folder")
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        raise SinglepassError(f"probe {folder}: config.json is missing; not a probe artifact") from None
    except (OSError, json.JSONDecodeError) as e:
        raise SinglepassError(f"probe {folder}: config.json is corrupt ({e})") from None
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        raise SinglepassError(f"probe {folder}: config.json is not a {FORMAT} config")
    if cfg.get("version") != VERSION:
        raise SinglepassError(f"probe {folder}: config version {cfg.get('version')} is not supported (want {VERSION})")
    missing = [k for k in REQUIRED if k not in cfg]
    if missing:
        raise SinglepassError(f"probe {folder}: config.json lacks {', '.join(missing)}")
    check_reads(cfg, f"probe {folder}")
    return with_input(cfg, f"probe {folder}")


def check_backbone(cfg: dict, fingerprint: dict, where: str = "probe") -> None:
    """A probe only makes sense on the exact backbone whose hidden states it was trained on."""
    want, have = cfg["backbone"], fingerprint
    if want.get("sha256") != have.get("sha256"):
        raise SinglepassError(
            f"{where} was trained on backbone {want.get('name')!r} (sha256 {str(want.get('sha256'))[:12]}, "
            f"{want.get('num_hidden_layers')} layers, d={want.get('hidden_size')}) but the model is "
            f"{have.get('name')!r} (sha256 {str(have.get('sha256'))[:12]}, {have.get('num_hidden_layers')} layers, "
            f"d={have.get('hidden_size')}): retrain the probe on this model"
        )


def load_probe(folder: str | os.PathLike, fingerprint: dict | None = None):
    """-> (module in eval mode, config with "input" set). With ``fingerprint``, refuse a foreign backbone."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from singlepass.models.registry import build_any

    folder = Path(folder)
    cfg = read_config(folder)
    if fingerprint is not None:
        check_backbone(cfg, fingerprint, f"probe {folder}")
    try:
        module = build_any(cfg)
    except (TypeError, ValueError) as e:
        raise SinglepassError(f"probe {folder}: config.json does not describe a valid probe ({e})") from None
    try:
        state = load_file(str(folder / "model.safetensors"))
    except FileNotFoundError:
        raise SinglepassError(f"probe {folder}: model.safetensors is missing") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise SinglepassError(f"probe {folder}: model.safetensors is corrupt ({e})") from None
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise SinglepassError(f"probe {folder}: weights do not match config.json ({str(e).splitlines()[0]})") from None
    return module.eval(), cfg


def load_probe_and_backbone(folder: str | os.PathLike, model: str | None = None, cache_dir=None, backbone=None):
    """-> (module, config, backbone) for running a saved probe: ``backbone`` if given, else
    ``model``, else the backbone named in the probe's config (the default model if it names none)."""
    from singlepass.models.backbone import DEFAULT_MODEL, load_backbone

    if backbone is None:
        cfg = read_config(folder)
        backbone = load_backbone(model or cfg["backbone"].get("name") or DEFAULT_MODEL, cache_dir)
    module, cfg = load_probe(folder, backbone.fingerprint)
    return module, cfg, backbone
