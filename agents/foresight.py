"""How much of the proxy's targets the state can foresee: loss@N R² and divergence AUROC from the state, from
the scenario's events alone, and from both.

    python -m agents.foresight --log-db runs/train-controller/log_db.parquet --out assets/results/foresight
    python -m agents.foresight --log-db RUN/log_db.parquet --out assets/results/foresight_unstable  # 96 unstable runs

The proxy's aims (loss@N R² >= 0.9, and AUROC >= 0.9 for "the run diverges within the horizon" where runs
diverge) are scored on held-out runs of collected scenarios whose events come at random: a data burst, a
gradient-scale glitch, an LR shock. An event that begins after the example's window is not in the state,
whatever the model. This command splits what a model can and cannot know. The collected runs are cut into
``--folds`` contiguous groups of seeds, each a test set once; on the other runs extremely randomised trees
(scikit-learn, the settings of ``agents.proxy_baselines``) are fitted on three sets of inputs and scored on
the test runs:

* ``state and plan``: what the proxy sees, as ``agents.proxy_baselines``'s extra trees;
* ``scenario events alone``: in which window of the horizon the first scenario event (the log's ``noise``
  column) is active, if any, and nothing else;
* ``state, plan and the horizon's events``: both, a model told the future that no controller is told. The
  gap between it and ``state and plan`` is what the events' randomness costs; what it leaves below 1 is
  neither in the state nor in the events' timing.

Loss@N: regression of the probe loss's change over the horizon on the examples that do not diverge within
it; R² of the level on the test runs and on their rows from :data:`agents.train_proxy.LATE_PROGRESS` of the
run on. Divergence (where the collection holds both outcomes): AUROC, plus the share of diverging examples
whose event had not begun at the example's window and the ``state and plan`` AUROC on the diverging
examples with their event already active and with it still to come (each against every non-diverging
example). Writes ``OUT/foresight.json``, ``OUT/report.md`` and ``OUT/foresight.png`` (default
``runs/foresight``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from stso_env.errors import ConfigError, DataError

#: The proxy's aims.
R2_AIM = 0.9
AUROC_AIM = 0.9
MODELS = ("state and plan", "scenario events alone", "state, plan and the horizon's events")


def _inputs(ds: Any) -> dict[str, np.ndarray]:
    """The three input sets of the module docstring; the events as the one-hot window of the first one."""
    from agents.proxy_baselines import finite

    events = np.stack([ds.event_window == k for k in range(-1, ds.horizon)], axis=1).astype(np.float64)
    state = finite(ds.features())
    return {MODELS[0]: state, MODELS[1]: events, MODELS[2]: np.concatenate([state, events], axis=1)}


def foresight(log_db: Path, *, horizon: int = 5, folds: int = 4, seed: int = 0) -> dict[str, Any]:
    """Fit and score the trees on every fold (module docstring); returns the R² and AUROC per inputs and fold
    (``divergence`` is None where the collection does not hold both outcomes)."""
    from sklearn.ensemble import ExtraTreesClassifier, ExtraTreesRegressor
    from sklearn.metrics import r2_score, roc_auc_score

    from agents.proxy_baselines import MIN_SAMPLES_LEAF, TREES
    from agents.proxy_data_curve import folds_of
    from agents.train_proxy import LATE_PROGRESS, late_rows
    from stso_env.proxy.dataset import build_targets
    from stso_env.proxy.logdb import read_log_db

    if not log_db.exists():
        raise DataError(f"--log-db {log_db}: does not exist; pass the log_db.parquet folder of a collection")
    ds = build_targets(read_log_db(log_db), horizon, plans=True)
    if ds.event_window is None:
        raise DataError(f"--log-db {log_db}: has no 'noise' column, so the scenario's events are unknown; "
                        "collect with agents.collect, which logs it")
    groups = folds_of(np.unique(ds.seed).tolist(), folds)
    out: dict[str, Any] = {"horizon": horizon, "folds": groups, "runs": int(len(np.unique(ds.seed))),
                           "examples": int(len(ds)), "late_progress": LATE_PROGRESS,
                           "examples_with_event": int((ds.event_window >= 0).sum())}

    # loss@N on the examples that do not diverge within the horizon
    before = ds.loss_before if ds.loss_before is not None else np.full(len(ds), np.nan)
    alive = ds.subset((ds.diverged_at_n == 0) & np.isfinite(ds.loss_at_n) & np.isfinite(before))
    change = (alive.loss_at_n - alive.loss_before).astype(np.float64)
    late = late_rows(alive)
    loss: dict[str, Any] = {"examples": int(len(alive)), "r2": {m: [] for m in MODELS},
                            "r2_late": {m: [] for m in MODELS} if late is not None else None}
    for name, x in _inputs(alive).items():
        for test_seeds in groups:
            test = np.isin(alive.seed, test_seeds)
            trees = ExtraTreesRegressor(TREES, min_samples_leaf=MIN_SAMPLES_LEAF, n_jobs=1, random_state=seed)
            level = trees.fit(x[~test], change[~test]).predict(x[test]) + alive.loss_before[test]
            loss["r2"][name].append(float(r2_score(alive.loss_at_n[test], level)))
            if late is not None:
                k = late[test]
                loss["r2_late"][name].append(float(r2_score(alive.loss_at_n[test][k], level[k])) if k.sum() > 1
                                             else None)
    out["loss"] = loss

    y = ds.diverged_at_n.astype(bool)
    if y.all() or not y.any() or any(len(np.unique(y[np.isin(ds.seed, g)])) < 2 for g in groups):
        out["divergence"] = None  # AUROC needs both outcomes in every fold
        return out
    now, later = ds.event_window == 0, ds.event_window > 0
    div: dict[str, Any] = {"diverging": int(y.sum()), "event_now": int((y & now).sum()),
                           "event_later": int((y & later).sum()), "no_event": int((y & ~now & ~later).sum()),
                           "auroc": {m: [] for m in MODELS}, "auroc_event_now": [], "auroc_event_later": []}
    for name, x in _inputs(ds).items():
        for test_seeds in groups:
            test = np.isin(ds.seed, test_seeds)
            clf = ExtraTreesClassifier(TREES, min_samples_leaf=MIN_SAMPLES_LEAF, n_jobs=1, random_state=seed)
            prob = clf.fit(x[~test], y[~test]).predict_proba(x[test])[:, 1]
            div["auroc"][name].append(float(roc_auc_score(y[test], prob)))
            if name == MODELS[0]:
                for key, when in (("auroc_event_now", now[test]), ("auroc_event_later", later[test])):
                    keep = ~y[test] | when
                    both = len(np.unique(y[test][keep])) == 2
                    div[key].append(float(roc_auc_score(y[test][keep], prob[keep])) if both else None)
    out["divergence"] = div
    return out


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def foresight_figure(result: dict[str, Any], path: Path) -> Path:
    """Per target, the skill of each set of inputs: the mean over folds (bars), each fold (dots), the aim."""
    from matplotlib.figure import Figure

    from stso_env.eval.figures import save_figure

    panels = [(result["loss"]["r2"], R2_AIM, "loss@N R² on the test runs", (-0.5, 1.0))]
    if result["loss"]["r2_late"] is not None:
        panels.append((result["loss"]["r2_late"], R2_AIM,
                       f"loss@N R², test rows from {result['late_progress']:.0%} of the run on", (-0.5, 1.0)))
    if result["divergence"] is not None:
        panels.append((result["divergence"]["auroc"], AUROC_AIM,
                       f"AUROC of 'diverges within {result['horizon']} windows'", (0.5, 1.0)))
    fig = Figure(figsize=(5.2 * len(panels) + 2.5, 3.4))
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    for ax, (table, aim, title, lim) in zip(axes, panels):
        for i, name in enumerate(MODELS):
            vals = [v for v in table[name] if v is not None]
            ax.barh(i, _mean(vals) or 0.0, color=f"C{i}", alpha=0.7)
            ax.plot(vals, [i] * len(vals), "k.", ms=5)
        ax.axvline(aim, color="black", ls="--", lw=0.8, label=f"aim {aim}")
        ax.set_xlim(*lim)
        ax.set_title(title, fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(MODELS)), MODELS)
    axes[-1].legend(loc="lower right", fontsize=7)
    fig.suptitle("What the state can foresee (bars: mean over folds; dots: folds)")
    fig.tight_layout()
    return save_figure(fig, path)


def write_report(result: dict[str, Any], out: Path, meta: dict[str, Any]) -> Path:
    from stso_env.eval.report import _table, fmt, provenance_lines
    from stso_env.files import write_text_atomic

    def rows(table: dict[str, list[float | None]]) -> list[list[str]]:
        return [[f"`{m}`", fmt(_mean(v), 3), ", ".join(fmt(x, 3) for x in v)] for m, v in table.items()]

    loss = result["loss"]
    late = f"{result['late_progress']:.0%}"
    lines = ["# What the state can foresee of the proxy's targets", "",
             *provenance_lines(meta)[:-1], f"{provenance_lines(meta)[-1]}; {meta['seconds']:.0f} s", "",
             f"Log `{meta['log_db']}`: {result['runs']} runs, {result['examples']} examples, "
             f"{result['examples_with_event']} of them with a scenario event within {result['horizon']} windows. "
             f"{len(result['folds'])} folds of test runs (contiguous seeds); extra trees fitted on the other runs.",
             "", f"Loss@N R² on the test runs ({loss['examples']} examples that do not diverge within the horizon):",
             "", *_table(["inputs", "R² (mean over folds)", "per fold"], rows(loss["r2"])), ""]
    if loss["r2_late"] is not None:
        lines += [f"The same on the test rows from {late} of each run on:", "",
                  *_table(["inputs", "R² (mean over folds)", "per fold"], rows(loss["r2_late"])), ""]
    state, told = (float(np.mean(loss["r2"][m])) for m in (MODELS[0], MODELS[2]))
    lines.append(f"Aim R² >= {R2_AIM}: " + ("met" if state >= R2_AIM else "not met")
                 + f" from what a controller observes ({fmt(state, 3)}); told the horizon's events {fmt(told, 3)} "
                 f"({'+' if told >= state else ''}{fmt(told - state, 3)}).")
    div = result["divergence"]
    if div is None:
        lines += ["", "Divergence: not scored (the collection, or one of its folds, holds one outcome only)."]
    else:
        d = div["diverging"]
        state, told = (float(np.mean(div["auroc"][m])) for m in (MODELS[0], MODELS[2]))
        lines += ["", f"Divergence within {result['horizon']} windows: {d} examples diverge. Of those, "
                  f"{div['event_now']} have a scenario event active in their own window, {div['event_later']} "
                  f"({div['event_later'] / d:.0%}) have it begin later in the horizon, after the state was "
                  f"observed, and {div['no_event']} have none.", "",
                  *_table(["inputs", "AUROC (mean over folds)", "per fold"], rows(div["auroc"])), "",
                  f"`{MODELS[0]}` on the diverging examples whose event is already active: "
                  f"{fmt(_mean(div['auroc_event_now']), 3)}; whose event is still to come: "
                  f"{fmt(_mean(div['auroc_event_later']), 3)} (each against every non-diverging example; mean "
                  "over folds).", "",
                  f"Aim AUROC >= {AUROC_AIM}: " + ("met" if state >= AUROC_AIM else "not met")
                  + f" from what a controller observes ({fmt(state, 3)}); a model told the horizon's events "
                  f"reaches {fmt(told, 3)}, so {fmt(told - state, 3)} of AUROC is the randomness of the events' "
                  "timing."]
    foresight_figure(result, out / "foresight.png")
    lines += ["", "![skill by inputs](foresight.png)"]
    path = out / "report.md"
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m agents.foresight", description=__doc__.split("\n\n")[0])
    p.add_argument("--log-db", required=True, help="a collection (agents.collect's, or make train's)")
    p.add_argument("--horizon", type=int, default=5, help="windows of the targets (default 5, the proxy's)")
    p.add_argument("--folds", type=int, default=4, help="contiguous groups of seeds, each a test set once")
    p.add_argument("--seed", type=int, default=0, help="seed of the trees")
    p.add_argument("--out", default="runs/foresight", help="output folder")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    from agents.evaluate import publish

    args = parse_args(argv)

    def compute() -> tuple[dict[str, Any], dict[str, Any]]:
        if args.horizon < 1:
            raise ConfigError(f"--horizon: must be >= 1, got {args.horizon}")
        return {"log_db": args.log_db}, foresight(Path(args.log_db), horizon=args.horizon, folds=args.folds,
                                                  seed=args.seed)

    return publish("agents.foresight", argv, compute, Path(args.out), "foresight.json", write_report)


if __name__ == "__main__":
    raise SystemExit(main())
