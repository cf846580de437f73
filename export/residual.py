"""Find a pre-norm decoder's residual stream in an ONNX graph by its structure (onnx-graphsurgeon).

It works on graphs singlepass did not export: the stream is found from the graph's
*structure*, never from one exporter's node names. The decoder signature searched for:

    input_ids --Gather(embedding table)--> [* scale] --> x0                 (hidden state 0)
    x_{k+1} = Add(x_k, f(x_k))   for k = 0 .. 2L-1                         (two residual adds per layer)
    x_{2L} --final norm--> n --MatMul|Gemm(lm_head)--> [soft-cap] --> logits (hidden state L = n)

so hidden state i (1 <= i < L) is x_{2i}, exactly transformers' ``output_hidden_states``
(the last entry is the final-norm output). ``f(x_k)`` must depend on ``x_k`` (attention or
MLP branch, whatever it holds: biases, q/k norms, fused projections, Gemma's post-norms before
the add); Casts to the same type and Identities on the stream are looked through. The
architectures differ at the two ends, and both are matched by structure too:

* the stream may start at a multiplication of the embedding by a constant scalar (Gemma:
  ``embedding * sqrt(d)``), the one consumer of the Gather; hidden state 0 is then the product;
* the lm_head output may pass through element-wise ops with constant scalars and unary ops
  (Gemma 2's final-logit soft-capping ``tanh(logits / c) * c``) before it is the logits output.

Navigation is gs's: ``tensor.inputs`` are its producer, ``tensor.outputs`` its consumers;
weights are read for their shape and dtype only (gs loads values lazily, these never do).
The transforms that use the stream are in ``export/surgery.py``.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper

from singlepass.errors import SinglepassError

PASS_THROUGH = {"Identity", "Cast"}  # ops that leave the residual value unchanged (same-type Cast)
SHAPE_ONLY = {"Identity", "Slice", "Gather", "Reshape", "Squeeze", "Unsqueeze", "Flatten"}
SCALAR_OPS = {"Mul", "Div", "Add", "Sub"}  # element-wise with a constant scalar: embedding scale, soft-capping
UNARY_OPS = {"Tanh", "Identity", "Cast"}  # element-wise, one input: soft-capping's tanh
MIN_OPSET = 13


class SurgeryError(SinglepassError):
    """The graph does not have the structure a transform needs."""


# ----------------------------------------------------------------------------- navigation


def producer(t: gs.Tensor) -> gs.Node | None:
    """The node computing ``t`` (None for graph inputs and initializers)."""
    return t.inputs[0] if t.inputs else None


def is_constant(t: gs.Tensor) -> bool:
    """An initializer or a Constant node's output: known when the graph is built."""
    p = producer(t)
    return isinstance(t, gs.Constant) or (p is not None and p.op == "Constant")


def opset_of(graph: gs.Graph) -> int:
    """The default-domain (ai.onnx) opset the graph imports."""
    if not any(d.domain in ("", "ai.onnx") for d in graph.import_domains or []):
        raise SurgeryError("the graph imports no default-domain opset: not a standard ONNX model")
    return int(graph.opset)


def onnx_dtype(dtype) -> int | None:
    """gs dtype (numpy dtype, or an ONNX enum for types numpy lacks) -> ONNX elem type."""
    if dtype is None:
        return None
    return dtype if isinstance(dtype, int) else helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def _weight(t: gs.Tensor) -> gs.Constant | None:
    """The Constant behind a weight: an initializer or a Constant node's ``value``."""
    p = producer(t)
    if isinstance(t, gs.Constant):
        return t
    if p is not None and p.op == "Constant" and isinstance(p.attrs.get("value"), gs.Constant):
        return p.attrs["value"]
    return None


def weight_shape(t: gs.Tensor) -> tuple[list[int], bool, int] | None:
    """A weight's (dims, transposed, ONNX dtype), possibly through one Transpose; the values stay unread."""
    w = _weight(t)
    if w is not None:
        return list(w.shape), False, onnx_dtype(w.dtype)
    p = producer(t)
    if p is not None and p.op == "Transpose":
        inner = weight_shape(p.inputs[0])
        if inner is not None and len(inner[0]) == 2:
            return inner[0], not inner[1], inner[2]
    return None


def scalar_constant(t: gs.Tensor) -> bool:
    """A constant with one element (a scalar or [1]), possibly through Casts / Identities."""
    hops = 0
    while producer(t) is not None and producer(t).op in PASS_THROUGH and hops < 4:
        t, hops = producer(t).inputs[0], hops + 1
    w = _weight(t)
    return w is not None and int(np.prod(w.shape, dtype=np.int64)) == 1


def scalar_step(node: gs.Node, t: gs.Tensor) -> bool:
    """Whether ``node`` maps ``t`` element-wise to its output without mixing in anything else:
    a unary op, or a Mul/Div/Add/Sub of ``t`` with a constant scalar."""
    if node.op in UNARY_OPS:
        return len(node.inputs) == 1 and node.inputs[0].name == t.name
    if node.op not in SCALAR_OPS or len(node.inputs) != 2:
        return False
    others = [i for i in node.inputs if i.name != t.name]
    return len(others) == 1 and scalar_constant(others[0])


def depends_on(t: gs.Tensor, target: gs.Tensor) -> bool:
    """Whether ``target`` is an ancestor of ``t`` (backward breadth-first search)."""
    seen, queue = {t.name}, deque([t])
    while queue:
        x = queue.popleft()
        if x.name == target.name:
            return True
        for i in producer(x).inputs if producer(x) is not None else []:
            if i.name and i.name not in seen:
                seen.add(i.name)
                queue.append(i)
    return False


def ops_between(t: gs.Tensor, stop: gs.Tensor) -> set[str]:
    """Op types of the nodes on paths from ``stop`` down to ``t`` (descendants of ``stop`` that
    are ancestors of ``t``)."""
    below, queue = {stop.name}, deque([stop])
    while queue:
        for n in queue.popleft().outputs:
            for o in n.outputs:
                if o.name and o.name not in below:
                    below.add(o.name)
                    queue.append(o)
    if t.name not in below:
        return set()
    ops, seen, queue = set(), {t.name}, deque([t])
    while queue:
        x = queue.popleft()
        node = producer(x)
        if x.name == stop.name or node is None:
            continue
        ops.add(node.op)
        for i in node.inputs:
            if i.name in below and i.name not in seen:
                seen.add(i.name)
                queue.append(i)
    return ops


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


def _is_int(t: gs.Tensor) -> bool:
    return onnx_dtype(t.dtype) in (TensorProto.INT64, TensorProto.INT32)


def _kv_order(name: str) -> tuple:
    nums = [int(x) for x in re.findall(r"\d+", name)]
    kind = 0 if "key" in name.lower() or name.lower().endswith(".k") else 1
    return (nums[-1] if nums else 0, kind, name)


def _before_logit_tail(t: gs.Tensor, limit: int = 8) -> gs.Tensor:
    """Walk back from the logits output through shape-only ops and element-wise ops with constant
    scalars (Casts, Gemma 2's soft-cap ``tanh(x / c) * c``) to the tensor the lm_head computes."""
    for _ in range(limit):
        p = producer(t)
        if p is None or not p.inputs:
            return t
        if p.op in SHAPE_ONLY:
            t = p.inputs[0]
            continue
        src = next((i for i in p.inputs if scalar_step(p, i)), None)
        if src is None:
            return t
        t = src
    return t


def _find_lm_head(graph: gs.Graph, logits_name: str | None) -> tuple[gs.Node, str, int, int]:
    """-> (lm_head node, logits output name, vocab size, hidden size)."""
    found = []
    outs = [o for o in graph.outputs if logits_name is None or o.name == logits_name]
    for out in outs:
        node = producer(_before_logit_tail(out))
        if node is None or node.op not in ("MatMul", "Gemm"):
            continue
        w = weight_shape(node.inputs[1])
        if w is None or len(w[0]) != 2:
            continue
        dims, transposed, _ = w
        if node.op == "Gemm" and node.attrs.get("transB", 0) == 1:
            transposed = not transposed
        d, vocab = (dims[1], dims[0]) if transposed else (dims[0], dims[1])
        found.append((node, out.name, vocab, d))
    if not found:
        raise SurgeryError(
            "no graph output is produced by a MatMul/Gemm with a weight matrix (the lm_head): "
            "not a causal-LM decoder graph"
        )
    if len(found) > 1:
        named = [f for f in found if f[1] == "logits"]
        if len(named) != 1:
            raise SurgeryError(
                f"several outputs look like logits ({', '.join(f[1] for f in found)}); "
                "name the token logits output 'logits'"
            )
        found = named
    return found[0]


def _find_embedding(graph: gs.Graph, vocab: int, d: int) -> tuple[gs.Tensor, gs.Tensor, int]:
    """-> (input_ids graph input, embedding output tensor, table dtype)."""
    inputs = {i.name for i in graph.inputs}
    hits = []
    for node in graph.nodes:
        if node.op != "Gather" or len(node.inputs) < 2:
            continue
        w = weight_shape(node.inputs[0])
        if w is None or len(w[0]) != 2 or w[1] or w[0][1] != d:
            continue
        src, hops = node.inputs[1], 0
        while producer(src) is not None and producer(src).op in PASS_THROUGH and hops < 4:
            src, hops = producer(src).inputs[0], hops + 1
        if src.name in inputs and _is_int(src):
            hits.append((w[0][0] == vocab, src, node.outputs[0], w[2]))
    if not hits:
        raise SurgeryError(
            f"no token-embedding Gather (a [vocab, {d}] table indexed by an integer graph input) "
            "feeds the residual stream"
        )
    hits.sort(key=lambda h: not h[0])
    return hits[0][1:]


def _stream_start(x: gs.Tensor) -> gs.Tensor:
    """Hidden state 0: the Gather output, or its scaled copy when the Gather's one consumer
    multiplies it by a constant scalar (Gemma's ``embedding * sqrt(d)``)."""
    for _ in range(4):
        if len(x.outputs) != 1 or x.outputs[0].op not in ("Mul", "Div") or not scalar_step(x.outputs[0], x):
            return x
        x = x.outputs[0].outputs[0]
    return x


def _aliases(x: gs.Tensor, dtype: int) -> dict[str, gs.Tensor]:
    """x plus tensors equal to it: Identity and same-type Cast chains."""
    out, queue = {x.name: x}, [x]
    while queue:
        for n in queue.pop().outputs:
            if n.op == "Identity" or (n.op == "Cast" and n.attrs.get("to") == dtype):
                if n.outputs[0].name not in out:
                    out[n.outputs[0].name] = n.outputs[0]
                    queue.append(n.outputs[0])
    return out


def _residual_adds(x: gs.Tensor, dtype: int) -> list[gs.Tensor]:
    """Walk the stream from the embedding: each step is the one Add(x, f(x)) with f depending on x."""
    residuals = []
    while True:
        al = _aliases(x, dtype)
        cands = {}
        for a in al.values():
            for n in a.outputs:
                if n.op != "Add" or len(n.inputs) != 2 or id(n) in cands:
                    continue
                other = n.inputs[1] if n.inputs[0].name == a.name else n.inputs[0]
                if other.name not in al and depends_on(other, x):
                    cands[id(n)] = n
        if not cands:
            return residuals
        if len(cands) > 1:
            raise SurgeryError(
                f"residual stream is ambiguous after {len(residuals)} residual adds "
                f"({len(cands)} candidate Add nodes consume {x.name!r})"
            )
        x = next(iter(cands.values())).outputs[0]
        residuals.append(x)


def find_residual_stream(
    graph: gs.Graph, expected_layers: int | None = None, logits_name: str | None = None
) -> ResidualStream:
    """Locate embedding, residual adds, final norm and lm_head by structure. Raises SurgeryError.

    ``logits_name`` pins the logits output (needed once probe heads add other Gemm outputs).
    """
    opset = opset_of(graph)
    if opset < MIN_OPSET:
        raise SurgeryError(f"opset {opset} is too old: re-export the decoder with opset >= {MIN_OPSET}")
    lm_head, logits, vocab, d = _find_lm_head(graph, logits_name)
    input_ids, emb, dtype = _find_embedding(graph, vocab, d)
    emb = _stream_start(emb)
    if dtype != TensorProto.FLOAT:
        raise SurgeryError(
            f"the embedding table is {TensorProto.DataType.Name(dtype)}, not FLOAT: export the "
            "decoder in fp32 (reduced precision is applied at engine build time)"
        )
    residuals = _residual_adds(emb, dtype)
    if len(residuals) < 2 or len(residuals) % 2:
        raise SurgeryError(
            f"found {len(residuals)} residual Add nodes after the embedding; a decoder has two per "
            "layer (attention and MLP): the graph is not a recognised pre-norm decoder"
        )
    # Hidden state L is the lm_head input before any last-position slice or flattening.
    final, last = lm_head.inputs[0], residuals[-1]
    while producer(final) is not None and producer(final).op in SHAPE_ONLY:
        final = producer(final).inputs[0]
    if not depends_on(final, last):
        raise SurgeryError("the lm_head input does not depend on the last residual add: unrecognised decoder")
    between = ops_between(final, last)
    if between & {"MatMul", "Gemm", "Conv", "Einsum", "Attention"}:
        raise SurgeryError(
            f"between the last residual add and the lm_head there are {sorted(between)} ops, "
            "not just a normalisation: unrecognised decoder"
        )
    ins, outs = graph.inputs, graph.outputs
    stream = ResidualStream(
        input_ids=input_ids.name,
        attention_mask=next((i.name for i in ins if "mask" in i.name.lower() and _is_int(i)), None),
        position_ids=next((i.name for i in ins if "position" in i.name.lower()), None),
        embedding=emb.name,
        residuals=[r.name for r in residuals],
        final_norm=final.name,
        lm_head=lm_head.name or lm_head.outputs[0].name,
        logits=logits,
        vocab_size=vocab,
        hidden_size=d,
        past=sorted((i.name for i in ins if "past" in i.name.lower()), key=_kv_order),
        present=sorted((o.name for o in outs if "present" in o.name.lower()), key=_kv_order),
    )
    if expected_layers is not None and stream.num_layers != expected_layers:
        raise SurgeryError(
            f"found {stream.num_layers} decoder layers in the graph but the model has "
            f"{expected_layers}: the graph does not belong to this model"
        )
    if stream.past and len(stream.past) != 2 * stream.num_layers:
        raise SurgeryError(f"{len(stream.past)} past key/value inputs for {stream.num_layers} layers")
    if stream.attention_mask is None:
        raise SurgeryError(
            "the graph has no integer attention-mask input (e.g. 'attention_mask'): padded batches "
            "and probe masking need one"
        )
    return stream
