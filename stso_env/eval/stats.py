"""Statistics of an evaluation: per-metric means with 95 % confidence intervals, Welch's t-test,
the per-controller tests against the fixed schedule and the success criteria.

Everything takes plain Python numbers (``None`` and NaN allowed) and returns
plain JSON-ready dicts: a value that cannot be computed is ``None`` with a
``reason`` (or ``note``) saying why, never NaN.

Missing values: ``None``, NaN and infinities are dropped before any statistic
and the number dropped is reported (``n_dropped``), so a diverged run whose
perplexity is undefined shows up as a smaller ``n`` rather than as a silent NaN.

Zero variance: when both samples of a t-test have zero variance the t
statistic is undefined (scipy returns NaN). Declaring ``p = 0`` for different
constant means would claim certainty that two or three runs cannot give, so
the test returns ``t = p = df = None`` with ``reason`` saying whether the
means are equal or not; criteria that need a p-value then do not hold.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats as sps

#: The per-run metrics of ``agents.evaluate`` in report order; ``True`` marks lower-is-better.
METRICS: dict[str, bool] = {
    "instability_events_per_100k_steps": True,
    "mean_time_to_recover_steps": True,
    "wasted_flops_fraction": True,
    "total_flops": True,
    "final_val_ppl": True,
    "branch_invoke_rate": True,
    "proxy_latency_ms": True,
    "checkpoint_io_seconds": True,
}

#: Success criteria thresholds (relative changes of means against the reference controller).
M1_EVENTS_DROP = 0.30
M1_WASTED_DROP = 0.20
M2_ALPHA = 0.05


def finite_values(values: Iterable[Any]) -> tuple[np.ndarray, int]:
    """The finite numbers of ``values`` as floats, and how many entries were dropped (None, NaN, inf)."""
    kept: list[float] = []
    dropped = 0
    for v in values:
        x = None if v is None or isinstance(v, bool) else v
        try:
            f = float(x) if x is not None else math.nan
        except (TypeError, ValueError):
            f = math.nan
        if math.isfinite(f):
            kept.append(f)
        else:
            dropped += 1
    return np.asarray(kept, dtype=np.float64), dropped


def mean_ci95(values: Iterable[Any]) -> dict[str, Any]:
    """Mean and two-sided 95 % t-interval ``mean +- t(0.975, n-1) * s / sqrt(n)`` of the finite values.

    Returns ``{"mean", "ci95": [lo, hi] or None, "n", "n_dropped"}``; ``ci95`` is None for ``n < 2``
    (no spread to estimate), ``mean`` is None for ``n == 0``.
    """
    x, dropped = finite_values(values)
    n = int(x.size)
    out: dict[str, Any] = {"mean": None, "ci95": None, "n": n, "n_dropped": dropped}
    if n == 0:
        return out
    m = float(x.mean())
    out["mean"] = m
    if n >= 2:
        half = float(sps.t.ppf(0.975, n - 1) * x.std(ddof=1) / math.sqrt(n))
        out["ci95"] = [m - half, m + half]
    return out


def welch_df(var_a: float, n_a: int, var_b: float, n_b: int) -> float:
    """Welch–Satterthwaite degrees of freedom from the two sample variances (ddof=1) and sizes."""
    qa, qb = var_a / n_a, var_b / n_b
    return (qa + qb) ** 2 / (qa**2 / (n_a - 1) + qb**2 / (n_b - 1))


def welch_test(a: Iterable[Any], b: Iterable[Any]) -> dict[str, Any]:
    """Welch's two-sided t-test of ``mean(a) - mean(b)`` (``scipy.stats.ttest_ind(equal_var=False)``).

    Returns ``{"t", "p", "df", "mean_a", "mean_b", "n_a", "n_b", "n_dropped_a", "n_dropped_b", "reason"}``;
    ``reason`` is None when the test ran, else why ``t``/``p``/``df`` are None (fewer than 2 finite values
    on a side, or zero variance on both sides).
    """
    xa, da = finite_values(a)
    xb, db = finite_values(b)
    out: dict[str, Any] = {"t": None, "p": None, "df": None,
                           "mean_a": float(xa.mean()) if xa.size else None,
                           "mean_b": float(xb.mean()) if xb.size else None,
                           "n_a": int(xa.size), "n_b": int(xb.size), "n_dropped_a": da, "n_dropped_b": db,
                           "reason": None}
    if xa.size < 2 or xb.size < 2:
        out["reason"] = f"needs at least 2 finite values per side (have {xa.size} and {xb.size})"
        return out
    va, vb = float(xa.var(ddof=1)), float(xb.var(ddof=1))
    if va == 0.0 and vb == 0.0:
        same = out["mean_a"] == out["mean_b"]
        out["reason"] = ("zero variance in both samples and equal means: no difference to test" if same else
                         "zero variance in both samples with different means: the t statistic is undefined")
        return out
    res = sps.ttest_ind(xa, xb, equal_var=False)
    t, p = float(res.statistic), float(res.pvalue)
    if not (math.isfinite(t) and math.isfinite(p)):
        out["reason"] = "the t statistic is not finite (degenerate samples)"
        return out
    out["t"], out["p"] = t, p
    out["df"] = float(welch_df(va, int(xa.size), vb, int(xb.size)))
    return out


def relative_change(new: float | None, ref: float | None) -> float | None:
    """``(new - ref) / |ref|``; None when either is missing or ``ref`` is 0."""
    if new is None or ref is None or ref == 0:
        return None
    return (new - ref) / abs(ref)


# ---------------------------------------------------------------------- over a whole evaluation


def metric_values(seeds: Sequence[Mapping[str, Any]], metric: str) -> list[Any]:
    """One metric over the per-seed records of a controller (missing keys count as None)."""
    return [s.get(metric) for s in seeds]


def summarize_seeds(seeds: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """``{metric: mean_ci95(...)}`` for every metric in :data:`METRICS`."""
    return {m: mean_ci95(metric_values(seeds, m)) for m in METRICS}


def reference_tests(controllers: Mapping[str, Mapping[str, Any]], reference: str = "fixed") -> dict[str, Any]:
    """Welch tests of every controller against ``reference`` on ``final_val_ppl`` and
    ``instability_events_per_100k_steps`` (``a`` = the controller, ``b`` = the reference).

    Returns ``{}`` when the reference is not among the controllers.
    """
    if reference not in controllers:
        return {}
    ref = controllers[reference]["seeds"]
    return {name: {"final_val_ppl": welch_test(metric_values(c["seeds"], "final_val_ppl"),
                                               metric_values(ref, "final_val_ppl")),
                   "instability_events": welch_test(metric_values(c["seeds"], "instability_events_per_100k_steps"),
                                                    metric_values(ref, "instability_events_per_100k_steps"))}
            for name, c in controllers.items() if name != reference}


def _criteria_against(controllers: Mapping[str, Mapping[str, Any]], method: str, ref: str) -> dict[str, Any]:
    """M1 and M2 of ``method`` against ``ref`` (see :func:`success_criteria`)."""
    sm, sr = controllers[method]["summary"], controllers[ref]["summary"]
    ev_m, ev_r = sm["instability_events_per_100k_steps"]["mean"], sr["instability_events_per_100k_steps"]["mean"]
    wa_m, wa_r = sm["wasted_flops_fraction"]["mean"], sr["wasted_flops_fraction"]["mean"]
    ev_change, wa_change = relative_change(ev_m, ev_r), relative_change(wa_m, wa_r)
    m1_reasons = []
    if ev_change is None:
        m1_reasons.append("event change undefined (a mean is missing or the reference mean is 0)")
    if wa_change is None:
        m1_reasons.append("wasted-FLOPs change undefined (a mean is missing or the reference mean is 0)")
    m1 = {"holds": bool(ev_change is not None and wa_change is not None and ev_change <= -M1_EVENTS_DROP
                        and wa_change <= -M1_WASTED_DROP),
          "events_mean": ev_m, "events_mean_ref": ev_r, "events_change": ev_change,
          "wasted_mean": wa_m, "wasted_mean_ref": wa_r, "wasted_change": wa_change,
          "required": {"events_change": -M1_EVENTS_DROP, "wasted_change": -M1_WASTED_DROP},
          "reason": "; ".join(m1_reasons) or None}
    test = welch_test(metric_values(controllers[method]["seeds"], "final_val_ppl"),
                      metric_values(controllers[ref]["seeds"], "final_val_ppl"))
    lower = test["mean_a"] is not None and test["mean_b"] is not None and test["mean_a"] < test["mean_b"]
    m2 = {"holds": bool(lower and test["p"] is not None and test["p"] < M2_ALPHA),
          "ppl_mean": test["mean_a"], "ppl_mean_ref": test["mean_b"],
          "ppl_change": relative_change(test["mean_a"], test["mean_b"]), "p": test["p"], "t": test["t"],
          "df": test["df"], "alpha": M2_ALPHA, "reason": test["reason"]}
    return {"reference": ref, "M1": m1, "M2": m2}


def best_baseline(controllers: Mapping[str, Mapping[str, Any]], exclude: Iterable[str]) -> str | None:
    """The controller outside ``exclude`` with the lowest mean ``final_val_ppl`` (None if there is none)."""
    skip = set(exclude)
    scored = [(c["summary"]["final_val_ppl"]["mean"], name) for name, c in controllers.items()
              if name not in skip and c["summary"]["final_val_ppl"]["mean"] is not None]
    return min(scored)[1] if scored else None


def success_criteria(controllers: Mapping[str, Mapping[str, Any]], method: str = "stso",
                     reference: str = "fixed") -> dict[str, Any]:
    """The success criteria of ``method`` against ``reference`` and against the best single baseline.

    * **M1**: mean instability events per 100k steps down by at least 30 % **and** mean wasted-FLOPs
      fraction down by at least 20 % (relative change of the means).
    * **M2**: mean final validation perplexity lower, with Welch's p < 0.05.

    The best single baseline is the controller other than ``method`` and ``reference`` with the lowest
    mean final validation perplexity. ``controllers`` maps names to ``{"seeds": [...], "summary": {...}}``.
    """
    out: dict[str, Any] = {"method": method, "reference": reference, "against_reference": None,
                           "best_baseline": None, "against_best_baseline": None, "note": None}
    if method not in controllers:
        out["note"] = f"controller {method!r} was not evaluated; the success criteria are not assessed"
        return out
    notes = []
    if reference in controllers:
        out["against_reference"] = _criteria_against(controllers, method, reference)
    else:
        notes.append(f"the reference controller {reference!r} was not evaluated")
    best = best_baseline(controllers, (method, reference))
    out["best_baseline"] = best
    if best is not None:
        out["against_best_baseline"] = _criteria_against(controllers, method, best)
    else:
        notes.append("no other baseline with a finite mean perplexity was evaluated")
    out["note"] = "; ".join(notes) or None
    return out
