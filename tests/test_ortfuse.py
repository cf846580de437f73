"""ONNX Runtime's fused kernels (export/ortfuse.py), each rewrite on a tiny generated graph: the
rewritten graph computes what the original did, with fewer kernels, and keeps the tensor names
the probes read; graphs without the whole pattern are left as they are."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest

from singlepass.errors import SinglepassError
from singlepass.export import ortfuse
from singlepass.export.quantize import quantize_4bit
from singlepass.export.surgery import to_model

B, T, K, H, KV, D = 3, 5, 64, 4, 2, 16
POSITIONS = 32


def run(graph: gs.Graph, feed: dict) -> dict:
    model = to_model(graph.cleanup().toposort())
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feed)))


def ops(graph: gs.Graph) -> list[str]:
    return sorted(n.op for n in graph.nodes)


# --- Add + RMSNormalization -> SkipSimplifiedLayerNormalization ------------------------------------


def norm_graph() -> gs.Graph:
    """s = a + b; y = RMSNorm(s) * w, with s an output too (the residual stream a probe reads)."""
    a, b = (gs.Variable(n, np.float32, ["batch", "sequence", K]) for n in ("a", "b"))
    s = gs.Variable("residual_sum", np.float32, ["batch", "sequence", K])
    y = gs.Variable("normed", np.float32, ["batch", "sequence", K])
    w = gs.Constant("w", np.random.default_rng(1).standard_normal(K).astype(np.float32))
    nodes = [
        gs.Node("Add", inputs=[a, b], outputs=[s]),
        gs.Node("RMSNormalization", attrs={"epsilon": 1e-5, "axis": -1}, inputs=[s, w], outputs=[y]),
    ]
    return gs.Graph(nodes, inputs=[a, b], outputs=[y, s], opset=23)


def test_skip_rmsnorm_fuses_the_add_and_keeps_the_sum_by_name():
    rng = np.random.default_rng(0)
    feed = {n: rng.standard_normal((2, 3, K)).astype(np.float32) for n in ("a", "b")}
    before = run(norm_graph(), feed)
    graph = norm_graph()
    assert ortfuse.skip_rmsnorm(graph) == 1
    assert ops(graph) == ["SkipSimplifiedLayerNormalization"]
    after = run(graph, feed)
    np.testing.assert_allclose(after["normed"], before["normed"], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(after["residual_sum"], before["residual_sum"])


def test_skip_rmsnorm_leaves_a_broadcast_add_alone():
    graph = norm_graph()  # b [1, 1, K]: a per-channel shift broadcast over the tokens, not a residual
    graph.inputs[1].shape = [1, 1, K]
    assert ortfuse.skip_rmsnorm(graph) == 0
    graph.nodes[0].inputs[1] = gs.Constant("bias", np.ones(K, np.float32))  # a constant bias
    assert ortfuse.skip_rmsnorm(graph) == 0
    assert ops(graph) == ["Add", "RMSNormalization"]


# --- q/k/v MatMulNBits + RotaryEmbedding -> packed GroupQueryAttention -----------------------------


def nbits(name: str, x: gs.Tensor, n: int, rng) -> tuple[gs.Node, gs.Variable]:
    packed, scales, zp, _ = quantize_4bit(rng.standard_normal((n, K)).astype(np.float32))
    out = gs.Variable(f"{name}_out", np.float32, ["batch", "sequence", n])
    node = gs.Node(
        "MatMulNBits",
        name=name,
        domain="com.microsoft",
        attrs={"K": K, "N": n, "bits": 4, "block_size": 32, "accuracy_level": 4},
        inputs=[x, gs.Constant(f"{name}/B", packed), gs.Constant(f"{name}/scales", scales.reshape(-1)),
                gs.Constant(f"{name}/zero_points", zp)],
        outputs=[out],
    )  # fmt: skip
    return node, out


def attention_graph(layers: int = 2, position_input: str = "position_ids") -> gs.Graph:
    """``layers`` x (q/k/v MatMulNBits of x, RotaryEmbedding of q and k from cos/sin computed from
    ``position_ids`` [B, T], GroupQueryAttention over the past buffers), as export/kvcache.py and
    export/quantize.py leave a layer."""
    rng = np.random.default_rng(0)
    x = gs.Variable("x", np.float32, ["batch", "sequence", K])
    ids = gs.Variable(position_input, np.int64, ["batch", "sequence"])
    mask = gs.Variable("attention_mask", np.int64, ["batch", "total"])
    inputs, outputs, nodes = [x, ids, mask], [], []

    def v(name, dtype=np.float32):
        return gs.Variable(name, dtype)

    def node(op, ins, out, **attrs):
        nodes.append(gs.Node(op, attrs=attrs, inputs=ins, outputs=[out]))
        return out

    inv_freq = gs.Constant("inv_freq", (1.0 / 10000 ** (np.arange(0, D, 2) / D)).astype(np.float32))
    pos = node("Unsqueeze", [ids, gs.Constant("ax", np.array([-1]))], v("pos", np.int64))  # [B, T, 1]
    freqs = node("Mul", [node("Cast", [pos], v("posf"), to=1), inv_freq], v("freqs"))  # [B, T, D/2]
    msum = node("ReduceSum", [mask, gs.Constant("ax1", np.array([1]))], v("msum", np.int64), keepdims=0)
    last = node("Sub", [msum, gs.Constant("one", np.array(1))], v("last", np.int64))
    seqlens = node("Cast", [last], v("seqlens", np.int32), to=6)  # [B]: sum(mask) - 1
    width = node("Shape", [mask], v("w1", np.int64), start=1, end=2)
    total = node("Cast", [node("Squeeze", [width, gs.Constant("ax0", np.array([0]))], v("w0", np.int64))],
                 v("total", np.int32), to=6)  # fmt: skip
    for i in range(layers):  # each layer its own Cos/Sin, as torch's exporter writes them
        cos, sin = v(f"cos{i}"), v(f"sin{i}")
        node("Cos", [freqs], cos)
        node("Sin", [freqs], sin)
        mq, q = nbits(f"q{i}", x, H * D, rng)
        mk, k = nbits(f"k{i}", x, KV * D, rng)
        mv, val = nbits(f"v{i}", x, KV * D, rng)
        rq, rk = v(f"q{i}_rot"), v(f"k{i}_rot")
        pk, pv = (
            gs.Variable(f"past_key_values.{i}.{n}", np.float32, ["batch", KV, "cap", D]) for n in ("key", "value")
        )
        ck, cv = (gs.Variable(f"present.{i}.{n}", np.float32, ["batch", KV, "cap", D]) for n in ("key", "value"))
        out = gs.Variable(f"out{i}", np.float32, ["batch", "sequence", H * D])
        gqa = gs.Node(
            "GroupQueryAttention",
            domain="com.microsoft",
            attrs={"num_heads": H, "kv_num_heads": KV},
            inputs=[rq, rk, val, pk, pv, seqlens, total],
            outputs=[out, ck, cv],
        )
        nodes += [mq, mk, mv, gqa]
        node("RotaryEmbedding", [q, cos, sin], rq, num_heads=H, interleaved=0)
        node("RotaryEmbedding", [k, cos, sin], rk, num_heads=KV, interleaved=0)
        inputs += [pk, pv]
        outputs += [out, ck, cv]
    graph = gs.Graph(nodes, inputs=inputs, outputs=outputs, opset=23)
    graph.import_domains = None
    return graph.toposort()


def prompt_feed(layers: int = 2) -> dict:
    """A right-padded prefill of rows of 5, 2 and 4 tokens into empty caches."""
    rng = np.random.default_rng(1)
    lens = [5, 2, 4]
    mask = np.array([[1] * n + [0] * (T - n) for n in lens], np.int64)
    feed = {
        "x": rng.standard_normal((B, T, K)).astype(np.float32),
        "position_ids": np.tile(np.arange(T), (B, 1)).astype(np.int64),
        "attention_mask": mask,
    }
    for i in range(layers):
        feed[f"past_key_values.{i}.key"] = np.zeros((B, KV, 0, D), np.float32)
        feed[f"past_key_values.{i}.value"] = np.zeros((B, KV, 0, D), np.float32)
    return feed, lens


def test_pack_qkv_rotary_packs_every_layer_and_attends_alike():
    feed, lens = prompt_feed()
    before = run(attention_graph(), feed)
    graph = attention_graph()
    assert ortfuse.pack_qkv_rotary(graph, POSITIONS) == 2
    kinds = ops(graph)
    assert kinds.count("MatMulNBits") == 2 and "RotaryEmbedding" not in kinds  # one per layer: q, k, v packed
    gqa = [n for n in graph.nodes if n.op == "GroupQueryAttention"]
    assert all(n.attrs["do_rotary"] == 1 for n in gqa)
    assert gqa[0].inputs[7] is gqa[1].inputs[7]  # the layers' equal cos tables: one constant
    assert gqa[0].inputs[7].values.shape == (POSITIONS, D // 2)
    after = run(graph, feed)
    for name in before:
        for b, n in enumerate(lens):  # each row's valid tokens (padding positions are not outputs)
            got, want = (
                (after[name][b, :, :n] if "present" in name else after[name][b, :n]),
                (before[name][b, :, :n] if "present" in name else before[name][b, :n]),
            )
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=name)


def test_pack_qkv_rotary_decodes_alike_within_the_tables():
    """A decode step after the prefill, from cache buffers of capacity C (the runtime's spare
    columns): each row's one new token, at its own position, attends alike packed or not; a
    capacity beyond the tables' rows is what ONNX Runtime refuses (the runtime caps the in-place
    buffers at the artifact's max_total_length, <= the model's positions)."""
    feed, lens = prompt_feed()
    pre = run(attention_graph(), feed)
    rng = np.random.default_rng(2)
    C = POSITIONS  # the widest capacity the tables allow
    step = {"x": rng.standard_normal((B, 1, K)).astype(np.float32), "position_ids": np.array(lens)[:, None]}
    step["attention_mask"] = np.array([[1] * (n + 1) + [0] * (C - n - 1) for n in lens], np.int64)
    for i in range(2):
        for kind in ("key", "value"):
            buf = np.zeros((B, KV, C, D), np.float32)
            buf[:, :, :T] = pre[f"present.{i}.{kind}"]
            step[f"past_key_values.{i}.{kind}"] = buf
    before = run(attention_graph(), step)
    graph = attention_graph()
    assert ortfuse.pack_qkv_rotary(graph, POSITIONS) == 2
    after = run(graph, step)
    for i in range(2):
        np.testing.assert_allclose(after[f"out{i}"], before[f"out{i}"], rtol=1e-4, atol=1e-4)
        for b, n in enumerate(lens):  # the new token's key, rotated at position n, in column n
            np.testing.assert_allclose(
                after[f"present.{i}.key"][b, :, n], before[f"present.{i}.key"][b, :, n], rtol=1e-4, atol=1e-4
            )
    wide = {**step, "attention_mask": np.pad(step["attention_mask"], ((0, 0), (0, 1)))}
    for i in range(2):
        for kind in ("key", "value"):
            wide[f"past_key_values.{i}.{kind}"] = np.pad(
                step[f"past_key_values.{i}.{kind}"], ((0, 0),) * 2 + ((0, 1), (0, 0))
            )
    with pytest.raises(Exception, match="cos_cache"):
        run(graph, wide)


def test_pack_qkv_rotary_leaves_graphs_it_cannot_convert_whole():
    # a length-dependent rope (tables at positions 0..P-1 would not be the graph's)
    graph = attention_graph()
    assert ortfuse.pack_qkv_rotary(graph, POSITIONS, "dynamic") == 0
    # one layer's k without RotaryEmbedding: all layers or none
    graph = attention_graph()
    rot_k = next(n for n in graph.nodes if n.op == "RotaryEmbedding" and n.attrs["num_heads"] == KV)
    gqa = rot_k.outputs[0].outputs[0]
    gqa.inputs[1] = rot_k.inputs[0]
    graph.cleanup()
    assert ortfuse.pack_qkv_rotary(graph, POSITIONS) == 0
    assert ops(graph).count("MatMulNBits") == 6
    # cos/sin from an input other than position_ids
    graph = attention_graph(position_input="positions")
    assert ortfuse.pack_qkv_rotary(graph, POSITIONS) == 0


@pytest.mark.parametrize(
    "config, expected",
    [
        ({}, None),
        ({"rope_scaling": {"rope_type": "llama3"}}, "llama3"),
        ({"rope_scaling": {"type": "dynamic"}}, "dynamic"),
        ({"rope_parameters": {"rope_type": "default"}}, "default"),
        ({"rope_parameters": {"full_attention": {"rope_type": "default"}}}, "per-layer"),
    ],
)
def test_rope_type(config, expected):
    assert ortfuse.rope_type(SimpleNamespace(**config)) == expected


def test_apply_keeps_portable_artifacts_plain_onnx():
    graph, cfg = norm_graph(), SimpleNamespace(max_position_embeddings=POSITIONS)
    assert ortfuse.apply(graph, cfg, "auto", onnxruntime_only=False) == {}
    assert ortfuse.apply(graph, cfg, "none", onnxruntime_only=True) == {}
    assert ops(graph) == ["Add", "RMSNormalization"]
    with pytest.raises(SinglepassError, match="--fused-kernels must be one of auto, none, not 'all'"):
        ortfuse.apply(graph, cfg, "all", onnxruntime_only=True)
    assert ortfuse.apply(graph, cfg, "auto", onnxruntime_only=True) == {"skip_rmsnorm": 1}
