"""onnxruntime-genai as a peer of ``singlepass bench peers``: its own int4 CPU model of the backbone.

    out = build_genai_int4(backbone, cache / "genai" / "smollm2-int4")     # once (a stamp file)

``build_genai_int4`` saves the backbone as a Hugging Face folder (the transformers model, which
for a GGUF source is already dequantised, plus its tokenizer files) and runs onnxruntime-genai's
model builder on it (``python -m onnxruntime_genai.models.builder -i HF -o OUT -p int4 -e cpu``)
with the Hugging Face hub switched off. Its defaults are kept: int4 RTN weights (block 32,
``accuracy_level`` 4 on CPU), GroupQueryAttention, full-sequence prefill logits.

The benchmark runs the built folder with ``peer_runners.GenaiRunner`` (as any og model folder).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from singlepass.errors import SinglepassError
from singlepass.files import atomic_write_json, staged_folder

STAMP = "singlepass-genai-build.json"
PRECISIONS = ("int4", "int8", "fp16", "fp32")
BUILD_TIMEOUT_S = 3600


def import_og():
    try:
        import onnxruntime_genai as og
    except ImportError:
        raise SinglepassError(
            "onnxruntime-genai is not installed: pip install 'onnxruntime-genai>=0.18' (or the dev extra)"
        ) from None
    return og


def save_hf_folder(backbone, folder: Path) -> Path:
    """The backbone's transformers model and tokenizer files as a plain Hugging Face folder (once)."""
    from singlepass.runtime.contract import TOKENIZER_FILES

    folder = Path(folder)
    if (folder / "config.json").is_file():
        return folder
    with staged_folder(folder) as tmp:
        backbone.model.save_pretrained(tmp)
        for f in TOKENIZER_FILES:  # the tokenizer exactly as singlepass reads it
            if (backbone.folder / f).is_file():
                shutil.copy2(backbone.folder / f, tmp / f)
    return folder


def _stamp(backbone, precision: str) -> dict:
    og = import_og()
    return {
        "backbone_sha256": backbone.fingerprint.get("sha256"),
        "precision": precision,
        "execution_provider": "cpu",
        "onnxruntime_genai": og.__version__,
    }


def build_genai_int4(backbone, out_dir, precision: str = "int4", cache_dir: str | None = None) -> Path:
    """onnxruntime-genai's own CPU model of ``backbone`` in ``out_dir`` (skipped when ``out_dir``
    holds a build of the same backbone, precision and og version). -> ``out_dir``."""
    from singlepass.models.backbone import cache_root

    if precision not in PRECISIONS:
        raise SinglepassError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    out = Path(out_dir)
    want = _stamp(backbone, precision)
    stamp = out / STAMP
    if stamp.is_file():
        done = json.loads(stamp.read_text())
        if {k: done.get(k) for k in want} == want:
            return out
    elif out.exists() and any(out.iterdir()):
        raise SinglepassError(f"{out} is a non-empty folder without a {STAMP}: refusing to replace it")
    sha = (backbone.fingerprint.get("sha256") or "unknown")[:16]
    work = cache_root(cache_dir) / "genai"
    hf = save_hf_folder(backbone, work / f"hf-{sha}")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    with staged_folder(out) as tmp:  # an interrupted build leaves no half folder behind
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(tmp)]
        cmd += ["-p", precision, "-e", "cpu", "-c", str(work / "builder-cache")]
        t0 = time.perf_counter()
        try:
            run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise SinglepassError(f"onnxruntime-genai's model builder ran over {BUILD_TIMEOUT_S} s") from None
        if run.returncode != 0 or not (tmp / "genai_config.json").is_file():
            tail = (run.stderr or run.stdout).strip().splitlines()[-5:]
            raise SinglepassError(
                f"onnxruntime-genai's model builder failed on {hf} (exit {run.returncode}): " + " | ".join(tail)
            )
        atomic_write_json(tmp / STAMP, {**want, "build_seconds": round(time.perf_counter() - t0, 1)})
    return out
