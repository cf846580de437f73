"""--weights int4/int8: the block quantisers, the MatMulNBits transformation on a tiny generated
graph (ONNX Runtime against numpy), and a quantised export of the tiny model validated end to end."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from singlepass.errors import SinglepassError
from singlepass.export import quantize as Q


def q4_1_weights(n: int, k: int, seed: int = 0) -> np.ndarray:
    """Weights [N, K] laid out as GGUF Q4_1 blocks: d * q + m, q in 0..15 (both ends used)."""
    rng = np.random.default_rng(seed)
    q = rng.integers(0, 16, (n, k // 32, 32)).astype(np.float32)
    q[..., 0], q[..., 1] = 0, 15
    d = rng.uniform(0.01, 0.05, (n, k // 32, 1)).astype(np.float32)
    z = rng.integers(2, 14, (n, k // 32, 1)).astype(np.float32)
    return (d * (q - z)).reshape(n, k)  # m = -z * d: an offset the integer zero point holds exactly


def test_4bit_carries_q4_1_blocks_exactly_when_the_offset_is_a_multiple_of_the_scale():
    w = q4_1_weights(8, 64)
    packed, scales, zp, deq = Q.quantize_4bit(w)
    assert packed.shape == (8, 2, 16) and scales.shape == (8, 2) and zp.shape == (8, 1)
    np.testing.assert_allclose(deq.reshape(8, 64), w, atol=1e-6)
    np.testing.assert_array_equal(Q.dequantize(packed, scales, zp, 4, 64), deq.reshape(8, 64))


def test_4bit_error_is_within_half_a_step_for_any_weights():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((16, 96)).astype(np.float32) * 0.1  # K = 96: three blocks
    w[0, :32] = np.linspace(0.5, 0.6, 32)  # a block far from zero: its range is widened to include 0
    packed, scales, zp, deq = Q.quantize_4bit(w)
    step = scales[..., None]  # [N, nb, 1]
    x = w.reshape(16, 3, 32)
    assert (np.abs(deq - x) <= step + 1e-6).all()  # half a step from rounding q, half from rounding the offset
    assert np.abs(deq - x).max() < 0.1
    np.testing.assert_array_equal(Q.dequantize(packed, scales, zp, 4, 96), deq.reshape(16, 96))


def q4_1_float_offsets(n: int, k: int, seed: int = 0) -> np.ndarray:
    """GGUF Q4_1 blocks as the file has them: d * q + m with a float offset m (not a whole step)."""
    rng = np.random.default_rng(seed)
    q = rng.integers(0, 16, (n, k // 32, 32)).astype(np.float32)
    q[..., 0], q[..., 1] = 0, 15
    d = rng.uniform(0.01, 0.05, (n, k // 32, 1)).astype(np.float32)
    m = -d * rng.uniform(2, 13, (n, k // 32, 1)).astype(np.float32)
    return (d * q + m).reshape(n, k)


def test_gptq_with_uncorrelated_inputs_is_round_to_nearest():
    """With X^T X = I no column's error can be compensated by another: GPTQ's codes are the nearest
    ones, on the same grid."""
    w = q4_1_float_offsets(24, 96)
    near = Q.quantize_4bit(w)
    gptq = Q.gptq_4bit(w, np.eye(96, dtype=np.float32))
    for a, b in zip(near, gptq):
        np.testing.assert_array_equal(a, b)


def test_gptq_lowers_the_layer_output_error_on_correlated_inputs():
    """The oracle is the quantity GPTQ minimises: the output error |X (W' - W)^T|^2 on the calibration
    inputs, and it must beat round-to-nearest on the same grid (same scales and zero points)."""
    rng = np.random.default_rng(3)
    n, k, t = 32, 128, 2000
    w = q4_1_float_offsets(n, k, seed=4)
    x = rng.standard_normal((t, 8)) @ rng.standard_normal((8, k)) + rng.standard_normal((t, k)) * 0.3 + 1.0
    x = x.astype(np.float32)  # [T, K]: correlated inputs with a mean, like a normed residual stream's
    near = Q.quantize_4bit(w)
    gptq = Q.gptq_4bit(w, x.T @ x)
    np.testing.assert_array_equal(near[1], gptq[1])  # the grid is the GGUF's, untouched
    np.testing.assert_array_equal(near[2], gptq[2])
    assert gptq[0].dtype == np.uint8 and gptq[0].shape == near[0].shape

    def out_err(deq):
        return float(((x @ (deq.reshape(n, k) - w).T) ** 2).sum())

    assert out_err(gptq[3]) < 0.5 * out_err(near[3])
    np.testing.assert_array_equal(Q.dequantize(gptq[0], gptq[1], gptq[2], 4, k), gptq[3].reshape(n, k))
    # several matrices of one shape, each with its own Hessian, at once: each as it is rounded alone
    more = [w * (1 + g) for g in range(3)]
    hs = [x.T @ x, np.eye(w.shape[1], dtype=np.float32), (x[:7].T @ x[:7])]  # the last one rank-deficient
    for one, together in zip([Q.gptq_4bit(m, h) for m, h in zip(more, hs)], Q.gptq_4bit_many(more, hs)):
        for u, v in zip(one, together):
            np.testing.assert_array_equal(u, v)
    with pytest.raises(SinglepassError, match="one shape"):
        Q.gptq_4bit_many([w, w[:-1]], hs[:2])
    with pytest.raises(SinglepassError, match="multiple of 32"):
        Q.gptq_4bit(w[:, :100], np.eye(100))


def test_8bit_carries_q8_0_blocks_exactly():
    rng = np.random.default_rng(2)
    d = rng.uniform(0.001, 0.01, (4, 2, 1)).astype(np.float32)
    q = rng.integers(-127, 128, (4, 2, 32)).astype(np.float32)
    q[..., 0] = 127
    w = (d * q).reshape(4, 64)
    packed, scales, zp, deq = Q.quantize_8bit(w)
    assert zp is None and packed.dtype == np.uint8
    np.testing.assert_array_equal(deq.reshape(4, 64), w)
    np.testing.assert_array_equal(Q.dequantize(packed, scales, None, 8, 64), w)


def _matmul_graph(w_kn: np.ndarray, tied: np.ndarray) -> onnx.ModelProto:
    """x [B, T, K] -> MatMul(x, W [K, N]) -> MatMul(., Transpose(E [V, N])) (a tied head) -> y."""
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"], name="proj"),
        helper.make_node("Transpose", ["E"], ["Et"], perm=[1, 0]),
        helper.make_node("MatMul", ["h", "Et"], ["y"], name="head"),
    ]
    k, n = w_kn.shape
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "T", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "T", tied.shape[0]])],
        [numpy_helper.from_array(w_kn, "W"), numpy_helper.from_array(tied, "E")],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("weights", ["int4", "int8"])
def test_matmulnbits_layout_matches_numpy(monkeypatch, weights):
    """The packed blobs, scales and zero points mean what ONNX Runtime computes: with float
    activations (accuracy level 0) the graph equals x @ dequantised weights."""
    monkeypatch.setattr(Q, "ACCURACY_LEVEL", 0)
    rng = np.random.default_rng(3)
    w_kn = rng.standard_normal((64, 96)).astype(np.float32) * 0.1  # K=64, N=96
    emb = rng.standard_normal((40, 96)).astype(np.float32) * 0.1  # tied head: V=40, width 96 (K of the head)
    graph = gs.import_onnx(_matmul_graph(w_kn, emb))
    s = Q.quantize_weights(graph, weights, list(graph.nodes), lm_head="head")
    graph.cleanup().toposort()
    model = gs.export_onnx(graph)
    ops = [n.op_type for n in model.graph.node]
    assert ops == ["MatMulNBits", "MatMulNBits"] and s.matmuls == 2
    bits = {n.name: next(a.i for a in n.attribute if a.name == "bits") for n in model.graph.node}
    assert bits == ({"proj": 4, "head": 8} if weights == "int4" else {"proj": 8, "head": 8})
    x = rng.standard_normal((2, 3, 64)).astype(np.float32)
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    qw = {n.name: n for n in model.graph.node}
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}

    def deq(node) -> np.ndarray:  # [N, K]
        a = {x.name: x.i for x in node.attribute}
        zp = inits[node.input[3]] if len(node.input) > 3 else None
        return Q.dequantize(inits[node.input[1]], inits[node.input[2]], zp, a["bits"], a["K"])

    want = (x @ deq(qw["proj"]).T) @ deq(qw["head"]).T
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    exact = (x @ w_kn) @ emb.T
    assert np.abs(want - exact).max() < 0.15 * np.abs(exact).max()  # and close to the fp32 function


def test_fp32_leaves_the_graph_alone_and_bad_precision_is_refused():
    graph = gs.import_onnx(_matmul_graph(np.ones((64, 32), np.float32), np.ones((8, 32), np.float32)))
    assert Q.quantize_weights(graph, "fp32", list(graph.nodes), "head").matmuls == 0
    assert [n.op for n in graph.nodes] == ["MatMul", "Transpose", "MatMul"]
    with pytest.raises(SinglepassError, match="int3"):
        Q.quantize_weights(graph, "int3", list(graph.nodes), "head")


def test_int4_export_of_the_tiny_model(tmp_path, tiny_backbone):
    """The whole path: quantised graph, weights named after their parameters, validation against
    the reference holding the same weights, the runtime generating from it."""
    from export_helpers import make_probe

    from singlepass.export.pipeline import export_artifact
    from singlepass.runtime.api import generate

    probe = make_probe(tmp_path / "p", tiny_backbone, "gate")
    art = tmp_path / "art"
    s = export_artifact(art, [f"{probe}:safety"], backbone=tiny_backbone, weights="int4", log=lambda m: None)
    assert s["weights"] == "int4"
    m = json.loads((art / "manifest.json").read_text())
    w = m["graph"]["weights"]
    linear = sum(1 for n, mod in tiny_backbone.model.named_modules() if type(mod).__name__ == "Linear")
    assert w["weights"] == "int4" and w["matmuls"] == linear and len(w["params"]) == linear
    assert w["params"]["lm_head.weight"] == 8 and set(w["params"].values()) == {4, 8}
    assert w["bytes_after"] < w["bytes_before"] / 3
    assert m["validation"]["passed"] and m["validation"]["precision"] == "int4"
    L = tiny_backbone.num_layers  # export/ortfuse.py: ONNX Runtime's fused kernels, validated with the rest
    assert m["graph"]["fused_kernels"] == {"skip_rmsnorm": 2 * L, "packed_qkv_rotary": L}
    assert w["rounding"] == "gptq" and w["calibration"]["data"] == "alpaca_noinput"
    assert w["calibration"]["rows"] == 256 and w["calibration"]["tokens"] > 256
    ref = Q.graph_weights(art)
    assert set(ref) == set(w["params"])
    for name in ("mlp.down_proj", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):  # q/k/v: packed
        q = tiny_backbone.model.get_submodule(f"model.layers.0.{name}").weight.detach().numpy()
        assert ref[f"model.layers.0.{name}.weight"].shape == q.shape
        assert 0 < np.abs(ref[f"model.layers.0.{name}.weight"] - q).max() < 0.1, name
    out = generate(str(art), "hello there", max_new_tokens=4)
    assert 1 <= len(out.token_ids) <= 4 and "safety" in out.labels
    # the prompt probe runs on prefill passes only: an If whose decode branch returns zeros
    assert m["graph"]["min_prefill_tokens"] == 2 and "2+ tokens only" in m["graph"]["probes_in_decode"]
    model = onnx.load(str(art / "model.onnx"), load_external_data=False)
    # one If per block of hidden states (the probe's stage 1 for those layers, prefill passes only) and one for the rest
    kinds = [n.op_type for n in model.graph.node]
    from singlepass.export.fuse import LAYERS_PER_STAGE_IF

    blocks = -(-(tiny_backbone.num_layers + 1) // LAYERS_PER_STAGE_IF)  # an If per block of hidden states
    assert kinds.count("If") == blocks + 1
    assert kinds.count("MatMulNBits") == linear - 2 * L and "RotaryEmbedding" not in kinds  # q, k, v: one
    from singlepass.runtime.api import load
    from singlepass.runtime.passes import decode_one_token, labels_from, prefill

    rt = load(art, backend="cpu", threads=1)
    one = rt.encode("hello there")[0]
    o1, st = prefill(rt.backend, rt.manifest, [one])
    probs = ("safety/probs",)  # the graph's own output (the runtime's labels read the logits)
    o2, _ = prefill(rt.backend, rt.manifest, [one[-1:]], extra=probs)  # a one-token prompt is padded to 2 columns
    assert o2["safety/probs"][0].sum() == pytest.approx(1.0) and st.ids.shape[1] == len(one)
    o3, _ = decode_one_token(rt.backend, rt.manifest, st, np.array([5]), extra=probs)
    assert not o3["safety/probs"].any() and labels_from(rt.manifest, o1)[0]["safety"].score > 0
    with pytest.raises(SinglepassError, match="weights must be one of"):
        export_artifact(tmp_path / "bad", [f"{probe}:safety"], backbone=tiny_backbone, weights="int3")


def _outer_reads(node) -> set[str]:
    """The tensors an If (or any node with subgraphs) reads from the enclosing scope."""
    made, read = set(), set(node.input)
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            for n in a.g.node:
                read |= _outer_reads(n)
                made |= set(n.output)
            made |= {t.name for t in a.g.initializer}
    return read - made


@pytest.mark.parametrize("method", ["pooling", "gate", "mha"])
def test_a_prompt_probe_runs_stage_1_after_each_block_of_layers(tmp_path, tiny_backbone, method):
    """In a prefill-only artifact a prompt probe's stage 1 runs in an If per block of layers, right after
    the block: pooling and the gate on each block's layers at once, the MHA one layer at a time (one
    ``Attention`` node each, opset 23), in one form for every pass size. It reads the decoder's own RMS
    normalisation of every layer that has one (output 0 of the fused ``SkipSimplifiedLayerNormalization``
    / the first layer's ``RMSNormalization``), the state only of the last (the final norm's output).
    Export validation passes; one prompt's label is the same alone and in a longer, padded batch."""
    from export_helpers import make_probe

    from singlepass.export import fuse
    from singlepass.export.pipeline import export_artifact
    from singlepass.runtime.api import load
    from singlepass.runtime.passes import prefill

    params = {"factor": 8, "heads": 2} if method == "mha" else {}
    probe = make_probe(tmp_path / "p", tiny_backbone, method, **params)
    art = tmp_path / "art"
    export_artifact(art, [f"{probe}:safety"], backbone=tiny_backbone, weights="int8", log=lambda m: None)
    v = json.loads((art / "validation.json").read_text())
    assert v["passed"] and "safety/probs" in {c["tensor"] for c in v["checks"]}
    model = onnx.load(str(art / "model.onnx"))  # the norms' gains are read
    from singlepass.export.surgery import find_residual_stream, producer, stream_norms

    graph = gs.import_onnx(model)
    stream = find_residual_stream(graph)
    norms = stream_norms(graph, stream)
    assert [n is None for n in norms] == [False] * stream.num_layers + [True]
    kinds = {producer(graph.tensors()[n.tensor]).op for n in norms if n is not None}
    assert kinds == {"RMSNormalization", "SkipSimplifiedLayerNormalization"}
    read = [n.tensor for n in norms[:-1]] + stream.hidden_states[-1:]  # what the probe reads of each layer
    states = set(read)
    ifs = [x for x in model.graph.node if x.op_type == "If"]
    assert not any(_outer_reads(x) & set(stream.hidden_states[:-1]) for x in ifs)
    reads = [_outer_reads(x) & states for x in ifs]
    # each block of layers' stage 1 in an If of its own (it reads those layers' states and no other) ...
    k, n = fuse.LAYERS_PER_STAGE_IF, len(states)
    assert sorted(len(r) for r in reads) == sorted([0] + [min(k, n - i) for i in range(0, n, k)])
    assert set().union(*reads) == states
    (outer,) = [x for x, r in zip(ifs, reads) if not r]  # ... and prefill passes only, in one form
    then = next(a.g for a in outer.attribute if a.name == "then_branch")
    assert [x.op_type for x in then.node].count("If") == 0
    stage_ops = [y.op_type for x in ifs for a in x.attribute if a.name == "then_branch" for y in a.g.node]
    assert stage_ops.count("Attention") == (n if method == "mha" else 0)
    rt = load(art, backend="cpu", threads=1)
    one = rt.encode("hello there, how are you today?")[0]
    probs = ("safety/probs",)
    alone, _ = prefill(rt.backend, rt.manifest, [one], extra=probs)
    filler = (one * 40)[:200]
    padded, _ = prefill(rt.backend, rt.manifest, [one, filler], extra=probs)  # 2 x 200 tokens, row 0 padded
    np.testing.assert_allclose(padded["safety/probs"][0], alone["safety/probs"][0], atol=1e-4)


def test_calibration_statistics_and_their_cache(tmp_path, tiny_backbone, monkeypatch):
    """X^T X of each 4-bit Linear's input (q/k/v and gate/up share theirs), checked against the
    inputs captured separately; the GPTQ codes are cached per model and calibration data."""
    import torch

    from singlepass.export import calibrate as C
    from singlepass.models.extract import MIN_SHARED_PREFIX, shared_prefix

    ids = C.calibration_ids(tiny_backbone.tokenizer, "alpaca_noinput", 8)
    assert len(ids) == 8 and all(len(r) > 3 for r in ids)
    assert shared_prefix(ids) >= MIN_SHARED_PREFIX  # the chat template's first tokens run once
    hess = C.input_hessians(tiny_backbone.model, ids, progress=False)
    # without a shared prefix (a token of each row's own first): every token runs in the batches
    own = C.input_hessians(tiny_backbone.model, [[i + 1] + r for i, r in enumerate(ids)], progress=False)
    linears = C.quantised_linears(tiny_backbone.model)
    assert set(hess) == set(linears) and "lm_head.weight" not in linears
    at = "model.layers.1.self_attn."
    assert hess[at + "q_proj.weight"] is hess[at + "k_proj.weight"] is hess[at + "v_proj.weight"]
    assert hess[at + "o_proj.weight"] is not hess[at + "q_proj.weight"]
    seen = []
    h = linears["model.layers.1.mlp.down_proj.weight"].register_forward_hook(lambda m, i, o: seen.append(i[0][0]))
    with torch.no_grad():
        for r in ids:
            tiny_backbone.model(torch.tensor([r]))
    h.remove()
    x = torch.cat(seen)  # [tokens, K]
    torch.testing.assert_close(hess["model.layers.1.mlp.down_proj.weight"], x.T @ x, rtol=1e-4, atol=1e-4)
    seen.clear()
    h = linears["model.layers.1.mlp.down_proj.weight"].register_forward_hook(lambda m, i, o: seen.append(i[0][0]))
    with torch.no_grad():
        for i, r in enumerate(ids):
            tiny_backbone.model(torch.tensor([[i + 1] + r]))
    h.remove()
    x = torch.cat(seen)  # [tokens, K]
    torch.testing.assert_close(own["model.layers.1.mlp.down_proj.weight"], x.T @ x, rtol=1e-4, atol=1e-4)

    logs = []
    a, info = C.gptq_rounded(tiny_backbone, "alpaca_noinput", 8, tmp_path, log=logs.append, progress=False)
    b, info2 = C.gptq_rounded(tiny_backbone, "alpaca_noinput", 8, tmp_path, log=logs.append, progress=False)
    assert "from the cache" in logs[-1] and info2 == info and info["tokens"] == sum(map(len, ids))
    assert set(a) == set(linears)
    for name in a:
        for u, v in zip(a[name], b[name]):
            np.testing.assert_array_equal(u, v)
    monkeypatch.setattr(C, "GPTQ_GROUP_BYTES", 1)  # each matrix rounded alone: the same codes
    alone, _ = C.gptq_rounded(tiny_backbone, "alpaca_noinput", 8, tmp_path / "alone", progress=False)
    for name in a:
        for u, v in zip(a[name], alone[name]):
            np.testing.assert_array_equal(u, v)
    c, _ = C.gptq_rounded(tiny_backbone, "alpaca_noinput", 9, tmp_path, log=logs.append, progress=False)
    assert "from the cache" not in logs[-1]  # other calibration data: another entry
    with pytest.raises(SinglepassError, match="--calibration nosuchset.*--calibration none"):
        C.calibration_ids(tiny_backbone.tokenizer, "nosuchset", 8)
    with pytest.raises(SinglepassError, match="--calibration-rows must be >= 1"):
        C.calibration_ids(tiny_backbone.tokenizer, "alpaca_noinput", 0)


def test_int4_export_without_calibration_rounds_to_nearest(tmp_path, tiny_backbone):
    """--calibration none (round to nearest), and --fused-kernels none (the exporter's ops)."""
    from export_helpers import make_probe

    from singlepass.export.pipeline import export_artifact

    probe = make_probe(tmp_path / "p", tiny_backbone, "pooling")
    art = tmp_path / "art"
    kw = {"backbone": tiny_backbone, "calibration": "none", "log": lambda m: None}
    with pytest.raises(SinglepassError, match="--fused-kernels must be one of auto, none"):
        export_artifact(art, [f"{probe}:safety"], fused_kernels="all", **kw)
    export_artifact(art, [f"{probe}:safety"], fused_kernels="none", **kw)
    m = json.loads((art / "manifest.json").read_text())
    w = m["graph"]["weights"]
    assert w["weights"] == "int4" and w["rounding"] == "nearest" and w["calibration"] == {}
    assert m["graph"]["fused_kernels"] == {} and m["validation"]["passed"]
    kinds = [n.op_type for n in onnx.load(str(art / "model.onnx"), load_external_data=False).graph.node]
    assert "RotaryEmbedding" in kinds and "SkipSimplifiedLayerNormalization" not in kinds
    q = tiny_backbone.model.get_submodule("model.layers.0.mlp.up_proj").weight.detach().numpy()
    np.testing.assert_array_equal(
        Q.graph_weights(art)["model.layers.0.mlp.up_proj.weight"], Q.quantize_4bit(q)[3].reshape(q.shape)
    )
