"""``singlepass export``: decoder graph + structural surgery + fused probes + manifest, validated.

1. check the request (probe names, output folder) before any heavy work
2. load the backbone and the probes (a probe from another backbone is refused)
3. decoder graph: our torch.onnx dynamo export, or the user's ``--onnx`` graph
4. the same surgery for both: find the residual stream, stack the hidden states, slice the
   prefill logits to the last position, fuse every probe, drop the debug output
5. write into a temporary sibling folder, validate against PyTorch there, then rename it
   into place: a failed export never leaves a half-written artifact behind
"""

from __future__ import annotations

import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from singlepass.errors import SinglepassError
from singlepass.export.quantize import DEFAULT_WEIGHTS, WEIGHTS
from singlepass.files import staged_folder
from singlepass.runtime.contract import FusedProbe

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
RESERVED = {"logits", "hidden_states", "input_ids", "attention_mask", "position_ids", "singlepass"}


@dataclass
class ProbeSpec:
    dir: Path
    name: str


def parse_probe_specs(specs: list[str]) -> list[ProbeSpec]:
    """``DIR`` or ``DIR:name``; names default to the folder name and must be unique."""
    out = []
    for s in specs or []:
        path, name = s, None
        if ":" in s and not Path(s).exists():
            path, name = s.rsplit(":", 1)
        p = Path(path).expanduser()
        name = name or p.resolve().name
        if not NAME_RE.match(name) or name in RESERVED or name.startswith("present"):
            raise SinglepassError(
                f"probe name {name!r} is not usable (letters, digits, '_', '.', '-'; not "
                f"{', '.join(sorted(RESERVED))}): rename it with --probe {path}:NAME"
            )
        out.append(ProbeSpec(p, name))
    seen = {}
    for spec in out:
        if spec.name in seen:
            raise SinglepassError(
                f"two probes are named {spec.name!r} ({seen[spec.name]} and {spec.dir}): give one "
                f"another name with --probe DIR:NAME"
            )
        seen[spec.name] = spec.dir
    return out


def check_out_dir(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise SinglepassError(f"{out} exists: choose another --out or pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise SinglepassError(f"{out} exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not (out / "manifest.json").is_file():
        raise SinglepassError(
            f"{out} is a non-empty folder that is not a singlepass artifact; refusing to replace it even with --force"
        )


def load_onnx(path: Path):
    """Load a user's ONNX file (with external data) with a clear error for anything unreadable."""
    import onnx
    from google.protobuf.message import DecodeError

    path = Path(path)
    if not path.is_file():
        raise SinglepassError(f"--onnx {path}: no such file")
    try:
        model = onnx.load(str(path))
    except (DecodeError, ValueError, RuntimeError, OSError, onnx.onnx_cpp2py_export.checker.ValidationError) as e:
        raise SinglepassError(
            f"--onnx {path}: not a readable ONNX model, corrupt or truncated ({type(e).__name__}: {str(e)[:200]})"
        ) from None
    if not model.graph.node:
        raise SinglepassError(f"--onnx {path}: the file parses but holds no graph (corrupt or truncated)")
    from singlepass.export.ort_ops import register_onnxruntime_ops

    register_onnxruntime_ops(model)  # ONNX Runtime's default-domain ops (SimplifiedLayerNormalization)
    try:
        onnx.checker.check_model(model)
    except Exception as e:  # noqa: BLE001 - onnx raises several types
        raise SinglepassError(
            f"--onnx {path}: the ONNX checker rejects the model ({str(e).splitlines()[0][:300]})"
        ) from None
    return model


@dataclass
class LoadedProbe:
    """A probe on its way into the graph: its manifest record and its torch module."""

    spec: FusedProbe
    module: object  # torch.nn.Module
    dir: Path


def load_probes(specs: list[ProbeSpec], backbone) -> list[LoadedProbe]:
    from singlepass.export.manifest import fused_probe
    from singlepass.export.stream import state_records
    from singlepass.files import sha256_file
    from singlepass.models.probe_io import load_probe

    probes = []
    for s in specs:
        module, cfg = load_probe(s.dir, backbone.fingerprint)
        L1 = backbone.num_layers + 1
        if cfg["num_layers"] != L1 or cfg["hidden_size"] != backbone.hidden_size:
            raise SinglepassError(
                f"probe {s.dir}: built for {cfg['num_layers']} states of width {cfg['hidden_size']}, "
                f"the model gives {L1} of width {backbone.hidden_size}"
            )
        state = state_records(s.name, module) if cfg.get("reads") == "response" else None
        spec = fused_probe(s.name, cfg, sha256_file(s.dir / "model.safetensors"), str(s.dir), state)
        probes.append(LoadedProbe(spec, module, s.dir))
    formats = {p.spec.prompt_format for p in probes}
    if len(formats) > 1:
        raise SinglepassError(
            f"the probes were trained on different prompt formats ({', '.join(sorted(formats))}); "
            "one graph serves one prompt format: export them separately"
        )
    return probes


def find_stream(graph, backbone):
    """The residual stream of the backbone's graph; an unrecognised graph is an error naming the
    architecture and the structure that did not match."""
    from singlepass.export import surgery

    try:
        return surgery.find_residual_stream(graph, expected_layers=backbone.num_layers)
    except surgery.SurgeryError as e:
        arch = backbone.model.config.model_type
        raise surgery.SurgeryError(f"cannot recognise the {arch} decoder graph: {e}") from None


def build_graph(
    model,
    backbone,
    probes: list[LoadedProbe],
    keep_hidden_states: bool,
    all_logits: bool,
    weights: str = "fp32",
    rounded: dict | None = None,
    kv_cache: str = "auto",
    fused_kernels: str = "auto",
):
    """The surgery pipeline on an onnx-graphsurgeon graph. -> (onnx.ModelProto, stream, hidden-states
    output name or None, QuantSummary). ``kv_cache``: ``export/kvcache.py``'s mode (``stream.inplace_kv``
    says the result). ``rounded``: calibrated 4-bit codes (``calibrate.gptq_rounded``).

    The weights are never read: gs keeps them as the original ``TensorProto``s and ``to_model``
    copies each once into the returned model. The caller should drop ``model`` (the original)
    once this returns; it is freed then, since nothing here keeps a reference to it."""
    import gc

    import onnx_graphsurgeon as gs

    from singlepass.export import kvcache, ortfuse, surgery
    from singlepass.export.fuse import fuse_probes, prompt_probes_prefill_only
    from singlepass.export.optimize import rmsnorm_as_div
    from singlepass.export.quantize import parameter_digests, quantize_weights
    from singlepass.export.tensorrt import name_nodes

    graph = gs.import_onnx(model)
    stream = find_stream(graph, backbone)
    decoder = list(graph.nodes)  # the nodes weights may be quantised in (never a probe's)
    if stream.vocab_size != backbone.model.config.vocab_size or stream.hidden_size != backbone.hidden_size:
        raise SinglepassError(
            f"the graph has vocab {stream.vocab_size} / width {stream.hidden_size}, the model "
            f"{backbone.model.config.vocab_size} / {backbone.hidden_size}: not this model's graph"
        )
    kvcache.apply(graph, stream, kv_cache, backbone.model.config, all_logits, weights)  # before what reads rows
    if not all_logits:
        surgery.slice_last_position_logits(graph, stream)
    # probes read the layer tensors where they are; quantised: prompt probes skip decode passes
    fuse_probes(graph, stream, probes, prompt_probes_prefill_only(stream, weights))
    hs = None
    if keep_hidden_states:  # the stacked copy [L+1, B, T, d] exists only as this debug output
        hs = surgery.add_stacked_hidden_states(graph, stream)
        surgery.add_output(graph, hs, dims=[stream.num_layers + 1, "batch", "sequence", stream.hidden_size])
    names = parameter_digests(backbone.model) if weights != "fp32" else None
    quant = quantize_weights(graph, weights, decoder, stream.lm_head, names, rounded)
    rmsnorm_as_div(graph, decoder)  # ONNX Runtime then fuses each RMSNorm into one kernel
    ort_only = weights != "fp32" or stream.inplace_kv  # MatMulNBits / GroupQueryAttention already
    stream.fused = ortfuse.apply(graph, backbone.model.config, fused_kernels, ort_only)  # fewer, larger kernels
    graph.cleanup().toposort()  # drops what no output reads (the replaced weights, the Reciprocals)
    name_nodes(graph)  # unique node names: TensorRT layer names and fp32 pinning rely on them
    out = surgery.to_model(graph, like=model)
    del graph
    gc.collect()  # gs graphs are reference cycles; collect them so they stop pinning the original weights
    return out, stream, hs, quant


def save_graph(model, folder: Path) -> None:
    import onnx

    from singlepass.export.manifest import GRAPH, GRAPH_DATA

    for t in model.graph.initializer:  # weights are re-homed in this artifact's own data file
        if t.data_location == onnx.TensorProto.EXTERNAL:
            raise SinglepassError("internal error: an initializer still points to external data")
    onnx.save_model(
        model,
        str(folder / GRAPH),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=GRAPH_DATA,
        size_threshold=1024,
    )
    from singlepass.export.ort_ops import register_onnxruntime_ops

    register_onnxruntime_ops(model)
    try:
        onnx.checker.check_model(str(folder / GRAPH))
    except Exception as e:  # noqa: BLE001
        raise SinglepassError(f"the fused graph fails the ONNX checker: {str(e).splitlines()[0][:300]}") from None


def copy_tokenizer(src: Path, dst: Path) -> list[str]:
    from singlepass.export.manifest import TOKENIZER_FILES

    copied = []
    for f in TOKENIZER_FILES:
        if (src / f).is_file():
            shutil.copy2(src / f, dst / f)
            copied.append(f)
    if "tokenizer.json" not in copied:
        raise SinglepassError(f"{src} has no tokenizer.json (a fast tokenizer is needed by the runtime)")
    return copied


def default_limits(
    backbone, probes: list[LoadedProbe], max_batch: int, max_prompt: int | None, max_total: int | None
) -> dict:
    """The artifact's one prompt limit: ``--max-prompt-length``, else the longest max_length the
    probes were trained with (each probe saw prompts cut there), else 512."""
    lengths = [p.spec.max_length for p in probes if p.spec.max_length]
    max_pos = getattr(backbone.model.config, "max_position_embeddings", None) or 4096
    prompt = max_prompt or (max(lengths) if lengths else 512)
    total = max_total or min(max_pos, prompt + 512)
    if prompt > total or total > max_pos:
        raise SinglepassError(f"limits: max prompt {prompt} <= max total {total} <= the model's {max_pos} positions")
    return {"max_batch": max_batch, "max_prompt_length": prompt, "max_total_length": total}


def export_artifact(
    out,
    probe_specs: list[str],
    model_spec: str | None = None,
    onnx_path: str | None = None,
    force: bool = False,
    keep_hidden_states: bool = False,
    all_logits: bool = False,
    opset: int | None = None,
    weights: str = DEFAULT_WEIGHTS,
    max_batch: int = 8,
    max_prompt_length: int | None = None,
    max_total_length: int | None = None,
    cache_dir: str | None = None,
    backbone=None,
    log=print,
    calibration: str | None = None,
    calibration_rows: int | None = None,
    data_dir: str | None = None,
    kv_cache: str = "auto",
    fused_kernels: str = "auto",
) -> dict:
    """Write a validated artifact folder; returns a summary (seconds, bytes, validation).
    ``calibration`` (int4 only): the prompts the 4-bit rounding is calibrated on, a dataset name or
    file (default: ``calibrate.DEFAULT_CALIBRATION``), or "none" for round-to-nearest."""
    from singlepass.export import calibrate as cal
    from singlepass.export import manifest as mf
    from singlepass.export.validate import validate
    from singlepass.models.backbone import DEFAULT_MODEL, load_backbone

    t_start = time.perf_counter()
    out = Path(out)
    specs = parse_probe_specs(probe_specs)
    check_out_dir(out, force)
    if weights not in WEIGHTS:
        raise SinglepassError(f"weights must be one of {', '.join(WEIGHTS)}, not {weights!r}")
    from singlepass.export import ortfuse
    from singlepass.export.llm import DEFAULT_OPSET

    ortfuse.check_mode(fused_kernels)  # before minutes of export

    opset = opset or DEFAULT_OPSET
    if onnx_path is not None:
        foreign = load_onnx(Path(onnx_path))
    if backbone is None:
        backbone = load_backbone(model_spec or DEFAULT_MODEL, cache_dir)
    probes = load_probes(specs, backbone)
    limits = default_limits(backbone, probes, max_batch, max_prompt_length, max_total_length)
    calibration = calibration or cal.DEFAULT_CALIBRATION
    rounded, info, t_calibrate = None, {}, 0.0
    if weights == "int4" and calibration != cal.NONE:
        t0 = time.perf_counter()
        rounded, info = cal.gptq_rounded(
            backbone, calibration, calibration_rows or cal.DEFAULT_ROWS, cache_dir, data_dir, log
        )
        t_calibrate = time.perf_counter() - t0
    t0 = time.perf_counter()
    if onnx_path is not None:
        model, source = (
            foreign,
            f"graph surgery on {Path(onnx_path).resolve()} (producer {foreign.producer_name} "
            f"{foreign.producer_version})",
        )
        del foreign  # build_graph replaces the model: keep one copy of the weights alive
    else:
        from singlepass.export.llm import export_decoder

        log(f"exporting {backbone.source.name} with torch.onnx (dynamo, opset {opset}) ...")
        model = export_decoder(backbone.model, opset=opset, cache_key=backbone.fingerprint.get("sha256"))
        source = f"torch.onnx.export(dynamo=True, opset={opset}) of {backbone.source.name}"
    t_export = time.perf_counter() - t0
    t0 = time.perf_counter()
    model, stream, hs, quant = build_graph(
        model, backbone, probes, keep_hidden_states, all_logits, weights, rounded, kv_cache, fused_kernels
    )
    del rounded
    if quant.rounding == "gptq":
        quant.calibration = info
    t_surgery = time.perf_counter() - t0
    log(
        f"surgery: {stream.num_layers + 1} hidden states from the residual stream, {len(probes)} probe(s) fused, "
        f"{len(model.graph.node)} nodes"
    )
    with staged_folder(out) as tmp:  # a failed write or validation leaves nothing behind
        t0 = time.perf_counter()
        save_graph(model, tmp)
        del model
        copied = copy_tokenizer(backbone.folder, tmp)
        for p in probes:
            dst = tmp / p.spec.folder
            dst.mkdir(parents=True)
            for f in ("config.json", "model.safetensors"):
                shutil.copy2(p.dir / f, dst / f)
        import onnx

        m = mf.build(
            model=onnx.load(str(tmp / mf.GRAPH), load_external_data=False),
            stream=stream,
            backbone=backbone,
            probes=[p.spec for p in probes],
            source=source,
            hidden_states=hs,
            last_only=not all_logits,
            limits=limits,
            copied_files=copied,
            weights=quant.to_dict(),
        )
        from singlepass.export.genai import write_genai_config

        write_genai_config(tmp, m)  # onnxruntime-genai reads the artifact too (manifest "genai")
        mf.write(tmp, m)
        t_write = time.perf_counter() - t0
        log("validating against the PyTorch reference ...")
        report = validate(tmp, backbone=backbone, probes={p.spec.name: p.module for p in probes})
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    summary = {
        "artifact": str(out),
        "bytes": size,
        "seconds": round(time.perf_counter() - t_start, 1),
        "calibration_seconds": round(t_calibrate, 1),
        "export_seconds": round(t_export, 1),
        "surgery_seconds": round(t_surgery, 1),
        "write_seconds": round(t_write, 1),
        "validation_seconds": round(report.seconds, 1),
        "validation": report.to_dict()["max_abs_diff"],
        "probes": [p.spec.name for p in probes],
        "weights": weights,
    }
    return summary
