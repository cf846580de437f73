"""genai_config.json: the artifact is also an onnxruntime-genai model folder.

``og.Model(artifact)`` reads ``genai_config.json`` next to ``model.onnx`` (onnxruntime-genai 0.18)
and ``og.Generator`` runs our fused graph with its own prefill / decode loop. What it needs:

* ``type: "decoder"``: og's generic decoder-only LLM (no architecture-specific handling; rotary
  embeddings, sliding windows and soft-capping are inside our graph).
* the input / output names as printf patterns (``past_key_values.%d.key``, ``present.%d.key``).
* ``past_present_share_buffer: false``: og feeds the presents back as pasts
  [batch, kv_heads, past + sequence, head_dim] (what a Concat graph returns, and what
  GroupQueryAttention returns when its past and present are not one buffer).
* prefill logits: og treats a logits output whose dim 1 is declared as the constant 1 as
  last-token ("pruned") logits in every pass (``Model::IsPruned``); with a dynamic dim 1 it picks
  the last position itself. Both of our forms work (default last position only, ``--all-logits``
  all). A last-position graph whose logits do not declare dim 1 = 1 would be misread, so no
  config is written for it and the manifest says why.
* the probe outputs are graph outputs og does not manage: it fetches them on every pass, so
  ``generator.get_output("<probe>/probs")`` right after ``append_tokens`` (the prefill) is the
  prompt's probe output (float32; our runtime reads ``<probe>/logits`` of the same pass and
  computes the probabilities in float64, ``runtime.contract.class_probs``: a threshold above
  0.99999994 is beyond what float32 probabilities can resolve).
* tokens: og's tokenizer reads the copied ``tokenizer.json`` and ``tokenizer_config.json``.

Batches: og left-pads with ``pad_token_id`` and masks the leading pad tokens of each row; with a
pad token that is also the end-of-sequence token, a prompt that *starts* with that token is
masked differently from our runtime in a batch of several prompts (batch 1 is exact). An artifact
with the in-place KV cache (``export/kvcache.py``, GroupQueryAttention) runs in og's concatenating
mode too (fed ordinary past tensors, the node concatenates), but it takes each row's keys as a
prefix: og's left-padded batches of prompts of different lengths are not exact there (batch 1 is).

The manifest records the outcome under ``genai``: ``{"config": "genai_config.json", ...}`` or
``{"config": null, "reason": ...}``.
"""

from __future__ import annotations

import re
from pathlib import Path

from singlepass.files import atomic_write_json

CONFIG = "genai_config.json"
MIN_VERSION = "0.18"


def layer_pattern(names: list[str]) -> str | None:
    """The printf pattern (``%d`` for the layer) that gives ``names`` for layers 0, 1, ...; None
    if there is none."""
    if not names:
        return None
    first = names[0].replace("%", "%%")
    for m in re.finditer(r"\d+", first):
        if m.group() != "0":
            continue
        pattern = first[: m.start()] + "%d" + first[m.end() :]
        if all(pattern % i == n for i, n in enumerate(names)):
            return pattern
    return None


def _output_dims(graph: dict, name: str) -> list | None:
    return next((o["dims"] for o in graph["outputs"] if o["name"] == name), None)


def _io_names(graph: dict) -> tuple[dict, dict] | str:
    """(inputs, outputs) sections of the decoder config, or the reason og cannot run the graph."""
    if not graph.get("kv_cache"):
        return "the graph has no KV cache inputs (onnxruntime-genai drives a decoder with past/present key/values)"
    past, present = graph["past_names"], graph["present_names"]
    patterns = [layer_pattern(past[0::2]), layer_pattern(past[1::2])]
    patterns += [layer_pattern(present[0::2]), layer_pattern(present[1::2])]
    if None in patterns:
        return (
            f"the KV cache names ({past[0]}, ..., {present[-1]}) do not follow one name per layer with the "
            "layer number in it, which onnxruntime-genai needs"
        )
    inputs = {"input_ids": graph["input_ids"], "attention_mask": graph["attention_mask"]}
    if graph.get("position_ids"):
        inputs["position_ids"] = graph["position_ids"]
    inputs.update(past_key_names=patterns[0], past_value_names=patterns[1])
    outputs = {"logits": graph["logits"], "present_key_names": patterns[2], "present_value_names": patterns[3]}
    return inputs, outputs


def genai_config(manifest: dict) -> dict | str:
    """genai_config.json for an artifact's manifest, or the reason onnxruntime-genai cannot run it."""
    g, b, t, lim = manifest["graph"], manifest["backbone"], manifest["tokenizer"], manifest["limits"]
    if g.get("response_mask"):
        return (
            "a response probe is fused: its state inputs (response_mask, <probe>/past_*) are carried by "
            "singlepass's runtime, which onnxruntime-genai's generator does not feed (export it without the "
            "response probe for onnxruntime-genai)"
        )
    io = _io_names(g)
    if isinstance(io, str):
        return io
    dims = _output_dims(g, g["logits"])
    if g.get("logits_last_position_only") and not (dims and len(dims) == 3 and dims[1] == 1):
        return (
            f"the prefill logits are sliced to the last position but the graph declares {g['logits']} as "
            f"{dims}, not [batch, 1, vocab]: onnxruntime-genai would read them as every position's logits "
            "(export with --all-logits)"
        )
    eos = list(t["eos_token_ids"])
    pad = t["pad_token_id"] if t.get("pad_token_id") is not None else (eos[0] if eos else None)
    model = {
        "type": "decoder",
        "context_length": b.get("max_position_embeddings") or lim["max_total_length"],
        "vocab_size": b["vocab_size"],
        "decoder": {
            "filename": g["file"],
            "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
            "head_size": b["head_dim"],
            "hidden_size": b["hidden_size"],
            "num_attention_heads": b["num_attention_heads"],
            "num_key_value_heads": b["num_kv_heads"],
            "num_hidden_layers": b["num_layers"],
            "inputs": io[0],
            "outputs": io[1],
        },
    }
    for key, value in (("bos_token_id", t.get("bos_token_id")), ("eos_token_id", eos), ("pad_token_id", pad)):
        if value is not None and value != []:
            model[key] = value
    search = {
        "do_sample": False,
        "num_beams": 1,
        "max_length": lim["max_total_length"],  # the artifact's validated limit (prompt + new tokens)
        "past_present_share_buffer": False,  # present = concat(past, new): no shared buffer
    }
    return {"model": model, "search": search}


def write_genai_config(folder: Path, manifest: dict) -> dict:
    """Write ``folder/genai_config.json`` when onnxruntime-genai can run the artifact and record the
    outcome in ``manifest["genai"]`` (the caller writes the manifest). -> that record."""
    cfg = genai_config(manifest)
    if isinstance(cfg, str):
        record = {"config": None, "reason": cfg}
    else:
        atomic_write_json(Path(folder) / CONFIG, cfg)
        last = manifest["graph"].get("logits_last_position_only")
        record = {
            "config": CONFIG,
            "onnxruntime_genai": f">={MIN_VERSION}",
            "prefill_logits": "last position only, declared [batch, 1, vocab] (read by onnxruntime-genai as "
            "pruned last-token logits)"
            if last
            else "every position",
            "probe_outputs": "generator.get_output('<probe>/probs') after append_tokens: the prompt's probe output",
        }
    manifest["genai"] = record
    return record
