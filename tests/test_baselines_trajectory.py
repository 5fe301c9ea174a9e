"""The clipping/stability baselines act as their papers say: each changes a spiky tiny run against
``fixed``, and skip-step and StableAdamW match hand computations; the trainer's update veto."""

from __future__ import annotations

import math
import statistics
from types import SimpleNamespace

import gymnasium as gym
import numpy as np
import pytest
import torch

import stso_env  # noqa: F401  (registers the env)
from agents.controllers import make_controller
from agents.controllers.skip_step import SkipStep, skip_decision
from agents.controllers.stable_adamw import StableAdamW
from stso_env.config import TrainConfig, apply_overrides
from stso_env.train.trainer import Trainer
from tests.helpers import tiny_config

# 170 steps: the spiky scenario's first random-token burst starts at step 153 for seed 0, after the
# 64 steps skip-step needs to fill its window (the controller starts at step 10).
STEPS = 170
CFG = apply_overrides(TrainConfig(), {"data.builtin_chars": 200_000})


def run_episode(name: str, settings: dict | None = None):
    """One spiky tiny episode under controller ``name``; (StepStats of the controlled steps, final
    parameters, describe(), the env's trainer)."""
    env = gym.make("STSO-GPT2-v0", preset="tiny", scenario="spiky", decision_interval=10, episode_steps=STEPS,
                   config=CFG)
    obs, info = env.reset(seed=0)
    ctrl = make_controller(name, settings=settings)
    ctrl.reset(env, seed=0, run_name=name)
    tr = env.unwrapped.trainer
    stats = []
    step = tr.train_step

    def recording_step():
        s = step()
        stats.append(s)
        return s

    tr.train_step = recording_step
    done = False
    while not done:
        obs, _, terminated, truncated, info = env.step(ctrl.act(obs, info))
        done = terminated or truncated
    params = torch.cat([p.detach().flatten() for p in tr.model.parameters()]).clone()
    described = ctrl.describe()
    ctrl.close()
    env.close()
    return stats, params, described, tr


@pytest.fixture(scope="module")
def fixed_run():
    return run_episode("fixed")


@pytest.mark.parametrize("name", ["zclip", "arc", "spam", "skip_step", "stable_adamw"])
def test_each_baseline_changes_a_spiky_run(fixed_run, name):
    base_stats, base_params, _, _ = fixed_run
    stats, params, d, tr = run_episode(name)
    assert len(stats) == len(base_stats) == STEPS - 10 and stats[0].step == 10
    assert not torch.equal(params, base_params), f"{name} left the run bit-identical to fixed"
    burst = [s.step for s in base_stats if "random_tokens" in s.noise]
    assert burst and burst[0] == 153  # the spike the baselines are meant to handle happens
    if name == "zclip":
        # ZClip alone: no static cap, an adaptive bound once its 25-step warm-up is over
        assert d["max_grad_norm"] == 0.0 and all(s.clip_policy == "zclip" for s in stats)
        assert all(math.isinf(s.clip_bound) for s in stats[:25])
        assert any(s.clipped and math.isfinite(s.clip_bound) and s.clip_bound != 1.0 for s in stats)
    elif name == "arc":
        assert d["max_grad_norm"] == 1.0 and all(s.clip_policy == "arc" for s in stats)
    elif name == "spam":
        # spike-aware clipping without the static cap: the burst's gradients are clipped element-wise
        assert d["max_grad_norm"] == 0.0 and tr.max_grad_norm_override is None  # released on close
        assert any(s.clipped and s.step in burst for s in stats)
    elif name == "skip_step":
        skipped = d["skipped_steps"]
        assert skipped and set(skipped) <= set(burst) and [s.step for s in stats if s.skipped] == skipped
        # bit-identical to fixed until the first skipped update
        first = skipped[0]
        assert [s.loss for s in stats if s.step <= first] == [s.loss for s in base_stats if s.step <= first]
        assert all(s.flops == base_stats[0].flops for s in stats)  # a skipped step still costs a full step
    elif name == "stable_adamw":
        assert d["clipped_tensors"] > 0 and d["max_rms"] > 1.0 and d["max_grad_norm"] == 0.0
        assert all(not s.clipped for s in stats)  # no gradient clipping: update clipping replaces it


# ---------------------------------------------------------------------- the trainer's update veto


def test_veto_skips_the_update_but_not_the_measurement_or_the_schedule():
    t = Trainer(tiny_config(scenario="calm"))
    t.train_steps(3)
    calls = []
    t.post_update_hooks.append(lambda tr: calls.append(tr.global_step))
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    moments = {id(p): {k: (v.clone() if torch.is_tensor(v) else v) for k, v in t.optimizer.state[p].items()}
               for p in t.params}
    epoch = t.scheduler.last_epoch

    def veto(tr):
        assert math.isfinite(tr.step_loss) and tr.step_grad_norm > 0 and tr.step_grad_norm_applied > 0
        tr.veto_update = True

    t.pre_update_hooks.append(veto)
    s = t.train_step()
    assert s.skipped and not s.nonfinite and s.step == 3 and t.global_step == 4
    assert s.loss == pytest.approx(t.step_loss, abs=0) and s.grad_norm == t.step_grad_norm > 0
    assert s.flops == t.flops_per_token * s.tokens  # the backward pass ran
    assert all(torch.equal(v, before[k]) for k, v in t.model.state_dict().items())
    for p in t.params:  # Adam's moments and step count untouched
        for k, v in t.optimizer.state[p].items():
            assert torch.equal(v, moments[id(p)][k]) if torch.is_tensor(v) else v == moments[id(p)][k]
    assert t.scheduler.last_epoch == epoch + 1 and calls == [] and t.veto_update is False
    t.pre_update_hooks.remove(veto)
    s = t.train_step()  # one-shot: the next step updates again, and the post-update hook runs
    assert not s.skipped and calls == [4]
    assert any(not torch.equal(v, before[k]) for k, v in t.model.state_dict().items())


# ---------------------------------------------------------------------- skip-step, known answers


def _feed(ctrl: SkipStep, losses, gnorms):
    """Drive the controller's hooks with a hand-made series; returns the vetoed steps."""
    fake = SimpleNamespace(global_step=0, ema={"loss": None, "grad_norm": None}, veto_update=False,
                           step_loss=math.nan, step_grad_norm=math.nan)
    vetoed = []
    for t, (loss, g) in enumerate(zip(losses, gnorms)):
        fake.global_step, fake.ema = t, {"loss": float(t), "grad_norm": 0.0}
        ctrl._pre_step(fake)
        fake.step_loss, fake.step_grad_norm = loss, g
        ctrl._pre_update(fake)
        if fake.veto_update:
            vetoed.append(t)
        fake.veto_update = False
    return vetoed


def test_skip_step_known_answer():
    # window L = 6: a step is judged once 3 values (itself included) exist; skip when
    # value - mean > 6 * std (Bessel) of the previous <= 6 values, loss or grad norm.
    losses = [1, 9, 1, 2, 1, 2, 1, 2, 1, 2, 10, 10, 2]
    gnorms = [1.0, 1.1] * 6 + [1.0]
    # step 1 (loss 9) has one previous value: warm-up, not judged, yet it enters the window
    assert skip_decision([1], [1.0], 9, 1.1, rolling_interval_length=6) is False
    # step 10: previous six losses 1,2,1,2,1,2 -> mean 1.5, std sqrt(0.3); 10 > 1.5 + 6 * 0.548
    prev = [1, 2, 1, 2, 1, 2]
    assert 10 - statistics.mean(prev) > 6 * statistics.stdev(prev)
    # step 11 (10 again): OLMo-core keeps the skipped 10 in the window -> 2,1,2,1,2,10, std 3.46,
    # so the second 10 passes; keeping skipped steps out, the window is still 1,2,1,2,1,2 -> skip
    olmo = [2, 1, 2, 1, 2, 10]
    assert 10 - statistics.mean(olmo) <= 6 * statistics.stdev(olmo)
    ctrl = SkipStep(rolling_interval_length=6, sigma_factor=6)
    assert _feed(ctrl, losses, gnorms) == [10]
    assert ctrl.skipped_steps == [10] and len(ctrl.log) == len(losses)
    assert [d["kind"] for d in ctrl.decisions] == ["skip_step"]
    strict = SkipStep(rolling_interval_length=6, sigma_factor=6, exclude_skipped=True)
    assert _feed(strict, losses, gnorms) == [10, 11]
    # the grad norm alone can skip a step: norms 1.0 / 1.1 then 5.0, losses unremarkable
    assert _feed(SkipStep(rolling_interval_length=6), [1, 2] * 5, [1.0, 1.1] * 4 + [5.0, 1.0]) == [8]
    # only the last L values count: a 9 seven steps back no longer widens the window
    assert skip_decision([9, 1, 2, 1, 2, 1, 2], [1.0] * 7, 6.0, 1.0, rolling_interval_length=6)
    assert not skip_decision([9, 1, 2, 1, 2, 1, 2], [1.0] * 7, 6.0, 1.0, rolling_interval_length=7)
    # OLMo-core's defaults
    d = make_controller("skip_step").describe()
    assert (d["rolling_interval_length"], d["sigma_factor"], d["min_history"], d["exclude_skipped"]) == (128, 6.0, 64,
                                                                                                          False)


def test_skip_step_history_follows_restore_and_forks():
    env = gym.make("STSO-GPT2-v0", preset="tiny", scenario="spiky", decision_interval=5, episode_steps=40,
                   config=CFG)
    obs, info = env.reset(seed=1)
    ctrl = SkipStep(rolling_interval_length=8)
    ctrl.reset(env, seed=1, run_name="skip")
    base = env.unwrapped
    for _ in range(2):
        obs, _, _, _, info = env.step(ctrl.act(obs, info))
    sid = base.snapshot()
    log_at_snapshot = [dict(e) for e in ctrl.log]
    fork = base.fork()
    twin = SkipStep(rolling_interval_length=8)
    twin.reset(fork, seed=1, run_name="twin")
    twin.load_state_dict(ctrl.state_dict())
    for _ in range(2):
        obs, _, _, _, info = env.step(ctrl.act(obs, info))
    first_pass = [dict(e) for e in ctrl.log]
    assert len(first_pass) == len(log_at_snapshot) + 10
    # restore: the history goes back to the snapshot's, and replaying gives the same log
    obs = base.restore(sid)
    ctrl.act(obs, info)
    assert ctrl.log == log_at_snapshot
    for _ in range(2):
        obs, _, _, _, info = env.step(ctrl.act(obs, info))
    assert ctrl.log == first_pass and ctrl.history_resets == 0
    # the fork's controller, given this one's state, decides on the same history
    fobs, finfo = fork.unwrapped._obs.copy(), dict(info)
    for _ in range(2):
        fobs, _, _, _, finfo = fork.step(twin.act(fobs, finfo))
    assert twin.log == first_pass
    # a state this history did not lead to (a rebuilt trainer on another seed) restarts the statistics
    obs, info = env.reset(seed=7)
    ctrl.act(obs, info)
    assert ctrl.log == [] and ctrl.history_resets == 1 and ctrl.decisions[-1]["kind"] == "history_reset"
    assert env.unwrapped.trainer.pre_update_hooks == [ctrl._pre_update]  # followed the new trainer
    fork.close()
    twin.close()
    ctrl.close()
    env.close()


# ---------------------------------------------------------------------- StableAdamW, known answer


def _hand_stable_adamw(p0, grads, lr, wd, b1, b2, eps, scale_wd):
    """The reference ``StableAdamWUnfused`` update in float64 (beta-hat moments), with the weight
    decay scaled by the clipped step (the paper) or not (the reference code)."""
    p, m, v = np.array(p0, float), np.zeros(len(p0)), np.zeros(len(p0))
    rms_seen = []
    for step, g in enumerate(grads, start=1):
        g = np.array(g, float)
        b1h = b1 * (1 - b1 ** (step - 1)) / (1 - b1 ** step)
        b2h = b2 * (1 - b2 ** (step - 1)) / (1 - b2 ** step)
        m = b1h * m + (1 - b1h) * g
        v = b2h * v + (1 - b2h) * g * g
        rms = math.sqrt(np.mean(g * g / np.maximum(v, eps * eps)))
        rms_seen.append(rms)
        eta = lr / max(1.0, rms)
        p = p * (1 - (eta if scale_wd else lr) * wd) - eta * m / (np.sqrt(v) + eps)
    return p, rms_seen


@pytest.mark.parametrize("scale_wd", [True, False])
def test_stable_adamw_matches_a_hand_computation(scale_wd):
    p0, grads = [1.0, -2.0], [[0.1, 0.2], [1.0, -3.0]]
    lr, wd, b1, b2, eps = 0.1, 0.1, 0.9, 0.95, 1e-8
    p = torch.nn.Parameter(torch.tensor(p0, dtype=torch.float64))
    opt = torch.optim.AdamW([p], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    fake = SimpleNamespace(optimizer=opt, global_step=0, max_grad_norm_override=None, pre_update_hooks=[],
                           post_update_hooks=[])
    ctrl = StableAdamW(scale_weight_decay=scale_wd)
    ctrl.attach(fake)
    assert fake.max_grad_norm_override == 0.0  # update clipping replaces gradient clipping
    plain = torch.nn.Parameter(torch.tensor(p0, dtype=torch.float64))
    plain_opt = torch.optim.AdamW([plain], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    for step, g in enumerate(grads):
        fake.global_step = step
        p.grad, plain.grad = torch.tensor(g, dtype=torch.float64), torch.tensor(g, dtype=torch.float64)
        for hook in fake.pre_update_hooks:
            hook(fake)
        opt.step()
        for hook in fake.post_update_hooks:
            hook(fake)
        plain_opt.step()
    expected, rms = _hand_stable_adamw(p0, grads, lr, wd, b1, b2, eps, scale_wd)
    # step 1: v_hat = g^2, RMS = 1, no clipping; step 2: g^2 / v_hat ~ 1.94, RMS ~ 1.39 > 1
    assert rms[0] == pytest.approx(1.0) and 1.3 < rms[1] < 1.5
    assert p.detach().numpy() == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert not torch.allclose(p, plain)  # plain AdamW took the larger step
    assert ctrl.events == [(1, 1, pytest.approx(rms[1], rel=1e-9))] and ctrl.clipped_tensors == 1
    ctrl._trainer = fake
    ctrl.close()
    assert fake.max_grad_norm_override is None and fake.pre_update_hooks == fake.post_update_hooks == []
