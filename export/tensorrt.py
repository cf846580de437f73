"""TensorRT engine build for an artifact, and the pre-flight that runs without TensorRT.

``tensorrt`` is imported lazily, only by ``build_engine``: it cannot be installed on this
project's machines (PyPI carries only stub packages that download from NVIDIA's index), so
the engine build has NOT been executed here. ``preflight`` (``singlepass build-engine
--check-only``) runs everywhere and checks what can be checked without TensorRT:

* the ONNX checker and strict shape inference on the fused graph;
* every op in TensorRT's ONNX supported-operator list for the targeted version
  (``TARGET_TENSORRT``, from onnx-tensorrt's docs/operators.md), the opset in its range, and
  the op restrictions that matter here (constant ``axes`` for Reduce*/Squeeze/Unsqueeze);
* the optimization profiles: no zero-length dimension (TensorRT wants >= 1; prefill therefore
  uses ONE masked dummy past slot, and ONNX Runtime checks that this changes nothing);
* an fp16 range report: max |activation| per layer on real prompts against fp16's 65504.

Engine contract (manifest ``engines[]``): two optimization profiles, 0 = prefill
(input [B, T], past length exactly 1 = the dummy slot, attention_mask [B, 1 + T] with a 0 in
column 0), 1 = decode (input [B, 1], past length 1 .. max_seq - 1). The dummy slot stays in
the KV cache and its mask column stays 0 for the whole generation.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from singlepass.errors import SinglepassError

TARGET_TENSORRT = "10.15"
OPSET_RANGE = (9, 24)
FP16_MAX = 65504.0
MASK_FILL = 1e30  # |x| above this is a masking constant (-inf / finfo.min), not an activation
PRECISIONS = ("fp32", "fp16", "bf16")
# Operators marked supported ("Y") in onnx-tensorrt docs/operators.md for TensorRT 10.15.
SUPPORTED_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh Attention AveragePool BatchNormalization BlackmanWindow
Cast CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DeformConv
DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather
GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample
GroupNormalization GRU HammingWindow HannWindow HardSigmoid HardSwish Hardmax Identity If ImageScaler
InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN LSTM
LpNormalization LpPool MatMul Max MaxPool Mean MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression
NonZero Not OneHot Or Pad ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform
RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin
ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence RMSNormalization RNN RoiAlign
RotaryEmbedding Round STFT ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin
Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh TensorScatter
ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
""".split())
CONSTANT_INPUTS = {  # op -> input index that TensorRT needs as a build-time constant
    **{op: 1 for op in ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
                        "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare", "Squeeze", "Unsqueeze",
                        "CumSum", "TopK")},
}
UNSUPPORTED_TYPES = {"float64": "DOUBLE is cast down to FLOAT by TensorRT", "string": "no string tensors"}


def _fail(msg: str) -> dict:
    return {"ok": False, "detail": msg}


# ----------------------------------------------------------------------------- profiles

def profiles(manifest: dict, max_batch: int, max_seq: int) -> list[dict]:
    """[{name, shapes: {input: (min, opt, max)}}] for prefill and (with a KV cache) decode."""
    g, b = manifest["graph"], manifest["backbone"]
    if max_batch < 1 or max_seq < 2:
        raise SinglepassError("--max-batch must be >= 1 and --max-seq >= 2")
    opt_b, prompt = max(1, max_batch // 2), min(max_seq - 1, manifest["limits"]["max_prompt_length"])
    kv = (b["num_kv_heads"], b["head_dim"])
    out = []
    if g["kv_cache"]:
        pre = {g["input_ids"]: ((1, 1), (opt_b, max(1, prompt // 2)), (max_batch, prompt)),
               g["attention_mask"]: ((1, 2), (opt_b, 1 + max(1, prompt // 2)), (max_batch, 1 + prompt))}
        dec = {g["input_ids"]: ((1, 1), (opt_b, 1), (max_batch, 1)),
               g["attention_mask"]: ((1, 2), (opt_b, max_seq // 2 + 1), (max_batch, max_seq))}
        if g["position_ids"]:
            pre[g["position_ids"]] = pre[g["input_ids"]]
            dec[g["position_ids"]] = dec[g["input_ids"]]
        for n in g["past_names"]:
            pre[n] = tuple((bb, *kv[:1], 1, kv[1]) for bb in (1, opt_b, max_batch))
            dec[n] = ((1, kv[0], 1, kv[1]), (opt_b, kv[0], max_seq // 2, kv[1]), (max_batch, kv[0], max_seq - 1, kv[1]))
        out = [{"name": "prefill", "shapes": pre}, {"name": "decode", "shapes": dec}]
    else:
        shapes = {n: ((1, 1), (opt_b, max_seq // 2), (max_batch, max_seq))
                  for n in (g["input_ids"], g["attention_mask"], g["position_ids"]) if n}
        out = [{"name": "full-sequence", "shapes": shapes}]
    return out


def check_profiles(manifest: dict, profs: list[dict]) -> dict:
    problems = []
    names = {i["name"] for i in manifest["graph"]["inputs"]}
    for p in profs:
        if set(p["shapes"]) != names:
            problems.append(f"profile {p['name']}: covers {sorted(p['shapes'])}, graph inputs are {sorted(names)}")
        for name, (lo, opt, hi) in p["shapes"].items():
            if min(lo) < 1:
                problems.append(f"profile {p['name']}: {name} min shape {lo} has a zero-length dimension")
            if not all(a <= b <= c for a, b, c in zip(lo, opt, hi)):
                problems.append(f"profile {p['name']}: {name} needs min <= opt <= max ({lo}, {opt}, {hi})")
    return {"ok": not problems, "detail": problems or [f"{p['name']}: " + ", ".join(
        f"{k} {list(v[0])}..{list(v[2])}" for k, v in p["shapes"].items() if "past" not in k or k.endswith("0.key"))
        for p in profs]}


# ----------------------------------------------------------------------------- static checks

def check_ops(model) -> dict:
    from singlepass.export.surgery import GraphIndex, opset_of

    ix = GraphIndex(model)
    opset = opset_of(model)
    bad, restricted = {}, []
    for n in model.graph.node:
        if n.domain not in ("", "ai.onnx"):
            bad.setdefault(f"{n.domain}::{n.op_type}", 0)
            bad[f"{n.domain}::{n.op_type}"] += 1
        elif n.op_type not in SUPPORTED_OPS:
            bad[n.op_type] = bad.get(n.op_type, 0) + 1
        k = CONSTANT_INPUTS.get(n.op_type)
        if k is not None and len(n.input) > k and n.input[k] and ix.constant(n.input[k]) is None:
            restricted.append(f"{n.name or n.op_type}: input {k} ({n.op_type} axes/k) is not a constant")
    ops = sorted({n.op_type for n in model.graph.node})
    problems = [f"unsupported op {k} x{v}" for k, v in sorted(bad.items())] + restricted[:20]
    if not OPSET_RANGE[0] <= opset <= OPSET_RANGE[1]:
        problems.append(f"opset {opset} outside TensorRT {TARGET_TENSORRT}'s range {OPSET_RANGE}")
    return {"ok": not problems, "tensorrt": TARGET_TENSORRT, "opset": opset, "ops": ops,
            "detail": problems or f"{len(ops)} op types, all supported by TensorRT {TARGET_TENSORRT}"}


def check_model(path: Path):
    """ONNX checker (with the external data) + strict shape inference. -> (report, inferred model)."""
    import onnx

    try:
        onnx.checker.check_model(str(path))
    except Exception as e:  # noqa: BLE001
        return _fail(f"onnx.checker: {str(e).splitlines()[0][:300]}"), None
    model = onnx.load(str(path), load_external_data=False)
    try:
        inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    except Exception as e:  # noqa: BLE001
        return _fail(f"shape inference: {str(e).splitlines()[0][:300]}"), None
    types = {}
    for v in list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input):
        t = v.type.tensor_type.elem_type
        name = onnx.helper.tensor_dtype_to_np_dtype(t).name if t else "undefined"
        types[name] = types.get(name, 0) + 1
    bad = {k: v for k, v in types.items() if k in UNSUPPORTED_TYPES}
    detail = f"checker OK; strict shape inference typed {len(inferred.graph.value_info)} tensors {types}"
    return {"ok": not bad, "detail": detail if not bad else f"tensor types TensorRT cannot run: {bad}"}, inferred


def precision_plan(model, manifest: dict) -> dict:
    """Node names kept fp32 in reduced-precision engines: fused probe subgraphs (and the
    singlepass glue feeding them: stacking, mask slice, casts) and the RMS normalisations."""
    from singlepass.export import surgery

    stream = surgery.find_residual_stream(model, logits_name=manifest["graph"]["logits"])
    norms = surgery.normalisation_nodes(model, stream)
    prefixes = tuple(f"{p['name']}/" for p in manifest["probes"]) + (surgery.PREFIX,)
    ix = surgery.GraphIndex(model)
    lm = ix.producer.get(stream.logits)
    probe_nodes = [n.name for n in model.graph.node if n.name.startswith(prefixes)
                   and not (lm is not None and n.name == lm.name)]
    return {"probe_nodes": probe_nodes, "norm_nodes": norms, "stream": stream}


# ----------------------------------------------------------------------------- runtime checks (ORT)

def _prompt_feeds(art_folder: Path, manifest: dict, prompts: list[str]):
    from transformers import AutoTokenizer

    from singlepass.models.prompts import encode
    from singlepass.runtime.batching import pad_batch

    tok = AutoTokenizer.from_pretrained(str(art_folder), local_files_only=True)
    pr = manifest["prompt"]
    enc = encode(tok, prompts, pr["format"], pr.get("max_length") or 512)
    pad = manifest["tokenizer"]["pad_token_id"] or 0
    return [pad_batch([ids], pad, "left") for ids in enc.ids]


def _feed(manifest, ids, mask, pos, past_len: int):
    from singlepass.runtime.feeds import make_feed

    return make_feed(manifest, ids, mask, pos, dummy=past_len)


def check_dummy_past(sess, manifest: dict, feeds) -> dict:
    """Prefill with one masked dummy past slot (the TensorRT profile) == prefill with no past."""
    if not manifest["graph"]["kv_cache"]:
        return {"ok": True, "detail": "no KV cache: no dummy slot needed"}
    names = [o.name for o in sess.get_outputs()]
    keep = [manifest["graph"]["logits"]] + [p["outputs"]["probs"] for p in manifest["probes"]]
    worst = 0.0
    for ids, mask, pos in feeds:
        a = dict(zip(names, sess.run(None, _feed(manifest, ids, mask, pos, 0))))
        b = dict(zip(names, sess.run(None, _feed(manifest, ids, mask, pos, 1))))
        worst = max([worst] + [float(np.abs(a[k] - b[k]).max()) for k in keep])
    ok = worst <= 1e-4
    return {"ok": ok, "max_abs_diff": worst,
            "detail": f"logits and probe probs with a masked dummy past slot vs none: max |diff| {worst:.2g}"}


def range_report(folder: Path, manifest: dict, model, plan: dict, feeds) -> dict:
    """Max |activation| per decoder layer on real prompts (ONNX Runtime, every float tensor exposed)."""
    import onnx

    from singlepass.export import surgery
    from singlepass.export.validate import session

    stream = plan["stream"]
    full = onnx.load(str(folder / manifest["graph"]["file"]))
    inferred = onnx.shape_inference.infer_shapes(full)
    floats = {v.name for v in inferred.graph.value_info if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    have = {o.name for o in full.graph.output}
    for name in sorted(floats - have):
        surgery.add_output(full, name)
    # Layer of a node = how many layer ends (second residual add of a layer) precede it in
    # topological order; nodes after the last one are the final norm and the lm_head.
    order = {n.name: k for k, n in enumerate(full.graph.node)}
    ix = surgery.GraphIndex(full)
    bounds = [order[ix.producer[t].name] for t in stream.residuals[1::2]]
    emb_at = order[ix.producer[stream.embedding].name] if stream.embedding in ix.producer else -1
    probe_prefixes = tuple(f"{p['name']}/" for p in manifest["probes"])
    producer_of = {o: n.name for n in full.graph.node for o in n.output}
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "all_outputs.onnx"
        onnx.save_model(full, str(path), save_as_external_data=True, location="w.data")
        del full
        sess = session(path)
        names = [o.name for o in sess.get_outputs()]
        maxima: dict[str, float] = {}
        fills = 0
        for ids, mask, pos in feeds:
            for n, v in zip(names, sess.run(None, _feed(manifest, ids, mask, pos, 0))):
                if v.dtype != np.float32 or not v.size:
                    continue
                a = np.abs(v[np.isfinite(v)])
                big = a >= MASK_FILL
                fills += int(big.sum()) + int((~np.isfinite(v)).sum())
                m = float(a[~big].max()) if (~big).any() else 0.0
                maxima[n] = max(maxima.get(n, 0.0), m)
        del sess
    L = stream.num_layers
    layers = [{"layer": i, "residual_max": 0.0, "block_max": 0.0, "block_argmax": None} for i in range(L)]
    hs_max = [maxima.get(t, 0.0) for t in stream.hidden_states]
    for i in range(L):
        layers[i]["residual_max"] = hs_max[i + 1]
    other = {"probes": 0.0, "final_norm_and_lm_head": 0.0, "embedding": hs_max[0]}
    for n, m in maxima.items():
        node = producer_of.get(n, "")
        if node.startswith(probe_prefixes):
            other["probes"] = max(other["probes"], m)
            continue
        if node.startswith(surgery.PREFIX) or order.get(node, 0) <= emb_at:
            continue  # singlepass glue (copies of stream tensors), mask / position preprocessing
        layer = sum(1 for b in bounds if b < order.get(node, 0))
        if layer >= L:
            other["final_norm_and_lm_head"] = max(other["final_norm_and_lm_head"], m)
        elif m > layers[layer]["block_max"]:
            layers[layer]["block_max"], layers[layer]["block_argmax"] = m, n
    # Tensors made by the nodes pinned to fp32 (RMS norms: x**2 of a 2.5e4 residual is 6e8; fused
    # probes) never exist in fp16, so only the others must fit fp16's range.
    pinned = set(plan["norm_nodes"]) | set(plan["probe_nodes"])
    in_fp16 = {n: m for n, m in maxima.items() if producer_of.get(n) not in pinned}
    overall = max(in_fp16.values(), default=0.0)
    fp32_max = max((m for n, m in maxima.items() if n not in in_fp16), default=0.0)
    over = sorted(((m, n) for n, m in in_fp16.items() if m > FP16_MAX), reverse=True)
    return {"ok": not over, "fp16_max": FP16_MAX, "max_abs_activation": overall,
            "max_abs_fp32_pinned": fp32_max, "headroom": FP16_MAX / overall if overall else None,
            "hidden_states_max": hs_max, "layers": layers, "other": other,
            "over_fp16": [{"tensor": n, "max_abs": m} for m, n in over[:10]],
            "mask_fill_values_ignored": fills, "prompts": len(feeds),
            "detail": (f"max |activation| {overall:.4g} ({overall / FP16_MAX:.0%} of fp16's {FP16_MAX:.0f}; "
                       f"{fp32_max:.4g} inside the fp32-pinned norms and probes); residual stream max "
                       f"{max(hs_max):.4g}" + (f"; {len(over)} tensors overflow fp16" if over else ""))}


# ----------------------------------------------------------------------------- entry points

def preflight(folder, precision: str = "fp16", max_batch: int = 8, max_seq: int | None = None,
              prompts: list[str] | None = None, write: bool = True) -> dict:
    """Everything about a TensorRT build that can be checked without TensorRT."""
    from singlepass.export import manifest as mf
    from singlepass.export.validate import PROMPTS, session

    t0 = time.perf_counter()
    folder = Path(folder)
    m = mf.read(folder)
    max_seq = max_seq or m["limits"]["max_total_length"]
    report = {"tensorrt_target": TARGET_TENSORRT, "precision": precision, "max_batch": max_batch, "max_seq": max_seq}
    report["onnx"], inferred = check_model(folder / m["graph"]["file"])
    model = inferred if inferred is not None else __import__("onnx").load(str(folder / m["graph"]["file"]),
                                                                          load_external_data=False)
    report["operators"] = check_ops(model)
    profs = profiles(m, max_batch, max_seq)
    report["profiles"] = check_profiles(m, profs)
    report["profile_shapes"] = [{"name": p["name"], "shapes": {k: [list(s) for s in v] for k, v in p["shapes"].items()}}
                                for p in profs]
    plan = precision_plan(model, m)
    report["fp32_layers"] = {"ok": bool(plan["norm_nodes"]) and (bool(plan["probe_nodes"]) or not m["probes"]),
                             "probe_nodes": len(plan["probe_nodes"]), "norm_nodes": len(plan["norm_nodes"]),
                             "detail": f"{len(plan['probe_nodes'])} probe/glue nodes and {len(plan['norm_nodes'])} "
                                       f"normalisation nodes pinned to fp32 in {precision} builds"}
    feeds = _prompt_feeds(folder, m, prompts or PROMPTS)
    sess = session(folder / m["graph"]["file"])
    report["dummy_past"] = check_dummy_past(sess, m, feeds[:3])
    del sess
    report["fp16_range"] = range_report(folder, m, model, plan, feeds)
    if precision == "fp32":
        report["fp16_range"]["ok"] = True  # informative only for an fp32 engine
    keys = ("onnx", "operators", "profiles", "fp32_layers", "dummy_past", "fp16_range")
    report["ok"] = all(report[k]["ok"] for k in keys)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    if write:
        (folder / "tensorrt_preflight.json").write_text(json.dumps(report, indent=2, default=str))
    return report


def import_tensorrt():
    try:
        import tensorrt as trt  # noqa: PLC0415 - lazy on purpose
    except ImportError:
        raise SinglepassError(
            "TensorRT is not installed (the `tensorrt` Python package; it needs an NVIDIA GPU, a driver and "
            "NVIDIA's package index). Run `singlepass build-engine ART --check-only` for the checks that work "
            "without it.") from None
    return trt


def build_engine(folder, precision: str = "fp16", max_batch: int = 8, max_seq: int | None = None,
                 workspace_gb: float = 4.0, timing_cache: str | None = None, force: bool = False,
                 log=print) -> dict:
    """Build a serialized engine next to the manifest with the TensorRT Python API."""
    import onnx

    from singlepass.export import manifest as mf

    if precision not in PRECISIONS:
        raise SinglepassError(f"--precision must be one of {', '.join(PRECISIONS)}")
    trt = import_tensorrt()
    folder = Path(folder)
    m = mf.read(folder)
    max_seq = max_seq or m["limits"]["max_total_length"]
    engine_path = folder / f"model.{precision}.b{max_batch}.s{max_seq}.engine"
    if engine_path.exists() and not force:
        raise SinglepassError(f"{engine_path} exists (use --force to rebuild)")
    profs = profiles(m, max_batch, max_seq)
    chk = check_profiles(m, profs)
    if not chk["ok"]:
        raise SinglepassError("optimization profiles are invalid: " + "; ".join(chk["detail"]))
    plan = precision_plan(onnx.load(str(folder / m["graph"]["file"]), load_external_data=False), m)
    fp32_names = set(plan["probe_nodes"]) | set(plan["norm_nodes"])

    t0 = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if int(trt.__version__.split(".")[0]) < 10:  # TensorRT 8.x/9.x need explicit batch spelled out
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(folder / m["graph"]["file"])):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise SinglepassError("TensorRT's ONNX parser rejects the graph:\n" + "\n".join(errors[:10]))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    pinned = 0
    if precision != "fp32":
        # Probe subgraphs and RMS norms stay fp32; TensorRT inserts the casts at their borders.
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            base = layer.name.split(" ")[0]
            if layer.name in fp32_names or base in fp32_names or any(layer.name.startswith(n + "_")
                                                                     for n in fp32_names if n in layer.name):
                layer.precision = trt.float32
                for j in range(layer.num_outputs):
                    layer.set_output_type(j, trt.float32)
                pinned += 1
    for p in profs:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in p["shapes"].items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    cache_path = Path(timing_cache) if timing_cache else folder / "tensorrt.timing.cache"
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, False)
    log(f"building a {precision} engine ({len(profs)} profiles, {pinned} layers pinned to fp32) ...")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise SinglepassError("TensorRT failed to build the engine (see the TensorRT log above)")
    engine_path.write_bytes(bytes(serialized))
    cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    entry = {"file": engine_path.name, "precision": precision, "max_batch": max_batch, "max_seq": max_seq,
             "tensorrt": trt.__version__, "profiles": [{"name": p["name"], "shapes": {
                 k: [list(s) for s in v] for k, v in p["shapes"].items()}} for p in profs],
             "dummy_past_slot": bool(m["graph"]["kv_cache"]), "fp32_layers": pinned,
             "timing_cache": cache_path.name, "seconds": round(time.perf_counter() - t0, 1)}
    m["engines"] = [e for e in m.get("engines", []) if e.get("file") != entry["file"]] + [entry]
    mf.write(folder, m)
    return entry
