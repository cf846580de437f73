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
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from singlepass.errors import SinglepassError
from singlepass.export.preflight_ort import FP16_MAX, check_dummy_past, prompt_feeds, range_report  # noqa: F401
from singlepass.runtime.tensorrt import DUMMY_PAST, import_tensorrt, profiles  # noqa: F401 - the contract

if TYPE_CHECKING:
    import onnx
    import onnx_graphsurgeon as gs

    from singlepass.export.residual import ResidualStream
    from singlepass.runtime.contract import Manifest

TARGET_TENSORRT = "10.15"
OPSET_RANGE = (9, 24)
PRECISIONS = ("fp32", "fp16", "bf16")
BUILD_HINT = "run `singlepass build-engine ART --check-only` for the checks that work without it"
# Operators marked supported ("Y") in onnx-tensorrt docs/operators.md for TensorRT 10.15.
SUPPORTED_OPS = frozenset(
    """
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
""".split()
)
CONSTANT_INPUTS = {  # op -> input index that TensorRT needs as a build-time constant
    **{
        op: 1
        for op in (
            "ReduceL1",
            "ReduceL2",
            "ReduceLogSum",
            "ReduceLogSumExp",
            "ReduceMax",
            "ReduceMean",
            "ReduceMin",
            "ReduceProd",
            "ReduceSum",
            "ReduceSumSquare",
            "Squeeze",
            "Unsqueeze",
            "CumSum",
            "TopK",
        )
    },
}
NORM_REDUCTIONS = {"ReduceMean", "RMSNormalization", "SimplifiedLayerNormalization", "LayerNormalization"}
UNSUPPORTED_TYPES = {"float64": "DOUBLE is cast down to FLOAT by TensorRT", "string": "no string tensors"}
NORM_OPS = {
    "Pow",
    "ReduceMean",
    "Add",
    "Sqrt",
    "Reciprocal",
    "Div",
    "Mul",
    "Cast",
    "Identity",
    "RMSNormalization",
    "SimplifiedLayerNormalization",
    "LayerNormalization",
}


def _fail(msg: str) -> dict:
    return {"ok": False, "detail": msg}


# ----------------------------------------------------------------------------- layer names and fp32 pinning


def name_nodes(graph: gs.Graph) -> int:
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


def _branch_norms(graph: gs.Graph, stream: ResidualStream, seen: set[str]) -> list[str]:
    """Norms a layer applies to its branch output just before the residual add (Gemma's post-attention
    and post-feed-forward norms): the elementwise/reduce chain feeding the add's branch input, back to
    the branch's last MatMul."""
    from singlepass.export.surgery import producer

    tensors = graph.tensors()
    stream_tensors = {stream.embedding, *stream.residuals}
    prev = [stream.embedding] + stream.residuals[:-1]
    out = []
    for x, r in zip(prev, stream.residuals):
        add = producer(tensors[r])
        queue = deque(i for i in add.inputs if i.name != x and producer(i) is not None)
        chain: list[gs.Node] = []
        while queue:
            n = producer(queue.popleft())
            if n is None or n.op not in NORM_OPS or n.name in seen or n in chain:
                continue
            chain.append(n)
            queue.extend(i for i in n.inputs if i.name and i.name not in stream_tensors)
        if any(n.op in NORM_REDUCTIONS for n in chain):  # a norm, not e.g. a masking Mul
            seen.update(n.name for n in chain)
            out += [n.name for n in chain]
    return out


def normalisation_nodes(graph: gs.Graph, stream: ResidualStream) -> list[str]:
    """Names of the nodes computing the RMS norms of the residual stream (each layer's input norms,
    Gemma's post-norms before the residual adds, and the final norm): elementwise/reduce chains from
    a residual tensor that stop at the next MatMul, residual Add or stacking op, and the chains
    feeding a residual add back to its branch's MatMul. These stay fp32 in reduced-precision engines."""
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
    return out + _branch_norms(graph, stream, seen)


def precision_plan(graph: gs.Graph, manifest: Manifest) -> dict:
    """Node names kept fp32 in reduced-precision engines: fused probe subgraphs (and the
    singlepass glue feeding them: stacking, mask slice, casts) and the RMS normalisations."""
    from singlepass.export import surgery

    stream = surgery.find_residual_stream(graph, logits_name=manifest.graph.logits)
    norms = normalisation_nodes(graph, stream)
    prefixes = tuple(f"{p.name}/" for p in manifest.probes) + (surgery.PREFIX,)
    lm = surgery.producer(graph.tensors()[stream.logits])
    probe_nodes = [
        n.name for n in graph.nodes if n.name.startswith(prefixes) and not (lm is not None and n.name == lm.name)
    ]
    return {"probe_nodes": probe_nodes, "norm_nodes": norms, "stream": stream}


def _is_pinned(layer: str, names: set[str]) -> bool:
    """TensorRT names a layer after its ONNX node (helper layers get a suffix)."""
    return layer in names or layer.split(" ")[0] in names or any(layer.startswith(n + "_") for n in names if n in layer)


def pin_fp32(trt, names: set[str], pinned: list[str]) -> Callable:
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
    return {
        "ok": not problems,
        "detail": problems
        or [
            f"{p['name']}: "
            + ", ".join(
                f"{k} {list(v[0])}..{list(v[2])}"
                for k, v in p["shapes"].items()
                if "past" not in k or k.endswith("0.key")
            )
            for p in profs
        ],
    }


def check_ops(graph: gs.Graph) -> dict:
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
    return {
        "ok": not problems,
        "tensorrt": TARGET_TENSORRT,
        "opset": opset,
        "ops": ops,
        "detail": problems or f"{len(ops)} op types, all supported by TensorRT {TARGET_TENSORRT}",
    }


def check_model(path: Path) -> tuple[dict, onnx.ModelProto | None]:
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


# ----------------------------------------------------------------------------- entry points


def require_fp32_weights(m: Manifest) -> None:
    """TensorRT builds from an fp32-weight graph (its own fp16/bf16 precisions): ONNX Runtime's
    MatMulNBits (``--weights int4|int8``) is not a TensorRT layer. Response probes' state inputs
    have no optimisation profiles yet (and their very negative empty values need fp32)."""
    if m.graph.precision != "fp32":
        raise SinglepassError(
            f"{m.folder} has {m.graph.precision} weights (ONNX Runtime's MatMulNBits), which TensorRT cannot "
            "build: export the artifact with --weights fp32 for a TensorRT engine"
        )
    if m.stream_states:
        raise SinglepassError(
            f"{m.folder} fuses a response probe, whose state inputs the TensorRT build does not profile yet: "
            "export the TensorRT artifact without the response probe"
        )


def preflight(
    folder: str | os.PathLike,
    precision: str = "fp16",
    max_batch: int = 8,
    max_seq: int | None = None,
    prompts: list[str] | None = None,
    write: bool = True,
) -> dict:
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
    require_fp32_weights(m)
    max_seq = max_seq or m.limits.max_total_length
    report = {"tensorrt_target": TARGET_TENSORRT, "precision": precision, "max_batch": max_batch, "max_seq": max_seq}
    report["onnx"], inferred = check_model(folder / m.graph.file)
    graph = gs.import_onnx(
        inferred if inferred is not None else onnx.load(str(folder / m.graph.file), load_external_data=False)
    )  # no weights read
    report["operators"] = check_ops(graph)
    profs = profiles(m, max_batch, max_seq)
    report["profiles"] = check_profiles(m.graph.input_names, profs)
    report["profile_shapes"] = [
        {"name": p["name"], "shapes": {k: [list(s) for s in v] for k, v in p["shapes"].items()}} for p in profs
    ]
    plan = precision_plan(graph, m)
    del graph, inferred
    report["fp32_layers"] = {
        "ok": bool(plan["norm_nodes"]) and (bool(plan["probe_nodes"]) or not m.probes),
        "probe_nodes": len(plan["probe_nodes"]),
        "norm_nodes": len(plan["norm_nodes"]),
        "detail": f"{len(plan['probe_nodes'])} probe/glue nodes and {len(plan['norm_nodes'])} "
        f"normalisation nodes pinned to fp32 in {precision} builds",
    }
    feeds = prompt_feeds(folder, m, prompts or PROMPTS)
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


def build_engine(
    folder: str | os.PathLike,
    precision: str = "fp16",
    max_batch: int = 8,
    max_seq: int | None = None,
    workspace_gb: float = 4.0,
    timing_cache: str | None = None,
    force: bool = False,
    log: Callable = print,
) -> dict:
    """Build a serialized engine next to the manifest with Polygraphy's TensorRT loaders
    (NOT executed on this project's machines: no TensorRT there)."""
    import onnx
    import onnx_graphsurgeon as gs

    from singlepass.export import manifest as mf
    from singlepass.files import atomic_write
    from singlepass.runtime.contract import read_artifact

    if precision not in PRECISIONS:
        raise SinglepassError(f"--precision must be one of {', '.join(PRECISIONS)}")
    folder = Path(folder)
    m = read_artifact(folder)
    require_fp32_weights(m)
    trt = import_tensorrt(BUILD_HINT)
    from polygraphy.backend import trt as poly  # the loaders; TensorRT itself is imported lazily by them
    from polygraphy.exception import PolygraphyException

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
                fp16=precision == "fp16",
                bf16=precision == "bf16",
                precision_constraints="obey" if precision != "fp32" else None,
                profiles=shapes,
                memory_pool_limits={trt.MemoryPoolType.WORKSPACE: int(workspace_gb * (1 << 30))},
                profiling_verbosity=trt.ProfilingVerbosity.LAYER_NAMES_ONLY,  # TensorRT's default
                load_timing_cache=cache_in,
            )
            serialized = poly.EngineBytesFromNetwork(network, config=config, save_timing_cache=cache_out)()
        atomic_write(engine_path, bytes(serialized))
        os.replace(cache_tmp, cache_path)
        log(f"built {engine_path.name}: {len(pinned)} layers pinned to fp32")
    except PolygraphyException as e:
        raise SinglepassError(
            f"TensorRT failed to build the engine ({' '.join(str(e).split())[:300]}; see the TensorRT log above)"
        ) from None
    finally:
        cache_tmp.unlink(missing_ok=True)
    entry = {
        "file": engine_path.name,
        "precision": precision,
        "max_batch": max_batch,
        "max_seq": max_seq,
        "tensorrt": trt.__version__,
        "profiles": [
            {"name": p["name"], "shapes": {k: [list(s) for s in v] for k, v in p["shapes"].items()}} for p in profs
        ],
        "dummy_past_slot": bool(m.graph.kv_cache),
        "fp32_layers": len(pinned),
        "timing_cache": cache_path.name,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    raw = mf.read(folder)
    raw["engines"] = [e for e in raw.get("engines", []) if e.get("file") != entry["file"]] + [entry]
    mf.write(folder, raw)
    return entry
