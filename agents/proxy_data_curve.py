"""How loss@N accuracy grows with the collection: the proxy and the baselines of ``agents.proxy_baselines``
fitted on the first ``n`` collected runs, every size scored on the same held-out runs.

    cp -r runs/train-controller/log_db.parquet RUN/            # make train's 16 runs, seeds 0-15
    python -m agents.collect --episodes 48 --seed 16 --scenario spiky,adam_v_lag --run-dir RUN  # seeds 32-79
    python -m agents.proxy_data_curve --log-db RUN/log_db.parquet --test-seeds $(seq 32 79) --folds 3 \\
        --sizes 8 16 32 48 --out assets/results/proxy_data_curve

The proxy's R² aim (loss@N R² >= 0.9 on held-out runs) is measured on ``make train``'s collection of 16
runs, where one split's test set holds three of them. This command answers how many collected runs the aim
needs, for which model, and on which rows: ``--test-seeds`` are cut into ``--folds`` contiguous groups,
each a test set once; for each fold and size ``n`` the ``n`` smallest seeds outside the fold form the pool,
split into training, validation and calibration runs exactly as ``agents.train_proxy`` splits a log
(:func:`agents.train_proxy.split_runs`); a proxy with the default :class:`stso_env.proxy.model.ProxyConfig`
(or ``--action-encoding``) is fitted on it, and the baselines on the same training and validation runs
(:func:`agents.proxy_baselines.score_models`). Besides the figures on whole runs, the report gives them from
:data:`agents.train_proxy.LATE_PROGRESS` of each run on, where a controller acts: the early drop of
the loss, which any model forecasts from the progress alone, makes up most of the change's variance.
Where the collection holds divergences, the report adds the AUROC of "the run diverges within the horizon"
for the proxy's divergence head and the classifiers of ``agents.proxy_baselines``, against the aim 0.9:

    python -m agents.collect --episodes 48 --scenario unstable --episode-steps 600 --seed 650100 \\
        --run-dir RUN --workers 2 --threads 1       # seeds 650100-650147
    python -m agents.collect ... --seed 650148      # the same again: episodes 48-95, seeds 650196-650243
    python -m agents.proxy_data_curve --log-db RUN/log_db.parquet \\
        --test-seeds $(seq 650100 650147) $(seq 650196 650243) --folds 4 --sizes 8 16 36 72 \\
        --loss-model trees --out assets/results/proxy_data_curve_unstable

Writes ``OUT/curve.json``, ``OUT/report.md`` and ``OUT/curve.png`` (default ``runs/proxy_data_curve``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from tqdm import tqdm

from stso_env.errors import ConfigError, DataError

#: The aim of the proxy's loss@N R² on held-out runs.
R2_AIM = 0.9
#: The aim of the divergence AUROC on held-out runs where divergences exist.
AUROC_AIM = 0.9
#: Skill figures kept per model, size and fold, in the report's order, with their titles.
KEYS = {"loss_r2": "Loss@N R² on the test runs",
        "loss_change_r2": "R² of the change of the probe loss over the horizon on the test runs",
        "loss_r2_late": "Loss@N R² on the test rows from {late} of the run on",
        "loss_change_r2_late": "R² of the change on the test rows from {late} of the run on",
        "loss_mae": "MAE of loss@N on the test runs (nats)"}


def folds_of(test_seeds: Sequence[int], folds: int) -> list[list[int]]:
    """``test_seeds`` sorted and cut into ``folds`` contiguous groups of near-equal size (scenarios cycle
    with the episode number, so a contiguous group holds each collected scenario about equally)."""
    seeds = sorted(set(map(int, test_seeds)))
    if not 1 <= folds <= len(seeds):
        raise ConfigError(f"--folds: must lie in 1..{len(seeds)} (one test run per fold at least), got {folds}")
    return [list(map(int, g)) for g in np.array_split(np.asarray(seeds), folds)]


def pools(seeds: Sequence[int], test_seeds: Sequence[int], sizes: Sequence[int]) -> dict[int, list[int]]:
    """The training pool of each size: the ``n`` smallest seeds that are not test seeds."""
    test = set(map(int, test_seeds))
    unknown = sorted(test - set(map(int, seeds)))
    if unknown:
        raise ConfigError(f"--test-seeds: seeds {unknown} do not occur in the log db")
    rest = sorted(set(map(int, seeds)) - test)
    out = {}
    for n in sizes:
        if not 3 <= n <= len(rest):
            raise ConfigError(f"--sizes: {n} runs cannot be drawn; each size needs 3 to {len(rest)} runs (the log "
                              f"has {len(rest)} runs outside the test seeds; collect more or pass smaller sizes)")
        out[int(n)] = rest[:n]
    return out


def curve(log_db: Path, test_seeds: Sequence[int], sizes: Sequence[int], config: Any = None, *, folds: int = 1,
          progress: bool = True) -> dict[str, Any]:
    """Fit and score every model at every size and fold (module docstring) with the proxy settings ``config``
    (a :class:`stso_env.proxy.model.ProxyConfig`, default the defaults); returns the figures by size, each
    a list over folds."""
    from agents.proxy_baselines import score_models
    from agents.train_proxy import LATE_PROGRESS, split_runs
    from stso_env.proxy.calibration import evaluate
    from stso_env.proxy.dataset import build_targets
    from stso_env.proxy.logdb import read_log_db
    from stso_env.proxy.model import ProxyConfig, ProxyEnsemble

    if not log_db.exists():
        raise DataError(f"--log-db {log_db}: does not exist; pass the log_db.parquet folder of a run")
    cfg = config or ProxyConfig()
    ds = build_targets(read_log_db(log_db), cfg.horizon, plans=True)
    groups = folds_of(test_seeds, folds)
    plan = [(f, n, pool) for f, test in enumerate(groups)
            for n, pool in pools(np.unique(ds.seed).tolist(), test, sorted(set(sizes))).items()]
    out: dict[str, Any] = {"folds": groups, "horizon": cfg.horizon, "action_encoding": cfg.action_encoding,
                           "loss_model": cfg.loss_model, "divergence_model": cfg.divergence_model,
                           "late_progress": LATE_PROGRESS, "sizes": {}}
    for f, n, pool in tqdm(plan, desc="fits", unit="fit", file=sys.stderr, disable=not progress):
        sub = ds.subset(np.isin(ds.seed, np.asarray(pool + groups[f])))
        parts = split_runs(sub, groups[f], calib_frac=0.25, valid_frac=0.15, seed=cfg.seed)
        model = ProxyEnsemble(cfg, state_dim=sub.state.shape[1], nvec=sub.action_nvec, state_names=sub.state_names)
        model.fit(parts["train"], parts["valid"])
        scored = score_models(parts, model, seed=cfg.seed)
        cover = evaluate(model, parts["calib"], parts["test"])
        out["sizes"].setdefault(str(n), []).append({
            "runs": n, "fold": f, "test_seeds": groups[f], "fit_rows": scored["n_fit_rows"],
            "test_rows": scored["n_test_rows"], "calib_seeds": scored["calib_seeds"],
            "proxy_coverage": dict(cover["coverage"]), "divergence": scored["divergence"],
            "models": {name: {k: r.get(k) for k in KEYS} for name, r in scored["models"].items()}})
    return out


def summary(result: dict[str, Any], key: str) -> dict[int, dict[str, tuple[float, float, float]]]:
    """Per size and model: the mean, smallest and largest of ``key`` over the folds."""
    out: dict[int, dict[str, tuple[float, float, float]]] = {}
    for fits in result["sizes"].values():
        vals: dict[str, list[float]] = {}
        for fit in fits:
            for name, r in fit["models"].items():
                if r.get(key) is not None:
                    vals.setdefault(name, []).append(r[key])
        out[fits[0]["runs"]] = {n: (float(np.mean(v)), float(np.min(v)), float(np.max(v))) for n, v in vals.items()}
    return out


def divergence_summary(result: dict[str, Any]) -> dict[int, dict[str, tuple[float, float, float, int]]]:
    """Per size and model: the mean, smallest and largest divergence AUROC over the folds whose fitting and
    test runs hold both outcomes, and how many folds that is (sizes with no such fold are left out)."""
    out: dict[int, dict[str, tuple[float, float, float, int]]] = {}
    for fits in result["sizes"].values():
        vals: dict[str, list[float]] = {}
        for fit in fits:
            for name, r in (fit.get("divergence") or {}).get("models", {}).items():
                vals.setdefault(name, []).append(r["auroc"])
        if vals:
            out[fits[0]["runs"]] = {n: (float(np.mean(v)), float(np.min(v)), float(np.max(v)), len(v))
                                    for n, v in vals.items()}
    return out


def curve_figure(result: dict[str, Any], path: Path) -> Path:
    """Test-run loss@N R² (whole runs, and from the late share of the run on) against collected runs, one line
    per model (mean over folds, with the range), with the aim; a third panel with the divergence AUROC where
    the runs diverge."""
    from matplotlib.figure import Figure

    from stso_env.eval.figures import save_figure

    div = divergence_summary(result)
    fig = Figure(figsize=(16 if div else 11, 4))
    axes = fig.subplots(1, 3 if div else 2)
    axes[1].sharey(axes[0])
    panels: list[tuple[Any, dict[int, dict[str, tuple]], float, str, str]] = [
        (axes[0], summary(result, "loss_r2"), R2_AIM, "whole runs", "loss@N R² on the test runs (mean over folds)"),
        (axes[1], summary(result, "loss_r2_late"), R2_AIM, f"from {result['late_progress']:.0%} of the run on", "")]
    if div:
        panels.append((axes[2], div, AUROC_AIM, f"diverges within {result['horizon']} windows",
                       "divergence AUROC on the test runs"))
    names = list(dict.fromkeys(name for _, table, *_ in panels for name in table[min(table)]))
    color = {name: f"C{i % 10}" for i, name in enumerate(names)}  # one colour per model in every panel
    for ax, table, aim, title, ylabel in panels:
        sizes = sorted(table)
        for name in table[sizes[0]]:
            m, lo, hi = (np.asarray([table[n][name][i] for n in sizes]) for i in range(3))
            ax.plot(sizes, m, marker="o", label=name, color=color[name])
            ax.fill_between(sizes, lo, hi, color=color[name], alpha=0.12)
        ax.axhline(aim, color="black", ls="--", lw=0.8, label=f"aim {aim}")
        ax.set_xlabel("collected runs the models may use")
        ax.set_title(title)
        ax.set_ylim(0.3 if table is div else -0.5, 1.0)
        ax.grid(alpha=0.3)
        if ylabel:
            ax.set_ylabel(ylabel)
    axes[1].legend(fontsize=7)
    if div:
        axes[2].legend(fontsize=7)
    fig.suptitle("Proxy accuracy against the size of the collection")
    fig.tight_layout()
    return save_figure(fig, path)


def write_report(result: dict[str, Any], out: Path, meta: dict[str, Any]) -> Path:
    from stso_env.eval.report import _table, fmt, provenance_lines
    from stso_env.files import write_text_atomic

    first = next(iter(result["sizes"].values()))
    names = list(first[0]["models"])
    sizes = sorted(int(n) for n in result["sizes"])
    late = f"{result['late_progress']:.0%}"
    folds = result["folds"]
    lines = ["# Proxy accuracy against the size of the collection", "",
             *provenance_lines(meta)[:-1], f"{provenance_lines(meta)[-1]}; {meta['seconds']:.0f} s", "",
             f"Log `{meta['log_db']}`; horizon {result['horizon']} windows; proxy action encoding "
             f"`{result['action_encoding']}`, loss head `{result.get('loss_model', 'mlp')}`, divergence head "
             f"`{result.get('divergence_model', 'mlp')}`. "
             f"{len(folds)} fold(s) of test runs (seeds "
             + "; ".join(", ".join(map(str, g)) for g in folds) + f"; {first[0]['test_rows']} rows in the first); "
             "at each size and fold the models may use that many other runs (the smallest seeds), split into "
             "training, validation and calibration runs as `agents.train_proxy` splits a log, and are scored on "
             "the fold's test runs. Each cell: the mean over folds"
             + (" (smallest to largest)" if len(folds) > 1 else "") + f". 'From {late} of the run on' leaves out "
             "the test rows of the first part of each run, whose fast early drop of the loss any model forecasts "
             "from the progress alone and which makes up most of the variance of the change.", ""]

    def cell(v: tuple[float, float, float] | None, digits: int) -> str:
        if v is None:
            return "n/a"
        return fmt(v[0], digits) + (f" ({fmt(v[1], digits)} to {fmt(v[2], digits)})" if len(folds) > 1 else "")

    for key, title in KEYS.items():
        table = summary(result, key)
        lines += [title.format(late=late) + ":", "",
                  *_table(["runs", *(f"`{n}`" for n in names)],
                          [[str(n), *(cell(table[n].get(m), 3) for m in names)] for n in sizes]), ""]
    cover = {n: {lv: float(np.mean([f["proxy_coverage"][lv] for f in result["sizes"][str(n)]]))
                 for lv in first[0]["proxy_coverage"]} for n in sizes}
    lines += ["The proxy's conformal coverage (mean over run-level re-partitions of the calibration and test "
              "runs, as `agents.train_proxy` reports it; mean over folds):", "",
              *_table(["runs", *(f"at {lv}" for lv in first[0]["proxy_coverage"])],
                      [[str(n), *(fmt(v, 3) for v in cover[n].values())] for n in sizes]), ""]
    for key in ("loss_r2", "loss_r2_late"):
        table = summary(result, key)
        reached = {m: [n for n in sizes if table[n].get(m, (-np.inf,))[0] >= R2_AIM] for m in names}
        lines.append(f"Aim R² >= {R2_AIM} ({'whole runs' if key == 'loss_r2' else 'from ' + late + ' on'}), "
                     "mean over folds: " + "; ".join(f"`{m}` " + (f"from {min(r)} runs" if r else "at no size")
                                                     for m, r in reached.items()) + ".")
    div = divergence_summary(result)
    if div:
        names_div = list(div[min(div)])
        counts = {n: [((f.get("divergence") or {}).get("test_diverged", 0), (f.get("divergence") or {})
                       .get("test_rows", 0)) for f in result["sizes"][str(n)]] for n in sizes}
        lines += ["", f"\"The run diverges within {result['horizon']} windows\": AUROC on the test runs (the "
                  "proxy's divergence head against the training rate, a logistic regression and extra trees fitted "
                  "on the same runs, `agents.proxy_baselines`); mean over the folds whose fitting and test runs "
                  "hold both outcomes" + (" (smallest to largest; folds counted)" if len(folds) > 1 else "")
                  + ". Diverging test rows per fold: "
                  + "; ".join(f"{d} of {r}" for d, r in counts[sizes[0]]) + ".", "",
                  *_table(["runs", *(f"`{m}`" for m in names_div)],
                          [[str(n), *((fmt(div[n][m][0], 3) + (f" ({fmt(div[n][m][1], 3)} to "
                                       f"{fmt(div[n][m][2], 3)}; {div[n][m][3]})" if len(folds) > 1 else ""))
                                      for m in names_div)] for n in sorted(div)]), ""]
        reached = {m: [n for n in div if div[n][m][0] >= AUROC_AIM] for m in names_div}
        lines.append(f"Aim AUROC >= {AUROC_AIM}, mean over folds: " + "; ".join(
            f"`{m}` " + (f"from {min(r)} runs" if r else "at no size") for m, r in reached.items()) + ".")
    curve_figure(result, out / "curve.png")
    lines += ["", "![R² against collected runs](curve.png)"]
    path = out / "report.md"
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    from stso_env.proxy.dataset import ACTION_ENCODINGS, DIVERGENCE_MODELS, LOSS_MODELS

    p = argparse.ArgumentParser(prog="python -m agents.proxy_data_curve", description=__doc__.split("\n\n")[0])
    p.add_argument("--log-db", required=True, help="a log database with more runs than the largest size")
    p.add_argument("--test-seeds", type=int, nargs="+", required=True,
                   help="episode seeds of the test runs (never in the pool of their fold)")
    p.add_argument("--sizes", type=int, nargs="+", required=True, help="pool sizes in runs, e.g. 16 32 56")
    p.add_argument("--action-encoding", default="one_hot", choices=ACTION_ENCODINGS,
                   help="the proxy's action encoding (default one_hot, as make train's)")
    p.add_argument("--loss-model", default="mlp", choices=LOSS_MODELS,
                   help="the proxy's loss@N head (default mlp, the MLP ensemble's; trees as make train's)")
    p.add_argument("--divergence-model", default="mlp", choices=DIVERGENCE_MODELS,
                   help="the proxy's divergence head (default mlp, the MLP ensemble's logit, as make train's)")
    p.add_argument("--folds", type=int, default=1,
                   help="cut --test-seeds into this many contiguous groups, each a test set once (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the splits, the proxy and the trees")
    p.add_argument("--out", default="runs/proxy_data_curve", help="output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    from agents.evaluate import publish

    args = parse_args(argv)

    def compute() -> tuple[dict[str, Any], dict[str, Any]]:
        from stso_env.proxy.model import ProxyConfig

        cfg = ProxyConfig(seed=args.seed, action_encoding=args.action_encoding, loss_model=args.loss_model,
                          divergence_model=args.divergence_model)
        return {"log_db": args.log_db}, curve(Path(args.log_db), args.test_seeds, sorted(set(args.sizes)), cfg,
                                              folds=args.folds, progress=not args.no_progress)

    return publish("agents.proxy_data_curve", argv, compute, Path(args.out), "curve.json", write_report)


if __name__ == "__main__":
    raise SystemExit(main())
