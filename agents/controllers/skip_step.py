"""OLMo-core's skip-step AdamW: skip the update of a step whose loss or grad norm is an outlier.

Reference: 2024_OLMo_OLMo2 (``assets/related_work.md``): OLMo 2 trains with OLMo-core's
``SkipStepAdamW`` (``src/olmo_core/optim/skip_step_optimizer.py`` and ``adamw.py``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np

from agents.controllers.base import Controller
from stso_env.envs.gpt2_env import NEUTRAL_ACTION


def min_history(rolling_interval_length: int) -> int:
    """OLMo-core's warm-up: no step is skipped while fewer than ``max(2, L // 2)`` values, the
    current one included, have been recorded (64 for ``L = 128``)."""
    return max(2, rolling_interval_length // 2)


def skip_decision(losses: Sequence[float], grad_norms: Sequence[float], loss: float, grad_norm: float, *,
                  rolling_interval_length: int = 128, sigma_factor: float = 6.0) -> bool:
    """True when OLMo-core's ``SkipStepOptimizer.get_step_factor`` would skip this step.

    ``losses`` / ``grad_norms``: the values recorded before this step, oldest first (only the last
    ``rolling_interval_length`` are used). The step is skipped when
    ``loss - mean > sigma_factor * std`` or ``grad_norm - mean > sigma_factor * std`` over those
    values (one-sided; ``std`` with Bessel's correction, as ``torch.std_mean``), once
    :func:`min_history` values, the current one included, exist. Reference: 2024_OLMo_OLMo2.
    """
    L = int(rolling_interval_length)
    prev_l, prev_g = list(losses)[-L:], list(grad_norms)[-L:]
    if len(prev_l) + 1 < min_history(L):
        return False
    for prev, x in ((prev_l, loss), (prev_g, grad_norm)):
        h = np.asarray(prev, dtype=np.float64)
        if len(h) < 2:  # torch.std_mean of one value is NaN: the comparison fails, OLMo-core skips
            return True
        if not (x - h.mean() <= sigma_factor * h.std(ddof=1)):
            return True
    return False


class SkipStep(Controller):
    """OLMo-core's skip-step AdamW (``SkipStepAdamW``, used to train OLMo 2) on the run's AdamW:
    a step whose loss or total grad norm is more than ``sigma_factor`` standard deviations above
    the mean of the recent steps computes its loss and gradient but does not update the model.
    Reference: 2024_OLMo_OLMo2.

    The rule, copied from ``olmo_core/optim/skip_step_optimizer.py`` (:func:`skip_decision`):
    every step's batch loss and pre-clipping total grad norm are appended to rolling lists of
    ``rolling_interval_length + 1`` values (the current one last); once the lists hold
    ``max(2, rolling_interval_length // 2)`` values the step is skipped when
    ``loss - mean > sigma_factor * std`` or ``grad_norm - mean > sigma_factor * std``, mean and
    ``std`` (``torch.std_mean``, unbiased) over the previous values. Defaults copied from OLMo-core:
    ``rolling_interval_length = 128``, ``sigma_factor = 6``, minimum history ``128 // 2 = 64``
    values (the current one included, so 63 previous ones). A skipped step in OLMo-core has step
    factor 0: no weight decay, Adam moments untouched, Adam's step count not advanced, while the LR
    scheduler, which follows the trainer's step, still advances. Here that is the trainer's
    one-shot ``veto_update``: a ``pre_update_hooks`` hook sets it, the step's loss and gradient are
    still measured and reported (``StepStats.skipped`` is True), ``optimizer.step()`` is not called
    and ``scheduler.step()`` is. Gradient clipping stays as configured (the action's clip choice is
    "off": the static ``optim.max_grad_norm`` cap of 1.0); the grad norm the rule sees is the norm
    before clipping, as OLMo-core's train module passes it. That is the recipe OLMo 2 32B was
    trained with (``src/scripts/official/OLMo2/OLMo-2-0325-32B-train.py``: ``SkipStepAdamWConfig``
    with the default window and sigma, ``max_grad_norm=1.0``).

    Skipped steps and the statistics: in OLMo-core's code every step's loss and grad norm enter
    the rolling window, skipped or not (``latest_loss`` is set before ``step()`` on every step), so
    that is the default (``exclude_skipped=False``). ``exclude_skipped=True`` keeps skipped steps
    out of the window (the reading in GUIDE section 4); beware that a lasting level shift of
    more than ``sigma_factor`` sigma then freezes training, because every later step is skipped
    and none enters the window. Non-finite steps never reach the rule: the trainer drops their
    update itself and they are not recorded (in OLMo-core a NaN would poison the window).

    The env's opening window runs before the controller, so the history starts at the
    controller's first window and skipping can begin ``min_history - 1`` steps later.

    History across fork and restore: the history is a per-step log keyed by the trainer's global
    step, plus a fingerprint of the trainer's state at the start of every step it saw (the
    trainer's saved loss and grad-norm EMAs, which depend on every earlier step). Each step, a
    ``pre_step_hooks`` hook compares the trainer with the log: at a step seen before with the same
    fingerprint (``env.restore`` to an earlier snapshot of this trajectory) the log is cut back to
    that step, so replaying the same actions gives the same skip decisions; at a step after the
    last one seen, or one seen with another fingerprint (a restore into another trajectory, or a
    rebuilt trainer), the history restarts empty (warm-up again; a ``history_reset`` decision
    records it). ``env.unwrapped.fork()`` copies the trainer but not its hooks, so a fork trains
    with plain AdamW; to run skip-step on a fork, attach a second controller to it and give it
    this one's ``state_dict()`` (``load_state_dict``), after which both decide alike.

    Settings:
        rolling_interval_length: steps in the rolling window (OLMo-core default 128).
        sigma_factor: standard deviations above the mean that skip a step (OLMo-core default 6).
        exclude_skipped: keep skipped steps out of the window (default False, as OLMo-core).
    """

    name = "skip_step"

    def __init__(self, rolling_interval_length: int = 128, sigma_factor: float = 6.0,
                 exclude_skipped: bool = False) -> None:
        super().__init__()
        if int(rolling_interval_length) < 2 or not (math.isfinite(sigma_factor) and sigma_factor > 0):
            raise ValueError(f"SkipStep: rolling_interval_length={rolling_interval_length!r} must be an integer "
                             f">= 2 and sigma_factor={sigma_factor!r} a finite number > 0 (OLMo-core: 128, 6)")
        self.rolling_interval_length = int(rolling_interval_length)
        self.sigma_factor = float(sigma_factor)
        self.exclude_skipped = bool(exclude_skipped)
        #: one entry per step whose update the rule judged: step, loss, grad_norm, skipped
        self.log: list[dict[str, Any]] = []
        #: global step -> fingerprint of the trainer at the start of that step
        self.seen: dict[int, tuple] = {}
        self.history_resets = 0
        self._trainer: Any = None

    # ------------------------------------------------------------------ interface

    def reset(self, env: gym.Env, *, seed: int, run_name: str) -> None:
        self.close()
        super().reset(env, seed=seed, run_name=run_name)
        self.log, self.seen, self.history_resets = [], {}, 0
        self._attach()

    def _attach(self) -> None:
        self._trainer = self.base.trainer
        self._trainer.pre_step_hooks.append(self._pre_step)
        self._trainer.pre_update_hooks.append(self._pre_update)

    def act(self, obs: np.ndarray, info: dict[str, Any]) -> np.ndarray:
        # A restore with another seed rebuilds the env's trainer; follow it (the fingerprint check
        # decides whether the history still applies).
        if self.base.trainer is not self._trainer:
            self.close()
            self._attach()
        self._check_lineage(self._trainer)
        return np.asarray(NEUTRAL_ACTION, dtype=np.int64)

    def close(self) -> None:
        if self._trainer is not None:
            if self._pre_step in self._trainer.pre_step_hooks:
                self._trainer.pre_step_hooks.remove(self._pre_step)
            if self._pre_update in self._trainer.pre_update_hooks:
                self._trainer.pre_update_hooks.remove(self._pre_update)
        self._trainer = None

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """The rule's history (plain data): give it to a controller attached to a fork."""
        return {"log": copy.deepcopy(self.log), "seen": dict(self.seen), "history_resets": self.history_resets}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.log = copy.deepcopy(list(state["log"]))
        self.seen = {int(k): tuple(v) for k, v in state["seen"].items()}
        self.history_resets = int(state.get("history_resets", 0))

    @staticmethod
    def fingerprint(trainer: Any) -> tuple:
        """The trainer's saved loss / grad-norm EMAs: equal states of one run have equal EMAs, and
        two trajectories that differ anywhere before this step differ in them."""
        return (trainer.global_step, trainer.ema.get("loss"), trainer.ema.get("grad_norm"))

    def _check_lineage(self, trainer: Any) -> None:
        """Bring the log in line with the trainer's position (see the class docstring)."""
        t, fp = int(trainer.global_step), self.fingerprint(trainer)
        if t in self.seen:
            if self.seen[t] == fp:  # back at a known state of this trajectory: forget what came after
                self.log = [e for e in self.log if e["step"] < t]
                self.seen = {s: f for s, f in self.seen.items() if s <= t}
                return
        elif not self.seen or t == max(self.seen) + 1:
            self.seen[t] = fp
            return
        self._reset_history(t)
        self.seen[t] = fp

    def _reset_history(self, step: int) -> None:
        had = bool(self.log)
        self.log, self.seen = [], {}
        if had:
            self.history_resets += 1
            self.decisions.append({"global_step": int(step), "kind": "history_reset",
                                   "action": list(NEUTRAL_ACTION),
                                   "reason": "skip-step: the trainer is in a state this history did not lead to "
                                             "(restore into another trajectory); statistics restart"})

    # ------------------------------------------------------------------ hooks

    def _pre_step(self, trainer: Any) -> None:
        self._check_lineage(trainer)

    def window(self) -> tuple[list[float], list[float]]:
        """The values the next decision compares against (oldest first)."""
        rows = [e for e in self.log if not (self.exclude_skipped and e["skipped"])]
        rows = rows[-self.rolling_interval_length:]
        return [e["loss"] for e in rows], [e["grad_norm"] for e in rows]

    def _pre_update(self, trainer: Any) -> None:
        """Decide this step: record its loss and raw grad norm, veto the update of an outlier."""
        loss, gnorm = float(trainer.step_loss), float(trainer.step_grad_norm)
        losses, gnorms = self.window()
        skip = skip_decision(losses, gnorms, loss, gnorm, rolling_interval_length=self.rolling_interval_length,
                             sigma_factor=self.sigma_factor)
        step = int(trainer.global_step)
        self.log.append({"step": step, "loss": loss, "grad_norm": gnorm, "skipped": skip})
        if skip:
            trainer.veto_update = True
            self.decisions.append({
                "global_step": step, "kind": "skip_step", "action": list(NEUTRAL_ACTION),
                "reason": f"loss {loss:.4g} or grad norm {gnorm:.4g} above mean + {self.sigma_factor:g} sigma of "
                          f"the last {len(losses)} steps: update skipped"})

    # ------------------------------------------------------------------ report

    @property
    def skipped_steps(self) -> list[int]:
        return [e["step"] for e in self.log if e["skipped"]]

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(), "rolling_interval_length": self.rolling_interval_length,
            "sigma_factor": self.sigma_factor, "min_history": min_history(self.rolling_interval_length),
            "exclude_skipped": self.exclude_skipped, "skipped_steps": self.skipped_steps,
            "judged_steps": len(self.log), "history_resets": self.history_resets,
            "variant": "OLMo-core SkipStepAdamW rule on torch AdamW"
                       + (", skipped steps kept out of the window" if self.exclude_skipped else ""),
        }
