"""`singlepass export` / `singlepass validate` on a tiny random Llama: the artifact contract,
fused-probe parity on padded batches, several probes in one pass, KV-cache decoding."""

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from cli_args import export_argv
from export_helpers import all_nodes, make_probe, ort_feed, sha256

from singlepass.cli import main
from singlepass.runtime.batching import pad_batch

PROBES = {  # name -> (method, classes, params): the three families + the baselines MULI and last-token
    "tox": ("gate", 2, {}),
    "emo": ("mha", 3, {"factor": 8, "heads": 2}),
    "sent": ("pooling", 2, {"token_pool": "max"}),
    "muli": ("muli", 2, {}),
    "last": ("last-token", 2, {}),
}
TEXTS = [
    "What is the capital of France?",
    "I hate this, it is the worst thing ever and I am angry.",
    "Hi",
    "The quick brown fox jumps over the lazy dog.",
]


@pytest.fixture(scope="module")
def probe_dirs(tmp_path_factory, tiny_backbone):
    root = tmp_path_factory.mktemp("probes")
    return {
        name: make_probe(root / name, tiny_backbone, method, classes, seed=k, **params)
        for k, (name, (method, classes, params)) in enumerate(PROBES.items())
    }


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, tiny_model_dir, probe_dirs, cache_dir):
    out = tmp_path_factory.mktemp("art") / "tiny"
    specs = [d if name != "last" else f"{d}:last" for name, d in probe_dirs.items()]
    # the Concat KV cache (fp32's default; said here as it is what these tests drive with raw sessions:
    # left padding, present = past + new); the in-place layout: test_kvcache.py, test_arch.py
    assert main(export_argv(tiny_model_dir, cache_dir, out, *specs, extra=["--kv-cache", "concat"])) == 0
    return out


def manifest(art):
    return json.loads((art / "manifest.json").read_text())


def reference(backbone, probe_dirs, ids, mask, pos):
    """PyTorch: HF model + each torch probe on torch.stack(hidden_states) (or last-position logits)."""
    from singlepass.models.probe_io import load_probe
    from singlepass.models.probes import probabilities

    with torch.no_grad():
        out = backbone.model(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            position_ids=torch.from_numpy(pos),
            output_hidden_states=True,
        )
        hs = torch.stack(out.hidden_states)
        probs = {}
        for name, d in probe_dirs.items():
            module, cfg = load_probe(d, backbone.fingerprint)
            lg = module(out.logits[:, -1]) if cfg["input"] == "logits" else module(hs, torch.from_numpy(mask))
            probs[name] = probabilities(lg).numpy()
    return out.logits.numpy(), hs.numpy(), probs


def test_artifact_contract(artifact, tiny_backbone, probe_dirs):
    m = manifest(artifact)
    files = {p.name for p in artifact.iterdir()}
    assert {
        "manifest.json",
        "model.onnx",
        "model.onnx.data",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "probes",
        "validation.json",
    } <= files
    assert not [f for f in artifact.parent.iterdir() if f.name.startswith(".")]  # no temporary folder left
    g, b = m["graph"], m["backbone"]
    L = tiny_backbone.num_layers
    assert (m["format"], m["version"], g["opset"]) == ("singlepass-artifact", 1, 23)
    assert b["sha256"] == tiny_backbone.fingerprint["sha256"]
    assert (b["num_layers"], b["num_kv_heads"], b["head_dim"], b["hidden_size"], b["vocab_size"]) == (L, 2, 16, 64, 300)
    inputs = {i["name"]: i for i in g["inputs"]}
    outputs = {o["name"]: o for o in g["outputs"]}
    assert list(inputs)[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert g["past_names"] == [f"past_key_values.{i}.{k}" for i in range(L) for k in ("key", "value")]
    assert g["present_names"] == [f"present.{i}.{k}" for i in range(L) for k in ("key", "value")]
    assert inputs["past_key_values.0.key"]["dims"] == ["batch", 2, "past_sequence", 16]
    assert inputs["attention_mask"]["dims"] == ["batch", "total_sequence"]
    assert outputs["present.1.value"]["dims"] == ["batch", 2, "total_sequence", 16]
    assert outputs["logits"]["dims"] == ["batch", 1, 300] and g["logits_last_position_only"]
    assert "hidden_states" not in outputs and g["hidden_states"] is None  # internal only
    assert [p["name"] for p in m["probes"]] == list(PROBES)
    for p in m["probes"]:
        method, classes, _ = PROBES[p["name"]]
        assert p["outputs"] == {"logits": f"{p['name']}/logits", "probs": f"{p['name']}/probs"}
        assert outputs[p["outputs"]["probs"]]["dims"] == ["batch", classes]
        assert p["probe"] == method and p["num_classes"] == classes
        assert p["input"] == ("logits" if method == "muli" else "hidden_states")
        assert p["sha256"] == sha256(probe_dirs[p["name"]] / "model.safetensors")
        assert p["sha256"] == sha256(artifact / p["folder"] / "model.safetensors")
        assert p["backbone_sha256"] == b["sha256"]
    assert m["tokenizer"]["eos_token_ids"] == [tiny_backbone.tokenizer.eos_token_id]
    assert m["tokenizer"]["pad_token_id"] == tiny_backbone.tokenizer.pad_token_id
    assert m["prompt"]["format"] == "chat" and m["prompt"]["chat_template"]
    assert m["limits"]["max_prompt_length"] == 64 and m["limits"]["max_batch"] == 8
    assert m["validation"]["passed"] and not m["validation"]["token_mismatches"]
    onnx.checker.check_model(str(artifact / "model.onnx"))


@pytest.mark.parametrize("side", ["left", "right"])
def test_fused_probes_match_pytorch_on_padded_batches(artifact, tiny_backbone, probe_dirs, side):
    from singlepass.models.prompts import encode

    m = manifest(artifact)
    sess = ort.InferenceSession(str(artifact / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    enc = encode(tiny_backbone.tokenizer, TEXTS, "chat", 256)
    assert len({len(s) for s in enc.ids}) == len(TEXTS)  # several lengths
    ids, mask, pos = pad_batch(enc.ids, tiny_backbone.tokenizer.pad_token_id, side)
    out = dict(zip(names, sess.run(None, ort_feed(m, ids, mask, pos))))
    logits, _, probs = reference(tiny_backbone, probe_dirs, ids, mask, pos)
    for name in PROBES:
        np.testing.assert_allclose(out[f"{name}/probs"], probs[name], rtol=0, atol=1e-4)
        assert np.allclose(out[f"{name}/probs"].sum(-1), 1, atol=1e-5)
    rows = mask[:, -1] == 1  # rows whose last position is a real token
    np.testing.assert_allclose(out["logits"][rows, 0], logits[rows, -1], rtol=0, atol=1e-3)
    # one pass, several probes: the labels do not depend on the batch a prompt is in
    alone = dict(zip(names, sess.run(None, ort_feed(m, *pad_batch([enc.ids[2]], 2, side)))))
    for name in PROBES:
        np.testing.assert_allclose(alone[f"{name}/probs"][0], out[f"{name}/probs"][2], atol=1e-5)


def test_kv_cache_decoding_matches_generate(artifact, tiny_backbone):
    """Prefill (empty past) then 20 greedy steps feeding present -> past: the same tokens as
    transformers' generate()."""
    from singlepass.models.prompts import encode

    m = manifest(artifact)
    g = m["graph"]
    sess = ort.InferenceSession(str(artifact / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    enc = encode(tiny_backbone.tokenizer, TEXTS[:3], "chat", 256)
    ids, mask, pos = pad_batch(enc.ids, tiny_backbone.tokenizer.pad_token_id, "left")
    feed = ort_feed(m, ids, mask, pos)
    tokens = []
    for _ in range(20):
        out = dict(zip(names, sess.run(None, feed)))
        nxt = out["logits"][:, -1].argmax(-1)
        tokens.append(nxt)
        mask = np.concatenate([mask, np.ones((len(nxt), 1), np.int64)], 1)
        pos = pos[:, -1:] + 1
        feed = ort_feed(m, nxt[:, None].astype(np.int64), mask, pos, [out[n] for n in g["present_names"]])
        assert out["tox/probs"].shape == (3, 2)  # probes run (cheaply) in decode steps too
    ref = tiny_backbone.model.generate(
        input_ids=torch.from_numpy(ids),
        attention_mask=torch.from_numpy(mask[:, : ids.shape[1]]),
        max_new_tokens=20,
        do_sample=False,
        min_new_tokens=20,
        pad_token_id=tiny_backbone.tokenizer.pad_token_id,
    )
    np.testing.assert_array_equal(np.stack(tokens, 1), ref[:, ids.shape[1] :].numpy())


def test_debug_variant_exposes_hidden_states_and_all_logits(
    artifact, tiny_model_dir, probe_dirs, cache_dir, tiny_backbone
):
    out = artifact.parent / "debug"
    argv = export_argv(
        tiny_model_dir, cache_dir, out, probe_dirs["tox"], extra=["--keep-hidden-states", "--all-logits"]
    )
    assert main(argv) == 0
    m = manifest(out)
    outputs = {o["name"]: o["dims"] for o in m["graph"]["outputs"]}
    assert outputs["hidden_states"] == [3, "batch", "sequence", 64]
    assert outputs["logits"] == ["batch", "sequence", 300] and not m["graph"]["logits_last_position_only"]
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    ids, mask, pos = pad_batch([[5, 6, 7, 8], [9, 10]], 2, "right")
    res = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, ort_feed(m, ids, mask, pos))))
    logits, hs, _ = reference(tiny_backbone, {}, ids, mask, pos)
    real = mask.astype(bool)
    np.testing.assert_allclose(res["hidden_states"][:, real], hs[:, real], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(res["logits"][real], logits[real], atol=1e-3)


def test_existing_output_needs_force(artifact, tiny_model_dir, probe_dirs, cache_dir, capsys):
    out = artifact.parent / "replace-me"
    base = export_argv(tiny_model_dir, cache_dir, out)
    assert main(base + ["--probe", str(probe_dirs["tox"])]) == 0
    before = (out / "manifest.json").read_text()
    assert main(base + ["--probe", str(probe_dirs["sent"])]) == 2
    err = capsys.readouterr().err
    assert "exists" in err and "--force" in err
    assert (out / "manifest.json").read_text() == before  # untouched
    assert main(base + ["--probe", str(probe_dirs["sent"]), "--force"]) == 0
    assert [p["name"] for p in manifest(out)["probes"]] == ["sent"]
    assert not (out / "probes" / "tox").exists()
    assert not [f for f in artifact.parent.iterdir() if f.name.startswith(".")]
    (artifact.parent / "not-an-artifact").mkdir()
    (artifact.parent / "not-an-artifact" / "precious.txt").write_text("keep me")
    assert (
        main(base[:-1] + [str(artifact.parent / "not-an-artifact"), "--probe", str(probe_dirs["tox"]), "--force"]) == 2
    )
    assert (artifact.parent / "not-an-artifact" / "precious.txt").read_text() == "keep me"


def test_validate_command_reruns_and_catches_a_broken_graph(artifact, tmp_path, capsys):
    assert main(["validate", str(artifact)]) == 0
    assert "validation passed" in capsys.readouterr().out
    broken = tmp_path / "broken"
    shutil.copytree(artifact, broken)
    model = onnx.load(str(broken / "model.onnx"))

    # a prompt probe's weights sit in If branches (it runs on prefill passes only, in stage Ifs)
    def graphs(g):
        yield g
        for n in g.node:
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    yield from graphs(a.g)

    inits = [t for g in graphs(model.graph) for t in g.initializer]
    for t in inits:  # perturb the emotion probe's weights inside the fused graph
        if (
            t.name.startswith("emo/")
            and onnx.helper.tensor_dtype_to_np_dtype(t.data_type) == np.float32
            and np.prod(t.dims) > 100
        ):
            arr = onnx.numpy_helper.to_array(t) * 1.5
            t.CopyFrom(onnx.numpy_helper.from_array(arr, t.name))
    onnx.save_model(model, str(broken / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    assert main(["validate", str(broken)]) == 2  # a ValidationError, printed without a traceback
    err = capsys.readouterr().err
    assert "does not match the PyTorch reference (worst: emo/" in err and "NO" in err


@pytest.mark.parametrize("opset,name", [(18, "singlepass_gqa"), (23, "singlepass_gqa_onnx")])
def test_exported_attention_equals_transformers_eager_with_left_padding(tiny_backbone, opset, name):
    """The grouped-query attention singlepass exports (no repeat_kv; from opset 23 ONNX's Attention
    through torch.onnx.ops.attention) against the oracle, transformers' eager attention: same
    logits and cache for a left-padded batch with a past."""
    import torch

    from singlepass.export.attention import exporting_attention
    from singlepass.export.llm import _wrapper, example_inputs

    model = tiny_backbone.model
    cfg = model.config
    assert cfg.num_attention_heads > cfg.num_key_value_heads  # the grouped case
    wrapper = _wrapper(model, with_past=True, with_positions=True)
    ids, mask, pos, kv = example_inputs(model, batch=3, seq=4, past=5)
    before = cfg._attn_implementation
    cfg._attn_implementation = "eager"
    try:
        with torch.no_grad():
            ref = wrapper(ids, mask, pos, kv)
            with exporting_attention(model, opset) as used:
                got = wrapper(ids, mask, pos, kv)
                assert used and cfg._attn_implementation == name
    finally:
        cfg._attn_implementation = before
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)


# Every hidden-state family and option in one graph: each probe's per-layer form fused on the stream.
ALL_OPTIONS = {
    **{
        f"pool-{t}-{lp}": ("pooling", {"token_pool": t, "layer_pool": lp})
        for t in ("mean", "max")
        for lp in ("mean", "max")
    },
    **{f"gate-{n}": ("gate", {"input_norm": n}) for n in ("standard", "rms", "none")},
    **{f"mha-{p}": ("mha", {"factor": 8, "heads": 2, "pool": p, "input_norm": "standard"}) for p in ("mean", "max")},
    "last": ("last-token", {}),
}
STACKING = {"Unsqueeze", "Reshape", "Identity", "Cast", "Squeeze", "Flatten"}  # shape-only or no-op steps


def stacked_copies(model, tensors: list[str]) -> int:
    """Concat nodes reached from the given [B, T, d] tensors through shape-only steps: a copy of them."""
    readers = {}
    for n in all_nodes(model.graph):
        for i in n.input:
            readers.setdefault(i, []).append(n)
    found, todo, seen = set(), list(tensors), set()
    while todo:
        for n in readers.get(todo.pop(), []):
            if n.op_type == "Concat":
                found.add(n.name)
            elif n.op_type in STACKING and n.name not in seen:
                seen.add(n.name)
                todo.extend(n.output)
    return len(found)


def test_fused_probes_read_each_layer_where_it_is(tmp_path, tiny_backbone):
    """The fused probes' inputs are the residual-stream tensors themselves (one fp32 boundary Cast each),
    the graph stacks no [L+1, B, T, d] copy unless --keep-hidden-states asks for it, and every family and
    option still equals the torch probe on the stacked states."""
    from singlepass.export.llm import export_decoder
    from singlepass.export.pipeline import build_graph, load_probes, parse_probe_specs
    from singlepass.models.probe_io import load_probe, read_config, save_probe
    from singlepass.models.prompts import encode

    dirs = {}
    for k, (name, (method, params)) in enumerate(ALL_OPTIONS.items()):
        dirs[name] = make_probe(tmp_path / name, tiny_backbone, method, 3 if "mha" in name else 2, seed=k, **params)
        if params.get("input_norm") == "standard":  # non-trivial per-layer statistics
            module, _ = load_probe(dirs[name])
            L1, d = module.num_layers, module.hidden_size
            module.set_input_statistics(torch.randn(L1, d), torch.rand(L1, d) + 0.5)
            save_probe(dirs[name], module, read_config(dirs[name]))
    probes = load_probes(parse_probe_specs([f"{d}:{n}" for n, d in dirs.items()]), tiny_backbone)
    decoder = export_decoder(tiny_backbone.model, opset=18, cache_key=tiny_backbone.fingerprint["sha256"])
    model, stream = build_graph(decoder, tiny_backbone, probes, False, False)[:2]
    producers = {o: n for n in all_nodes(model.graph) for o in n.output}
    for name in ALL_OPTIONS:
        for i, h in enumerate(stream.hidden_states):
            node = producers.get(f"{name}/state_{i}")
            if name == "last" and i < len(stream.hidden_states) - 1:
                assert node is None  # a fixed readout reads its one layer only
                continue
            assert (node.op_type, list(node.input)) == ("Cast", [h]), (name, i)
    assert stacked_copies(model, stream.hidden_states) == 0
    assert "hidden_states" not in {t for n in model.graph.node for t in n.output}
    debug = build_graph(decoder, tiny_backbone, probes[:1], True, False)[0]
    assert stacked_copies(debug, stream.hidden_states) == 1  # the stack exists as the debug output only
    assert "hidden_states" in {o.name for o in debug.graph.output}

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    inputs = {i.name: i for i in sess.get_inputs()}
    enc = encode(tiny_backbone.tokenizer, TEXTS, "chat", 256)
    for side in ("left", "right"):
        ids, mask, pos = pad_batch(enc.ids, tiny_backbone.tokenizer.pad_token_id, side)
        feed = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
        for n, i in inputs.items():
            if n.startswith("past_key_values"):
                feed[n] = np.zeros((len(ids), i.shape[1], 0, i.shape[3]), np.float32)
        out = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed)))
        _, _, probs = reference(tiny_backbone, dirs, ids, mask, pos)
        for name in ALL_OPTIONS:
            np.testing.assert_allclose(out[f"{name}/probs"], probs[name], rtol=0, atol=1e-5, err_msg=name)
