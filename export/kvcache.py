"""The in-place KV cache: each layer's attention as ONNX Runtime's ``GroupQueryAttention``, which
writes the new keys/values into the past buffer it is given instead of returning a new copy.

The exported graph's attention (``export/attention.py``, opset 23) reads ``present = Concat(past,
new)``: every decode step copies every layer's whole past (at 16 rows x 512 columns that copy and
the attention over it are most of the step: ``benchmarks/results/engine_steps.md``). After
``inplace_kv_cache`` each layer is one node::

    q [B, H, T, D], k, v [B, kv, T, D]  -> Transpose + Reshape -> [B, T, H*D], [B, T, kv*D]
    GroupQueryAttention(q, k, v, past_key, past_value, seqlens_k [B], total_sequence_length [])
        -> out [B, T, H*D] -> [B, H, T, D] (what the layer read before), present_key, present_value

    seqlens_k = sum(attention_mask, 1) - 1      total_sequence_length = attention_mask.shape[1]

The rows' layout changes with it: a row's tokens are a prefix of its mask (right padding), since
GroupQueryAttention takes each row's valid keys as ``[0, seqlens_k + 1)``. A pass's new tokens sit
at the start of that pass's columns (a prefill's past is empty; a decode step feeds one token), so
``attention_mask[:, :T]`` marks them and a row's last token is at ``sum(that) - 1``.

Run in place (``runtime/backends.OrtBackend.run(..., inplace=...)``), the present outputs are bound
to the past inputs' buffers ``[B, kv, C, D]`` (capacity C = the mask's width): the kernel writes the
new column of row b at ``seqlens_k[b]`` and reads only ``[0, seqlens_k[b] + 1)``, so a step's cost
follows each row's own length, not the batch's widest. Fed ordinary past tensors (onnxruntime-genai
with ``past_present_share_buffer: false``) the node concatenates as before.

A pass with new tokens and a past (chunked prefill) must be one row (ONNX Runtime's kernel refuses
more); the runtime's prefills start from an empty past.

Only what GroupQueryAttention computes identically is converted: ONNX ``Attention`` nodes reading
``Concat(past, new)`` on the sequence axis, without a sliding window (the caller checks the model's
config: the window lives in the mask, which GroupQueryAttention does not read); a soft-cap carries
over as the node's ``softcap``.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
from onnx import TensorProto

from singlepass.errors import SinglepassError
from singlepass.export.residual import ResidualStream, produced_by
from singlepass.export.surgery import Namer

MODES = ("auto", "inplace", "concat")


def sliding_window(config) -> bool:
    """Does any layer attend through a sliding window (held in the mask)?"""
    types = getattr(config, "layer_types", None) or []
    return bool(getattr(config, "sliding_window", None)) and (not types or any("sliding" in t for t in types))


def _concat_past(t: gs.Tensor, past: set[str]) -> gs.Node | None:
    """The Concat(past input, new) on axis 2 that produced ``t``, if it is one."""
    node = t.inputs[0] if len(t.inputs) == 1 else None
    if node is None or node.op != "Concat" or len(node.inputs) != 2 or node.attrs.get("axis") not in (2, -2):
        return None
    return node if node.inputs[0].name in past else None


def convertible(graph: gs.Graph, stream: ResidualStream) -> list[gs.Node]:
    """The Attention nodes ``inplace_kv_cache`` would convert: all of the layers' or none."""
    past = set(stream.past)
    nodes = [
        n
        for n in graph.nodes
        if n.op == "Attention"
        and len(n.inputs) >= 3
        and not n.attrs.get("is_causal", 0)  # attributes GroupQueryAttention has no equivalent of
        and not n.attrs.get("qk_matmul_output_mode", 0)
        and _concat_past(n.inputs[1], past) is not None
        and _concat_past(n.inputs[2], past) is not None
    ]
    return nodes if stream.past and 2 * len(nodes) == len(stream.past) else []


def _lengths(namer: Namer, mask: gs.Tensor) -> tuple[list[gs.Node], gs.Variable, gs.Variable]:
    """-> (nodes, seqlens_k int32 [B] = sum(mask, 1) - 1, total_sequence_length int32 [] = mask.shape[1])."""
    total64 = gs.Variable(namer("mask_sum"), dtype=np.int64)  # [B]
    last64 = gs.Variable(namer("seqlens_k_64"), dtype=np.int64)  # [B]
    seqlens = gs.Variable(namer("seqlens_k"), dtype=np.int32)  # [B]
    width = gs.Variable(namer("mask_width_1"), dtype=np.int64)  # [1]
    width0 = gs.Variable(namer("mask_width"), dtype=np.int64)  # []
    total = gs.Variable(namer("total_sequence_length"), dtype=np.int32)  # []
    nodes = [
        namer.node("ReduceSum", [mask, namer.i64("axis1", [1])], [total64], keepdims=0),
        namer.node("Sub", [total64, gs.Constant(namer("one64"), np.array(1, np.int64))], [last64]),
        namer.node("Cast", [last64], [seqlens], to=TensorProto.INT32),
        namer.node("Shape", [mask], [width], start=1, end=2),
        namer.node("Squeeze", [width, namer.i64("axis0", [0])], [width0]),
        namer.node("Cast", [width0], [total], to=TensorProto.INT32),
    ]
    return nodes, seqlens, total


def _swaps_heads(node: gs.Node | None) -> bool:
    """Is ``node`` a Transpose(0, 2, 1, 3): [B, T, N, D] <-> [B, N, T, D]?"""
    return node is not None and node.op == "Transpose" and list(node.attrs.get("perm", [])) == [0, 2, 1, 3]


def _split_heads(t: gs.Tensor) -> gs.Tensor | None:
    """``t`` = Transpose(0, 2, 1, 3)(Reshape(x [B, T, N*D]) -> [B, T, N, D]) -> x, else None: the
    exporter's head split, which GroupQueryAttention's packed [B, T, N*D] inputs make unnecessary."""
    tr = produced_by(t, "Transpose")
    if not _swaps_heads(tr) or len(tr.inputs[0].outputs) != 1:
        return None
    rs = produced_by(tr.inputs[0], "Reshape")
    if rs is None:
        return None
    x, y = rs.inputs[0], rs.outputs[0]
    if x.shape is None or y.shape is None or len(x.shape) != 3 or len(y.shape) != 4:
        return None
    n, d, nd = y.shape[2], y.shape[3], x.shape[2]
    return x if all(isinstance(v, int) for v in (n, d, nd)) and n * d == nd else None


def _packed(namer: Namer, t: gs.Tensor, base: str) -> tuple[list[gs.Node], gs.Tensor]:
    """[B, N, T, D] -> (nodes, [B, T, N*D]): the tensor before the exporter's head split when ``t``
    is one (no node), or the split of a RotaryEmbedding over it, which then rotates the packed
    tensor itself (ONNX RotaryEmbedding takes [B, T, N*D] with ``num_heads``); else a Transpose
    and a Reshape."""
    x = _split_heads(t)
    if x is not None:
        return [], x
    rot = produced_by(t, "RotaryEmbedding")
    x = _split_heads(rot.inputs[0]) if rot is not None and rot.attrs.get("num_heads") else None
    if x is not None:
        out = gs.Variable(namer(f"{base}_rotated"), dtype=t.dtype)  # [B, T, N*D]
        return [namer.node("RotaryEmbedding", [x, *rot.inputs[1:]], [out], **rot.attrs)], out
    tr = gs.Variable(namer(f"{base}_bsnd"), dtype=t.dtype)  # [B, T, N, D]
    out = gs.Variable(namer(f"{base}_packed"), dtype=t.dtype)  # [B, T, N*D]
    return [
        namer.node("Transpose", [t], [tr], perm=[0, 2, 1, 3]),
        namer.node("Reshape", [tr, namer.i64("shape_b_t_flat", [0, 0, -1])], [out]),
    ], out


def _merged_heads(out: gs.Tensor) -> gs.Tensor | None:
    """The attention output [B, H, T, D] read only as Reshape(Transpose(0, 2, 1, 3)(out)) ->
    [B, T, H*D] (the exporter's head merge) -> that [B, T, H*D] tensor, which GroupQueryAttention
    can write directly; else None."""
    if len(out.outputs) != 1 or not _swaps_heads(out.outputs[0]):
        return None
    t = out.outputs[0].outputs[0]
    if len(t.outputs) != 1 or t.outputs[0].op != "Reshape":
        return None
    y = t.outputs[0].outputs[0]
    return y if y.shape is not None and len(y.shape) == 3 else None


def inplace_kv_cache(graph: gs.Graph, stream: ResidualStream) -> int:
    """Every layer's ``Attention`` over ``Concat(past, new)`` -> one ``GroupQueryAttention`` writing
    the present outputs (same names). Marks ``stream.inplace_kv``. -> layers converted (0: the graph
    has not this pattern in every layer; it is left as it is)."""
    nodes = convertible(graph, stream)
    if not nodes:
        return 0
    namer = Namer(graph)
    mask = graph.tensors()[stream.attention_mask]
    new, seqlens, total = _lengths(namer, mask)
    for att in nodes:
        ck, cv = att.inputs[1].inputs[0], att.inputs[2].inputs[0]
        heads, kv_heads = int(att.attrs["q_num_heads"]), int(att.attrs["kv_num_heads"])
        n1, q = _packed(namer, att.inputs[0], "gqa_q")
        n2, k = _packed(namer, ck.inputs[1], "gqa_k")
        n3, v = _packed(namer, cv.inputs[1], "gqa_v")
        present_k, present_v = att.inputs[1], att.inputs[2]
        past_k, past_v = ck.inputs[0], cv.inputs[0]
        ck.outputs.clear()
        cv.outputs.clear()
        out = att.outputs[0]  # [B, H, T, D], what the layer reads
        merged = _merged_heads(out)  # [B, T, H*D], what the layer's o_proj reads, if that is all
        att.outputs.clear()
        att.inputs.clear()
        if merged is not None:
            merged.inputs[0].outputs.clear()  # the exporter's Reshape: GroupQueryAttention writes it
        flat = merged or gs.Variable(namer("gqa_out"), dtype=np.float32)  # [B, T, H*D]
        attrs = {"num_heads": heads, "kv_num_heads": kv_heads}
        if att.attrs.get("scale") is not None:
            attrs["scale"] = float(att.attrs["scale"])
        if float(att.attrs.get("softcap", 0.0) or 0.0):
            attrs["softcap"] = float(att.attrs["softcap"])
        gqa = namer.node(
            "GroupQueryAttention", [q, k, v, past_k, past_v, seqlens, total], [flat, present_k, present_v], **attrs
        )
        gqa.domain = "com.microsoft"
        new += n1 + n2 + n3 + [gqa]
        if merged is None:  # back to [B, H, T, D] for whatever reads it
            split = gs.Variable(namer("gqa_out_bthd"), dtype=np.float32)  # [B, T, H, D]
            shape = namer.i64(f"shape_b_t_{heads}_d", [0, 0, heads, -1])
            new += [
                namer.node("Reshape", [flat, shape], [split]),
                namer.node("Transpose", [split], [out], perm=[0, 2, 1, 3]),
            ]
    graph.nodes.extend(new)
    graph.cleanup().toposort()
    stream.inplace_kv = True
    return len(nodes)


def apply(graph: gs.Graph, stream: ResidualStream, mode: str, config, all_logits: bool, weights: str = "int4") -> str:
    """``--kv-cache MODE`` -> the layout the graph gets: "inplace" where the graph and model allow
    it ("inplace" says why not otherwise; "auto": for quantised weights, whose MatMulNBits already
    tie the artifact to ONNX Runtime; fp32 artifacts stay portable, TensorRT builds from them),
    else "concat"."""
    if mode not in MODES:
        raise SinglepassError(f"--kv-cache must be one of {', '.join(MODES)}, not {mode!r}")
    if mode == "concat" or not stream.past or (mode == "auto" and weights == "fp32"):
        if mode == "inplace":
            raise SinglepassError("--kv-cache inplace: the graph has no KV cache")
        return "concat"
    why = (
        "--all-logits keeps every position (the in-place layout's rows end at different columns)"
        if all_logits
        else f"{config.model_type} attends through a sliding window, which GroupQueryAttention would not see"
        if sliding_window(config)
        else None
    )
    if why is None and inplace_kv_cache(graph, stream):
        return "inplace"
    if mode == "inplace":
        raise SinglepassError(
            "--kv-cache inplace: "
            + (why or "the graph's attention is not ONNX Attention over Concat(past, new) in every layer (opset >= 23)")
        )
    return "concat"
