"""Helpers for the export tests: random-weight probe artifacts and foreign decoder graphs."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np


def make_probe(
    folder: Path,
    backbone,
    method: str = "gate",
    num_classes: int = 2,
    seed: int = 0,
    backbone_fingerprint: dict | None = None,
    reads: str | None = None,
    **params,
) -> Path:
    """A probe artifact with random weights (any --probe method, MULI included); ``reads="response"``
    makes it a response probe (fused in its streaming form)."""
    import torch

    from singlepass.models.probe_io import save_probe
    from singlepass.models.registry import build_method, input_kind

    L1, d, V = backbone.num_layers + 1, backbone.hidden_size, backbone.model.config.vocab_size
    if method == "muli":
        params = {"vocab_size": V, **params}
    torch.manual_seed(seed)
    module = build_method(method, L1, d, num_classes, **params)
    with torch.no_grad():
        for p in module.parameters():  # larger than init so the probabilities move visibly
            p.normal_(0, 0.5)
        if method == "muli":
            module.inv_std.uniform_(0.5, 1.5)
            module.mean.normal_(0, 1)
    cfg = {
        "probe": method,
        "input": input_kind(method),
        "params": params,
        "num_layers": L1,
        "hidden_size": d,
        "label_names": ["no", "yes"] if num_classes == 2 else [f"class{i}" for i in range(num_classes)],
        "threshold": 0.5 if num_classes == 2 else None,
        "prompt_format": "chat",
        "max_length": 64,
        "task": "safety" if num_classes == 2 else "emotion",
        "backbone": backbone_fingerprint or backbone.fingerprint,
    }
    if reads:
        cfg["reads"] = reads
        if reads == "response":
            cfg["max_response_tokens"] = 128
    return save_probe(folder, module, cfg)


def save_graph(model, path: Path, external: bool = False) -> Path:
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=external,
        all_tensors_to_one_file=True,
        location=path.name + ".data" if external else None,
        size_threshold=0,
    )
    return path


def foreign_graph(
    backbone,
    path: Path,
    exporter: str,
    with_past: bool,
    with_positions: bool = True,
    opset: int | None = None,
    external: bool = False,
) -> Path:
    """A decoder graph exported the way other tools do it (no singlepass surgery applied)."""
    from singlepass.export.llm import export_decoder

    model = export_decoder(
        backbone.model,
        opset=opset or (18 if exporter == "dynamo" else 17),
        exporter=exporter,
        with_past=with_past,
        with_positions=with_positions,
        cache_key=backbone.fingerprint["sha256"],
    )
    return save_graph(model, path, external)


def mlp_graph(path: Path) -> Path:
    """A tiny MLP classifier: a valid ONNX model that is not a decoder."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.normal(size=(8, 16)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.normal(size=(16, 3)).astype(np.float32), "w2")
    g = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("MatMul", ["r", "w2"], ["logits"]),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])],
        [w1, w2],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    return save_graph(model, path)


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def all_nodes(graph):
    """Every node of an ONNX graph, with those inside If branches (a prompt probe runs in one)."""
    for n in graph.node:
        yield n
        for a in n.attribute:
            if a.type == a.GRAPH:
                yield from all_nodes(a.g)


def ort_feed(manifest: dict, ids, mask, pos, past=None) -> dict:
    g, b = manifest["graph"], manifest["backbone"]
    feed = {g["input_ids"]: ids, g["attention_mask"]: mask}
    if g["position_ids"]:
        feed[g["position_ids"]] = pos
    if g["kv_cache"]:
        if past is None:
            past = [np.zeros((ids.shape[0], b["num_kv_heads"], 0, b["head_dim"]), np.float32)] * len(g["past_names"])
        feed.update(zip(g["past_names"], past))
    return feed


def leftovers(parent: Path, name: str) -> list[str]:
    """Anything an interrupted export could leave next to ``parent/name``."""
    return sorted(p.name for p in Path(parent).iterdir() if p.name == name or p.name.startswith(f".{name}"))


def serving_artifact(
    root: Path, name: str, backbone, model_dir, cache_dir, max_prompt: int, muli: bool = True, extra=()
):
    """Export the tiny model with a binary (``safety``, gate), a three-class (``emotion``, MHA) and,
    with ``muli``, a logit-input (``muli``) probe into ``root/name`` with the in-place KV cache
    of the default (int4) export (``extra``: more export flags) -> (artifact folder, probe folders)."""
    from cli_args import export_argv

    from singlepass.cli import main

    probes = {
        "safety": make_probe(root / "safety", backbone, "gate"),
        "emotion": make_probe(root / "emotion", backbone, "mha", 3, seed=1, factor=8, heads=2),
    }
    if muli:
        probes["muli"] = make_probe(root / "muli", backbone, "muli", seed=2)
    out = root / name
    specs = [f"{d}:{n}" for n, d in probes.items()]
    assert (
        main(
            export_argv(
                model_dir,
                cache_dir,
                out,
                *specs,
                extra=["--max-prompt-length", max_prompt, "--kv-cache", "inplace", *extra],
            )
        )
        == 0
    )
    return out, probes
