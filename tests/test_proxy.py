"""Proxy world model on a synthetic dynamics with a known answer.

Per run, a hidden LR scale ``g`` is multiplied by the factor of action[0]
(keep 1.0 / down 0.8 / up 1.25 / cut 0.5); the probe loss follows
``l' = l * (1 - 0.05 * min(g, 2)) + N(0, 0.01)``, plus a spike of ``0.1 * (g - 2)`` and one
instability event whenever ``g > 2``; the run diverges (probe loss NaN, terminated) once
``g > 3``. The state exposes ``l``, ``log g``, ``g`` and progress, padded with zeros to the observation width
features, so loss and divergence ``N`` steps ahead are predictable up to the randomness of
the future actions.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from stso_env.errors import ConfigError, DataError
from stso_env.monitor.monitor import OBSERVATION_NAMES
from stso_env.proxy.calibration import (
    SCORE_NORMALISED,
    ConformalBounds,
    calibrate,
    conformal_bounds,
    conformal_upper,
    evaluate,
    repeated_split_coverage,
)
from stso_env.proxy.dataset import build_targets
from stso_env.proxy.logdb import LogDB, load_log_schema
from stso_env.proxy.model import ProxyConfig, ProxyEnsemble

REPO = Path(__file__).resolve().parent.parent
LR_FACTOR = np.array([1.0, 0.8, 1.25, 0.5])
LR_PROBS = np.array([0.4, 0.15, 0.35, 0.1])
NVEC = (4, 3, 4, 2, 2, 2)
HORIZON = 5


def synth_rows(run_seed: int, steps: int = 40) -> list[dict]:
    """One synthetic trajectory in the log schema (ends in divergence or truncation)."""
    rng = np.random.default_rng(run_seed)
    loss, scale = rng.uniform(2.0, 6.0), rng.uniform(0.5, 1.5)
    rows = []
    for t in range(steps):
        state = np.zeros(len(OBSERVATION_NAMES), np.float32)
        state[:4] = (loss, np.log(scale), scale, t / steps)
        a = [int(rng.choice(4, p=LR_PROBS))] + [int(rng.integers(n)) for n in NVEC[1:]]
        before = loss
        scale *= LR_FACTOR[a[0]]
        loss = loss * (1 - 0.05 * min(scale, 2.0)) + rng.normal(0, 0.01)
        events = int(scale > 2.0)
        loss += 0.1 * (scale - 2.0) * events
        diverged = bool(scale > 3.0)
        nxt = np.zeros(len(OBSERVATION_NAMES), np.float32)
        nxt[:4] = (np.inf if diverged else loss, np.log(scale), scale, (t + 1) / steps)
        rows.append(dict(
            run_id=f"run{run_seed}", episode=0, env_step=t, global_step=(t + 1) * 10, seed=run_seed,
            scenario="synthetic", state=state.tolist(), action=a, action_overridden=False, reward=0.0,
            next_state=nxt.tolist(), terminated=diverged, truncated=(not diverged) and t == steps - 1,
            train_loss=float(loss), probe_loss=float("nan") if diverged else float(loss),
            probe_loss_before=float(before), grad_norm=1.0, lr=1e-3 * scale, uncertainty_index=0.0,
            trigger=False, instability_events=events, diverged=diverged, flops=1.0, wasted_flops=0.0,
            noise="", wall_seconds=0.01))
        if diverged:
            break
    return rows


def synth_table(seeds: range) -> pa.Table:
    schema, _ = load_log_schema()
    return pa.Table.from_pylist([r for s in seeds for r in synth_rows(s)], schema=schema)


@pytest.fixture(scope="module")
def trained():
    """One ensemble trained on runs 0..79 (early stopping on 80..95), calibrated on 96..175, tested on 176..255."""
    ds = build_targets(synth_table(range(256)), horizon=HORIZON)
    s = ds.seed
    parts = {"train": ds.subset(s < 80), "valid": ds.subset((s >= 80) & (s < 96)),
             "calib": ds.subset((s >= 96) & (s < 176)), "test": ds.subset(s >= 176)}
    # the MLP's own loss head: these tests are about the ensemble (the tree head has tests of its own)
    model = ProxyEnsemble(ProxyConfig(horizon=HORIZON, hidden=64, ensemble=5, epochs=40, patience=6, lr=3e-3,
                                      loss_model="mlp"))
    model.fit(parts["train"], parts["valid"])
    return model, parts, evaluate(model, parts["calib"], parts["test"])


def test_targets_follow_definitions():
    rows = synth_rows(3)
    ds = build_targets(synth_table(range(3, 4)), horizon=HORIZON)
    probe = np.array([r["probe_loss"] for r in rows])
    before = np.array([r["probe_loss_before"] for r in rows])
    diverged = rows[-1]["diverged"]
    # a truncated trajectory keeps exactly the rows whose window fits; a diverged one keeps all
    assert len(ds) == (len(rows) if diverged else len(rows) - HORIZON + 1)
    assert ds.loss_at_n[0] == pytest.approx(probe[HORIZON - 1])
    assert ds.diverged_at_n[0] == float(any(r["diverged"] for r in rows[:HORIZON]))
    assert ds.instability_risk[0] == sum(r["instability_events"] for r in rows[:HORIZON])
    ok = np.flatnonzero(probe[:HORIZON] <= before[0])
    assert ds.recovery_time[0] == (ok[0] if ok.size else HORIZON)
    np.testing.assert_array_equal(ds.next_state[0], np.asarray(rows[0]["next_state"], np.float32))
    assert ds.state.shape[1] + ds.action.shape[1] == 59 and len(ds.feature_names) == 70


def test_divergence_uses_last_finite_loss():
    seed = next(s for s in range(200) if synth_rows(s)[-1]["diverged"])
    rows = synth_rows(seed)
    ds = build_targets(synth_table(range(seed, seed + 1)), horizon=HORIZON)
    assert len(ds) == len(rows) and ds.diverged_at_n[-1] == 1.0
    assert np.isfinite(ds.loss_at_n).all()
    assert ds.loss_at_n[-1] == pytest.approx(rows[-1]["probe_loss_before"])  # diverging row's probe is NaN


def test_divergence_logit_has_a_linear_path_before_any_epoch():
    """The divergence logit is fitted by logistic regression before the MLP trains: with one epoch and no
    patience (early stopping keeps the linear path unless an epoch beats it) the proxy still ranks the
    diverging rows, and a collection without divergences leaves the logit's linear path at zero and starts
    its bias at the log-odds of the smoothed rate, 0.5 / (n + 1) for n rows, not at 0 (probability 0.5)."""
    from sklearn.metrics import roc_auc_score

    ds = build_targets(synth_table(range(256)), horizon=HORIZON)
    s = ds.seed
    train, valid, test = ds.subset(s < 80), ds.subset((s >= 80) & (s < 96)), ds.subset(s >= 176)
    model = ProxyEnsemble(ProxyConfig(horizon=HORIZON, hidden=16, ensemble=3, epochs=1, patience=0))
    model.fit(train, valid)
    assert float(model.lin_w[:, :, 1].abs().sum()) > 0
    prob = model.predict(test.state, test.action)["diverged_prob"]
    assert 0 < test.diverged_at_n.mean() < 1
    assert roc_auc_score(test.diverged_at_n, prob) > 0.9  # measured 0.966; 0.456 without the logistic path
    calm = train.subset(train.diverged_at_n == 0)
    quiet = ProxyEnsemble(ProxyConfig(horizon=HORIZON, hidden=16, ensemble=3, epochs=1, patience=0))
    quiet.fit(calm, valid.subset(valid.diverged_at_n == 0))
    assert float(quiet.lin_w[:, :, 1].abs().sum()) == 0.0
    n = len(calm)
    start = np.log((0.5 / (n + 1)) / (1 - 0.5 / (n + 1)))  # -8.49 here
    # the one epoch moves the bias a little further down (measured -8.51), never back towards 0
    np.testing.assert_allclose(quiet.head_b.detach()[:, 0, 1].numpy(), start, rtol=0.01)
    assert float(quiet.predict(test.state, test.action)["diverged_prob"].max()) < 5.0 / n


def test_bad_input_errors():
    with pytest.raises(DataError, match="missing columns"):
        build_targets(pa.table({"run_id": ["a"]}), horizon=3)
    with pytest.raises(DataError, match="no trajectory is long enough"):
        build_targets(synth_table(range(1)).slice(0, 3), horizon=50)


def test_learns_loss_and_divergence(trained):
    _, _, report = trained
    # measured: R2 ~0.966, MAE ~0.13 nats (loss range 0.2..6), AUROC ~0.97
    assert report["loss_r2"] > 0.9
    assert report["loss_mae"] < 0.2
    assert report["divergence_auroc"] > 0.9
    assert report["divergence_brier"] < 0.06


def test_conformal_coverage_on_held_out_runs(trained):
    model, parts, report = trained
    for level in ("0.8", "0.9", "0.95"):
        assert abs(report["coverage"][level] - float(level)) <= 0.05, report["coverage"]
    cal = calibrate(model, parts["calib"])
    up90 = conformal_upper(model, cal, parts["test"], 0.9)
    up95 = conformal_upper(model, cal, parts["test"].features(), 0.95)
    assert (up95 >= up90).all() and (up90 > model.predict(parts["test"].state, parts["test"].action)["loss_at_n"]).all()


def test_repeated_split_coverage_reports_mean_spread_and_single_split(trained):
    model, parts, report = trained
    rep = report["coverage_repeats"]
    assert rep["repeats"] == 100 and rep["calib_runs"] == len(np.unique(parts["calib"].groups))
    for level in ("0.8", "0.9", "0.95"):
        # exchangeable synthetic runs: the mean over re-partitions sits at the nominal level
        assert abs(report["coverage"][level] - float(level)) <= 0.03, report["coverage"]
        assert 0.0 < rep["std"][level] < 0.1
        assert 0.0 <= report["coverage_single_split"][level] <= 1.0
    again = repeated_split_coverage(model, parts["calib"], parts["test"], repeats=100)
    assert again["mean"] == report["coverage"]  # seeded: the same re-partitions


def test_stored_conformal_bounds_equal_mapie_and_round_trip(trained, tmp_path):
    model, parts, report = trained
    bounds = conformal_bounds(model, parts["calib"])
    test = parts["test"]
    pred = model.predict(test.state, test.action)
    assert bounds.scores == {"loss_at_n": SCORE_NORMALISED, "instability_risk": SCORE_NORMALISED}
    # the floor is 10 % of the median spread on the calibration rows
    calib_std = model.predict(parts["calib"].state, parts["calib"].action)["loss_at_n_std"]
    assert bounds.floors["loss_at_n"] == pytest.approx(0.1 * np.median(calib_std), rel=1e-6)
    for target in ("loss_at_n", "instability_risk"):
        cal = calibrate(model, parts["calib"], target=target)
        for level in (0.8, 0.9, 0.95):
            stored = bounds.upper(target, pred[target], level, pred[target + "_std"])
            np.testing.assert_allclose(stored, conformal_upper(model, cal, test, level), rtol=1e-6, atol=1e-6)
    # locally adaptive: the widths follow the ensemble spread, so they differ between rows
    up = bounds.upper("loss_at_n", pred["loss_at_n"], 0.9, pred["loss_at_n_std"])
    margin = up - pred["loss_at_n"]
    assert margin.std() > 0.1 * margin.mean() and np.corrcoef(margin, pred["loss_at_n_std"])[0, 1] > 0.999
    for level in ("0.8", "0.9", "0.95"):
        assert report["interval_width_std"][level] > 0.0 and report["interval_width"][level] > 0.0
    assert report["conformal_score"] == SCORE_NORMALISED
    # the risk bound is an upper bound with (close to) its nominal one-sided coverage on held-out runs
    for level in ("0.8", "0.9", "0.95"):
        assert report["risk_upper_coverage"][level] >= float(level) - 0.05, report["risk_upper_coverage"]
    bounds.save(tmp_path)
    doc = json.loads((tmp_path / "calibration.json").read_text())
    assert doc["format_version"] == 2 and doc["score"] == SCORE_NORMALISED
    again = ConformalBounds.load(tmp_path)
    assert again == bounds and again.n_calib == len(parts["calib"])
    np.testing.assert_array_equal(again.upper("loss_at_n", pred["loss_at_n"], 0.9, pred["loss_at_n_std"]), up)
    assert ConformalBounds.load(tmp_path / "nowhere") is None
    with pytest.raises(ConfigError, match="not calibrated"):
        again.upper("loss_at_n", pred["loss_at_n"], 0.85, pred["loss_at_n_std"])
    with pytest.raises(ConfigError, match="upper std"):
        again.upper("loss_at_n", pred["loss_at_n"], 0.9)
    (tmp_path / "calibration.json").write_text("{}")
    with pytest.raises(DataError, match="not a calibration file"):
        ConformalBounds.load(tmp_path)


def test_save_load_round_trip(trained, tmp_path):
    model, parts, _ = trained
    model.save(tmp_path)
    meta = json.loads((tmp_path / "proxy.json").read_text())
    assert {"format_version", "feature_names", "action_nvec", "normalisation", "config", "training_curve"} <= set(meta)
    again = ProxyEnsemble.load(tmp_path)
    x, a = parts["test"].state[:64], parts["test"].action[:64]
    p1, p2 = model.predict(x, a), again.predict(x, a)
    for k in p1:
        np.testing.assert_array_equal(p1[k], p2[k])


def test_training_is_deterministic():
    ds = build_targets(synth_table(range(12)), horizon=HORIZON)
    tr, va = ds.subset(ds.seed < 9), ds.subset(ds.seed >= 9)
    cfg = ProxyConfig(horizon=HORIZON, hidden=16, ensemble=2, epochs=3, seed=7)
    m1, m2 = ProxyEnsemble(cfg), ProxyEnsemble(cfg)
    m1.fit(tr, va)
    m2.fit(tr, va)
    np.testing.assert_array_equal(m1.predict(va.state, va.action)["loss_at_n"],
                                  m2.predict(va.state, va.action)["loss_at_n"])


def test_scores_500_candidates_in_one_batched_call(trained):
    model, parts, _ = trained
    rng = np.random.default_rng(0)
    x = np.repeat(parts["test"].state[:1], 500, axis=0)
    a = np.stack([rng.integers(n, size=500) for n in NVEC], axis=1)
    out = model.predict(x, a)
    assert out["loss_at_n"].shape == (500,) and out["next_state"].shape == (500, len(OBSERVATION_NAMES))
    # one call scores them all, and each row alone gives the same answer (its time: make bench, proxy.json)
    one = model.predict(x[7:8], a[7:8])
    assert one["loss_at_n"][0] == pytest.approx(out["loss_at_n"][7], abs=1e-5)


def test_train_proxy_cli_end_to_end(tmp_path):
    db = LogDB(tmp_path / "log_db.parquet", observation_names=OBSERVATION_NAMES, flush_rows=500)
    for s in range(40):
        for row in synth_rows(s, steps=20):
            db.append(row)
    db.close()
    out = tmp_path / "proxy"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    res = subprocess.run([sys.executable, "-m", "agents.train_proxy", "--log-db", str(tmp_path / "log_db.parquet"),
                          "--out", str(out), "--horizon", "3", "--epochs", "4", "--ensemble", "2", "--hidden", "16",
                          "--test-seeds", *map(str, range(32, 40))],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert {p.name for p in out.iterdir()} >= {"proxy.json", "proxy.safetensors", "proxy_report.json"}
    report = json.loads((out / "proxy_report.json").read_text())
    assert {"loss_r2", "loss_mae", "divergence_auroc", "divergence_brier", "coverage"} <= set(report)
    assert set(report["coverage"]) == {"0.8", "0.9", "0.95"}
    assert "coverage" in res.stdout
    # a missing log db is a clear error, not a traceback
    bad = subprocess.run([sys.executable, "-m", "agents.train_proxy", "--log-db", str(tmp_path / "nope"),
                          "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "does not exist" in bad.stderr
    few = subprocess.run([sys.executable, "-m", "agents.train_proxy", "--log-db", str(tmp_path / "log_db.parquet"),
                          "--out", str(out), "--horizon", "3", "--test-seeds", *map(str, range(1, 40))],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert few.returncode == 2 and "need at least 2" in few.stderr


def test_effect_summary_known_answers():
    from stso_env.proxy.effects import effect_summary

    # a: helps in states 0-1 (-0.1), hurts in 2-3 (+0.1); b: +0.05 everywhere (an additive offset)
    e = np.array([[-0.1, 0.05], [-0.1, 0.05], [0.1, 0.05], [0.1, 0.05]])
    out = effect_summary(e, ["a", "b"])
    assert out["n_states"] == 4
    assert out["per_action"]["a"] == {"mean": 0.0, "sd": pytest.approx(0.1), "share_helps": 0.5}
    assert out["per_action"]["b"] == {"mean": pytest.approx(0.05), "sd": pytest.approx(0.0), "share_helps": 0.0}
    # best: a where it helps, otherwise the neutral action (0 < 0.05 < 0.1)
    assert out["best"] == {"neutral": 0.5, "a": 0.5}
    assert out["distinct_best"] == 2 and out["modal_best_share"] == 0.5
    # one ranking for every state: a purely additive model
    same = effect_summary(np.array([[0.2, -0.3], [0.2, -0.3], [0.2, -0.3]]), ["a", "b"])
    assert same["modal_best"] == "b" and same["modal_best_share"] == 1.0 and same["distinct_best"] == 1
    # a tie with the neutral action goes to it
    assert effect_summary(np.zeros((2, 1)), ["a"])["best"] == {"neutral": 1.0}
    with pytest.raises(DataError, match="expected shape"):
        effect_summary(np.zeros((2, 3)), ["a", "b"])
    with pytest.raises(DataError, match="NaN"):
        effect_summary(np.array([[np.nan]]), ["a"])


def test_action_effects_depend_on_the_state_where_the_dynamics_do(trained):
    """In the synthetic dynamics, raising the LR scale g speeds progress while g < 2 and spikes the loss
    past it: 'up' (action 0 = 2, x1.25) against 'keep' (action 0 = 0) must help at small g and hurt at
    large g, so the proxy's best choice differs between those states."""
    from stso_env.proxy.effects import action_effects

    model, parts, _ = trained
    keep = (0, 0, 0, 0, 0, 0)
    up = ("up", (2, 0, 0, 0, 0, 0))
    low, high = (np.zeros((1, len(OBSERVATION_NAMES)), np.float32) for _ in range(2))
    low[0, :4] = (4.0, np.log(0.6), 0.6, 0.2)    # g 0.6 -> 0.75: faster progress, no spike
    high[0, :4] = (4.0, np.log(2.2), 2.2, 0.2)   # g 2.2 -> 2.75: a spike now, divergence within the horizon
    at_low = action_effects(model, low, [up], neutral=keep)
    at_high = action_effects(model, high, [up], neutral=keep)
    assert at_low["per_action"]["up"]["mean"] < 0 < at_high["per_action"]["up"]["mean"]
    both = action_effects(model, np.concatenate([low, high]), [up], neutral=keep)
    assert both["best"] == {"neutral": 0.5, "up": 0.5} and both["per_action"]["up"]["sd"] > 0
    # the default candidates are the env's single changes from its neutral action
    report = action_effects(model, parts["test"].state[:20])
    assert len(report["per_action"]) == 10 and report["n_states"] == 20
    assert sum(report["best"].values()) == pytest.approx(1.0)



def test_heldout_skill_known_answers():
    """A model that predicts every row exactly scores R² 1 on every held-out run and pooled; a constant
    offset lowers both; the persistence forecast is scored from the logged probe loss before each row."""
    from sklearn.metrics import mean_absolute_error, r2_score

    from agents.train_proxy import heldout_skill

    ds = build_targets(synth_table(range(6)), horizon=HORIZON)
    ds = ds.subset(ds.diverged_at_n == 0)
    calib, test = ds.subset(ds.seed < 3), ds.subset(ds.seed >= 3)
    assert test.loss_before is not None

    class Exact:
        """Looks each state up in the log (states of different rows differ in the synthetic log)."""

        offset = 0.0

        def predict(self, state, action):
            rows = [int(np.flatnonzero((ds.state == s).all(axis=1))[0]) for s in state]
            return {"loss_at_n": ds.loss_at_n[rows] + self.offset}

    out = heldout_skill(Exact(), calib, test)
    assert out["heldout_runs"] == 6 and out["loss_r2_heldout"] == pytest.approx(1.0)
    assert set(out["loss_r2_by_run"]) == {str(s) for s in range(6)}
    assert all(v == pytest.approx(1.0) for v in out["loss_r2_by_run"].values())
    y, before = test.loss_at_n.astype(np.float64), test.loss_before.astype(np.float64)
    assert out["persistence_r2"] == pytest.approx(r2_score(y, before))
    assert out["persistence_mae"] == pytest.approx(mean_absolute_error(y, before))
    # the synthetic loss falls by ~5 % a step: staying put is a poor forecast over the horizon
    assert out["persistence_mae"] > 0.01 and out["persistence_r2"] < 1.0
    # the late figures: the test rows from 20 % of each run on, by the feature named progress (none here; the
    # synthetic runs keep their progress in column 3)
    import dataclasses

    from agents.train_proxy import LATE_PROGRESS, late_rows

    assert late_rows(test) is None and out["loss_r2_late"] is None
    names = list(test.state_names)
    names[3] = "progress"
    named = dataclasses.replace(test, state_names=names)
    late = late_rows(named)
    assert LATE_PROGRESS == 0.2 and 0 < late.sum() < len(late) and np.array_equal(late, test.state[:, 3] >= 0.2)
    out = heldout_skill(Exact(), calib, named)
    assert out["loss_r2_late"] == pytest.approx(1.0)
    assert out["persistence_r2_late"] == pytest.approx(r2_score(y[late], before[late]))

    off = Exact()
    off.offset = 0.1
    worse = heldout_skill(off, calib, test)
    assert worse["loss_r2_heldout"] < 1.0 and all(v < 1.0 for v in worse["loss_r2_by_run"].values())


def test_proxy_baselines_reproduce_the_proxy_split_with_known_answers(tmp_path):
    """agents.proxy_baselines scores the proxy on the runs agents.train_proxy held out: its figures for the
    proxy and for persistence equal the proxy report's; persistence predicts no effect of any action."""
    from agents.proxy_baselines import agreement, compare, main, real_effects
    from agents.train_proxy import fit_proxy

    db = LogDB(tmp_path / "log_db.parquet", observation_names=OBSERVATION_NAMES, flush_rows=500)
    for s in range(40):
        for row in synth_rows(s, steps=20):
            db.append(row)
    db.close()
    test_seeds = list(range(32, 40))
    report = fit_proxy(tmp_path / "log_db.parquet", tmp_path / "proxy",
                       ProxyConfig(horizon=3, hidden=16, ensemble=2, epochs=4), test_seeds=test_seeds,
                       progress=False)
    out = compare(tmp_path / "log_db.parquet", tmp_path / "proxy", test_seeds=test_seeds)
    assert out["test_seeds"] == test_seeds and out["horizon"] == 3
    models = out["models"]
    assert models["proxy"]["loss_r2"] == pytest.approx(report["loss_r2"], abs=1e-5)
    assert models["proxy"]["loss_r2_heldout"] == pytest.approx(report["loss_r2_heldout"], abs=1e-5)
    assert models["persistence"]["loss_r2"] == pytest.approx(report["persistence_r2"], abs=1e-6)
    assert models["persistence"]["loss_mae"] == pytest.approx(report["persistence_mae"], abs=1e-6)
    assert models["persistence"]["max_abs_effect"] == 0.0
    # the synthetic loss falls with the LR scale: every fitted model sees the action columns matter
    assert models["ridge"]["max_abs_effect"] > 0 and models["extra trees"]["loss_r2"] > models["persistence"]["loss_r2"]
    assert models["state trees + linear plan"]["loss_r2"] > models["persistence"]["loss_r2"]
    # divergence: the synthetic runs diverge when the LR scale passes 3; the proxy's AUROC is the report's
    div = out["divergence"]
    assert div["test_diverged"] > 0 and "reason" not in div
    assert div["models"]["proxy"]["auroc"] == pytest.approx(report["divergence_auroc"], abs=1e-9)
    assert div["models"]["proxy"]["brier"] == pytest.approx(report["divergence_brier"], abs=1e-6)
    assert div["models"]["training rate"]["auroc"] == 0.5
    assert div["models"]["extra trees"]["auroc"] > 0.9
    # real effects from an agents.check_effects file: data_reorder's root mean square is the chance scale
    eff = tmp_path / "effects.json"
    eff.write_text(json.dumps({"changes": ["lr_change=x0.8", "data_reorder"],
                               "points": [{"real": [-0.1, 0.03]}, {"real": [-0.3, -0.04]}]}))
    real = real_effects(eff)
    assert real["effects"]["lr_change=x0.8"] == pytest.approx(-0.2)
    assert real["mean_abs_effect"] == pytest.approx(0.2) and real["chance_rms"] == pytest.approx(0.035355, abs=1e-6)
    # agreement with the real effects: a model predicting them exactly ranks them perfectly, one predicting
    # their negatives gets every sign wrong; data_reorder (chance) is left out
    truth = {"lr_change=x0.8": -0.2, "lr_change=x1.1": 0.1, "momentum_reset": 0.05, "data_reorder": 0.3}
    scored = agreement({"real_effects": {"effects": truth}, "models": {
        "exact": {"effects": dict(truth)}, "negated": {"effects": {c: -v for c, v in truth.items()}},
        "silent": {"effects": {c: 0.0 for c in truth}}, "persistence": {}}})["models"]
    assert scored["exact"]["effects_spearman"] == pytest.approx(1.0) and scored["exact"]["effects_sign_agreement"] == 1
    assert scored["negated"]["effects_spearman"] == pytest.approx(-1.0)
    assert scored["negated"]["effects_sign_agreement"] == 0
    assert np.isnan(scored["silent"]["effects_spearman"]) and "effects_spearman" not in scored["persistence"]
    # bad input: clear errors, exit code 2
    assert main(["--log-db", str(tmp_path / "log_db.parquet"), "--proxy", str(tmp_path / "nope"),
                 "--out", str(tmp_path / "o")]) == 2
    assert main(["--log-db", str(tmp_path / "log_db.parquet"), "--proxy", str(tmp_path / "proxy"),
                 "--test-seeds", *map(str, test_seeds), "--effects", str(tmp_path / "missing.json"),
                 "--out", str(tmp_path / "o")]) == 2
    assert main(["--log-db", str(tmp_path / "log_db.parquet"), "--proxy", str(tmp_path / "proxy"),
                 "--test-seeds", *map(str, test_seeds), "--effects", str(eff), "--out", str(tmp_path / "o")]) == 0
    text = (tmp_path / "o" / "report.md").read_text()
    assert "| `persistence` |" in text and "root mean square 0.0354 nats" in text
    assert "![real and predicted effects](effects.png)" in text and "| `ridge` | " in text.split("| right sign |")[1]
    assert (tmp_path / "o" / "effects.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_proxy_data_curve_fixed_test_runs_and_the_proxy_of_each_pool(tmp_path):
    """agents.proxy_data_curve scores every size on the same test runs; each size's pool is the smallest seeds
    outside the fold, and its proxy figures equal those of agents.train_proxy on a log of that pool and the
    fold's test runs."""
    from agents.proxy_data_curve import curve, divergence_summary, folds_of, main, pools, summary
    from agents.train_proxy import fit_proxy

    assert pools(range(10), [8, 9], [3, 5]) == {3: [0, 1, 2], 5: [0, 1, 2, 3, 4]}
    assert folds_of([5, 3, 4, 6, 7], 2) == [[3, 4, 5], [6, 7]]
    with pytest.raises(ConfigError, match="--sizes: 9 runs.*3 to 8"):
        pools(range(10), [8, 9], [9])
    with pytest.raises(ConfigError, match=r"--test-seeds: seeds \[11\]"):
        pools(range(10), [11], [3])
    with pytest.raises(ConfigError, match="--folds: must lie in 1..2"):
        folds_of([1, 2], 3)

    def log(path, seeds):
        db = LogDB(path, observation_names=OBSERVATION_NAMES, flush_rows=500)
        for s in seeds:
            for row in synth_rows(s, steps=20):
                db.append(row)
        db.close()

    log(tmp_path / "all.parquet", range(30))
    cfg = ProxyConfig(horizon=3, hidden=16, ensemble=2, epochs=4)
    out = curve(tmp_path / "all.parquet", range(18, 30), [8, 16], cfg, folds=2, progress=False)
    assert out["folds"] == [list(range(18, 24)), list(range(24, 30))]
    small, large = out["sizes"]["8"], out["sizes"]["16"]
    assert [f["fold"] for f in large] == [0, 1] and small[0]["test_rows"] == large[0]["test_rows"] > 0
    assert large[0]["fit_rows"] > small[0]["fit_rows"] and set(small[1]["calib_seeds"]) < set(range(8))
    # fold 1's pool of 16: seeds 0-15; the same split and proxy as agents.train_proxy on a log of those runs
    log(tmp_path / "pool.parquet", [*range(16), *range(24, 30)])
    report = fit_proxy(tmp_path / "pool.parquet", tmp_path / "proxy", cfg, test_seeds=list(range(24, 30)),
                       progress=False)
    assert large[1]["models"]["proxy"]["loss_r2"] == pytest.approx(report["loss_r2"], abs=1e-5)
    assert large[1]["models"]["persistence"]["loss_r2"] == pytest.approx(report["persistence_r2"], abs=1e-6)
    assert large[1]["proxy_coverage"] == pytest.approx(report["coverage"], abs=1e-6)
    mean, lo, hi = summary(out, "loss_r2")[16]["proxy"]
    assert lo <= mean <= hi and mean == pytest.approx(np.mean([f["models"]["proxy"]["loss_r2"] for f in large]))
    # divergence skill per fold is the proxy report's; the summary averages the folds that hold both outcomes
    assert large[1]["divergence"]["models"]["proxy"]["auroc"] == pytest.approx(report["divergence_auroc"], abs=1e-6)
    scored = [f["divergence"]["models"]["extra trees"]["auroc"] for f in large if "models" in f["divergence"]]
    assert divergence_summary(out)[16]["extra trees"] == pytest.approx(
        (np.mean(scored), min(scored), max(scored), len(scored)))
    # the command writes its report and figure; a size beyond the log is a clear error
    assert main(["--log-db", str(tmp_path / "all.parquet"), "--test-seeds", *map(str, range(24, 30)),
                 "--sizes", "8", "--out", str(tmp_path / "curve"), "--no-progress"]) == 0
    assert (tmp_path / "curve" / "curve.png").stat().st_size > 0
    text = (tmp_path / "curve" / "report.md").read_text(encoding="utf-8")
    assert "| 8 |" in text and '"The run diverges within 5 windows": AUROC' in text and "Aim AUROC >= 0.9" in text
    assert main(["--log-db", str(tmp_path / "all.parquet"), "--test-seeds", "29", "--sizes", "40",
                 "--out", str(tmp_path / "bad")]) == 2


def test_state_trees_plus_linear_plan_effects_are_the_linear_terms():
    """The plan enters StateTreesPlusLinearPlan only through its linear term: the difference between two plans
    is the same from every state and equals the least-squares slope of a plan effect that is linear by design."""
    from agents.proxy_baselines import StateTreesPlusLinearPlan

    rng = np.random.default_rng(0)
    state = rng.normal(size=(400, 3))
    plan = rng.integers(0, 3, size=(400, 2))
    y = np.sin(state[:, 0]) + state[:, 1] ** 2 - 0.5 * plan[:, 0] + 0.02 * rng.normal(size=400)
    model = StateTreesPlusLinearPlan(n_state=3).fit(np.concatenate([state, plan], axis=1), y)
    probe = rng.normal(size=(5, 3))
    one = model.predict(np.concatenate([probe, np.tile([2, 1], (5, 1))], axis=1))
    zero = model.predict(np.concatenate([probe, np.tile([0, 1], (5, 1))], axis=1))
    assert np.ptp(one - zero) < 1e-12
    assert (one - zero)[0] == pytest.approx(-1.0, abs=0.1)


def test_ordered_action_encoding_known_columns():
    """'ordered' gives the LR change and weight-decay scale one column each, the log of the factor (0 for the
    neutral choice), the clip policy one-hot and the 0/1 dimensions as they are; plans repeat the layout."""
    from stso_env.proxy.dataset import ACTION_NVEC, PLAN_NVEC, encode_actions, encoded_feature_names, encoded_width

    a = np.array([[0, 2, 3, 1, 0, 1], [2, 1, 0, 0, 0, 0]])
    x = encode_actions(a, ACTION_NVEC, "ordered")
    assert x.shape == (2, 9) == (2, encoded_width(ACTION_NVEC, "ordered"))
    np.testing.assert_allclose(x[0], [np.log(0.8), np.log(2.0), 0, 0, 0, 1, 1, 0, 1], rtol=1e-6)
    np.testing.assert_array_equal(x[1], [0, 0, 1, 0, 0, 0, 0, 0, 0])
    assert encoded_feature_names(ACTION_NVEC, "ordered")[:4] == ["action0", "action1", "action2=0", "action2=1"]
    assert encoded_width(PLAN_NVEC, "ordered") == 18 and encoded_width(PLAN_NVEC) == sum(PLAN_NVEC)
    np.testing.assert_array_equal(encode_actions(a), encode_actions(a, ACTION_NVEC, "one_hot"))
    with pytest.raises(ConfigError, match="action_encoding.*'one_hot'"):
        encode_actions(np.zeros((1, 2), int), (3, 3), "ordered")
    with pytest.raises(ConfigError, match="action_encoding: 'binary'"):
        ProxyConfig(action_encoding="binary")
    with pytest.raises(DataError, match=r"action\[:, 0\]"):
        encode_actions(np.array([[4, 0, 0, 0, 0, 0]]), ACTION_NVEC, "ordered")


def test_ordered_proxy_trains_saves_and_loads(tmp_path):
    """A proxy with the ordered encoding has 9 action columns, learns the synthetic runs (R² of loss@N on
    the validation runs above 0.5), and predicts the same after a save and load."""
    ds = build_targets(synth_table(range(40)), horizon=HORIZON)
    tr, va = ds.subset(ds.seed < 32), ds.subset(ds.seed >= 32)
    model = ProxyEnsemble(ProxyConfig(horizon=HORIZON, hidden=16, ensemble=2, epochs=20, lr=3e-3,
                                      action_encoding="ordered"))
    model.fit(tr, va)
    assert model.in_dim == len(OBSERVATION_NAMES) + 9 and model.feature_names[-9] == "action0"
    model.save(tmp_path)
    again = ProxyEnsemble.load(tmp_path)
    assert again.config.action_encoding == "ordered"
    p1, p2 = model.predict(va.state, va.action), again.predict(va.state, va.action)
    np.testing.assert_array_equal(p1["loss_at_n"], p2["loss_at_n"])
    ok = va.diverged_at_n == 0
    err = p1["loss_at_n"][ok] - va.loss_at_n[ok]
    assert 1 - np.mean(err ** 2) / np.var(va.loss_at_n[ok]) > 0.5


def test_tree_loss_head_equals_scikit_learn_and_widens_for_rare_plans():
    """The stored trees, evaluated in numpy, give scikit-learn's own predictions; the plan enters through the
    linear term only (known slope); a plan the fit rarely saw gets a larger spread; stored arrays round-trip."""
    from sklearn.ensemble import ExtraTreesRegressor

    from stso_env.proxy.trees import MIN_SAMPLES_LEAF, TREES, TreeLossHead

    rng = np.random.default_rng(0)
    state = rng.normal(size=(300, 4)).astype(np.float32)
    plan = np.zeros((300, 2))
    plan[:, 0] = rng.normal(size=300)
    plan[:5, 1] = 1.0  # the second plan column is set in 5 rows only
    change = np.sin(state[:, 0]) + 0.5 * state[:, 1] - 0.3 * plan[:, 0] + 0.05 * rng.normal(size=300)
    head = TreeLossHead().fit(state, plan, change, seed=3)
    forest = ExtraTreesRegressor(TREES, min_samples_leaf=MIN_SAMPLES_LEAF, bootstrap=True, oob_score=True,
                                 n_jobs=1, random_state=3).fit(state.astype(np.float64), change)
    probe = rng.normal(size=(50, 4)).astype(np.float32)
    zero = np.zeros((50, 2))
    mean, std = head.predict(probe, zero)
    np.testing.assert_allclose(mean - head.arrays["coef"][0], forest.predict(probe), rtol=0, atol=1e-12)
    one = zero.copy()
    one[:, 0] = 1.0
    assert np.ptp(head.predict(probe, one)[0] - mean) < 1e-12
    assert head.predict(probe, one)[0][0] - mean[0] == pytest.approx(-0.3, abs=0.05)
    rare = zero.copy()
    rare[:, 1] = 1.0
    assert np.all(head.predict(probe, rare)[1] > std)
    again = TreeLossHead.from_tensors(head.tensors(), "mem")
    np.testing.assert_array_equal(again.predict(probe, one)[0], head.predict(probe, one)[0])
    broken = head.tensors()
    del broken["loss_trees.cov"]
    with pytest.raises(DataError, match=r"mem: .*loss_trees.cov.*retrain the proxy"):
        TreeLossHead.from_tensors(broken, "mem")
    broken = head.tensors()
    broken["loss_trees.left"] = broken["loss_trees.left"] + 10 ** 7
    with pytest.raises(DataError, match="point outside"):
        TreeLossHead.from_tensors(broken, "mem")


def test_proxy_with_tree_loss_head_trains_saves_loads_and_drives_the_proxy_env(tmp_path):
    """loss_model 'trees': the proxy's loss@N and its spread come from the tree head (the other heads stay the
    MLP's), survive a save and load without pickle, reach the proxy env's heads, and beat the MLP's loss head
    on the synthetic runs' validation rows."""
    from stso_env.envs.proxy_env import ProxyVecModel
    from stso_env.proxy.dataset import ACTION_NVEC, as_plan

    ds = build_targets(synth_table(range(40)), horizon=HORIZON)
    tr, va = ds.subset(ds.seed < 32), ds.subset(ds.seed >= 32)
    cfg = dict(horizon=HORIZON, hidden=16, ensemble=2, epochs=20, lr=3e-3, action_encoding="ordered")
    model = ProxyEnsemble(ProxyConfig(**cfg, loss_model="trees"))
    model.fit(tr, va)
    mlp = ProxyEnsemble(ProxyConfig(**cfg, loss_model="mlp"))
    mlp.fit(tr, va)
    p = model.predict(va.state, va.action)
    mean, std = model.tree_loss(va.state, va.action)
    np.testing.assert_array_equal(p["loss_at_n"], mean)
    np.testing.assert_array_equal(p["loss_at_n_std"], std)
    np.testing.assert_array_equal(p["diverged_prob"], mlp.predict(va.state, va.action)["diverged_prob"])
    model.save(tmp_path)
    assert "trees" in json.loads((tmp_path / "proxy.json").read_text())["loss_head"]
    again = ProxyEnsemble.load(tmp_path)
    np.testing.assert_array_equal(again.predict(va.state, va.action)["loss_at_n"], p["loss_at_n"])
    ok = va.diverged_at_n == 0

    def r2(pred):
        return 1 - np.mean((pred[ok] - va.loss_at_n[ok]) ** 2) / np.var(va.loss_at_n[ok])

    assert r2(p["loss_at_n"]) > r2(mlp.predict(va.state, va.action)["loss_at_n"])
    dyn = ProxyVecModel(again)
    a = va.action[:8, :len(ACTION_NVEC)]
    heads = dyn.heads(va.state[:8], a)
    ran = heads["action"]  # a masked skip-batch runs as 0
    expected = again.tree_loss(va.state[:8], as_plan(ran) if dyn.plans else ran)[0]
    np.testing.assert_array_equal(heads["loss_at_n"], expected)
    with pytest.raises(ConfigError, match="loss_model: 'forest' is not one of"):
        ProxyConfig(loss_model="forest")


def test_tree_divergence_head_ranks_divergence_saves_loads_and_drives_the_proxy_env(tmp_path):
    """divergence_model 'trees': the divergence probability comes from trees on the state and plan, ranks the
    synthetic runs' divergence (set off by a visible LR scale), leaves the loss head as it is, survives a save
    and load without pickle, and is what the proxy env charges; a store without its arrays is a clear error."""
    from sklearn.metrics import roc_auc_score

    from stso_env.envs.proxy_env import ProxyVecModel
    from stso_env.proxy.dataset import ACTION_NVEC, as_plan
    from stso_env.proxy.trees import TreeDivergenceHead

    ds = build_targets(synth_table(range(40)), horizon=HORIZON, plans=True)
    tr, va = ds.subset(ds.seed < 32), ds.subset(ds.seed >= 32)
    cfg = dict(horizon=HORIZON, hidden=16, ensemble=2, epochs=5, lr=3e-3)
    model = ProxyEnsemble(ProxyConfig(**cfg, divergence_model="trees"), nvec=tr.action_nvec)
    model.fit(tr, va)
    plain = ProxyEnsemble(ProxyConfig(**cfg), nvec=tr.action_nvec)
    plain.fit(tr, va)
    p = model.predict(va.state, va.action)
    prob, spread = model.tree_divergence(va.state, va.action)
    np.testing.assert_array_equal(p["diverged_prob"], prob)
    np.testing.assert_array_equal(p["diverged_prob_std"], spread)
    assert 0 <= prob.min() and prob.max() <= 1 and spread.max() > 0
    np.testing.assert_array_equal(p["loss_at_n"], plain.predict(va.state, va.action)["loss_at_n"])
    assert 0 < va.diverged_at_n.mean() < 1 and roc_auc_score(va.diverged_at_n, prob) > 0.9
    model.save(tmp_path)
    again = ProxyEnsemble.load(tmp_path)
    assert again.config.divergence_model == "trees" and plain.divergence_trees is None
    np.testing.assert_array_equal(again.predict(va.state, va.action)["diverged_prob"], prob)
    dyn = ProxyVecModel(again)
    heads = dyn.heads(va.state[:8], va.action[:8, :len(ACTION_NVEC)])
    ran = heads["action"]
    np.testing.assert_array_equal(heads["diverged_prob"], again.tree_divergence(va.state[:8], as_plan(ran))[0])
    from safetensors.torch import load_file
    tensors = {k: v for k, v in load_file(str(tmp_path / "proxy.safetensors")).items()
               if not k.startswith("divergence_trees.value")}
    with pytest.raises(DataError, match="divergence_model 'trees'.*divergence_trees.value"):
        TreeDivergenceHead.from_tensors(tensors, "mem")
    with pytest.raises(ConfigError, match="divergence_model: 'forest' is not one of"):
        ProxyConfig(divergence_model="forest")


def test_a_proxy_saved_before_the_tree_head_loads_with_the_mlp_head(tmp_path):
    """A proxy.json without loss_model (written before the tree head existed) loads with the MLP's loss head and
    predicts exactly what it did; the default config is the tree head."""
    ds = build_targets(synth_table(range(12)), horizon=HORIZON)
    model = ProxyEnsemble(ProxyConfig(horizon=HORIZON, hidden=8, ensemble=2, epochs=2, loss_model="mlp"))
    model.fit(ds.subset(ds.seed < 8), ds.subset(ds.seed >= 8))
    model.save(tmp_path)
    meta = json.loads((tmp_path / "proxy.json").read_text())
    del meta["config"]["loss_model"], meta["tree_encoding"]
    (tmp_path / "proxy.json").write_text(json.dumps(meta))
    old = ProxyEnsemble.load(tmp_path)
    assert old.config.loss_model == "mlp" and old.loss_trees is None and ProxyConfig().loss_model == "trees"
    np.testing.assert_array_equal(old.predict(ds.state, ds.action)["loss_at_n"],
                                  model.predict(ds.state, ds.action)["loss_at_n"])


def test_event_window_is_the_first_window_of_the_horizon_with_a_scenario_event():
    """build_targets records, per example, the first window of its horizon in which the log's ``noise``
    column names an active scenario event (0 = its own window), -1 for none."""
    rows = synth_rows(next(s for s in range(200) if not synth_rows(s, steps=10)[-1]["diverged"]), steps=10)
    rows[6]["noise"] = "lr_shock"
    schema, _ = load_log_schema()
    ds = build_targets(pa.Table.from_pylist(rows, schema=schema), HORIZON)
    assert ds.event_window.tolist() == [-1, -1, 4, 3, 2, 1]  # rows 0-5 have a full horizon; row 6 is the event
    assert ds.subset(np.array([2, 5])).event_window.tolist() == [4, 1]


def test_foresight_separates_what_the_state_foresees(tmp_path):
    """Runs whose shocks come at random: a shock raises the probe loss by 0.5 while it lasts, and a run
    diverges in the second window of a shock iff its fragility (a state feature) exceeds 0.5. The state
    foresees the loss's trend and which runs are fragile, not when a shock comes; models told the horizon's
    events know both, and rank divergence almost perfectly."""
    from agents.foresight import MODELS, foresight, main

    rows = []
    for seed in range(60):
        rng = np.random.default_rng(seed)
        fragile = rng.uniform()
        shock_left, before = 0, 3.0
        for t in range(30):
            if shock_left == 0 and rng.uniform() < 0.1:
                shock_left = 2
            state = np.zeros(len(OBSERVATION_NAMES), np.float32)
            state[:2] = (before, fragile)
            state[OBSERVATION_NAMES.index("progress")] = t / 30
            diverged = shock_left == 1 and fragile > 0.5
            loss = 3.0 - 0.02 * t + 0.5 * (shock_left > 0)
            rows.append(dict(
                run_id=f"run{seed}", episode=0, env_step=t, global_step=(t + 1) * 10, seed=seed,
                scenario="synthetic", state=state.tolist(), action=[0, 1, 0, 0, 0, 0], action_overridden=False,
                reward=0.0, next_state=state.tolist(), terminated=diverged, truncated=(not diverged) and t == 29,
                train_loss=loss, probe_loss=float("nan") if diverged else loss, probe_loss_before=before,
                grad_norm=1.0, lr=1e-3, uncertainty_index=0.0, trigger=False, instability_events=0,
                diverged=diverged, flops=1.0, wasted_flops=0.0, noise="lr_shock" if shock_left else "",
                wall_seconds=0.01))
            shock_left, before = max(shock_left - 1, 0), loss
            if diverged:
                break

    def log(path, rows):
        db = LogDB(path, observation_names=OBSERVATION_NAMES, flush_rows=500)
        for row in rows:
            db.append(row)
        db.close()

    log(tmp_path / "log_db.parquet", rows)
    out = foresight(tmp_path / "log_db.parquet", horizon=3, folds=3)
    div = out["divergence"]
    assert div["diverging"] == div["event_now"] + div["event_later"] > 0 and div["no_event"] == 0
    state, events, told = (float(np.mean(div["auroc"][m])) for m in MODELS)
    assert told > 0.97 and state < told - 0.05 and events < told - 0.05
    state, events, told = (float(np.mean(out["loss"]["r2"][m])) for m in MODELS)
    assert told > 0.85 and state < told - 0.3 and events < told - 0.1  # measured 0.912, 0.277, 0.576
    assert main(["--log-db", str(tmp_path / "log_db.parquet"), "--horizon", "3", "--folds", "3",
                 "--out", str(tmp_path / "o")]) == 0
    text = (tmp_path / "o" / "report.md").read_text(encoding="utf-8")
    assert "Aim AUROC >= 0.9" in text and "Aim R² >= 0.9" in text
    assert (tmp_path / "o" / "foresight.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a log without divergences scores the loss alone; a missing log is a clear error, exit 2
    log(tmp_path / "calm", [dict(r, diverged=False, terminated=False, probe_loss=r["train_loss"]) for r in rows])
    assert foresight(tmp_path / "calm", horizon=3, folds=3)["divergence"] is None
    assert main(["--log-db", str(tmp_path / "calm"), "--horizon", "3", "--folds", "3",
                 "--out", str(tmp_path / "o2")]) == 0
    assert "Divergence: not scored" in (tmp_path / "o2" / "report.md").read_text(encoding="utf-8")
    assert main(["--log-db", str(tmp_path / "missing"), "--out", str(tmp_path / "o3")]) == 2
