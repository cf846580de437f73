"""Probe families and baselines as plain modules: sizes, masking, gradients, MULI features."""

import numpy as np
import pytest
import torch

from singlepass.models.baselines import FixedReadoutProbe, MuliProbe, last_token_onehot
from singlepass.models.probes import POOLS, count_parameters
from singlepass.models.registry import FAMILIES, METHODS, build_any, build_method, head_only

STATE_METHODS = [m for m in METHODS if m != "muli"]
PARAMS = {"pooling": {}, "gate": {}, "mha": {"factor": 4, "heads": 4}, "last-token": {}, "mean-final": {}}


def test_parameter_counts_match_the_paper_for_llama_3_2_3b():
    L, d = 28, 3072  # Llama-3.2-3B: 28 decoder layers -> L+1 = 29 stacked states
    with torch.device("meta"):
        gate = build_method("gate", L + 1, d, 2)
        mha = build_method("mha", L + 1, d, 2, factor=32, heads=8)
        pool = build_method("pooling", L + 1, d, 2)
        last = build_method("last-token", L + 1, d, 2)
        muli = build_method("muli", L + 1, d, 2, vocab_size=128256)
        gate6 = build_method("gate", L + 1, d, 6)
        mha_learned = build_method("mha", L + 1, d, 2, factor=32, heads=8, query="learned")
    head = d + 1
    assert count_parameters(gate) == (L + 2) * d + head == 95_233  # "0.10M"
    assert count_parameters(gate6) == (L + 2) * d + 6 * d + 6
    d_inner = d // 32
    weights, biases = (L + 2) * 4 * d * d_inner, (L + 2) * (3 * d_inner + d)
    assert weights == 35_389_440  # the paper's 35.39M, without biases
    assert count_parameters(mha) == weights + biases + head
    # query="learned": no query projections in stage 1, a learned query per head and layer instead
    learned = (L + 1) * 3 * d * d_inner + 4 * d * d_inner + (L + 1) * d_inner + 3 * d_inner + (L + 2) * d
    assert count_parameters(mha_learned) == learned + head == count_parameters(mha) - (L + 1) * (d + 2) * d_inner
    assert count_parameters(pool) == count_parameters(last) == head
    assert count_parameters(muli) == 128256 + 1


def random_batch(L1=4, B=3, T=9, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = [9, 5, 2][:B]
    states = torch.randn(L1, B, T, d, generator=g) * 3
    states[:, :, 0] *= 50  # a "massive activation" on the first token
    return states, lengths


def pad(states, lengths, T, side, garbage):
    """Row j's first lengths[j] tokens placed left/right in a [L1, B, T, d] batch; padding filled
    with large random garbage (it must not matter)."""
    L1, B, _, d = states.shape
    out = torch.randn(L1, B, T, d, generator=torch.Generator().manual_seed(7)) * garbage
    mask = torch.zeros(B, T, dtype=torch.int64)
    for j, n in enumerate(lengths):
        sl = slice(T - n, T) if side == "left" else slice(0, n)
        out[:, j, sl] = states[:, j, :n]
        mask[j, sl] = 1
    return out, mask


@pytest.mark.parametrize("method", STATE_METHODS)
def test_padding_never_changes_the_output(method):
    torch.manual_seed(0)
    probe = build_method(method, 4, 16, 2, **PARAMS[method]).eval()
    states, lengths = random_batch()
    ref = torch.cat([probe(*pad(states[:, j : j + 1], [n], n, "right", 0.0)) for j, n in enumerate(lengths)])
    for side in ("left", "right"):
        for T, garbage in ((9, 1e3), (14, 1e4)):
            out = probe(*pad(states, lengths, T, side, garbage))
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["gate", "mha", "pooling"])
def test_standardised_inputs_are_masked_and_use_the_given_statistics(method):
    torch.manual_seed(0)
    probe = build_method(method, 4, 16, 2, input_norm="standard", **PARAMS[method]).eval()
    mean, std = torch.randn(4, 16), torch.rand(4, 16) + 0.5
    probe.set_input_statistics(mean, std)
    states, lengths = random_batch()
    ref = torch.cat([probe(*pad(states[:, j : j + 1], [n], n, "right", 0.0)) for j, n in enumerate(lengths)])
    torch.testing.assert_close(probe(*pad(states, lengths, 14, "left", 1e4)), ref, rtol=1e-4, atol=1e-5)
    x, m = probe.prepare(states, torch.ones(3, 9))
    r = states / states.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
    torch.testing.assert_close(x, (r - mean[:, None, None]) / std[:, None, None], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="input_norm"):
        build_method(method, 4, 16, 2, input_norm="layer", **PARAMS[method])
    assert count_parameters(probe) == count_parameters(build_method(method, 4, 16, 2, **PARAMS[method]))


def test_topk_token_pooling_is_the_mean_of_each_dimensions_strongest_real_tokens():
    """MultiMax-style pooling: per layer and dimension, the mean of the top_k largest values over the
    real tokens (all of them when a row is shorter); top_k=1 is max pooling; padding never counts."""
    torch.manual_seed(0)
    states, lengths = random_batch()
    for k in (1, 3, 20):
        probe = build_method("pooling", 4, 16, 2, token_pool="topk", top_k=k, input_norm="none").eval()
        x, mask = pad(states, lengths, 12, "left", 1e4)
        got = probe.tokens(x, mask.float()[None, :, :, None], slice(0, 4))  # [L+1, B, d]
        for j, n in enumerate(lengths):
            top = states[:, j, :n].sort(dim=1, descending=True).values[:, : min(k, n)]  # [L+1, k', d]
            torch.testing.assert_close(got[:, j], top.mean(1))
    mx = build_method("pooling", 4, 16, 2, token_pool="max").eval()
    one = build_method("pooling", 4, 16, 2, token_pool="topk", top_k=1).eval()
    one.load_state_dict(mx.state_dict())
    torch.testing.assert_close(
        one(*pad(states, lengths, 12, "right", 1e4)), mx(*pad(states, lengths, 12, "right", 1e4))
    )
    for bad in (0, 2.5, "4"):
        with pytest.raises(ValueError, match="top_k"):
            build_method("pooling", 4, 16, 2, token_pool="topk", top_k=bad)
    with pytest.raises(ValueError, match="token_pool"):
        build_method("pooling", 4, 16, 2, token_pool="multi")


@pytest.mark.parametrize("top_k", [2, 64])  # 64: more than two of the three prompts hold
def test_topk_pooling_exports_to_onnx_equal_to_both_torch_forms(tiny_backbone, top_k):
    """The tiny model's real hidden states: forward (stacked), forward_layers (the exported form) and
    the exported ONNX probe graph agree on padded batches of other sizes than the trace's, prompts
    shorter than top_k included (the graph's TopK takes any sequence length)."""
    import onnxruntime as ort

    from singlepass.export.fuse import export_probe, state_names
    from singlepass.models.extract import extract

    texts = ["hi", "a longer prompt about foxes and dogs and cats", "what is the capital of France?"]
    states, mask, _ = extract(tiny_backbone, texts)  # [L+1, B, T, d], [B, T]
    L1, d = states.shape[0], states.shape[-1]
    torch.manual_seed(0)
    probe = build_method("pooling", L1, d, 2, token_pool="topk", top_k=top_k, input_norm="standard").eval()
    probe.set_input_statistics(torch.randn(L1, d) * 0.1, torch.rand(L1, d) + 0.5)
    with torch.no_grad():
        probe.head.weight.normal_(0, 0.5)
    graph = export_probe(probe, "hidden_states", L1, d, tiny_backbone.model.config.vocab_size, 18)
    sess = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref = probe(states, mask)
        torch.testing.assert_close(probe.forward_layers(list(states), mask), ref, rtol=1e-5, atol=1e-6)
    feed = {n: states[i].numpy() for i, n in enumerate(state_names(L1))} | {"mask": mask.numpy()}
    logits = sess.run(["logits"], {k: v for k, v in feed.items() if k in {i.name for i in sess.get_inputs()}})[0]
    np.testing.assert_allclose(logits, ref.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["mha", "pooling"])
@pytest.mark.parametrize("pool", ["max"])
def test_max_pooling_variants_are_masked_too(method, pool):
    params = {"pool": pool, "factor": 4, "heads": 2} if method == "mha" else {"token_pool": pool, "layer_pool": "max"}
    probe = build_method(method, 4, 16, 3, **params).eval()
    states, lengths = random_batch()
    ref = torch.cat([probe(*pad(states[:, j : j + 1], [n], n, "right", 0.0)) for j, n in enumerate(lengths)])
    torch.testing.assert_close(probe(*pad(states, lengths, 12, "left", 1e4)), ref, rtol=1e-4, atol=1e-5)


def test_fixed_readouts_read_the_final_layer_last_token_and_mean():
    states, lengths = random_batch()
    for side in ("left", "right"):
        x, mask = pad(states, lengths, 11, side, 5.0)
        onehot = last_token_onehot(mask)
        for j, n in enumerate(lengths):
            last = 10 if side == "left" else n - 1
            assert onehot[j].argmax() == last and onehot[j].sum() == 1
        last = FixedReadoutProbe(4, 16, 2, readout="last", input_norm="none")
        mean = FixedReadoutProbe(4, 16, 2, readout="mean", input_norm="none")
        for j, n in enumerate(lengths):
            torch.testing.assert_close(last.features(x, mask)[j], states[-1, j, n - 1])
            torch.testing.assert_close(mean.features(x, mask)[j], states[-1, j, :n].mean(0))


def test_gradient_reaches_every_probe_parameter_and_nothing_else(tiny_backbone):
    from singlepass.models.extract import extract

    states, mask, _ = extract(tiny_backbone, ["hello there", "a longer prompt about foxes and dogs"])
    assert not states.requires_grad  # the frozen LLM's states are constants to the probe
    L1, d = states.shape[0], states.shape[-1]
    for method in STATE_METHODS:
        torch.manual_seed(0)
        probe = build_method(method, L1, d, 2, **({"factor": 4, "heads": 4} if method == "mha" else {}))
        probe(states, mask).sum().backward()
        for name, p in probe.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), (method, name)
            assert p.grad.abs().sum() > 0, (method, name)
        assert head_only(probe) == (method not in ("gate", "mha"))
    assert all(p.grad is None and not p.requires_grad for p in tiny_backbone.model.parameters())


def reference_muli_features(logits: np.ndarray, eps=1e-16) -> np.ndarray:
    """The official MULI transform in numpy (float64): log p - log(1-p), clamped."""
    z = logits - logits.max(1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    return np.log(np.clip(p, eps, None)) - np.log(np.clip(1 - p, eps, None))


def test_muli_transform_and_standardisation_match_a_numpy_reference():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(40, 50, generator=g) * 4
    logits[:, 7] = 3.0  # a token whose log-odds still vary (softmax denominators differ)
    m = MuliProbe(vocab_size=50, num_classes=2)
    raw = m.transform(logits)
    ref = reference_muli_features(logits.double().numpy())
    np.testing.assert_allclose(raw.numpy(), ref, rtol=1e-4, atol=1e-3)
    const = torch.cat([raw[:, :10], torch.full((40, 1), -5.0), raw[:, 11:]], 1)  # feature 10: zero std
    kept = m.fit_standardisation(const)
    assert kept == 49 and m.inv_std[10] == 0
    z = m.standardise(const)
    assert torch.all(z[:, 10] == 0)
    keep = torch.arange(50) != 10
    torch.testing.assert_close(z[:, keep].mean(0), torch.zeros(49), atol=1e-5, rtol=0)
    torch.testing.assert_close(z[:, keep].std(0, unbiased=False), torch.ones(49), atol=1e-4, rtol=0)
    # one row alone gives the same logit as inside a batch (no batch statistics at inference)
    torch.testing.assert_close(m(logits[3:4]), m(logits)[3:4])


def test_build_any_covers_every_method_and_rejects_unknown_ones():
    for method in METHODS:
        params = {"vocab_size": 30} if method == "muli" else {"factor": 4, "heads": 2} if method == "mha" else {}
        cfg = {"probe": method, "num_layers": 3, "hidden_size": 16, "label_names": ["a", "b", "c"], "params": params}
        mod = build_any(cfg)
        assert mod.head.out_features == 3
    with pytest.raises(ValueError, match="unknown probe type"):
        build_any({"probe": "svm", "num_layers": 3, "hidden_size": 16, "label_names": ["a", "b"], "params": {}})
    with pytest.raises(ValueError):
        build_method("mha", 3, 16, 2, factor=3)  # 16 / 3 is not an integer width


def test_family_descriptors_declare_what_their_modules_do():
    """Each --probe choice's descriptor (input kind, head-only training, layer weights) matches the
    module it builds, at its defaults and at sampled search points."""
    assert METHODS == ("pooling", "gate", "mha", "muli", "last-token", "mean-final")  # the CLI choices
    rng = np.random.default_rng(0)
    for name, family in FAMILIES.items():
        assert family.name == name and family.input in ("hidden_states", "logits")
        draws = [family.default_params(64)] + (
            [family.sample_params(64, rng) for _ in range(4)] if family.sample_params else []
        )
        for params in draws:
            params = {**params, **{k: 30 for k in family.from_backbone}}  # vocab_size for MULI
            torch.manual_seed(0)
            module = family.build(3, 64, 2, **params).eval()
            assert head_only(module) == family.head_only, name
            assert hasattr(module, "layer_weights") == family.layer_weights, name
            if family.input == "logits":
                out = module(torch.randn(4, 30))
            else:
                out = module(torch.randn(3, 4, 5, 64), torch.ones(4, 5, dtype=torch.int64))
            assert out.shape == (4, 1), name
        assert family.fit_buffers is None or family.head_only  # self-standardising features are precomputed
        assert family.recipe is None or family.sample_params is None  # a fixed recipe is never searched


PER_LAYER_CASES = (
    [("pooling", {"token_pool": t, "layer_pool": lp}) for t in ("mean", "max") for lp in ("mean", "max")]
    + [("pooling", {"token_pool": "mean", "input_norm": n}) for n in ("standard", "none")]
    + [("pooling", {"token_pool": "topk", "top_k": k, "input_norm": "standard"}) for k in (1, 3, 20)]
    + [("gate", {"input_norm": n}) for n in ("standard", "rms", "none")]
    + [("mha", {"factor": 4, "heads": 2, "pool": p, "input_norm": "standard"}) for p in ("mean", "max")]
    + [("mha", {"factor": 8, "heads": 1, "pool": "mean", "input_norm": n}) for n in ("none", "rms")]
    + [("mha", {"factor": 4, "heads": 2, "pool": p, "query": "learned", "input_norm": "standard"}) for p in POOLS]
    + [("mha", {"factor": 2, "heads": 8, "query": "learned", "input_norm": "none"})]
    + [("last-token", {}), ("mean-final", {})]
)


@pytest.mark.parametrize("method,params", PER_LAYER_CASES, ids=lambda c: str(c))
def test_per_layer_form_equals_the_stacked_form(method, params):
    """forward_layers (the exported form: stage 1 one layer at a time, reading the states as they are,
    the normalisation moved onto the products where a family does) is forward on the stacked states."""
    torch.manual_seed(0)
    probe = build_method(method, 4, 16, 3, **params).eval()
    if params.get("input_norm") == "standard":
        probe.set_input_statistics(torch.randn(4, 16), torch.rand(4, 16) + 0.5)
    states, lengths = random_batch()
    for side in ("left", "right"):
        x, mask = pad(states, lengths, 12, side, 1e4)
        ref = probe(x, mask)
        torch.testing.assert_close(probe.forward_layers(list(x), mask), ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="reads 4 layers"):
        probe.forward_layers(list(x[:3]), mask)


@pytest.mark.parametrize(
    "method,params",
    [c for c in PER_LAYER_CASES if c[0] in ("pooling", "gate", "mha") and c[1].get("input_norm") != "none"],
    ids=lambda c: str(c),
)
def test_per_layer_form_reads_the_decoders_own_norms(method, params):
    """forward_layers with gains (the fused prefill form where the decoder RMS-normalises a layer: the probe
    reads x / rms(x) * gain, in blocks of 2 or one layer at a time, a layer without a gain as it is, here
    layers 1 and 3: a block of both kinds) is forward on the states. A probe without an RMS step takes no
    gains, and a gain per layer is needed."""
    import torch.nn.functional as F

    from singlepass.models.probes import RMS_EPS

    torch.manual_seed(0)
    probe = build_method(method, 4, 16, 3, **params).eval()
    if params.get("input_norm") == "standard":
        probe.set_input_statistics(torch.randn(4, 16), torch.rand(4, 16) + 0.5)
    states, lengths = random_batch()
    gains = [torch.randn(16), None, torch.rand(16) + 0.1, None]
    for side in ("left", "right"):
        x, mask = pad(states, lengths, 12, side, 1e4)
        given = [F.rms_norm(h, (16,), eps=RMS_EPS) * g if g is not None else h for h, g in zip(x, gains)]
        for block in (1, 2) if probe.blockable else (1,):
            got = probe.forward_layers(given, mask, block, gains)
            torch.testing.assert_close(got, probe(x, mask), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="reads 4 layers"):
        probe.forward_layers(given, mask, 1, gains[:3])
    plain = build_method(method, 4, 16, 3, **(params | {"input_norm": "none"}))
    with pytest.raises(ValueError, match="input_norm='none' reads the states as they are"):
        plain.forward_layers(list(x), mask, 1, gains)


@pytest.mark.parametrize(
    "method,params", [c for c in PER_LAYER_CASES if c[0] in ("pooling", "gate", "mha")], ids=lambda c: str(c)
)
def test_features_read_the_states_as_they_are_and_train_as_the_normalised_form(method, params):
    """``features`` (what training runs: ``tokens_raw`` on the stacked states, no normalised copy) is stage 1 on
    normalised states (``tokens(*prepare(...))``), in value and in every parameter's gradient."""
    torch.manual_seed(0)
    probe = build_method(method, 4, 16, 3, **params)
    if params.get("input_norm") == "standard":
        probe.set_input_statistics(torch.randn(4, 16), torch.rand(4, 16) + 0.5)
    states, lengths = random_batch()
    x, mask = pad(states, lengths, 12, "left", 1e4)
    reference = lambda: probe.combine(probe.tokens(*probe.prepare(x, mask), slice(0, 4)))  # noqa: E731
    grads = []
    for f in (lambda: probe.features(x, mask), reference):
        probe.zero_grad()
        out = f()
        probe.head(out).pow(2).sum().backward()
        grads.append((out.detach(), {n: p.grad.clone() for n, p in probe.named_parameters() if p.grad is not None}))
    (raw, g_raw), (ref, g_ref) = grads
    torch.testing.assert_close(raw, ref, rtol=1e-5, atol=1e-5)
    assert g_raw.keys() == g_ref.keys() and g_raw
    for name in g_ref:
        torch.testing.assert_close(g_raw[name], g_ref[name], rtol=1e-4, atol=1e-5, msg=name)


LEARNED = {"factor": 4, "heads": 2, "query": "learned"}


def test_mha_learned_query_pools_each_layer_by_attention_and_masks_padding():
    """query="learned": each head of each layer is a softmax(q . k_t / sqrt(dh))-weighted average of its
    values, then the output projection: checked against a plain per-token computation. Padding never
    counts; query="tokens" keeps the saved parameter layout; bad values are refused."""
    torch.manual_seed(0)
    probe = build_method("mha", 4, 16, 3, input_norm="none", **LEARNED).eval()
    with torch.no_grad():
        probe.queries.mul_(3.0)
        probe.b_o.normal_()
    states, lengths = random_batch()
    x, mask = pad(states, lengths, 12, "left", 1e4)
    got = probe.tokens(x, mask.float()[None, :, :, None], slice(0, 4))  # [L+1, B, d]
    H, dh = 2, 2
    for j, n in enumerate(lengths):
        for layer in range(4):
            h = states[layer, j, :n]  # [n, d]: the row's real tokens
            kv = h @ probe.w_kv[layer]  # [n, 2 * d_inner]
            k, v = kv[:, :4].reshape(n, H, dh), kv[:, 4:].reshape(n, H, dh)
            a = torch.softmax(torch.einsum("the,he->ht", k, probe.queries[layer]) / dh**0.5, dim=-1)  # [H, n]
            o = torch.einsum("ht,the->he", a, v).reshape(-1)  # [d_inner]
            want = o @ probe.w_o[layer] + probe.b_o[layer]
            torch.testing.assert_close(got[layer, j], want, rtol=1e-4, atol=1e-4)
    ref = torch.cat([probe(*pad(states[:, j : j + 1], [n], n, "right", 0.0)) for j, n in enumerate(lengths)])
    torch.testing.assert_close(probe(x, mask), ref, rtol=1e-4, atol=1e-5)
    assert probe.streamable and not build_method("mha", 4, 16, 3, factor=4, heads=2).streamable
    shapes = {n: tuple(p.shape) for n, p in probe.named_parameters()}
    assert shapes == {
        "queries": (4, 2, 2),  # [L+1, H, dh]
        "w_kv": (4, 16, 8),  # [L+1, d, 2 * d_inner]: k, then v
        "w_qkv": (1, 16, 12),  # stage 2 only
        "b_qkv": (1, 12),
        "w_o": (5, 4, 16),  # [L+2, d_inner, d]
        "b_o": (5, 16),
        "head.weight": (3, 16),
        "head.bias": (3,),
    }
    tokens = build_method("mha", 4, 16, 3, factor=4, heads=2, query="tokens")
    assert {n: tuple(p.shape) for n, p in tokens.named_parameters()} == {
        "w_qkv": (5, 16, 12),
        "b_qkv": (5, 12),
        "w_o": (5, 4, 16),
        "b_o": (5, 16),
        "head.weight": (3, 16),
        "head.bias": (3,),
    }
    with pytest.raises(ValueError, match="query must be one of tokens, learned"):
        build_method("mha", 4, 16, 3, factor=4, heads=2, query="mean")


def test_mha_learned_query_trains_its_queries():
    torch.manual_seed(0)
    probe = build_method("mha", 4, 16, 2, input_norm="rms", **LEARNED)
    states, lengths = random_batch()
    x, mask = pad(states, lengths, 10, "right", 0.0)
    y = torch.tensor([1.0, 0.0, 1.0])
    before = {n: p.detach().clone() for n, p in probe.named_parameters()}
    opt = torch.optim.AdamW(probe.parameters(), lr=1e-2)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(probe(x, mask)[:, 0], y)
    loss.backward()
    for name, p in probe.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    opt.step()
    assert all(not torch.equal(p, before[n]) for n, p in probe.named_parameters())  # the queries included


def test_set_query_learned_reaches_every_trial_and_survives_save_and_load(tmp_path):
    """--set query=learned: every trial of a seeded MHA search builds with it (pool, drawn, is stage 2's);
    the saved config.json keeps it, so load_probe rebuilds the same streaming probe."""
    from singlepass.models.probe_io import load_probe, save_probe
    from singlepass.models.search import trial_plan

    plan = trial_plan("mha", 16, 6, seed=0, overrides={"query": "learned"})
    assert all(hp.params["query"] == "learned" for hp in plan)
    assert {hp.params["pool"] for hp in plan} == set(POOLS)  # the draws are unchanged
    for hp in plan:
        assert build_method("mha", 4, 16, 2, **hp.params).streamable
    assert "query" not in trial_plan("mha", 16, 3, seed=0)[1].params  # a constructor choice, not a draw
    torch.manual_seed(0)
    params = {**LEARNED, "input_norm": "standard"}
    probe = build_method("mha", 4, 16, 2, **params).eval()
    probe.set_input_statistics(torch.randn(4, 16), torch.rand(4, 16) + 0.5)
    cfg = {
        "probe": "mha",
        "params": params,
        "num_layers": 4,
        "hidden_size": 16,
        "label_names": ["no", "yes"],
        "threshold": 0.5,
        "prompt_format": "chat",
        "max_length": 64,
        "backbone": {"name": "x", "sha256": "ab" * 32, "num_hidden_layers": 3, "hidden_size": 16},
    }
    save_probe(tmp_path / "p", probe, cfg)
    loaded, cfg2 = load_probe(tmp_path / "p", cfg["backbone"])
    assert cfg2["params"]["query"] == "learned" and loaded.query == "learned" and loaded.streamable
    states, lengths = random_batch()
    x, mask = pad(states, lengths, 10, "left", 1e3)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, mask), probe(x, mask), rtol=0, atol=0)
        state = loaded.stream_update(loaded.stream_init(3), list(x), mask)
        torch.testing.assert_close(loaded.stream_logits(state), probe(x, mask), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("opset", [18, 23])
@pytest.mark.parametrize("norm", ["standard", "rms", "none"])
def test_mha_per_layer_graph_equals_torch_at_each_opset(opset, norm):
    """The MHA's per-layer form (``MHAProbe.features_layers``: query=tokens, mean pooling) exported
    as the fused artifacts export it: opset 23 normalises with one RMSNormalization per layer (the
    TorchScript ``rms_norm`` symbolic in export/fuse.py), opset 18 with its decomposition; both
    equal the torch probe on a padded batch of another size than the trace's."""
    import onnxruntime as ort

    from singlepass.export.fuse import export_probe, state_names

    torch.manual_seed(0)
    probe = build_method("mha", 4, 16, 2, factor=4, heads=2, pool="mean", input_norm=norm).eval()
    if norm == "standard":
        probe.set_input_statistics(torch.randn(4, 16), torch.rand(4, 16) + 0.5)
    with torch.no_grad():
        probe.b_qkv.normal_(0, 0.5)  # the folded biases must carry the score scale and the affine shift
    graph = export_probe(probe, "hidden_states", 4, 16, 100, opset)
    ops = [n.op_type for n in graph.graph.node]
    assert ops.count("RMSNormalization") == (4 if opset >= 23 and norm != "none" else 0)
    # one attention per layer (opset 23: one Attention node each; 18: its decomposition) + stage 2's
    assert (ops.count("Attention"), ops.count("Softmax")) == ((4, 1) if opset >= 23 else (0, 5))
    sess = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    states, lengths = random_batch(seed=1)  # 3 rows of 9 / 5 / 2 tokens
    x, mask = pad(states, lengths, 12, "left", 1e4)
    with torch.no_grad():
        ref = probe(x, mask).numpy()
    feed = {n: x[i].numpy() for i, n in enumerate(state_names(4))} | {"mask": mask.numpy()}
    (logits,) = sess.run(["logits"], feed)
    np.testing.assert_allclose(logits, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("norm", ["standard", "rms", "none"])
@pytest.mark.parametrize("block", [1, 2])
def test_gate_per_layer_graph_reads_each_layer_once(norm, block):
    """The gate's exported prompt form (``GateProbe.forward_layers``: the streaming readout) reads each layer
    through one product with its [token gate | stage-2 gate | head] weights, where the summaries' form read
    it twice (its scores, then its weighted sum); fed the decoder's norms (gains) or the states, in blocks
    or per layer, it equals the torch probe on a padded batch of another size than the trace's, and its
    logits are [batch, C'] with C' known."""
    import onnxruntime as ort
    import torch.nn.functional as F

    from singlepass.export.fuse import export_probe, state_names
    from singlepass.models.probes import RMS_EPS

    torch.manual_seed(0)
    probe = build_method("gate", 4, 16, 3, input_norm=norm).eval()
    if norm == "standard":
        probe.set_input_statistics(torch.randn(4, 16), torch.rand(4, 16) + 0.5)
    gains = None if norm == "none" else [torch.rand(16) + 0.5, None, torch.rand(16) + 0.5, torch.rand(16) + 0.5]
    graph = export_probe(probe, "hidden_states", 4, 16, 100, 23, block=block, gains=gains)
    readers = {n: [x.op_type for x in graph.graph.node if n in x.input] for n in state_names(4)}
    # a layer given as it is (no gain) is RMS-normalised once first, then read by the one product
    assert all(ops in (["MatMul"], ["RMSNormalization"]) for ops in readers.values()), readers
    logits_dims = [d.dim_value for d in graph.graph.output[0].type.tensor_type.shape.dim]
    assert logits_dims[1] == probe.head.out_features
    sess = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    states, lengths = random_batch(seed=1)  # 3 rows of 9 / 5 / 2 tokens
    for side in ("left", "right"):
        x, mask = pad(states, lengths, 12, side, 1e4)
        with torch.no_grad():
            ref = probe(x, mask).numpy()
        given = [F.rms_norm(h, (16,), eps=RMS_EPS) * g if g is not None else h for h, g in zip(x, gains or [None] * 4)]
        feed = {n: given[i].numpy() for i, n in enumerate(state_names(4))} | {"mask": mask.numpy()}
        (logits,) = sess.run(["logits"], feed)
        np.testing.assert_allclose(logits, ref, rtol=1e-4, atol=1e-5)


def test_gate_per_layer_form_reads_a_row_without_real_tokens_as_the_bias():
    """A row whose mask is all 0 (never fed by the runtime): the streaming readout's empty state, the head's
    bias, where ``forward`` averages the padding; rows with tokens beside it are unchanged."""
    torch.manual_seed(0)
    probe = build_method("gate", 4, 16, 3).eval()
    states, lengths = random_batch(seed=2)
    x, mask = pad(states, lengths, 12, "right", 1e4)
    mask[1] = 0
    with torch.no_grad():
        got = probe.forward_layers(list(x), mask)
        ref = probe(x, mask)
    torch.testing.assert_close(got[1], probe.head.bias.detach())
    torch.testing.assert_close(got[[0, 2]], ref[[0, 2]], rtol=1e-5, atol=1e-5)
