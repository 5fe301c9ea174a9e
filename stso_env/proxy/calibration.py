"""Locally adaptive split-conformal intervals for the proxy's ``loss_at_n`` and ``instability_risk``.

References (keys in ``assets/related_work.md``): 2005_Vovk_ConformalPrediction,
2018_Lei_SplitConformal (split conformal, and its locally weighted / normalised
residual score), 2008_Papadopoulos_NormalizedConformal (residuals normalised by a
per-example difficulty estimate), 2017_Lakshminarayanan_DeepEnsembles (the ensemble
spread used as that estimate), 2022_Taquet_MAPIE (the implementation).

MAPIE 1.6's :class:`~mapie.regression.SplitConformalRegressor` (``prefit=True``)
wraps the trained ensemble through :class:`LossRegressor`, a minimal
scikit-learn-style estimator. Log rows of one trajectory are strongly
correlated in time, so the calibration set must be *whole runs* held out from
training, and coverage is checked on yet other runs; a row-level split would
make the residuals look smaller than they are on a new run and under-cover.

Conformity score. With MAPIE's default absolute residual ``|y - mu|`` every
candidate gets the same ``mu + q``: the bound never changes a ranking, and the
ensemble's disagreement about a candidate is thrown away. We use MAPIE's
:class:`~mapie.conformity_scores.ResidualNormalisedScore` instead, score
``|y - mu(X)| / r(X)`` with a *prefit* residual estimator :class:`SpreadRegressor`
whose ``r(X) = sigma(X) + floor``: ``sigma`` is the ensemble's spread (std across
members) of the same head, and ``floor = floor_frac * median(sigma on the
calibration rows)`` (at least :data:`MIN_FLOOR`) keeps the score finite and
stable where the members happen to agree. MAPIE then forms ``mu(X) +- q * r(X)``
(``ResidualNormalisedScore.get_estimation_distribution`` with ``prefit=True``
multiplies the score quantile by ``r(X)`` as returned; only a *non*-prefit
residual model is exponentiated), with ``q`` the finite-sample-corrected
``level``-quantile of the calibration scores. Marginal coverage keeps the split
conformal guarantee (the score is any fixed function of ``X`` and ``y``); the
widths now follow each candidate's own uncertainty, so two candidates with the
same mean but different spread get different upper bounds.

:class:`ConformalBounds` keeps exactly those numbers (``calibration.json`` next
to the proxy's weights, plain JSON), so a saved proxy carries its calibration
without pickling the MAPIE object; :func:`conformal_bounds` checks on the
calibration rows that they reproduce MAPIE's ``predict_interval``. Files written
before the normalised score (no ``format_version``) still load, as
absolute-residual bounds ``mean + q``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from mapie.conformity_scores import ResidualNormalisedScore
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
#: ``calibration.json`` layout written by :meth:`ConformalBounds.save` (files without the field are version 1)
CALIBRATION_FORMAT_VERSION = 2

#: conformity score ``|y - mu|``: interval ``mu +- q`` (MAPIE's default; the only kind in format-1 files)
SCORE_ABSOLUTE = "absolute_residual"
#: conformity score ``|y - mu| / (sigma + floor)``: interval ``mu +- q * (sigma + floor)``
SCORE_NORMALISED = "residual_normalised"
SCORES: tuple[str, ...] = (SCORE_ABSOLUTE, SCORE_NORMALISED)

#: default floor of the residual scale, as a fraction of the median ensemble spread on the calibration rows
DEFAULT_FLOOR_FRAC = 0.1
#: absolute minimum of that floor (an ensemble whose members all agree would otherwise divide by ~0)
MIN_FLOOR = 1e-6


def _ensemble_predict(model: ProxyEnsemble | None, X: np.ndarray, owner: str) -> dict[str, np.ndarray]:
    """``model.predict`` on a flat ``ProxyDataset.features()`` matrix (state columns, then integer actions)."""
    if model is None:
        raise ConfigError(f"{owner}.model: no proxy model given")
    x = np.asarray(X, dtype=np.float32)
    s = model.state_dim
    width = s + len(model.nvec)
    if x.ndim != 2 or x.shape[1] != width:
        raise DataError(f"X: expected shape (n, {width}), got {x.shape}")
    return model.predict(x[:, :s], np.rint(x[:, s:]).astype(np.int64))


class _PrefitEnsembleView(RegressorMixin, BaseEstimator):
    """What the two scikit-learn views of a trained ensemble share: they are fitted when they hold a
    model, take the :meth:`ProxyDataset.features` columns, and ``fit`` does nothing."""

    model: ProxyEnsemble | None

    @property
    def n_features_in_(self) -> int:
        if self.model is None:
            raise AttributeError("n_features_in_")
        return self.model.state_dim + len(self.model.nvec)

    def __sklearn_is_fitted__(self) -> bool:
        return self.model is not None

    def fit(self, X: np.ndarray, y: np.ndarray | None = None) -> _PrefitEnsembleView:
        """No-op (the ensemble is trained already)."""
        return self


class LossRegressor(_PrefitEnsembleView):
    """scikit-learn view of a trained :class:`ProxyEnsemble` predicting one head (``target``, default ``loss_at_n``).

    ``X`` is ``ProxyDataset.features()``: the state columns followed by the integer
    MultiDiscrete action columns. ``fit`` does nothing: the model is trained already.
    """

    def __init__(self, model: ProxyEnsemble | None = None, target: str = "loss_at_n") -> None:
        self.model = model
        self.target = target

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Ensemble-mean prediction of ``target`` for the rows of ``X``."""
        return _ensemble_predict(self.model, X, "LossRegressor")[self.target].astype(np.float64)


class SpreadRegressor(_PrefitEnsembleView):
    """Prefit residual-scale estimator for MAPIE's ``ResidualNormalisedScore``: ``r(X) = sigma(X) + floor``.

    ``sigma`` is the ensemble's spread (std across members, ``model.predict(...)[target + "_std"]``)
    of the head ``target``; ``floor`` (> 0, see :func:`spread_floor`) keeps ``r`` positive, so MAPIE
    never thresholds it (it warns on negative predictions of a prefit residual model). ``fit`` does
    nothing: the scale comes from the trained ensemble, not from residuals.
    """

    def __init__(self, model: ProxyEnsemble | None = None, target: str = "loss_at_n",
                 floor: float = MIN_FLOOR) -> None:
        self.model = model
        self.target = target
        self.floor = floor

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Residual scale ``sigma(X) + floor`` of ``target`` for the rows of ``X``."""
        if not (math.isfinite(float(self.floor)) and float(self.floor) > 0.0):
            raise ConfigError(f"SpreadRegressor.floor: must be a finite number > 0, got {self.floor!r}")
        std = _ensemble_predict(self.model, X, "SpreadRegressor")[self.target + "_std"].astype(np.float64)
        return std + float(self.floor)


def spread_floor(std: np.ndarray, floor_frac: float = DEFAULT_FLOOR_FRAC) -> float:
    """Floor of the residual scale: ``floor_frac * median(std)``, at least :data:`MIN_FLOOR`.

    ``std`` is the ensemble spread on the calibration rows. Relative to the median so the
    floor has the head's units and matters only where members agree far more than usual.
    """
    if isinstance(floor_frac, bool) or not isinstance(floor_frac, (int, float)) or not (
            math.isfinite(floor_frac) and floor_frac > 0.0):
        raise ConfigError(f"floor_frac: must be a finite number > 0 (fraction of the median ensemble spread), "
                          f"got {floor_frac!r}")
    s = np.asarray(std, dtype=np.float64)
    if s.size == 0 or not np.isfinite(s).all() or (s < 0).any():
        raise DataError("ensemble spread on the calibration rows: empty, negative or non-finite; the proxy "
                        "predicts NaN/inf there; retrain it with agents.train_proxy")
    return max(float(floor_frac) * float(np.median(s)), MIN_FLOOR)


def _finite_rows(ds: ProxyDataset, target: str = "loss_at_n") -> np.ndarray:
    return np.isfinite(getattr(ds, target))


def _check_enough_rows(n: int, levels: tuple[float, ...]) -> None:
    # split conformal needs more than 1/(1-level) scores for its highest level (20 for 0.95)
    need = max(2, math.floor(1.0 / (1.0 - max(levels)) + 1e-9) + 1)
    if n < need:
        raise DataError(f"calibration set: {int(n)} usable rows; conformal level {max(levels)} needs at "
                        f"least {need}; collect more or longer episodes, or raise the calibration fraction")


def _split_conformal(mean_est: RegressorMixin, scale_est: RegressorMixin | None, X: np.ndarray, y: np.ndarray,
                     levels: tuple[float, ...]) -> SplitConformalRegressor:
    """MAPIE split conformal with the prefit ``mean_est``; residual-normalised by ``scale_est``, else absolute."""
    # prefit residual estimator: MAPIE uses r(X) as returned (no log/exp, no split of the calibration rows)
    conformity: Any = ("absolute" if scale_est is None
                       else ResidualNormalisedScore(residual_estimator=scale_est, prefit=True))
    reg = SplitConformalRegressor(mean_est, confidence_level=list(levels), conformity_score=conformity, prefit=True)
    reg.conformalize(X, y)
    return reg


class _TableHead(RegressorMixin, BaseEstimator):
    """Precomputed per-row values looked up by the row index in ``X[:, 0]``.

    :func:`repeated_split_coverage` re-calibrates on a hundred re-partitions of the same
    rows; with this stand-in for :class:`LossRegressor` / :class:`SpreadRegressor` the
    ensemble runs once on the pooled rows instead of six times per re-partition, and
    MAPIE still computes the scores, quantiles and intervals.
    """

    n_features_in_ = 1  # the row index

    def __init__(self, values: np.ndarray | None = None) -> None:
        self.values = values

    def __sklearn_is_fitted__(self) -> bool:
        return self.values is not None

    def fit(self, X: np.ndarray, y: np.ndarray | None = None) -> _TableHead:
        """No-op (the values are precomputed)."""
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        """The stored values of the rows whose indices are ``X[:, 0]``."""
        if self.values is None:
            raise ConfigError("_TableHead.values: no precomputed values given")
        idx = np.rint(np.asarray(X, dtype=np.float64)[:, 0]).astype(np.int64)
        return np.asarray(self.values, dtype=np.float64)[idx]


def _calibrate(model: ProxyEnsemble, calib: ProxyDataset, levels: tuple[float, ...], target: str,
               score: str, floor_frac: float) -> tuple[SplitConformalRegressor, SpreadRegressor | None]:
    """:func:`calibrate`, also returning the residual-scale estimator (None for the absolute score)."""
    if target not in CONFORMAL_TARGETS:
        raise ConfigError(f"target: {target!r} has no conformal bound; choose one of {CONFORMAL_TARGETS}")
    if score not in SCORES:
        raise ConfigError(f"score: {score!r} is not a conformity score here; choose one of {SCORES}")
    ok = _finite_rows(calib, target)
    _check_enough_rows(int(ok.sum()), levels)
    spread: SpreadRegressor | None = None
    if score == SCORE_NORMALISED:
        floor = spread_floor(model.predict(calib.state[ok], calib.action[ok])[target + "_std"], floor_frac)
        spread = SpreadRegressor(model, target, floor)
    reg = _split_conformal(LossRegressor(model, target), spread, calib.features()[ok],
                           getattr(calib, target)[ok].astype(np.float64), levels)
    return reg, spread


def calibrate(model: ProxyEnsemble, calib: ProxyDataset, levels: tuple[float, ...] = CONFIDENCE_LEVELS,
              target: str = "loss_at_n", score: str = SCORE_NORMALISED,
              floor_frac: float = DEFAULT_FLOOR_FRAC) -> SplitConformalRegressor:
    """Conformalize ``model``'s ``target`` head on ``calib`` (whole held-out runs).

    ``score`` is :data:`SCORE_NORMALISED` (default: intervals ``mu +- q * (sigma + floor)`` that
    follow each row's ensemble spread, see the module docstring) or :data:`SCORE_ABSOLUTE`
    (``mu +- q``, one width for all rows; kept for comparison). ``floor_frac`` sets the floor of
    the residual scale as a fraction of the median spread on ``calib`` (normalised score only).
    """
    return _calibrate(model, calib, levels, target, score, floor_frac)[0]


def _match_level(table: dict[str, float], level: float) -> float | None:
    for key, q in table.items():
        if math.isclose(float(key), float(level), abs_tol=1e-9):
            return float(q)
    return None


@dataclass
class ConformalBounds:
    """Stored split-conformal quantiles per head: an upper bound without keeping the MAPIE object.

    ``quantiles[target][str(level)] = q``; ``scores[target]`` is the conformity score it was
    calibrated with and ``floors[target]`` the residual-scale floor of a normalised score:

    - :data:`SCORE_NORMALISED`: upper bound ``mean + q * (std + floor)``, ``std`` the ensemble
      spread of the same candidates (``model.predict(...)[target + "_std"]``);
    - :data:`SCORE_ABSOLUTE`: upper bound ``mean + q`` (``std`` ignored). A target missing from
      ``scores`` has this score: that is what ``calibration.json`` files without a
      ``format_version`` (written before the normalised score) and ``ConformalBounds(quantiles)``
      mean.

    Built by :func:`conformal_bounds`, saved as ``calibration.json`` in the proxy folder.
    """

    quantiles: dict[str, dict[str, float]]
    n_calib: int = 0
    scores: dict[str, str] = field(default_factory=dict)
    floors: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        extra = (set(self.scores) | set(self.floors)) - set(self.quantiles)
        if extra:
            raise ConfigError(f"conformal bounds: scores/floors given for {sorted(extra)} without quantiles; "
                              f"add their quantiles or drop them (calibrated: {sorted(self.quantiles)})")
        self.scores = {t: self.scores.get(t, SCORE_ABSOLUTE) for t in self.quantiles}
        for t, kind in self.scores.items():
            if kind not in SCORES:
                raise ConfigError(f"conformal bounds scores[{t!r}]: {kind!r} is unknown; choose one of {SCORES}")
            if kind == SCORE_NORMALISED:
                f = self.floors.get(t)
                if f is None or not (math.isfinite(float(f)) and float(f) > 0.0):
                    raise ConfigError(f"conformal bounds floors[{t!r}]: the {SCORE_NORMALISED} score needs a "
                                      f"finite floor > 0, got {f!r}; recalibrate with conformal_bounds")
            elif t in self.floors:
                raise ConfigError(f"conformal bounds floors[{t!r}]: the {SCORE_ABSOLUTE} score has no floor; "
                                  "drop it")
        self.floors = {t: float(v) for t, v in self.floors.items()}

    def has(self, target: str) -> bool:
        return target in self.quantiles

    def score(self, target: str) -> str:
        """The conformity score ``target`` was calibrated with (:data:`SCORES`)."""
        if target not in self.quantiles:
            raise ConfigError(f"conformal bounds: {target!r} was not calibrated (have {sorted(self.quantiles)})")
        return self.scores[target]

    def upper(self, target: str, mean: np.ndarray, level: float, std: np.ndarray | None = None) -> np.ndarray:
        """Upper end of the ``level`` interval of ``target`` for candidates with ensemble ``mean`` and ``std``.

        ``std`` (same shape as ``mean``: the ensemble spread ``model.predict(...)[target + "_std"]``
        of the same candidates) is required for the normalised score, where the bound is
        ``mean + q * (std + floor)``; absolute-residual bounds (older files) return ``mean + q``
        and ignore it.
        """
        return np.asarray(mean, dtype=np.float64) + self._half_width(target, mean, level, std, "upper")

    def lower(self, target: str, mean: np.ndarray, level: float, std: np.ndarray | None = None) -> np.ndarray:
        """Lower end of the same interval as :meth:`upper`: ``mean - q * (std + floor)`` (``mean - q``
        for absolute-residual bounds); the interval is symmetric about the ensemble mean, as MAPIE's."""
        return np.asarray(mean, dtype=np.float64) - self._half_width(target, mean, level, std, "lower")

    def _half_width(self, target: str, mean: np.ndarray, level: float, std: np.ndarray | None,
                    end: str) -> np.ndarray:
        kind = self.score(target)
        q = _match_level(self.quantiles[target], level)
        if q is None:
            raise ConfigError(f"conformal level {level} of {target!r} was not calibrated; choose one of "
                              f"{sorted(self.quantiles[target])}")
        m = np.asarray(mean, dtype=np.float64)
        if kind == SCORE_ABSOLUTE:
            return np.full_like(m, q)
        if std is None:
            raise ConfigError(f"ConformalBounds.{end} std: the {target!r} bounds use the {SCORE_NORMALISED} score "
                              f"and need the ensemble spread of the same candidates; pass "
                              f"std=model.predict(...)[{target + '_std'!r}]")
        s = np.asarray(std, dtype=np.float64)
        if s.shape != m.shape:
            raise DataError(f"ConformalBounds.{end} std: shape {s.shape} differs from mean's {m.shape}; pass one "
                            "spread per candidate")
        if (s < 0).any():
            raise DataError(f"ConformalBounds.{end} std: negative spread for {target!r}; pass the ensemble std "
                            f"({target}_std), not a signed difference")
        return q * (s + self.floors[target])

    def save(self, directory: str | Path) -> Path:
        """Write ``calibration.json`` (layout version :data:`CALIBRATION_FORMAT_VERSION`) into ``directory``."""
        path = Path(directory) / CALIBRATION_FILE
        kinds = sorted(set(self.scores.values()))
        targets: dict[str, Any] = {}
        for t, table in self.quantiles.items():
            entry: dict[str, Any] = {"score": self.scores[t], "quantiles": dict(table)}
            if t in self.floors:
                entry["floor"] = self.floors[t]
            targets[t] = entry
        doc = {"format_version": CALIBRATION_FORMAT_VERSION,
               "score": kinds[0] if len(kinds) == 1 else "mixed",
               "upper": {SCORE_NORMALISED: "mean + q * (std + floor)", SCORE_ABSOLUTE: "mean + q"},
               "calibrated_with": "MAPIE SplitConformalRegressor (prefit), split conformal on held-out runs",
               "n_calib": self.n_calib, "targets": targets}
        write_text_atomic(path, json.dumps(doc, indent=1))
        return path

    @classmethod
    def load(cls, directory: str | Path) -> ConformalBounds | None:
        """The bounds saved in ``directory``, or None when the proxy was saved without them.

        Reads format 2 (per-target score, floor and quantiles) and the older format without a
        ``format_version`` (absolute-residual quantiles only), whose bounds stay ``mean + q``.
        """
        path = Path(directory) / CALIBRATION_FILE
        if not path.is_file():
            return None
        retrain = "retrain the proxy with agents.train_proxy"
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            version = doc.get("format_version", 1)
            if version == 1:  # written before the normalised score: absolute residual, mean + q
                quantiles = {str(t): {str(k): float(v) for k, v in table.items()}
                             for t, table in doc["quantiles"].items()}
                scores: dict[str, str] = {}
                floors: dict[str, float] = {}
            elif version == CALIBRATION_FORMAT_VERSION:
                targets = doc["targets"]
                quantiles = {str(t): {str(k): float(v) for k, v in e["quantiles"].items()} for t, e in targets.items()}
                scores = {str(t): str(e["score"]) for t, e in targets.items()}
                floors = {str(t): float(e["floor"]) for t, e in targets.items() if e.get("floor") is not None}
            else:
                raise DataError(f"{path}: format_version {version!r} is not readable here (this code reads 1 and "
                                f"{CALIBRATION_FORMAT_VERSION}); update STSO or {retrain}")
            n_calib = int(doc.get("n_calib", 0))
        except DataError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise DataError(f"{path}: not a calibration file ({exc!r}); {retrain}") from None
        try:
            return cls(quantiles=quantiles, n_calib=n_calib, scores=scores, floors=floors)
        except ConfigError as exc:
            raise DataError(f"{path}: not a calibration file ({exc}); {retrain}") from None


def conformal_bounds(model: ProxyEnsemble, calib: ProxyDataset, levels: tuple[float, ...] = CONFIDENCE_LEVELS,
                     score: str = SCORE_NORMALISED, floor_frac: float = DEFAULT_FLOOR_FRAC) -> ConformalBounds:
    """Calibrate every head in :data:`CONFORMAL_TARGETS` on ``calib`` and keep score, floor and quantiles.

    The stored numbers must reproduce MAPIE's ``predict_interval`` on every calibration row
    (upper end ``mean + q * r``, lower end ``mean - q * r``, ``r = std + floor`` or 1); a
    mismatch means MAPIE formed the interval differently (another version or score) and raises
    instead of saving bounds that disagree with the calibrator.
    """
    quantiles: dict[str, dict[str, float]] = {}
    scores: dict[str, str] = {}
    floors: dict[str, float] = {}
    intervals: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for target in CONFORMAL_TARGETS:
        reg, spread = _calibrate(model, calib, levels, target, score, floor_frac)
        ok = _finite_rows(calib, target)
        x = calib.features()[ok]
        yhat, pis = reg.predict_interval(x)
        yhat = np.asarray(yhat, dtype=np.float64)
        scale = spread.predict(x) if spread is not None else np.ones(len(x))
        # q from the row with the largest scale: the division there loses the least precision
        j = int(np.argmax(scale))
        quantiles[target] = {str(lv): float((pis[j, 1, i] - yhat[j]) / scale[j]) for i, lv in enumerate(levels)}
        scores[target] = score
        if spread is not None:
            floors[target] = float(spread.floor)
        intervals[target] = (ok, np.asarray(pis, dtype=np.float64))
    bounds = ConformalBounds(quantiles=quantiles, n_calib=len(calib), scores=scores, floors=floors)
    # the stored numbers, applied as branch scoring applies them (model.predict's mean and std),
    # must give MAPIE's interval on every calibration row
    for target, (ok, pis) in intervals.items():
        pred = model.predict(calib.state[ok], calib.action[ok])
        mean = pred[target].astype(np.float64)
        for i, lv in enumerate(levels):
            up = bounds.upper(target, mean, lv, pred[target + "_std"])
            low = 2.0 * mean - up  # symmetric score: mean - q * r
            if not (np.allclose(up, pis[:, 1, i], rtol=1e-7, atol=1e-9)
                    and np.allclose(low, pis[:, 0, i], rtol=1e-7, atol=1e-9)):
                raise ConfigError(f"conformal bounds {target!r} at level {lv}: MAPIE's intervals are not "
                                  f"mean +- q * r(X) with the stored q and floor ({score}); the conformity score "
                                  "or MAPIE's interval formula changed; pin mapie 1.6 or adapt ConformalBounds")
    return bounds


def _level_index(calibrator: SplitConformalRegressor, level: float) -> int:
    # MAPIE 1.6 keeps the levels only as private miscoverage rates alpha = 1 - level
    levels = [round(1.0 - float(a), 9) for a in calibrator._alphas]
    for i, lv in enumerate(levels):
        if math.isclose(float(lv), float(level), abs_tol=1e-9):
            return i
    raise ConfigError(f"level: {level} was not calibrated; choose one of {levels}")


def conformal_upper(model: ProxyEnsemble, calibrator: SplitConformalRegressor, X: np.ndarray | ProxyDataset,
                    level: float = 0.9) -> np.ndarray:
    """Upper end of the conformal interval at ``level`` (a pessimistic loss for branch scoring).

    ``calibrator`` comes from :func:`calibrate` (by default the residual-normalised score, so the
    bound of each row is ``mean + q * (std + floor)`` with that row's ensemble spread; MAPIE
    computes the spread itself through :class:`SpreadRegressor`). ``X`` is a
    :meth:`ProxyDataset.features` matrix or a :class:`ProxyDataset`. ``model`` must be the
    ensemble the calibrator wraps (checked, so a retrained model is not paired with stale quantiles).
    """
    est = getattr(calibrator, "_estimator", None)
    if est is not None and getattr(est, "model", model) is not model:
        raise ConfigError("conformal_upper: the calibrator was fitted for another proxy model; recalibrate")
    spread = getattr(getattr(calibrator, "_conformity_score", None), "residual_estimator", None)
    if spread is not None and getattr(spread, "model", model) is not model:
        raise ConfigError("conformal_upper: the calibrator's residual scale comes from another proxy model; "
                          "recalibrate")
    feats = X.features() if isinstance(X, ProxyDataset) else np.asarray(X, dtype=np.float32)
    i = _level_index(calibrator, level)
    _, pis = calibrator.predict_interval(feats)
    return np.asarray(pis[:, 1, i], dtype=np.float64)


def _coverage(model: ProxyEnsemble, calib: ProxyDataset, test: ProxyDataset,
              levels: tuple[float, ...]) -> np.ndarray:
    """Empirical coverage of ``loss_at_n`` on ``test`` of (residual-normalised) intervals calibrated on ``calib``."""
    reg = calibrate(model, calib, levels)
    ok = _finite_rows(test)
    _, pis = reg.predict_interval(test.features()[ok])
    y = test.loss_at_n[ok].astype(np.float64)
    return np.array([np.mean((y >= pis[:, 0, i]) & (y <= pis[:, 1, i])) for i in range(len(levels))])


def _coverage_from_predictions(mean: np.ndarray, std: np.ndarray, y: np.ndarray, cal_rows: np.ndarray,
                               test_rows: np.ndarray, levels: tuple[float, ...],
                               floor_frac: float = DEFAULT_FLOOR_FRAC) -> np.ndarray:
    """:func:`_coverage` on precomputed ensemble ``mean`` / ``std`` (rows indexed into them), per level.

    The same procedure as :func:`calibrate` + ``predict_interval``: floor from the spread on
    the calibration rows, MAPIE's residual-normalised score with scale ``std + floor``.
    """
    _check_enough_rows(len(cal_rows), levels)
    floor = spread_floor(std[cal_rows], floor_frac)
    reg = _split_conformal(_TableHead(mean), _TableHead(std + floor), cal_rows[:, None].astype(np.float64),
                           y[cal_rows], levels)
    _, pis = reg.predict_interval(test_rows[:, None].astype(np.float64))
    yt = y[test_rows]
    return np.array([np.mean((yt >= pis[:, 0, i]) & (yt <= pis[:, 1, i])) for i in range(len(levels))])


def repeated_split_coverage(model: ProxyEnsemble, calib: ProxyDataset, test: ProxyDataset,
                            levels: tuple[float, ...] = CONFIDENCE_LEVELS, repeats: int = 100,
                            seed: int = 0) -> dict[str, Any]:
    """Coverage averaged over random run-level re-partitions of the held-out runs.

    Split conformal guarantees coverage *on average over the draw of the calibration
    runs*; one split with a dozen runs on each side scatters by several points around
    it because whole trajectories differ. The runs of ``calib`` and ``test`` (none
    used in training) are pooled and ``repeats`` times divided at random, by whole
    runs, into halves of the original sizes: calibrate on one (the residual-normalised
    score of :func:`calibrate`, its floor recomputed on each calibration half), measure
    on the other. The ensemble runs once on the pooled rows (see :class:`_TableHead`).
    Returns per level the mean coverage, its standard deviation over repeats, and the
    number of runs on each side.
    """
    pool_runs = np.concatenate([np.unique(calib.groups), np.unique(test.groups)])
    n_cal = len(np.unique(calib.groups))
    pooled = _concat(calib, test)
    groups = pooled.groups
    finite = _finite_rows(pooled)
    pred = model.predict(pooled.state, pooled.action)
    mean = pred["loss_at_n"].astype(np.float64)
    std = pred["loss_at_n_std"].astype(np.float64)
    y = pooled.loss_at_n.astype(np.float64)
    rng = np.random.default_rng(seed)
    cover = []
    for _ in range(repeats):
        perm = rng.permutation(pool_runs)
        cal_mask = np.isin(groups, perm[:n_cal])
        cal_rows, test_rows = np.flatnonzero(cal_mask & finite), np.flatnonzero(~cal_mask & finite)
        if len(test_rows) == 0:
            continue
        try:
            cover.append(_coverage_from_predictions(mean, std, y, cal_rows, test_rows, levels))
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
    (calibrated on ``calib``, measured on ``test``), ``coverage_repeats`` (spread and sizes),
    ``interval_width`` (mean width per level over the test rows), ``interval_width_std`` (the
    standard deviation of those widths across rows: zero would mean one width for all, as the
    absolute score gives), ``conformal_score`` and ``conformal_floor`` (the score and the
    floor of the ``loss_at_n`` residual scale), and ``risk_upper_coverage`` (one-sided, of the
    ``instability_risk`` upper bound). All intervals use the residual-normalised score.
    """
    if len(test) == 0:
        raise DataError("test set: empty; hold out runs of at least one seed for testing")
    calibrator, spread = _calibrate(model, calib, levels, "loss_at_n", SCORE_NORMALISED, DEFAULT_FLOOR_FRAC)
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
    widths = pis[:, 1, :] - pis[:, 0, :]
    report["interval_width"] = {str(lv): float(np.mean(widths[:, i])) for i, lv in enumerate(levels)}
    report["interval_width_std"] = {str(lv): float(np.std(widths[:, i])) for i, lv in enumerate(levels)}
    report["conformal_score"] = SCORE_NORMALISED
    report["conformal_floor"] = float(spread.floor) if spread is not None else None
    # the instability-risk head is bounded from above only (branch scoring is pessimistic about risk)
    risk_cal = calibrate(model, calib, levels, "instability_risk")
    okr = _finite_rows(test, "instability_risk")
    _, rpis = risk_cal.predict_interval(test.features()[okr])
    yr = test.instability_risk[okr].astype(np.float64)
    report["risk_upper_coverage"] = {str(lv): float(np.mean(yr <= rpis[:, 1, i])) for i, lv in enumerate(levels)}
    return report
