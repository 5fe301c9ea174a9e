"""Branch orchestrator: files, collapse rule, FLOP accounting, isolation of the real run, masks, config errors."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict

import gymnasium as gym
import numpy as np
import pytest

import stso_env  # noqa: F401  (registers the env)
from stso_env.branch import BranchConfig, BranchOrchestrator, real_score, valid_actions
from stso_env.envs.gpt2_env import NEUTRAL_ACTION
from stso_env.errors import ConfigError
from stso_env.proxy.model import ProxyConfig, ProxyEnsemble

ENV = {"preset": "tiny", "scenario": "spiky", "decision_interval": 5, "episode_steps": 200}
STEPS = [[1, 1, 1, 0, 0, 0]]  # one window: training steps dominate the runtime on 2 cores


def proxy() -> ProxyEnsemble:
    # untrained on purpose: the orchestrator must work with any proxy
    return ProxyEnsemble(ProxyConfig(horizon=4, hidden=16, layers=1, ensemble=3, seed=0))


def make_env(**kw):
    env = gym.make("STSO-GPT2-v0", **{**ENV, **kw})
    env.reset(seed=0)
    for a in STEPS:
        env.step(a)
    return env


@pytest.fixture(scope="module")
def decided(tmp_path_factory):
    """One decision on a tiny run, with a fork taken before it as the reference for isolation."""
    out = tmp_path_factory.mktemp("branches")
    env = make_env()
    base = env.unwrapped
    base.snapshot()
    reference = base.fork()
    spare = base.fork()  # for the rollback test, so it needs no second reset
    obs_before, step_before = base._obs.copy(), base.trainer.global_step
    cfg = BranchConfig(n_candidates=20, top_k=3, verify_steps=10, out_dir=str(out), seed=1)
    decision = BranchOrchestrator(cfg, proxy()).decide(env, "run0")
    yield env, reference, decision, cfg, obs_before, step_before, spare
    reference.close()
    spare.close()
    env.close()


def test_decision_files(decided):
    _, _, d, cfg, _, step, _ = decided
    assert d.path.name == "decision.json" and d.path.parent.name == str(step)
    doc = json.loads(d.path.read_text())
    for key in ("trigger_state", "candidates", "verification", "chosen_action", "reason", "executor"):
        assert key in doc, key
    assert len(doc["trigger_state"]["obs"]) == len(doc["trigger_state"]["names"]) == 50
    assert len(doc["candidates"]) == cfg.n_candidates
    assert len(doc["verification"]) == cfg.top_k
    assert doc["executor"] == "sequential"
    for v in doc["verification"]:
        cand = json.loads((d.path.parent / f"candidate_{v['id']}.json").read_text())
        assert cand["action"] == v["action"]
        lines = (d.path.parent / f"verification_{v['id']}.log").read_text().splitlines()
        assert len(lines) == v["env_steps"] == 2  # 10 training steps / decision_interval 5
        for line in lines:
            assert set(json.loads(line)) == {"global_step", "train_loss", "probe_loss", "reward"}
    manifest = json.loads((d.path.parent / "seed_manifest.json").read_text())
    assert manifest["env_seed"] == 0 and len(manifest["fork_ids"]) == cfg.top_k
    assert manifest["config"]["top_k"] == cfg.top_k
    assert not list(d.path.parent.glob("*.tmp"))


def test_chosen_is_best_verified(decided):
    _, _, d, cfg, _, _, _ = decided
    scores = [real_score({**v, "probe_loss": v["probe_loss"] if v["probe_loss"] is not None else math.nan}, cfg)
              for v in d.verification]
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    assert d.chosen_action == d.verification[best]["action"]
    # proxy table is sorted best first and the verified ones are its head
    table = [c["score"] for c in d.candidates]
    assert table == sorted(table, reverse=True)
    assert [v["action"] for v in d.verification] == [c["action"] for c in d.candidates[: cfg.top_k]]


def test_verification_flops_are_wasted(decided):
    env, _, d, _, _, _, _ = decided
    wasted = env.unwrapped.monitor.events.wasted_by_reason
    assert wasted["verification"] > 0
    assert wasted["verification"] == pytest.approx(sum(v["flops"] for v in d.verification))
    assert d.wasted_flops == pytest.approx(wasted["verification"])


def test_real_run_untouched(decided):
    env, reference, d, _, obs_before, step_before, _ = decided
    base = env.unwrapped
    assert base.trainer.global_step == step_before and d.restored_from is None
    np.testing.assert_array_equal(base._obs, obs_before)
    a = np.asarray(d.chosen_action)
    obs_real, r_real, *_ = env.step(a)
    obs_ref, r_ref, *_ = reference.step(a)
    np.testing.assert_array_equal(obs_real, obs_ref)
    assert r_real == r_ref


def test_candidates_respect_mask(decided):
    _, _, d, _, _, _, _ = decided
    assert all(c["action"][5] == 0 for c in d.candidates)
    mask = np.ones(17, dtype=bool)
    assert len(valid_actions(mask)) == 384
    mask[-1] = False
    grid = valid_actions(mask)
    assert len(grid) == 192 and not grid[:, 5].any()


def test_bandit_distinct_and_masked():
    orch = BranchOrchestrator(BranchConfig(n_candidates=30, top_k=2), proxy())
    mask = np.ones(17, dtype=bool)
    mask[-1] = False
    rows, method = orch.candidates(np.zeros(50, np.float32), mask, np.random.default_rng(0))
    assert method.startswith("ucb-bandit")
    actions = [tuple(r["action"]) for r in rows]
    assert len(actions) == len(set(actions)) == 30
    assert tuple(NEUTRAL_ACTION) in actions and all(a[5] == 0 for a in actions)


def test_rollback_charges_flops(decided, tmp_path):
    base = decided[-1]
    sid = base.snapshot()
    base.step(STEPS[0])
    base.step(STEPS[0])
    cfg = BranchConfig(delta=10, n_candidates=5, top_k=1, verify_steps=5, out_dir=str(tmp_path))
    d = BranchOrchestrator(cfg, proxy()).decide(base, "rb")
    assert d.restored_from == sid and base.trainer.global_step == sid
    wasted = base.monitor.events.wasted_by_reason
    assert wasted["rollback"] > 0 and wasted["verification"] > 0
    assert d.path.parent.name == str(sid + 10) and "rolled back" in d.reason


@pytest.mark.parametrize("kw", [
    {"n_candidates": 0}, {"top_k": 0}, {"top_k": 30, "n_candidates": 20}, {"verify_steps": 0},
    {"delta": -1}, {"alpha": -1.0}, {"beta": math.nan}, {"conformal_level": 1.0}, {"horizon": 0},
    {"n_candidates": 1000}, {"use_ray": "yes"}, {"out_dir": ""}, {"alpha": 0, "beta": 0, "gamma": 0},
])
def test_bad_config(kw):
    field = next(iter(kw))
    with pytest.raises(ConfigError, match=field if field != "alpha" or len(kw) == 1 else "alpha"):
        BranchConfig(**kw)


def test_bad_arguments(tmp_path):
    with pytest.raises(ConfigError, match="horizon"):
        BranchOrchestrator(BranchConfig(horizon=7), proxy())
    with pytest.raises(ConfigError, match="proxy"):
        BranchOrchestrator(BranchConfig(), object())  # type: ignore[arg-type]
    orch = BranchOrchestrator(BranchConfig(n_candidates=5, top_k=1, out_dir=str(tmp_path)), proxy())
    with pytest.raises(ConfigError, match="run_name"):
        orch.decide(gym.make("STSO-GPT2-v0", **ENV), "../x")


def test_ray_requested_without_ray_runs_sequentially(decided, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # makes `import ray` fail, as without the extra
    _, reference, _, cfg, *_ = decided
    fork = reference.fork()
    cfg2 = BranchConfig(**{**asdict(cfg), "use_ray": True, "out_dir": str(tmp_path), "top_k": 2})
    d = BranchOrchestrator(cfg2, proxy()).decide(fork, "run-noray")
    fork.close()
    assert d.executor == "sequential" and "Ray was requested" in d.reason


def test_ray_path_on_a_local_two_cpu_ray_matches_sequential(decided, tmp_path):
    """Verification as Ray tasks (the `distributed` extra) gives the same outcomes as in-process forks."""
    ray = pytest.importorskip("ray", reason="the Ray path needs the `distributed` extra (make test installs it)")
    _, reference, _, cfg, *_ = decided
    results = {}
    for use_ray in (False, True):
        fork = reference.fork()
        c = BranchConfig(**{**asdict(cfg), "use_ray": use_ray, "out_dir": str(tmp_path / str(use_ray)),
                            "top_k": 2})
        d = BranchOrchestrator(c, proxy()).decide(fork, "run-ray")
        fork.close()
        results[use_ray] = d
    assert results[True].executor == "ray" and results[False].executor == "sequential"
    assert ray.is_initialized() and ray.cluster_resources().get("CPU") == 2.0
    assert results[True].verification == results[False].verification
    assert results[True].chosen_action == results[False].chosen_action
    assert results[True].wasted_flops == results[False].wasted_flops > 0
    ray.shutdown()


class _FakeCalibrator:
    """Stands in for MAPIE's SplitConformalRegressor: upper bound = lr_change column * 10 (level 0.9)."""

    _alphas = [0.1]

    def predict_interval(self, feats):
        upper = feats[:, 50] * 10.0
        return upper, np.stack([upper - 1, upper], axis=1)[:, :, None]


def test_score_uses_conformal_upper_bound():
    cfg = BranchConfig(n_candidates=4, top_k=1, beta=0.0, gamma=0.0)
    orch = BranchOrchestrator(cfg, proxy(), calibrator=_FakeCalibrator())
    actions = np.array([[a, 1, 0, 0, 0, 0] for a in range(4)])
    rows = orch.score(np.zeros(50, np.float32), actions)
    assert [r["loss_upper"] for r in rows] == [0.0, 10.0, 20.0, 30.0]
    assert [r["score"] for r in rows] == [-0.0, -10.0, -20.0, -30.0]
    with pytest.raises(ConfigError, match="level"):
        BranchOrchestrator(BranchConfig(conformal_level=0.8), proxy(), _FakeCalibrator()).score(
            np.zeros(50, np.float32), actions)


def test_stored_conformal_bounds_make_scores_pessimistic():
    from stso_env.proxy.calibration import ConformalBounds

    p = proxy()
    state = np.zeros(50, dtype=np.float32)
    acts = np.asarray([NEUTRAL_ACTION, [0, 0, 1, 1, 0, 0]])
    bounds = ConformalBounds({"loss_at_n": {"0.9": 0.25}, "instability_risk": {"0.9": 2.0}})
    cfg = BranchConfig(alpha=1.0, beta=1.0, gamma=0.0, conformal_level=0.9)
    plain = BranchOrchestrator(BranchConfig(alpha=1.0, beta=1.0, gamma=0.0, k_std=0.0), p).score(state, acts)
    bounded = BranchOrchestrator(cfg, p, bounds).score(state, acts)
    pred = p.predict(np.repeat(state[None], 2, 0), acts)
    for i, (a, b) in enumerate(zip(plain, bounded)):
        assert math.isclose(b["loss_upper"], b["loss_mean"] + 0.25, rel_tol=1e-6)
        dstd = pred["diverged_prob"][i] + pred["diverged_prob_std"][i]
        expected_risk = pred["instability_risk"][i] + 2.0 + min(1.0, max(0.0, dstd))
        assert math.isclose(b["risk"], expected_risk, rel_tol=1e-5)
        assert b["score"] < a["score"]


def test_adopt_continues_as_the_chosen_fork(tmp_path):
    import torch

    env = make_env()
    base = env.unwrapped
    ref = base.fork()  # the run as it was at the trigger
    step0 = base.trainer.global_step
    cfg = BranchConfig(n_candidates=20, top_k=2, verify_steps=10, out_dir=str(tmp_path), seed=1, adopt=True)
    d = BranchOrchestrator(cfg, proxy()).decide(env, "run0")
    doc = json.loads(d.path.read_text())
    assert d.adopted and doc["adopted"] is True
    chosen = next(v for v in doc["verification"] if v["id"] == doc["chosen_id"])
    # the run is now exactly the trigger state continued under the chosen action (determinism contract)
    for _ in range(chosen["env_steps"]):
        ref.step(np.asarray(d.chosen_action))
    assert base.trainer.global_step == ref.trainer.global_step == step0 + 10 == doc["global_step_after"]
    for p, q in zip(base.trainer.model.parameters(), ref.trainer.model.parameters()):
        assert torch.equal(p, q)
    np.testing.assert_array_equal(base._obs, ref._obs)
    # only the forks not adopted are waste
    others = sum(v["flops"] for v in doc["verification"] if v["id"] != doc["chosen_id"])
    assert math.isclose(d.adopted_flops, chosen["flops"]) and math.isclose(d.wasted_flops, others)
    assert math.isclose(base.monitor.events.wasted_by_reason["verification"], others)
    assert math.isclose(base._total_flops, ref._total_flops)
    ref.close()
    env.close()
