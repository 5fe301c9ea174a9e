"""Controllers of an STSO-RLHF-v0 run: what each does with the observation before every window.

Each controller has ``reset(env, info)`` (the episode's first info) and ``act(obs, info)`` returning
a MultiDiscrete action; it reads only the observation and the step info (probe prompts, never
the test prompts of the final score).

``fixed``        the neutral action every window: the scenario's LR and beta throughout.
``adaptive_kl``  the adaptive KL coefficient of Ziegler et al. 2019 (2019_Ziegler_RLHF,
                 :class:`stso_env.rlhf.kl_control.AdaptiveKL`): after each window ``beta`` follows
                 the window's mean KL towards ``target`` with horizon ``horizon`` optimizer steps.
                 The rule is continuous and the env's KL action moves by x0.5 / x2, so it sets the
                 trainer's ``beta`` directly and sends the neutral action otherwise.
``rule``         a hand-written guard: when the KL passes a quarter of the divergence limit or the
                 gold score sags, halve the LR and double beta; when the entropy falls below 70 % of
                 its start, add the entropy bonus; when the proxy reward jumps (reward-volatility
                 z above 3), skip the window's updates.
``explore``      the behaviour policy that collects the proxy's logs: the neutral action, and with
                 probability ``p`` (default 0.3) an action drawn uniformly from the allowed ones
                 (masks applied), from a generator seeded by the episode's seed.
``branch``       the branch method on the RLHF proxy (:class:`stso_env.rlhf.proxy.RLHFProxy`, fitted on
                 the logs in ``branch:LOGDIR``): when the uncertainty index triggers or the run is
                 near the rule's warning zone, score every allowed action on the proxy's pessimistic
                 bound of return@N (act, then hold), verify the best one against the neutral action
                 with short real rollouts (``env.what_if``, ``verify`` windows each, at most
                 ``max_verifications`` times an episode) and commit the one with the higher real
                 return; every decision and why goes to ``decisions`` (``agents.rlhf_evaluate``
                 writes them to ``OUT/branches/``).
``policy``       a saved Stable-Baselines3 policy (``PPO`` or sb3-contrib ``MaskablePPO``) acting
                 deterministically on the observation, masks applied when the model takes them.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from stso_env.envs.rlhf_env import ACTION_NVEC, NEUTRAL_ACTION
from stso_env.rlhf.kl_control import AdaptiveKL
from stso_env.rlhf.monitor import OBSERVATION_NAMES
from stso_env.rlhf.proxy import DEFAULT_HORIZON

RLHF_CONTROLLERS = ("fixed", "adaptive_kl", "rule", "explore", "branch", "policy")
_OFFSETS = np.cumsum((0,) + ACTION_NVEC)
_IDX = {n: i for i, n in enumerate(OBSERVATION_NAMES)}


class Fixed:
    name = "fixed"

    def reset(self, env: Any, info: dict[str, Any]) -> None:
        self.env = env

    def act(self, obs: np.ndarray, info: dict[str, Any]) -> np.ndarray:
        return np.array(NEUTRAL_ACTION)


class AdaptiveKLController(Fixed):
    """Ziegler et al. 2019's KL controller (2019_Ziegler_RLHF); module docstring."""

    name = "adaptive_kl"

    def __init__(self, target: float = 0.1, horizon: float = 400.0) -> None:
        self.target, self.horizon = target, horizon

    def reset(self, env: Any, info: dict[str, Any]) -> None:
        self.env = env
        self.rule = AdaptiveKL(beta=env.run.knobs.beta, target=self.target, horizon=self.horizon)

    def act(self, obs: np.ndarray, info: dict[str, Any]) -> np.ndarray:
        kl = info["kl"] if math.isfinite(info["kl"]) else math.inf
        self.env.run.knobs.beta = self.rule.update(kl, self.env.decision_interval)
        return np.array(NEUTRAL_ACTION)


class Rule(Fixed):
    """A hand-written guard on KL, gold, entropy and reward jumps (module docstring; the GPT-2 rule's
    RLHF counterpart, after the KL-penalty practice of 2019_Ziegler_RLHF)."""

    name = "rule"

    def act(self, obs: np.ndarray, info: dict[str, Any]) -> np.ndarray:
        a = list(NEUTRAL_ACTION)
        rule = self.env.divergence
        if obs[_IDX["kl_max"]] > rule.kl_limit / 4 or obs[_IDX["gold_below_peak"]] > rule.gold_drop / 3:
            a[0], a[1] = 0, 2  # halve the LR, double beta
        if obs[_IDX["entropy_ratio"]] < 0.7:
            a[2] = 1  # entropy bonus 0.01
        if obs[_IDX["u_reward_volatility"]] > 3.0:
            a[5] = 1  # skip the window's updates
        mask = self.env.action_masks()
        for d in (0, 1):
            if not mask[_OFFSETS[d] + a[d]]:
                a[d] = NEUTRAL_ACTION[d]
        return np.array(a)


class Explore(Fixed):
    """Neutral, or with probability ``p`` a uniformly drawn allowed action (module docstring)."""

    name = "explore"

    def __init__(self, p: float = 0.3) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"explore: p must be in [0, 1], got {p!r}")
        self.p = p

    def reset(self, env: Any, info: dict[str, Any]) -> None:
        self.env = env
        self.rng = np.random.default_rng([int(env.episode_seed), 0xE7])

    def act(self, obs: np.ndarray, info: dict[str, Any]) -> np.ndarray:
        if self.rng.random() >= self.p:
            return np.array(NEUTRAL_ACTION)
        mask = self.env.action_masks()
        return np.array([self.rng.choice(np.flatnonzero(mask[_OFFSETS[d]:_OFFSETS[d + 1]]))
                         for d in range(len(ACTION_NVEC))])


class Branch(Fixed):
    """The branch method on the RLHF proxy (module docstring; 2022_Gao_RewardOveroptimization's failure is
    what the proxy's return@N, fitted on gold progress, is meant to see coming)."""

    name = "branch"
    _proxies: dict[tuple[str, int], Any] = {}  # fitted once per process and log folder

    def __init__(self, logs: str, horizon: int = DEFAULT_HORIZON, level: float = 0.8, verify: int = 2,
                 max_verifications: int = 6) -> None:
        from stso_env.rlhf.proxy import RLHFProxy

        key = (str(logs), horizon)
        if key not in Branch._proxies:
            Branch._proxies[key] = RLHFProxy.from_logs(logs, horizon=horizon)
        self.proxy = Branch._proxies[key]
        self.level, self.verify, self.max_verifications = level, verify, max_verifications

    def reset(self, env: Any, info: dict[str, Any]) -> None:
        from stso_env.rlhf.proxy import all_actions

        self.env, self.verified, self.decisions = env, 0, []
        self.candidates = all_actions()

    def _warning(self, obs: np.ndarray) -> bool:
        rule = self.env.divergence
        return bool(obs[_IDX["trigger"]] > 0.5 or obs[_IDX["kl_max"]] > rule.kl_limit / 4
                    or obs[_IDX["gold_below_peak"]] > rule.gold_drop / 3 or obs[_IDX["entropy_ratio"]] < 0.7)

    def act(self, obs: np.ndarray, info: dict[str, Any]) -> np.ndarray:
        neutral = np.array(NEUTRAL_ACTION)
        if not self._warning(obs):
            return neutral
        mask = self.env.action_masks()
        allowed = np.ones(len(self.candidates), dtype=bool)
        for d in range(len(ACTION_NVEC)):
            allowed &= mask[_OFFSETS[d] + self.candidates[:, d]]
        cands = self.candidates[allowed]
        pred = self.proxy.predict(obs, cands, level=self.level)
        best = int(np.argmax(pred["lower"]))
        n_idx = int(np.flatnonzero((cands == neutral).all(axis=1))[0])
        decision: dict[str, Any] = {
            "step": int(info["step"]), "index": float(obs[_IDX["uncertainty_index"]]),
            "proxy_best": cands[best].tolist(), "proxy_best_lower": float(pred["lower"][best]),
            "proxy_best_mean": float(pred["mean"][best]), "proxy_best_variance": float(pred["variance"][best]),
            "neutral_lower": float(pred["lower"][n_idx]), "neutral_mean": float(pred["mean"][n_idx]),
            "candidates": int(len(cands))}
        choice = neutral
        if best != n_idx and self.verified < self.max_verifications:
            self.verified += 1
            real = {}
            for label, a in (("neutral", neutral), ("proxy_best", cands[best])):
                rollout = self.env.what_if([a] + [neutral] * (self.verify - 1))
                real[label] = float(sum(r for _, r, *_ in rollout))
            decision["verified_return"] = real
            if real["proxy_best"] > real["neutral"]:
                choice = cands[best]
        decision["committed"] = choice.tolist()
        self.decisions.append(decision)
        return choice


class Policy(Fixed):
    """A saved SB3 policy (``PPO`` or ``MaskablePPO``), deterministic; masks used when the model takes them
    (2017_Schulman_PPO, 2020_Huang_InvalidActionMasking)."""

    name = "policy"

    def __init__(self, path: str) -> None:
        from sb3_contrib import MaskablePPO
        from stable_baselines3 import PPO

        try:
            self.model, self.masked = MaskablePPO.load(path, device="cpu"), True
        except (ValueError, KeyError, TypeError):
            self.model, self.masked = PPO.load(path, device="cpu"), False

    def act(self, obs: np.ndarray, info: dict[str, Any]) -> np.ndarray:
        if self.masked:
            action, _ = self.model.predict(obs, deterministic=True, action_masks=self.env.action_masks())
        else:
            action, _ = self.model.predict(obs, deterministic=True)
        return np.asarray(action)


def make_rlhf_controller(name: str, **kw: Any) -> Fixed:
    """A controller by name; ``policy`` needs ``path``, ``adaptive_kl`` takes ``target`` and ``horizon``."""
    if name == "fixed":
        return Fixed()
    if name == "adaptive_kl":
        return AdaptiveKLController(**{k: v for k, v in kw.items() if k in ("target", "horizon")})
    if name == "rule":
        return Rule()
    if name == "explore":
        return Explore(**({"p": float(kw["path"])} if kw.get("path") else {}))
    if name == "branch":
        if not kw.get("path"):
            raise ValueError("controller 'branch' needs the folder of the proxy's logs (branch:LOGDIR)")
        return Branch(kw["path"])
    if name == "policy":
        if not kw.get("path"):
            raise ValueError("controller 'policy' needs the path of a saved SB3 model (policy:PATH)")
        return Policy(kw["path"])
    raise ValueError(f"unknown RLHF controller {name!r}; choose one of {', '.join(RLHF_CONTROLLERS)}")
