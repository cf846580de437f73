"""Calibrated 4-bit rounding for ``--weights int4``: GPTQ on the GGUF's own block grid.

MatMulNBits' fast kernels take an integer zero point, so a Q4_1 block ``d * q + m`` cannot be
carried over exactly: its float offset ``m`` moves to the nearest whole step (``quantize.py``).
That shift is the same for all 32 weights of a block, so it does not average out in a dot
product: rounded to nearest, the int4 graph chose the fp32 graph's greedy next token on only
about half of ToxicChat's prompts. Here the grid stays (each block's d and zero point) and only
the codes are chosen again, by GPTQ: each layer's output error over real prompts is minimised,
not each weight's own error.

    calibration_ids   prompts (a dataset or a file, the model's chat template) -> token ids
    input_hessians    the reference model on those ids -> X^T X of every Linear's input
    gptq_rounded      -> {parameter: (packed, scales, zero points)}, cached per model + calibration

The statistics come from the unquantised model (no layer-by-layer re-calibration); inputs
shared by several Linears (q/k/v, gate/up) are accumulated once.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path

from singlepass.errors import SinglepassError

DEFAULT_CALIBRATION = "alpaca_noinput"  # generic instructions: no overlap with the safety sets' test rows
DEFAULT_ROWS = 256
MAX_LENGTH = 512
DAMP = 0.01  # GPTQ's dampening: this share of the mean diagonal is added to the Hessian
# Matrices rounded together hold their float64 Hessians [G, K, K] a few times over: G is capped so one copy
# stays under this (SmolLM2's 30 down_proj, K = 1536: 0.57 GB; a K = 8192 model: 2 at a time).
GPTQ_GROUP_BYTES = 1 << 30
NONE = "none"


def _source(spec: str) -> str:
    """What identifies the calibration data in the cache key: a shipped set's name, a file's bytes."""
    p = Path(spec)
    if p.is_file():
        return f"{p.name}:{hashlib.sha256(p.read_bytes()).hexdigest()[:16]}"
    return spec


def calibration_ids(tokenizer, spec: str, rows: int, data_dir=None, max_length: int = MAX_LENGTH) -> list[list[int]]:
    """``rows`` prompts of a shipped dataset (its train split where it has one) or a .jsonl/.csv file
    with a 'text' column, in the model's chat template (raw text for a model without one)."""
    from singlepass.models.data import DATASETS, available_splits, load_dataset
    from singlepass.models.prompts import encode

    if rows < 1:
        raise SinglepassError(f"--calibration-rows must be >= 1, not {rows}")
    split = "train" if spec not in DATASETS or "train" in available_splits(spec) else available_splits(spec)[0]
    try:
        ds = load_dataset(spec, split, data_dir, limit=rows)
    except SinglepassError as e:
        raise SinglepassError(
            f"--calibration {spec}: {e} (or --calibration none: plain round-to-nearest 4-bit weights)"
        ) from None
    fmt = "chat" if getattr(tokenizer, "chat_template", None) else "raw"
    return encode(tokenizer, list(ds.texts), fmt, max_length).ids


def quantised_linears(model) -> dict[str, "object"]:
    """{parameter name: Linear} of the weights ``--weights int4`` stores in 4 bits: every Linear but
    the output head (8-bit, its Q8_0 blocks carried over exactly)."""
    import torch

    head = model.get_output_embeddings()
    return {
        f"{name}.weight": m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head
    }


def input_hessians(model, ids: list[list[int]], progress: bool = True, batch_tokens: int = 2048) -> dict[str, "object"]:
    """{parameter name: X^T X [K, K] float32} of each 4-bit Linear's input over every calibration
    token. The prompts run in right-padded batches of similar length through the decoder stack alone
    (the output head is not calibrated), each padding slot's row left out of the sums: the same
    matrices as one prompt at a time, up to float rounding. First tokens every prompt shares (the
    chat template's system turn: 24 of SmolLM2's ~42 tokens per Alpaca prompt) run once, their sums
    counted once per prompt, and the batches run on a copy of their keys and values
    (``models.extract``'s shared-prefix pass). Linears that read the same tensor share one matrix."""
    import torch
    from tqdm.auto import tqdm

    from singlepass.models.extract import (
        batch_tensors,
        decoder,
        plan_batches,
        prefix_to_share,
        run_prefix,
        run_suffixes,
    )

    linears = quantised_linears(model)
    hess: dict[str, torch.Tensor] = {}
    last: list = [None, None]  # the previous Linear's input tensor and parameter (q/k/v, gate/up run in a row)
    real: list = [None, 1.0]  # this pass's real-token rows [B*T] bool, and how many prompts each stands for

    def hook(name):
        def fn(module, inputs, output):
            x = inputs[0]
            if x is last[0]:  # the tensor the previous Linear read: accumulate once, share its matrix
                hess[name] = hess[last[1]]
                return
            last[:] = [x, name]
            x2 = x.reshape(-1, x.shape[-1])[real[0]].float()  # [tokens, K]
            if name not in hess:
                hess[name] = torch.zeros(x2.shape[1], x2.shape[1])
            hess[name].addmm_(x2.T, x2, alpha=real[1])

        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in linears.items()]
    P = prefix_to_share(ids)
    batches = plan_batches([len(r) - P for r in ids], 16, batch_tokens)
    try:
        with torch.no_grad(), tqdm(total=len(ids), desc="calibrate", unit="prompt", disable=not progress) as bar:
            if P:
                real[:] = [torch.ones(P, dtype=torch.bool), float(len(ids))]  # one pass counted once per prompt
                cache_p = run_prefix(model, ids[0][:P])[1]
                last[:], real[1] = [None, None], 1.0
            for rows in batches:
                seqs = [ids[i][P:] for i in rows]  # each row's own tokens (all of them without a shared prefix)
                x, mask, pos = batch_tensors(seqs, 0, "right")  # [B, T]; pad id 0: masked
                real[0] = mask.reshape(-1).bool()
                if P:
                    run_suffixes(model, cache_p, P, x, mask, pos, hidden_states=False)
                else:
                    decoder(model)(input_ids=x, attention_mask=mask, position_ids=pos, use_cache=False)
                last[:] = [None, None]
                bar.update(len(rows))
    finally:
        for h in handles:
            h.remove()
    return hess


def gptq_rounded(
    backbone,
    spec: str = DEFAULT_CALIBRATION,
    rows: int = DEFAULT_ROWS,
    cache_dir=None,
    data_dir=None,
    log=print,
    progress: bool = True,
) -> tuple[dict[str, tuple], dict]:
    """{parameter name: (packed, scales, zero points)} of every 4-bit Linear, GPTQ-rounded on
    ``rows`` calibration prompts, and what was used (the manifest records it). Cached under the
    cache folder by model, calibration data and this code, so a second export of the model is quick."""
    from safetensors.numpy import load_file, save_file
    from tqdm.auto import tqdm

    from singlepass.export import quantize as Q
    from singlepass.models import extract
    from singlepass.models.backbone import cache_root

    # the code that makes the statistics (the shared-prefix pass) and the codes
    code = hashlib.sha256(b"".join(Path(f).read_bytes() for f in (__file__, Q.__file__, extract.__file__)))
    code = code.hexdigest()[:16]
    info = {
        "method": "gptq",
        "data": _source(spec),
        "rows": rows,
        "max_length": MAX_LENGTH,
        "damp": DAMP,
        "act_order": True,
        "model_sha256": backbone.fingerprint.get("sha256"),
        "code": code,
    }
    key = hashlib.sha256(json.dumps(info, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_root(cache_dir) / "int4-gptq" / f"{key}.safetensors"
    if path.is_file():
        flat = load_file(str(path))
        out = {
            k[:-2]: (flat[k], flat[k[:-2] + "/scales"], flat[k[:-2] + "/zero_points"]) for k in flat if k.endswith("/B")
        }
        meta = json.loads((path.with_suffix(".json")).read_text())
        log(f"int4: GPTQ-rounded weights from the cache ({path})")
        return out, meta
    t0 = time.perf_counter()
    ids = calibration_ids(backbone.tokenizer, spec, rows, data_dir)
    log(f"int4: calibrating the 4-bit rounding on {len(ids)} prompts ({sum(map(len, ids))} tokens) of {spec} ...")
    hess = input_hessians(backbone.model, ids, progress)
    out = {}
    linears = quantised_linears(backbone.model)
    groups: dict[tuple, list[str]] = {}  # the same Linear of every layer (same shape): rounded together
    for name, m in linears.items():
        if name in hess and m.weight.shape[1] % Q.BLOCK == 0:  # else round to nearest: never reached by
            # the calibration prompts, or K off the block size
            groups.setdefault((re.sub(r"\.\d+\.", ".N.", name), tuple(m.weight.shape)), []).append(name)
    with tqdm(total=sum(map(len, groups.values())), desc="gptq", unit="matrix", disable=not progress) as bar:
        for (_, (_, k)), names in groups.items():
            step = max(1, GPTQ_GROUP_BYTES // (8 * k * k))  # float64 Hessians [G, K, K]: a few copies at once
            for i in range(0, len(names), step):
                part = names[i : i + step]
                ws = [linears[n].weight.detach().float().numpy() for n in part]
                for name, (packed, scales, zp, _) in zip(part, Q.gptq_4bit_many(ws, [hess[n] for n in part], DAMP)):
                    out[name] = (packed, scales, zp)
                bar.update(len(part))
    del hess
    info.update(tokens=int(sum(map(len, ids))), seconds=round(time.perf_counter() - t0, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = {}
    for name, (packed, scales, zp) in out.items():
        flat.update({f"{name}/B": packed, f"{name}/scales": scales, f"{name}/zero_points": zp})
    for old in path.parent.glob("*.json"):  # entries of older code for the same model and data: stale
        try:
            o = json.loads(old.read_text())
        except (OSError, ValueError):
            continue
        if o.get("code") != code and all(o.get(k) == info[k] for k in ("model_sha256", "data", "rows")):
            old.with_suffix(".safetensors").unlink(missing_ok=True)
            old.unlink(missing_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(flat, str(tmp))
    path.with_suffix(".json").write_text(json.dumps(info, indent=1))
    tmp.replace(path)
    log(f"int4: GPTQ rounding of {len(out)} matrices in {info['seconds']} s (cached: {path})")
    return out, info
