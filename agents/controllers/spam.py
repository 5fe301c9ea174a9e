"""SPAM: Spike-Aware Adam with Momentum Reset (Huang et al., ICLR 2025), on top of the run's AdamW.

Reference: 2025_Huang_SPAM (``assets/related_work.md``).
"""

from __future__ import annotations

import math
from typing import Any

import gymnasium as gym
import numpy as np

from agents.controllers.base import Controller
from stso_env.envs.gpt2_env import CLIP_POLICIES, NEUTRAL_ACTION

_CLIP_SPAM = CLIP_POLICIES.index("spam")


def warmup_factor(t: int, warmup_steps: int) -> float:
    """SPAM's update scale ``t`` steps after a momentum reset (``t = 0`` is the reset step).
    Reference: 2025_Huang_SPAM.

    The reference optimizer scales the update by ``1 - d(t)`` with ``d`` a cosine decay of a
    "death rate" from 0.99 to 0 (``CosineAnnealingLR`` over ``T_max + 1`` steps, 0 from
    ``T_max`` on): ``1 - 0.99 (1 + cos(pi t / (W + 1))) / 2`` for ``t < W``, then 1.
    """
    if warmup_steps <= 0 or t >= warmup_steps:
        return 1.0
    return 1.0 - 0.99 * 0.5 * (1.0 + math.cos(math.pi * t / (warmup_steps + 1)))


class SPAMController(Controller):
    """SPAM (Huang, Zhu, Jin, Liu, Wang, Liu, "SPAM: Spike-Aware Adam with Momentum Reset for Stable
    LLM Training", ICLR 2025, arXiv 2501.06842; reference code TianjinYellow/SPAM-Optimizer,
    ``SPAM.py``) assembled from the trainer's parts around its AdamW. Reference: 2025_Huang_SPAM.

    1. **Spike-aware clipping** every window (clip choice 3): an entry with ``g^2 > theta * v``
       (``v`` Adam's second moment before the step) becomes ``sign(g) sqrt(theta v)``;
       ``theta = clip.spam_theta`` (5000, the paper's value). As in the reference, clipping is off
       for the first ``clip_delay`` steps of every ``delta_t`` cycle (the reference's
       ``grad_accu_steps``: right after a reset ``v`` is re-accumulating), implemented by the hook
       below turning the clip knob off and back on.
    2. **Momentum reset** every ``delta_t`` optimizer steps: before the update of each step with
       ``(global_step + 1) % delta_t == 0`` (the reference's ``(total_step + 1) % DeltaT == 0``)
       *both* Adam moments (``exp_avg`` and ``exp_avg_sq``) are zeroed, as the reference does; the
       step count (bias correction) keeps running, also as in the reference.
    3. **Cosine LR warm-up** after each reset over ``warmup_steps`` steps, with the reference's
       shape (:func:`warmup_factor`: 0.01 on the reset step, rising along a cosine to 1 at
       ``warmup_steps``).

    Parts 2 and 3 run in a ``trainer.pre_step_hooks`` hook (registered in ``reset``, removed in
    ``close``). The hook owns ``trainer.knobs.lr_scale``: it sets it to ``1.0 x warm-up factor``
    every step, which the env leaves alone because the action's LR choice is the neutral x1.0.
    The warm-up therefore scales the whole AdamW step including its decoupled weight decay; the
    reference scales only the Adam part (its weight decay uses the unscaled LR).

    No global-norm clipping: SPAM's reference runs train without it (the launch scripts leave
    ``--grad_clipping`` at its default 0), so spike-aware clipping is the only clipping. The
    ``"spam"`` clip policy already drops the static ``optim.max_grad_norm`` cap; the controller
    also sets ``trainer.max_grad_norm_override = 0`` while attached, so the clip-delay steps (policy
    ``"off"``) run unclipped too, as in the reference, instead of under the 1.0 cap.

    Scaling to short runs: the paper's defaults are ``DeltaT = 500``, warm-up 150 steps (the
    reference's default; its launch script passes 1000, which we do not copy) and ``theta = 5000``
    for runs of 10k+ steps. Runs here are a few hundred to a few thousand steps, so the defaults
    are ``delta_t = 250`` (a reset still happens a few times per run) and ``warmup_steps = 25``
    (a tenth of the cycle, so most of each cycle trains at the full LR); ``clip_delay = 20`` and
    ``theta`` keep the reference's values. The variant that runs is "SPAM on torch AdamW with
    DeltaT=250, warm-up 25, theta 5000" unless the settings say otherwise.

    Settings:
        delta_t: optimizer steps between momentum resets (default 250).
        warmup_steps: steps of the cosine LR warm-up after each reset (default 25).
        clip_delay: steps at the start of each cycle without spike-aware clipping (default 20).
    """

    name = "spam"

    def __init__(self, delta_t: int = 250, warmup_steps: int = 25, clip_delay: int = 20) -> None:
        super().__init__()
        if delta_t < 1 or warmup_steps < 0 or clip_delay < 0:
            raise ValueError(f"SPAMController: delta_t={delta_t}, warmup_steps={warmup_steps}, clip_delay="
                             f"{clip_delay}: need delta_t >= 1 and warmup_steps, clip_delay >= 0 "
                             "(defaults 250, 25, 20)")
        self.delta_t = int(delta_t)
        self.warmup_steps = int(warmup_steps)
        self.clip_delay = int(clip_delay)
        self.base_lr_scale = 1.0
        self.last_reset: int | None = None
        self.resets: list[int] = []
        self._trainer: Any = None

    def reset(self, env: gym.Env, *, seed: int, run_name: str) -> None:
        self.close()
        super().reset(env, seed=seed, run_name=run_name)
        self.last_reset = None
        self.resets = []
        self._attach()

    def _attach(self) -> None:
        self._trainer = self.base.trainer
        self._trainer.pre_step_hooks.append(self._pre_step)
        self._trainer.max_grad_norm_override = 0.0  # no global-norm cap (see the class docstring)

    def act(self, obs: np.ndarray, info: dict[str, Any]) -> np.ndarray:
        # A restore with another seed rebuilds the env's trainer; follow it.
        if self.base.trainer is not self._trainer:
            self.close()
            self._attach()
        action = np.asarray(NEUTRAL_ACTION, dtype=np.int64)
        action[2] = _CLIP_SPAM
        return action

    def close(self) -> None:
        if self._trainer is not None:
            if self._pre_step in self._trainer.pre_step_hooks:
                self._trainer.pre_step_hooks.remove(self._pre_step)
            self._trainer.max_grad_norm_override = None
        self._trainer = None

    def _pre_step(self, trainer: Any) -> None:
        """Momentum reset, warm-up LR scale and clip gating for the step about to run."""
        total = trainer.global_step + 1  # the reference counts this step as total_step + 1
        if total % self.delta_t == 0:
            # Zero both moments in place: an overlapped checkpoint may still be reading them.
            trainer._barrier()
            for state in trainer.optimizer.state.values():
                for key in ("exp_avg", "exp_avg_sq"):
                    if key in state:
                        state[key].zero_()
            self.last_reset = int(trainer.global_step)
            self.resets.append(self.last_reset)
            self.record("momentum_reset", [2, 1, _CLIP_SPAM, 1, 0, 0],
                        f"SPAM: zero exp_avg and exp_avg_sq every {self.delta_t} steps, then a "
                        f"{self.warmup_steps}-step cosine LR warm-up")
        factor = 1.0 if self.last_reset is None else warmup_factor(trainer.global_step - self.last_reset,
                                                                   self.warmup_steps)
        trainer.knobs.lr_scale = self.base_lr_scale * factor
        clip_on = total >= self.clip_delay and total % self.delta_t >= self.clip_delay
        trainer.knobs.clip_policy = "spam" if clip_on else "off"

    def describe(self) -> dict[str, Any]:
        out = {**super().describe(), "delta_t": self.delta_t, "warmup_steps": self.warmup_steps,
               "clip_delay": self.clip_delay, "resets": list(self.resets), "max_grad_norm": 0.0,
               "variant": "SPAM on torch AdamW, no global-norm cap (as the reference runs)"}
        if self.env is not None:
            out["theta"] = float(self.base.trainer.cfg.clip.spam_theta)
        return out
