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
from dataclasses import dataclass
from typing import Sequence

import numpy as np


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
