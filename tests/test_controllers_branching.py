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


def test_stso_runs_its_plan_holds_and_counts(proxy_dir, tmp_path):
    ctrl = make_controller("stso", settings={"top_k": 2, "n_candidates": 12, "cooldown_windows": 3,
                                             "adopt_fork": False, "rollback": False},
                           proxy_dir=proxy_dir, branch_dir=tmp_path)
    # trigger on at windows 1..6: one decision at 1, the next only after the plan (2 windows) + cooldown 3
    env, actions = run(ctrl, 8, trigger_at={1, 2, 3, 4, 5, 6})
    assert ctrl.branch_invocations == 2 and len(ctrl.proxy_ms) == 2
    assert ctrl.main_run_share == 1.0  # no reserve by default: the schedule spans the whole budget
    reserved = make_controller("stso", settings={"reserve": 0.1}, proxy_dir=proxy_dir, branch_dir=tmp_path)
    assert reserved.main_run_share == pytest.approx(0.9)
    steps = sorted(int(p.name) for p in (tmp_path / "r").iterdir())
    assert len(steps) == 2
    first = json.loads((tmp_path / "r" / str(steps[0]) / "decision.json").read_text())
    plan = first["chosen_plan"]
    assert actions[0] == list(NEUTRAL_ACTION)
    # the plan runs over the proxy's horizon (2 windows): its first action, then its continuation
    assert actions[1] == plan[:6] and actions[2] == plan[6:]
    # then: neutral LR change and one-shots, the plan's weight decay and clip policy kept
    assert actions[3] == [NEUTRAL_ACTION[0], plan[7], plan[8], 0, 0, 0]
    assert actions[4] == actions[3]
    assert ctrl.decisions[1]["global_step"] > ctrl.decisions[0]["global_step"]
    verify_flops = sum(v["flops"] for s in steps
                       for v in json.loads((tmp_path / "r" / str(s) / "decision.json").read_text())["verification"])
    assert verify_flops > 0 and math.isclose(ctrl.extra_flops, verify_flops, rel_tol=1e-12)
    charged = env.unwrapped.monitor.events.wasted_by_reason["verification"]
    assert math.isclose(charged, verify_flops, rel_tol=1e-12)
    env.close()


def test_stso_adopts_the_verified_fork_by_default(proxy_dir, tmp_path):
    ctrl = make_controller("stso", settings={"top_k": 2, "n_candidates": 12}, proxy_dir=proxy_dir,
                           branch_dir=tmp_path)
    env = gym.make("STSO-GPT2-v0", **ENV)
    obs, info = env.reset(seed=3)
    ctrl.reset(env, seed=3, run_name="r")
    step0 = env.unwrapped.trainer.global_step
    action = ctrl.act(obs, dict(info, trigger=True))
    (folder,) = list((tmp_path / "r").iterdir())
    doc = json.loads((folder / "decision.json").read_text())
    plan = doc["chosen_plan"]
    # the only snapshot is the current state: nothing to roll back
    assert doc["restored_from"] is None and "nothing is undone" in doc["rollback"]["why"]
    assert doc["adopted"] and env.unwrapped.trainer.global_step == step0 + 10
    # the plan already ran in the adopted fork: the next window keeps only its persistent settings
    assert action.tolist() == [NEUTRAL_ACTION[0], plan[7], plan[8], 0, 0, 0]
    others = sum(v["flops"] for v in doc["verification"] if v["id"] != doc["chosen_id"])
    assert math.isclose(ctrl.extra_flops, others, rel_tol=1e-12)
    env.step(action)
    env.close()


def test_stso_replans_the_schedule_to_end_where_the_budget_now_ends(proxy_dir, tmp_path):
    ctrl = make_controller("stso", settings={"top_k": 2, "n_candidates": 12, "replan_schedule": True},
                           proxy_dir=proxy_dir, branch_dir=tmp_path)
    env = gym.make("STSO-GPT2-v0", **ENV)
    obs, info = env.reset(seed=3)
    ctrl.reset(env, seed=3, run_name="r")
    tr = env.unwrapped.trainer
    assert tr.schedule_end == 60
    step0 = tr.global_step
    ctrl.act(obs, dict(info, trigger=True))
    step_flops = tr.flops_per_token * tr.seq_len * tr.cfg.data.batch_size
    outside = ctrl.extra_flops / step_flops  # steps of the forks not adopted (2 forks of 10 steps, or fewer)
    assert 5 <= outside <= 30
    # the budget is 60 steps; the steps paid outside the kept run come off the schedule's end
    assert tr.schedule_end == 60 - math.ceil(outside - 1e-9)
    assert ctrl.replans == [{"global_step": step0 + 10, "from_end": 60, "to_end": tr.schedule_end}]
    assert ctrl.describe()["replans"] == ctrl.replans
    env.close()


BURST = """name: burst
description: one 10-step burst of random-token batches at step 60
lr_scale: 1.0
events:
  - {kind: random_tokens, every: 1000000, start: 60, duration: 10, strength: 1.0}
"""


@pytest.fixture(scope="module")
def trained_proxy(tmp_path_factory):
    """A plan proxy trained (briefly) and calibrated on two collected tiny runs of the burst scenario."""
    from agents.collect import collect
    from stso_env.proxy.calibration import conformal_bounds
    from stso_env.proxy.dataset import build_targets
    from stso_env.proxy.logdb import read_log_db

    root = tmp_path_factory.mktemp("trained")
    scenario = root / "burst.yaml"
    scenario.write_text(BURST)
    collect(episodes=2, run_dir=root / "col", scenarios=[str(scenario)], corpus="builtin", seed=50,
            episode_steps=100, decision_interval=5, policy="perturbed", progress=False)
    ds = build_targets(read_log_db(root / "col" / "log_db.parquet"), horizon=2, plans=True)
    model = ProxyEnsemble(ProxyConfig(horizon=2, hidden=16, layers=1, ensemble=3, epochs=20, seed=0),
                          state_dim=ds.state.shape[1], nvec=ds.action_nvec, state_names=ds.state_names)
    model.fit(ds, ds)
    out = root / "proxy"
    model.save(out)
    conformal_bounds(model, ds, levels=(0.9,)).save(out)
    return out, scenario


def test_stso_triggers_on_a_real_spike_rolls_back_and_keeps_the_lineage(trained_proxy, tmp_path):
    proxy_dir, scenario = trained_proxy
    env = gym.make("STSO-GPT2-v0", preset="tiny", scenario=str(scenario), decision_interval=5, episode_steps=100)
    ctrl = make_controller("stso", settings={"top_k": 2, "n_candidates": 40, "cooldown_windows": 100},
                           proxy_dir=proxy_dir, branch_dir=tmp_path)
    obs, info = env.reset(seed=3)
    ctrl.reset(env, seed=3, run_name="spike")
    fired_at = []
    done = False
    while not done:
        if info.get("trigger_in_window") and not fired_at:
            fired_at.append(int(info["global_step"]))  # the trigger as the env measured it, not forced
        obs, _, term, trunc, info = env.step(ctrl.act(obs, info))
        done = term or trunc
    # the burst (steps 60-69) fires the trigger in its window, and one decision follows at once
    assert fired_at == [65] and ctrl.branch_invocations == 1
    (folder,) = list((tmp_path / "spike").iterdir())
    doc = json.loads((folder / "decision.json").read_text())
    assert doc["step"] == 65 and doc["trigger_state"]["uncertainty_index"] is not None
    # the index rose from the window ending at step 60: the run went back to the snapshot taken there
    assert doc["rollback"]["rise_start_step"] == 60 and doc["restored_from"] == 60
    assert doc["plans"] and doc["calibration_check"]["checked"] == len(doc["verification"])
    assert doc["adopted"]
    # accounting: rollback (5 steps) and the forks not adopted are outside the main run, charged as waste
    wasted = env.unwrapped.monitor.events.wasted_by_reason
    others = sum(v["flops"] for v in doc["verification"] if v["id"] != doc["chosen_id"])
    assert math.isclose(wasted["rollback"], doc["wasted_flops"]["rollback"]) and wasted["rollback"] > 0
    assert math.isclose(ctrl.extra_flops, others + wasted["rollback"], rel_tol=1e-9)
    # the lineage of the final model: every window once, in order, the rolled-back window gone
    lineage = env.unwrapped.lineage()["global_step"]
    assert lineage == list(range(5, 101, 5))
    env.close()


def test_proxy_only_applies_proxy_best_without_forks(proxy_dir, tmp_path):
    ctrl = make_controller("proxy_only", settings={"n_candidates": 12}, proxy_dir=proxy_dir, branch_dir=tmp_path)
    env, actions = run(ctrl, 3, trigger_at={1})
    (folder,) = list((tmp_path / "r").iterdir())
    doc = json.loads((folder / "decision.json").read_text())
    assert doc["verification"] == [] and doc["executor"] == "none"
    assert doc["chosen_action"] == doc["candidates"][0]["action"] == actions[1]
    assert ctrl.branch_invocations == 1
    assert ctrl.main_run_share == 1.0  # nothing to verify, nothing reserved
    wasted = env.unwrapped.monitor.events.wasted_by_reason
    assert wasted.get("verification", 0.0) == 0.0
    # the rollback is the only compute outside the main run (no forks)
    assert math.isclose(ctrl.extra_flops, wasted.get("rollback", 0.0)) and doc["wasted_flops"]["verification"] == 0
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


def test_policy_shield_runs_a_change_only_when_its_bound_beats_the_neutral_one(trained_proxy, tmp_path,
                                                                               monkeypatch):
    from sb3_contrib import MaskablePPO

    proxy_dir, _ = trained_proxy
    env = gym.make("STSO-GPT2-v0", **ENV)
    path = tmp_path / "policy.zip"
    MaskablePPO("MlpPolicy", env, n_steps=8, batch_size=8, seed=0, device="cpu").save(str(path))
    ctrl = make_controller("policy", policy_path=path, proxy_dir=proxy_dir, settings={"shield_rule": "upper"})
    assert ctrl.shield and ctrl.proxy is not None and ctrl.bounds is not None
    obs, info = env.reset(seed=1)
    ctrl.reset(env, seed=1, run_name="p")
    proposal = np.array([0, 2, 1, 1, 0, 0])
    monkeypatch.setattr(ctrl.model, "predict", lambda *a, **k: (proposal, None))
    # known answers: (upper bound of the proposal, upper bound of neutral), (divergence probabilities);
    # the lower bounds sit 0.5 below the upper ones
    cases = (((1.0, 2.0), (0.1, 0.1), proposal.tolist()),
             ((2.0, 1.0), (0.1, 0.1), list(NEUTRAL_ACTION)),
             ((1.0, 2.0), (0.3, 0.1), list(NEUTRAL_ACTION)),
             ((1.0, 1.3), (0.1, 0.1), proposal.tolist()))
    for bounds, p_div, expected in cases:
        monkeypatch.setattr(ctrl, "_bounds", lambda o, a, b=bounds, p=p_div: (np.array(b) - 0.5, np.array(b),
                                                                             np.array(p)))
        assert ctrl.act(obs, info).tolist() == expected
    assert ctrl.proposed == 4 and ctrl.shielded == 2
    d = ctrl.describe()
    assert d["shield"] and d["proposed_changes"] == 4 and d["shielded_changes"] == 2 and d["shield_rule"] == "upper"
    # dominance (the default): the proposal's upper bound must be below the neutral action's lower bound
    dom = make_controller("policy", policy_path=path, proxy_dir=proxy_dir)
    assert dom.describe()["shield_rule"] == "dominance"
    dom.reset(env, seed=1, run_name="p")
    monkeypatch.setattr(dom.model, "predict", lambda *a, **k: (proposal, None))
    for bounds, expected in (((1.0, 2.0), proposal.tolist()), ((1.0, 1.3), list(NEUTRAL_ACTION))):
        monkeypatch.setattr(dom, "_bounds", lambda o, a, b=bounds: (np.array(b) - 0.5, np.array(b),
                                                                   np.array([0.1, 0.1])))
        assert dom.act(obs, info).tolist() == expected
    with pytest.raises(ValueError, match="shield_rule"):
        make_controller("policy", policy_path=path, proxy_dir=proxy_dir, settings={"shield_rule": "lower"})
    # the real bounds: a plan proxy with its conformal bounds scores both candidates
    monkeypatch.undo()
    monkeypatch.setattr(ctrl.model, "predict", lambda *a, **k: (proposal, None))
    lower, upper, p_div = ctrl._bounds(obs, np.stack([proposal, np.asarray(NEUTRAL_ACTION)]))
    assert upper.shape == lower.shape == p_div.shape == (2,) and np.isfinite(upper).all()
    assert (lower < upper).all()
    a = ctrl.act(obs, info)
    assert a.tolist() == (proposal.tolist() if upper[0] < upper[1] and p_div[0] <= p_div[1]
                          else list(NEUTRAL_ACTION))
    # without a proxy there is no shield
    assert not make_controller("policy", policy_path=path).shield
    env.close()


def test_policy_lr_drift_is_bounded(tmp_path, monkeypatch):
    from sb3_contrib import MaskablePPO

    env = gym.make("STSO-GPT2-v0", **ENV)
    path = tmp_path / "policy.zip"
    MaskablePPO("MlpPolicy", env, n_steps=8, batch_size=8, seed=0, device="cpu").save(str(path))
    ctrl = make_controller("policy", policy_path=path)  # no proxy: no shield, only the LR bound
    obs, info = env.reset(seed=1)
    ctrl.reset(env, seed=1, run_name="p")
    monkeypatch.setattr(ctrl.model, "predict", lambda *a, **k: (np.array([0, 1, 1, 0, 0, 0]), None))  # LR x0.8
    knobs = env.unwrapped.trainer.knobs  # the bound reads the LR scale the trainer runs at

    def act_at(scale):
        knobs.lr_scale = scale
        return ctrl.act(obs, info).tolist()

    assert act_at(1.0) == [0, 1, 1, 0, 0, 0]  # 0.8: inside [0.5, 2]
    assert act_at(0.6) == [2, 1, 1, 0, 0, 0]  # 0.48: held at 0.6
    monkeypatch.setattr(ctrl.model, "predict", lambda *a, **k: (np.array([3, 1, 0, 0, 0, 0]), None))  # LR x1.1
    assert act_at(1.9) == list(NEUTRAL_ACTION)  # 2.09 > 2
    assert ctrl.describe()["lr_changes_bounded"] == 2
    with pytest.raises(ValueError, match="lr_bounds"):
        make_controller("policy", policy_path=path, settings={"lr_bounds": [1.5, 2.0]})
    env.close()
