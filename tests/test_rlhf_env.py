"""STSO-RLHF-v0 against its docstring, the Gymnasium and SB3 checkers, its masks and its bit-exact fork and restore."""

from __future__ import annotations

import re
import warnings

import gymnasium as gym
import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

import stso_env  # noqa: F401  (registers the env)
from stso_env.config import ASSETS_DIR
from stso_env.errors import ConfigError
from stso_env.rlhf.monitor import OBSERVATION_NAMES
from stso_env.envs.rlhf_env import ACTION_FIELDS, LR_SCALE_LIMITS, NEUTRAL_ACTION, RLHFEnv, rlhf_action_mask

ACTIONS = [[3, 2, 1, 1, 0, 0], [2, 1, 0, 0, 1, 1], [1, 0, 2, 2, 2, 0]]


@pytest.fixture()
def kw(rlhf_tiny):
    _, root, _ = rlhf_tiny
    return {"size": "tiny", "prepared": str(root), "decision_interval": 4, "scenario": "overoptimize"}


def test_registered_and_spaces_match_docstring(kw):
    env = gym.make("stso_env:STSO-RLHF-v0", **kw)
    doc = RLHFEnv.__doc__
    nvec = [int(x) for x in re.search(r"MultiDiscrete\(\[([\d, ]+)\]\)", doc).group(1).split(",")]
    assert list(env.action_space.nvec) == nvec == [4, 3, 3, 3, 3, 2]
    lo, hi, n = re.search(r"Box\((-?\d+), (\d+), \((\d+),\), float32\)", doc).groups()
    space = env.observation_space
    assert space.shape == (int(n),) and space.low.min() == int(lo) and space.high.max() == int(hi)
    names = env.unwrapped.observation_names
    schema = yaml.safe_load((ASSETS_DIR / "rlhf_state_schema_v1.yaml").read_text())["observation"]["features"]
    assert list(names) == [f["name"] for f in schema] and len(names) == int(n)
    obs_doc = doc.split("## Observation Space")[1].split("## Rewards")[0]
    rows = re.findall(r"^\s*\|\s*(\d+)(?:-(\d+))?\s*\|\s*([a-z_]+)", obs_doc, re.MULTILINE)
    assert len(rows) == 8
    for start, _end, name in rows:
        assert names[int(start)] == name, (start, name)
    assert max(int(e or s) for s, e, _ in rows) == len(names) - 1
    act_doc = doc.split("## Action Space")[1].split("## Observation Space")[0]
    arows = re.findall(r"^\s*\|\s*(\d)\s*\|\s*([a-z_]+)\s*\|(.*)\|", act_doc, re.MULTILINE)
    assert [r[1] for r in arows] == list(ACTION_FIELDS)
    assert [len(re.findall(r"\d:", r[2])) for r in arows] == nvec
    assert str(list(NEUTRAL_ACTION)) in doc
    env.close()


def test_gymnasium_and_sb3_env_checkers(kw):
    from gymnasium.utils.env_checker import check_env
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    env = RLHFEnv(**kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sampled actions may hit a masked (clamped) change
        check_env(env, skip_render_check=True)
        sb3_check_env(env, warn=True)
    env.close()


def test_masks_follow_the_limits_and_a_masked_choice_is_clamped(kw):
    mask = rlhf_action_mask(1.0, 0.04)
    assert mask.shape == (18,) and mask.all()
    low = rlhf_action_mask(LR_SCALE_LIMITS[0], 1e-4)
    assert low[:4].tolist() == [False, False, True, True]  # x0.5 and x0.8 would leave [1/64, 4]
    assert low[4:7].tolist() == [False, True, True]  # halving beta 1e-4 leaves [1e-4, 2]
    high = rlhf_action_mask(LR_SCALE_LIMITS[1], 2.0)
    assert high[:4].tolist() == [True, True, True, False] and high[4:7].tolist() == [True, True, False]
    env = RLHFEnv(**kw)
    env.reset(seed=0)
    env.unwrapped.run.knobs.lr_scale = LR_SCALE_LIMITS[1]
    assert not env.action_masks()[3]
    with pytest.warns(UserWarning, match="clamped"):
        _, _, _, _, info = env.step(np.array([3, 1, 0, 0, 1, 0]))
    assert info["action_overridden"] and info["lr_scale"] == LR_SCALE_LIMITS[1]
    _, _, _, _, info = env.step(np.array([0, 2, 1, 2, 0, 1]))  # allowed: halve the LR, double beta, skip
    assert not info["action_overridden"] and info["lr_scale"] == LR_SCALE_LIMITS[1] / 2
    assert info["beta"] == pytest.approx(2 * env.unwrapped.scenario.beta)
    assert info["skipped_steps"] == 4 and info["action"]["ref_alpha"] == 0.1 and info["action"]["epsilon"] == 0.1
    with pytest.raises(ValueError, match="kl_change=3"):
        env.step(np.array([2, 3, 0, 0, 1, 0]))
    env.close()


def test_skip_leaves_weights_and_adam_moments_untouched(kw):
    import torch

    env = RLHFEnv(**kw)
    env.reset(seed=0)
    t = env.unwrapped.run.stepped.trainer
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    moments = {id(p): s["exp_avg"].clone() for p, s in t.optimizer.state.items()}
    _, _, _, _, info = env.step(np.array([2, 1, 0, 0, 1, 1]))
    assert info["skipped_steps"] == 4 and info["window"]["steps"] == 4  # generation and scoring still ran
    assert all(torch.equal(before[k], v) for k, v in t.model.state_dict().items())
    assert all(torch.equal(moments[id(p)], s["exp_avg"]) for p, s in t.optimizer.state.items())
    _, _, _, _, info = env.step(np.array(NEUTRAL_ACTION))
    assert info["skipped_steps"] == 0
    assert any(not torch.equal(before[k], v) for k, v in t.model.state_dict().items())
    env.close()


def test_restore_and_fork_replay_bit_exactly_sampling_included(kw):
    env = RLHFEnv(**kw)
    env.reset(seed=3)
    sid = env.snapshot()
    first = [env.step(np.array(a)) for a in ACTIONS]
    assert first[-1][3]  # the tiny episode (16 steps, 4 per window) ends here
    for _ in range(2):  # a replay must not change the snapshot it came from
        assert np.array_equal(env.restore(sid), env.unwrapped._obs)
        again = [env.step(np.array(a)) for a in ACTIONS]
        for (o1, r1, *_), (o2, r2, *_) in zip(first, again):
            assert np.array_equal(o1, o2) and r1 == r2
    env.restore(sid)
    child = env.fork()
    for (o1, r1, *_, i1), a in zip(first, ACTIONS):
        o2, r2, *_, i2 = child.step(np.array(a))
        assert np.array_equal(o1, o2) and r1 == r2 and i1["window"] == i2["window"]
    assert child.lineage() == env.lineage() or len(child.lineage()["step"]) > len(env.lineage()["step"])
    child.close()
    other = RLHFEnv(**kw)
    other.reset(seed=4)
    o_other, *_ = other.step(np.array(ACTIONS[0]))
    assert not np.array_equal(o_other, first[0][0])  # another seed samples other completions
    other.close()
    env.close()


def test_logs_to_parquet_and_tensorboard(kw, tmp_path):
    env = RLHFEnv(**kw, run_dir=str(tmp_path / "run"))
    env.reset(seed=0)
    done = False
    while not done:
        _, _, term, trunc, _ = env.step(np.array(NEUTRAL_ACTION))
        done = term or trunc
    env.close()
    table = pq.read_table(tmp_path / "run" / "log_db.parquet").to_pandas()
    assert len(table) == 3 and table["env_step"].tolist() == [0, 1, 2]
    assert table["global_step"].tolist() == [8, 12, 16] and table["scenario"].iloc[0] == "overoptimize"
    assert all(len(s) == len(OBSERVATION_NAMES) for s in table["state"])
    assert (table["kl"] > 0).all() and table["gold_probe"].between(0, 1).all()
    assert list((tmp_path / "run" / "tb").glob("events.out.tfevents.*"))


def test_bad_arguments_are_clear_errors(kw):
    with pytest.raises(ConfigError, match="no such RLHF scenario.*calm"):
        RLHFEnv(**{**kw, "scenario": "nope"})
    with pytest.raises(ConfigError, match="size"):
        RLHFEnv(**{**kw, "size": "huge"})
    with pytest.raises(ConfigError, match="settings: steps"):
        RLHFEnv(**{**kw, "settings": {"steps": 0}})
    with pytest.raises(ConfigError, match="unknown key"):
        RLHFEnv(**{**kw, "divergence": {"kl_limt": 1.0}})
    with pytest.raises(ConfigError, match="reward_weights"):
        RLHFEnv(**{**kw, "reward_weights": {"golden": 1.0}})


def _episode(kw, scenario, seed, **extra):
    env = RLHFEnv(**{**kw, "scenario": scenario, "settings": {"steps": 48}, **extra})
    _, info = env.reset(seed=seed)
    infos = [info]
    done = False
    while not done:
        _, _, term, trunc, info = env.step(np.array(NEUTRAL_ACTION))
        infos.append(info)
        done = term or trunc
    env.close()
    return infos


def test_each_failure_scenario_raises_the_kl_over_calm_on_average_over_seeds(kw):
    """On the tiny models (whose greedy completions earn no gold, so the gold rule cannot fire) a single
    seed's KL is noise-sized: which seed of a scenario crosses a limit changes with the torch thread count
    of the preparation (measured on seeds 1-3, mean per-window largest KL, calm / overoptimize / collapse:
    0.0072 / 0.0376 / 0.0096 with 2 threads, 0.0072 / 0.0201 / 0.0217 with 1; overoptimize crossed 0.05 in
    seeds 1 and 3 with 2 threads and in seed 2 with 1; calm's largest was 0.014 and 0.038). So the test
    asserts what holds over three seeds: under a lowered KL limit of 0.05 (the tiny KL is far below the
    default's) calm never diverges and overoptimize does, for "kl", in at least one seed; averaged over
    the seeds, overoptimize's KL is more than 1.5 times calm's and collapse's above calm's; noisy_reward's
    bursts more than double the reward spread (3.8 against 1.5 on seed 1)."""
    seeds = (1, 2, 3)
    limit = {"kl_limit": 0.05}
    runs = {sc: [_episode(kw, sc, s, divergence=limit) for s in seeds] for sc in ("calm", "overoptimize")}
    runs["collapse"] = [_episode(kw, "collapse", s) for s in seeds]
    assert not any(r[-1]["diverged"] for r in runs["calm"])
    assert max(max(i["kl_max"] for i in r[1:]) for r in runs["calm"]) < 0.05
    over = [r[-1] for r in runs["overoptimize"] if r[-1]["diverged"]]
    assert over and all(i["divergence_reasons"] == ["kl"] for i in over)
    mean_kl = {sc: np.mean([np.mean([i["kl_max"] for i in r[1:]]) for r in rs]) for sc, rs in runs.items()}
    assert mean_kl["overoptimize"] > 1.5 * mean_kl["calm"]
    assert mean_kl["collapse"] > mean_kl["calm"]
    noisy = _episode(kw, "noisy_reward", 1)
    burst = [i["window"]["reward_std"] for i in noisy if i["noisy_steps"]]
    quiet = [i["window"]["reward_std"] for i in noisy if not i["noisy_steps"]]
    assert burst and quiet and np.mean(burst) > 2 * np.mean(quiet)


def test_rloo_runs_under_the_same_knobs_masks_the_entropy_bonus_and_replays(kw):
    from trl import RLOOTrainer

    env = RLHFEnv(**kw, settings={"algorithm": "rloo"})
    env.reset(seed=1)
    assert isinstance(env.run.stepped.trainer, RLOOTrainer)
    mask = env.action_masks()
    assert mask[7] and not mask[8] and not mask[9]  # no entropy term: only "no bonus"
    sid = env.snapshot()
    with pytest.warns(UserWarning, match="masked choice was clamped"):
        o1, r1, _, _, info = env.step(np.array([1, 2, 2, 1, 2, 0]))
    assert info["action_overridden"] and env.run.knobs.entropy_coef == 0.0 and env.run.knobs.beta > 0
    assert np.isfinite(info["kl"]) and info["window"]["steps"] == 4
    env.restore(sid)
    with pytest.warns(UserWarning):
        o2, r2, *_ = env.step(np.array([1, 2, 2, 1, 2, 0]))
    assert np.array_equal(o1, o2) and r1 == r2
    with pytest.raises(ConfigError, match="algorithm"):
        RLHFEnv(**kw, settings={"algorithm": "ppo"})
    env.close()
