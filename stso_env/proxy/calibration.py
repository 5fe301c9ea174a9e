"""Split-conformal intervals for the proxy's ``loss_at_n`` and ``instability_risk``, and held-out evaluation.

References (keys in ``assets/related_work.md``): 2005_Vovk_ConformalPrediction,
2018_Lei_SplitConformal, 2022_Taquet_MAPIE.

MAPIE 1.6's :class:`~mapie.regression.SplitConformalRegressor` (``prefit=True``)
wraps the trained ensemble through :class:`LossRegressor`, a minimal
scikit-learn-style estimator. Log rows of one trajectory are strongly
correlated in time, so the calibration set must be *whole runs* held out from
training, and coverage is checked on yet other runs; a row-level split would
make the residuals look smaller than they are on a new run and under-cover.

MAPIE's default conformity score is the absolute residual, so a calibrated
interval is ``prediction +- q`` with one quantile ``q`` per target and level.
:class:`ConformalBounds` keeps exactly those numbers (``calibration.json`` next
to the proxy's weights, plain JSON), so a saved proxy carries its calibration
without pickling the MAPIE object.
"""

from __future__ import annotations

import math
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from mapie.regression import SplitConformalRegressor
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.metrics import mean_absolute_error, r2_score, roc_auc_score

from stso_env.errors import ConfigError, DataError
from stso_env.files import write_text_atomic
from stso_env.proxy.dataset import ProxyDataset
from stso_env.proxy.model import ProxyEnsemble

CONFIDENCE_LEVELS: tuple[float, ...] = (0.8, 0.9, 0.95)
#: proxy heads with conformal bounds (the pessimistic loss and risk of branch scoring)
CONFORMAL_TARGETS: tuple[str, ...] = ("loss_at_n", "instability_risk")
CALIBRATION_FILE = "calibration.json"


class LossRegressor(RegressorMixin, BaseEstimator):
    """scikit-learn view of a trained :class:`ProxyEnsemble` predicting one head (``target``, default ``loss_at_n``).

    ``X`` is ``ProxyDataset.features()``: the state columns followed by the integer
    MultiDiscrete action columns. ``fit`` does nothing: the model is trained already.
    """

    def __init__(self, model: ProxyEnsemble | None = None, target: str = "loss_at_n") -> None:
        self.model = model
        self.target = target

    @property
    def n_features_in_(self) -> int:
        if self.model is None:
            raise AttributeError("n_features_in_")
        return self.model.state_dim + len(self.model.nvec)

    def __sklearn_is_fitted__(self) -> bool:
        return self.model is not None

    def fit(self, X: np.ndarray, y: np.ndarray | None = None) -> LossRegressor:
        """No-op (prefit model)."""
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Ensemble-mean prediction of ``target`` for the rows of ``X``."""
        if self.model is None:
            raise ConfigError("LossRegressor.model: no proxy model given")
        x = np.asarray(X, dtype=np.float32)
        s = self.model.state_dim
        if x.ndim != 2 or x.shape[1] != self.n_features_in_:
            raise DataError(f"X: expected shape (n, {self.n_features_in_}), got {x.shape}")
        return self.model.predict(x[:, :s], np.rint(x[:, s:]).astype(np.int64))[self.target].astype(np.float64)


def _finite_rows(ds: ProxyDataset, target: str = "loss_at_n") -> np.ndarray:
    return np.isfinite(getattr(ds, target))


def calibrate(model: ProxyEnsemble, calib: ProxyDataset, levels: tuple[float, ...] = CONFIDENCE_LEVELS,
              target: str = "loss_at_n") -> SplitConformalRegressor:
    """Conformalize ``model``'s ``target`` head on ``calib`` (whole held-out runs)."""
    if target not in CONFORMAL_TARGETS:
        raise ConfigError(f"target: {target!r} has no conformal bound; choose one of {CONFORMAL_TARGETS}")
    ok = _finite_rows(calib, target)
    # split conformal needs more than 1/(1-level) scores for its highest level (20 for 0.95)
    need = max(2, math.floor(1.0 / (1.0 - max(levels)) + 1e-9) + 1)
    if ok.sum() < need:
        raise DataError(f"calibration set: {int(ok.sum())} usable rows; conformal level {max(levels)} needs at "
                        f"least {need}; collect more or longer episodes, or raise the calibration fraction")
    reg = SplitConformalRegressor(LossRegressor(model, target), confidence_level=list(levels), prefit=True)
    reg.conformalize(calib.features()[ok], getattr(calib, target)[ok].astype(np.float64))
    return reg


@dataclass
class ConformalBounds:
    """Stored split-conformal quantiles: the upper bound of ``target`` at ``level`` is ``mean + q``.

    ``quantiles[target][str(level)] = q``; built by :func:`conformal_bounds`, saved as
    ``calibration.json`` in the proxy folder.
    """

    quantiles: dict[str, dict[str, float]]
    n_calib: int = 0

    def has(self, target: str) -> bool:
        return target in self.quantiles

    def upper(self, target: str, mean: np.ndarray, level: float) -> np.ndarray:
        if target not in self.quantiles:
            raise ConfigError(f"conformal bounds: {target!r} was not calibrated (have {sorted(self.quantiles)})")
        table = self.quantiles[target]
        for key, q in table.items():
            if math.isclose(float(key), float(level), abs_tol=1e-9):
                return np.asarray(mean, dtype=np.float64) + float(q)
        raise ConfigError(f"conformal level {level} of {target!r} was not calibrated; choose one of "
                          f"{sorted(table)}")

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / CALIBRATION_FILE
        write_text_atomic(path, json.dumps({"score": "absolute residual (MAPIE SplitConformalRegressor)",
                                            "n_calib": self.n_calib, "quantiles": self.quantiles}, indent=1))
        return path

    @classmethod
    def load(cls, directory: str | Path) -> ConformalBounds | None:
        """The bounds saved in ``directory``, or None when the proxy was saved without them."""
        path = Path(directory) / CALIBRATION_FILE
        if not path.is_file():
            return None
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            quantiles = {str(t): {str(k): float(v) for k, v in table.items()} for t, table in doc["quantiles"].items()}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise DataError(f"{path}: not a calibration file ({exc}); retrain the proxy with "
                            "agents.train_proxy") from None
        return cls(quantiles=quantiles, n_calib=int(doc.get("n_calib", 0)))


def conformal_bounds(model: ProxyEnsemble, calib: ProxyDataset,
                     levels: tuple[float, ...] = CONFIDENCE_LEVELS) -> ConformalBounds:
    """Calibrate every head in :data:`CONFORMAL_TARGETS` on ``calib`` and keep the quantiles."""
    quantiles: dict[str, dict[str, float]] = {}
    x = calib.features()[:8]
    for target in CONFORMAL_TARGETS:
        reg = calibrate(model, calib, levels, target)
        yhat, pis = reg.predict_interval(x)
        q = pis[:, 1, :] - np.asarray(yhat, dtype=np.float64)[:, None]
        # absolute-residual score: the same q on every row (a different score would break ConformalBounds)
        if not np.allclose(q, q[:1], atol=1e-6):
            raise ConfigError("conformal bounds: intervals are not prediction +- q; the conformity score changed")
        quantiles[target] = {str(lv): float(q[0, i]) for i, lv in enumerate(levels)}
    return ConformalBounds(quantiles=quantiles, n_calib=len(calib))


def _level_index(calibrator: SplitConformalRegressor, level: float) -> int:
    # MAPIE 1.6 keeps the levels only as private miscoverage rates alpha = 1 - level
    levels = [round(1.0 - float(a), 9) for a in calibrator._alphas]
    for i, lv in enumerate(levels):
        if math.isclose(float(lv), float(level), abs_tol=1e-9):
            return i
    raise ConfigError(f"level: {level} was not calibrated; choose one of {levels}")


def conformal_upper(model: ProxyEnsemble, calibrator: SplitConformalRegressor, X: np.ndarray | ProxyDataset,
                    level: float = 0.9) -> np.ndarray:
    """Upper end of the conformal ``loss_at_n`` interval at ``level`` (a pessimistic loss for branch scoring).

    ``X`` is a :meth:`ProxyDataset.features` matrix or a :class:`ProxyDataset`. ``model`` must be the
    ensemble the calibrator wraps (checked, so a retrained model is not paired with stale quantiles).
    """
    est = getattr(calibrator, "_estimator", None)
    if est is not None and getattr(est, "model", model) is not model:
        raise ConfigError("conformal_upper: the calibrator was fitted for another proxy model; recalibrate")
    feats = X.features() if isinstance(X, ProxyDataset) else np.asarray(X, dtype=np.float32)
    i = _level_index(calibrator, level)
    _, pis = calibrator.predict_interval(feats)
    return np.asarray(pis[:, 1, i], dtype=np.float64)


def _coverage(model: ProxyEnsemble, calib: ProxyDataset, test: ProxyDataset,
              levels: tuple[float, ...]) -> np.ndarray:
    """Empirical coverage of ``loss_at_n`` on ``test`` of intervals calibrated on ``calib``, per level."""
    reg = calibrate(model, calib, levels)
    ok = _finite_rows(test)
    _, pis = reg.predict_interval(test.features()[ok])
    y = test.loss_at_n[ok].astype(np.float64)
    return np.array([np.mean((y >= pis[:, 0, i]) & (y <= pis[:, 1, i])) for i in range(len(levels))])


def repeated_split_coverage(model: ProxyEnsemble, calib: ProxyDataset, test: ProxyDataset,
                            levels: tuple[float, ...] = CONFIDENCE_LEVELS, repeats: int = 100,
                            seed: int = 0) -> dict[str, Any]:
    """Coverage averaged over random run-level re-partitions of the held-out runs.

    Split conformal guarantees coverage *on average over the draw of the calibration
    runs*; one split with a dozen runs on each side scatters by several points around
    it because whole trajectories differ. The runs of ``calib`` and ``test`` (none
    used in training) are pooled and ``repeats`` times divided at random, by whole
    runs, into halves of the original sizes: calibrate on one, measure on the other.
    Returns per level the mean coverage, its standard deviation over repeats, and the
    number of runs on each side.
    """
    pool_runs = np.concatenate([np.unique(calib.groups), np.unique(test.groups)])
    n_cal = len(np.unique(calib.groups))
    pooled = _concat(calib, test)
    groups = pooled.groups
    rng = np.random.default_rng(seed)
    cover = []
    for _ in range(repeats):
        perm = rng.permutation(pool_runs)
        cal_mask = np.isin(groups, perm[:n_cal])
        cal, tst = pooled.subset(cal_mask), pooled.subset(~cal_mask)
        if not _finite_rows(tst).any():
            continue
        try:
            cover.append(_coverage(model, cal, tst, levels))
        except DataError:  # a draw whose calibration runs are too short for the highest level
            continue
    if not cover:
        raise DataError("repeated split coverage: no usable re-partition of the held-out runs")
    c = np.stack(cover)
    return {"mean": {str(lv): float(c[:, i].mean()) for i, lv in enumerate(levels)},
            "std": {str(lv): float(c[:, i].std()) for i, lv in enumerate(levels)},
            "repeats": int(len(c)), "calib_runs": int(n_cal), "test_runs": int(len(pool_runs) - n_cal)}


def _concat(a: ProxyDataset, b: ProxyDataset) -> ProxyDataset:
    take = {k: np.concatenate([getattr(a, k), getattr(b, k)]) for k in (
        "state", "action", "loss_at_n", "diverged_at_n", "instability_risk", "recovery_time", "next_state",
        "run_id", "episode", "seed")}
    return ProxyDataset(**take, horizon=a.horizon, state_names=list(a.state_names), action_nvec=a.action_nvec,
                        target_names=a.target_names)


def evaluate(model: ProxyEnsemble, calib: ProxyDataset, test: ProxyDataset,
             levels: tuple[float, ...] = CONFIDENCE_LEVELS, repeats: int = 100) -> dict[str, Any]:
    """Accuracy, divergence discrimination and conformal coverage on held-out ``test`` runs.

    Returns ``loss_r2``, ``loss_mae``, ``divergence_auroc`` (``None`` with
    ``divergence_auroc_reason`` when ``test`` has one class), ``divergence_brier``,
    ``coverage`` ({"0.8": ...}: the mean over ``repeats`` random run-level re-partitions of
    the held-out runs, see :func:`repeated_split_coverage`), ``coverage_single_split``
    (calibrated on ``calib``, measured on ``test``), ``coverage_repeats`` (spread and sizes)
    and ``interval_width`` (mean width per level).
    """
    if len(test) == 0:
        raise DataError("test set: empty; hold out runs of at least one seed for testing")
    calibrator = calibrate(model, calib, levels)
    ok = _finite_rows(test)
    pred = model.predict(test.state, test.action)
    y = test.loss_at_n[ok].astype(np.float64)
    yhat = pred["loss_at_n"][ok].astype(np.float64)
    labels = test.diverged_at_n.astype(np.float64)
    prob = pred["diverged_prob"].astype(np.float64)
    report: dict[str, Any] = {
        "n_calib": len(calib), "n_test": len(test),
        "n_calib_runs": int(len(np.unique(calib.groups))), "n_test_runs": int(len(np.unique(test.groups))),
        "loss_r2": float(r2_score(y, yhat)) if len(y) > 1 else None,
        "loss_mae": float(mean_absolute_error(y, yhat)),
        "divergence_brier": float(np.mean((prob - labels) ** 2)),
    }
    if len(np.unique(labels)) < 2:
        report["divergence_auroc"] = None
        report["divergence_auroc_reason"] = (f"test runs contain only {'diverged' if labels[0] else 'non-diverged'} "
                                             "examples; AUROC is undefined")
    else:
        report["divergence_auroc"] = float(roc_auc_score(labels, prob))
    _, pis = calibrator.predict_interval(test.features()[ok])
    report["coverage_single_split"] = {str(lv): float(np.mean((y >= pis[:, 0, i]) & (y <= pis[:, 1, i])))
                                       for i, lv in enumerate(levels)}
    rep = repeated_split_coverage(model, calib, test, levels, repeats=repeats)
    report["coverage"] = rep["mean"]
    report["coverage_repeats"] = {k: v for k, v in rep.items() if k != "mean"}
    report["interval_width"] = {str(lv): float(np.mean(pis[:, 1, i] - pis[:, 0, i])) for i, lv in enumerate(levels)}
    # the instability-risk head is bounded from above only (branch scoring is pessimistic about risk)
    risk_cal = calibrate(model, calib, levels, "instability_risk")
    okr = _finite_rows(test, "instability_risk")
    _, rpis = risk_cal.predict_interval(test.features()[okr])
    yr = test.instability_risk[okr].astype(np.float64)
    report["risk_upper_coverage"] = {str(lv): float(np.mean(yr <= rpis[:, 1, i])) for i, lv in enumerate(levels)}
    return report
