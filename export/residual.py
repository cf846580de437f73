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

ONNX Runtime's fused CPU ops (the graphs of onnxruntime-genai's model builder and of ORT's
transformer optimizer) are matched by the same rules, each a named function below:

* a residual step may be a ``com.microsoft`` ``SkipLayerNormalization`` /
  ``SkipSimplifiedLayerNormalization`` (input, skip[, gamma, bias]) whose ``input`` or ``skip`` is
  x_k and whose other operand depends on x_k: x_{k+1} is its output 3 ``input_skip_bias_sum``
  (``_skip_norm_step``). Where the node does not expose that output (the builder's final norm fuses
  the last residual add), ``_skip_norm_sum`` adds it: a legal optional output, under a
  ``singlepass/`` name. Its output 0 (the norm of x_{k+1}) may then be the final norm;
* the embedding may be a ``Gather`` of a transposed ``[d, V]`` matrix (a tied lm_head weight) or a
  ``com.microsoft`` ``GatherBlockQuantized`` of a block-quantised table (``_embedding_table``);
* the lm_head may be a ``com.microsoft`` ``MatMulNBits`` (block-quantised weight, attributes
  ``K`` = d and ``N`` = vocab) (``_lm_head_dims``);
* attention and MLP branches are looked through whatever they hold (``GroupQueryAttention``,
  ``RotaryEmbedding``, ``MatMulNBits``, ...): they only need to depend on x_k.

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
SHAPE_ONLY = {"Identity", "Slice", "Gather", "GatherND", "Reshape", "Squeeze", "Unsqueeze", "Flatten"}
SCALAR_OPS = {"Mul", "Div", "Add", "Sub"}  # element-wise with a constant scalar: embedding scale, soft-capping
SKIP_NORM_OPS = {"SkipLayerNormalization", "SkipSimplifiedLayerNormalization"}  # ORT: norm(input + skip [+ bias])
SKIP_SUM_OUTPUT = 3  # a Skip*Normalization's optional output ``input_skip_bias_sum``: the residual sum
UNARY_OPS = {"Tanh", "Identity", "Cast"}  # element-wise, one input: soft-capping's tanh
MIN_OPSET = 13
# ops that cannot sit between the last residual add and the lm_head (only the final norm may)
NOT_A_NORM = {
    "MatMul",
    "Gemm",
    "Conv",
    "Einsum",
    "Attention",
    "MatMulNBits",
    "GroupQueryAttention",
    "MultiHeadAttention",
}


class SurgeryError(SinglepassError):
    """The graph does not have the structure a transform needs."""


# ----------------------------------------------------------------------------- navigation


def producer(t: gs.Tensor) -> gs.Node | None:
    """The node computing ``t`` (None for graph inputs and initializers)."""
    return t.inputs[0] if t.inputs else None


ONNX_DOMAINS = (None, "", "ai.onnx")


def produced_by(t: gs.Tensor, op: str, domains: tuple = ONNX_DOMAINS) -> gs.Node | None:
    """The one node computing ``t`` if it is an ``op`` of one of ``domains`` (default: ONNX's), else None."""
    node = producer(t)
    return node if node is not None and node.op == op and node.domain in domains else None


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
    residuals: list[str]  # the 2L residual sums (Add outputs, Skip*Normalization output 3), in order
    final_norm: str  # hidden state L: the final-norm output, before any last-position slice
    lm_head: str  # name of the node computing the logits
    logits: str  # graph output name
    vocab_size: int
    hidden_size: int
    past: list[str] = field(default_factory=list)  # past key/value inputs in layer order, key before value
    present: list[str] = field(default_factory=list)
    # export/kvcache.py converted the attention: rows are prefixes of the mask (right padding), a
    # pass's tokens are attention_mask[:, :T] (not [:, -T:]) and a row's last token is at sum - 1
    inplace_kv: bool = False
    fused: dict = field(default_factory=dict)  # export/ortfuse.py's rewrites that applied -> count

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


def _matmul_dims(node: gs.Node) -> tuple[int, int] | None:
    """A MatMul / Gemm by a weight matrix -> (vocab, d): the matrix's output and input widths."""
    if node.op not in ("MatMul", "Gemm") or len(node.inputs) < 2:
        return None
    w = weight_shape(node.inputs[1])
    if w is None or len(w[0]) != 2:
        return None
    dims, transposed, _ = w
    if node.op == "Gemm" and node.attrs.get("transB", 0) == 1:
        transposed = not transposed
    d, vocab = (dims[1], dims[0]) if transposed else (dims[0], dims[1])
    return vocab, d


def _matmul_nbits_dims(node: gs.Node) -> tuple[int, int] | None:
    """ONNX Runtime's block-quantised ``MatMulNBits`` (constant packed weight) -> (vocab, d) = (N, K)."""
    if node.op != "MatMulNBits" or len(node.inputs) < 3 or _weight(node.inputs[1]) is None:
        return None
    k, n = node.attrs.get("K"), node.attrs.get("N")
    return (int(n), int(k)) if k and n else None


def _lm_head_dims(node: gs.Node) -> tuple[int, int] | None:
    """(vocab, d) if ``node`` multiplies its input by a constant weight matrix: a plain MatMul / Gemm
    or ONNX Runtime's MatMulNBits; None otherwise."""
    return _matmul_dims(node) or _matmul_nbits_dims(node)


def _find_lm_head(graph: gs.Graph, logits_name: str | None) -> tuple[gs.Node, str, int, int]:
    """-> (lm_head node, logits output name, vocab size, hidden size)."""
    found = []
    outs = [o for o in graph.outputs if logits_name is None or o.name == logits_name]
    for out in outs:
        node = producer(_before_logit_tail(out))
        dims = _lm_head_dims(node) if node is not None else None
        if dims is not None:
            found.append((node, out.name, *dims))
    if not found:
        raise SurgeryError(
            "no graph output is produced by a MatMul/Gemm/MatMulNBits with a weight matrix (the lm_head): "
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


def _gather_table(node: gs.Node, d: int) -> tuple[int, int] | None:
    """A Gather of rows of a constant [rows, d] table, or of a Transpose of a [d, rows] matrix (a tied
    lm_head weight) -> (rows, table dtype)."""
    if node.op != "Gather" or len(node.inputs) < 2 or node.attrs.get("axis", 0) != 0:
        return None
    w = weight_shape(node.inputs[0])
    if w is None or len(w[0]) != 2:
        return None
    rows, cols = reversed(w[0]) if w[1] else w[0]
    return (rows, w[2]) if cols == d else None


def _block_quantized_table(node: gs.Node, d: int) -> tuple[int, int] | None:
    """ONNX Runtime's ``GatherBlockQuantized`` (data, indices, scales[, zero_points]) of rows of a table
    quantised in blocks along its width -> (rows, dtype of the gathered rows = the scales' dtype).
    The packed data may be reshaped; the constant scales [rows, ceil(d / block_size)] give the shape."""
    if node.op != "GatherBlockQuantized" or len(node.inputs) < 3:
        return None
    if node.attrs.get("gather_axis", 0) != 0 or node.attrs.get("quantize_axis", 1) not in (1, -1):
        return None
    scales = _weight(node.inputs[2])
    block = int(node.attrs.get("block_size", 128))
    if scales is None or len(scales.shape) != 2 or scales.shape[1] != -(-d // block):
        return None
    return scales.shape[0], onnx_dtype(scales.dtype)


def _embedding_table(node: gs.Node, d: int) -> tuple[int, int] | None:
    """(rows, dtype of the rows) if ``node`` looks up rows of width ``d`` of a constant table by its
    second input (the token ids): a plain Gather or ONNX Runtime's GatherBlockQuantized."""
    return _gather_table(node, d) or _block_quantized_table(node, d)


def _find_embedding(graph: gs.Graph, vocab: int, d: int) -> tuple[gs.Tensor, gs.Tensor, int]:
    """-> (input_ids graph input, embedding output tensor, dtype of the embedding output)."""
    inputs = {i.name for i in graph.inputs}
    hits = []
    for node in graph.nodes:
        table = _embedding_table(node, d)
        if table is None:
            continue
        src, hops = node.inputs[1], 0
        while producer(src) is not None and producer(src).op in PASS_THROUGH and hops < 4:
            src, hops = producer(src).inputs[0], hops + 1
        if src.name in inputs and _is_int(src):
            hits.append((table[0] == vocab, src, node.outputs[0], table[1]))
    if not hits:
        raise SurgeryError(
            f"no token-embedding Gather (a [vocab, {d}] table, plain or GatherBlockQuantized, indexed by an "
            "integer graph input) feeds the residual stream"
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


def _computed_from(x: gs.Tensor) -> list[gs.Tensor]:
    """x, and where x is a Skip*Normalization's residual sum (output 3), the node's output 0: the
    norm of x, a sibling output that the graph computes from the node's inputs, not from x."""
    p = producer(x)
    if p is not None and p.op in SKIP_NORM_OPS and x is not p.outputs[0] and p.outputs[0].name:
        return [x, p.outputs[0]]
    return [x]


def _branch_of(operands: list[gs.Tensor], a: gs.Tensor, al: dict[str, gs.Tensor], x: gs.Tensor) -> bool:
    """Whether ``operands`` are the stream tensor ``a`` (an alias of ``x``) and a branch f(x): one
    other operand that is no alias of x and depends on x (or on the norm a fused node computes with it)."""
    if len(operands) != 2 or a.name not in (operands[0].name, operands[1].name):
        return False
    other = operands[1] if operands[0].name == a.name else operands[0]
    return other.name not in al and any(depends_on(other, s) for s in _computed_from(x))


def _add_step(n: gs.Node, a: gs.Tensor, al: dict[str, gs.Tensor], x: gs.Tensor) -> bool:
    """A residual ``Add(x, f(x))``."""
    return n.op == "Add" and len(n.inputs) == 2 and _branch_of(list(n.inputs), a, al, x)


def _skip_norm_step(n: gs.Node, a: gs.Tensor, al: dict[str, gs.Tensor], x: gs.Tensor) -> bool:
    """ONNX Runtime's fused residual add + norm: ``Skip[Simplified]LayerNormalization(x, f(x), gamma
    [, beta][, bias])`` (or with ``input`` and ``skip`` swapped); its output 3 is the residual sum."""
    return n.op in SKIP_NORM_OPS and len(n.inputs) >= 3 and _branch_of(list(n.inputs[:2]), a, al, x)


def _residual_step(n: gs.Node, a: gs.Tensor, al: dict[str, gs.Tensor], x: gs.Tensor) -> bool:
    """Whether ``n`` (a consumer of ``a``, an alias of the stream tensor ``x``) is a residual step."""
    return _add_step(n, a, al, x) or _skip_norm_step(n, a, al, x)


def _skip_norm_sum(graph: gs.Graph, node: gs.Node, dtype: int) -> gs.Tensor:
    """A Skip*Normalization's residual sum, output 3 ``input_skip_bias_sum``; added to the node (an
    optional output, legal) under a fresh ``singlepass/`` name when the graph does not expose it."""
    if len(node.outputs) > SKIP_SUM_OUTPUT and node.outputs[SKIP_SUM_OUTPUT].name:
        return node.outputs[SKIP_SUM_OUTPUT]
    taken = set(graph.tensors())
    base = f"singlepass/{(node.name or node.outputs[0].name).lstrip('/')}/input_skip_bias_sum"
    name, k = base, 1
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    out = gs.Variable(name, dtype=helper.tensor_dtype_to_np_dtype(dtype), shape=node.outputs[0].shape)
    outputs = list(node.outputs[:SKIP_SUM_OUTPUT])
    outputs += [gs.Variable.empty() for _ in range(SKIP_SUM_OUTPUT - len(outputs))]
    node.outputs = outputs + [out]
    return out


def _residual_sum(graph: gs.Graph, node: gs.Node, dtype: int) -> gs.Tensor:
    """x_{k+1}: the residual step's sum (an Add's output, a Skip*Normalization's output 3)."""
    return _skip_norm_sum(graph, node, dtype) if node.op in SKIP_NORM_OPS else node.outputs[0]


def _residual_adds(graph: gs.Graph, x: gs.Tensor, dtype: int) -> list[gs.Tensor]:
    """Walk the stream from the embedding: each step is the one residual step consuming x (an
    ``Add(x, f(x))`` or a fused Skip*Normalization) with f depending on x."""
    residuals = []
    while True:
        al = _aliases(x, dtype)
        cands = {}
        for a in al.values():
            for n in a.outputs:
                if id(n) not in cands and _residual_step(n, a, al, x):
                    cands[id(n)] = n
        if not cands:
            return residuals
        if len(cands) > 1:
            ops = sorted({n.op for n in cands.values()})
            raise SurgeryError(
                f"residual stream is ambiguous after {len(residuals)} residual adds "
                f"({len(cands)} candidate {'/'.join(ops)} nodes consume {x.name!r})"
            )
        x = _residual_sum(graph, next(iter(cands.values())), dtype)
        residuals.append(x)


def _norms_last_residual(final: gs.Tensor, last: gs.Tensor) -> bool:
    """Whether the final norm ``final`` reads the last residual sum ``last``: it is computed from it,
    or it is output 0 (the norm) of the Skip*Normalization whose output 3 is that sum."""
    p = producer(final)
    if p is not None and p.op in SKIP_NORM_OPS and p is producer(last) and p.outputs[0] is final:
        return True
    return depends_on(final, last)


# ----------------------------------------------------------------------------- the stream's own norms

RMS_NORM_OPS = {"RMSNormalization", "SimplifiedLayerNormalization"}  # ONNX opset 23's; ORT's (ai.onnx or contrib)
# The largest norm epsilon a probe reads a decoder's normalisation with (its own is 1e-6): eps only
# matters against a token's mean square, SmolLM2's smallest (hidden state 0's) ~7e-3, where 1e-5
# scales a token by 0.06%.
MAX_NORM_EPS = 1e-5


@dataclass
class StreamNorm:
    """A hidden state as the decoder RMS-normalises it: ``tensor`` = x / sqrt(mean(x^2) + eps) * gain."""

    tensor: str
    gain: np.ndarray  # [d] float32, every element finite and non-zero
    eps: float


def _norm_gain(t: gs.Tensor, d: int) -> np.ndarray | None:
    """A norm's scale input as a usable gain [d] float32: constant, 1-D of width d, finite, no zero
    (None too when its values cannot be read: a model loaded without its external data)."""
    w = _weight(t)
    if w is None or list(w.shape) != [d]:
        return None
    try:
        g = np.asarray(w.values, dtype=np.float32)
    except Exception:  # onnx's ValidationError / OSError for external data that was not loaded
        return None
    return g if np.isfinite(g).all() and (np.abs(g) > 0).all() else None


def _last_axis(node: gs.Node, x: gs.Tensor) -> bool:
    axis = int(node.attrs.get("axis", -1))
    return axis == -1 or (x.shape is not None and axis == len(x.shape) - 1)


def rms_norm_of(x: gs.Tensor, d: int, top: set[int] | None = None) -> StreamNorm | None:
    """The decoder's own RMS normalisation of the stream tensor ``x`` [B, T, d], if the graph has one:
    output 0 of the ``Skip*SimplifiedLayerNormalization`` whose output 3 is x, or of an
    ``RMSNormalization`` / ``SimplifiedLayerNormalization`` over x's last axis, with a constant gain
    and eps <= ``MAX_NORM_EPS`` (an absolute bound, fit for decoders whose tokens' mean square is far
    above it, as SmolLM2's). None for anything else (a norm decomposed into elementary ops included):
    the probe then reads x and normalises it itself. ``top``: ids of the graph's own nodes; a consumer
    elsewhere (inside an If's branch: a fused probe's) is not the decoder's norm."""
    p = producer(x)
    if (
        p is not None
        and p.op == "SkipSimplifiedLayerNormalization"
        and len(p.outputs) > SKIP_SUM_OUTPUT
        and p.outputs[SKIP_SUM_OUTPUT] is x
        and len(p.inputs) >= 3
    ):
        cands = [(p, p.inputs[2], float(p.attrs.get("epsilon", 1e-12)))]
    else:
        cands = [
            (n, n.inputs[1], float(n.attrs.get("epsilon", 1e-5)))
            for n in x.outputs
            if n.op in RMS_NORM_OPS
            and (top is None or id(n) in top)
            and len(n.inputs) >= 2
            and n.inputs[0] is x
            and _last_axis(n, x)
        ]
    for node, scale, eps in cands:
        gain = _norm_gain(scale, d)
        if gain is not None and eps <= MAX_NORM_EPS and node.outputs and node.outputs[0].name:
            return StreamNorm(node.outputs[0].name, gain, eps)
    return None


def stream_norms(graph: gs.Graph, stream: ResidualStream) -> list[StreamNorm | None]:
    """``rms_norm_of`` each hidden state (``stream.hidden_states``): in a pre-norm decoder, hidden
    states 0 .. L-1 are each the input of the next layer's first norm; hidden state L is the final
    norm's output, which the decoder does not normalise again (None; a fused probe's own norm of it
    is not the decoder's)."""
    tensors, top = graph.tensors(), set(map(id, graph.nodes))
    return [rms_norm_of(tensors[name], stream.hidden_size, top) for name in stream.hidden_states[:-1]] + [None]


def find_residual_stream(
    graph: gs.Graph, expected_layers: int | None = None, logits_name: str | None = None
) -> ResidualStream:
    """Locate embedding, residual adds, final norm and lm_head by structure. Raises SurgeryError.

    Edits the graph in one case only: a residual sum fused into a Skip*Normalization that does not
    expose it gets its output 3 (``_skip_norm_sum``), so every residual sum is a tensor.

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
            f"the token embedding is {TensorProto.DataType.Name(dtype)}, not FLOAT: export the "
            "decoder in fp32 (reduced precision is applied at engine build time)"
        )
    residuals = _residual_adds(graph, emb, dtype)
    if len(residuals) < 2 or len(residuals) % 2:
        raise SurgeryError(
            f"found {len(residuals)} residual adds (Add or Skip*Normalization nodes) after the embedding; a decoder "
            "has two per layer (attention and MLP): the graph is not a recognised pre-norm decoder"
        )
    # Hidden state L is the lm_head input before any last-position slice or flattening.
    final, last = lm_head.inputs[0], residuals[-1]
    while producer(final) is not None and producer(final).op in SHAPE_ONLY:
        final = producer(final).inputs[0]
    if not _norms_last_residual(final, last):
        raise SurgeryError("the lm_head input does not depend on the last residual add: unrecognised decoder")
    between = ops_between(final, last)
    if between & NOT_A_NORM:
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
