"""The hindsight oracle and the tuned fixed schedule, with known answers."""

from __future__ import annotations

import json
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

import stso_env  # noqa: F401
from agents.controllers import make_controller
from agents.controllers.oracle import ORACLE_CANDIDATES, holding_action
from agents.controllers.tuned import TunedFixed
from stso_env.config import TrainConfig, apply_overrides
from stso_env.envs.gpt2_env import NEUTRAL_ACTION


def _env(steps: int = 60):
    cfg = apply_overrides(TrainConfig(), {"data.builtin_chars": 100_000})
    return gym.make("STSO-GPT2-v0", preset="tiny", scenario="calm", decision_interval=10, episode_steps=steps,
                    config=cfg)


def test_holding_action_keeps_only_persistent_parts() -> None:
    assert holding_action((0, 2, 3, 1, 1, 1)).tolist() == [2, 2, 3, 0, 0, 0]
    assert holding_action(NEUTRAL_ACTION).tolist() == list(NEUTRAL_ACTION)


def test_oracle_adopts_the_best_fork() -> None:
    """One decision over two candidates: the main run continues as the fork with the lower validation loss
    (its windows become the main run's lineage), and only the other fork's FLOPs are extra."""
    env = _env()
    env.reset(seed=1)
    base = env.unwrapped
    step_flops = base.trainer.flops_per_token * base.trainer.seq_len * base.trainer.cfg.data.batch_size
    # The expected outcome, by hand: each candidate on its own fork for one window, scored on validation.
    scores = {}
    for name in ("neutral", "lr_x0.8"):
        fork = base.fork()
        fork.step(np.asarray(ORACLE_CANDIDATES[name]))
        with fork._own_rng():
            scores[name] = fork.trainer.evaluate(max_windows=4, split="validation")["val_loss"]
        fork.close()
    best = min(scores, key=scores.get)

    oracle = make_controller("oracle", settings={"every_windows": 3, "horizon_steps": 10, "val_windows": 4,
                                                 "candidates": ["neutral", "lr_x0.8"]})
    oracle.reset(env, seed=1, run_name="t")
    action = oracle.act(None, base._last_info)
    assert base.trainer.global_step == 20 and len(base.lineage()["probe_loss"]) == 2
    assert oracle.choices[0]["choice"] == best
    assert oracle.choices[0]["scores"][best] == pytest.approx(scores[best])
    assert oracle.extra_flops == pytest.approx(10 * step_flops)
    assert action.tolist() == holding_action(ORACLE_CANDIDATES[best]).tolist()
    assert oracle.budget_exempt and oracle.decisions[0]["kind"] == "oracle"
    # No new decision until every_windows have passed.
    oracle.act(None, base._last_info)
    assert len(oracle.choices) == 1
    env.close()


def test_tuned_fixed_sweeps_once_and_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = _env(40)
    env.reset(seed=100000)
    base = env.unwrapped
    budget = base.trainer.flops_per_token * base.trainer.seq_len * base.trainer.cfg.data.batch_size * 40
    ctrl = TunedFixed(grid=(0.5, 1.0), tuning_seeds=(900001,), val_windows=8, tuning_dir=tmp_path)
    ctrl.reset(env, seed=100000, run_name="t")
    scores = ctrl.tuning["val_loss"]
    best = min((0.5, 1.0), key=lambda m: scores[f"{m:g}"][0])
    assert ctrl.tuning["lr_scale"] == best and base.trainer.knobs.lr_scale == best
    assert ctrl.tuning_flops == pytest.approx(2 * budget)  # two full tuning runs, reported beside the budget
    files = list(tmp_path.glob("tuned_fixed__*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["lr_scale"] == best

    # A second run of the same setting reads the cache instead of sweeping again.
    monkeypatch.setattr(TunedFixed, "_sweep", lambda self, base: pytest.fail("swept again"))
    env.reset(seed=100001)
    again = TunedFixed(grid=(0.5, 1.0), tuning_seeds=(900001,), val_windows=8, tuning_dir=tmp_path)
    again.reset(env, seed=100001, run_name="t")
    assert again.tuning == ctrl.tuning and env.unwrapped.trainer.knobs.lr_scale == best
    with pytest.raises(ValueError, match="tuning seeds"):
        again.reset(env, seed=900001, run_name="t")
    env.close()
