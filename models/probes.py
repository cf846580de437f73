"""Probe families over the whole token x layer tensor (paper: arXiv 2601.13288).

Every probe is a plain ``nn.Module``: ``forward(states [L+1, B, T, d], mask [B, T]) -> logits
[B, C']`` with C' = 1 for binary tasks (one logit + BCE) and C for multi-class, so the export
can trace it into ONNX. All share the two-stage aggregator:

    stage 1 (tokens, one aggregator per layer)  h(l) [B, T, d] -> v(l) [B, d]     ``tokens``
    stage 2 (layers, one aggregator)            {v(l)} [L+1, B, d] -> v [B, d]   ``combine``
    head                                        logits = W v + b

in two evaluation orders of the same function: ``forward`` runs stage 1 on the stacked states,
all layers in one batched pass (training); ``forward_layers(layers, mask)`` takes the L+1 layer
tensors [B, T, d] where they are and runs stage 1 one layer at a time, so only the [B, d]
summaries are ever stacked (the exported graph: no [L+1, B, T, d] copy, and MHA's attention
activations of one layer at a time).

Padding is masked everywhere. Inputs first pass a parameter-free per-token RMS
normalisation (``input_norm="rms"``, the constructor default) because decoder LLMs carry
"massive activations" (|h| ~ 2.5e4 on SmolLM2's first token); ``input_norm="standard"`` adds
a fixed per-layer, per-dimension standardisation after it (mean and inverse std are buffers,
set from training tokens by ``set_input_statistics``; the trainer's default for gate and MHA);
``input_norm="none"`` is the paper's unnormalised variant. Per-layer parameters are stacked tensors
used through batched matmuls (one GEMM per module), so L+1 "modules" cost a handful of graph nodes
rather than L+1 copies.

Streaming (recurrent) form, for moderating a response while it is generated: ``stream_init``,
``stream_update`` and ``stream_logits`` carry stage 1's aggregate over the tokens folded in so far
as a small float32 state (like a KV cache; every state tensor has the batch on axis 1), so each
decode pass folds in its new token at O(1) cost and reads the label of the response so far, equal
(within rounding) to ``forward`` over the whole prefix. Pooling with token_pool mean|max, the gate
and MHA with query="learned" (attention pooling with learned queries) stream; ``check_streamable``
names any other family or option.

Each family ends with its descriptor (``POOLING``, ``GATE``, ``MHA``: models/family.py): input
kind, what trains, its search space and defaults.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from singlepass.models.family import Family

INPUT_NORMS = ("rms", "standard", "none")
NEG = -1e30  # masking value; probes always run in fp32 (kept so in reduced-precision engines)


def out_dim(num_classes: int) -> int:
    return 1 if num_classes == 2 else num_classes


def fp32(x: torch.Tensor) -> torch.Tensor:
    """x as float32; no Cast node when it already is one (an exported graph stays free of no-op Casts)."""
    return x if x.dtype == torch.float32 else x.float()


RMS_EPS = 1e-6


def inv_rms(x: torch.Tensor, eps: float = RMS_EPS) -> torch.Tensor:
    """1 / sqrt(mean(x^2) + eps) over the last axis, keeping it (one fused norm pass: ~2x faster on CPU)."""
    d = float(x.shape[-1])  # the width is fixed: a constant in an exported graph, not shape arithmetic
    return torch.rsqrt(torch.linalg.vector_norm(x, dim=-1, keepdim=True).pow(2) / d + eps)


def inv_rms_product(x: torch.Tensor, d: int) -> torch.Tensor:
    """``inv_rms`` of x [..., d] with the mean square as a product with a constant column: ONNX Runtime's CPU
    ReduceL2 is ~2x slower (the streaming decode form's). ``d``: a Python int (no shape arithmetic)."""
    return torch.rsqrt((x * x) @ x.new_full((d, 1), 1.0 / d) + RMS_EPS)


def rms_normalise(x: torch.Tensor, eps: float = RMS_EPS) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) over the last axis."""
    return x * inv_rms(x, eps)


# The streaming fold's layer slices: ``slice(i, i + 1)`` per layer, or EVERY (the stacked decode form),
# where a state is used whole: an exported Slice over every layer would copy it, and a Concat of one part too.
EVERY = slice(None)


def rows(state: torch.Tensor, one: slice) -> torch.Tensor:
    """A state tensor's layers ``one`` (layer-first): the tensor itself for EVERY."""
    return state if one == EVERY else state[one]


def joined(parts: list[torch.Tensor]) -> torch.Tensor:
    """The fold's per-slice results, concatenated on the layer axis (one part: itself)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def softmax_fold(run_max: torch.Tensor, s: torch.Tensor, keep: torch.Tensor):
    """One online-softmax step of a streaming fold: the running max score run_max [...], this pass's scores
    s [..., T] (NEG where masked) and keep [..., T] (1: a token to fold in, else 0) -> (the new running max
    [...], the rescale of what was folded in before [...], the new tokens' weights p [..., T])."""
    new_max = torch.maximum(run_max, s.amax(-1))
    return new_max, torch.exp(run_max - new_max), torch.exp(s - new_max[..., None]) * keep


def softmax_fold_one(run_max: torch.Tensor, s: torch.Tensor, keep: torch.Tensor):
    """``softmax_fold`` of one token per row, without the token axis (a decode pass): s, keep [...]."""
    new_max = torch.maximum(run_max, s)
    return new_max, torch.exp(run_max - new_max), torch.exp(s - new_max) * keep


def layer_sum(v: torch.Tensor, n: int, d: int) -> torch.Tensor:
    """v [n, B, d] summed over its leading (layer) axis -> [B, d], as one [1, n] x [n, B*d] product: ONNX
    Runtime's CPU ReduceSum over a leading axis is ~10x slower (measured 167 vs 16 us on [31, 8, 576], 2
    threads). ``n``, ``d``: Python ints (constant reshapes in an export, no shape arithmetic)."""
    return (v.new_ones(1, n) @ v.reshape(n, -1)).reshape(-1, d)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    """x [..., T, d] with mask broadcastable to [..., T, 1]."""
    return (x * mask).sum(dim) / mask.sum(dim).clamp_min(1.0)


def check_layer_count(layers: list[torch.Tensor], n: int) -> None:
    """The forms that take the L+1 layer tensors as a list: a clear error for another count."""
    if len(layers) != n:
        raise ValueError(f"the probe reads {n} layers, got {len(layers)}")


def stacked(part: list[torch.Tensor]) -> torch.Tensor:
    """G layer tensors [B, T, d] as one [G, B, T, d] (one layer: a view, no copy)."""
    return part[0][None] if len(part) == 1 else torch.stack(part)


def block_gain(gains: list, d: int) -> torch.Tensor:
    """The gains [d] of a block's layers (``Probe.features_layers``; None: 1), stacked -> [G, d] float32."""
    return torch.stack([torch.ones(d) if g is None else torch.as_tensor(g, dtype=torch.float32) for g in gains])


def key_mask(m: torch.Tensor) -> torch.Tensor:
    """An attention's additive mask over a pass's tokens as keys: m [1, B, T, 1] -> [1, B, 1, 1, T], 0 for
    a real key, NEG for padding (a boolean one exports as Where over the scores and a NaN check, ~10% of
    the probe graph's time)."""
    return ((m[..., 0] - 1.0) * -NEG)[:, :, None, None]


def token_weights(m: torch.Tensor) -> torch.Tensor:
    """The masked mean's weights of a pass's tokens: m [1, B, T, 1] -> [1, B, T], each real token
    1 / (the row's real tokens), padding 0 (a row without a real token: all 0)."""
    m = m[..., 0]  # [1, B, T]
    return m / m.sum(-1, keepdim=True).clamp_min(1.0)


def masked_max(x: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    return x.masked_fill(mask == 0, NEG).amax(dim)


def masked_topk_mean(x: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """x [G, B, T, d], mask [1, B, T, 1] -> [G, B, d]: per dimension, the mean of the k largest values
    over the real tokens (all of them when a row has fewer than k; k = 1 is ``masked_max``).

    The token axis is padded with k masked slots first, so TopK always has k values to return with a
    constant k (an exported graph takes any T, shorter than k included); masked slots carry NEG and
    are left out of the mean."""
    filled = x.masked_fill(mask == 0, NEG)  # [G, B, T, d]
    pad = (torch.zeros_like(filled[:, :, :1]) + NEG).repeat(1, 1, k, 1)  # [G, B, k, d]
    top = torch.cat([filled, pad], dim=2).topk(k, dim=2).values  # [G, B, k, d]
    real = (top > NEG / 2).to(torch.float32)  # [G, B, k, d]
    return (top * real).sum(2) / real.sum(2).clamp_min(1.0)


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    """[B, C'] logits -> [B, C] class probabilities (binary: [1 - p, p]), in the logits' dtype: the
    exported graphs' ``probs`` output. Scores on the host use ``host_probabilities``."""
    if logits.shape[-1] == 1:
        p = torch.sigmoid(logits)
        return torch.cat([1 - p, p], dim=-1)
    return torch.softmax(logits, dim=-1)


def host_probabilities(logits: torch.Tensor):
    """[B, C'] logits -> [B, C] float64 class probabilities (numpy), the runtime's own
    ``contract.class_probs``: what evaluation, metrics and thresholds read, so that they agree
    with the runtime's labels (in float32 a confident probe's rows tie at exactly 1.0)."""
    from singlepass.runtime.contract import class_probs

    return class_probs(logits.detach().cpu().numpy())


def head_attention(q, k, v, heads: int) -> torch.Tensor:
    """Multi-head attention with the heads side by side: q, k [B, T, H*dk], v [B, T, H*dv] -> [B, T, H*dv],
    per head h softmax(q_h k_h^T) v_h (no score scale: q carries it; a mask rides in q and k)."""
    B, T = q.shape[:2]
    q, k, v = (t.reshape(B, T, heads, -1).transpose(1, 2) for t in (q, k, v))  # [B, H, T, dk | dv]
    p = torch.softmax(q @ k.transpose(-1, -2), dim=-1)  # [B, H, T, T]
    return (p @ v).transpose(1, 2).reshape(B, T, -1)  # [B, H, T, dv] -> [B, T, H*dv]


class HeadAttention(torch.autograd.Function):
    """``head_attention`` as the TorchScript exporter writes it: from opset 23 one ONNX ``Attention`` node
    (one fused kernel over the heads, which ONNX Runtime's CPU runs without a [B, H, T, T] tensor between
    ops), below 23 its decomposition."""

    @staticmethod
    def forward(ctx, q, k, v, heads: int):
        return head_attention(q, k, v, heads)

    @staticmethod
    def symbolic(g, q, k, v, heads: int):
        if g.opset >= 23:
            return g.op("Attention", q, k, v, q_num_heads_i=heads, kv_num_heads_i=heads, scale_f=1.0)
        split = g.op("Constant", value_t=torch.tensor([0, 0, heads, -1]))
        q, k, v = (
            g.op("Transpose", g.op("Reshape", t, split), perm_i=p)
            for t, p in ((q, [0, 2, 1, 3]), (k, [0, 2, 3, 1]), (v, [0, 2, 1, 3]))
        )
        o = g.op("MatMul", g.op("Softmax", g.op("MatMul", q, k), axis_i=-1), v)  # [B, H, T, dv]
        return g.op(
            "Reshape", g.op("Transpose", o, perm_i=[0, 2, 1, 3]), g.op("Constant", value_t=torch.tensor([0, 0, -1]))
        )


class Probe(nn.Module):
    """Shared plumbing: input normalisation, mask handling and the linear head."""

    def __init__(self, num_layers: int, hidden_size: int, num_classes: int, input_norm: str = "rms"):
        super().__init__()
        if input_norm not in INPUT_NORMS:
            raise ValueError(f"input_norm must be one of {', '.join(INPUT_NORMS)}, not {input_norm!r}")
        self.num_layers, self.hidden_size, self.num_classes = num_layers, hidden_size, num_classes
        self.input_norm = input_norm
        if input_norm == "standard":  # fixed, not trained: exported with the module
            self.register_buffer("in_mean", torch.zeros(num_layers, hidden_size))  # [L+1, d]
            self.register_buffer("in_inv_std", torch.ones(num_layers, hidden_size))  # [L+1, d]
        self.head = nn.Linear(hidden_size, out_dim(num_classes))

    @torch.no_grad()
    def set_input_statistics(self, mean: torch.Tensor, std: torch.Tensor, min_std: float = 1e-6) -> None:
        """mean, std [L+1, d] of the RMS-normalised training tokens (input_norm="standard")."""
        if self.input_norm != "standard":
            raise ValueError("input statistics apply to input_norm='standard' only")
        self.in_mean.copy_(mean)
        self.in_inv_std.copy_(1.0 / std.clamp_min(min_std))

    def normalise(self, x: torch.Tensor, layers: slice) -> torch.Tensor:
        """x [G, B, T, d], the states of the G layers ``layers`` -> fp32, normalised."""
        x = fp32(x)
        if self.input_norm != "none":
            x = rms_normalise(x)
        return self.standardise(x, layers)

    def standardise(self, x: torch.Tensor, layers: slice) -> torch.Tensor:
        """RMS-normalised tokens x [G, B, T, d] -> the "standard" affine map of them (else x itself)."""
        if self.input_norm == "standard":
            x = (x - self.in_mean[layers, None, None]) * self.in_inv_std[layers, None, None]
        return x

    @property
    def reads_rms(self) -> bool:
        """Does stage 1 RMS-normalise its tokens first? Then it can read a decoder's own RMS-normalised
        tensors instead of the states (``gains`` of ``features_layers``)."""
        return self.input_norm != "none"

    def normalised_matmul(
        self, x: torch.Tensor, w: torch.Tensor, layers: slice, r=None, fused: bool = False, gain=None
    ) -> torch.Tensor:
        """``normalise(x, layers) @ w`` without the normalised copy of x: x [G, B, T, d] as the layers hold it,
        w [G, d, k] -> [G, B*T, k]. The normalisation is a per-token scale r = 1/rms(x) and, "standard", a
        per-layer affine map (x - mean) * inv_std, so it moves onto the product's sides:
        r * (x @ (inv_std * w)) - (mean * inv_std) @ w, with the weight terms constant (folded in an export).
        One pass over x for r and one GEMM per layer, where normalising first costs ~6 passes over it.
        ``r``: the tokens' scales [G, B*T, 1] when the caller has them (``inv_rms_product``). ``fused``: the
        RMS normalisation as one op on x instead (``F.rms_norm``: one RMSNormalization node in an opset-23
        export where the scale takes 6), for a decode pass's few rows, whose normalised copy costs nothing.
        ``gain`` [G, d]: x is already RMS-normalised, times gain per dimension (``features_layers``' gains):
        1 / gain moves onto w, and no scale is computed."""
        G, d = self.count(layers), self.hidden_size
        x = fp32(x).reshape(G, -1, d)  # [G, B*T, d]
        w, shift = self.normalised_weights(w, layers, gain)
        if self.input_norm == "none" or gain is not None:
            y = x @ w  # [G, B*T, k]
        elif fused:
            y = F.rms_norm(x, (d,), eps=RMS_EPS) @ w
        else:
            y = (x @ w) * (inv_rms_product(x, d) if r is None else r)  # r [G, B*T, 1]
        return y if shift is None else y - shift

    def normalised_weights(self, w: torch.Tensor, layers: slice, gain=None) -> tuple:
        """``normalised_matmul``'s weights: w [G, d, k] -> (w', shift [G, 1, k] or None) with
        standardise(x) @ w = x @ w' - shift for RMS-normalised x, and x / gain in place of x with ``gain``."""
        shift = None
        if self.input_norm == "standard":
            inv_std = self.in_inv_std[layers]  # [G, d]
            shift = (self.in_mean[layers] * inv_std)[:, None] @ w  # [G, 1, k]
            w = inv_std[..., None] * w
        if gain is not None:
            w = w / gain[..., None]  # [G, d, k]
        return w, shift

    def lead(self, G: int, m) -> tuple:
        """[G, B, T], the leading axes of a pass's G layers of tokens, as a reshape target: B read from the
        mask m [1, B, T, 1] (state-free: an exported graph computes it once for every layer, where a layer's
        own x.shape is ~8 ops per layer), T as -1; m None (stage 2 over the L+1 layer summaries): (G, -1, L+1)."""
        return (G, -1, self.num_layers) if m is None else (G, m.shape[1], -1)

    def count(self, modules: slice) -> int:
        """How many of the L+1 layers (MHA: L+2 stacked modules) ``modules`` names (a Python int: no shape
        arithmetic in an export). EVERY: the L+1 layers."""
        return self.num_layers if modules == EVERY else len(range(self.num_layers + 1)[modules])

    def prepare(self, states: torch.Tensor, mask: torch.Tensor):
        """-> states [L+1, B, T, d] (normalised), mask [1, B, T, 1] float."""
        return self.normalise(states, slice(0, self.num_layers)), mask.to(torch.float32)[None, :, :, None]

    def tokens(self, x: torch.Tensor, m: torch.Tensor, layers: slice) -> torch.Tensor:
        """Stage 1 of the G layers ``layers``: x [G, B, T, d], m [1, B, T, 1] -> v [G, B, d]."""
        raise NotImplementedError

    def combine(self, v: torch.Tensor) -> torch.Tensor:
        """Stage 2: the layer summaries v [L+1, B, d] -> v [B, d]."""
        raise NotImplementedError

    def features(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The summary v [B, d] the head reads (what a head-only probe is trained on). Stage 1 reads the states
        [L+1, B, T, d] as they are (``tokens_raw``), so a family that moves the normalisation onto its products
        never writes a normalised copy of them: ``combine(tokens(*prepare(states, mask)))`` up to float rounding
        (measured, training on SmolLM2's states: the gate's forward and backward 3.7x faster, the MHA's 1.14x)."""
        m = mask.to(torch.float32)[None, :, :, None]  # [1, B, T, 1]
        return self.combine(self.tokens_raw(states, m, slice(0, self.num_layers)))  # [B, d]

    # Can stage 1 run on blocks of a few layers at once (``features_layers(block=k)``)? A block is one
    # [k, B, T, d] copy of its layers, never the whole [L+1, B, T, d] stack, and the probe's small ops run
    # once per block instead of once per layer. The MHA's attention activations grow with k: it keeps 1.
    blockable = True

    def check_layers(self, layers: list[torch.Tensor]) -> None:
        check_layer_count(layers, self.num_layers)

    def blocks(self, layers: list[torch.Tensor], block: int = 1):
        """The L+1 layer tensors [B, T, d] ``block`` layers at a time: (slice i:i+G, the G tensors)."""
        self.check_layers(layers)
        for i in range(0, self.num_layers, block):
            part = layers[i : i + block]
            yield slice(i, i + len(part)), part

    def each_layer(self, layers: list[torch.Tensor], normalised: bool = True, block: int = 1):
        """``blocks`` of the layers, each as one tensor: (slice i:i+G, x [G, B, T, d], normalised unless
        ``normalised=False``), so no [L+1, B, T, d] copy is ever built."""
        for one, part in self.blocks(layers, block):
            x = stacked(part)  # [G, B, T, d]
            yield one, self.normalise(x, one) if normalised else x

    def tokens_raw(self, x: torch.Tensor, m: torch.Tensor, layers: slice) -> torch.Tensor:
        """``tokens(normalise(x, layers), m, layers)`` of x [G, B, T, d] as the layers hold it (the exported
        forms'). A family whose stage 1 reads x through products overrides it with the normalisation moved
        onto them (``normalised_matmul``): no normalised copy of the states."""
        return self.tokens(self.normalise(x, layers), m, layers)

    def features_layers(
        self, layers: list[torch.Tensor], mask: torch.Tensor, block: int = 1, gains: list | None = None
    ) -> torch.Tensor:
        """``features(torch.stack(layers), mask)``, stage 1 one layer (or ``block`` layers) at a time: layers
        L+1 x [B, T, d]. ``gains``: per layer None (the state as it is) or a gain g [d] when the layer is
        given as the decoder's own RMS normalisation of its state, x / rms(x) * g (``check_gains``)."""
        if block > 1 and not self.blockable:
            raise ValueError(f"{type(self).__name__} runs stage 1 one layer at a time, not in blocks of {block}")
        gains, d = self.check_gains(gains), self.hidden_size
        m = mask.to(torch.float32)[None, :, :, None]  # [1, B, T, 1]
        v = []  # L+1 / G x [G, B, d]
        for one, part in self.blocks(layers, block):
            if all(g is None for g in gains[one]):  # one [G, B, T, d] copy of the block's states
                v.append(self.tokens_raw(stacked(part), m, one))
            else:  # the normalised layers where they are (one the decoder does not normalise: its own norm)
                xs = [x if g is not None else F.rms_norm(fp32(x), (d,), eps=RMS_EPS) for x, g in zip(part, gains[one])]
                v.append(self.tokens_normed(xs, block_gain(gains[one], d), m, one))
        return self.combine(torch.cat(v))  # [L+1, B, d] -> [B, d]

    def check_gains(self, gains: list | None) -> list:
        """``features_layers``' gains -> one entry per layer, None where a layer is given as it is. A gain
        replaces the probe's own RMS step (its eps aside: the decoder's), so a probe without one
        (input_norm="none") takes none."""
        if gains is None:
            return [None] * self.num_layers
        check_layer_count(gains, self.num_layers)
        if not self.reads_rms and any(g is not None for g in gains):
            raise ValueError("a probe with input_norm='none' reads the states as they are, not normalised ones")
        return list(gains)

    def tokens_normed(self, xs: list[torch.Tensor], gain: torch.Tensor, m: torch.Tensor, layers: slice) -> torch.Tensor:
        """``tokens_raw`` of G layers given as the decoder normalised them: xs G x [B, T, d], each
        norm(state) * gain, gain [G, d] (a constant in an export) -> [G, B, d]. This form stacks the layers
        and divides the gain out of every token; a family whose stage 1 reads the tokens through products
        overrides it with products of each layer where it is (no stacked copy) and the gain on its weights."""
        d = self.hidden_size
        x = torch.cat([fp32(t) for t in xs]).reshape(*self.lead(len(xs), m), d)  # [G, B, T, d]
        return self.tokens(self.standardise(x / gain[:, None, None], layers), m, layers)

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(states, mask))

    def forward_layers(
        self, layers: list[torch.Tensor], mask: torch.Tensor, block: int = 1, gains: list | None = None
    ) -> torch.Tensor:
        """``forward(torch.stack(layers), mask)`` on the L+1 layer tensors [B, T, d] (the exported form)."""
        return self.head(self.features_layers(layers, mask, block, gains))

    # --- streaming form: stage 1 as a recurrent state over the tokens folded in so far ---------------
    # A family streams by setting ``streamable`` and defining three hooks: ``state_shapes(batch)``,
    # ``fold(state, layers, m)`` (this pass's tokens into the state) and ``summaries(state)`` (the
    # stage-1 summaries v [L+1, B, d]); stage 2 and the head are recomputed from those every pass (a family
    # whose stage 2 can read its state without building the summaries overrides ``stream_logits`` instead:
    # the gate's and the MHA's).
    # ``fold_raw``: ``fold`` gets the layers as they are, not normalised (it normalises through
    # ``normalised_matmul``, which needs no normalised copy).

    streamable = False
    fold_raw = False

    def check_streamable(self) -> None:
        check_streamable(self)

    def stream_state_shapes(self, batch: int) -> list[tuple[str, tuple]]:
        """The state's (name, shape) pairs, layer-first, the batch on axis 1 of every tensor."""
        self.check_streamable()
        return self.state_shapes(batch)

    def stream_init(self, batch: int) -> list[torch.Tensor]:
        """The empty state (no token seen): running maxima at NEG, sums and counts at 0. Its summaries are 0
        (logits: stage 2 and the head on zeros), finite but meaningless; the label means something from
        the first folded-in token on."""
        device = self.head.weight.device
        return [
            torch.full(shape, NEG if name in ("max", "m") else 0.0, dtype=torch.float32, device=device)
            for name, shape in self.stream_state_shapes(batch)
        ]

    def stream_update(
        self, state: list[torch.Tensor], layers: list[torch.Tensor], mask: torch.Tensor, stacked: bool = False
    ):
        """Fold this pass's tokens into the state: layers L+1 x [B, T, d], mask [B, T] (1 = a response token
        to fold in; 0 = ignore it: prompt, padding, a finished row). A row masked out entirely keeps its
        state unchanged. -> the new state (the old one is not modified).

        ``stacked``: the decode pass's form, one token per row (T = 1): the same fold on one [L+1, B, d]
        copy of the layers (``fold_one``), a few ops over all layers instead of a few per layer, and no
        token axis (an exported graph runs ~30x fewer nodes); per layer, no copy is built (a long prefill)."""
        self.check_streamable()
        if len(state) != len(self.state_shapes(1)):
            raise ValueError(f"the state holds {len(self.state_shapes(1))} tensors, got {len(state)}")
        if not stacked:
            m = mask.to(torch.float32)[None, :, :, None]  # [1, B, T, 1]
            return self.fold(state, self.each_layer(layers, normalised=not self.fold_raw), m)
        if len(layers) != self.num_layers or layers[0].shape[1] != 1:
            raise ValueError(
                f"the stacked form folds one token per row of {self.num_layers} layers, not {len(layers)} "
                f"layers of {layers[0].shape[1]} tokens"
            )
        x = torch.cat(layers, 0).reshape(self.num_layers, -1, self.hidden_size)  # [(L+1)*B, 1, d] -> [L+1, B, d]
        if not self.fold_raw:
            x = self.normalise(x[:, :, None], EVERY)[:, :, 0]
        return self.fold_one(state, x, mask.to(torch.float32)[None])  # mask [1, B, 1]

    def fold_one(self, state: list[torch.Tensor], x: torch.Tensor, m: torch.Tensor) -> list[torch.Tensor]:
        """``fold`` of one token per row: x [L+1, B, d] (normalised unless ``fold_raw``), m [1, B, 1]. A family
        may override it with a form without the token axis (fewer ops in a decode pass)."""
        return self.fold(state, [(EVERY, x[:, :, None])], m[..., None])

    def stream_logits(self, state: list[torch.Tensor]) -> torch.Tensor:
        """[B, C'] of the tokens folded in so far: ``forward`` over the whole prefix, from the state."""
        self.check_streamable()
        return self.head(self.combine(self.summaries(state)))


class PoolingProbe(Probe):
    """A. Direct pooling: masked mean|max|topk over tokens, then mean|max over layers; head only.

    ``token_pool="topk"`` is the MultiMax-style evidence pooling (issue 18: max-style pooling over
    positions holds up under length shift where the mean dilutes, and several evidence tokens are
    steadier than one): every dimension of every layer is its own max-pooled evidence channel,
    averaged over its ``top_k`` strongest real tokens (``top_k=1`` is "max"). Best with
    ``input_norm="standard"`` (per-layer standardised inputs, so "large" means large for that
    dimension). Still parameter-free before the head."""

    def __init__(
        self,
        num_layers,
        hidden_size,
        num_classes,
        token_pool="mean",
        layer_pool="mean",
        input_norm="rms",
        top_k=4,
    ):
        super().__init__(num_layers, hidden_size, num_classes, input_norm)
        if token_pool not in TOKEN_POOLS or layer_pool not in POOLS:
            raise ValueError(f"token_pool must be one of {', '.join(TOKEN_POOLS)} and layer_pool 'mean' or 'max'")
        if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
            raise ValueError(f"top_k must be a positive integer, not {top_k!r}")
        self.token_pool, self.layer_pool, self.top_k = token_pool, layer_pool, top_k

    def tokens(self, x, m, layers):
        if self.token_pool == "topk":
            return masked_topk_mean(x, m, self.top_k)  # [G, B, d]
        pool = masked_mean if self.token_pool == "mean" else masked_max
        return pool(x, m, dim=2)  # [G, B, d]

    def tokens_raw(self, x, m, layers):
        if self.token_pool != "mean":
            return super().tokens_raw(x, m, layers)
        # the masked mean of the normalised tokens as one weighted sum of the tokens as they are: the weights
        # m_t * r_t (r = 1/rms) and, "standard", the per-layer affine map on the [G, B, d] result (the mean's
        # weights sum to 1 on a row with a token, 0 on one without); one pass over x for r and one product,
        # where normalising first wrote ~3 normalised copies of it (ONNX Runtime, SmolLM2's 31 layers of
        # 100 tokens alone: 2.5 -> 1.6 ms)
        x = fp32(x)
        mean = token_weights(m)[..., None]  # [1, B, T, 1]
        w = mean if self.input_norm == "none" else mean * inv_rms(x)  # [G, B, T, 1]
        v = (w.transpose(-1, -2) @ x).squeeze(-2)  # [G, B, 1, T] @ [G, B, T, d] -> [G, B, d]
        return self.standardise_mean(v, mean, layers)

    def standardise_mean(self, v, mean, layers):
        """The "standard" map of v [G, B, d], a weighted mean of RMS-normalised tokens with the token weights
        mean [1, B, T, 1] (summing to 1 on a row with a token, 0 on one without; other norms: v itself)."""
        if self.input_norm != "standard":
            return v
        inv_std = self.in_inv_std[layers, None]  # [G, 1, d]
        return v * inv_std - (self.in_mean[layers, None] * inv_std) * mean.sum(2)  # mean.sum(2) [1, B, 1]: 1 or 0

    def tokens_normed(self, xs, gain, m, layers):
        if self.token_pool != "mean":
            return super().tokens_normed(xs, gain, m, layers)
        # the decoder's normalised tokens norm(state) * gain: one weighted sum per layer where it is (a GEMV),
        # the gain divided out of the [G, B, d] result (no reduction over the tokens' width, no stacked copy)
        mean = token_weights(m)[..., None]  # [1, B, T, 1]
        w = mean[0].transpose(-1, -2)  # [B, 1, T]
        v = torch.cat([w @ fp32(x) for x in xs], 1).transpose(0, 1)  # G x [B, 1, d] -> [G, B, d]
        return self.standardise_mean(v / gain[:, None], mean, layers)

    def combine(self, v):
        if self.layer_pool == "mean":
            return layer_sum(v, self.num_layers, self.hidden_size) / self.num_layers  # [B, d]
        return v.amax(0)  # [B, d]

    @property
    def streamable(self):
        return self.token_pool in POOLS

    # Mean over tokens, mean over layers, then the head: a linear map of the tokens' normalised states, so
    # the state can be the head's running sum over them (one number per class and row, where a running sum
    # of every layer's tokens is [L+1, B, d]): logits = sum_t sum_l norm(x_lt) @ W^T / (L+1) / T + b.
    # A decode pass then runs one [L+1, B, d] x [d, C'] product (rms), a sum over the layers, and carries 2
    # small tensors.

    @property
    def linear(self) -> bool:
        return self.token_pool == "mean" and self.layer_pool == "mean"

    @property
    def fold_raw(self):  # the linear fold normalises through normalised_matmul
        return self.linear

    def state_shapes(self, batch):
        L1, d = self.num_layers, self.hidden_size
        if self.token_pool == "max":
            return [("max", (L1, batch, d))]  # running masked max
        if self.linear:  # the head's running sum over the tokens and layers folded in, tokens folded in
            return [("score", (1, batch, self.head.out_features)), ("count", (1, batch, 1))]
        return [("sum", (L1, batch, d)), ("count", (1, batch, 1))]  # running masked sum, tokens folded in

    def _scores(self, x, layers, fused: bool = False):
        """The head's share of each token: x [G, B, T, d] as the layers hold it -> [G, B*T, C'],
        norm(x) @ W^T / (L+1) (the layer mean's 1/(L+1) folded in)."""
        w = self.head.weight.T / self.num_layers  # [d, C']: one weight for every layer (rms)
        if self.input_norm == "standard":  # per-layer affine maps: one weight per layer (constants)
            w = torch.stack([w] * self.count(layers))  # [G, d, C']
        return self.normalised_matmul(x, w, layers, fused=fused)

    def fold_one(self, state, x, m):
        if not self.linear:
            return super().fold_one(state, x, m)
        score, count = state  # [1, B, C'], [1, B, 1]
        s = self._scores(x, EVERY, fused=True).sum(0, keepdim=True)  # [1, B, C']: x [L+1, B, d], one per row
        return [score + s * m, count + m]

    def fold(self, state, layers, m):
        if self.linear:
            score, count = state  # [1, B, C'], [1, B, 1]
            for one, x in layers:  # x [G, B, T, d] as the layers hold it
                lead = self.lead(self.count(one), m)  # [G, B, T]
                s = self._scores(x, one).reshape(*lead, self.head.out_features)  # [G, B, T, C']
                score = score + (s * m).sum((0, 2))[None]  # m [1, B, T, 1]
            return [score, count + m.sum(2)]
        if self.token_pool == "max":
            (run,) = state  # [L+1, B, d]
            return [joined([torch.maximum(rows(run, one), masked_max(x, m, dim=2)) for one, x in layers])]
        total, count = state  # [L+1, B, d], [1, B, 1]
        return [joined([rows(total, one) + (x * m).sum(2) for one, x in layers]), count + m.sum(2)]

    def summaries(self, state):
        if self.token_pool == "max":
            run = state[0]  # [L+1, B, d]
            return torch.where(run > NEG / 2, run, torch.zeros_like(run))  # no token yet: 0, not NEG
        total, count = state
        return total / count.clamp_min(1.0)  # [L+1, B, d]; no token yet: 0

    def stream_logits(self, state):
        if not self.linear:
            return super().stream_logits(state)
        self.check_streamable()
        score, count = state  # [1, B, C'], [1, B, 1]
        # [B, C'] with a constant width (a Python int), so the exported logits are not [B, <symbolic>]
        logits = (score / count.clamp_min(1.0)).reshape(-1, self.head.out_features)
        return logits + self.head.bias  # no token yet: the bias, head(0)


POOLS = ("mean", "max")
# "topk" is a constructor choice (--set token_pool=topk [top_k=N]), not a search draw: adding it to
# the draws would change every seeded pooling search (a RECIPE bump for the stored benchmarks).
TOKEN_POOLS = (*POOLS, "topk")
POOLING = Family(
    "pooling",
    input="hidden_states",
    head_only=True,
    build=PoolingProbe,
    default_params=lambda d: {"token_pool": "mean", "layer_pool": "mean"},
    sample_params=lambda d, rng: {"token_pool": str(rng.choice(POOLS)), "layer_pool": str(rng.choice(POOLS))},
)


# A gate token's softmax weight exp(tanh(.)) is at least 1/e: a streaming denominator below this has no token
GATE_MIN_WEIGHT = 0.25


class GateProbe(Probe):
    """B. Scoring-attention gate: score_i = tanh(w . x_i), masked softmax, weighted sum.

    One gate vector per layer (stage 1) and one across layers (stage 2): (L+2)*d + head.
    """

    def __init__(self, num_layers, hidden_size, num_classes, input_norm="rms"):
        super().__init__(num_layers, hidden_size, num_classes, input_norm)
        self.token_gates = nn.Parameter(torch.randn(num_layers, hidden_size) / math.sqrt(hidden_size))  # [L+1, d]
        self.layer_gate = nn.Parameter(torch.randn(hidden_size) / math.sqrt(hidden_size))  # [d]

    def scores(self, x, m, layers):
        """x [G, B, T, d], m [1, B, T, 1] -> the masked token scores tanh(w . x) [G, B, T] (NEG: padding)."""
        # one GEMV per layer over its B*T tokens: ONNX Runtime's CPU Einsum costs ~5x more on a decode
        # pass, and a MatMul broadcast over [G, B] runs G*B tiny products
        G, d = self.count(layers), self.hidden_size
        scores = x.reshape(G, -1, d) @ self.token_gates[layers][:, :, None]  # [G, B*T, 1]
        return torch.tanh(scores.reshape(self.lead(G, m))).masked_fill(m[..., 0] == 0, NEG)  # [G, B, T]

    def tokens(self, x, m, layers):
        alpha = torch.softmax(self.scores(x, m, layers), dim=-1)  # [G, B, T]
        return (alpha.unsqueeze(-2) @ x).squeeze(-2)  # [G, B, d] (bmm: no permuted copy)

    def tokens_raw(self, x, m, layers):
        # sum_t alpha_t norm(x_t) = inv_std * sum_t (alpha_t r_t) x_t - mean * inv_std, as the weights sum to 1
        G, d = self.count(layers), self.hidden_size
        x = fp32(x)
        x3 = x.reshape(G, -1, d)  # [G, B*T, d]
        # ReduceL2 here: on a prompt's many rows the product form's GEMV ran 0.56 or 1.26 ms by process (48 tokens)
        r = inv_rms(x3) if self.input_norm != "none" else None  # [G, B*T, 1]
        s = self.normalised_matmul(x3, self.token_gates[layers][:, :, None], layers, r)  # [G, B*T, 1]
        s = torch.tanh(s.reshape(self.lead(G, m))).masked_fill(m[..., 0] == 0, NEG)  # [G, B, T]
        alpha = torch.softmax(s, dim=-1)
        w = alpha if r is None else alpha * r.reshape(self.lead(G, m))
        v = (w.unsqueeze(-2) @ x).squeeze(-2)  # [G, B, d]: the weighted sum of the tokens as they are
        return self.standardise_sum(v, layers)

    def standardise_sum(self, v, layers):
        """The "standard" map of v [G, B, d], a softmax-weighted sum of RMS-normalised tokens (else v)."""
        if self.input_norm != "standard":
            return v
        return v * self.in_inv_std[layers, None] - (self.in_mean * self.in_inv_std)[layers, None]

    def tokens_normed(self, xs, gain, m, layers):
        # the decoder's normalised tokens norm(state) * gain, each layer where it is: its scores and its weighted
        # sum one GEMV each, 1 / gain on the gate weights and on the [G, B, d] result (no scale per token, no
        # stacked copy); the G layers' scores [B, G, T] share the small ops
        w, shift = self.normalised_weights(self.token_gates[layers][:, :, None], layers, gain)  # [G, d, 1], [G, 1, 1]
        s = torch.cat([fp32(x) @ w[i] for i, x in enumerate(xs)], -1).transpose(1, 2)  # [B, T, G] -> [B, G, T]
        if shift is not None:
            s = s - shift[:, 0, 0, None]
        keys = m[0].transpose(1, 2)  # [B, 1, T]
        alpha = torch.softmax(torch.tanh(s).masked_fill(keys == 0, NEG), dim=-1)  # [B, G, T]
        a = alpha.split(1, dim=1)  # G x [B, 1, T]
        v = torch.cat([a[i] @ fp32(x) for i, x in enumerate(xs)], 1).transpose(0, 1)  # G x [B, 1, d] -> [G, B, d]
        return self.standardise_sum(v / gain[:, None], layers)

    # Streaming: stage 2's scores and the head are linear in each layer's summary (a weighted mean of the
    # normalised tokens), so the state carries, per layer, the weighted sums of each token's readout
    # z = norm(x) @ [layer_gate | head weights] [1 + C'] instead of the d-wide sum itself: one GEMM of the
    # pass's tokens with [token gate | readout] weights (the normalisation folded in: normalised_matmul)
    # gives both the token's score and its readout, and the state stays [L+1, B, 1 + C'].
    # The token scores are tanh-bounded, so the softmax needs no running maximum: a token's weight is
    # exp(s) in [1/e, e], and the state is the plain sums l = sum exp(s) and acc = sum exp(s) z (no
    # rescaling of what was folded in: a decode pass folds with 8 ops, where the online softmax took 18).
    streamable = True
    fold_raw = True

    def state_shapes(self, batch):
        L1, k = self.num_layers, 1 + self.head.out_features
        # per layer: the softmax's denominator sum exp(s) and numerator sum exp(s) z
        return [("l", (L1, batch, 1)), ("acc", (L1, batch, k))]

    def fold_weights(self, layers) -> torch.Tensor:
        """The layers' [token gate | stage-2 gate | head weights^T] [G, d, 2 + C']: a token's product with its
        layer's gives its score (before tanh), then its readout (weights only: constant in an export)."""
        G = self.count(layers)
        readout = torch.cat([self.layer_gate[:, None], self.head.weight.T], 1)  # [d, 1 + C']
        # a stack, not expand or repeat: the TorchScript exporter writes those as shape arithmetic (ConstantOfShape,
        # Where, Expand) that the constant folder leaves, so every decode pass rebuilt these weights
        return torch.cat([self.token_gates[layers][:, :, None], torch.stack([readout] * G)], -1)

    @staticmethod
    def token_weight(z, m):
        """A token's weight in its layer's softmax sums, exp(tanh(score)) (no running maximum: in [1/e, e]), from
        its z [..., 2 + C'] (``fold_weights``' product, score first), times m (0: not folded in) -> [..., 1]."""
        return torch.exp(torch.tanh(z[..., :1])) * m

    def _fold_z(self, x, layers, fused: bool = False):
        """x [G, N, d] as the layers hold it -> [G, N, 2 + C']: each token's score (before tanh), then its readout
        (``fused``: see ``normalised_matmul``)."""
        return self.normalised_matmul(x, self.fold_weights(layers), layers, fused=fused)  # [G, N, 2 + C']

    def fold(self, state, layers, m):
        denom, acc = state  # [L+1, B, 1], [L+1, B, 1 + C']
        out = []
        for one, x in layers:  # x [G, B, T, d] as the layers hold it (G = 1: per layer; decode passes: fold_one)
            G, d = self.count(one), self.hidden_size
            z = self._fold_z(x.reshape(G, -1, d), one)  # [G, B*T, 2 + C']
            z = z.reshape(*self.lead(G, m), 2 + self.head.out_features)  # [G, B, T, 2 + C']
            p = self.token_weight(z, m)  # [G, B, T, 1]: the tokens' weights (0: not folded in)
            out.append((rows(denom, one) + p.sum(2), rows(acc, one) + (p * z[..., 1:]).sum(2)))
        return [joined(t) for t in zip(*out)]

    def forward_layers(self, layers, mask, block=1, gains=None):
        """``forward`` on the L+1 layer tensors [B, T, d] (the exported prompt form) through the streaming form's
        readout: the whole pass folded into a zero state, then ``stream_logits``. Each layer's tokens are read
        once, by one product with its [token gate | stage-2 gate | head] weights (the normalisation, and a
        gain, on the weights), where the summaries' form reads them twice (its scores, then its weighted sum)
        and builds [L+1, B, d] summaries that only the stage-2 gate and the head read. Stage 1 of a block of
        layers is their products side by side; the softmax sums run once, on every layer's readouts (a
        few numbers per token and layer). A row without a real token reads as the stream's (the bias)."""
        gains, d, k = self.check_gains(gains), self.hidden_size, 2 + self.head.out_features
        zs, shifts = [], []
        for one, part in self.blocks(layers, block):
            ys = []
            for i, x, g in zip(range(one.start, one.stop), part, gains[one]):
                x = fp32(x)  # [B, T, d]
                if g is None and self.reads_rms:  # a layer the decoder does not normalise (or no gains at all)
                    x = F.rms_norm(x, (d,), eps=RMS_EPS)
                layer = slice(i, i + 1)
                w, shift = self.normalised_weights(  # [1, d, k]
                    self.fold_weights(layer), layer, None if g is None else block_gain([g], d)
                )
                ys.append(x @ w[0])  # [B, T, k]
                shifts.append(shift)
            # the block's stage 1, its one output: [B, T, G*k] -> [B, T, G, k] (B from the mask: computed once)
            zs.append(torch.cat(ys, -1).reshape(mask.shape[0], -1, len(part), k))
        z = torch.cat(zs, 2)  # [B, T, L+1, k]
        if shifts[0] is not None:
            z = z - torch.cat(shifts)[:, 0]  # the "standard" map's constant part [L+1, k] (weights only)
        keep = mask.to(torch.float32)[:, :, None, None]  # [B, T, 1, 1]
        p = self.token_weight(z, keep)  # [B, T, L+1, 1]: the tokens' weights (padding: 0)
        state = [p.sum(1), (p * z[..., 1:]).sum(1)]  # [B, L+1, 1], [B, L+1, 1 + C']: stream_state's sums
        logits = self.stream_logits([t.transpose(0, 1) for t in state])
        return logits.reshape(-1, self.head.out_features)  # [B, C']: C' known to an export's shape inference

    def fold_one(self, state, x, m):
        denom, acc = state  # [L+1, B, 1], [L+1, B, 1 + C']
        z = self._fold_z(x, EVERY, fused=True)  # [L+1, B, 2 + C']: x [L+1, B, d], one token per row
        p = self.token_weight(z, m)  # [L+1, B, 1]: the token's weight (0: not folded in)
        return [denom + p, acc + p * z[..., 1:]]

    def stream_logits(self, state):
        """``head(combine(summaries))`` from the summaries' readouts: stage 2 weighs each layer by softmax over
        layers of tanh(its readout's first column), and the head of the weighted sum is the weighted sum of the
        readouts' head columns. A layer no token reached reads 0 (its summary is 0)."""
        self.check_streamable()
        denom, acc = state  # [L+1, B, 1], [L+1, B, 1 + C']
        z = acc / denom.clamp_min(GATE_MIN_WEIGHT)  # [L+1, B, 1 + C']: each summary's readout (0: no token yet)
        beta = torch.softmax(torch.tanh(z[..., :1]), dim=0)  # [L+1, B, 1]
        return (beta * z[..., 1:]).sum(0) + self.head.bias  # [B, C']

    def beta(self, v):
        """Stage-2 weights of the layer summaries v [L+1, B, d] -> [L+1, B]."""
        s = v.reshape(-1, self.hidden_size) @ self.layer_gate[:, None]  # [(L+1)*B, 1]: one GEMV
        return torch.softmax(torch.tanh(s.reshape(self.num_layers, -1)), dim=0)

    def combine(self, v):
        return layer_sum(self.beta(v)[..., None] * v, self.num_layers, self.hidden_size)  # [B, d]

    def layer_weights(self, states, mask) -> torch.Tensor:
        """Stage-2 weights over the L+1 layers [B, L+1] (the paper's interpretability plot)."""
        states, m = self.prepare(states, mask)
        return self.beta(self.tokens(states, m, slice(0, self.num_layers))).T


# Standardised inputs are the trainer's default (set_input_statistics); the search varies the optimiser only.
GATE = Family(
    "gate",
    input="hidden_states",
    head_only=False,
    build=GateProbe,
    default_params=lambda d: {"input_norm": "standard"},
    layer_weights=True,
)


class MHAProbe(Probe):
    """C. Downcast multi-head attention: d -> d_inner = d/factor, H heads of width dh = d_inner/H,
    out-proj d_inner -> d. L+1 stage-1 modules over each layer's tokens + 1 stage-2 module over the
    layer summaries. ``query`` picks stage 1:

    ``query="tokens"`` (the paper's, the default): self-attention, every token attends to every other,
    then masked mean|max pooling (``pool``) over the tokens; stage 2 likewise over the L+1 summaries.
    No streaming form (a new token changes every other token's output). Parameters: w_qkv [L+2, d,
    3*d_inner], b_qkv [L+2, 3*d_inner], w_o [L+2, d_inner, d], b_o [L+2, d]:
    weights (L+2) * 4 * d * d_inner; biases (L+2) * (3 * d_inner + d); plus the head.

    ``query="learned"``: stage 1 is multi-head attention POOLING with one learned query per head per
    layer: head h of layer l weighs token t by softmax_t(q_lh . k_t / sqrt(dh)) with k_t, v_t = x_t W_k,
    x_t W_v (per head), so a token's score does not depend on the other tokens; the head's output is the
    softmax-weighted average of its values, then the output projection (+ b_o) gives v(l) [B, d]. No
    token pooling in stage 1 (the attention pools); ``pool`` applies to stage 2 only, which stays the
    self-attention above over the L+1 summaries (recomputed from them every pass). It streams: per layer
    and head an online softmax (``stream_*``: running max score m [L+1, B, H], denominator l [L+1, B, H],
    weighted value sum acc [L+1, B, H, dh]). Parameters: queries [L+1, H, dh] and w_kv [L+1, d, 2*d_inner]
    (k then v, each split into H heads of dh like w_qkv; no k, v biases: a key bias shifts every score
    of a head alike, softmax ignores it, and a value bias passes through the average and the output
    projection into b_o); stage 2's w_qkv [1, d, 3*d_inner], b_qkv [1, 3*d_inner]; w_o [L+2, d_inner, d],
    b_o [L+2, d] (index L+1: stage 2) as above:
    weights (L+1) * 3 * d * d_inner + 4 * d * d_inner; queries (L+1) * d_inner; biases 3 * d_inner
    + (L+2) * d; plus the head: (L+1) * (d + 2) * d_inner fewer than "tokens" (no query projections, and
    (L+1) * d_inner queries in place of (L+1) * 3 * d_inner stage-1 q, k, v biases).

    ``query`` is a constructor choice (``--set query=learned``), not a search draw (see TOKEN_POOLS).
    """

    blockable = False  # its per-layer attention activations would grow with the block

    def __init__(
        self, num_layers, hidden_size, num_classes, factor=32, heads=8, pool="mean", input_norm="rms", query="tokens"
    ):
        super().__init__(num_layers, hidden_size, num_classes, input_norm)
        d_inner = hidden_size // factor
        if d_inner * factor != hidden_size or d_inner % heads:
            raise ValueError(
                f"d={hidden_size} / factor={factor} = {hidden_size / factor} must be an integer "
                f"divisible by heads={heads}"
            )
        if pool not in ("mean", "max"):
            raise ValueError("pool must be 'mean' or 'max'")
        if query not in MHA_QUERIES:
            raise ValueError(f"query must be one of {', '.join(MHA_QUERIES)}, not {query!r}")
        self.factor, self.heads, self.pool, self.d_inner, self.query = factor, heads, pool, d_inner, query
        n = num_layers + 1  # L+1 stage-1 modules + 1 stage-2 module, stacked on dim 0
        std = 1 / math.sqrt(hidden_size)
        if query == "learned":
            dh = d_inner // heads
            # q . k / sqrt(dh) starts at unit scale, like a token query x W_q of a normalised token
            self.queries = nn.Parameter(torch.randn(num_layers, heads, dh))  # [L+1, H, dh]
            self.w_kv = nn.Parameter(torch.randn(num_layers, hidden_size, 2 * d_inner) * std)  # [L+1, d, 2*d_inner]
            n_qkv = 1  # stage 2 only
        else:
            n_qkv = n
        self.w_qkv = nn.Parameter(torch.randn(n_qkv, hidden_size, 3 * d_inner) * std)  # [L+2 | 1, d, 3*d_inner]
        self.b_qkv = nn.Parameter(torch.zeros(n_qkv, 3 * d_inner))
        self.w_o = nn.Parameter(torch.randn(n, d_inner, hidden_size) / math.sqrt(d_inner))  # [L+2, d_inner, d]
        self.b_o = nn.Parameter(torch.zeros(n, hidden_size))

    def attend(self, x, m, modules: slice):
        """Self-attention: x [G, B, T, d], m [1, B, T, 1] -> pooled [G, B, d]: the G stacked modules ``modules``,
        each over its own tokens. Weights are reshaped per head (constants in an export, so one module's graph
        has no shape arithmetic); G = 1 (a layer of the per-layer form, or stage 2) attends in 4-D directly.
        ``m=None``: every token is real (stage 2's layer summaries: no mask ops in an export)."""
        G, d = self.count(modules), self.hidden_size
        qkv = modules if self.query == "tokens" else slice(0, 1)  # "learned": only stage 2 self-attends
        # one GEMM per module over its B*T tokens (ONNX Runtime's CPU Einsum is several times slower)
        qkv_ = x.reshape(G, -1, d) @ self.w_qkv[qkv] + self.b_qkv[qkv, None]  # [G, B*T, 3*d_inner]
        return self.attend_qkv(qkv_.reshape(*self.lead(G, m), 3 * self.d_inner), m, modules)

    def attend_qkv(self, qkv_, m, modules: slice):
        """``attend`` from the modules' projected queries, keys and values qkv_ [G, B, T, 3*d_inner]."""
        G, H, dh = self.count(modules), self.heads, self.d_inner // self.heads
        keys = None if m is None else key_mask(m)  # [1, B, 1, 1, T]
        # softmax(q k^T / sqrt(dh) + mask) v; the fused kernel never builds the [G*B, H, T, T] scores
        # (measured 2.1x faster forward+backward on CPU at d_inner 18, 6 heads); every row has a real key.
        # Its CPU kernels take 4-D inputs only: G > 1 modules attend with modules x batch as one axis.
        if G == 1:  # without the module axis: one layer (``features_layers`` of pool=max), or stage 2
            qkv_ = qkv_.reshape(*self.lead(G, m)[1:], 3, H, dh).permute(2, 0, 3, 1, 4)  # [3, B, H, T, dh]
            q, k, v = qkv_.unbind(0)  # 3 x [B, H, T, dh]
            mask = None if keys is None else keys[0]
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=dh**-0.5)[None]
        else:
            qkv_ = qkv_.reshape(*self.lead(G, m), 3, H, dh).permute(3, 0, 1, 4, 2, 5)  # [3, G, B, H, T, dh]
            q, k, v, keys = (t.expand(G, *t.shape[1:]).flatten(0, 1) for t in (*qkv_.unbind(0), keys))  # [G*B, ...]
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=keys, scale=dh**-0.5).unflatten(0, (G, -1))
        if self.pool == "mean":  # o [G, B, H, T, dh]
            # The output projection is linear, so mean-pool first and project the pooled [G, B, H, dh]:
            # the same function as projecting every token, without the [G, B, T, d] tensor.
            if m is None:
                pooled = o.mean(3)  # [G, B, H, dh]
            elif G == 1:  # one product with the mean's token weights [1, B, 1, 1, T] (the same for every layer)
                pooled = (token_weights(m)[:, :, None, None] @ o).squeeze(3)  # [1, B, H, dh]
            else:
                pooled = masked_mean(o, m[:, :, None], dim=3)  # [G, B, H, dh]
            return self.project(pooled, modules)  # [G, B, d]
        o = o.transpose(2, 3).flatten(3) @ self.w_o[modules, None] + self.b_o[modules, None, None]  # [G, B, T, d]
        return o.amax(2) if m is None else masked_max(o, m, dim=2)  # [G, B, d]

    # --- the per-layer form of query="tokens" with mean pooling (the exported prompt probe) ----------------
    # Per layer 5 ops in a TorchScript export: RMS-normalise, one projection to q, k, v, one addition (the same tensor
    # for every layer), the attention (``HeadAttention``: opset 23's Attention, one kernel over the heads; the dynamo
    # exporter writes its decomposition) and a Split; ``attend`` on one layer ~31. The biases and the padding mask are
    # moved out of the layers: a key bias adds q . b_k to every score of a query alike (softmax ignores it); a query
    # bias adds b_q . k_j to every score of key j, a linear function of the token, x_j . (W_k b_q), which rides in one
    # more key component per head against a query component that is 1, as the mask does (0 for a real key, NEG for
    # padding): q' . k' = q . k + b_q . k + mask; a value bias passes through the attention's average and the token
    # mean (weights summing to 1: on a row with a real token, which every row the runtime feeds has) into the output
    # projection's bias. What each layer adds is then [0.., 1 | 0.., mask | 0..], the same tensor for every layer. The
    # token mean and the output projection are linear, so they run once on the L+1 layers' outputs.

    def layer_qkv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage 1's q, k, v projection of RMS-normalised tokens: w [L+1, d, 2*H*(dh+1) + d_inner] (q and k
        widened by one component per head: q's 0, k's x . (W_k b_q)), with the "standard" affine map
        (x - mean) * inv_std and the queries' 1/sqrt(dh) folded in, and b_v [L+1, d_inner], the value bias
        (weights only: constant in an export)."""
        L1, di, H = self.num_layers, self.d_inner, self.heads
        w, b = self.w_qkv[:L1], self.b_qkv[:L1]
        if self.input_norm == "standard":
            b = b - ((self.in_mean * self.in_inv_std)[:, None] @ w)[:, 0]  # [L+1, 3*d_inner]
            w = self.in_inv_std[..., None] * w  # [L+1, d, 3*d_inner]
        s = (di // H) ** -0.5
        wq, wk, wv = w[..., :di] * s, w[..., di : 2 * di], w[..., 2 * di :]  # slices, which constant-fold
        bq = b[:, :di] * s
        heads = lambda t: t.unflatten(-1, (H, -1))  # noqa: E731  [..., H*dh] -> [..., H, dh]
        wkb = (heads(wk) * heads(bq)[:, None]).sum(-1, keepdim=True)  # [L+1, d, H, 1]: W_k b_q per head
        q = torch.cat([heads(wq), torch.zeros_like(wkb)], -1).flatten(-2)  # [L+1, d, H*(dh+1)]
        k = torch.cat([heads(wk), wkb], -1).flatten(-2)
        return torch.cat([q, k, wv], -1), b[:, 2 * di :]

    def layer_addend(self, m: torch.Tensor) -> torch.Tensor:
        """What every layer adds to its projection: m [1, B, T, 1] -> [B, T, 2*H*(dh+1) + d_inner], 0 but at
        each head's last q component (1) and last k component (NEG for a padded key)."""
        H, dh, di = self.heads, self.d_inner // self.heads, self.d_inner
        one = m.new_tensor(([0.0] * dh + [1.0]) * H)  # [H*(dh+1)]: constants (m's device)
        q = torch.cat([one, m.new_zeros(H * (dh + 1) + di)])
        k = torch.cat([m.new_zeros(H * (dh + 1)), one, m.new_zeros(di)])
        return q + (m[0] - 1.0) * -NEG * k  # [B, T, 1] * [...]

    def layer_heads(self, x, addend, w, gain=None) -> torch.Tensor:
        """One layer's attention: x [B, T, d] as the layer holds it, addend (``layer_addend``), w
        (``layer_qkv``) -> the heads' outputs [B, T, d_inner] (without the value bias). ``gain`` [d]: x is
        the decoder's normalisation of the layer, norm(state) * gain (1 / gain folds into w)."""
        x = fp32(x)
        if gain is not None:
            w = w / torch.as_tensor(gain, dtype=torch.float32)[:, None]  # [d, n]
        elif self.input_norm != "none":
            x = F.rms_norm(x, (self.hidden_size,), eps=RMS_EPS)  # [B, T, d]: one op (opset 23's RMSNormalization)
        qk = self.heads * (self.d_inner // self.heads + 1)  # a Python int: no shape arithmetic in the graph
        # w[None]: a [1, d, n] weight, which ONNX Runtime's MatMul reads as it is in the mapped file, where
        # it would keep a packed copy of a [d, n] one as well (measured: the MHA artifact's peak 307 -> 301 MiB)
        q, k, v = (x @ w[None] + addend).split([qk, qk, self.d_inner], -1)  # [B, T, H*(dh+1)] x 2, [B, T, d_inner]
        attend = HeadAttention.apply if torch.onnx.is_in_onnx_export() else head_attention
        return attend(q, k, v, self.heads)

    def features_layers(self, layers, mask, block: int = 1, gains=None):
        if self.query != "tokens" or self.pool != "mean" or block > 1:
            return super().features_layers(layers, mask, block, gains)
        self.check_layers(layers)
        gains = self.check_gains(gains)  # per layer: None (normalised here) or the decoder's gain
        L1, di = self.num_layers, self.d_inner
        m = mask.to(torch.float32)[None, :, :, None]  # [1, B, T, 1]
        addend, tok = self.layer_addend(m), token_weights(m)[0, :, None]  # [B, T, ...], [B, 1, T]
        w, b_v = self.layer_qkv()
        o = [self.layer_heads(x, addend, w[i], gains[i]) for i, x in enumerate(layers)]
        o = torch.cat(o, -1)  # [B, T, (L+1)*d_inner]
        o = (tok @ o).reshape(-1, L1, di).transpose(0, 1)  # token means [L+1, B, d_inner]
        b_o = self.b_o[:L1] + (b_v[:, None] @ self.w_o[:L1])[:, 0]  # [L+1, d]: the value bias through w_o
        return self.combine(o @ self.w_o[:L1] + b_o[:, None])  # summaries [L+1, B, d] -> [B, d]

    # --- query="learned": attention pooling with a learned query per head and layer ---------------------
    # q . k_t = q . (x_t W_k) = x_t . (W_k q): the scores read x through one d-vector per head (like the
    # gate's), and the weighted average of the values is the weighted average of x projected by W_v, so
    # training never builds [B, T, d_inner] keys or values (the streaming fold builds the values of
    # this pass's tokens: one GEMM, where a decode pass's T = 1 would make ``values`` G*H tiny products).

    def score_weights(self, layers):
        """-> u [G, d, H]: a token x's scores q . k / sqrt(dh) are x @ u (weights only: constant-folded)."""
        G, H, dh, d = self.count(layers), self.heads, self.d_inner // self.heads, self.hidden_size
        w_k = self.w_kv[layers, :, : self.d_inner].reshape(G, d, H, dh)  # [G, d, H, dh]
        return (w_k * self.queries[layers][:, None]).sum(-1) * dh**-0.5  # [G, d, H]

    def scores(self, x, m, layers):
        """x [G, B, T, d], m [1, B, T, 1] -> the masked scores q . k_t / sqrt(dh) [G, B, H, T] (NEG: padding)."""
        G, H, d = self.count(layers), self.heads, self.hidden_size
        s = (x.reshape(G, -1, d) @ self.score_weights(layers)).reshape(*self.lead(G, m), H)  # [G, B, T, H]
        return s.transpose(2, 3).masked_fill(m[..., 0][:, :, None] == 0, NEG)  # [G, B, H, T]

    def values(self, xs, layers):
        """xs [G, B, H, d] (per head, a weighted sum of tokens x) -> the same sum of values [G, B, H, dh]."""
        G, H, dh, d = self.count(layers), self.heads, self.d_inner // self.heads, self.hidden_size
        w_v = self.w_kv[layers, :, self.d_inner :].reshape(G, d, H, dh).transpose(1, 2)  # [G, H, d, dh]
        return (xs.transpose(1, 2) @ w_v).transpose(1, 2)  # [G, H, B, dh] -> [G, B, H, dh]

    def project(self, o, layers):
        """The heads' outputs o [G, B, H, dh] -> v [G, B, d] (output projection + bias): one GEMM per module."""
        # a constant target shape (-1 for B), where flatten(2) exports as shape arithmetic (~4 ops)
        o = o.reshape(self.count(layers), -1, self.d_inner)  # [G, B, d_inner]
        return o @ self.w_o[layers] + self.b_o[layers, None]  # [G, B, d_inner] @ [G, d_inner, d]

    def tokens_raw(self, x, m, layers):
        if self.query != "tokens":
            return super().tokens_raw(x, m, layers)
        # attend's projection from the tokens as they are: normalised_matmul folds the normalisation in
        qkv_ = self.normalised_matmul(x, self.w_qkv[layers], layers) + self.b_qkv[layers, None]  # [G, B*T, 3*d_inner]
        return self.attend_qkv(qkv_.reshape(*self.lead(self.count(layers), m), 3 * self.d_inner), m, layers)

    def tokens(self, x, m, layers):  # the stage-1 modules of these layers, each over its layer's tokens
        if self.query == "tokens":
            return self.attend(x, m, layers)
        alpha = torch.softmax(self.scores(x, m, layers), dim=-1)  # [G, B, H, T]
        return self.project(self.values(alpha @ x, layers), layers)  # alpha @ x: [G, B, H, d]

    def combine(self, v):
        s = v.transpose(0, 1)[None]  # [1, B, L+1, d]: stage 2 attends over layer summaries, all real
        return self.attend(s, None, slice(self.num_layers, self.num_layers + 1))[0]

    @property
    def streamable(self):
        return self.query == "learned"

    def state_shapes(self, batch):
        L1, H = self.num_layers, self.heads
        # per layer and head an online softmax: running max score, denominator, weighted value sum
        return [("m", (L1, batch, H)), ("l", (L1, batch, H)), ("acc", (L1, batch, H, self.d_inner // H))]

    fold_raw = True  # the fold normalises through normalised_matmul

    def fold(self, state, layers, m):
        run_max, denom, acc = state  # [L+1, B, H], [L+1, B, H], [L+1, B, H, dh]
        H, dh = self.heads, self.d_inner // self.heads
        out = []
        for one, x in layers:  # x [G, B, T, d] as the layers hold it (G = 1: per layer; decode passes: fold_one)
            # the scores and the values of this pass's tokens from one GEMM per layer: [G, B*T, H + d_inner]
            w = torch.cat([self.score_weights(one), self.w_kv[one, :, self.d_inner :]], -1)  # [G, d, H + d_inner]
            lead = self.lead(self.count(one), m)  # [G, B, T]
            z = self.normalised_matmul(x, w, one).reshape(*lead, H + self.d_inner)  # [G, B, T, H + d_inner]
            s = z[..., :H].transpose(2, 3).masked_fill(m[..., 0][:, :, None] == 0, NEG)  # [G, B, H, T]
            values = z[..., H:].reshape(*lead, H, dh)  # [G, B, T, H, dh]
            new_max, scale, p = softmax_fold(rows(run_max, one), s, m[..., 0][:, :, None])  # p [G, B, H, T]
            v_sum = (p.transpose(2, 3)[..., None] * values).sum(2)  # [G, B, H, dh]
            out.append((new_max, rows(denom, one) * scale + p.sum(-1), rows(acc, one) * scale[..., None] + v_sum))
        return [joined(t) for t in zip(*out)]

    def fold_one(self, state, x, m):
        run_max, denom, acc = state  # [L+1, B, H], [L+1, B, H], [L+1, B, H, dh]
        H, dh = self.heads, self.d_inner // self.heads
        w = torch.cat([self.score_weights(EVERY), self.w_kv[:, :, self.d_inner :]], -1)  # [L+1, d, H + d_inner]
        z = self.normalised_matmul(x, w, EVERY, fused=True)  # [L+1, B, H + d_inner]: x [L+1, B, d], one per row
        s = z[..., :H].masked_fill(m == 0, NEG)  # [L+1, B, H]
        new_max, scale, p = softmax_fold_one(run_max, s, m)  # p [L+1, B, H]: the token's weight (0: not folded in)
        values = z[..., H:].reshape(self.num_layers, -1, H, dh)  # [L+1, B, H, dh]
        return [new_max, denom * scale + p, acc * scale[..., None] + p[..., None] * values]

    def stream_logits(self, state):
        """``head(combine(summaries))`` without the [L+1, B, d] summaries. A layer's summary is its heads'
        outputs o (with a last 1 while a token has been seen) times the output projection w (with the bias
        as its last row): 0, not b_o, for a layer no token reached yet. Stage 2's first step is a linear map
        of the summaries (qkv = v @ w_qkv + b_qkv), so it reads o through the product of the two weights,
        [L+1, d_inner + 1, 3*d_inner] (constant-folded). With mean pooling, the attention is one node and the
        output projection and the head one product (the decode form of ``benchmarks/results/response.md``'s
        streaming MHA: 59 -> 44 nodes)."""
        self.check_streamable()
        _, denom, acc = state  # [L+1, B, H], [L+1, B, H], [L+1, B, H, dh]
        L1 = self.num_layers
        seen = (denom[..., :1] > 0).to(acc.dtype)  # [L+1, B, 1]: l >= 1 once a token is seen (exp(0) at the max)
        o = (acc / denom.clamp_min(1.0)[..., None]).reshape(L1, -1, self.d_inner)  # [L+1, B, d_inner]
        o = torch.cat([o, seen], -1)  # [L+1, B, d_inner + 1]
        w = torch.cat([self.w_o[:L1], self.b_o[:L1, None]], 1)  # [L+1, d_inner + 1, d]
        if self.pool != "mean":
            qkv_ = (o @ (w @ self.w_qkv[0])).transpose(0, 1)[None] + self.b_qkv[0]  # [1, B, L+1, 3*d_inner]
            return self.head(self.attend_qkv(qkv_, None, slice(self.num_layers, self.num_layers + 1))[0])
        # mean pooling: the same function in fewer exported ops (every decode pass runs it). The queries'
        # 1/sqrt(dh) rides in their weights; one Attention node over the heads (opset 23; HeadAttention);
        # the mean over the L+1 queries, then stage 2's output projection and the head as one linear map
        # (both are linear): pooled @ (w_o @ W_head^T) + (b_o @ W_head^T + b_head).
        di, s = self.d_inner, (self.d_inner // self.heads) ** -0.5
        scale = torch.cat([torch.full((di,), s), torch.ones(2 * di)]).to(acc)  # [3*d_inner]: q's columns
        qkv = (o @ (w @ self.w_qkv[0] * scale)).transpose(0, 1) + self.b_qkv[0] * scale  # [B, L+1, 3*d_inner]
        q, k, v = qkv.split(di, -1)  # 3 x [B, L+1, d_inner]
        attend = HeadAttention.apply if torch.onnx.is_in_onnx_export() else head_attention
        pooled = attend(q, k, v, self.heads).mean(1)  # [B, d_inner]: the L+1 queries' mean
        w_head = self.head.weight.T  # [d, C']
        return pooled @ (self.w_o[L1] @ w_head) + (self.b_o[L1] @ w_head + self.head.bias)  # [B, C']


# --- MHA's search space: the paper's downcast factors and head counts -------------------------------

# "learned" (attention pooling, streams) is a constructor choice (--set query=learned), not a search
# draw: like pooling's token_pool=topk, drawing it would change every seeded MHA search.
MHA_QUERIES = ("tokens", "learned")

MHA_FACTORS = (4, 8, 16, 32, 64)
MHA_HEADS = (4, 8, 16)


def mha_choices(d: int) -> list[tuple[int, int]]:
    """(factor, heads) pairs valid for width d: d_inner = d / factor integral and divisible by
    heads. When no paper head count divides d_inner, the largest divisor <= 8 is used."""
    out = []
    for f in MHA_FACTORS:
        if d % f:
            continue
        inner = d // f
        hs = [h for h in MHA_HEADS if inner % h == 0] or [max(h for h in range(1, 9) if inner % h == 0)]
        out.extend((f, h) for h in hs)
    return out


def mha_defaults(d: int) -> dict:
    """The paper's main factor 32 (or the nearest valid one) with 8 heads where they divide."""
    pairs = mha_choices(d)
    f = min((p[0] for p in pairs), key=lambda f: abs(math.log(f / 32)))
    heads = [h for ff, h in pairs if ff == f]
    return {"factor": f, "heads": 8 if 8 in heads else heads[0], "pool": "mean", "input_norm": "standard"}


def mha_sample(d: int, rng) -> dict:
    pairs = mha_choices(d)
    f, h = pairs[int(rng.integers(len(pairs)))]
    return {"factor": int(f), "heads": int(h), "pool": str(rng.choice(POOLS)), "input_norm": "standard"}


# max_attn: micro-batches keep B*T*T under 2^20 (the attention scores of one head group).
MHA = Family(
    "mha",
    input="hidden_states",
    head_only=False,
    build=MHAProbe,
    default_params=mha_defaults,
    sample_params=mha_sample,
    max_attn=2**20,
)

PROBE_FAMILIES = {f.name: f for f in (POOLING, GATE, MHA)}
PROBE_TYPES = tuple(PROBE_FAMILIES)


def build_probe(kind: str, num_layers: int, hidden_size: int, num_classes: int, **params) -> Probe:
    """One of the three probe families. num_layers is the number of stacked states, L+1."""
    if kind not in PROBE_FAMILIES:
        raise ValueError(f"unknown probe type {kind!r} (use one of {', '.join(PROBE_TYPES)})")
    return PROBE_FAMILIES[kind].build(num_layers, hidden_size, num_classes, **params)


def check_streamable(module: nn.Module) -> None:
    """Raise ValueError unless ``module`` has a streaming form (``Probe.stream_*``)."""
    if getattr(module, "streamable", False):
        return
    what = type(module).__name__
    if isinstance(module, PoolingProbe):
        what += f" with token_pool={module.token_pool!r}"
    elif isinstance(module, MHAProbe):
        what += f" with query={module.query!r}"
    raise ValueError(
        f"{what} has no streaming form (pooling with token_pool 'mean' or 'max', gate, and MHA with "
        "query 'learned' stream)"
    )


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
