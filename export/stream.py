"""Fusing a response probe: its streaming state becomes graph inputs and outputs, like the KV cache.

A response probe (``reads: response``, trained on the response tokens of prompt + response) is
fused in its streaming form (``Probe.stream_update`` / ``stream_logits``, models/probes.py;
exported by ``export.fuse.export_stream_probe``). In the host graph::

    response_mask        [B, T] int64   input: 1 = this pass's token is a response token to fold in
    <name>/past_<s>      state s        input: the state after the last pass (empty: ``fill``)
    <name>/present_<s>   state s        output: the state after this pass
    <name>/logits, <name>/probs         outputs: the label of the response so far

The runtime feeds a prefill pass ``response_mask = 0`` (the prompt is not the response) and every
decode pass 1 (the token just generated), and carries the presents to the next pass's pasts.
"""

from __future__ import annotations

import onnx

from singlepass.runtime.contract import RESPONSE_MASK


def state_records(name: str, module) -> list[dict]:
    """The manifest's ``FusedProbe.state`` of a response probe: each state tensor's past/present
    names, empty value, batch axis and shape (``"batch"`` at the batch axis)."""
    one, two = module.stream_state_shapes(1), module.stream_state_shapes(2)
    init = module.stream_init(1)
    records = []
    for (s, shape1), (_, shape2), t in zip(one, two, init):
        axis = next(i for i, (a, b) in enumerate(zip(shape1, shape2)) if a != b)
        records.append(
            {
                "name": s,
                "past": f"{name}/past_{s}",
                "present": f"{name}/present_{s}",
                "fill": float(t.reshape(-1)[0]),
                "batch_axis": axis,
                "shape": ["batch" if i == axis else int(n) for i, n in enumerate(shape1)],
            }
        )
    return records


def _rename_inputs(model: onnx.ModelProto, names: dict[str, str]) -> None:
    """Rename graph inputs of a (small) probe graph in place, with every node input reading them."""
    for i in model.graph.input:
        i.name = names.get(i.name, i.name)
    for node in model.graph.node:
        node.input[:] = [names.get(x, x) for x in node.input]


def fuse_response_probe(graph, stream, p, probe: onnx.ModelProto, stacked: onnx.ModelProto | None = None) -> list[str]:
    """Fuse the exported streaming graph ``probe`` of ``p`` (an ``export.pipeline.LoadedProbe``
    whose record lists its state) into ``graph`` (a ``gs.Graph``, in place). -> the outputs.

    ``stacked``: the same probe's stacked form (``export_stream_probe(stacked=True)``), run instead
    in one-token (decode) passes: ``surgery.prefill_only``'s ``If`` on the pass length picks the
    per-layer form for a prefill (no [L+1, B, T, d] copy of a long prompt) and the stacked one for
    a decode pass (~30 ops instead of ~30 per layer); inside the prefill branch, a pass without a
    response token (a prompt's prefill) skips the fold (``surgery.with_response_tokens``)."""
    import numpy as np
    import onnx_graphsurgeon as gs

    from singlepass.export import surgery
    from singlepass.export.fuse import state_names

    if not stream.past:
        raise surgery.SurgeryError(
            f"response probe {p.spec.name!r}: the graph has no KV cache, so there are no decode passes to "
            "carry its state through"
        )
    host = {i.name: i for i in graph.inputs}
    if RESPONSE_MASK not in host:
        graph.inputs.append(gs.Variable(RESPONSE_MASK, np.int64, ["batch", "sequence"]))
    feeds = dict(zip(state_names(stream.num_layers + 1), stream.hidden_states)) | {"mask": RESPONSE_MASK}
    for s in p.spec.state:
        graph.inputs.append(gs.Variable(s["past"], np.float32, s["shape"]))
        feeds[f"in_{s['name']}"] = s["past"]

    def fuse(proto: onnx.ModelProto, prefix: str, boundary: bool = True) -> tuple[list, list[str]]:
        """-> (its nodes, its outputs)."""
        # the probe graph's own state inputs are renamed so that, prefixed, they do not take the host names
        _rename_inputs(proto, {f"past_{s['name']}": f"in_{s['name']}" for s in p.spec.state})
        return surgery.fuse_probe_nodes(graph, proto, prefix, feeds, boundary)

    nodes, outs = fuse(probe, p.spec.name)
    if stacked is not None:
        # a prompt's prefill (no response token) skips the fold: the per-layer form is ~30 ops per layer
        nodes = surgery.with_response_tokens(
            graph, stream, nodes, outs, {s["present"]: s["past"] for s in p.spec.state}
        )
        # TensorRT refuses response probes (no state profiles), so the decode form skips the fp32 boundary
        decode = fuse(stacked, f"{p.spec.name}/decode", boundary=False)
        surgery.prefill_only(graph, stream, nodes, outs, decode=decode)
    return outs
