"""The monitor: per-step training statistics in, a fixed-length state vector out.

:class:`Monitor` is fed every optimizer step's :class:`~stso_env.train.trainer.StepStats`
(and, every ``entropy_every`` steps, per-layer activation/attention summaries
measured on a few probe sequences). It keeps the uncertainty index
(:mod:`stso_env.monitor.uncertainty`) and the instability accounting
(:class:`~stso_env.monitor.events.EventTracker`, the OLMo-core rule and the
FLOPs charged to forks and rollbacks), the data events on each step's batch loss
(:class:`~stso_env.monitor.events.DataEventTracker`) and, once per window from
the probe loss, the model instability events
(:class:`~stso_env.monitor.events.ModelEventTracker`) up to date, and at each
decision point :meth:`observe` returns the state vector whose names, order,
units and normalisation are the ``observation`` section of
``assets/state_schema_v1.yaml`` (:data:`OBSERVATION_NAMES` is read from there,
so the file and the code cannot drift apart).

Base features are aggregated over the decision window (the steps since the
previous observation). Each appears three times: its value, its EMA across
observations (decay ``obs_ema``) and its change since the previous observation.
Layer statistics are summarised as mean / min / max over layers, so the vector
has the same length for every depth.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import yaml

from stso_env.config import ASSETS_DIR
from stso_env.monitor.events import DataEventTracker, EventTracker, ModelEventTracker
from stso_env.monitor.uncertainty import UncertaintyConfig, UncertaintyIndex

BASE_FEATURES = (
    "loss", "grad_norm", "lr", "weight_decay", "clip_bound", "momentum_reset_flag",
    "batch_loss_mean", "batch_loss_var",
    "act_entropy_mean", "act_entropy_min", "act_entropy_max",
    "attn_entropy_mean", "attn_entropy_min", "attn_entropy_max",
    "probe_loss",
)
CLIP_BOUND_CAP = 100.0  # "no bound" is encoded as this bound
OBS_LIMIT = 100.0  # every entry is clipped to [-OBS_LIMIT, OBS_LIMIT]


def _load_schema() -> list[dict[str, Any]]:
    data = yaml.safe_load((ASSETS_DIR / "state_schema_v1.yaml").read_text(encoding="utf-8"))
    return data["observation"]["features"]


OBSERVATION_SCHEMA = _load_schema()
OBSERVATION_NAMES: tuple[str, ...] = tuple(f["name"] for f in OBSERVATION_SCHEMA)


class Monitor:
    """Turns step statistics into the observation vector, the uncertainty index and event accounting."""

    def __init__(self, *, vocab_size: int, budget_steps: int, uncertainty: UncertaintyConfig | None = None,
                 obs_ema: float = 0.8, divergence_factor: float = 3.0) -> None:
        self.log_vocab = math.log(vocab_size)
        self.budget = int(budget_steps)
        self.obs_ema = obs_ema
        self.index = UncertaintyIndex(uncertainty)
        self.events = EventTracker(divergence_factor=divergence_factor)
        self.model_events = ModelEventTracker()
        self.data_events = DataEventTracker()
        self.names = OBSERVATION_NAMES
        self._window: list[dict[str, float]] = []
        self._layers: dict[str, float] = {k: math.nan for k in BASE_FEATURES if "entropy" in k}
        # latest probe loss in nats; None until the first probe (observed as 0, like the layer stats)
        self._probe: float | None = None
        self._prev: dict[str, float] | None = None
        self._ema: dict[str, float] | None = None
        # z-scores, index and trigger of the latest step, kept as plain data so a restored
        # monitor can produce an observation before its next step
        self._last: dict[str, Any] = {"z": {n: 0.0 for n in self.index.component_names}, "index": 0.0,
                                      "trigger": False}
        self.global_step = 0

    # ------------------------------------------------------------------ per step

    def set_layer_stats(self, rows: list[dict[str, float]]) -> None:
        """Per-layer summaries (``stso_env.monitor.activations``) measured at the latest sample."""
        for key in ("act_entropy", "attn_entropy"):
            vals = np.array([r[key] for r in rows], dtype=np.float64)
            vals = vals[np.isfinite(vals)]
            if len(vals):
                self._layers[f"{key}_mean"] = float(vals.mean())
                self._layers[f"{key}_min"] = float(vals.min())
                self._layers[f"{key}_max"] = float(vals.max())

    def update(self, s: Any) -> dict[str, Any]:
        """Account one optimizer step (a ``StepStats``); returns the event flags of the step."""
        self.global_step = s.step + 1
        # A skipped batch has no gradient: its grad norm is "not measured", not a spike. A vetoed
        # update (skip-step) did measure one, and its spikes count like anyone's.
        gnorm = None if s.skipped and not math.isfinite(s.grad_norm) else s.grad_norm
        ev = self.events.update(s.loss, gnorm, s.flops)
        ev["data_event"] = self.data_events.update(s.loss)["new_event"]
        reading = self.index.update(
            s.loss, gnorm,
            attention_entropy=_finite_or_none(self._layers["attn_entropy_mean"]),
            activation_entropy=_finite_or_none(self._layers["act_entropy_mean"]),
        )
        self._last = {"z": dict(reading.z), "index": float(reading.index), "trigger": bool(reading.trigger)}
        self._window.append({
            "loss": s.loss, "grad_norm": s.grad_norm, "lr": s.lr, "weight_decay": s.weight_decay,
            "clip_bound": s.clip_bound, "momentum_reset_flag": float(s.momentum_reset),
            "batch_loss_mean": s.seq_loss_mean, "batch_loss_var": s.seq_loss_var,
        })
        return {**ev, "index": reading.index, "trigger": reading.trigger, "fired": reading.fired}

    def update_probe(self, probe_loss: float, flops: float, steps: int) -> dict[str, Any]:
        """Account one window's probe loss (after its ``steps`` steps costing ``flops``): the model
        instability rule's ``new_event``, ``in_event``, ``recovered`` and ``recovery_flops``. The probe
        loss also enters the next observation (``probe_loss``)."""
        self._probe = float(probe_loss)
        return self.model_events.update(probe_loss, flops, steps)

    @property
    def latest(self) -> dict[str, Any]:
        """Index, trigger and component z-scores of the latest step (plain data, survives a restore)."""
        return {"z": dict(self._last["z"]), "index": self._last["index"], "trigger": self._last["trigger"]}

    # ------------------------------------------------------------------ observation

    def _base_values(self) -> dict[str, float]:
        w = self._window
        if not w:
            raise RuntimeError("Monitor.observe() before any step was recorded")
        last = w[-1]

        def fin_mean(key: str) -> float:
            vals = [r[key] for r in w if math.isfinite(r[key])]
            return float(np.mean(vals)) if vals else math.nan

        gn = fin_mean("grad_norm")
        bound = min(last["clip_bound"], CLIP_BOUND_CAP)
        v = {
            "loss": last["loss"] / self.log_vocab,
            "grad_norm": math.log1p(gn) if math.isfinite(gn) else math.log1p(1e6),
            "lr": math.log10(max(last["lr"], 1e-12)) + 3.0,
            "weight_decay": last["weight_decay"],
            "clip_bound": math.log1p(bound),
            "momentum_reset_flag": max(r["momentum_reset_flag"] for r in w),
            "batch_loss_mean": fin_mean("batch_loss_mean") / self.log_vocab,
            "batch_loss_var": math.log1p(fin_mean("batch_loss_var")),
        }
        for k, val in self._layers.items():
            v[k] = val if math.isfinite(val) else 0.0  # before the first sample: 0, documented
        # not measured yet: 0 (documented); measured but not finite (a diverged model): observe() maps
        # the NaN/inf to OBS_LIMIT, the extreme it is
        v["probe_loss"] = 0.0 if self._probe is None else self._probe / self.log_vocab
        return v

    def observe(self) -> np.ndarray:
        """The state vector for the window since the previous call (then starts a new window)."""
        base = self._base_values()
        base = {k: (x if math.isfinite(x) else OBS_LIMIT) for k, x in base.items()}
        prev = self._prev or base
        if self._ema is None:
            self._ema = dict(base)
        else:
            self._ema = {k: self.obs_ema * self._ema[k] + (1 - self.obs_ema) * base[k] for k in base}
        r = self._last
        values: dict[str, float] = {}
        for k in BASE_FEATURES:
            values[k] = base[k]
            values[f"{k}_ema"] = self._ema[k]
            values[f"{k}_delta"] = base[k] - prev[k]
        for name in self.index.component_names:
            values[f"u_{name}"] = r["z"][name]
        values["uncertainty_index"] = r["index"]
        values["trigger"] = float(r["trigger"])
        values["progress"] = min(1.0, self.global_step / max(1, self.budget))
        self._prev = base
        self._window = []
        obs = np.array([values[n] for n in self.names], dtype=np.float64)
        obs = np.nan_to_num(obs, nan=0.0, posinf=OBS_LIMIT, neginf=-OBS_LIMIT)
        return np.clip(obs, -OBS_LIMIT, OBS_LIMIT).astype(np.float32)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        return {
            "index": self.index.state_dict(),
            "events": self.events.state_dict(),
            "model_events": self.model_events.state_dict(),
            "data_events": self.data_events.state_dict(),
            "window": [dict(r) for r in self._window],
            "layers": dict(self._layers),
            "probe": self._probe,
            "prev": None if self._prev is None else dict(self._prev),
            "ema": None if self._ema is None else dict(self._ema),
            "global_step": self.global_step,
            "last": {"z": dict(self._last["z"]), "index": self._last["index"], "trigger": self._last["trigger"]},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.index.load_state_dict(state["index"])
        self.events.load_state_dict(state["events"])
        self.model_events.load_state_dict(state["model_events"])
        self.data_events.load_state_dict(state["data_events"])
        self._window = [dict(r) for r in state["window"]]
        self._layers = dict(state["layers"])
        probe = state.get("probe")  # absent in states saved before the probe entered the observation
        self._probe = None if probe is None else float(probe)
        self._prev = None if state["prev"] is None else dict(state["prev"])
        self._ema = None if state["ema"] is None else dict(state["ema"])
        self.global_step = int(state["global_step"])
        self._last = {"z": dict(state["last"]["z"]), "index": float(state["last"]["index"]),
                      "trigger": bool(state["last"]["trigger"])}


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None
