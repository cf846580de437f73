"""Small, named graph transformations on a Llama-family decoder ONNX graph.

They work on graphs singlepass did not export: the residual stream is found from the graph's
*structure*, never from one exporter's node names. The decoder signature searched for:

    input_ids --Gather(embedding table)--> x0                      (hidden state 0)
    x_{k+1} = Add(x_k, f(x_k))   for k = 0 .. 2L-1                (two residual adds per layer)
    x_{2L} --final norm--> n --MatMul|Gemm(lm_head)--> logits      (hidden state L = n)

so hidden state i (1 <= i < L) is x_{2i}, exactly transformers' ``output_hidden_states``
(the last entry is the final-norm output). ``f(x_k)`` must depend on ``x_k`` (attention or
MLP branch); Casts to the same type and Identities on the stream are looked through.

Every transform edits the ``ModelProto`` in place (weights are never copied, so a 540 MB
graph costs nothing extra) and is testable on a tiny hand-built graph:

    find_residual_stream(model)          -> ResidualStream
    add_stacked_hidden_states(model, s)  -> name of the [L+1, B, T, d] tensor
    slice_last_position_logits(model, s) prefill computes the lm_head for the last position only
    probe_attention_mask(model, s)       -> attention_mask[:, -T:] (valid in decode steps too)
    last_position_logits(model, s)       -> logits[:, -1, :] as [B, V] (input of MULI probes)
    fuse_probe(model, probe, name, feeds) merge a probe graph under the prefix ``name/``
    name_nodes(model)                    unique node names (TensorRT layer names, fp32 pinning)
    normalisation_nodes(model, s)        the RMS-norm nodes on the stream (kept fp32 in TensorRT)
    add_output / drop_output / toposort / remove_unused_initializers
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from singlepass.errors import SinglepassError

INT64_MAX = np.iinfo(np.int64).max
PASS_THROUGH = {"Identity", "Cast"}  # ops that leave the residual value unchanged (same-type Cast)
SHAPE_ONLY = {"Identity", "Slice", "Gather", "Reshape", "Squeeze", "Unsqueeze", "Flatten"}
MIN_OPSET = 13
PREFIX = "singlepass/"


class SurgeryError(SinglepassError):
    """The graph does not have the structure a transform needs."""


# ----------------------------------------------------------------------------- graph index

class GraphIndex:
    """Producer / consumer maps over a ModelProto's main graph (rebuilt after every edit)."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.graph = model.graph
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in self.graph.node:
            for o in node.output:
                if o:
                    self.producer[o] = node
            for i in node.input:
                if i:
                    self.consumers.setdefault(i, []).append(node)
        self.initializers = {t.name: t for t in self.graph.initializer}
        self.inputs = {v.name: v for v in self.graph.input}
        self.outputs = {v.name: v for v in self.graph.output}

    def names(self) -> set[str]:
        out = set(self.initializers) | set(self.inputs) | set(self.producer)
        out |= {n.name for n in self.graph.node if n.name}
        return out

    def constant(self, name: str) -> np.ndarray | None:
        """Value of an initializer or a Constant node output, else None."""
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
        return None

    def weight_shape(self, name: str) -> tuple[list[int], bool] | None:
        """Shape of a weight (initializer or Constant, possibly through one Transpose): (dims, transposed)."""
        if name in self.initializers:
            return list(self.initializers[name].dims), False
        node = self.producer.get(name)
        if node is None:
            return None
        if node.op_type == "Constant":
            v = self.constant(name)
            return (list(v.shape), False) if v is not None else None
        if node.op_type == "Transpose":
            inner = self.weight_shape(node.input[0])
            if inner is not None and len(inner[0]) == 2:
                return inner[0], not inner[1]
        return None

    def elem_type(self, name: str) -> int | None:
        for coll in (self.graph.input, self.graph.output, self.graph.value_info):
            for v in coll:
                if v.name == name and v.type.HasField("tensor_type"):
                    return v.type.tensor_type.elem_type
        if name in self.initializers:
            return self.initializers[name].data_type
        return None

    def depends_on(self, tensor: str, target: str) -> bool:
        """Whether ``target`` is an ancestor of ``tensor`` (backward breadth-first search)."""
        seen, queue = {tensor}, deque([tensor])
        while queue:
            t = queue.popleft()
            if t == target:
                return True
            node = self.producer.get(t)
            if node is None:
                continue
            for i in node.input:
                if i and i not in seen:
                    seen.add(i)
                    queue.append(i)
        return False

    def ops_between(self, tensor: str, stop: str) -> set[str]:
        """Op types of the nodes on paths from ``stop`` down to ``tensor`` (descendants of ``stop``
        that are ancestors of ``tensor``)."""
        below, queue = {stop}, deque([stop])
        while queue:
            for n in self.consumers.get(queue.popleft(), []):
                for o in n.output:
                    if o and o not in below:
                        below.add(o)
                        queue.append(o)
        if tensor not in below:
            return set()
        ops, seen, queue = set(), {tensor}, deque([tensor])
        while queue:
            t = queue.popleft()
            node = self.producer.get(t)
            if t == stop or node is None:
                continue
            ops.add(node.op_type)
            for i in node.input:
                if i in below and i not in seen:
                    seen.add(i)
                    queue.append(i)
        return ops


def opset_of(model: onnx.ModelProto) -> int:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return o.version
    raise SurgeryError("the graph imports no default-domain opset: not a standard ONNX model")


class Namer:
    """Fresh tensor / node names that collide with nothing already in the graph."""

    def __init__(self, model: onnx.ModelProto):
        self.taken = GraphIndex(model).names() | {o.name for o in model.graph.output}

    def __call__(self, base: str) -> str:
        name, k = PREFIX + base, 1
        while name in self.taken:
            k += 1
            name = f"{PREFIX}{base}_{k}"
        self.taken.add(name)
        return name


def _const_i64(model: onnx.ModelProto, namer: Namer, base: str, values) -> str:
    name = namer(base)
    model.graph.initializer.append(numpy_helper.from_array(np.asarray(values, dtype=np.int64), name))
    return name


def _node(namer: Namer, op: str, inputs: list[str], outputs: list[str], **attrs) -> onnx.NodeProto:
    return helper.make_node(op, inputs, outputs, name=namer(op), **attrs)


# ----------------------------------------------------------------------------- residual stream

@dataclass
class ResidualStream:
    """Where the decoder's hidden states live in a graph (tensor names)."""

    input_ids: str
    attention_mask: str | None
    position_ids: str | None
    embedding: str  # hidden state 0 (embedding output)
    residuals: list[str]  # the 2L residual-add outputs, in order
    final_norm: str  # hidden state L: the final-norm output, before any last-position slice
    lm_head: str  # name of the node computing the logits
    logits: str  # graph output name
    vocab_size: int
    hidden_size: int
    past: list[str] = field(default_factory=list)  # past key/value inputs in layer order, key before value
    present: list[str] = field(default_factory=list)

    @property
    def num_layers(self) -> int:
        return len(self.residuals) // 2

    @property
    def hidden_states(self) -> list[str]:
        """The L+1 tensors stacked into [L+1, B, T, d], in transformers' order."""
        return [self.embedding] + [self.residuals[2 * i + 1] for i in range(self.num_layers - 1)] + [self.final_norm]


def _is_int(t: int | None) -> bool:
    return t in (TensorProto.INT64, TensorProto.INT32)


def _kv_order(name: str) -> tuple:
    import re

    nums = [int(x) for x in re.findall(r"\d+", name)]
    kind = 0 if "key" in name.lower() or name.lower().endswith(".k") else 1
    return (nums[-1] if nums else 0, kind, name)


def _find_lm_head(ix: GraphIndex, logits_name: str | None = None) -> tuple[onnx.NodeProto, str, int, int]:
    """-> (lm_head node, logits output name, vocab size, hidden size)."""
    found = []
    for out in ([logits_name] if logits_name else ix.outputs):
        t, hops = out, 0
        while t in ix.producer and ix.producer[t].op_type in SHAPE_ONLY | {"Cast"} and hops < 8:
            t, hops = ix.producer[t].input[0], hops + 1
        node = ix.producer.get(t)
        if node is None or node.op_type not in ("MatMul", "Gemm"):
            continue
        w = ix.weight_shape(node.input[1])
        if w is None or len(w[0]) != 2:
            continue
        dims, transposed = w
        if node.op_type == "Gemm" and any(a.name == "transB" and a.i == 1 for a in node.attribute):
            transposed = not transposed
        d, vocab = (dims[1], dims[0]) if transposed else (dims[0], dims[1])
        found.append((node, out, vocab, d))
    if not found:
        raise SurgeryError("no graph output is produced by a MatMul/Gemm with a weight matrix (the lm_head): "
                           "not a causal-LM decoder graph")
    if len(found) > 1:
        named = [f for f in found if f[1] == "logits"]
        if len(named) != 1:
            raise SurgeryError(f"several outputs look like logits ({', '.join(f[1] for f in found)}); "
                               "name the token logits output 'logits'")
        found = named
    return found[0]


def _find_embedding(ix: GraphIndex, vocab: int, d: int) -> tuple[str, str, int]:
    """-> (input_ids graph input, embedding output tensor, table dtype)."""
    hits = []
    for node in ix.graph.node:
        if node.op_type != "Gather" or len(node.input) < 2:
            continue
        w = ix.weight_shape(node.input[0])
        if w is None or len(w[0]) != 2 or w[1] or w[0][1] != d:
            continue
        src, hops = node.input[1], 0
        while src in ix.producer and ix.producer[src].op_type in PASS_THROUGH and hops < 4:
            src, hops = ix.producer[src].input[0], hops + 1
        if src in ix.inputs and _is_int(ix.elem_type(src)):
            hits.append((w[0][0] == vocab, src, node.output[0], _dtype_of(ix, node.input[0])))
    if not hits:
        raise SurgeryError(f"no token-embedding Gather (a [vocab, {d}] table indexed by an integer graph input) "
                           "feeds the residual stream")
    hits.sort(key=lambda h: not h[0])
    return hits[0][1:]


def _dtype_of(ix: GraphIndex, weight: str) -> int:
    while weight not in ix.initializers and weight in ix.producer and ix.producer[weight].op_type == "Transpose":
        weight = ix.producer[weight].input[0]
    if weight in ix.initializers:
        return ix.initializers[weight].data_type
    v = ix.constant(weight)
    return helper.np_dtype_to_tensor_dtype(v.dtype) if v is not None else TensorProto.UNDEFINED


def _aliases(ix: GraphIndex, x: str, dtype: int) -> set[str]:
    """x plus tensors equal to it: Identity and same-type Cast chains."""
    out, queue = {x}, [x]
    while queue:
        t = queue.pop()
        for n in ix.consumers.get(t, []):
            if n.op_type == "Identity" or (n.op_type == "Cast" and any(a.name == "to" and a.i == dtype
                                                                         for a in n.attribute)):
                if n.output[0] not in out:
                    out.add(n.output[0])
                    queue.append(n.output[0])
    return out


def find_residual_stream(model: onnx.ModelProto, expected_layers: int | None = None,
                         logits_name: str | None = None) -> ResidualStream:
    """Locate embedding, residual adds, final norm and lm_head by structure. Raises SurgeryError.

    ``logits_name`` pins the logits output (needed once probe heads add other Gemm outputs).
    """
    if opset_of(model) < MIN_OPSET:
        raise SurgeryError(f"opset {opset_of(model)} is too old: re-export the decoder with opset >= {MIN_OPSET}")
    ix = GraphIndex(model)
    lm_head, logits, vocab, d = _find_lm_head(ix, logits_name)
    input_ids, x, dtype = _find_embedding(ix, vocab, d)
    if dtype != TensorProto.FLOAT:
        raise SurgeryError(f"the embedding table is {TensorProto.DataType.Name(dtype)}, not FLOAT: export the "
                           "decoder in fp32 (reduced precision is applied at engine build time)")
    emb = x
    residuals = []
    while True:
        al = _aliases(ix, x, dtype)
        cands = []
        for a in al:
            for n in ix.consumers.get(a, []):
                if n.op_type != "Add" or len(n.input) != 2 or n in cands:
                    continue
                other = n.input[1] if n.input[0] == a else n.input[0]
                if other not in al and ix.depends_on(other, x):
                    cands.append(n)
        if not cands:
            break
        if len(cands) > 1:
            raise SurgeryError(f"residual stream is ambiguous after {len(residuals)} residual adds "
                               f"({len(cands)} candidate Add nodes consume {x!r})")
        x = cands[0].output[0]
        residuals.append(x)
    if len(residuals) < 2 or len(residuals) % 2:
        raise SurgeryError(f"found {len(residuals)} residual Add nodes after the embedding; a decoder has two per "
                           "layer (attention and MLP): the graph is not a recognised Llama-family decoder")
    # Hidden state L is the lm_head input before any last-position slice or flattening.
    final = lm_head.input[0]
    while final in ix.producer and ix.producer[final].op_type in SHAPE_ONLY:
        final = ix.producer[final].input[0]
    if not ix.depends_on(final, x):
        raise SurgeryError("the lm_head input does not depend on the last residual add: unrecognised decoder")
    between = ix.ops_between(final, x)
    if between & {"MatMul", "Gemm", "Conv", "Einsum", "Attention"}:
        raise SurgeryError(f"between the last residual add and the lm_head there are {sorted(between)} ops, "
                           "not just a normalisation: unrecognised decoder")
    stream = ResidualStream(
        input_ids=input_ids,
        attention_mask=next((n for n in ix.inputs if "mask" in n.lower() and _is_int(ix.elem_type(n))), None),
        position_ids=next((n for n in ix.inputs if "position" in n.lower()), None),
        embedding=emb, residuals=residuals, final_norm=final, lm_head=lm_head.name or lm_head.output[0],
        logits=logits, vocab_size=vocab, hidden_size=d,
        past=sorted((n for n in ix.inputs if "past" in n.lower()), key=_kv_order),
        present=sorted((n for n in ix.outputs if "present" in n.lower()), key=_kv_order))
    if expected_layers is not None and stream.num_layers != expected_layers:
        raise SurgeryError(f"found {stream.num_layers} decoder layers in the graph but the model has "
                           f"{expected_layers}: the graph does not belong to this model")
    if stream.past and len(stream.past) != 2 * stream.num_layers:
        raise SurgeryError(f"{len(stream.past)} past key/value inputs for {stream.num_layers} layers")
    if stream.attention_mask is None:
        raise SurgeryError("the graph has no integer attention-mask input (e.g. 'attention_mask'): padded batches "
                           "and probe masking need one")
    return stream


def _lm_node(model: onnx.ModelProto, stream: ResidualStream) -> onnx.NodeProto:
    for n in model.graph.node:
        if (n.name or n.output[0]) == stream.lm_head:
            return n
    raise SurgeryError(f"lm_head node {stream.lm_head!r} vanished from the graph")


# ----------------------------------------------------------------------------- transforms

def add_stacked_hidden_states(model: onnx.ModelProto, stream: ResidualStream, name: str = "hidden_states") -> str:
    """Unsqueeze the L+1 hidden states and Concat them into ``name`` [L+1, batch, seq, d] (not an output)."""
    namer = Namer(model)
    if name in namer.taken:
        raise SurgeryError(f"the graph already has a tensor named {name!r}")
    namer.taken.add(name)
    axes = _const_i64(model, namer, "axes0", [0])
    parts = []
    for i, t in enumerate(stream.hidden_states):
        u = namer(f"hidden_state_{i}")
        model.graph.node.append(_node(namer, "Unsqueeze", [t, axes], [u]))
        parts.append(u)
    model.graph.node.append(_node(namer, "Concat", parts, [name], axis=0))
    return name


def slice_last_position_logits(model: onnx.ModelProto, stream: ResidualStream) -> None:
    """Compute the lm_head on the last position only: logits become [batch, 1, vocab].

    Hidden state L keeps every position (the stacked tensor reads ``stream.final_norm``).
    """
    ix = GraphIndex(model)
    lm = _lm_node(model, stream)
    if lm.op_type != "MatMul":
        raise SurgeryError(f"the lm_head is a {lm.op_type} (2-D); last-position slicing needs a 3-D MatMul: "
                           "use --all-logits")
    t = lm.output[0]
    while t != stream.logits:
        nxt = [n for n in ix.consumers.get(t, []) if n.op_type in ("Identity", "Cast")]
        if len(nxt) != 1:
            raise SurgeryError("the lm_head output is reshaped before it becomes the logits output; last-position "
                               "slicing is not safe here: use --all-logits")
        t = nxt[0].output[0]
    namer = Namer(model)
    starts = _const_i64(model, namer, "last_start", [-1])
    ends = _const_i64(model, namer, "last_end", [INT64_MAX])
    axes = _const_i64(model, namer, "axis1", [1])
    sliced = namer("last_position_hidden")
    node = _node(namer, "Slice", [lm.input[0], starts, ends, axes], [sliced])
    lm.input[0] = sliced
    nodes = list(model.graph.node)
    k = nodes.index(lm)
    model.graph.node.insert(k, node)
    for o in model.graph.output:
        if o.name == stream.logits and o.type.tensor_type.HasField("shape"):
            dims = o.type.tensor_type.shape.dim
            if len(dims) == 3:
                dims[1].Clear()
                dims[1].dim_value = 1


def probe_attention_mask(model: onnx.ModelProto, stream: ResidualStream) -> str:
    """attention_mask[:, -T:] with T = input_ids.shape[1]: the current step's tokens.

    In prefill (no past) this is the whole mask; in a decode step it is the new token's column,
    so the probe subgraph stays shape-valid with a KV cache.
    """
    namer = Namer(model)
    shape, t, neg, out = namer("ids_shape"), namer("seq_len"), namer("neg_seq_len"), namer("probe_attention_mask")
    idx = _const_i64(model, namer, "index1", [1])
    ends = _const_i64(model, namer, "mask_end", [INT64_MAX])
    axes = _const_i64(model, namer, "mask_axis1", [1])
    model.graph.node.extend([
        _node(namer, "Shape", [stream.input_ids], [shape]),
        _node(namer, "Gather", [shape, idx], [t], axis=0),
        _node(namer, "Neg", [t], [neg]),
        _node(namer, "Slice", [stream.attention_mask, neg, ends, axes], [out]),
    ])
    return out


def last_position_logits(model: onnx.ModelProto, stream: ResidualStream) -> str:
    """logits[:, -1, :] as [batch, vocab] (Slice + Squeeze, no negative Gather indices)."""
    namer = Namer(model)
    starts = _const_i64(model, namer, "last_start", [-1])
    ends = _const_i64(model, namer, "last_end", [INT64_MAX])
    axes = _const_i64(model, namer, "axis1", [1])
    sliced, out = namer("last_logits_3d"), namer("last_logits")
    model.graph.node.extend([_node(namer, "Slice", [stream.logits, starts, ends, axes], [sliced]),
                             _node(namer, "Squeeze", [sliced, axes], [out])])
    return out


def fuse_probe(model: onnx.ModelProto, probe: onnx.ModelProto, name: str, feeds: dict[str, str]) -> list[str]:
    """Add a probe graph to ``model`` under the prefix ``name/``; ``feeds`` maps each probe input to a
    tensor of the host graph. The probe's outputs become graph outputs ``name/<output>``."""
    host_opset, probe_opset = opset_of(model), opset_of(probe)
    if host_opset != probe_opset:
        raise SurgeryError(f"probe {name!r} is opset {probe_opset} but the decoder graph is opset {host_opset}")
    probe_inputs = [i.name for i in probe.graph.input if i.name not in {t.name for t in probe.graph.initializer}]
    if set(probe_inputs) != set(feeds):
        raise SurgeryError(f"probe {name!r} takes inputs {probe_inputs}, fed {sorted(feeds)}")
    pre = onnx.compose.add_prefix(probe, f"{name}/")
    taken = GraphIndex(model).names() | {o.name for o in model.graph.output}
    mine = GraphIndex(pre).names() | {o.name for o in pre.graph.output}
    clash = sorted((mine - {f"{name}/{i}" for i in probe_inputs}) & taken)
    if clash:
        raise SurgeryError(f"probe name {name!r} collides with graph tensors {clash[:3]}")
    ix = GraphIndex(model)
    for src in feeds.values():
        if src not in ix.producer and src not in ix.inputs:
            raise SurgeryError(f"probe {name!r} input tensor {src!r} is not in the graph")
    namer = Namer(model)
    float_inputs = {i.name for i in probe.graph.input if i.type.tensor_type.elem_type == TensorProto.FLOAT}
    for pin, src in feeds.items():
        # An explicit fp32 Cast at the probe boundary (a no-op in an fp32 graph): in a reduced-precision
        # TensorRT engine it is where the probe subgraph returns to fp32.
        if pin in float_inputs:
            model.graph.node.append(_node(namer, "Cast", [src], [f"{name}/{pin}"], to=TensorProto.FLOAT))
        else:
            model.graph.node.append(_node(namer, "Identity", [src], [f"{name}/{pin}"]))
    model.graph.node.extend(pre.graph.node)
    model.graph.initializer.extend(pre.graph.initializer)
    model.graph.value_info.extend(pre.graph.value_info)
    model.functions.extend(pre.functions)
    have = {(o.domain or "") for o in model.opset_import}
    for o in pre.opset_import:
        if (o.domain or "") not in have:
            model.opset_import.append(o)
    model.graph.output.extend(pre.graph.output)
    return [o.name for o in pre.graph.output]


def name_nodes(model: onnx.ModelProto) -> int:
    """Give every unnamed (or duplicate-named) node a unique name: TensorRT layer names, fp32
    pinning and reports need them. -> number of nodes renamed."""
    taken = {n.name for n in model.graph.node if n.name}
    seen, k, renamed = set(), 0, 0
    for n in model.graph.node:
        if not n.name or n.name in seen:
            while f"node_{k}_{n.op_type}" in taken:
                k += 1
            n.name = f"node_{k}_{n.op_type}"
            taken.add(n.name)
            renamed += 1
        seen.add(n.name)
    return renamed


NORM_OPS = {"Pow", "ReduceMean", "Add", "Sqrt", "Reciprocal", "Div", "Mul", "Cast", "Identity",
            "RMSNormalization", "SimplifiedLayerNormalization", "LayerNormalization"}


def normalisation_nodes(model: onnx.ModelProto, stream: ResidualStream) -> list[str]:
    """Names of the nodes computing the RMS norms that read the residual stream (each layer's two
    input norms and the final norm): elementwise/reduce chains from a residual tensor that stop at
    the next MatMul, residual Add or stacking op. These stay fp32 in reduced-precision engines."""
    ix = GraphIndex(model)
    residual_adds = {ix.producer[r].name for r in stream.residuals if r in ix.producer}
    out, seen = [], set()
    for x in [stream.embedding] + stream.residuals:
        queue = deque([x])
        while queue:
            t = queue.popleft()
            for n in ix.consumers.get(t, []):
                if n.op_type not in NORM_OPS or n.name in residual_adds or n.name in seen:
                    continue
                if n.name.startswith(PREFIX) or any(o in stream.hidden_states[1:-1] for o in n.output):
                    continue
                seen.add(n.name)
                out.append(n.name)
                queue.extend(o for o in n.output if o)
    return out


def add_output(model: onnx.ModelProto, name: str, elem_type: int = TensorProto.FLOAT, dims=None) -> None:
    """Expose a tensor as a graph output (``dims`` None: rank unknown, fine for ONNX Runtime)."""
    if any(o.name == name for o in model.graph.output):
        return
    model.graph.output.append(helper.make_tensor_value_info(name, elem_type, dims))


def drop_output(model: onnx.ModelProto, name: str) -> None:
    """Remove a graph output (the tensor stays computed if something else consumes it)."""
    keep = [o for o in model.graph.output if o.name != name]
    if len(keep) == len(model.graph.output):
        raise SurgeryError(f"the graph has no output named {name!r}")
    del model.graph.output[:]
    model.graph.output.extend(keep)


def _subgraph_inputs(node: onnx.NodeProto) -> set[str]:
    """Outer-scope tensors read by the subgraphs (If/Loop/Scan bodies) of a node."""
    out = set()
    for a in node.attribute:
        for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
            inner = {i.name for i in g.input} | {t.name for t in g.initializer}
            for n in g.node:
                inner.update(n.output)
            for n in g.node:
                out.update(i for i in n.input if i and i not in inner)
                out.update(i for i in _subgraph_inputs(n) if i not in inner)
    return out


def toposort(model: onnx.ModelProto) -> None:
    """Reorder nodes topologically (Kahn; stable for an already sorted graph)."""
    g = model.graph
    nodes = list(g.node)
    ready = {i.name for i in g.input} | {t.name for t in g.initializer} | {""}
    producers = {o: k for k, n in enumerate(nodes) for o in n.output if o}
    needs = []
    users: dict[int, list[int]] = {}
    for k, n in enumerate(nodes):
        deps = {producers[i] for i in set(n.input) | _subgraph_inputs(n) if i not in ready and i in producers}
        missing = [i for i in set(n.input) if i not in ready and i not in producers]
        if missing:
            raise SurgeryError(f"node {n.name or n.op_type} reads tensors nothing produces: {missing[:3]}")
        needs.append(len(deps))
        for dpt in deps:
            users.setdefault(dpt, []).append(k)
    import heapq

    heap = [k for k, c in enumerate(needs) if c == 0]
    heapq.heapify(heap)
    order = []
    while heap:
        k = heapq.heappop(heap)
        order.append(nodes[k])
        for u in users.get(k, []):
            needs[u] -= 1
            if needs[u] == 0:
                heapq.heappush(heap, u)
    if len(order) != len(nodes):
        raise SurgeryError("the graph has a cycle after surgery")
    del g.node[:]
    g.node.extend(order)


def remove_unused_initializers(model: onnx.ModelProto) -> int:
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    keep = [t for t in model.graph.initializer if t.name in used]
    dropped = len(model.graph.initializer) - len(keep)
    if dropped:
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
    return dropped
