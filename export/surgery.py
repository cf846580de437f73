"""Small, named graph transformations on a decoder graph, on onnx-graphsurgeon.

Every transform takes a ``gs.Graph`` (``gs.import_onnx(model)``) and the ``ResidualStream``
found in it (``export/residual.py``: by structure, so graphs from other exporters work too) and
edits the graph in place with explicit ``gs.Variable``s under stable ``singlepass/...`` names.
gs keeps imported weights lazily (``Constant`` over the original ``TensorProto``), so nothing
here copies a weight array; ``to_model`` exports with one copy of the weights. Each transform
is tested on a tiny generated graph (tests/test_surgery.py):

    find_residual_stream(graph)           -> ResidualStream (tensor names)
    add_stacked_hidden_states(graph, s)   -> name of the [L+1, B, T, d] tensor
    slice_last_position_logits(graph, s)  prefill computes the lm_head for the last position only
    probe_attention_mask(graph, s)        -> attention_mask[:, -T:] (valid in decode steps too)
    last_position_logits(graph, s)        -> logits[:, -1, :] as [B, V] (input of MULI probes)
    fuse_probe(graph, probe, name, feeds) merge a probe graph under the prefix ``name/``
    fuse_probe_nodes(graph, probe, name, sources)  the same, fed from a superset -> (nodes, outputs)
    branch(graph, head, cond, then, orelse, outputs)   an ``If`` between two computations of outputs
    prefill_only(graph, s, nodes, outputs) run those nodes only in passes of 2+ tokens (an ``If``)
    with_response_tokens(graph, s, nodes, outputs, carried)  a response probe's fold only where it folds something
    state_unchanged(graph, namer, batch, outs, carried, what)  a fold-free branch: state as it came, zero labels
    layer_stages(graph, s, per_layer, k)  a prompt probe's stage 1, an If per block of k layers
    stream_norms(graph, s)                the decoder's own RMS norm of each hidden state (probes read it)
    add_output(graph, name)               expose a tensor as a graph output
    to_model(graph, like)                 gs.export_onnx, one copy of the weights

Cleanup and ordering are gs's own: ``graph.cleanup().toposort()``.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper
from onnx_graphsurgeon.ir.tensor import LazyValues

from singlepass.export.residual import (  # noqa: F401
    ResidualStream,
    SurgeryError,
    find_residual_stream,
    is_constant,
    onnx_dtype,
    opset_of,
    producer,
    scalar_step,
    stream_norms,
)
from singlepass.runtime.contract import RESPONSE_MASK

INT64_MAX = np.iinfo(np.int64).max
PREFIX = "singlepass/"
STUB_BYTES = 1 << 16  # initializers above this are exported as stubs, then copied in once (to_model)


class Namer:
    """Fresh, stable tensor / node names (``singlepass/<base>[_k]``) that collide with nothing in the graph."""

    def __init__(self, graph: gs.Graph):
        self.taken: set[str] = set()
        self._take(graph)

    def _take(self, graph: gs.Graph) -> None:
        """Every tensor and node name, in subgraphs too (the branches of an If share one namespace)."""
        self.taken |= set(graph.tensors()) | {n.name for n in graph.nodes if n.name}
        for n in graph.nodes:
            for sub in n.attrs.values():
                if isinstance(sub, gs.Graph):
                    self._take(sub)

    def __call__(self, base: str) -> str:
        name, k = PREFIX + base, 1
        while name in self.taken:
            k += 1
            name = f"{PREFIX}{base}_{k}"
        self.taken.add(name)
        return name

    def i64(self, base: str, values) -> gs.Constant:
        return gs.Constant(self(base), np.asarray(values, dtype=np.int64))

    def node(self, op: str, inputs: list, outputs: list, **attrs) -> gs.Node:
        return gs.Node(op, name=self(op), attrs=attrs, inputs=inputs, outputs=outputs)


def _tensor(graph: gs.Graph, name: str, what: str = "tensor") -> gs.Tensor:
    t = graph.tensors().get(name)
    if t is None:
        raise SurgeryError(f"{what} {name!r} is not in the graph")
    return t


def _lm_node(graph: gs.Graph, stream: ResidualStream) -> gs.Node:
    for n in graph.nodes:
        if (n.name or n.outputs[0].name) == stream.lm_head:
            return n
    raise SurgeryError(f"lm_head node {stream.lm_head!r} vanished from the graph")


# ----------------------------------------------------------------------------- transforms


def add_stacked_hidden_states(graph: gs.Graph, stream: ResidualStream, name: str = "hidden_states") -> str:
    """Unsqueeze the L+1 hidden states and Concat them into ``name`` [L+1, batch, seq, d] (not an output).

    A copy of every hidden state, built only for the ``--keep-hidden-states`` debug output: fused probes
    read the layer tensors themselves (``export/fuse.py``)."""
    namer = Namer(graph)
    if name in namer.taken:
        raise SurgeryError(f"the graph already has a tensor named {name!r}")
    namer.taken.add(name)
    tensors = graph.tensors()
    axes = namer.i64("axes0", [0])
    parts = []
    for i, t in enumerate(stream.hidden_states):
        u = gs.Variable(namer(f"hidden_state_{i}"), dtype=np.float32)  # [1, B, T, d]
        graph.nodes.append(namer.node("Unsqueeze", [tensors[t], axes], [u]))
        parts.append(u)
    stacked = gs.Variable(name, dtype=np.float32)  # [L+1, B, T, d]
    graph.nodes.append(namer.node("Concat", parts, [stacked], axis=0))
    return name


def slice_last_position_logits(graph: gs.Graph, stream: ResidualStream) -> None:
    """Compute the lm_head on the last position only: logits become [batch, 1, vocab].

    Hidden state L keeps every position (the stacked tensor reads ``stream.final_norm``).
    """
    lm = _lm_node(graph, stream)
    if lm.op not in ("MatMul", "MatMulNBits"):  # both take a [B, T, d] input
        raise SurgeryError(
            f"the lm_head is a {lm.op} (2-D); last-position slicing needs a 3-D MatMul: use --all-logits"
        )
    t = lm.outputs[0]
    while t.name != stream.logits:  # element-wise steps (Casts, soft-capping) keep the [B, T, V] layout
        nxt = [n for n in t.outputs if scalar_step(n, t)]
        if len(nxt) != 1 or len(t.outputs) != 1:
            raise SurgeryError(
                "the lm_head output is reshaped or read elsewhere before it becomes the logits output; last-position "
                "slicing is not safe here: use --all-logits"
            )
        t = nxt[0].outputs[0]
    namer = Namer(graph)
    hidden = lm.inputs[0]  # [B, T, d]
    sliced = gs.Variable(namer("last_position_hidden"), dtype=hidden.dtype)  # [B, 1, d]
    if stream.inplace_kv:  # rows are prefixes: row b's last token is at sum(pass mask b) - 1
        nodes, sliced = _gather_last_token(graph, stream, namer, hidden, sliced)
    else:
        starts, ends = namer.i64("last_start", [-1]), namer.i64("last_end", [INT64_MAX])
        nodes = [namer.node("Slice", [hidden, starts, ends, namer.i64("axis1", [1])], [sliced])]
    lm.inputs[0] = sliced
    at = next(k for k, n in enumerate(graph.nodes) if n is lm)
    graph.nodes[at:at] = nodes  # keeps the order sorted
    out = t
    if out.shape is not None and len(out.shape) == 3:
        out.shape = [out.shape[0], 1, out.shape[2]]  # [B, 1, V]


def _pass_mask(graph: gs.Graph, stream: ResidualStream, namer: "Namer") -> tuple[list[gs.Node], gs.Variable]:
    """-> (nodes, the current pass's columns of the mask [B, T], T = input_ids.shape[1]):
    ``attention_mask[:, -T:]``, or ``[:, :T]`` where rows are prefixes (``stream.inplace_kv``:
    a prefill's past is empty and a decode step's one token is each row's column 0 of the pass)."""
    tensors = graph.tensors()
    shape = gs.Variable(namer("ids_shape"), dtype=np.int64)  # [2] = (B, T)
    t = gs.Variable(namer("seq_len"), dtype=np.int64)  # [1] = (T,)
    out = gs.Variable(namer("probe_attention_mask"), dtype=np.int64)  # [B, T]
    axes = namer.i64("mask_axis1", [1])
    nodes = [
        namer.node("Shape", [tensors[stream.input_ids]], [shape]),
        namer.node("Gather", [shape, namer.i64("index1", [1])], [t], axis=0),
    ]
    if stream.inplace_kv:
        nodes.append(
            namer.node("Slice", [tensors[stream.attention_mask], namer.i64("mask_start", [0]), t, axes], [out])
        )
    else:
        neg = gs.Variable(namer("neg_seq_len"), dtype=np.int64)  # [1] = (-T,)
        ends = namer.i64("mask_end", [INT64_MAX])
        nodes += [
            namer.node("Neg", [t], [neg]),
            namer.node("Slice", [tensors[stream.attention_mask], neg, ends, axes], [out]),
        ]
    return nodes, out


def _gather_last_token(
    graph: gs.Graph, stream: ResidualStream, namer: "Namer", hidden: gs.Tensor, out: gs.Variable
) -> tuple[list[gs.Node], gs.Variable]:
    """hidden [B, T, d] -> (nodes, ``out`` [B, 1, d]): each row's last token of the pass, at
    ``sum(pass mask) - 1`` (rows are prefixes)."""
    nodes, mask = _pass_mask(graph, stream, namer)
    count = gs.Variable(namer("pass_tokens"), dtype=np.int64)  # [B, 1]
    last = gs.Variable(namer("last_index"), dtype=np.int64)  # [B, 1]
    rows = gs.Variable(namer("last_hidden_2d"), dtype=hidden.dtype)  # [B, d]
    nodes += [
        namer.node("ReduceSum", [mask, namer.i64("axis1", [1])], [count], keepdims=1),
        namer.node("Sub", [count, namer.i64("one", [1])], [last]),
        namer.node("GatherND", [hidden, last], [rows], batch_dims=1),
        namer.node("Unsqueeze", [rows, namer.i64("axis1", [1])], [out]),
    ]
    return nodes, out


def probe_attention_mask(graph: gs.Graph, stream: ResidualStream) -> str:
    """The current pass's tokens [B, T]: ``attention_mask[:, -T:]`` with T = input_ids.shape[1]
    (``[:, :T]`` where rows are prefixes, ``stream.inplace_kv``).

    In prefill (no past) this is the whole mask; in a decode step it is the new token's column,
    so the probe subgraph stays shape-valid with a KV cache.
    """
    nodes, out = _pass_mask(graph, stream, Namer(graph))
    graph.nodes.extend(nodes)
    return out.name


def last_position_logits(graph: gs.Graph, stream: ResidualStream) -> str:
    """logits[:, -1, :] as [batch, vocab] (Slice + Squeeze, no negative Gather indices)."""
    namer = Namer(graph)
    logits = _tensor(graph, stream.logits, "logits output")
    starts, ends, axes = namer.i64("last_start", [-1]), namer.i64("last_end", [INT64_MAX]), namer.i64("axis1", [1])
    sliced = gs.Variable(namer("last_logits_3d"), dtype=np.float32)  # [B, 1, V]
    out = gs.Variable(namer("last_logits"), dtype=np.float32)  # [B, V]
    graph.nodes.extend(
        [namer.node("Slice", [logits, starts, ends, axes], [sliced]), namer.node("Squeeze", [sliced, axes], [out])]
    )
    return out.name


def _model_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def fuse_probe(
    graph: gs.Graph, probe: onnx.ModelProto, name: str, feeds: dict[str, str], boundary: bool = True
) -> list[str]:
    """Add a probe graph to ``graph`` under the prefix ``name/``; ``feeds`` maps each probe input to a
    tensor of the host graph. The probe's outputs become graph outputs ``name/<output>``.
    ``boundary=False``: the probe reads the host tensors directly, without the fp32 Cast / Identity
    per input (TensorRT's precision boundary; a graph TensorRT never builds saves the nodes)."""
    host_opset, probe_opset = opset_of(graph), _model_opset(probe)
    if host_opset != probe_opset:
        raise SurgeryError(f"probe {name!r} is opset {probe_opset} but the decoder graph is opset {host_opset}")
    inits = {t.name for t in probe.graph.initializer}
    probe_inputs = [i.name for i in probe.graph.input if i.name not in inits]
    if set(probe_inputs) != set(feeds):
        raise SurgeryError(f"probe {name!r} takes inputs {probe_inputs}, fed {sorted(feeds)}")
    sub = gs.import_onnx(onnx.compose.add_prefix(probe, f"{name}/"))  # a copy: the probe graph is small
    namer = Namer(graph)
    mine = set(sub.tensors()) | {n.name for n in sub.nodes if n.name}
    clash = sorted((mine - {i.name for i in sub.inputs}) & namer.taken)
    if clash:
        raise SurgeryError(f"probe name {name!r} collides with graph tensors {clash[:3]}")
    tensors, host_inputs = graph.tensors(), {i.name for i in graph.inputs}
    for src in feeds.values():
        if src not in host_inputs and (src not in tensors or producer(tensors[src]) is None):
            raise SurgeryError(f"probe {name!r} input tensor {src!r} is not in the graph")
    edges, direct = [], {}
    for pin in sub.inputs:  # the probe's input tensors, fed by the host from now on
        src = tensors[feeds[pin.name[len(name) + 1 :]]]
        if not boundary:
            direct[id(pin)] = src
            continue
        pin.shape = None  # the host's shape (symbolic dims named by the host exporter)
        # An explicit fp32 Cast at the probe boundary (a no-op in an fp32 graph): in a reduced-precision
        # TensorRT engine it is where the probe subgraph returns to fp32.
        if onnx_dtype(pin.dtype) == TensorProto.FLOAT:
            edges.append(namer.node("Cast", [src], [pin], to=TensorProto.FLOAT))
        else:
            edges.append(namer.node("Identity", [src], [pin]))
    for node in sub.nodes if direct else ():
        node.inputs = [direct.get(id(t), t) for t in node.inputs]
    graph.nodes.extend(edges + list(sub.nodes))
    have = {(f.domain, f.name) for f in graph.functions}
    graph.functions = list(graph.functions) + [f for f in sub.functions if (f.domain, f.name) not in have]
    domains = {(o.domain or "") for o in graph.import_domains}
    graph.import_domains = list(graph.import_domains) + [
        o for o in sub.import_domains if (o.domain or "") not in domains
    ]
    graph.outputs.extend(sub.outputs)
    return [o.name for o in sub.outputs]


def fuse_probe_nodes(
    graph: gs.Graph, probe: onnx.ModelProto, name: str, sources: dict[str, str], boundary: bool = True
) -> tuple[list[gs.Node], list[str]]:
    """``fuse_probe`` fed from ``sources`` (host tensors by probe input name, possibly more than this
    probe graph takes: the others are left out, and one it takes that ``sources`` lacks is still
    ``fuse_probe``'s error). -> (the nodes it added, its outputs): what ``prefill_only`` moves into a
    branch."""
    inits = {t.name for t in probe.graph.initializer}
    wanted = {i.name for i in probe.graph.input if i.name not in inits}
    before = set(map(id, graph.nodes))
    outs = fuse_probe(graph, probe, name, {k: v for k, v in sources.items() if k in wanted}, boundary)
    return [n for n in graph.nodes if id(n) not in before], outs


def branch(
    graph: gs.Graph,
    head: list[gs.Node],
    cond: gs.Variable,
    then: tuple[list[gs.Node], list[gs.Tensor]],
    orelse: tuple[list[gs.Node], list[gs.Tensor]],
    outputs: list[str],
) -> list[gs.Node]:
    """Run one of two computations of the graph outputs ``outputs``: an ``If`` on the boolean scalar
    ``cond`` (computed by the ``head`` nodes). ``then`` / ``orelse``: (nodes, their output tensors in
    the order of ``outputs``), moved into the branches, which read the graph's tensors from the outer
    scope. The If's outputs take the names ``outputs``, where the first branch's outputs were among
    the graph outputs; the branches' own tensors stop being graph outputs. -> the nodes added (``head``
    and the If)."""
    namer = Namer(graph)
    (t_nodes, t_outs), (e_nodes, e_outs) = then, orelse
    if not (len(t_outs) == len(e_outs) == len(outputs)):
        raise SurgeryError(f"branch: {len(t_outs)} and {len(e_outs)} branch outputs for {len(outputs)} outputs")
    outer = []
    for name, a, b in zip(outputs, t_outs, e_outs):
        for t, side in ((a, "then"), (b, "else")):
            if t.name == name:  # the branch computes its own copy; the If's output takes the name
                t.name = namer(name.replace("/", "_") + "_" + side)
        outer.append(gs.Variable(name, dtype=a.dtype, shape=a.shape))
    moved = set(map(id, t_nodes)) | set(map(id, e_nodes))
    graph.nodes = [n for n in graph.nodes if id(n) not in moved]
    then_graph = gs.Graph(nodes=list(t_nodes), outputs=list(t_outs), name=namer("then"))
    else_graph = gs.Graph(nodes=list(e_nodes), outputs=list(e_outs), name=namer("else"))
    iff = gs.Node("If", name=namer("If"), inputs=[cond], outputs=outer)
    iff.attrs = {"then_branch": then_graph, "else_branch": else_graph}
    graph.nodes.extend(list(head) + [iff])
    renamed = {id(t): o for t, o in zip(t_outs, outer)}
    dropped = set(map(id, e_outs)) | set(map(id, t_outs))
    kept = []
    for o in graph.outputs:
        if id(o) in renamed:
            kept.append(renamed[id(o)])
        elif id(o) not in dropped:
            kept.append(o)
    graph.outputs = kept + [o for o in outer if all(o is not k for k in kept)]
    return list(head) + [iff]


def _input_ids_dims(graph: gs.Graph, stream: ResidualStream, namer: "Namer") -> tuple[list[gs.Node], gs.Variable]:
    """Nodes computing ``input_ids``' shape -> (nodes, the [2] = (B, T) tensor)."""
    shape = gs.Variable(namer("pass_ids_shape"), dtype=np.int64)  # [2] = (B, T)
    return [namer.node("Shape", [graph.tensors()[stream.input_ids]], [shape])], shape


def _is_prefill(namer: "Namer", shape: gs.Variable, base: str) -> tuple[list[gs.Node], gs.Variable]:
    """``shape`` ([2] = (B, T) of ``input_ids``) -> (nodes, T > 1 []): is this a prefill pass?"""
    t = gs.Variable(namer(f"{base}_seq_len"), dtype=np.int64)  # [] = T
    cond = gs.Variable(namer(f"{base}_is_prefill"), dtype=np.bool_)  # [] = T > 1
    nodes = [
        namer.node("Gather", [shape, gs.Constant(namer("index1"), np.array(1, np.int64))], [t], axis=0),
        namer.node("Greater", [t, gs.Constant(namer("one"), np.array(1, np.int64))], [cond]),
    ]
    return nodes, cond


def prefill_only(
    graph: gs.Graph,
    stream: ResidualStream,
    nodes: list[gs.Node],
    outputs: list[str],
    decode: tuple[list[gs.Node], list[str]] | None = None,
) -> None:
    """Run ``nodes`` (which compute the graph outputs ``outputs``, e.g. a fused prompt probe) only
    in passes of 2 or more tokens: a ``branch`` on ``input_ids.shape[1] > 1`` whose then-branch holds
    the nodes. Its else-branch, the one-token (decode) pass, returns zeros of the outputs' shapes, or
    runs ``decode``: (nodes, their outputs, in the order of ``outputs``), another form of the same
    computation (a response probe's stacked form; its outputs stop being graph outputs). A prompt's
    label comes from its prefill pass; a decode pass then costs the probe nothing (its zero outputs
    are no label: zero logits would read P = 0.5, so nothing reads them). The runtime prefills at
    least 2 columns (a one-token prompt is left-padded by one masked column)."""
    namer = Namer(graph)
    tensors = graph.tensors()
    head, shape = _input_ids_dims(graph, stream, namer)
    more, cond = _is_prefill(namer, shape, "prefill")
    head += more
    if decode is not None:
        other, names = decode
        if len(names) != len(outputs):
            raise SurgeryError(f"prefill_only: {len(names)} decode outputs for {len(outputs)} outputs")
        branch(graph, head, cond, (nodes, [tensors[n] for n in outputs]), (other, [tensors[n] for n in names]), outputs)
        return
    more, batch = _batch_of(namer, shape)
    head += more
    other, zeros = _zeros_for(namer, batch, [tensors[n] for n in outputs], "prefill_only")
    branch(graph, head, cond, (nodes, [tensors[n] for n in outputs]), (other, zeros), outputs)


def _batch_of(namer: "Namer", shape: gs.Variable) -> tuple[list[gs.Node], gs.Variable]:
    """``shape`` ([2] = (B, T) of ``input_ids``) -> (nodes, [1] = (B,))."""
    batch = gs.Variable(namer("pass_batch"), dtype=np.int64)  # [1] = (B,)
    return [namer.node("Slice", [shape, namer.i64("b_start", [0]), namer.i64("b_end", [1])], [batch])], batch


def _zeros_for(namer: "Namer", batch: gs.Variable, outs: list[gs.Tensor], what: str) -> tuple[list, list]:
    """Zeros [B, C] in place of each [batch, C] output in ``outs`` -> (nodes, the zero tensors)."""
    nodes, zeros = [], []
    for out in outs:
        if out.shape is None or len(out.shape) != 2 or not isinstance(out.shape[1], (int, np.integer)):
            raise SurgeryError(f"{what}: output {out.name!r} must be [batch, C], not {out.shape}")
        mine = gs.Variable(namer(out.name.replace("/", "_") + "_zeros"), dtype=out.dtype, shape=out.shape)
        dims = gs.Variable(namer(out.name.replace("/", "_") + "_dims"), dtype=np.int64)  # [2] = (B, C)
        nodes += [
            namer.node("Concat", [batch, namer.i64("width", [int(out.shape[1])])], [dims], axis=0),
            namer.node(
                "ConstantOfShape", [dims], [mine], value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0])
            ),
        ]
        zeros.append(mine)
    return nodes, zeros


def with_response_tokens(
    graph: gs.Graph, stream: ResidualStream, nodes: list[gs.Node], outputs: list[str], carried: dict[str, str]
) -> list[gs.Node]:
    """Run ``nodes`` (a response probe's fold over a pass: they compute the graph outputs ``outputs``)
    only in a pass with a response token in it: a ``branch`` on ``max(response_mask) > 0``. Otherwise
    (a prompt's prefill: the runtime feeds ``response_mask = 0``) nothing is folded in, so each
    carried state output (``carried``: present -> its past input) is its past, and the label outputs
    are zeros (no label: the response is empty, as a prompt probe's outputs in a decode pass; never
    read, zero logits would read P = 0.5); the
    fold's ~30 ops per layer do not run. -> the nodes added (head and the If)."""
    namer = Namer(graph)
    tensors = graph.tensors()
    mask = _tensor(graph, RESPONSE_MASK, "response mask input")
    top = gs.Variable(namer("response_max"), dtype=np.int64)  # [] = max over the pass's tokens
    cond = gs.Variable(namer("has_response"), dtype=np.bool_)  # [] = top > 0
    head, shape = _input_ids_dims(graph, stream, namer)
    more, batch = _batch_of(namer, shape)
    head += more + [
        namer.node("ReduceMax", [mask], [top], keepdims=0),
        namer.node("Greater", [top, gs.Constant(namer("zero"), np.array(0, np.int64))], [cond]),
    ]
    outs = [tensors[n] for n in outputs]
    other, kept = state_unchanged(graph, namer, batch, outs, carried, "with_response_tokens")
    return branch(graph, head, cond, (nodes, outs), (other, kept), outputs)


def state_unchanged(
    graph: gs.Graph, namer: "Namer", batch: gs.Variable, outs: list[gs.Tensor], carried: dict[str, str], what: str
) -> tuple[list[gs.Node], list[gs.Tensor]]:
    """A response probe's pass that folds nothing in: each carried state output in ``outs`` (``carried``:
    present -> its past input) is its past, copied (a branch may not return an outer value), and each
    label output zeros [B, C] (``_zeros_for``, ``batch`` [1] = (B,)). -> (nodes, the tensors in the order
    of ``outs``): a branch's computation."""
    labels = [o for o in outs if o.name not in carried]
    nodes, zeros = _zeros_for(namer, batch, labels, what)
    zero_of = dict(zip(map(id, labels), zeros))
    kept = []
    for o in outs:
        if o.name in carried:
            same = gs.Variable(namer(o.name.replace("/", "_") + "_kept"), dtype=o.dtype, shape=o.shape)
            nodes.append(namer.node("Identity", [_tensor(graph, carried[o.name], "past state input")], [same]))
            kept.append(same)
        else:
            kept.append(zero_of[id(o)])
    return nodes, kept


def _placeholder(namer: "Namer", like: gs.Tensor) -> gs.Constant:
    """A zero scalar of ``like``'s dtype: what a branch returns for an output it has no use for (an
    If's branches may return different shapes), as the branch's own initializer: no kernel runs."""
    return gs.Constant(namer("unused"), np.zeros((), np.dtype(like.dtype or np.float32)))


def _state_readers_and_needs(nodes: list[gs.Node], deps: list[set[int]], layer: dict[int, int]) -> set[int]:
    """ids of the ``nodes`` that read a layer's state directly, and of the nodes derived from layers that
    those need (their ancestors among ``nodes`` with ``deps``)."""
    made = {id(o): (n, d) for n, d in zip(nodes, deps) for o in n.outputs}
    todo = [n for n in nodes if any(id(t) in layer for t in n.inputs)]
    seen: set[int] = set()
    while todo:
        n = todo.pop()
        if id(n) not in seen:
            seen.add(id(n))
            todo += [made[id(t)][0] for t in n.inputs if id(t) in made and made[id(t)][1]]
    return seen


def layer_stages(
    graph: gs.Graph,
    stream: ResidualStream,
    per_layer: list[gs.Node],
    layers_per_if: int = 1,
    also: dict[str, int] | None = None,
) -> list[gs.Node]:
    """Give the per-layer form's stage 1 of each block of ``layers_per_if`` layers an ``If`` of its
    own, right after the block's last layer.

    ``per_layer``: the per-layer form's nodes, reading hidden state i (``stream.hidden_states``)
    directly; the nodes that read states of one block and no other (stage 1: the token pooling of
    those layers, one layer at a time or the block at once) move into that block's If. In a prefill
    pass that If runs them and returns the layers' summaries; in a decode pass, placeholders. Every
    node left reads the Ifs' outputs instead of the states, so when those nodes sit in an ``If`` of
    their own (``prefill_only``), that If holds summaries from the outer scope, not every layer's
    [B, T, d] states: ONNX Runtime keeps an outer-scope tensor alive until the If that reads it has
    run, which for such an If is after the last layer. A block keeps its layers' states alive until
    its If has run (``layers_per_if`` - 1 more than one layer's); every pass, decode included, runs
    each If once, so fewer Ifs cost less per pass. The state-free nodes stage 1 reads stay at the top
    level, before every If. ``also``: more tensors that stand for a layer (its state normalised by the
    decoder: ``residual.stream_norms``), by name. -> the per-layer form's nodes left, in order."""
    namer = Namer(graph)
    tensors = graph.tensors()
    layer = {id(tensors[n]): i for i, n in enumerate(stream.hidden_states)}
    layer |= {id(tensors[n]): i for n, i in (also or {}).items()}
    k = max(1, layers_per_if)
    reads: dict[int, set[int]] = {}  # id(tensor) -> the layers it derives from
    deps = []
    for n in per_layer:  # the probe graph's order is topological
        d = set().union(*[({layer[id(t)]} if id(t) in layer else reads.get(id(t), set())) for t in n.inputs])
        for o in n.outputs:
            reads[id(o)] = d
        deps.append(d)
    groups: dict[int, list[gs.Node]] = {}  # block -> the nodes that read its layers and no other block's
    read_by: dict[int, set[int]] = {}  # block -> the layers its nodes read
    # one block holds every layer the probe reads (a model of at most k + 1 layers): stage 1 there is the
    # single-layer nodes and what a node reading a state needs from the layers (what joins the layers'
    # summaries, stage 2 and the head, reads that block too, and no state)
    several = len({i // k for d in deps for i in d}) > 1
    needed = set() if several else _state_readers_and_needs(per_layer, deps, layer)
    for n, d in zip(per_layer, deps):
        if d and min(d) // k == max(d) // k and (several or len(d) == 1 or id(n) in needed):
            groups.setdefault(min(d) // k, []).append(n)
            read_by.setdefault(min(d) // k, set()).update(d)
    staged = {id(n) for g in groups.values() for n in g}
    need = {id(t) for g in groups.values() for n in g for t in n.inputs}
    top = []  # state-free nodes that stage 1 reads: they run before any If
    for n, d in reversed(list(zip(per_layer, deps))):
        if not d and any(id(o) in need for o in n.outputs):
            top.append(n)
            need |= {id(t) for t in n.inputs}
    top.reverse()
    moved = staged | set(map(id, top))
    rest = [n for n in per_layer if id(n) not in moved]
    if any(id(x) in layer for n in rest for x in n.inputs):
        raise SurgeryError("layer_stages: a node reads layers' states from more than one block")
    read_outside = {id(x) for n in graph.nodes if id(n) not in staged for x in n.inputs}

    head, shape = _input_ids_dims(graph, stream, namer)
    more, prefill = _is_prefill(namer, shape, "stage")
    new_nodes = list(head) + more + list(top)
    swap: dict[int, gs.Tensor] = {}  # id(a stage-1 output) -> the If output that replaces it
    for key in sorted(groups):  # the staged blocks, in layer order
        b = max(read_by[key])  # names after the block's last layer, where its If runs
        nodes = groups[key]
        inner = {id(o) for n in nodes for o in n.outputs}
        outs = [o for n in nodes for o in n.outputs if id(o) in read_outside]
        outs += [o for o in graph.outputs if id(o) in inner and all(o is not x for x in outs)]
        outer = [gs.Variable(namer(f"layer{b}_stage_out"), dtype=x.dtype) for x in outs]
        top_if = gs.Node("If", name=namer("If"), inputs=[prefill], outputs=outer)
        top_if.attrs = {  # a prefill pass: stage 1 of the block; a decode pass: placeholders
            "then_branch": gs.Graph(nodes=nodes, outputs=outs, name=namer("prefill")),
            "else_branch": gs.Graph(nodes=[], outputs=[_placeholder(namer, x) for x in outs], name=namer("decode")),
        }
        new_nodes.append(top_if)
        swap.update({id(o): x for o, x in zip(outs, outer)})
    graph.outputs = [swap.get(id(o), o) for o in graph.outputs]
    for n in rest:
        n.inputs = [swap.get(id(x), x) for x in n.inputs]
    graph.nodes = [n for n in graph.nodes if id(n) not in moved] + new_nodes
    return rest


def add_output(graph: gs.Graph, name: str, elem_type: int = TensorProto.FLOAT, dims=None) -> None:
    """Expose a tensor as a graph output (``dims`` None: keep what is known, fine for ONNX Runtime)."""
    if any(o.name == name for o in graph.outputs):
        return
    t = _tensor(graph, name)
    t.dtype = helper.tensor_dtype_to_np_dtype(elem_type)
    if dims is not None:
        t.shape = list(dims)
    graph.outputs.append(t)


# ----------------------------------------------------------------------------- export


def to_model(graph: gs.Graph, like: onnx.ModelProto | None = None) -> onnx.ModelProto:
    """``gs.export_onnx`` with ONE copy of the weights.

    gs keeps an imported initializer as ``LazyValues`` over the original ``TensorProto`` and its
    exporter copies each one twice (``make_graph``, then ``make_model``'s ``CopyFrom``): a 540 MB
    graph would briefly cost 1.1 GB more. So the lazy initializers above STUB_BYTES are exported
    as metadata-only stubs and their ``TensorProto`` copied in once afterwards (values set as
    numpy arrays are exported by gs as usual). ``like`` (the imported model) gives the model-level
    fields gs drops: doc string, domain, version, metadata. Export after ``graph.cleanup().toposort()``."""
    if graph.import_domains is not None:  # gs appends to it: never to the imported model's own list
        graph.import_domains = list(graph.import_domains)
    stubbed = []
    for t in graph.tensors().values():
        lazy = getattr(t, "_values", None)  # a Constant's values, unloaded (gs's exporter reads it the same way)
        if isinstance(t, gs.Constant) and type(lazy) is LazyValues and lazy.tensor.ByteSize() > STUB_BYTES:
            src = lazy.tensor
            t.values = LazyValues(onnx.TensorProto(name=t.name, data_type=src.data_type, dims=src.dims))
            stubbed.append((t, lazy))
    try:
        model = gs.export_onnx(graph)
    finally:
        for t, lazy in stubbed:
            t.values = lazy
    weights = {t.name: lazy.tensor for t, lazy in stubbed}
    for init in model.graph.initializer:
        if init.name in weights:
            name = init.name
            init.CopyFrom(weights[name])  # the one copy
            init.name = name
    if like is not None:
        model.doc_string, model.domain, model.model_version = like.doc_string, like.domain, like.model_version
        model.metadata_props.extend(like.metadata_props)
    return model
