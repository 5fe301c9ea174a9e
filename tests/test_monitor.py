"""The monitor's state vector: names, normalisation with known answers, EMA/delta, state round trip."""

from __future__ import annotations

import math

import numpy as np
import pytest

from stso_env.monitor.monitor import BASE_FEATURES, OBSERVATION_NAMES, Monitor
from stso_env.monitor.uncertainty import COMPONENT_NAMES
from stso_env.train.trainer import StepStats


def stats(step, loss=2.0, grad_norm=1.0, lr=1e-3, bound=math.inf, skipped=False, reset=False, var=0.25):
    return StepStats(step=step, loss=loss, clean_loss=loss, seq_loss_mean=loss, seq_loss_var=var,
                     grad_norm=grad_norm, grad_norm_clipped=min(grad_norm, bound), clip_bound=bound,
                     clipped=grad_norm > bound, lr=lr, weight_decay=0.1, clip_policy="off", tokens=512,
                     flops=1e9, skipped=skipped, momentum_reset=reset, reordered=False, nonfinite=False)


def test_names_layout():
    assert len(OBSERVATION_NAMES) == 3 * len(BASE_FEATURES) + len(COMPONENT_NAMES) + 3 == 53
    assert OBSERVATION_NAMES[:3] == ("loss", "loss_ema", "loss_delta")
    # the probe loss came last so that the older features kept their indices
    assert OBSERVATION_NAMES[-6:] == ("uncertainty_index", "trigger", "progress", "probe_loss", "probe_loss_ema",
                                      "probe_loss_delta")


def test_known_normalisation_and_window_aggregation():
    m = Monitor(vocab_size=257, budget_steps=100)
    m.set_layer_stats([{"act_entropy": 0.5, "attn_entropy": 0.8, "act_mean": 0, "act_std": 1},
                       {"act_entropy": 0.7, "attn_entropy": 0.6, "act_mean": 0, "act_std": 1}])
    for t in range(10):
        m.update(stats(t, loss=2.0 + 0.1 * (t == 9), grad_norm=1.0 + t, reset=(t == 3)))
    obs = dict(zip(OBSERVATION_NAMES, m.observe()))
    assert obs["loss"] == pytest.approx(2.1 / math.log(257), rel=1e-6)  # last step, / ln vocab
    assert obs["grad_norm"] == pytest.approx(math.log1p(5.5), rel=1e-6)  # log1p of the window mean
    assert obs["lr"] == pytest.approx(0.0, abs=1e-6)  # log10(1e-3) + 3
    assert obs["clip_bound"] == pytest.approx(math.log1p(100.0), rel=1e-6)  # no bound -> cap
    assert obs["momentum_reset_flag"] == 1.0 and obs["weight_decay"] == pytest.approx(0.1)
    assert obs["batch_loss_var"] == pytest.approx(math.log1p(0.25), rel=1e-6)
    assert obs["act_entropy_mean"] == pytest.approx(0.6) and obs["act_entropy_min"] == pytest.approx(0.5)
    assert obs["attn_entropy_max"] == pytest.approx(0.8)
    assert obs["loss_ema"] == obs["loss"] and obs["loss_delta"] == 0.0  # first observation
    assert obs["progress"] == pytest.approx(0.1)
    for t in range(10, 20):
        m.update(stats(t, loss=1.0, grad_norm=1.0, bound=2.0))
    obs2 = dict(zip(OBSERVATION_NAMES, m.observe()))
    assert obs2["loss_delta"] == pytest.approx((1.0 - 2.1) / math.log(257), rel=1e-5)
    assert obs2["loss_ema"] == pytest.approx(0.8 * obs["loss"] + 0.2 * obs2["loss"], rel=1e-5)
    assert obs2["clip_bound"] == pytest.approx(math.log1p(2.0), rel=1e-6)
    assert obs2["momentum_reset_flag"] == 0.0



def test_probe_loss_feature_known_answers_and_round_trip():
    m = Monitor(vocab_size=257, budget_steps=100)
    m.update(stats(0))
    obs = dict(zip(OBSERVATION_NAMES, m.observe()))
    assert obs["probe_loss"] == 0.0  # no probe measured yet: 0, as the schema says
    m.update_probe(3.0, flops=1e9, steps=1)
    m.update(stats(1))
    obs = dict(zip(OBSERVATION_NAMES, m.observe()))
    assert obs["probe_loss"] == pytest.approx(3.0 / math.log(257), rel=1e-6)
    m.update_probe(2.5, flops=1e9, steps=1)
    state = m.state_dict()
    m.update(stats(2))
    obs = dict(zip(OBSERVATION_NAMES, m.observe()))
    assert obs["probe_loss_delta"] == pytest.approx(-0.5 / math.log(257), rel=1e-5)
    restored = Monitor(vocab_size=257, budget_steps=100)
    restored.load_state_dict(state)
    restored.update(stats(2))
    np.testing.assert_array_equal(restored.observe(), np.array([obs[n] for n in OBSERVATION_NAMES], np.float32))
    m.update_probe(math.inf, flops=1e9, steps=1)
    m.update(stats(3))
    assert dict(zip(OBSERVATION_NAMES, m.observe()))["probe_loss"] == 100.0  # a diverged probe is the extreme

def test_skipped_steps_are_not_spikes_and_nonfinite_is_clipped():
    m = Monitor(vocab_size=257, budget_steps=1000)
    for t in range(200):
        ev = m.update(stats(t, loss=2.0 + 0.01 * math.sin(t), grad_norm=1.0 + 0.01 * math.cos(t),
                            skipped=(t % 50 == 49)))
        assert not ev["new_event"]
    m.update(stats(200, loss=float("inf"), grad_norm=float("nan")))
    obs = m.observe()
    assert np.isfinite(obs).all() and np.abs(obs).max() <= 100.0


def test_state_round_trip_gives_identical_observations():
    a = Monitor(vocab_size=257, budget_steps=500)
    rng = np.random.default_rng(0)
    for t in range(60):
        a.update(stats(t, loss=2 + rng.random(), grad_norm=1 + rng.random()))
        if t % 10 == 9:
            a.observe()
    b = Monitor(vocab_size=257, budget_steps=500)
    b.load_state_dict(a.state_dict())
    for t in range(60, 90):
        x = stats(t, loss=2 + rng.random(), grad_norm=1 + rng.random())
        assert a.update(x) == b.update(x)
        if t % 10 == 9:
            assert np.array_equal(a.observe(), b.observe())
