"""A scripted intervention schedule: given actions in given windows, the neutral action elsewhere.

It answers "what does this intervention do *here*?" without a policy in the way: the same
change at the same point of every seed, scored like any other controller (same budget, same
test split). ``configs/suites/adam_v_lag_anatomy.yaml`` uses it to find which interventions
move the ``adam_v_lag`` scenario's outcome, and when.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

from agents.controllers.base import Controller
from stso_env.envs.gpt2_env import ACTION_FIELDS, ACTION_NVEC, NEUTRAL_ACTION
from stso_env.envs.plumbing import checked_action


def parse_plan(plan: Any) -> list[tuple[int, int, tuple[int, ...]]]:
    """Check a plan and return it as ``(first, end, action)`` triples, sorted by ``first``.

    A plan is a list of ``{"from": w, "to": w_end, "action": [6 ints]}`` entries: windows
    ``from .. to - 1`` (``to`` defaults to ``from + 1``) of the main run (window ``w`` is the
    decision taken at optimizer step ``w * decision_interval``) play ``action``. Ranges may not
    overlap; every action must lie in the env's ``MultiDiscrete(ACTION_NVEC)`` space."""
    if not isinstance(plan, (list, tuple)):
        raise ValueError(f"scripted: plan must be a list of {{from, to, action}} entries, got {type(plan).__name__}")
    out: list[tuple[int, int, tuple[int, ...]]] = []
    for i, entry in enumerate(plan):
        where = f"scripted: plan[{i}]"
        if not isinstance(entry, dict) or "from" not in entry or "action" not in entry:
            raise ValueError(f"{where} = {entry!r}: needs the keys 'from' and 'action' ('to' is optional)")
        unknown = sorted(set(entry) - {"from", "to", "action"})
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; allowed: from, to, action")
        first, end = entry["from"], entry.get("to", None)
        end = first + 1 if end is None and isinstance(first, int) else end
        if not (isinstance(first, int) and isinstance(end, int)) or first < 0 or end <= first:
            raise ValueError(f"{where}: from={entry['from']!r}, to={entry.get('to')!r} must be integers with "
                             "0 <= from < to (windows from .. to - 1)")
        try:  # the env's own check of an action
            action = checked_action(entry["action"], ACTION_NVEC, ACTION_FIELDS)
        except ValueError as err:
            raise ValueError(f"{where}: action={entry['action']!r} must be {len(ACTION_NVEC)} integers, "
                             + ", ".join(f"{f} in 0..{n - 1}" for f, n in zip(ACTION_FIELDS, ACTION_NVEC))
                             + f" ({err})") from err
        out.append((first, end, tuple(int(a) for a in action)))
    out.sort()
    for (f0, e0, _), (f1, _, _) in zip(out, out[1:]):
        if f1 < e0:
            raise ValueError(f"scripted: plan windows {f0}..{e0 - 1} and {f1}.. overlap; give each window one action")
    return out


class ScriptedPlan(Controller):
    """Play a fixed plan of actions by window, the neutral action ``[2, 1, 0, 0, 0, 0]`` elsewhere.

    The window is the main run's optimizer step divided by the decision interval, so the plan is
    tied to training time, not to how many times ``act`` ran. The env's own semantics apply: the
    LR change compounds, weight decay and clip policy are set by every window's action (a plan
    that wants ZClip from window 15 on says so for windows 15 to the end), momentum reset,
    reorder and skip act on the window's first step. Every window that plays a non-neutral
    action is recorded as a decision of kind ``"scripted"``.

    Settings:
        plan: list of ``{from, to, action}`` entries (:func:`parse_plan`); empty: the fixed schedule.
    """

    name = "scripted"

    def __init__(self, plan: list[dict[str, Any]] | None = None) -> None:
        super().__init__()
        self.plan = parse_plan(plan or [])

    def reset(self, env: gym.Env, *, seed: int, run_name: str) -> None:
        super().reset(env, seed=seed, run_name=run_name)
        self._interval = int(self.base.decision_interval)

    def action_at(self, window: int) -> np.ndarray:
        """The plan's action for ``window`` (the neutral action outside every range)."""
        for first, end, action in self.plan:
            if first <= window < end:
                return np.asarray(action, dtype=np.int64)
        return np.asarray(NEUTRAL_ACTION, dtype=np.int64)

    def act(self, obs: np.ndarray, info: dict[str, Any]) -> np.ndarray:
        window = int(self.base.trainer.global_step) // self._interval
        action = self.action_at(window)
        if tuple(action.tolist()) != NEUTRAL_ACTION:
            self.record("scripted", action, f"plan: window {window}")
        return action

    def describe(self) -> dict[str, Any]:
        return {**super().describe(),
                "plan": [{"from": f, "to": e, "action": list(a)} for f, e, a in self.plan]}
