"""How much of a divergence the state can foresee: divergence AUROC from the state, from the scenario's
events alone, and from both.

    python -m agents.divergence_ceiling --log-db RUN/log_db.parquet --folds 4 \\
        --out assets/results/divergence_ceiling

The proxy's divergence aim (AUROC >= 0.9 for "the run diverges within the horizon", on held-out runs) is
scored on a collection whose runs diverge, the ``unstable`` scenario's (``agents.proxy_data_curve``). There
a run diverges when a random LR shock hits it; a shock that begins after the example's window is not in the
state, whatever the model. This command splits what a model can and cannot know. The collected runs are cut
into ``--folds`` contiguous groups of seeds, each a test set once; on the other runs three extra-trees
classifiers (scikit-learn, the settings of ``agents.proxy_baselines``) are fitted and scored on the test runs:

* ``state and plan``: the inputs the proxy sees (the state and the plan), as ``agents.proxy_baselines``'s
  extra trees;
* ``scenario events alone``: whether a scenario event (the log's ``noise`` column) is active in the example's
  window and whether one begins later in the horizon, nothing else;
* ``state, plan and the horizon's events``: both, a model told the future that no controller is told. Its
  AUROC is the ceiling of a predictor that knew the shocks; the gap between it and ``state and plan`` is
  what the shocks' randomness costs.

The report adds the share of diverging examples whose event had not begun at the example's window, and the
``state and plan`` AUROC on the diverging examples with their event already active and with it still to come
(each against every non-diverging example). Writes ``OUT/ceiling.json``, ``OUT/report.md`` and
``OUT/ceiling.png`` (default ``runs/divergence_ceiling``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from stso_env.errors import ConfigError, DataError

#: The proxy's divergence aim.
AUROC_AIM = 0.9
MODELS = ("state and plan", "scenario events alone", "state, plan and the horizon's events")


def _finite(x: np.ndarray) -> np.ndarray:
    return np.nan_to_num(np.asarray(x, np.float64), nan=0.0, posinf=1e6, neginf=-1e6)


def ceiling(log_db: Path, *, horizon: int = 5, folds: int = 4, seed: int = 0) -> dict[str, Any]:
    """Fit and score the three classifiers on every fold (module docstring); returns the AUROC per model and
    fold and the counts of diverging examples by the timing of their event."""
    from sklearn.ensemble import ExtraTreesClassifier
    from sklearn.metrics import roc_auc_score

    from agents.proxy_baselines import MIN_SAMPLES_LEAF, TREES
    from agents.proxy_data_curve import folds_of
    from stso_env.proxy.dataset import build_targets
    from stso_env.proxy.logdb import read_log_db

    if not log_db.exists():
        raise DataError(f"--log-db {log_db}: does not exist; pass the log_db.parquet folder of a collection")
    ds = build_targets(read_log_db(log_db), horizon, plans=True)
    if ds.event_window is None:
        raise DataError(f"--log-db {log_db}: has no 'noise' column, so the scenario's events are unknown; "
                        "collect with agents.collect, which logs it")
    y = ds.diverged_at_n.astype(bool)
    if y.all() or not y.any():
        raise DataError(f"--log-db {log_db}: {int(y.sum())} of {len(y)} examples diverge within {horizon} windows; "
                        "the AUROC needs both outcomes (collect a scenario whose runs diverge, e.g. unstable)")
    now, later = ds.event_window == 0, ds.event_window > 0
    events = np.stack([now, later], axis=1).astype(np.float64)
    inputs = {MODELS[0]: _finite(ds.features()), MODELS[1]: events,
              MODELS[2]: np.concatenate([_finite(ds.features()), events], axis=1)}
    groups = folds_of(np.unique(ds.seed).tolist(), folds)
    out: dict[str, Any] = {"horizon": horizon, "folds": groups, "examples": int(len(y)),
                           "diverging": int(y.sum()), "diverging_event_now": int((y & now).sum()),
                           "diverging_event_later": int((y & later).sum()),
                           "diverging_no_event": int((y & ~now & ~later).sum()), "runs": int(len(np.unique(ds.seed))),
                           "auroc": {m: [] for m in MODELS}, "auroc_event_now": [], "auroc_event_later": []}
    for test_seeds in groups:
        test = np.isin(ds.seed, test_seeds)
        if len(np.unique(y[test])) < 2 or len(np.unique(y[~test])) < 2:
            raise DataError(f"fold of seeds {test_seeds[0]}-{test_seeds[-1]}: holds one outcome only; pass fewer "
                            "--folds")
        for name, x in inputs.items():
            clf = ExtraTreesClassifier(TREES, min_samples_leaf=MIN_SAMPLES_LEAF, n_jobs=1, random_state=seed)
            prob = clf.fit(x[~test], y[~test]).predict_proba(x[test])[:, 1]
            out["auroc"][name].append(float(roc_auc_score(y[test], prob)))
            if name == MODELS[0]:
                for key, when in (("auroc_event_now", now[test]), ("auroc_event_later", later[test])):
                    keep = ~y[test] | when
                    both = len(np.unique(y[test][keep])) == 2
                    out[key].append(float(roc_auc_score(y[test][keep], prob[keep])) if both else None)
    return out


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def ceiling_figure(result: dict[str, Any], path: Path) -> Path:
    """AUROC per model, the mean over folds with each fold's value, and the aim."""
    from matplotlib.figure import Figure

    from stso_env.eval.figures import save_figure

    fig = Figure(figsize=(8, 3.6))
    ax = fig.subplots()
    for i, name in enumerate(MODELS):
        vals = result["auroc"][name]
        ax.barh(i, np.mean(vals), color=f"C{i}", alpha=0.7)
        ax.plot(vals, [i] * len(vals), "k.", ms=5)
    ax.axvline(AUROC_AIM, color="black", ls="--", lw=0.8, label=f"aim {AUROC_AIM}")
    ax.set_yticks(range(len(MODELS)), MODELS)
    ax.set_xlim(0.5, 1.0)
    ax.set_xlabel(f"AUROC of 'diverges within {result['horizon']} windows' on the test runs")
    ax.set_title("Divergence AUROC by inputs (bars: mean over folds; dots: folds)")
    ax.legend(loc="lower right", fontsize=7)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def write_report(result: dict[str, Any], out: Path, meta: dict[str, Any]) -> Path:
    from stso_env.eval.report import _table, fmt, provenance_lines
    from stso_env.files import write_text_atomic

    d = result["diverging"]
    lines = ["# What the state can foresee of a divergence", "",
             *provenance_lines(meta)[:-1], f"{provenance_lines(meta)[-1]}; {meta['seconds']:.0f} s", "",
             f"Log `{meta['log_db']}`: {result['runs']} runs, {result['examples']} examples, {d} of them diverge "
             f"within {result['horizon']} windows. Of those {d}: {result['diverging_event_now']} have a scenario "
             f"event active in their own window, {result['diverging_event_later']} "
             f"({result['diverging_event_later'] / d:.0%}) have it begin later in the horizon, after the state "
             f"was observed, and {result['diverging_no_event']} have none. {len(result['folds'])} folds of test "
             "runs (contiguous seeds); extra trees fitted on the other runs.", "",
             *_table(["inputs", "AUROC (mean over folds)", "per fold"],
                     [[f"`{m}`", fmt(float(np.mean(v)), 3), ", ".join(fmt(x, 3) for x in v)]
                      for m, v in result["auroc"].items()]), "",
             f"`{MODELS[0]}` on the diverging examples whose event is already active: "
             f"{fmt(_mean(result['auroc_event_now']), 3)}; whose event is still to come: "
             f"{fmt(_mean(result['auroc_event_later']), 3)} (each against every non-diverging example; mean over "
             "folds).", ""]
    state, told = float(np.mean(result["auroc"][MODELS[0]])), float(np.mean(result["auroc"][MODELS[2]]))
    lines.append(f"Aim AUROC >= {AUROC_AIM}: " + ("met" if state >= AUROC_AIM else "not met")
                 + f" from what a controller observes ({fmt(state, 3)}); a model told the horizon's events reaches "
                 f"{fmt(told, 3)}, so {fmt(told - state, 3)} of AUROC is the randomness of the events' timing.")
    ceiling_figure(result, out / "ceiling.png")
    lines += ["", "![AUROC by inputs](ceiling.png)"]
    path = out / "report.md"
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m agents.divergence_ceiling", description=__doc__.split("\n\n")[0])
    p.add_argument("--log-db", required=True, help="a collection whose runs diverge (e.g. the unstable scenario's)")
    p.add_argument("--horizon", type=int, default=5, help="windows of 'diverges within' (default 5, the proxy's)")
    p.add_argument("--folds", type=int, default=4, help="contiguous groups of seeds, each a test set once")
    p.add_argument("--seed", type=int, default=0, help="seed of the trees")
    p.add_argument("--out", default="runs/divergence_ceiling", help="output folder")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    from agents.evaluate import publish

    args = parse_args(argv)

    def compute() -> tuple[dict[str, Any], dict[str, Any]]:
        if args.horizon < 1:
            raise ConfigError(f"--horizon: must be >= 1, got {args.horizon}")
        return {"log_db": args.log_db}, ceiling(Path(args.log_db), horizon=args.horizon, folds=args.folds,
                                                seed=args.seed)

    return publish("agents.divergence_ceiling", argv, compute, Path(args.out), "ceiling.json", write_report)


if __name__ == "__main__":
    raise SystemExit(main())
