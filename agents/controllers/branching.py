"""Branch-simulation controllers: the full STSO method and its ablations B and D.

* :class:`BranchController` (``stso``, ablation C = the full method): when the
  monitor's uncertainty-index trigger is on (``info["trigger"]``) and no decision
  was taken in the last ``cooldown_windows`` env steps, run one
  :meth:`~stso_env.branch.BranchOrchestrator.decide`: proxy-score
  ``n_candidates`` actions from the grid, verify the ``top_k`` best in forks for
  ``verify_steps`` training steps, and continue the run as the best verified
  fork (``adopt_fork=True``: the fork *is* the run under that action, so its
  steps are kept instead of being re-run; with ``adopt_fork=False`` the chosen
  action is applied and held for as many env steps as it was verified for).
  Afterwards the controller sends the neutral LR change and no one-shot
  interventions, but keeps the chosen weight decay and clip policy, which are
  persistent settings the verification found better.
* :class:`ProxyOnly` (``proxy_only``, ablation B): the same trigger and proxy
  scoring, but the proxy's best candidate is applied without verification.
* :class:`SingleIndicator` (``single_trigger``, ablation D): the full method,
  triggered by a single indicator, the loss-volatility z-score
  (``u_loss_volatility``) above the index threshold ``tau``, instead of the
  combined index.

Accounting: verification FLOPs of the forks not adopted, and rollback FLOPs
(``BranchDecision.wasted_flops``), are training outside the kept main run: they go to ``extra_flops`` (the
orchestrator has already charged them as wasted in the run's event tracker),
the proxy scoring time of each decision to ``proxy_ms``, snapshot and restore
time to ``io_seconds``. Decisions are written under
``<branch_dir>/<run_name>/<step>/``.

Defaults are scaled to tiny runs of a few hundred to a few thousand steps (the
guide's full-scale values are Delta = 1000 and M = 50 steps): ``top_k=2`` forks of
``verify_steps=10`` steps cost 20 training steps per decision, and
``cooldown_windows=10`` limits decisions to one per 100 steps at the default
decision interval. Verification is paid from the shared FLOPs budget. With
``reserve=r > 0`` a share ``r`` of the budget is set aside for it
(``main_run_share = 1 - r``) and the main run's warm-up + cosine schedule is
sized to the rest; with the default ``reserve=0`` the schedule spans the whole
budget and verification makes the run stop a few steps early, in the cosine
tail where the LR is already low (the default because a reserve shortened the
whole schedule by more than verification used; measured figures are in the
committed suite results, ``assets/results/``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from agents.controllers.base import Controller
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
    """The full STSO method: index trigger -> proxy-scored candidates -> verified top-K -> apply the best.

    The proxy is a learned dynamics ensemble scored pessimistically with its split-conformal
    bounds, and each candidate is verified in real forks before one is applied. References
    (``assets/related_work.md``): 2019_Janner_MBPO (short model rollouts), 2018_Lei_SplitConformal
    and 2005_Vovk_ConformalPrediction (the bounds), 2017_Lakshminarayanan_DeepEnsembles (the
    ensemble); the branching itself is this project's method.

    Args:
        proxy_dir: folder of a trained proxy (``agents.train_proxy`` / ``agents.train_controller``).
        branch_dir: where decision folders go (``<branch_dir>/<run_name>/<step>/``).
        n_candidates, top_k, verify_steps, delta, alpha, beta, gamma, k_std: :class:`BranchConfig` fields.
        cooldown_windows: env steps after a decision before the next may start.
        snapshot_every: env steps between snapshots when ``delta > 0`` (rollback needs them).
        reserve: share of the FLOPs budget planned for verification (the main run's schedule gets the rest).
        adopt_fork: continue the run as the best verified fork instead of re-running its action.
    """

    name = "stso"
    verify = True

    def __init__(self, proxy_dir: str | Path, branch_dir: str | Path = "branches", *, n_candidates: int = 200,
                 top_k: int = 2, verify_steps: int = 10, delta: int = 0, alpha: float = 1.0, beta: float = 0.5,
                 gamma: float = 0.1, k_std: float = 1.0, cooldown_windows: int = 10, snapshot_every: int = 5,
                 reserve: float = 0.0, adopt_fork: bool = True) -> None:
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
        self.config = BranchConfig(delta=delta, n_candidates=n_candidates, top_k=top_k, verify_steps=verify_steps,
                                   verify=self.verify, adopt=bool(adopt_fork) and self.verify,
                                   alpha=alpha, beta=beta, gamma=gamma, k_std=k_std,
                                   out_dir=str(branch_dir))
        # conformal upper bounds saved with the proxy (calibration.json); without them mean + k_std * std
        self.bounds = ConformalBounds.load(self.proxy_dir)
        self.orchestrator = _TimedOrchestrator(self.config, self.proxy, self.bounds)
        self.cooldown_windows = cooldown_windows
        self.snapshot_every = snapshot_every
        self._held: list[int] | None = None
        self._hold_left = 0
        self._persistent = list(NEUTRAL_ACTION)
        self._since = 10**9
        self._windows = 0

    def reset(self, env, *, seed: int, run_name: str) -> None:
        super().reset(env, seed=seed, run_name=run_name)
        self.config.seed = int(seed)
        self._held, self._hold_left = None, 0
        self._persistent = list(NEUTRAL_ACTION)
        self._since = 10**9
        self._windows = 0

    def triggered(self, obs: np.ndarray, info: dict[str, Any]) -> bool:
        """Whether this window starts a branch decision (the combined index's trigger)."""
        return bool(info.get("trigger", False))

    def act(self, obs: np.ndarray, info: dict[str, Any]) -> np.ndarray:
        self._windows += 1
        self._since += 1
        if self.config.delta > 0 and self._windows % self.snapshot_every == 0:
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
            chosen = [int(a) for a in decision.chosen_action]
            # persistent settings (weight decay, clip policy) stay; LR change and one-shots do not
            self._persistent = [NEUTRAL_ACTION[0], chosen[1], chosen[2], 0, 0, 0]
            self.record("branch", chosen, decision.reason + f" [decision took {time.perf_counter() - t0:.2f}s]")
            if decision.adopted:  # the chosen action has already run in the adopted fork
                return np.asarray(self._persistent, dtype=np.int64)
            hold = max(1, int(np.ceil(self.config.verify_steps / self.base.decision_interval))) \
                if self.verify else 1
            self._held, self._hold_left = chosen, hold - 1
            return np.asarray(chosen, dtype=np.int64)
        return np.asarray(self._persistent, dtype=np.int64)

    def describe(self) -> dict[str, Any]:
        from dataclasses import asdict

        return {**super().describe(), "proxy_dir": str(self.proxy_dir), "branch": asdict(self.config),
                "cooldown_windows": self.cooldown_windows, "reserve": self.reserve,
                "trigger": "uncertainty index (combined)",
                "conformal_bounds": self.bounds is not None}


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
