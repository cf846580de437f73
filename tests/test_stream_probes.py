"""The probes' streaming form (Probe.stream_*): the state carried between decode passes gives, at every
pass, the probe over the whole prefix folded in so far; in PyTorch and exported to ONNX."""

import numpy as np
import pytest
import torch

from singlepass.models.baselines import FixedReadoutProbe, MuliProbe
from singlepass.models.probes import build_probe, check_streamable

L1, D, T = 4, 16, 11  # L+1 stacked states, width, prefix length
STREAMING = [
    ("pooling", {"token_pool": "mean", "layer_pool": "mean"}),
    ("pooling", {"token_pool": "mean", "layer_pool": "max"}),
    ("pooling", {"token_pool": "max", "layer_pool": "mean"}),
    ("pooling", {"token_pool": "max", "layer_pool": "max"}),
    ("gate", {}),
    ("mha", {"query": "learned", "factor": 4, "heads": 2, "pool": "mean"}),  # pool: stage 2's
    ("mha", {"query": "learned", "factor": 2, "heads": 4, "pool": "max"}),
]
ID = [f"{k}-{'-'.join(map(str, p.values()))}" if p else k for k, p in STREAMING]
CHUNKINGS = [[1] * T, [2] * 5 + [1], [3, 1, 4, 2, 1], [T]]


def make_probe(kind, params, input_norm, classes, seed=0):
    torch.manual_seed(seed)
    probe = build_probe(kind, L1, D, classes, input_norm=input_norm, **params).eval()
    if input_norm == "standard":
        probe.set_input_statistics(torch.randn(L1, D) * 0.3, torch.rand(L1, D) + 0.5)
    with torch.no_grad():
        probe.head.weight.normal_(0, 0.5)  # logits well away from 0: differences show
        if kind == "gate":
            probe.token_gates.mul_(3.0)  # peaked token weights (up to e^2 apart): differences show
        if kind == "mha":
            probe.queries.mul_(3.0)  # likewise, per head
            probe.b_o.normal_(0, 0.5)  # the empty state's summaries are 0, not b_o
            probe.b_qkv.normal_(0, 0.5)  # stage 2's biases (its queries' part carries the score scale)
    return probe


def random_states(B, seed=1):
    g = torch.Generator().manual_seed(seed)
    states = torch.randn(L1, B, T, D, generator=g) * 3  # [L+1, B, T, d]
    states[:, :, 0] *= 50  # a "massive activation" on the first token
    return states


def stream(probe, states, mask, chunks, stacked=False):
    """Fold states [L+1, B, T, d] in chunk by chunk -> [(t, state before, state after)] per pass.
    ``stacked``: chunks of one token through the decode pass's form (``fold_one``)."""
    state, t, out = probe.stream_init(states.shape[1]), 0, []
    for c in chunks:
        new = probe.stream_update(state, list(states[:, :, t : t + c]), mask[:, t : t + c], stacked)
        t += c
        out.append((t, state, new))
        state = new
    return out


@pytest.mark.parametrize("classes", [2, 3])
@pytest.mark.parametrize("input_norm", ["rms", "standard", "none"])
@pytest.mark.parametrize("kind,params", STREAMING, ids=ID)
@torch.no_grad()
def test_streaming_equals_the_probe_over_the_whole_prefix_at_every_pass(kind, params, input_norm, classes):
    probe = make_probe(kind, params, input_norm, classes)
    states, mask = random_states(2), torch.ones(2, T, dtype=torch.int64)
    tol = 1e-4 if input_norm == "none" else 1e-5  # unnormalised states (~150): float32 rounding of the products
    for chunks, stacked in [(c, False) for c in CHUNKINGS] + [([1] * T, True)]:
        for t, _, state in stream(probe, states, mask, chunks, stacked):
            ref = probe(states[:, :, :t], mask[:, :t])
            torch.testing.assert_close(probe.stream_logits(state), ref, rtol=tol, atol=tol)
    shapes = probe.stream_state_shapes(2)
    assert [tuple(s.shape) for s in state] == [s for _, s in shapes]
    assert all(s.dtype == torch.float32 and s.shape[0] in (1, L1) and s.shape[1] == 2 for s in state)
    empty = probe.stream_logits(probe.stream_init(2))  # defined (meaningless) before the first token
    torch.testing.assert_close(empty, probe.head(probe.combine(torch.zeros(L1, 2, D))))


@pytest.mark.parametrize("input_norm", ["rms", "standard", "none"])
@pytest.mark.parametrize("kind,params", STREAMING, ids=ID)
@torch.no_grad()
def test_each_row_streams_its_own_tokens_and_masked_rows_keep_their_state(kind, params, input_norm):
    """Rows of one batch: a prompt masked out before the response, a row finishing early, one masked
    out at some passes, one never fed. Each equals the probe over its own tokens; a pass that gives a
    row no token leaves its state bit for bit."""
    probe = make_probe(kind, params, input_norm, 3)
    tol = 1e-4 if input_norm == "none" else 1e-5  # unnormalised states (~150): float32 rounding of the products
    states = random_states(5)
    mask = torch.ones(5, T, dtype=torch.int64)
    mask[1, :4] = 0  # the prompt
    mask[2, 5:] = 0  # finished after 5 tokens
    mask[3, [1, 2, 6, 7, 8]] = 0  # masked out at some passes
    mask[4] = 0  # never a token
    for chunks, stacked in (([1] * T, False), ([3, 1, 4, 2, 1], False), ([1] * T, True)):
        t0 = 0
        for t, before, after in stream(probe, states, mask, chunks, stacked):
            got = probe.stream_logits(after)
            assert torch.isfinite(got).all()
            for j in range(5):
                seen = mask[j, :t].bool()  # the row's tokens so far
                if seen.any():
                    ref = probe(states[:, j : j + 1, :t][:, :, seen], torch.ones(1, int(seen.sum())))
                    torch.testing.assert_close(got[j : j + 1], ref, rtol=tol, atol=tol)
                if not mask[j, t0:t].any():  # no token this pass: the state's row is untouched, bit for bit
                    assert all(torch.equal(b[:, j], a[:, j]) for b, a in zip(before, after)), (t, j)
            t0 = t
        assert all(torch.equal(s[:, 4], i[:, 4]) for s, i in zip(after, probe.stream_init(5)))  # never fed


@pytest.mark.parametrize("kind,params", STREAMING, ids=ID)
def test_the_stacked_form_folds_one_token_per_row(kind, params):
    probe = make_probe(kind, params, "standard", 2)
    with pytest.raises(ValueError, match="one token per row"):
        probe.stream_update(probe.stream_init(2), list(random_states(2)[:, :, :2]), torch.ones(2, 2), stacked=True)


@pytest.mark.parametrize("input_norm", ["rms", "standard"])
def test_mean_pooling_streams_the_heads_running_sum(input_norm):
    """Mean over tokens and layers is linear up to the head: its state is C' running sums and a count per row
    (the other pooling forms carry [L+1, B, d]); the equivalence tests above hold it to the whole-prefix probe."""
    assert make_probe("pooling", STREAMING[0][1], input_norm, 3).stream_state_shapes(2) == [
        ("score", (1, 2, 3)),
        ("count", (1, 2, 1)),
    ]
    assert make_probe("pooling", STREAMING[1][1], input_norm, 2).stream_state_shapes(2)[0] == ("sum", (L1, 2, D))


@pytest.mark.parametrize(
    "module,what",
    [
        (lambda: build_probe("pooling", L1, D, 2, token_pool="topk"), "PoolingProbe with token_pool='topk'"),
        (lambda: build_probe("mha", L1, D, 2, factor=4, heads=4), "MHAProbe with query='tokens'"),
        (lambda: FixedReadoutProbe(L1, D, 2, readout="last"), "FixedReadoutProbe"),
        (lambda: MuliProbe(vocab_size=50, num_classes=2), "MuliProbe"),
    ],
)
def test_other_families_and_options_have_no_streaming_form(module, what):
    from singlepass.export.fuse import export_stream_probe

    module = module()
    msg = f"{what} has no streaming form"
    with pytest.raises(ValueError, match=msg):
        check_streamable(module)
    with pytest.raises(ValueError, match=msg):
        export_stream_probe(module, L1, D, 18)
    if hasattr(module, "stream_init"):  # a Probe: every entry point runs the same check
        assert not module.streamable
        x = [torch.randn(1, 2, D)] * L1
        for call in (
            lambda: module.stream_state_shapes(1),
            lambda: module.stream_init(1),
            lambda: module.stream_update([], x, torch.ones(1, 2)),
            lambda: module.stream_logits([]),
        ):
            with pytest.raises(ValueError, match=msg):
                call()


@pytest.mark.parametrize("opset", [18, 23])
@pytest.mark.parametrize(
    "kind,params,classes",
    [
        ("pooling", {"token_pool": "mean"}, 2),
        ("pooling", {"token_pool": "max"}, 3),
        ("gate", {}, 2),
        ("mha", {"query": "learned", "factor": 4, "heads": 2}, 3),
    ],
    ids=["pooling-mean", "pooling-max", "gate", "mha-learned"],
)
@torch.no_grad()
def test_exported_stream_probe_fed_its_presents_back_equals_torch_at_every_pass(kind, params, classes, opset):
    import onnxruntime as ort

    from singlepass.export.fuse import export_stream_probe, state_names
    from singlepass.models.probes import probabilities

    probe = make_probe(kind, params, "standard", classes)
    proto = export_stream_probe(probe, L1, D, opset)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [n for n, _ in probe.stream_state_shapes(1)]
    assert [i.name for i in sess.get_inputs()] == state_names(L1) + ["mask"] + [f"past_{n}" for n in names]
    assert [o.name for o in sess.get_outputs()] == ["logits", "probs"] + [f"present_{n}" for n in names]
    states = random_states(3)  # a batch size other than the trace's
    mask = torch.ones(3, T, dtype=torch.int64)
    mask[1, :4] = 0  # a prompt before the response
    mask[2, 6:] = 0  # finished early
    t, torch_state = 0, probe.stream_init(3)
    past = [s.numpy() for s in torch_state]
    for c in [4, 1, 1, 3, 2]:  # a prefill chunk, then decode passes of other lengths
        layers, m = list(states[:, :, t : t + c]), mask[:, t : t + c]
        t += c
        feed = {n: x.numpy() for n, x in zip(state_names(L1), layers)} | {"mask": m.numpy()}
        logits, probs, *past = sess.run(None, feed | {f"past_{n}": p for n, p in zip(names, past)})
        torch_state = probe.stream_update(torch_state, layers, m)
        want = probe.stream_logits(torch_state)
        np.testing.assert_allclose(logits, want.numpy(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(probs, probabilities(want).numpy(), rtol=1e-4, atol=1e-4)
        for got, ref in zip(past, torch_state):
            np.testing.assert_allclose(got, ref.numpy(), rtol=1e-4, atol=1e-4)
        fed = mask[:, :t].any(1).numpy()  # rows with a token so far: the probe over the whole prefix
        ref = probe(states[:, :, :t], mask[:, :t]).numpy()
        np.testing.assert_allclose(logits[fed], ref[fed], rtol=1e-4, atol=1e-4)


def weight_only_nodes(proto) -> list[str]:
    """The nodes of an exported graph whose inputs are all weights or constants: work the exporter's
    constant folding left to be redone at every run."""
    known = {i.name for i in proto.graph.initializer} | {""}
    left = []
    for n in proto.graph.node:
        if n.op_type != "Constant" and all(i in known for i in n.input):
            left.append(n.op_type)
        if n.op_type == "Constant" or all(i in known for i in n.input):
            known.update(n.output)
    return left


@pytest.mark.parametrize("kind,params", STREAMING, ids=ID)
def test_the_decode_form_computes_nothing_from_weights_alone(kind, params):
    """Every decode pass runs the stacked streaming form: products of weights (the normalisation folded
    onto them) must be folded at export, not rebuilt each pass (the gate's readout weights once were:
    ConstantOfShape / Expand and a [L+1, d, 3] product every token)."""
    from singlepass.export.fuse import export_stream_probe

    probe = make_probe(kind, params, "standard", 2)
    assert weight_only_nodes(export_stream_probe(probe, L1, D, 23, stacked=True)) == []


@pytest.mark.parametrize("kind,params", [STREAMING[0], STREAMING[4], STREAMING[5]], ids=[ID[0], ID[4], ID[5]])
def test_prefix_logits_are_the_probe_over_each_prefix_with_gradients(kind, params):
    """models/streaming.prefix_logits (the stop loss's input): the logit after pass t equals the probe run
    over the row's first t real tokens, on either padding side (a padded pass repeats the last), and
    gradients reach the probe's parameters."""
    from singlepass.models.streaming import prefix_logits

    probe = make_probe(kind, params, "standard", 2)
    states = random_states(3)
    mask = torch.ones(3, T, dtype=torch.long)
    mask[1, 7:] = 0  # right padding
    mask[2, :4] = 0  # left padding
    z = prefix_logits(probe, states, mask)  # [B, T]
    assert z.shape == (3, T)
    with torch.no_grad():
        for b in range(3):
            real = mask[b].nonzero().flatten().tolist()
            for t in range(T):
                seen = [i for i in real if i <= t]
                if not seen:
                    continue
                m = torch.zeros(1, T, dtype=torch.long)
                m[0, seen] = 1
                want = probe(states[:, b : b + 1], m)[0, 0]
                assert float(z[b, t]) == pytest.approx(float(want), abs=1e-4)
    z.sum().backward()
    for name, p in probe.named_parameters():  # every parameter, stage 1's too, not only the head
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name


@pytest.mark.parametrize("consecutive", [2, 3])
def test_stop_loss_trains_every_safe_pass_and_a_harmful_rows_early_window(consecutive):
    """stop_loss against its definition computed row by row in numpy: safe rows, the mean BCE of every
    pass toward safe plus the stop statistic's; harmful ones, the last pass's and the best early window's
    toward unsafe, times pos_weight; a row shorter than a window has no statistic term; padding (either
    side) is never read; the early windows are those whose last pass number is within ``early``."""
    from singlepass.models.streaming import stop_loss, stop_statistic

    def bce(x, c):  # binary cross-entropy of logit x toward class c
        return float(np.log1p(np.exp(-x)) if c else np.log1p(np.exp(x)))

    rng = np.random.default_rng(0)
    z = torch.tensor(rng.normal(0, 2, (6, 9)), dtype=torch.float32)
    mask = torch.ones(6, 9, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, :6] = 0  # left padding: 3 real passes
    mask[3, 1:] = 0  # one token: never stopped
    mask[5, :2] = 0  # left padding, harmful, 7 real passes: the early windows count passes, not positions
    early = 4
    # row 5's pass k is at position k + 1: passes 1 .. early-c at -5, pass early-c+1 at 1, the rest at 20, so
    # its best early window (the one ending at pass `early`) has minimum 1 and every later one 20
    z[5, 2 : 2 + early - consecutive] = -5.0
    z[5, 2 + early - consecutive] = 1.0
    z[5, 2 + early - consecutive + 1 :] = 20.0
    y = torch.tensor([0, 1, 0, 1, 1, 1])
    w = torch.tensor([1.0, 2.0, 0.5, 1.0, 1.0, 1.5])

    def oracle(z, mask, y, w):
        total = 0.0
        for b in range(len(y)):
            real = z[b][mask[b] > 0].double().numpy()
            n = len(real)
            stat = float(stop_statistic(real[None], consecutive)[0]) if n >= consecutive else None
            if y[b] == 0:
                row = np.mean([bce(x, 0) for x in real]) + (bce(stat, 0) if stat is not None else 0.0)
            else:
                first = real[: min(n, early)]
                s_early = float(stop_statistic(first[None], consecutive)[0]) if len(first) >= consecutive else None
                row = 3.0 * (bce(real[-1], 1) + (bce(s_early, 1) if s_early is not None else 0.0))
            total += float(w[b]) * row
        return total

    def loss(z, mask, y, w):
        return float(stop_loss(z, mask, y, pos_weight=3.0, weight=w, early=early, consecutive=consecutive))

    total = oracle(z, mask, y, w)
    assert loss(z, mask, y, w) == pytest.approx(total, rel=1e-5)
    # row 5's early term is its window ending at pass `early` (minimum 1): one pass later (20) gives another loss
    shifted = stop_loss(z, mask, y, pos_weight=3.0, weight=w, early=early + 1, consecutive=consecutive)
    assert float(shifted) < total - 1.5 * 3.0 * (bce(1.0, 1) - bce(20.0, 1)) + 1e-3
    z2 = z.clone()
    z2[1, 6] = z2[2, 0] = z2[5, 0] = float("inf")  # padding: never read
    assert loss(z2, mask, y, w) == pytest.approx(total, rel=1e-5)
    first = [0, 1, 3, 4]  # rows whose first position is real: a batch one pass wide has no window anywhere
    one = mask[first, :1].clone()
    assert loss(z[first, :1], one, y[first], w[first]) == pytest.approx(oracle(z[first, :1], one, y[first], w[first]))
    empty = mask.clone()
    empty[4] = 0  # a row with no real token adds nothing
    rest = [0, 1, 2, 3, 5]
    assert loss(z, empty, y, w) == pytest.approx(oracle(z[rest], mask[rest], y[rest], w[rest]), rel=1e-5)
    with pytest.raises(ValueError, match="consecutive <= early"):
        stop_loss(z, mask, y, early=consecutive - 1, consecutive=consecutive)
