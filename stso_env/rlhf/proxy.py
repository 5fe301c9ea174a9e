"""A proxy of RLHF training dynamics, fitted on STSO-RLHF-v0 logs: expected return@N and value variance.

The branch method of Phase 2 asks, in a given state, what each intervention is worth over the next
few windows and how sure that is. This module answers from logged episodes
(``python -m agents.rlhf_evaluate --controllers explore --log-dir runs/rlhf_logs``), with no
pickled model: it fits in a second or two from the Parquet logs whenever it is needed.

Targets, for a logged step ``t`` with state ``s_t`` and action ``a_t``:

``return@N``        ``r_t + r_{t+1} + ... + r_{t+N-1}``, the env's own reward (gold progress minus
                    event and divergence penalties) over the next ``N`` windows of *act, then hold*:
                    only rows whose next ``N - 1`` logged actions are the neutral one count, so the
                    target is the value of exactly the plan the branch method scores. An episode
                    that diverges sooner contributes the shorter sum, penalty included; a row cut
                    by the time limit before ``N`` windows is dropped.
``value variance``  ``Var[return@N | s, a]``: the spread of that return between runs (sampling,
                    reward noise, the run's own chaos), estimated by regressing the squared
                    out-of-bag residual of the mean model.

Model: scikit-learn random forests over the 29 observation entries and a one-hot of the action
(18 entries): one for the mean (its out-of-bag predictions give honest residuals), one for the
log squared residual. Bounds: MAPIE's split conformal regressor (prefit) with the residual-normalised
score ``|y - mu| / sigma``, ``sigma = sqrt(value variance)``, calibrated on *whole episodes* held out
from the forests (rows of one episode are correlated; a row split would under-cover), so the bound
of a candidate widens where the variance head expects a noisy outcome.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from mapie.conformity_scores import ResidualNormalisedScore
from mapie.regression import SplitConformalRegressor
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.ensemble import RandomForestRegressor

from stso_env.envs.rlhf_env import ACTION_NVEC, NEUTRAL_ACTION
from stso_env.errors import ConfigError, DataError
from stso_env.proxy.logdb import read_log_db
from stso_env.rlhf.monitor import OBSERVATION_NAMES

LEVELS: tuple[float, ...] = (0.8, 0.9)
#: windows of return@N, chosen on the horizon sweep of ``agents.train_proxy --env STSO-RLHF-v0`` (grouped
#: cross-validation on the explore logs; assets/results/rlhf_proxy/report.md): short horizons are mostly
#: probe noise, long ones leave few act-then-hold rows
DEFAULT_HORIZON = 4
_VAR_FLOOR = 1e-4  # return units squared: a gold change of 0.001 on the reward's x10 scale


def action_one_hot(actions: np.ndarray) -> np.ndarray:
    """``(n, 6)`` MultiDiscrete actions as ``(n, 18)`` one-hot rows."""
    a = np.asarray(actions, dtype=np.int64).reshape(-1, len(ACTION_NVEC))
    out = np.zeros((len(a), sum(ACTION_NVEC)), dtype=np.float32)
    off = 0
    for d, n in enumerate(ACTION_NVEC):
        if (a[:, d] < 0).any() or (a[:, d] >= n).any():
            raise ConfigError(f"action dimension {d}: choices are 0..{n - 1}, got {sorted(set(a[:, d].tolist()))}")
        out[np.arange(len(a)), off + a[:, d]] = 1.0
        off += n
    return out


def all_actions() -> np.ndarray:
    """Every MultiDiscrete action (648 rows), in lexicographic order."""
    grids = np.meshgrid(*[np.arange(n) for n in ACTION_NVEC], indexing="ij")
    return np.stack([g.ravel() for g in grids], axis=1)


@dataclass
class ReturnRows:
    """Rows of (state, action) with their return@N, grouped by episode."""

    state: np.ndarray      # (n, 29)
    action: np.ndarray     # (n, 6)
    ret: np.ndarray        # (n,)
    episode: np.ndarray    # (n,) episode keys "run_id/episode"
    horizon: int = 1       # N of return@N

    def __len__(self) -> int:
        return len(self.ret)

    def features(self) -> np.ndarray:
        return np.concatenate([self.state, action_one_hot(self.action)], axis=1).astype(np.float64)

    def subset(self, mask: np.ndarray) -> ReturnRows:
        return ReturnRows(self.state[mask], self.action[mask], self.ret[mask], self.episode[mask], self.horizon)


def return_rows(table: pa.Table, horizon: int) -> ReturnRows:
    """The return@``horizon`` rows of a log table (module docstring: act, then hold)."""
    if horizon < 1:
        raise ConfigError(f"horizon: need at least 1 window, got {horizon}")
    missing = {"run_id", "episode", "env_step", "state", "action", "reward", "terminated"} - set(table.column_names)
    if missing:
        raise DataError(f"RLHF log table lacks columns {sorted(missing)}; is it an STSO-RLHF-v0 log_db.parquet?")
    df = table.select(["run_id", "episode", "env_step", "state", "action", "reward", "terminated"]).to_pandas()
    states, actions, rets, keys = [], [], [], []
    for (run, ep), g in df.groupby(["run_id", "episode"], sort=True):
        g = g.sort_values("env_step")
        acts = [tuple(int(x) for x in a) for a in g["action"]]
        rew = g["reward"].to_numpy(dtype=np.float64)
        term = g["terminated"].to_numpy(dtype=bool)
        st = list(g["state"])
        for t in range(len(g)):
            end = min(t + horizon, len(g))
            if end - t < horizon and not term[end - 1]:
                continue  # cut by the time limit (or the log) before N windows
            if any(acts[k] != NEUTRAL_ACTION for k in range(t + 1, end)):
                continue  # not "act, then hold"
            states.append(np.asarray(st[t], dtype=np.float32))
            actions.append(acts[t])
            rets.append(float(rew[t:end].sum()))
            keys.append(f"{run}/{ep}")
    if not rets:
        raise DataError(f"no return@{horizon} rows in the logs: log more episodes, with the neutral action most "
                        "of the time (--controllers explore)")
    width = len(OBSERVATION_NAMES)
    state = np.stack(states)
    if state.shape[1] != width:
        raise DataError(f"logged states have {state.shape[1]} entries, STSO-RLHF-v0 has {width}")
    return ReturnRows(state, np.asarray(actions, dtype=np.int64), np.asarray(rets), np.asarray(keys), horizon)


def read_rlhf_logs(root: str | Path) -> pa.Table:
    """Every ``log_db.parquet`` under ``root`` (a run folder or a folder of them), as one table."""
    root = Path(root)
    dbs = sorted(root.glob("**/log_db.parquet")) if root.name != "log_db.parquet" else [root]
    if not dbs:
        raise DataError(f"{root}: no log_db.parquet folders here; collect episodes with "
                        "python -m agents.rlhf_evaluate --controllers explore --log-dir " + str(root))
    return pa.concat_tables([read_log_db(p) for p in dbs], promote_options="permissive")


def split_episodes(keys: np.ndarray, shares: tuple[float, float] = (0.6, 0.2)) -> np.ndarray:
    """0 (train), 1 (calibration) or 2 (test) per row, by a hash of its episode key (stable across runs)."""
    u = np.array([int(hashlib.sha256(k.encode()).hexdigest()[:8], 16) / 16**8 for k in keys])
    return np.where(u < shares[0], 0, np.where(u < shares[0] + shares[1], 1, 2))


def _mean_forest(trees: int, seed: int) -> RandomForestRegressor:
    return RandomForestRegressor(n_estimators=trees, min_samples_leaf=3, max_features=0.5, oob_score=True,
                                 random_state=seed, n_jobs=1)


def cross_validate(rows: ReturnRows, folds: int = 5, trees: int = 200, seed: int = 0) -> dict[str, float]:
    """Grouped k-fold (whole episodes) out-of-fold predictions of the mean forest: Spearman with the realised
    return, MAE, and the MAE of the training folds' mean (a model without skill scores about that)."""
    from scipy.stats import spearmanr
    from sklearn.model_selection import GroupKFold

    X, y = rows.features(), rows.ret
    folds = min(folds, len(set(rows.episode.tolist())))
    if folds < 2:
        raise DataError("cross_validate: need rows from at least two episodes")
    pred, const = np.zeros_like(y), np.zeros_like(y)
    for tr, te in GroupKFold(folds).split(X, y, rows.episode):
        pred[te] = _mean_forest(trees, seed).fit(X[tr], y[tr]).predict(X[te])
        const[te] = y[tr].mean()
    return {"rows": int(len(y)), "spearman": float(spearmanr(pred, y).statistic),
            "mae": float(np.mean(np.abs(pred - y))), "mae_constant": float(np.mean(np.abs(const - y)))}


class _Prefit(RegressorMixin, BaseEstimator):
    """A fitted callable seen by MAPIE as a prefit scikit-learn regressor."""

    def __init__(self, fn: Any = None) -> None:
        self.fn = fn
        if fn is not None:
            self.fitted_ = True  # what MAPIE's fitted check looks for on a prefit estimator

    def __sklearn_is_fitted__(self) -> bool:
        return self.fn is not None

    def fit(self, X: np.ndarray, y: np.ndarray | None = None) -> _Prefit:
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.fn(np.asarray(X, dtype=np.float64))


class RLHFProxy:
    """Expected return@N, value variance and conformal bounds of (state, action) pairs.

    ``RLHFProxy.from_logs(root, horizon=4)`` fits on the episodes of split 0 and calibrates on split 1
    (:func:`split_episodes`); split 2 is left for :meth:`evaluate`.
    """

    def __init__(self, horizon: int = DEFAULT_HORIZON, trees: int = 200, seed: int = 0) -> None:
        self.horizon, self.trees, self.seed = horizon, trees, seed
        self.mean_forest: RandomForestRegressor | None = None
        self.var_forest: RandomForestRegressor | None = None
        self.conformal: SplitConformalRegressor | None = None
        self.rows: dict[str, int] = {}

    @classmethod
    def from_logs(cls, root: str | Path, horizon: int = DEFAULT_HORIZON, trees: int = 200, seed: int = 0) -> RLHFProxy:
        return cls.from_rows(return_rows(read_rlhf_logs(root), horizon), trees, seed)

    @classmethod
    def from_rows(cls, rows: ReturnRows, trees: int = 200, seed: int = 0) -> RLHFProxy:
        """:meth:`from_logs` on rows already read (their horizon is the proxy's)."""
        split = split_episodes(rows.episode)
        proxy = cls(rows.horizon, trees, seed)
        proxy.fit(rows.subset(split == 0), rows.subset(split == 1))
        proxy.rows["test"] = int((split == 2).sum())
        return proxy

    def fit(self, train: ReturnRows, calib: ReturnRows) -> RLHFProxy:
        """Fit both forests on ``train`` and the conformal bounds on ``calib`` (other episodes)."""
        if len(train) < 20 or len(calib) < 10:
            raise DataError(f"RLHF proxy: {len(train)} training and {len(calib)} calibration rows; need at least "
                            "20 and 10 (collect more episodes)")
        X, y = train.features(), train.ret
        self.mean_forest = _mean_forest(self.trees, self.seed).fit(X, y)
        self.train_mean = float(np.mean(y))
        resid2 = (y - self.mean_forest.oob_prediction_) ** 2
        self.var_forest = RandomForestRegressor(n_estimators=self.trees, min_samples_leaf=5, max_features=0.5,
                                                random_state=self.seed + 1, n_jobs=1)
        self.var_forest.fit(X, np.log(resid2 + _VAR_FLOOR))
        self.conformal = SplitConformalRegressor(
            _Prefit(self.mean_forest.predict), confidence_level=list(LEVELS), prefit=True,
            conformity_score=ResidualNormalisedScore(residual_estimator=_Prefit(self._sigma), prefit=True))
        self.conformal.conformalize(calib.features(), calib.ret)
        self.rows.update(train=len(train), calibration=len(calib))
        return self

    def _sigma(self, X: np.ndarray) -> np.ndarray:
        return np.sqrt(np.exp(self.var_forest.predict(X)))

    def predict(self, state: np.ndarray, actions: np.ndarray, level: float = 0.8) -> dict[str, np.ndarray]:
        """For one state and ``(k, 6)`` actions: ``mean``, ``variance``, and the two-sided ``level`` interval
        ``lower`` / ``upper`` (so ``lower`` is a one-sided ``(1 + level) / 2`` bound)."""
        if self.conformal is None:
            raise RuntimeError("RLHFProxy.predict() before fit()")
        if level not in LEVELS:
            raise ConfigError(f"level: calibrated levels are {LEVELS}, got {level!r}")
        actions = np.asarray(actions, dtype=np.int64).reshape(-1, len(ACTION_NVEC))
        state = np.broadcast_to(np.asarray(state, dtype=np.float32).reshape(1, -1),
                                (len(actions), len(OBSERVATION_NAMES)))
        X = np.concatenate([state, action_one_hot(actions)], axis=1).astype(np.float64)
        _, intervals = self.conformal.predict_interval(X)
        i = LEVELS.index(level)
        return {"mean": self.mean_forest.predict(X), "variance": self._sigma(X) ** 2,
                "lower": intervals[:, 0, i], "upper": intervals[:, 1, i]}

    def evaluate(self, test: ReturnRows) -> dict[str, Any]:
        """Held-out episodes: interval coverage per level, rank correlation of the mean with the realised
        return, and whether the value variance matches the squared errors (ratio near 1)."""
        from scipy.stats import spearmanr

        X, y = test.features(), test.ret
        mean = self.mean_forest.predict(X)
        var = self._sigma(X) ** 2
        _, intervals = self.conformal.predict_interval(X)
        cover = {f"{lv:.0%}": float(np.mean((y >= intervals[:, 0, i]) & (y <= intervals[:, 1, i])))
                 for i, lv in enumerate(LEVELS)}
        neutral = (test.action == np.array(NEUTRAL_ACTION)).all(axis=1)
        return {"rows": len(test), "episodes": len(set(test.episode.tolist())), "coverage": cover,
                "spearman": float(spearmanr(mean, y).statistic), "mae": float(np.mean(np.abs(y - mean))),
                "mae_constant": float(np.mean(np.abs(y - self.train_mean))),
                "variance_ratio": float(np.mean((y - mean) ** 2) / np.mean(var)),
                "neutral_rows": int(neutral.sum())}
