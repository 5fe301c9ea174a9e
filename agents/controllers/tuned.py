"""The fixed schedule at a tuned learning rate: what a practitioner gets from a small LR sweep."""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

from agents.controllers.base import Controller
from stso_env.config import apply_overrides, config_hash
from stso_env.envs.gpt2_env import NEUTRAL_ACTION, GPT2Env
from stso_env.files import write_text_atomic

DEFAULT_GRID = (0.5, 0.7, 1.0, 1.4, 2.0)
#: Seeds of the tuning runs: apart from every evaluation seed range the project uses.
DEFAULT_TUNING_SEEDS = (900_001,)


class TunedFixed(Controller):
    """The fixed schedule with the best LR multiplier of a small grid, chosen on the validation split.

    Before its first run on a setting (scenario, corpus, model and schedule, all but the seed), it
    trains one full run per multiplier in ``grid`` and tuning seed (``tuning_seeds``, disjoint from
    evaluation seeds), each under the fixed schedule with that LR scale, and picks the multiplier with
    the lowest mean loss on ``val_windows`` windows of the *validation* split (a diverged run scores
    infinity). The main run then trains under the fixed schedule at that scale. The choice and the
    FLOPs the sweep cost are cached in ``tuning_dir`` (one JSON file per setting, written atomically
    under a file lock, so parallel workers tune once), and every run reports the sweep's FLOPs as
    ``tuning_flops`` beside its budget instead of hiding them: they are spent once per setting,
    not per run. The main run's first window (run by ``reset`` before a controller acts) is at the
    nominal LR, inside the warm-up.

    Settings:
        grid: LR multipliers tried (default 0.5, 0.7, 1.0, 1.4, 2.0).
        tuning_seeds: seeds of the tuning runs (default 900001).
        val_windows: validation windows of the selection score (default 64).
    """

    name = "tuned_fixed"

    def __init__(self, grid: list[float] | tuple[float, ...] = DEFAULT_GRID,
                 tuning_seeds: list[int] | tuple[int, ...] = DEFAULT_TUNING_SEEDS, val_windows: int = 64,
                 tuning_dir: str | Path | None = None) -> None:
        super().__init__()
        grid = tuple(float(g) for g in grid)
        if not grid or any(not (math.isfinite(g) and g > 0) for g in grid):
            raise ValueError(f"tuned_fixed: grid {grid!r} must be a non-empty list of positive LR multipliers")
        if not tuning_seeds or val_windows < 1:
            raise ValueError(f"tuned_fixed: need at least one tuning seed and val_windows >= 1 (got {tuning_seeds!r}, "
                             f"{val_windows})")
        self.grid, self.tuning_seeds, self.val_windows = grid, tuple(int(s) for s in tuning_seeds), int(val_windows)
        self.tuning_dir = Path(tuning_dir) if tuning_dir is not None else None
        self.tuning: dict[str, Any] = {}
        self.tuning_flops = 0.0

    def reset(self, env: gym.Env, *, seed: int, run_name: str) -> None:
        super().reset(env, seed=seed, run_name=run_name)
        if seed in self.tuning_seeds:
            raise ValueError(f"tuned_fixed: evaluation seed {seed} is one of the tuning seeds {self.tuning_seeds}; "
                             "pick other seeds")
        self.tuning = self._tuned(self.base)
        self.tuning_flops = float(self.tuning["tuning_flops"])
        self.base.trainer.knobs.lr_scale = float(self.tuning["lr_scale"])
        self.record("tuned_lr", NEUTRAL_ACTION, f"LR x{self.tuning['lr_scale']:g} chosen by validation loss over "
                                                f"{len(self.grid)} multipliers x {len(self.tuning_seeds)} tuning seeds")

    def act(self, obs: np.ndarray, info: dict[str, Any]) -> np.ndarray:
        return np.asarray(NEUTRAL_ACTION, dtype=np.int64)

    # ------------------------------------------------------------------ the sweep

    def _key(self, base: GPT2Env) -> str:
        setting = {"config": config_hash(apply_overrides(base.base_config, {"seed": 0})),
                   "episode_steps": base.episode_steps, "decision_interval": base.decision_interval,
                   "grid": self.grid, "tuning_seeds": self.tuning_seeds, "val_windows": self.val_windows}
        return hashlib.sha256(json.dumps(setting, sort_keys=True).encode()).hexdigest()[:16]

    @contextmanager
    def _locked(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_suffix(".lock"), "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _tuned(self, base: GPT2Env) -> dict[str, Any]:
        if self.tuning_dir is None:
            return self._sweep(base)
        path = self.tuning_dir / f"tuned_fixed__{self._key(base)}.json"
        with self._locked(path):
            if path.is_file():
                return json.loads(path.read_text())
            result = self._sweep(base)
            write_text_atomic(path, json.dumps(result, indent=2) + "\n")
            return result

    def _sweep(self, base: GPT2Env) -> dict[str, Any]:
        kwargs = dict(base._kwargs, run_dir=None)
        scores: dict[str, list[float | None]] = {}
        flops = 0.0
        for mult in self.grid:
            scores[f"{mult:g}"] = []
            for tseed in self.tuning_seeds:
                env = GPT2Env(**kwargs)
                try:
                    env.episode_steps = base.episode_steps
                    env.reset(seed=tseed)
                    env.trainer.knobs.lr_scale = mult
                    while not env._done:
                        _, _, terminated, truncated, _ = env.step(np.asarray(NEUTRAL_ACTION, dtype=np.int64))
                        if terminated or truncated:
                            break
                    flops += float(env._total_flops)
                    with env._own_rng():
                        val = env.trainer.evaluate(max_windows=self.val_windows, split="validation")["val_loss"]
                    ok = math.isfinite(val) and not env._last_info.get("diverged")
                    scores[f"{mult:g}"].append(float(val) if ok else None)
                finally:
                    env.close()

        def mean_score(vals: list[float | None]) -> float:
            return math.inf if any(v is None for v in vals) else float(np.mean(vals))

        best = min(self.grid, key=lambda m: (mean_score(scores[f"{m:g}"]), abs(math.log(m))))
        return {"lr_scale": best, "val_loss": scores, "tuning_flops": flops, "grid": list(self.grid),
                "tuning_seeds": list(self.tuning_seeds), "val_windows": self.val_windows}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "grid": list(self.grid), "tuning_seeds": list(self.tuning_seeds),
                "val_windows": self.val_windows, "lr_scale": self.tuning.get("lr_scale"),
                "tuning_flops": self.tuning_flops, "tuning_val_loss": self.tuning.get("val_loss")}
