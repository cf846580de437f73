"""Write a tiny HF model folder as a GGUF file with the ``gguf`` package, the way llama.cpp's
converter lays it out (tensor names from gguf's own name map, Llama/Mistral q/k rows permuted,
Gemma norm weights stored as 1 + w, a byte-level BPE tokenizer with its merges and chat template),
so a test can load it back through transformers as a user would (``singlepass ... --model x.gguf``).

All tensors are written as F32: the round trip is exact, so the loaded model must equal the source.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# transformers model_type -> GGUF general.architecture (llama.cpp writes Mistral as "llama" and
# transformers recognises it by "mistral" in general.name)
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3"}
GGUF_ARCH.update({"gemma2": "gemma2", "gemma3_text": "gemma3"})
TOKEN_NORMAL, TOKEN_CONTROL = 1, 3


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order for Llama-style RoPE (transformers undoes it on load)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensors(model, arch: str):
    import gguf

    cfg = model.config
    names = gguf.get_tensor_name_map(
        next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), len(model.model.layers)
    )
    for hf_name, t in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # a GGUF without output.weight is loaded tied
        base, suffix = hf_name.rsplit(".", 1)
        name = names.get_name(base)
        if name is None:
            raise ValueError(f"no GGUF name for {hf_name}")
        w = t.detach().float().numpy().copy()
        if arch == "llama" and base.endswith("q_proj"):
            w = _permute(w, cfg.num_attention_heads)
        elif arch == "llama" and base.endswith("k_proj"):
            w = _permute(w, cfg.num_key_value_heads)
        elif arch.startswith("gemma") and base.endswith("norm"):
            w = w + 1.0
        yield f"{name}.{suffix}", w


def _tokenizer(writer, folder: Path, tok) -> None:
    data = json.loads((folder / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    tokens = [None] * len(tok)
    for token, i in vocab.items():
        tokens[i] = token
    types = [TOKEN_NORMAL] * len(tokens)
    for added in data["added_tokens"]:
        tokens[added["id"]] = added["content"]
        types[added["id"]] = TOKEN_CONTROL if added["special"] else TOKEN_NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tok.bos_token_id)
    writer.add_eos_token_id(tok.eos_token_id)
    writer.add_pad_token_id(tok.pad_token_id)
    writer.add_unk_token_id(tok.unk_token_id)
    writer.add_chat_template(tok.chat_template)


def write_gguf(folder: Path, path: Path) -> Path:
    """The HF model folder ``folder`` as one F32 GGUF file at ``path``."""
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, path = Path(folder), Path(path)
    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    cfg = model.config
    arch = GGUF_ARCH[cfg.model_type]
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w = gguf.GGUFWriter(str(path), arch)
    # llama.cpp writes Mistral as "llama" named after the checkpoint ("Mistral 7B Instruct ..."):
    # transformers then reads it as Llama (only a file named exactly "mistral" is read as Mistral,
    # and that fails in gguf-py, which has no "mistral" architecture)
    w.add_name(f"tiny-{cfg.model_type}")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_embedding_length(cfg.hidden_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(
        cfg.rope_parameters.get("rope_theta", (cfg.rope_parameters.get("full_attention") or {}).get("rope_theta"))
    )
    w.add_vocab_size(cfg.vocab_size)
    if arch == "llama":
        w.add_rope_dimension_count(head_dim)
    if arch.startswith("gemma"):
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        w.add_sliding_window(cfg.sliding_window)
    _tokenizer(w, folder, tok)
    for name, data in _tensors(model, arch):
        w.add_tensor(name, data.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
