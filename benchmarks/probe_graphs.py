"""A probe's exported graph timed alone, as the fused artifact runs it (no LLM around it).

    python -m singlepass.benchmarks.probe_graphs PROBE [PROBE ...] [--batches 1 8] [--tokens 48]
        [--threads 2] [--repeats 7] [--runs 200] [--states normalised|raw]

A response probe (``reads: response``) is timed in its decode-pass form: the stacked streaming graph
(``export_stream_probe(stacked=True)``), one token per row. A prompt probe is timed in the form(s)
a prefill pass runs (``export.fuse``), on ``--tokens`` tokens per row: a ``blockable`` one (pooling,
the gate) on blocks of ``LAYERS_PER_STAGE_IF`` layers, the MHA per layer; with ``--states normalised``
(the default) reading layers 0 .. L-1 as a decoder's own RMS norm outputs and the last as it is, as
the quantised artifacts fuse it (``export.fuse.normalised_sources``), with ``--states raw`` every
layer's state (the fp32 artifacts' form, and the quantised ones' before session 31). Random float32
tensors feed every layer: x 3 as a state, x 1 as a normalised layer (a norm's output has an RMS of
about its gain; before 2026-12-08 x 3 there too, which put the MHA's softmax into denormal floats and
its graph at 10.8 ms instead of 3.2). Prints the graph's node count and the median over ``--repeats``
of the mean time of ``--runs`` runs, per batch size; what it takes against a decode step or a prefill pass of the
LLM is what ``bench response --cost`` and ``bench peers`` measure. Nothing else should run meanwhile.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def _graph(module, cfg: dict, block: int, opset: int, normalised: bool = False):
    from singlepass.export.fuse import export_probe, export_stream_probe

    L1, d = module.num_layers, module.hidden_size
    if cfg.get("reads") == "response":
        return export_stream_probe(module, L1, d, opset, stacked=True)
    gains = None
    if normalised and module.reads_rms:  # gains of about 1 (their values cost nothing): the decoder's norms
        gains = [np.random.default_rng(i).uniform(0.5, 1.5, d).astype(np.float32) for i in range(L1 - 1)] + [None]
    return export_probe(module, "hidden_states", L1, d, 0, opset, block=block, gains=gains)


def _time(sess, feed: dict, runs: int, repeats: int) -> float:
    for _ in range(max(10, runs // 4)):
        sess.run(None, feed)
    means = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(runs):
            sess.run(None, feed)
        means.append((time.perf_counter() - t) / runs)
    return sorted(means)[len(means) // 2]


def main(argv=None) -> int:
    from singlepass.benchmarks.machine import ort_machine
    from singlepass.export.fuse import stage_block
    from singlepass.models.probe_io import load_probe
    from singlepass.runtime.backends import ort_session

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("probes", nargs="+", help="probe folders (singlepass train outputs)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--tokens", type=int, default=48, help="tokens per row of a prompt probe's pass")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--runs", type=int, default=200)
    p.add_argument("--opset", type=int, default=23)
    p.add_argument("--states", choices=("normalised", "raw"), default="normalised", help="what a prompt probe reads")
    a = p.parse_args(argv)
    print(ort_machine(), flush=True)
    print("| probe | form | nodes | batch | tokens per row | ms |\n| --- | --- | ---: | ---: | ---: | ---: |")
    rng = np.random.default_rng(0)
    for folder in a.probes:
        module, cfg = load_probe(folder)[:2]
        module = module.eval()
        response = cfg.get("reads") == "response"
        normalised = a.states == "normalised" and module.reads_rms and not response
        block = stage_block(module)
        if response:
            form = "decode (stacked stream)"
        else:
            form = f"blocks of {block} layers" if block > 1 else "per layer"
            form += ", normalised layers" if normalised else ", states"
        proto = _graph(module, cfg, block, a.opset, normalised)
        sess = ort_session(proto.SerializeToString(), a.threads)
        for b in a.batches:
            t = 1 if response else a.tokens
            # a norm's output has an RMS of about its gain (~1), a state its own scale (x 3); normalised layers
            # at x 3 put the MHA's softmax into denormal floats: its graph 10.8 ms where x 1 gives 3.2 (2026-12-08)
            scale = [1.0 if normalised else 3.0] * (module.num_layers - 1) + [3.0]
            feed = {
                f"state_{i}": (rng.standard_normal((b, t, module.hidden_size)) * scale[i]).astype(np.float32)
                for i in range(module.num_layers)
            } | {"mask": np.ones((b, t), np.int64)}
            if response:
                for (name, _), init in zip(module.stream_state_shapes(b), module.stream_init(b)):
                    feed[f"past_{name}"] = init.numpy()
            wanted = {i.name for i in sess.get_inputs()}
            ms = _time(sess, {k: v for k, v in feed.items() if k in wanted}, a.runs, a.repeats) * 1e3
            print(f"| {folder} | {form} | {len(proto.graph.node)} | {b} | {t} | {ms:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
