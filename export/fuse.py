"""Export a probe to its own small ONNX graph, then fuse it into the decoder graph.

A probe declares what it reads with ``"input"`` in its config.json (set by its family in
models/; carried into the manifest as ``FusedProbe.input``):

    "hidden_states" (default)  forward(states [L+1, B, T, d] float32, mask [B, T] int64) -> logits [B, C']
    "logits"                   forward(logits [B, V] float32)                            -> logits [B, C']
                               (MULI: the next-token logits at the last prompt position)

A hidden-states probe is exported in its per-layer form, ``forward_layers(layers, mask)`` (the same
function on every row with a real token; models/probes.py), with L+1 inputs ``state_0 .. state_L``
[B, T, d] and ``mask``: fused, each input reads its layer's residual-stream tensor where it is, so
no [L+1, B, T, d] copy is stacked for it. In the prefill-only (quantised) artifacts a prompt probe's
stage 1 runs in an If per block of ``LAYERS_PER_STAGE_IF`` layers, right after them
(``surgery.layer_stages``): a ``blockable`` family (pooling, the gate) on each block's layers at
once (``forward_layers(block=)``: one [k, B, T, d] copy of the block, its ops once per block), the
MHA one layer at a time (its attention activations would grow with the block; 5 ops a layer in a
TorchScript export, one of them opset 23's ``Attention``). There a prompt probe reads each layer as
the decoder RMS-normalises it, where the graph has that norm (``surgery.stream_norms``: the next
layer's input norm, an ``RMSNormalization`` when probes are fused, which ``ortfuse`` then fuses into
a ``SkipSimplifiedLayerNormalization`` keeping its output), instead of the state: the norm is
computed anyway, the probe's own per-token scale is not, its gain folds into the probe's weights,
and pooling (token mean) and the gate then read each normalised layer where it is, without a block
copy (``normalised_sources``).
In every export the gate reads each layer by one product with its [token gate | stage-2 gate | head]
weights (its streaming readout; ``GateProbe.forward_layers``), where its summaries' form read it
twice.
A response probe's decode passes run its stacked streaming form.
The exported probe graph returns ``logits`` and ``probs`` ([B, C], ``probes.probabilities``);
fused under the prefix ``<name>/`` they become the outputs ``<name>/logits``, ``<name>/probs``.
The mask a fused probe sees is ``attention_mask[:, -T:]`` (the current step's tokens). In a
quantised artifact with a KV cache a prompt probe runs on prefill passes only (``surgery.prefill_only``:
zeros in decode passes); elsewhere a decode step pools the one new token: shape-valid, and not the
prompt's label (read labels from the prefill step).

``export_stream_probe`` exports a probe's streaming form instead (models/probes.py, ``stream_*``):
the same inputs plus the carried state ``past_<name>``, and the outputs ``present_<name>`` next to
``logits`` and ``probs``, so every decode pass reads the label of the response so far.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import warnings

_CACHE: dict[tuple, bytes] = {}  # (probe weights sha, config, opset, shapes) -> serialized graph

# Layers per stage If (``surgery.layer_stages``): every pass runs each If once, decode passes
# included (~15-20 us each here), and a block keeps its layers' states alive until its If has run.
# SmolLM2 int4 + gate, decode at batch 1 over the base (alternating runs of a scratch script):
# -5.1% with an If per layer, -2.3% with 4 layers per If (31 -> 8 Ifs), -3.2% with 8 (noise ~1 point).
LAYERS_PER_STAGE_IF = 4


def stage_block(module) -> int:
    """Layers per stage-1 block of a prompt probe fused in a prefill-only artifact: the stage Ifs' when
    its family is ``blockable``, else 1 (stage 1 per layer, the Ifs still per ``LAYERS_PER_STAGE_IF``)."""
    return LAYERS_PER_STAGE_IF if getattr(module, "blockable", False) else 1


def _wrapper(module, kind: str, block: int = 1, gains: list | None = None):
    import torch

    from singlepass.models.probes import probabilities

    class WithProbs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = module

        def forward(self, *inputs):
            logits = self.p(*inputs)
            return logits, probabilities(logits)

    class HiddenStatesProbe(WithProbs):
        def forward(self, *inputs):  # state_0 .. state_L [B, T, d], mask [B, T]: per layer (or block)
            layers, mask = list(inputs[:-1]), inputs[-1]
            if block > 1 or gains is not None:
                logits = self.p.forward_layers(layers, mask, block, gains)
            else:
                logits = self.p.forward_layers(layers, mask)
            return logits, probabilities(logits)

    class LastLogitsProbe(WithProbs):
        def forward(self, logits):  # noqa: D102
            return super().forward(logits)

    return (HiddenStatesProbe if kind == "hidden_states" else LastLogitsProbe)().eval()


def resolve_exporter(exporter: str, opset: int) -> str:
    """The torch.onnx exporter a probe graph is written with: TorchScript unless this torch lacks
    it; the dynamo exporter cannot write opsets below 18 (see ``export_probe``)."""
    import torch

    from singlepass.errors import SinglepassError

    if exporter == "torchscript" and not hasattr(torch.onnx, "utils"):
        exporter = "dynamo"
    if exporter == "dynamo" and opset < 18:
        raise SinglepassError(f"the dynamo exporter cannot write opset {opset} probe graphs")
    return exporter


def _fold_constants(proto):
    """onnxscript's optimizer with no size limit on what it folds. A probe's exported graph computes
    products of its weights (the normalisation folded onto them, ``Probe.normalised_matmul``) from
    constants; the exporter's own pass leaves those above 8,192 elements, so ONNX Runtime would
    fold them at every session load, holding both the factors and the product meanwhile. Folded
    here, the MHA probe's graphs shrank from 8.9 to 5.2 MiB of weights and from 398 / 2,929 nodes to
    196 / 1,735 (its stacked / per-layer forms of session 11)."""
    import onnxscript.optimizer

    return onnxscript.optimizer.optimize(proto, input_size_limit=1 << 26, output_size_limit=1 << 26)


def _rms_norm(g, x, shape, weight, eps):
    """TorchScript symbolic of ``aten::rms_norm`` (``F.rms_norm(x, shape, weight, eps)``), registered for
    the process's TorchScript exports: opset 23's RMSNormalization over the last ``len(shape)`` axes (one
    op; ``weight`` its scale, else ones); below 23, over the last axis only, x / sqrt(mean(x^2) + eps)
    with the mean as a product with a constant column (``models.probes.inv_rms_product``), times
    ``weight``. ``eps`` None: torch's default, float32's epsilon."""
    import torch
    from torch.onnx import symbolic_helper

    eps = torch.finfo(torch.float32).eps if eps is None else eps
    no_weight = symbolic_helper._is_none(weight)
    if g.opset >= 23:
        scale = g.op("Constant", value_t=torch.ones(shape)) if no_weight else weight
        return g.op("RMSNormalization", x, scale, axis_i=-len(shape), epsilon_f=eps)
    if len(shape) != 1:
        raise RuntimeError(f"rms_norm over {len(shape)} axes needs opset 23 (RMSNormalization), not {g.opset}")
    d = shape[0]
    mean_sq = g.op("MatMul", g.op("Mul", x, x), g.op("Constant", value_t=torch.full((d, 1), 1.0 / d)))
    eps_t = g.op("Constant", value_t=torch.tensor(eps, dtype=torch.float32))
    y = g.op("Div", x, g.op("Sqrt", g.op("Add", mean_sq, eps_t)))
    return y if no_weight else g.op("Mul", y, weight)


_SYMBOLICS: list = []  # registered once per process


def _register_symbolics() -> None:
    """Symbolics the TorchScript exporter lacks for ops the probes use (``_rms_norm``)."""
    if _SYMBOLICS:
        return
    from torch.onnx import register_custom_op_symbolic, symbolic_helper

    register_custom_op_symbolic("aten::rms_norm", symbolic_helper.parse_args("v", "is", "v", "f")(_rms_norm), 9)
    _SYMBOLICS.append("aten::rms_norm")


def _to_onnx(module, args, names, outputs, axes, dims, opset: int, exporter: str, subset: bool = False):
    """Trace ``module(*args)`` to an onnx.ModelProto with inputs ``names`` and ``outputs``: the
    TorchScript exporter with ``axes`` ({name: {axis: symbol}}), or the dynamo exporter with
    ``dims(batch, sequence)`` (its dynamic_shapes, keyed by forward()'s parameter names).
    ``subset``: the exporter may leave out inputs the graph does not read."""
    import onnx
    import torch

    exporter = resolve_exporter(exporter, opset)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            from torch.export import Dim

            b, t = Dim("batch", min=1, max=1024), Dim("sequence", min=1, max=131072)
            kw = {"dynamo": True, "dynamic_shapes": dims(b, t)}
            proto = torch.onnx.export(
                module, args, None, opset_version=opset, input_names=names, output_names=outputs, **kw
            ).model_proto
        else:
            _register_symbolics()
            f = io.BytesIO()
            torch.onnx.export(
                module,
                args,
                f,
                dynamo=False,
                opset_version=opset,
                input_names=names,
                output_names=outputs,
                dynamic_axes={k: v for k, v in axes.items() if k in names + outputs},
            )
            proto = onnx.load_from_string(f.getvalue())
    proto = _fold_constants(proto)
    got = [i.name for i in proto.graph.input if i.name not in {t.name for t in proto.graph.initializer}]
    want = [n for n in names if n in got] if subset else names
    if got != want or not got or [o.name for o in proto.graph.output] != outputs:
        raise RuntimeError(f"probe export produced inputs {got} / outputs {[o.name for o in proto.graph.output]}")
    return proto


def state_names(num_states: int) -> list[str]:
    """The per-layer inputs of an exported hidden-states probe: hidden state i is ``state_i``."""
    return [f"state_{i}" for i in range(num_states)]


def export_probe(
    module,
    kind: str,
    num_states: int,
    hidden_size: int,
    vocab_size: int,
    opset: int,
    exporter: str = "torchscript",
    block: int = 1,
    gains: list | None = None,
):
    """-> onnx.ModelProto with inputs (state_0 .. state_L, mask) or (next_token_logits,) and outputs
    (logits, probs). A state input the probe does not read (a fixed-readout probe reads one layer)
    may be left out by the exporter. ``block``: a hidden-states probe's ``forward_layers`` with stage 1
    on blocks of that many layers (``Probe.blockable`` families). ``gains``: per layer None, or the
    gain [d] of the decoder's RMS normalisation that ``state_i`` then carries instead of the state
    (``forward_layers``' gains; ``normalised_sources``).

    The probe graph must use the decoder graph's opset. torch.onnx's TorchScript exporter
    writes any opset and takes ~0.2 s; the dynamo exporter takes 5-12 s per probe and cannot
    write opsets below 18 (its down-conversion fails on these graphs), so it is the fallback
    (and what a torch without the TorchScript exporter gets). A probe is plain tensor math
    without data-dependent control flow, so tracing it is exact; every export is checked
    against PyTorch anyway.
    """
    import numpy as np
    import onnx
    import torch

    from singlepass.errors import SinglepassError

    if kind == "hidden_states" and not hasattr(module, "forward_layers"):
        raise SinglepassError(f"{type(module).__name__} has no forward_layers(layers, mask): it cannot be fused")
    state = module.state_dict()
    exporter = resolve_exporter(exporter, opset)
    # The module's plain settings (token_pool, top_k, pool, heads, ...) shape the graph as much as its
    # weights do: two probes with equal weights and another top_k are two graphs.
    settings = sorted(
        (k, v)
        for k, v in vars(module).items()
        if not k.startswith("_") and k != "training" and isinstance(v, (bool, int, float, str, type(None)))
    )
    shape = (kind, num_states, hidden_size, vocab_size, opset, exporter, block)
    h = hashlib.sha256(repr((type(module).__name__, settings, *shape)).encode())
    for i, g in enumerate(gains or []):  # each layer's gain, tagged with its layer and length
        g = b"" if g is None else np.asarray(g, np.float32).tobytes()
        h.update(f"gain {i} {len(g)}:".encode() + g)
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().numpy().tobytes())
    key = h.hexdigest()
    if key in _CACHE:
        return onnx.load_from_string(_CACHE[key])
    wrapper = _wrapper(module.eval(), kind, block, gains)
    if kind == "hidden_states":
        args = tuple(torch.randn(2, 5, hidden_size) for _ in range(num_states))  # [B, T, d] each
        args += (torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]),)  # mask [B, T]
        names = state_names(num_states) + ["mask"]
        axes = {n: {0: "batch", 1: "sequence"} for n in names}
        dims = lambda b, t: {"inputs": ({0: b, 1: t},) * len(args)}  # noqa: E731  (forward's parameter)
    else:
        args = (torch.randn(2, vocab_size),)
        names = ["next_token_logits"]
        axes = {"next_token_logits": {0: "batch"}}
        dims = lambda b, t: {"logits": {0: b}}  # noqa: E731
    axes |= {"logits": {0: "batch"}, "probs": {0: "batch"}}
    proto = _to_onnx(wrapper, args, names, ["logits", "probs"], axes, dims, opset, exporter, subset=True)
    _CACHE[key] = proto.SerializeToString()
    return proto


def export_stream_probe(
    module, num_states: int, hidden_size: int, opset: int, exporter: str = "torchscript", stacked: bool = False
):
    """The streaming form of a hidden-states probe (models/probes.py: ``stream_update``, then
    ``stream_logits``) -> onnx.ModelProto with inputs (state_0 .. state_L [B, T, d] float32, mask [B, T]
    int64, past_<name> ...) and outputs (logits, probs, present_<name> ...), B and T dynamic. The state
    tensors are ``module.stream_state_shapes(B)`` (float32, the batch on axis 1). Feed each pass's
    presents back as the next pass's pasts (``stream_init(B)`` before the first): its logits are the
    probe over every token folded in so far. ``stacked``: ``stream_update``'s one-copy form (the
    decode pass's: a few ops over all layers). Exporters as in ``export_probe`` (TorchScript first);
    the export is checked against PyTorch on a two-pass run."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from singlepass.models.probes import check_streamable, probabilities

    check_streamable(module)  # ValueError naming the family / option
    module = module.eval()
    state = [name for name, _ in module.stream_state_shapes(1)]

    class StreamingProbe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = module

        def forward(self, *inputs):  # state_0 .. state_L [B, T, d], mask [B, T], past state
            layers, mask, past = list(inputs[:num_states]), inputs[num_states], list(inputs[num_states + 1 :])
            present = self.p.stream_update(past, layers, mask, stacked)
            logits = self.p.stream_logits(present)
            return (logits, probabilities(logits), *present)

    names = state_names(num_states) + ["mask"] + [f"past_{n}" for n in state]
    outputs = ["logits", "probs"] + [f"present_{n}" for n in state]

    def feeds(seed: int, past: list[torch.Tensor]) -> tuple:  # B = 2, T = 3 (stacked: 1); row 1 skips a token
        g = torch.Generator().manual_seed(seed)
        t = 1 if stacked else 3  # the stacked form folds one token per row (a decode pass)
        layers = tuple(torch.randn(2, t, hidden_size, generator=g) for _ in range(num_states))  # [B, T, d] each
        mask = torch.tensor([[1], [seed]]) if stacked else torch.tensor([[1, 1, 1], [0, 1, 1]])  # stacked: row 1 waits
        return (*layers, mask, *past)

    axes = {n: {0: "batch", 1: "sequence"} for n in names[: num_states + 1]}
    axes |= {n: {1: "batch"} for n in names[num_states + 1 :] + outputs[2:]}  # state: the batch on axis 1
    axes |= {"logits": {0: "batch"}, "probs": {0: "batch"}}

    def dims(b, t) -> dict:
        return {"inputs": tuple([{0: b, 1: t}] * (num_states + 1) + [{1: b}] * len(state))}

    args = feeds(0, module.stream_init(2))
    proto = _to_onnx(StreamingProbe().eval(), args, names, outputs, axes, dims, opset, exporter)
    # Two passes against PyTorch, the presents fed back as pasts (the tracing is exact; checked anyway).
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    past = module.stream_init(2)
    for seed in (0, 1):
        inputs = feeds(seed, past)
        got = sess.run(None, {n: x.numpy() for n, x in zip(names, inputs)})
        with torch.no_grad():
            layers, mask = list(inputs[:num_states]), inputs[num_states]
            want = module.stream_logits(module.stream_update(past, layers, mask, stacked))
        if not np.allclose(got[0], want.numpy(), rtol=1e-4, atol=1e-4):
            raise RuntimeError(f"the exported stream probe is off PyTorch by {np.abs(got[0] - want.numpy()).max()}")
        past = [torch.from_numpy(x) for x in got[2:]]
    return proto


def prompt_probes_prefill_only(stream, weights: str) -> bool:
    """Do the prompt probes run on prefill passes only (``surgery.prefill_only``)? In the quantised
    CPU artifacts with a KV cache: there a decode pass would spend 5-30% of its time on probe outputs
    nobody reads. An fp32 artifact (TensorRT's input: its pre-flight reads every probe tensor and
    pins the probe layers to fp32 by name) keeps its prompt probes in every pass."""
    return bool(stream.past) and weights != "fp32"


def fuse_probes(graph, stream, probes, prefill_only: bool = False) -> None:
    """Export and fuse each probe (``export.pipeline.LoadedProbe``: its FusedProbe record and
    torch module) into ``graph`` (a ``gs.Graph``, edited in place). A hidden-states probe's input
    ``state_i`` reads hidden state i of the residual stream (``stream.hidden_states``) directly.
    The fused outputs are the record's ``outputs``. ``prefill_only``: prompt probes run in passes
    of 2+ tokens only (``prompt_probes_prefill_only``)."""
    from singlepass.export import surgery
    from singlepass.export.stream import fuse_response_probe

    opset = surgery.opset_of(graph)
    sources = {}  # probe input kind -> {probe input name: host tensor}, built once
    norms = None  # the decoder's own normalisation of each hidden state (``surgery.stream_norms``), found once
    for p in probes:
        kind = p.spec.input
        if p.spec.reads == "response":  # the streaming form, its state carried like the KV cache
            forms = [
                export_stream_probe(p.module, stream.num_layers + 1, stream.hidden_size, opset, stacked=stacked)
                for stacked in (False, True)
            ]
            outs = fuse_response_probe(graph, stream, p, *forms)
            want = list(p.spec.outputs.values()) + [s["present"] for s in p.spec.state]
            if sorted(outs) != sorted(want):
                raise RuntimeError(f"response probe {p.spec.name!r} fused as {outs}, the manifest says {want}")
            continue
        if kind not in sources:
            sources[kind] = host_feeds(graph, stream, kind)
        src = sources[kind]
        if not prefill_only:
            outs = _fuse_prompt_probe(graph, stream, p, src, p.spec.name)[1]
        elif kind == "hidden_states":
            # prefill passes only, stage 1 in the stage Ifs, on each block's layers at once or one layer at
            # a time (one form for every pass size: no stacked copy, no states handed on; no fp32 boundary
            # casts: prefill-only artifacts are the quantised ones, never TensorRT's input)
            block = stage_block(p.module)
            if norms is None:
                norms = surgery.stream_norms(graph, stream)
            fed, gains = normalised_sources(p.module, src, norms)
            nodes, outs = _fuse_prompt_probe(graph, stream, p, fed, p.spec.name, False, block, gains)
            also = {n.tensor: i for i, n in enumerate(norms) if n is not None}
            nodes = surgery.layer_stages(graph, stream, nodes, LAYERS_PER_STAGE_IF, also)
            surgery.prefill_only(graph, stream, nodes, outs)
        else:  # a prompt probe's label is the prefill pass's: decode passes skip it
            nodes, outs = _fuse_prompt_probe(graph, stream, p, src, p.spec.name)
            surgery.prefill_only(graph, stream, nodes, outs)
        if sorted(outs) != sorted(p.spec.outputs.values()):
            raise RuntimeError(f"probe {p.spec.name!r} fused as {outs}, the manifest says {p.spec.outputs}")


def _fuse_prompt_probe(
    graph, stream, p, sources: dict, prefix: str, boundary: bool = True, block: int = 1, gains: list | None = None
) -> tuple[list, list[str]]:
    """Export prompt probe ``p`` (per layer or per ``block`` of layers) and fuse it under
    ``prefix``, its inputs fed from ``sources`` (``host_feeds``; ``normalised_sources`` with
    ``gains``). -> (the nodes added, its outputs)."""
    from singlepass.export import surgery

    dims = (stream.num_layers + 1, stream.hidden_size, stream.vocab_size, surgery.opset_of(graph))
    probe = export_probe(p.module, p.spec.input, *dims, block=block, gains=gains)
    return surgery.fuse_probe_nodes(graph, probe, prefix, sources, boundary)


def normalised_sources(module, sources: dict[str, str], norms: list) -> tuple[dict[str, str], list | None]:
    """Feed a prompt probe the decoder's own RMS normalisation of its layers where the graph has it
    (``surgery.stream_norms``), instead of the states: the norm's output 0 is computed anyway (the
    next layer reads it), so the probe's own per-token scale (a reduction over every token's width)
    goes away, its gain folds into the probe's weights, and stage 1 reads each layer where it is
    (``Probe.features_layers``' gains; pooling's and the gate's stage-1 graphs alone ~3x faster on
    SmolLM2's 31 layers of 64 tokens). A layer without a norm (the last: the final norm's output) is
    read as it is; a probe without an RMS step (input_norm="none") reads the states. -> (the sources,
    the gains: None where nothing is normalised)."""
    gains = [None if n is None else n.gain for n in norms]
    if not getattr(module, "reads_rms", False) or all(g is None for g in gains):
        return sources, None
    fed = dict(sources)
    for name, n in zip(state_names(len(norms)), norms):
        if n is not None:
            fed[name] = n.tensor
    return fed, gains


def host_feeds(graph, stream, kind: str) -> dict[str, str]:
    """The host tensors behind a probe's inputs: hidden state i for ``state_i`` and the current step's
    mask, or the last position's logits."""
    from singlepass.export import surgery

    if kind == "hidden_states":
        feeds = dict(zip(state_names(stream.num_layers + 1), stream.hidden_states))
        return feeds | {"mask": surgery.probe_attention_mask(graph, stream)}
    return {"next_token_logits": surgery.last_position_logits(graph, stream)}
