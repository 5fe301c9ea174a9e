from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
import yaml

from stso_env import cp
from stso_env.config import apply_overrides, to_dict
from stso_env.errors import ConfigError
from stso_env.monitor.uncertainty import (
    COMPONENT_NAMES,
    DEFAULT_CONFIG_PATH,
    HysteresisTrigger,
    RunningNormaliser,
    UncertaintyConfig,
    UncertaintyIndex,
    UncertaintyReading,
    load_uncertainty_config,
)


def write(tmp_path, text):
    p = tmp_path / "unc.yaml"
    p.write_text(text)
    return p


def calm_series(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Loss: exponential decay plus 1-2 % noise; grad norm: decay plus 5 % noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    loss = 2.0 + 6.0 * np.exp(-t / 150) + 0.03 * rng.standard_normal(n)
    grad = 1.0 + 0.5 * np.exp(-t / 100) + 0.05 * rng.standard_normal(n)
    return loss, grad


def run(index: UncertaintyIndex, loss, grad, *extra) -> list[UncertaintyReading]:
    return [index.update(float(a), float(b), *(e[i] for e in extra)) for i, (a, b) in enumerate(zip(loss, grad))]


# --------------------------------------------------------------------------- config


def test_defaults_load_and_match_the_dataclass():
    cfg = load_uncertainty_config()
    assert to_dict(cfg) == to_dict(UncertaintyConfig())
    assert cfg.weights.attention_entropy == 0.5 and cfg.forecaster == "gru" and cfg.history % cfg.patch == 0
    # Every key in the asset carries a comment.
    keys = [line for line in DEFAULT_CONFIG_PATH.read_text().splitlines()
            if line.strip() and not line.lstrip().startswith("#")]
    assert keys and all("#" in line for line in keys)
    assert set(yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())) == set(to_dict(cfg))


def test_config_errors_name_key_and_file(tmp_path):
    p = write(tmp_path, "tau: 3.0\nwindow: 5\n")
    with pytest.raises(ConfigError) as e:
        load_uncertainty_config(p)
    assert str(p) in str(e.value) and "window: unknown key" in str(e.value) and "history" in str(e.value)

    p = write(tmp_path, "weights:\n  loss_volatility: -1.0\n")
    with pytest.raises(ConfigError, match=r"weights\.loss_volatility: -1\.0 is out of range") as e:
        load_uncertainty_config(p)
    assert str(p) in str(e.value)

    p = write(tmp_path, "n_forecasters: four\n")
    with pytest.raises(ConfigError, match=r"n_forecasters: expected an integer, got str 'four'") as e:
        load_uncertainty_config(p)
    assert str(p) in str(e.value)

    p = write(tmp_path, "weights:\n  entropy: 1.0\n")
    with pytest.raises(ConfigError, match=r"weights\.entropy: unknown key"):
        load_uncertainty_config(p)
    with pytest.raises(ConfigError, match="forecaster: 'rnn' is not allowed"):
        load_uncertainty_config(write(tmp_path, "forecaster: rnn\n"))
    with pytest.raises(ConfigError, match="patch: 5 does not divide history 32"):
        load_uncertainty_config(write(tmp_path, "patch: 5\n"))


# --------------------------------------------------------------------------- building blocks


def test_normaliser_known_answers_on_constant_then_step():
    norm = RunningNormaliser(decay=0.9, warmup=3, z_clip=1e6)
    # Warm-up: the first three values score 0 whatever they are.
    assert [norm.score_and_absorb(v) for v in (2.0, 2.0, 2.0)] == [0.0, 0.0, 0.0]
    assert norm.score_and_absorb(2.0) == 0.0  # trusted now: equal to the mean
    norm.absorb(2.0)
    assert (norm.count, norm.mean, norm.var) == (5, 2.0, 0.0)
    # A step to 4 against a flat history: sd is the floor sqrt(1e-12 + (1e-3 * 2)^2) = 0.002.
    assert norm.score(4.0) == pytest.approx(2.0 / math.sqrt(1e-12 + 4e-6), rel=1e-12)
    # The first 1 / (1 - decay) = 10 values give the exact mean and population variance.
    seen = [2.0] * 5
    for _ in range(5):
        norm.absorb(4.0)
        seen.append(4.0)
        assert norm.mean == pytest.approx(np.mean(seen), rel=1e-12)
        assert norm.var == pytest.approx(np.var(seen), rel=1e-12)
    # Then an EMA with decay 0.9: the gap to 4 shrinks by 0.9 a step, the variance by 0.9 plus the new term.
    mean10, var10 = norm.mean, norm.var
    norm.absorb(4.0)
    assert norm.mean == pytest.approx(4.0 - 0.9 * (4.0 - mean10), rel=1e-12)
    assert norm.var == pytest.approx(0.9 * (var10 + 0.1 * (4.0 - mean10) ** 2), rel=1e-12)
    z = norm.score(3.0)
    assert z == pytest.approx((3.0 - norm.mean) / math.sqrt(norm.var + 1e-12 + (1e-3 * norm.mean) ** 2))
    # Clipping.
    assert RunningNormaliser(0.9, 0, 10.0).score(0.0) == 0.0
    clipped = RunningNormaliser(0.9, 1, 10.0)
    clipped.absorb(1.0)
    assert clipped.score(5.0) == 10.0 and clipped.score(-5.0) == -10.0


def test_hysteresis_on_and_off_steps_exactly():
    trig = HysteresisTrigger(tau=2.0, hysteresis=1.0)
    path = [0.0, 1.0, 2.0, 2.1, 1.5, 1.0, 0.99, 0.5, 3.0, 3.0, 0.9, 2.5]
    out = [trig.update(x) for x in path]
    assert [t for t, _ in out] == [False, False, False, True, True, True, False, False, True, True, False, True]
    assert [f for _, f in out] == [False, False, False, True, False, False, False, False, True, False, False, True]


def test_hysteresis_driven_through_the_index():
    """Only the grad component counts; a non-finite grad norm drives its z to z_clip."""
    cfg = apply_overrides(UncertaintyConfig(), {
        "weights.loss_volatility": 0.0, "weights.disagreement": 0.0, "weights.grad_volatility": 1.0,
        "norm_warmup": 10**6, "tau": 6.0, "hysteresis": 3.0, "z_clip": 10.0})
    index = UncertaintyIndex(cfg)
    grads = [1.0, 1.0, math.nan, math.inf, 1.0, 1.0, math.nan, 1.0]
    readings = [index.update(3.0, g) for g in grads]
    assert [r.index for r in readings] == [0, 0, 10, 10, 0, 0, 10, 0]
    assert [r.trigger for r in readings] == [False, False, True, True, False, False, True, False]
    assert [r.fired for r in readings] == [False, False, True, False, False, False, True, False]
    assert readings[2].raw["grad_volatility"] == math.inf


# --------------------------------------------------------------------------- the index


def test_calm_run_stays_below_tau_and_a_spike_fires_then_releases():
    index = UncertaintyIndex()
    tau = index.config.tau
    loss, grad = calm_series(400)
    loss[300:305] *= 3.0
    readings = run(index, loss, grad)
    calm = np.array([r.index for r in readings[:300]])
    assert calm.max() < tau  # measured 4.3 with tau 6 (3.1-4.8 over seeds 1-8)
    assert not any(r.trigger for r in readings[:300])
    fired = [i for i, r in enumerate(readings) if r.fired]
    assert fired == [300]  # on the first spike step, and only once
    assert readings[300].z["loss_volatility"] == index.config.z_clip
    assert readings[300].index > tau + 3.0
    # Released within a few steps of the end of the spike and never again on the calm tail.
    released = next(i for i in range(300, 400) if not readings[i].trigger)
    assert released <= 310
    assert not any(r.trigger for r in readings[released:])
    # The forecast follows the loss: within 3 % of the next-10 mean in the calm part (measured <= 1.9 %).
    for t in range(200, 280, 10):
        assert readings[t].forecast == pytest.approx(loss[t + 1:t + 11].mean(), rel=0.03)


def test_entropy_components_reuse_last_value_and_score_drops():
    cfg = apply_overrides(UncertaintyConfig(), {"norm_warmup": 3, "z_clip": 100.0})
    index = UncertaintyIndex(cfg)
    first = index.update(3.0, 1.0)
    assert first.raw["attention_entropy"] is None and first.z["attention_entropy"] == 0.0
    for h in (5.0, 5.1, 4.9, 5.0):
        r = index.update(3.0, 1.0, attention_entropy=h, activation_entropy=h)
    assert r.raw["attention_entropy"] == -5.0
    drop = index.update(3.0, 1.0, attention_entropy=4.0)
    # Mean 5.0, population variance 0.005 of the four values; -4.0 vs -5.0 is a positive deviation.
    assert drop.z["attention_entropy"] == pytest.approx(1.0 / math.sqrt(0.005 + 1e-12 + (5e-3) ** 2))
    count = index.normalisers["attention_entropy"].count
    for again in (None, 4.0):  # between arrivals: nothing, or the same summary passed again
        reused = index.update(3.0, 1.0, attention_entropy=again)
        assert reused.raw["attention_entropy"] == -4.0
        assert reused.z["attention_entropy"] == drop.z["attention_entropy"]
    assert index.normalisers["attention_entropy"].count == count
    assert reused.raw["activation_entropy"] == -5.0
    assert index.update(3.0, 1.0, attention_entropy=math.nan).z["attention_entropy"] == cfg.z_clip


def test_non_finite_steps_do_not_poison_the_state():
    """Bad steps score z_clip and are otherwise skipped: the finite steps read exactly as without them."""
    loss, grad = calm_series(120, seed=3)
    clean = run(UncertaintyIndex(), loss, grad)
    index = UncertaintyIndex()
    bad = [index.update(math.nan, math.inf)]
    dirty = run(index, loss[:60], grad[:60])
    bad.append(index.update(math.inf, math.nan))
    dirty += run(index, loss[60:], grad[60:])
    z_clip = index.config.z_clip
    for r in bad:
        assert r.z["loss_volatility"] == r.z["grad_volatility"] == z_clip
        assert r.raw["loss_volatility"] == r.raw["grad_volatility"] == math.inf
        assert r.fired  # 2 * z_clip > tau
    for a, b in zip(clean, dirty, strict=True):
        assert (a.index, a.z, a.raw, a.forecast) == (b.index, b.z, b.raw, b.forecast)


def test_missing_grad_norm_is_neutral():
    loss, grad = calm_series(60, seed=2)
    clean = run(UncertaintyIndex(), loss, grad)
    index = UncertaintyIndex()
    readings = [index.update(float(loss[i]), None if i == 40 else float(grad[i])) for i in range(60)]
    assert readings[40].raw["grad_volatility"] is None and readings[40].z["grad_volatility"] == 0.0
    assert not readings[40].trigger
    # The loss side (volatility z-scores and forecasts) does not notice the missing grad norm.
    assert [r.z["loss_volatility"] for r in readings] == [r.z["loss_volatility"] for r in clean]
    assert [r.forecast for r in readings] == [r.forecast for r in clean]


def test_same_seed_same_readings_and_global_rngs_untouched():
    torch_state, np_state, py_state = torch.get_rng_state(), np.random.get_state(), random.getstate()
    loss, grad = calm_series(150, seed=4)
    ent = [4.0 + 0.01 * (i % 7) if i % 5 == 0 else None for i in range(150)]
    r1 = run(UncertaintyIndex(), loss, grad, ent)
    r2 = run(UncertaintyIndex(), loss, grad, ent)
    assert r1 == r2
    other = run(UncertaintyIndex(apply_overrides(UncertaintyConfig(), {"seed": 1})), loss, grad, ent)
    assert [r.disagreement for r in other] != [r.disagreement for r in r1]
    assert torch.equal(torch_state, torch.get_rng_state())
    assert random.getstate() == py_state
    now = np.random.get_state()
    assert now[0] == np_state[0] and np.array_equal(now[1], np_state[1]) and now[2:] == np_state[2:]


def _plain(obj) -> bool:
    """Only plain Python data, numpy arrays and tensors (what the checkpoint format stores)."""
    if isinstance(obj, dict):
        return all(isinstance(k, (str, int)) and _plain(v) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return all(_plain(v) for v in obj)
    return obj is None or isinstance(obj, (bool, int, float, str, np.ndarray, torch.Tensor))


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_state_round_trip_is_bit_identical(tmp_path, kind):
    cfg = apply_overrides(UncertaintyConfig(), {"forecaster": kind})
    loss, grad = calm_series(80, seed=5)
    ent = [5.0 - 0.001 * i if i % 4 == 0 else None for i in range(80)]
    index = UncertaintyIndex(cfg)
    run(index, loss[:50], grad[:50], ent[:50])
    state = index.state_dict()
    assert _plain(state)
    after = run(index, loss[50:], grad[50:], ent[50:])
    # Through the project's checkpoint format, into a fresh object.
    cp.save(state, tmp_path / "unc.ptz")
    fresh = UncertaintyIndex(cfg)
    fresh.load_state_dict(cp.load(tmp_path / "unc.ptz"))
    assert run(fresh, loss[50:], grad[50:], ent[50:]) == after
    # And straight from memory (the saved dict was not changed by the 30 later updates).
    again = UncertaintyIndex(cfg)
    again.load_state_dict(state)
    assert run(again, loss[50:], grad[50:], ent[50:]) == after


def test_load_refuses_a_state_from_another_config():
    state = UncertaintyIndex().state_dict()
    other = UncertaintyIndex(apply_overrides(UncertaintyConfig(), {"horizon": 5}))
    with pytest.raises(ConfigError, match="horizon: saved 10, now 5"):
        other.load_state_dict(state)


def test_component_names_and_vector():
    r = UncertaintyIndex().update(3.0, 1.0)
    assert UncertaintyIndex.component_names == COMPONENT_NAMES
    assert tuple(r.z) == tuple(r.raw) == COMPONENT_NAMES
    assert r.z_vector().dtype == np.float32 and r.z_vector().shape == (5,)
