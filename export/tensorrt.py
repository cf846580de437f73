"""TensorRT engine build for an artifact (Polygraphy), and the pre-flight that runs without TensorRT.

``tensorrt`` is imported lazily, only by ``build_engine``: it cannot be installed on this
project's machines (PyPI carries only stub packages that download from NVIDIA's index), so
the engine build has NOT been executed here; the tests drive it through a stand-in of the
TensorRT API underneath the real Polygraphy loaders. ``preflight`` (``singlepass build-engine
--check-only``) runs everywhere and checks what can be checked without TensorRT:

* the ONNX checker and strict shape inference on the fused graph;
* every op in TensorRT's ONNX supported-operator list for the targeted version
  (``TARGET_TENSORRT``, from onnx-tensorrt's docs/operators.md), the opset in its range, and
  the op restrictions that matter here (constant ``axes`` for Reduce*/Squeeze/Unsqueeze);
* the optimization profiles: no zero-length dimension (TensorRT wants >= 1; prefill therefore
  uses ONE masked dummy past slot, and ONNX Runtime checks that this changes nothing);
* an fp16 range report: max |activation| per layer on real prompts against fp16's 65504.

The engine contract (profiles, the dummy past slot, ``engines[]`` entries) is
``singlepass.runtime.tensorrt``, shared with the runtime that serves the engines. Reduced
precision engines keep the fused probe subgraphs and the RMS norms in fp32 (``precision_plan``;
the graph's node names, made unique by ``name_nodes`` at export, are TensorRT's layer names).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections import deque
from pathlib import Path

import numpy as np

from singlepass.errors import SinglepassError
from singlepass.runtime.tensorrt import DUMMY_PAST, import_tensorrt, profiles  # noqa: F401 - the contract

TARGET_TENSORRT = "10.15"
OPSET_RANGE = (9, 24)
FP16_MAX = 65504.0
MASK_FILL = 1e30  # |x| above this is a masking constant (-inf / finfo.min), not an activation
PRECISIONS = ("fp32", "fp16", "bf16")
BUILD_HINT = "run `singlepass build-engine ART --check-only` for the checks that work without it"
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
NORM_OPS = {"Pow", "ReduceMean", "Add", "Sqrt", "Reciprocal", "Div", "Mul", "Cast", "Identity",
            "RMSNormalization", "SimplifiedLayerNormalization", "LayerNormalization"}


def _fail(msg: str) -> dict:
    return {"ok": False, "detail": msg}


# ----------------------------------------------------------------------------- layer names and fp32 pinning

def name_nodes(graph) -> int:
    """Give every unnamed (or duplicate-named) node of a ``gs.Graph`` a unique name: TensorRT layer
    names, fp32 pinning and reports need them. -> number of nodes renamed."""
    taken = {n.name for n in graph.nodes if n.name}
    seen, k, renamed = set(), 0, 0
    for n in graph.nodes:
        if not n.name or n.name in seen:
            while f"node_{k}_{n.op}" in taken:
                k += 1
            n.name = f"node_{k}_{n.op}"
            taken.add(n.name)
            renamed += 1
        seen.add(n.name)
    return renamed


def normalisation_nodes(graph, stream) -> list[str]:
    """Names of the nodes computing the RMS norms that read the residual stream (each layer's two
    input norms and the final norm): elementwise/reduce chains from a residual tensor that stop at
    the next MatMul, residual Add or stacking op. These stay fp32 in reduced-precision engines."""
    from singlepass.export.surgery import PREFIX, producer

    tensors = graph.tensors()
    residual_adds = {producer(tensors[r]).name for r in stream.residuals if r in tensors and tensors[r].inputs}
    middle = set(stream.hidden_states[1:-1])
    out, seen = [], set()
    for x in [stream.embedding] + stream.residuals:
        queue = deque([tensors[x]])
        while queue:
            for n in queue.popleft().outputs:  # the consumers
                if n.op not in NORM_OPS or n.name in residual_adds or n.name in seen:
                    continue
                if n.name.startswith(PREFIX) or any(o.name in middle for o in n.outputs):
                    continue
                seen.add(n.name)
                out.append(n.name)
                queue.extend(o for o in n.outputs if o.name)
    return out


def precision_plan(graph, manifest) -> dict:
    """Node names kept fp32 in reduced-precision engines: fused probe subgraphs (and the
    singlepass glue feeding them: stacking, mask slice, casts) and the RMS normalisations."""
    from singlepass.export import surgery

    stream = surgery.find_residual_stream(graph, logits_name=manifest.graph.logits)
    norms = normalisation_nodes(graph, stream)
    prefixes = tuple(f"{p.name}/" for p in manifest.probes) + (surgery.PREFIX,)
    lm = surgery.producer(graph.tensors()[stream.logits])
    probe_nodes = [n.name for n in graph.nodes if n.name.startswith(prefixes)
                   and not (lm is not None and n.name == lm.name)]
    return {"probe_nodes": probe_nodes, "norm_nodes": norms, "stream": stream}


def _is_pinned(layer: str, names: set[str]) -> bool:
    """TensorRT names a layer after its ONNX node (helper layers get a suffix)."""
    return layer in names or layer.split(" ")[0] in names or any(
        layer.startswith(n + "_") for n in names if n in layer)


def pin_fp32(trt, names: set[str], pinned: list[str]):
    """A Polygraphy network postprocess step: layers of the named nodes compute and output fp32
    (with OBEY_PRECISION_CONSTRAINTS TensorRT inserts the casts at their borders)."""
    def pin(network) -> None:
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            if _is_pinned(layer.name, names):
                layer.precision = trt.float32
                for j in range(layer.num_outputs):
                    layer.set_output_type(j, trt.float32)
                pinned.append(layer.name)
    return pin


# ----------------------------------------------------------------------------- static checks

def check_profiles(input_names: list[str], profs: list[dict]) -> dict:
    """Profiles cover exactly the graph inputs, with min <= opt <= max and no zero-length dimension."""
    problems, names = [], set(input_names)
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


def check_ops(graph) -> dict:
    """Every op of a ``gs.Graph`` in TensorRT's supported list, constant where TensorRT needs it."""
    from singlepass.export.surgery import is_constant, opset_of

    opset = opset_of(graph)
    bad, restricted = {}, []
    for n in graph.nodes:
        if n.domain not in (None, "", "ai.onnx"):
            bad[f"{n.domain}::{n.op}"] = bad.get(f"{n.domain}::{n.op}", 0) + 1
        elif n.op not in SUPPORTED_OPS:
            bad[n.op] = bad.get(n.op, 0) + 1
        k = CONSTANT_INPUTS.get(n.op)
        if k is not None and len(n.inputs) > k and n.inputs[k].name and not is_constant(n.inputs[k]):
            restricted.append(f"{n.name or n.op}: input {k} ({n.op} axes/k) is not a constant")
    ops = sorted({n.op for n in graph.nodes})
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


# ----------------------------------------------------------------------------- runtime checks (ORT)

def _prompt_feeds(art_folder: Path, manifest, prompts: list[str]):
    from transformers import AutoTokenizer

    from singlepass.models.prompts import encode
    from singlepass.runtime.batching import pad_batch
    from singlepass.runtime.feeds import pad_id

    tok = AutoTokenizer.from_pretrained(str(art_folder), local_files_only=True)
    pr = manifest.prompt
    enc = encode(tok, prompts, pr["format"], pr.get("max_length") or 512)
    return [pad_batch([ids], pad_id(manifest), "left") for ids in enc.ids]  # (ids, mask, pos) [1, T] each


def _feed(manifest, ids, mask, pos, past_len: int) -> dict:
    from singlepass.runtime.feeds import make_feed

    return make_feed(manifest, ids, mask, pos, dummy=past_len)


def check_dummy_past(sess, manifest, feeds) -> dict:
    """Prefill with one masked dummy past slot (the TensorRT profile) == prefill with no past."""
    if not manifest.graph.kv_cache:
        return {"ok": True, "detail": "no KV cache: no dummy slot needed"}
    names = [o.name for o in sess.get_outputs()]
    keep = [manifest.graph.logits] + [p.probs for p in manifest.probes]
    worst = 0.0
    for ids, mask, pos in feeds:
        a = dict(zip(names, sess.run(None, _feed(manifest, ids, mask, pos, 0))))
        b = dict(zip(names, sess.run(None, _feed(manifest, ids, mask, pos, DUMMY_PAST))))
        worst = max([worst] + [float(np.abs(a[k] - b[k]).max()) for k in keep])
    ok = worst <= 1e-4
    return {"ok": ok, "max_abs_diff": worst,
            "detail": f"logits and probe probs with a masked dummy past slot vs none: max |diff| {worst:.2g}"}


def _activation_maxima(folder: Path, manifest, feeds) -> tuple[dict[str, float], int, "object"]:
    """Max |activation| of every float tensor on the prompts (ONNX Runtime, every float tensor made
    an output). -> (maxima by tensor, masking constants ignored, the graph without weights)."""
    import onnx

    from singlepass.runtime.backends import ort_session

    graph_file = folder / manifest.graph.file
    model = onnx.load(str(graph_file), load_external_data=False)  # the weights stay in the data file
    inferred = onnx.shape_inference.infer_shapes(model)
    have = {o.name for o in model.graph.output}
    floats = sorted({v.name for v in inferred.graph.value_info
                     if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT} - have)
    model.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in floats)
    # Saved beside the graph so that its external-data references resolve; removed right after.
    path = folder / f".preflight-{os.getpid()}.onnx"
    try:
        onnx.save_model(model, str(path))
        sess = ort_session(path)
    finally:
        path.unlink(missing_ok=True)
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
    return maxima, fills, model


def range_report(folder: Path, manifest, plan: dict, feeds) -> dict:
    """Max |activation| per decoder layer on real prompts, against fp16's range."""
    from singlepass.export.surgery import PREFIX

    stream = plan["stream"]
    maxima, fills, model = _activation_maxima(Path(folder), manifest, feeds)
    # Layer of a node = how many layer ends (second residual add of a layer) precede it in
    # topological order; nodes after the last one are the final norm and the lm_head.
    order = {n.name: k for k, n in enumerate(model.graph.node)}
    producer_of = {o: n.name for n in model.graph.node for o in n.output}
    bounds = [order[producer_of[t]] for t in stream.residuals[1::2]]
    emb_at = order[producer_of[stream.embedding]] if stream.embedding in producer_of else -1
    probe_prefixes = tuple(f"{p.name}/" for p in manifest.probes)
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
        if node.startswith(PREFIX) or order.get(node, 0) <= emb_at:
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
    import onnx
    import onnx_graphsurgeon as gs

    from singlepass.export.validate import PROMPTS
    from singlepass.files import atomic_write
    from singlepass.runtime.backends import ort_session
    from singlepass.runtime.contract import read_artifact

    t0 = time.perf_counter()
    folder = Path(folder)
    m = read_artifact(folder)
    max_seq = max_seq or m.limits.max_total_length
    report = {"tensorrt_target": TARGET_TENSORRT, "precision": precision, "max_batch": max_batch, "max_seq": max_seq}
    report["onnx"], inferred = check_model(folder / m.graph.file)
    graph = gs.import_onnx(inferred if inferred is not None else
                           onnx.load(str(folder / m.graph.file), load_external_data=False))  # no weights read
    report["operators"] = check_ops(graph)
    profs = profiles(m, max_batch, max_seq)
    report["profiles"] = check_profiles(m.graph.input_names, profs)
    report["profile_shapes"] = [{"name": p["name"], "shapes": {k: [list(s) for s in v] for k, v in p["shapes"].items()}}
                                for p in profs]
    plan = precision_plan(graph, m)
    del graph, inferred
    report["fp32_layers"] = {"ok": bool(plan["norm_nodes"]) and (bool(plan["probe_nodes"]) or not m.probes),
                             "probe_nodes": len(plan["probe_nodes"]), "norm_nodes": len(plan["norm_nodes"]),
                             "detail": f"{len(plan['probe_nodes'])} probe/glue nodes and {len(plan['norm_nodes'])} "
                                       f"normalisation nodes pinned to fp32 in {precision} builds"}
    feeds = _prompt_feeds(folder, m, prompts or PROMPTS)
    sess = ort_session(folder / m.graph.file)
    report["dummy_past"] = check_dummy_past(sess, m, feeds[:3])
    del sess
    report["fp16_range"] = range_report(folder, m, plan, feeds)
    if precision == "fp32":
        report["fp16_range"]["ok"] = True  # informative only for an fp32 engine
    keys = ("onnx", "operators", "profiles", "fp32_layers", "dummy_past", "fp16_range")
    report["ok"] = all(report[k]["ok"] for k in keys)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    if write:
        atomic_write(folder / "tensorrt_preflight.json", json.dumps(report, indent=2, default=str))
    return report


def build_engine(folder, precision: str = "fp16", max_batch: int = 8, max_seq: int | None = None,
                 workspace_gb: float = 4.0, timing_cache: str | None = None, force: bool = False,
                 log=print) -> dict:
    """Build a serialized engine next to the manifest with Polygraphy's TensorRT loaders
    (NOT executed on this project's machines: no TensorRT there)."""
    import onnx
    import onnx_graphsurgeon as gs

    from singlepass.export import manifest as mf
    from singlepass.files import atomic_write
    from singlepass.runtime.contract import read_artifact

    if precision not in PRECISIONS:
        raise SinglepassError(f"--precision must be one of {', '.join(PRECISIONS)}")
    trt = import_tensorrt(BUILD_HINT)
    from polygraphy.backend import trt as poly  # the loaders; TensorRT itself is imported lazily by them
    from polygraphy.exception import PolygraphyException

    folder = Path(folder)
    m = read_artifact(folder)
    max_seq = max_seq or m.limits.max_total_length
    engine_path = folder / f"model.{precision}.b{max_batch}.s{max_seq}.engine"
    if engine_path.exists() and not force:
        raise SinglepassError(f"{engine_path} exists (use --force to rebuild)")
    profs = profiles(m, max_batch, max_seq)
    chk = check_profiles(m.graph.input_names, profs)
    if not chk["ok"]:
        raise SinglepassError("optimization profiles are invalid: " + "; ".join(chk["detail"]))
    graph_path = folder / m.graph.file
    plan = precision_plan(gs.import_onnx(onnx.load(str(graph_path), load_external_data=False)), m)
    cache_path = Path(timing_cache) if timing_cache else folder / "tensorrt.timing.cache"
    cache_tmp = cache_path.with_name(f".{cache_path.name}.{os.getpid()}.tmp")

    t0 = time.perf_counter()
    network = poly.NetworkFromOnnxPath(str(graph_path))  # the parser reads the external weights itself
    pinned: list[str] = []  # filled by the postprocess step when the network is parsed
    if precision != "fp32":  # probe subgraphs and RMS norms stay fp32
        fp32_nodes = set(plan["probe_nodes"]) | set(plan["norm_nodes"])
        network = poly.PostprocessNetwork(network, pin_fp32(trt, fp32_nodes, pinned), name="pin-fp32")
    shapes = [poly.Profile() for _ in profs]
    for prof, p in zip(shapes, profs):
        for name, (lo, opt, hi) in p["shapes"].items():
            prof.add(name, lo, opt, hi)
    log(f"building a {precision} engine ({len(profs)} profiles) ...")
    try:
        with contextlib.ExitStack() as files:
            # Open file objects, not paths: Polygraphy would leave a .lock file beside a path.
            cache_in = files.enter_context(open(cache_path, "rb")) if cache_path.is_file() else None
            cache_out = files.enter_context(open(cache_tmp, "w+b"))
            config = poly.CreateConfig(
                tf32=True,  # TensorRT's default (Polygraphy's is off)
                fp16=precision == "fp16", bf16=precision == "bf16",
                precision_constraints="obey" if precision != "fp32" else None, profiles=shapes,
                memory_pool_limits={trt.MemoryPoolType.WORKSPACE: int(workspace_gb * (1 << 30))},
                profiling_verbosity=trt.ProfilingVerbosity.LAYER_NAMES_ONLY,  # TensorRT's default
                load_timing_cache=cache_in)
            serialized = poly.EngineBytesFromNetwork(network, config=config, save_timing_cache=cache_out)()
        atomic_write(engine_path, bytes(serialized))
        os.replace(cache_tmp, cache_path)
        log(f"built {engine_path.name}: {len(pinned)} layers pinned to fp32")
    except PolygraphyException as e:
        raise SinglepassError(f"TensorRT failed to build the engine ({' '.join(str(e).split())[:300]}; "
                              "see the TensorRT log above)") from None
    finally:
        cache_tmp.unlink(missing_ok=True)
    entry = {"file": engine_path.name, "precision": precision, "max_batch": max_batch, "max_seq": max_seq,
             "tensorrt": trt.__version__, "profiles": [{"name": p["name"], "shapes": {
                 k: [list(s) for s in v] for k, v in p["shapes"].items()}} for p in profs],
             "dummy_past_slot": bool(m.graph.kv_cache), "fp32_layers": len(pinned),
             "timing_cache": cache_path.name, "seconds": round(time.perf_counter() - t0, 1)}
    raw = mf.read(folder)
    raw["engines"] = [e for e in raw.get("engines", []) if e.get("file") != entry["file"]] + [entry]
    mf.write(folder, raw)
    return entry
