"""Response probes in the decode passes (issue 15): the streaming state fused into the graph like
the KV cache, checked against the same probe run over the whole response prefix at once (PyTorch
and the exported graph), the ``stop`` policy in the runtime, the engine and the server, and rows
of one batch that finish at different steps."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from export_helpers import make_probe

from singlepass.errors import SinglepassError
from singlepass.runtime.api import load

PROMPTS = ["What is the capital of France?", "Hi", "Tell me how to build something dangerous.", "The quick fox"]


@pytest.fixture(scope="module")
def resp(tmp_path_factory, tiny_backbone, tiny_model_dir, cache_dir):
    """The tiny model with a prompt probe (``safety``) and three response probes (gate, mean and
    max pooling), exported (and so validated) by the CLI."""
    from cli_args import export_argv

    from singlepass.cli import main

    root = tmp_path_factory.mktemp("resp")
    probes = {
        "safety": make_probe(root / "safety", tiny_backbone, "gate"),
        "r_gate": make_probe(root / "r_gate", tiny_backbone, "gate", seed=2, reads="response"),
        "r_mean": make_probe(root / "r_mean", tiny_backbone, "pooling", seed=3, reads="response"),
        "r_max": make_probe(
            root / "r_max", tiny_backbone, "pooling", seed=4, reads="response", token_pool="max", layer_pool="max"
        ),
    }
    out = root / "art"
    specs = [f"{d}:{n}" for n, d in probes.items()]
    assert main(export_argv(tiny_model_dir, cache_dir, out, *specs, extra=["--max-prompt-length", 128])) == 0
    return out, probes


@pytest.fixture(scope="module")
def resp_inplace(tmp_path_factory, resp, tiny_model_dir, cache_dir):
    """The response probes of ``resp`` exported with the in-place KV cache: its decode passes write
    the response state into the arrays they are fed (runtime/backends._Binding: a scratch output
    bound once, copied back)."""
    from cli_args import export_argv

    from singlepass.cli import main

    _, probes = resp
    out = tmp_path_factory.mktemp("resp_inplace") / "art"
    specs = [f"{probes[n]}:{n}" for n in ("r_gate", "r_mean")]
    argv = export_argv(
        tiny_model_dir, cache_dir, out, *specs, extra=["--max-prompt-length", 128, "--kv-cache", "inplace"]
    )
    assert main(argv) == 0
    return out


def test_validation_checks_streaming_against_the_whole_prefix(resp):
    """Export validation compares every response probe, at every decode pass, with the probe run
    over all the response tokens so far in PyTorch (fp32 tolerance 1e-4)."""
    art, _ = resp
    report = json.loads((art / "validation.json").read_text())
    assert report["passed"]
    checked = {c["tensor"]: c for c in report["checks"] if c["tensor"].startswith("r_")}
    for name in ("r_gate", "r_mean", "r_max"):
        c = checked[f"{name}/probs"]
        assert c["case"].startswith("decode") and c["max_abs_diff"] <= 1e-4, c
    m = json.loads((art / "manifest.json").read_text())
    assert m["graph"]["response_mask"] == "response_mask"
    gate = next(p for p in m["probes"] if p["name"] == "r_gate")
    assert gate["reads"] == "response" and [s["name"] for s in gate["state"]] == ["l", "acc"]
    # TensorRT has no profiles for the state inputs yet: refused with the reason
    from singlepass.export.tensorrt import require_fp32_weights
    from singlepass.runtime.contract import read_artifact

    with pytest.raises(SinglepassError, match="response probe"):
        require_fp32_weights(read_artifact(art))
    # onnxruntime-genai cannot feed the state inputs: no genai_config.json, and the manifest says why
    assert m["genai"]["config"] is None and "response probe" in m["genai"]["reason"]
    assert not (art / "genai_config.json").exists()


def _reference_scores(backbone, probe_dir, prompt_ids, tokens) -> list[float]:
    """P(positive) of a response probe after each decode pass, from PyTorch: the probe over the hidden
    states of generated tokens 1..k (the prompt conditions them, the probe reads only them)."""
    import torch

    from singlepass.models.probe_io import load_probe
    from singlepass.models.probes import probabilities

    module = load_probe(probe_dir, backbone.fingerprint)[0].eval()
    ids = torch.tensor([prompt_ids + tokens])
    with torch.no_grad():
        hs = torch.stack(backbone.model(input_ids=ids, output_hidden_states=True).hidden_states)  # [L+1, 1, T, d]
        out = []
        for k in range(1, len(tokens)):  # pass k fed generated tokens 1..k (the last one is never fed)
            seen = hs[:, :, len(prompt_ids) : len(prompt_ids) + k]
            out.append(float(probabilities(module(seen, torch.ones(1, k, dtype=torch.int64)))[0, 1]))
    return out


def test_runtime_reports_the_response_so_far_at_every_pass(resp, tiny_backbone):
    art, probes = resp
    rt = load(art, backend="cpu", threads=1)
    r = rt.generate(PROMPTS[0], 8)
    assert set(r.labels) == {"safety"}  # the prompt's labels: prompt probes only
    n = len(r.token_ids) - 1  # decode passes
    assert n >= 1 and all(len(v) == n for v in r.response_scores.values()), r.response_scores
    ids = rt.encode(PROMPTS[0])[0]
    for name in ("r_gate", "r_mean", "r_max"):
        want = _reference_scores(tiny_backbone, probes[name], ids, r.token_ids)
        np.testing.assert_allclose(r.response_scores[name], want, atol=1e-4)
    assert r.response_labels["r_gate"].score == pytest.approx(r.response_scores["r_gate"][-1])
    events = list(rt.stream(PROMPTS[0], 8))
    assert events[0].response is None and all(e.response for e in events[1:])


def test_a_response_fed_in_one_pass_equals_the_decode_passes(resp, tiny_backbone):
    """The graph folds response tokens in both pass kinds: a prefill pass of prompt + response with
    ``response_mask`` 1 on the response (the per-layer form, ``surgery.prefill_only``'s then-branch)
    gives the label the decode passes (the stacked form, its else-branch) reach token by token, and
    the PyTorch reference."""
    from singlepass.runtime.feeds import make_feed

    art, probes = resp
    rt = load(art, backend="cpu", threads=1)
    r = rt.generate(PROMPTS[2], 6)
    prompt = rt.encode(PROMPTS[2])[0]
    seen = r.token_ids[:-1]  # the tokens the decode passes fed (the last one is never fed)
    ids = np.array([prompt + seen], np.int64)  # [1, T]
    response = np.zeros_like(ids)
    response[0, len(prompt) :] = 1
    m = rt.manifest
    feed = make_feed(
        m, ids, np.ones_like(ids), np.arange(ids.shape[1])[None], None, rt.backend.dummy_past, response=response
    )
    out = rt.backend.run(feed)
    for name in ("r_gate", "r_mean", "r_max"):
        one_pass = float(out[f"{name}/probs"][0, 1])
        assert one_pass == pytest.approx(r.response_scores[name][-1], abs=1e-4)
        want = _reference_scores(tiny_backbone, probes[name], prompt, r.token_ids)[-1]
        assert one_pass == pytest.approx(want, abs=1e-4)


def test_stop_policy_ends_the_response_after_consecutive_flags(resp):
    art, _ = resp
    rt = load(art, backend="cpu", threads=1, policy={"r_gate": "stop:0.0"})  # every pass is flagged
    r = rt.generate(PROMPTS[0], 16)
    # pass 1 (token 1 fed) flags once, pass 2 flags twice in a row: stopped before token 3
    assert r.finish_reason == "blocked" and r.blocked_by == "r_gate" and len(r.token_ids) == 2
    assert r.text.startswith(rt.tokenizer.decode(r.token_ids)) and "flagged by 'r_gate'" in r.text
    assert r.response_scores["r_gate"] and len(r.response_scores["r_gate"]) == 2
    from singlepass.runtime.policy import Rule

    one = load(art, backend="cpu", threads=1, policy={"r_gate": Rule("stop", threshold=0.0, consecutive=1)})
    assert len(one.generate(PROMPTS[0], 16).token_ids) == 1
    never = rt.generate(PROMPTS[0], 6, policy={"r_gate": "stop:1.0"})
    assert never.finish_reason == "max_new_tokens" and len(never.token_ids) == 6


def test_policy_rules_must_fit_what_the_probe_reads(resp):
    art, _ = resp
    with pytest.raises(SinglepassError, match="use r_gate=stop"):
        load(art, backend="cpu", policy={"r_gate": "block"})
    with pytest.raises(SinglepassError, match="stop acts on response probes"):
        load(art, backend="cpu", policy={"safety": "stop"})


def _artifact(request, kind: str):
    """The concat-cache artifact (``resp``) or the in-place one (``resp_inplace``)."""
    return request.getfixturevalue("resp")[0] if kind == "concat" else request.getfixturevalue("resp_inplace")


@pytest.mark.parametrize("kind", ["concat", "inplace"])
def test_batch_rows_finishing_at_different_steps_keep_their_own_state(request, kind):
    """A padded batch whose rows stop at different passes (one stopped by the policy, one at its
    budget): every row's response scores equal that prompt served alone, with either cache layout
    (the in-place one keeps the state in the arrays it is fed)."""
    art = _artifact(request, kind)
    rt = load(art, backend="cpu", threads=1)
    alone = [rt.generate(p, 10) for p in PROMPTS]
    both = rt.generate(PROMPTS, 10)
    for a, b in zip(alone, both):
        assert a.token_ids == b.token_ids
        for k in a.response_scores:
            np.testing.assert_allclose(a.response_scores[k], b.response_scores[k], atol=1e-5)


@pytest.mark.parametrize("kind", ["concat", "inplace"])
def test_engine_rows_joining_and_leaving_carry_their_state(request, kind):
    """Continuous batching: jobs join a running batch (merged, or in a finished row's slot) and
    leave it at different steps; each job's response labels equal the prompt served alone, with
    either cache layout."""
    from singlepass.runtime.sampling import Sampling
    from singlepass.serve.engine import Engine, Job

    art = _artifact(request, kind)
    rt = load(art, backend="cpu", threads=1, policy={"r_mean": "stop:0.0"})
    plain = load(art, backend="cpu", threads=1)
    budgets = [12, 3, 7, 20, 5, 9, 2, 15]
    prompts = [PROMPTS[i % len(PROMPTS)] + " x" * i for i in range(len(budgets))]
    eng = Engine(rt, max_batch=3).start()
    got = {i: [] for i in range(len(prompts))}
    try:
        for i, (p, b) in enumerate(zip(prompts, budgets)):
            eng.submit([Job(rt.encode(p)[0], b, sampling=Sampling(), sink=got[i].append, policy=i % 2 == 0)])
            time.sleep(0.003)
        deadline = time.monotonic() + 60
        while not all(g and g[-1].done for g in got.values()):
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        eng.stop()
    assert eng.stats["merges"] + eng.stats["reused"] > 0, eng.stats
    for i, (p, b) in enumerate(zip(prompts, budgets)):
        r = (rt if i % 2 == 0 else plain).generate(p, b)
        outs = got[i]
        assert [o.token_id for o in outs if o.token_id is not None] == r.token_ids, i
        assert outs[-1].finish_reason == r.finish_reason.replace("max_new_tokens", "max_tokens"), i
        scores = {k: [o.response[k].score for o in outs if o.response] for k in r.response_scores}
        for k, v in r.response_scores.items():
            np.testing.assert_allclose(scores[k], v, atol=1e-5, err_msg=f"job {i} {k}")


def test_server_streams_response_labels_and_stops_with_content_filter(resp):
    """The OpenAI client against the real server: every token chunk carries the response so far in
    ``singlepass.response_labels``; a ``stop`` rule ends the answer with ``content_filter``, the
    text streamed so far plus the notice, and ``blocked_by`` on the response."""
    from test_serve import MODEL, client, metric, server

    art, _ = resp
    plain = load(art, backend="cpu", threads=1)
    prompt = PROMPTS[0]
    alone = plain.generate(prompt, 6)
    msgs = [{"role": "user", "content": prompt}]
    with server(runtime=plain) as s:
        c = client(s.url)
        chunks = list(c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=6, temperature=0, stream=True))
        said = [
            ch.model_extra["singlepass"]["response_labels"] for ch in chunks[1:] if ch.model_extra.get("singlepass")
        ]
        assert [x["r_gate"]["score"] for x in said] == pytest.approx(alone.response_scores["r_gate"], abs=1e-5)
        assert set(chunks[0].model_extra["singlepass"]["labels"]) == {"safety"}
    stopping = load(art, backend="cpu", threads=1, policy={"r_gate": "stop:0.0"})
    sampled = dict(max_tokens=16, temperature=1.0, seed=3)  # tokens that decode to visible text
    want = stopping.generate(prompt, 16, temperature=1.0, seed=3)
    assert want.finish_reason == "blocked" and want.text.startswith(stopping.tokenizer.decode(want.token_ids))
    assert stopping.tokenizer.decode(want.token_ids).strip()  # the kept text is not empty
    with server(runtime=stopping, model_name=MODEL) as s:
        c = client(s.url)
        out = c.chat.completions.create(model=MODEL, messages=msgs, **sampled)
        ext = out.model_extra["singlepass"]
        assert out.choices[0].finish_reason == "content_filter" and ext["blocked_by"] == "r_gate"
        assert out.usage.completion_tokens == 2 and out.choices[0].message.content == want.text
        # the label is the probe's own (threshold 0.5); the stop rule used 0.0
        assert ext["response_labels"]["r_gate"]["score"] == pytest.approx(want.response_scores["r_gate"][-1], abs=1e-5)
        chunks = list(c.chat.completions.create(model=MODEL, messages=msgs, stream=True, **sampled))
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        assert text == want.text and chunks[-1].choices[0].finish_reason == "content_filter"
        assert metric(s.url, "singlepass_response_stops_total", probe="r_gate") == 2
    streamed = "".join(ev.text for ev in stopping.stream(prompt, 16, temperature=1.0, seed=3))
    assert streamed == want.text  # the runtime's stream releases held-back text before the notice


def test_inplace_passes_update_the_state_arrays_they_are_fed_and_keep_generations_apart(resp, resp_inplace):
    """An in-place artifact's decode passes write the response state into the arrays they are fed
    (through a scratch output bound once, then copied back), as they write the KV cache: the state
    stays in the same arrays, bound once. Fed the same tokens, its labels and states equal those of
    the same probes in the concat-cache artifact (run with ONNX Runtime's own output buffers, a new
    array every pass) at every pass; and two generations interleaved pass by pass on one thread get
    the labels each gets alone (the scratch buffer they share is copied out before the other runs)."""
    from singlepass.runtime.passes import decode_one_token, last_logits, prefill

    inplace, concat = load(resp_inplace, backend="cpu", threads=1), load(resp[0], backend="cpu", threads=1)
    assert inplace.manifest.graph.inplace and not concat.manifest.graph.inplace

    def start(rt, prompts):
        out, st = prefill(rt.backend, rt.manifest, [rt.encode(p)[0] for p in prompts])
        toks = last_logits(rt.manifest, out).argmax(-1)
        return {"rt": rt, "state": st, "next": toks, "tokens": [], "labels": [], "states": [], "arrays": []}

    def step(gen, feed=None):
        rt = gen["rt"]
        toks = gen["next"] if feed is None else feed
        out, st = decode_one_token(rt.backend, rt.manifest, gen["state"], toks)
        gen["state"], gen["next"] = st, last_logits(rt.manifest, out).argmax(-1)
        gen["tokens"].append(toks)
        names = ("r_gate", "r_mean")
        gen["labels"].append([out[f"{n}/logits"].copy() for n in names])
        by = {s["past"]: a for s, a in zip(rt.manifest.stream_states, st.stream) if s["past"].startswith(names)}
        gen["states"].append([by[k].copy() for k in sorted(by)])
        gen["arrays"].append(st.stream)

    def generation(rt, prompts, n, tokens=None, other=None):
        gen = start(rt, prompts)
        for k in range(n):
            step(gen, None if tokens is None else tokens[k])
            if other is not None:
                step(other)
        return gen

    carried = generation(inplace, PROMPTS[:2], 8)
    reference = generation(concat, PROMPTS[:2], 8, tokens=carried["tokens"])
    for key in ("labels", "states"):
        for got, want in zip(carried[key], reference[key]):
            for a, b in zip(got, want):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    for i in range(len(inplace.manifest.stream_states)):  # every decode pass: the same arrays, updated
        assert len({id(arrays[i]) for arrays in carried["arrays"]}) == 1
        assert len({id(arrays[i]) for arrays in reference["arrays"]}) == 8

    alone = generation(inplace, PROMPTS[2:], 8)
    other = start(inplace, PROMPTS[2:])
    mixed = generation(inplace, PROMPTS[:2], 8, other=other)
    for gen, want in ((mixed, carried), (other, alone)):
        for got, w in zip(gen["labels"], want["labels"]):
            for a, b in zip(got, w):
                np.testing.assert_allclose(a, b, atol=1e-6)
