"""The one small interface every controller implements, and what it reports.

A controller steers one STSO-GPT2-v0 run (the *main run*). The evaluation
harness (``agents.evaluate``) and ``agents.train_controller`` drive it the same
way::

    obs, info = env.reset(seed=s)
    ctrl.reset(env, seed=s, run_name=name)
    while not done and budget left:
        action = ctrl.act(obs, info)          # may fork, verify, exploit, ...
        obs, reward, terminated, truncated, info = env.step(action)
    ctrl.close()

``act`` returns a MultiDiscrete action of the env (see the env docstring).
Methods that need more than observe/act get it from the env itself:
``env.unwrapped.fork()`` for forks and population members,
``env.unwrapped.trainer`` for per-optimizer-step hooks (``pre_step_hooks``,
``pre_update_hooks``, ``post_update_hooks``, the one-shot ``veto_update`` and the
``max_grad_norm_override``; used by SPAM, hypergradient descent, skip-step and
StableAdamW, which act inside a window).

Accounting, read by the harness after the episode:

* ``extra_flops``: training FLOPs spent outside the main run's kept
  trajectory: forks, verification rollouts, population members, and main-run
  steps a rollback undid (a fork the run continues as, an adopted one, is the
  main run and does not count here). The harness adds them to the main run's
  FLOPs and stops the run when the sum reaches the shared budget.
* ``main_run_share``: the share of the budget the main run is planned to get;
  the harness shortens the main run's schedule (``episode_steps``) to it, so a
  population of 4 trains 4 runs a quarter as long instead of stopping one run
  a quarter of the way through its schedule.
* ``io_seconds``: wall time spent saving, restoring or copying run state.
* ``proxy_ms``: one entry per proxy scoring call, in milliseconds.
* ``decisions``: the timeline of what the controller did beyond the neutral
  action (``{"global_step", "kind", "action", "reason"}``).
* ``branch_invocations``: branch decisions taken (0 for methods without branching).
* ``tuning_flops``: FLOPs spent once per setting before the run (``tuned_fixed``'s LR sweep),
  reported beside the budget, not charged to it.
* ``budget_exempt``: the hindsight oracle is not stopped by the budget and is reported apart.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np

from stso_env.envs.gpt2_env import NEUTRAL_ACTION, GPT2Env


def window_trigger(info: dict[str, Any], obs: np.ndarray | None = None) -> bool:
    """Whether the uncertainty index's trigger was on at any step of the window just run
    (``info["trigger_in_window"]``). The trigger at the window's last step alone misses most spikes:
    a garbage burst drives the index far over tau and, within the same window, back under
    ``tau - hysteresis`` (measured on a tiny spiky run: index 16-18 inside the burst's window,
    2.2 at its end). Falls back to ``info["trigger"]``, then to the observation's ``trigger``."""
    if "trigger_in_window" in info:
        return bool(info["trigger_in_window"]) or bool(info.get("trigger", False))
    if "trigger" in info:
        return bool(info["trigger"])
    from stso_env.monitor.monitor import OBSERVATION_NAMES

    return obs is not None and bool(obs[OBSERVATION_NAMES.index("trigger")] > 0.5)


class Controller:
    """Base class: the neutral action every window, with empty accounting (subclasses override ``act``)."""

    #: registry name (``--controllers`` of ``agents.evaluate``)
    name: ClassVar[str] = "base"
    #: share of the FLOPs budget the main run is planned to get (see the module docstring)
    main_run_share: float = 1.0
    #: True for the hindsight oracle: reported apart and not stopped by the budget
    budget_exempt: bool = False

    def __init__(self) -> None:
        self.env: gym.Env | None = None
        self.seed = 0
        self.run_name = ""
        self.extra_flops = 0.0
        self.io_seconds = 0.0
        self.proxy_ms: list[float] = []
        self.decisions: list[dict[str, Any]] = []
        self.branch_invocations = 0
        #: FLOPs spent once per setting before any run (an LR sweep), reported beside the budget
        self.tuning_flops = 0.0

    # ------------------------------------------------------------------ interface

    def reset(self, env: gym.Env, *, seed: int, run_name: str) -> None:
        """Start steering ``env`` (already reset with ``seed``); clears the accounting."""
        base = env.unwrapped
        if not isinstance(base, GPT2Env) or base.trainer is None:
            raise TypeError(f"{type(self).__name__}.reset: expected a reset STSO-GPT2-v0 env, got "
                            f"{type(base).__name__}; call env.reset(seed=...) first")
        self.env, self.seed, self.run_name = env, int(seed), run_name
        self.extra_flops = 0.0
        self.io_seconds = 0.0
        self.proxy_ms = []
        self.decisions = []
        self.branch_invocations = 0

    def act(self, obs: np.ndarray, info: dict[str, Any]) -> np.ndarray:
        """The action for the next window, given the latest observation and info."""
        return np.asarray(NEUTRAL_ACTION, dtype=np.int64)

    def close(self) -> None:
        """Release forks, hooks and other resources (the main env stays open)."""

    # ------------------------------------------------------------------ helpers for subclasses

    @property
    def base(self) -> GPT2Env:
        if self.env is None:
            raise RuntimeError(f"{type(self).__name__}: call reset(env, ...) before act()")
        return self.env.unwrapped

    @contextmanager
    def timed_io(self) -> Iterator[None]:
        """Count the wrapped block as checkpoint/state I/O time."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.io_seconds += time.perf_counter() - t0

    def record(self, kind: str, action: Any, reason: str) -> None:
        """Add a decision to the timeline at the main run's current step."""
        self.decisions.append({"global_step": int(self.base.trainer.global_step), "kind": kind,
                               "action": [int(a) for a in np.asarray(action).tolist()], "reason": reason})

    def describe(self) -> dict[str, Any]:
        """Settings for reports (override to add a method's parameters)."""
        return {"name": self.name, "main_run_share": self.main_run_share}
