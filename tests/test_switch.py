"""benchmarks/switch.py: a probe switched on and off inside one session (the cost benchmarks' in-session
measurement). On: the switched copy computes what the artifact computes; off: a response probe's state
passes through unchanged with zero labels, a prompt probe's labels are zeros; both runs fit one session."""

from __future__ import annotations

import numpy as np
import pytest
from export_helpers import make_probe

from singlepass.benchmarks.switch import PROBE_ON, Switched, switchable, switched_overhead
from singlepass.errors import SinglepassError
from singlepass.runtime.api import load
from singlepass.runtime.passes import decode_one_token, last_logits, prefill

PROMPT = "Tell me how to build something dangerous."


def _export(root, backbone, name, method, weights, reads=None, seed=0):
    from singlepass.export.pipeline import export_artifact

    probe = make_probe(root / f"p-{name}", backbone, method, seed=seed, reads=reads)
    art = root / name
    export_artifact(art, [f"{probe}:{name}"], backbone=backbone, weights=weights, log=lambda m: None)
    return art


@pytest.fixture(scope="module")
def arts(tmp_path_factory, tiny_backbone):
    root = tmp_path_factory.mktemp("switch")
    return {
        "response": _export(root, tiny_backbone, "r_gate", "gate", "fp32", reads="response", seed=2),
        "prompt": _export(root, tiny_backbone, "safety", "gate", "int8"),
    }


def _decode(rt, backend, steps=3):
    """Prefill PROMPT, then ``steps`` greedy decode steps -> every pass's outputs."""
    ids = rt.encode(PROMPT, truncate=True)[0]
    o, st = prefill(backend, rt.manifest, [ids, ids[:-2]])
    outs = [o]
    for _ in range(steps):
        o, st = decode_one_token(backend, rt.manifest, st, last_logits(rt.manifest, o).argmax(-1).astype(np.int64))
        outs.append(o)
    return outs


def test_a_switched_response_probe_on_computes_what_the_artifact_does_and_off_passes_its_state(arts, tmp_path):
    sw = switchable(arts["response"], tmp_path / "sw")
    want = _decode(load(arts["response"]), load(arts["response"]).backend)
    rt = load(sw)
    on = Switched(rt.backend)
    got = _decode(rt, on)
    for w, g in zip(want, got):
        assert set(w) == set(g)
        for k in w:
            np.testing.assert_allclose(g[k], w[k], rtol=1e-6, atol=1e-6, err_msg=k)
    # off: each decode pass returns its state as it came and zero labels; the tokens are the same
    (probe,) = rt.manifest.probes
    ids = rt.encode(PROMPT, truncate=True)[0]
    o, st = prefill(on, rt.manifest, [ids, ids[:-2]])
    toks = last_logits(rt.manifest, o).argmax(-1).astype(np.int64)
    o, st = decode_one_token(on, rt.manifest, st, toks)  # one token folded in
    before = [s.copy() for s in st.stream]
    on.on = False
    o_off, st_off = decode_one_token(on, rt.manifest, st, toks)
    on.on = True  # the same step again, from the same state, with the probe on (an in-place cache: the same slot)
    o_on = decode_one_token(on, rt.manifest, st, toks)[0]
    lm = rt.manifest.graph.logits
    np.testing.assert_allclose(o_off[lm], o_on[lm], rtol=1e-6, atol=1e-6)  # the model's logits do not change
    for a, b in zip(before, st_off.stream):
        np.testing.assert_array_equal(a, b)
    assert not np.any(o_off[f"{probe.name}/logits"]) and o_off[f"{probe.name}/logits"].shape == (2, 1)
    assert np.abs(before[0]).sum() > 0  # a real state passed through, not an empty one


def test_a_switched_prompt_probe_labels_only_when_on(arts, tmp_path):
    sw = switchable(arts["prompt"], tmp_path / "sw")
    ref = load(arts["prompt"])
    ids = ref.encode(PROMPT, truncate=True)[0]
    want, _ = prefill(ref.backend, ref.manifest, [ids])
    rt = load(sw)
    backend = Switched(rt.backend)
    got, _ = prefill(backend, rt.manifest, [ids])
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-6, err_msg=k)
    assert np.abs(got["safety/logits"]).max() > 1e-3  # a label that a zero fill would not match
    backend.on = False
    off, _ = prefill(backend, rt.manifest, [ids])
    assert not np.any(off["safety/logits"]) and off["safety/logits"].shape == got["safety/logits"].shape
    np.testing.assert_allclose(off[rt.manifest.graph.logits], want[rt.manifest.graph.logits], rtol=1e-6, atol=1e-6)


def test_the_in_session_measurement_reports_each_batch(arts, tmp_path):
    sw = switchable(arts["response"], tmp_path / "sw")
    r = switched_overhead(sw, PROMPT, threads=1, batches=(1, 2), pairs=4)
    assert list(r) == ["batch 1", "batch 2"]
    for v in r.values():
        assert v["pairs"] == 4 and v["off_ms"] > 0 and v["on_ms"] > 0 and np.isfinite(v["null_pct"])
        assert v["overhead_ms"] == pytest.approx(v["overhead_pct"] * v["off_ms"] / 100)
    swp = switchable(arts["prompt"], tmp_path / "swp")
    rt = load(arts["prompt"])
    seqs = [rt.encode(PROMPT, truncate=True)[0], rt.encode("Hi", truncate=True)[0]]  # token ids, rotated by round
    p = switched_overhead(swp, [PROMPT, seqs[1]], 1, batches=(1,), pairs=2, phase="prefill")
    assert p["batch 1"]["prompts"] == 2 and p["batch 1"]["context_tokens"] == np.mean([len(q) for q in seqs])
    with pytest.raises(ValueError, match="phase must be"):
        switched_overhead(sw, PROMPT, 1, phase="both")
    with pytest.raises(ValueError, match="at least one prompt"):
        switched_overhead(sw, [], 1)


def test_what_cannot_be_switched_is_named(tmp_path, tiny_backbone, arts):
    from singlepass.export.pipeline import export_artifact

    unbranched = _export(tmp_path, tiny_backbone, "fp32gate", "gate", "fp32")  # fp32: the probe runs every pass
    with pytest.raises(SinglepassError, match="not behind an If"):
        switchable(unbranched, tmp_path / "sw1")
    a = make_probe(tmp_path / "a", tiny_backbone, "gate")
    two = tmp_path / "two"
    export_artifact(two, [f"{a}:one", f"{a}:two"], backbone=tiny_backbone, weights="int8", log=lambda m: None)
    with pytest.raises(SinglepassError, match="one probe, not 2"):
        switchable(two, tmp_path / "sw2")
    assert PROBE_ON.startswith("singlepass/")


def test_every_prompt_meets_every_order_of_the_arms(arts, tmp_path, monkeypatch):
    """Round r runs prompt r mod n in order ORDERS[(r // n) mod 6]: over 6 n rounds each prompt has the probe
    on first, second and third twice each (a rotation by r mod 3 with n = 24 gave each prompt one order)."""
    from singlepass.benchmarks import switch

    seen = []  # (prompt length, probe on?) per timed pass

    def fake(backend, manifest, phase, state, tokens, seqs):
        seen.append((len(seqs[0]), backend.on))
        return 1.0

    monkeypatch.setattr(switch, "_timed", fake)
    sw = switchable(arts["response"], tmp_path / "sw")
    prompts = [[5, 6, 7], [5, 6, 7, 8], [5, 6, 7, 8, 9]]  # token ids: each known by its length
    switch.switched_overhead(sw, prompts, 1, batches=(1,), pairs=18, phase="prefill", warmup=0)
    where = {}  # prompt length -> the position of the "on" pass in each of its rounds
    for i in range(0, len(seen), 3):
        rnd = seen[i : i + 3]
        where.setdefault(rnd[0][0], []).append([on for _, on in rnd].index(True))
    assert sorted(where) == [3, 4, 5] and all(sorted(v) == [0, 0, 1, 1, 2, 2] for v in where.values())
    # each arm right after each other arm equally often within a round
    pairs = [(a, b) for order in switch.ORDERS for a, b in zip(order, order[1:])]
    assert len(set(pairs)) == 6 and all(pairs.count(p) == 2 for p in set(pairs))
