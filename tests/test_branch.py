"""Branch orchestrator: rollback, plans, files, accept/reject, collapse, FLOP accounting, isolation, masks, errors."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict

import gymnasium as gym
import numpy as np
import pytest

import stso_env  # noqa: F401  (registers the env)
from stso_env.branch import (NEUTRAL_PLAN, BranchConfig, BranchOrchestrator, real_score, rise_start, valid_actions,
                             valid_plans)
from stso_env.envs.gpt2_env import NEUTRAL_ACTION
from stso_env.errors import ConfigError
from stso_env.monitor.monitor import OBSERVATION_NAMES
from stso_env.proxy.calibration import ConformalBounds
from stso_env.proxy.dataset import PLAN_NVEC
from stso_env.proxy.model import ProxyConfig, ProxyEnsemble

ENV = {"preset": "tiny", "scenario": "spiky", "decision_interval": 5, "episode_steps": 200}
STEPS = [[1, 1, 1, 0, 0, 0]]  # one window: training steps dominate the runtime on 2 cores
S = len(OBSERVATION_NAMES)


def proxy(plans: bool = False) -> ProxyEnsemble:
    # untrained on purpose: the orchestrator must work with any proxy; horizon 2 windows = 10 steps here
    return ProxyEnsemble(ProxyConfig(horizon=2, hidden=16, layers=1, ensemble=3, seed=0),
                         nvec=PLAN_NVEC if plans else (4, 3, 4, 2, 2, 2))


def make_env(**kw):
    env = gym.make("STSO-GPT2-v0", **{**ENV, **kw})
    env.reset(seed=0)
    for a in STEPS:
        env.step(a)
    return env


@pytest.fixture(scope="module")
def decided(tmp_path_factory):
    """One decision on a tiny run (no adoption, so the run stays as it was), with a fork taken before it as
    the reference for isolation."""
    out = tmp_path_factory.mktemp("branches")
    env = make_env()
    base = env.unwrapped
    reference = base.fork()
    spare = base.fork()  # for the rollback test, so it needs no second reset
    obs_before, step_before = base._obs.copy(), base.trainer.global_step
    cfg = BranchConfig(n_candidates=20, top_k=3, out_dir=str(out), seed=1, adopt=False)
    decision = BranchOrchestrator(cfg, proxy()).decide(env, "run0")
    yield env, reference, decision, cfg, obs_before, step_before, spare
    reference.close()
    spare.close()
    env.close()


def test_decision_files(decided):
    _, _, d, cfg, _, step, _ = decided
    assert d.path.name == "decision.json" and d.path.parent.name == str(step)
    doc = json.loads(d.path.read_text())
    for key in ("trigger_state", "rollback", "candidates", "verification", "chosen_plan", "chosen_action",
                "reason", "executor", "calibration_check", "candidate_search", "weights", "horizon_env_steps"):
        assert key in doc, key
    assert len(doc["trigger_state"]["obs"]) == len(doc["trigger_state"]["names"]) == S
    assert doc["horizon_env_steps"] == 2 and doc["horizon_steps"] == 10  # the proxy's own horizon
    assert len(doc["candidates"]) == cfg.n_candidates
    control = [v for v in doc["verification"] if v["control_arm"]]
    assert len(control) == 1 and control[0]["plan"] == list(NEUTRAL_PLAN) and control[0]["accepted"]
    assert len(doc["verification"]) == cfg.top_k + (not any(tuple(c["plan"]) == NEUTRAL_PLAN
                                                            for c in doc["candidates"][:cfg.top_k]))
    assert doc["executor"] == "sequential"
    for v in doc["verification"]:
        cand = json.loads((d.path.parent / f"candidate_{v['id']}.json").read_text())
        assert cand["plan"] == v["plan"] and len(v["band"]) == 2 and v["band"][0] <= v["band"][1]
        lines = (d.path.parent / f"verification_{v['id']}.log").read_text().splitlines()
        assert len(lines) == v["env_steps"] == 2
        for k, line in enumerate(lines):
            row = json.loads(line)
            assert set(row) == {"global_step", "action", "train_loss", "probe_loss", "reward"}
            assert row["action"] == (v["plan"][:6] if k == 0 else v["plan"][6:])
    check = doc["calibration_check"]
    assert check["checked"] == len(doc["verification"]) and check["nominal_rate"] == pytest.approx(0.1)
    manifest = json.loads((d.path.parent / "seed_manifest.json").read_text())
    assert manifest["env_seed"] == 0 and len(manifest["fork_ids"]) == len(doc["verification"])
    assert manifest["config"]["top_k"] == cfg.top_k
    assert not list(d.path.parent.glob("*.tmp"))


def test_chosen_is_best_accepted_verified(decided):
    _, _, d, cfg, _, _, _ = decided
    scores = [real_score({**v, "probe_loss": v["probe_loss"] if v["probe_loss"] is not None else math.nan}, cfg)
              if v["accepted"] else -math.inf for v in d.verification]
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    assert d.chosen_plan == d.verification[best]["plan"] and d.chosen_action == d.chosen_plan[:6]
    # the proxy table is sorted best first and the verified ones are its head (then the control arm)
    table = [c["score"] for c in d.candidates]
    assert table == sorted(table, reverse=True)
    assert [v["plan"] for v in d.verification[: cfg.top_k]] == [c["plan"] for c in d.candidates[: cfg.top_k]]
    # a proxy trained on single actions scores plans that hold the first action's settings
    assert all(c["plan"][6:] == c["plan"][:3] + [0, 0, 0] for c in d.candidates)


def test_verification_flops_are_wasted(decided):
    env, _, d, _, _, _, _ = decided
    wasted = env.unwrapped.monitor.events.wasted_by_reason
    assert wasted["verification"] > 0 and not d.adopted
    assert wasted["verification"] == pytest.approx(sum(v["flops"] for v in d.verification))
    assert d.wasted_flops == pytest.approx(wasted["verification"])


def test_real_run_untouched(decided):
    env, reference, d, _, obs_before, step_before, _ = decided
    base = env.unwrapped
    assert base.trainer.global_step == step_before and d.restored_from is None  # no snapshots: no rollback
    np.testing.assert_array_equal(base._obs, obs_before)
    a = np.asarray(d.chosen_action)
    obs_real, r_real, *_ = env.step(a)
    obs_ref, r_ref, *_ = reference.step(a)
    np.testing.assert_array_equal(obs_real, obs_ref)
    assert r_real == r_ref


def test_plan_space_respects_the_mask():
    mask = np.ones(17, dtype=bool)
    assert len(valid_actions(mask)) == 384
    assert valid_plans(mask).shape == (384 * 48, 12)
    mask[-1] = False
    grid = valid_actions(mask)
    assert len(grid) == 192 and not grid[:, 5].any()
    plans = valid_plans(mask)
    assert plans.shape == (192 * 48, 12) and not plans[:, 5].any() and not plans[:, 9:].any()
    assert len({tuple(p) for p in plans}) == len(plans)
    held = valid_plans(mask, plans=False)
    assert held.shape == (192, 12) and (held[:, 6:9] == held[:, :3]).all()


def test_bandit_samples_distinct_valid_plans():
    orch = BranchOrchestrator(BranchConfig(n_candidates=30, top_k=2), proxy(plans=True))
    mask = np.ones(17, dtype=bool)
    mask[-1] = False
    rows, method = orch.candidates(np.zeros(S, np.float32), mask, np.random.default_rng(0))
    assert method.startswith("ucb-bandit (30 of 9216 valid plans")
    plans = [tuple(r["plan"]) for r in rows]
    assert len(plans) == len(set(plans)) == 30
    assert NEUTRAL_PLAN in plans and all(p[5] == 0 and not any(p[9:]) for p in plans)


def test_rise_start_known_answers():
    assert rise_start([0.0, 1.0, 0.5, 0.2, 0.4, 0.9, 1.5]) == 3  # rising from window 3
    assert rise_start([0.0, 0.2, 2.0, 1.5]) == 0  # past the peak: back over the fall, then down the rise
    assert rise_start([1.0, 1.0, 1.0]) == 0  # flat: the whole history
    assert rise_start([3.0]) == 0


def test_rollback_goes_to_the_last_snapshot_before_the_index_rose(decided, tmp_path):
    base = decided[-1]
    sids, flops_at = [], []
    for _ in range(5):  # snapshots after windows k .. k+4
        sids.append(base.snapshot())
        flops_at.append(base._total_flops)
        base.step(STEPS[0])
    trigger = base.trainer.global_step
    # the index rose over the last three windows: from the end of the window of sids[2] on
    h = base._history
    n = len(h["index_max"])
    h["index_max"][-5:] = [1.0, 0.4, 0.2, 1.5, 3.0]
    assert h["global_step"][n - 3] == sids[3]
    flops_before = base._total_flops
    cfg = BranchConfig(n_candidates=5, top_k=1, max_rollback_steps=100, out_dir=str(tmp_path))
    d = BranchOrchestrator(cfg, proxy()).decide(base, "rb")
    # the rise started after the window ending at sids[3]; that snapshot is the last before it
    assert d.restored_from == sids[3]
    doc = json.loads(d.path.read_text())
    assert doc["rollback"]["rise_start_step"] == sids[3] and "last one before the rise" in doc["rollback"]["why"]
    wasted = base.monitor.events.wasted_by_reason
    assert wasted["rollback"] == pytest.approx(flops_before - flops_at[3]) and wasted["rollback"] > 0
    assert "rolled back" in d.reason and d.path.parent.name == str(trigger)


def test_rollback_limit(decided, tmp_path):
    base = decided[-1]
    for _ in range(4):
        base.snapshot()
        base.step(STEPS[0])
    trigger = base.trainer.global_step
    base._history["index_max"][-5:] = [5.0, 0.0, 0.5, 1.0, 2.0]  # rising for 4 windows = 20 steps
    cfg = BranchConfig(n_candidates=5, top_k=1, max_rollback_steps=10, out_dir=str(tmp_path))
    d = BranchOrchestrator(cfg, proxy()).decide(base, "cap")
    assert d.restored_from == trigger - 10 and "oldest inside the limit" in d.reason


def test_band_check_rejects_outcomes_outside_the_band_and_widens_it(decided, tmp_path):
    _, reference, _, cfg, *_ = decided
    results = {}
    for q in (1e-9, 1e9):  # bands far too narrow, and so wide nothing leaves them
        fork = reference.fork()
        bounds = ConformalBounds({"loss_at_n": {"0.9": q}})
        c = BranchConfig(**{**asdict(cfg), "out_dir": str(tmp_path / str(q)), "top_k": 2})
        orch = BranchOrchestrator(c, proxy(), bounds)
        results[q] = (orch.decide(fork, "band"), orch)
        fork.close()
    d, orch = results[1e-9]
    # only the control arm is eligible: every other plan left its (point-like) band
    assert all(v["accepted"] == v["control_arm"] for v in d.verification)
    assert d.chosen_plan == list(NEUTRAL_PLAN)
    assert orch.rejected == orch.checked == len(d.verification) and orch.band_scale > 1.0  # rate 1 > 0.1: wider
    d, orch = results[1e9]
    assert all(v["accepted"] and v["inside_band"] for v in d.verification)
    assert orch.rejected == 0 and orch.band_scale < 1.0  # rate 0 < 0.1: the band narrows


@pytest.mark.parametrize("kw", [
    {"n_candidates": 0}, {"top_k": 0}, {"top_k": 30, "n_candidates": 20}, {"max_rollback_steps": -1},
    {"alpha": -1.0}, {"beta": math.nan}, {"conformal_level": 1.0}, {"horizon": 0}, {"band_eta": -0.1},
    {"n_candidates": 10**9}, {"use_ray": "yes"}, {"rollback": 1}, {"out_dir": ""},
    {"alpha": 0, "beta": 0, "gamma": 0},
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
        upper = feats[:, S] * 10.0
        return upper, np.stack([upper - 1, upper], axis=1)[:, :, None]


def test_score_uses_conformal_upper_bound():
    cfg = BranchConfig(n_candidates=4, top_k=1, beta=0.0, gamma=0.0)
    orch = BranchOrchestrator(cfg, proxy(), calibrator=_FakeCalibrator())
    actions = np.array([[a, 1, 0, 0, 0, 0] for a in range(4)])
    rows = orch.score(np.zeros(S, np.float32), actions)
    assert [r["loss_upper"] for r in rows] == [0.0, 10.0, 20.0, 30.0]
    assert [r["score"] for r in rows] == [-0.0, -10.0, -20.0, -30.0]
    with pytest.raises(ConfigError, match="level"):
        BranchOrchestrator(BranchConfig(conformal_level=0.8), proxy(), _FakeCalibrator()).score(
            np.zeros(S, np.float32), actions)


def test_stored_conformal_bounds_make_scores_pessimistic():
    from stso_env.proxy.calibration import ConformalBounds

    p = proxy()
    state = np.zeros(S, dtype=np.float32)
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
    cfg = BranchConfig(n_candidates=20, top_k=2, out_dir=str(tmp_path), seed=1, adopt=True)
    d = BranchOrchestrator(cfg, proxy(plans=True)).decide(env, "run0")
    doc = json.loads(d.path.read_text())
    assert d.adopted and doc["adopted"] is True and d.horizon == 2
    chosen = next(v for v in doc["verification"] if v["id"] == doc["chosen_id"])
    # the run is now exactly the trigger state continued under the chosen plan (determinism contract)
    ref.step(np.asarray(d.chosen_plan[:6]))
    ref.step(np.asarray(d.chosen_plan[6:]))
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
