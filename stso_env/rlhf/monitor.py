"""The state of an RLHF run: observation vector, uncertainty index, instability events and divergence.

Fed once per window (:meth:`RLHFMonitor.update`) with the window's trainer statistics
(:class:`~stso_env.rlhf.run.WindowStats`), the probe gold score after it and the knobs it ran
under. Units of every feature are in ``assets/rlhf_state_schema_v1.yaml``.

Uncertainty index. Five raw signals, each z-scored against its own past windows by a
:class:`~stso_env.monitor.uncertainty.RunningNormaliser` (the GPT-2 monitor's normaliser: exact
mean and variance over the first windows, EMA after, ``z = 0`` during warm-up, clipped):

``reward_volatility``  ``|proxy_t - proxy_{t-1}|``: jumps of the proxy reward (noise bursts, a
                        policy that suddenly finds an exploit);
``kl_growth``          ``log(kl_max + 1e-4)``: the KL to the reference running away;
``entropy_drop``       ``-entropy``: the policy's token entropy collapsing;
``grad_volatility``    ``|log g_t - log g_{t-1}|`` of the mean grad norm;
``proxy_gold_gap``     ``(proxy_t - proxy_{t-1}) - (gold_t - gold_{t-1})`` in z units of each:
                        the proxy rising while the gold score does not, the signature of reward
                        over-optimisation (Gao et al. 2022).

``index = sum of the five z`` and a hysteresis trigger (on above ``tau``, off below
``tau - hysteresis``), as in the GPT-2 monitor.

Divergence (:class:`DivergenceRule`; the episode ends) is any of

* **KL blow-up**: the largest per-step KL of a window above ``kl_limit`` nats per token;
* **entropy collapse**: the window's mean token entropy below ``entropy_floor`` times the first
  window's;
* **gold collapse**: the probe gold score, averaged over the last three readings (one reading is a
  few dozen greedy completions and moves by several hundredths on its own), more than
  ``gold_drop`` below the running peak of that average (the start's score counts as a reading);
* a non-finite reward, KL or entropy.

An *instability event* starts in a window that enters the warning zone (half the KL limit, the
entropy floor plus half the way back to the start's entropy, or half the gold drop) from
outside it; the reward charges each start.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from stso_env.config import _f
from stso_env.monitor.uncertainty import HysteresisTrigger, RunningNormaliser

OBS_LIMIT = 100.0

OBSERVATION_NAMES: tuple[str, ...] = (
    "proxy_reward", "proxy_reward_std", "proxy_reward_delta",
    "gold_probe", "gold_probe_delta", "gold_below_peak",
    "kl", "kl_max", "kl_delta",
    "entropy", "entropy_ratio",
    "clip_ratio", "grad_norm", "completion_length", "zero_std_groups",
    "lr", "beta", "entropy_coef", "ref_alpha", "epsilon", "skipped",
    "u_reward_volatility", "u_kl_growth", "u_entropy_drop", "u_grad_volatility", "u_proxy_gold_gap",
    "uncertainty_index", "trigger", "progress",
)
GOLD_READINGS = 3  # readings averaged by the gold-collapse rule
COMPONENT_NAMES = ("reward_volatility", "kl_growth", "entropy_drop", "grad_volatility", "proxy_gold_gap")


@dataclass
class DivergenceRule:
    """When an RLHF run counts as diverged (module docstring)."""

    kl_limit: float = _f(1.0, "largest per-step KL to the reference (nats per token) before a KL blow-up",
                         range=(1e-6, 1e6))
    entropy_floor: float = _f(0.35, "entropy collapse below this fraction of the first window's entropy",
                              range=(0.0, 1.0))
    gold_drop: float = _f(0.25, "gold collapse: probe gold this far below its running peak", range=(1e-6, 1.0))


@dataclass
class IndexSettings:
    """The RLHF uncertainty index's normalisers and trigger."""

    norm_decay: float = _f(0.9, "EMA decay of the z-score normalisers (per window)", range=(0.0, 0.9999))
    norm_warmup: int = _f(3, "windows before a component scores (z = 0 before)", range=(1, 10**6))
    z_clip: float = _f(6.0, "clip of each z-score", range=(0.1, 1e6))
    tau: float = _f(5.0, "trigger threshold of the index", range=(-1e6, 1e6))
    hysteresis: float = _f(2.0, "the trigger turns off below tau - hysteresis", range=(0.0, 1e6))


def _finite(x: float, default: float = 0.0) -> float:
    return float(x) if x is not None and math.isfinite(x) else default


class RLHFMonitor:
    """Observation, uncertainty index, events and divergence of one RLHF episode."""

    def __init__(self, *, budget_steps: int, max_completion_length: int, rule: DivergenceRule | None = None,
                 index: IndexSettings | None = None) -> None:
        self.budget_steps = budget_steps
        self.max_completion_length = max_completion_length
        self.rule = rule or DivergenceRule()
        self.index = index or IndexSettings()
        s = self.index
        self.norms = {n: RunningNormaliser(s.norm_decay, s.norm_warmup, s.z_clip) for n in COMPONENT_NAMES}
        self._delta_norms = {n: RunningNormaliser(s.norm_decay, s.norm_warmup, s.z_clip) for n in ("proxy", "gold")}
        self.trigger = HysteresisTrigger(s.tau, s.hysteresis)
        self.prev: dict[str, float] | None = None
        self.gold0: float | None = None
        self.gold_peak = -math.inf
        self.gold_recent: list[float] = []
        self.entropy0: float | None = None
        self.in_warning = False
        self.latest: dict[str, Any] = {}
        self._obs = np.zeros(len(OBSERVATION_NAMES), dtype=np.float32)

    def start(self, gold: float) -> None:
        """The probe gold score of the policy before any RL step."""
        self.gold0 = float(gold)
        self.gold_peak = float(gold)
        self.gold_recent = [float(gold)]

    def update(self, stats: Any, gold: float, knobs: Any, *, lr: float, step: int) -> dict[str, Any]:
        """Fold in one window; returns the reading (index, trigger, z-scores, new event, divergence)."""
        if self.gold0 is None:
            self.start(gold)
        cur = {"proxy": stats.reward, "gold": float(gold), "kl": stats.kl, "kl_max": stats.kl_max,
               "entropy": stats.entropy, "grad": stats.grad_norm}
        prev = self.prev or {**cur, "gold": self.gold0}
        if self.entropy0 is None and math.isfinite(stats.entropy):
            self.entropy0 = float(stats.entropy)
        d_proxy = _finite(cur["proxy"] - prev["proxy"])
        d_gold = _finite(cur["gold"] - prev["gold"])
        gap = self._delta_norms["proxy"].score_and_absorb(d_proxy) - self._delta_norms["gold"].score_and_absorb(d_gold)
        raw = {
            "reward_volatility": abs(d_proxy),
            "kl_growth": math.log(max(_finite(stats.kl_max), 0.0) + 1e-4),
            "entropy_drop": -_finite(stats.entropy),
            "grad_volatility": abs(math.log(max(_finite(cur["grad"], 1.0), 1e-8))
                                   - math.log(max(_finite(prev["grad"], 1.0), 1e-8))),
            "proxy_gold_gap": gap,
        }
        z = {n: self.norms[n].score_and_absorb(raw[n]) for n in COMPONENT_NAMES}
        index = float(sum(z.values()))
        trigger, fired = self.trigger.update(index)
        self.gold_recent = (self.gold_recent + [cur["gold"]])[-GOLD_READINGS:]
        smooth = sum(self.gold_recent) / len(self.gold_recent)
        self.gold_peak = max(self.gold_peak, smooth)

        r = self.rule
        e0 = self.entropy0 if self.entropy0 is not None else math.nan
        reasons = []
        if not all(math.isfinite(x) for x in (stats.reward, stats.kl_max, stats.entropy)):
            reasons.append("non_finite")
        if _finite(stats.kl_max, math.inf) > r.kl_limit:
            reasons.append("kl")
        if math.isfinite(e0) and _finite(stats.entropy, 0.0) < r.entropy_floor * e0:
            reasons.append("entropy")
        if smooth < self.gold_peak - r.gold_drop:
            reasons.append("gold")
        warning = bool(reasons) or _finite(stats.kl_max, math.inf) > r.kl_limit / 2 or (
            math.isfinite(e0) and _finite(stats.entropy, 0.0) < (r.entropy_floor + (1 - r.entropy_floor) / 2) * e0
        ) or smooth < self.gold_peak - r.gold_drop / 2
        new_event = warning and not self.in_warning
        self.in_warning = warning

        def delta(key: str) -> float:
            return _finite(cur[key] - prev[key])

        ratio = _finite(stats.entropy) / e0 if math.isfinite(e0) and e0 > 0 else 1.0
        feats = {
            "proxy_reward": _finite(stats.reward), "proxy_reward_std": _finite(stats.reward_std),
            "proxy_reward_delta": d_proxy, "gold_probe": cur["gold"], "gold_probe_delta": d_gold,
            "gold_below_peak": self.gold_peak - smooth,
            "kl": _finite(stats.kl, OBS_LIMIT), "kl_max": _finite(stats.kl_max, OBS_LIMIT), "kl_delta": delta("kl"),
            "entropy": _finite(stats.entropy), "entropy_ratio": ratio,
            "clip_ratio": _finite(stats.clip_ratio), "grad_norm": math.log1p(max(_finite(stats.grad_norm), 0.0)),
            "completion_length": _finite(stats.completion_length) / self.max_completion_length,
            "zero_std_groups": _finite(stats.zero_std),
            "lr": math.log10(max(lr, 1e-12)) + 4.0, "beta": math.log10(max(knobs.beta, 1e-12)) + 2.0,
            "entropy_coef": knobs.entropy_coef, "ref_alpha": knobs.ref_alpha, "epsilon": knobs.epsilon,
            "skipped": float(stats.skipped > 0),
            **{f"u_{n}": z[n] for n in COMPONENT_NAMES},
            "uncertainty_index": index, "trigger": float(trigger), "progress": step / self.budget_steps,
        }
        self._obs = np.clip(np.array([feats[n] for n in OBSERVATION_NAMES], dtype=np.float32), -OBS_LIMIT, OBS_LIMIT)
        self.prev = cur
        self.latest = {"index": index, "trigger": trigger, "fired": fired, "z": z, "new_event": bool(new_event),
                       "warning": bool(warning), "diverged": bool(reasons), "reasons": reasons,
                       "gold_peak": self.gold_peak}
        return self.latest

    def observe(self) -> np.ndarray:
        return self._obs.copy()

    def state_dict(self) -> dict[str, Any]:
        return {"norms": {n: v.state_dict() for n, v in self.norms.items()},
                "delta_norms": {n: v.state_dict() for n, v in self._delta_norms.items()},
                "trigger": self.trigger.on, "prev": None if self.prev is None else dict(self.prev),
                "gold0": self.gold0, "gold_peak": self.gold_peak, "gold_recent": list(self.gold_recent),
                "entropy0": self.entropy0,
                "in_warning": self.in_warning, "latest": dict(self.latest), "obs": self._obs.copy()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for n, v in state["norms"].items():
            self.norms[n].load_state_dict(v)
        for n, v in state["delta_norms"].items():
            self._delta_norms[n].load_state_dict(v)
        self.trigger.on = bool(state["trigger"])
        self.prev = None if state["prev"] is None else dict(state["prev"])
        self.gold0, self.gold_peak, self.entropy0 = state["gold0"], state["gold_peak"], state["entropy0"]
        self.gold_recent = list(state["gold_recent"])
        self.in_warning = bool(state["in_warning"])
        self.latest = dict(state["latest"])
        self._obs = np.asarray(state["obs"], dtype=np.float32).copy()
