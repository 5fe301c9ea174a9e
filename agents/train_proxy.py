"""Train, calibrate and evaluate the proxy world model from a log database.

``python -m agents.train_proxy --log-db RUN/log_db.parquet --out runs/proxy``

Split (always by whole runs, never by rows, because rows of one trajectory are
correlated in time): the *test* set is every row whose episode seed is in
``--test-seeds`` (default: the largest ~20 % of the distinct seeds), so test
runs come from seeds never seen in training. The remaining runs are shuffled
with ``--seed`` and divided into calibration (``--calib-frac``), validation for
early stopping (``--valid-frac``) and training runs.

Writes ``OUT/proxy.json``, ``OUT/proxy.safetensors``, ``OUT/calibration.json``
(the conformal quantiles of ``loss_at_n`` and ``instability_risk``, fitted on the
calibration runs) and ``OUT/proxy_report.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from tqdm import tqdm

from stso_env.errors import ConfigError, DataError, STSOError
from stso_env.proxy.calibration import conformal_bounds, evaluate
from stso_env.proxy.dataset import ACTION_ENCODINGS, DIVERGENCE_MODELS, LOSS_MODELS, ProxyDataset, build_targets
from stso_env.proxy.effects import action_effects
from stso_env.proxy.logdb import read_log_db
from stso_env.proxy.model import ProxyConfig, ProxyEnsemble


#: Rows before this share of a run are left out of the ``*_late`` skill figures: the first fifth of a run
#: (120 of 600 steps) holds the fast early drop of the loss, which any model forecasts from the progress
#: alone and which makes up most of the change's variance, and the probe spikes of its first windows
#: (``agents.proxy_data_curve`` measures both readings).
LATE_PROGRESS = 0.2


def late_rows(ds: ProxyDataset) -> np.ndarray | None:
    """Rows from :data:`LATE_PROGRESS` of their run on (the state's ``progress`` feature); None without it."""
    if "progress" not in ds.state_names:
        return None
    return ds.state[:, list(ds.state_names).index("progress")] >= LATE_PROGRESS


def split_runs(ds: ProxyDataset, test_seeds: Sequence[int] | None, *, calib_frac: float, valid_frac: float,
               seed: int) -> dict[str, Any]:
    """Split ``ds`` into train / valid / calib / test by whole runs (see the module docstring).

    Returns the four :class:`ProxyDataset` parts plus ``test_seeds`` and ``valid_is_calib``.
    """
    seeds = np.unique(ds.seed)
    if test_seeds is None:
        if len(seeds) < 2:
            raise DataError(f"log db: all runs use seed {seeds.tolist()}; log episodes with at least two seeds "
                            "(test runs must use seeds not seen in training) or pass --test-seeds")
        n_test = max(1, int(round(0.2 * len(seeds))))
        test_seeds = seeds[-n_test:].tolist()
    unknown = sorted(set(test_seeds) - set(seeds.tolist()))
    if unknown:
        raise ConfigError(f"--test-seeds: seeds {unknown} do not occur in the log db (it has {seeds.tolist()})")
    is_test = np.isin(ds.seed, np.asarray(list(test_seeds)))
    runs = ds.groups
    rest_runs = np.unique(runs[~is_test])
    if len(rest_runs) < 2:
        raise DataError(f"log db: {len(rest_runs)} run(s) outside the test seeds; need at least 2 "
                        "(training and calibration runs); log more runs or use fewer --test-seeds")
    rng = np.random.default_rng(seed)
    rest_runs = rest_runs[rng.permutation(len(rest_runs))]
    n_cal = max(1, int(round(calib_frac * len(rest_runs))))
    n_val = int(round(valid_frac * len(rest_runs)))
    if len(rest_runs) - n_cal - n_val < 1:
        n_val = max(0, len(rest_runs) - n_cal - 1)
    cal_runs = rest_runs[:n_cal]
    val_runs = rest_runs[n_cal:n_cal + n_val]
    train_runs = rest_runs[n_cal + n_val:]
    train = ds.subset(np.isin(runs, train_runs) & ~is_test)
    calib = ds.subset(np.isin(runs, cal_runs) & ~is_test)
    # too few runs for a separate validation set: early-stop on the calibration runs (slightly
    # optimistic intervals, recorded in the report) rather than on training rows
    valid = ds.subset(np.isin(runs, val_runs) & ~is_test) if n_val else calib
    return {"train": train, "valid": valid, "calib": calib, "test": ds.subset(is_test),
            "test_seeds": list(map(int, test_seeds)), "valid_is_calib": not n_val}


def main(argv: Sequence[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    if "STSO-RLHF-v0" in raw and ("--env" in raw or "--env=STSO-RLHF-v0" in raw):
        from agents.rlhf_train_proxy import main as rlhf_main  # Phase 2: return@N on RLHF logs

        return rlhf_main(raw)
    p = argparse.ArgumentParser(prog="python -m agents.train_proxy", description=__doc__.split("\n\n")[0])
    p.add_argument("--log-db", required=True, help="log database folder (part-*.parquet) or one Parquet file")
    p.add_argument("--out", required=True, help="output folder for proxy.json / proxy.safetensors / report")
    p.add_argument("--horizon", type=int, default=5,
                   help="env steps ahead the targets look (default 5: 50 optimizer steps at decision interval 10)")
    p.add_argument("--no-plans", dest="plans", action="store_false",
                   help="condition on the first window's action only, not on the plan (action + continuation)")
    p.add_argument("--seed", type=int, default=0, help="seed for the split, initialisation and bootstrap")
    p.add_argument("--test-seeds", type=int, nargs="*", default=None,
                   help="episode seeds whose runs form the test set (default: largest ~20%% of seeds)")
    p.add_argument("--calib-frac", type=float, default=0.25, help="fraction of non-test runs for calibration")
    p.add_argument("--valid-frac", type=float, default=0.15, help="fraction of non-test runs for early stopping")
    p.add_argument("--epochs", type=int, default=ProxyConfig.epochs, help="maximum training epochs")
    p.add_argument("--patience", type=int, default=ProxyConfig.patience, help="early-stopping patience (epochs)")
    p.add_argument("--ensemble", type=int, default=ProxyConfig.ensemble, help="ensemble members")
    p.add_argument("--hidden", type=int, default=ProxyConfig.hidden, help="hidden width")
    p.add_argument("--layers", type=int, default=ProxyConfig.layers, help="hidden layers per member")
    p.add_argument("--lr", type=float, default=ProxyConfig.lr, help="AdamW learning rate")
    p.add_argument("--action-encoding", default=ProxyConfig.action_encoding, choices=ACTION_ENCODINGS,
                   help="how the proxy sees an action: a column per choice (one_hot, default) or one number per "
                        "ordered dimension, the log of its factor (ordered)")
    p.add_argument("--loss-model", default=ProxyConfig.loss_model, choices=LOSS_MODELS,
                   help="the loss@N head: extremely randomised trees on the state plus a linear term in the plan "
                        "(trees, default) or the MLP ensemble's (mlp)")
    p.add_argument("--divergence-model", default=ProxyConfig.divergence_model, choices=DIVERGENCE_MODELS,
                   help="the divergence head: the MLP ensemble's logit (mlp, default) or extremely randomised "
                        "trees on the state and plan (trees)")
    args = p.parse_args(argv)
    try:
        for name in ("calib_frac", "valid_frac"):
            v = getattr(args, name)
            if not 0.0 <= v < 1.0:
                raise ConfigError(f"--{name.replace('_', '-')}: must lie in [0, 1), got {v}")
        cfg = ProxyConfig(horizon=args.horizon, hidden=args.hidden, layers=args.layers, ensemble=args.ensemble,
                          lr=args.lr, epochs=args.epochs, patience=args.patience, seed=args.seed,
                          action_encoding=args.action_encoding, loss_model=args.loss_model,
                          divergence_model=args.divergence_model)
        report = fit_proxy(Path(args.log_db), Path(args.out), cfg, test_seeds=args.test_seeds,
                           calib_frac=args.calib_frac, valid_frac=args.valid_frac, plans=args.plans)
    except STSOError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print_report(report, Path(args.out))
    return 0


def fit_proxy(log_db: Path, out: Path, cfg: ProxyConfig, *, test_seeds: Sequence[int] | None = None,
              calib_frac: float = 0.25, valid_frac: float = 0.15, progress: bool = True,
              plans: bool = True) -> dict[str, Any]:
    """Split ``log_db`` by runs, fit ``cfg``'s ensemble with early stopping, calibrate and evaluate it,
    and write ``proxy.json``, ``proxy.safetensors`` and ``proxy_report.json`` to ``out``; returns the report.

    With ``plans`` (the default) the proxy conditions on plans, the first window's action and the
    continuation of the horizon (:func:`stso_env.proxy.dataset.build_targets`)."""
    if not log_db.exists():
        raise DataError(f"--log-db {log_db}: does not exist; pass the log_db.parquet folder of a run")
    table = read_log_db(log_db)
    if table.num_rows == 0:
        raise DataError(f"--log-db {log_db}: the log database has no rows; collect episodes first")
    ds = build_targets(table, cfg.horizon, plans=plans)
    parts = split_runs(ds, test_seeds, calib_frac=calib_frac, valid_frac=valid_frac, seed=cfg.seed)
    model = ProxyEnsemble(cfg, state_dim=ds.state.shape[1], nvec=ds.action_nvec, state_names=ds.state_names)
    t0 = time.perf_counter()
    with tqdm(total=cfg.epochs, desc="proxy", unit="epoch", file=sys.stderr, disable=not progress) as bar:
        def on_epoch(epoch: int, tl: float, vl: float) -> None:
            bar.update(1)
            bar.set_postfix(train=f"{tl:.3f}", valid=f"{vl:.3f}")

        model.fit(parts["train"], parts["valid"], progress=on_epoch)
    fit_s = time.perf_counter() - t0
    report = evaluate(model, parts["calib"], parts["test"])
    alive = parts["test"].state[parts["test"].diverged_at_n == 0]
    model.save(out)
    conformal_bounds(model, parts["calib"]).save(out)
    report.update({
        "loss_change_r2": loss_change_r2(model, parts["test"]), "plans": bool(plans),
        **heldout_skill(model, parts["calib"], parts["test"]),
        "horizon": cfg.horizon, "n_train": len(parts["train"]), "n_valid": len(parts["valid"]),
        "n_train_runs": int(len(np.unique(parts["train"].groups))),
        "test_seeds": parts["test_seeds"], "valid_is_calib": parts["valid_is_calib"],
        "epochs_run": len(model.curve), "fit_seconds": round(fit_s, 2),
        "best_valid_loss": min(c["valid_loss"] for c in model.curve),
        # does the proxy rank interventions differently from state to state (held-out, non-diverged rows)?
        "action_effects": action_effects(model, alive if len(alive) else parts["test"].state),
    })
    (out / "proxy_report.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    return report


def loss_change_r2(model: ProxyEnsemble, test: ProxyDataset) -> float | None:
    """R² of the predicted *change* of the probe loss over the horizon (``loss_at_n - loss_before``) on
    ``test``: the part of ``loss_at_n`` an intervention can move, which the level's R² flatters (most
    of the level's variance is where the run already is)."""
    if test.loss_before is None:
        return None
    ok = np.isfinite(test.loss_at_n) & np.isfinite(test.loss_before) & (test.diverged_at_n == 0)
    if ok.sum() < 2:
        return None
    from sklearn.metrics import r2_score

    pred = model.predict(test.state[ok], test.action[ok])["loss_at_n"].astype(np.float64)
    before = test.loss_before[ok].astype(np.float64)
    return float(r2_score(test.loss_at_n[ok].astype(np.float64) - before, pred - before))


def heldout_skill(model: ProxyEnsemble, calib: ProxyDataset, test: ProxyDataset) -> dict[str, Any]:
    """How far one split's ``loss_r2`` can be trusted, and what it beats.

    * ``loss_r2_heldout``: the level's R² over every held-out run, calibration and test (the
      network trained on neither; ``heldout_runs`` of them), and ``loss_r2_by_run``: on each run
      alone, by seed. With a handful of runs one split's figure moves with which runs were held
      out; these show by how much.
    * ``loss_r2_late``, ``persistence_r2_late``: the proxy's and persistence's R² on the test rows from
      :data:`LATE_PROGRESS` of each run on, where a controller acts (``None`` without a progress feature).
    * ``persistence_r2``, ``persistence_mae``: the forecast "the probe loss stays where it is"
      (``loss_at_n = loss_before``) on the test rows ``loss_r2`` is measured on, the yardstick a
      world model has to beat before its predicted changes mean anything (``None`` without
      ``loss_before``).
    """
    from sklearn.metrics import mean_absolute_error, r2_score

    by_run: dict[str, float | None] = {}
    ys, preds = [], []
    for part in (calib, test):
        ok = np.isfinite(part.loss_at_n) & (part.diverged_at_n == 0)
        if not ok.any():
            continue
        pred = model.predict(part.state[ok], part.action[ok])["loss_at_n"].astype(np.float64)
        y_all = part.loss_at_n[ok].astype(np.float64)
        ys.append(y_all)
        preds.append(pred)
        for seed in np.unique(part.seed[ok]):
            k = part.seed[ok] == seed
            y = y_all[k]
            by_run[str(int(seed))] = float(r2_score(y, pred[k])) if len(y) > 1 and np.ptp(y) > 0 else None
    pooled = None
    if ys and sum(map(len, ys)) > 1:
        pooled = float(r2_score(np.concatenate(ys), np.concatenate(preds)))
    out: dict[str, Any] = {"loss_r2_heldout": pooled, "heldout_runs": len(by_run), "loss_r2_by_run": by_run,
                           "persistence_r2": None, "persistence_mae": None, "loss_r2_late": None,
                           "persistence_r2_late": None}
    late = late_rows(test)
    if late is not None:
        ok = late & np.isfinite(test.loss_at_n) & (test.diverged_at_n == 0)
        if ok.sum() > 1:
            y = test.loss_at_n[ok].astype(np.float64)
            out["loss_r2_late"] = float(r2_score(y, model.predict(test.state[ok], test.action[ok])["loss_at_n"]))
            if test.loss_before is not None and np.isfinite(test.loss_before[ok]).all():
                out["persistence_r2_late"] = float(r2_score(y, test.loss_before[ok].astype(np.float64)))
    if test.loss_before is not None:
        ok = np.isfinite(test.loss_at_n) & np.isfinite(test.loss_before)
        if ok.sum() > 1:
            y, before = test.loss_at_n[ok].astype(np.float64), test.loss_before[ok].astype(np.float64)
            out["persistence_r2"] = float(r2_score(y, before))
            out["persistence_mae"] = float(mean_absolute_error(y, before))
    return out


def print_report(report: dict[str, Any], out: Path) -> None:
    """One short summary of a :func:`fit_proxy` report on stdout."""
    auroc = report["divergence_auroc"]
    print(f"proxy: {report['n_train']} train / {report['n_calib']} calib / {report['n_test']} test rows, "
          f"{report['epochs_run']} epochs in {report['fit_seconds']:.1f}s")
    r2 = report["loss_r2"]
    dr2 = report.get("loss_change_r2")
    print(f"  loss_at_{report['horizon']}: R2 {'n/a' if r2 is None else f'{r2:.3f}'}  MAE {report['loss_mae']:.4f}  "
          f"R2 of the change {'n/a' if dr2 is None else f'{dr2:.3f}'}"
          + ("  (plans)" if report.get("plans") else ""))
    if report.get("loss_r2_heldout") is not None:
        print(f"  loss_at_{report['horizon']} R2 over all {report['heldout_runs']} held-out runs (calib + test): "
              f"{report['loss_r2_heldout']:.3f}")
    if report.get("loss_r2_late") is not None:
        late = report.get("persistence_r2_late")
        print(f"  loss_at_{report['horizon']} R2 on the test rows from {LATE_PROGRESS:.0%} of each run on: "
              f"{report['loss_r2_late']:.3f} (persistence {'n/a' if late is None else f'{late:.3f}'})")
    if report.get("persistence_r2") is not None:
        print(f"  persistence forecast (the probe loss stays where it is), test rows: R2 "
              f"{report['persistence_r2']:.3f}  MAE {report['persistence_mae']:.4f}")
    print(f"  divergence: AUROC {'n/a' if auroc is None else f'{auroc:.3f}'}  "
          f"Brier {report['divergence_brier']:.4f}")
    rep = report["coverage_repeats"]
    print(f"  coverage (mean of {rep['repeats']} run-level re-partitions, {rep['calib_runs']} calib / "
          f"{rep['test_runs']} test runs): " + "  ".join(
              f"{k}: {v:.3f} (sd {rep['std'][k]:.3f})" for k, v in report["coverage"].items()))
    print("  coverage (the single split): " + "  ".join(
        f"{k}: {v:.3f}" for k, v in report["coverage_single_split"].items()))
    print("  risk upper-bound coverage: " + "  ".join(f"{k}: {v:.3f}" for k, v in
                                                     report["risk_upper_coverage"].items()))
    fx = report.get("action_effects")
    if fx:
        print(f"  ranking across {fx['n_states']} held-out states: best single change `{fx['modal_best']}` in "
              f"{fx['modal_best_share']:.0%} of them, {fx['distinct_best']} distinct best choice(s)")
        print("  predicted effect on loss@N vs neutral (mean, sd across states, share predicted to help): " +
              "; ".join(f"{k} {v['mean']:+.3f} sd {v['sd']:.3f} {v['share_helps']:.0%}"
                        for k, v in fx["per_action"].items()))
    print(f"  wrote {out / 'proxy.json'}, {out / 'proxy.safetensors'}, {out / 'proxy_report.json'}")


if __name__ == "__main__":
    raise SystemExit(main())
