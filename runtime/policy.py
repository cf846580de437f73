"""Label policies: what the runtime does with a probe's label before it generates.

The paper's orchestration: a guard decision comes from the same prefill pass that computes
the first token, so a flagged prompt can be refused before a single token is streamed.

Per probe, one rule:

* ``report`` (the default): the label and score are returned, generation goes on;
* ``block``: when the prompt is flagged, nothing is generated; the result is the refusal
  message, the labels and ``blocked_by = <probe name>``. Flagged means, for a binary probe,
  ``P(label_names[1]) >= threshold`` (the probe's own threshold unless one is given), or, when
  labels are named, the predicted label is one of them (the only form for a multi-class probe).

The probe's own threshold is its active operating point (``singlepass train
--threshold-at-fpr 0.01`` makes it the validation threshold for 1% FPR; the F1-optimal one is
stored beside it). ``block:f1`` or ``block:fpr@0.01`` picks a stored operating point by name.

A response probe (``reads: response``) labels the response so far on every decode pass; its rule:

* ``stop``: generation stops once the response is flagged on ``consecutive`` passes in a row
  (default 2: one token's score is noisy; Qwen3Guard-Stream flags token i only when i and i-1
  are both unsafe). The result keeps the text streamed so far plus a notice, with
  ``finish_reason = "blocked"`` (the server's ``content_filter``) and ``blocked_by``.

CLI spelling (``--policy``, repeatable): ``NAME=report``, ``NAME=block``, ``NAME=block:0.8``
(threshold), ``NAME=block:f1`` / ``NAME=block:fpr@0.01`` (a stored operating point),
``NAME=block:LABEL[,LABEL...]``; ``NAME=stop``, ``NAME=stop:0.8`` for a response probe. In
Python: ``{"safety": "block"}``, ``{"safety": "block:0.8"}`` or ``{"safety": Rule("block",
threshold=0.8, message="...")}``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from singlepass.errors import SinglepassError
from singlepass.runtime.contract import FusedProbe

ACTIONS = ("report", "block", "stop")
DEFAULT_REFUSAL = "Sorry, I can't help with that request."
DEFAULT_STOP_NOTICE = "\n\n[The response was stopped: it was flagged by '{probe}'.]"


@dataclass(frozen=True)
class Rule:
    action: str = "report"
    threshold: float | None = None  # binary probes: block when P(positive) >= threshold
    labels: tuple[str, ...] = ()  # block when the predicted label is one of these
    message: str | None = None  # refusal text, or the stop notice (default: the runtime's)
    point: str | None = None  # a stored operating point ("f1", "fpr@0.01"), resolved to its threshold
    consecutive: int = 2  # stop: passes in a row the response must be flagged on

    def __post_init__(self):
        if self.action not in ACTIONS:
            raise SinglepassError(f"policy action must be one of {', '.join(ACTIONS)}, not {self.action!r}")
        if not isinstance(self.consecutive, int) or isinstance(self.consecutive, bool) or self.consecutive < 1:
            raise SinglepassError(f"policy consecutive must be an integer >= 1, not {self.consecutive!r}")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise SinglepassError(f"policy threshold must be in [0, 1], not {self.threshold!r}")


def parse_rule(spec: str) -> Rule:
    """``report`` | ``block`` | ``block:0.8`` | ``block:LABEL[,LABEL...]`` | ``stop`` | ``stop:0.8``."""
    action, _, arg = spec.strip().partition(":")
    if not arg:
        return Rule(action.strip())
    if arg.strip() == "f1" or arg.strip().startswith("fpr@"):
        return Rule(action.strip(), point=arg.strip())
    try:
        return Rule(action.strip(), threshold=float(arg))
    except ValueError:
        return Rule(action.strip(), labels=tuple(x.strip() for x in arg.split(",") if x.strip()))


def parse_specs(specs: list[str] | None) -> dict[str, Rule]:
    """CLI ``--policy NAME=RULE`` strings -> {probe name: Rule}."""
    out = {}
    for s in specs or []:
        name, eq, rule = s.partition("=")
        if not eq or not name.strip():
            raise SinglepassError(
                f"--policy {s!r}: use NAME=report, NAME=block, NAME=block:THRESHOLD, NAME=block:fpr@RATE, "
                "NAME=block:LABEL[,LABEL...] or, for a response probe, NAME=stop[:THRESHOLD]"
            )
        out[name.strip()] = parse_rule(rule)
    return out


def resolve(policy, probes: list[FusedProbe]) -> dict[str, Rule]:
    """Check a policy against the artifact's probes -> {probe name: Rule} for every probe.

    ``policy``: None, a dict {name: Rule | str}, or a list of ``NAME=RULE`` strings."""
    if policy is None:
        policy = {}
    elif isinstance(policy, (list, tuple)):
        policy = parse_specs(list(policy))
    elif not isinstance(policy, dict):
        raise SinglepassError(
            f"policy must be a dict {{probe: rule}} or a list of NAME=RULE strings, not {type(policy).__name__}"
        )
    by_name = {p.name: p for p in probes}
    rules = {name: Rule() for name in by_name}
    for name, rule in policy.items():
        if name not in by_name:
            raise SinglepassError(
                f"policy names probe {name!r}, which this artifact does not have (probes: "
                f"{', '.join(by_name) or 'none'})"
            )
        if isinstance(rule, str):
            rule = parse_rule(rule)
        if not isinstance(rule, Rule):
            raise SinglepassError(
                f"policy for {name!r} must be a Rule or a string like 'block', not {type(rule).__name__}"
            )
        p = by_name[name]
        if rule.point is not None:
            rule = replace(rule, threshold=p.point_threshold(rule.point))
        names = list(p.label_names)
        unknown = [lb for lb in rule.labels if lb not in names]
        if unknown:
            raise SinglepassError(
                f"policy for {name!r} names label(s) {', '.join(map(repr, unknown))}; the probe's "
                f"labels are {', '.join(names)}"
            )
        if rule.action == "block" and p.reads == "response":
            raise SinglepassError(
                f"policy for {name!r}: the probe labels the response while it is generated; use "
                f"{name}=stop[:THRESHOLD] (block acts on prompt probes)"
            )
        if rule.action == "stop" and p.reads != "response":
            raise SinglepassError(
                f"policy for {name!r}: stop acts on response probes; {name!r} labels the prompt (use {name}=block)"
            )
        if rule.action in ("block", "stop") and len(names) != 2:
            if rule.threshold is not None:
                raise SinglepassError(
                    f"policy for {name!r}: a threshold applies to binary probes; this probe has "
                    f"{len(names)} classes: name the labels to block, e.g. {name}=block:{names[-1]}"
                )
            if not rule.labels:
                raise SinglepassError(
                    f"policy for {name!r}: the probe has {len(names)} classes ({', '.join(names)}); "
                    f"name the labels to block, e.g. {name}=block:{names[-1]}"
                )
        rules[name] = rule
    return rules


def flagged(rule: Rule, probe: FusedProbe, label: str, score: float) -> bool:
    """Does this label trigger the rule (``block`` on a prompt, ``stop`` on a response)?"""
    if rule.action == "report":
        return False
    if rule.labels:
        return label in rule.labels
    threshold = rule.threshold if rule.threshold is not None else probe.threshold
    threshold = 0.5 if threshold is None else threshold
    return score >= threshold


def decide(rules: dict[str, Rule], probes: list[FusedProbe], labels: dict) -> str | None:
    """-> the name of the first prompt probe (manifest order) whose rule blocks, or None.
    ``labels``: {name: Label} of one prompt's prompt probes."""
    for p in probes:
        lb = labels.get(p.name)
        if lb is not None and flagged(rules[p.name], p, lb.label, lb.score):
            return p.name
    return None


class Streaks:
    """One row's response watch: ``update`` with each decode pass's response labels -> the name of
    the first response probe whose ``stop`` rule fires (flagged on ``consecutive`` passes in a
    row), or None; ``notice`` is the text a stopped response ends with. The runtime's decode loop
    and the serving engine keep one per row."""

    def __init__(self, rules: dict[str, Rule], probes: list[FusedProbe]):
        self.rules = rules
        self.watch = [
            (p, rule)
            for p in probes
            if p.reads == "response" and (rule := rules.get(p.name)) is not None and rule.action == "stop"
        ]
        self.run = {p.name: 0 for p, _ in self.watch}

    def update(self, labels: dict | None) -> str | None:
        """``labels``: this pass's response labels (None: a pass without any)."""
        if not labels:
            return None
        fired = None
        for p, rule in self.watch:
            lb = labels[p.name]
            self.run[p.name] = self.run[p.name] + 1 if flagged(rule, p, lb.label, lb.score) else 0
            if fired is None and self.run[p.name] >= rule.consecutive:
                fired = p.name
        return fired

    def notice(self, probe: str) -> str:
        return stop_notice(self.rules, probe)


def stop_notice(rules: dict[str, Rule], probe: str) -> str:
    """The text appended to a stopped response."""
    return rules[probe].message or DEFAULT_STOP_NOTICE.format(probe=probe)
