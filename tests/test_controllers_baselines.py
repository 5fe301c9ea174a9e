"""Baseline controllers (fixed, rule, zclip, arc, spam, hd, pbt) on tiny STSO-GPT2-v0 runs, against known answers."""

from __future__ import annotations

import math
from types import SimpleNamespace

import gymnasium as gym
import numpy as np
import pytest
import torch

from stso_env.monitor.monitor import OBSERVATION_NAMES
import stso_env  # noqa: F401  (registers the env)
from agents.controllers import make_controller
from agents.controllers.hypergradient import AdamHD, hypergradient
from agents.controllers.pbt import PBT
from agents.controllers.schedules import RuleBased
from agents.controllers.spam import SPAMController, warmup_factor
from stso_env.train.trainer import Knobs

FAST = {"preset": "tiny", "scenario": "spiky", "decision_interval": 5, "episode_steps": 20}


def make(**kw):
    return gym.make("STSO-GPT2-v0", **{**FAST, **kw})


def episode(ctrl, env, seed=0, infos_hook=None):
    """The harness loop; returns (actions, infos of the main run's steps)."""
    obs, info = env.reset(seed=seed)
    ctrl.reset(env, seed=seed, run_name="test")
    actions, infos = [], []
    done = False
    while not done:
        if infos_hook is not None:
            info = infos_hook(len(actions), info)
        a = ctrl.act(obs, info)
        actions.append(np.asarray(a).tolist())
        obs, _, terminated, truncated, info = env.step(a)
        infos.append(info)
        done = terminated or truncated
    return actions, infos


def test_registry_builds_every_baseline_and_rejects_unknown_settings():
    expected = {"fixed": "FixedSchedule", "rule": "RuleBased", "zclip": "ZClipController", "arc": "ARCController",
                "spam": "SPAMController", "hd": "AdamHD", "pbt": "PBT", "skip_step": "SkipStep",
                "stable_adamw": "StableAdamW"}
    for name, cls in expected.items():
        ctrl = make_controller(name)
        assert type(ctrl).__name__ == cls and ctrl.name == name
    assert make_controller("pbt", settings={"population": 4}).main_run_share == 0.25
    with pytest.raises(ValueError, match="unknown setting"):
        make_controller("spam", settings={"DeltaT": 5})


@pytest.mark.parametrize("name,clip", [("fixed", "off"), ("zclip", "zclip"), ("arc", "arc")])
def test_fixed_and_clip_controllers_hold_their_action(name, clip):
    env = make()
    ctrl = make_controller(name)
    actions, infos = episode(ctrl, env)
    choice = {"off": 0, "zclip": 1, "arc": 2}[clip]
    assert actions == [[2, 1, choice, 0, 0, 0]] * 3
    assert [i["action"]["clip_policy"] for i in infos] == [clip] * 3
    tr = env.unwrapped.trainer
    assert tr.global_step == 20 and tr.knobs.clip_policy == clip and tr.knobs.lr_scale == 1.0
    d = ctrl.describe()
    if name == "fixed":
        assert ctrl.decisions == []
    else:
        assert len(ctrl.decisions) == 1 and ctrl.decisions[0]["kind"] == "clip"
    if name == "zclip":  # ZClip replaces the fixed cap (the paper's comparison), ARC keeps it on the mean
        assert d["max_grad_norm"] == 0.0 and "ZClip alone" in d["variant"] and "without a static" in d["variant"]
    if name == "arc":
        assert d["max_grad_norm"] == 1.0 and "max_grad_norm=1 cap" in d["variant"]
        assert (d["shards"], d["f"], d["k"]) == (4, 1, 1)
    ctrl.close()
    env.close()


def test_rule_based_fires_holds_and_restores():
    env = make()
    ctrl = RuleBased(min_lr_scale=0.25, calm_windows=2)
    actions, _ = episode(ctrl, env)
    assert len(actions) == 3  # runs a real episode
    obs = np.zeros(len(OBSERVATION_NAMES), dtype=np.float32)

    def step(trigger, scale):
        return ctrl.act(obs, {"trigger": trigger, "uncertainty_index": 3.0 if trigger else 0.0,
                              "lr_scale": scale}).tolist()

    ctrl.reset(env, seed=0, run_name="rule")
    assert step(False, 1.0) == [2, 1, 0, 0, 0, 0]  # nothing fired yet: neutral, not recorded
    assert ctrl.decisions == []
    assert step(True, 1.0) == [0, 1, 1, 0, 0, 0]  # fire: LR x0.8 + ZClip
    assert step(True, 0.3) == [2, 1, 1, 0, 0, 0]  # 0.3 x 0.8 = 0.24 < floor 0.25: hold LR, ZClip
    assert step(False, 0.3) == [2, 1, 1, 0, 0, 0]  # 1 calm window of 2: hold
    assert step(False, 0.3) == [3, 1, 0, 0, 0, 0]  # 2 calm: restore x1.1, clip off
    assert step(False, 0.88) == [3, 1, 0, 0, 0, 0]  # 0.968 is closer to 1 than 0.88
    assert step(False, 0.968) == [2, 1, 0, 0, 0, 0]  # 1.065 would be farther: done
    assert step(False, 0.968) == [2, 1, 0, 0, 0, 0]
    assert [d["kind"] for d in ctrl.decisions] == ["rule"] * 5 and ctrl.firings == 2
    # the observation vector is the fallback when info carries no trigger
    obs[48] = 1.0
    assert ctrl.act(obs, {"lr_scale": 1.0}).tolist() == [0, 1, 1, 0, 0, 0]
    env.close()


def test_spam_resets_both_moments_and_warms_the_lr_up():
    env = make(episode_steps=30)
    ctrl = SPAMController(delta_t=8, warmup_steps=4, clip_delay=3)
    seen = {}

    def probe(trainer):  # runs right after SPAM's hook, before the step's update
        states = [s for s in trainer.optimizer.state.values() if "exp_avg" in s]
        zero = all(bool((s["exp_avg"] == 0).all() and (s["exp_avg_sq"] == 0).all()) for s in states)
        seen[trainer.global_step] = (zero, trainer.knobs.lr_scale, trainer.knobs.clip_policy)

    def attach(n, info):
        if n == 0:
            env.unwrapped.trainer.pre_step_hooks.append(probe)
        return info

    actions, _ = episode(ctrl, env, infos_hook=attach)
    assert actions == [[2, 1, 3, 0, 0, 0]] * 5
    assert ctrl.resets == [7, 15, 23]  # (step + 1) % 8 == 0 from step 5 on
    assert [d["kind"] for d in ctrl.decisions] == ["momentum_reset"] * 3
    assert sorted(seen) == list(range(5, 30))
    assert [s for s, v in seen.items() if v[0]] == [7, 15, 23]  # both moments zero exactly there
    # reference shape 1 - 0.99 (1 + cos(pi t / 5)) / 2 for t = 0..3, then 1
    warm = [0.01, 0.104537, 0.352037, 0.657963, 1.0]
    assert [seen[s][1] for s in range(5, 7)] == [1.0, 1.0]
    for base in (7, 15, 23):
        assert [seen[base + t][1] for t in range(5)] == pytest.approx(warm, abs=1e-6)
    assert [warmup_factor(t, 4) for t in range(5)] == pytest.approx(warm, abs=1e-6)
    # spike-aware clipping off for the first 3 steps of each 8-step cycle
    assert [seen[s][2] for s in range(5, 12)] == ["spam", "spam", "off", "off", "off", "spam", "spam"]
    # no global-norm cap while SPAM runs (the reference trains without one), clip-delay steps included
    assert env.unwrapped.trainer.max_grad_norm_override == 0.0
    ctrl.close()
    assert env.unwrapped.trainer.max_grad_norm_override is None
    assert probe in env.unwrapped.trainer.pre_step_hooks and len(env.unwrapped.trainer.pre_step_hooks) == 1
    env.close()


def _fake_trainer(params, lr=2e-3, scale=1.5):
    opt = torch.optim.AdamW([{"params": [p]} for p in params], lr=lr, betas=(0.9, 0.95), eps=1e-8)
    return SimpleNamespace(optimizer=opt, scheduler=SimpleNamespace(get_last_lr=lambda: [lr] * len(params)),
                           knobs=Knobs(lr_scale=scale), global_step=7)


def test_hypergradient_matches_a_hand_computed_case():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))
    fake = _fake_trainer([a, b])
    ctrl = AdamHD(beta=1e-3)
    a.grad, b.grad = torch.tensor([1.0, 0.5]), torch.tensor([2.0])
    ctrl._pre_update(fake)  # no Adam state yet: the first step is skipped
    assert ctrl.skipped == 1 and fake.knobs.lr_scale == 1.5
    fake.optimizer.state[a] = {"step": torch.tensor(2.0), "exp_avg": torch.tensor([0.1, -0.2]),
                               "exp_avg_sq": torch.tensor([0.01, 0.04])}
    fake.optimizer.state[b] = {"step": torch.tensor(2.0), "exp_avg": torch.tensor([0.3]),
                               "exp_avg_sq": torch.tensor([0.09])}
    # m/sqrt(v) = +-1 everywhere, so u = +-sqrt(1 - 0.95^2) / (1 - 0.9^2) and
    # h = (1 * 1 + 0.5 * -1 + 2 * 1) * u: one global sum over both tensors
    u = math.sqrt(1 - 0.95 ** 2) / (1 - 0.9 ** 2)
    assert hypergradient(fake.optimizer) == pytest.approx(2.5 * u, rel=1e-6)
    ctrl._pre_update(fake)
    alpha = 2e-3 * 1.5 + 1e-3 * 2.5 * u
    assert ctrl.alpha_history == [pytest.approx(alpha, rel=1e-6)]
    assert fake.knobs.lr_scale == pytest.approx(alpha / 2e-3, rel=1e-6)
    ctrl.beta = 10.0  # a huge step is clamped to the env's LR-scale limits
    ctrl._pre_update(fake)
    assert fake.knobs.lr_scale == 100.0


def test_hd_on_a_real_run_follows_the_update_rule():
    env = make()
    ctrl = AdamHD(beta=1e-6)
    expected = []

    def check(trainer):  # runs before HD's hook: h from float64 copies of the same tensors
        h = 0.0
        for group in trainer.optimizer.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                st = trainer.optimizer.state[p]
                n = float(st["step"])
                m = st["exp_avg"].double() / (1 - b1 ** n)
                v = st["exp_avg_sq"].double() / (1 - b2 ** n)
                h += float((p.grad.double() * m / (v.sqrt() + group["eps"])).sum())
        expected.append(trainer.scheduler.get_last_lr()[0] * trainer.knobs.lr_scale + 1e-6 * h)

    def attach(n, info):
        if n == 0:
            env.unwrapped.trainer.pre_update_hooks.insert(0, check)
        return info

    actions, infos = episode(ctrl, env, infos_hook=attach)
    assert actions == [[2, 1, 0, 0, 0, 0]] * 3
    assert len(ctrl.alpha_history) == 15 == len(expected)
    assert ctrl.alpha_history == pytest.approx(expected, rel=1e-5)
    assert abs(infos[-1]["lr_scale"] - 1.0) > 1e-3
    d = ctrl.describe()
    assert d["updates"] == 15 and d["abs_h_median"] > 0
    ctrl.close()
    assert env.unwrapped.trainer.pre_update_hooks == [check]
    env.close()


def test_pbt_exploits_explores_and_accounts_for_forks():
    env = make()
    ctrl = PBT(population=3, ready_windows=1)
    assert ctrl.main_run_share == pytest.approx(1 / 3)
    saved = {}

    def before_act(n, info):
        if n == 1:  # make the main run the worst member, and keep the forks' parameters to compare
            saved.update({i: {k: v.clone() for k, v in m.trainer.model.state_dict().items()}
                          for i, m in enumerate(ctrl.members) if i})
            return dict(info, probe_loss=1e9)
        return info

    obs, info = env.reset(seed=3)
    ctrl.reset(env, seed=3, run_name="pbt")
    assert all(m.episode_steps == 20 and m.trainer.global_step == 5 for m in ctrl.members)
    assert ctrl.hparams[0] == {"lr_scale": 1.0, "wd": 1}
    assert all(0.5 <= h["lr_scale"] <= 2.0 and h["wd"] in (0, 1, 2) for h in ctrl.hparams[1:])
    assert [m.trainer.knobs.lr_scale for m in ctrl.members[1:]] == [h["lr_scale"] for h in ctrl.hparams[1:]]
    main_flops, n = 0.0, 0
    done = False
    while not done:
        a = ctrl.act(obs, before_act(n, info))
        if n == 1:
            ev = ctrl.events[0]
            assert ev["target"] == 0 and ctrl.decisions[-1]["kind"] == "exploit"
            main_params = env.unwrapped.trainer.model.state_dict()
            assert all(torch.equal(main_params[k], v) for k, v in saved[ev["source"]].items())
            assert env.unwrapped.trainer.knobs.lr_scale == ctrl.hparams[0]["lr_scale"]
            assert a.tolist() == [2, ctrl.hparams[0]["wd"], 0, 0, 0, 0]
        obs, _, terminated, truncated, info = env.step(a)
        main_flops += info["flops"]
        n += 1
        done = terminated or truncated
    assert n == 3 and len(ctrl.events) == 2  # one bottom member per round (ceil(3 * 0.25) = 1), rounds 2 and 3
    assert ctrl.extra_flops == pytest.approx(2 * main_flops) == pytest.approx(sum(ctrl.member_flops))
    assert all(m.trainer.global_step == 20 for m in ctrl.members)
    assert ctrl.io_seconds > 0 and ctrl.describe()["main_exploits"] == 1
    ctrl.close()
    assert ctrl.members == [env.unwrapped]
    env.close()


def test_pbt_quantiles_and_explore_rules():
    ctrl = PBT(population=4, resample_p=0.0)
    ctrl.latest = [{"probe_loss": 1.0}, {"probe_loss": 2.0, "diverged": True}, {"probe_loss": math.nan},
                   {"probe_loss": 0.5}]
    assert ctrl._quantiles() == ([1, 2], [3])  # both diverged members go to the bottom
    ctrl.latest = [{"probe_loss": v} for v in (1.0, 3.0, 2.0, 0.5)]
    assert ctrl._quantiles() == ([1], [3])
    for wd in (0, 1, 2):
        new, ops = ctrl._explore({"lr_scale": 1.0, "wd": wd})
        assert new["lr_scale"] in (0.8, 1.2) and abs(new["wd"] - wd) <= 1 and 0 <= new["wd"] <= 2
        assert ops["lr_scale"] in ("x0.8", "x1.2", "* 0.8", "* 1.2")  # numpy / Ray Tune wording
    ctrl.resample_p = 1.0
    new, ops = ctrl._explore({"lr_scale": 1.0, "wd": 0})
    assert ops == {"lr_scale": "resample", "wd": "resample"} and 0.5 <= new["lr_scale"] <= 2.0


def test_pbt_explore_is_seeded_and_leaves_global_random_alone():
    import random

    from agents.controllers.pbt import _ray_explore

    a, b = PBT(population=4), PBT(population=4)
    a.rng, b.rng = np.random.default_rng(5), np.random.default_rng(5)
    random.seed(123)
    before = random.getstate()
    out_a = [a._explore({"lr_scale": 1.0, "wd": 1}) for _ in range(20)]
    assert random.getstate() == before
    out_b = [b._explore({"lr_scale": 1.0, "wd": 1}) for _ in range(20)]
    assert out_a == out_b
    assert len({o[0]["lr_scale"] for o in out_a}) > 1  # it does explore
    expected = "ray.tune.schedulers.pbt._explore" if _ray_explore() is not None else "numpy re-implementation"
    assert a.describe()["explore"] == expected
