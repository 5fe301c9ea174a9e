"""Exploratory collection into the log database, and STSO-Proxy-v0 built on a proxy trained from it."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import gymnasium as gym
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import stso_env  # noqa: F401  (registers the envs)
from agents import collect
from stso_env.envs.gpt2_env import ACTION_NVEC
from stso_env.envs.proxy_env import ProxyEnv, ProxyVecModel
from stso_env.errors import ConfigError, DataError
from stso_env.monitor.monitor import OBSERVATION_NAMES
from stso_env.proxy.dataset import build_targets
from stso_env.proxy.logdb import read_log_db
from stso_env.proxy.model import ProxyConfig, ProxyEnsemble

REPO = Path(__file__).resolve().parent.parent
# 40 training steps, one window at reset and 3 logged env steps per episode
TINY_COLLECT = ["--episode-steps", "40", "--decision-interval", "10", "--builtin-chars", "20000",
                "--scenario", "spiky,calm", "--policy", "mixed", "--seed", "3", "--no-progress"]


def run_collect(run_dir: Path, episodes: int) -> subprocess.CompletedProcess:
    # one thread: on a shared 2-core machine torch's thread pool is many times slower under contention
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "agents.collect", "--episodes", str(episodes),
                           "--run-dir", str(run_dir), *TINY_COLLECT],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def collected(tmp_path_factory) -> Path:
    """A run folder after two collect calls of 2 episodes each; the table after the first call is kept."""
    run_dir = tmp_path_factory.mktemp("collect") / "run"
    first = run_collect(run_dir, 2)
    assert first.returncode == 0, first.stderr
    t1 = read_log_db(run_dir / "log_db.parquet")
    second = run_collect(run_dir, 2)
    assert second.returncode == 0, second.stderr
    (run_dir / "first_rows.txt").write_text(str(t1.num_rows))
    return run_dir


def test_collect_appends_without_collisions(collected: Path):
    t = read_log_db(collected / "log_db.parquet")
    first_rows = int((collected / "first_rows.txt").read_text())
    assert first_rows == 6 and t.num_rows == 12  # 2 episodes x 3 env steps per call
    ep = np.asarray(t.column("episode").to_pylist())
    seed = np.asarray(t.column("seed").to_pylist())
    assert sorted(set(ep.tolist())) == [0, 1, 2, 3]
    assert np.all(seed == 3 + ep)  # episode k runs with seed --seed + k
    keys = list(zip(t.column("run_id").to_pylist(), ep.tolist(), t.column("env_step").to_pylist()))
    assert len(set(keys)) == len(keys)
    scen = dict(zip(ep.tolist(), t.column("scenario").to_pylist()))
    assert [scen[k] for k in range(4)] == ["spiky", "calm", "spiky", "calm"]
    # every executed action respects the mask (skip_batch stays 0) and nothing was overridden
    actions = np.asarray(t.column("action").to_pylist())
    assert actions.shape == (12, 6) and not actions[:, 5].any()
    assert not any(t.column("action_overridden").to_pylist())


def test_parallel_collection_equals_the_serial_one(collected: Path, tmp_path):
    """Two worker processes of one thread each write the rows two serial one-thread calls wrote: each
    episode depends on its number alone, whichever process runs it and whatever ran before in it."""
    run_dir = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "agents.collect", "--episodes", "4", "--run-dir", str(run_dir),
                          "--workers", "2", "--threads", "1", *TINY_COLLECT],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "collected 4 episodes (numbers 0..3), 12 env steps" in out.stdout

    def rows(path: Path) -> dict[str, list]:
        t = read_log_db(path / "log_db.parquet")
        order = np.lexsort((t.column("env_step").to_numpy(), t.column("episode").to_numpy()))
        # the run id is the folder's name and the wall time the clock's: neither is the run's
        return {c: [t.column(c)[int(i)].as_py() for i in order] for c in t.column_names
                if c not in ("run_id", "wall_seconds")}

    serial, parallel = rows(collected), rows(run_dir)
    assert sorted(set(parallel["episode"])) == [0, 1, 2, 3]
    for column, values in serial.items():
        assert parallel[column] == values, column


@pytest.mark.parametrize("flags, message", [(["--workers", "0"], "workers: must be >= 1, got 0"),
                                            (["--workers", "2", "--threads", "0"], "threads: must be >= 1, got 0"),
                                            (["--threads", "1"], "threads: sets the torch threads of worker")])
def test_collect_refuses_bad_parallel_settings(tmp_path, capsys, flags, message):
    rc = collect.main(["--episodes", "1", "--run-dir", str(tmp_path / "run"), "--no-progress", *flags])
    assert rc == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before anything ran


def test_collect_refuses_other_schema(tmp_path, capsys):
    db = tmp_path / "run" / "log_db.parquet"
    db.mkdir(parents=True)
    pq.write_table(pa.table({"episode": [0], "something_else": [1.0]}), db / "part-00000000000000000001-x.parquet")
    rc = collect.main(["--episodes", "1", "--run-dir", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "does not match assets/log_schema.json" in err and "new run folder" in err


def test_policies_respect_mask():
    rng = np.random.default_rng(0)
    mask = np.ones(17, dtype=bool)
    mask[-1] = False
    for _ in range(200):
        assert collect.random_valid_action(rng, ACTION_NVEC, mask)[5] == 0
    sched = collect.PerturbedSchedule(rng, ACTION_NVEC)
    acts = np.array([sched(mask) for _ in range(200)])
    neutral = (acts == collect.NEUTRAL).all(1)
    assert 0.3 < neutral.mean() < 0.95 and not acts[:, 5].any()


class _Spaces(gym.Env):
    """Only the spaces of STSO-GPT2-v0: enough to build and save a MaskablePPO policy without a training run."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, (len(OBSERVATION_NAMES),), np.float32)
    action_space = gym.spaces.MultiDiscrete(ACTION_NVEC)


def test_learned_policy_samples_its_own_distribution_within_the_masks(tmp_path):
    from sb3_contrib import MaskablePPO

    model = MaskablePPO("MlpPolicy", _Spaces(), n_steps=8, batch_size=8, seed=0, device="cpu")
    # the policy's logits fixed by hand: the action head ignores the state and its bias sets each choice's
    # probability, e.g. LR change 0.1 / 0.2 / 0.3 / 0.4
    head = model.policy.action_net
    wanted = [[0.1, 0.2, 0.3, 0.4], [0.5, 0.25, 0.25], [0.7, 0.1, 0.1, 0.1], [0.9, 0.1], [0.5, 0.5], [0.2, 0.8]]
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.log(torch.tensor([p for dim in wanted for p in dim])))
    path = tmp_path / "policy.zip"
    model.save(str(path))
    sampler = collect.PolicySampler(path)
    obs = np.zeros(len(OBSERVATION_NAMES), dtype=np.float32)
    mask = np.ones(sum(ACTION_NVEC), dtype=bool)
    for got, want in zip(sampler.probabilities(obs, mask), wanted):
        np.testing.assert_allclose(got, want, rtol=1e-5)
    mask[3] = False  # LR x1.1 not allowed: the others keep their odds, 0.1 : 0.2 : 0.3
    np.testing.assert_allclose(sampler.probabilities(obs, mask)[0], [1 / 6, 2 / 6, 3 / 6, 0.0], rtol=1e-5)
    # sampled, seeded by the caller's generator: the same seed gives the same actions
    draws = [np.array([sampler(rng, obs, mask, 1.0) for _ in range(300)])
             for rng in (np.random.default_rng(5), np.random.default_rng(5))]
    np.testing.assert_array_equal(*draws)
    assert not (draws[0][:, 0] == 3).any() and 0.35 < (draws[0][:, 0] == 2).mean() < 0.65  # 0.5 expected
    assert 0.7 < draws[0][:, 5].mean() < 0.9  # skip batch: 0.8 expected
    assert sampler.bounded == 0
    # the LR drift is bounded as in evaluation: at LR scale 0.55 an x0.8 change (0.44 < 0.5) runs as x1.0
    only_lower = mask.copy()
    only_lower[1:4] = False
    for _ in range(5):
        assert sampler(np.random.default_rng(1), obs, only_lower, 0.55)[0] == 2
    assert sampler(np.random.default_rng(1), obs, only_lower, 1.0)[0] == 0
    assert sampler.bounded == 5


def test_learned_collection_needs_a_policy(tmp_path):
    kw = dict(episodes=1, run_dir=tmp_path, scenarios=["calm"], corpus="builtin", seed=0, episode_steps=20,
              decision_interval=10, progress=False)
    with pytest.raises(ConfigError, match="needs --policy-path"):
        collect.collect(policy="learned", **kw)
    with pytest.raises(ConfigError, match="needs --policy-path"):
        collect.collect(policy="mixed", policy_path=tmp_path / "policy.zip", **kw)
    with pytest.raises(ConfigError, match="--policy-path: policy .*no such file"):
        collect.collect(policy="learned", policy_path=tmp_path / "policy.zip", **kw)
    assert not (tmp_path / "log_db.parquet").exists()  # refused before anything ran


@pytest.fixture(scope="module")
def proxy_dir(collected: Path, tmp_path_factory) -> Path:
    ds = build_targets(read_log_db(collected / "log_db.parquet"), horizon=2)
    model = ProxyEnsemble(ProxyConfig(horizon=2, hidden=32, ensemble=3, epochs=30, patience=30, batch=64),
                          state_dim=ds.state.shape[1], nvec=ds.action_nvec, state_names=ds.state_names)
    model.fit(ds, ds)
    return model.save(tmp_path_factory.mktemp("proxy"))


def make_proxy_env(proxy_dir: Path, collected: Path, **kw) -> gym.Env:
    return gym.make("STSO-Proxy-v0", proxy_dir=str(proxy_dir), log_db=str(collected / "log_db.parquet"),
                    episode_steps=kw.pop("episode_steps", 20), **kw)


def test_proxy_env_passes_checkers(proxy_dir: Path, collected: Path):
    from gymnasium.utils.env_checker import check_env as gym_check
    from stable_baselines3.common.env_checker import check_env as sb3_check

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the masked-skip override warning when checkers sample skip=1
        gym_check(make_proxy_env(proxy_dir, collected).unwrapped, skip_render_check=True)
        sb3_check(ProxyEnv(str(proxy_dir), str(collected / "log_db.parquet"), episode_steps=20), warn=True)
        gym_check(make_proxy_env(proxy_dir, collected, sample_member=True).unwrapped, skip_render_check=True)


def rollout(env: gym.Env, seed: int, n: int = 15):
    obs, _ = env.reset(seed=seed)
    rng = np.random.default_rng(seed)
    states, rewards = [obs], []
    for _ in range(n):
        a = rng.integers(0, env.action_space.nvec)
        a[5] = 0
        obs, r, term, trunc, _ = env.step(a)
        states.append(obs)
        rewards.append(r)
        if term or trunc:
            break
    return np.array(states), np.array(rewards)


def test_proxy_env_same_seed_same_trajectory(proxy_dir: Path, collected: Path):
    for kw in ({}, {"sample_member": True}):
        a = rollout(make_proxy_env(proxy_dir, collected, **kw), seed=5)
        b = rollout(make_proxy_env(proxy_dir, collected, **kw), seed=5)
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
        env = make_proxy_env(proxy_dir, collected, **kw)
        assert np.all(np.abs(a[0]) <= 100) and a[0].dtype == np.float32
        assert env.observation_space.contains(a[0][-1])


def test_batched_path_equals_single_steps(proxy_dir: Path, collected: Path):
    env = make_proxy_env(proxy_dir, collected).unwrapped
    vec = ProxyVecModel(str(proxy_dir), nats_per_loss_unit=env.model.nats_per_loss_unit)
    rng = np.random.default_rng(1)
    states, actions, singles = [], [], []
    for seed in range(8):
        obs, _ = env.reset(seed=seed)
        a = rng.integers(0, env.action_space.nvec)
        a[5] = 0
        nxt, r, term, _, _ = env.step(a)
        states.append(obs)
        actions.append(a)
        singles.append((nxt, r, term))
    ns, rs, ts = vec.step_batch(np.array(states), np.array(actions))
    assert ns.shape == (8, len(OBSERVATION_NAMES)) and rs.shape == (8,) and ts.dtype == bool
    for i, (nxt, r, term) in enumerate(singles):
        np.testing.assert_allclose(ns[i], nxt, rtol=1e-5, atol=1e-5)
        assert abs(rs[i] - r) < 1e-4 and ts[i] == term
    # mean next state agrees with ProxyEnsemble.predict, the documented transition
    pred = vec.model.predict(np.array(states), np.array(actions))
    np.testing.assert_allclose(ns, np.clip(pred["next_state"], -100, 100), rtol=1e-5, atol=1e-5)


def test_proxy_env_masks_and_errors(proxy_dir: Path, collected: Path):
    env = make_proxy_env(proxy_dir, collected).unwrapped
    assert env.action_masks().tolist() == [True] * 16 + [False]
    env.reset(seed=0)
    with pytest.warns(UserWarning, match="skip_batch is masked"):
        _, _, _, _, info = env.step([2, 1, 0, 0, 0, 1])
    assert info["action_overridden"]
    with pytest.raises(ValueError, match="outside the action space"):
        env.step([9, 0, 0, 0, 0, 0])
    with pytest.raises(DataError, match="states"):
        env.model.step_batch(np.zeros((2, 7)), np.zeros((2, 6), dtype=int))
    with pytest.raises(ConfigError, match="reward_weights"):
        make_proxy_env(proxy_dir, collected, reward_weights={"speed": 1.0})


def test_uncertainty_penalty_subtracts_member_disagreement(proxy_dir: Path, collected: Path):
    plain = ProxyVecModel(str(proxy_dir))
    lam = 2.0
    pessimist = ProxyVecModel(str(proxy_dir), uncertainty_penalty=lam)
    rng = np.random.default_rng(0)
    states = rng.normal(0, 0.3, size=(16, len(OBSERVATION_NAMES))).astype(np.float32)
    actions = np.stack([rng.integers(n, size=16) for n in (4, 3, 4, 2, 2, 1)], axis=1)
    h = plain.heads(states, actions)
    # the spread is the members' std of the probe-loss-feature change, in nats
    m = plain.model
    with torch.no_grad():
        out = m(m._encode(states, actions)) * m.y_std + m.y_mean
    probe = OBSERVATION_NAMES.index("probe_loss")
    expected_spread = out[..., 4 + probe].std(0, unbiased=False).numpy() * plain.nats_per_loss_unit
    np.testing.assert_allclose(h["progress_spread"], expected_spread, rtol=1e-5)
    assert (h["progress_spread"] > 0).all()
    s1, r1, t1 = plain.step_batch(states, actions)
    s2, r2, t2 = pessimist.step_batch(states, actions)
    np.testing.assert_array_equal(s1, s2)
    np.testing.assert_allclose(r1 - r2, lam * plain.reward_weights.progress * expected_spread, rtol=1e-5)
    with pytest.raises(ConfigError, match="uncertainty_penalty"):
        ProxyVecModel(str(proxy_dir), uncertainty_penalty=-1.0)


def test_loss_head_predicts_the_change_from_the_probe_loss_in_the_state(proxy_dir: Path, collected: Path):
    model = ProxyEnsemble.load(proxy_dir)
    # the probe_loss feature is probe loss / ln(vocab); the byte tokenizer has 257 ids
    assert float(model.probe_scale) == pytest.approx(math.log(257), rel=1e-5)
    ds = build_targets(read_log_db(collected / "log_db.parquet"), horizon=2)
    np.testing.assert_allclose(model.loss_baseline(ds.state), ds.loss_before, rtol=1e-5)
    with torch.no_grad():
        raw = model(model._encode(ds.state, ds.action)) * model.y_std + model.y_mean
    # the default tree head predicts the change too; the MLP's own head stays a change from the probe loss
    assert model.config.loss_model == "trees" and model.loss_trees is not None
    from stso_env.proxy.dataset import encode_actions

    change, _ = model.loss_trees.predict(ds.state, encode_actions(ds.action, model.nvec, model.tree_encoding))
    np.testing.assert_allclose(model.predict(ds.state, ds.action)["loss_at_n"], change + ds.loss_before,
                               rtol=1e-5, atol=1e-5)
    model.loss_trees = None
    np.testing.assert_allclose(model.predict(ds.state, ds.action)["loss_at_n"],
                               raw[..., 0].mean(0).numpy() + ds.loss_before, rtol=1e-5, atol=1e-5)
    # a log whose probe feature has another scale per row mixes tokenizers: refused, not averaged
    mixed = ds.subset(np.arange(len(ds)))
    mixed.loss_before = mixed.loss_before * np.where(np.arange(len(ds)) % 2, 1.0, 2.0).astype(np.float32)
    fresh = ProxyEnsemble(ProxyConfig(horizon=2, hidden=8, ensemble=2, epochs=1), state_dim=ds.state.shape[1],
                          nvec=ds.action_nvec, state_names=ds.state_names)
    with pytest.raises(DataError, match="mixes tokenizers"):
        fresh.fit(mixed, mixed)
