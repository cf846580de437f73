"""Parity of an exported artifact against the PyTorch reference, through the runtime's own path.

The artifact side is what ``singlepass generate`` and the server run: the runtime's tokenizer
(``runtime/tokenize.py``), its ONNX Runtime CPU backend and its one decode path
(``runtime/passes.py``: ``prefill`` + ``decode_one_token``). The reference is the Hugging Face
model with ``output_hidden_states=True`` and each torch probe applied to
``torch.stack(hidden_states)`` (or to the last-position logits for MULI), fed the same token
ids, padding and position ids. Checked every time an artifact is written, and on demand:

* prefill on padded batches, left and right padding, several lengths: every probe's ``probs``
  and ``logits`` (scaled by max(1, max |ref|)), the next-token logits at real tokens (a
  right-padded row's last position is padding: with a sliding window it attends to nothing, and
  its logits are never read; so probes reading the last position's logits, MULI, are compared on
  the rows whose last position is real), the exposed hidden states if any (relative error);
* 20 greedy decode steps (KV cache present -> past, or full recompute for a graph without a
  cache): identical tokens, per-step logits and probe outputs within the same tolerances.

Tolerances are per weight precision (``TOLERANCES``). A quantised graph (``--weights int8|int4``)
is compared with a reference holding *the graph's own* weights (dequantised from its MatMulNBits
initializers, ``export/quantize.py``), so what is checked is the export, not the quantisation
error; what remains is ONNX Runtime's int8 activations in those MatMuls (accuracy level 4), hence
wider tolerances, and greedy decoding continues teacher-forced on the reference's token when the
two pick different tokens (a near tie), with a minimum share of agreeing steps. The quantisation
error itself (against the fp32 weights) is measured by ``singlepass bench peers``' quality table.
A failure raises ``ValidationError`` with a table whose first row is the worst tensor.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from singlepass.errors import SinglepassError

# max |diff| per tensor kind and weight precision: probe probabilities, next-token logits (absolute),
# probe logits (scaled by max(1, max |ref|): the runtime's labels are computed from them, in float64,
# so they are checked where the float32 probs are blind, beyond a logit of ~17), hidden states relative.
# token_agreement: the share of greedy decode steps (rows x steps) whose tokens must agree.
TOLERANCES = {
    "fp32": {
        "probs": 1e-4,
        "logits": 1e-3,
        "probe_logits": 1e-3,
        "hidden_states_relative": 1e-4,
        "token_agreement": 1.0,
    },
    # quantised: measured on SmolLM2-135M int4, pooling + gate + MHA probes: probs 0.064 (pooling, over one
    # decode-step token; 0.014 in prefill), logits 1.93 (logits reach ~30), tokens 62/63; tiny model int8: probs
    # 0.024, logits 0.06. Probe logits (scaled), quick ToxicChat probes: int4 pooling 0.04, gate 0.005, MHA 0.009,
    # streaming gate / MHA 0.015 / 0.016; int8 pooling 0.091, gate 0.0084, MHA 0.0019; but the tiny random
    # model's int8 MHA 0.72 (its logits swing with its activations' int8 rounding), hence 1.0 (a probe logit
    # of 45 where the reference's is 20 fails). What differs is ONNX Runtime's int8 activations inside
    # MatMulNBits (accuracy level 4).
    "int8": {
        "probs": 0.1,
        "logits": 3.0,
        "probe_logits": 1.0,
        "hidden_states_relative": 5e-2,
        "token_agreement": 0.9,
    },
    "int4": {
        "probs": 0.1,
        "logits": 3.0,
        "probe_logits": 1.0,
        "hidden_states_relative": 5e-2,
        "token_agreement": 0.9,
    },
}
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
    precision: str = "fp32"
    checks: list[Check] = field(default_factory=list)
    token_mismatches: list[str] = field(default_factory=list)
    tokens: dict = field(default_factory=dict)
    token_agreement: float = 1.0  # share of (row, step) greedy tokens that agree
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks) and self.token_agreement >= TOLERANCES[self.precision]["token_agreement"]

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
            lines.append(
                f"{c.case:<34} {c.tensor:<24} {c.metric:<8} {c.max_abs_diff:>10.3g} {c.tolerance:>8.0e}  "
                f"{'yes' if c.ok else 'NO'}"
            )
        lines += [f"greedy tokens differ: {m}" for m in self.token_mismatches]
        if self.token_mismatches:
            need = TOLERANCES[self.precision]["token_agreement"]
            lines.append(f"greedy token agreement {self.token_agreement:.3f} (needed >= {need})")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        w = self.worst()
        return {
            "passed": self.ok,
            "seconds": round(self.seconds, 2),
            "worst": asdict(w) if w else None,
            "max_abs_diff": self.max_by_kind(),
            "token_mismatches": self.token_mismatches,
            "token_agreement": round(self.token_agreement, 4),
            "decode_tokens": self.tokens,
            "precision": self.precision,
            "tolerances": TOLERANCES[self.precision],
            "path": "runtime prefill + decode_one_token, onnxruntime-cpu",
            "checks": [asdict(c) | {"ok": c.ok} for c in self.checks],
        }


# ----------------------------------------------------------------------------- the two sides


class Parity:
    """An artifact opened for validation: the runtime side (manifest, tokenizer, ONNX Runtime
    backend) and the reference side (torch backbone, torch probes)."""

    def __init__(self, manifest, backbone, modules: dict, precision: str = "fp32"):
        from singlepass.runtime.backends import OrtBackend
        from singlepass.runtime.tokenize import PromptTokenizer

        self.m, self.bb, self.modules = manifest, backbone, modules
        self.precision = precision
        self.model = backbone.model  # the reference: the graph's own weights (see the module docstring)
        if precision != "fp32":
            from singlepass.export.quantize import graph_weights, with_weights

            self.model = with_weights(backbone.model, graph_weights(manifest.folder)).eval()
        g = manifest.graph
        self.backend = OrtBackend(manifest.folder / g.file, manifest, "cpu")
        self.tokenizer = PromptTokenizer(manifest.folder, manifest)
        self.tol = TOLERANCES[precision]
        # beyond what serving fetches: the probes' float32 probs outputs and the exposed hidden states
        self.extra = tuple(p.probs for p in manifest.probes) + ((g.hidden_states,) if g.hidden_states else ())

    def encode(self, texts: list[str]) -> list[list[int]]:
        return [self.tokenizer.encode(t, self.m.limits.max_prompt_length, truncate=True)[0] for t in texts]

    def reference(
        self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, cache=None, response: list | None = None
    ) -> tuple[dict, object]:
        """-> (outputs named like the graph's, new cache). ``mask`` [B, past + T]; ``cache``:
        a DynamicCache or None (no KV cache: ``ids`` is the whole sequence).

        ``response``: in a decode pass, the list of the response tokens' hidden states so far
        ([L+1, B, 1, d] per pass), to which this pass's are appended: the response probes'
        reference is the probe run over that whole prefix at once (their streaming form must
        equal it). Without it the response probes have no reference (a prompt pass)."""
        import torch

        from singlepass.models.extract import cache_arg, returned_cache
        from singlepass.models.probes import probabilities

        g = self.m.graph
        kw = dict(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            output_hidden_states=True,
            return_dict=True,
            use_cache=cache is not None,
        )
        if g.position_ids:
            kw["position_ids"] = torch.from_numpy(pos)
        if cache is not None:
            kw[cache_arg(self.model)] = cache
        with torch.no_grad():
            out = self.model(**kw)
            hs = torch.stack(out.hidden_states, 0)  # [L+1, B, T, d]
            step_mask = torch.from_numpy(mask[:, -ids.shape[1] :])  # [B, T]: this pass's tokens
            logits = out.logits  # [B, T, V]
            if g.logits_last_position_only:  # the graph's last position: each row's last token in place
                T = ids.shape[1]
                last = T - 1 - step_mask.flip(1).argmax(1) if g.inplace else torch.full((len(ids),), T - 1)
                logits = logits[torch.arange(len(ids)), last][:, None]  # [B, 1, V]
            res = {g.logits: logits.numpy()}
            if response is not None:
                response.append(hs)
                seen = torch.cat(response, 2)  # [L+1, B, k, d]: the response tokens 1..k
            for p in self.m.probes:
                module = self.modules[p.name]
                if p.reads == "prompt" and ids.shape[1] < g.min_prefill_tokens:
                    continue  # a prompt probe runs on the prefill pass only (zeros in decode passes)
                if p.reads == "response":
                    if response is None:
                        continue
                    lg = module(seen, torch.ones(seen.shape[1:3], dtype=torch.int64))
                    res[p.logits], res[p.probs] = lg.numpy(), probabilities(lg).numpy()
                    continue
                lg = module(hs, step_mask) if p.input == "hidden_states" else module(out.logits[:, -1])
                res[p.logits] = lg.numpy()
                res[p.probs] = probabilities(lg).numpy()
            if g.hidden_states:
                res[g.hidden_states] = hs.numpy()
        return res, (returned_cache(out) if cache is not None else None)

    def compare(self, report: Report, case: str, got: dict, ref: dict, mask: np.ndarray) -> None:
        """``mask`` [B, T]: the real tokens of this pass."""
        g = self.m.graph
        last_real = mask[:, -1].astype(bool)  # [B]: rows whose last position is a real token
        reads_last = {n for p in self.m.probes if p.input == "logits" for n in (p.logits, p.probs)}
        probe_probs, probe_logits = {p.probs for p in self.m.probes}, {p.logits for p in self.m.probes}
        for name, r in ref.items():
            a = got[name]
            if name in reads_last:  # a logit-input probe reads the last position: padding in a right-padded row
                a, r = a[last_real], r[last_real]
            kind = "probs" if name in probe_probs else "probe_logits" if name in probe_logits else "logits"
            tol = self.tol[kind]
            if a.shape != r.shape:
                report.checks.append(Check(case, name, float("inf"), tol, "shape"))
                continue
            if name == g.hidden_states:
                from singlepass.models.extract import relative_error

                keep = mask.astype(bool)
                report.checks.append(
                    Check(case, name, relative_error(a[:, keep], r[:, keep]), self.tol["hidden_states_relative"], "rel")
                )
                continue
            if name == g.logits:  # real tokens only: a padded position's logits are never read
                keep = mask[:, -a.shape[1] :].astype(bool)  # [B, T] or, last position only, [B, 1]
                a, r = a[keep], r[keep]
            diff = float(np.abs(a.astype(np.float64) - r).max()) if a.size else 0.0
            metric = "max_abs"
            if name in probe_logits:  # probe logits can be large (saturated probs): scale-free
                diff, metric = diff / (max(1.0, float(np.abs(r).max())) if r.size else 1.0), "scaled"
            report.checks.append(Check(case, name, diff if np.isfinite(a).all() else float("inf"), tol, metric))


def open_parity(folder, backbone=None, probes: dict | None = None, model: str | None = None, cache_dir=None) -> Parity:
    """``probes``: {name: torch module} already in memory (the export), else loaded from the
    artifact's probes/ folders after checking their fingerprints."""
    from singlepass.files import sha256_file
    from singlepass.models.backbone import load_backbone
    from singlepass.models.probe_io import load_probe
    from singlepass.runtime.contract import read_artifact

    m = read_artifact(folder)
    if backbone is None:
        backbone = load_backbone(model or m.backbone["source"], cache_dir)
    if backbone.fingerprint.get("sha256") != m.backbone.get("sha256"):
        raise SinglepassError(
            f"{folder} was exported from backbone {m.backbone.get('name')!r} (sha256 "
            f"{str(m.backbone.get('sha256'))[:12]}) but the reference model is {backbone.fingerprint.get('name')!r} "
            f"(sha256 {str(backbone.fingerprint.get('sha256'))[:12]}): pass --model with the exporting model"
        )
    modules = {}
    for p in m.probes:
        if probes is not None:
            modules[p.name] = probes[p.name].eval()
            continue
        weights = m.folder / p.folder / "model.safetensors"
        if not weights.is_file():
            raise SinglepassError(f"{folder}: probe {p.name!r} weights {weights} are missing")
        if sha256_file(weights) != p.sha256:
            raise SinglepassError(f"{folder}: probe {p.name!r} weights do not match the manifest fingerprint")
        modules[p.name] = load_probe(weights.parent, backbone.fingerprint)[0].eval()
    if m.graph.precision not in TOLERANCES:
        raise SinglepassError(
            f"{folder}: the manifest's weight precision {m.graph.precision!r} is not one of {list(TOLERANCES)}"
        )
    return Parity(m, backbone, modules, m.graph.precision)


# ----------------------------------------------------------------------------- the checks


def check_prefill(par: Parity, report: Report) -> None:
    from singlepass.runtime.batching import pad_batch
    from singlepass.runtime.passes import prefill

    seqs = par.encode(PROMPTS)
    side = "right" if par.m.graph.inplace else "left"  # the layout's own (in place: rows are prefixes)
    cases = [(f"prefill {side} B=4", seqs[:4], side)]
    if side == "left":  # the other side too, where the layout allows it
        cases.append(("prefill right B=4", seqs[:4], "right"))
    cases += [(f"prefill {side} B=2", seqs[4:6], side), ("prefill B=1", seqs[3:4], side)]
    for case, batch, pad_side in cases:
        got, _ = prefill(par.backend, par.m, batch, side=pad_side, extra=par.extra)
        ids, mask, pos = pad_batch(batch, par.m.pad_id, pad_side, par.m.graph.min_prefill_tokens)  # as the runtime pads
        ref, _ = par.reference(ids, mask, pos)
        par.compare(report, case, got, ref, mask)


def check_decode(par: Parity, report: Report, steps: int = DECODE_STEPS) -> None:
    """Greedy decoding in lockstep: the runtime's passes and PyTorch (its own KV cache) fed the
    same state; the chosen tokens must agree at every step (fp32). A quantised graph continues on
    the reference's tokens after a disagreement and must agree on a share of the steps."""
    from transformers import DynamicCache

    from singlepass.runtime.passes import decode_one_token, last_logits, prefill

    inplace = par.m.graph.inplace
    case = "decode right B=3 (in-place KV cache)" if inplace else "decode left B=3"
    cache = DynamicCache(config=par.bb.model.config) if par.m.graph.kv_cache else None
    out, state = prefill(par.backend, par.m, par.encode(PROMPTS[:3]), extra=par.extra)
    o_tokens, r_tokens = [], []
    response: list = []  # the generated tokens' hidden states, for the response probes' reference
    ref_mask = state.mask  # PyTorch's cache appends every pass's columns: its mask does too
    for step in range(steps + 1):
        # the state after this pass holds the pass's own inputs: ids [B, S], mask [B, past + S], pos [B, S]
        T = state.ids.shape[1]
        if step:
            ref_mask = np.concatenate([ref_mask, np.ones((len(ref_mask), 1), np.int64)], 1) if inplace else state.mask
        ref, cache = par.reference(state.ids, ref_mask, state.pos, cache, response if step else None)
        par.compare(report, f"{case} step {step}", {k: out[k] for k in ref}, ref, ref_mask[:, -T:])
        nxt = last_logits(par.m, out).argmax(-1).astype(np.int64)
        want = ref[par.m.graph.logits][:, -1].argmax(-1).astype(np.int64)
        o_tokens.append(nxt)
        r_tokens.append(want)
        if not np.array_equal(nxt, want):
            report.token_mismatches.append(f"step {step}: onnxruntime {nxt.tolist()} vs pytorch {want.tolist()}")
            if par.precision == "fp32":
                break
            nxt = want  # teacher-forced: both sides continue from the reference's tokens
        if step < steps:
            out, state = decode_one_token(par.backend, par.m, state, nxt, extra=par.extra)
    report.tokens = {"onnxruntime": np.stack(o_tokens, 1).tolist(), "pytorch": np.stack(r_tokens, 1).tolist()}
    report.token_agreement = float(np.mean(np.stack(o_tokens) == np.stack(r_tokens)))
    _fold(report, case)


def _fold(report: Report, case: str) -> None:
    """One row per tensor over all decode steps (its worst step) keeps the table readable."""
    keep, worst = [], {}
    for c in report.checks:
        if c.case.startswith(case + " step"):
            w = worst.get(c.tensor)
            if w is None or c.ratio > w.ratio:
                worst[c.tensor] = c
        else:
            keep.append(c)
    for c in worst.values():
        keep.append(
            Check(
                f"{case} (worst {c.case.rsplit(' ', 2)[-2]} {c.case.rsplit(' ', 1)[-1]})",
                c.tensor,
                c.max_abs_diff,
                c.tolerance,
                c.metric,
            )
        )
    report.checks = keep


def validate(
    folder,
    backbone=None,
    probes: dict | None = None,
    model: str | None = None,
    cache_dir=None,
    steps: int = DECODE_STEPS,
    raise_on_failure: bool = True,
    write: bool = True,
) -> Report:
    """Run every parity check on an artifact folder; write validation.json; raise on failure."""
    from singlepass.export import manifest as mf
    from singlepass.files import atomic_write_json

    t0 = time.perf_counter()
    par = open_parity(folder, backbone, probes, model, cache_dir)
    report = Report(precision=par.precision)
    check_prefill(par, report)
    check_decode(par, report, steps)
    report.seconds = time.perf_counter() - t0
    if write:
        atomic_write_json(Path(folder) / "validation.json", report.to_dict())
        raw = mf.read(folder)
        raw["validation"] = {k: v for k, v in report.to_dict().items() if k not in ("checks", "decode_tokens")}
        mf.write(Path(folder), raw)
    if not report.ok and raise_on_failure:
        w = report.worst()
        raise ValidationError(
            f"{folder}: the graph does not match the PyTorch reference (worst: {w.tensor} in "
            f"{w.case}, max diff {w.max_abs_diff:.3g} > {w.tolerance:.0e})\n{report.table()}"
        )
    return report
