"""The TensorRT pre-flight checks that run the fused graph with ONNX Runtime (no TensorRT needed).

* ``check_dummy_past``: prefill with the engine profile's masked dummy past slot gives the same
  logits and probe probabilities as prefill with an empty past;
* ``range_report``: max |activation| per decoder layer on real prompts against fp16's range
  (tensors of the nodes pinned to fp32 in reduced-precision engines are reported apart).

``export/tensorrt.py`` runs them from ``preflight``; feeds are ``runtime/feeds.py``'s.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from singlepass.runtime.tensorrt import DUMMY_PAST

if TYPE_CHECKING:
    import onnx

    from singlepass.runtime.contract import Manifest

FP16_MAX = 65504.0
MASK_FILL = 1e30  # |x| above this is a masking constant (-inf / finfo.min), not an activation


def prompt_feeds(art_folder: Path, manifest: Manifest, prompts: list[str]) -> list[tuple]:
    """The prompts as the runtime tokenises them, one [1, T] batch each: (ids, mask, pos)."""
    from singlepass.runtime.batching import pad_batch
    from singlepass.runtime.tokenize import PromptTokenizer

    tok = PromptTokenizer(art_folder, manifest)
    seqs = [tok.encode(p, manifest.limits.max_prompt_length, truncate=True)[0] for p in prompts]
    return [pad_batch([ids], manifest.pad_id, "left", manifest.graph.min_prefill_tokens) for ids in seqs]


def _feed(manifest: Manifest, ids, mask, pos, past_len: int) -> dict:
    from singlepass.runtime.feeds import make_feed

    return make_feed(manifest, ids, mask, pos, dummy=past_len)


def check_dummy_past(sess, manifest: Manifest, feeds: list[tuple]) -> dict:
    """Prefill with one masked dummy past slot (the TensorRT profile) == prefill with no past."""
    if not manifest.graph.kv_cache:
        return {"ok": True, "detail": "no KV cache: no dummy slot needed"}
    names = [o.name for o in sess.get_outputs()]
    keep = [manifest.graph.logits] + [p.probs for p in manifest.probes]
    worst = 0.0
    for ids, mask, pos in feeds:
        a = dict(zip(names, sess.run(None, _feed(manifest, ids, mask, pos, 0))))
        b = dict(zip(names, sess.run(None, _feed(manifest, ids, mask, pos, DUMMY_PAST))))
        worst = max([worst] + [float(np.abs(a[k] - b[k]).max()) for k in keep])
    ok = worst <= 1e-4
    return {
        "ok": ok,
        "max_abs_diff": worst,
        "detail": f"logits and probe probs with a masked dummy past slot vs none: max |diff| {worst:.2g}",
    }


def _activation_maxima(
    folder: Path, manifest: Manifest, feeds: list[tuple]
) -> tuple[dict[str, float], int, onnx.ModelProto]:
    """Max |activation| of every float tensor on the prompts (ONNX Runtime, every float tensor made
    an output). -> (maxima by tensor, masking constants ignored, the graph without weights)."""
    import onnx

    from singlepass.runtime.backends import ort_session

    graph_file = folder / manifest.graph.file
    model = onnx.load(str(graph_file), load_external_data=False)  # the weights stay in the data file
    inferred = onnx.shape_inference.infer_shapes(model)
    have = {o.name for o in model.graph.output}
    floats = sorted(
        {v.name for v in inferred.graph.value_info if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT} - have
    )
    model.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in floats)
    # Saved beside the graph so that its external-data references resolve; removed right after.
    path = folder / f".preflight-{os.getpid()}.onnx"
    try:
        onnx.save_model(model, str(path))
        sess = ort_session(path)
    finally:
        path.unlink(missing_ok=True)
    names = [o.name for o in sess.get_outputs()]
    maxima: dict[str, float] = {}
    fills = 0
    for ids, mask, pos in feeds:
        for n, v in zip(names, sess.run(None, _feed(manifest, ids, mask, pos, 0))):
            if v.dtype != np.float32 or not v.size:
                continue
            a = np.abs(v[np.isfinite(v)])
            big = a >= MASK_FILL
            fills += int(big.sum()) + int((~np.isfinite(v)).sum())
            m = float(a[~big].max()) if (~big).any() else 0.0
            maxima[n] = max(maxima.get(n, 0.0), m)
    return maxima, fills, model


def range_report(folder: Path, manifest: Manifest, plan: dict, feeds: list[tuple]) -> dict:
    """Max |activation| per decoder layer on real prompts, against fp16's range."""
    from singlepass.export.surgery import PREFIX

    stream = plan["stream"]
    maxima, fills, model = _activation_maxima(Path(folder), manifest, feeds)
    # Layer of a node = how many layer ends (second residual add of a layer) precede it in
    # topological order; nodes after the last one are the final norm and the lm_head.
    order = {n.name: k for k, n in enumerate(model.graph.node)}
    producer_of = {o: n.name for n in model.graph.node for o in n.output}
    bounds = [order[producer_of[t]] for t in stream.residuals[1::2]]
    emb_at = order[producer_of[stream.embedding]] if stream.embedding in producer_of else -1
    probe_prefixes = tuple(f"{p.name}/" for p in manifest.probes)
    L = stream.num_layers
    layers = [{"layer": i, "residual_max": 0.0, "block_max": 0.0, "block_argmax": None} for i in range(L)]
    hs_max = [maxima.get(t, 0.0) for t in stream.hidden_states]
    for i in range(L):
        layers[i]["residual_max"] = hs_max[i + 1]
    other = {"probes": 0.0, "final_norm_and_lm_head": 0.0, "embedding": hs_max[0]}
    for n, m in maxima.items():
        node = producer_of.get(n, "")
        if node.startswith(probe_prefixes):
            other["probes"] = max(other["probes"], m)
            continue
        if node.startswith(PREFIX) or order.get(node, 0) <= emb_at:
            continue  # singlepass glue (copies of stream tensors), mask / position preprocessing
        layer = sum(1 for b in bounds if b < order.get(node, 0))
        if layer >= L:
            other["final_norm_and_lm_head"] = max(other["final_norm_and_lm_head"], m)
        elif m > layers[layer]["block_max"]:
            layers[layer]["block_max"], layers[layer]["block_argmax"] = m, n
    # Tensors made by the nodes pinned to fp32 (RMS norms: x**2 of a 2.5e4 residual is 6e8; fused
    # probes) never exist in fp16, so only the others must fit fp16's range.
    pinned = set(plan["norm_nodes"]) | set(plan["probe_nodes"])
    in_fp16 = {n: m for n, m in maxima.items() if producer_of.get(n) not in pinned}
    overall = max(in_fp16.values(), default=0.0)
    fp32_max = max((m for n, m in maxima.items() if n not in in_fp16), default=0.0)
    over = sorted(((m, n) for n, m in in_fp16.items() if m > FP16_MAX), reverse=True)
    return {
        "ok": not over,
        "fp16_max": FP16_MAX,
        "max_abs_activation": overall,
        "max_abs_fp32_pinned": fp32_max,
        "headroom": FP16_MAX / overall if overall else None,
        "hidden_states_max": hs_max,
        "layers": layers,
        "other": other,
        "over_fp16": [{"tensor": n, "max_abs": m} for m, n in over[:10]],
        "mask_fill_values_ignored": fills,
        "prompts": len(feeds),
        "detail": (
            f"max |activation| {overall:.4g} ({overall / FP16_MAX:.0%} of fp16's {FP16_MAX:.0f}; "
            f"{fp32_max:.4g} inside the fp32-pinned norms and probes); residual stream max "
            f"{max(hs_max):.4g}" + (f"; {len(over)} tensors overflow fp16" if over else "")
        ),
    }
