"""The hyperparameter search space: trial 0 is the documented default, then seeded draws.

Shared ranges (paper notes): lr log-uniform 1e-5..1e-3, batch {8, 16, 32, 64}, weight decay
0..0.05, class weighting on safety tasks; each family adds its own parameters
(``Family.default_params`` / ``sample_params``), and a family with a fixed ``recipe`` (MULI)
is never searched.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields

import numpy as np

from singlepass.errors import SinglepassError
from singlepass.models.registry import get_family

BATCH_SIZES = (8, 16, 32, 64)


@dataclass
class HParams:
    lr: float = 1e-3
    batch_size: int = 32
    weight_decay: float = 0.01
    epochs: int = 10
    patience: int = 3  # evaluations without improvement before stopping; 0 = never stop early
    optimizer: str = "adamw"  # or "sgd" (MULI)
    l1: float = 0.0  # coefficient of sum |W| of the head weight, added to the mean loss
    l2: float = 0.0  # coefficient of sum W^2 (a coupled L2 penalty, as in logistic regression)
    class_weight: str = "none"  # "balanced": positives (or each class) weighted by inverse frequency
    eval_every: int = 1  # epochs between validation evaluations
    # response probes trained through their states: share of training rows read as a random prefix
    # of their response each time they are drawn (models/batches.py random_prefixes); 0 = whole rows
    prefixes: float = 0.0
    # streaming response probes: "whole" trains the finished response's label; "stop" trains the logits
    # after every decode pass for the runtime's stop rule (models/streaming.py stop_loss)
    stream_loss: str = "whole"
    params: dict = field(default_factory=dict)  # probe constructor kwargs

    @classmethod
    def from_dict(cls, d: dict) -> "HParams":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise SinglepassError(
                f"unknown hyperparameter(s) {', '.join(sorted(unknown))} "
                f"(known: {', '.join(sorted(known))} and probe parameters)"
            )
        return cls(**copy.deepcopy(d))


def default_hparams(method: str, hidden_size: int, max_epochs: int = 10, task: str | None = None) -> HParams:
    """Trial 0 of every search. Safety tasks (ToxicChat: ~7% positives) default to class-balanced
    BCE: unweighted, a probe predicts no positives for the first epochs, F1 at 0.5 stays 0 and
    early stopping ends the run before it learns (measured: gate, 1,200 rows, 2 epochs, F1 0)."""
    family = get_family(method)
    params = family.default_params(hidden_size)
    if family.recipe is not None:
        return HParams(**family.recipe, params=params)
    return HParams(epochs=max_epochs, class_weight="balanced" if task == "safety" else "none", params=params)


def sample_hparams(
    method: str, hidden_size: int, rng: np.random.Generator, max_epochs: int = 10, task: str | None = None
) -> HParams:
    """One seeded draw from the search space (the draws' order is part of the recipe)."""
    family = get_family(method)
    hp = default_hparams(method, hidden_size, max_epochs, task)
    if family.recipe is not None:
        return hp
    if task == "safety":
        hp.class_weight = str(rng.choice(["none", "balanced"]))
    hp.lr = float(10 ** rng.uniform(-5, -3))
    hp.batch_size = int(rng.choice(BATCH_SIZES))
    hp.weight_decay = float(rng.uniform(0, 0.05))
    if family.sample_params is not None:
        hp.params = family.sample_params(hidden_size, rng)
    return hp


def apply_overrides(hp: HParams, overrides: dict) -> HParams:
    """--set key=value: a hyperparameter or, otherwise, a probe constructor parameter."""
    hp = copy.deepcopy(hp)
    names = {f.name for f in fields(HParams)} - {"params"}
    for k, v in overrides.items():
        if k in names:
            setattr(hp, k, type(getattr(hp, k))(v))
        else:
            hp.params[k] = v
    return hp


def trial_plan(
    method: str,
    hidden_size: int,
    trials: int,
    seed: int,
    max_epochs: int = 10,
    overrides: dict | None = None,
    task: str | None = None,
) -> list[HParams]:
    """The default, then ``trials - 1`` draws seeded by ``seed``; ``overrides`` apply to all."""
    if trials < 1:
        raise SinglepassError(f"--trials must be at least 1, got {trials}")
    if get_family(method).recipe is not None:
        trials = 1  # a fixed recipe is not searched
    rng = np.random.default_rng(seed)
    plan = [default_hparams(method, hidden_size, max_epochs, task)]
    plan += [sample_hparams(method, hidden_size, rng, max_epochs, task) for _ in range(trials - 1)]
    return [apply_overrides(hp, overrides or {}) for hp in plan]
