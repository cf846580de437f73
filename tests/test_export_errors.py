"""Bad input to `singlepass export`: each a clear error, and no half-written artifact left behind."""

import json

import pytest
from cli_args import export_argv
from export_helpers import foreign_graph, leftovers, make_probe, mlp_graph

from singlepass.cli import main


@pytest.fixture(scope="module")
def tox(tmp_path_factory, tiny_backbone):
    return make_probe(tmp_path_factory.mktemp("eprobes") / "tox", tiny_backbone, "pooling")


@pytest.fixture(scope="module")
def legacy_graph(tmp_path_factory, tiny_backbone):
    return foreign_graph(tiny_backbone, tmp_path_factory.mktemp("eg") / "decoder.onnx", "legacy", True)


def export(capsys, tiny_model_dir, cache_dir, out, *extra):
    code = main(export_argv(tiny_model_dir, cache_dir, out, extra=extra))
    return code, capsys.readouterr().err


def test_corrupt_and_truncated_onnx(tmp_path, capsys, tiny_model_dir, cache_dir, tox, legacy_graph):
    bad = tmp_path / "corrupt.onnx"
    bad.write_bytes(b"\x08\x07garbage" * 100)
    code, err = export(capsys, tiny_model_dir, cache_dir, tmp_path / "art", "--onnx", bad, "--probe", tox)
    assert code == 2 and "not a readable ONNX model" in err
    data = legacy_graph.read_bytes()
    cut = tmp_path / "truncated.onnx"
    cut.write_bytes(data[: len(data) // 2])
    code, err = export(capsys, tiny_model_dir, cache_dir, tmp_path / "art", "--onnx", cut, "--probe", tox)
    assert code == 2 and "truncated" in err
    code, err = export(
        capsys, tiny_model_dir, cache_dir, tmp_path / "art", "--onnx", tmp_path / "nope.onnx", "--probe", tox
    )
    assert code == 2 and "no such file" in err
    assert leftovers(tmp_path, "art") == []


def test_probe_from_another_backbone(tmp_path, capsys, tiny_backbone, tiny_model_dir, cache_dir):
    other = dict(tiny_backbone.fingerprint, sha256="0" * 64, name="some-other-model")
    probe = make_probe(tmp_path / "foreign", tiny_backbone, "gate", backbone_fingerprint=other)
    code, err = export(capsys, tiny_model_dir, cache_dir, tmp_path / "art", "--probe", probe)
    assert code == 2 and "trained on backbone 'some-other-model'" in err and "retrain" in err
    assert leftovers(tmp_path, "art") == []


def test_two_probes_with_the_same_name(tmp_path, capsys, tiny_backbone, tiny_model_dir, cache_dir, tox):
    twin = make_probe(tmp_path / "b" / "tox", tiny_backbone, "gate")
    code, err = export(capsys, tiny_model_dir, cache_dir, tmp_path / "art", "--probe", tox, "--probe", twin)
    assert code == 2 and "two probes are named 'tox'" in err and "DIR:NAME" in err
    code, err = export(
        capsys, tiny_model_dir, cache_dir, tmp_path / "art", "--probe", f"{tox}:x", "--probe", f"{twin}:x"
    )
    assert code == 2 and "two probes are named 'x'" in err
    code, err = export(capsys, tiny_model_dir, cache_dir, tmp_path / "art", "--probe", f"{tox}:logits")
    assert code == 2 and "not usable" in err
    code, err = export(capsys, tiny_model_dir, cache_dir, tmp_path / "art", "--probe", tmp_path / "missing")
    assert code == 2 and "no such folder" in err
    assert leftovers(tmp_path, "art") == []


def test_probes_with_different_prompt_formats(tmp_path, capsys, tiny_backbone, tiny_model_dir, cache_dir, tox):
    raw = make_probe(tmp_path / "raw", tiny_backbone, "gate")
    cfg = json.loads((raw / "config.json").read_text())
    (raw / "config.json").write_text(json.dumps(dict(cfg, prompt_format="raw")))
    code, err = export(capsys, tiny_model_dir, cache_dir, tmp_path / "art", "--probe", tox, "--probe", raw)
    assert code == 2 and "different prompt formats" in err


def test_unrecognisable_graph(tmp_path, capsys, tiny_model_dir, cache_dir, tox):
    code, err = export(
        capsys, tiny_model_dir, cache_dir, tmp_path / "art", "--onnx", mlp_graph(tmp_path / "mlp.onnx"), "--probe", tox
    )
    assert code == 2 and "no token-embedding Gather" in err
    assert leftovers(tmp_path, "art") == []


def test_graph_of_another_model(tmp_path, capsys, tiny_backbone, cache_dir, tox, legacy_graph):
    """The graph has 2 layers; a 3-layer model (with a probe of its own) is not its model."""
    from tiny import build_tiny_llama

    from singlepass.models.backbone import load_backbone

    other_dir = build_tiny_llama(tmp_path / "three", num_layers=3, seed=1)
    other = load_backbone(str(other_dir), cache_dir=str(cache_dir))
    probe = make_probe(tmp_path / "p3", other, "gate")
    code, err = export(capsys, other_dir, cache_dir, tmp_path / "art", "--onnx", legacy_graph, "--probe", probe)
    assert code == 2 and "found 2 decoder layers in the graph but the model has 3" in err
    assert leftovers(tmp_path, "art") == []


def test_failed_validation_leaves_nothing(tmp_path, capsys, monkeypatch, tiny_model_dir, cache_dir, tox, legacy_graph):
    import singlepass.export.validate as v

    monkeypatch.setitem(v.TOLERANCES["fp32"], "logits", 0.0)  # no fp32 graph matches exactly: validation must fail
    code, err = export(capsys, tiny_model_dir, cache_dir, tmp_path / "art", "--onnx", legacy_graph, "--probe", tox)
    assert code == 2 and "does not match the PyTorch reference (worst: " in err
    assert leftovers(tmp_path, "art") == []


def test_validation_checks_probe_logits_where_float32_probs_are_blind():
    """The runtime's labels come from the probe logits (float64), so a quantised graph whose probe
    logit is 45 where the reference's is 20 fails validation, though both float32 probs read 1.0."""
    from types import SimpleNamespace

    import numpy as np

    import singlepass.export.validate as v

    par = object.__new__(v.Parity)  # compare() reads only the manifest's names and the tolerances
    probe = SimpleNamespace(input="hidden_states", logits="tox/logits", probs="tox/probs")
    par.m = SimpleNamespace(graph=SimpleNamespace(logits="logits", hidden_states=None), probes=[probe])
    par.tol = v.TOLERANCES["int4"]
    ref = {"tox/logits": np.array([[20.0], [-3.0]]), "tox/probs": np.array([[0.0, 1.0], [0.95, 0.05]])}
    for got_logit, ok in ((21.0, True), (45.0, False)):
        got = {"tox/logits": np.array([[got_logit], [-3.0]], np.float32), "tox/probs": ref["tox/probs"]}
        report = v.Report("int4")
        par.compare(report, "case", got, ref, np.ones((2, 4), np.int64))
        assert report.ok is ok, got_logit
        assert [c.tensor for c in report.checks if not c.ok] == ([] if ok else ["tox/logits"])
