"""What the proxy's loss@N accuracy is made of: the proxy against scikit-learn baselines on its own split.

    python -m agents.proxy_baselines --log-db runs/train-controller/log_db.parquet \
        --proxy runs/train-controller/proxy --effects assets/results/effects/effects.json

The proxy's R² for loss@N mixes two things: where the run is heading anyway (the state's dynamics) and
what an intervention changes. Only the second ranks candidates. This command splits the log database
exactly as ``agents.train_proxy`` does for the proxy (same runs for training, calibration and test),
fits baselines on the proxy's training and validation runs, and reports on the held-out runs:

* ``persistence``: loss@N = the probe loss now; ``persistence + mean change``: plus the training runs'
  mean change over the horizon;
* ``ridge``: a linear model of the change (scikit-learn ``RidgeCV``) on state and plan;
* ``extra trees``: an ensemble of extremely randomised trees (scikit-learn ``ExtraTreesRegressor``) of
  the change on state and plan;
* ``state trees + linear plan``: extra trees of the change on the state alone, plus least squares of
  their out-of-bag residual on the plan's integer codes (:class:`StateTreesPlusLinearPlan`): the trees
  forecast where the run is heading, and every effect of the plan is the linear term's;
* the proxy itself.

For each: loss@N R² and MAE on the test runs, R² of the change, the level's R² over every held-out run
(calibration and test), and the size of the effects it predicts for the single changes of the action
grid against the neutral action on the test states (:func:`stso_env.proxy.effects.action_effects`):
the mean over changes of the absolute mean effect, and the largest one. ``--effects`` adds the real
effects of the same changes measured by ``agents.check_effects`` (forks of real runs), with the
real effect of reordering the data, which changes nothing but chance, as the noise scale, and how
well each model ranks the changes (:func:`agreement`: Spearman correlation and sign agreement of its
mean effects with the real ones).

Writes ``OUT/baselines.json`` and ``OUT/report.md`` (default ``runs/proxy_baselines``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from stso_env.errors import ConfigError, DataError, STSOError

#: Trees of the extra-trees baseline; leaves hold at least two rows (a few hundred training rows).
TREES = 300
MIN_SAMPLES_LEAF = 2


def _rows(part: Any, alive: bool = False) -> np.ndarray:
    """Rows with a finite loss@N and probe loss now, as the proxy report scores them; ``alive``: only rows
    whose run did not diverge within the horizon (the report's held-out R²)."""
    if part.loss_before is None:
        raise DataError("the log database has no probe_loss_before column; collect with a current "
                        "agents.collect or agents.train_controller")
    ok = np.isfinite(part.loss_at_n) & np.isfinite(part.loss_before)
    return ok & (part.diverged_at_n == 0) if alive else ok


class ChangeModel:
    """A scikit-learn regressor of the change of the probe loss over the horizon, as a proxy-like
    ``predict(state, action)``: the probe loss now (``baseline(state)``) plus the predicted change."""

    def __init__(self, estimator: Any, baseline: Any, nvec: tuple[int, ...]) -> None:
        self.estimator, self.baseline, self.nvec = estimator, baseline, nvec

    def fit(self, x: np.ndarray, change: np.ndarray) -> ChangeModel:
        self.estimator.fit(x, change)
        return self

    def change(self, state: np.ndarray, action: np.ndarray) -> np.ndarray:
        x = np.concatenate([np.asarray(state, np.float32), np.asarray(action, np.float32)], axis=1)
        return self.estimator.predict(x)

    def predict(self, state: np.ndarray, action: np.ndarray) -> dict[str, np.ndarray]:
        # The baseline cancels in an effect (two actions, one state); it matters only for the level.
        return {"loss_at_n": self.baseline(state) + self.change(state, action)}


class StateTreesPlusLinearPlan:
    """A scikit-learn-style regressor on ``[state, plan]`` rows: extra trees on the first ``n_state``
    columns (the state alone), then least squares of their out-of-bag residual on the plan columns.

    Extra trees of the change forecast the run's own course well and spread none of it onto the plan (they
    rank nothing); ridge gets the sign and size of the LR changes' effects right and the course badly.
    Here the trees never see the plan, so the difference between two plans from one state is exactly the
    linear plan term, fitted on residuals the trees did not see in training (out of bag), while the level
    gains the trees' forecast. The plan enters as its integer codes, whose order follows the LR scale, so
    one slope pools every LR change; with a coefficient per choice (one-hot codes) the few hundred rows of
    ``make train``'s collection gave x0.8 the wrong sign, and ridge on the residual shrank every effect
    about sixfold."""

    def __init__(self, n_state: int, seed: int = 0) -> None:
        from sklearn.ensemble import ExtraTreesRegressor
        from sklearn.linear_model import LinearRegression

        self.n_state = n_state
        self.trees = ExtraTreesRegressor(TREES, min_samples_leaf=MIN_SAMPLES_LEAF, bootstrap=True,
                                         oob_score=True, n_jobs=1, random_state=seed)
        self.linear = LinearRegression()

    def fit(self, x: np.ndarray, y: np.ndarray) -> StateTreesPlusLinearPlan:
        self.trees.fit(x[:, :self.n_state], y)
        self.linear.fit(x[:, self.n_state:], y - self.trees.oob_prediction_)
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.trees.predict(x[:, :self.n_state]) + self.linear.predict(x[:, self.n_state:])


def _skill(predict: Any, calib: Any, test: Any) -> dict[str, float]:
    """Loss@N skill of ``predict(state, action, loss_before)`` on the test rows (module docstring); the
    ``*_late`` figures only on rows from :data:`agents.train_proxy.LATE_PROGRESS` of the run on, where a
    controller acts."""
    from agents.train_proxy import late_rows
    from sklearn.metrics import mean_absolute_error, r2_score

    def level(part: Any, k: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        before = part.loss_before[k].astype(np.float64)
        return (part.loss_at_n[k].astype(np.float64), before,
                np.asarray(predict(part.state[k], part.action[k], before), np.float64))

    k = _rows(test)
    y, before, p = level(test, k)
    pooled = [level(part, _rows(part, alive=True)) for part in (calib, test)]
    out = {"loss_r2": float(r2_score(y, p)), "loss_mae": float(mean_absolute_error(y, p)),
           "loss_change_r2": float(r2_score(y - before, p - before)),
           "loss_r2_heldout": float(r2_score(np.concatenate([q[0] for q in pooled]),
                                             np.concatenate([q[2] for q in pooled])))}
    late = late_rows(test)
    if late is not None:
        late = late[k]
        if late.sum() > 1:
            out["loss_r2_late"] = float(r2_score(y[late], p[late]))
            out["loss_change_r2_late"] = float(r2_score(y[late] - before[late], p[late] - before[late]))
    return out


def _effect_size(model: Any, states: np.ndarray) -> dict[str, Any]:
    from stso_env.proxy.effects import action_effects

    eff = action_effects(model, states)
    means = {name: v["mean"] for name, v in eff["per_action"].items()}
    return {"effects": means, "mean_abs_effect": float(np.mean(np.abs(list(means.values())))),
            "max_abs_effect": float(np.max(np.abs(list(means.values())))),
            "modal_best": eff["modal_best"], "modal_best_share": eff["modal_best_share"]}


def real_effects(path: Path) -> dict[str, Any]:
    """Real effects of the single changes at +N from an ``agents.check_effects`` output (``effects.json``):
    mean per change, their mean absolute value, and the root mean square of the data-reorder effect."""
    if not path.is_file():
        raise DataError(f"--effects {path}: no such file; pass the effects.json that agents.check_effects wrote")
    data = json.loads(path.read_text(encoding="utf-8"))
    try:
        changes, points = data["changes"], data["points"]
        real = np.asarray([p["real"] for p in points], dtype=np.float64)
    except (KeyError, TypeError, ValueError) as err:
        raise DataError(f"--effects {path}: not an agents.check_effects effects.json ({err})") from None
    means = {c: float(np.nanmean(real[:, j])) for j, c in enumerate(changes)}
    out: dict[str, Any] = {"path": str(path), "proxy": data.get("meta", {}).get("proxy"), "fork_points": len(points),
                           "effects": means,
                           "mean_abs_effect": float(np.mean([abs(v) for c, v in means.items() if c != "data_reorder"]))}
    if "data_reorder" in changes:
        r = real[:, changes.index("data_reorder")]
        out["chance_rms"] = float(np.sqrt(np.nanmean(r ** 2)))
    return out


def finite(x: np.ndarray) -> np.ndarray:
    """Features as float64 for scikit-learn's classifiers: NaN as 0, infinities (a diverged run's logged
    features) as +-1e6."""
    return np.nan_to_num(np.asarray(x, np.float64), nan=0.0, posinf=1e6, neginf=-1e6)


def divergence_skill(fit_parts: Sequence[Any], test: Any, model: Any, seed: int = 0) -> dict[str, Any]:
    """AUROC and Brier score of "the run diverges within the horizon" on the test rows: the proxy's
    ``diverged_prob`` against the training rate, a logistic regression and extra trees (scikit-learn) fitted
    on the same rows as the loss baselines; ``reason`` instead when either side holds one class only."""
    from sklearn.ensemble import ExtraTreesClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import brier_score_loss, roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    y_fit = np.concatenate([p.diverged_at_n for p in fit_parts]).astype(int)
    y = test.diverged_at_n.astype(int)
    out: dict[str, Any] = {"test_rows": int(len(y)), "test_diverged": int(y.sum()),
                           "fit_rows": int(len(y_fit)), "fit_diverged": int(y_fit.sum())}
    if len(np.unique(y_fit)) < 2 or len(np.unique(y)) < 2:
        out["reason"] = ("no divergence in the " + ("fitting" if len(np.unique(y_fit)) < 2 else "test")
                         + " runs: AUROC needs both outcomes")
        return out

    x_fit = finite(np.concatenate([p.features() for p in fit_parts]))
    x = finite(test.features())
    probs = {"training rate": np.full(len(y), y_fit.mean())}
    for name, clf in (("logistic regression", make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))),
                      ("extra trees", ExtraTreesClassifier(TREES, min_samples_leaf=MIN_SAMPLES_LEAF, n_jobs=1,
                                                           random_state=seed))):
        probs[name] = clf.fit(x_fit, y_fit).predict_proba(x)[:, 1]
    probs["proxy"] = np.asarray(model.predict(test.state, test.action)["diverged_prob"], np.float64)
    out["models"] = {n: {"auroc": float(roc_auc_score(y, q)), "brier": float(brier_score_loss(y, q))}
                     for n, q in probs.items()}
    return out


def compare(log_db: Path, proxy_dir: Path, *, test_seeds: Sequence[int] | None = None, seed: int = 0,
            calib_frac: float = 0.25, valid_frac: float = 0.15) -> dict[str, Any]:
    """Fit the baselines on the proxy's split of ``log_db`` and score them and the proxy (module docstring)."""
    from agents.train_proxy import split_runs
    from stso_env.proxy.dataset import PLAN_NVEC, build_targets
    from stso_env.proxy.logdb import read_log_db
    from stso_env.proxy.model import ProxyEnsemble

    if not log_db.exists():
        raise DataError(f"--log-db {log_db}: does not exist; pass the log_db.parquet folder of a run")
    model = ProxyEnsemble.load(proxy_dir)
    ds = build_targets(read_log_db(log_db), model.config.horizon, plans=tuple(model.nvec) == tuple(PLAN_NVEC))
    parts = split_runs(ds, test_seeds, calib_frac=calib_frac, valid_frac=valid_frac, seed=seed)
    return score_models(parts, model, seed=seed)


def score_models(parts: dict[str, Any], model: Any, *, seed: int = 0) -> dict[str, Any]:
    """Fit the baselines on the training and validation runs of ``parts`` (a :func:`agents.train_proxy.split_runs`
    split) and score them and ``model``, the proxy fitted on the same runs (module docstring)."""
    from sklearn.ensemble import ExtraTreesRegressor
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    fit_parts = [parts["train"]] if parts["valid_is_calib"] else [parts["train"], parts["valid"]]
    x = np.concatenate([p.features()[_rows(p, alive=True)] for p in fit_parts])
    change = np.concatenate([(p.loss_at_n - p.loss_before)[_rows(p, alive=True)]
                             for p in fit_parts]).astype(np.float64)
    calib, test = parts["calib"], parts["test"]
    states = test.state[_rows(test, alive=True)]

    def mean_change(state: np.ndarray, action: np.ndarray, before: np.ndarray) -> np.ndarray:
        return before + change.mean()

    fitted = {
        "ridge": ChangeModel(make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-3, 3, 13))),
                             model.loss_baseline, model.nvec).fit(x, change),
        "extra trees": ChangeModel(ExtraTreesRegressor(TREES, min_samples_leaf=MIN_SAMPLES_LEAF, n_jobs=1,
                                                       random_state=seed),
                                   model.loss_baseline, model.nvec).fit(x, change),
        "state trees + linear plan": ChangeModel(StateTreesPlusLinearPlan(test.state.shape[1], seed),
                                           model.loss_baseline, model.nvec).fit(x, change),
        "proxy": model,
    }
    rows: dict[str, Any] = {
        "persistence": {**_skill(lambda s, a, b: b, calib, test), "mean_abs_effect": 0.0, "max_abs_effect": 0.0},
        "persistence + mean change": {**_skill(mean_change, calib, test), "mean_abs_effect": 0.0,
                                      "max_abs_effect": 0.0},
    }
    for name, m in fitted.items():
        # the baselines add their change to the logged probe loss; the proxy predicts the level itself
        level = (lambda s, a, b, m=m: b + m.change(s, a)) if isinstance(m, ChangeModel) else \
            (lambda s, a, b, m=m: m.predict(s, a)["loss_at_n"])
        rows[name] = {**_skill(level, calib, test), **_effect_size(m, states)}
    trees = fitted["extra trees"].estimator
    n_state = test.state.shape[1]
    return {"models": rows, "test_seeds": parts["test_seeds"],
            "calib_seeds": sorted(map(int, np.unique(calib.seed))), "n_fit_rows": int(len(change)),
            "n_test_rows": int(_rows(test).sum()), "horizon": parts["test"].horizon,
            "trees_action_importance": float(trees.feature_importances_[n_state:].sum()),
            "divergence": divergence_skill(fit_parts, test, model, seed)}


def agreement(result: dict[str, Any]) -> dict[str, Any]:
    """Add to each model with predicted effects the Spearman correlation of its mean effects with the real
    ones over the single changes (``effects_spearman``) and the share of changes whose sign it gets right
    (``effects_sign_agreement``); ``data_reorder`` is left out, as its real effect is chance."""
    from scipy.stats import spearmanr

    real = result["real_effects"]["effects"]
    changes = [c for c in real if c != "data_reorder"]
    for r in result["models"].values():
        if "effects" not in r or any(c not in r["effects"] for c in changes):
            continue
        pred = np.asarray([r["effects"][c] for c in changes])
        truth = np.asarray([real[c] for c in changes])
        r["effects_spearman"] = float(spearmanr(pred, truth).statistic) if np.ptp(pred) > 0 else float("nan")
        r["effects_sign_agreement"] = float(np.mean(np.sign(pred) == np.sign(truth)))
    return result


def effects_figure(result: dict[str, Any], path: Path) -> Path | None:
    """Grouped bars per single change: the real mean effect at +N and each model's predicted one (needs
    ``real_effects``); None without them."""
    real = result.get("real_effects")
    if not real:
        return None
    from matplotlib.figure import Figure

    from stso_env.eval.figures import save_figure

    changes = list(real["effects"])
    series = {"real (forks)": [real["effects"][c] for c in changes]}
    series.update({name: [r["effects"].get(c, np.nan) for c in changes]
                   for name, r in result["models"].items() if "effects" in r})
    x = np.arange(len(changes))
    width = 0.8 / len(series)
    fig = Figure(figsize=(max(7, 0.9 * len(changes) + 2), 4))
    ax = fig.subplots()
    for i, (name, vals) in enumerate(series.items()):
        ax.bar(x - 0.4 + (i + 0.5) * width, vals, width, label=name, color="black" if i == 0 else None)
    ax.axhline(0, color="grey", lw=0.8)
    if real.get("chance_rms") is not None:
        for sign in (-1, 1):
            ax.axhline(sign * real["chance_rms"], color="grey", ls="--", lw=0.8,
                       label="chance (data reorder, RMS)" if sign > 0 else None)
    ax.set_xticks(x, changes, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("effect on the probe loss at +N (nats)")
    ax.set_title("Effect of each single change against the neutral action: real and predicted")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def write_report(result: dict[str, Any], out: Path, meta: dict[str, Any]) -> Path:
    from stso_env.eval.report import _table, fmt, provenance_lines
    from stso_env.files import write_text_atomic

    rows = [[f"`{n}`", fmt(r["loss_r2"], 3), fmt(r["loss_mae"], 3), fmt(r["loss_change_r2"], 3),
             fmt(r["loss_r2_heldout"], 3), fmt(r["mean_abs_effect"], 3), fmt(r["max_abs_effect"], 3)]
            for n, r in result["models"].items()]
    lines = ["# The proxy's loss@N against simple baselines", "",
             *provenance_lines(meta), "",
             f"Proxy `{meta['proxy']}` (horizon {result['horizon']} windows); log `{meta['log_db']}`. The baselines "
             f"are fitted on the proxy's training and validation runs ({result['n_fit_rows']} rows) and scored on its "
             f"test runs (seeds {', '.join(map(str, result['test_seeds']))}, {result['n_test_rows']} rows); "
             f"'held-out R²' pools the calibration runs (seeds {', '.join(map(str, result['calib_seeds']))}) "
             "and the test runs. Effects: the predicted loss@N of each single change of the action grid minus "
             "that of the neutral action, mean over the test states (nats).", "",
             *_table(["model", "loss@N R²", "MAE (nats)", "R² of the change", "held-out R²",
                      "mean absolute effect of a change", "largest absolute effect"], rows), "",
             f"The extra trees put {100 * result['trees_action_importance']:.1f} % of their feature importance on "
             "the plan's action columns."]
    div = result.get("divergence") or {}
    lines += ["", f"Divergence within the horizon: {div.get('test_diverged', 0)} of {div.get('test_rows', 0)} test "
              f"rows diverged ({div.get('fit_diverged', 0)} of {div.get('fit_rows', 0)} fitting rows)"
              + (f"; {div['reason']}." if div.get("reason") else ".")]
    if div.get("models"):
        lines += ["", *_table(["model", "AUROC", "Brier score"],
                              [[f"`{n}`", fmt(r["auroc"], 3), fmt(r["brier"], 3)] for n, r in div["models"].items()])]
    real = result.get("real_effects")
    if real:
        lines += ["", f"Real effects at +N (`{real['path']}`, forks of real runs, {real['fork_points']} fork points, "
                  f"proxy `{real['proxy']}`): mean absolute effect of a change {fmt(real['mean_abs_effect'], 3)} nats; "
                  "the real effect of reordering the data, which changes only chance, has root mean square "
                  f"{fmt(real.get('chance_rms'), 3)} nats.", "",
                  *_table(["change", "real effect, mean", *(f"`{n}`" for n in result["models"]
                                                            if "effects" in result["models"][n])],
                          [[f"`{c}`", fmt(v, 3), *(fmt(r["effects"].get(c), 3) for r in result["models"].values()
                                                   if "effects" in r)]
                           for c, v in real["effects"].items()])]
        agree = [(n, r) for n, r in result["models"].items() if "effects_spearman" in r]
        if agree:
            lines += ["", "How well each model ranks the single changes (all but `data_reorder`, whose real effect "
                      "is chance): the Spearman correlation of its mean effects with the real ones, and the share "
                      "of changes whose sign it gets right.", "",
                      *_table(["model", "Spearman ρ with the real effects", "right sign"],
                              [[f"`{n}`", fmt(r["effects_spearman"], 2), f"{100 * r['effects_sign_agreement']:.0f} %"]
                               for n, r in agree])]
    if effects_figure(result, out / "effects.png") is not None:
        lines += ["", "![real and predicted effects](effects.png)"]
    path = out / "report.md"
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m agents.proxy_baselines", description=__doc__.split("\n\n")[0])
    p.add_argument("--log-db", default="runs/train-controller/log_db.parquet",
                   help="the log database the proxy was trained on (default: make train's)")
    p.add_argument("--proxy", default="runs/train-controller/proxy", help="the proxy folder (default: make train's)")
    p.add_argument("--effects", default=None,
                   help="an agents.check_effects effects.json to set the real effects beside the predicted ones")
    p.add_argument("--seed", type=int, default=0, help="the split seed agents.train_proxy used (default 0)")
    p.add_argument("--test-seeds", type=int, nargs="*", default=None,
                   help="the test seeds agents.train_proxy used (default: its default split)")
    p.add_argument("--out", default="runs/proxy_baselines", help="output folder")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if not Path(args.proxy).is_dir():
            raise ConfigError(f"--proxy {args.proxy}: not a folder; pass a proxy folder of agents.train_proxy "
                              "or agents.train_controller (RUN/proxy)")
        t0 = time.perf_counter()
        result = compare(Path(args.log_db), Path(args.proxy), test_seeds=args.test_seeds, seed=args.seed)
        if args.effects:
            result["real_effects"] = real_effects(Path(args.effects))
            agreement(result)
        from agents.evaluate import provenance
        from stso_env.eval.report import save_result

        meta = {"proxy": args.proxy, "log_db": args.log_db, "seconds": time.perf_counter() - t0,
                **provenance("agents.proxy_baselines", argv)}
        report = save_result(Path(args.out), "baselines.json", meta, result, write_report)
    except STSOError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report.read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
