"""A learned policy (``policy.zip`` from ``agents.train_controller``) as a controller.

The file is a Stable-Baselines3 zip. Its algorithm is read from the file's own
metadata (``policy_class`` in its ``data`` entry): a ``MaskablePPO`` policy is
loaded with sb3-contrib and queried with the env's ``action_masks()``, a plain
``PPO`` policy with stable-baselines3. Actions are deterministic (the mode of
the policy's distribution), so an evaluation is repeatable.

Trust: SB3 stores parts of a model's metadata with cloudpickle, so loading a
``policy.zip`` runs code from it, unlike STSO's own checkpoints (``.ptz``),
which never unpickle. The module of the policy class is checked first, but
load only policies you trust, as with any SB3 model.

Bounded LR drift: LR changes compound, and a policy that lowers the LR a little every window
ends with almost none (the failure of an unbounded policy: held-out perplexity 8.4 against 5.5
for the fixed schedule). A change that would take the LR scale outside ``lr_bounds`` (default
0.5-2.0 of the schedule) runs as "LR unchanged".

Shield: with a proxy (``proxy_dir``: the world model the policy was trained in, with its
``calibration.json``), every action that differs from the neutral schedule is checked before it
runs. The proxy scores the policy's action and the neutral action from the current observation
(as plans that hold their settings over the proxy's horizon when it is a plan proxy), each with
its conformal interval of the probe loss ``N`` windows ahead at ``shield_level``. The policy's
action runs only when its predicted divergence probability is no higher and, by ``shield_rule``:

* ``"dominance"`` (default): its upper bound is below the neutral action's *lower* bound, so
  the two intervals do not overlap and the proxy is sure, at its calibrated level, that the
  change helps within the horizon;
* ``"upper"``: its upper bound is below the neutral action's upper bound (pessimistic outcome
  against pessimistic outcome), a weaker test that passes whenever the means differ by more
  than the spreads.

Otherwise the neutral action runs. A policy learned in a model can exploit the model's errors;
the shield falls back to "change nothing" wherever the model is not confident the change helps
(the idea of a safety shield, 2018_Alshiekh_SafeRL, with the conformal bound as the confidence).
Why dominance is the default: a horizon of ``N`` windows favours changes that lower the loss
soon and cost more later (a lower LR anneals early; short-horizon bias, 2018_Wu_ShortHorizonBias),
and under the ``"upper"`` rule enough of them ran to make ``make train``'s policy significantly
worse than the fixed schedule on held-out seeds and on ``calm``; with dominance the shield runs a
change only where the proxy's gain exceeds its own uncertainty.

Outcome gate (``gate``: a ``gate.json`` from ``agents.fit_gate``; off by default): a run-level
decision learned from real end-of-run outcomes (:mod:`agents.controllers.outcome_gate`). The
neutral action runs for the gate's first ``window`` windows; then the gate reads the observation
once and either lets the policy act for the rest of the run (behind the shield, when one is on)
or keeps the neutral action to the end.

Early gate (``early_gate``: a second ``gate.json``, fitted with a smaller ``window``; off by default):
a gate decides once, so its window trades what it can see against how long the policy acts. After one
window, runs of scenarios whose first event comes later are the same run (``calm``, ``spiky`` and
``attn_logit`` of one seed), and a gate there cannot tell them apart; after five it can, but the
policy then loses its first windows (``assets/results/policy_scenarios``). With both, the early gate
opens the policy at its own window where it is confident (``P >= early_gate_confidence``, default
0.8); anywhere else the run waits, and ``gate`` decides at its window as usual. On fresh seeds
(``assets/results/policy_gates``) the pair kept the early gate's gains where the first window shows the
trouble and the later gate's harmlessness elsewhere, which neither gate alone did.

Extrapolation limit (``gate_max_z``: a number of standard deviations; off by default): a gate is a
logistic regression fitted on a few dozen runs or fewer, and it answers any state, most confidently
far from the runs it was fitted on. With the limit, a gate whose state has a feature more than ``gate_max_z``
standard deviations of its fitting runs from their mean does not open (the early gate then leaves
the decision to ``gate``; ``gate`` keeps the neutral action to the end); the distance is recorded
either way (``early_gate_z``, ``gate_z``, and the feature). Why: on fresh seeds the early gate opened
at P 1.0 on three ``calm`` and ``spiky`` runs whose first window lay 14 standard deviations out on
``loss_delta``, and those runs ended 10-17 % worse than ``tuned_fixed``
(``assets/results/policy_skip_guard``, ``assets/results/core_guard``); the opens that paid
(``attn_logit``, ``edge``, ``spiky`` WikiText-2) lay within 5.5, those on ``attn_logit`` within 1.3
(``python -m agents.gate_distance``). Scored with ``gate_max_z: 6`` on fresh seeds in
``assets/results/gate_extrapolation``, it did not help: no gate read a state that far in five cells,
and on ``unstable``, where the gates opened in 4 of 5 runs on states 6.5-50 away, it closed or
delayed them and 2 of 5 runs finished against 4 of 5 without it. Distance does not separate a gate's
right extrapolations from its wrong ones, so the limit is off by default. What removed those losses
was gates refitted on more runs and scenarios (``calm`` and ``unstable`` among them;
``assets/results/gate_wide`` and ``assets/results/gate_wide_fresh``).

Skip-step guard (``skip_step: true``, or a mapping of :class:`agents.controllers.skip_step.SkipStep`'s
settings; off by default): OLMo-core's skip-step rule runs under the policy for the whole run, gate
open or closed, and vetoes the update of a step whose loss or grad norm is an outlier, exactly as the
``skip_step`` controller does (the same class, attached to the same trainer). The gates are fitted
without it. Why: on fresh seeds of the ``core`` suite's cells the tuned-gate policy was ``tuned_fixed``
wherever its gates stayed closed, and there ``skip_step`` beat it on both ``spiky`` cells
(``assets/results/core_tuned_policy_fresh``); the guard acts per optimizer step, below the policy's
per-window actions, so the two compose. Scored with and without it on fresh seeds in
``assets/results/policy_skip_guard``, and against every baseline on all core cells in
``assets/results/core_guard``.

Tuned LR (``tune_lr: true``; off by default): before the run, the LR sweep of ``tuned_fixed``
(:class:`agents.controllers.tuned.TunedFixed`, the same grid, tuning seeds, validation score and
cache in ``tuning_dir``) sets the schedule's LR scale, and the policy, its gates and its LR bounds
act on top of that schedule (``lr_bounds`` relative to the tuned scale; with ``lr_bounds_from:
schedule``, relative to the schedule's own LR, so a policy cannot cut below ``lr_bounds[0]`` of it
however low the sweep started). ``tuned_fixed`` is the best baseline of most cells of the ``core``
suite; this asks whether the policy adds anything to what a sweep finds. The sweep's FLOPs are
reported as ``tuning_flops``, as for ``tuned_fixed``. The observation shows the tuned LR as it is,
so where the sweep moved it, gates fitted against ``fixed`` see LRs their runs did not; gates
fitted against ``tuned_fixed`` (``agents.fit_gate --against tuned_fixed``) were fitted on runs that
start on the tuned LR and ask whether the policy beats the sweep, and need ``tune_lr``. Scored
against ``fixed`` and ``tuned_fixed`` on fresh seeds in ``assets/results/policy_tuned``,
``assets/results/policy_tuned_bounds`` and ``assets/results/policy_tuned_baselines``; behind gates
fitted against ``tuned_fixed`` in ``assets/results/policy_tuned_gates`` and, on the ``core``
suite's cells, ``assets/results/core_tuned_policy`` (its seeds) and
``assets/results/core_tuned_policy_fresh`` (fresh ones).
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from agents.controllers.base import Controller
from stso_env.envs.gpt2_env import LR_CHANGES, NEUTRAL_ACTION
from stso_env.monitor.monitor import OBSERVATION_NAMES

#: How the shield compares the policy's action with the neutral one (see the module docstring).
SHIELD_RULES = ("upper", "dominance")
#: Default bounds of the LR scale a policy may drive the schedule to (bounded LR drift, module docstring).
LR_BOUNDS = (0.5, 2.0)


def policy_algorithm(path: str | Path) -> str:
    """``"maskable_ppo"`` or ``"ppo"``: which algorithm saved the SB3 zip at ``path``."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"policy {p}: no such file; train one with `python -m agents.train_controller`")
    try:
        with zipfile.ZipFile(p) as zf:
            data = json.loads(zf.read("data"))
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError) as exc:
        raise ValueError(f"policy {p}: not a Stable-Baselines3 zip ({exc}); pass the policy.zip a "
                         "training run wrote") from None
    pc = data.get("policy_class")
    module = pc.get("__module__", "") if isinstance(pc, dict) else ""
    if not module.startswith(("sb3_contrib", "stable_baselines3")):
        raise ValueError(f"policy {p}: policy class from module {module!r}; expected a Stable-Baselines3 "
                         "or sb3-contrib actor-critic policy")
    return "maskable_ppo" if ".maskable." in module else "ppo"


def bound_lr_change(action: np.ndarray, lr_scale: float, bounds: tuple[float, float]) -> tuple[np.ndarray, bool]:
    """``action`` with its LR change replaced by "unchanged" when it would take the LR scale (now
    ``lr_scale``) outside ``bounds``; and whether it was (the bounded LR drift of the module docstring)."""
    action = np.asarray(action, dtype=np.int64).reshape(-1)
    after = float(lr_scale) * LR_CHANGES[int(action[0])]
    if bounds[0] - 1e-12 <= after <= bounds[1] + 1e-12:
        return action, False
    action = action.copy()
    action[0] = NEUTRAL_ACTION[0]
    return action, True


def load_policy(path: str | Path) -> Any:
    """Load an SB3 model from ``path`` (MaskablePPO or PPO, see :func:`policy_algorithm`) on CPU."""
    algo = policy_algorithm(path)
    if algo == "maskable_ppo":
        from sb3_contrib import MaskablePPO

        return MaskablePPO.load(str(path), device="cpu")
    from stable_baselines3 import PPO

    return PPO.load(str(path), device="cpu")


class LearnedPolicy(Controller):
    """Acts with a saved policy: ``model.predict(obs, deterministic=True)`` (with masks for MaskablePPO).

    References: 2017_Schulman_PPO, 2020_Huang_InvalidActionMasking (MaskablePPO's masking),
    2021_Raffin_StableBaselines3 (``assets/related_work.md``).
    """

    name = "policy"

    def __init__(self, policy_path: str | Path, proxy_dir: str | Path | None = None, *, shield: bool = True,
                 shield_level: float = 0.9, shield_rule: str = "dominance",
                 lr_bounds: tuple[float, float] | list[float] | None = LR_BOUNDS,
                 gate: str | Path | None = None, early_gate: str | Path | None = None,
                 early_gate_confidence: float = 0.8, tune_lr: bool = False,
                 tuning_dir: str | Path | None = None, lr_bounds_from: str = "tuned",
                 skip_step: bool | dict[str, Any] = False, gate_max_z: float | None = None) -> None:
        super().__init__()
        if gate_max_z is not None and (isinstance(gate_max_z, bool) or not isinstance(gate_max_z, (int, float))
                                       or not gate_max_z > 0 or not np.isfinite(gate_max_z)):
            raise ValueError(f"gate_max_z={gate_max_z!r}: a positive number of standard deviations of the gate's "
                             "fitting runs (e.g. 6), or null for no limit")
        self.gate_max_z = None if gate_max_z is None else float(gate_max_z)
        if not isinstance(skip_step, (bool, dict)):
            raise ValueError(f"skip_step={skip_step!r}: true, false, or a mapping of the skip_step controller's "
                             "settings (rolling_interval_length, sigma_factor, exclude_skipped)")
        from agents.controllers.skip_step import SkipStep

        try:
            self.guard = (SkipStep(**skip_step) if isinstance(skip_step, dict)
                          else SkipStep() if skip_step else None)
        except TypeError as err:
            raise ValueError(f"skip_step={skip_step!r}: {err}; its settings are rolling_interval_length, "
                             "sigma_factor and exclude_skipped") from None
        if not isinstance(tune_lr, bool):
            raise ValueError(f"tune_lr={tune_lr!r}: must be true or false")
        if lr_bounds_from not in ("tuned", "schedule"):
            raise ValueError(f"lr_bounds_from={lr_bounds_from!r}: choose tuned (bounds relative to the LR the run "
                             "starts from) or schedule (relative to the schedule's own LR)")
        self.lr_bounds_from = lr_bounds_from
        from agents.controllers.tuned import TunedFixed

        self.tuner = TunedFixed(tuning_dir=tuning_dir) if tune_lr else None
        self.lr_origin = 1.0  # the LR scale lr_bounds are relative to: 1, or the sweep's choice
        if lr_bounds is not None:
            lo, hi = (float(x) for x in lr_bounds)
            if not 0 < lo <= 1.0 <= hi:
                raise ValueError(f"lr_bounds={lr_bounds!r}: need 0 < low <= 1 <= high, e.g. [0.5, 2.0], or null")
            lr_bounds = (lo, hi)
        self.lr_bounds = lr_bounds
        self.bounded = 0
        self.policy_path = Path(policy_path)
        self.algorithm = policy_algorithm(self.policy_path)
        self.model = load_policy(self.policy_path)
        if not isinstance(shield, bool):
            raise ValueError(f"shield={shield!r}: must be true or false")
        if not 0.0 < float(shield_level) < 1.0:
            raise ValueError(f"shield_level={shield_level!r}: a conformal level in (0, 1), e.g. 0.9")
        self.shield_level = float(shield_level)
        if shield_rule not in SHIELD_RULES:
            raise ValueError(f"shield_rule={shield_rule!r}: choose one of {', '.join(SHIELD_RULES)}")
        self.shield_rule = shield_rule
        self.proxy_dir = None if proxy_dir is None else Path(proxy_dir)
        self.shield = shield and self.proxy_dir is not None
        self.proxy = self.bounds = None
        if self.shield:
            from stso_env.proxy.calibration import ConformalBounds
            from stso_env.proxy.model import ProxyEnsemble

            self.proxy = ProxyEnsemble.load(self.proxy_dir)
            self.bounds = ConformalBounds.load(self.proxy_dir)
        self.proposed = self.shielded = 0
        from agents.controllers.outcome_gate import OutcomeGate

        self.gate_path = None if gate is None else Path(gate)
        self.gate = None if self.gate_path is None else OutcomeGate.load(self.gate_path)
        self.early_gate_path = None if early_gate is None else Path(early_gate)
        self.early_gate = None
        if self.gate_max_z is not None and self.gate is None:
            raise ValueError("gate_max_z: limits a gate's extrapolation; set gate too")
        if self.early_gate_path is not None:
            if self.gate is None:
                raise ValueError(f"early_gate={str(early_gate)!r}: needs a gate to decide where it is not confident; "
                                 "set gate too")
            self.early_gate = OutcomeGate.load(self.early_gate_path)
            if self.early_gate.window >= self.gate.window:
                raise ValueError(f"early_gate={str(early_gate)!r} decides after {self.early_gate.window} windows, the "
                                 f"gate after {self.gate.window}: the early gate needs the smaller window "
                                 "(agents.fit_gate --window)")
        for name, g in (("gate", self.gate), ("early_gate", self.early_gate)):
            # a gate fitted against tuned_fixed read states of runs on the tuned LR: elsewhere it reads another run
            if g is not None and g.reference == "tuned_fixed" and not tune_lr:
                raise ValueError(f"{name}={str(gate if name == 'gate' else early_gate)!r} was fitted against "
                                 "tuned_fixed, on runs that start on its swept LR: set tune_lr: true")
        conf = early_gate_confidence
        if isinstance(conf, bool) or not isinstance(conf, (int, float)) or not 0.5 <= conf < 1.0:
            raise ValueError(f"early_gate_confidence={conf!r}: a probability in [0.5, 1), e.g. 0.8")
        self.early_gate_confidence = float(conf)
        self._window = 0
        self.gate_open: bool | None = None
        self.gate_probability: float | None = None
        self.early_gate_probability: float | None = None
        self.gate_window: int | None = None  # the window at which the policy was let through
        # how far each gate's state lay from its fitting runs (largest |z|, its feature), and the opens refused
        self.early_gate_z: tuple[float, str] | None = None
        self.gate_z: tuple[float, str] | None = None
        self.extrapolation_refusals = 0

    def reset(self, env, *, seed: int, run_name: str) -> None:
        super().reset(env, seed=seed, run_name=run_name)
        self.proposed = self.shielded = self.bounded = 0
        self._window, self.gate_open, self.gate_probability = 0, None, None
        self.early_gate_probability = self.gate_window = None
        self.early_gate_z = self.gate_z = None
        self.extrapolation_refusals = 0
        self.lr_origin = 1.0
        if self.tuner is not None:
            # the sweep runs once per setting (cached in tuning_dir) and sets the schedule's LR scale
            self.tuner.reset(env, seed=seed, run_name=run_name)
            self.tuning_flops = self.tuner.tuning_flops
            if self.lr_bounds_from == "tuned":
                self.lr_origin = float(self.base.trainer.knobs.lr_scale)
            self.record("tuned_lr", NEUTRAL_ACTION, f"LR x{self.base.trainer.knobs.lr_scale:g} from the tuned_fixed "
                                                    "sweep; the policy acts on top of it")
        if self.guard is not None:
            self.guard.reset(env, seed=seed, run_name=run_name)
            self.guard.decisions = self.decisions  # its skips are the policy's decisions too, in step order

    def close(self) -> None:
        if self.guard is not None:
            self.guard.close()
        super().close()

    def _gate_allows(self, obs: np.ndarray) -> bool:
        """False while the gate keeps the neutral action (its first windows, or the whole run once closed)."""
        window = self._window
        self._window += 1
        if self.gate is None:
            return True
        if self.early_gate is not None and window == self.early_gate.window:
            p = self.early_gate_probability = self.early_gate.probability(obs, OBSERVATION_NAMES)
            self.early_gate_z = self.early_gate.extrapolation(obs, OBSERVATION_NAMES)
            confident = p >= self.early_gate_confidence
            refused = confident and self._beyond(self.early_gate_z)
            if confident and not refused:
                self.gate_open, self.gate_probability, self.gate_window = True, p, window
            self.record("gate", NEUTRAL_ACTION, f"early outcome gate after {window} windows: P(the policy beats "
                                                f"{self.early_gate.reference_name}) {p:.2f}, " + (
                                                    "open: the policy acts" if self.gate_open else
                                                    self._refusal(self.early_gate_z) + f"; the gate decides after "
                                                    f"{self.gate.window} windows" if refused else
                                                    f"below {self.early_gate_confidence:.2f}: the gate decides "
                                                    f"after {self.gate.window} windows"))
        if window < self.gate.window:
            return bool(self.gate_open)
        if self.gate_open is None:
            self.gate_probability = self.gate.probability(obs, OBSERVATION_NAMES)
            self.gate_z = self.gate.extrapolation(obs, OBSERVATION_NAMES)
            wins = self.gate_probability > 0.5
            refused = wins and self._beyond(self.gate_z)
            self.gate_open = wins and not refused
            self.gate_window = window if self.gate_open else None
            self.record("gate", NEUTRAL_ACTION, f"outcome gate after {window} windows: P(the policy beats "
                                                f"{self.gate.reference_name}) {self.gate_probability:.2f}, "
                                                + ("open: the policy acts" if self.gate_open
                                                   else self._refusal(self.gate_z) + "; closed to the end" if refused
                                                   else "closed: the fixed schedule to the end"))
        return bool(self.gate_open)

    def _beyond(self, z: tuple[float, str]) -> bool:
        """True (and counted) when a gate's state lies beyond ``gate_max_z`` of its fitting runs."""
        beyond = self.gate_max_z is not None and z[0] > self.gate_max_z
        self.extrapolation_refusals += int(beyond)
        return beyond

    def _refusal(self, z: tuple[float, str]) -> str:
        return (f"not trusted: the state lies {z[0]:.1f} standard deviations from the gate's fitting runs on "
                f"{z[1]}, beyond gate_max_z {self.gate_max_z:g}")

    def _bounds(self, obs: np.ndarray, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Conformal interval (lower, upper) of the probe loss N windows ahead (mean -/+ std without
        calibration) and the divergence probability, per candidate action."""
        from stso_env.proxy.dataset import PLAN_NVEC, as_plan

        acts = as_plan(actions) if tuple(self.proxy.nvec) == tuple(PLAN_NVEC) else actions
        states = np.repeat(np.asarray(obs, dtype=np.float32).reshape(1, -1), len(acts), axis=0)
        p = self.proxy.predict(states, acts)
        mean, std = p["loss_at_n"], p["loss_at_n_std"]
        if self.bounds is not None and self.bounds.has("loss_at_n"):
            lower = self.bounds.lower("loss_at_n", mean, self.shield_level, std=std)
            upper = self.bounds.upper("loss_at_n", mean, self.shield_level, std=std)
        else:
            lower, upper = mean - std, mean + std
        return (np.asarray(lower, dtype=np.float64), np.asarray(upper, dtype=np.float64),
                np.asarray(p["diverged_prob"], dtype=np.float64))

    def act(self, obs: np.ndarray, info: dict[str, Any]) -> np.ndarray:
        if self.guard is not None:
            self.guard.act(obs, info)  # follows the trainer and its lineage; its own action is always neutral
        if not self._gate_allows(obs):
            return np.asarray(NEUTRAL_ACTION, dtype=np.int64)
        if self.algorithm == "maskable_ppo":
            action, _ = self.model.predict(obs, deterministic=True, action_masks=self.base.action_masks())
        else:
            action, _ = self.model.predict(obs, deterministic=True)
        action = np.asarray(action, dtype=np.int64).reshape(-1)
        if self.lr_bounds is not None:
            # the trainer's own knob: the reset's info predates the LR a tuned start sets
            scale = float(self.base.trainer.knobs.lr_scale)
            action, bounded = bound_lr_change(action, scale / self.lr_origin, self.lr_bounds)
            self.bounded += int(bounded)
        if action.tolist() == list(NEUTRAL_ACTION):
            return action
        self.proposed += 1
        if self.shield:
            lower, upper, p_div = self._bounds(obs, np.stack([action, np.asarray(NEUTRAL_ACTION, dtype=np.int64)]))
            # "upper": the policy's pessimistic outcome beats the neutral action's pessimistic outcome;
            # "dominance": it beats the neutral action's optimistic outcome (the intervals do not overlap)
            end, rival = ("upper", upper[1]) if self.shield_rule == "upper" else ("lower", lower[1])
            if not (upper[0] < rival and p_div[0] <= p_div[1]):
                self.shielded += 1
                return np.asarray(NEUTRAL_ACTION, dtype=np.int64)
            self.record("policy", action, f"policy action passed the shield: probe-loss upper bound {upper[0]:.4f} "
                                          f"< {rival:.4f}, the {end} bound of the neutral action")
            return action
        self.record("policy", action, "policy action differs from the neutral schedule")
        return action

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "policy_path": str(self.policy_path), "algorithm": self.algorithm,
                "shield": self.shield, "shield_level": self.shield_level, "shield_rule": self.shield_rule,
                "proxy_dir": None if self.proxy_dir is None else str(self.proxy_dir),
                "proposed_changes": self.proposed, "shielded_changes": self.shielded,
                "lr_bounds": None if self.lr_bounds is None else list(self.lr_bounds),
                "lr_changes_bounded": self.bounded,
                "gate": None if self.gate_path is None else str(self.gate_path), "gate_open": self.gate_open,
                "gate_reference": None if self.gate is None else self.gate.reference,
                "gate_probability": self.gate_probability, "gate_window": self.gate_window,
                "early_gate": None if self.early_gate_path is None else str(self.early_gate_path),
                "early_gate_confidence": self.early_gate_confidence,
                "early_gate_probability": self.early_gate_probability, "gate_max_z": self.gate_max_z,
                "early_gate_z": None if self.early_gate_z is None else self.early_gate_z[0],
                "early_gate_z_feature": None if self.early_gate_z is None else self.early_gate_z[1],
                "gate_z": None if self.gate_z is None else self.gate_z[0],
                "gate_z_feature": None if self.gate_z is None else self.gate_z[1],
                "extrapolation_refusals": self.extrapolation_refusals, "tune_lr": self.tuner is not None,
                "lr_origin": self.lr_origin, "lr_bounds_from": self.lr_bounds_from,
                "tuned_lr_scale": self.tuner.tuning.get("lr_scale") if self.tuner is not None else None,
                "tuning_flops": self.tuning_flops, "skip_step": self.guard is not None,
                "skipped_steps": self.guard.skipped_steps if self.guard is not None else [],
                "skip_step_settings": None if self.guard is None else {
                    "rolling_interval_length": self.guard.rolling_interval_length,
                    "sigma_factor": self.guard.sigma_factor, "exclude_skipped": self.guard.exclude_skipped}}
