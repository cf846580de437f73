"""Export the plain decoder (next-token logits + KV cache) to ONNX with torch.onnx.

The graph has no hidden-state output: singlepass adds the stacked [L+1, B, T, d] tensor by
the same structural surgery it applies to graphs exported elsewhere (``surgery.py``), so
there is one code path for "our" and "foreign" decoders.

Contract (names as optimum-onnx uses them, so runtimes written for those graphs fit):

    inputs   input_ids        int64 [batch, sequence]
             attention_mask   int64 [batch, total_sequence]     total = past + sequence
             position_ids     int64 [batch, sequence]           cumsum(mask) - 1, clipped at 0
             past_key_values.{i}.key / .value  float32 [batch, kv_heads, past_sequence, head_dim]
    outputs  logits           float32 [batch, sequence, vocab]
             present.{i}.key / .value  float32 [batch, kv_heads, past_sequence + sequence, head_dim]

One graph serves prefill (past_sequence = 0), chunked prefill and decode steps.
"""

from __future__ import annotations

import contextlib
import io
import warnings

DEFAULT_OPSET = 23  # ONNX's Attention, RotaryEmbedding and RMSNormalization (export/attention.py)
CACHE_MAX_PARAMS = 20_000_000  # small decoders (tests) keep their exported graph for the process
_CACHE: dict[tuple, bytes] = {}
PAST = "past_key_values.{i}.{kind}"
PRESENT = "present.{i}.{kind}"


def kv_names(num_layers: int, pattern: str) -> list[str]:
    return [pattern.format(i=i, kind=k) for i in range(num_layers) for k in ("key", "value")]


def _wrapper(model, with_past: bool, with_positions: bool):
    import torch
    from transformers import DynamicCache

    from singlepass.models.extract import cache_arg, returned_cache

    L = model.config.num_hidden_layers
    past_arg = cache_arg(model)

    class DecoderWithCache(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, input_ids, attention_mask, position_ids=None, past=None):
            kw = dict(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
            if with_positions:
                kw["position_ids"] = position_ids
            if with_past:
                # No config: every layer keeps its whole past (present = past + sequence, the graph's
                # contract) even where a sliding-window layer's own cache would drop the oldest
                # entries; the window is in the attention mask either way.
                kw[past_arg] = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(L)])
                kw["use_cache"] = True
            else:
                kw["use_cache"] = False
            out = self.m(**kw)
            if not with_past:
                return out.logits
            present = []
            for layer in returned_cache(out).layers:
                present += [layer.keys, layer.values]
            return (out.logits, *present)

    return DecoderWithCache().eval()


def example_inputs(model, batch=2, seq=3, past=4):
    import torch

    cfg = model.config
    L, kvh = cfg.num_hidden_layers, cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    ids = torch.randint(0, cfg.vocab_size, (batch, seq))
    mask = torch.ones(batch, past + seq, dtype=torch.int64)
    mask[0, :2] = 0  # a left-padded row, so no mask shortcut is traced
    pos = (mask.cumsum(1) - 1).clamp_min(0)[:, -seq:]
    kv = [torch.randn(batch, kvh, past, hd) for _ in range(2 * L)]
    return ids, mask, pos, kv


def export_decoder(
    model,
    opset: int = DEFAULT_OPSET,
    exporter: str = "dynamo",
    with_past: bool = True,
    with_positions: bool = True,
    quiet: bool = True,
    cache_key: str | None = None,
):
    """-> onnx.ModelProto of the decoder (weights inline, in memory).

    ``exporter="dynamo"`` is the supported route; ``"legacy"`` (TorchScript) exists to produce
    differently structured graphs for the surgery tests. With ``cache_key`` (the weights'
    content hash) a small model's graph is exported once per process.
    """
    import onnx
    import torch

    from singlepass.export.attention import exporting_attention

    key = (cache_key, opset, exporter, with_past, with_positions)
    if cache_key and key in _CACHE:
        return onnx.load_from_string(_CACHE[key])

    L = model.config.num_hidden_layers
    ids, mask, pos, kv = example_inputs(model)
    if with_past and not with_positions:
        raise ValueError("a graph with a KV cache takes position_ids")
    names_in = ["input_ids", "attention_mask"] + (["position_ids"] if with_positions else [])
    names_in += kv_names(L, PAST) if with_past else []
    names_out = ["logits"] + (kv_names(L, PRESENT) if with_past else [])
    args = (ids, mask) + ((pos,) if with_positions else ()) + ((kv,) if with_past else ())
    if not with_past:
        mask = mask[:, -ids.shape[1] :]
        args = (ids, mask) + args[2:]
    wrapper = _wrapper(model, with_past, with_positions)
    ctx = contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext()
    with warnings.catch_warnings(), ctx, exporting_attention(model, opset):
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            from torch.export import Dim

            b, s = Dim("batch", min=1, max=1024), Dim("sequence", min=1, max=131072)
            p, t = Dim("past_sequence", min=0, max=131072), Dim("total_sequence", min=1, max=262144)
            shapes = {"input_ids": {0: b, 1: s}, "attention_mask": {0: b, 1: t if with_past else s}}
            if with_positions:
                shapes["position_ids"] = {0: b, 1: s}
            if with_past:
                shapes["past"] = [{0: b, 2: p}] * (2 * L)
            prog = torch.onnx.export(
                wrapper,
                args,
                None,
                dynamo=True,
                opset_version=opset,
                dynamic_shapes=shapes,
                input_names=names_in,
                output_names=names_out,
                verbose=False,
            )
            proto = prog.model_proto
        elif exporter == "legacy":
            axes = {
                "input_ids": {0: "batch", 1: "sequence"},
                "attention_mask": {0: "batch", 1: "total_sequence"},
                "logits": {0: "batch", 1: "sequence"},
            }
            if with_positions:
                axes["position_ids"] = {0: "batch", 1: "sequence"}
            for n in kv_names(L, PAST) if with_past else []:
                axes[n] = {0: "batch", 2: "past_sequence"}
            for n in kv_names(L, PRESENT) if with_past else []:
                axes[n] = {0: "batch", 2: "total_sequence"}
            if not with_past:
                axes["attention_mask"] = {0: "batch", 1: "sequence"}
            f = io.BytesIO()
            torch.onnx.export(
                wrapper,
                args,
                f,
                dynamo=False,
                opset_version=opset,
                input_names=names_in,
                output_names=names_out,
                dynamic_axes=axes,
            )
            proto = onnx.load_from_string(f.getvalue())
        else:
            raise ValueError(f"exporter must be 'dynamo' or 'legacy', not {exporter!r}")
    _name_dims(proto)
    if cache_key and sum(p.numel() for p in model.parameters()) <= CACHE_MAX_PARAMS:
        _CACHE[key] = proto.SerializeToString()
    return proto


def _name_dims(proto) -> None:
    """Give the symbolic dims stable names (dynamo writes expressions like 'past_sequence + sequence')."""
    for v in list(proto.graph.output):
        if v.name.startswith("present."):
            dims = v.type.tensor_type.shape.dim
            if len(dims) == 4 and not dims[2].HasField("dim_value"):
                dims[2].dim_param = "total_sequence"
