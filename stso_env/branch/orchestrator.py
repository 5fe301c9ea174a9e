"""Branch orchestrator: at a trigger, roll back, simulate many plans cheaply, verify a few for real, keep one.

One :meth:`BranchOrchestrator.decide` call does, on a reset ``STSO-GPT2-v0`` env:

1. **Rollback** (``rollback=True``, the default): restore the last snapshot taken
   before the uncertainty index started to rise. The rise is read from the env's
   per-window history of the index's maximum in each window: from the trigger window, walk back over any falling
   part to the excursion's peak, then down its rising flank to the local minimum
   before it; the target is the newest snapshot at or before that window's end.
   A rollback never goes further back than ``max_rollback_steps`` training steps
   (then the oldest snapshot inside that limit is used). The training FLOPs that
   are undone are charged to the run as wasted (reason ``"rollback"``). Without
   snapshots, or with ``rollback=False``, the branch starts from the current state.
   The caller takes the snapshots (:class:`~agents.controllers.branching.BranchController`
   takes one every window).
2. **Plans**: a plan is an intervention for each of the next ``N`` windows, ``N`` the
   proxy's horizon: the first window's action (any valid grid action, one-shots
   such as a momentum reset or skipping the window's first batch included, when
   ``action_masks()`` allows them) followed by a *continuation* held for the other
   ``N - 1`` windows (an LR change, weight decay and clip policy; no one-shots). A
   plan is the 12-entry vector ``first + continuation``
   (:data:`~stso_env.proxy.dataset.PLAN_NVEC`). A proxy trained with plans scores
   them directly; a proxy trained on single actions scores the first action and the
   plans are restricted to holding its settings
   (:func:`~stso_env.proxy.dataset.hold_continuation`).
3. **Sampling**: when the valid plans (up to 384 x 48) exceed ``n_candidates``
   (default 200, within the guide's 50-500), a UCB1 bandit over the plan's twelve
   dimensions picks ``n_candidates`` distinct plans: each choice of each dimension
   is an arm whose value is the mean proxy score of the plans that used it, so the
   search concentrates on choices that score well without enumerating the space.
   The neutral plan is always scored. ``decision.json`` names the sampler
   (``candidate_search``). Optuna's TPE would serve as well; the bandit needs only
   numpy and is deterministic for a seed.
4. **Score** on the proxy over its horizon ``N`` (the verification horizon is always
   the proxy's own): ``score = alpha * -loss@N - beta * risk - gamma * recovery``,
   each term taken on its bound: ``loss@N`` and the ``instability_risk`` part of
   the risk are their conformal upper bounds at ``conformal_level``
   (:class:`~stso_env.proxy.calibration.ConformalBounds`, ``calibration.json`` with
   the proxy). The bounds are locally adaptive, ``mean + q * (std + floor)`` with
   each candidate's own ensemble spread ``std`` (residual-normalised conformity
   score), so of two plans with the same mean the one the ensemble agrees on scores
   better; bounds saved before that score are ``mean + q`` and never change a
   ranking. A MAPIE regressor bounds the loss only; without any calibrator the bound
   is the ensemble mean ``+ k_std * std``. Risk is ``instability_risk +
   diverged_prob`` (the probability as mean ``+ k_std * std``, clipped to 1),
   recovery is ``recovery_time`` mean ``+ k_std * std``. ``alpha``, ``beta`` and
   ``gamma`` are config fields.
5. **Verification**: the ``top_k`` best plans, and the neutral plan as a control arm
   (``control_arm=True``), each run in a fork (``env.unwrapped.fork()``) for the
   ``N`` windows of the plan. The real outcome is the probe loss after, the model
   instability events that started, the windows spent recovering, and divergence;
   the real score uses the same weights on these numbers (a divergence is the worst
   score). Every training FLOP of the forks is charged as wasted (reason
   ``"verification"``) except the adopted fork's. With ``verify=False`` (the
   proxy-only ablation) nothing is verified and the proxy's best plan is returned.
6. **Accept/reject**, as in speculative decoding: a verified plan whose real probe
   loss falls outside its conformal band ``[mean - s * (upper - mean), mean + s *
   (upper - mean)]`` is rejected: the proxy was wrong about it, so its score is not
   trusted. The running rejection rate is the live calibration check; the band scale
   ``s`` (1 at the start of a run) follows it, adaptive conformal inference style
   (2021_Gibbs_ACI): after each check ``s *= exp(band_eta * (rejected
   - (1 - conformal_level)))``, so a rate above the nominal ``1 - level`` widens the
   band until the rate comes back. The control arm is always eligible: choosing it
   means changing nothing.
7. **Collapse**: the eligible verified plan with the best real score is chosen (ties
   to the better proxy rank; the control arm ranks last on ties). With ``adopt=True``
   the run continues as the chosen fork (the fork *is* the run continued under that
   plan, bit for bit), so its steps are kept as the run's own training and only the
   other forks' FLOPs are waste. A fork that ended its episode or diverged is never
   adopted.

Files, all written atomically (temp file + ``os.replace``) under
``<out_dir>/<run>/<step>/`` where ``step`` is the global step at the trigger:
``decision.json`` (trigger, index history read, rollback target and why, sampler,
every candidate's score and bounds, verified outcomes with their bands and
accept/reject, the rejection rate and band scale, the choice and why),
``candidate_<id>.json`` per verified plan, ``verification_<id>.log`` (one line per
fork env step) and ``seed_manifest.json``. Candidate ids are ranks in the proxy score
table (0 = best by the proxy); the control arm's id is its rank there.

Ray: with ``use_ray=True`` and ``ray`` importable (the ``distributed`` extra), the
verification rollouts run as Ray tasks that rebuild each fork from the env's state
(``_env_state`` / ``_load_env_state``); otherwise they run one after the other in
this process. The executor that ran is recorded in ``decision.json``. The tasks run on
the cluster at ``ray_address`` (``ray start --head`` on one machine, ``ray start
--address`` on the others), else on a local two-CPU Ray started on first use; a
process already connected to Ray (a Ray worker, say) keeps its connection. Each task
takes one CPU and this process's torch thread count, so the outcomes equal the
in-process forks' exactly (:func:`stso_env.eval.engine.ray_init` / ``ray_task``).
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stso_env.envs.gpt2_env import ACTION_FIELDS, ACTION_NVEC, NEUTRAL_ACTION, GPT2Env
from stso_env.errors import ConfigError
from stso_env.files import write_text_atomic
from stso_env.proxy.calibration import ConformalBounds
from stso_env.proxy.dataset import ONE_SHOT_DIMS, PLAN_NVEC, as_plan
from stso_env.proxy.model import ProxyEnsemble
from stso_env.train.distributed import current_world, gather_objects

#: Exploration weight of the UCB1 bandit over plan dimensions (scores are standardised first).
UCB_C = 1.0
#: The neutral plan: the neutral action now and for the rest of the horizon.
NEUTRAL_PLAN: tuple[int, ...] = tuple(NEUTRAL_ACTION) + tuple(NEUTRAL_ACTION)
D = len(ACTION_NVEC)


@dataclass
class BranchConfig:
    """Settings of one branch decision (see the module docstring for the procedure)."""

    rollback: bool = True  # restore the last snapshot before the index started to rise
    max_rollback_steps: int = 50  # never roll back more training steps than this
    n_candidates: int = 200  # proxy-scored plans (all valid ones when fewer)
    top_k: int = 3  # plans verified by real rollouts in forks (plus the control arm)
    control_arm: bool = True  # also verify the neutral plan, always eligible
    verify: bool = True  # False: apply the proxy's best plan without real rollouts (ablation)
    adopt: bool = True  # the run continues as the best verified fork (its steps are not re-run)
    horizon: int | None = None  # proxy horizon N in env steps; None: the proxy's own (must match it)
    alpha: float = 1.0  # weight of -E[loss@N]
    beta: float = 0.5  # weight of -risk
    gamma: float = 0.1  # weight of -recovery time
    k_std: float = 1.0  # pessimism without a calibrator: mean + k_std * ensemble std
    conformal_level: float = 0.9  # level of the conformal bounds
    band_check: bool = True  # reject verified plans whose real outcome leaves their conformal band
    band_eta: float = 0.5  # adaptation rate of the band scale (0: fixed bands)
    use_ray: bool = False  # verify in parallel through Ray when it is importable
    ray_address: str | None = None  # the Ray cluster to verify on (host:port of its head); None: a local Ray
    seed: int = 0  # bandit tie-breaking
    out_dir: str = "branches"

    def __post_init__(self) -> None:
        def _int(name: str, lo: int, hi: int | None = None) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
                rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
                raise ConfigError(f"branch config {name}: must be an integer {rng}, got {v!r}")

        _int("max_rollback_steps", 0)
        _int("n_candidates", 1, int(np.prod(PLAN_NVEC)))
        _int("top_k", 1)
        _int("seed", 0)
        if self.horizon is not None:
            _int("horizon", 1)
        if self.top_k > self.n_candidates:
            raise ConfigError(f"branch config top_k: {self.top_k} is more than n_candidates={self.n_candidates}; "
                              "lower top_k or raise n_candidates")
        for name in ("alpha", "beta", "gamma", "k_std", "band_eta"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ConfigError(f"branch config {name}: must be a finite number >= 0, got {v!r}")
        if self.alpha == self.beta == self.gamma == 0:
            raise ConfigError("branch config alpha, beta, gamma: all zero makes every candidate equal; "
                              "give at least one a positive weight")
        lv = self.conformal_level
        if isinstance(lv, bool) or not isinstance(lv, (int, float)) or not 0 < lv < 1:
            raise ConfigError(f"branch config conformal_level: must be in (0, 1), e.g. 0.9, got {lv!r}")
        for name in ("rollback", "control_arm", "verify", "adopt", "band_check", "use_ray"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"branch config {name}: must be true or false, got {getattr(self, name)!r}")
        if not isinstance(self.out_dir, (str, os.PathLike)) or not str(self.out_dir):
            raise ConfigError(f"branch config out_dir: must be a non-empty path, got {self.out_dir!r}")
        if self.ray_address is not None:
            if not isinstance(self.ray_address, str) or not self.ray_address.strip():
                raise ConfigError(f"branch config ray_address: must be a cluster address such as "
                                  f"'10.0.0.1:6379' (or null for a local Ray), got {self.ray_address!r}")
            if not self.use_ray:
                raise ConfigError(f"branch config ray_address: {self.ray_address!r} is set but use_ray is false; "
                                  "set use_ray: true to verify on that cluster, or drop ray_address")


@dataclass
class BranchDecision:
    """What :meth:`BranchOrchestrator.decide` chose and why."""

    step: int  # global training step at the trigger
    chosen_action: list[int]  # the plan's first window
    chosen_plan: list[int]  # first window + continuation (12 entries)
    candidates: list[dict[str, Any]]  # proxy score table, best first
    verification: list[dict[str, Any]]  # one per verified plan, in proxy-rank order (control arm last)
    reason: str
    path: Path  # decision.json
    wasted_flops: float  # verification + rollback FLOPs charged to the run
    horizon: int = 1  # env steps of a plan (the proxy's horizon)
    restored_from: int | None = None  # snapshot id the branch started from, None: the current state
    executor: str = "sequential"
    extra: dict[str, Any] = field(default_factory=dict)
    adopted: bool = False  # the env now is the chosen fork, after its whole plan
    adopted_flops: float = 0.0  # verification FLOPs that became the run's own training


# ---------------------------------------------------------------------- helpers


def valid_actions(mask: np.ndarray, nvec: tuple[int, ...] = ACTION_NVEC) -> np.ndarray:
    """All MultiDiscrete combinations allowed by a flat ``action_masks()`` vector, ``(n, len(nvec))`` int64."""
    m = np.asarray(mask, dtype=bool)
    if m.shape != (sum(nvec),):
        raise ConfigError(f"action mask: expected {sum(nvec)} booleans, got shape {m.shape}")
    offsets = np.cumsum((0,) + tuple(nvec))
    allowed = [np.flatnonzero(m[offsets[i]:offsets[i + 1]]) for i in range(len(nvec))]
    if any(len(a) == 0 for a in allowed):
        raise ConfigError("action mask: some action dimension has no allowed choice; fix action_masks()")
    grid = np.stack(np.meshgrid(*allowed, indexing="ij"), axis=-1).reshape(-1, len(nvec))
    return grid.astype(np.int64)


def valid_plans(mask: np.ndarray, plans: bool = True) -> np.ndarray:
    """All plans ``(n, 12)``: every valid first action times every continuation (the valid settings of
    LR change, weight decay and clip policy, no one-shots); with ``plans=False`` only the plans that hold
    the first action's settings (one per valid action)."""
    first = valid_actions(mask)
    if not plans:
        return as_plan(first)
    settings = np.unique(np.delete(first, list(ONE_SHOT_DIMS), axis=1), axis=0)
    cont = np.zeros((len(settings), D), dtype=np.int64)
    keep = [d for d in range(D) if d not in ONE_SHOT_DIMS]
    cont[:, keep] = settings
    i, j = np.meshgrid(np.arange(len(first)), np.arange(len(cont)), indexing="ij")
    return np.concatenate([first[i.ravel()], cont[j.ravel()]], axis=1)


def rise_start(index: list[float]) -> int:
    """Position of the window after which the index's current excursion started to rise: from the last
    window walk back over a falling part to the peak, then down the rising flank to the local minimum."""
    j = len(index) - 1
    while j > 0 and index[j - 1] >= index[j]:
        j -= 1
    while j > 0 and index[j - 1] < index[j]:
        j -= 1
    return j


def _finite_or_none(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _atomic_write(path: Path, text: str) -> None:
    # a crash mid-write must never leave a half-written decision that looks complete
    write_text_atomic(path, text)


def _write_json(path: Path, obj: Any) -> None:
    _atomic_write(path, json.dumps(obj, indent=1, allow_nan=False) + "\n")


def real_score(outcome: dict[str, Any], config: BranchConfig) -> float:
    """Score of a verified rollout on the proxy's scale; ``-inf`` for a divergence (the worst outcome)."""
    if outcome["diverged"] or not math.isfinite(outcome["probe_loss"]):
        return -math.inf
    return (config.alpha * -outcome["probe_loss"] + config.beta * -outcome["instability_events"]
            + config.gamma * -outcome["recovery_env_steps"])


def rollout_fork(fork: GPT2Env, plan: list[int], env_steps: int, keep_state: bool = False) -> dict[str, Any]:
    """Step ``fork`` through ``plan`` for ``env_steps`` windows: its first action, then its continuation
    (a 6-entry action is held throughout). Returns the measured outcome and the log lines (and, with
    ``keep_state``, the fork's whole env state afterwards under ``"state"``)."""
    plan = [int(x) for x in plan]
    first, cont = (plan[:D], plan[D:]) if len(plan) == 2 * D else (plan, plan)
    lines: list[str] = []
    flops = 0.0
    events = recovering = 0
    diverged = False
    probe = float(fork._probe)
    for k in range(env_steps):
        action = first if k == 0 else cont
        _, reward, terminated, truncated, info = fork.step(np.asarray(action, dtype=np.int64))
        flops += float(info["flops"])
        events += int(info["instability_events"])
        recovering += int(info["wasted_flops"] > 0)
        diverged = diverged or bool(info["diverged"])
        probe = float(info["probe_loss"])
        lines.append(json.dumps({"global_step": int(info["global_step"]), "action": action,
                                 "train_loss": _finite_or_none(float(info["train_loss"])),
                                 "probe_loss": _finite_or_none(probe), "reward": _finite_or_none(float(reward))},
                                allow_nan=False))
        if terminated or truncated:
            break
    out = {"probe_loss": probe, "instability_events": events, "recovery_env_steps": recovering,
           "diverged": diverged, "flops": flops, "env_steps": len(lines),
           "global_step": int(fork.trainer.global_step), "log": lines}
    if keep_state:
        out["state"] = copy.deepcopy(fork._env_state())
        out["done"] = bool(fork._done)
    return out


def _verify_remote(env_kwargs: dict[str, Any], state: dict[str, Any], plan: list[int],
                   env_steps: int, keep_state: bool = False) -> dict[str, Any]:
    # Ray task body: rebuild the fork from its state in the worker, exactly as GPT2Env.fork() does
    fork = GPT2Env.from_state(env_kwargs, state)
    try:
        return rollout_fork(fork, plan, env_steps, keep_state)
    finally:
        fork.close()


# ---------------------------------------------------------------------- orchestrator


class BranchOrchestrator:
    """Trigger -> rollback -> proxy-scored plans -> verified top-K (+ control) in forks -> best accepted plan."""

    def __init__(self, config: BranchConfig, proxy: ProxyEnsemble, calibrator: Any = None) -> None:
        if not isinstance(config, BranchConfig):
            raise ConfigError(f"config: expected a BranchConfig, got {type(config).__name__}")
        if not isinstance(proxy, ProxyEnsemble):
            raise ConfigError(f"proxy: expected a ProxyEnsemble, got {type(proxy).__name__}; load one with "
                              "ProxyEnsemble.load(folder)")
        if tuple(proxy.nvec) not in (tuple(ACTION_NVEC), tuple(PLAN_NVEC)):
            raise ConfigError(f"proxy: trained for actions {list(proxy.nvec)}, the env has {list(ACTION_NVEC)} "
                              f"(plans: {list(PLAN_NVEC)}); retrain the proxy on STSO-GPT2-v0 logs")
        if config.horizon is not None and config.horizon != proxy.config.horizon:
            raise ConfigError(f"branch config horizon: {config.horizon} differs from the proxy's horizon "
                              f"{proxy.config.horizon}; set horizon=None or {proxy.config.horizon}, or retrain "
                              "the proxy for that horizon")
        self.config = config
        self.proxy = proxy
        self.calibrator = calibrator
        self.plans = tuple(proxy.nvec) == tuple(PLAN_NVEC)
        self.horizon = int(proxy.config.horizon)
        self.reset_calibration_check()

    def reset_calibration_check(self) -> None:
        """Start a new run's live calibration check: no plans checked, band scale 1."""
        self.checked = 0
        self.rejected = 0
        self.band_scale = 1.0

    @property
    def rejection_rate(self) -> float | None:
        return self.rejected / self.checked if self.checked else None

    # ------------------------------------------------------------------ scoring

    def score(self, state: np.ndarray, plans: np.ndarray) -> list[dict[str, Any]]:
        """Pessimistic proxy score of each plan from ``state``; one dict per plan, in input order.

        ``plans`` are ``(n, 12)`` plans or ``(n, 6)`` first actions (read as holding their settings).
        """
        cfg, k = self.config, self.config.k_std
        p12 = np.asarray(plans, dtype=np.int64)
        p12 = p12.reshape(1, -1) if p12.ndim == 1 else p12
        p12 = as_plan(p12) if p12.shape[1] == D else p12
        if p12.ndim != 2 or p12.shape[1] != 2 * D:
            raise ConfigError(f"plans: expected shape (n, {2 * D}) or (n, {D}), got {np.shape(plans)}")
        acts = p12 if self.plans else p12[:, :D]
        states = np.repeat(np.asarray(state, dtype=np.float32).reshape(1, -1), len(acts), axis=0)
        p = self.proxy.predict(states, acts)
        inst_up = p["instability_risk"] + k * p["instability_risk_std"]
        if isinstance(self.calibrator, ConformalBounds):
            # the candidates' own ensemble spread: residual-normalised bounds widen where members disagree,
            # so the bound can change the ranking (older absolute-residual bounds ignore std: mean + q)
            loss_up = self.calibrator.upper("loss_at_n", p["loss_at_n"], cfg.conformal_level,
                                            std=p["loss_at_n_std"])
            if self.calibrator.has("instability_risk"):
                inst_up = self.calibrator.upper("instability_risk", p["instability_risk"], cfg.conformal_level,
                                                std=p["instability_risk_std"])
        elif self.calibrator is not None:
            from stso_env.proxy.calibration import conformal_upper

            feats = np.concatenate([states, acts.astype(np.float32)], axis=1)
            loss_up = conformal_upper(self.proxy, self.calibrator, feats, level=cfg.conformal_level)
        else:
            loss_up = p["loss_at_n"] + k * p["loss_at_n_std"]
        risk = inst_up + np.clip(p["diverged_prob"] + k * p["diverged_prob_std"], 0.0, 1.0)
        recovery = p["recovery_time"] + k * p["recovery_time_std"]
        score = cfg.alpha * -loss_up + cfg.beta * -risk + cfg.gamma * -recovery
        # a non-finite proxy output must never win
        score = np.where(np.isfinite(score), score, -np.inf)
        return [{"plan": p12[i].tolist(), "action": p12[i, :D].tolist(), "score": float(score[i]),
                 "loss_upper": float(loss_up[i]), "loss_mean": float(p["loss_at_n"][i]),
                 "loss_std": float(p["loss_at_n_std"][i]), "risk": float(risk[i]),
                 "diverged_prob": float(p["diverged_prob"][i]), "recovery": float(recovery[i])}
                for i in range(len(acts))]

    def candidates(self, state: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> tuple[
            list[dict[str, Any]], str]:
        """Proxy-scored plans (best first) and the search method used."""
        grid = valid_plans(mask, self.plans)
        n = self.config.n_candidates
        kind = "plans" if self.plans else "held actions"
        if len(grid) <= n:
            rows, method = self.score(state, grid), f"exhaustive ({len(grid)} valid {kind})"
        else:
            rows, method = self._bandit(state, grid, n, rng), f"ucb-bandit ({n} of {len(grid)} valid {kind})"
        rows.sort(key=lambda r: -r["score"] if math.isfinite(r["score"]) else math.inf)
        for i, r in enumerate(rows):
            r["id"] = i
        return rows, method

    def _bandit(self, state: np.ndarray, grid: np.ndarray, n: int, rng: np.random.Generator) -> list[
            dict[str, Any]]:
        allowed = [np.unique(grid[:, d]) for d in range(grid.shape[1])]
        seen: dict[tuple[int, ...], dict[str, Any]] = {}
        sums = [dict.fromkeys(a.tolist(), 0.0) for a in allowed]
        counts = [dict.fromkeys(a.tolist(), 0) for a in allowed]
        valid = {tuple(int(x) for x in row) for row in grid}
        order = [tuple(int(x) for x in row) for row in grid]  # deterministic fallback order
        scores: list[float] = []

        def add(plan: tuple[int, ...]) -> None:
            row = self.score(state, np.asarray([plan]))[0]
            seen[plan] = row
            s = row["score"] if math.isfinite(row["score"]) else (min(scores) - 1.0 if scores else -1e6)
            scores.append(s)
            for d, c in enumerate(plan):
                sums[d][c] += s
                counts[d][c] += 1

        if NEUTRAL_PLAN in valid:
            add(NEUTRAL_PLAN)
        while len(seen) < n:
            t = len(seen) + 1
            # standardise so the exploration bonus is on the same scale whatever the score units
            mu, sd = (float(np.mean(scores)), float(np.std(scores)) or 1.0) if scores else (0.0, 1.0)
            pick = []
            for d in range(grid.shape[1]):
                vals = []
                for c in allowed[d].tolist():
                    if counts[d][c] == 0:
                        vals.append(math.inf)
                    else:
                        mean = (sums[d][c] / counts[d][c] - mu) / sd
                        vals.append(mean + UCB_C * math.sqrt(2 * math.log(t) / counts[d][c]))
                best = np.flatnonzero(np.asarray(vals) == max(vals))
                pick.append(int(allowed[d][rng.choice(best)]))
            plan = tuple(pick)
            if plan in seen or plan not in valid:  # scored already, or not a valid combination: explore
                rest = [a for a in order if a not in seen]
                plan = rest[int(rng.integers(len(rest)))]
            add(plan)
        return list(seen.values())

    # ------------------------------------------------------------------ decide

    def _rollback_target(self, base: GPT2Env, trigger_step: int) -> tuple[int | None, dict[str, Any]]:
        """The snapshot to restore and the reasoning (index history, rise start, limit)."""
        cfg = self.config
        info: dict[str, Any] = {"enabled": cfg.rollback, "max_rollback_steps": cfg.max_rollback_steps}
        all_snaps = base.snapshot_ids() if cfg.rollback else []
        if not all_snaps:
            info["why"] = "rollback disabled" if not cfg.rollback else "no snapshots were taken"
            return None, info
        snaps = [s for s in all_snaps if s <= trigger_step]
        h = base._history
        # the window maximum: a spike's index can be back under tau by the window's end
        index = [float(x) for x in h.get("index_max") or h["index"]]
        steps = [int(x) for x in h["global_step"]]
        j = rise_start(index)
        start_step = steps[j] if steps else trigger_step
        lo = trigger_step - cfg.max_rollback_steps
        info.update({"index_history": [_finite_or_none(x) for x in index[-12:]],
                     "index_steps": steps[-12:], "rise_start_step": start_step, "snapshots": snaps})
        before = [s for s in snaps if lo <= s <= start_step]
        inside = [s for s in snaps if lo <= s < trigger_step]
        if before:
            target = max(before)
            info["why"] = (f"the index rose from step {start_step} to the trigger at step {trigger_step}; "
                           f"snapshot {target} is the last one before the rise")
        elif inside:
            target = min(inside)
            info["why"] = (f"the index rose from step {start_step}, more than max_rollback_steps="
                           f"{cfg.max_rollback_steps} before the trigger at {trigger_step}; snapshot {target} is "
                           "the oldest inside the limit")
        else:
            info["why"] = f"no snapshot between step {max(lo, 0)} and the trigger at step {trigger_step}"
            return None, info
        if target == trigger_step:
            info["why"] += "; it is the current state, so nothing is undone"
            return None, info
        return target, info

    def _band(self, row: dict[str, Any]) -> tuple[float, float]:
        """The scaled conformal band of a plan's ``loss@N``: symmetric around the mean, half-width
        ``band_scale * (upper - mean)``."""
        half = self.band_scale * max(0.0, row["loss_upper"] - row["loss_mean"])
        return row["loss_mean"] - half, row["loss_mean"] + half

    def decide(self, env: Any, run_name: str) -> BranchDecision:
        """Run one branch decision on ``env`` (a reset STSO-GPT2-v0) and return the plan to apply."""
        cfg = self.config
        if not isinstance(run_name, str) or not run_name or run_name in (".", "..") or any(
                s in run_name for s in ("/", "\\", os.sep)):
            raise ConfigError(f"run_name: {run_name!r} must be a non-empty name without path separators")
        base = getattr(env, "unwrapped", env)
        if not isinstance(base, GPT2Env):
            raise ConfigError(f"env: expected STSO-GPT2-v0 (GPT2Env), got {type(base).__name__}")
        if base.trainer is None:
            raise RuntimeError("decide() needs a reset env; call env.reset() first")
        if base._done:
            raise RuntimeError("decide(): the episode has ended; reset the env before branching")

        trigger_step = int(base.trainer.global_step)
        trigger_obs = np.asarray(base._obs, dtype=np.float64)
        trigger_info = {"uncertainty_index": _finite_or_none(float(base._last_info.get("uncertainty_index",
                                                                                       math.nan))),
                        "trigger": bool(base._last_info.get("trigger", False))}
        events = base.monitor.events

        # 1. rollback to the last snapshot before the index started to rise
        restored_from, rollback_info = self._rollback_target(base, trigger_step)
        rollback_flops = 0.0
        restore_seconds = 0.0
        if restored_from is not None:
            flops_before = float(base._total_flops)
            t_restore = time.perf_counter()
            base.restore(restored_from)
            restore_seconds = time.perf_counter() - t_restore
            # charged after the restore: the restore rewinds the event tracker too
            rollback_flops = max(0.0, flops_before - float(base._total_flops))
            events = base.monitor.events
            events.add_wasted(rollback_flops, "rollback")
        state = np.asarray(base._obs, dtype=np.float32)

        # 2.-4. plans scored by the proxy
        rng = np.random.default_rng([cfg.seed, trigger_step])
        rows, method = self.candidates(state, base.action_masks(), rng)
        top = rows[: cfg.top_k]
        if cfg.verify and cfg.control_arm and not any(tuple(r["plan"]) == NEUTRAL_PLAN for r in top):
            control = next((r for r in rows if tuple(r["plan"]) == NEUTRAL_PLAN), None)
            if control is None:
                control = dict(self.score(state, np.asarray([NEUTRAL_PLAN]))[0], id=len(rows))
                rows.append(control)
            top = top + [control]

        # 5. verification in forks over the proxy's horizon (none in the proxy-only ablation)
        env_steps = self.horizon
        if cfg.verify:
            outcomes, executor = self._verify(base, [r["plan"] for r in top], env_steps)
        else:
            top, outcomes, executor = [], [], "none"
        verification = []
        for r, out in zip(top, outcomes):
            s = real_score(out, cfg)
            is_control = tuple(r["plan"]) == NEUTRAL_PLAN
            lo, hi = self._band(r)
            inside = bool(math.isfinite(out["probe_loss"]) and lo <= out["probe_loss"] <= hi)
            checked = cfg.band_check and out["env_steps"] == env_steps
            accepted = is_control or not checked or inside
            if checked:
                # the live calibration check: every verified plan with a full rollout counts, the
                # control arm too; the band scale follows the rate (ACI-style)
                self.checked += 1
                self.rejected += int(not inside)
                self.band_scale *= math.exp(cfg.band_eta * (float(not inside) - (1.0 - cfg.conformal_level)))
            verification.append({
                "id": r["id"], "plan": r["plan"], "action": r["action"], "control_arm": is_control,
                "proxy_score": _finite_or_none(r["score"]), "real_score": _finite_or_none(s),
                "predicted_loss": _finite_or_none(r["loss_mean"]), "band": [_finite_or_none(lo), _finite_or_none(hi)],
                "probe_loss": _finite_or_none(out["probe_loss"]), "inside_band": inside, "accepted": accepted,
                "instability_events": out["instability_events"], "recovery_env_steps": out["recovery_env_steps"],
                "diverged": out["diverged"], "flops": out["flops"], "env_steps": out["env_steps"],
                "end_global_step": out["global_step"], "_log": out["log"], "_score": s,
                "_state": out.get("state"), "_done": out.get("done", True)})
        verify_flops = float(sum(v["flops"] for v in verification))

        # 7. collapse: best real score among the accepted, ties to the better proxy rank (control last)
        eligible = [i for i, v in enumerate(verification) if v["accepted"]]
        if eligible:
            best = max(eligible, key=lambda i: (verification[i]["_score"], -i))
            chosen = verification[best]
        else:  # every verified plan was rejected and there was no control arm: change nothing
            chosen = {"id": None, "plan": list(NEUTRAL_PLAN), "action": list(NEUTRAL_ACTION), "_score": math.nan}
        if not cfg.verify:
            chosen = {"id": rows[0]["id"], "plan": rows[0]["plan"], "action": rows[0]["action"], "_score": math.nan}
        # adopt: the run continues as the chosen fork (deterministic: exactly what applying the plan would
        # train), so its verification steps are the run's own training, not waste
        adopted = bool(cfg.adopt and verification and chosen.get("id") is not None
                       and math.isfinite(chosen["_score"]) and chosen.get("_state") is not None
                       and not chosen["_done"])
        adopted_flops = float(chosen["flops"]) if adopted else 0.0
        if adopted:
            t_load = time.perf_counter()
            base._load_env_state(chosen["_state"])
            restore_seconds += time.perf_counter() - t_load
            events = base.monitor.events
        events.add_wasted(verify_flops - adopted_flops, "verification")
        for v in verification:
            v.pop("_state", None)
            v.pop("_done", None)
        reason = self._reason(chosen, rows, verification, method, env_steps, adopted, adopted_flops,
                              restored_from, trigger_step, rollback_flops, rollback_info)
        if cfg.use_ray and cfg.verify and executor != "ray":
            reason += ("; Ray was requested, but the trainer is distributed (Ray workers are outside its process "
                       "group), so verification ran in forks on every rank" if current_world().distributed else
                       "; Ray was requested but is not installed, so verification ran sequentially")

        # files: in a distributed run every rank decides the same, rank 0 writes and all report its folder
        world = current_world()
        out_dir = self._decision_dir(run_name, trigger_step) if world.is_main else None
        if world.distributed:
            out_dir = gather_objects(out_dir, world)[0]
        for v in verification:
            log = "\n".join(v.pop("_log")) + "\n"
            v.pop("_score")
            if world.is_main:
                _atomic_write(out_dir / f"verification_{v['id']}.log", log)
                _write_json(out_dir / f"candidate_{v['id']}.json", v)
        table = [{k: (_finite_or_none(x) if isinstance(x, float) else x) for k, x in r.items()} for r in rows]
        decision = {
            "run": run_name, "step": trigger_step, "restored_from": restored_from, "rollback": rollback_info,
            "branch_step": trigger_step if restored_from is None else restored_from,
            "trigger_state": {"obs": [_finite_or_none(x) for x in trigger_obs.tolist()],
                              "names": list(base.observation_names), **trigger_info},
            "horizon_env_steps": env_steps, "horizon_steps": env_steps * int(base.decision_interval),
            "plans": self.plans, "candidate_search": method,
            "score_formula": ("alpha * -loss_upper - beta * risk - gamma * recovery; loss_upper = "
                              + (f"conformal upper bound at level {cfg.conformal_level}" if self.calibrator
                                 is not None else f"mean + {cfg.k_std} * std")),
            "weights": {"alpha": cfg.alpha, "beta": cfg.beta, "gamma": cfg.gamma},
            "candidates": table,
            "verification": verification,
            "calibration_check": {"checked": self.checked, "rejected": self.rejected,
                                  "rejection_rate": self.rejection_rate,
                                  "nominal_rate": round(1.0 - cfg.conformal_level, 9),
                                  "band_scale": self.band_scale, "enabled": cfg.band_check},
            "chosen_plan": list(chosen["plan"]), "chosen_action": list(chosen["action"]),
            "chosen_id": chosen["id"], "chosen_fields": dict(zip(ACTION_FIELDS, chosen["action"])),
            "reason": reason, "executor": executor,
            "wasted_flops": {"verification": verify_flops - adopted_flops, "rollback": rollback_flops},
            "adopted": adopted, "adopted_flops": adopted_flops, "global_step_after": int(base.trainer.global_step),
        }
        path = out_dir / "decision.json"
        if world.is_main:
            _write_json(path, decision)
            _write_json(out_dir / "seed_manifest.json", {
                "env_seed": int(base._seed), "episode": int(base._episode), "trigger_step": trigger_step,
                "restored_from": restored_from, "fork_ids": [f"fork-{v['id']}" for v in verification],
                "bandit_seed": [cfg.seed, trigger_step], "config": asdict(cfg),
                "proxy_config": asdict(self.proxy.config), "calibrated": self.calibrator is not None,
                "world_size": world.size,
            })
        return BranchDecision(step=trigger_step, chosen_action=list(chosen["action"]),
                              chosen_plan=list(chosen["plan"]), candidates=table, verification=verification,
                              reason=reason, path=path, wasted_flops=verify_flops - adopted_flops + rollback_flops,
                              horizon=env_steps, restored_from=restored_from, executor=executor,
                              extra={"restore_seconds": restore_seconds}, adopted=adopted,
                              adopted_flops=adopted_flops)

    def _reason(self, chosen: dict[str, Any], rows: list[dict[str, Any]], verification: list[dict[str, Any]],
                method: str, env_steps: int, adopted: bool, adopted_flops: float, restored_from: int | None,
                trigger_step: int, rollback_flops: float, rollback_info: dict[str, Any]) -> str:
        cfg = self.config
        rejected = [v["id"] for v in verification if not v["accepted"]]
        if not cfg.verify:
            reason = (f"plan {chosen['id']} {self._describe(chosen['plan'])} had the best proxy score "
                      f"{rows[0]['score']:.4f} of {len(rows)} candidates ({method}); applied without "
                      "verification (verify=False)")
        elif chosen["id"] is None:
            reason = (f"every verified plan was rejected (real probe loss outside its conformal band): "
                      f"{rejected}; the run changes nothing")
        elif math.isfinite(chosen["_score"]):
            reason = (f"plan {chosen['id']} {self._describe(chosen['plan'])}"
                      + (" (the control arm: change nothing)" if chosen.get("control_arm") else "")
                      + f" had the best verified score {chosen['_score']:.4f} of {len(verification)} real "
                      f"rollouts of {env_steps} env steps (probe loss {chosen['probe_loss']:.4f}, "
                      f"{chosen['instability_events']} instability events, {chosen['recovery_env_steps']} env "
                      f"steps recovering); proxy rank {chosen['id']} of {len(rows)} candidates ({method})")
        else:
            reason = (f"every verified plan diverged; returning plan {chosen['id']} "
                      f"{self._describe(chosen['plan'])}, as no verified plan is safer")
        if rejected and chosen["id"] is not None and cfg.verify:
            reason += f"; rejected by the band check: {rejected}"
        if adopted:
            reason += (f"; the run continues as that fork ({chosen['env_steps']} env steps already trained, "
                       f"{adopted_flops:.3g} FLOPs kept as training)")
        if restored_from is not None:
            reason += (f"; the run was rolled back from step {trigger_step} to snapshot {restored_from} "
                       f"({rollback_flops:.3g} FLOPs charged as rollback): {rollback_info['why']}")
        elif cfg.rollback:
            reason += f"; no rollback: {rollback_info['why']}"
        return reason

    @staticmethod
    def _describe(plan: list[int]) -> str:
        first = ", ".join(f"{k}={v}" for k, v in zip(ACTION_FIELDS, plan[:D]))
        if len(plan) == 2 * D:
            return f"(now: {first}; then: " + ", ".join(f"{k}={v}" for k, v in zip(ACTION_FIELDS, plan[D:])) + ")"
        return f"({first})"

    def _decision_dir(self, run_name: str, step: int) -> Path:
        # a run rolled back and triggered again at the same step must not mix files of two decisions
        root = Path(self.config.out_dir) / run_name
        d = root / str(step)
        n = 1
        while d.exists():
            d = root / f"{step}-{n}"
            n += 1
        d.mkdir(parents=True)
        return d

    def _verify(self, base: GPT2Env, plans: list[list[int]], env_steps: int) -> tuple[list[dict[str, Any]], str]:
        # a distributed trainer's forks are collective (every rank trains them together); Ray workers are
        # outside the process group, so verification stays in forks on every rank
        if self.config.use_ray and not current_world().distributed:
            try:
                import ray
            except ImportError:
                ray = None
            if ray is not None:
                import torch

                from stso_env.eval.engine import ray_init, ray_task

                threads = torch.get_num_threads()  # the in-process forks' count: the same outcomes
                ray_init(self.config.ray_address, num_cpus=2, threads=threads)
                submit = ray_task(_verify_remote, threads)
                state_ref = ray.put(base._env_state())
                refs = [submit(base._kwargs, state_ref, p, env_steps, self.config.adopt) for p in plans]
                return list(ray.get(refs)), "ray"
        outcomes = []
        for p in plans:
            fork = base.fork()
            try:
                outcomes.append(rollout_fork(fork, p, env_steps, self.config.adopt))
            finally:
                fork.close()
        return outcomes, "sequential"
