"""STSO-GPT2-v0 against its own docstring, the Gymnasium and SB3 checkers, and its determinism contract."""

from __future__ import annotations

import math
import re
import warnings

import gymnasium as gym
import numpy as np
import pytest
import yaml

from stso_env.monitor.monitor import OBSERVATION_NAMES
import stso_env  # noqa: F401  (registers the env)
from stso_env.config import ASSETS_DIR
from stso_env.envs.gpt2_env import GPT2Env
from stso_env.envs.t5_env import T5Env

FAST = {"preset": "tiny", "scenario": "spiky", "decision_interval": 5, "episode_steps": 30}


def make(**kw):
    return gym.make("STSO-GPT2-v0", **{**FAST, **kw})


def rollout(env, actions, seed=0):
    obs, _ = env.reset(seed=seed)
    out = [obs]
    rewards = []
    for a in actions:
        obs, r, term, trunc, info = env.step(a)
        out.append(obs)
        rewards.append(r)
        if term or trunc:
            break
    return out, rewards


ACTIONS = [[2, 1, 0, 0, 0, 0], [0, 2, 1, 1, 1, 0], [3, 0, 2, 0, 0, 0], [1, 1, 3, 0, 1, 0], [2, 1, 0, 1, 0, 0]]


def test_registered_both_ways_and_spaces_match_docstring():
    env = gym.make("stso_env:STSO-GPT2-v0", **FAST)
    doc = GPT2Env.__doc__
    nvec = [int(x) for x in re.search(r"MultiDiscrete\(\[([\d, ]+)\]\)", doc).group(1).split(",")]
    assert list(env.action_space.nvec) == nvec == [4, 3, 4, 2, 2, 2]
    lo, hi, n = re.search(r"Box\((-?\d+), (\d+), \((\d+),\), float32\)", doc).groups()
    space = env.observation_space
    assert space.shape == (int(n),) and space.low.min() == int(lo) and space.high.max() == int(hi)
    assert space.dtype == np.float32
    names = env.unwrapped.observation_names
    schema = yaml.safe_load((ASSETS_DIR / "state_schema_v1.yaml").read_text())["observation"]["features"]
    assert list(names) == [f["name"] for f in schema] and len(names) == int(n)
    # every row of the docstring's observation table starts at the name it claims
    obs_doc = doc.split("## Observation Space")[1].split("## Rewards")[0]
    rows = re.findall(r"^\s*\|\s*(\d+)(?:-(\d+))?\s*\|\s*([a-z_]+)(?:\{([a-z]+),)?", obs_doc, re.MULTILINE)
    assert len(rows) >= 12
    for start, _end, name, alt in rows:
        assert names[int(start)] == name + (alt or ""), (start, name)
    assert max(int(e or s) for s, e, *_ in rows) == len(names) - 1
    # and the action table names the dimensions in order, with as many choices as the space has
    act_doc = doc.split("## Action Space")[1].split("## Observation Space")[0]
    arows = re.findall(r"^\s*\|\s*(\d)\s*\|\s*([a-z_]+)\s*\|(.*)\|", act_doc, re.MULTILINE)
    from stso_env.envs.gpt2_env import ACTION_FIELDS
    assert [r[1] for r in arows] == list(ACTION_FIELDS)
    assert [len(re.findall(r"\d:", r[2])) for r in arows] == nvec
    env.close()


@pytest.mark.parametrize("env_cls, preset", [(GPT2Env, "tiny"), (T5Env, "t5-tiny")])
def test_gymnasium_env_checker(env_cls, preset):
    from gymnasium.utils.env_checker import check_env
    env = env_cls(**{**FAST, "preset": preset})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the masked skip choice warns by design when sampled
        check_env(env, skip_render_check=True)
    env.close()


def test_sb3_env_checker():
    from stable_baselines3.common.env_checker import check_env
    env = GPT2Env(**FAST)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_env(env, warn=True)
    env.close()


def test_same_seed_same_trajectory_other_seed_differs():
    a, b, c = make(), make(), make()
    oa, ra = rollout(a, ACTIONS, seed=1)
    ob, rb = rollout(b, ACTIONS, seed=1)
    oc, rc = rollout(c, ACTIONS, seed=2)
    assert all(np.array_equal(x, y) for x, y in zip(oa, ob)) and ra == rb
    assert not all(np.array_equal(x, y) for x, y in zip(oa, oc))
    for e in (a, b, c):
        e.close()


def test_step_contract_info_and_termination():
    env = make()
    obs, info = env.reset(seed=0)
    assert obs.dtype == np.float32 and env.observation_space.contains(obs) and info["global_step"] == 5
    n = 0
    while True:
        obs, r, term, trunc, info = env.step([2, 1, 1, 0, 0, 0])
        n += 1
        assert isinstance(r, float) and isinstance(term, bool) and isinstance(trunc, bool)
        for key in ("global_step", "train_loss", "probe_loss", "uncertainty_index", "trigger",
                    "instability_event", "flops", "wasted_flops", "action", "action_overridden"):
            assert key in info
        assert info["action"]["clip_policy"] == "zclip" and info["flops"] > 0
        if term or trunc:
            break
    assert trunc and not term and info["global_step"] == 30 and n == 5
    with pytest.raises(RuntimeError, match="call reset"):
        env.step([2, 1, 0, 0, 0, 0])
    env.close()


def test_action_masks_override_and_bad_actions():
    env = GPT2Env(**FAST)
    env.reset(seed=0)
    m = env.action_masks()
    assert m.shape == (17,) and m.dtype == bool and m[:16].all() and not m[16]
    with pytest.warns(UserWarning, match="skip_batch is masked"):
        _, _, _, _, info = env.step([2, 1, 0, 0, 0, 1])
    assert info["action_overridden"] and info["action"]["skip_batch"] is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        _, _, _, _, info = env.step([2, 1, 0, 0, 0, 1])
    assert info["action_overridden"]
    with pytest.raises(ValueError, match="outside the action space: lr_change=4"):
        env.step([4, 1, 0, 0, 0, 0])
    with pytest.raises(ValueError, match="expected 6 integers"):
        env.step([1, 2])
    allowed = GPT2Env(**FAST, allow_skip_batch=True)
    allowed.reset(seed=0)
    assert allowed.action_masks().all()
    _, _, _, _, info = allowed.step([2, 1, 0, 0, 0, 1])
    assert not info["action_overridden"] and info["action"]["skip_batch"] is True
    env.close()
    allowed.close()


def test_fork_is_independent_and_exact():
    env = GPT2Env(**FAST)
    env.reset(seed=3)
    env.step(ACTIONS[1])
    child = env.fork()
    r1 = [env.step(a)[:2] for a in ACTIONS[2:4]]
    r2 = [child.step(a)[:2] for a in ACTIONS[2:4]]
    for (o1, x1), (o2, x2) in zip(r1, r2):
        assert np.array_equal(o1, o2) and x1 == x2
    child.close()
    obs, *_ = env.step(ACTIONS[0])  # the parent still works after the child is closed
    assert env.observation_space.contains(obs)
    env.close()


def test_snapshot_restore_is_bit_exact():
    env = GPT2Env(**FAST)
    env.reset(seed=5)
    env.step(ACTIONS[1])
    sid = env.snapshot()
    first = [env.step(a)[:2] for a in ACTIONS[2:5]]
    obs0 = env.restore(sid)
    assert env.observation_space.contains(obs0)
    second = [env.step(a)[:2] for a in ACTIONS[2:5]]
    for (o1, r1), (o2, r2) in zip(first, second):
        assert np.array_equal(o1, o2) and r1 == r2
    with pytest.raises(KeyError, match="snapshot 999"):
        env.restore(999)
    env.close()


def test_render_modes():
    env = GPT2Env(**FAST, render_mode="ansi")
    env.reset(seed=0)
    env.step(ACTIONS[1])
    line = env.render()
    assert line.startswith("step 10/30 | loss") and "clip zclip" in line
    env2 = GPT2Env(**FAST, render_mode="rgb_array")
    env2.reset(seed=0)
    env2.step(ACTIONS[1])
    img = env2.render()
    assert img.dtype == np.uint8 and img.shape == (480, 640, 3) and img.std() > 5
    env.close()
    env2.close()


def test_divergence_terminates_with_penalty(tmp_path):
    sc = tmp_path / "boom.yaml"
    sc.write_text("name: boom\nlr_scale: 100.0\nevents: []\n")  # LR 0.3 at peak: Adam blows up
    env = GPT2Env(**{**FAST, "scenario": str(sc), "episode_steps": 200})
    env.reset(seed=0)
    n = 0
    for _ in range(40):
        _, r, term, trunc, info = env.step([3, 1, 0, 0, 0, 0])
        n += 1
        if term or trunc:
            break
    assert term and not trunc and info["diverged"] and n > 1
    assert info["train_loss"] > 3 * math.log(257) * 0.9 or not math.isfinite(info["train_loss"])
    assert r < -5  # the divergence penalty (10) dominates
    with pytest.raises(RuntimeError, match="call reset"):
        env.step([2, 1, 0, 0, 0, 0])
    # diverging already in the opening window: the first step ends the episode with the penalty
    sc.write_text("name: boom\nlr_scale: 3000.0\nevents: []\n")
    env2 = GPT2Env(**{**FAST, "scenario": str(sc), "episode_steps": 200})
    env2.reset(seed=0)
    _, r, term, trunc, info = env2.step([2, 1, 0, 0, 0, 0])
    assert term and info["diverged"] and r == -10.0
    env.close()
    env2.close()


def test_log_db_and_tensorboard(tmp_path):
    from stso_env.proxy.logdb import read_log_db
    env = GPT2Env(**FAST, run_dir=str(tmp_path / "run"))
    env.reset(seed=0)
    for a in ACTIONS:
        env.step(a)
    env.unwrapped._flush_logs()
    table = read_log_db(tmp_path / "run" / "log_db.parquet")  # readable while the env is open
    assert table.num_rows == 5 and table.column("env_step").to_pylist() == [0, 1, 2, 3, 4]
    assert table.column("action").to_pylist()[1] == ACTIONS[1]
    assert len(table.column("state").to_pylist()[0]) == len(OBSERVATION_NAMES)
    env.close()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tmp_path / "run" / "tb"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "episode_0/env/reward" in tags and len(acc.Scalars("episode_0/train/loss")) == 5


def test_vector_envs():
    for mode in ("sync", "async"):
        venv = gym.make_vec("STSO-GPT2-v0", num_envs=2, vectorization_mode=mode, **FAST)
        obs, _ = venv.reset(seed=[0, 1])
        assert obs.shape == (2, len(OBSERVATION_NAMES))
        obs, r, term, trunc, _ = venv.step(np.array([ACTIONS[1], ACTIONS[2]]))
        assert obs.shape == (2, len(OBSERVATION_NAMES)) and r.shape == (2,)
        venv.close()


def test_sb3_subproc_vec_env():
    from stable_baselines3.common.vec_env import SubprocVecEnv
    venv = SubprocVecEnv([lambda: GPT2Env(**FAST), lambda: GPT2Env(**FAST)])
    venv.seed(0)
    obs = venv.reset()
    assert obs.shape == (2, len(OBSERVATION_NAMES))
    obs, r, done, info = venv.step(np.array([ACTIONS[0], ACTIONS[3]]))
    assert obs.shape == (2, len(OBSERVATION_NAMES)) and all(math.isfinite(x) for x in r)
    venv.close()
