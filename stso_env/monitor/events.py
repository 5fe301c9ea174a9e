"""Instability accounting on loss and grad-norm series.

Three published spike rules are computed side by side so results can be
recomputed under any of them (GUIDE section 4):

* **OLMo-core** (the one STSO counts): a step is *spiky* when its loss or grad
  norm exceeds mean + 6 sigma of the previous ``window`` (128) finite values;
  flagged steps within ``cooldown`` steps of each other merge into one event.
* **llm-foundry**: loss >= 2x the mean of the previous window for 5 consecutive
  steps.
* **Megatron**: loss >= 10x the maximum of the first 100 steps.

All functions take plain sequences and return plain Python values, so they are
usable on logs as well as live.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


def training_flops_per_token(n_params: int, n_layer: int, d_model: int, seq_len: int) -> float:
    """FLOPs of one training token (forward + backward): ``6 N + 12 L T d``.

    ``6 N`` counts the matmuls with the ``N`` non-embedding-lookup parameters
    (2 forward, 4 backward); ``12 L T d`` is the attention score and value
    products over a context of ``T`` (Kaplan et al. 2020; PaLM, appendix B). A
    step's FLOPs are this times the tokens of the batch; an evaluation-only
    forward pass costs a third of it.
    """
    return 6.0 * n_params + 12.0 * n_layer * seq_len * d_model


def _rolling_flags(x: np.ndarray, window: int, n_sigma: float) -> np.ndarray:
    """x[t] > mean + n_sigma * std of the previous ``window`` finite values (needs a full window)."""
    flags = np.zeros(len(x), dtype=bool)
    finite = np.isfinite(x)
    hist: list[float] = []
    for t in range(len(x)):
        if len(hist) >= window:
            h = np.asarray(hist[-window:])
            mu, sd = h.mean(), h.std()
            flags[t] = (not finite[t]) or x[t] > mu + n_sigma * sd
        if finite[t]:
            hist.append(float(x[t]))
            if len(hist) > 4 * window:
                del hist[: len(hist) - window]
    return flags


def olmo_spike_flags(loss: Sequence[float], grad_norm: Sequence[float] | None = None, *,
                     window: int = 128, n_sigma: float = 6.0) -> np.ndarray:
    """Per-step OLMo-core flags: loss or grad norm above mean + ``n_sigma`` sigma of the previous ``window``."""
    flags = _rolling_flags(np.asarray(loss, dtype=np.float64), window, n_sigma)
    if grad_norm is not None:
        flags |= _rolling_flags(np.asarray(grad_norm, dtype=np.float64), window, n_sigma)
    return flags


def merge_events(flags: Sequence[bool], cooldown: int = 20) -> list[tuple[int, int]]:
    """Merge flagged steps closer than ``cooldown`` into ``(first, last)`` events."""
    events: list[tuple[int, int]] = []
    for t in np.flatnonzero(np.asarray(flags, dtype=bool)):
        t = int(t)
        if events and t - events[-1][1] <= cooldown:
            events[-1] = (events[-1][0], t)
        else:
            events.append((t, t))
    return events


def llm_foundry_flags(loss: Sequence[float], *, window: int = 100, ratio: float = 2.0,
                      consecutive: int = 5) -> np.ndarray:
    """Steps ending a run of ``consecutive`` losses >= ``ratio`` x the mean of the window before the run."""
    x = np.asarray(loss, dtype=np.float64)
    flags = np.zeros(len(x), dtype=bool)
    run = 0
    for t in range(window, len(x)):
        ref = np.nanmean(x[t - window - run:t - run]) if t - window - run >= 0 else np.nan
        high = (not math.isfinite(x[t])) or (math.isfinite(ref) and x[t] >= ratio * ref)
        run = run + 1 if high else 0
        flags[t] = run >= consecutive
    return flags


def megatron_flags(loss: Sequence[float], *, first: int = 100, ratio: float = 10.0) -> np.ndarray:
    """Steps whose loss is >= ``ratio`` x the maximum of the first ``first`` losses."""
    x = np.asarray(loss, dtype=np.float64)
    flags = np.zeros(len(x), dtype=bool)
    if len(x) > first:
        ref = np.nanmax(x[:first])
        tail = x[first:]
        flags[first:] = ~np.isfinite(tail) | (tail >= ratio * ref)
    return flags


def diverged(loss: Sequence[float], *, factor: float = 3.0, initial: float | None = None) -> int | None:
    """First step whose loss is non-finite or above ``factor`` x the initial loss, else None."""
    x = np.asarray(loss, dtype=np.float64)
    if not len(x):
        return None
    ref = x[0] if initial is None else initial
    bad = ~np.isfinite(x) | (x > factor * ref)
    idx = np.flatnonzero(bad)
    return int(idx[0]) if len(idx) else None


def time_to_recover(loss: Sequence[float], start: int, *, baseline_window: int = 20, tol: float = 0.02,
                    ema: float = 0.9) -> int | None:
    """Steps after ``start`` until the smoothed loss is back within ``tol`` of the pre-event baseline.

    The baseline is the mean loss of the ``baseline_window`` steps before ``start``;
    smoothing is an EMA (decay ``ema``) started at ``start``. None if it never recovers.
    """
    x = np.asarray(loss, dtype=np.float64)
    if start <= 0 or start >= len(x):
        return None
    base = float(np.nanmean(x[max(0, start - baseline_window):start]))
    s = None
    for t in range(start, len(x)):
        v = x[t] if math.isfinite(x[t]) else s
        if v is None:
            continue
        s = v if s is None else ema * s + (1 - ema) * v
        if t > start and s <= base * (1 + tol):
            return t - start
    return None


@dataclass
class EventSummary:
    events: list[tuple[int, int]]
    olmo_flags: int
    llm_foundry_flags: int
    megatron_flags: int
    diverged_at: int | None

    @property
    def n_events(self) -> int:
        return len(self.events)


def summarize(loss: Sequence[float], grad_norm: Sequence[float] | None = None, *, window: int = 128,
              n_sigma: float = 6.0, cooldown: int = 20, divergence_factor: float = 3.0) -> EventSummary:
    """All spike rules on one series."""
    flags = olmo_spike_flags(loss, grad_norm, window=window, n_sigma=n_sigma)
    return EventSummary(
        events=merge_events(flags, cooldown),
        olmo_flags=int(flags.sum()),
        llm_foundry_flags=int(llm_foundry_flags(loss).sum()),
        megatron_flags=int(megatron_flags(loss).sum()),
        diverged_at=diverged(loss, factor=divergence_factor),
    )


class EventTracker:
    """Online instability accounting, one call per optimizer step.

    Applies the OLMo-core rule live (loss or grad norm above mean + ``n_sigma``
    sigma of the previous ``window`` steps), merges flags closer than
    ``cooldown`` steps into one event, and after each event counts the steps,
    and their FLOPs, spent above the pre-event baseline until the smoothed loss
    is back within ``tol`` of it: that is the *wasted* compute of an event
    (capped at ``max_recovery`` steps so one lasting shift is not charged
    forever). Divergence is a non-finite loss or a loss above
    ``divergence_factor`` x the first loss.

    The state is plain numbers and lists (``state_dict``) for checkpoints.
    """

    def __init__(self, *, window: int = 128, n_sigma: float = 6.0, cooldown: int = 20,
                 baseline_window: int = 20, tol: float = 0.02, ema: float = 0.9, max_recovery: int = 500,
                 divergence_factor: float = 3.0) -> None:
        self.window, self.n_sigma, self.cooldown = window, n_sigma, cooldown
        self.baseline_window, self.tol, self.ema = baseline_window, tol, ema
        self.max_recovery, self.divergence_factor = max_recovery, divergence_factor
        self.losses: list[float] = []
        self.gnorms: list[float] = []
        self.step = 0
        self.n_events = 0
        self.last_flag = -10**9
        self.initial_loss: float | None = None
        self.baseline: float | None = None  # pre-event loss level while recovering
        self.smoothed: float | None = None
        self.recovery_start = 0
        self.recovery_times: list[int] = []
        self.wasted_flops = 0.0
        self.wasted_steps = 0
        self.wasted_by_reason: dict[str, float] = {}

    @staticmethod
    def _above(hist: list[float], x: float, window: int, n_sigma: float) -> bool:
        if len(hist) < window:
            return False
        if not math.isfinite(x):
            return True
        h = np.asarray(hist[-window:])
        return bool(x > h.mean() + n_sigma * h.std())

    def update(self, loss: float, grad_norm: float | None, flops: float) -> dict[str, Any]:
        """Account one step; returns ``flag``, ``new_event``, ``recovering``, ``wasted_flops``, ``diverged``.

        ``grad_norm=None`` means not measured (a skipped batch): only the loss is checked.
        """
        t = self.step
        self.step += 1
        if self.initial_loss is None and math.isfinite(loss):
            self.initial_loss = loss
        flag = (self._above(self.losses, loss, self.window, self.n_sigma)
                or (grad_norm is not None and self._above(self.gnorms, grad_norm, self.window, self.n_sigma)))
        new_event = flag and t - self.last_flag > self.cooldown
        if flag:
            self.last_flag = t
        if new_event:
            self.n_events += 1
            if self.baseline is None:  # a new event inside a recovery keeps the older baseline
                recent = [x for x in self.losses[-self.baseline_window:]]
                self.baseline = float(np.mean(recent)) if recent else loss
                self.smoothed = None
                self.recovery_start = t
        wasted = 0.0
        if self.baseline is not None:
            v = loss if math.isfinite(loss) else self.smoothed
            if v is not None:
                self.smoothed = v if self.smoothed is None else self.ema * self.smoothed + (1 - self.ema) * v
            recovered = (t > self.recovery_start and self.smoothed is not None
                         and self.smoothed <= self.baseline * (1 + self.tol))
            if recovered or t - self.recovery_start >= self.max_recovery:
                self.recovery_times.append(t - self.recovery_start)
                self.baseline = None
            else:
                wasted = flops
                self.wasted_steps += 1
        self.wasted_flops += wasted
        if wasted:
            self.wasted_by_reason["recovery"] = self.wasted_by_reason.get("recovery", 0.0) + wasted
        for hist, x in ((self.losses, loss), (self.gnorms, grad_norm)):
            if x is not None and math.isfinite(x):
                hist.append(float(x))
                if len(hist) > 2 * self.window:
                    del hist[: len(hist) - self.window]
        diverged = (not math.isfinite(loss)) or (
            self.initial_loss is not None and loss > self.divergence_factor * self.initial_loss)
        return {"flag": flag, "new_event": new_event, "recovering": self.baseline is not None,
                "wasted_flops": wasted, "diverged": diverged}

    def add_wasted(self, flops: float, reason: str) -> None:
        """Charge compute that produced nothing kept: steps rolled back to a checkpoint (``"rollback"``),
        branch and verification rollouts (``"verification"``), discarded population members, ..."""
        self.wasted_flops += flops
        self.wasted_by_reason[reason] = self.wasted_by_reason.get(reason, 0.0) + flops

    def state_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, list) else dict(v) if isinstance(v, dict) else v)
                for k, v in vars(self).items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            if not hasattr(self, k):
                raise KeyError(f"EventTracker state has unknown field {k!r}")
            setattr(self, k, list(v) if isinstance(v, (list, tuple)) else dict(v) if isinstance(v, dict) else v)
