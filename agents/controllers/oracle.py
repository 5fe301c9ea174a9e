"""The hindsight oracle: how much any controller could win on a scenario (reported apart, no budget)."""

from __future__ import annotations

import copy
import math
from typing import Any

import gymnasium as gym
import numpy as np

from agents.controllers.base import Controller
from stso_env.envs.gpt2_env import ACTION_FIELDS, NEUTRAL_ACTION, GPT2Env

#: The representative interventions the oracle tries at each decision, one per class of the action grid
#: (skip batch is left out: it is masked in the evaluation, as for every other controller).
ORACLE_CANDIDATES: dict[str, tuple[int, ...]] = {
    "neutral": (2, 1, 0, 0, 0, 0),
    "lr_x0.8": (0, 1, 0, 0, 0, 0),
    "zclip": (2, 1, 1, 0, 0, 0),
    "spam_clip": (2, 1, 3, 0, 0, 0),
    "momentum_reset": (2, 1, 0, 1, 0, 0),
    "reorder": (2, 1, 0, 0, 1, 0),
}

# Persistent parts of an action hold for the whole horizon (weight decay, clip policy); the LR change
# compounds, and momentum reset / reorder are one-shots, so those act in the first window only.
_ONE_SHOT = ("lr_change", "momentum_reset", "data_reorder", "skip_batch")


def holding_action(action: tuple[int, ...] | np.ndarray) -> np.ndarray:
    """The action that keeps ``action``'s persistent parts and leaves out its one-shots and LR change."""
    a = np.asarray(action, dtype=np.int64).copy()
    for i, field in enumerate(ACTION_FIELDS):
        if field in _ONE_SHOT:
            a[i] = NEUTRAL_ACTION[i]
    return a


class Oracle(Controller):
    """A hindsight oracle that bounds what steering can gain: every ``every_windows`` windows it forks
    the main run once per candidate intervention (:data:`ORACLE_CANDIDATES`), trains each fork for
    ``horizon_steps`` steps under it, scores the forks by the loss on ``val_windows`` windows of the
    *validation* split (never the test split the final score uses), and continues the main run as the
    best fork (its state is adopted, so the windows it trained are the main run's lineage). Between
    decisions it holds the chosen candidate's persistent parts (clip policy, weight decay).

    It looks ahead with real training, which no deployable controller can, so it is reported apart
    and is not held to the FLOPs budget (``budget_exempt``): its ``extra_flops`` are the discarded
    forks. Its gain over ``fixed`` on a scenario is the *headroom*: a scenario where even the oracle
    gains nothing cannot rank controllers. The fork-and-select step is the branch method's
    verification with perfect information, as in speculative execution (Reference:
    2017_Jaderberg_PBT for exploit-by-copying a better run's state).

    Settings:
        every_windows: windows between decisions (default 10; the first decision is at the first act).
        horizon_steps: optimizer steps each fork trains before it is scored (default 50).
        val_windows: validation windows of the score (default 16).
        candidates: names from :data:`ORACLE_CANDIDATES` (default all).
    """

    name = "oracle"
    budget_exempt = True

    def __init__(self, every_windows: int = 10, horizon_steps: int = 50, val_windows: int = 16,
                 candidates: list[str] | tuple[str, ...] | None = None) -> None:
        super().__init__()
        names = list(candidates) if candidates is not None else list(ORACLE_CANDIDATES)
        unknown = [n for n in names if n not in ORACLE_CANDIDATES]
        if unknown or not names:
            raise ValueError(f"oracle: candidates {unknown or names!r} unknown or empty; choose from "
                             f"{', '.join(ORACLE_CANDIDATES)}")
        if every_windows < 1 or horizon_steps < 1 or val_windows < 1:
            raise ValueError(f"oracle: every_windows={every_windows}, horizon_steps={horizon_steps}, "
                             f"val_windows={val_windows}: each must be >= 1 (defaults 10, 50, 16)")
        self.every_windows, self.horizon_steps, self.val_windows = every_windows, horizon_steps, val_windows
        self.candidates = names
        self._since = 0
        self._hold = np.asarray(NEUTRAL_ACTION, dtype=np.int64)
        self.choices: list[dict[str, Any]] = []

    def reset(self, env: gym.Env, *, seed: int, run_name: str) -> None:
        super().reset(env, seed=seed, run_name=run_name)
        self._since = self.every_windows  # decide at the first act
        self._hold = np.asarray(NEUTRAL_ACTION, dtype=np.int64)
        self.choices = []

    def act(self, obs: np.ndarray, info: dict[str, Any]) -> np.ndarray:
        base = self.base
        if self._since >= self.every_windows and not base._done:
            self._since = 0
            self._decide(base)
        self._since += 1
        return self._hold.copy()

    def _rollout(self, base: GPT2Env, action: tuple[int, ...]) -> tuple[GPT2Env, float, float]:
        """A fork trained ``horizon_steps`` under ``action``; returns (fork, validation loss, FLOPs)."""
        with self.timed_io():
            fork = base.fork()
        fork.episode_steps = base.episode_steps
        flops = 0.0
        windows = max(1, math.ceil(self.horizon_steps / base.decision_interval))
        hold = holding_action(action)
        for w in range(windows):
            if fork._done:
                break
            _, _, terminated, _, finfo = fork.step(np.asarray(action if w == 0 else hold, dtype=np.int64))
            flops += float(finfo["flops"])
            if terminated:
                break
        with fork._own_rng():
            val = fork.trainer.evaluate(max_windows=self.val_windows, split="validation")["val_loss"]
        score = val if math.isfinite(val) and not fork._last_info.get("diverged") else math.inf
        return fork, score, flops

    def _decide(self, base: GPT2Env) -> None:
        results = []
        for name in self.candidates:
            fork, score, flops = self._rollout(base, ORACLE_CANDIDATES[name])
            results.append((score, self.candidates.index(name), name, fork, flops))
        best = min(results, key=lambda r: (r[0], r[1]))
        for _, _, _, fork, flops in results:
            if fork is not best[3]:
                self.extra_flops += flops
                fork.close()
        score, _, name, fork, _ = best
        with self.timed_io():
            base._load_env_state(copy.deepcopy(fork._env_state()))
        fork.close()
        self._hold = holding_action(ORACLE_CANDIDATES[name])
        self.choices.append({"global_step": int(base.trainer.global_step), "choice": name,
                             "scores": {r[2]: (r[0] if math.isfinite(r[0]) else None) for r in results}})
        self.record("oracle", ORACLE_CANDIDATES[name],
                    f"oracle: {name} had the lowest validation loss ({score:.4f}) after {self.horizon_steps} steps "
                    f"of {len(results)} forks")

    def describe(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for c in self.choices:
            counts[c["choice"]] = counts.get(c["choice"], 0) + 1
        return {**super().describe(), "budget_exempt": True, "every_windows": self.every_windows,
                "horizon_steps": self.horizon_steps, "val_windows": self.val_windows,
                "candidates": self.candidates, "choices": counts}
