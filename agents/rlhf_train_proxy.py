"""Fit the RLHF proxy (return@N and value variance, conformal bounds) on logged episodes and report how well
it predicts held-out episodes.

``python -m agents.train_proxy --env STSO-RLHF-v0 [--logs runs/rlhf_logs] [--horizon 4] [--out DIR]
[--readme-block NAME]``

The logs come from ``python -m agents.rlhf_evaluate --controllers explore --log-dir runs/rlhf_logs``
(seeds 100 on, disjoint from the calibration seeds 0.., the suite's 1000.. and the learned policy's
2000..). Episodes are split by a hash of their key into train (60 %), calibration (20 %) and test
(20 %) (:mod:`stso_env.rlhf.proxy`); the branch controller fits the same proxy the same way.

Writes ``OUT/results.json`` (the figures, with commit, versions and machine), ``OUT/report.md`` and
``OUT/calibration.png`` (realised against predicted return@N on the test episodes, with the 80 %
intervals).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from stso_env.rlhf.proxy import DEFAULT_HORIZON

SWEEP = (1, 2, 3, 4, 5, 6)  # horizons of the cross-validated sweep


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m agents.train_proxy --env STSO-RLHF-v0",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--env", default="STSO-RLHF-v0", choices=("STSO-RLHF-v0",))
    p.add_argument("--logs", default="runs/rlhf_logs", help="folder of log_db.parquet folders (default runs/rlhf_logs)")
    p.add_argument("--horizon", type=int, default=DEFAULT_HORIZON,
                   help=f"N of return@N, in env steps (default {DEFAULT_HORIZON})")
    p.add_argument("--trees", type=int, default=200, help="trees per random forest (default 200)")
    p.add_argument("--out", default="runs/rlhf_proxy")
    p.add_argument("--readme-block", default=None, metavar="NAME",
                   help="also write the report's table between README's results:NAME markers")
    return p.parse_args(argv)


def figure(path: Path, y, mean, lower, upper, horizon: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    order = np.argsort(mean)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    x = np.arange(len(order))
    ax.fill_between(x, lower[order], upper[order], color="tab:blue", alpha=0.25, label="80 % interval")
    ax.plot(x, mean[order], color="tab:blue", label="predicted mean")
    ax.scatter(x, y[order], s=8, color="black", label="realised", zorder=3)
    ax.set_xlabel("held-out rows, by predicted return")
    ax.set_ylabel(f"return@{horizon}")
    ax.set_title("RLHF proxy on held-out episodes")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import sklearn
    import torch

    from agents.evaluate import git_commit, machine
    from stso_env.errors import STSOError
    from stso_env.files import write_text_atomic
    from stso_env.rlhf.proxy import RLHFProxy, cross_validate, read_rlhf_logs, return_rows, split_episodes

    t0 = time.perf_counter()
    try:
        table = read_rlhf_logs(args.logs)
        rows = return_rows(table, args.horizon)
        proxy = RLHFProxy.from_rows(rows, trees=args.trees)
    except STSOError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    sweep = {}
    for h in SWEEP:
        try:
            sweep[h] = cross_validate(return_rows(table, h), trees=args.trees)
        except STSOError:
            continue  # too few rows at that horizon
    test = rows.subset(split_episodes(rows.episode) == 2)
    ev = proxy.evaluate(test)
    out = Path(args.out)
    X = test.features()
    _, iv = proxy.conformal.predict_interval(X)
    figure(out / "calibration.png", test.ret, proxy.mean_forest.predict(X), iv[:, 0, 0], iv[:, 1, 0], args.horizon)
    meta = {"command": "python -m agents.train_proxy " + " ".join(argv if argv is not None else sys.argv[1:]),
            "commit": git_commit(), "machine": machine(),
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "scikit-learn": sklearn.__version__},
            "seconds": time.perf_counter() - t0, "args": vars(args)}
    results = {"meta": meta, "rows": proxy.rows, "episodes": len(set(rows.episode.tolist())), "test": ev,
               "test_non_neutral_rows": ev["rows"] - ev["neutral_rows"], "horizon_sweep": sweep}
    write_text_atomic(out / "results.json", json.dumps(results, indent=2) + "\n")
    c = meta["commit"]
    lines = ["# RLHF proxy: return@N and value variance on held-out episodes", "",
             f"Command: `{meta['command']}`  ",
             f"Commit: {c['commit']}{' (uncommitted changes)' if c['dirty'] else ''}  ",
             f"Machine: {meta['machine']['cpu']}; python {meta['versions']['python']}, scikit-learn "
             f"{meta['versions']['scikit-learn']}; {meta['seconds']:.1f} s", "",
             f"{results['episodes']} episodes; return@{args.horizon} rows (act, then hold): "
             f"train {proxy.rows['train']}, "
             f"calibration {proxy.rows['calibration']}, test {proxy.rows['test']} (whole episodes apart; "
             f"{results['test_non_neutral_rows']} test rows act with a non-neutral action).", "",
             "| metric | value |", "|---|---|",
             f"| coverage of the 80 % interval | {ev['coverage']['80%']:.2f} |",
             f"| coverage of the 90 % interval | {ev['coverage']['90%']:.2f} |",
             f"| Spearman, predicted mean vs realised | {ev['spearman']:.2f} |",
             f"| MAE (constant: the training mean) | {ev['mae']:.3f} ({ev['mae_constant']:.3f}) |",
             f"| mean squared error / mean value variance | {ev['variance_ratio']:.2f} |", "",
             "![realised against predicted](calibration.png)", "",
             "Horizon sweep: grouped 5-fold cross-validation over all episodes (out-of-fold mean forest; the "
             "constant is the training folds' mean).", "",
             "| N | rows | Spearman | MAE (constant) |", "|---|---|---|---|"]
    lines += [f"| {h}{' (used)' if h == args.horizon else ''} | {cv['rows']} | {cv['spearman']:.2f} | "
              f"{cv['mae']:.3f} ({cv['mae_constant']:.3f}) |" for h, cv in sweep.items()] + [""]
    text = "\n".join(lines)
    write_text_atomic(out / "report.md", text)
    if args.readme_block:
        from stso_env.config import REPO_ROOT
        from stso_env.eval.published import replace_readme_block

        block = (f"From `{out / 'report.md'}` (commit {c['commit']}):\n\n" + text.split("\n", 2)[2])
        replace_readme_block(REPO_ROOT / "README.md", args.readme_block,
                             block.replace("](calibration.png)", f"]({out / 'calibration.png'})"))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
