"""The scripted controller: a plan of actions by window, checked against the env's own record."""

from __future__ import annotations

import gymnasium as gym
import pytest

import stso_env  # noqa: F401  (registers the env)
from agents.controllers import make_controller
from agents.controllers.scripted import parse_plan

PLAN = [{"from": 4, "action": [2, 1, 0, 1, 0, 0]},                 # momentum reset at step 20
        {"from": 2, "to": 4, "action": [0, 1, 1, 0, 0, 0]}]        # LR x0.8 and ZClip at steps 10 and 15


def run(plan, seed=3):
    env = gym.make("STSO-GPT2-v0", preset="tiny", scenario="calm", decision_interval=5, episode_steps=30)
    obs, info = env.reset(seed=seed)
    ctrl = make_controller("scripted", settings={"plan": plan})
    ctrl.reset(env, seed=seed, run_name="test")
    steps, actions, infos, done = [], [], [], False
    while not done:
        steps.append(int(env.unwrapped.trainer.global_step))
        a = ctrl.act(obs, info)
        actions.append(a.tolist())
        obs, _, terminated, truncated, info = env.step(a)
        infos.append(info)
        done = terminated or truncated
    env.close()
    return ctrl, steps, actions, infos


def test_plays_the_plan_by_window_of_training_time_and_neutral_elsewhere():
    ctrl, steps, actions, infos = run(PLAN)
    by_step = dict(zip(steps, actions))
    assert by_step[10] == by_step[15] == [0, 1, 1, 0, 0, 0]
    assert by_step[20] == [2, 1, 0, 1, 0, 0]
    assert all(a == [2, 1, 0, 0, 0, 0] for s, a in by_step.items() if s not in (10, 15, 20))
    # the env did what was asked: the LR scale compounded twice, ZClip held for two windows, one reset
    scales = {s: i["lr_scale"] for s, i in zip(steps, infos)}
    assert scales[10] == pytest.approx(0.8) and scales[15] == pytest.approx(0.64) and scales[25] == pytest.approx(0.64)
    assert [i["action"]["clip_policy"] for s, i in zip(steps, infos) if s in (10, 15, 20)] == ["zclip", "zclip", "off"]
    assert [s for s, i in zip(steps, infos) if i["action"]["momentum_reset"]] == [20]
    assert [d["global_step"] for d in ctrl.decisions] == [10, 15, 20]
    assert ctrl.describe()["plan"][0] == {"from": 2, "to": 4, "action": [0, 1, 1, 0, 0, 0]}


def test_same_plan_and_seed_give_the_same_trajectory_and_an_empty_plan_is_the_fixed_schedule():
    _, _, _, a = run(PLAN)
    _, _, _, b = run(PLAN)
    assert [i["probe_loss"] for i in a] == [i["probe_loss"] for i in b]
    _, _, actions, _ = run([])
    assert actions == [[2, 1, 0, 0, 0, 0]] * len(actions)


@pytest.mark.parametrize("plan,match", [
    ({"from": 1}, "must be a list"),
    ([{"from": 1}], "needs the keys 'from' and 'action'"),
    ([{"from": 1, "action": [2, 1, 0, 0, 0, 0], "until": 3}], r"unknown key\(s\) \['until'\]"),
    ([{"from": 3, "to": 3, "action": [2, 1, 0, 0, 0, 0]}], "0 <= from < to"),
    ([{"from": 0, "action": [4, 1, 0, 0, 0, 0]}], "lr_change in 0..3"),
    ([{"from": 0, "action": [2, 1, 0]}], "must be 6 integers"),
    ([{"from": 0, "to": 5, "action": [2, 1, 0, 0, 0, 0]}, {"from": 4, "action": [0, 1, 0, 0, 0, 0]}], "overlap"),
])
def test_bad_plans_are_refused_with_the_entry_and_the_fix(plan, match):
    with pytest.raises(ValueError, match=match):
        parse_plan(plan)
