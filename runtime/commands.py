"""CLI for runtime/: ``singlepass generate ART PROMPT [PROMPT ...]`` (no torch is imported)."""

from __future__ import annotations

import json
import sys


def _labels_line(labels: dict) -> str:
    return ", ".join(f"{k}={v.label} ({v.score:.3f})" for k, v in labels.items()) or "(no probes)"


def cmd_generate(args) -> int:
    from singlepass.runtime.api import load
    from singlepass.runtime.policy import DEFAULT_REFUSAL, parse_specs

    rt = load(
        args.artifact,
        backend=args.backend,
        engine=args.engine,
        threads=args.threads,
        policy=parse_specs(args.policy),
        refusal=args.refusal or DEFAULT_REFUSAL,
    )
    single = len(args.prompts) == 1
    kw = dict(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        truncate=args.truncate,
        batch_size=args.batch_size,
        on_error="raise" if single else "return",
    )
    prompts = args.prompts[0] if single else args.prompts
    failed = 0
    if args.stream:
        texts: dict[int, str] = {}
        for ev in rt.stream(prompts, args.max_new_tokens, **kw):
            failed += ev.error is not None
            if args.json:
                print(json.dumps(ev.to_dict()), flush=True)
                continue
            if ev.error:
                print(f"singlepass generate: error: prompt {ev.index}: {ev.error}", file=sys.stderr, flush=True)
                continue
            tag = "" if single else f"[{ev.index}] "
            if ev.step == 0:
                note = f" (prompt truncated to {ev.prompt_tokens} tokens)" if ev.truncated else ""
                print(f"{tag}labels: {_labels_line(ev.labels or {})}{note}", flush=True)
                if ev.blocked_by:
                    print(f"{tag}blocked by {ev.blocked_by}", flush=True)
            if single:  # tokens as they come
                sys.stdout.write(ev.text + ("\n" if ev.done else ""))
                sys.stdout.flush()
            else:  # several prompts: each one's text when it is finished
                texts[ev.index] = texts.get(ev.index, "") + ev.text
                if ev.done:
                    print(f"{tag}{texts.pop(ev.index)}", flush=True)
        return 2 if failed else 0
    results = rt.generate(prompts, args.max_new_tokens, **kw)
    results = [results] if single else results
    for r in results:
        if r.error:
            failed += 1
            print(f"singlepass generate: error: prompt {r.index}: {r.error}", file=sys.stderr)
            if not args.json:
                continue
        if args.json:
            print(json.dumps(r.to_dict()))
            continue
        print("\n".join(result_lines(r, "" if single else f"[{r.index}] ")))
    return 2 if failed else 0


def result_lines(r, tag: str = "") -> list[str]:
    """What ``singlepass generate`` prints for one Result: the prompt's labels, the response's
    (the last pass's, after how many generated tokens), who blocked or stopped it, the text."""
    note = f" (prompt truncated to {r.prompt_tokens} tokens)" if r.truncated else ""
    lines = [f"{tag}labels: {_labels_line(r.labels)}{note}"]
    if r.response_labels:
        n = len(next(iter(r.response_scores.values())))
        lines.append(f"{tag}response labels after {n} tokens: {_labels_line(r.response_labels)}")
    if r.blocked_by:
        stopped = bool(r.token_ids) and r.blocked_by in r.response_labels
        lines.append(f"{tag}{'response stopped' if stopped else 'blocked'} by {r.blocked_by}")
    return lines + [f"{tag}{r.text}"]


def register(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="text + probe labels from an exported artifact (no torch)",
        description="Generate text and every fused probe's label from the same passes. Runs on "
        "numpy + onnxruntime + tokenizers (or a TensorRT engine).",
    )
    p.add_argument("artifact", help="artifact folder written by `singlepass export`")
    p.add_argument("prompts", nargs="+", metavar="PROMPT", help="prompt text (several: one batch)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="(default: %(default)s; 0 = labels only)")
    p.add_argument(
        "--json",
        action="store_true",
        help='print {"text", "token_ids", "labels": {probe: {"label", "score"}}, ...} per prompt '
        "(with --stream: one JSON object per event)",
    )
    p.add_argument(
        "--stream",
        action="store_true",
        help="print the labels from the first pass, then each token as it is produced (several "
        "prompts: each text when it is finished)",
    )
    p.add_argument(
        "--backend",
        choices=["auto", "cpu", "cuda", "tensorrt"],
        default="auto",
        help="auto: a built TensorRT engine if TensorRT imports, else ONNX Runtime CUDA if available, "
        "else CPU (default: %(default)s)",
    )
    p.add_argument("--engine", default=None, help="TensorRT engine file of the artifact (default: the last built)")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: all cores)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the K most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (per prompt: seed + its position)")
    p.add_argument(
        "--truncate",
        action="store_true",
        help="cut prompts over the artifact's maximum length (reported) instead of refusing them",
    )
    p.add_argument(
        "--policy",
        action="append",
        metavar="PROBE=RULE",
        help="label policy (repeatable): PROBE=report (default), PROBE=block (binary: P >= the probe's "
        "threshold), PROBE=block:0.8, PROBE=block:LABEL[,LABEL]; a blocked prompt is not generated. "
        "A response probe: PROBE=stop[:THRESHOLD] stops generating once the response so far is "
        "flagged on 2 passes in a row (the text so far + a notice, finish_reason blocked)",
    )
    p.add_argument("--refusal", default=None, help="text returned for a blocked prompt")
    p.add_argument("--batch-size", type=int, default=None, help="prompts per batch (default: all in one)")
    p.set_defaults(func=cmd_generate)
