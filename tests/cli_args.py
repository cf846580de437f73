"""argv for the `singlepass` commands the tests run on the tiny model (one place for the flags)."""

from __future__ import annotations


def on_model(model_dir, cache_dir) -> list[str]:
    return ["--model", str(model_dir), "--cache-dir", str(cache_dir)]


def export_argv(model_dir, cache_dir, out, *probes, extra=()) -> list[str]:
    """`singlepass export` of the model with ``probes`` (each DIR or DIR:NAME) into ``out``, with fp32
    weights unless ``extra`` names others: the surgery's parity checks are exact at fp32 (the int4
    default and its tolerances are tested in test_quantize.py)."""
    extra = [str(x) for x in extra]
    weights = [] if "--weights" in extra else ["--weights", "fp32"]
    argv = ["export", *on_model(model_dir, cache_dir), *weights, "--out", str(out)]
    for p in probes:
        argv += ["--probe", str(p)]
    return argv + extra


def train_argv(model_dir, cache_dir, probe: str, max_length: int, *extra) -> list[str]:
    """`singlepass train` on 60 ToxicChat training rows (40 for validation)."""
    return [
        "train",
        *on_model(model_dir, cache_dir),
        "--dataset",
        "toxicchat",
        "--limit",
        "60",
        "--val-limit",
        "40",
        "--max-length",
        str(max_length),
        "--probe",
        probe,
        "--no-progress",
        *map(str, extra),
    ]


def probe_argv(command: str, probe, model_dir, cache_dir, limit: int, *extra) -> list[str]:
    """`singlepass eval` / `plot-layers` of a saved probe on ``limit`` ToxicChat test rows."""
    return [
        command,
        "--probe",
        str(probe),
        *on_model(model_dir, cache_dir),
        "--dataset",
        "toxicchat",
        "--split",
        "test",
        "--limit",
        str(limit),
        "--no-progress",
        *map(str, extra),
    ]
