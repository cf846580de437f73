"""One-time preparation of the latency benchmark, cached outside the repository: the probes, the
exported artifacts (base, each probe, two probes at once) and the configuration list the
measuring workers serve (``benchmarks/latency_worker.py``).

* probes: the accuracy benchmark's seed-0 ToxicChat probes when present (its runs under the
  results folder give their F1), else quick ones trained here (``QUICK``) and evaluated on a
  stratified test subset;
* artifacts: ``$SINGLEPASS_CACHE/bench-artifacts/<configuration>``, re-exported when the
  backbone or a probe's weights changed (their sha256 against the manifest's).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from singlepass.benchmarks import latency_report as rep

if TYPE_CHECKING:
    from singlepass.models.backbone import Backbone

METHODS = ("pooling", "gate", "mha")
TWO_PROBES = ("gate", "mha")
# fallback probes when the accuracy ones are missing
QUICK = {"train_limit": 1200, "trials": 1, "epochs": 2, "test_limit": 500}


def log(msg: str) -> None:
    print(msg, flush=True)


# --- probes --------------------------------------------------------------------------------------


def accuracy_run(runs: Path, method: str) -> dict | None:
    """The accuracy benchmark's stored seed-0 ToxicChat run of ``method`` (``runs``: its
    ``accuracy/toxicchat`` folder), or None."""
    p = runs / f"{method}-seed0.json"
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def ensure_probes(args: argparse.Namespace, bb: "Backbone", runs: Path) -> dict:
    """method -> {dir, source, f1_human, f1_full, train_seconds, params}. ``runs``: the accuracy
    benchmark's ``accuracy/toxicchat`` results folder."""
    from singlepass.benchmarks.accuracy import probe_dir
    from singlepass.errors import SinglepassError
    from singlepass.models.probe_io import read_config

    out = {}
    for method in METHODS:
        d = probe_dir(args.cache_root, "toxicchat", method, 0)
        run = accuracy_run(runs, method)
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
            source = (
                f"quick probe trained here ({QUICK['train_limit']} train rows, {QUICK['trials']} trial, "
                f"<= {QUICK['epochs']} epochs): the accuracy benchmark's probe was not there"
            )
            run = None
        ev = (run or {}).get("eval") or cfg.get("bench_eval") or {}
        out[method] = {
            "dir": str(d),
            "source": source,
            "params": cfg.get("trainable_parameters"),
            "train_seconds": cfg["training"]["seconds"],
            "search_seconds": cfg["training"].get("search_seconds"),
            "trials": len(cfg["training"].get("trials", [])),
            "f1_human": ev.get("toxicchat/test_human", {}).get("f1_at_threshold"),
            "f1_full": ev.get("toxicchat/test", {}).get("f1_at_threshold"),
            "f1_05_human": ev.get("toxicchat/test_human", {}).get("f1"),
            "f1_05_full": ev.get("toxicchat/test", {}).get("f1"),
            "f1_from": f"benchmarks/results/accuracy/toxicchat/{method}-seed0.json"
            if run
            else (
                f"quick probe evaluated here on a {QUICK['test_limit']}-row stratified ToxicChat test subset"
                if ev
                else "not yet evaluated: the accuracy benchmark has not written "
                f"benchmarks/results/accuracy/toxicchat/{method}-seed0.json"
            ),
        }
    return out


def train_quick_probe(args: argparse.Namespace, bb: "Backbone", method: str, out: Path) -> dict:
    """Train, evaluate (``bench_eval``) and save a quick fallback probe -> its stored config."""
    from singlepass.models.data import load_dataset
    from singlepass.models.evaluate import predict_proba, report_subsets
    from singlepass.models.metrics import compute_metrics
    from singlepass.models.probe_io import read_config, save_probe
    from singlepass.models.train import train_probe

    log(f"training a quick {method} probe (fallback; the accuracy benchmark's is missing) ...")
    tr = load_dataset("toxicchat", "train", args.data_dir, limit=QUICK["train_limit"])
    va = load_dataset("toxicchat", "validation", args.data_dir)
    module, cfg = train_probe(
        method,
        bb,
        tr,
        va,
        trials=QUICK["trials"],
        max_epochs=QUICK["epochs"],
        cache_dir=args.cache_dir,
        progress=False,
        log=log,
    )
    cfg["quick"] = QUICK
    te = load_dataset("toxicchat", "test", args.data_dir, limit=QUICK["test_limit"])
    probs = predict_proba(module, cfg, bb, te, args.cache_dir, progress=False, log=log)  # [N, C]
    cfg["bench_eval"] = {
        f"toxicchat/{k}": compute_metrics(te.labels[i], probs[i], cfg["threshold"])
        for k, i in report_subsets(te).items()
    }
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


def artifact_current(folder: Path, specs: list[str], backbone_sha: str, weights: str | None = None) -> bool:
    """Whether ``folder`` is an artifact of this backbone fusing exactly ``specs`` (same names,
    same probe weights) with decoder weights ``weights`` (fp32 / int8 / int4), built by this
    source (an export or probe code change makes every stored artifact stale)."""
    from singlepass.errors import SinglepassError
    from singlepass.export.manifest import EXPORT_SOURCES
    from singlepass.export.quantize import DEFAULT_WEIGHTS
    from singlepass.files import sha256_file, source_sha256
    from singlepass.runtime.contract import read_artifact

    weights = weights or DEFAULT_WEIGHTS
    try:
        m = read_artifact(folder)
    except SinglepassError:  # missing, incomplete or of another manifest version
        return False
    if m.backbone.get("sha256") != backbone_sha or len(m.probes) != len(specs) or m.graph.precision != weights:
        return False
    if m.raw.get("source_sha256") != source_sha256(*EXPORT_SOURCES):
        return False
    for p, s in zip(m.probes, specs):
        d, name = s.rsplit(":", 1)
        if p.name != name or p.sha256 != sha256_file(Path(d) / "model.safetensors"):
            return False
    return (folder / "model.onnx").is_file()


def ensure_artifacts(
    args: argparse.Namespace, bb: "Backbone", probes: dict, plan: dict | None = None, weights: str | None = None
) -> dict[str, Path]:
    """configuration name -> its exported artifact folder (exported only when not current).
    ``plan``: name -> probe specs (default ``artifact_plan``); ``weights``: default the export's."""
    from singlepass.export.pipeline import export_artifact
    from singlepass.export.quantize import DEFAULT_WEIGHTS

    weights = weights or DEFAULT_WEIGHTS
    root = args.cache_root / "bench-artifacts" / weights
    out = {}
    for name, specs in (plan or artifact_plan(probes)).items():
        folder = root / name
        if not artifact_current(folder, specs, bb.fingerprint["sha256"], weights):
            log(f"exporting artifact {name!r} ({weights} weights) -> {folder} ...")
            s = export_artifact(
                folder,
                specs,
                backbone=bb,
                force=True,
                weights=weights,
                max_batch=max(8, *getattr(args, "batch", [8])),
                log=lambda m: None,
            )
            log(
                f"  {name}: {s['seconds']} s, {s['bytes'] / 2**20:,.0f} MiB, validated (max |diff| "
                f"{max(s['validation'].values()):.2g})"
            )
        out[name] = folder
    return out


# --- configurations --------------------------------------------------------------------------------


def configurations(artifacts: dict, probes: dict, guard_a: dict, guard_a_dir: Path, guard_b: dict) -> list[dict]:
    """Every configuration the workers serve: base, each probe, two probes, the two guards."""

    def f1s(ms: tuple[str, ...] | list[str]) -> tuple[str, str]:
        h = [probes[m]["f1_human"] for m in ms]
        f = [probes[m]["f1_full"] for m in ms]
        return (" / ".join(rep.pct(x) for x in h), " / ".join(rep.pct(x) for x in f))

    cfgs = [
        {
            "name": "base",
            "label": "base LLM (no probe)",
            "short": "base",
            "kind": "single-pass",
            "artifact": str(artifacts["base"]),
            "f1_human": "—",
            "f1_full": "—",
        }
    ]
    for m in METHODS:
        h, f = f1s([m])
        cfgs.append(
            {
                "name": m,
                "label": f"single pass + {m} probe",
                "short": f"+{m}",
                "kind": "single-pass",
                "artifact": str(artifacts[m]),
                "f1_human": h,
                "f1_full": f,
            }
        )
    two = "+".join(TWO_PROBES)
    h, f = f1s(TWO_PROBES)
    cfgs.append(
        {
            "name": two,
            "label": f"single pass + {' + '.join(TWO_PROBES)} (two probes)",
            "short": f"+{two}",
            "kind": "single-pass",
            "artifact": str(artifacts[two]),
            "f1_human": h,
            "f1_full": f,
        }
    )
    ea = guard_a["eval"]
    cfgs.append(
        {
            "name": "guard-classifier",
            "label": "guard (a) MiniLM-L6 classifier, then base LLM",
            "short": "(a) MiniLM→LLM",
            "kind": "guard",
            "artifact": str(artifacts["base"]),
            "guard": {"type": "classifier", "folder": str(guard_a_dir), "threshold": guard_a["threshold"]},
            "guard_weights": guard_a_dir / "model.onnx",
            "f1_human": rep.pct(ea["toxicchat/test_human"]["f1_at_threshold"]),
            "f1_full": rep.pct(ea["toxicchat/test"]["f1_at_threshold"]),
        }
    )
    eb = guard_b["eval"]
    cfgs.append(
        {
            "name": "guard-llm",
            "label": "guard (b) prompted SmolLM2-135M, then base LLM",
            "short": "(b) LLM guard→LLM",
            "kind": "guard",
            "artifact": str(artifacts["base"]),
            "guard": {"type": "llm", "artifact": str(artifacts["base"]), "threshold": guard_b["threshold"]},
            "guard_weights": Path(artifacts["base"]) / "model.onnx.data",
            "f1_human": rep.pct(eb["toxicchat/test_human"]["f1_at_threshold"]) if "toxicchat/test_human" in eb else "—",
            "f1_full": rep.pct(eb["toxicchat/test"]["f1_at_threshold"]),
        }
    )
    return cfgs
