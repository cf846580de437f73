"""Every stage on the architectures beyond Llama (tests/tiny.py: tiny random Qwen2, Qwen3, Mistral,
Gemma 2, Gemma 3 and Phi-3 decoders built locally, each with what makes it differ switched on).

Per architecture, `singlepass train` (a gate probe, one short trial on ToxicChat rows) and one
`singlepass export` (that probe, a random gate and a random MULI probe), which validates itself against
PyTorch through the runtime's passes (prefill under left and right padding, probe probabilities
<= 1e-4, logits <= 1e-3, 20 greedy decode steps with identical tokens); then hidden states from the
graph against transformers' ``output_hidden_states``, the runtime's generation against
transformers' ``generate``, and a GGUF round trip (tests/gguf_writer.py) loaded as a user would.
"""

import json

import numpy as np
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
import torch
from cli_args import export_argv, train_argv
from export_helpers import make_probe, mlp_graph, ort_feed
from tiny import ARCHITECTURES, WINDOW, build_tiny

from singlepass.cli import main
from singlepass.errors import SinglepassError
from singlepass.runtime.batching import pad_batch

TEXTS = [
    "What is the capital of France?",
    "I hate this, it is the worst thing ever and I am angry.",
    "Hi",
    "The quick brown fox jumps over the lazy dog.",
]
SLIDING = ("mistral", "gemma2", "gemma3")  # a 4-token window in the tiny configs


@pytest.fixture(scope="module", params=ARCHITECTURES)
def arch(request, tmp_path_factory, cache_dir):
    """-> (name, model folder, backbone, artifact folder): the tiny model exported once with probes."""
    from singlepass.models.backbone import load_backbone

    name = request.param
    root = tmp_path_factory.mktemp(name)
    folder = build_tiny(name, root / "model")
    backbone = load_backbone(str(folder), cache_dir=str(cache_dir))
    tox = make_probe(root / "tox", backbone, "gate")
    muli = make_probe(root / "muli", backbone, "muli", seed=1)
    # a probe trained by `singlepass train` (extraction through the hidden-state cache, 1 short trial)
    argv = train_argv(folder, cache_dir, "gate", 96, "--out", root / "trained", "--trials", 1, "--epochs", 1)
    assert main(argv) == 0
    out = root / "art"
    probes = (tox, muli, f"{root / 'trained'}:trained")
    extra = ["--max-prompt-length", 128, "--keep-hidden-states"]  # validated too (relative error <= 1e-4)
    extra += ["--kv-cache", "concat" if name in SLIDING else "inplace"]  # in place: no window (export/kvcache.py)
    assert main(export_argv(folder, cache_dir, out, *probes, extra=extra)) == 0
    return name, folder, backbone, out


def manifest(art):
    return json.loads((art / "manifest.json").read_text())


def hf_forward(backbone, ids, mask, pos):
    with torch.no_grad():
        return backbone.model(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            position_ids=torch.from_numpy(pos),
            output_hidden_states=True,
        )


def test_export_validates_against_pytorch(arch):
    """The export's own parity run: left and right padding, 20 greedy steps, the issue's tolerances."""
    name, _, backbone, art = arch
    m = manifest(art)
    v = json.loads((art / "validation.json").read_text())
    assert m["backbone"]["model_type"] == backbone.model.config.model_type
    assert m["validation"]["passed"] and not v["token_mismatches"]
    cases = {c["case"] for c in v["checks"]}
    if m["graph"]["kv_update"] == "inplace":  # rows are prefixes: right padding only
        assert "prefill right B=4" in cases and not any("left" in c for c in cases)
    else:
        assert {"prefill left B=4", "prefill right B=4"} <= cases
    assert len(v["decode_tokens"]["onnxruntime"][0]) == 21  # prefill + 20 greedy steps
    assert v["decode_tokens"]["onnxruntime"] == v["decode_tokens"]["pytorch"]
    diffs = v["max_abs_diff"]
    assert max(diffs[f"{p}/probs"] for p in ("tox", "muli", "trained")) <= 1e-4 and diffs["logits"] <= 1e-3


def test_graph_hidden_states_follow_transformers(arch):
    """Hidden state i of the graph is transformers' ``output_hidden_states[i]`` (0: the embedding
    output, Gemma's scaled one; L: the final-norm output the lm_head reads), under left and right
    padding, and the fused probe agrees with the torch probe on them."""
    from singlepass.models.probe_io import load_probe
    from singlepass.models.probes import probabilities
    from singlepass.models.prompts import encode

    name, folder, backbone, art = arch
    m = manifest(art)
    assert m["validation"]["max_abs_diff"]["hidden_states"] <= 1e-4  # relative, every validation case
    sess = ort.InferenceSession(str(art / "model.onnx"), providers=["CPUExecutionProvider"])
    module, _ = load_probe(art / "probes" / "tox", backbone.fingerprint)
    enc = encode(backbone.tokenizer, TEXTS, "chat", 128)
    L = backbone.num_layers
    inplace = m["graph"]["kv_update"] == "inplace"  # export/kvcache.py: rows are prefixes (right padding)
    for side in ("right",) if inplace else ("left", "right"):
        ids, mask, pos = pad_batch(enc.ids, backbone.tokenizer.pad_token_id, side)
        got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, ort_feed(m, ids, mask, pos))))
        ref = hf_forward(backbone, ids, mask, pos)
        hs = torch.stack(ref.hidden_states).numpy()
        real = mask.astype(bool)
        assert got["hidden_states"].shape == (L + 1, *ids.shape, backbone.hidden_size)
        np.testing.assert_allclose(got["hidden_states"][:, real], hs[:, real], rtol=1e-4, atol=1e-4)
        # the graph returns the last position (in place: each row's last token)
        last = np.ones(len(ids), bool) if inplace else real[:, -1]
        at = real.sum(1) - 1 if inplace else np.full(len(ids), ids.shape[1] - 1)
        want = ref.logits.numpy()[np.arange(len(ids)), at]
        np.testing.assert_allclose(got["logits"][last, 0], want[last], rtol=0, atol=1e-3)
        with torch.no_grad():
            want = probabilities(module(torch.stack(ref.hidden_states), torch.from_numpy(mask))).numpy()
        np.testing.assert_allclose(got["tox/probs"], want, rtol=0, atol=1e-4)
    # hidden state L is what the lm_head reads (then Gemma 2's soft-cap)
    with torch.no_grad():
        logits = backbone.model.lm_head(torch.from_numpy(hs[L]))
        cap = getattr(backbone.model.config, "final_logit_softcapping", None)
        logits = torch.tanh(logits / cap) * cap if cap else logits
    np.testing.assert_allclose(logits.numpy()[real], ref.logits.numpy()[real], atol=1e-4)


def test_stream_ends_are_found_by_structure(arch):
    """Gemma: the stream starts at the Mul scaling the embedding; Gemma 2: the logits are the
    soft-capped lm_head output. The others: the Gather output and the lm_head output. And the
    stream's norms that TensorRT engines pin to fp32."""
    from singlepass.export import surgery
    from singlepass.export.llm import export_decoder
    from singlepass.export.tensorrt import name_nodes, normalisation_nodes

    name, _, backbone, _ = arch
    graph = gs.import_onnx(export_decoder(backbone.model, cache_key=backbone.fingerprint["sha256"]))
    s = surgery.find_residual_stream(graph, expected_layers=backbone.num_layers)
    tensors = graph.tensors()
    start = surgery.producer(tensors[s.embedding])
    assert start.op == ("Mul" if name.startswith("gemma") else "Gather")
    tail = []
    t = tensors[s.logits]
    while surgery.producer(t).op not in ("MatMul", "Gemm"):
        tail.append(surgery.producer(t).op)
        t = surgery.producer(t).inputs[0]
    assert ("Tanh" in tail) == (name == "gemma2")
    # the norms a reduced-precision engine keeps in fp32: two per layer + the final one; Gemma's
    # post-attention and post-feed-forward norms (before the residual adds) too
    name_nodes(graph)
    pinned = set(normalisation_nodes(graph, s))
    reductions = sum(n.op in ("ReduceMean", "RMSNormalization") for n in graph.nodes if n.name in pinned)
    assert reductions == (4 if name.startswith("gemma") else 2) * backbone.num_layers + 1


@pytest.mark.parametrize("arch", SLIDING, indirect=True)
def test_sliding_window_is_in_the_graph(arch):
    """Beyond the window the graph matches the windowed model and not the same model without a
    window (so the parity above did test the window)."""
    _, _, backbone, art = arch
    m = manifest(art)
    sess = ort.InferenceSession(str(art / "model.onnx"), providers=["CPUExecutionProvider"])
    enc_ids = [[5 + (7 * i + j) % 250 for j in range(n)] for i, n in enumerate((3 * WINDOW, 5 * WINDOW))]
    ids, mask, pos = pad_batch(enc_ids, backbone.tokenizer.pad_token_id, "left")
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, ort_feed(m, ids, mask, pos))))
    windowed = hf_forward(backbone, ids, mask, pos).logits[:, -1].numpy()
    cfg = backbone.model.config
    before = cfg.sliding_window
    cfg.sliding_window = 10_000  # the same weights, the window wider than the prompts
    try:
        unwindowed = hf_forward(backbone, ids, mask, pos).logits[:, -1].numpy()
    finally:
        cfg.sliding_window = before
    np.testing.assert_allclose(got["logits"][:, -1], windowed, rtol=0, atol=1e-3)
    assert np.abs(got["logits"][:, -1] - unwindowed).max() > 1e-2


@pytest.mark.parametrize("arch", ["gemma2"], indirect=True)
def test_soft_capping_is_in_the_graph(arch):
    """Gemma 2's attention and final-logit soft-caps (2 and 3 in the tiny config) are in the graph:
    it matches the model, and not the same model with either cap switched off."""
    _, _, backbone, art = arch
    m = manifest(art)
    sess = ort.InferenceSession(str(art / "model.onnx"), providers=["CPUExecutionProvider"])
    ids, mask, pos = pad_batch([[5 + (3 * j) % 250 for j in range(n)] for n in (9, 14)], 2, "left")
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, ort_feed(m, ids, mask, pos))))["logits"][:, -1]
    model, cfg = backbone.model, backbone.model.config
    attn = [layer.self_attn for layer in model.model.layers]
    np.testing.assert_allclose(got, hf_forward(backbone, ids, mask, pos).logits[:, -1].numpy(), rtol=0, atol=1e-3)
    caps = (attn[0].attn_logit_softcapping, cfg.final_logit_softcapping)
    try:
        for a in attn:
            a.attn_logit_softcapping = None
        uncapped_attention = hf_forward(backbone, ids, mask, pos).logits[:, -1].numpy()
        for a in attn:
            a.attn_logit_softcapping = caps[0]
        cfg.final_logit_softcapping = None
        uncapped_logits = hf_forward(backbone, ids, mask, pos).logits[:, -1].numpy()
    finally:
        for a in attn:
            a.attn_logit_softcapping = caps[0]
        cfg.final_logit_softcapping = caps[1]
    assert np.abs(got - uncapped_attention).max() > 1e-2 and np.abs(got - uncapped_logits).max() > 1e-2


def test_runtime_generation_equals_transformers_generate(arch):
    """`singlepass generate`'s path (its own chat-template rendering and tokenizer, a left-padded
    batch, KV cache) against transformers' ``apply_chat_template`` and ``generate``: the same
    prompt ids and the same 20 greedy tokens per prompt (past the sliding window too)."""
    from singlepass.models.prompts import encode
    from singlepass.runtime.api import load

    _, _, backbone, art = arch
    rt = load(art, backend="cpu", ignore_eos=True)
    results = rt.generate(TEXTS, 20)
    tok = backbone.tokenizer
    enc = encode(tok, TEXTS, "chat", 128)
    assert [rt.encode(t)[0] for t in TEXTS] == enc.ids  # the family's chat template, rendered without transformers
    ids, mask, _ = pad_batch(enc.ids, tok.pad_token_id, "left")
    with torch.no_grad():
        ref = backbone.model.generate(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            max_new_tokens=20,
            min_new_tokens=20,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
        )[:, ids.shape[1] :]
    for r, want in zip(results, ref.tolist()):
        assert r.error is None, r.error
        assert r.token_ids == want and set(r.labels) == {"tox", "muli", "trained"}


def test_server_serves_what_the_runtime_generates(arch):
    """`singlepass serve` (the real server on a loopback port, continuous batching) with the openai
    client: 4 concurrent chat requests of different lengths, each with the tokens and labels the
    runtime gives the same prompt alone."""
    import asyncio

    import openai
    from test_serve import server

    from singlepass.runtime.api import load

    rt = load(arch[3], backend="cpu", threads=1)
    want = [rt.generate(t, 12) for t in TEXTS]
    with server(runtime=rt) as s:

        async def one(ac, text):
            out = await ac.chat.completions.create(
                model=s.st.name,
                messages=[{"role": "user", "content": text}],
                max_tokens=12,
                temperature=0,
                extra_body={"return_token_ids": True},
            )
            return out.choices[0].model_extra["token_ids"], out.model_extra["singlepass"]["labels"]

        async def everyone():
            async with openai.AsyncOpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=60) as ac:
                return await asyncio.gather(*(one(ac, t) for t in TEXTS))

        got = asyncio.run(everyone())
    for (ids, labels), w in zip(got, want):
        assert ids == w.token_ids
        assert {k: v["label"] for k, v in labels.items()} == {k: v.label for k, v in w.labels.items()}
        assert all(labels[k]["score"] == pytest.approx(v.score, abs=1e-5) for k, v in w.labels.items())


@pytest.mark.parametrize("arch", ["gemma2", "gemma3", "phi3"], indirect=True)
def test_foreign_torchscript_graph_is_recognised(arch, tmp_path, cache_dir):
    """`singlepass export --onnx` on the graph torch.onnx's legacy TorchScript exporter writes (opset
    17, scope names, Constant nodes): the same structure is found and the artifact validates."""
    from export_helpers import foreign_graph

    _, folder, backbone, art = arch
    src = foreign_graph(backbone, tmp_path / "decoder.onnx", "legacy", with_past=True, opset=17)
    out = tmp_path / "art"
    assert main(export_argv(folder, cache_dir, out, art / "probes" / "tox", extra=["--onnx", src])) == 0
    m = manifest(out)
    assert m["graph"]["opset"] == 17 and m["graph"]["kv_cache"] and m["validation"]["passed"]
    assert m["validation"]["max_abs_diff"]["tox/probs"] <= 1e-4


def test_unrecognised_graph_names_architecture_and_structure(arch, tmp_path):
    """A graph whose structure does not match is an error naming the architecture and what is missing."""
    from singlepass.export.pipeline import export_artifact

    _, _, backbone, art = arch
    with pytest.raises(SinglepassError) as e:
        export_artifact(
            tmp_path / "out",
            [str(art / "probes" / "tox")],
            onnx_path=str(mlp_graph(tmp_path / "mlp.onnx")),
            backbone=backbone,
            log=lambda *a: None,
        )
    assert f"cannot recognise the {backbone.model.config.model_type} decoder graph" in str(e.value)
    assert "token-embedding Gather" in str(e.value)


# what transformers loads each GGUF as: llama.cpp writes Mistral as a "llama" file
LOADED_AS = {"mistral": "llama", "gemma3": "gemma3_text"}


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_gguf_round_trip(name, tmp_path, cache_dir):
    """A tiny model written as an F32 GGUF (tests/gguf_writer.py, llama.cpp's layout) and loaded as
    `--model x.gguf` loads it: the same weights, logits, chat template, token ids and hidden states
    (Gemma's too: a Gemma tokenizer is read as GemmaTokenizer, whose reload would re-normalise
    this byte-level vocabulary; the conversion keeps it as transformers read it from the file)."""
    from gguf_writer import write_gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from singlepass.models.backbone import load_backbone
    from singlepass.models.extract import extract, relative_error
    from singlepass.models.prompts import encode

    src = build_tiny(name, tmp_path / "hf", gguf=True)
    backbone = load_backbone(str(write_gguf(src, tmp_path / f"tiny-{name}.gguf")), cache_dir=str(cache_dir))
    ref = AutoModelForCausalLM.from_pretrained(src).eval()
    tok = AutoTokenizer.from_pretrained(src)
    assert backbone.source.kind == "gguf" and backbone.fingerprint["model_type"] == LOADED_AS.get(name, name)
    want, got = ref.state_dict(), backbone.model.state_dict()
    assert set(got) == set(want)
    for k in want:  # exact but for Gemma's norms, stored as 1 + w
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6)
    assert backbone.tokenizer.chat_template == tok.chat_template
    ids = torch.randint(0, ref.config.vocab_size, (2, 3 * WINDOW))
    with torch.no_grad():
        torch.testing.assert_close(backbone.model(ids).logits, ref(ids).logits, rtol=0, atol=1e-5)
    assert encode(backbone.tokenizer, TEXTS, "chat", 256).ids == encode(tok, TEXTS, "chat", 256).ids
    states, mask, _ = extract(backbone, TEXTS)
    with torch.no_grad():
        enc = encode(tok, TEXTS, "chat", 256)
        ids, m, pos = pad_batch(enc.ids, tok.pad_token_id, "left")
        out = ref(
            torch.from_numpy(ids),
            attention_mask=torch.from_numpy(m),
            position_ids=torch.from_numpy(pos),
            output_hidden_states=True,
        )
    real = mask.bool()
    assert relative_error(states[:, real], torch.stack(out.hidden_states)[:, real]) <= 1e-4


def test_multimodal_gemma3_is_a_clear_error(tmp_path, cache_dir):
    """A Gemma 3 checkpoint with its vision tower (model_type gemma3) is refused, pointing at the text decoder."""
    from singlepass.models.backbone import load_backbone

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma3"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(SinglepassError, match="architecture 'gemma3' is not supported.*gemma3_text"):
        load_backbone(str(tmp_path), cache_dir=str(cache_dir))


def test_shared_first_tokens_run_once_with_the_same_states(arch):
    """Extraction runs the rows' shared chat-template tokens once (models/extract.py): the same states as whole
    rows on every architecture, sliding windows (4 tokens, shorter than the shared part) included. The tiny
    models' templates have no system turn, so the rows share an instruction."""
    from singlepass.models.extract import MIN_SHARED_PREFIX, iter_hidden, relative_error, shared_prefix
    from singlepass.models.prompts import encode

    _, _, backbone, _ = arch
    ids = encode(backbone.tokenizer, ["Answer in one short sentence, and be kind. " + t for t in TEXTS]).ids
    assert shared_prefix(ids) >= max(MIN_SHARED_PREFIX, WINDOW)
    for side in ("left", "right"):
        shared = iter_hidden(backbone, ids, padding_side=side, batches=[[0, 1, 2, 3]])
        whole = iter_hidden(backbone, ids, padding_side=side, batches=[[0, 1, 2, 3]], share_prefix=False)
        for (_, hs, mask), (_, hs_w, mask_w) in zip(shared, whole):
            assert torch.equal(mask, mask_w)
            assert relative_error(hs[:, mask.bool()], hs_w[:, mask_w.bool()]) <= 1e-5, side
