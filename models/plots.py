"""The paper's layer-weight figure for gate probes.

Mean Stage-2 weight per layer (0 = embedding output, L = final norm output), one line per
(true class x correct/incorrect) group, and a dashed line at the uniform weight 1/(L+1).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from singlepass.errors import SinglepassError


@torch.no_grad()
def layer_weights(module, cfg: dict, cache) -> tuple[np.ndarray, np.ndarray]:
    """-> Stage-2 weights [N, L+1] and predicted classes [N] for every cached row."""
    from singlepass.models.batches import StateData
    from singlepass.models.probes import host_probabilities

    data = StateData(cache, max_tokens=8192)
    W = np.zeros((len(cache), cfg["num_layers"]), dtype=np.float64)
    pred = np.zeros(len(cache), dtype=np.int64)
    for mb in data.micro(np.arange(len(cache))):
        states, mask = cache.batch(mb, scratch=data.scratch)  # [L+1, b, T, d], [b, T]
        W[mb] = module.layer_weights(states, mask).numpy()
        p = host_probabilities(module(states, mask))  # [b, C] float64, as the runtime decides
        thr = cfg["threshold"]
        pred[mb] = (p[:, 1] >= thr).astype(np.int64) if p.shape[1] == 2 and thr is not None else p.argmax(1)
    return W, pred


def group_means(W: np.ndarray, y: np.ndarray, pred: np.ndarray, label_names) -> list[tuple[str, int, np.ndarray]]:
    """[(label, rows, mean weight per layer [L+1])] for each non-empty class x correctness group."""
    out = []
    for c, name in enumerate(label_names):
        for ok in (True, False):
            sel = (y == c) & ((pred == y) == ok)
            if sel.any():
                out.append((f"{name}, {'correct' if ok else 'incorrect'}", int(sel.sum()), W[sel].mean(0)))
    return out


def plot_layer_weights(groups, num_layers: int, title: str, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.2), dpi=120)
    x = np.arange(num_layers)
    for label, n, w in groups:
        ax.plot(x, w, marker="o", markersize=3, linewidth=1.4, label=f"{label} (n={n})")
    ax.axhline(1.0 / num_layers, color="black", linestyle="--", linewidth=1, label=f"uniform 1/{num_layers}")
    ax.set_xlabel("layer (0 = embeddings)")
    ax.set_ylabel("mean Stage-2 weight")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def plot_layers(
    probe_dir,
    dataset: str,
    split: str = "test",
    out: str | None = None,
    model: str | None = None,
    cache_dir=None,
    data_dir=None,
    limit: int | None = None,
    progress: bool = True,
    log=print,
) -> dict:
    from singlepass.models import cache as state_cache
    from singlepass.models.data import load_dataset
    from singlepass.models.evaluate import check_labels, view_args
    from singlepass.models.probe_io import load_probe_and_backbone, read_config
    from singlepass.models.registry import FAMILIES, get_family

    cfg = read_config(probe_dir)
    if not get_family(cfg["probe"]).layer_weights:
        which = " or ".join(f.name for f in FAMILIES.values() if f.layer_weights)
        raise SinglepassError(
            f"plot-layers needs a {which} probe (its Stage-2 weights are the figure); "
            f"{probe_dir} is a {cfg['probe']!r} probe"
        )
    module, cfg, backbone = load_probe_and_backbone(probe_dir, model, cache_dir)
    ds = load_dataset(dataset, split, data_dir, limit=limit)
    check_labels(cfg, ds)
    c = state_cache.build(
        backbone,
        ds,
        cfg["prompt_format"],
        cfg["max_length"],
        cache_dir=cache_dir and Path(cache_dir),
        progress=progress,
        log=log,
        **view_args(cfg, ds),
    )
    W, pred = layer_weights(module, cfg, c)
    groups = group_means(W, ds.labels, pred, cfg["label_names"])
    path = Path(out) if out else Path(probe_dir) / f"layer_weights-{ds.name}-{split}.png"
    title = f"gate probe Stage-2 layer weights: {ds.name}/{split} ({len(ds)} rows)"
    plot_layer_weights(groups, cfg["num_layers"], title, path)
    return {"png": str(path), "groups": {g: {"rows": n, "mean_weight": w.round(5).tolist()} for g, n, w in groups}}
