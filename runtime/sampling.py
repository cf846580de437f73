"""Choosing the next token from the last position's logits (numpy).

Greedy (argmax; the first index on ties, like torch) unless ``temperature > 0``; then the
logits are divided by the temperature, cut to the ``top_k`` largest, then to the smallest set
whose probability reaches ``top_p`` (the order transformers applies them), and one token is
drawn. Each prompt draws from its own ``numpy.random.Generator`` seeded with ``(seed, index of
the prompt in the call)``, so a seeded result does not depend on the batch it was run in.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from singlepass.errors import SinglepassError


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        t, k, p = self.temperature, self.top_k, self.top_p
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not np.isfinite(t) or t < 0:
            raise SinglepassError(f"temperature must be a number >= 0 (0 = greedy), not {t!r}")
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise SinglepassError(f"top_k must be an integer >= 0 (0 = off), not {k!r}")
        if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0 < p <= 1:
            raise SinglepassError(f"top_p must be in (0, 1] (1 = off), not {p!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0):
            raise SinglepassError(f"seed must be an integer >= 0, not {self.seed!r}")
        if t == 0 and (k or p < 1):
            raise SinglepassError("top-k / top-p sampling needs a temperature > 0 (temperature 0 is greedy)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self, index: int) -> np.random.Generator | None:
        if self.greedy:
            return None
        return np.random.default_rng(None if self.seed is None else [self.seed, index])


def filter_logits(logits: np.ndarray, temperature: float, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
    """[V] logits -> [V] float64 scaled logits with the excluded tokens at -inf."""
    x = logits.astype(np.float64) / temperature
    if top_k and top_k < x.size:
        kth = np.partition(x, -top_k)[-top_k]
        x = np.where(x < kth, -np.inf, x)
    if top_p < 1.0:
        order = np.argsort(-x, kind="stable")
        p = np.exp(x[order] - x[order[0]])
        p /= p.sum()
        # keep the tokens whose preceding cumulative probability is below top_p (always the first)
        cut = np.cumsum(p) - p >= top_p
        x[order[cut]] = -np.inf
    return x


def sample(logits: np.ndarray, s: Sampling, rng: np.random.Generator | None) -> int:
    """[V] logits of one row -> a token id."""
    if s.greedy or rng is None:
        return int(np.argmax(logits))
    x = filter_logits(logits, s.temperature, s.top_k, s.top_p)
    p = np.exp(x - x.max())
    p /= p.sum()
    return int(rng.choice(p.size, p=p))


def next_tokens(logits: np.ndarray, s: Sampling, rngs: list) -> np.ndarray:
    """[B, V] last-position logits -> [B] int64 token ids."""
    if s.greedy:
        return logits.argmax(-1).astype(np.int64)
    return np.array([sample(row, s, g) for row, g in zip(logits, rngs)], np.int64)
