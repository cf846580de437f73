"""The residual-stream surgery on graphs with ONNX Runtime's fused CPU ops.

1. A tiny generated decoder in the structure of onnxruntime-genai's model builder: the residual
   adds fused into ``com.microsoft.SkipSimplifiedLayerNormalization`` (the stream is its output 3,
   the final norm's fused sum is not exposed), the first norm a default-domain
   ``SimplifiedLayerNormalization``, 4-bit ``MatMulNBits`` projections and lm_head, optionally a
   ``GatherBlockQuantized`` embedding; checked against a numpy reference.
2. The builder's own fp32 and int4 graphs of the tiny Llama (built once per session): the stream,
   the stacked hidden states against transformers' ``output_hidden_states`` at batch 1, and
   ``singlepass export --onnx`` end to end.
"""

import copy
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from singlepass.export import surgery
from singlepass.export.ort_ops import register_onnxruntime_ops
from singlepass.export.surgery import SurgeryError

V, D, BLOCK, EPS = 20, 64, 32, 1e-5
MS = "com.microsoft"


# ----------------------------------------------------------------------------- 4-bit blocks (MatMulNBits layout)


def quantize4(w_nk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[N, K] -> (packed uint8 [N, K/32, 16], scales [N, K/32]): symmetric 4-bit blocks along K, zero point 8
    (MatMulNBits' default without zero_points), two values a byte, the low nibble first."""
    n, k = w_nk.shape
    blocks = w_nk.reshape(n, k // BLOCK, BLOCK)
    scales = np.abs(blocks).max(-1) / 7.0
    q = np.clip(np.round(blocks / scales[..., None]) + 8, 0, 15).astype(np.uint8)
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8), scales.astype(np.float32)


def dequantize4(packed: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """The inverse layout: packed [N, blocks, 16] uint8, scales [N, blocks] -> [N, blocks * 32] float32."""
    n, blocks = scales.shape
    q = np.stack([packed & 0x0F, packed >> 4], -1).reshape(n, blocks, -1).astype(np.float32)
    return ((q - 8) * scales[..., None]).reshape(n, -1)


def rms(x, g):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + EPS) * g


# ----------------------------------------------------------------------------- the generated graph


class FusedToy:
    """A decoder in the builder's structure, and its numpy reference (``reference``).

    x0 = embedding; step k: branch_k = tanh(MatMulNBits(norm_k, W_k)) * mask, x_{k+1} = x_k + branch_k,
    norm_{k+1} = rms(x_{k+1}) computed by the same SkipSimplifiedLayerNormalization (output 0; the sum
    is output 3). norm_0 is a SimplifiedLayerNormalization of x0; the last step's node has output 0
    only (the final norm) and feeds the MatMulNBits lm_head."""

    def __init__(self, layers=2, swap=False, quantized_embedding=False, seed=0):
        rng = np.random.default_rng(seed)
        self.nodes, self.inits, self.steps = [], [], 2 * layers
        table = rng.normal(0, 0.5, (V, D)).astype(np.float32)
        if quantized_embedding:  # GatherBlockQuantized of the packed table (its rows dequantised)
            packed, scales = quantize4(table)
            self.table = dequantize4(packed, scales)
            data = self.init("table_q4", packed.reshape(V, D // 2))
            self.node(
                "GatherBlockQuantized",
                [data, "input_ids", self.init("table_scales", scales)],
                ["x0"],
                MS,
                bits=4,
                block_size=BLOCK,
                gather_axis=0,
                quantize_axis=1,
            )
        else:
            self.table = table
            self.node("Gather", [self.init("table", table), "input_ids"], ["x0"])
        self.node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT)
        self.node("Unsqueeze", ["mask_f", self.init("ax", np.array([-1], np.int64))], ["mask3"])
        self.gammas = [rng.normal(1, 0.1, D).astype(np.float32) for _ in range(self.steps + 1)]
        self.node(
            "SimplifiedLayerNormalization",
            ["x0", self.init("g0", self.gammas[0])],
            ["norm0"],
            epsilon=EPS,
            axis=-1,
            stash_type=1,
        )
        self.weights = []
        for k in range(self.steps):
            w, mm = self.nbits(f"w{k}", rng.normal(0, 0.3, (D, D)).astype(np.float32), f"norm{k}")
            self.weights.append(w)
            self.node("Tanh", [mm], [f"tanh{k}"])
            self.node("Mul", [f"tanh{k}", "mask3"], [f"branch{k}"])
            pair = [f"branch{k}", f"x{k}"] if swap and k % 2 else [f"x{k}", f"branch{k}"]
            last = k == self.steps - 1
            outs = ["final_norm"] if last else [f"norm{k + 1}", "", "", f"x{k + 1}"]
            self.node(
                "SkipSimplifiedLayerNormalization",
                [*pair, self.init(f"g{k + 1}", self.gammas[k + 1])],
                outs,
                MS,
                epsilon=EPS,
            )
        self.lm_w, _ = self.nbits(
            "lm_head", rng.normal(0, 0.3, (V, D)).astype(np.float32).T, "final_norm", out="logits"
        )

    def init(self, name, arr):
        self.inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def node(self, op, inputs, outputs, domain="", **attrs):
        self.nodes.append(
            helper.make_node(op, inputs, outputs, name=f"n{len(self.nodes)}_{op}", domain=domain, **attrs)
        )

    def nbits(self, name, w_kn, x, out=None):
        """MatMulNBits(x, W) for W [K, N] -> (the dequantised W the graph multiplies by, output name)."""
        packed, scales = quantize4(w_kn.T)
        out = out or f"{name}_out"
        self.node(
            "MatMulNBits",
            [x, self.init(f"{name}_q4", packed), self.init(f"{name}_scales", scales)],
            [out],
            MS,
            K=w_kn.shape[0],
            N=w_kn.shape[1],
            bits=4,
            block_size=BLOCK,
        )
        return dequantize4(packed, scales).T, out

    def model(self) -> onnx.ModelProto:
        g = helper.make_graph(
            self.nodes,
            "fused-toy",
            [
                helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
                helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"]),
            ],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", V])],
            self.inits,
        )
        opsets = [helper.make_opsetid("", 18), helper.make_opsetid(MS, 1)]
        return helper.make_model(g, opset_imports=opsets)

    def graph(self) -> gs.Graph:
        return gs.import_onnx(self.model())

    def reference(self, ids, mask) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
        """-> (the L+1 hidden states, logits, the last residual sum x_2L) in numpy."""
        x = self.table[ids]
        xs, norm = [x], rms(x, self.gammas[0])
        for k in range(self.steps):
            x = x + np.tanh(norm @ self.weights[k]) * mask[..., None]
            xs.append(x)
            norm = rms(x, self.gammas[k + 1])
        return [xs[2 * i] for i in range(self.steps // 2)] + [norm], norm @ self.lm_w, x


def run(model, feeds):
    if isinstance(model, gs.Graph):
        model = surgery.to_model(model)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def toy_feeds(B=2, T=6):
    mask = np.ones((B, T), np.int64)
    mask[0, :2] = 0
    return {"input_ids": np.random.default_rng(1).integers(0, V, (B, T)).astype(np.int64), "attention_mask": mask}


@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize("quantized_embedding", [False, True])
def test_skip_norm_stream_and_stacked_states_match_numpy(swap, quantized_embedding):
    toy = FusedToy(layers=2, swap=swap, quantized_embedding=quantized_embedding)
    graph = toy.graph()
    s = surgery.find_residual_stream(graph, expected_layers=2)
    skip = [n for n in graph.nodes if n.op == "SkipSimplifiedLayerNormalization"]
    assert s.embedding == "x0" and s.residuals[:3] == ["x1", "x2", "x3"] and s.final_norm == "final_norm"
    assert s.residuals[3].startswith("singlepass/") and skip[-1].outputs[3].name == s.residuals[3]  # output 3 added
    assert s.hidden_states == ["x0", "x2", "final_norm"] and (s.vocab_size, s.hidden_size) == (V, D)
    assert surgery.producer(graph.tensors()[s.embedding]).op == (
        "GatherBlockQuantized" if quantized_embedding else "Gather"
    )
    assert surgery._lm_node(graph, s).op == "MatMulNBits"
    hs = surgery.add_stacked_hidden_states(graph, s)
    surgery.add_output(graph, hs, dims=[3, "batch", "sequence", D])
    surgery.add_output(graph, s.residuals[3], dims=["batch", "sequence", D])  # the added sum output runs
    graph.cleanup().toposort()
    model = surgery.to_model(graph)
    register_onnxruntime_ops(model)  # SimplifiedLayerNormalization: ONNX Runtime's op in the default domain
    onnx.checker.check_model(model)
    f = toy_feeds()
    out = run(model, f)
    states, logits, last_sum = toy.reference(f["input_ids"], f["attention_mask"])
    np.testing.assert_allclose(out[hs], np.stack(states), rtol=0, atol=2e-5)
    np.testing.assert_allclose(out["logits"], logits, rtol=0, atol=1e-4)
    np.testing.assert_allclose(out[s.residuals[3]], last_sum, rtol=0, atol=2e-5)
    np.testing.assert_array_equal(out["logits"], run(toy.model(), f)["logits"])  # the surgery changes nothing


def test_last_position_logits_on_a_matmulnbits_lm_head():
    toy = FusedToy(layers=1)
    f = toy_feeds()
    full = run(toy.model(), f)["logits"]
    graph = toy.graph()
    s = surgery.find_residual_stream(graph)
    surgery.slice_last_position_logits(graph, s)
    out = run(graph, f)["logits"]
    assert out.shape == (2, 1, V)
    np.testing.assert_allclose(out, full[:, -1:], rtol=0, atol=1e-5)
    found_again = surgery.find_residual_stream(graph)  # idempotent: the added sum output is reused
    assert found_again.residuals == s.residuals


def set_attr(node: onnx.NodeProto, name: str, value) -> None:
    """Replace (value None: remove) a node attribute."""
    keep = [a for a in node.attribute if a.name != name]
    del node.attribute[:]
    node.attribute.extend(keep + ([helper.make_attribute(name, value)] if value is not None else []))


def test_fused_graphs_that_do_not_match_are_clear_errors():
    toy = FusedToy(layers=1)
    model = toy.model()
    lm = next(n for n in model.graph.node if n.output[0] == "logits")
    set_attr(lm, "K", None)  # a MatMulNBits without its K: no lm_head
    with pytest.raises(SurgeryError, match="MatMulNBits"):
        surgery.find_residual_stream(gs.import_onnx(model))
    toy = FusedToy(layers=1, quantized_embedding=True)
    model = toy.model()
    gbq = next(n for n in model.graph.node if n.op_type == "GatherBlockQuantized")
    set_attr(gbq, "block_size", 16)
    with pytest.raises(SurgeryError, match="GatherBlockQuantized"):  # 2 scale blocks of 16 are not 64 wide
        surgery.find_residual_stream(gs.import_onnx(model))
    toy = FusedToy(layers=2)
    model = toy.model()
    first = next(n for n in model.graph.node if n.op_type == "SkipSimplifiedLayerNormalization")
    first.input[1] = "mask3"  # the first fused add's skip no longer depends on the stream
    with pytest.raises(SurgeryError, match="Skip\\*Normalization"):
        surgery.find_residual_stream(gs.import_onnx(model))


def test_onnx_checker_accepts_onnxruntime_default_domain_ops_only():
    """``SimplifiedLayerNormalization`` is ONNX Runtime's, in the default domain: once registered from ONNX
    Runtime's schema the checker accepts it and still checks its attributes; an op neither knows still fails."""
    model = FusedToy(layers=1).model()
    assert register_onnxruntime_ops(model) in ([], ["SimplifiedLayerNormalization"])  # [] if already registered
    onnx.checker.check_model(model)
    sln = next(n for n in model.graph.node if n.op_type == "SimplifiedLayerNormalization")
    set_attr(sln, "bogus", 1)
    with pytest.raises(onnx.checker.ValidationError, match="bogus"):
        onnx.checker.check_model(model)
    set_attr(sln, "bogus", None)
    sln.op_type = "NotAnOnnxOrOrtOp"
    assert register_onnxruntime_ops(model) == []
    with pytest.raises(onnx.checker.ValidationError, match="NotAnOnnxOrOrtOp"):
        onnx.checker.check_model(model)


# ----------------------------------------------------------------------------- onnxruntime-genai's builder


@pytest.fixture(scope="session")
def builder_graphs(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """onnxruntime-genai's model builder on the tiny Llama, fp32 and int4 for the CPU (once per session)."""
    pytest.importorskip("onnxruntime_genai")
    root = tmp_path_factory.mktemp("genai-builder")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = {}
    for precision in ("fp32", "int4"):
        folder = root / precision
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(tiny_model_dir), "-o", str(folder)]
        cmd += ["-p", precision, "-e", "cpu", "-c", str(root / "cache")]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0 and (folder / "model.onnx").is_file(), done.stderr[-2000:]
        out[precision] = folder / "model.onnx"
    return out


def _dequantised_reference(model, graph_file: Path):
    """A copy of the HF model holding the int4 graph's own weights, dequantised (the builder fuses
    q/k/v into one qkv_proj and shares the lm_head's blocks with the embedding)."""
    import torch

    w = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(graph_file)).graph.initializer}

    def dq(prefix):
        return torch.from_numpy(dequantize4(w[f"{prefix}.MatMul.weight_Q4"], w[f"{prefix}.MatMul.weight_scales"]))

    ref = copy.deepcopy(model)
    cfg = ref.config
    q, kv = cfg.hidden_size, cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    with torch.no_grad():
        ref.model.embed_tokens.weight.copy_(dq("lm_head"))  # tied: the lm_head too
        for i, layer in enumerate(ref.model.layers):
            qkv, a = dq(f"model.layers.{i}.attn.qkv_proj"), layer.self_attn
            a.q_proj.weight.copy_(qkv[:q])
            a.k_proj.weight.copy_(qkv[q : q + kv])
            a.v_proj.weight.copy_(qkv[q + kv :])
            a.o_proj.weight.copy_(dq(f"model.layers.{i}.attn.o_proj"))
            for name in ("gate_proj", "up_proj", "down_proj"):
                getattr(layer.mlp, name).weight.copy_(dq(f"model.layers.{i}.mlp.{name}"))
    return ref


def _surgered_states(graph_file: Path, ids: np.ndarray, num_layers: int, kv_shape: tuple[int, int]):
    """-> (stream, {tensor: op of the node computing it} for the stream's tensors, stacked hidden states,
    logits, the plain graph's own hidden-state tensors and logits)."""
    model = onnx.load(str(graph_file))
    graph = gs.import_onnx(model)
    s = surgery.find_residual_stream(graph, expected_layers=num_layers)
    tensors = graph.tensors()
    ops = {t: surgery.producer(tensors[t]).op for t in [s.embedding, *s.residuals, s.final_norm, s.logits]}
    hs = surgery.add_stacked_hidden_states(graph, s)
    surgery.add_output(graph, hs)
    graph.cleanup().toposort()
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    feeds.update({p: np.zeros((ids.shape[0], kv_shape[0], 0, kv_shape[1]), np.float32) for p in s.past})
    out = run(graph, feeds)
    plain = gs.import_onnx(model)  # the unmodified graph, its own hidden-state tensors exposed
    for t in s.hidden_states:
        surgery.add_output(plain, t)
    own = run(plain, feeds)
    return s, ops, out[hs], out["logits"], own


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_builder_graph_hidden_states_match_transformers(precision, builder_graphs, tiny_backbone):
    """fp32: transformers' hidden states to float rounding. int4: the reference is the HF model holding the
    graph's own dequantised 4-bit weights, so weight quantisation (~9% relative error per weight on these
    random weights) is not measured; what remains is MatMulNBits' accuracy_level=4, which quantises the
    activations to int8 per block for the dot products: ~1.3% relative error per hidden state measured here,
    hence 3% (a wrong layer or a norm instead of the residual is off by ~100%)."""
    import torch

    cfg = tiny_backbone.model.config
    L, head_dim = cfg.num_hidden_layers, cfg.hidden_size // cfg.num_attention_heads
    ids = np.array([[1, 5, 9, 14, 22, 7, 40, 100, 3, 250]], np.int64)
    s, ops, states, logits, own = _surgered_states(
        builder_graphs[precision], ids, L, (cfg.num_key_value_heads, head_dim)
    )
    quantized = precision == "int4"
    assert ops[s.embedding] == ("GatherBlockQuantized" if quantized else "Gather")
    assert {ops[t] for t in s.residuals} == {ops[s.final_norm]} == {"SkipSimplifiedLayerNormalization"}
    assert s.residuals[-1].startswith("singlepass/")  # the final norm's fused add: output 3 added
    assert ops[s.logits] == ("MatMulNBits" if quantized else "MatMul")
    assert s.past == [f"past_key_values.{i}.{kv}" for i in range(L) for kv in ("key", "value")]
    assert s.position_ids is None and s.attention_mask == "attention_mask"
    # the surgery only reads: the stacked states are the graph's own tensors, the logits unchanged
    np.testing.assert_array_equal(states, np.stack([own[t] for t in s.hidden_states]))
    np.testing.assert_array_equal(logits, own["logits"])
    model = (
        tiny_backbone.model
        if precision == "fp32"
        else _dequantised_reference(tiny_backbone.model, builder_graphs[precision])
    )
    with torch.no_grad():
        o = model(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.ones(ids.shape, dtype=torch.long),
            output_hidden_states=True,
        )
    ref = torch.stack(o.hidden_states).numpy()
    assert states.shape == ref.shape == (L + 1, 1, ids.shape[1], cfg.hidden_size)
    if precision == "fp32":
        np.testing.assert_allclose(states, ref, rtol=0, atol=1e-5)
        np.testing.assert_allclose(logits, o.logits.numpy(), rtol=0, atol=1e-4)
    else:
        np.testing.assert_array_equal(states[0], ref[0])  # the embedding: the same dequantised rows
        rel = np.linalg.norm((states - ref).reshape(L + 1, -1), axis=1) / np.linalg.norm(ref.reshape(L + 1, -1), axis=1)
        assert rel.max() < 0.03, rel
        assert (logits.argmax(-1) == o.logits.numpy().argmax(-1)).all()


def test_builder_fp32_graph_export_end_to_end(
    builder_graphs, tiny_model_dir, tiny_backbone, cache_dir, tmp_path, monkeypatch, capsys
):
    """``singlepass export --onnx`` on the builder's fp32 graph: the surgery, probe fusion, artifact and
    runtime work; the validation refuses the graph because of GroupQueryAttention, not the surgery.

    The builder's attention is GroupQueryAttention, which takes each row's length from the attention mask
    (``seqlens_k = ReduceSum(attention_mask) - 1``) and attends to the first ``seqlens_k + 1`` positions:
    it supports right padding only. The runtime and the validation pad on the left, so every left-padded
    row differs; right-padded, unpadded and batch-1 passes match transformers to float rounding, and the
    runtime's batch-1 greedy decoding (KV cache through GroupQueryAttention) equals transformers'."""
    import torch
    from export_helpers import make_probe

    from singlepass.cli import main
    from singlepass.export import validate as validate_mod
    from singlepass.runtime.api import load

    probe = make_probe(tmp_path / "probe", tiny_backbone, "gate")
    argv = ["export", "--onnx", str(builder_graphs["fp32"]), "--model", str(tiny_model_dir)]
    argv += ["--cache-dir", str(cache_dir), "--probe", f"{probe}:tox", "--weights", "fp32"]  # the graph as built
    assert main([*argv, "--out", str(tmp_path / "refused")]) != 0
    err = capsys.readouterr().err
    assert "does not match the PyTorch reference" in err and "left" in err.split("worst:")[1].split(")")[0], err[-3000:]
    assert not (tmp_path / "refused").exists()
    # the same export with the validation's verdict kept instead of raised: what passes and what does not
    reports = []
    real = validate_mod.validate

    def keep(folder, **kw):
        reports.append(real(folder, **kw, raise_on_failure=False))
        return reports[-1]

    monkeypatch.setattr(validate_mod, "validate", keep)
    out = tmp_path / "art"
    assert main([*argv, "--out", str(out)]) == 0
    checks = reports[0].checks
    failed = {c.case for c in checks if not c.ok}
    assert failed and all("left" in c for c in failed), failed  # only left-padded batches
    passed = {c.case for c in checks if c.ok}
    assert {"prefill right B=4", "prefill B=1"} <= passed
    assert all(c.ok for c in checks if c.case in ("prefill right B=4", "prefill B=1"))
    rt = load(out, backend="cpu")
    tok = tiny_backbone.tokenizer
    from singlepass.models.prompts import encode_one

    text = "What is the capital of France?"
    r = rt.generate(text, 6)
    ids, _ = encode_one(tok, text, "chat", 64)
    want = tiny_backbone.model.generate(
        torch.tensor([ids]), max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id
    )[0, len(ids) :].tolist()
    assert r.token_ids == want and set(r.labels) == {"tox"}
