"""manifest.json: everything a runtime (numpy + onnxruntime + tokenizers, no torch) needs.

An artifact folder::

    manifest.json             this contract
    model.onnx (+ model.onnx.data)   the fused graph
    tokenizer.json, tokenizer_config.json, [special_tokens_map.json, chat_template.jinja,
    generation_config.json]   copied from the backbone folder
    probes/<name>/            each fused probe's own artifact (config.json + model.safetensors)
    validation.json           the parity report of the last `singlepass validate`

See ``build`` for the keys; ``read`` checks a manifest before anything trusts it.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

# The torch-free half of the contract (constants and ``read``) lives in the runtime, which must
# not import export/; this module writes what that half reads.
from singlepass.files import atomic_write_json, source_sha256
from singlepass.runtime.contract import (  # noqa: F401
    FORMAT,
    GRAPH,
    GRAPH_DATA,
    MANIFEST,
    REQUIRED,
    RESPONSE_MASK,
    TOKENIZER_FILES,
    VERSION,
    FusedProbe,
    read,
)

# The code an exported graph is built from (manifest.json ``source_sha256``): the decoder's export
# and graph surgery, and the probes' modules.
EXPORT_SOURCES = ("export", "models")

POSITION_RULE = (
    "position_ids = clip(cumsum(attention_mask, axis=1) - 1, 0) over the whole mask (past + "
    "current), last `sequence` columns; prefill: past_sequence = 0 (empty past tensors)"
)


def dtype_name(elem_type: int) -> str:
    from onnx import helper

    return str(helper.tensor_dtype_to_np_dtype(elem_type))


def value_infos(values) -> list[dict]:
    out = []
    for v in values:
        t = v.type.tensor_type
        dims = (
            [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]
            if t.HasField("shape")
            else None
        )
        out.append({"name": v.name, "dtype": dtype_name(t.elem_type), "dims": dims})
    return out


def fused_probe(name: str, cfg: dict, sha256: str, source: str, state: list | None = None) -> FusedProbe:
    """The manifest record of a probe fused under ``name`` (config.json of its probe artifact);
    ``state``: a response probe's streaming state (``export.stream.state_records``)."""
    return FusedProbe(
        name=name,
        probe=cfg["probe"],
        task=cfg.get("task"),
        label_names=tuple(cfg["label_names"]),
        threshold=cfg["threshold"],
        input=cfg["input"],
        outputs={"logits": f"{name}/logits", "probs": f"{name}/probs"},
        prompt_format=cfg["prompt_format"],
        max_length=cfg["max_length"],
        params=cfg.get("params", {}),
        sha256=sha256,
        backbone_sha256=cfg["backbone"].get("sha256"),
        folder=f"probes/{name}",
        source=source,
        operating_point=cfg.get("operating_point"),
        operating_points=cfg.get("operating_points") or {},
        reads=cfg.get("reads", "prompt"),
        state=state or [],
    )


def build(
    *,
    model,
    stream,
    backbone,
    probes: list[FusedProbe],
    source: str,
    hidden_states: str | None,
    last_only: bool,
    limits: dict,
    copied_files: list[str],
    weights: dict | None = None,
) -> dict:
    """manifest.json for a fused graph. One prompt rule for the artifact: the probes' shared
    prompt format, and ``limits.max_prompt_length`` as the one prompt limit."""
    from singlepass import __version__
    from singlepass.export.fuse import prompt_probes_prefill_only

    prefill_only = prompt_probes_prefill_only(stream, (weights or {}).get("weights", "fp32")) and any(
        p.reads == "prompt" for p in probes
    )
    cfg = backbone.model.config
    tok = backbone.tokenizer
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    prompt_format = probes[0].prompt_format if probes else "chat"
    return {
        "format": FORMAT,
        "version": VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "singlepass_version": __version__,
        "source_sha256": source_sha256(*EXPORT_SOURCES),
        "graph": {
            "file": GRAPH,
            "external_data": GRAPH_DATA,
            "opset": next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
            "ir_version": model.ir_version,
            "source": source,
            "num_nodes": len(model.graph.node),
            "weights": weights or {"weights": "fp32"},
            "inputs": value_infos(model.graph.input),
            "outputs": value_infos(model.graph.output),
            "logits": stream.logits,
            "logits_last_position_only": last_only,
            "hidden_states": hidden_states,
            "kv_cache": bool(stream.past),
            "past_names": stream.past,
            "present_names": stream.present,
            "kv_layout": "[batch, num_kv_heads, sequence, head_dim]",
            # export/kvcache.py: "inplace" (GroupQueryAttention, rows are prefixes of the mask, the
            # presents written into the pasts' buffers) or "concat" (present = past + new, left padding)
            "kv_update": "inplace" if stream.inplace_kv else "concat",
            # export/ortfuse.py: ONNX Runtime's fused kernels the export used, rewrite -> count
            "fused_kernels": stream.fused,
            "input_ids": stream.input_ids,
            "attention_mask": stream.attention_mask,
            "position_ids": stream.position_ids,
            "position_ids_rule": POSITION_RULE if stream.position_ids else None,
            "probes_in_decode": (
                "prompt probes run in passes of 2+ tokens only (an If on input_ids.shape[1] > 1): their "
                "outputs are the prompt's labels on the prefill pass and zeros in decode passes; response "
                "probes fold in every pass's response tokens"
                if prefill_only
                else "prompt probe outputs are computed in every pass over that pass's tokens "
                "(attention_mask[:, -sequence:]); the prompt's labels are the prefill pass's; response "
                "probes fold in every pass's response tokens"
            ),
            "min_prefill_tokens": 2 if prefill_only else 1,
            "response_mask": RESPONSE_MASK if any(p.reads == "response" for p in probes) else None,
        },
        "backbone": {
            **backbone.fingerprint,
            "source": str(backbone.source.path if backbone.source.kind == "hf" else backbone.source.name),
            "num_layers": cfg.num_hidden_layers,
            "num_hidden_states": cfg.num_hidden_layers + 1,
            "hidden_size": cfg.hidden_size,
            "num_attention_heads": cfg.num_attention_heads,
            "num_kv_heads": cfg.num_key_value_heads,
            "head_dim": head_dim,
            "vocab_size": cfg.vocab_size,
            "max_position_embeddings": getattr(cfg, "max_position_embeddings", None),
        },
        "tokenizer": {
            "files": copied_files,
            "bos_token_id": tok.bos_token_id,
            "eos_token_ids": backbone.eos_ids,
            "pad_token_id": tok.pad_token_id,
            "padding_side": "left",
        },
        "prompt": {
            "format": prompt_format,
            "max_length": limits["max_prompt_length"],
            "chat_template": getattr(tok, "chat_template", None),
            "chat_messages": '[{"role": "user", "content": TEXT}]',
            "add_generation_prompt": True,
            "add_special_tokens": prompt_format == "raw",
            "truncation": "over max_length tokens: cut the end of the user text, keep the template",
        },
        "limits": limits,
        "probes": [p.to_dict() for p in probes],
        "validation": None,
        "engines": [],
    }


def write(folder: Path, manifest: dict) -> None:
    atomic_write_json(Path(folder) / MANIFEST, manifest)
