"""CLI for export/: export, validate, build-engine."""

from __future__ import annotations

import json


def _mb(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def cmd_export(args) -> int:
    from singlepass.export.pipeline import export_artifact

    s = export_artifact(
        args.out,
        args.probe or [],
        model_spec=args.model,
        onnx_path=args.onnx,
        force=args.force,
        keep_hidden_states=args.keep_hidden_states,
        all_logits=args.all_logits,
        opset=args.opset,
        weights=args.weights,
        max_batch=args.max_batch,
        max_prompt_length=args.max_prompt_length,
        max_total_length=args.max_total_length,
        cache_dir=args.cache_dir,
        calibration=args.calibration,
        calibration_rows=args.calibration_rows,
        data_dir=args.data_dir,
        kv_cache=args.kv_cache,
        fused_kernels=args.fused_kernels,
    )
    worst = {k: f"{v:.2g}" for k, v in s["validation"].items()}
    print(
        f"wrote {s['artifact']} ({_mb(s['bytes'])}) in {s['seconds']} s "
        f"(calibration {s['calibration_seconds']} s, export {s['export_seconds']} s, "
        f"surgery+probes {s['surgery_seconds']} s, validation {s['validation_seconds']} s)"
    )
    print(f"validation passed ({s['weights']} weights); max |diff| vs PyTorch: {worst}")
    if args.json:
        print(json.dumps(s))
    return 0


def cmd_validate(args) -> int:
    from singlepass.export.validate import validate

    r = validate(args.artifact, model=args.model, cache_dir=args.cache_dir, steps=args.steps)
    print(r.table())
    print(
        f"validation passed in {r.seconds:.1f} s ({len(r.checks)} checks, {r.precision} weights, greedy tokens "
        f"agreeing on {r.token_agreement:.0%} of {args.steps} decode steps x 3 rows)"
    )
    if args.json:
        print(json.dumps({k: v for k, v in r.to_dict().items() if k != "checks"}))
    return 0


def cmd_build_engine(args) -> int:
    from singlepass.errors import SinglepassError
    from singlepass.export import tensorrt as trt_mod

    if args.check_only:
        prompts = None
        if args.prompts:
            try:
                prompts = [line.strip() for line in open(args.prompts, encoding="utf-8") if line.strip()]
            except OSError as e:
                raise SinglepassError(f"--prompts {args.prompts}: {e}") from None
        r = trt_mod.preflight(args.artifact, args.precision, args.max_batch, args.max_seq, prompts)
        for k in ("onnx", "operators", "profiles", "fp32_layers", "dummy_past", "fp16_range"):
            d = r[k]["detail"]
            print(f"[{'ok' if r[k]['ok'] else 'FAIL':>4}] {k:<12} {d if isinstance(d, str) else '; '.join(d)}")
        fr = r["fp16_range"]
        print(
            "       per-layer max |activation| (residual stream / inside the block): "
            + ", ".join(f"{x['layer']}: {x['residual_max']:.3g}/{x['block_max']:.3g}" for x in fr["layers"])
        )
        print(
            f"TensorRT {trt_mod.TARGET_TENSORRT} pre-flight {'passed' if r['ok'] else 'FAILED'} in {r['seconds']} s "
            f"(report: {args.artifact}/tensorrt_preflight.json)"
        )
        if args.json:
            print(json.dumps(r, default=str))
        if not r["ok"]:
            raise SinglepassError("the TensorRT pre-flight failed (see above)")
        return 0
    e = trt_mod.build_engine(
        args.artifact, args.precision, args.max_batch, args.max_seq, args.workspace_gb, args.timing_cache, args.force
    )
    print(f"wrote {args.artifact}/{e['file']} (TensorRT {e['tensorrt']}, {e['precision']}, {e['seconds']} s)")
    return 0


def register(sub) -> None:
    from singlepass.export.calibrate import DEFAULT_CALIBRATION, DEFAULT_ROWS
    from singlepass.export.llm import DEFAULT_OPSET
    from singlepass.export.quantize import DEFAULT_WEIGHTS, WEIGHTS

    p = sub.add_parser("export", help="one ONNX graph: next-token logits + KV cache + fused probe labels")
    p.add_argument(
        "--model",
        default=None,
        help="model name (smollm2-135m), Hugging Face folder or .gguf; with --onnx, the model the graph "
        "was exported from (reference and tokenizer) (default: smollm2-135m)",
    )
    p.add_argument("--cache-dir", default=None)
    p.add_argument(
        "--probe",
        action="append",
        metavar="DIR[:NAME]",
        help="probe artifact folder to fuse (repeatable); NAME renames it (default: the folder name)",
    )
    p.add_argument(
        "--onnx", default=None, help="an existing decoder ONNX graph (a supported architecture) to add the probes to"
    )
    p.add_argument("--out", required=True, help="artifact folder to write")
    p.add_argument("--force", action="store_true", help="replace an existing artifact folder")
    p.add_argument(
        "--keep-hidden-states",
        action="store_true",
        help="also expose the stacked hidden states [L+1, B, T, d] as an output (debugging)",
    )
    p.add_argument(
        "--all-logits",
        action="store_true",
        help="return logits for every position (default: prefill computes the last position only)",
    )
    p.add_argument(
        "--opset",
        type=int,
        default=DEFAULT_OPSET,
        help="ONNX opset of singlepass's own export (default: %(default)s: fused Attention, RotaryEmbedding and "
        "RMSNormalization; 18: the decomposed graph, for runtimes without those ops)",
    )
    p.add_argument(
        "--weights",
        choices=WEIGHTS,
        default=DEFAULT_WEIGHTS,
        help="decoder MatMul weights: int4 (layers 4-bit, lm_head 8-bit, blocks of 32: a CPU decode streams "
        "~5x fewer bytes per token than fp32), int8, or fp32 (default: %(default)s)",
    )
    p.add_argument(
        "--calibration",
        default=DEFAULT_CALIBRATION,
        metavar="DATASET|FILE|none",
        help="int4: prompts the 4-bit rounding is calibrated on (GPTQ on the GGUF's block grid; cached per "
        "model): a dataset name or a .jsonl/.csv file with a 'text' column, or 'none' for round-to-nearest "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--calibration-rows", type=int, default=DEFAULT_ROWS, help="calibration prompts (default: %(default)s)"
    )
    p.add_argument("--data-dir", default=None, help="datasets folder (default: $SINGLEPASS_DATA or ../shared/data)")
    p.add_argument(
        "--kv-cache",
        choices=["auto", "inplace", "concat"],
        default="auto",
        help="inplace: each layer's attention as ONNX Runtime's GroupQueryAttention writing the new keys/values "
        "into the runtime's cache buffers (rows right-padded; ONNX Runtime CPU); concat: present = past + new, "
        "a new copy per step (any runtime, TensorRT); auto: inplace for int4/int8 weights where the graph allows "
        "it (opset >= 23, no sliding window, not --all-logits), concat for fp32 (default: %(default)s)",
    )
    p.add_argument(
        "--fused-kernels",
        choices=["auto", "none"],
        default="auto",
        help="auto: for artifacts already tied to ONNX Runtime (int4/int8 weights or --kv-cache inplace), "
        "ONNX Runtime's fused kernels: Add + RMSNorm as SkipSimplifiedLayerNormalization, each layer's q/k/v "
        "as one matmul read packed by GroupQueryAttention, which also applies the rotary embedding; none: "
        "the exporter's ops (default: %(default)s)",
    )
    p.add_argument("--max-batch", type=int, default=8, help="recorded serving limit (default: %(default)s)")
    p.add_argument("--max-prompt-length", type=int, default=None, help="default: the probes' max_length")
    p.add_argument(
        "--max-total-length",
        type=int,
        default=None,
        help="prompt + generated tokens (default: max prompt + 512, within the model's positions)",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("validate", help="re-check an artifact against the PyTorch reference")
    p.add_argument("artifact")
    p.add_argument("--model", default=None, help="reference model (default: the one recorded in the manifest)")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--steps", type=int, default=20, help="greedy decode steps (default: %(default)s)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("build-engine", help="TensorRT engine for an artifact (or --check-only pre-flight)")
    p.add_argument("artifact")
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp16")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-seq", type=int, default=None, help="max total sequence (default: the manifest's)")
    p.add_argument(
        "--check-only",
        action="store_true",
        help="run the checks that need no TensorRT: ONNX checker + shape inference, supported ops, "
        "profiles, fp16 range report",
    )
    p.add_argument("--prompts", default=None, help="text file, one prompt per line, for the fp16 range report")
    p.add_argument("--workspace-gb", type=float, default=4.0)
    p.add_argument("--timing-cache", default=None, help="timing cache file (default: ART/tensorrt.timing.cache)")
    p.add_argument("--force", action="store_true", help="rebuild an existing engine")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_build_engine)
