"""Branch-simulation controllers: the full STSO method and its ablations B and D.

* :class:`BranchController` (``stso``, ablation C = the full method): a snapshot every
  ``snapshot_every`` windows; when the monitor's uncertainty-index trigger was on at any step
  of the window (``info["trigger_in_window"]``) and no decision was taken in the last
  ``cooldown_windows`` env steps, run one :meth:`~stso_env.branch.BranchOrchestrator.decide`:
  roll back to the last snapshot before the index started to rise, proxy-score
  ``n_candidates`` plans, verify the ``top_k`` best and the neutral plan in forks over the
  proxy's horizon, reject those whose real outcome leaves their conformal band, and continue
  the run as the best accepted fork (``adopt_fork=True``: the fork *is* the run under that
  plan, so its steps are kept instead of being re-run; with ``adopt_fork=False`` the plan is
  applied: its first action now, its continuation for the rest of the horizon). Afterwards the
  controller sends the neutral LR change and no one-shot interventions, but keeps the plan's
  weight decay and clip policy, persistent settings the verification found better.
* :class:`ProxyOnly` (``proxy_only``, ablation B): the same trigger, rollback and proxy
  scoring, but the proxy's best plan is applied without verification.
* :class:`SingleIndicator` (``single_trigger``, ablation D): the full method, triggered by a
  single indicator, the loss-volatility z-score (``u_loss_volatility``, at the window's last
  step) above the index threshold ``tau``, instead of the combined index.

Accounting: verification FLOPs of the forks not adopted, and rollback FLOPs
(``BranchDecision.wasted_flops``), are training outside the kept main run: they go to
``extra_flops`` (the orchestrator has already charged them as wasted in the run's event
tracker), the proxy scoring time of each decision to ``proxy_ms``, snapshot and restore time
to ``io_seconds``. Decisions are written under ``<branch_dir>/<run_name>/<step>/``.

Defaults are scaled to tiny runs of a few hundred to a few thousand steps (the guide's
full-scale values are Delta = 1000 and M = 50 steps): rollback of at most
``max_rollback_steps=50``, ``top_k=3`` forks plus the control arm over the proxy's horizon
(5 windows = 50 steps at the default decision interval), and ``cooldown_windows=10``, at most
one decision per 100 steps. Verification is paid from the shared FLOPs budget, and at this
scale it is dear: each decision trains ``top_k`` forks of 50 steps that are not kept, a quarter
of a 600-step run. With ``reserve=r > 0`` a share ``r`` of the budget is set aside for it
(``main_run_share = 1 - r``) and the main run's warm-up + cosine schedule is sized to the rest.
With the default ``reserve=0`` the schedule spans the whole budget and verification makes the
run stop early, wherever the budget runs out: two decisions stopped the core suite's 600-step
``spiky`` runs between steps 280 and 450, with the LR still at 26 to 66 % of its peak.
``replan_schedule=True`` ends the schedule where the budget now ends after each decision
(:meth:`~stso_env.train.trainer.Trainer.replan_schedule`), so the run still anneals fully; on
the ``verification_cost`` suite that did not make ``stso`` better (README, "What verification
costs"): the steps lost, not the unfinished schedule, are what cost it.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from agents.controllers.base import Controller, window_trigger
from stso_env.branch import BranchConfig, BranchOrchestrator
from stso_env.envs.gpt2_env import NEUTRAL_ACTION
from stso_env.monitor.monitor import OBSERVATION_NAMES
from stso_env.proxy.calibration import ConformalBounds
from stso_env.proxy.model import ProxyEnsemble

LOSS_VOLATILITY = OBSERVATION_NAMES.index("u_loss_volatility")


class _TimedOrchestrator(BranchOrchestrator):
    """Records the wall time of each proxy candidate search (the proxy's share of a decision)."""

    last_ms = 0.0

    def candidates(self, state, mask, rng):  # type: ignore[override]
        t0 = time.perf_counter()
        out = super().candidates(state, mask, rng)
        self.last_ms = (time.perf_counter() - t0) * 1e3
        return out


class BranchController(Controller):
    """The full STSO method: index trigger -> rollback -> proxy-scored plans -> verified top-K -> keep the best.

    The proxy is a learned dynamics ensemble scored pessimistically with its locally adaptive
    conformal bounds, and the best plans are verified in real forks before one is kept. References
    (``assets/related_work.md``): 2019_Janner_MBPO (short model rollouts), 2018_Lei_SplitConformal
    and 2005_Vovk_ConformalPrediction (the bounds), 2021_Gibbs_ACI (the band that follows the
    rejection rate), 2017_Lakshminarayanan_DeepEnsembles (the ensemble), 2023_Leviathan_SpeculativeDecoding
    (draft cheaply, verify for real, reject what the check refutes); the branching itself is this
    project's method.

    Args:
        proxy_dir: folder of a trained proxy (``agents.train_proxy`` / ``agents.train_controller``).
        branch_dir: where decision folders go (``<branch_dir>/<run_name>/<step>/``).
        n_candidates, top_k, rollback, max_rollback_steps, alpha, beta, gamma, k_std, control_arm,
            band_check: :class:`BranchConfig` fields.
        cooldown_windows: env steps after a decision before the next may start.
        snapshot_every: env steps between snapshots (rollback needs them).
        reserve: share of the FLOPs budget planned for verification (the main run's schedule gets the rest).
        adopt_fork: continue the run as the best verified fork instead of re-running its plan.
        replan_schedule: after each decision, end the LR schedule where the budget now ends (the
            training paid outside the kept run shortens it), so the run anneals fully instead of
            stopping mid-schedule.
        use_ray: verify the plans in parallel as Ray tasks (a local two-CPU Ray, or ``ray_address``).
        ray_address: a running Ray cluster (``host:port`` of its head) to verify on; implies ``use_ray``
            (``agents.evaluate --ray-address`` passes it).
    """

    name = "stso"
    verify = True

    def __init__(self, proxy_dir: str | Path, branch_dir: str | Path = "branches", *, n_candidates: int = 200,
                 top_k: int = 3, rollback: bool = True, max_rollback_steps: int = 50, alpha: float = 1.0,
                 beta: float = 0.5, gamma: float = 0.1, k_std: float = 1.0, control_arm: bool = True,
                 band_check: bool = True, cooldown_windows: int = 10, snapshot_every: int = 1,
                 reserve: float = 0.0, adopt_fork: bool = True, replan_schedule: bool = False,
                 use_ray: bool = False, ray_address: str | None = None) -> None:
        super().__init__()
        if cooldown_windows < 0 or snapshot_every < 1:
            raise ValueError(f"cooldown_windows={cooldown_windows} must be >= 0 and snapshot_every={snapshot_every} "
                             ">= 1")
        if not 0.0 <= reserve < 1.0:
            raise ValueError(f"reserve={reserve}: the share of the budget kept for verification must be in [0, 1)")
        # without verification nothing is spent outside the main run, so nothing is reserved
        self.reserve = float(reserve) if self.verify else 0.0
        self.main_run_share = 1.0 - self.reserve
        self.proxy_dir = Path(proxy_dir)
        self.proxy = ProxyEnsemble.load(self.proxy_dir)
        self.config = BranchConfig(rollback=rollback, max_rollback_steps=max_rollback_steps,
                                   n_candidates=n_candidates, top_k=top_k, verify=self.verify,
                                   adopt=bool(adopt_fork) and self.verify, control_arm=control_arm and self.verify,
                                   band_check=band_check, alpha=alpha, beta=beta, gamma=gamma, k_std=k_std,
                                   use_ray=(use_ray or ray_address is not None) and self.verify,
                                   ray_address=ray_address if self.verify else None, out_dir=str(branch_dir))
        # conformal bounds saved with the proxy (calibration.json); without them mean + k_std * std
        self.bounds = ConformalBounds.load(self.proxy_dir)
        self.orchestrator = _TimedOrchestrator(self.config, self.proxy, self.bounds)
        self.cooldown_windows = cooldown_windows
        self.snapshot_every = snapshot_every
        self.replan_schedule = bool(replan_schedule) and self.verify
        self.replans: list[dict[str, int]] = []
        self._held: list[int] | None = None
        self._hold_left = 0
        self._persistent = list(NEUTRAL_ACTION)
        self._since = 10**9
        self._windows = 0

    def reset(self, env, *, seed: int, run_name: str) -> None:
        super().reset(env, seed=seed, run_name=run_name)
        self.config.seed = int(seed)
        self.orchestrator.reset_calibration_check()
        self._held, self._hold_left = None, 0
        self._persistent = list(NEUTRAL_ACTION)
        self._since = 10**9
        self._windows = 0
        self.replans = []
        if self.config.rollback:
            # keep enough snapshots to reach max_rollback_steps back (the store is made at the first snapshot)
            windows = -(-self.config.max_rollback_steps // (self.base.decision_interval * self.snapshot_every))
            self.base.snapshot_keep = max(self.base.snapshot_keep, windows + 2)

    def triggered(self, obs: np.ndarray, info: dict[str, Any]) -> bool:
        """Whether this window starts a branch decision (the combined index's trigger at any step of it)."""
        return window_trigger(info, obs)

    def act(self, obs: np.ndarray, info: dict[str, Any]) -> np.ndarray:
        self._windows += 1
        self._since += 1
        if self.config.rollback and self._windows % self.snapshot_every == 0:
            with self.timed_io():
                self.base.snapshot()
        if self._hold_left > 0:
            self._hold_left -= 1
            return np.asarray(self._held, dtype=np.int64)
        if self.triggered(obs, info) and self._since > self.cooldown_windows:
            t0 = time.perf_counter()
            decision = self.orchestrator.decide(self.env, self.run_name)
            self.branch_invocations += 1
            self.proxy_ms.append(self.orchestrator.last_ms)
            self.extra_flops += float(decision.wasted_flops)
            # restore time is checkpoint I/O; the rest of the decision is compute
            self.io_seconds += float(decision.extra.get("restore_seconds", 0.0))
            self._since = 0
            plan = [int(a) for a in decision.chosen_plan]
            first, cont = plan[:len(NEUTRAL_ACTION)], plan[len(NEUTRAL_ACTION):]
            # after the plan: its weight decay and clip policy stay (persistent settings the verification
            # found better); the LR change and one-shots do not
            self._persistent = [NEUTRAL_ACTION[0], cont[1], cont[2], 0, 0, 0]
            self.record("branch", plan, decision.reason + f" [decision took {time.perf_counter() - t0:.2f}s]")
            if self.replan_schedule:
                self._replan()
            if decision.adopted:  # the whole plan has already run in the adopted fork
                return np.asarray(self._persistent, dtype=np.int64)
            if self.verify:  # run the plan: its first window now, its continuation for the rest
                self._held, self._hold_left = cont, decision.horizon - 1
            return np.asarray(first, dtype=np.int64)
        return np.asarray(self._persistent, dtype=np.int64)

    def _replan(self) -> None:
        # The budget pays for every step trained outside the kept run (forks not adopted, rolled-back
        # steps), so the run has that many fewer steps left: end the LR schedule where the budget ends,
        # instead of stopping mid-schedule with the LR still high.
        tr = self.base.trainer
        budget_steps = round(self.base.episode_steps / self.main_run_share)
        end = budget_steps - math.ceil(self.extra_flops / tr.step_flops)
        end = max(end, tr.global_step + 1)
        if end < tr.schedule_end:
            self.replans.append({"global_step": int(tr.global_step), "from_end": int(tr.schedule_end),
                                 "to_end": int(end)})
            tr.replan_schedule(end)

    def describe(self) -> dict[str, Any]:
        from dataclasses import asdict

        orch = self.orchestrator
        return {**super().describe(), "proxy_dir": str(self.proxy_dir), "branch": asdict(self.config),
                "horizon_env_steps": orch.horizon, "plans": orch.plans,
                "cooldown_windows": self.cooldown_windows, "snapshot_every": self.snapshot_every,
                "reserve": self.reserve, "replan_schedule": self.replan_schedule, "replans": self.replans,
                "trigger": "uncertainty index (combined)",
                "conformal_bounds": self.bounds is not None,
                "calibration_check": {"checked": orch.checked, "rejected": orch.rejected,
                                      "rejection_rate": orch.rejection_rate, "band_scale": orch.band_scale}}


class ProxyOnly(BranchController):
    """Ablation B: the proxy's best candidate is applied without verification (no forks)."""

    name = "proxy_only"
    verify = False


class SingleIndicator(BranchController):
    """Ablation D: the full method, triggered by the loss-volatility z-score alone (> ``tau``)."""

    name = "single_trigger"

    def reset(self, env, *, seed: int, run_name: str) -> None:
        super().reset(env, seed=seed, run_name=run_name)
        self.tau = float(self.base.uncertainty_config.tau)

    def triggered(self, obs: np.ndarray, info: dict[str, Any]) -> bool:
        return bool(float(obs[LOSS_VOLATILITY]) > self.tau)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "trigger": "u_loss_volatility > tau"}
