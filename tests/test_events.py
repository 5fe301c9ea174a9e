from __future__ import annotations

import numpy as np

from stso_env.monitor.events import (
    diverged,
    llm_foundry_flags,
    megatron_flags,
    merge_events,
    olmo_spike_flags,
    summarize,
    time_to_recover,
)


def series(n=400, seed=0):
    rng = np.random.default_rng(seed)
    return 3.0 + 0.01 * rng.standard_normal(n)


def test_olmo_rule_flags_known_spikes_only_after_window():
    x = series()
    x[50] = 10.0  # inside the first window: not flagged (no full history)
    x[200] = 3.5  # 50 sigma: flagged
    x[300:303] = 4.0
    flags = olmo_spike_flags(x, window=128)
    assert list(np.flatnonzero(flags)) == [200, 300, 301, 302]
    assert merge_events(flags, cooldown=20) == [(200, 200), (300, 302)]


def test_grad_norm_spike_counts_too():
    x, g = series(), series(seed=1)
    g[250] = 100.0
    assert list(np.flatnonzero(olmo_spike_flags(x, g))) == [250]


def test_foundry_and_megatron():
    x = np.full(300, 2.0)
    x[150:154] = 5.0  # 4 steps: not enough for foundry's 5
    x[200:206] = 5.0  # 6 steps -> flags at the 5th and 6th
    assert list(np.flatnonzero(llm_foundry_flags(x))) == [204, 205]
    x[250] = 25.0
    assert list(np.flatnonzero(megatron_flags(x))) == [250]


def test_divergence_and_recovery():
    assert diverged([5.0, 4.0, 16.0]) == 2
    assert diverged([5.0, float("nan")]) == 1
    assert diverged([5.0, 4.0, 3.0]) is None
    x = np.concatenate([np.full(50, 3.0), np.full(10, 6.0), np.full(100, 3.0)])
    ttr = time_to_recover(x, 50, ema=0.0)  # no smoothing: back at baseline 10 steps later
    assert ttr == 10
    assert time_to_recover(np.concatenate([np.full(50, 3.0), np.full(50, 4.0)]), 50) is None


def test_summary():
    x = series()
    x[200] = 6.0
    s = summarize(x)
    assert s.n_events == 1 and s.olmo_flags == 1 and s.diverged_at is None


def test_online_tracker_matches_offline_rule_and_counts_waste():
    from stso_env.monitor.events import EventTracker
    x = series(600)
    x[300:305] = 6.0  # a 5-step burst, then back to normal
    tr = EventTracker(cooldown=20, ema=0.0)
    out = [tr.update(float(v), 1.0, flops=10.0) for v in x]
    offline = merge_events(olmo_spike_flags(x, np.ones_like(x)), 20)
    assert [i for i, o in enumerate(out) if o["new_event"]] == [a for a, _ in offline] == [300]
    assert tr.n_events == 1
    # no smoothing: wasted while the loss is above the baseline, i.e. the 5 burst steps
    assert tr.wasted_steps == 5 and tr.wasted_flops == 50.0 and tr.recovery_times == [5]
    assert not any(o["diverged"] for o in out)
    assert tr.update(float("nan"), 1.0, 10.0)["diverged"]
    tr2 = EventTracker()
    tr2.load_state_dict(tr.state_dict())
    assert tr2.update(3.0, 1.0, 1.0) == tr.update(3.0, 1.0, 1.0)


def test_flops_formula_and_wasted_reasons():
    from stso_env.monitor.events import EventTracker, training_flops_per_token
    # GPT-2 small-like numbers: 6*85M + 12*12*1024*768
    assert training_flops_per_token(85_000_000, 12, 768, 1024) == 6 * 85_000_000 + 12 * 12 * 1024 * 768
    tr = EventTracker()
    tr.add_wasted(100.0, "rollback")
    tr.add_wasted(50.0, "verification")
    tr.add_wasted(25.0, "rollback")
    assert tr.wasted_flops == 175.0 and tr.wasted_by_reason == {"rollback": 125.0, "verification": 50.0}
    tr2 = EventTracker()
    tr2.load_state_dict(tr.state_dict())
    assert tr2.wasted_by_reason == tr.wasted_by_reason
