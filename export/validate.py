"""Parity of an exported artifact against the PyTorch reference (ONNX Runtime, CPU, fp32).

Reference = the Hugging Face model with ``output_hidden_states=True`` and each torch probe
applied to ``torch.stack(hidden_states)`` (or to the last-position logits for MULI), with the
same padding and position ids. Checked every time an artifact is written, and on demand:

* prefill on padded batches, left and right padding, several lengths: every probe's ``probs``
  (max |diff| <= 1e-4) and ``logits`` (<= 1e-3 x max(1, max |ref|)), the next-token logits (<= 1e-3; on real
  tokens when the graph returns all positions), the exposed hidden states if any (relative);
  compared with polygraphy's ``Comparator`` (ONNX Runtime runner vs a PyTorch runner);
* 20 greedy decode steps (KV cache present -> past, or full recompute for a graph without a
  cache): identical tokens, per-step logits and probe outputs within the same tolerances.

A failure raises ``ValidationError`` with a table whose first row is the worst tensor.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from singlepass.errors import SinglepassError

TOL_PROBS = 1e-4
TOL_LOGITS = 1e-3
TOL_HIDDEN_REL = 1e-4
DECODE_STEPS = 20
PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the sea, the wind and a small boat that sails home at night.",
    "I hate this product, it broke after one day and support never answered.",
    "Hi",
    "Explain step by step how photosynthesis turns sunlight, water and carbon dioxide into sugar and oxygen, "
    "and why it matters for life on Earth.",
    "The movie was a delight from start to finish.",
]


class ValidationError(SinglepassError):
    """The artifact does not reproduce the PyTorch reference."""


@dataclass
class Check:
    case: str
    tensor: str
    max_abs_diff: float
    tolerance: float
    metric: str = "max_abs"

    @property
    def ok(self) -> bool:
        return bool(np.isfinite(self.max_abs_diff)) and self.max_abs_diff <= self.tolerance

    @property
    def ratio(self) -> float:
        if not np.isfinite(self.max_abs_diff):
            return float("inf")
        if self.tolerance <= 0:
            return float("inf") if self.max_abs_diff > 0 else 0.0
        return self.max_abs_diff / self.tolerance


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)
    token_mismatches: list[str] = field(default_factory=list)
    tokens: dict = field(default_factory=dict)
    polygraphy: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks) and not self.token_mismatches and all(self.polygraphy.values())

    def worst(self) -> Check | None:
        return max(self.checks, key=lambda c: c.ratio, default=None)

    def max_by_kind(self) -> dict:
        out = {}
        for c in self.checks:
            out[c.tensor] = max(out.get(c.tensor, 0.0), c.max_abs_diff)
        return out

    def table(self, limit: int = 12) -> str:
        rows = sorted(self.checks, key=lambda c: -c.ratio)[:limit]
        lines = [f"{'case':<34} {'tensor':<24} {'metric':<8} {'max diff':>10} {'tol':>8}  ok"]
        for c in rows:
            lines.append(f"{c.case:<34} {c.tensor:<24} {c.metric:<8} {c.max_abs_diff:>10.3g} {c.tolerance:>8.0e}  "
                         f"{'yes' if c.ok else 'NO'}")
        for m in self.token_mismatches:
            lines.append(f"greedy tokens differ: {m}")
        for k, v in self.polygraphy.items():
            if not v:
                lines.append(f"polygraphy comparison failed: {k}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        w = self.worst()
        return {"passed": self.ok, "seconds": round(self.seconds, 2), "worst": asdict(w) if w else None,
                "max_abs_diff": self.max_by_kind(), "token_mismatches": self.token_mismatches,
                "polygraphy": self.polygraphy, "decode_tokens": self.tokens,
                "tolerances": {"probs": TOL_PROBS, "logits": TOL_LOGITS, "probe_logits_scaled": TOL_LOGITS,
                               "hidden_states_relative": TOL_HIDDEN_REL},
                "checks": [asdict(c) | {"ok": c.ok} for c in self.checks]}


# ----------------------------------------------------------------------------- helpers

def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def session(path: Path, threads: int | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
        raise SinglepassError(f"{path}: ONNX Runtime cannot load the graph ({str(e).splitlines()[0][:300]})") from None


class Artifact:
    """An artifact folder opened for validation: manifest, session, torch backbone and probes."""

    def __init__(self, folder: Path, manifest: dict, backbone, probes: list[tuple[dict, object]], sess):
        self.folder, self.m, self.bb, self.probes, self.sess = folder, manifest, backbone, probes, sess
        g = manifest["graph"]
        self.inputs = {i["name"] for i in g["inputs"]}
        self.outputs = [o["name"] for o in g["outputs"]]
        self.kv = g["kv_cache"]
        self.last_only = g["logits_last_position_only"]

    # -- feeds
    def feed(self, ids, mask, pos, past=None) -> dict:
        from singlepass.runtime.feeds import make_feed

        return make_feed(self.m, ids, mask, pos, past)

    # -- reference
    def reference(self, ids, mask, pos, cache=None):
        """-> (outputs dict named like the graph's, new cache). ``cache``: DynamicCache or None."""
        import torch

        from singlepass.models.probes import probabilities

        kw = dict(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                  output_hidden_states=True, return_dict=True, use_cache=cache is not None)
        if self.m["graph"]["position_ids"]:
            kw["position_ids"] = torch.from_numpy(pos)
        if cache is not None:
            kw["past_key_values"] = cache
        with torch.no_grad():
            out = self.bb.model(**kw)
            hs = torch.stack(out.hidden_states, 0)
            T = ids.shape[1]
            step_mask = torch.from_numpy(mask[:, -T:])
            res = OrderedDict()
            logits = out.logits
            res[self.m["graph"]["logits"]] = (logits[:, -1:] if self.last_only else logits).numpy()
            for p, module in self.probes:
                if p["input"] == "hidden_states":
                    lg = module(hs, step_mask)
                else:
                    lg = module(logits[:, -1])
                res[p["outputs"]["logits"]] = lg.numpy()
                res[p["outputs"]["probs"]] = probabilities(lg).numpy()
            if self.m["graph"]["hidden_states"]:
                res[self.m["graph"]["hidden_states"]] = hs.numpy()
        return res, (out.past_key_values if cache is not None else None)

    def tolerance(self, name: str) -> float:
        """Probabilities 1e-4 and next-token logits 1e-3, absolute (fp32); probe logits 1e-3 of
        max(1, max |reference|)."""
        return TOL_PROBS if name.endswith("/probs") else TOL_LOGITS

    def compare(self, report: Report, case: str, got: dict, ref: dict, mask: np.ndarray) -> None:
        g = self.m["graph"]
        for name, r in ref.items():
            a = got[name]
            if a.shape != r.shape:
                report.checks.append(Check(case, name, float("inf"), self.tolerance(name), "shape"))
                continue
            if name == g["hidden_states"]:
                from singlepass.models.extract import relative_error

                keep = mask.astype(bool)
                report.checks.append(Check(case, name, relative_error(a[:, keep], r[:, keep]), TOL_HIDDEN_REL,
                                           "rel"))
                continue
            if name == g["logits"] and not self.last_only:
                keep = mask[:, -a.shape[1]:].astype(bool)
                a, r = a[keep], r[keep]
            diff = float(np.abs(a.astype(np.float64) - r).max()) if a.size else 0.0
            metric = "max_abs"
            if name.endswith("/logits"):  # probe logits can be large (saturated probs): scale-free
                diff, metric = diff / self.scale(r), "scaled"
            report.checks.append(Check(case, name, diff if np.isfinite(a).all() else float("inf"),
                                       self.tolerance(name), metric))

    @staticmethod
    def scale(ref: np.ndarray) -> float:
        return max(1.0, float(np.abs(ref).max())) if ref.size else 1.0


def open_artifact(folder, backbone=None, probes=None, model: str | None = None, cache_dir=None) -> Artifact:
    from singlepass.export import manifest as mf
    from singlepass.models.probe_io import load_probe
    from singlepass.models.backbone import load_backbone

    folder = Path(folder)
    m = mf.read(folder)
    if backbone is None:
        backbone = load_backbone(model or m["backbone"]["source"], cache_dir)
    if backbone.fingerprint.get("sha256") != m["backbone"].get("sha256"):
        raise SinglepassError(
            f"{folder} was exported from backbone {m['backbone'].get('name')!r} (sha256 "
            f"{str(m['backbone'].get('sha256'))[:12]}) but the reference model is {backbone.fingerprint.get('name')!r} "
            f"(sha256 {str(backbone.fingerprint.get('sha256'))[:12]}): pass --model with the exporting model")
    loaded = []
    for k, p in enumerate(m["probes"]):
        pdir = folder / p["folder"]
        if probes is not None:
            module = probes[k]
        else:
            if not (pdir / "model.safetensors").is_file():
                raise SinglepassError(f"{folder}: probe {p['name']!r} weights {pdir}/model.safetensors are missing")
            if sha256_file(pdir / "model.safetensors") != p["sha256"]:
                raise SinglepassError(f"{folder}: probe {p['name']!r} weights do not match the manifest fingerprint")
            module, _ = load_probe(pdir, backbone.fingerprint)
        loaded.append((p, module.eval()))
    sess = session(folder / m["graph"]["file"])
    return Artifact(folder, m, backbone, loaded, sess)


# ----------------------------------------------------------------------------- the checks

def _prefill_cases(art: Artifact):
    from singlepass.models.prompts import encode
    from singlepass.runtime.batching import pad_batch

    pr = art.m["prompt"]
    enc = encode(art.bb.tokenizer, PROMPTS, pr["format"], pr.get("max_length") or 512)
    pad = art.m["tokenizer"]["pad_token_id"]
    pad = 0 if pad is None else pad
    cases = []
    for side in ("left", "right"):
        cases.append((f"prefill {side} B=4", *pad_batch(enc.ids[:4], pad, side)))
    cases.append(("prefill left B=2", *pad_batch(enc.ids[4:6], pad, "left")))
    cases.append(("prefill B=1", *pad_batch(enc.ids[3:4], pad, "left")))
    return cases, enc, pad


def check_prefill(art: Artifact, report: Report) -> None:
    from polygraphy.backend.base import BaseRunner
    from polygraphy.backend.onnxrt import OnnxrtRunner
    from polygraphy.common import TensorMetadata
    from polygraphy.comparator import Comparator, CompareFunc
    from polygraphy.logger import G_LOGGER

    cases, _, _ = _prefill_cases(art)
    feeds = [art.feed(ids, mask, pos) for _, ids, mask, pos in cases]

    class TorchReference(BaseRunner):
        def __init__(self):
            super().__init__(name="pytorch-reference")

        def get_input_metadata_impl(self):
            meta = TensorMetadata()
            for i in art.sess.get_inputs():
                meta.add(i.name, dtype=np.int64 if "int64" in i.type else np.float32, shape=i.shape)
            return meta

        def infer_impl(self, feed):
            g = art.m["graph"]
            t = time.perf_counter()
            out = art.reference(feed[g["input_ids"]], feed[g["attention_mask"]],
                                feed.get(g["position_ids"]) if g["position_ids"] else None)[0]
            self.inference_time = time.perf_counter() - t
            return out

    severity = G_LOGGER.module_severity
    G_LOGGER.module_severity = G_LOGGER.CRITICAL  # our own table reports the failures
    try:
        results = Comparator.run([OnnxrtRunner(art.sess, name="onnxruntime"), TorchReference()], data_loader=feeds)
        ort_iters, ref_iters = list(results.values())
        for (case, _, mask, _), got, ref in zip(cases, ort_iters, ref_iters):
            art.compare(report, case, got, ref, mask)
        # polygraphy judges the tensors it can compare whole: probes and last-position logits
        g = art.m["graph"]
        whole = [n for n in ref_iters[0].keys()
                 if n != g["hidden_states"] and (n != g["logits"] or art.last_only)]

        def find(name, index, result):
            return [name] if name in whole and name in result else []

        atol = {n: art.tolerance(n) * (max(art.scale(it[n]) for it in ref_iters) if n.endswith("/logits") else 1)
                for n in whole}
        acc = Comparator.compare_accuracy(results, compare_func=CompareFunc.simple(
            atol=atol, rtol=0.0, find_output_func=find))
        report.polygraphy["prefill (onnxruntime vs pytorch)"] = bool(acc)
    finally:
        G_LOGGER.module_severity = severity


def check_decode(art: Artifact, report: Report, steps: int = DECODE_STEPS) -> None:
    """Greedy decoding, ONNX Runtime and PyTorch each feeding back their own tokens."""
    import torch
    from transformers import DynamicCache

    from singlepass.models.prompts import encode
    from singlepass.runtime.batching import pad_batch

    pr = art.m["prompt"]
    enc = encode(art.bb.tokenizer, PROMPTS[:3], pr["format"], pr.get("max_length") or 512)
    pad = art.m["tokenizer"]["pad_token_id"] or 0
    ids, mask, pos = pad_batch(enc.ids, pad, "left")
    names = list(art.outputs)
    g = art.m["graph"]
    case = "decode left B=3"
    # ONNX Runtime
    o_tokens, o_steps = [], []
    cur_ids, cur_mask, cur_pos, past = ids, mask, pos, None
    for step in range(steps + 1):
        out = dict(zip(names, art.sess.run(None, art.feed(cur_ids, cur_mask, cur_pos, past))))
        o_steps.append(out)
        nxt = out[g["logits"]][:, -1].argmax(-1).astype(np.int64)
        o_tokens.append(nxt)
        cur_ids, cur_mask, cur_pos, past = _advance(art, nxt, cur_ids, cur_mask, cur_pos,
                                                    [out[n] for n in g["present_names"]])
    # PyTorch
    r_tokens = []
    cache = DynamicCache(config=art.bb.model.config) if art.kv else None
    cur_ids, cur_mask, cur_pos = ids, mask, pos
    for step in range(steps + 1):
        ref, cache = art.reference(cur_ids, cur_mask, cur_pos, cache)
        nxt = ref[g["logits"]][:, -1].argmax(-1).astype(np.int64)
        r_tokens.append(nxt)
        got = {k: v for k, v in o_steps[step].items() if k in ref}
        art.compare(report, f"{case} step {step}", got, ref, cur_mask[:, -cur_ids.shape[1]:])
        if not np.array_equal(nxt, o_tokens[step]):
            report.token_mismatches.append(f"step {step}: onnxruntime {o_tokens[step].tolist()} vs "
                                           f"pytorch {nxt.tolist()}")
            break
        cur_ids, cur_mask, cur_pos, _ = _advance(art, nxt, cur_ids, cur_mask, cur_pos, None)
    report.tokens = {"onnxruntime": np.stack(o_tokens, 1).tolist(), "pytorch": np.stack(r_tokens, 1).tolist()}
    # One row per tensor kind over all steps keeps the table readable.
    _fold(report, case)


def _advance(art: Artifact, nxt, ids, mask, pos, present):
    from singlepass.runtime.feeds import advance

    return advance(art.m, nxt, ids, mask, pos, present)


def _fold(report: Report, case: str) -> None:
    keep, worst = [], {}
    for c in report.checks:
        if c.case.startswith(case + " step"):
            w = worst.get(c.tensor)
            if w is None or c.ratio > w.ratio:
                worst[c.tensor] = c
        else:
            keep.append(c)
    for c in worst.values():
        keep.append(Check(f"{case} (worst {c.case.rsplit(' ', 2)[-2]} {c.case.rsplit(' ', 1)[-1]})", c.tensor,
                          c.max_abs_diff, c.tolerance, c.metric))
    report.checks = keep


def validate(folder, backbone=None, probes=None, model: str | None = None, cache_dir=None,
             steps: int = DECODE_STEPS, raise_on_failure: bool = True, write: bool = True) -> Report:
    """Run every parity check on an artifact folder; write validation.json; raise on failure."""
    t0 = time.perf_counter()
    art = open_artifact(folder, backbone, probes, model, cache_dir)
    report = Report()
    check_prefill(art, report)
    check_decode(art, report, steps)
    report.seconds = time.perf_counter() - t0
    if write:
        from singlepass.export import manifest as mf

        (art.folder / "validation.json").write_text(json.dumps(report.to_dict(), indent=2))
        m = mf.read(art.folder)
        m["validation"] = {k: v for k, v in report.to_dict().items() if k not in ("checks", "decode_tokens")}
        mf.write(art.folder, m)
    if not report.ok and raise_on_failure:
        w = report.worst()
        raise ValidationError(f"{folder}: the graph does not match the PyTorch reference (worst: {w.tensor} in "
                              f"{w.case}, max diff {w.max_abs_diff:.3g} > {w.tolerance:.0e})\n{report.table()}")
    return report
