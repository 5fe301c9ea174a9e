"""Branching controllers (stso, proxy_only, single_trigger) and the learned-policy controller."""

from __future__ import annotations

import json
import math

import gymnasium as gym
import numpy as np
import pytest

import stso_env  # noqa: F401  (registers the envs)
from agents.controllers import CONTROLLERS, make_controller
from agents.controllers.branching import LOSS_VOLATILITY
from stso_env.envs.gpt2_env import NEUTRAL_ACTION
from stso_env.proxy.model import ProxyConfig, ProxyEnsemble

ENV = {"preset": "tiny", "scenario": "spiky", "decision_interval": 5, "episode_steps": 60}


@pytest.fixture(scope="module")
def proxy_dir(tmp_path_factory):
    # untrained on purpose: the controllers must work with any proxy
    d = tmp_path_factory.mktemp("proxy")
    ProxyEnsemble(ProxyConfig(horizon=2, hidden=16, layers=1, ensemble=2, seed=0)).save(d)
    return d


def run(ctrl, windows: int, trigger_at: set[int]):
    """Drive ``ctrl`` for ``windows`` env steps with the trigger forced on at the given window numbers."""
    env = gym.make("STSO-GPT2-v0", **ENV)
    obs, info = env.reset(seed=3)
    ctrl.reset(env, seed=3, run_name="r")
    actions = []
    for w in range(windows):
        info = dict(info, trigger=w in trigger_at)
        a = ctrl.act(obs, info)
        actions.append(a.tolist())
        obs, _, term, trunc, info = env.step(a)
        assert not term
    return env, actions


def test_registry_builds_every_name(proxy_dir, tmp_path):
    assert set(CONTROLLERS) >= {"fixed", "rule", "zclip", "arc", "spam", "hd", "pbt", "stso", "proxy_only",
                                "single_trigger", "policy"}
    with pytest.raises(ValueError, match="unknown; choose from"):
        make_controller("nope")
    with pytest.raises(ValueError, match="unknown setting"):
        make_controller("stso", settings={"top_kk": 3}, proxy_dir=proxy_dir)


def test_stso_verifies_holds_and_counts(proxy_dir, tmp_path):
    ctrl = make_controller("stso", settings={"top_k": 2, "verify_steps": 10, "n_candidates": 12,
                                             "cooldown_windows": 3, "adopt_fork": False},
                           proxy_dir=proxy_dir, branch_dir=tmp_path)
    # trigger on at windows 1..6: one decision at 1, the next only after the hold (2 windows) + cooldown 3
    env, actions = run(ctrl, 8, trigger_at={1, 2, 3, 4, 5, 6})
    assert ctrl.branch_invocations == 2 and len(ctrl.proxy_ms) == 2
    assert ctrl.main_run_share == 1.0  # no reserve by default: the schedule spans the whole budget
    reserved = make_controller("stso", settings={"reserve": 0.1}, proxy_dir=proxy_dir, branch_dir=tmp_path)
    assert reserved.main_run_share == pytest.approx(0.9)
    steps = sorted(int(p.name) for p in (tmp_path / "r").iterdir())
    assert len(steps) == 2
    first = json.loads((tmp_path / "r" / str(steps[0]) / "decision.json").read_text())
    chosen = first["chosen_action"]
    assert actions[0] == list(NEUTRAL_ACTION)
    # the verified action runs for as many windows as it was verified for (10 steps / interval 5 = 2)
    assert actions[1] == chosen and actions[2] == chosen
    # then: neutral LR change and one-shots, the chosen weight decay and clip policy kept
    assert actions[3] == [NEUTRAL_ACTION[0], chosen[1], chosen[2], 0, 0, 0]
    assert actions[4] == actions[3]
    # second decision: 3 windows of cooldown after the first (windows 2, 3, 4), so at window 5
    assert ctrl.decisions[1]["global_step"] > ctrl.decisions[0]["global_step"]
    verify_flops = sum(v["flops"] for s in steps
                       for v in json.loads((tmp_path / "r" / str(s) / "decision.json").read_text())["verification"])
    assert verify_flops > 0 and math.isclose(ctrl.extra_flops, verify_flops, rel_tol=1e-12)
    charged = env.unwrapped.monitor.events.wasted_by_reason["verification"]
    assert math.isclose(charged, verify_flops, rel_tol=1e-12)
    env.close()


def test_stso_adopts_the_verified_fork_by_default(proxy_dir, tmp_path):
    ctrl = make_controller("stso", settings={"top_k": 2, "verify_steps": 10, "n_candidates": 12},
                           proxy_dir=proxy_dir, branch_dir=tmp_path)
    env = gym.make("STSO-GPT2-v0", **ENV)
    obs, info = env.reset(seed=3)
    ctrl.reset(env, seed=3, run_name="r")
    step0 = env.unwrapped.trainer.global_step
    action = ctrl.act(obs, dict(info, trigger=True))
    (folder,) = list((tmp_path / "r").iterdir())
    doc = json.loads((folder / "decision.json").read_text())
    chosen = doc["chosen_action"]
    assert doc["adopted"] and env.unwrapped.trainer.global_step == step0 + 10
    # the chosen action already ran in the adopted fork: the next window keeps only its persistent settings
    assert action.tolist() == [NEUTRAL_ACTION[0], chosen[1], chosen[2], 0, 0, 0]
    others = sum(v["flops"] for v in doc["verification"] if v["id"] != doc["chosen_id"])
    assert math.isclose(ctrl.extra_flops, others, rel_tol=1e-12)
    env.step(action)
    env.close()


def test_proxy_only_applies_proxy_best_without_forks(proxy_dir, tmp_path):
    ctrl = make_controller("proxy_only", settings={"n_candidates": 12}, proxy_dir=proxy_dir, branch_dir=tmp_path)
    env, actions = run(ctrl, 3, trigger_at={1})
    (folder,) = list((tmp_path / "r").iterdir())
    doc = json.loads((folder / "decision.json").read_text())
    assert doc["verification"] == [] and doc["executor"] == "none"
    assert doc["chosen_action"] == doc["candidates"][0]["action"] == actions[1]
    assert ctrl.extra_flops == 0.0 and ctrl.branch_invocations == 1
    assert ctrl.main_run_share == 1.0  # nothing to verify, nothing reserved
    assert "verification" not in env.unwrapped.monitor.events.wasted_by_reason or \
        env.unwrapped.monitor.events.wasted_by_reason["verification"] == 0.0
    env.close()


def test_single_indicator_reads_loss_volatility(proxy_dir, tmp_path):
    ctrl = make_controller("single_trigger", proxy_dir=proxy_dir, branch_dir=tmp_path)
    env = gym.make("STSO-GPT2-v0", **ENV)
    obs, info = env.reset(seed=0)
    ctrl.reset(env, seed=0, run_name="r")
    tau = env.unwrapped.uncertainty_config.tau
    high, low = obs.copy(), obs.copy()
    high[LOSS_VOLATILITY], low[LOSS_VOLATILITY] = tau + 0.5, tau - 0.5
    # the combined index's trigger is ignored: only the one indicator counts
    assert ctrl.triggered(high, {"trigger": False}) and not ctrl.triggered(low, {"trigger": True})
    env.close()


def test_saved_policy_reloads_and_acts(tmp_path):
    from sb3_contrib import MaskablePPO
    from stable_baselines3 import PPO

    env = gym.make("STSO-GPT2-v0", **ENV)
    for algo, cls in (("maskable_ppo", MaskablePPO), ("ppo", PPO)):
        model = cls("MlpPolicy", env, n_steps=8, batch_size=8, seed=0, device="cpu")
        path = tmp_path / f"{algo}.zip"
        model.save(str(path))
        ctrl = make_controller("policy", policy_path=path)
        assert ctrl.algorithm == algo
        obs, info = env.reset(seed=1)
        ctrl.reset(env, seed=1, run_name="p")
        a1, a2 = ctrl.act(obs, info), ctrl.act(obs, info)
        masks = {"action_masks": env.unwrapped.action_masks()} if algo == "maskable_ppo" else {}
        expected, _ = model.predict(obs, deterministic=True, **masks)
        assert a1.tolist() == a2.tolist() == np.asarray(expected).tolist()
        assert env.action_space.contains(a1)
        env.step(a1)
    env.close()
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a Stable-Baselines3 zip"):
        make_controller("policy", policy_path=bad)
