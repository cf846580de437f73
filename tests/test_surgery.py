"""The graph transformations of export/surgery.py on tiny hand-built decoder graphs.

The toy decoder has the Llama residual structure (embedding Gather, two residual adds per
layer, RMS norms, lm_head MatMul) with arbitrary tensor names, so these tests show the
surgery finds the stream by structure, not by one exporter's naming. The transforms edit an
onnx-graphsurgeon graph; ``run`` exports it (``surgery.to_model``) and executes it.
"""

import random
import uuid

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from singlepass.export import surgery
from singlepass.export.surgery import SurgeryError
from singlepass.export.tensorrt import name_nodes, normalisation_nodes

V, D = 20, 8


class Toy:
    """Builds the graph and a numpy reference of its hidden states."""

    def __init__(
        self,
        layers=3,
        random_names=False,
        cast_alias=False,
        extra_adds=0,
        opset=18,
        mask=True,
        seed=0,
        embed_scale=False,
        softcap=False,
        rms_op=False,
        norm_eps=1e-5,
    ):
        self.rng = np.random.default_rng(seed)
        self.rms_op, self.norm_eps = rms_op, norm_eps  # rms_op: the norms as RMSNormalization (opset 23)
        self.random_names = random_names
        self.nodes, self.inits, self.weights = [], [], {}
        self.opset = opset
        x = self.t("input_ids")
        emb = self.w("embed", (V, D))
        h = self.node("Gather", [emb, x])
        if embed_scale:  # Gemma: the stream starts at embedding * sqrt(d)
            h = self.node("Mul", [h, self.f32("scale", np.sqrt(D))])
        self.hidden = [h]
        mask_f = None
        if mask:
            m = self.node("Cast", [self.t("attention_mask")], to=TensorProto.FLOAT)
            mask_f = self.node("Unsqueeze", [m, self.c("ax_last", [-1])])
        self.masked = mask_f
        for _ in range(layers * 2 + extra_adds):
            src = self.node("Cast", [h], to=TensorProto.FLOAT) if cast_alias else h
            n = self.norm(src)
            t = self.node("MatMul", [n, self.w("proj", (D, D))])
            t = self.node("Tanh", [t])
            if mask_f is not None:
                t = self.node("Mul", [t, mask_f])
            h = self.node("Add", [src, t])
            self.hidden.append(h)
        self.final = self.norm(h)
        if softcap:  # Gemma 2: logits = tanh(lm_head / c) * c
            lm = self.node("MatMul", [self.final, self.w("lm_head", (D, V))])
            cap = self.f32("cap", 2.0)
            self.node("Mul", [self.node("Tanh", [self.node("Div", [lm, cap])]), cap], out="logits")
        else:
            self.node("MatMul", [self.final, self.w("lm_head", (D, V))], out="logits")
        self.layers = layers

    def t(self, base):
        return (
            f"{base}_{uuid.uuid4().hex[:6]}"
            if self.random_names and base not in ("input_ids", "attention_mask", "logits")
            else base
        )

    def c(self, base, values):
        name = self.t(base) + f"_{len(self.inits)}"
        self.inits.append(numpy_helper.from_array(np.asarray(values, dtype=np.int64), name))
        return name

    def f32(self, base, value):
        name = self.t(base) + f"_{len(self.inits)}"
        self.inits.append(numpy_helper.from_array(np.array(value, np.float32), name))
        return name

    def w(self, base, shape):
        name = self.t(base) + f"_{len(self.inits)}"
        arr = self.rng.normal(0, 0.5, size=shape).astype(np.float32)
        self.inits.append(numpy_helper.from_array(arr, name))
        self.weights[name] = arr
        return name

    def node(self, op, inputs, out=None, **attrs):
        out = out or self.t(f"{op.lower()}_{len(self.nodes)}")
        name = self.t(f"n{len(self.nodes)}") if not self.random_names else uuid.uuid4().hex
        self.nodes.append(helper.make_node(op, inputs, [out], name=name, **attrs))
        return out

    def norm(self, x):
        if self.rms_op:
            return self.node("RMSNormalization", [x, self.w("norm_w", (D,))], epsilon=self.norm_eps, axis=-1)
        two = numpy_helper.from_array(np.array(2.0, np.float32), self.t("two") + str(len(self.inits)))
        eps = numpy_helper.from_array(np.array(1e-5, np.float32), self.t("eps") + str(len(self.inits)))
        self.inits += [two, eps]
        p = self.node("Pow", [x, two.name])
        m = self.node("ReduceMean", [p, self.c("axes", [-1])], keepdims=1)
        a = self.node("Add", [m, eps.name])
        s = self.node("Sqrt", [a])
        r = self.node("Reciprocal", [s])
        y = self.node("Mul", [x, r])
        return self.node("Mul", [self.w("norm_w", (D,)), y])

    def model(self, shuffle=False):
        nodes = list(self.nodes)
        if shuffle:
            random.Random(0).shuffle(nodes)
        inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])]
        if self.masked is not None:
            inputs.append(helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"]))
        g = helper.make_graph(
            nodes,
            "toy",
            inputs,
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", V])],
            self.inits,
        )
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", self.opset)])

    def graph(self, shuffle=False) -> gs.Graph:
        return gs.import_onnx(self.model(shuffle))


def run(graph, feeds, outputs=None):
    model = surgery.to_model(graph) if isinstance(graph, gs.Graph) else graph
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(outputs, feeds)))


def feeds(B=2, T=5, S=None, seed=0):
    rng = np.random.default_rng(seed)
    mask = np.ones((B, S or T), np.int64)
    mask[0, :2] = 0
    return {"input_ids": rng.integers(0, V, (B, T)).astype(np.int64), "attention_mask": mask}


@pytest.mark.parametrize("random_names", [False, True])
@pytest.mark.parametrize("cast_alias", [False, True])
def test_finds_residual_stream_by_structure(random_names, cast_alias):
    toy = Toy(layers=3, random_names=random_names, cast_alias=cast_alias)
    s = surgery.find_residual_stream(toy.graph())
    assert s.num_layers == 3
    assert s.hidden_states == [toy.hidden[0], toy.hidden[2], toy.hidden[4], toy.final]
    assert (s.vocab_size, s.hidden_size, s.logits, s.attention_mask) == (V, D, "logits", "attention_mask")


@pytest.mark.parametrize("random_names", [False, True])
def test_scaled_embedding_and_soft_capped_logits_by_structure(random_names):
    """Gemma's ends: hidden state 0 is the scaled embedding (the Gather's one consumer, a Mul by a
    constant scalar) and the lm_head is found through the soft-cap; last-position slicing keeps it."""
    toy = Toy(layers=2, random_names=random_names, embed_scale=True, softcap=True)
    full = run(toy.model(), feeds())["logits"]
    graph = toy.graph()
    s = surgery.find_residual_stream(graph)
    assert s.hidden_states == [toy.hidden[0], toy.hidden[2], toy.final] and s.num_layers == 2
    assert surgery.producer(graph.tensors()[s.embedding]).op == "Mul"
    surgery.slice_last_position_logits(graph, s)
    out = run(graph, feeds())
    assert out["logits"].shape == (2, 1, V) and np.abs(full).max() < 2.0  # tanh-capped
    np.testing.assert_allclose(out["logits"], full[:, -1:], rtol=0, atol=1e-6)


def test_stacked_hidden_states_are_the_residual_stream():
    toy = Toy(layers=2)
    graph = toy.graph()
    s = surgery.find_residual_stream(graph)
    name = surgery.add_stacked_hidden_states(graph, s)
    surgery.add_output(graph, name, dims=[3, "batch", "sequence", D])
    onnx.checker.check_model(surgery.to_model(graph))
    f = feeds()
    out = run(graph, f)
    plain = toy.graph()  # the plain graph, every hidden state exposed for reference
    for t in toy.hidden + [toy.final]:
        surgery.add_output(plain, t)
    ref = run(plain, f)
    expect = np.stack([ref[toy.hidden[0]], ref[toy.hidden[2]], ref[toy.final]])
    assert out[name].shape == (3, 2, 5, D)
    np.testing.assert_array_equal(out[name], expect)
    np.testing.assert_array_equal(out["logits"], ref["logits"])


def test_slice_last_position_logits_keeps_the_full_last_hidden_state():
    toy = Toy(layers=2)
    full = run(toy.model(), feeds())["logits"]
    graph = toy.graph()
    s = surgery.find_residual_stream(graph)
    hs = surgery.add_stacked_hidden_states(graph, s)
    surgery.add_output(graph, hs, dims=[3, "batch", "sequence", D])
    surgery.slice_last_position_logits(graph, s)
    model = surgery.to_model(graph)
    onnx.checker.check_model(model)
    out = run(model, feeds())
    assert out["logits"].shape == (2, 1, V)
    np.testing.assert_allclose(out["logits"], full[:, -1:], rtol=0, atol=1e-6)
    assert out[hs].shape[2] == 5  # hidden state L still has every position
    dims = [d.dim_value or d.dim_param for d in model.graph.output[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 1, V]


def test_probe_attention_mask_is_the_current_steps_columns():
    toy = Toy(layers=1)
    graph = toy.graph()
    s = surgery.find_residual_stream(graph)
    out = surgery.probe_attention_mask(graph, s)
    surgery.add_output(graph, out, TensorProto.INT64)
    model = surgery.to_model(graph)
    f = feeds(T=3)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run([out], f)[0]
    np.testing.assert_array_equal(got, f["attention_mask"][:, -3:])
    # The same subgraph on a longer mask (past + current) keeps only the last T columns.
    m2 = helper.make_model(
        helper.make_graph(
            [n for n in model.graph.node if n.name.startswith(surgery.PREFIX)],
            "mask",
            [
                helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "t"]),
                helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["b", "s"]),
            ],
            [helper.make_tensor_value_info(out, TensorProto.INT64, None)],
            [i for i in model.graph.initializer if i.name.startswith(surgery.PREFIX)],
        ),
        opset_imports=[helper.make_opsetid("", 18)],
    )
    mask = np.array([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 0, 1]], np.int64)
    got = ort.InferenceSession(m2.SerializeToString()).run(
        None, {"input_ids": np.zeros((2, 2), np.int64), "attention_mask": mask}
    )[0]
    np.testing.assert_array_equal(got, mask[:, -2:])


def toy_with_stacked_states(layers: int = 2):
    """A toy graph of ``layers`` layers with its stacked hidden states [layers + 1, B, T, D] as a debug
    output (the probes' oracle input). -> (graph, its ResidualStream, the stacked output's name)."""
    host = Toy(layers=layers).graph()
    s = surgery.find_residual_stream(host)
    hs = surgery.add_stacked_hidden_states(host, s)
    surgery.add_output(host, hs, dims=[layers + 1, "batch", "sequence", D])
    return host, s, hs


def test_fuse_probe_matches_the_torch_probe_on_the_stacked_states():
    """The probe's per-layer inputs read the residual-stream tensors where they are; its outputs equal
    the torch probe on the stacked states (exposed here as a debug output)."""
    import torch

    from singlepass.export.fuse import export_probe, state_names
    from singlepass.models.probes import build_probe, probabilities

    host, s, hs = toy_with_stacked_states()
    torch.manual_seed(0)
    probe = build_probe("gate", 3, D, 2).eval()
    graph = export_probe(probe, "hidden_states", 3, D, V, 18)
    layers = dict(zip(state_names(3), s.hidden_states))
    outs = surgery.fuse_probe(host, graph, "tox", layers | {"mask": surgery.probe_attention_mask(host, s)})
    assert outs == ["tox/logits", "tox/probs"]
    host.cleanup().toposort()
    model = surgery.to_model(host)
    onnx.checker.check_model(model)
    # the explicit fp32 Cast at the probe boundary stays, one per layer, on the stream tensor itself
    for name, src in layers.items():
        assert [(n.op_type, list(n.input)) for n in model.graph.node if list(n.output) == [f"tox/{name}"]] == [
            ("Cast", [src])
        ]
    f = feeds()
    out = run(model, f)
    with torch.no_grad():
        ref = probabilities(probe(torch.from_numpy(out[hs]), torch.from_numpy(f["attention_mask"]))).numpy()
    np.testing.assert_allclose(out["tox/probs"], ref, atol=1e-6)
    with pytest.raises(SurgeryError, match="collides"):  # same prefix twice
        surgery.fuse_probe(host, graph, "tox", layers | {"mask": "attention_mask"})
    with pytest.raises(SurgeryError, match="opset"):
        surgery.fuse_probe(
            host, export_probe(probe, "hidden_states", 3, D, V, 17), "other", layers | {"mask": "attention_mask"}
        )
    with pytest.raises(SurgeryError, match="takes inputs"):  # a layer left unfed
        surgery.fuse_probe(host, graph, "third", {"state_0": layers["state_0"], "mask": "attention_mask"})


def assert_probe_passes(model, hs: str, cases) -> None:
    """Prefill passes of the fused ``tox`` probe equal the torch probe on the stacked states ``hs`` (cases:
    ((batch, length), the probe that pass must run)); a one-token (decode) pass returns zeros."""
    import torch

    from singlepass.models.probes import probabilities

    for (b, t), probe in cases:
        f = feeds(B=b, T=t)
        out = run(model, f)
        with torch.no_grad():
            ref = probabilities(probe(torch.from_numpy(out[hs]), torch.from_numpy(f["attention_mask"]))).numpy()
        np.testing.assert_allclose(out["tox/probs"], ref, atol=1e-6, err_msg=f"B={b}, T={t}")
    assert not run(model, feeds(B=2, T=1))["tox/probs"].any()  # a one-token pass: zeros


@pytest.mark.parametrize("method,k", [("pooling", 2), ("gate", 2), ("gate", 4), ("mha", 2), ("mha", 4)])
def test_layer_stages_runs_stage_1_of_each_block_of_layers_after_them(method, k):
    """A probe's per-layer form (a ``blockable`` one with stage 1 on blocks of k layers,
    ``forward_layers(block=k)``; the MHA one layer at a time): layer_stages gives each block's nodes an
    If of their own that reads that block's states and no other (7 states, blocks of k), nothing else
    reads a state, and prefill passes of any size equal the torch probe on the stacked states (a
    decode pass: zeros)."""
    import torch

    from singlepass.export.fuse import export_probe, state_names
    from singlepass.models.probes import build_probe

    n = 7
    host, s, hs = toy_with_stacked_states(layers=n - 1)
    torch.manual_seed(0)
    probe = build_probe(method, n, D, 2, **({"factor": 2, "heads": 2} if method == "mha" else {})).eval()
    feeds_ = dict(zip(state_names(n), s.hidden_states)) | {"mask": surgery.probe_attention_mask(host, s)}
    graph = export_probe(probe, "hidden_states", n, D, V, 18, block=k if probe.blockable else 1)
    nodes, outs = surgery.fuse_probe_nodes(host, graph, "tox", feeds_)
    nodes = surgery.layer_stages(host, s, nodes, k)
    stages = [x for x in host.nodes if x.op == "If"]
    names = set(s.hidden_states)
    assert [sorted(subgraph_reads(x) & names) for x in stages] == [
        sorted(s.hidden_states[i : i + k]) for i in range(0, n, k)
    ]
    assert not [x.name for x in host.nodes if x.name.startswith("tox") and {t.name for t in x.inputs} & names]
    # each block's summaries (one, or one per layer of a per-layer form), not its states
    per_block = [1 if probe.blockable else min(k, n - i) for i in range(0, n, k)]
    assert [len(x.outputs) for x in stages] == per_block
    surgery.prefill_only(host, s, nodes, outs)
    host.cleanup().toposort()
    model = surgery.to_model(host)
    onnx.checker.check_model(model)
    assert_probe_passes(model, hs, [((2, 3), probe), ((1, 9), probe)])


def subgraph_reads(node: gs.Node) -> set[str]:
    """The tensors a node (an If: its branches, recursively) reads from the enclosing scope."""
    made, read = set(), {t.name for t in node.inputs}
    for g in node.attrs.values():
        if isinstance(g, gs.Graph):
            for x in g.nodes:
                read |= subgraph_reads(x)
                made |= {t.name for t in x.outputs}
    return read - made


def subgraph_ops(node: gs.Node) -> list[str]:
    """The op types inside a node's branches, recursively."""
    return [
        op for g in node.attrs.values() if isinstance(g, gs.Graph) for x in g.nodes for op in [x.op, *subgraph_ops(x)]
    ]


@pytest.mark.parametrize(
    "method,k,norm", [("pooling", 4, "rms"), ("gate", 4, "rms"), ("gate", 2, "standard"), ("mha", 4, "rms")]
)
def test_a_probe_reads_the_decoders_own_rms_norms(method, k, norm, monkeypatch):
    """A decoder with its norms as RMSNormalization (opset 23, random gains): ``stream_norms`` finds each
    hidden state's (its output and gain; the last hidden state, the final norm's output: None). A prompt
    probe fused for prefill passes (``fuse_probes``: fed those, the gains folded into its graph), its stage 1
    in blocks of k layers (the last block mixes normalised layers and the one read as it is), equals the
    torch probe on the stacked states; its stage Ifs read the norms' outputs, no state of a normalised layer,
    and compute no per-token scale but for the one layer read as it is."""
    import types

    import torch

    from singlepass.export import fuse
    from singlepass.models.probes import build_probe

    n = 7
    toy = Toy(layers=n - 1, opset=23, rms_op=True, norm_eps=1e-6)  # the probe's own eps: exact parity
    host = toy.graph()
    s = surgery.find_residual_stream(host)
    hs = surgery.add_stacked_hidden_states(host, s)
    surgery.add_output(host, hs, dims=[n, "batch", "sequence", D])
    norms = surgery.stream_norms(host, s)
    assert [x is None for x in norms] == [False] * (n - 1) + [True]
    first_norm = [x for x in host.nodes if x.op == "RMSNormalization"][0]
    np.testing.assert_array_equal(norms[0].gain, toy.weights[first_norm.inputs[1].name])
    assert norms[0].tensor == first_norm.outputs[0].name and norms[0].eps == pytest.approx(1e-6)
    torch.manual_seed(0)
    probe = build_probe(method, n, D, 2, input_norm=norm, **({"factor": 2, "heads": 2} if method == "mha" else {}))
    if norm == "standard":
        probe.set_input_statistics(torch.randn(n, D) * 0.1, torch.rand(n, D) + 0.5)
    probe.eval()
    spec = types.SimpleNamespace(
        name="tox", input="hidden_states", reads="prompt", outputs={"logits": "tox/logits", "probs": "tox/probs"}
    )
    monkeypatch.setattr(fuse, "LAYERS_PER_STAGE_IF", k)
    fuse.fuse_probes(host, s, [types.SimpleNamespace(spec=spec, module=probe)], prefill_only=True)
    layer_tensors = {x.tensor for x in norms if x} | set(s.hidden_states)
    stages = [x for x in host.nodes if x.op == "If" and subgraph_reads(x) & layer_tensors]
    assert len(stages) == -(-n // k)
    reads = set().union(*map(subgraph_reads, stages))
    assert reads >= {x.tensor for x in norms[:-1]} | {s.hidden_states[-1]}
    assert not reads & set(s.hidden_states[:-1])
    # one per-token scale, the last layer's (a ReduceL2, or an RMSNormalization of the layer's tokens)
    ops = [op for x in host.nodes if x.op == "If" for op in subgraph_ops(x)]
    scales = [op for op in ops if op in ("ReduceL2", "RMSNormalization")]
    assert len(scales) == 1, scales
    host.cleanup().toposort()
    model = surgery.to_model(host)
    onnx.checker.check_model(model)
    assert_probe_passes(model, hs, [((2, 3), probe), ((1, 9), probe)])


def test_stream_norms_only_where_the_decoder_normalises_as_a_probe_would():
    """No norm is used where it would not stand for the probe's own RMS step: a norm decomposed into
    elementary ops (not recognised), a gain with a zero (the state is lost), an eps far above the probe's;
    a probe without an RMS step (input_norm="none") reads the states."""
    from singlepass.export.fuse import normalised_sources, state_names
    from singlepass.models.probes import build_probe

    host = Toy(layers=2).graph()
    assert surgery.stream_norms(host, surgery.find_residual_stream(host)) == [None] * 3
    host = Toy(layers=2, opset=23, rms_op=True, norm_eps=1e-3).graph()
    assert surgery.stream_norms(host, surgery.find_residual_stream(host)) == [None] * 3
    host = Toy(layers=2, opset=23, rms_op=True).graph()
    s = surgery.find_residual_stream(host)
    norm = [x for x in host.nodes if x.op == "RMSNormalization"][0]  # hidden state 0's
    norm.inputs[1].values = np.where(np.arange(D) == 3, 0.0, norm.inputs[1].values).astype(np.float32)
    norms = surgery.stream_norms(host, s)
    assert norms[0] is None and norms[1] is not None and norms[2] is None
    src = dict(zip(state_names(3), s.hidden_states))
    assert normalised_sources(build_probe("gate", 3, D, 2, input_norm="none"), src, norms) == (src, None)
    fed, gains = normalised_sources(build_probe("gate", 3, D, 2), src, norms)
    assert fed["state_1"] == norms[1].tensor and gains[0] is None and gains[2] is None


def test_stream_norms_ignore_norms_in_branches_and_unread_gains(tmp_path):
    """Only the decoder's own nodes count: an RMSNormalization of a state inside an If's branch (a fused
    probe's, say) is not the decoder's norm; a gain whose values were not loaded (a model read without its
    external data) gives no norm rather than an error."""
    from export_helpers import save_graph

    host = Toy(layers=2).graph()  # the decoder's norms decomposed: none of its own is recognised
    s = surgery.find_residual_stream(host)
    state = host.tensors()[s.hidden_states[1]]
    y = gs.Variable("branch_norm", dtype=np.float32)
    inner = gs.Node("RMSNormalization", inputs=[state, gs.Constant("g", np.ones(D, np.float32))], outputs=[y])
    branch = gs.Graph(nodes=[inner], outputs=[y], name="then")
    flag = gs.Constant("flag", np.array(True))
    host.nodes.append(
        gs.Node(
            "If",
            inputs=[flag],
            outputs=[gs.Variable("if_out", dtype=np.float32)],
            attrs={"then_branch": branch, "else_branch": branch},
        )
    )
    assert state.outputs and any(n.op == "RMSNormalization" for n in state.outputs)
    assert surgery.stream_norms(host, s) == [None] * 3
    path = save_graph(Toy(layers=2, opset=23, rms_op=True).model(), tmp_path / "toy.onnx", external=True)
    lazy = gs.import_onnx(onnx.load(str(path), load_external_data=False))
    assert surgery.stream_norms(lazy, surgery.find_residual_stream(lazy)) == [None] * 3
    loaded = gs.import_onnx(onnx.load(str(path)))
    assert [x is None for x in surgery.stream_norms(loaded, surgery.find_residual_stream(loaded))] == [
        False,
        False,
        True,
    ]


def test_cleanup_and_toposort():
    """gs's cleanup().toposort() (replacing the home-made toposort / unused-initializer removal)."""
    toy = Toy(layers=2)
    model = toy.model(shuffle=True)
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(model)
    graph = gs.import_onnx(model).toposort()
    onnx.checker.check_model(surgery.to_model(graph))
    s = surgery.find_residual_stream(graph)
    hs = surgery.add_stacked_hidden_states(graph, s)
    surgery.add_output(graph, hs)
    assert [o.name for o in graph.outputs] == ["logits", hs]
    stacking = {n.name for n in graph.nodes if n.name.startswith(surgery.PREFIX)}
    assert len(stacking) == 3 + 1  # an Unsqueeze per hidden state, one Concat
    graph.outputs = [o for o in graph.outputs if o.name != hs]  # nothing reads the stack any more
    graph.cleanup().toposort()
    model = surgery.to_model(graph)
    onnx.checker.check_model(model)
    assert [o.name for o in model.graph.output] == ["logits"]
    assert not stacking & {n.name for n in model.graph.node}
    assert not [t for t in model.graph.initializer if t.name.startswith(surgery.PREFIX)]
    np.testing.assert_array_equal(run(model, feeds())["logits"], run(toy.model(), feeds())["logits"])


def test_name_nodes_and_normalisation_nodes():
    toy = Toy(layers=2)
    graph = toy.graph()
    for n in graph.nodes[:5]:
        n.name = ""
    assert name_nodes(graph) == 5
    assert len({n.name for n in graph.nodes}) == len(graph.nodes)
    s = surgery.find_residual_stream(graph)
    norms = normalisation_nodes(graph, s)
    ops = [n.op for n in graph.nodes if n.name in set(norms)]
    assert len(norms) == (2 * 2 + 1) * 7  # 4 block norms + the final norm, 7 nodes each
    assert "MatMul" not in ops and ops.count("Add") == 5  # the eps adds, no residual add


def test_to_model_copies_the_weights_once(monkeypatch):
    """gs.export_onnx would copy every initializer twice (make_graph, then make_model); to_model
    exports big ones as stubs and copies them in once, and keeps the model-level fields."""
    toy = Toy(layers=1)
    model = toy.model()
    big = numpy_helper.from_array(np.arange(V * D * 100, dtype=np.float32).reshape(V * 100, D), "big_table")
    model.graph.initializer.append(big)
    model.graph.node.append(helper.make_node("Gather", ["big_table", "input_ids"], ["big_rows"], name="gbig"))
    model.graph.output.append(helper.make_tensor_value_info("big_rows", TensorProto.FLOAT, None))
    model.doc_string = "a toy"
    onnx.helper.set_model_props(model, {"origin": "test"})
    monkeypatch.setattr(surgery, "STUB_BYTES", 1024)
    exported = {}
    real_export = gs.export_onnx

    def export(g):
        m = real_export(g)
        exported.update({t.name: t.ByteSize() for t in m.graph.initializer})
        return m

    monkeypatch.setattr(gs, "export_onnx", export)
    out = surgery.to_model(gs.import_onnx(model), like=model)
    assert exported["big_table"] < 100 < big.ByteSize()  # what gs exported: a stub, no weight bytes
    got = next(t for t in out.graph.initializer if t.name == "big_table")
    np.testing.assert_array_equal(numpy_helper.to_array(got), numpy_helper.to_array(big))
    assert out.doc_string == "a toy" and {p.key: p.value for p in out.metadata_props} == {"origin": "test"}
    ids = feeds()["input_ids"]
    np.testing.assert_array_equal(run(out, feeds())["big_rows"], numpy_helper.to_array(big)[ids])


def test_unrecognisable_graphs_are_clear_errors(tmp_path):
    from export_helpers import mlp_graph

    mlp = gs.import_onnx(onnx.load(str(mlp_graph(tmp_path / "mlp.onnx"))))
    with pytest.raises(SurgeryError, match="token-embedding Gather"):
        surgery.find_residual_stream(mlp)
    with pytest.raises(SurgeryError, match="two per layer"):
        surgery.find_residual_stream(Toy(layers=2, extra_adds=1).graph())
    with pytest.raises(SurgeryError, match="does not belong to this model"):
        surgery.find_residual_stream(Toy(layers=2).graph(), expected_layers=3)
    with pytest.raises(SurgeryError, match="opset"):
        surgery.find_residual_stream(Toy(layers=2, opset=11).graph())
    with pytest.raises(SurgeryError, match="attention-mask"):
        surgery.find_residual_stream(Toy(layers=2, mask=False).graph())


def test_with_response_tokens_skips_a_fold_with_nothing_to_fold():
    """with_response_tokens: a (toy) response-probe fold runs only in a pass with a response token; in
    one without (a prompt's prefill) the carried state passes through unchanged and the label outputs
    are zeros, shapes as the fold's."""
    host = Toy(layers=1).graph()
    s = surgery.find_residual_stream(host)
    rmask = gs.Variable("response_mask", np.int64, ["batch", "sequence"])
    past = gs.Variable("r/past_s", np.float32, ["batch", D])
    host.inputs += [rmask, past]
    h = host.tensors()[s.hidden_states[-1]]
    w = np.random.default_rng(1).normal(size=(D, 2)).astype(np.float32)
    mf, mu, hm, total = (gs.Variable(f"fold_{i}", np.float32) for i in range(4))
    present = gs.Variable("r/present_s", np.float32, ["batch", D])
    logits = gs.Variable("r/logits", np.float32, ["batch", 2])
    nodes = [  # present = past + sum over the pass's response tokens of the last state; logits = present @ w
        gs.Node("Cast", inputs=[rmask], outputs=[mf], attrs={"to": TensorProto.FLOAT}),
        gs.Node("Unsqueeze", inputs=[mf, gs.Constant("ax", np.array([-1], np.int64))], outputs=[mu]),
        gs.Node("Mul", inputs=[h, mu], outputs=[hm]),
        gs.Node("ReduceSum", inputs=[hm, gs.Constant("ax1", np.array([1], np.int64))], outputs=[total],
                attrs={"keepdims": 0}),
        gs.Node("Add", inputs=[past, total], outputs=[present]),
        gs.Node("MatMul", inputs=[present, gs.Constant("w", w)], outputs=[logits]),
    ]  # fmt: skip
    host.nodes += nodes
    host.outputs += [logits, present]
    added = surgery.with_response_tokens(host, s, nodes, ["r/logits", "r/present_s"], {"r/present_s": "r/past_s"})
    assert [n.op for n in added].count("If") == 1
    host.cleanup().toposort()
    model = surgery.to_model(host)
    onnx.checker.check_model(model)
    f = feeds(B=2, T=4)
    state = np.random.default_rng(2).normal(size=(2, D)).astype(np.float32)
    on = np.zeros((2, 4), np.int64)
    on[0, 2:], on[1, 3] = 1, 1
    got = run(model, f | {"response_mask": on, "r/past_s": state})
    assert got["r/present_s"].shape == (2, D) and not np.allclose(got["r/present_s"], state)
    np.testing.assert_allclose(got["r/logits"], got["r/present_s"] @ w, rtol=1e-5, atol=1e-5)
    off = run(model, f | {"response_mask": np.zeros((2, 4), np.int64), "r/past_s": state})
    np.testing.assert_array_equal(off["r/present_s"], state)  # nothing folded: the state unchanged
    assert off["r/logits"].shape == (2, 2) and not off["r/logits"].any()
    with pytest.raises(SurgeryError, match="must be \\[batch, C\\]"):
        bad = Toy(layers=1).graph()
        bs = surgery.find_residual_stream(bad)
        bad.inputs.append(gs.Variable("response_mask", np.int64, ["batch", "sequence"]))
        odd = gs.Variable("r/odd", np.float32, ["batch", "sequence", D])
        bad.nodes.append(gs.Node("Identity", inputs=[bad.tensors()[bs.hidden_states[-1]]], outputs=[odd]))
        bad.outputs.append(odd)
        surgery.with_response_tokens(bad, bs, bad.nodes[-1:], ["r/odd"], {})
