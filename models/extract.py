"""Hidden states of a frozen LLM: the stacked token x layer tensor ``[L+1, B, T, d]``.

Index 0 is the embedding output, 1..L-1 the residual stream after each decoder layer and L
the final-RMSNorm output (transformers' ``output_hidden_states`` semantics). Batches are
padded (left by default, the serving layout) with explicit position ids, so a prompt's states
do not depend on what else is in its batch.
"""

from __future__ import annotations

import numpy as np
import torch

from singlepass.models.prompts import DEFAULT_MAX_LENGTH, Encoded, encode
from singlepass.runtime.batching import pad_batch


@torch.no_grad()
def forward_hidden(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
) -> torch.Tensor:
    """-> stacked hidden states [L+1, B, T, d] (float32 for a float32 model). No lm_head."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    out = base(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        output_hidden_states=True,
        use_cache=False,
        return_dict=True,
    )
    return torch.stack(out.hidden_states, 0)  # [L+1, B, T, d]


def batch_tensors(seqs: list[list[int]], pad_id: int, side: str = "left"):
    ids, mask, pos = pad_batch(seqs, pad_id, side)
    return torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(pos)


def plan_batches(lengths: list[int], batch_size: int, max_batch_tokens: int) -> list[list[int]]:
    """Group row indices into batches of similar length (longest first) to waste little padding.

    The order is a pure function of the lengths, so an interrupted run replays the same plan.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches, cur = [], []
    for i in order:
        width = lengths[cur[0]] if cur else lengths[i]  # first row is the longest of its batch
        if cur and (len(cur) >= batch_size or width * (len(cur) + 1) > max_batch_tokens):
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


def iter_hidden(
    backbone,
    ids: list[list[int]],
    batch_size: int = 8,
    max_batch_tokens: int = 4096,
    padding_side: str = "left",
    progress: bool = False,
    batches: list[list[int]] | None = None,
):
    """Yield (row indices, states [L+1, B, T, d], mask [B, T]) batch by batch.

    ``batches`` (lists of row indices) overrides the length-sorted plan, e.g. to resume one.
    """
    from tqdm.auto import tqdm

    pad = backbone.tokenizer.pad_token_id
    if batches is None:
        batches = plan_batches([len(s) for s in ids], batch_size, max_batch_tokens)
    total = sum(len(ids[r]) for b in batches for r in b)
    bar = tqdm(total=total, unit="tok", unit_scale=True, desc="extract", disable=not progress)
    for rows in batches:
        input_ids, mask, pos = batch_tensors([ids[i] for i in rows], pad, padding_side)
        hs = forward_hidden(backbone.model, input_ids, mask, pos)
        bar.update(int(mask.sum()))
        yield rows, hs, mask
    bar.close()


def extract(
    backbone,
    texts: list[str],
    prompt_format: str = "chat",
    max_length: int = DEFAULT_MAX_LENGTH,
    batch_size: int = 8,
    padding_side: str = "left",
    progress: bool = False,
):
    """Hidden states for a list of texts, in their order, as one padded batch.

    -> (states [L+1, B, T, d] float32, attention_mask [B, T] int64, Encoded)
    """
    enc = encode(backbone.tokenizer, texts, prompt_format, max_length)
    return (*stack_in_order(backbone, enc, batch_size, padding_side, progress), enc)


def stack_in_order(backbone, enc: Encoded, batch_size: int = 8, padding_side: str = "left", progress: bool = False):
    T = max(len(s) for s in enc.ids)
    L1, d = backbone.num_layers + 1, backbone.hidden_size
    out = torch.zeros(L1, len(enc.ids), T, d)
    mask = torch.zeros(len(enc.ids), T, dtype=torch.int64)
    for rows, hs, _ in iter_hidden(backbone, enc.ids, batch_size, padding_side=padding_side, progress=progress):
        for j, r in enumerate(rows):
            n = len(enc.ids[r])
            src = slice(hs.shape[2] - n, None) if padding_side == "left" else slice(0, n)
            dst = slice(T - n, None) if padding_side == "left" else slice(0, n)
            out[:, r, dst] = hs[:, j, src]
            mask[r, dst] = 1
    return out, mask


def relative_error(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    """max over vectors (last axis) of ||a - b|| / ||b||: a scale-free closeness for hidden states."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float(((a - b).norm(dim=-1) / b.norm(dim=-1).clamp_min(1e-12)).max())


@torch.no_grad()
def first_token_logits(model, last_hidden, chunk: int = 512) -> torch.Tensor:
    """Logits of the first response token [N, V] from the final-layer (post-norm) states at the
    last prompt position [N, d]: the LM head applied to them, as generation would."""
    head = model.get_output_embeddings()
    h = torch.as_tensor(last_hidden, dtype=torch.float32)
    if not len(h):
        return torch.zeros(0, head.weight.shape[0])
    return torch.cat([head(h[i : i + chunk]).float() for i in range(0, len(h), chunk)])
