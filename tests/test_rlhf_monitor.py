"""The RLHF monitor's divergence rules and events, and the RLHF scenario files, on known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from stso_env.errors import ConfigError
from stso_env.rlhf.monitor import OBSERVATION_NAMES, DivergenceRule, RLHFMonitor
from stso_env.rlhf.run import Knobs, WindowStats
from stso_env.rlhf.scenario import RewardNoise, load_rlhf_scenario, rlhf_scenario_names


def window(**kw):
    base = dict(steps=8, reward=0.5, reward_std=1.0, kl=0.05, kl_max=0.08, entropy=1.2, clip_ratio=0.01,
                grad_norm=3.0, completion_length=30.0, learning_rate=3e-5, zero_std=0.0)
    return WindowStats(**{**base, **kw})


def monitor(**rule):
    m = RLHFMonitor(budget_steps=160, max_completion_length=40, rule=DivergenceRule(**rule))
    m.start(0.40)
    return m


def feed(m, stats, gold, step=8):
    return m.update(stats, gold, Knobs(), lr=3e-5, step=step)


def test_a_steady_run_neither_diverges_nor_warns():
    m = monitor()
    for i in range(10):
        r = feed(m, window(), 0.40, step=8 * (i + 1))
        assert not r["diverged"] and not r["new_event"] and not r["warning"]
    obs = m.observe()
    assert obs.shape == (len(OBSERVATION_NAMES),) and obs.dtype == np.float32
    named = dict(zip(OBSERVATION_NAMES, obs.tolist()))
    assert named["progress"] == pytest.approx(0.5) and named["lr"] == pytest.approx(math.log10(3e-5) + 4, abs=1e-6)
    assert named["entropy_ratio"] == pytest.approx(1.0) and named["gold_below_peak"] == pytest.approx(0.0)


def test_kl_blow_up_diverges_and_the_warning_zone_is_an_event_once():
    m = monitor(kl_limit=1.0)
    assert feed(m, window(kl_max=0.3), 0.4)["reasons"] == []
    r = feed(m, window(kl_max=0.6), 0.4)  # above half the limit: an event starts, no divergence
    assert r["new_event"] and not r["diverged"]
    r = feed(m, window(kl_max=0.7), 0.4)  # still in the zone: no new event
    assert not r["new_event"] and r["warning"]
    r = feed(m, window(kl_max=1.2), 0.4)
    assert r["diverged"] and r["reasons"] == ["kl"]


def test_entropy_collapse_is_measured_against_the_first_window():
    m = monitor(entropy_floor=0.35)
    feed(m, window(entropy=2.0), 0.4)
    assert not feed(m, window(entropy=0.71), 0.4)["diverged"]  # 0.355 of the first
    r = feed(m, window(entropy=0.69), 0.4)
    assert r["diverged"] and r["reasons"] == ["entropy"]


def test_gold_collapse_uses_the_three_reading_average_against_its_peak():
    m = monitor(gold_drop=0.25)
    assert feed(m, window(), 0.60)["gold_peak"] == pytest.approx(0.50)  # (0.40 start + 0.60) / 2
    feed(m, window(), 0.60)
    assert feed(m, window(), 0.60)["gold_peak"] == pytest.approx(0.60)
    r = feed(m, window(), 0.40)  # average 0.533: 0.067 below the peak
    assert not r["diverged"] and not r["warning"]
    r = feed(m, window(), 0.20)  # average 0.40: 0.20 below, past half the drop
    assert not r["diverged"] and r["warning"] and r["new_event"]
    r = feed(m, window(), 0.20)  # average 0.267: 0.333 below
    assert r["diverged"] and r["reasons"] == ["gold"]
    # one bad reading alone does not end a run: (0.60 + 0.60 + 0.0) / 3 = 0.40 is within 0.25 of 0.60
    m2 = monitor(gold_drop=0.25)
    for _ in range(3):
        feed(m2, window(), 0.60)
    assert not feed(m2, window(), 0.0)["diverged"]


def test_non_finite_metrics_diverge_and_state_round_trips():
    m = monitor()
    feed(m, window(), 0.4)
    state = m.state_dict()
    r = feed(m, window(kl=math.nan, kl_max=math.nan), 0.4)
    assert r["diverged"] and "non_finite" in r["reasons"] and np.isfinite(m.observe()).all()
    m2 = RLHFMonitor(budget_steps=160, max_completion_length=40)
    m2.load_state_dict(state)
    m.load_state_dict(state)
    a, b = feed(m, window(kl_max=0.2), 0.45), feed(m2, window(kl_max=0.2), 0.45)
    assert a == b and np.array_equal(m.observe(), m2.observe())


def test_the_uncertainty_index_fires_on_a_kl_jump_after_calm_windows():
    m = monitor(kl_limit=100.0)
    rng = np.random.default_rng(0)
    for _ in range(12):
        r = feed(m, window(kl_max=0.05 + 0.005 * rng.standard_normal(), reward=0.5 + 0.02 * rng.standard_normal()),
                 0.4)
    assert not r["trigger"]
    r = feed(m, window(kl_max=2.0, reward=2.0, entropy=0.9), 0.3)
    assert r["z"]["kl_growth"] == pytest.approx(6.0) and r["trigger"] and r["fired"]


def test_scenarios_load_cite_related_work_and_noise_is_a_pure_function():
    from tests.test_related_work import _entries

    names = rlhf_scenario_names()
    assert {"calm", "overoptimize", "collapse", "noisy_reward"} <= set(names)
    for n in names:
        sc = load_rlhf_scenario(n)
        assert sc.name == n and sc.references and set(sc.references) <= _entries()
    noisy = load_rlhf_scenario("noisy_reward").reward_noise
    assert noisy.every > 0 and noisy.scale > 0
    n = RewardNoise(every=10, start=5, duration=3, scale=2.0)
    assert [s for s in range(30) if n.active(s)] == [5, 6, 7, 15, 16, 17, 25, 26, 27]
    assert np.array_equal(n.sample(1, 3, 5, 4), n.sample(1, 3, 5, 4))
    assert not np.array_equal(n.sample(1, 3, 5, 4), n.sample(2, 3, 5, 4))
    assert not n.sample(1, 3, 4, 4).any()


def test_scenario_errors_name_the_file_and_key(tmp_path):
    with pytest.raises(ConfigError, match="no such RLHF scenario"):
        load_rlhf_scenario("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: 1.0e-4\nbeat: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: beat: unknown key"):
        load_rlhf_scenario(bad)
    bad.write_text("reward_noise: {every: 10, duration: 20, scale: 1.0}\n")
    with pytest.raises(ConfigError, match="reward_noise.duration"):
        load_rlhf_scenario(bad)
