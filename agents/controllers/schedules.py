"""Schedule baselines: the configured schedule untouched, and fixed rules on the uncertainty index."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

from agents.controllers.base import Controller, window_trigger
from stso_env.envs.gpt2_env import LR_CHANGES, NEUTRAL_ACTION

#: observation indices (``assets/state_schema_v1.yaml``)
OBS_UNCERTAINTY_INDEX = 47

_LR_DOWN, _LR_HOLD, _LR_UP = 0, 2, 3  # lr_change choices x0.8, x1.0, x1.1
_CLIP_OFF, _CLIP_ZCLIP = 0, 1


class FixedSchedule(Controller):
    """The configured warm-up + cosine schedule with no intervention: the neutral action
    ``[2, 1, 0, 0, 0, 0]`` (LR x1, weight decay x1, clipping off apart from the static
    ``optim.max_grad_norm`` cap, no reset/reorder/skip) every window. No settings.

    The recipe it keeps: GPT-2 (2019_Radford_GPT2) trained with AdamW (2019_Loshchilov_AdamW,
    on 2015_Kingma_Adam), warm-up + cosine LR and global-norm clipping at 1.0.
    """

    name = "fixed"


class RuleBased(Controller):
    """Ablation A: fixed, hand-written rules on the monitor's uncertainty index (no proxy, no branching).
    No paper of its own; the clipping it switches on is ZClip (2025_Kumar_ZClip), which replaces the
    static norm cap while it is on.

    Rules, checked every window on the trigger (any step of the window,
    :func:`~agents.controllers.base.window_trigger`, else observation index 48;
    the index itself, observation 47 / ``info["uncertainty_index"]``, is only reported):

    * **fire** (triggered): LR x0.8 (choice 0) and ZClip (clip choice 1), except that the LR is
      not lowered below ``min_lr_scale`` (the current scale is ``info["lr_scale"]``; at the floor
      the LR holds and only ZClip is applied).
    * **hold** (untriggered, fewer than ``calm_windows`` calm windows since the last firing): LR
      unchanged, ZClip stays on.
    * **restore** (``calm_windows`` untriggered windows in a row): clipping back off and the LR
      back toward 1.0 in x1.1 steps, one per window, taken while a step brings the scale closer to
      1.0 (so it stops within x1.1 of 1.0 and never overshoots further than it started).

    Before the first firing and after a finished restore the action is the neutral one. Every
    non-neutral window is recorded as a decision of kind ``"rule"``.

    Settings:
        min_lr_scale: LR scale floor of the fire rule (default 0.25).
        calm_windows: untriggered windows needed before restoring (default 5).
    """

    name = "rule"

    def __init__(self, min_lr_scale: float = 0.25, calm_windows: int = 5) -> None:
        super().__init__()
        if not 0 < min_lr_scale <= 1:
            raise ValueError(f"RuleBased: min_lr_scale={min_lr_scale!r} must be in (0, 1] (e.g. 0.25)")
        if calm_windows < 1:
            raise ValueError(f"RuleBased: calm_windows={calm_windows!r} must be >= 1 (e.g. 5)")
        self.min_lr_scale = float(min_lr_scale)
        self.calm_windows = int(calm_windows)
        self.active = False  # a firing happened and has not been fully restored yet
        self.calm = 0
        self.firings = 0

    def reset(self, env: gym.Env, *, seed: int, run_name: str) -> None:
        super().reset(env, seed=seed, run_name=run_name)
        self.active, self.calm, self.firings = False, 0, 0

    def act(self, obs: np.ndarray, info: dict[str, Any]) -> np.ndarray:
        triggered = window_trigger(info, obs)
        index = float(info.get("uncertainty_index", obs[OBS_UNCERTAINTY_INDEX]))
        scale = float(info["lr_scale"]) if "lr_scale" in info else float(self.base.trainer.knobs.lr_scale)
        action = np.asarray(NEUTRAL_ACTION, dtype=np.int64)
        if triggered:
            self.active, self.calm = True, 0
            self.firings += 1
            lower = scale * LR_CHANGES[_LR_DOWN] >= self.min_lr_scale - 1e-12
            action[0] = _LR_DOWN if lower else _LR_HOLD
            action[2] = _CLIP_ZCLIP
            reason = (f"trigger (index {index:+.2f}): LR x0.8 to {scale * 0.8:.3f} and ZClip" if lower else
                      f"trigger (index {index:+.2f}): ZClip, LR held at the floor {scale:.3f}")
            self.record("rule", action, reason)
            return action
        if not self.active:
            return action
        self.calm += 1
        if self.calm < self.calm_windows:
            action[2] = _CLIP_ZCLIP
            self.record("rule", action, f"hold: {self.calm}/{self.calm_windows} calm windows, ZClip on")
            return action
        # Restore: clipping off; LR up by x1.1 while that brings it closer to 1.0.
        up = LR_CHANGES[_LR_UP]
        if abs(scale * up - 1.0) < abs(scale - 1.0):
            action[0] = _LR_UP
            self.record("rule", action, f"restore: {self.calm} calm windows, LR x1.1 to {scale * up:.3f}, "
                                        "clip off")
        else:
            self.active = False
            if self.calm == self.calm_windows:  # the clip-off switch itself is a rule firing
                self.record("rule", action, f"restore: {self.calm} calm windows, clip off, LR at {scale:.3f}")
        return action

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "min_lr_scale": self.min_lr_scale, "calm_windows": self.calm_windows,
                "firings": self.firings}
