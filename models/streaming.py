"""A response probe read the way the runtime reads it: after every decode pass, through the stop rule.

    scores = stream_scores(module, cache)     # [N, T] P(unsafe) after pass k (tokens 1..k), NaN past the end
    stat = stop_statistic(scores, 2)          # [N] the highest threshold at which the rule stops the row

The runtime's ``stop`` rule (runtime/policy.py ``Streaks``) stops a response once P(unsafe) >= the
threshold on ``consecutive`` passes in a row, so a row is stopped at threshold t exactly when some
window of ``consecutive`` passes has all its scores >= t: when t <= the largest window minimum. That
one number per row turns "the share of safe responses the rule would stop" into an ordinary false
positive rate, and an operating point calibrated on it (``stop_operating_point``: ``train
--threshold-at-fpr`` of a streaming response probe) bounds the stops a deployment sees, not the
whole-response FPR.

Training for the rule (``train --set stream_loss=stop``, ``HParams.stream_loss``): a probe trained on whole
responses is read from the first token on, where it was never trained, and the rule then stops many safe
responses early. ``prefix_logits`` runs the streaming form over a batch's tokens with gradients (the logits
after every pass, exactly what the rule reads), and ``stop_loss`` trains on them what the rule needs:
every prefix of a safe response is safe, so each of its passes is trained toward safe and its stop
statistic too; a harmful response's early prefixes may not be harmful yet, so only its finished response
and its stop statistic within the first ``EARLY_TOKENS`` passes are trained toward unsafe (some window of
its early passes should stop it, not every pass).
"""

from __future__ import annotations

import numpy as np

NEVER = -1.0  # the statistic of a row too short to be stopped: below every probability
EARLY_TOKENS = 32  # early detection: stopped within this many generated tokens (issue 15's window)


def stop_consecutive() -> int:
    """The runtime's ``stop`` rule default: flagged on this many passes in a row."""
    from singlepass.runtime.policy import Rule

    return Rule("stop").consecutive


def stream_scores(module, cache, batch_rows: int = 32, progress: bool = False, desc: str = "replay") -> np.ndarray:
    """P(positive) after every decode pass of every cached row: [N, T_max] float64, NaN past a
    row's last token. Each row's response tokens are folded in one at a time through the probe's
    streaming form (``stream_update``), rows batched (similar lengths together)."""
    import torch
    from tqdm.auto import tqdm

    from singlepass.models.cache import Scratch
    from singlepass.models.probes import host_probabilities

    n = len(cache)
    out = np.full((n, int(cache.lengths.max()) if n else 0), np.nan)
    order = np.argsort(-cache.lengths, kind="stable")
    scratch = Scratch()  # each batch is read into the same buffer
    with torch.no_grad(), tqdm(total=n, desc=desc, unit="row", disable=not progress, leave=False) as bar:
        for s in range(0, n, batch_rows):
            rows = order[s : s + batch_rows]
            states, mask = cache.batch(rows, scratch=scratch)  # [L+1, B, T, d], [B, T] (right padding)
            for t, z in enumerate(pass_logits(module, states, mask)):
                p = host_probabilities(z)[:, 1]  # [B]
                live = mask[:, t].numpy().astype(bool)
                out[rows[live], t] = p[live]
            bar.update(len(rows))
    return out


def stop_statistic(scores: np.ndarray, consecutive: int) -> np.ndarray:
    """scores [N, T] (NaN past a row's end) -> [N]: the largest minimum over windows of
    ``consecutive`` passes in a row (NEVER for a row with fewer passes). The stop rule at threshold
    t stops row i iff stat[i] >= t."""
    if consecutive < 1:
        raise ValueError(f"consecutive must be at least 1, not {consecutive}")
    n, t = scores.shape
    if t < consecutive:
        return np.full(n, NEVER)
    windows = np.lib.stride_tricks.sliding_window_view(scores, consecutive, axis=1)  # [N, T - c + 1, c]
    lows = windows.min(-1)  # NaN where a window runs past the row's end
    lows = np.where(np.isnan(lows), NEVER, lows)
    return lows.max(1)


def stop_operating_point(module, cache, y: np.ndarray, fpr_target: float) -> dict:
    """The threshold at which the runtime's stop rule stops at most ``fpr_target`` of the safe rows
    of ``cache`` (labels ``y``; the validation rows), each replayed pass by pass: threshold_at_fpr
    on the stop statistic. -> an operating point record (threshold, FPR / TPR it gives)."""
    from singlepass.models.metrics import rates_at, threshold_at_fpr

    consecutive = stop_consecutive()
    stat = stop_statistic(stream_scores(module, cache), consecutive)  # [N]
    t = threshold_at_fpr(y, stat, fpr_target)
    return {"threshold": t, "target_fpr": fpr_target, "consecutive": consecutive, **rates_at(y, stat, t)}


def pass_logits(module, states, mask):
    """The probe's logits [B, C'] after each decode pass, in order: states [L+1, B, T, d] (a batch's response
    tokens), mask [B, T] (1: a response token), folded in one token per pass through the stacked
    ``stream_update`` and read by ``stream_logits``, as the runtime's decode passes do. The one replay loop
    of ``stream_scores`` (no gradients) and ``prefix_logits`` (training)."""
    module.check_streamable()
    state = module.stream_init(mask.shape[0])
    for t in range(mask.shape[1]):
        layers = list(states[:, :, t : t + 1].unbind(0))  # L+1 x [B, 1, d]
        state = module.stream_update(state, layers, mask[:, t : t + 1], stacked=True)
        yield module.stream_logits(state)  # [B, C']


def prefix_logits(module, states, mask):
    """A streaming binary probe's logit after every decode pass, with gradients (training): states
    [L+1, B, T, d] (a batch's response tokens), mask [B, T] (1: a response token) -> [B, T] float32: at a
    real token t, the logit once the row's real tokens up to t are folded in; a padded position after
    them repeats the last one, one before them (left padding) is the empty state's (``stop_loss`` reads
    real positions only). ``pass_logits``, so training reads exactly what the stop rule reads."""
    import torch

    return torch.stack([z[:, 0] for z in pass_logits(module, states, mask)], 1)  # [B, T]


def stop_loss(z, mask, y, pos_weight: float = 1.0, weight=None, early: int = EARLY_TOKENS, consecutive=None):
    """The stop rule's training loss, summed over rows: z [B, T] (``prefix_logits``), mask [B, T] (either
    padding side), y [B] (0 safe, 1 harmful), ``weight`` [B] per-row weights or None, ``pos_weight`` the
    harmful rows' weight (class balance, as ``fit.make_loss``), ``consecutive`` the rule's passes in a row
    (None: the runtime's, ``stop_consecutive``). With s the stop statistic (the largest minimum over
    ``consecutive`` passes in a row: ``stop_statistic``, in logits) and BCE(x, c) the binary cross-entropy
    of logit x toward c:

        safe row      mean over its passes of BCE(z_t, 0) + BCE(s, 0)
        harmful row   pos_weight * (BCE(z_last, 1) + BCE(s_early, 1))

    s_early reads the windows whose last pass is within the first ``early`` passes. A row with fewer than
    ``consecutive`` passes has no window (the rule cannot stop it): its statistic term is 0; a row with no
    real token adds nothing."""
    import torch
    import torch.nn.functional as F

    from singlepass.models.probes import NEG

    c = stop_consecutive() if consecutive is None else consecutive
    if c < 1 or early < c:
        raise ValueError(f"need 1 <= consecutive <= early, not consecutive={c}, early={early}")
    B = z.shape[0]
    real = mask > 0  # [B, T]
    n = real.sum(1)  # [B]
    passes = mask.to(torch.long).cumsum(1)  # [B, T]: the pass number at a real token (either padding side)
    safe_passes = F.softplus(z).masked_fill(~real, 0.0).sum(1) / n.clamp_min(1)  # [B]: mean BCE(z_t, 0)
    # windows of c passes in a row [B, W], W = T - c + 1 (none when T < c), each its lowest logit, whether
    # all its passes are real, and its last pass; then one column that is never a window, so amax has one
    if z.shape[1] >= c:
        lows, window, ends = z.unfold(1, c, 1).amin(-1), real.unfold(1, c, 1).all(-1), passes[:, c - 1 :]
    else:
        lows, window, ends = z[:, :0], real[:, :0], passes[:, :0]
    lows = torch.cat([lows, z.new_full((B, 1), NEG)], 1)
    window = torch.cat([window, torch.zeros_like(real[:, :1])], 1)
    ends = torch.cat([ends, torch.zeros_like(passes[:, :1])], 1)
    s = lows.masked_fill(~window, NEG).amax(1)  # [B]
    s_early = lows.masked_fill(~(window & (ends <= early)), NEG).amax(1)  # [B]
    has = n >= c
    zero = torch.zeros_like(s)
    at = (real * torch.arange(z.shape[1], device=z.device)).argmax(1, keepdim=True)  # [B, 1]: the last real pass
    safe = safe_passes + torch.where(has, F.softplus(s), zero)
    harmful = pos_weight * (F.softplus(-z.gather(1, at)[:, 0]) + torch.where(has, F.softplus(-s_early), zero))
    loss = torch.where(n > 0, torch.where(y > 0, harmful, safe), zero)  # [B]; a row with no token: nothing
    return (loss if weight is None else loss * weight).sum()
