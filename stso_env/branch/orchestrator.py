"""Branch orchestrator: at a trigger, simulate many interventions cheaply, verify a few for real, apply one.

One :meth:`BranchOrchestrator.decide` call does, on a reset ``STSO-GPT2-v0`` env:

1. **Rollback** (``delta > 0``): restore the newest env snapshot that is at least
   ``delta`` training steps older than the current step. The training FLOPs that
   are undone are charged to the run's metrics as wasted (reason ``"rollback"``).
   With ``delta == 0``, or when no snapshot is old enough, the branch starts from
   the current state and the env is left exactly as it was.
2. **Candidates**: the valid actions are the MultiDiscrete combinations allowed
   by ``action_masks()`` (384 in all, 192 with skip-batch masked). When there are
   at most ``n_candidates`` of them, every one is scored. Otherwise a UCB1 bandit
   over the action *dimensions* picks ``n_candidates`` distinct combinations: each
   choice of each dimension is an arm whose value is the mean proxy score of the
   combinations that used it, so the search concentrates on choices that score
   well without enumerating the grid. The neutral action is always scored, so
   "change nothing" is among the options. (Optuna TPE is not used: it is not a
   dependency of this project, and the bandit needs only numpy.)
3. **Proxy scoring** over the proxy's horizon ``N``:
   ``score = alpha * -loss@N + beta * -risk + gamma * -recovery``, each term
   pessimistic: with a calibrator, ``loss@N`` and the ``instability_risk`` part
   of the risk are their split-conformal upper bounds at ``conformal_level``
   (:class:`~stso_env.proxy.calibration.ConformalBounds`, saved with the proxy
   as ``calibration.json``; a MAPIE regressor bounds the loss only); without
   one, the ensemble mean ``+ k_std * std``. Risk is ``instability_risk +
   diverged_prob`` (the probability as mean ``+ k_std * std``, clipped to 1),
   recovery is ``recovery_time`` mean ``+ k_std * std``.
4. **Verification**: the ``top_k`` best candidates each run in a fork
   (``env.unwrapped.fork()``) for ``ceil(verify_steps / decision_interval)`` env
   steps holding the candidate action. The real outcome is the probe loss after,
   the instability events that started, the env steps spent recovering, and
   divergence. The real score uses the same weights on these numbers; a
   divergence is the worst possible score. Every training FLOP of the forks is
   charged as wasted (reason ``"verification"``).
   With ``verify=False`` (the proxy-only ablation) nothing is verified and the
   proxy's best candidate is returned; ``decision.json`` is still written.
5. **Collapse**: the verified candidate with the best real score is returned
   (ties go to the better proxy rank). The caller steps the real env with it.
   With ``adopt=True`` the run does not re-run the chosen action: the env
   loads the chosen fork's whole state (the fork is the run continued under
   that action, bit for bit), so its verification steps become the run's own
   training and only the other forks' FLOPs are charged as wasted. A fork
   that ended its episode or diverged is never adopted.

Files, all written atomically (temp file + ``os.replace``) under
``<out_dir>/<run>/<step>/`` where ``step`` is the global step at the trigger:
``decision.json``, ``candidate_<id>.json`` per verified candidate,
``verification_<id>.log`` (one line per fork env step) and ``seed_manifest.json``.
Candidate ids are ranks in the proxy score table (0 = best by the proxy).

Ray: with ``use_ray=True`` and ``ray`` importable (the ``distributed`` extra),
the verification rollouts run as Ray tasks that rebuild each fork from the env's
state (``_env_state`` / ``_load_env_state``); otherwise they run one after the
other in this process. Ray is not installed in the default environment, so the
Ray path is exercised only where that extra is installed; the executor that ran
is recorded in ``decision.json``.
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
from stso_env.proxy.model import ProxyEnsemble

#: Exploration weight of the UCB1 bandit over action dimensions (scores are standardised first).
UCB_C = 1.0


@dataclass
class BranchConfig:
    """Settings of one branch decision (see the module docstring for the procedure)."""

    delta: int = 0  # roll back to a snapshot at least this many training steps old (0: branch from now)
    n_candidates: int = 200  # proxy-scored candidate actions (all valid ones when fewer)
    top_k: int = 5  # candidates verified by real rollouts in forks
    verify: bool = True  # False: apply the proxy's best candidate without real rollouts (ablation)
    adopt: bool = False  # True: the run continues as the best verified fork (its steps are not re-run)
    verify_steps: int = 50  # training steps per verification rollout (rounded up to whole env steps)
    horizon: int | None = None  # proxy horizon N in env steps; None: the proxy's own (must match it)
    alpha: float = 1.0  # weight of -E[loss@N]
    beta: float = 0.5  # weight of -risk
    gamma: float = 0.1  # weight of -recovery time
    k_std: float = 1.0  # pessimism without a calibrator: mean + k_std * ensemble std
    conformal_level: float = 0.9  # level of the conformal upper bound on loss@N
    use_ray: bool = False  # verify in parallel through Ray when it is importable
    seed: int = 0  # bandit tie-breaking
    out_dir: str = "branches"

    def __post_init__(self) -> None:
        def _int(name: str, lo: int, hi: int | None = None) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
                rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
                raise ConfigError(f"branch config {name}: must be an integer {rng}, got {v!r}")

        _int("delta", 0)
        _int("n_candidates", 1, int(np.prod(ACTION_NVEC)))
        _int("top_k", 1)
        _int("verify_steps", 1)
        _int("seed", 0)
        if self.horizon is not None:
            _int("horizon", 1)
        if self.top_k > self.n_candidates:
            raise ConfigError(f"branch config top_k: {self.top_k} is more than n_candidates={self.n_candidates}; "
                              "lower top_k or raise n_candidates")
        for name in ("alpha", "beta", "gamma", "k_std"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ConfigError(f"branch config {name}: must be a finite number >= 0, got {v!r}")
        if self.alpha == self.beta == self.gamma == 0:
            raise ConfigError("branch config alpha, beta, gamma: all zero makes every candidate equal; "
                              "give at least one a positive weight")
        lv = self.conformal_level
        if isinstance(lv, bool) or not isinstance(lv, (int, float)) or not 0 < lv < 1:
            raise ConfigError(f"branch config conformal_level: must be in (0, 1), e.g. 0.9, got {lv!r}")
        if not isinstance(self.adopt, bool):
            raise ConfigError(f"branch config adopt: must be true or false, got {self.adopt!r}")
        if not isinstance(self.verify, bool):
            raise ConfigError(f"branch config verify: must be true or false, got {self.verify!r}")
        if not isinstance(self.use_ray, bool):
            raise ConfigError(f"branch config use_ray: must be true or false, got {self.use_ray!r}")
        if not isinstance(self.out_dir, (str, os.PathLike)) or not str(self.out_dir):
            raise ConfigError(f"branch config out_dir: must be a non-empty path, got {self.out_dir!r}")


@dataclass
class BranchDecision:
    """What :meth:`BranchOrchestrator.decide` chose and why."""

    step: int  # global training step at the trigger
    chosen_action: list[int]
    candidates: list[dict[str, Any]]  # proxy score table, best first
    verification: list[dict[str, Any]]  # one per verified candidate, in proxy-rank order
    reason: str
    path: Path  # decision.json
    wasted_flops: float  # verification + rollback FLOPs charged to the run
    restored_from: int | None = None  # snapshot id the branch started from, None: the current state
    executor: str = "sequential"
    extra: dict[str, Any] = field(default_factory=dict)
    adopted: bool = False  # the env now is the chosen fork, after its verification steps
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


def rollout_fork(fork: GPT2Env, action: list[int], env_steps: int, keep_state: bool = False) -> dict[str, Any]:
    """Step ``fork`` ``env_steps`` times holding ``action``; returns the measured outcome and the log lines
    (and, with ``keep_state``, the fork's whole env state afterwards under ``"state"``)."""
    lines: list[str] = []
    flops = 0.0
    events = recovering = 0
    diverged = False
    probe = float(fork._probe)
    for _ in range(env_steps):
        _, reward, terminated, truncated, info = fork.step(np.asarray(action, dtype=np.int64))
        flops += float(info["flops"])
        events += int(info["instability_events"])
        recovering += int(info["wasted_flops"] > 0)
        diverged = diverged or bool(info["diverged"])
        probe = float(info["probe_loss"])
        lines.append(json.dumps({"global_step": int(info["global_step"]), "train_loss": _finite_or_none(
            float(info["train_loss"])), "probe_loss": _finite_or_none(probe), "reward": _finite_or_none(
            float(reward))}, allow_nan=False))
        if terminated or truncated:
            break
    out = {"probe_loss": probe, "instability_events": events, "recovery_env_steps": recovering,
           "diverged": diverged, "flops": flops, "env_steps": len(lines),
           "global_step": int(fork.trainer.global_step), "log": lines}
    if keep_state:
        out["state"] = copy.deepcopy(fork._env_state())
        out["done"] = bool(fork._done)
    return out


def _verify_remote(env_kwargs: dict[str, Any], state: dict[str, Any], action: list[int],
                   env_steps: int, keep_state: bool = False) -> dict[str, Any]:
    # Ray task body: rebuild the fork from its state in the worker, exactly as GPT2Env.fork() does
    fork = GPT2Env(**dict(env_kwargs, run_dir=None))
    _ = fork.np_random
    fork._load_env_state(state)
    try:
        return rollout_fork(fork, action, env_steps, keep_state)
    finally:
        fork.close()


# ---------------------------------------------------------------------- orchestrator


class BranchOrchestrator:
    """Trigger -> (rollback) -> proxy-scored candidates -> verified top-K in forks -> best action."""

    def __init__(self, config: BranchConfig, proxy: ProxyEnsemble, calibrator: Any = None) -> None:
        if not isinstance(config, BranchConfig):
            raise ConfigError(f"config: expected a BranchConfig, got {type(config).__name__}")
        if not isinstance(proxy, ProxyEnsemble):
            raise ConfigError(f"proxy: expected a ProxyEnsemble, got {type(proxy).__name__}; load one with "
                              "ProxyEnsemble.load(folder)")
        if tuple(proxy.nvec) != tuple(ACTION_NVEC):
            raise ConfigError(f"proxy: trained for actions {list(proxy.nvec)}, the env has {list(ACTION_NVEC)}; "
                              "retrain the proxy on STSO-GPT2-v0 logs")
        if config.horizon is not None and config.horizon != proxy.config.horizon:
            raise ConfigError(f"branch config horizon: {config.horizon} differs from the proxy's horizon "
                              f"{proxy.config.horizon}; set horizon=None or {proxy.config.horizon}, or retrain "
                              "the proxy for that horizon")
        self.config = config
        self.proxy = proxy
        self.calibrator = calibrator

    # ------------------------------------------------------------------ scoring

    def score(self, state: np.ndarray, actions: np.ndarray) -> list[dict[str, Any]]:
        """Pessimistic proxy score of each action from ``state``; one dict per action, in input order."""
        cfg, k = self.config, self.config.k_std
        acts = np.asarray(actions, dtype=np.int64).reshape(-1, len(ACTION_NVEC))
        states = np.repeat(np.asarray(state, dtype=np.float32).reshape(1, -1), len(acts), axis=0)
        p = self.proxy.predict(states, acts)
        inst_up = p["instability_risk"] + k * p["instability_risk_std"]
        if isinstance(self.calibrator, ConformalBounds):
            loss_up = self.calibrator.upper("loss_at_n", p["loss_at_n"], cfg.conformal_level)
            if self.calibrator.has("instability_risk"):
                inst_up = self.calibrator.upper("instability_risk", p["instability_risk"], cfg.conformal_level)
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
        return [{"action": acts[i].tolist(), "score": float(score[i]), "loss_upper": float(loss_up[i]),
                 "loss_mean": float(p["loss_at_n"][i]), "loss_std": float(p["loss_at_n_std"][i]),
                 "risk": float(risk[i]), "diverged_prob": float(p["diverged_prob"][i]),
                 "recovery": float(recovery[i])} for i in range(len(acts))]

    def candidates(self, state: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> tuple[
            list[dict[str, Any]], str]:
        """Proxy-scored candidates (best first) and the search method used."""
        grid = valid_actions(mask)
        n = self.config.n_candidates
        if len(grid) <= n:
            rows, method = self.score(state, grid), f"exhaustive ({len(grid)} valid actions)"
        else:
            rows, method = self._bandit(state, grid, n, rng), f"ucb-bandit ({n} of {len(grid)} valid actions)"
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
        scores: list[float] = []

        def add(action: tuple[int, ...]) -> None:
            row = self.score(state, np.asarray([action]))[0]
            seen[action] = row
            s = row["score"] if math.isfinite(row["score"]) else (min(scores) - 1.0 if scores else -1e6)
            scores.append(s)
            for d, c in enumerate(action):
                sums[d][c] += s
                counts[d][c] += 1

        neutral = tuple(NEUTRAL_ACTION)
        if neutral in valid:
            add(neutral)
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
            action = tuple(pick)
            if action in seen:  # the bandit's favourite is scored already: explore a fresh combination
                rest = [a for a in valid if a not in seen]
                action = rest[int(rng.integers(len(rest)))]
            add(action)
        return list(seen.values())

    # ------------------------------------------------------------------ decide

    def decide(self, env: Any, run_name: str) -> BranchDecision:
        """Run one branch decision on ``env`` (a reset STSO-GPT2-v0) and return the action to apply."""
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
        events = base.monitor.events

        # 1. rollback to a snapshot at least delta steps old
        restored_from: int | None = None
        rollback_flops = 0.0
        restore_seconds = 0.0
        if cfg.delta > 0 and base._store is not None:
            base._store.wait()
            old = [s for s in base._store.list() if s <= trigger_step - cfg.delta]
            if old:
                restored_from = max(old)
                flops_before = float(base._total_flops)
                t_restore = time.perf_counter()
                base.restore(restored_from)
                restore_seconds = time.perf_counter() - t_restore
                # charged after the restore: the restore rewinds the event tracker too
                rollback_flops = max(0.0, flops_before - float(base._total_flops))
                events = base.monitor.events
                events.add_wasted(rollback_flops, "rollback")
        state = np.asarray(base._obs, dtype=np.float32)

        # 2.-3. candidates scored by the proxy
        rng = np.random.default_rng([cfg.seed, trigger_step])
        rows, method = self.candidates(state, base.action_masks(), rng)
        top = rows[: cfg.top_k]

        # 4. verification in forks (none in the proxy-only ablation)
        env_steps = max(1, math.ceil(cfg.verify_steps / base.decision_interval))
        if cfg.verify:
            outcomes, executor = self._verify(base, [r["action"] for r in top], env_steps)
        else:
            top, outcomes, executor = [], [], "none"
        verification = []
        for r, out in zip(top, outcomes):
            s = real_score(out, cfg)
            verification.append({"id": r["id"], "action": r["action"], "proxy_score": _finite_or_none(r["score"]),
                                 "real_score": _finite_or_none(s), "probe_loss": _finite_or_none(out["probe_loss"]),
                                 "instability_events": out["instability_events"],
                                 "recovery_env_steps": out["recovery_env_steps"], "diverged": out["diverged"],
                                 "flops": out["flops"], "env_steps": out["env_steps"],
                                 "end_global_step": out["global_step"], "_log": out["log"], "_score": s,
                                 "_state": out.get("state"), "_done": out.get("done", True)})
        verify_flops = float(sum(v["flops"] for v in verification))

        # 5. collapse: best real score, ties to the better proxy rank (verification is in rank order)
        if verification:
            best = max(range(len(verification)), key=lambda i: (verification[i]["_score"], -i))
            chosen = verification[best]
        else:
            chosen = {"id": rows[0]["id"], "action": rows[0]["action"], "_score": math.nan}
        # adopt: the run continues as the chosen fork (deterministic: exactly what applying the action
        # would train), so its verification steps are the run's own training, not waste
        adopted = bool(cfg.adopt and verification and math.isfinite(chosen["_score"])
                       and chosen.get("_state") is not None and not chosen["_done"])
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
        if not cfg.verify:
            reason = (f"candidate {chosen['id']} {self._describe(chosen['action'])} had the best proxy score "
                      f"{rows[0]['score']:.4f} of {len(rows)} candidates ({method}); applied without "
                      "verification (verify=False)")
        elif math.isfinite(chosen["_score"]):
            reason = (f"candidate {chosen['id']} {self._describe(chosen['action'])} had the best verified score "
                      f"{chosen['_score']:.4f} of {len(verification)} real rollouts of {env_steps} env steps "
                      f"(probe loss {chosen['probe_loss']:.4f}, {chosen['instability_events']} instability events, "
                      f"{chosen['recovery_env_steps']} env steps recovering); proxy rank {chosen['id']} of "
                      f"{len(rows)} candidates ({method})")
        else:
            reason = (f"every verified candidate diverged; returning the proxy's best, candidate {chosen['id']} "
                      f"{self._describe(chosen['action'])}, as no verified action is safer")
        if adopted:
            reason += (f"; the run continues as that fork ({chosen['env_steps']} env steps already trained, "
                       f"{adopted_flops:.3g} FLOPs kept as training)")
        if restored_from is not None:
            reason += (f"; the run was rolled back from step {trigger_step} to snapshot {restored_from} "
                       f"({rollback_flops:.3g} FLOPs charged as rollback)")
        elif cfg.delta > 0:
            reason += f"; no snapshot was at least {cfg.delta} steps old, so the branch started from the current step"
        if cfg.use_ray and cfg.verify and executor != "ray":
            reason += "; Ray was requested but is not installed, so verification ran sequentially"

        # files
        out_dir = self._decision_dir(run_name, trigger_step)
        for v in verification:
            _atomic_write(out_dir / f"verification_{v['id']}.log", "\n".join(v.pop("_log")) + "\n")
            v.pop("_score")
            _write_json(out_dir / f"candidate_{v['id']}.json", v)
        table = [{k: (_finite_or_none(x) if isinstance(x, float) else x) for k, x in r.items()} for r in rows]
        decision = {
            "run": run_name, "step": trigger_step, "restored_from": restored_from,
            "branch_step": int(base.trainer.global_step),
            "trigger_state": {"obs": [_finite_or_none(x) for x in trigger_obs.tolist()],
                              "names": list(base.observation_names),
                              "uncertainty_index": _finite_or_none(float(base._last_info.get(
                                  "uncertainty_index", math.nan))),
                              "trigger": bool(base._last_info.get("trigger", False))},
            "candidate_search": method,
            "score_formula": ("alpha * -loss_upper + beta * -risk + gamma * -recovery; loss_upper = "
                              + (f"conformal upper bound at level {cfg.conformal_level}" if self.calibrator
                                 is not None else f"mean + {cfg.k_std} * std")),
            "candidates": table,
            "verification": verification,
            "chosen_action": list(chosen["action"]), "chosen_id": chosen["id"],
            "chosen_fields": dict(zip(ACTION_FIELDS, chosen["action"])),
            "reason": reason, "executor": executor,
            "wasted_flops": {"verification": verify_flops - adopted_flops, "rollback": rollback_flops},
            "adopted": adopted, "adopted_flops": adopted_flops, "global_step_after": int(base.trainer.global_step),
        }
        path = out_dir / "decision.json"
        _write_json(path, decision)
        _write_json(out_dir / "seed_manifest.json", {
            "env_seed": int(base._seed), "episode": int(base._episode), "trigger_step": trigger_step,
            "restored_from": restored_from, "fork_ids": [f"fork-{v['id']}" for v in verification],
            "bandit_seed": [cfg.seed, trigger_step], "config": asdict(cfg),
            "proxy_config": asdict(self.proxy.config), "calibrated": self.calibrator is not None,
        })
        return BranchDecision(step=trigger_step, chosen_action=list(chosen["action"]), candidates=table,
                              verification=verification, reason=reason, path=path,
                              wasted_flops=verify_flops - adopted_flops + rollback_flops,
                              restored_from=restored_from, executor=executor,
                              extra={"restore_seconds": restore_seconds}, adopted=adopted,
                              adopted_flops=adopted_flops)

    @staticmethod
    def _describe(action: list[int]) -> str:
        return "(" + ", ".join(f"{k}={v}" for k, v in zip(ACTION_FIELDS, action)) + ")"

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

    def _verify(self, base: GPT2Env, actions: list[list[int]], env_steps: int) -> tuple[list[dict[str, Any]], str]:
        if self.config.use_ray:
            try:
                import ray
            except ImportError:
                ray = None
            if ray is not None:
                if not ray.is_initialized():
                    ray.init(num_cpus=2, include_dashboard=False)
                task = ray.remote(_verify_remote)
                state_ref = ray.put(base._env_state())
                refs = [task.remote(base._kwargs, state_ref, a, env_steps, self.config.adopt) for a in actions]
                return list(ray.get(refs)), "ray"
        outcomes = []
        for a in actions:
            fork = base.fork()
            try:
                outcomes.append(rollout_fork(fork, a, env_steps, self.config.adopt))
            finally:
                fork.close()
        return outcomes, "sequential"
