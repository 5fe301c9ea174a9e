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
``policy``       a saved Stable-Baselines3 policy (``PPO`` or sb3-contrib ``MaskablePPO``) acting
                 deterministically on the observation, masks applied when the model takes them.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from stso_env.envs.rlhf_env import NEUTRAL_ACTION
from stso_env.rlhf.kl_control import AdaptiveKL
from stso_env.rlhf.monitor import OBSERVATION_NAMES

RLHF_CONTROLLERS = ("fixed", "adaptive_kl", "rule", "policy")
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
        offsets = np.cumsum([0, 4, 3, 3, 3, 3])
        for d in (0, 1):
            if not mask[offsets[d] + a[d]]:
                a[d] = NEUTRAL_ACTION[d]
        return np.array(a)


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
    if name == "policy":
        if not kw.get("path"):
            raise ValueError("controller 'policy' needs the path of a saved SB3 model (policy:PATH)")
        return Policy(kw["path"])
    raise ValueError(f"unknown RLHF controller {name!r}; choose one of {', '.join(RLHF_CONTROLLERS)}")
