"""ONNX Runtime's fused CPU kernels for the artifacts already tied to it (quantised weights, the
in-place KV cache): fewer, larger kernels per layer.

A batch-1 decode step of SmolLM2 int4 ran ~500 kernels, most of them on a few KB of data, so the
per-kernel cost (dispatch, thread-pool wake-up) was a large part of the step. Two rewrites on
onnx-graphsurgeon, each a small function tested on a tiny generated graph (tests/test_ortfuse.py):

``skip_rmsnorm``: a residual ``Add`` read by an ``RMSNormalization`` ->
``SkipSimplifiedLayerNormalization``, which returns the norm and the sum. The sum keeps its tensor
name, so the probes that read the residual stream read the same tensor::

    s = Add(a, b); y = RMSNormalization(s, w)   ->   y, _, _, s = SkipSimplifiedLayerNormalization(a, b, w)

``pack_qkv_rotary``: the q/k/v projections of one layer (three ``MatMulNBits`` on the same input)
-> one ``MatMulNBits`` over the rows of all three, read packed by ``GroupQueryAttention``, which
also rotates q and k itself (``do_rotary``) from cos/sin tables [P, D/2] evaluated from the graph's
own position subgraph at positions 0..P-1::

    q = Rot(MatMulNBits(x, Wq)), k = Rot(MatMulNBits(x, Wk)), v = MatMulNBits(x, Wv)
    GroupQueryAttention(q, k, v, ...)
        ->  GroupQueryAttention(MatMulNBits(x, [Wq; Wk; Wv]), -, -, ..., cos, sin, position_ids, do_rotary=1)

The tables are exact only where the graph's cos/sin at a position depend on that position alone
(``STATIC_ROPE``: no length-dependent scaling such as ``dynamic`` or ``longrope``); the caller
passes the model's rope type and ``pack_qkv_rotary`` leaves other graphs as they are. The kernel
takes a prompt's positions from ``position_ids[0, 0]`` on (every row alike) and a decode token's
from ``seqlens_k``: exact for the in-place layout, whose rows are prefixes starting at position 0
(``export/kvcache.py``). It needs ``total_sequence_length`` (the mask's width, the cache buffers'
capacity) <= the tables' rows (``max_position_embeddings``): the runtime caps the in-place
buffers at the artifact's ``max_total_length`` (``runtime/feeds.spare_columns``).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from singlepass.errors import SinglepassError
from singlepass.export.quantize import packed_name
from singlepass.export.residual import ONNX_DOMAINS, is_constant, produced_by
from singlepass.export.surgery import Namer, to_model

MODES = ("auto", "none")
STATIC_ROPE = (None, "default", "linear", "llama3", "yarn")  # cos/sin at p depend on p alone


def _only_reader(graph: gs.Graph, t: gs.Tensor, node: gs.Node) -> bool:
    """Is ``node`` all that reads ``t`` (no other node, not a graph output)?"""
    return len(t.outputs) == 1 and t.outputs[0] is node and all(t is not o for o in graph.outputs)


# --- Add + RMSNormalization -> SkipSimplifiedLayerNormalization ------------------------------------


def skip_rmsnorm(graph: gs.Graph) -> int:
    """In place: each ``RMSNormalization(Add(a, b), w)`` over the last axis, a and b computed tensors
    of one shape -> ``SkipSimplifiedLayerNormalization(a, b, w)`` writing the norm and (4th output)
    the sum under their own names. -> number fused."""
    namer = Namer(graph)
    done = 0
    for norm in [n for n in graph.nodes if n.op == "RMSNormalization" and n.domain in ONNX_DOMAINS]:
        s = norm.inputs[0]
        add = produced_by(s, "Add")
        w = norm.inputs[1] if len(norm.inputs) > 1 else None
        if add is None or not isinstance(w, gs.Constant) or w.values.ndim != 1 or norm.attrs.get("axis", -1) != -1:
            continue
        a, b = add.inputs
        if is_constant(a) or is_constant(b) or not _same_shape(a, b):
            continue
        y = norm.outputs[0]
        add.outputs.clear()
        norm.outputs.clear()
        fused = gs.Node(
            "SkipSimplifiedLayerNormalization",
            name=namer("SkipSimplifiedLayerNormalization"),
            domain="com.microsoft",
            attrs={"epsilon": float(norm.attrs.get("epsilon", 1e-5))},
            inputs=[a, b, w],
            outputs=[y, gs.Variable.empty(), gs.Variable.empty(), s],
        )
        graph.nodes.append(fused)
        done += 1
    if done:
        graph.cleanup().toposort()
    return done


def _same_shape(a: gs.Tensor, b: gs.Tensor) -> bool:
    """Do a and b have the same known rank-3 shape (symbolic dims compared by name)?"""
    return a.shape is not None and b.shape is not None and len(a.shape) == 3 and list(a.shape) == list(b.shape)


# --- q/k/v MatMulNBits + RotaryEmbedding -> packed GroupQueryAttention -----------------------------


def _nbits(t: gs.Tensor) -> gs.Node | None:
    node = produced_by(t, "MatMulNBits", ("com.microsoft",))
    if node is None or len(node.inputs) > 4 or not all(isinstance(i, gs.Constant) for i in node.inputs[1:]):
        return None  # g_idx / bias: not packed
    return node


def _rotary(t: gs.Tensor) -> gs.Node | None:
    """t = RotaryEmbedding(x [B, T, N*D], cos [B, T, D/2], sin) over the whole head, else None."""
    rot = produced_by(t, "RotaryEmbedding")
    if (
        rot is None
        or len(rot.inputs) != 3
        or rot.attrs.get("rotary_embedding_dim", 0)
        or not rot.attrs.get("num_heads")
    ):
        return None
    return rot


def _layer(graph: gs.Graph, gqa: gs.Node) -> tuple[gs.Node, gs.Node, gs.Node, gs.Node, gs.Node] | None:
    """(rot_q, rot_k, mm_q, mm_k, mm_v) of a GroupQueryAttention reading Rot(MatMulNBits) q and k
    and MatMulNBits v, all three projections of one input with one quantisation, read only here,
    with a head size ONNX Runtime's rotary inside the attention takes (a multiple of 16)."""
    if gqa.attrs.get("do_rotary", 0) or len(gqa.inputs) != 7:
        return None
    q, k, v = gqa.inputs[:3]
    rq, rk = _rotary(q), _rotary(k)
    if rq is None or rk is None or rq.attrs.get("interleaved") != rk.attrs.get("interleaved"):
        return None
    mq, mk, mv = _nbits(rq.inputs[0]), _nbits(rk.inputs[0]), _nbits(v)
    if mq is None or mk is None or mv is None:
        return None
    heads = int(gqa.attrs["num_heads"])
    if int(mq.attrs["N"]) % heads or (int(mq.attrs["N"]) // heads) % 16:
        return None
    same = {"K", "bits", "block_size", "accuracy_level"}
    if not (mq.inputs[0] is mk.inputs[0] is mv.inputs[0]):
        return None
    if any({a: m.attrs.get(a) for a in same} != {a: mq.attrs.get(a) for a in same} for m in (mk, mv)):
        return None
    if len({len(m.inputs) for m in (mq, mk, mv)}) != 1:
        return None
    reads = [(q, gqa), (k, gqa), (v, gqa), (rq.inputs[0], rq), (rk.inputs[0], rk)]
    return (rq, rk, mq, mk, mv) if all(_only_reader(graph, t, n) for t, n in reads) else None


def rope_tables(graph: gs.Graph, pairs: list[tuple[gs.Tensor, gs.Tensor]], positions: int) -> list | None:
    """The graph's own (cos, sin) [B, T, D/2] pairs at positions 0..P-1 -> one (cos, sin) pair of
    [P, D/2] float32 tables per input pair, equal pairs sharing one array; computed by running the
    subgraph that makes them from ``position_ids``. None if it reads another graph input."""
    import onnxruntime as ort

    sub = graph.copy()
    t = sub.tensors()
    if "position_ids" not in [i.name for i in sub.inputs]:
        return None
    names = list(dict.fromkeys(x.name for pair in pairs for x in pair))
    sub.outputs = [t[n] for n in names]
    for o in sub.outputs:
        o.dtype = o.dtype or np.float32  # a graph output must say its type (cos/sin are float32)
    sub.cleanup(remove_unused_graph_inputs=True)
    if [i.name for i in sub.inputs] != ["position_ids"]:
        return None
    sess = ort.InferenceSession(to_model(sub).SerializeToString(), providers=["CPUExecutionProvider"])
    values = sess.run(None, {"position_ids": np.arange(positions, dtype=np.int64)[None]})
    tables: list[np.ndarray] = []  # distinct tables, [P, D/2]
    by_name = {}
    for name, v in zip(names, values):
        v = v[0].astype(np.float32)
        by_name[name] = next((x for x in tables if x.shape == v.shape and np.array_equal(x, v)), None)
        if by_name[name] is None:
            tables.append(v)
            by_name[name] = v
    return [(by_name[c.name], by_name[s.name]) for c, s in pairs]


def pack_qkv_rotary(graph: gs.Graph, positions: int, rope_type: str | None = None) -> int:
    """In place: each layer's q/k/v ``MatMulNBits`` + RotaryEmbedding -> one packed ``MatMulNBits``
    read by its ``GroupQueryAttention`` with ``do_rotary`` (tables for ``positions`` positions).
    All layers or none (-> layers packed; 0 leaves the graph as it is)."""
    if rope_type not in STATIC_ROPE:
        return 0
    gqas = [n for n in graph.nodes if n.op == "GroupQueryAttention" and n.domain == "com.microsoft"]
    layers = [_layer(graph, n) for n in gqas]
    if not gqas or any(x is None for x in layers):
        return 0
    pairs = [(r.inputs[1], r.inputs[2]) for x in layers for r in x[:2]]  # (cos, sin) of q, k per layer
    tables = rope_tables(graph, pairs, positions)
    if tables is None or any(a is not b for i in range(len(layers)) for a, b in zip(tables[2 * i], tables[2 * i + 1])):
        return 0  # q and k rotated alike in every layer (GroupQueryAttention takes one pair)
    namer = Namer(graph)
    consts: dict[int, gs.Constant] = {}  # one Constant per distinct table

    def const(v: np.ndarray, base: str) -> gs.Constant:
        if id(v) not in consts:
            consts[id(v)] = gs.Constant(namer(base), v)  # [P, D/2]
        return consts[id(v)]

    ids = next(i for i in graph.inputs if i.name == "position_ids")
    for i, (gqa, (rq, rk, mq, mk, mv)) in enumerate(zip(gqas, layers)):
        cos_cache, sin_cache = const(tables[2 * i][0], "rope_cos_cache"), const(tables[2 * i][1], "rope_sin_cache")
        mms = (mq, mk, mv)
        rows = [int(m.attrs["N"]) for m in mms]
        weights = [
            gs.Constant(
                packed_name([m.inputs[j].name for m in mms], rows) or namer(f"packed_qkv_{j}"),
                np.concatenate([m.inputs[j].values for m in mms], axis=0),
            )
            for j in range(1, len(mq.inputs))
        ]  # packed weights [Nq+Nk+Nv, nb, blob], scales, zero points: rows of q, then k, then v
        qkv = gs.Variable(namer("qkv"), dtype=np.float32)  # [B, T, (H + 2 kv) * D]
        packed = gs.Node(
            "MatMulNBits",
            name=namer("MatMulNBits_qkv"),
            domain="com.microsoft",
            attrs={**mq.attrs, "N": sum(rows)},
            inputs=[mq.inputs[0], *weights],
            outputs=[qkv],
        )
        past_k, past_v, seqlens, total = gqa.inputs[3:7]
        gqa.inputs.clear()
        gqa.inputs.extend([qkv, gs.Variable.empty(), gs.Variable.empty(), past_k, past_v, seqlens, total])
        gqa.inputs.extend([cos_cache, sin_cache, ids])
        gqa.attrs["do_rotary"] = 1
        gqa.attrs["rotary_interleaved"] = int(rq.attrs.get("interleaved", 0))
        for m in (rq, rk, *mms):
            m.outputs.clear()
        graph.nodes.append(packed)
    graph.cleanup().toposort()
    return len(gqas)


def rope_type(config) -> str | None:
    """The model's rope scaling type (None: plain RoPE); "per-layer" when layer types differ."""
    for attr in ("rope_parameters", "rope_scaling"):
        p = getattr(config, attr, None)
        if isinstance(p, dict):
            t = p.get("rope_type") or p.get("type")
            if t is None and any(isinstance(v, dict) for v in p.values()):
                return "per-layer"
            if t is not None:
                return t
    return None


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise SinglepassError(f"--fused-kernels must be one of {', '.join(MODES)}, not {mode!r}")


def apply(graph: gs.Graph, config, mode: str, onnxruntime_only: bool) -> dict[str, int]:
    """``--fused-kernels MODE`` ("auto": the fused kernels for an artifact already tied to ONNX
    Runtime, by its quantised weights (MatMulNBits) or its in-place KV cache (GroupQueryAttention);
    "none": the exporter's ops) -> {rewrite: count} of those that applied (recorded in the
    manifest). Portable artifacts stay plain ONNX (TensorRT builds from them)."""
    check_mode(mode)
    if mode == "none" or not onnxruntime_only:
        return {}
    done = {"skip_rmsnorm": skip_rmsnorm(graph)}
    positions = getattr(config, "max_position_embeddings", None)
    if positions:
        done["packed_qkv_rotary"] = pack_qkv_rotary(graph, int(positions), rope_type(config))
    return {k: v for k, v in done.items() if v}
