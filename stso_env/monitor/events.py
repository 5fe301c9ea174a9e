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
usable on logs as well as live. References: 2024_OLMo_OLMo2 (the OLMo-core
rule), 2023_MosaicML_LLMFoundry, 2019_Shoeybi_MegatronLM, 2020_Kaplan_ScalingLaws
and 2022_Chowdhery_PaLM (the FLOPs formula); keys in ``assets/related_work.md``.

What the evaluation counts
--------------------------
The rules above flag a step whose *training* loss is high. In a scenario that
feeds garbage batches, that is the loss of the garbage itself: no intervention
can lower it, so every controller would score the same. The evaluation
therefore counts two things apart (GUIDE section 6):

* a **model instability event** (:func:`model_instability_events`, live
  :class:`ModelEventTracker`) is damage to the model seen on data it did not
  just train on: the held-out probe loss, measured once per decision window
  in eval mode on a fixed batch of the *probe* split, rising above its running
  best by more than ``max(rise * best, k_noise * RMS)``, where RMS is the root
  mean square of the excesses over the running best in the last ``history``
  ordinary windows (zero while the loss keeps falling, so the steep early
  descent does not blunt the rule; a noisy plateau raises the bar). Why the probe: it is measured anyway (the env's
  reward and the monitor's entropy statistics come from the same pass), so the
  rule costs nothing; it sees every change of the weights, whatever caused
  it; and a fixed batch in eval mode has no sampling noise, so the running
  best is a stable baseline from the third window on (no 128-step history as
  the OLMo rule needs). The event lasts until the probe is back within
  ``tol`` of the best before it (the *time to recover*); the FLOPs of those
  windows are its *recovery FLOPs*. A non-finite probe is an event that never
  recovers.
* a **data event** (:func:`data_event_flags`, live :class:`DataEventTracker`)
  is a step whose own batch loss is far above the recent median (robust
  z-score over the previous ``history`` steps, at least ``warmup`` of them):
  the data was bad. It is reported, never mixed into the model events.

Both are computed on the *lineage* of the final model (the windows that
produced the final weights, stitched across rollbacks, adopted forks and PBT
exploits): :func:`lineage_metrics`.
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


def _plain(v: Any) -> Any:
    """A deep copy of tracker state as plain data: lists (tuples become lists), dicts and numbers."""
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


class _PlainState:
    """``state_dict`` / ``load_state_dict`` of a tracker whose attributes are all plain data, so env
    snapshots, forks and checkpoints can carry it; an unknown field in a loaded state is an error."""

    def state_dict(self) -> dict[str, Any]:
        return {k: _plain(v) for k, v in vars(self).items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            if not hasattr(self, k):
                raise KeyError(f"{type(self).__name__} state has unknown field {k!r}")
            setattr(self, k, _plain(v))


class EventTracker(_PlainState):
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


# ----------------------------------------------------------------------------- model and data events

#: Defaults of the model-instability rule (see the module docstring).
MODEL_EVENT_RISE = 0.03
MODEL_EVENT_K_NOISE = 4.0
MODEL_EVENT_WARMUP = 3
MODEL_EVENT_HISTORY = 20
MODEL_EVENT_TOL = 0.005
#: Defaults of the data-event rule.
DATA_EVENT_Z = 6.0
DATA_EVENT_WARMUP = 16
DATA_EVENT_HISTORY = 64
DATA_EVENT_COOLDOWN = 20


def _mad_scale(x: Sequence[float]) -> float:
    """1.4826 x the median absolute deviation: the standard deviation of normal data, robust to outliers."""
    a = np.asarray(x, dtype=np.float64)
    if not a.size:
        return 0.0
    return float(1.4826 * np.median(np.abs(a - np.median(a))))


class ModelEventTracker(_PlainState):
    """Online model-instability events on the per-window probe loss (rule in the module docstring).

    ``update(probe_loss, flops, steps)`` once per window returns ``{"new_event", "in_event",
    "recovered", "recovery_flops"}``; ``state_dict`` / ``load_state_dict`` hold plain numbers so env
    snapshots and forks carry it. :func:`model_instability_events` is the same rule over a whole series
    (a test holds the two equal).
    """

    def __init__(self, *, rise: float = MODEL_EVENT_RISE, k_noise: float = MODEL_EVENT_K_NOISE,
                 warmup: int = MODEL_EVENT_WARMUP, history: int = MODEL_EVENT_HISTORY,
                 tol: float = MODEL_EVENT_TOL) -> None:
        if rise < 0 or k_noise < 0 or warmup < 2 or history < 2 or tol < 0:
            raise ValueError(f"model event rule: need rise >= 0, k_noise >= 0, warmup >= 2, history >= 2, tol >= 0; "
                             f"got rise={rise}, k_noise={k_noise}, warmup={warmup}, history={history}, tol={tol}")
        self.rise, self.k_noise, self.warmup, self.history, self.tol = rise, k_noise, warmup, history, tol
        self.window = 0
        self.best: float | None = None  # running best (lowest) finite probe loss
        self.excess: list[float] = []  # recent positive excesses over the running best outside events
        self.event_start: int | None = None
        self.event_baseline: float | None = None
        self.events: list[list[int]] = []  # [start window, end window] (end = first recovered window, -1 open)
        self.recovery_windows: list[int] = []
        self.recovery_steps: list[int] = []
        self._event_steps = 0
        self.recovery_flops = 0.0

    def threshold(self) -> float:
        """How far above the running best the next probe loss may go before it is an event."""
        assert self.best is not None
        e = self.excess[-self.history:]
        rms = math.sqrt(sum(v * v for v in e) / len(e)) if e else 0.0
        return max(self.rise * abs(self.best), self.k_noise * rms)

    def update(self, probe_loss: float, flops: float = 0.0, steps: int = 0) -> dict[str, Any]:
        w = self.window
        self.window += 1
        x = float(probe_loss)
        finite = math.isfinite(x)
        new_event = recovered = False
        charged = 0.0
        if self.event_start is None:
            if w >= self.warmup and self.best is not None and (not finite or x - self.best > self.threshold()):
                new_event = True
                self.event_start, self.event_baseline = w, self.best
                self.events.append([w, -1])
                self._event_steps = 0
        elif finite and self.event_baseline is not None and x <= self.event_baseline * (1 + self.tol) + 1e-12:
            recovered = True
            self.events[-1][1] = w
            self.recovery_windows.append(w - self.event_start)
            self.recovery_steps.append(self._event_steps)
            self.event_start = self.event_baseline = None
        if self.event_start is not None:  # this window was spent damaged (the event's own window included)
            charged = float(flops)
            self.recovery_flops += charged
            self._event_steps += int(steps)
        if finite:
            if self.best is not None and self.event_start is None and not recovered:
                self.excess.append(max(0.0, x - self.best))
                del self.excess[: max(0, len(self.excess) - self.history)]
            self.best = x if self.best is None else min(self.best, x)
        return {"new_event": new_event, "in_event": self.event_start is not None, "recovered": recovered,
                "recovery_flops": charged}

    @property
    def n_events(self) -> int:
        return len(self.events)


@dataclass
class ModelEvents:
    """Model-instability events of one probe-loss series (see :func:`model_instability_events`)."""

    events: list[tuple[int, int | None]]  # (start window, first recovered window or None)
    recovery_windows: list[int]  # per recovered event
    recovery_steps: list[int]  # optimizer steps spent in each recovered event
    recovery_flops: float  # FLOPs of the windows spent in events (unrecovered ones included)
    unrecovered: int  # events still open at the end of the series

    @property
    def n_events(self) -> int:
        return len(self.events)


def model_instability_events(probe_loss: Sequence[float], flops: Sequence[float] | None = None,
                             steps: Sequence[int] | None = None, **rule: Any) -> ModelEvents:
    """Model-instability events of a per-window probe-loss series (rule in the module docstring).

    ``flops`` and ``steps`` are per window (default 0); ``rule`` overrides :class:`ModelEventTracker`'s
    parameters (``rise``, ``k_noise``, ``warmup``, ``history``, ``tol``).
    """
    n = len(probe_loss)
    flops = [0.0] * n if flops is None else list(flops)
    steps = [0] * n if steps is None else list(steps)
    if len(flops) != n or len(steps) != n:
        raise ValueError(f"probe_loss has {n} windows but flops has {len(flops)} and steps {len(steps)}")
    tr = ModelEventTracker(**rule)
    for x, f, k in zip(probe_loss, flops, steps):
        tr.update(x, f, k)
    events = [(int(a), None if b < 0 else int(b)) for a, b in tr.events]
    return ModelEvents(events=events, recovery_windows=list(tr.recovery_windows),
                       recovery_steps=list(tr.recovery_steps), recovery_flops=float(tr.recovery_flops),
                       unrecovered=sum(b is None for _, b in events))


class DataEventTracker(_PlainState):
    """Online data events: a batch loss with robust z-score above ``z`` over the previous ``history``
    finite losses (median and 1.4826 x MAD, at least ``warmup`` of them), flags within ``cooldown``
    steps merged into one event. Flagged losses do not enter the history, so a burst of garbage does
    not raise the bar for the rest of itself."""

    def __init__(self, *, z: float = DATA_EVENT_Z, warmup: int = DATA_EVENT_WARMUP,
                 history: int = DATA_EVENT_HISTORY, cooldown: int = DATA_EVENT_COOLDOWN) -> None:
        if z <= 0 or warmup < 2 or history < warmup or cooldown < 0:
            raise ValueError(f"data event rule: need z > 0, 2 <= warmup <= history, cooldown >= 0; got z={z}, "
                             f"warmup={warmup}, history={history}, cooldown={cooldown}")
        self.z, self.warmup, self.history, self.cooldown = z, warmup, history, cooldown
        self.step = 0
        self.hist: list[float] = []
        self.last_flag = -(10**9)
        self.n_events = 0
        self.n_flags = 0

    def update(self, loss: float) -> dict[str, bool]:
        t = self.step
        self.step += 1
        x = float(loss)
        flag = False
        if len(self.hist) >= self.warmup:
            h = self.hist[-self.history:]
            med = float(np.median(h))
            scale = max(_mad_scale(h), 1e-3 * max(abs(med), 1e-12))  # a constant history still has a bar
            flag = math.isfinite(x) and (x - med) / scale > self.z
        new_event = flag and t - self.last_flag > self.cooldown
        if flag:
            self.last_flag = t
            self.n_flags += 1
        if new_event:
            self.n_events += 1
        if math.isfinite(x) and not flag:
            self.hist.append(x)
            del self.hist[: max(0, len(self.hist) - self.history)]
        return {"flag": flag, "new_event": new_event}


def data_event_flags(loss: Sequence[float], **rule: Any) -> tuple[np.ndarray, int]:
    """Per-step data-event flags of a training-loss series and the number of (merged) events."""
    tr = DataEventTracker(**rule)
    flags = np.asarray([tr.update(x)["flag"] for x in loss], dtype=bool)
    return flags, tr.n_events


def lineage_metrics(history: dict[str, Sequence[Any]], **rule: Any) -> dict[str, Any]:
    """Event metrics along the lineage of a final model.

    ``history`` is the per-window record the env keeps (``GPT2Env.lineage()``): ``probe_loss``,
    ``flops``, ``steps`` and ``data_events`` per window, in the order the windows produced the final
    weights. Because an env snapshot, an adopted fork and a PBT exploit all carry this record with the
    weights, the record of the final env *is* the lineage, stitched across them. Returns the counts,
    their rates per 100k lineage steps, recovery times (in optimizer steps) and recovery FLOPs with
    their share of the lineage's FLOPs.
    """
    probe = list(history["probe_loss"])
    flops = [float(f) for f in history["flops"]]
    steps = [int(k) for k in history["steps"]]
    ev = model_instability_events(probe, flops, steps, **rule)
    n_steps = int(sum(steps))
    total = float(sum(flops))
    data = int(sum(int(d) for d in history.get("data_events", [])))
    per = 1e5 / n_steps if n_steps else None
    return {
        "lineage_windows": len(probe), "lineage_steps": n_steps, "lineage_flops": total,
        "model_events": ev.n_events, "model_event_windows": [list(e) for e in ev.events],
        "unrecovered_events": ev.unrecovered, "data_events": data,
        "model_events_per_100k_steps": ev.n_events * per if per is not None else None,
        "data_events_per_100k_steps": data * per if per is not None else None,
        "mean_time_to_recover_steps": float(np.mean(ev.recovery_steps)) if ev.recovery_steps else None,
        "recovery_flops": ev.recovery_flops,
        "recovery_flops_fraction": ev.recovery_flops / total if total > 0 else None,
    }
