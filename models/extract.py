"""Hidden states of a frozen LLM: the stacked token x layer tensor ``[L+1, B, T, d]``.

Index 0 is the embedding output, 1..L-1 the residual stream after each decoder layer and L
the final-RMSNorm output (transformers' ``output_hidden_states`` semantics). Batches are
padded (left by default, the serving layout) with explicit position ids, so a prompt's states
do not depend on what else is in its batch.
"""

from __future__ import annotations

import copy
import inspect

import numpy as np
import torch

from singlepass.models.prompts import DEFAULT_MAX_LENGTH, EXTRACT_BATCH, Encoded, encode
from singlepass.runtime.batching import pad_batch

# Rows that start with the same tokens (a chat template's system turn: SmolLM2's is 24 tokens, a third of an
# average ToxicChat prompt) run them once: each batch then runs only its rows' own tokens, on a copy of the
# shared tokens' keys and values (``forward_with_prefix``). Below this many shared tokens it is not worth a pass.
MIN_SHARED_PREFIX = 8


def decoder(model):
    """The decoder stack under the LM head (what returns hidden states without computing logits)."""
    return model.get_decoder() if hasattr(model, "get_decoder") else model.model


def returned_cache(out):
    """The KV cache a forward returned: ``out.cache`` (``past_key_values`` in earlier transformers 5 releases)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def cache_arg(module) -> str:
    """The name ``module``'s forward takes a KV cache by: ``cache`` in recent transformers 5 releases,
    where ``past_key_values`` is deprecated, ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


@torch.no_grad()
def forward_hidden(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
) -> torch.Tensor:
    """-> stacked hidden states [L+1, B, T, d] (float32 for a float32 model). No lm_head."""
    out = decoder(model)(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        output_hidden_states=True,
        use_cache=False,
        return_dict=True,
    )
    return torch.stack(out.hidden_states, 0)  # [L+1, B, T, d]


def shared_prefix(ids: list[list[int]]) -> int:
    """How many first tokens every row has in common, leaving each row at least one of its own (0: one row)."""
    if len(ids) < 2:
        return 0
    first, n = ids[0], min(len(s) for s in ids) - 1
    for s in ids[1:]:
        n = next((i for i in range(n) if s[i] != first[i]), n)
    return n


def prefix_to_share(ids: list[list[int]]) -> int:
    """``shared_prefix``, or 0 where it is under ``MIN_SHARED_PREFIX`` tokens (not worth a pass of its own)."""
    P = shared_prefix(ids)
    return P if P >= MIN_SHARED_PREFIX else 0


@torch.no_grad()
def run_prefix(model, prefix: list[int]):
    """-> (states [L+1, 1, P, d], the model's cache of their keys and values) of the rows' shared first tokens."""
    out = decoder(model)(input_ids=torch.tensor([prefix]), use_cache=True, output_hidden_states=True, return_dict=True)
    return torch.stack(out.hidden_states, 0), returned_cache(out)


@torch.no_grad()
def forward_with_prefix(model, prefix, suffixes: list[list[int]], pad_id: int, side: str = "left"):
    """``forward_hidden`` of the rows prefix + suffix_b, from the shared prefix's states and cache (``run_prefix``):
    -> (states [L+1, B, P+S, d], mask [B, P+S]) padded on ``side`` as ``batch_tensors`` pads the whole rows.
    The suffixes run right-padded after the prefix, so each row's tokens stay contiguous in the cache (a
    sliding window counts cache slots, not positions); pad slots hold zeros."""
    states_p, cache_p = prefix
    P = states_p.shape[2]
    ids, mask, pos = batch_tensors(suffixes, pad_id, "right")  # [B, S]
    B, S = mask.shape
    out = run_suffixes(model, cache_p, P, ids, mask, pos, hidden_states=True)
    suffix = out.hidden_states  # L+1 x [B, S, d], copied row by row (no stacked copy of them too)
    del out
    states = suffix[0].new_zeros(len(suffix), B, P + S, suffix[0].shape[-1])  # [L+1, B, P+S, d]
    full = torch.zeros(B, P + S, dtype=mask.dtype)  # [B, P+S]
    for j, n in enumerate(mask.sum(1).tolist()):
        at = S - n if side == "left" else 0  # where the row's P + n tokens start
        states[:, j, at : at + P] = states_p[:, 0]
        states[:, j, at + P : at + P + n] = torch.stack([h[j, :n] for h in suffix])  # [L+1, n, d]
        full[j, at : at + P + n] = 1
    return states, full


@torch.no_grad()
def run_suffixes(model, cache_p, P: int, ids, mask, pos, hidden_states: bool = True):
    """The decoder stack on each row's own tokens after the shared prefix's cache ``cache_p`` (``run_prefix``;
    ``P`` tokens): ``batch_tensors`` of the suffixes, right-padded ([B, S] each), on a copy of the cache
    repeated per row. -> the decoder's output."""
    B = ids.shape[0]
    cache = copy.deepcopy(cache_p)  # the forward appends to it
    cache.batch_repeat_interleave(B)
    base = decoder(model)
    out = base(
        input_ids=ids,
        attention_mask=torch.cat([mask.new_ones(B, P), mask], 1),
        position_ids=pos + P,
        use_cache=True,
        output_hidden_states=hidden_states,
        return_dict=True,
        **{cache_arg(base): cache},
    )
    return out


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
    batch_size: int = EXTRACT_BATCH,
    max_batch_tokens: int = 4096,
    padding_side: str = "left",
    progress: bool = False,
    batches: list[list[int]] | None = None,
    share_prefix: bool = True,
):
    """Yield (row indices, states [L+1, B, T, d], mask [B, T]) batch by batch.

    ``batches`` (lists of row indices) overrides the length-sorted plan, e.g. to resume one.
    ``share_prefix``: the first tokens every row shares run once (``MIN_SHARED_PREFIX``); the states
    are the same up to float rounding.
    """
    from tqdm.auto import tqdm

    pad = backbone.tokenizer.pad_token_id
    if batches is None:
        batches = plan_batches([len(s) for s in ids], batch_size, max_batch_tokens)
    total = sum(len(ids[r]) for b in batches for r in b)
    P = prefix_to_share(ids) if share_prefix else 0
    prefix = run_prefix(backbone.model, ids[0][:P]) if P else None
    bar = tqdm(total=total, unit="tok", unit_scale=True, desc="extract", disable=not progress)
    for rows in batches:
        if prefix is None:
            input_ids, mask, pos = batch_tensors([ids[i] for i in rows], pad, padding_side)
            hs = forward_hidden(backbone.model, input_ids, mask, pos)
        else:
            hs, mask = forward_with_prefix(backbone.model, prefix, [ids[i][P:] for i in rows], pad, padding_side)
        bar.update(int(mask.sum()))
        yield rows, hs, mask
    bar.close()


def extract(
    backbone,
    texts: list[str],
    prompt_format: str = "chat",
    max_length: int = DEFAULT_MAX_LENGTH,
    batch_size: int = EXTRACT_BATCH,
    padding_side: str = "left",
    progress: bool = False,
):
    """Hidden states for a list of texts, in their order, as one padded batch.

    -> (states [L+1, B, T, d] float32, attention_mask [B, T] int64, Encoded)
    """
    enc = encode(backbone.tokenizer, texts, prompt_format, max_length)
    return (*stack_in_order(backbone, enc, batch_size, padding_side, progress), enc)


def stack_in_order(
    backbone, enc: Encoded, batch_size: int = EXTRACT_BATCH, padding_side: str = "left", progress: bool = False
):
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
