"""A loss@N head of the proxy made of trees on the state and a linear term in the plan.

``ProxyConfig.loss_model: trees`` replaces the MLP ensemble's loss head with :class:`TreeLossHead`:
extremely randomised trees (scikit-learn ``ExtraTreesRegressor``, bootstrapped) of the probe loss's change
over the horizon on the state alone, plus least squares of the trees' out-of-bag residual on the plan's
encoded action columns. The trees forecast where the run is heading; every difference between two plans
from one state is the linear term's. ``agents.proxy_baselines`` measured both halves on ``make train``'s
collection (its ``state trees + linear plan`` row): loss@N R² 0.846 against the MLP's 0.624 with the
effects of the LR changes ranked right, and ``agents.proxy_data_curve`` puts the same model above R² 0.9
from 32 collected runs on the rows a controller acts on.

Uncertainty per candidate (the ``loss_at_n_std`` that the conformal bounds normalise by): the spread of
the trees' predictions, which depends on the state, combined with the standard error of the linear term
at the candidate's plan (``sqrt(x' Cov x)`` with the least-squares covariance), which depends on the
plan: a plan the collection rarely tried gets a wider bound.

``ProxyConfig.divergence_model: trees`` likewise replaces the divergence logit with
:class:`TreeDivergenceHead`, trees of the 0/1 label on the state and the plan.

The fitted trees are stored as flat arrays (children, split feature and threshold, leaf value) in the
proxy's safetensors file and evaluated here in numpy, so loading a proxy never unpickles anything.
"""

from __future__ import annotations

from typing import Any, TypeVar

import numpy as np
import torch

from stso_env.errors import DataError

#: Trees of the head; leaves hold at least two rows (a few hundred logged windows per collection).
TREES = 200
MIN_SAMPLES_LEAF = 2
#: Key prefixes of the heads' arrays in ``proxy.safetensors``.
PREFIX = "loss_trees."
DIVERGENCE_PREFIX = "divergence_trees."
_FOREST_KEYS = ("left", "right", "feature", "threshold", "value", "roots")
_KEYS = (*_FOREST_KEYS, "coef", "cov")


_F = TypeVar("_F", bound="_StoredForest")


class _StoredForest:
    """What both tree heads share: the forest's flat arrays, their storage under the head's key prefix in
    ``proxy.safetensors`` (checked on load) and every tree's prediction by the numpy traversal."""

    #: key prefix in ``proxy.safetensors``, stored keys, the ``ProxyConfig`` setting and the name in errors
    prefix: str
    keys: tuple[str, ...]
    setting: str
    name: str

    def __init__(self, arrays: dict[str, np.ndarray] | None = None) -> None:
        self.arrays = arrays
        self._walk: dict[str, Any] | None = None  # traversal arrays derived from ``arrays`` on first use

    def _fitted(self) -> dict[str, np.ndarray]:
        if self.arrays is None:
            raise DataError(f"{self.name}: not fitted")
        return self.arrays

    def _per_tree(self, x: np.ndarray) -> np.ndarray:
        """Every tree's prediction ``(T, n)`` for rows ``x``."""
        if self._walk is None:
            self._walk = _walk_arrays(self._fitted())
        return _evaluate(self._walk, np.asarray(x, dtype=np.float32))

    def tensors(self) -> dict[str, torch.Tensor]:
        """The head's arrays under its key prefix, for the proxy's safetensors file."""
        return {self.prefix + k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in self._fitted().items()}

    @classmethod
    def from_tensors(cls: type[_F], tensors: dict[str, torch.Tensor], source: str) -> _F:
        """The head stored by :meth:`tensors`; a clear error naming ``source`` when arrays are missing, of
        different lengths or pointing outside the stored nodes."""
        prefix = cls.prefix
        missing = [k for k in cls.keys if prefix + k not in tensors]
        if missing:
            raise DataError(f"{source}: the proxy's config says {cls.setting} 'trees' but the arrays "
                            f"{[prefix + k for k in missing]} are missing; retrain the proxy")
        arrays = {k: tensors[prefix + k].numpy() for k in cls.keys}
        n = len(arrays["value"])
        for k in ("left", "right", "feature", "threshold"):
            if len(arrays[k]) != n:
                raise DataError(f"{source}: {prefix}{k} has {len(arrays[k])} nodes, {prefix}value {n}")
        kids = np.concatenate([arrays["left"], arrays["right"], arrays["roots"]])
        if kids.size and (kids.max() >= n or kids.min() < -1):
            raise DataError(f"{source}: {prefix}left/right/roots point outside the {n} stored nodes")
        return cls(arrays)


class TreeLossHead(_StoredForest):
    """Trees of the change on the state plus a linear plan term (module docstring)."""

    prefix, keys, setting, name = PREFIX, _KEYS, "loss_model", "tree loss head"

    # ---------------------------------------------------------------- fitting
    def fit(self, state: np.ndarray, plan: np.ndarray, change: np.ndarray, seed: int = 0) -> TreeLossHead:
        """Fit on ``state (n, S)``, encoded plan columns ``plan (n, P)`` and the change ``(n,)``."""
        from sklearn.ensemble import ExtraTreesRegressor

        s, p, y = (np.asarray(v, dtype=np.float64) for v in (state, plan, change))
        if len(y) < 3 or not (len(s) == len(p) == len(y)):
            raise DataError(f"tree loss head: needs at least 3 aligned rows, got {len(s)}, {len(p)}, {len(y)}")
        trees = ExtraTreesRegressor(TREES, min_samples_leaf=MIN_SAMPLES_LEAF, bootstrap=True, oob_score=True,
                                    n_jobs=1, random_state=seed).fit(s, y)
        oob = np.asarray(trees.oob_prediction_, dtype=np.float64)
        missing = ~np.isfinite(oob)  # a row every tree drew (rare): its in-bag forecast instead
        if missing.any():
            oob[missing] = trees.predict(s[missing])
        x1 = np.concatenate([np.ones((len(p), 1)), p], axis=1)
        coef, *_ = np.linalg.lstsq(x1, y - oob, rcond=None)
        resid = y - oob - x1 @ coef
        dof = max(1, len(y) - np.linalg.matrix_rank(x1))
        cov = float(resid @ resid) / dof * np.linalg.pinv(x1.T @ x1)
        self.arrays = {**_flatten(trees), "coef": coef, "cov": cov}
        self._walk = None
        return self

    # ---------------------------------------------------------------- prediction
    def predict(self, state: np.ndarray, plan: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(mean change, std)`` per row: the trees' mean plus the linear term, and the spread of the trees
        combined with the linear term's standard error at the row's plan."""
        a = self._fitted()
        per_tree = self._per_tree(state)  # (T, n)
        x1 = np.concatenate([np.ones((len(plan), 1)), np.asarray(plan, dtype=np.float64)], axis=1)
        if x1.shape[1] != len(a["coef"]):
            raise DataError(f"tree loss head: plans have {x1.shape[1] - 1} columns, fitted on {len(a['coef']) - 1}")
        linear = x1 @ a["coef"]
        se2 = np.einsum("ij,jk,ik->i", x1, a["cov"], x1)
        std = np.sqrt(per_tree.var(0) + np.clip(se2, 0.0, None))
        return per_tree.mean(0) + linear, std


class TreeDivergenceHead(_StoredForest):
    """``ProxyConfig.divergence_model: trees``: the probability that the run diverges within the horizon as
    the mean of extremely randomised regression trees (scikit-learn ``ExtraTreesRegressor``) of the 0/1 label
    on the state and the plan's encoded columns, with the trees' spread as its uncertainty; stored and
    evaluated like :class:`TreeLossHead`. On folds of 96 collected ``unstable`` runs it scores "diverges
    within the horizon" above the MLP's logit when the collection holds few runs (AUROC 0.797 against 0.677
    from 16) and no better from many (0.843 against 0.853 from 72;
    ``assets/results/proxy_data_curve_unstable_trees``)."""

    prefix, keys, setting, name = DIVERGENCE_PREFIX, _FOREST_KEYS, "divergence_model", "tree divergence head"

    def fit(self, inputs: np.ndarray, label: np.ndarray, seed: int = 0) -> TreeDivergenceHead:
        """Fit on ``inputs (n, S + P)`` (state, then encoded plan) and the 0/1 ``label (n,)``."""
        from sklearn.ensemble import ExtraTreesRegressor

        x, y = np.asarray(inputs, dtype=np.float64), np.asarray(label, dtype=np.float64)
        if len(y) < 3 or len(x) != len(y):
            raise DataError(f"tree divergence head: needs at least 3 aligned rows, got {len(x)} and {len(y)}")
        if not np.isin(y, (0.0, 1.0)).all():
            raise DataError("tree divergence head: the label must be 0 or 1")
        trees = ExtraTreesRegressor(TREES, min_samples_leaf=MIN_SAMPLES_LEAF, n_jobs=1, random_state=seed).fit(x, y)
        self.arrays, self._walk = _flatten(trees), None
        return self

    def predict(self, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(probability, spread over the trees)`` per row."""
        per_tree = self._per_tree(inputs)
        return np.clip(per_tree.mean(0), 0.0, 1.0), per_tree.std(0)


def _flatten(forest: Any) -> dict[str, np.ndarray]:
    """Every tree's node arrays concatenated, child indices made global (-1: a leaf)."""
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("left", "right", "feature", "threshold", "value")}
    roots, offset = [], 0
    for est in forest.estimators_:
        t = est.tree_
        roots.append(offset)
        leaf = t.children_left < 0
        parts["left"].append(np.where(leaf, -1, t.children_left + offset))
        parts["right"].append(np.where(leaf, -1, t.children_right + offset))
        parts["feature"].append(np.where(leaf, 0, t.feature))
        parts["threshold"].append(t.threshold)
        parts["value"].append(t.value[:, 0, 0])
        offset += t.node_count
    out = {k: np.concatenate(v) for k, v in parts.items()}
    out = {"left": out["left"].astype(np.int64), "right": out["right"].astype(np.int64),
           "feature": out["feature"].astype(np.int64), "threshold": out["threshold"].astype(np.float64),
           "value": out["value"].astype(np.float64)}
    return {**out, "roots": np.asarray(roots, dtype=np.int64)}


def _walk_arrays(a: dict[str, np.ndarray]) -> dict[str, Any]:
    """The stored node arrays made for a fixed number of passes: a leaf points to itself with an infinite
    threshold, so rows that reached one stay there, and ``depth`` passes bring every row to its leaf."""
    leaf = a["left"] < 0
    own = np.arange(len(leaf))
    left, right = np.where(leaf, own, a["left"]), np.where(leaf, own, a["right"])
    depth, level = 0, a["roots"].copy()
    while level.size:  # breadth-first over the inner nodes, one level per pass
        level = level[~leaf[level]]
        if level.size:
            depth += 1
            level = np.concatenate([left[level], right[level]])
    return {"left": left, "right": right, "feature": a["feature"], "roots": a["roots"], "value": a["value"],
            "threshold": np.where(leaf, np.inf, a["threshold"]), "depth": depth}


def _evaluate(w: dict[str, Any], x: np.ndarray) -> np.ndarray:
    """Every tree's prediction ``(T, n)`` for rows ``x`` (float32, as scikit-learn compares them): all trees
    and rows descend together, one level per pass (:func:`_walk_arrays`)."""
    if x.ndim != 2 or (w["feature"].size and x.shape[1] <= int(w["feature"].max())):
        raise DataError(f"proxy trees: inputs of shape {x.shape} lack the features the trees split on")
    node = np.repeat(w["roots"][:, None], x.shape[0], axis=1)  # (T, n)
    rows = np.arange(x.shape[0])
    for _ in range(w["depth"]):
        node = np.where(x[rows, w["feature"][node]] <= w["threshold"][node], w["left"][node], w["right"][node])
    return w["value"][node]
