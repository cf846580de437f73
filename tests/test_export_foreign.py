"""Graph surgery on decoder graphs singlepass did not export: `singlepass export --onnx`.

Two differently produced graphs of the tiny random Llama: torch.onnx's legacy TorchScript
exporter (opset 17, KV cache, weights in an external data file, scope names like
/model/layers.0/Add_1) and its dynamo exporter without a KV cache and without a position_ids
input (names like add_398). The surgery finds the residual stream in both by structure.
"""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from cli_args import export_argv
from export_helpers import foreign_graph, make_probe, ort_feed

from singlepass.cli import main
from singlepass.runtime.batching import pad_batch

GRAPHS = {  # name -> (exporter, with KV cache, position_ids input, opset)
    "legacy-kv": ("legacy", True, True, 17),
    "dynamo-nokv": ("dynamo", False, False, 18),
}


@pytest.fixture(scope="module")
def probes(tmp_path_factory, tiny_backbone):
    root = tmp_path_factory.mktemp("fprobes")
    return {
        "tox": make_probe(root / "tox", tiny_backbone, "gate"),
        "muli": make_probe(root / "muli", tiny_backbone, "muli", seed=3),
    }


@pytest.fixture(scope="module", params=list(GRAPHS))
def exported(request, tmp_path_factory, tiny_backbone, tiny_model_dir, probes, cache_dir):
    exporter, kv, positions, opset = GRAPHS[request.param]
    root = tmp_path_factory.mktemp(request.param)
    src = foreign_graph(tiny_backbone, root / "decoder.onnx", exporter, kv, positions, opset, external=kv)
    out = root / "art"
    assert main(export_argv(tiny_model_dir, cache_dir, out, probes["tox"], probes["muli"], extra=["--onnx", src])) == 0
    return request.param, src, out


def test_foreign_graphs_differ_in_naming(tiny_backbone, tmp_path):
    import onnx_graphsurgeon as gs

    from singlepass.export import surgery

    found = {}
    for name, (exporter, kv, positions, opset) in GRAPHS.items():
        path = foreign_graph(tiny_backbone, tmp_path / f"{name}.onnx", exporter, kv, positions, opset)
        s = surgery.find_residual_stream(gs.import_onnx(onnx.load(str(path))), expected_layers=tiny_backbone.num_layers)
        found[name] = s
        assert len(s.hidden_states) == tiny_backbone.num_layers + 1
    legacy, dynamo = found["legacy-kv"], found["dynamo-nokv"]
    assert any("/layers." in t for t in legacy.residuals) and not any("/layers." in t for t in dynamo.residuals)
    assert legacy.past and not dynamo.past and dynamo.position_ids is None


def test_surgery_artifact_validates_and_keeps_the_graphs_interface(exported, tiny_backbone):
    name, src, out = exported
    exporter, kv, positions, opset = GRAPHS[name]
    m = json.loads((out / "manifest.json").read_text())
    g = m["graph"]
    assert g["source"].startswith("graph surgery on") and str(src) in g["source"]
    assert g["opset"] == opset and g["kv_cache"] == kv
    assert (g["position_ids"] is not None) == positions
    original = onnx.load(str(src), load_external_data=False)
    assert [i["name"] for i in g["inputs"]] == [i.name for i in original.graph.input]
    outputs = [o["name"] for o in g["outputs"]]
    assert outputs[: len(original.graph.output)] == [o.name for o in original.graph.output]
    assert outputs[len(original.graph.output) :] == ["tox/logits", "tox/probs", "muli/logits", "muli/probs"]
    assert m["validation"]["passed"] and m["validation"]["max_abs_diff"]["tox/probs"] <= 1e-4


def test_surgery_artifact_probe_parity(exported, tiny_backbone, probes):
    from singlepass.models.probe_io import load_probe
    from singlepass.models.probes import probabilities

    _, _, out = exported
    m = json.loads((out / "manifest.json").read_text())
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    ids, mask, pos = pad_batch([[5, 9, 14, 22, 7, 40], [31, 8, 2 + 1], [77]], 2, "left")
    res = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, ort_feed(m, ids, mask, pos))))
    kw = {"position_ids": torch.from_numpy(pos)} if m["graph"]["position_ids"] else {}
    with torch.no_grad():
        o = tiny_backbone.model(
            input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), output_hidden_states=True, **kw
        )
        gate, _ = load_probe(probes["tox"], tiny_backbone.fingerprint)
        muli, _ = load_probe(probes["muli"], tiny_backbone.fingerprint)
        ref_tox = probabilities(gate(torch.stack(o.hidden_states), torch.from_numpy(mask))).numpy()
        ref_muli = probabilities(muli(o.logits[:, -1])).numpy()
    np.testing.assert_allclose(res["tox/probs"], ref_tox, atol=1e-4)
    np.testing.assert_allclose(res["muli/probs"], ref_muli, atol=1e-4)
    np.testing.assert_allclose(res["logits"][:, -1], o.logits[:, -1].numpy(), atol=1e-3)


def test_runtime_serves_both_foreign_graphs(exported, tiny_backbone):
    """singlepass generate on graphs singlepass did not export: a KV cache (legacy) and full
    recompute without a position_ids input (dynamo): greedy tokens equal transformers'."""
    from singlepass.models.prompts import encode_one
    from singlepass.runtime.api import load

    _, _, out = exported
    rt = load(out, backend="cpu")
    tok = tiny_backbone.tokenizer
    for text in ["What is the capital of France?", "Hi"]:
        r = rt.generate(text, 6)
        ids, _ = encode_one(tok, text, "chat", 64)
        ref = tiny_backbone.model.generate(
            torch.tensor([ids]), max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id
        )[0, len(ids) :].tolist()
        assert r.token_ids == ref and set(r.labels) == {"tox", "muli"}
