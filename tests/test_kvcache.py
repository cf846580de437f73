"""The in-place KV cache (export/kvcache.py): the graph transformation on a tiny generated graph,
the runtime's in-place passes, and both layouts generating alike on the tiny model."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper

from singlepass.errors import SinglepassError
from singlepass.export import kvcache
from singlepass.export.residual import ResidualStream
from singlepass.export.surgery import to_model
from singlepass.runtime.backends import OrtBackend

B, H, KV, D = 3, 4, 2, 8


def attention_graph(layers: int = 1) -> onnx.ModelProto:
    """``layers`` x ONNX Attention over Concat(past, new) (what the opset-23 export writes), one
    decode token: q [B, H, 1, D], new keys/values [B, KV, 1, D], an additive mask from
    attention_mask [B, total]."""
    f, i64 = TensorProto.FLOAT, TensorProto.INT64
    inputs = [
        helper.make_tensor_value_info("attention_mask", i64, [B, "total"]),
        helper.make_tensor_value_info("q", f, [B, H, 1, D]),
        helper.make_tensor_value_info("k_new", f, [B, KV, 1, D]),
        helper.make_tensor_value_info("v_new", f, [B, KV, 1, D]),
    ]
    nodes = [  # mask [B, total] -> additive [B, 1, 1, total]: 0 where 1, -1e9 where 0
        helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=f),
        helper.make_node("Sub", ["mask_f", "one"], ["mask_m1"]),
        helper.make_node("Mul", ["mask_m1", "big"], ["mask_add2"]),
        helper.make_node("Unsqueeze", ["mask_add2", "axes12"], ["mask_add"]),
    ]
    inits = [
        helper.make_tensor("one", f, [], [1.0]),
        helper.make_tensor("big", f, [], [1e9]),
        helper.make_tensor("axes12", i64, [2], [1, 2]),
    ]
    outputs = []
    for i in range(layers):
        pk, pv, ck, cv = (
            f"past_key_values.{i}.key",
            f"past_key_values.{i}.value",
            f"present.{i}.key",
            f"present.{i}.value",
        )
        inputs += [helper.make_tensor_value_info(n, f, [B, KV, "past", D]) for n in (pk, pv)]
        nodes += [
            helper.make_node("Concat", [pk, "k_new"], [ck], axis=2),
            helper.make_node("Concat", [pv, "v_new"], [cv], axis=2),
            helper.make_node("Attention", ["q", ck, cv, "mask_add"], [f"out{i}"], q_num_heads=H, kv_num_heads=KV),
        ]
        outputs += [helper.make_tensor_value_info(n, f, None) for n in (f"out{i}", ck, cv)]
    g = helper.make_graph(nodes, "attention", inputs, outputs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 23)])


def stream_of(layers: int = 1) -> ResidualStream:
    return ResidualStream(
        "input_ids", "attention_mask", None, "emb", [], "norm", "lm", "logits", 10, H * D,
        past=[f"past_key_values.{i}.{k}" for i in range(layers) for k in ("key", "value")],
        present=[f"present.{i}.{k}" for i in range(layers) for k in ("key", "value")],
    )  # fmt: skip


def backend(model: onnx.ModelProto, tmp_path, name: str) -> OrtBackend:
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, str(path))
    return OrtBackend(path, SimpleNamespace(graph=SimpleNamespace(inputs=[], past_names=())), threads=1)


def test_inplace_kv_cache_writes_the_new_column_of_each_row_in_place(tmp_path):
    """One decode step of rows of different lengths: the converted graph (GroupQueryAttention fed
    the cache buffers, bound in place) attends as the Concat graph does, writes each row's new
    key/value at its own column and touches nothing else."""
    rng = np.random.default_rng(0)
    lens = np.array([5, 2, 7])  # tokens each row holds before this step
    P, C = int(lens.max()), int(lens.max()) + 4  # the Concat graph's past; the buffers' capacity
    q = rng.standard_normal((B, H, 1, D), np.float32)
    kn, vn = (rng.standard_normal((B, KV, 1, D), np.float32) for _ in range(2))
    keys, values = (rng.standard_normal((B, KV, P, D), np.float32) for _ in range(2))
    for b, n in enumerate(lens):  # beyond a row's length: padding, which must not matter
        keys[b, :, n:], values[b, :, n:] = 7.0, -7.0

    before = attention_graph()
    mask = np.zeros((B, P + 1), np.int64)  # Concat layout: the new token in the last column
    for b, n in enumerate(lens):
        mask[b, :n] = 1
    mask[:, P] = 1
    ref = backend(before, tmp_path, "concat").run(
        {"attention_mask": mask, "q": q, "k_new": kn, "v_new": vn, "past_key_values.0.key": keys,
         "past_key_values.0.value": values}, ["out0"]
    )["out0"]  # fmt: skip

    graph, stream = gs.import_onnx(before), stream_of()
    assert kvcache.inplace_kv_cache(graph, stream) == 1 and stream.inplace_kv
    assert [n.op for n in graph.nodes if n.op in ("Attention", "Concat", "GroupQueryAttention")] == [
        "GroupQueryAttention"
    ]
    after = to_model(graph)
    kbuf, vbuf = np.zeros((B, KV, C, D), np.float32), np.zeros((B, KV, C, D), np.float32)
    kbuf[:, :, :P], vbuf[:, :, :P] = keys, values
    k0, v0 = kbuf.copy(), vbuf.copy()
    mask = np.zeros((B, C), np.int64)  # in place: rows are prefixes, the new token at column len
    for b, n in enumerate(lens):
        mask[b, : n + 1] = 1
    feed = {"attention_mask": mask, "q": q, "k_new": kn, "v_new": vn, "past_key_values.0.key": kbuf,
            "past_key_values.0.value": vbuf}  # fmt: skip
    inplace = {"present.0.key": "past_key_values.0.key", "present.0.value": "past_key_values.0.value"}
    out = backend(after, tmp_path, "inplace").run(feed, ["out0", "present.0.key", "present.0.value"], inplace)
    np.testing.assert_allclose(out["out0"], ref, atol=1e-5)
    assert out["present.0.key"] is kbuf and out["present.0.value"] is vbuf  # the buffers, no copy
    for b, n in enumerate(lens):
        np.testing.assert_array_equal(kbuf[b, :, n], kn[b, :, 0])
        np.testing.assert_array_equal(vbuf[b, :, n], vn[b, :, 0])
        k0[b, :, n], v0[b, :, n] = kn[b, :, 0], vn[b, :, 0]
    np.testing.assert_array_equal(kbuf, k0)  # nothing else written
    np.testing.assert_array_equal(vbuf, v0)


def test_apply_chooses_the_layout_or_says_why_not():
    cfg = SimpleNamespace(model_type="llama")
    windowed = SimpleNamespace(model_type="mistral", sliding_window=16)
    graph, stream = gs.import_onnx(attention_graph(2)), stream_of(2)
    assert kvcache.apply(graph, stream, "concat", cfg, False) == "concat" and not stream.inplace_kv
    with pytest.raises(SinglepassError, match="all-logits"):
        kvcache.apply(graph, stream, "inplace", cfg, True)
    with pytest.raises(SinglepassError, match="sliding window"):
        kvcache.apply(graph, stream, "inplace", windowed, False)
    assert kvcache.apply(graph, stream, "auto", windowed, False) == "concat"
    with pytest.raises(SinglepassError, match="--kv-cache must be one of"):
        kvcache.apply(graph, stream, "shared", cfg, False)
    # a graph where one layer reads no Concat(past, new) is left as it is
    partial = gs.import_onnx(attention_graph(2))
    att = [n for n in partial.nodes if n.op == "Attention"][1]
    att.inputs[1] = partial.tensors()["past_key_values.1.key"]
    with pytest.raises(SinglepassError, match="not ONNX Attention over Concat"):
        kvcache.apply(partial, stream_of(2), "inplace", cfg, False)
    assert kvcache.apply(partial, stream_of(2), "auto", cfg, False) == "concat"
    assert kvcache.apply(graph, stream, "auto", cfg, False, "fp32") == "concat"  # portable: TensorRT builds fp32
    assert kvcache.apply(graph, stream, "auto", cfg, False) == "inplace" and stream.inplace_kv
    assert sum(n.op == "GroupQueryAttention" for n in graph.nodes) == 2


@pytest.fixture(scope="module")
def layouts(tmp_path_factory, tiny_backbone, tiny_model_dir, cache_dir):
    """The tiny model with a prompt (gate) and a response (pooling) probe, exported both ways."""
    from cli_args import export_argv
    from export_helpers import make_probe

    from singlepass.cli import main
    from singlepass.runtime.api import load

    root = tmp_path_factory.mktemp("layouts")
    gate = make_probe(root / "gate", tiny_backbone, "gate")
    resp = make_probe(root / "resp", tiny_backbone, "pooling", seed=3, reads="response")
    arts = {}
    for mode in ("concat", "inplace"):
        out = root / mode
        argv = export_argv(tiny_model_dir, cache_dir, out, gate, resp, extra=["--kv-cache", mode])
        assert main(argv) == 0
        arts[mode] = load(out, backend="cpu", threads=1)
        assert arts[mode].manifest.graph.kv_update == mode
    return arts


def test_both_layouts_generate_the_same_tokens_and_labels(layouts):
    """A batch of prompts of different lengths (left padding vs prefix rows): the same tokens,
    prompt labels and per-step response scores either way (the engine's rows joining and leaving:
    test_serve.py, on both layouts)."""
    prompts = ["hi", "the quick brown fox jumps", "what is the capital of"]
    runs = {k: rt.generate(prompts, 70) for k, rt in layouts.items()}  # past the first widening (64 spare)
    for x, y in zip(runs["concat"], runs["inplace"]):
        assert x.token_ids == y.token_ids and len(x.token_ids) == 70
        for name, lab in x.labels.items():
            assert abs(lab.score - y.labels[name].score) < 1e-4
        np.testing.assert_allclose(x.response_scores["resp"], y.response_scores["resp"], atol=1e-4)
        assert len(set(np.round(x.response_scores["resp"], 4))) > 1  # the scores move step by step
    inplace = layouts["inplace"]
    g = inplace.manifest.graph
    ops = {n.op_type for n in onnx.load(str(inplace.manifest.folder / g.file), load_external_data=False).graph.node}
    assert "GroupQueryAttention" in ops and "Attention" not in ops


def test_inplace_artifact_refuses_what_it_cannot_do(layouts):
    from singlepass.runtime.passes import prefill

    rt = layouts["inplace"]
    with pytest.raises(ValueError, match="right-padded"):
        prefill(rt.backend, rt.manifest, [[1, 2, 3]], side="left")
    with pytest.raises(SinglepassError, match="--kv-cache concat"):
        from singlepass.runtime.backends import select

        select(rt.manifest.folder, rt.manifest, "tensorrt")


def test_a_manifest_with_an_unknown_kv_update_is_refused(layouts, tmp_path):
    import json
    import shutil

    from singlepass.runtime.contract import read_artifact

    art = tmp_path / "art"
    shutil.copytree(layouts["inplace"].manifest.folder, art)
    m = json.loads((art / "manifest.json").read_text())
    m["graph"]["kv_update"] = "shared"
    (art / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(SinglepassError, match="kv_update must be concat or inplace"):
        read_artifact(art)


def test_inplace_buffers_grow_with_spare_columns_up_to_the_artifacts_length():
    """runtime/feeds: a row reaching the buffers' capacity widens them by spare columns, capped at
    the artifact's max_total_length (no row grows longer, and the packed attention's rotary
    tables cover that many positions: export/ortfuse.py)."""
    from singlepass.runtime.feeds import advance, spare_columns

    assert spare_columns(91) == 155 and spare_columns(91, 100) == 100 and spare_columns(120, 100) == 120
    m = SimpleNamespace(graph=SimpleNamespace(inplace=True), limits=SimpleNamespace(max_total_length=100))
    mask = np.zeros((2, 90), np.int64)
    mask[0], mask[1, :50] = 1, 1  # row 0 fills the buffers
    past = [np.ones((2, KV, 90, D), np.float32)]
    ids, mask2, pos, past2 = advance(m, np.array([7, 8]), None, mask, None, past)
    assert mask2.shape == (2, 100) and past2[0].shape == (2, KV, 100, D)
    assert mask2[0].sum() == 91 and mask2[1].sum() == 51 and pos[:, 0].tolist() == [90, 50]
    np.testing.assert_array_equal(past2[0][:, :, :90], past[0])  # the cache kept, zeros appended
    assert not past2[0][:, :, 90:].any()


def test_inplace_decode_steps_reuse_one_binding_per_thread_and_release_it(layouts):
    """runtime/backends._Binding: consecutive in-place passes bind only what changed. The steps'
    logits match a fresh binding per step exactly, across a widening of the buffers (new arrays,
    bound again); a step's returned arrays are not overwritten by the next; a second thread gets its
    own binding; release() lets the KV buffers go."""
    import gc
    import threading
    import weakref

    from singlepass.runtime.passes import decode_one_token, last_logits, prefill

    rt = layouts["inplace"]
    be, m = rt.backend, rt.manifest
    prompts = [[5, 6, 7, 8], [9, 10]]

    def steps(n, fresh):
        state = prefill(be, m, prompts)[1]
        kept, toks = [], np.array([3, 4], np.int64)
        for _ in range(n):
            if fresh:
                be.release()
            out, state = decode_one_token(be, m, state, toks)
            kept.append((last_logits(m, out), last_logits(m, out).copy()))
            toks = kept[-1][1].argmax(-1)
        return kept, state

    cached, state = steps(70, fresh=False)  # past the first widening (64 spare columns)
    binding = be._local.binding
    bound = binding.bound
    assert bound[(False, m.graph.past_names[0])] is state.past[0]  # the widened buffer, bound again
    assert bound[(True, m.graph.present_names[0])] is state.past[0]
    for returned, copy in cached:  # no later pass wrote into an earlier pass's output
        np.testing.assert_array_equal(returned, copy)
    fresh, _ = steps(70, fresh=True)
    for (a, _), (b, _) in zip(cached, fresh):
        np.testing.assert_array_equal(a, b)

    seen = {}
    threads = [threading.Thread(target=lambda k=k: seen.update({k: steps(8, False)[0]})) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in range(2):
        for (a, _), (b, _) in zip(seen[k], cached):
            np.testing.assert_array_equal(a, b)

    steps(3, False)
    cache = set(m.graph.past_names) | set(m.graph.present_names)
    buffers = [weakref.ref(p) for (_, name), p in be._local.binding.bound.items() if name in cache]
    assert len(buffers) == len(cache)  # every past bound as an input, every present as an output
    be.release()
    gc.collect()
    assert all(r() is None for r in buffers)


def test_engine_steps_times_the_runtime_outside_onnx_runtime(layouts):
    """benchmarks/engine_steps.host_s: a decode step's time minus its time inside the session's run
    (the runtime's own Python), which is part of the step; the session's run is its own again after."""
    from singlepass.benchmarks.engine_steps import host_s, median_s
    from singlepass.runtime.passes import decode_one_token, prefill

    for layout in ("inplace", "concat"):  # the pass bound in place, or run plainly
        rt = layouts[layout]
        be, m = rt.backend, rt.manifest
        state = prefill(be, m, [[5, 6, 7, 8]])[1]
        toks = np.array([3], np.int64)
        state = decode_one_token(be, m, state, toks)[1]

        def step(be=be, m=m, state=state, toks=toks):
            decode_one_token(be, m, state, toks)

        host = host_s(rt, step, 9)
        whole = median_s(step, 9)
        assert 0 < host < 0.8 * whole, layout  # here ~0.4: the tiny model's pass is about half of the step
        assert not {"run", "run_with_iobinding"} & set(vars(be.session))  # the wrappers are gone

    def no_ort():  # nothing inside the session: all of it is host time
        sum(range(20000))

    assert host_s(rt, no_ort, 5) > 0.5 * median_s(no_ort, 5)


def test_a_cache_bind_that_fails_halfway_is_not_taken_for_the_bound_cache(tmp_path):
    """runtime/backends._Binding: a pass whose cache arrays fail to bind after some of them were
    bound (a non-contiguous one) leaves no "bound" record behind, so the next pass with the earlier
    arrays binds them again and the keys land in the arrays it was fed."""
    graph, stream = gs.import_onnx(attention_graph(2)), stream_of(2)
    kvcache.inplace_kv_cache(graph, stream)
    be = backend(to_model(graph), tmp_path, "inplace")
    C = 6
    inplace = {f"present.{i}.{k}": f"past_key_values.{i}.{k}" for i in range(2) for k in ("key", "value")}
    names = ["out0", "out1", *inplace]
    rng = np.random.default_rng(0)

    def feed(bufs):
        mask = np.zeros((B, C), np.int64)
        mask[:, :3] = 1  # two tokens held, the new one at column 2
        f = {"attention_mask": mask, "q": rng.standard_normal((B, H, 1, D), np.float32)}
        f |= {"k_new": np.full((B, KV, 1, D), 5.0, np.float32), "v_new": np.full((B, KV, 1, D), 5.0, np.float32)}
        return f | dict(zip(inplace.values(), bufs))

    first = [np.zeros((B, KV, C, D), np.float32) for _ in inplace]
    be.run(feed(first), names, inplace)
    other = [np.zeros((B, KV, C, D), np.float32) for _ in inplace]
    other[1] = np.zeros((B, KV, 2 * C, D), np.float32)[:, :, ::2]  # not one contiguous buffer
    with pytest.raises(SinglepassError, match="contiguous"):
        be.run(feed(other), names, inplace)
    for a in first:
        a[:] = 0
    out = be.run(feed(first), names, inplace)
    assert out["present.0.key"] is first[0]
    assert (first[0][:, :, 2] == 5.0).all() and not other[0].any()  # written where fed, nowhere else
