"""Which dtype should the hidden-state cache use? Measure the error a probe sees.

    python -m singlepass.benchmarks.cache_dtype [--n 64] [--dataset toxicchat]

Extracts fp32 states for N prompts, rounds them to fp16 and bf16, and reports: the largest
|activation| (fp16 overflows past 65504), the worst per-vector relative error, and the
largest change in the class probability of randomly initialised pooling/gate/MHA probes
(the probes normalise per token, so they see relative error). Writes ``cache_dtype.md`` to
``--out DIR`` (default: ``./benchmarks/results`` under the current directory).
"""

from __future__ import annotations

import argparse
import platform

import torch
from tqdm.auto import tqdm

from singlepass.benchmarks.outputs import add_out_arg, results_dir
from singlepass.files import atomic_write
from singlepass.models.backbone import DEFAULT_MODEL, load_backbone
from singlepass.models.data import load_dataset
from singlepass.models.extract import extract, relative_error
from singlepass.models.probes import build_probe, probabilities


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--dataset", default="toxicchat")
    ap.add_argument("--split", default="test")
    ap.add_argument("--n", type=int, default=64)
    add_out_arg(ap)
    args = ap.parse_args(argv)

    bb = load_backbone(args.model)
    ds = load_dataset(args.dataset, args.split, limit=args.n)
    L1, d = bb.num_layers + 1, bb.hidden_size
    torch.manual_seed(0)
    probes = {
        k: build_probe(k, L1, d, 2, **p).eval()
        for k, p in [("pooling", {}), ("gate", {}), ("mha", {"factor": 8, "heads": 4})]
    }
    dtypes = [("float32", torch.float32), ("float16", torch.float16), ("bfloat16", torch.bfloat16)]
    worst = {n: {"finite": True, "rel": 0.0, **{k: 0.0 for k in probes}} for n, _ in dtypes}
    peak, n_tokens = 0.0, 0
    for i in tqdm(range(0, len(ds), 8), desc="chunks of 8 prompts"):  # chunks keep memory small
        hs, mask, _ = extract(bb, ds.texts[i : i + 8])  # [L+1, B, T, d] fp32
        real, peak, n_tokens = mask.bool(), max(peak, float(hs.abs().max())), n_tokens + int(mask.sum())
        with torch.no_grad():
            ref = {k: probabilities(p(hs, mask))[:, 1] for k, p in probes.items()}
            for name, dt in dtypes:
                q = hs.to(dt).float()  # what a cache in this dtype hands back
                w = worst[name]
                w["finite"] &= bool(torch.isfinite(q).all())
                w["rel"] = max(w["rel"], relative_error(q[:, real], hs[:, real]) if w["finite"] else float("inf"))
                for k, p in probes.items():
                    w[k] = max(w[k], float((probabilities(p(q, mask))[:, 1] - ref[k]).abs().max()))
    rows = [(n, torch.finfo(dt).bits // 8 * L1 * d, worst[n]["finite"], worst[n]["rel"], worst[n]) for n, dt in dtypes]
    lines = [
        f"# Hidden-state cache dtype ({bb.source.name}, {len(ds)} {args.dataset}/{args.split} prompts, "
        f"{n_tokens} tokens)",
        "",
        f"max |activation| = {peak:.4g} (fp16 max 65504); machine: {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}",
        "",
        f"Command: `python -m singlepass.benchmarks.cache_dtype --n {args.n} --dataset {args.dataset}`",
        "",
        "| dtype | bytes/token | finite | max rel. error per vector | max abs Δ probe prob (pooling / gate / MHA) |",
        "| --- | ---: | --- | ---: | --- |",
    ]
    for name, bpt, finite, rel, dp in rows:
        lines.append(
            f"| {name} | {bpt:,} | {finite} | {rel:.2e} | "
            + " / ".join(f"{dp[k]:.1e}" for k in ("pooling", "gate", "mha"))
            + " |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    out = results_dir(args.out) / "cache_dtype.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, text)


if __name__ == "__main__":
    main()
