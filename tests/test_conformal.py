"""Locally adaptive conformal bounds: residual-normalised scores, stored bounds, legacy files, branch ranking.

The synthetic data here has a known, heteroscedastic noise scale: ``y = mu(x) + sigma(x) * N(0, 1)``
with ``sigma = 0.05 + 0.95 * x0``. A stub proxy reports ``mu`` as its mean and ``sigma`` as its
ensemble spread, so the normalised score is exactly ``|z| * sigma / (sigma + floor)`` and the
expected behaviour is known: 90 % coverage overall *and* within low- and high-noise rows, with
bounds that are narrower where the spread is smaller.
"""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest

from stso_env.branch import BranchConfig, BranchOrchestrator
from stso_env.envs.gpt2_env import NEUTRAL_ACTION
from stso_env.errors import ConfigError, DataError
from stso_env.proxy.calibration import (
    CALIBRATION_FORMAT_VERSION,
    MIN_FLOOR,
    SCORE_ABSOLUTE,
    SCORE_NORMALISED,
    ConformalBounds,
    _coverage,
    _coverage_from_predictions,
    _level_index,
    calibrate,
    conformal_bounds,
    conformal_upper,
    repeated_split_coverage,
    spread_floor,
)
from stso_env.proxy.dataset import ProxyDataset
from stso_env.proxy.model import ProxyConfig, ProxyEnsemble

STATE_DIM = 3
NVEC = (2,)


class StubProxy:
    """Duck-typed proxy: mean ``2 + x1``, spread ``0.05 + 0.95 * x0`` (the true noise scale) for both heads."""

    state_dim = STATE_DIM
    nvec = NVEC

    def predict(self, x: np.ndarray, a: np.ndarray) -> dict[str, np.ndarray]:
        x = np.asarray(x, dtype=np.float32)
        mean = (2.0 + x[:, 1]).astype(np.float32)
        std = (0.05 + 0.95 * x[:, 0]).astype(np.float32)
        return {"loss_at_n": mean, "loss_at_n_std": std, "instability_risk": mean, "instability_risk_std": std}


def synth(n: int, seed: int, rows_per_run: int = 20) -> ProxyDataset:
    """``n`` rows of the heteroscedastic data, grouped into runs of ``rows_per_run`` rows."""
    rng = np.random.default_rng(seed)
    state = rng.uniform(0.0, 1.0, size=(n, STATE_DIM)).astype(np.float32)
    pred = StubProxy().predict(state, None)
    y = (pred["loss_at_n"] + pred["loss_at_n_std"] * rng.standard_normal(n)).astype(np.float32)
    risk = (pred["loss_at_n"] + pred["loss_at_n_std"] * rng.standard_normal(n)).astype(np.float32)
    zeros = np.zeros(n, np.float32)
    return ProxyDataset(
        state=state, action=rng.integers(0, 2, size=(n, 1)).astype(np.int64), loss_at_n=y, diverged_at_n=zeros,
        instability_risk=risk, recovery_time=zeros, next_state=state.copy(),
        run_id=np.array([f"s{seed}r{i // rows_per_run}" for i in range(n)], dtype=object),
        episode=np.zeros(n, np.int64), seed=np.full(n, seed, np.int64), horizon=1,
        state_names=[f"x{i}" for i in range(STATE_DIM)], action_nvec=NVEC)


@pytest.fixture(scope="module")
def data() -> dict[str, ProxyDataset]:
    return {"calib": synth(2000, seed=1), "test": synth(4000, seed=2)}


def test_equal_mean_different_spread_gives_different_upper_bounds():
    bounds = ConformalBounds({"loss_at_n": {"0.9": 1.5}}, scores={"loss_at_n": SCORE_NORMALISED},
                             floors={"loss_at_n": 0.01})
    mean, std = np.array([3.0, 3.0]), np.array([0.1, 0.5])
    up = bounds.upper("loss_at_n", mean, 0.9, std)
    np.testing.assert_allclose(up, [3.0 + 1.5 * 0.11, 3.0 + 1.5 * 0.51])
    assert up[0] < up[1]  # the candidate the ensemble agrees on is bounded lower, so it ranks first
    # the lower end mirrors the upper one about the mean (MAPIE's intervals are symmetric)
    np.testing.assert_allclose(bounds.lower("loss_at_n", mean, 0.9, std), [3.0 - 1.5 * 0.11, 3.0 - 1.5 * 0.51])
    # an absolute-residual bound adds the same q to both: it can never change a ranking
    legacy = ConformalBounds({"loss_at_n": {"0.9": 0.25}})
    assert legacy.score("loss_at_n") == SCORE_ABSOLUTE
    np.testing.assert_array_equal(legacy.upper("loss_at_n", mean, 0.9, std), [3.25, 3.25])
    np.testing.assert_array_equal(legacy.upper("loss_at_n", mean, 0.9), [3.25, 3.25])
    np.testing.assert_array_equal(legacy.lower("loss_at_n", mean, 0.9), [2.75, 2.75])


def test_missing_or_bad_std_is_a_clear_error():
    bounds = ConformalBounds({"loss_at_n": {"0.9": 1.5}}, scores={"loss_at_n": SCORE_NORMALISED},
                             floors={"loss_at_n": 0.01})
    with pytest.raises(ConfigError, match=r"upper std: .*residual_normalised.*loss_at_n_std"):
        bounds.upper("loss_at_n", np.zeros(2), 0.9)
    with pytest.raises(DataError, match="upper std: shape"):
        bounds.upper("loss_at_n", np.zeros(2), 0.9, np.zeros(3))
    with pytest.raises(DataError, match="negative spread"):
        bounds.upper("loss_at_n", np.zeros(2), 0.9, np.array([0.1, -0.1]))
    with pytest.raises(ConfigError, match=r"lower std: .*loss_at_n_std"):
        bounds.lower("loss_at_n", np.zeros(2), 0.9)
    with pytest.raises(ConfigError, match=r"floors\['loss_at_n'\]"):
        ConformalBounds({"loss_at_n": {"0.9": 1.5}}, scores={"loss_at_n": SCORE_NORMALISED})
    with pytest.raises(ConfigError, match="unknown"):
        ConformalBounds({"loss_at_n": {"0.9": 1.5}}, scores={"loss_at_n": "cqr"})
    with pytest.raises(ConfigError, match="without quantiles"):
        ConformalBounds({"loss_at_n": {"0.9": 1.5}}, scores={"recovery_time": SCORE_ABSOLUTE})
    with pytest.raises(ConfigError, match="floor_frac"):
        spread_floor(np.ones(3), floor_frac=0.0)
    assert spread_floor(np.zeros(3)) == MIN_FLOOR  # members that all agree still give a positive scale


def test_heteroscedastic_coverage_and_adaptive_widths(data):
    calib, test = data["calib"], data["test"]
    stub = StubProxy()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # MAPIE warns on negative residual-scale predictions: ours are positive
        bounds = conformal_bounds(stub, calib)
    sigma_cal = stub.predict(calib.state, calib.action)["loss_at_n_std"]
    assert bounds.floors["loss_at_n"] == pytest.approx(0.1 * np.median(sigma_cal), rel=1e-6)
    # |z| * sigma / (sigma + floor) <= |z|: the 0.9 quantile sits a little under 1.645
    assert 1.3 < bounds.quantiles["loss_at_n"]["0.9"] < 1.75
    pred = stub.predict(test.state, test.action)
    mean, std, y = pred["loss_at_n"], pred["loss_at_n_std"], test.loss_at_n.astype(np.float64)
    up = bounds.upper("loss_at_n", mean, 0.9, std)
    low = 2.0 * mean - up
    covered = (y >= low) & (y <= up)
    assert abs(covered.mean() - 0.9) < 0.02
    # adaptive: the coverage holds within low- and high-noise rows too (measured 0.92 / 0.87: the floor
    # widens quiet rows a little), and the bound follows the spread
    quiet = std < np.median(std)
    assert abs(covered[quiet].mean() - 0.9) < 0.05 and abs(covered[~quiet].mean() - 0.9) < 0.05
    assert np.all(np.diff((up - mean)[np.argsort(std)]) >= 0)
    assert (up - mean)[quiet].mean() < 0.5 * (up - mean)[~quiet].mean()
    # the absolute score over-covers quiet rows and under-covers noisy ones (measured 0.99 / 0.78)
    absolute = calibrate(stub, calib, (0.9,), score=SCORE_ABSOLUTE)
    _, pis = absolute.predict_interval(test.features())
    abs_cov = (y >= pis[:, 0, 0]) & (y <= pis[:, 1, 0])
    assert abs_cov[quiet].mean() > 0.97 and abs_cov[~quiet].mean() < 0.85


def test_stored_bounds_equal_mapie_upper_ends_and_round_trip(data, tmp_path):
    calib, test = data["calib"], data["test"]
    stub = StubProxy()
    bounds = conformal_bounds(stub, calib)
    pred = stub.predict(test.state, test.action)
    for target in ("loss_at_n", "instability_risk"):
        cal = calibrate(stub, calib, target=target)
        for level in (0.8, 0.9, 0.95):
            np.testing.assert_allclose(bounds.upper(target, pred[target], level, pred[target + "_std"]),
                                       conformal_upper(stub, cal, test, level), rtol=1e-9, atol=1e-9)
            _, pis = cal.predict_interval(test.features())
            i = _level_index(cal, level)
            np.testing.assert_allclose(bounds.lower(target, pred[target], level, pred[target + "_std"]),
                                       pis[:, 0, i], rtol=1e-9, atol=1e-9)
    with pytest.raises(ConfigError, match="another proxy model"):
        conformal_upper(StubProxy(), calibrate(stub, calib), test, 0.9)
    path = bounds.save(tmp_path)
    doc = json.loads(path.read_text())
    assert doc["format_version"] == CALIBRATION_FORMAT_VERSION and doc["score"] == SCORE_NORMALISED
    assert doc["n_calib"] == len(calib)
    entry = doc["targets"]["loss_at_n"]
    assert entry["score"] == SCORE_NORMALISED and entry["floor"] == bounds.floors["loss_at_n"]
    assert set(entry["quantiles"]) == {"0.8", "0.9", "0.95"}
    again = ConformalBounds.load(tmp_path)
    assert again == bounds
    np.testing.assert_array_equal(again.upper("loss_at_n", pred["loss_at_n"], 0.9, pred["loss_at_n_std"]),
                                  bounds.upper("loss_at_n", pred["loss_at_n"], 0.9, pred["loss_at_n_std"]))


def test_legacy_and_unknown_calibration_files(tmp_path):
    # the layout written before the normalised score: no format_version, absolute quantiles
    (tmp_path / "calibration.json").write_text(json.dumps({
        "score": "absolute residual (MAPIE SplitConformalRegressor)", "n_calib": 120,
        "quantiles": {"loss_at_n": {"0.9": 0.3}, "instability_risk": {"0.9": 1.0}}}))
    old = ConformalBounds.load(tmp_path)
    assert old.n_calib == 120 and old.scores == {"loss_at_n": SCORE_ABSOLUTE, "instability_risk": SCORE_ABSOLUTE}
    np.testing.assert_allclose(old.upper("loss_at_n", np.array([1.0, 2.0]), 0.9, np.array([0.1, 5.0])), [1.3, 2.3])
    old.save(tmp_path)  # re-saved in the new layout, still absolute
    assert ConformalBounds.load(tmp_path) == old
    (tmp_path / "calibration.json").write_text(json.dumps({"format_version": 99, "targets": {}}))
    with pytest.raises(DataError, match="format_version 99"):
        ConformalBounds.load(tmp_path)
    (tmp_path / "calibration.json").write_text(json.dumps({"format_version": 2, "targets": {
        "loss_at_n": {"score": SCORE_NORMALISED, "quantiles": {"0.9": 1.0}}}}))
    with pytest.raises(DataError, match="not a calibration file.*floor"):
        ConformalBounds.load(tmp_path)


def test_repeated_split_fast_path_matches_calibrate(data):
    calib, test = data["calib"], data["test"]
    stub = StubProxy()
    pooled_mean = np.concatenate([stub.predict(d.state, d.action)["loss_at_n"] for d in (calib, test)])
    pooled_std = np.concatenate([stub.predict(d.state, d.action)["loss_at_n_std"] for d in (calib, test)])
    y = np.concatenate([calib.loss_at_n, test.loss_at_n]).astype(np.float64)
    cal_rows, test_rows = np.arange(len(calib)), len(calib) + np.arange(len(test))
    levels = (0.8, 0.9, 0.95)
    fast = _coverage_from_predictions(pooled_mean.astype(np.float64), pooled_std.astype(np.float64), y,
                                      cal_rows, test_rows, levels)
    np.testing.assert_array_equal(fast, _coverage(stub, calib, test, levels))
    rep = repeated_split_coverage(stub, calib, test, levels, repeats=20)
    for lv in levels:
        assert abs(rep["mean"][str(lv)] - lv) < 0.02


class _SpreadProxy(ProxyEnsemble):
    """A real ProxyEnsemble (so the orchestrator accepts it) whose predictions are fixed per candidate:
    the same mean for every action, a loss spread of 0.05 for the neutral action and 0.5 otherwise."""

    def predict(self, x: np.ndarray, a: np.ndarray) -> dict[str, np.ndarray]:
        n = len(a)
        quiet = np.all(np.asarray(a) == np.asarray(NEUTRAL_ACTION), axis=1)
        out = {k: np.full(n, v, np.float32) for k, v in (
            ("loss_at_n", 3.0), ("instability_risk", 0.5), ("diverged_prob", 0.01), ("recovery_time", 1.0),
            ("instability_risk_std", 0.1), ("diverged_prob_std", 0.0), ("recovery_time_std", 0.0))}
        out["loss_at_n_std"] = np.where(quiet, 0.05, 0.5).astype(np.float32)
        return out


def test_branch_score_prefers_the_lower_spread_candidate():
    proxy = _SpreadProxy(ProxyConfig(horizon=4, hidden=16, layers=1, ensemble=3, seed=0))
    acts = np.asarray([[0, 0, 1, 1, 0, 0], NEUTRAL_ACTION])
    state = np.zeros(50, np.float32)
    bounds = ConformalBounds({"loss_at_n": {"0.9": 1.5}, "instability_risk": {"0.9": 2.0}},
                             scores={"loss_at_n": SCORE_NORMALISED, "instability_risk": SCORE_NORMALISED},
                             floors={"loss_at_n": 0.01, "instability_risk": 0.02})
    cfg = BranchConfig(alpha=1.0, beta=1.0, gamma=0.0, conformal_level=0.9)
    rows = BranchOrchestrator(cfg, proxy, bounds).score(state, acts)
    assert [r["loss_mean"] for r in rows] == [3.0, 3.0]
    assert math.isclose(rows[0]["loss_upper"], 3.0 + 1.5 * (0.5 + 0.01), rel_tol=1e-6)
    assert math.isclose(rows[1]["loss_upper"], 3.0 + 1.5 * (0.05 + 0.01), rel_tol=1e-6)
    assert math.isclose(rows[0]["risk"], 0.5 + 2.0 * (0.1 + 0.02) + 0.01, rel_tol=1e-6)
    assert rows[1]["score"] > rows[0]["score"]  # equal means: the candidate the ensemble agrees on wins
    assert max(rows, key=lambda r: r["score"])["action"] == list(NEUTRAL_ACTION)
    # absolute-residual bounds (older files) tie the two: a constant +q cannot rank them
    legacy = ConformalBounds({"loss_at_n": {"0.9": 0.25}, "instability_risk": {"0.9": 2.0}})
    tied = BranchOrchestrator(cfg, proxy, legacy).score(state, acts)
    assert tied[0]["score"] == tied[1]["score"]
