"""The attention singlepass exports: grouped-query attention without ``repeat_kv``.

transformers' eager and SDPA attention (as ``torch.onnx`` traces them, for any query length)
repeat every key/value head for its query heads (``repeat_kv``), and the SDPA decomposition
then scales and transposes the repeated keys: per layer and per decode step the graph copies
the whole past several times over ([B, heads, P, head_dim] instead of [B, kv_heads, P, head_dim]).
On a CPU that copying, not the arithmetic, dominates a decode step once the batch holds long
rows (``benchmarks/results/serve.md``).

Here a key/value head's query heads are stacked along the query axis instead, so the matmuls
read the cache as it is (the same arithmetic; what transformers' ``pack_gqa`` does for one
query token, for any length)::

    query [B, H, T, D] -> [B, kv, g*T, D]        g = H / kv; head h = k*g + j reads kv head k
    scores = q @ key^T: [B, kv, g*T, P] -> [B, H, T, P]  + the additive mask [B, 1, T, P]
    out = softmax(scores) [B, kv, g*T, P] @ value [B, kv, P, D] -> [B, H, T, D] -> [B, T, H, D]

``exporting_attention(model)`` switches a model to it for the duration of an export (the mask
is transformers' eager float mask, which already holds a sliding window where a layer has one);
attention-logit soft-capping (Gemma 2: ``tanh(scores / c) * c`` before the mask) is applied as
transformers' eager attention applies it. Models whose attention adds more than this (sinks)
keep their own.

From opset 23 the same function is one ``Attention`` node (``onnx_attention``: ONNX's own
grouped-query attention, ``torch.onnx.ops.attention``), which ONNX Runtime runs as one fused
kernel; with it the exporter also writes ``RMSNormalization`` and ``RotaryEmbedding`` nodes. A
decode step of SmolLM2-135M (int4 weights, 2 threads) then takes 6.9 ms instead of 8.4 ms.
"""

from __future__ import annotations

import contextlib

NAME = "singlepass_gqa"
ATTENTION_OPSET = 23  # ONNX's Attention operator


def gqa_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, softcap=None, **kwargs):
    """transformers' attention-function interface -> (output [B, T, H, D], None)."""
    import torch

    B, H, T, D = query.shape  # query [B, H, T, D]
    kv, P = key.shape[1], key.shape[2]  # key, value [B, kv, P, D]
    g = H // kv
    q = (query * scaling).reshape(B, kv, g * T, D)
    w = torch.matmul(q, key.transpose(2, 3)).reshape(B, H, T, P)  # [B, H, T, P]
    if softcap is not None:
        w = torch.tanh(w / softcap) * softcap
    if attention_mask is not None:
        w = w + attention_mask[:, :, :, :P]  # [B, 1, T, P], 0 or the dtype's minimum
    w = torch.softmax(w, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(w.reshape(B, kv, g * T, P), value).reshape(B, H, T, D)  # [B, H, T, D]
    return out.transpose(1, 2).contiguous(), None


def onnx_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, softcap=None, **kwargs):
    """``gqa_attention`` as ONNX's ``Attention`` (opset 23) -> (output [B, T, H, D], None)."""
    import torch

    H, kv, P = query.shape[1], key.shape[1], key.shape[2]  # query [B, H, T, D]; key, value [B, kv, P, D]
    mask = attention_mask[:, :, :, :P] if attention_mask is not None else None  # [B, 1, T, P] additive
    out = torch.onnx.ops.attention(
        query, key, value, attn_mask=mask, q_num_heads=H, kv_num_heads=kv, scale=scaling, softcap=softcap or 0.0
    )[0]  # [B, H, T, D]
    return out.transpose(1, 2).contiguous(), None


def _register(opset: int) -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    name, fn = (NAME + "_onnx", onnx_attention) if opset >= ATTENTION_OPSET else (NAME, gqa_attention)
    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, fn)
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, eager_mask)
    return name


def supports(config) -> bool:
    """Scaled-dot-product attention (with an optional logit soft-cap and the mask's sliding
    window), which ``gqa_attention`` computes exactly; attention sinks are not."""
    return not getattr(config, "sinks", None)


@contextlib.contextmanager
def exporting_attention(model, opset: int = ATTENTION_OPSET):
    """Within the block the model runs ``gqa_attention``, or from opset 23 ``onnx_attention`` (if
    ``supports`` its config)."""
    cfg = model.config
    if not supports(cfg):
        yield False
        return
    name = _register(opset)
    before = cfg._attn_implementation
    cfg._attn_implementation = name
    try:
        yield True
    finally:
        cfg._attn_implementation = before
