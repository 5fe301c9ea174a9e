"""Figures of an evaluation (PNG, matplotlib's Agg canvas; nothing global is changed).

Inputs are the plain dicts ``agents.evaluate`` writes:

* ``results``: ``results.json`` (``controllers -> NAME -> summary -> metric -> {mean, ci95, n}``);
* ``curves``: ``curves.json``, ``{"tau": float, "controllers": {NAME: [per-seed curve, ...]}}`` where a
  per-seed curve is ``{"seed", "global_step": [...], "train_loss": [...], "probe_loss": [...],
  "uncertainty_index": [...], "trigger": [...], "decisions": [{"global_step", "kind", ...}, ...]}``,
  one entry per env window (the one run by ``reset`` first). ``None`` stands for a non-finite value.

Each function saves one PNG and returns its path.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from stso_env.eval.stats import METRICS

DPI = 110


def save_figure(fig: Figure, path: Path) -> Path:
    """Write ``fig`` (a pyplot-free :class:`~matplotlib.figure.Figure`) to ``path`` as PNG; returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=DPI)
    return path


def _as_float(values: Sequence[Any]) -> np.ndarray:
    return np.asarray([math.nan if v is None else float(v) for v in values], dtype=np.float64)


def kept_trajectory(steps: Sequence[int], values: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    """Values by global step, keeping the last record of a step (a rollback re-runs steps; the later
    record is the one the final model went through), sorted by step."""
    by_step: dict[int, float] = {}
    for s, v in zip(steps, _as_float(values)):
        by_step[int(s)] = float(v)
    xs = np.asarray(sorted(by_step), dtype=np.int64)
    return xs, np.asarray([by_step[int(s)] for s in xs], dtype=np.float64)


def _seed_stack(runs: Sequence[Mapping[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """Global steps seen by any seed and a (seeds, steps) array of ``key`` (NaN where a seed has no value)."""
    per_seed = [kept_trajectory(r["global_step"], r[key]) for r in runs]
    grid = np.asarray(sorted({int(s) for xs, _ in per_seed for s in xs}), dtype=np.int64)
    table = np.full((len(per_seed), len(grid)), np.nan)
    pos = {int(s): i for i, s in enumerate(grid)}
    for row, (xs, ys) in enumerate(per_seed):
        for s, y in zip(xs, ys):
            table[row, pos[int(s)]] = y
    return grid, table


def _nan_reduce(fn: Any, table: np.ndarray) -> np.ndarray:
    # all-NaN columns (a step every seed diverged at) stay NaN without numpy's RuntimeWarning
    out = np.full(table.shape[1], np.nan)
    ok = np.isfinite(table).any(axis=0)
    if ok.any():
        out[ok] = fn(table[:, ok], axis=0)
    return out


def loss_curves(curves: Mapping[str, Any], path: Path) -> Path:
    """Training loss and probe loss against the global step: per controller the mean over seeds
    (line) and the range from the lowest to the highest seed (band)."""
    fig = Figure(figsize=(11, 4.2))
    axes = fig.subplots(1, 2)
    for name, runs in curves["controllers"].items():
        if not runs:
            continue
        for ax, key in zip(axes, ("train_loss", "probe_loss")):
            grid, table = _seed_stack(runs, key)
            mean = _nan_reduce(np.nanmean, table)
            (line,) = ax.plot(grid, mean, label=f"{name} (n={len(runs)})", lw=1.4)
            if len(runs) > 1:
                ax.fill_between(grid, _nan_reduce(np.nanmin, table), _nan_reduce(np.nanmax, table),
                                color=line.get_color(), alpha=0.15, lw=0)
    for ax, title in zip(axes, ("training loss (last step of each window)", "probe loss (held-out batch)")):
        ax.set_title(title)
        ax.set_xlabel("global step")
        ax.set_ylabel("loss (nats)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Loss: mean over seeds, band = seed range")
    fig.tight_layout()
    return save_figure(fig, path)


def uncertainty_timeline(curves: Mapping[str, Any], path: Path, *, seed: int | None = None) -> Path:
    """Per controller, for one seed (the first evaluated one by default): the uncertainty index, the
    trigger threshold tau, the windows where the trigger was on (shaded) and the controller's decisions
    (markers at their global step, labelled by kind)."""
    names = [n for n, runs in curves["controllers"].items() if runs]
    fig = Figure(figsize=(11, 1.9 * max(1, len(names)) + 0.6))
    axes = np.atleast_1d(fig.subplots(max(1, len(names)), 1, sharex=True, squeeze=False)[:, 0])
    tau = curves.get("tau")
    for ax, name in zip(axes, names):
        runs = curves["controllers"][name]
        run = next((r for r in runs if seed is None or r["seed"] == seed), runs[0])
        # a rollback re-runs steps: show the trajectory the final model went through
        steps, index = kept_trajectory(run["global_step"], run["uncertainty_index"])
        _, trigger = kept_trajectory(run["global_step"], [float(bool(t)) for t in run["trigger"]])
        ax.plot(steps, index, lw=1.2, color="C0", label="uncertainty index")
        if tau is not None:
            ax.axhline(float(tau), color="C3", ls="--", lw=1, label=f"tau = {float(tau):g}")
        width = _step_width(steps)
        for s, on in zip(steps, trigger):
            if on > 0:
                ax.axvspan(s - width, s, color="C3", alpha=0.12, lw=0)
        finite = index[np.isfinite(index)]
        y_mark = float(finite.max()) if finite.size else 0.0
        kinds = sorted({d.get("kind", "decision") for d in run.get("decisions", [])})
        for k, kind in enumerate(kinds):
            xs = [d["global_step"] for d in run["decisions"] if d.get("kind", "decision") == kind]
            ax.scatter(xs, [y_mark] * len(xs), marker="v", s=36, color=f"C{(k + 4) % 10}", zorder=3,
                       label=f"{kind} ({len(xs)})")
        ax.set_title(f"{name}, seed {run['seed']}", fontsize=9, loc="left")
        ax.set_ylabel("index")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper right")
    axes[-1].set_xlabel("global step")
    fig.suptitle("Uncertainty index, trigger (shaded) and decisions")
    fig.tight_layout()
    return save_figure(fig, path)


def _step_width(steps: np.ndarray) -> float:
    d = np.diff(np.unique(steps))
    return float(d.min()) if d.size else 1.0


def metric_bars(results: Mapping[str, Any], path: Path, metrics: Sequence[str] | None = None) -> Path:
    """One panel per metric: a bar per controller at the mean over seeds, error bars at the 95 % CI
    (none where the interval is undefined, e.g. one seed); a missing mean shows as "n/a"."""
    metrics = list(metrics or METRICS)
    names = list(results["controllers"])
    cols = 4
    rows = math.ceil(len(metrics) / cols)
    fig = Figure(figsize=(3.3 * cols, 2.9 * rows + 0.4))
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    x = np.arange(len(names))
    for ax, metric in zip(axes, metrics):
        means, lo_err, hi_err = [], [], []
        for n in names:
            s = results["controllers"][n]["summary"].get(metric, {})
            m = s.get("mean")
            ci = s.get("ci95")
            means.append(math.nan if m is None else m)
            lo_err.append(0.0 if m is None or ci is None else max(0.0, m - ci[0]))
            hi_err.append(0.0 if m is None or ci is None else max(0.0, ci[1] - m))
        ax.bar(x, np.nan_to_num(means), yerr=[lo_err, hi_err], capsize=3,
               color=[f"C{i % 10}" for i in range(len(names))])
        for i, m in enumerate(means):
            if not math.isfinite(m):
                ax.text(i, 0, "n/a", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(x, names, rotation=45, ha="right", fontsize=8)
        ax.set_title(metric, fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    for ax in axes[len(metrics):]:
        ax.set_visible(False)
    fig.suptitle("Metrics per controller: mean over seeds, 95 % CI")
    fig.tight_layout()
    return save_figure(fig, path)


def make_figures(results: Mapping[str, Any], curves: Mapping[str, Any], out_dir: Path) -> dict[str, Path]:
    """All figures under ``out_dir``; returns ``{figure name: path}``."""
    out_dir = Path(out_dir)
    return {"loss_curves": loss_curves(curves, out_dir / "loss_curves.png"),
            "uncertainty_timeline": uncertainty_timeline(curves, out_dir / "uncertainty_timeline.png"),
            "metric_bars": metric_bars(results, out_dir / "metric_bars.png")}
