"""A probe's cost measured inside one ONNX Runtime session: the probe switched on and off pass by pass.

Two sessions of the *same* artifact in one process differ by up to ~6% on this VM (decode steps,
int4 SmolLM2, 2 threads: ``switched_overhead``'s docstring has the measurement):
each session's buffers land somewhere else, and that is more than the 1-2% a probe may cost. So a
comparison of a base artifact with a base + probe artifact cannot settle a 2% target, however
long it runs. Here the probe is switched off and on inside one session instead:

``switchable(src, dst)`` copies a one-probe artifact, adding the graph input ``PROBE_ON`` (bool [1]):
- a prompt probe: each ``If`` the surgery added (``surgery.prefill_only``, ``layer_stages``) takes
  its no-op branch (zeros, placeholders: no kernel) unless ``PROBE_ON``: its condition becomes
  ``cond AND probe_on``;
- a response probe: its decode form (the else branch of its prefill/decode ``If``) runs inside
  ``If(PROBE_ON, decode form, pass-through)``; the pass-through returns each state tensor as it came
  (an Identity each) and zeros for each label (``surgery.state_unchanged``, as a prompt's prefill does).

What ``switched_overhead`` reports is a lower bound of the probe's cost over the base: "off" still
runs what the switch cannot remove. For a response probe, its prefill/decode ``If``, the inner ``If``
and the pass-through (Shape, Slice, an Identity per state tensor, a Concat and a ConstantOfShape per
label: 8 nodes for a probe with 2 state tensors); for a prompt probe, each of its ``If`` shells
(9 on SmolLM2: 8 stage ``If``s and the last), the ``And`` per ``If`` and the nodes computing the
pass's shape.

``switched_overhead`` then alternates the probe on and off pass by pass (decode steps, or prefill
passes for a prompt probe) on one state, with a second "off" arm as a null control (off vs off: how
far the method is from 0 on this machine).
"""

from __future__ import annotations

import itertools
import shutil
import time
from pathlib import Path

import numpy as np

PROBE_ON = "singlepass/probe_on"
# the three arms of a round in every order: round r runs ORDERS[(r // prompts) % 6], so each arm follows each
# other arm equally often and every prompt meets every order (a fixed rotation would tie both to the round)
ORDERS = list(itertools.permutations(("on", "off", "null")))


def switchable(src: str | Path, dst: str | Path) -> Path:
    """Copy the artifact ``src`` (exactly one fused probe) to ``dst`` with its probe behind the graph
    input ``PROBE_ON`` (module docstring). -> ``dst``. Weights, tokenizer and manifest are copied; the
    manifest does not list the extra input (a benchmark's graph, not a servable artifact)."""
    import onnx
    import onnx_graphsurgeon as gs

    from singlepass.errors import SinglepassError
    from singlepass.export.manifest import GRAPH, GRAPH_DATA
    from singlepass.export.pipeline import save_graph
    from singlepass.export.surgery import Namer, state_unchanged
    from singlepass.runtime.contract import RESPONSE_MASK, read_artifact

    src, dst = Path(src), Path(dst)
    manifest = read_artifact(src)
    if len(manifest.probes) != 1:
        raise SinglepassError(f"{src}: switchable takes an artifact with one probe, not {len(manifest.probes)}")
    (probe,) = manifest.probes
    graph = gs.import_onnx(onnx.load(str(src / GRAPH)))
    on = gs.Variable(PROBE_ON, np.bool_, [1])
    namer = Namer(graph)
    # the Ifs the export's surgery added (surgery.Namer: "singlepass/If..."); a base graph's own are left alone
    ifs = [n for n in graph.nodes if n.op == "If" and (n.name or "").startswith("singlepass/If")]
    if not ifs:
        raise SinglepassError(
            f"{src}: the probe {probe.name!r} is not behind an If (an fp32 artifact fuses it unbranched)"
        )
    if probe.state:  # a response probe: one If, prefill form / decode form
        presents = {s["present"]: s["past"] for s in probe.state}
        outputs = {f"{probe.name}/logits", *presents}
        mine = [n for n in ifs if outputs <= {o.name for o in n.outputs}]
        if len(mine) != 1:
            raise SinglepassError(
                f"{src}: the response probe {probe.name!r} has {len(mine)} Ifs returning its logits and state, not 1"
            )
        (iff,) = mine
        decode = iff.attrs["else_branch"]
        inner_outs = [gs.Variable(namer(o.name.replace("/", "_") + "_switched"), o.dtype, o.shape) for o in iff.outputs]
        # the batch size from the response mask [B, T]; the state unchanged, zero labels
        mask_shape = gs.Variable(namer("switch_mask_shape"), np.int64)
        batch = gs.Variable(namer("switch_batch"), np.int64)
        nodes = [
            namer.node("Shape", [graph.tensors()[RESPONSE_MASK]], [mask_shape]),
            namer.node("Slice", [mask_shape, namer.i64("b0", [0]), namer.i64("b1", [1])], [batch]),
        ]
        more, outs = state_unchanged(graph, namer, batch, list(iff.outputs), presents, "switchable")
        through = gs.Graph(nodes=nodes + more, outputs=outs, name=namer("pass_through"))
        inner = gs.Node("If", name=namer("If"), inputs=[on], outputs=inner_outs)
        inner.attrs = {"then_branch": decode, "else_branch": through}
        iff.attrs["else_branch"] = gs.Graph(nodes=[inner], outputs=inner_outs, name=namer("switched_decode"))
    else:  # a prompt probe: every If it added runs its no-op branch unless on
        for iff in ifs:
            both = gs.Variable(namer("switch_cond"), np.bool_, [1])
            graph.nodes.append(namer.node("And", [iff.inputs[0], on], [both]))
            iff.inputs[0] = both
    graph.inputs.append(on)
    graph.toposort()
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(GRAPH, GRAPH_DATA))
    save_graph(gs.export_onnx(graph), dst)
    return dst


def _as_list(prompts) -> list:
    """A text -> [it]; a list of texts or of token-id lists -> itself (a clear error when empty)."""
    items = [prompts] if isinstance(prompts, str) else list(prompts)
    if not items:
        raise ValueError("switched_overhead needs at least one prompt")
    return items


class Switched:
    """A runtime backend that feeds ``PROBE_ON`` (``on``) with every pass; everything else is the backend's."""

    def __init__(self, backend):
        self.inner, self.on = backend, True
        self._flags = {True: np.ones(1, np.bool_), False: np.zeros(1, np.bool_)}

    def run(self, feed: dict, *args, **kw):
        return self.inner.run(feed | {PROBE_ON: self._flags[self.on]}, *args, **kw)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _timed(backend, manifest, phase: str, state, tokens, seqs) -> float:
    """Seconds of one pass: a decode step from ``state`` (the same cache every time: the in-place cache is
    written at the same slot; a response probe's state, written back into its arrays, folds the token in
    again on each "on" pass), or a prefill of ``seqs``."""
    from singlepass.runtime.passes import decode_one_token, prefill

    t0 = time.perf_counter()
    if phase == "decode":
        decode_one_token(backend, manifest, state, tokens)
    else:
        prefill(backend, manifest, seqs)
    return time.perf_counter() - t0


def switched_overhead(
    folder: str | Path,
    prompts: str | list,
    threads: int,
    batches=(1, 8),
    pairs: int = 1000,
    phase: str = "decode",
    warmup: int = 8,
) -> dict:
    """The probe of the switchable artifact ``folder`` on and off inside one session, at each batch
    size: ``pairs`` rounds of three passes, probe on, off, and off again (the null control), in each of
    the 6 orders in turn (``ORDERS``). ``prompts``: a text, or a list of texts or token-id lists
    (through the chat template already). ``phase="decode"`` (a response probe) times decode steps
    from one state: the first prompt (repeated for batch B) prefilled and ``warmup`` greedy steps;
    ``"prefill"`` (a prompt probe) times prefill passes, round r on prompt r mod n (repeated for B).
    -> {"batch B": {"off_ms", "on_ms" (medians), "overhead_ms" (median of on - off within a round),
    "overhead_pct" (that over off_ms), "overhead_pct_iqr", "null_pct" (median of off2 - off within a
    round, over off_ms: the method's own error), "null_pct_iqr", "pairs", "context_tokens"}}.

    Why one session: the same int4 base artifact in three sessions of one process (2 threads,
    2026-12-07, scratch runs): alternating block by block (60 blocks of 16 decode steps, each after
    ``machine.SETTLE_S``) the second and third sessions ran 5.2% and 6.4% faster than the first;
    alternating step by step with the threads' spinning off (1,000 rounds), 0.09% and 2.47% slower."""
    from singlepass.benchmarks.machine import settle
    from singlepass.runtime.api import load
    from singlepass.runtime.passes import decode_one_token, last_logits, prefill

    if phase not in ("decode", "prefill"):
        raise ValueError(f"phase must be 'decode' or 'prefill', not {phase!r}")
    rt = load(folder, threads=threads)
    backend = Switched(rt.backend)
    seqs = [rt.encode(p, truncate=True)[0] if isinstance(p, str) else list(p) for p in _as_list(prompts)]
    ids = seqs[0]
    out = {}
    for b in batches:
        backend.on = True
        o, st = prefill(backend, rt.manifest, [ids] * b)
        toks = last_logits(rt.manifest, o).argmax(-1).astype(np.int64)  # [B]
        for _ in range(warmup):
            o, st = decode_one_token(backend, rt.manifest, st, toks)
            toks = last_logits(rt.manifest, o).argmax(-1).astype(np.int64)

        settle()
        for r in range(warmup):
            _timed(backend, rt.manifest, phase, st, toks, [seqs[r % len(seqs)]] * b)
        arms = ("on", "off", "null")
        times = {a: [] for a in arms}
        for r in range(pairs):
            batch = [seqs[r % len(seqs)]] * b
            for a in ORDERS[(r // len(seqs)) % len(ORDERS)]:
                backend.on = a == "on"
                times[a].append(_timed(backend, rt.manifest, phase, st, toks, batch))
        on, off, null = (np.asarray(times[a]) * 1e3 for a in arms)
        off_ms = float(np.median(off))
        pct, null_pct = 100.0 * (on - off) / off_ms, 100.0 * (null - off) / off_ms
        out[f"batch {b}"] = {
            "batch": b,
            "off_ms": off_ms,
            "on_ms": float(np.median(on)),
            "overhead_ms": float(np.median(on - off)),
            "overhead_pct": float(np.median(pct)),
            "overhead_pct_iqr": [float(np.percentile(pct, q)) for q in (25, 75)],
            "null_pct": float(np.median(null_pct)),
            "null_pct_iqr": [float(np.percentile(null_pct, q)) for q in (25, 75)],
            "pairs": pairs,
            "prompts": len(seqs),
            # decode: the context of each step; prefill: the mean prompt length
            "context_tokens": len(ids) + warmup if phase == "decode" else float(np.mean([len(q) for q in seqs])),
        }
        backend.on = True
    return out
