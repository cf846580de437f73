"""The runtime (numpy + onnxruntime + tokenizers) on a tiny exported artifact: tokens and labels
equal the PyTorch reference, batching invariance, streaming, sampling, the label policy, bad
input, the TensorRT guard and profile limits, the CLI, and no torch anywhere."""

import copy
import ctypes
import dataclasses
import json
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from export_helpers import serving_artifact

from singlepass.cli import main
from singlepass.errors import SinglepassError
from singlepass.runtime import backends as be
from singlepass.runtime import tensorrt as trt_backend
from singlepass.runtime.api import Runtime, load
from singlepass.runtime.contract import read_artifact
from singlepass.runtime.passes import decode_one_token, last_logits, prefill
from singlepass.runtime.policy import Rule, parse_specs
from singlepass.runtime.sampling import Sampling, filter_logits, sample
from singlepass.runtime.tensorrt import engine_limits

REPO = Path(__file__).resolve().parents[1]
PROMPTS = [
    "What is the capital of France?",
    "Hi",
    "I hate this, it is the worst thing ever.",
    "The quick brown fox jumps over the lazy dog.",
]
MAX_PROMPT = 128
LONG = "The quick brown fox jumps over the lazy dog. " * 12


@pytest.fixture(scope="module")
def art(tmp_path_factory, tiny_model_dir, tiny_backbone, cache_dir):
    """A tiny artifact with a binary, a three-class and a logit-input (MULI) probe, with the Concat KV
    cache that TensorRT runs (the in-place one: test_kvcache.py, test_serve.py)."""
    root = tmp_path_factory.mktemp("rt")
    return serving_artifact(
        root, "art", tiny_backbone, tiny_model_dir, cache_dir, MAX_PROMPT, extra=["--kv-cache", "concat"]
    )


@pytest.fixture(scope="module")
def rt(art):
    return load(art[0], backend="cpu")


def hf_ids(backbone, text, max_length=MAX_PROMPT, truncate=False, fmt="chat"):
    from singlepass.models.prompts import encode_one

    return encode_one(backbone.tokenizer, text, fmt, max_length, truncate)[0]


def torch_labels(backbone, probe_dirs, ids):
    """Each torch probe's probabilities on one prompt (hidden states or last logits)."""
    from singlepass.models.probe_io import load_probe
    from singlepass.models.probes import probabilities

    with torch.no_grad():
        out = backbone.model(input_ids=torch.tensor([ids]), output_hidden_states=True)
        hs, mask = torch.stack(out.hidden_states), torch.ones(1, len(ids), dtype=torch.long)
        res = {}
        for name, d in probe_dirs.items():
            module, cfg = load_probe(d, backbone.fingerprint)
            lg = module(out.logits[:, -1]) if cfg["input"] == "logits" else module(hs, mask)
            res[name] = (probabilities(lg)[0].numpy(), cfg)
    return res


# ----------------------------------------------------------------------------- parity with PyTorch


def test_tokenization_equals_models_prompts(rt, tiny_backbone, art):
    from singlepass.runtime.tokenize import PromptTokenizer

    texts = PROMPTS + [" spaced  out\n\ttext ", "héllo wörld ✓ 日本", "<|im_end|> inside", LONG]
    for t in texts:
        assert rt.encode(t, truncate=True) == (
            hf_ids(tiny_backbone, t, truncate=True),
            len(hf_ids(tiny_backbone, t, 10**6)) > MAX_PROMPT,
        )
    m = copy.deepcopy(rt.manifest)
    m.prompt["format"] = "raw"
    raw = PromptTokenizer(art[0], m)
    for t in texts:
        assert raw.encode(t, 40, truncate=True)[0] == hf_ids(tiny_backbone, t, 40, True, "raw")
    ids = hf_ids(tiny_backbone, PROMPTS[0])
    assert rt.tokenizer.decode(ids) == tiny_backbone.tokenizer.decode(ids, skip_special_tokens=True)
    assert rt.tokenizer.decode(ids, False) == tiny_backbone.tokenizer.decode(ids)


def test_greedy_tokens_and_labels_equal_pytorch(rt, tiny_backbone, art):
    results = rt.generate(PROMPTS, 12)
    tok = tiny_backbone.tokenizer
    for p, r in zip(PROMPTS, results):
        ids = hf_ids(tiny_backbone, p)
        assert r.ok and r.prompt_tokens == len(ids) and not r.truncated
        ref = tiny_backbone.model.generate(
            torch.tensor([ids]), max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id
        )[0, len(ids) :].tolist()
        assert r.token_ids == ref
        assert r.text == tok.decode(ref, skip_special_tokens=True)
        assert r.finish_reason == ("eos" if ref[-1] == tok.eos_token_id else "max_new_tokens")
        assert list(r.labels) == ["safety", "emotion", "muli"]
        for name, (probs, cfg) in torch_labels(tiny_backbone, art[1], ids).items():
            lb = r.labels[name]
            np.testing.assert_allclose(lb.probs, probs, atol=1e-4)
            if len(probs) == 2:
                assert lb.score == pytest.approx(float(probs[1]), abs=1e-4)
                assert lb.label == cfg["label_names"][int(probs[1] >= cfg["threshold"])]
            else:
                assert lb.label == cfg["label_names"][int(probs.argmax())]
                assert lb.score == pytest.approx(float(probs.max()), abs=1e-4)


def test_kv_cache_decode_logits_equal_pytorch_on_varied_tokens(rt, tiny_backbone):
    """prefill + decode_one_token fed sampled (varied) tokens: every pass's logits equal the
    PyTorch model's on the whole sequence (the greedy tiny model repeats one token)."""
    seqs = [hf_ids(tiny_backbone, p) for p in PROMPTS[:2]]
    out, state = prefill(rt.backend, rt.manifest, seqs, rt.pad_id)
    rng = np.random.default_rng(0)
    fed = [list(s) for s in seqs]
    for _step in range(6):
        logits = last_logits(rt.manifest, out)
        with torch.no_grad():
            for b, s in enumerate(fed):
                ref = tiny_backbone.model(input_ids=torch.tensor([s])).logits[0, -1].numpy()
                np.testing.assert_allclose(logits[b], ref, atol=1e-3)
        tokens = rng.integers(3, 300, size=2)
        for b, t in enumerate(tokens):
            fed[b].append(int(t))
        out, state = decode_one_token(rt.backend, rt.manifest, state, tokens)


def test_sampled_generation_equals_pytorch_with_the_same_sampler(rt, tiny_backbone):
    s = Sampling(temperature=1.0, top_k=50, top_p=0.9, seed=7)
    results = rt.generate(PROMPTS[:2], 8, temperature=1.0, top_k=50, top_p=0.9, seed=7)
    for i, (p, r) in enumerate(zip(PROMPTS[:2], results)):
        ids, rng, ref = hf_ids(tiny_backbone, p), s.generator(i), []
        with torch.no_grad():
            for _ in range(8):
                logits = tiny_backbone.model(input_ids=torch.tensor([ids + ref])).logits[0, -1].numpy()
                ref.append(sample(logits, s, rng))
        assert r.token_ids == ref
    assert len(set(results[0].token_ids)) > 2  # sampling varies, unlike the greedy tiny model


# ----------------------------------------------------------------------------- batching and streaming


def test_results_do_not_depend_on_the_batch(rt):
    batch = rt.generate(PROMPTS, 10)
    chunks = rt.generate(PROMPTS, 10, batch_size=3)
    for i, p in enumerate(PROMPTS):
        alone = rt.generate(p, 10)
        for other in (batch[i], chunks[i]):
            assert other.token_ids == alone.token_ids and other.text == alone.text
            for name, lb in alone.labels.items():
                assert other.labels[name].label == lb.label
                assert other.labels[name].score == pytest.approx(lb.score, abs=1e-5)
    sampled = [rt.generate(PROMPTS, 6, temperature=0.8, seed=3, batch_size=b) for b in (4, 1)]
    assert [r.token_ids for r in sampled[0]] == [r.token_ids for r in sampled[1]]


def test_each_sequence_stops_at_its_own_eos(art, rt):
    before = rt.generate(PROMPTS[:2], 6)
    stop = before[0].token_ids[0]
    assert stop not in before[1].token_ids
    rt2 = load(art[0], backend="cpu")
    rt2.eos_ids = {stop}
    after = rt2.generate(PROMPTS[:2], 6)
    assert after[0].token_ids == [stop] and after[0].finish_reason == "eos"
    assert after[1].token_ids == before[1].token_ids and after[1].finish_reason == "max_new_tokens"
    # the artifact's total length limit ends a sequence too
    rt2.manifest.limits = dataclasses.replace(rt2.manifest.limits, max_total_length=before[1].prompt_tokens + 3)
    r = rt2.generate(PROMPTS[1], 6)
    assert r.token_ids == before[1].token_ids[:3] and r.finish_reason == "max_total_length"


def test_stream_yields_the_same_tokens_and_labels_first(rt):
    results = rt.generate(PROMPTS, 8)
    events = list(rt.stream(PROMPTS, 8))
    for i, r in enumerate(results):
        mine = [e for e in events if e.index == i]
        assert [e.step for e in mine] == list(range(len(mine)))
        assert mine[0].labels is not None and all(e.labels is None for e in mine[1:])
        assert {k: v.label for k, v in mine[0].labels.items()} == {k: v.label for k, v in r.labels.items()}
        assert [e.token_id for e in mine] == r.token_ids
        assert "".join(e.text for e in mine) == r.text
        assert [e.done for e in mine] == [False] * (len(mine) - 1) + [True]
    # one pass at a time: every prompt's step-0 event (labels) comes before any step-1 event
    steps = [e.step for e in events]
    assert steps == sorted(steps)


def test_labels_only_with_zero_new_tokens(rt):
    r = rt.generate(PROMPTS[0], 0)
    assert (
        r.token_ids == []
        and r.text == ""
        and r.finish_reason == "max_new_tokens"
        and set(r.labels) == {"safety", "emotion", "muli"}
    )


# ----------------------------------------------------------------------------- sampling


def test_sampling_filters_and_validation():
    logits = np.array([3.0, 2.0, 1.0, 0.0, -1.0])
    assert np.isfinite(filter_logits(logits, 1.0, top_k=2)).sum() == 2
    p = np.exp(logits) / np.exp(logits).sum()  # 0.64, 0.23, 0.09, ...
    assert np.isfinite(filter_logits(logits, 1.0, top_p=0.5)).sum() == 1
    assert np.isfinite(filter_logits(logits, 1.0, top_p=p[0] + 0.01)).sum() == 2
    s = Sampling(temperature=1.0, top_k=1, seed=0)
    assert all(sample(logits, s, s.generator(0)) == 0 for _ in range(5))
    for bad in (
        dict(temperature=-1),
        dict(temperature=1, top_p=0),
        dict(temperature=1, top_k=-2),
        dict(top_k=5),
        dict(temperature=1, seed=-1),
    ):
        with pytest.raises(SinglepassError):
            Sampling(**bad)


def test_seeded_sampling_is_reproducible(rt):
    a = rt.generate(PROMPTS[:2], 6, temperature=1.0, seed=11)
    b = rt.generate(PROMPTS[:2], 6, temperature=1.0, seed=11)
    c = rt.generate(PROMPTS[:2], 6, temperature=1.0, seed=12)
    assert [r.token_ids for r in a] == [r.token_ids for r in b] != [r.token_ids for r in c]
    greedy = rt.generate(PROMPTS[:2], 6)
    top1 = rt.generate(PROMPTS[:2], 6, temperature=1.0, top_k=1, seed=1)
    assert [r.token_ids for r in top1] == [r.token_ids for r in greedy]


# ----------------------------------------------------------------------------- policy


def test_block_policy_refuses_before_any_token(rt):
    free = rt.generate(PROMPTS, 5)
    scores = sorted(r.labels["safety"].score for r in free)
    cut = (scores[1] + scores[2]) / 2  # blocks the two highest-scoring prompts
    res = rt.generate(PROMPTS, 5, policy={"safety": f"block:{cut}"})
    for f, r in zip(free, res):
        assert r.labels["safety"].score == pytest.approx(f.labels["safety"].score)
        if f.labels["safety"].score >= cut:
            assert (r.text, r.token_ids, r.finish_reason, r.blocked_by) == (rt.refusal, [], "blocked", "safety")
        else:
            assert r.token_ids == f.token_ids and r.blocked_by is None
    events = list(rt.stream(PROMPTS, 5, policy=[f"safety=block:{cut}"]))
    for i, f in enumerate(free):
        mine = [e for e in events if e.index == i]
        if f.labels["safety"].score >= cut:  # one event: labels + refusal, no token
            assert len(mine) == 1 and mine[0].token_id is None and mine[0].done and mine[0].labels
    # multi-class: block on named labels; a custom message
    label = free[0].labels["emotion"].label
    r = rt.generate(PROMPTS[0], 5, policy={"emotion": Rule("block", labels=(label,), message="no.")})
    assert (r.text, r.blocked_by) == ("no.", "emotion")
    # the default threshold is the probe's own (0.5 here); report is the default
    assert rt.generate(PROMPTS[0], 2, policy={"safety": "report"}).token_ids == free[0].token_ids[:2]


def test_policy_errors(rt, art):
    with pytest.raises(SinglepassError, match="'toxicity'.*probes: safety, emotion, muli"):
        rt.generate("hi", 2, policy={"toxicity": "block"})
    with pytest.raises(SinglepassError, match="3 classes"):
        rt.generate("hi", 2, policy={"emotion": "block"})
    with pytest.raises(SinglepassError, match="label.*'angry'"):
        rt.generate("hi", 2, policy={"emotion": "block:angry"})
    with pytest.raises(SinglepassError, match="action"):
        rt.generate("hi", 2, policy={"safety": "shout"})
    with pytest.raises(SinglepassError, match="NAME=block"):
        parse_specs(["safety"])
    with pytest.raises(SinglepassError, match="'toxicity'"):
        load(art[0], backend="cpu", policy={"toxicity": "block"})


def test_policy_blocks_at_a_stored_operating_point(rt, art, tmp_path):
    """A probe trained with --threshold-at-fpr carries its operating points in its config.json,
    which export copies into the artifact; the manifest's threshold is the active point's.
    ``block:f1`` / ``block:fpr@0.01`` pick a point by name."""
    free = rt.generate(PROMPTS, 1)
    scores = sorted(r.labels["safety"].score for r in free)
    cut = (scores[1] + scores[2]) / 2  # "f1" point: blocks the two highest-scoring prompts
    copy = tmp_path / "art"
    shutil.copytree(art[0], copy)
    cfg_path = copy / "probes" / "safety" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    active = rt.manifest.probe("safety").threshold
    cfg["operating_point"] = "fpr@0.01"
    cfg["operating_points"] = {"f1": {"threshold": cut}, "fpr@0.01": {"threshold": active, "target_fpr": 0.01}}
    cfg_path.write_text(json.dumps(cfg))
    rt2 = load(copy, backend="cpu")
    probe = rt2.manifest.probe("safety")
    assert probe.operating_point == "fpr@0.01" and probe.point_threshold("f1") == cut
    assert rt.manifest.probe("safety").operating_points == {}  # the original carries none
    res = rt2.generate(PROMPTS, 1, policy={"safety": "block:f1"})
    assert [r.blocked_by for r in res] == ["safety" if f.labels["safety"].score >= cut else None for f in free]
    res = rt2.generate(PROMPTS, 1, policy=["safety=block:fpr@0.01"])
    assert [r.blocked_by for r in res] == ["safety" if f.labels["safety"].score >= active else None for f in free]
    with pytest.raises(SinglepassError, match="no operating point 'fpr@0.5'.*f1, fpr@0.01"):
        rt2.generate("hi", 1, policy={"safety": "block:fpr@0.5"})
    with pytest.raises(SinglepassError, match="retrain it with --threshold-at-fpr"):
        rt.generate("hi", 1, policy={"safety": "block:fpr@0.01"})


# ----------------------------------------------------------------------------- bad input


def test_bad_prompts_get_clear_errors_and_spare_the_others(rt):
    batch = ["What is the capital of France?", "", 42, LONG, "   ", "Hi"]
    res = rt.generate(batch, 6)
    good = rt.generate(["What is the capital of France?", "Hi"], 6)
    assert res[0].token_ids == good[0].token_ids and res[5].token_ids == good[1].token_ids
    assert [r.ok for r in res] == [True, False, False, False, False, True]
    assert "prompt is empty" in res[1].error and "prompt is empty" in res[4].error
    assert "must be a string, got int" in res[2].error
    assert f"over the artifact's maximum of {MAX_PROMPT}" in res[3].error and "truncate" in res[3].error
    assert all(r.finish_reason == "error" and r.token_ids == [] for r in res[1:5])
    with pytest.raises(SinglepassError, match="prompt 1: prompt is empty; prompt 2: .*got int"):
        rt.generate(batch, 6, on_error="raise")
    with pytest.raises(SinglepassError, match="prompt is empty"):
        rt.generate("", 6)
    with pytest.raises(SinglepassError, match="prompts must be a string or a list"):
        rt.generate(42, 6)
    with pytest.raises(SinglepassError, match="max_new_tokens"):
        rt.generate("hi", -1)
    cut = rt.generate(LONG, 3, truncate=True)
    assert cut.ok and cut.truncated and cut.prompt_tokens <= MAX_PROMPT and len(cut.token_ids) == 3
    assert rt.generate([], 3) == []


def test_batch_over_the_limit(rt):
    prompts = ["Hi"] * (rt.max_batch + 1)
    with pytest.raises(SinglepassError, match=f"max batch {rt.max_batch}.*batch_size"):
        rt.generate(prompts, 1)
    with pytest.raises(SinglepassError, match="max batch"):
        rt.generate(prompts[:2], 1, batch_size=rt.max_batch + 1)
    assert all(r.ok and len(r.token_ids) == 1 for r in rt.generate(prompts, 1, batch_size=5))


def test_broken_artifacts(art, tmp_path):
    src = art[0]

    def copy(name):
        dst = tmp_path / name
        shutil.copytree(src, dst)
        return dst

    with pytest.raises(SinglepassError, match="no such artifact folder"):
        load(tmp_path / "nowhere")
    d = copy("no-tokenizer")
    (d / "tokenizer.json").unlink()
    with pytest.raises(SinglepassError, match="missing tokenizer.json"):
        load(d)
    d = copy("no-weights")
    (d / "model.onnx.data").unlink()
    with pytest.raises(SinglepassError, match="missing model.onnx.data"):
        load(d)
    d = copy("no-graph")
    (d / "model.onnx").unlink()
    with pytest.raises(SinglepassError, match="model.onnx is missing"):
        load(d)
    d = copy("v2")
    m = json.loads((d / "manifest.json").read_text())
    (d / "manifest.json").write_text(json.dumps({**m, "version": 2}))
    with pytest.raises(SinglepassError, match="manifest version 2 is not supported"):
        load(d)
    (d / "manifest.json").write_text("{not json")
    with pytest.raises(SinglepassError, match="corrupt"):
        load(d)
    with pytest.raises(SinglepassError, match="backend must be one of"):
        load(src, backend="gpu")


# ----------------------------------------------------------------------------- TensorRT


def with_engine(src: Path, dst: Path, max_batch=2, max_seq=96) -> Path:
    """A copy of the artifact whose manifest records an engine (the file is a placeholder)."""
    from singlepass.runtime.contract import read_artifact
    from singlepass.runtime.tensorrt import profiles

    shutil.copytree(src, dst)
    m = json.loads((dst / "manifest.json").read_text())
    profs = profiles(read_artifact(dst), max_batch, max_seq)
    m["engines"] = [
        {
            "file": "model.fp32.engine",
            "precision": "fp32",
            "max_batch": max_batch,
            "max_seq": max_seq,
            "tensorrt": "10.15.0",
            "dummy_past_slot": True,
            "profiles": [
                {"name": p["name"], "shapes": {k: [list(s) for s in v] for k, v in p["shapes"].items()}} for p in profs
            ],
        }
    ]
    (dst / "manifest.json").write_text(json.dumps(m))
    (dst / "model.fp32.engine").write_bytes(b"not a real engine")
    return dst


def test_tensorrt_guard_and_profile_limits(art, tmp_path, rt):
    with pytest.raises(SinglepassError, match="no TensorRT engine was built"):
        load(art[0], backend="tensorrt")
    d = with_engine(art[0], tmp_path / "eng")
    if "tensorrt" not in sys.modules:
        try:
            import tensorrt  # noqa: F401
        except ImportError:
            with pytest.raises(SinglepassError, match="TensorRT is not installed"):
                load(d, backend="tensorrt")
            assert load(d).backend.name == "onnxruntime-cpu"  # auto falls back
    m = read_artifact(d)
    lim = engine_limits(m, m.engines[0])
    assert lim == {"max_batch": 2, "max_prompt": 95, "max_seq": 96, "dummy_past": 1}

    class ProfileLimited(be.OrtBackend):
        """ONNX Runtime with an engine's limits and its masked dummy past slot."""

        def __init__(self, max_seq):
            super().__init__(d / "model.onnx", m)
            self.name, self.max_batch, self.max_prompt, self.max_seq, self.dummy_past = "tensorrt", 2, 95, max_seq, 1

    limited = Runtime(d, backend=ProfileLimited(96))
    with pytest.raises(SinglepassError, match="TensorRT profile allows \\(max batch 2\\)"):
        limited.generate(PROMPTS[:3], 4)
    got = limited.generate(PROMPTS[:3], 6, batch_size=2)
    want = rt.generate(PROMPTS[:3], 6)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]  # the dummy slot changes nothing
    for g, w in zip(got, want):
        assert g.labels["safety"].score == pytest.approx(w.labels["safety"].score, abs=1e-5)
    plen = max(r.prompt_tokens for r in want[:2])
    short = Runtime(d, backend=ProfileLimited(1 + plen + 2)).generate(PROMPTS[:2], 6)
    assert [len(r.token_ids) for r in short] == [3, 3] and {r.finish_reason for r in short} == {"engine_max_seq"}
    longest = max(range(2), key=lambda i: want[i].prompt_tokens)
    with pytest.raises(SinglepassError, match=f"maximum of {plen - 1}"):  # dummy slot + prompt > max_seq
        Runtime(d, backend=ProfileLimited(plen)).generate(PROMPTS[longest], 2)


class FakeCudart:
    """cuda-python's runtime API over host memory (ctypes), enough for TensorRTBackend."""

    class cudaError_t:
        cudaSuccess = 0

    class cudaMemcpyKind:
        cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost = 1, 2

    def __init__(self):
        self.mem = {}

    def cudaStreamCreate(self):
        return 0, 5

    def cudaMalloc(self, n):
        buf = ctypes.create_string_buffer(n)
        self.mem[ctypes.addressof(buf)] = buf
        return 0, ctypes.addressof(buf)

    def cudaFree(self, ptr):
        self.mem.pop(ptr, None)
        return (0,)

    def cudaMemcpyAsync(self, dst, src, n, kind, stream):
        ctypes.memmove(dst, src, n)
        return (0,)

    def cudaStreamSynchronize(self, stream):
        return (0,)

    def cudaStreamDestroy(self, stream):
        return (0,)


def fake_tensorrt(folder: Path, manifest: dict):
    """The TensorRT 10 name-based API, executing the ONNX graph with ONNX Runtime and checking
    every shape against the engine's optimization profiles."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    ins = [i.name for i in sess.get_inputs()]
    outs = [o.name for o in sess.get_outputs()]
    dtypes = {i["name"]: np.dtype(i["dtype"]) for i in manifest["graph"]["inputs"] + manifest["graph"]["outputs"]}
    profs = manifest["engines"][0]["profiles"]
    calls = []

    class Context:
        def __init__(self):
            self.shapes, self.addr, self.profile, self.result = {}, {}, None, None

        def set_optimization_profile_async(self, k, stream):
            self.profile = k

        def set_input_shape(self, name, shape):
            lo, _, hi = profs[self.profile]["shapes"][name]
            self.shapes[name], self.result = tuple(shape), None
            return all(a <= s <= b for a, s, b in zip(lo, shape, hi))

        def set_tensor_address(self, name, ptr):
            self.addr[name] = ptr

        def _run(self):
            if self.result is None:
                feed = {}
                for n in ins:
                    nbytes = int(np.prod(self.shapes[n])) * dtypes[n].itemsize
                    raw = (ctypes.c_char * nbytes).from_address(self.addr[n])
                    feed[n] = np.frombuffer(raw, dtypes[n]).reshape(self.shapes[n]).copy()
                calls.append((self.profile, feed[manifest["graph"]["past_names"][0]].shape[2]))
                self.result = dict(zip(outs, sess.run(outs, feed)))
            return self.result

        def get_tensor_shape(self, name):
            return self._run()[name].shape

        def execute_async_v3(self, stream):
            for n, v in self._run().items():
                v = np.ascontiguousarray(v, dtypes[n])
                ctypes.memmove(self.addr[n], v.ctypes.data, v.nbytes)
            self.result = None
            return True

    class Engine:
        num_io_tensors = len(ins) + len(outs)

        def get_tensor_name(self, i):
            return (ins + outs)[i]

        def get_tensor_mode(self, name):
            return 0 if name in ins else 1

        def get_tensor_dtype(self, name):
            return dtypes[name]

        def create_execution_context(self):
            return Context()

    class Runtime_:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            return Engine()

    class Logger:
        WARNING = 2

        def __init__(self, level):
            pass

    trt = types.SimpleNamespace(
        __version__="10.15.0",
        Logger=Logger,
        Runtime=Runtime_,
        nptype=np.dtype,
        TensorIOMode=types.SimpleNamespace(INPUT=0, OUTPUT=1),
    )
    return trt, calls


def test_tensorrt_runner_against_a_stand_in_of_the_api(art, tmp_path, rt, monkeypatch):
    """TensorRTBackend's flow (profiles, dummy slot, shapes, buffers) on a stand-in of the
    TensorRT 10 API that executes the graph with ONNX Runtime; a real engine needs a GPU."""
    d = with_engine(art[0], tmp_path / "eng")
    m = json.loads((d / "manifest.json").read_text())
    trt, calls = fake_tensorrt(d, m)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(trt_backend, "import_cudart", FakeCudart)
    trt_rt = load(d)  # auto picks the engine when TensorRT imports
    assert trt_rt.backend.name.startswith("tensorrt")
    got = trt_rt.generate(PROMPTS[:2], 5)
    want = rt.generate(PROMPTS[:2], 5)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    assert got[0].labels["emotion"].label == want[0].labels["emotion"].label
    assert calls[0] == (0, 1) and all(p == 1 and past > 1 for p, past in calls[1:])  # prefill, then decode
    assert len(calls) == 5


# ----------------------------------------------------------------------------- CLI and imports


def test_cli_generate(art, rt, capsys):
    a = str(art[0])
    assert main(["generate", a, PROMPTS[0], "--max-new-tokens", "5", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    ref = rt.generate(PROMPTS[0], 5)
    assert out["text"] == ref.text and out["token_ids"] == ref.token_ids
    assert out["labels"] == {
        k: {"label": v.label, "score": pytest.approx(v.score, abs=1e-6)} for k, v in ref.labels.items()
    }
    assert main(["generate", a, PROMPTS[0], "--max-new-tokens", "5", "--stream"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("labels: safety=") and lines[1] == ref.text
    assert main(["generate", a, PROMPTS[0], "--policy", "safety=block:0", "--refusal", "Nope."]) == 0
    assert capsys.readouterr().out.splitlines()[1:] == ["blocked by safety", "Nope."]
    assert main(["generate", a, ""]) == 2
    assert "prompt is empty" in capsys.readouterr().err
    assert main(["generate", a, LONG]) == 2
    assert "--truncate" in capsys.readouterr().err
    assert main(["generate", a, LONG, "--truncate", "--max-new-tokens", "2"]) == 0
    assert "prompt truncated to" in capsys.readouterr().out
    assert main(["generate", a, "Hi", "", "--json", "--max-new-tokens", "2"]) == 2  # the good prompt still served
    out, err = capsys.readouterr()
    rows = [json.loads(x) for x in out.splitlines()]
    assert len(rows[0]["token_ids"]) == 2 and "error" in rows[1] and "prompt 1: prompt is empty" in err
    assert main(["generate", a, "Hi", "--policy", "nope=block"]) == 2
    assert "'nope'" in capsys.readouterr().err


def test_runtime_imports_neither_torch_nor_transformers(art):
    code = (
        "import sys, json\n"
        "from singlepass.runtime import load\n"
        f"r = load({str(art[0])!r}).generate(['Hi', 'What is the capital of France?'], 4)\n"
        "from singlepass.cli import main\n"
        f"rc = main(['generate', {str(art[0])!r}, 'Hi', '--json', '--max-new-tokens', '3'])\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'onnx', 'tensorrt'})\n"
        "print(json.dumps({'heavy': heavy, 'rc': rc, 'n': len(r[1].token_ids)}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res == {"heavy": [], "rc": 0, "n": 4}
    # pure Python: no compiled code of the project's own
    assert not [p for p in (REPO / "runtime").rglob("*") if p.suffix in (".so", ".pyd", ".c", ".cpp", ".pyx")]
