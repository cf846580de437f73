"""How many rows a binary probe's float32 probabilities tie at exactly 1.0, and what that costs the
ranking metrics, against the float64 scores the project computes (``runtime.contract.class_probs``).

    python -m singlepass.benchmarks.score_ties PROBE_DIR [--source wildguardmix] [--limit 1000]

PROBE_DIR: a binary probe artifact (e.g. a ``bench loso`` fold's ``.../<fold>/mha``); the rows are
the source's held-out test part, as ``bench loso`` draws it (``loso.test_set``). Prints, for float32
(the graph's ``probs`` output) and float64: rows at exactly 1.0 (harmful / harmless), AUPRC and
TPR at 1% FPR.
"""

from __future__ import annotations

import argparse


def ties(y, p) -> dict:
    from sklearn.metrics import average_precision_score

    from singlepass.models.metrics import tpr_at_fpr

    top = p == 1.0
    return {
        "tied_at_1": int(top.sum()),
        "harmful": int((top & (y == 1)).sum()),
        "harmless": int((top & (y == 0)).sum()),
        "auprc": float(average_precision_score(y, p)),
        "tpr_at_1pct_fpr": tpr_at_fpr(y, p, 0.01),
    }


def main(argv=None) -> int:
    from singlepass.benchmarks.loso import test_set
    from singlepass.models.evaluate import probe_logits
    from singlepass.models.probe_io import load_probe_and_backbone
    from singlepass.models.probes import host_probabilities, probabilities

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("probe")
    ap.add_argument("--source", default="wildguardmix")
    ap.add_argument("--limit", type=int, default=1000)
    args = ap.parse_args(argv)
    module, cfg, bb = load_probe_and_backbone(args.probe)
    ds = test_set(args.source, limit=args.limit)
    z = probe_logits(module, cfg, bb, ds, progress=False, log=lambda *a: None)  # [N, 1] float32
    y = ds.labels
    print(f"{args.probe} on {args.source} (held-out test part, {len(y)} rows, {int(y.sum())} harmful)")
    for name, p in (("float32", probabilities(z)[:, 1].numpy()), ("float64", host_probabilities(z)[:, 1])):
        r = ties(y, p)
        print(
            f"  {name}: {r['tied_at_1']} rows at exactly 1.0 ({r['harmful']} harmful, {r['harmless']} harmless); "
            f"AUPRC {r['auprc']:.3f}; TPR at 1% FPR {100 * r['tpr_at_1pct_fpr']:.1f}%"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
