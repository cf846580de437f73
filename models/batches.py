"""What a training step reads: rows of precomputed features, or rows of a hidden-state cache.

Both adapters answer the same three questions for the loop: the shuffled batches of an epoch
(``order``), how to split one batch to fit memory (``micro``), and a batch's logits under a
module (``logits``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Union

import numpy as np
import torch
from torch import nn

from singlepass.models.cache import Scratch

if TYPE_CHECKING:
    from singlepass.models.cache import StateCache

Rows = Union[np.ndarray, list]  # positions into the adapter's rows


class FeatureData:
    """Precomputed features X [N, F] for head-only modules: logits = module.head(X)."""

    def __init__(self, X: torch.Tensor):
        self.X = X  # [N, F]

    @classmethod
    def standardised(
        cls, Xt: torch.Tensor, Xv: torch.Tensor, min_std: float = 1e-6
    ) -> tuple["FeatureData", "FeatureData", tuple[torch.Tensor, torch.Tensor]]:
        """Train/validation features scaled to zero mean, unit variance with the *training*
        statistics (as scikit-learn's StandardScaler). -> (train, val, (mean [F], std [F]))."""
        mean, std = Xt.mean(0), Xt.std(0, unbiased=False).clamp_min(min_std)  # [F], [F]
        return cls((Xt - mean) / std), cls((Xv - mean) / std), (mean, std)

    def __len__(self) -> int:
        return len(self.X)

    def order(self, batch_size: int, g: torch.Generator) -> list[np.ndarray]:
        perm = torch.randperm(len(self), generator=g).numpy()
        return [perm[i : i + batch_size] for i in range(0, len(perm), batch_size)]

    def micro(self, rows: Rows) -> list[Rows]:
        return [rows]

    def logits(self, module: nn.Module, rows: Rows) -> torch.Tensor:
        return module.head(self.X[torch.as_tensor(rows)])  # [b, C']


class StateData:
    """Rows of a hidden-state cache fed through the whole module.

    A logical batch is split into micro-batches (gradients accumulate) so that padded
    tokens B*T stay under ``max_tokens`` and, for attention probes, B*T*T under ``max_attn``.
    Every micro-batch is read into one reused buffer (``Scratch``): a batch's logits (and their
    backward) are done with before the next batch is read.
    """

    def __init__(
        self,
        cache: "StateCache",
        rows: Rows | None = None,
        max_tokens: int = 4096,
        max_attn: int | None = None,
        prefixes: float = 0.0,
        seed: int = 0,
        scratch: Scratch | None = None,
    ):
        self.cache = cache
        self.rows = np.arange(len(cache)) if rows is None else np.asarray(rows)  # cache row of each position [N]
        self.max_tokens, self.max_attn = max_tokens, max_attn
        self.prefixes = prefixes  # share of rows read as a random prefix each time (``random_prefixes``)
        self.rng = np.random.default_rng(seed)
        self.scratch = scratch or Scratch()  # shared with another StateData read in turn (train and validation)

    def __len__(self) -> int:
        return len(self.rows)

    def order(self, batch_size: int, g: torch.Generator) -> list[np.ndarray]:
        """Length-bucketed shuffle: shuffle, sort within windows of 50 batches, shuffle batches."""
        perm = torch.randperm(len(self), generator=g).numpy()
        lens = self.cache.lengths[self.rows]
        batches = []
        win = 50 * batch_size
        for s in range(0, len(perm), win):
            chunk = perm[s : s + win]
            chunk = chunk[np.argsort(-lens[chunk], kind="stable")]
            batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
        bperm = torch.randperm(len(batches), generator=g).numpy()
        return [batches[i] for i in bperm]

    def micro(self, idx: Rows) -> list[np.ndarray]:
        """Split positions idx (into self.rows) into micro-batches within the token budgets."""
        idx = np.asarray(idx)
        lens = self.cache.lengths[self.rows[idx]]
        idx = idx[np.argsort(-lens, kind="stable")]
        out, cur, width = [], [], 0
        for i in idx:
            n = int(self.cache.lengths[self.rows[i]])
            w = max(width, n)
            fits = (len(cur) + 1) * w <= self.max_tokens and (
                self.max_attn is None or (len(cur) + 1) * w * w <= self.max_attn
            )
            if cur and not fits:
                out.append(np.array(cur))
                cur, w = [], n
            cur.append(i)
            width = w
        if cur:
            out.append(np.array(cur))
        return out

    def logits(self, module: nn.Module, idx: Rows) -> torch.Tensor:
        states, mask = self.cache.batch(self.rows[np.asarray(idx)], scratch=self.scratch)  # [L+1, b, T, d], [b, T]
        if self.prefixes:
            mask = random_prefixes(mask, self.prefixes, self.rng)
        return module(states, mask)  # [b, C']

    def prefix_logits(self, module: nn.Module, idx: Rows) -> tuple[torch.Tensor, torch.Tensor]:
        """A streaming probe's logit after every pass of these rows (models/streaming.py ``prefix_logits``)
        -> ([b, T], the mask [b, T]). Whole rows: every prefix is read already."""
        from singlepass.models.streaming import prefix_logits

        states, mask = self.cache.batch(self.rows[np.asarray(idx)], scratch=self.scratch)  # [L+1, b, T, d], [b, T]
        return prefix_logits(module, states, mask), mask


def random_prefixes(mask: torch.Tensor, share: float, rng: np.random.Generator) -> torch.Tensor:
    """Prefix augmentation of a response probe's training rows: each row, with probability
    ``share``, keeps only its first k real tokens, k uniform in 1..n (n its real tokens; either
    padding side). A streaming probe is read after every generated token, not only after the
    64th: trained on whole responses alone, its label on a short prefix is out of distribution.
    The states of the kept tokens are unchanged (causal: later tokens never reach them).
    mask [b, T] -> [b, T]."""
    n = mask.sum(1)  # [b] real tokens per row
    cut = torch.from_numpy(rng.random(len(n)) < share)  # [b]
    k = torch.from_numpy(np.floor(rng.random(len(n)) * n.numpy()).astype(np.int64)) + 1  # [b], 1..n
    keep = mask.cumsum(1) <= torch.where(cut, k, n)[:, None]  # [b, T]
    return mask * keep.to(mask.dtype)


Data = Union[FeatureData, StateData]


@torch.no_grad()
def predict_logits(module: nn.Module, data: Data, batch_rows: int = 256) -> torch.Tensor:
    """Logits for every row of a FeatureData / StateData, in order. [N, C']"""
    was = module.training
    module.eval()
    out = []
    for s in range(0, len(data), batch_rows):
        idx = np.arange(s, min(s + batch_rows, len(data)))
        for mb in data.micro(idx):
            out.append((mb, data.logits(module, mb)))
    module.train(was)
    if not out:
        return torch.zeros(0, 1)
    z = torch.zeros(len(data), out[0][1].shape[-1])  # [N, C']
    for mb, logits in out:
        z[torch.as_tensor(mb)] = logits
    return z


@torch.no_grad()
def compute_features(
    module: nn.Module, source: "StateCache | torch.Tensor", progress: bool = False, desc: str = "features"
) -> torch.Tensor:
    """Parameter-free part of a head-only module over a whole source -> [N, F] float32.

    source: a StateCache (hidden-state modules) or a logits tensor [N, V] (logit-input modules).
    """
    from tqdm.auto import tqdm

    if isinstance(source, torch.Tensor):  # logits [N, V]
        return (
            torch.cat([module.features(source[i : i + 256]) for i in range(0, len(source), 256)])
            if len(source)
            else torch.zeros(0, module.vocab_size)
        )
    data = StateData(source, max_tokens=8192)
    d = module.hidden_size
    X = torch.zeros(len(data), d)  # [N, d]
    layer = getattr(module, "layer", None)
    with tqdm(total=len(data), desc=desc, unit="row", disable=not progress) as bar:
        for mb in data.micro(np.arange(len(data))):
            if layer is not None:  # a module that reads one layer: read that layer only
                states, mask = source.batch(data.rows[mb], layers=[layer], scratch=data.scratch)  # [1, b, T, d], [b, T]
                X[mb] = module.read_layer(states[0], mask)
            else:
                states, mask = source.batch(data.rows[mb], scratch=data.scratch)  # [L+1, b, T, d], [b, T]
                X[mb] = module.features(states, mask)
            bar.update(len(mb))
    return X
