"""Train any probe or baseline on cached hidden states (or first-token logits, for MULI).

Recipe (paper notes): AdamW (0.9, 0.999) with a cosine schedule to zero, up to ``epochs``
epochs, early stopping on the validation selection metric (F1 of the positive class at 0.5 for
safety tasks, accuracy otherwise) with ``patience``; the best epoch's weights are kept. A
bounded random search (``trials``) samples the paper's ranges: lr log-uniform 1e-5..1e-3,
batch {8, 16, 32, 64}, weight decay 0..0.05, plus each family's own choices; trial 0 is
always the documented default. MULI follows its official recipe instead (SGD lr 5e-4, batch
32, 500 epochs, weighted BCE + 1e-3 L1; no search).

Probes whose only trainable part is the head (pooling, the fixed readouts, MULI) are trained on
features computed once (the parameter-free part of the module), which is the same function
as running the whole module each step; hidden-state features are standardised with the
training statistics and the scaling is folded into the head afterwards (as scikit-learn's
StandardScaler + LogisticRegression, in one Linear). Everything is seeded; a given seed gives
identical weights on the same machine.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
from torch import nn

from singlepass.errors import SinglepassError
from singlepass.models.baselines import METHODS, build_method, head_only, input_kind
from singlepass.models.probes import count_parameters

# Bumped whenever a change alters what training produces from the same data and seed (stored
# benchmark probes of an older recipe are retrained). 2: standardised head features (folded
# into the head) and input_norm="standard" as the gate / MHA default.
RECIPE = 2
BATCH_SIZES = (8, 16, 32, 64)
MHA_FACTORS = (4, 8, 16, 32, 64)
MHA_HEADS = (4, 8, 16)


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
    params: dict = field(default_factory=dict)  # probe constructor kwargs

    @classmethod
    def from_dict(cls, d: dict) -> "HParams":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise SinglepassError(f"unknown hyperparameter(s) {', '.join(sorted(unknown))} "
                                  f"(known: {', '.join(sorted(known))} and probe parameters)")
        return cls(**copy.deepcopy(d))


# --- the search space ---------------------------------------------------------------------------

def mha_choices(d: int) -> list[tuple[int, int]]:
    """(factor, heads) pairs valid for width d: d_inner = d / factor integral and divisible by
    heads. When no paper head count divides d_inner, the largest divisor <= 8 is used."""
    out = []
    for f in MHA_FACTORS:
        if d % f:
            continue
        inner = d // f
        hs = [h for h in MHA_HEADS if inner % h == 0] or [max(h for h in range(1, 9) if inner % h == 0)]
        out.extend((f, h) for h in hs)
    return out


def default_hparams(method: str, hidden_size: int, max_epochs: int = 10, task: str | None = None) -> HParams:
    """Trial 0 of every search. Safety tasks (ToxicChat: ~7% positives) default to class-balanced
    BCE: unweighted, a probe predicts no positives for the first epochs, F1 at 0.5 stays 0 and
    early stopping ends the run before it learns (measured: gate, 1,200 rows, 2 epochs, F1 0)."""
    if method == "muli":
        return HParams(lr=5e-4, batch_size=32, weight_decay=0.0, epochs=500, patience=0, optimizer="sgd",
                       l1=1e-3, class_weight="balanced", eval_every=10, params={})
    hp = HParams(epochs=max_epochs, class_weight="balanced" if task == "safety" else "none")
    if method == "pooling":
        hp.params = {"token_pool": "mean", "layer_pool": "mean"}
    elif method == "gate":
        hp.params = {"input_norm": "standard"}
    elif method == "mha":
        pairs = mha_choices(hidden_size)
        f = min((p[0] for p in pairs), key=lambda f: abs(math.log(f / 32)))  # the paper's main factor 32, or nearest
        heads = [h for ff, h in pairs if ff == f]
        hp.params = {"factor": f, "heads": 8 if 8 in heads else heads[0], "pool": "mean", "input_norm": "standard"}
    return hp


def sample_hparams(method: str, hidden_size: int, rng: np.random.Generator, max_epochs: int = 10,
                   task: str | None = None) -> HParams:
    hp = default_hparams(method, hidden_size, max_epochs, task)
    if method == "muli":
        return hp
    if task == "safety":
        hp.class_weight = str(rng.choice(["none", "balanced"]))
    hp.lr = float(10 ** rng.uniform(-5, -3))
    hp.batch_size = int(rng.choice(BATCH_SIZES))
    hp.weight_decay = float(rng.uniform(0, 0.05))
    if method == "pooling":
        hp.params = {"token_pool": str(rng.choice(["mean", "max"])), "layer_pool": str(rng.choice(["mean", "max"]))}
    elif method == "mha":
        pairs = mha_choices(hidden_size)
        f, h = pairs[int(rng.integers(len(pairs)))]
        hp.params = {"factor": int(f), "heads": int(h), "pool": str(rng.choice(["mean", "max"])),
                     "input_norm": "standard"}
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


def trial_plan(method: str, hidden_size: int, trials: int, seed: int, max_epochs: int = 10,
               overrides: dict | None = None, task: str | None = None) -> list[HParams]:
    if trials < 1:
        raise SinglepassError(f"--trials must be at least 1, got {trials}")
    if method == "muli":
        trials = 1  # the official recipe is fixed
    rng = np.random.default_rng(seed)
    plan = [default_hparams(method, hidden_size, max_epochs, task)]
    plan += [sample_hparams(method, hidden_size, rng, max_epochs, task) for _ in range(trials - 1)]
    return [apply_overrides(hp, overrides or {}) for hp in plan]


# --- data -----------------------------------------------------------------------------------------

class FeatureData:
    """Precomputed features X [N, F] for head-only modules: logits = module.head(X)."""

    def __init__(self, X: torch.Tensor):
        self.X = X

    @classmethod
    def standardised(cls, Xt: torch.Tensor, Xv: torch.Tensor, min_std: float = 1e-6):
        """Train/validation features scaled to zero mean, unit variance with the *training*
        statistics (as scikit-learn's StandardScaler). -> (train, val, (mean [F], std [F]))."""
        mean, std = Xt.mean(0), Xt.std(0, unbiased=False).clamp_min(min_std)
        return cls((Xt - mean) / std), cls((Xv - mean) / std), (mean, std)

    def __len__(self) -> int:
        return len(self.X)

    def order(self, batch_size: int, g: torch.Generator) -> list[np.ndarray]:
        perm = torch.randperm(len(self), generator=g).numpy()
        return [perm[i:i + batch_size] for i in range(0, len(perm), batch_size)]

    def micro(self, rows):
        return [rows]

    def logits(self, module, rows) -> torch.Tensor:
        return module.head(self.X[torch.as_tensor(rows)])


class StateData:
    """Rows of a hidden-state cache fed through the whole module.

    A logical batch is split into micro-batches (gradients accumulate) so that padded
    tokens B*T stay under ``max_tokens`` and, for attention probes, B*T*T under ``max_attn``.
    """

    def __init__(self, cache, rows=None, max_tokens: int = 4096, max_attn: int | None = None):
        self.cache = cache
        self.rows = np.arange(len(cache)) if rows is None else np.asarray(rows)
        self.max_tokens, self.max_attn = max_tokens, max_attn

    def __len__(self) -> int:
        return len(self.rows)

    def order(self, batch_size: int, g: torch.Generator) -> list[np.ndarray]:
        """Length-bucketed shuffle: shuffle, sort within windows of 50 batches, shuffle batches."""
        perm = torch.randperm(len(self), generator=g).numpy()
        lens = self.cache.lengths[self.rows]
        batches = []
        win = 50 * batch_size
        for s in range(0, len(perm), win):
            chunk = perm[s:s + win]
            chunk = chunk[np.argsort(-lens[chunk], kind="stable")]
            batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
        bperm = torch.randperm(len(batches), generator=g).numpy()
        return [batches[i] for i in bperm]

    def micro(self, idx):
        """Split positions idx (into self.rows) into micro-batches within the token budgets."""
        idx = np.asarray(idx)
        lens = self.cache.lengths[self.rows[idx]]
        idx = idx[np.argsort(-lens, kind="stable")]
        out, cur, width = [], [], 0
        for i in idx:
            n = int(self.cache.lengths[self.rows[i]])
            w = max(width, n)
            fits = (len(cur) + 1) * w <= self.max_tokens and (
                self.max_attn is None or (len(cur) + 1) * w * w <= self.max_attn)
            if cur and not fits:
                out.append(np.array(cur))
                cur, w = [], n
            cur.append(i)
            width = w
        if cur:
            out.append(np.array(cur))
        return out

    def logits(self, module, idx) -> torch.Tensor:
        states, mask = self.cache.batch(self.rows[np.asarray(idx)])  # [L+1, b, T, d], [b, T]
        return module(states, mask)


@torch.no_grad()
def input_statistics(cache, max_rows: int = 1000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer, per-dimension mean and std [L+1, d] of the RMS-normalised real tokens of (a
    seeded sample of at most ``max_rows`` rows of) a hidden-state cache, accumulated in float64."""
    from singlepass.models.probes import rms_normalise

    rows = np.arange(len(cache))
    if len(rows) > max_rows:
        rows = np.sort(np.random.default_rng(seed).choice(rows, max_rows, replace=False))
    data = StateData(cache, rows, max_tokens=4096)
    s1 = s2 = None
    n = 0
    for mb in data.micro(np.arange(len(data))):
        states, mask = cache.batch(rows[mb])  # [L+1, b, T, d], [b, T]
        x = rms_normalise(states.float()).double() * mask[None, :, :, None]
        s1 = x.sum((1, 2)) if s1 is None else s1 + x.sum((1, 2))  # [L+1, d]
        s2 = x.pow(2).sum((1, 2)) if s2 is None else s2 + x.pow(2).sum((1, 2))
        n += int(mask.sum())
    mean = s1 / n
    return mean.float(), (s2 / n - mean ** 2).clamp_min(0).sqrt().float()


@torch.no_grad()
def compute_features(module, source, progress: bool = False, desc: str = "features") -> torch.Tensor:
    """Parameter-free part of a head-only module over a whole source -> [N, F] float32.

    source: a StateCache (hidden-state modules) or a logits tensor [N, V] (MULI).
    """
    from tqdm.auto import tqdm

    if isinstance(source, torch.Tensor):  # MULI logits
        return torch.cat([module.features(source[i:i + 256]) for i in range(0, len(source), 256)]) \
            if len(source) else torch.zeros(0, module.vocab_size)
    data = StateData(source, max_tokens=8192)
    d = module.hidden_size
    X = torch.zeros(len(data), d)
    layer = getattr(module, "layer", None)
    with tqdm(total=len(data), desc=desc, unit="row", disable=not progress) as bar:
        for mb in data.micro(np.arange(len(data))):
            if layer is not None:  # fixed readout: read that one layer only
                states, mask = source.batch(data.rows[mb], layers=[layer])
                X[mb] = module.read_layer(states[0], mask)
            else:
                states, mask = source.batch(data.rows[mb])
                X[mb] = module.features(states, mask)
            bar.update(len(mb))
    return X


# --- training -----------------------------------------------------------------------------------

def selection_metric(task: str, labels: np.ndarray, logits: torch.Tensor) -> float:
    """Validation score early stopping and the search maximise."""
    from sklearn.metrics import accuracy_score, f1_score

    if logits.shape[-1] == 1:
        pred = (logits[:, 0] > 0).long().numpy()
    else:
        pred = logits.argmax(-1).numpy()
    if task == "safety":
        return float(f1_score(labels, pred, average="binary" if logits.shape[-1] == 1 else "macro", zero_division=0))
    return float(accuracy_score(labels, pred))


def make_loss(num_classes: int, labels: np.ndarray, class_weight: str):
    """-> fn(logits [b, C'], y [b]) returning the *sum* of per-row losses."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    if class_weight not in ("none", "balanced"):
        raise SinglepassError(f"class_weight must be 'none' or 'balanced', not {class_weight!r}")
    if num_classes == 2:
        pw = torch.tensor(counts[0] / max(counts[1], 1.0), dtype=torch.float32) if class_weight == "balanced" else None
        bce = nn.BCEWithLogitsLoss(pos_weight=pw, reduction="sum")
        return lambda z, y: bce(z[:, 0], y.float())
    w = None
    if class_weight == "balanced":
        w = torch.tensor(counts.sum() / (num_classes * np.maximum(counts, 1.0)), dtype=torch.float32)
    ce = nn.CrossEntropyLoss(weight=w, reduction="sum")  # sum_i w_{y_i} * CE_i; the caller divides by batch rows
    return lambda z, y: ce(z, y)


@torch.no_grad()
def predict_logits(module, data, batch_rows: int = 256) -> torch.Tensor:
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
    z = torch.zeros(len(data), out[0][1].shape[-1])
    for mb, logits in out:
        z[torch.as_tensor(mb)] = logits
    return z


def cosine(step_total: int):
    return lambda step: 0.5 * (1 + math.cos(math.pi * min(step, step_total) / max(step_total, 1)))


def fit(module, train, y_train: np.ndarray, val, y_val: np.ndarray, hp: HParams, task: str, num_classes: int,
        seed: int, progress: bool = False, desc: str = "train") -> dict:
    """Train ``module`` in place (best validation epoch kept). -> history dict."""
    if isinstance(train, FeatureData):  # small ops: one thread avoids OpenMP oversubscription stalls
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return _fit(module, train, y_train, val, y_val, hp, task, num_classes, seed, progress, desc)
        finally:
            torch.set_num_threads(threads)
    return _fit(module, train, y_train, val, y_val, hp, task, num_classes, seed, progress, desc)


def _fit(module, train, y_train, val, y_val, hp, task, num_classes, seed, progress, desc) -> dict:
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    params = [p for p in module.parameters() if p.requires_grad]
    if hp.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=hp.lr, betas=(0.9, 0.999), weight_decay=hp.weight_decay)
    elif hp.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=hp.lr, weight_decay=hp.weight_decay)
    else:
        raise SinglepassError(f"optimizer must be 'adamw' or 'sgd', not {hp.optimizer!r}")
    n_batches = math.ceil(len(train) / hp.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine(hp.epochs * n_batches))
    loss_fn = make_loss(num_classes, y_train, hp.class_weight)
    y_t = torch.as_tensor(y_train)
    head_w = module.head.weight
    best, best_state, best_epoch, bad, history = -1.0, None, 0, 0, []
    t0 = time.perf_counter()
    bar = tqdm(total=hp.epochs * n_batches, desc=desc, unit="step", disable=not progress, leave=False)
    for epoch in range(1, hp.epochs + 1):
        module.train()
        total = 0.0
        for rows in train.order(hp.batch_size, g):
            opt.zero_grad(set_to_none=True)
            for mb in train.micro(rows):
                loss = loss_fn(train.logits(module, mb), y_t[torch.as_tensor(mb)]) / len(rows)
                loss.backward()
                total += float(loss.detach()) * len(rows)
            if hp.l1 or hp.l2:
                pen = hp.l1 * head_w.abs().sum() + hp.l2 * head_w.pow(2).sum()
                pen.backward()
            opt.step()
            sched.step()
            bar.update(1)
        if epoch % hp.eval_every and epoch != hp.epochs:
            continue
        score = selection_metric(task, y_val, predict_logits(module, val))
        history.append({"epoch": epoch, "train_loss": total / len(train), "val": score})
        bar.set_postfix(epoch=epoch, val=f"{score:.4f}")
        if score > best:
            best, best_epoch, bad = score, epoch, 0
            best_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        else:
            bad += 1
            if hp.patience and bad >= hp.patience:
                break
    bar.close()
    module.load_state_dict(best_state)
    return {"best_val": best, "best_epoch": best_epoch, "epochs_run": history[-1]["epoch"],
            "seconds": time.perf_counter() - t0, "history": history}


# --- the whole job: data, search, artifact ----------------------------------------------------------

@dataclass
class Prepared:
    """Train/validation inputs for one method, built once and shared by all trials."""
    method: str
    train_src: object  # StateCache or logits tensor [N, V]
    val_src: object
    y_train: np.ndarray
    y_val: np.ndarray
    feature_memo: dict = field(default_factory=dict)
    input_stats: tuple | None = None  # (mean, std) [L+1, d] for input_norm="standard", computed once


def prepare(method: str, backbone, train_ds, val_ds, prompt_format: str, max_length: int,
            cache_dir=None, progress: bool = True, log=print) -> Prepared:
    from singlepass.models import cache as state_cache
    from singlepass.models.extract import first_token_logits

    if input_kind(method) == "logits":
        srcs = []
        for ds in (train_ds, val_ds):
            h = state_cache.last_hidden(backbone, ds, prompt_format, max_length, cache_dir, progress=progress, log=log)
            srcs.append(first_token_logits(backbone.model, h))  # [N, V]
        return Prepared(method, srcs[0], srcs[1], train_ds.labels, val_ds.labels)
    caches = [state_cache.build(backbone, ds, prompt_format, max_length, cache_dir=cache_dir, progress=progress, log=log)
              for ds in (train_ds, val_ds)]
    return Prepared(method, caches[0], caches[1], train_ds.labels, val_ds.labels)


def make_data(prep: Prepared, module, params: dict, progress: bool = False):
    """-> (train data, val data, scaling) for this module (features memoised per module parameters).

    Head-only probes on hidden states train on standardised features (scaling = (mean, std));
    run_trial folds the scaling into the head afterwards, so the saved module is unchanged in
    form. Measured: on SST-2 mean-pooled features the unscaled head trailed scikit-learn's
    standardised logistic regression (0.60 vs 0.67-0.73 accuracy, 200 rows)."""
    if head_only(module):
        key = (type(module).__name__, tuple(sorted((k, str(v)) for k, v in params.items())))
        if prep.method == "muli":
            raw = torch.cat([module.transform(prep.train_src[i:i + 256]) for i in range(0, len(prep.train_src), 256)])
            module.fit_standardisation(raw)  # buffers: exported with the module
            del raw
        if key not in prep.feature_memo:
            prep.feature_memo.clear()
            prep.feature_memo[key] = tuple(compute_features(module, s, progress, f"features ({split})")
                                           for s, split in ((prep.train_src, "train"), (prep.val_src, "validation")))
        Xt, Xv = prep.feature_memo[key]
        if prep.method == "muli":  # standardised inside the module already (its buffers)
            return FeatureData(Xt), FeatureData(Xv), None
        return FeatureData.standardised(Xt, Xv)
    max_attn = 2 ** 20 if type(module).__name__ == "MHAProbe" else None
    return StateData(prep.train_src, max_attn=max_attn), StateData(prep.val_src, max_attn=max_attn), None


def run_trial(prep: Prepared, hp: HParams, num_layers: int, hidden_size: int, num_classes: int, task: str,
              seed: int, vocab_size: int | None = None, progress: bool = False, desc: str = "train"):
    """-> (trained module, history)."""
    params = dict(hp.params)
    if prep.method == "muli":
        params.setdefault("vocab_size", vocab_size)
    torch.manual_seed(seed)
    try:
        module = build_method(prep.method, num_layers, hidden_size, num_classes, **params)
    except (TypeError, ValueError) as e:
        raise SinglepassError(f"invalid {prep.method} parameters {params}: {e}") from None
    if getattr(module, "input_norm", None) == "standard":
        if prep.input_stats is None:
            prep.input_stats = input_statistics(prep.train_src)
        module.set_input_statistics(*prep.input_stats)
    train, val, scaling = make_data(prep, module, params, progress)
    hist = fit(module, train, prep.y_train, val, prep.y_val, hp, task, num_classes, seed, progress, desc)
    hist["val_logits"] = predict_logits(module, val)
    if scaling is not None:
        fold_scaling(module.head, *scaling)
    return module, params, hist


@torch.no_grad()
def fold_scaling(head: nn.Linear, mean: torch.Tensor, std: torch.Tensor) -> None:
    """head((x - mean) / std) == head'(x) with W' = W / std, b' = b - W' mean (in place)."""
    head.weight.div_(std)
    head.bias.sub_(head.weight @ mean)


def choose_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """Decision threshold on P(positive) that maximises F1 on validation (0.5 when undefined)."""
    from sklearn.metrics import precision_recall_curve

    if len(np.unique(y)) < 2:
        return 0.5
    prec, rec, thr = precision_recall_curve(y, p)
    f1 = 2 * prec[:-1] * rec[:-1] / np.maximum(prec[:-1] + rec[:-1], 1e-12)
    return float(thr[int(np.argmax(f1))])


def set_determinism(threads: int | None = None) -> None:
    torch.use_deterministic_algorithms(True, warn_only=True)
    if threads:
        torch.set_num_threads(threads)


def train_probe(method: str, backbone, train_ds, val_ds, *, prompt_format: str = "chat", max_length: int = 512,
                seed: int = 0, trials: int = 1, max_epochs: int = 10, overrides: dict | None = None,
                hparams: HParams | None = None, cache_dir=None, progress: bool = True, log=print):
    """Search ``trials`` configurations (or train the given ``hparams``) and return the best
    module with its artifact config. -> (module, config dict)."""
    from singlepass.models.evaluate import compute_metrics
    from singlepass.models.probes import probabilities

    if method not in METHODS:
        raise SinglepassError(f"unknown probe type {method!r} (use one of {', '.join(METHODS)})")
    if tuple(train_ds.label_names) != tuple(val_ds.label_names):
        raise SinglepassError("train and validation label sets differ")
    for ds in (train_ds, val_ds):
        if len(np.unique(ds.labels)) < 2:
            raise SinglepassError(f"{ds.name}/{ds.split}: needs at least two classes present ({len(ds)} rows)")
    set_determinism()
    num_classes, task = len(train_ds.label_names), train_ds.task
    L1, d = backbone.num_layers + 1, backbone.hidden_size
    vocab = backbone.model.config.vocab_size
    plan = [hparams] if hparams is not None else trial_plan(method, d, trials, seed, max_epochs, overrides, task)
    for hp in plan:  # --epochs, --set epochs=N or a stored configuration
        if hp.epochs < 1:
            raise SinglepassError(f"--epochs must be at least 1, got {hp.epochs}")
    prep = prepare(method, backbone, train_ds, val_ds, prompt_format, max_length, cache_dir, progress, log)
    t_all = time.perf_counter()
    best = None
    summary = []
    for i, hp in enumerate(plan):
        module, params, hist = run_trial(prep, hp, L1, d, num_classes, task, seed, vocab, progress,
                                         desc=f"{method} trial {i + 1}/{len(plan)}")
        row = {"trial": i, **{k: v for k, v in asdict(hp).items() if k != "params"}, "params": params,
               "val": hist["best_val"], "best_epoch": hist["best_epoch"], "epochs_run": hist["epochs_run"],
               "seconds": round(hist["seconds"], 2)}
        summary.append(row)
        log(f"trial {i + 1}/{len(plan)}: val {'F1' if task == 'safety' else 'accuracy'} {hist['best_val']:.4f} "
            f"(epoch {hist['best_epoch']}/{hist['epochs_run']}, {hist['seconds']:.1f} s) "
            f"lr={hp.lr:.2e} bs={hp.batch_size} wd={hp.weight_decay:.3f} {params}")
        if best is None or hist["best_val"] > best[3]["best_val"]:
            best = (module, hp, params, hist)
        else:
            del module
    module, hp, params, hist = best
    module.eval()
    probs = probabilities(hist["val_logits"]).numpy()
    threshold = choose_threshold(prep.y_val, probs[:, 1]) if num_classes == 2 else None
    val_metrics = compute_metrics(prep.y_val, probs, threshold)
    hp_dict = {k: v for k, v in asdict(hp).items() if k != "params"}
    cfg = {
        "probe": method, "input": input_kind(method), "params": params,
        "num_layers": L1, "hidden_size": d, "label_names": list(train_ds.label_names), "task": task,
        "threshold": threshold, "prompt_format": prompt_format, "max_length": max_length,
        "backbone": backbone.fingerprint, "seed": seed, "recipe": RECIPE, "hparams": hp_dict,
        "trainable_parameters": count_parameters(module),
        "data": {"dataset": train_ds.name, "train_split": train_ds.split, "train_rows": len(train_ds),
                 "validation_split": val_ds.split, "validation_rows": len(val_ds)},
        "training": {"selection_metric": "f1" if task == "safety" else "accuracy", "best_val": hist["best_val"],
                     "best_epoch": hist["best_epoch"], "epochs_run": hist["epochs_run"],
                     "seconds": round(hist["seconds"], 2), "search_seconds": round(time.perf_counter() - t_all, 2),
                     "trials": summary, "history": hist["history"]},
        "validation": val_metrics,
    }
    return module, cfg
