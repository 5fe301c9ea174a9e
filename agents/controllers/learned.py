"""A learned policy (``policy.zip`` from ``agents.train_controller``) as a controller.

The file is a Stable-Baselines3 zip. Its algorithm is read from the file's own
metadata (``policy_class`` in its ``data`` entry): a ``MaskablePPO`` policy is
loaded with sb3-contrib and queried with the env's ``action_masks()``, a plain
``PPO`` policy with stable-baselines3. Actions are deterministic (the mode of
the policy's distribution), so an evaluation is repeatable.

Trust: SB3 stores parts of a model's metadata with cloudpickle, so loading a
``policy.zip`` runs code from it, unlike STSO's own checkpoints (``.ptz``),
which never unpickle. The module of the policy class is checked first, but
load only policies you trust, as with any SB3 model.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from agents.controllers.base import Controller


def policy_algorithm(path: str | Path) -> str:
    """``"maskable_ppo"`` or ``"ppo"``: which algorithm saved the SB3 zip at ``path``."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"policy {p}: no such file; train one with `python -m agents.train_controller`")
    try:
        with zipfile.ZipFile(p) as zf:
            data = json.loads(zf.read("data"))
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError) as exc:
        raise ValueError(f"policy {p}: not a Stable-Baselines3 zip ({exc}); pass the policy.zip a "
                         "training run wrote") from None
    pc = data.get("policy_class")
    module = pc.get("__module__", "") if isinstance(pc, dict) else ""
    if not module.startswith(("sb3_contrib", "stable_baselines3")):
        raise ValueError(f"policy {p}: policy class from module {module!r}; expected a Stable-Baselines3 "
                         "or sb3-contrib actor-critic policy")
    return "maskable_ppo" if ".maskable." in module else "ppo"


def load_policy(path: str | Path) -> Any:
    """Load an SB3 model from ``path`` (MaskablePPO or PPO, see :func:`policy_algorithm`) on CPU."""
    algo = policy_algorithm(path)
    if algo == "maskable_ppo":
        from sb3_contrib import MaskablePPO

        return MaskablePPO.load(str(path), device="cpu")
    from stable_baselines3 import PPO

    return PPO.load(str(path), device="cpu")


class LearnedPolicy(Controller):
    """Acts with a saved policy: ``model.predict(obs, deterministic=True)`` (with masks for MaskablePPO).

    References: 2017_Schulman_PPO, 2020_Huang_InvalidActionMasking (MaskablePPO's masking),
    2021_Raffin_StableBaselines3 (``assets/related_work.md``).
    """

    name = "policy"

    def __init__(self, policy_path: str | Path) -> None:
        super().__init__()
        self.policy_path = Path(policy_path)
        self.algorithm = policy_algorithm(self.policy_path)
        self.model = load_policy(self.policy_path)

    def act(self, obs: np.ndarray, info: dict[str, Any]) -> np.ndarray:
        if self.algorithm == "maskable_ppo":
            action, _ = self.model.predict(obs, deterministic=True, action_masks=self.base.action_masks())
        else:
            action, _ = self.model.predict(obs, deterministic=True)
        action = np.asarray(action, dtype=np.int64).reshape(-1)
        if action.tolist() != [2, 1, 0, 0, 0, 0]:
            self.record("policy", action, "policy action differs from the neutral schedule")
        return action

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "policy_path": str(self.policy_path), "algorithm": self.algorithm}
