"""Statistics of an evaluation: per-metric means with 95 % confidence intervals, paired and unpaired
tests of every controller against the reference controller ``fixed``, Holm-adjusted p-values, verdicts
and the success criteria.

Everything takes plain Python numbers (``None`` and NaN allowed) and returns
plain JSON-ready dicts: a value that cannot be computed is ``None`` with a
``reason`` (or ``note``) saying why, never NaN.

Missing values: ``None``, NaN and infinities are dropped before any statistic
and the number dropped is reported (``n_dropped``), so a diverged run whose
perplexity is undefined shows up as a smaller ``n`` rather than as a silent NaN.
In a paired test a whole pair is dropped when either of its values is missing.

Pairing: the harness runs every controller on the same seeds, and a seed fixes
the data order, the initialisation and the injected instabilities, so runs of
two controllers on one seed are correlated. :func:`paired_test` tests the mean
per-seed difference (paired t-test, Wilcoxon signed-rank
``1945_Wilcoxon_SignedRank``), which removes the between-seed spread that
Welch's unpaired test (``1947_Welch_TTest``, :func:`welch_test`) has to carry;
with a handful of seeds that is most of the power. :func:`compare_to_reference`
lines runs up by their ``"seed"`` key (only seeds both controllers have) and
reports both. Effect size is Cohen's ``d_z`` = mean difference / SD of the
differences (``1988_Cohen_EffectSize``). With ``n`` non-zero differences the
exact two-sided Wilcoxon p cannot go below ``2 / 2**n`` (0.25 with 3 seeds,
0.0625 with 5), so it needs at least 6 seeds to reach 0.05 at all.

Multiple comparisons: for each metric, the p-values of the controllers compared
with the reference form one family and are adjusted with Holm's step-down
method (:func:`holm`, ``1979_Holm_StepDown``), separately for the paired t, the
Wilcoxon and the Welch p-values. The verdict of a controller on a metric is
``better`` / ``worse`` when the Holm-adjusted paired-t p is below ``alpha`` and the
mean difference goes the good / bad way, else ``no_difference`` (no difference
shown, which includes a test that could not run; ``verdict_reason`` says why).

Zero variance: when both samples of a t-test have zero variance (for the
paired test: the differences are all equal) the t statistic is undefined
(scipy returns NaN or inf). Declaring ``p = 0`` for different constant means
would claim certainty that two or three runs cannot give, so the test returns
``t = p = df = None`` with ``reason`` saying whether the means are equal or not;
criteria that need a p-value then do not hold, and the verdict is
``no_difference``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats as sps

#: The per-run metrics of ``agents.evaluate`` in report order; ``True`` marks lower-is-better.
METRICS: dict[str, bool] = {
    "final_test_ppl": True,
    "model_events_per_100k_steps": True,
    "data_events_per_100k_steps": True,
    "mean_time_to_recover_steps": True,
    "recovery_flops_fraction": True,
    "wasted_flops_fraction": True,
    "total_flops": True,
    "tuning_flops": True,
    "final_val_ppl": True,
    "branch_invoke_rate": True,
    "proxy_latency_ms": True,
    "checkpoint_io_seconds": True,
}

#: The metrics :func:`compare_to_reference` tests by default (all lower-is-better).
COMPARE_METRICS: tuple[str, ...] = ("final_test_ppl", "model_events_per_100k_steps", "wasted_flops_fraction")

#: Significance level of the verdicts of :func:`compare_to_reference` (on Holm-adjusted p-values).
COMPARE_ALPHA = 0.05

#: Success criteria thresholds (relative changes of means against the reference controller).
M1_EVENTS_DROP = 0.30
M1_WASTED_DROP = 0.20
M2_ALPHA = 0.05

#: Verdicts of :func:`compare_to_reference`.
VERDICTS = ("better", "worse", "no_difference")


def _as_float(v: Any) -> float:
    """``v`` as a float; NaN for None, bools and anything that is not a number."""
    if v is None or isinstance(v, bool):
        return math.nan
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def finite_values(values: Iterable[Any]) -> tuple[np.ndarray, int]:
    """The finite numbers of ``values`` as floats, and how many entries were dropped (None, NaN, inf)."""
    kept: list[float] = []
    dropped = 0
    for v in values:
        f = _as_float(v)
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
    """Welch's two-sided t-test of ``mean(a) - mean(b)`` (``scipy.stats.ttest_ind(equal_var=False)``,
    ``1947_Welch_TTest``): unpaired, for samples that are not aligned by seed.

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


def _negligible_spread(d: np.ndarray, scale: float) -> bool:
    """Whether the differences ``d`` are equal up to the rounding of the subtractions that made them.

    Subtracting the same shift from values of size ``scale`` leaves differences that disagree in the last
    bits; taken at face value they give a tiny SD and an absurd t (scipy warns of catastrophic
    cancellation), so they count as equal.
    """
    return float(np.ptp(d)) <= 4.0 * np.finfo(np.float64).eps * scale


def paired_test(a: Sequence[Any], b: Sequence[Any]) -> dict[str, Any]:
    """Paired comparison of ``a`` and ``b``, per-seed values aligned by index (``a[i]`` and ``b[i]`` come
    from the same seed), on the differences ``d = a - b``.

    A pair is dropped when either value is None, NaN or infinite (``n_dropped``). Returns:

    * ``n``, ``n_dropped``: pairs used and pairs dropped;
    * ``mean_a``, ``mean_b``: means over the pairs used; ``mean_diff``: ``mean(d) = mean_a - mean_b``;
    * ``sd_diff``: SD of ``d`` (ddof=1);
    * ``diff_ci95``: ``[lo, hi]``, the 95 % t-interval ``mean(d) +- t(0.975, n-1) * sd(d) / sqrt(n)``;
    * ``rel_change``: ``mean_diff / |mean_b|``; ``rel_change_ci95``: ``diff_ci95 / |mean_b|`` (None when
      ``mean_b`` is 0);
    * ``cohen_dz``: ``mean(d) / sd(d)``, Cohen's d_z (``1988_Cohen_EffectSize``), None when ``sd(d)`` is 0;
    * ``t``, ``p``, ``df``: two-sided paired t-test (``scipy.stats.ttest_rel``, ``df = n - 1``);
      ``reason``: None when it ran, else why these are None (fewer than 2 pairs, equal differences);
    * ``wilcoxon_stat``, ``wilcoxon_p``: two-sided Wilcoxon signed-rank test (``scipy.stats.wilcoxon``,
      zero differences dropped, ``1945_Wilcoxon_SignedRank``); ``wilcoxon_reason``: None when it ran,
      else why they are None (fewer than 2 pairs, all differences zero).

    Raises ``ValueError`` when ``a`` and ``b`` differ in length (they cannot be aligned).
    """
    a, b = list(a), list(b)
    if len(a) != len(b):
        raise ValueError(f"paired_test needs two samples aligned by seed: a has {len(a)} values, b has {len(b)}")
    kept_a: list[float] = []
    kept_b: list[float] = []
    for va, vb in zip(a, b):
        fa, fb = _as_float(va), _as_float(vb)
        if math.isfinite(fa) and math.isfinite(fb):
            kept_a.append(fa)
            kept_b.append(fb)
    xa, xb = np.asarray(kept_a, dtype=np.float64), np.asarray(kept_b, dtype=np.float64)
    n = int(xa.size)
    out: dict[str, Any] = {"n": n, "n_dropped": len(a) - n, "mean_a": None, "mean_b": None, "mean_diff": None,
                           "sd_diff": None, "diff_ci95": None, "rel_change": None, "rel_change_ci95": None,
                           "cohen_dz": None, "t": None, "p": None, "df": None, "wilcoxon_stat": None,
                           "wilcoxon_p": None, "wilcoxon_reason": None, "reason": None}
    if n == 0:
        out["reason"] = out["wilcoxon_reason"] = "no pair with finite values on both sides"
        return out
    d = xa - xb
    mean_b = float(xb.mean())
    mean_diff = float(d.mean())
    out.update(mean_a=float(xa.mean()), mean_b=mean_b, mean_diff=mean_diff,
               rel_change=mean_diff / abs(mean_b) if mean_b != 0 else None)
    if n < 2:
        out["reason"] = out["wilcoxon_reason"] = f"needs at least 2 complete pairs (have {n})"
        return out
    scale = float(max(np.abs(xa).max(), np.abs(xb).max()))
    sd = 0.0 if _negligible_spread(d, scale) else float(d.std(ddof=1))
    half = float(sps.t.ppf(0.975, n - 1) * sd / math.sqrt(n))
    out["sd_diff"] = sd
    out["diff_ci95"] = [mean_diff - half, mean_diff + half]
    if mean_b != 0:
        out["rel_change_ci95"] = [(mean_diff - half) / abs(mean_b), (mean_diff + half) / abs(mean_b)]
    if sd == 0.0:
        out["reason"] = ("all differences are equal (zero variance) and zero: no difference to test"
                         if mean_diff == 0 else
                         "all differences are equal (zero variance) and non-zero: the t statistic is undefined")
    else:
        out["cohen_dz"] = mean_diff / sd
        res = sps.ttest_rel(xa, xb)
        t, p = float(res.statistic), float(res.pvalue)
        if math.isfinite(t) and math.isfinite(p):
            out.update(t=t, p=p, df=n - 1)
        else:
            out["reason"] = "the t statistic is not finite (degenerate differences)"
    if not np.any(d != 0):
        out["wilcoxon_reason"] = "all differences are zero: the signed-rank test has nothing to rank"
    else:
        res = sps.wilcoxon(xa, xb, alternative="two-sided")
        w, p = float(res.statistic), float(res.pvalue)
        if math.isfinite(w) and math.isfinite(p):
            out.update(wilcoxon_stat=w, wilcoxon_p=p)
        else:
            out["wilcoxon_reason"] = "the signed-rank statistic is not finite (degenerate differences)"
    return out


def holm(pvalues: Mapping[str, float | None]) -> dict[str, float | None]:
    """Holm–Bonferroni step-down adjusted p-values (``1979_Holm_StepDown``), same keys as ``pvalues``.

    With the ``m`` p-values that are not None sorted ascending, ``p_(1) <= ... <= p_(m)``, the adjusted
    value of ``p_(i)`` is ``max_{j <= i} min(1, (m - j + 1) * p_(j))``: monotone in the raw p-values and
    capped at 1. Rejecting where the adjusted p is below ``alpha`` controls the family-wise error rate at
    ``alpha`` under any dependence between the tests. None (and NaN) entries stay None and do not count in
    ``m``. Raises ``ValueError`` for a p-value outside ``[0, 1]``.
    """
    given: list[tuple[str, float]] = []
    for key, p in pvalues.items():
        f = _as_float(p)
        if math.isnan(f):
            continue
        if not 0.0 <= f <= 1.0:
            raise ValueError(f"p-value of {key!r} is {p!r}, outside [0, 1]")
        given.append((key, f))
    out: dict[str, float | None] = {key: None for key in pvalues}
    m = len(given)
    running = 0.0
    # a stable sort keeps ties in input order; the running maximum gives tied p-values one adjusted value
    for i, (key, p) in enumerate(sorted(given, key=lambda kv: kv[1])):
        running = max(running, min(1.0, (m - i) * p))
        out[key] = running
    return out


# ---------------------------------------------------------------------- over a whole evaluation


def metric_values(seeds: Sequence[Mapping[str, Any]], metric: str) -> list[Any]:
    """One metric over the per-seed records of a controller (missing keys count as None)."""
    return [s.get(metric) for s in seeds]


def summarize_seeds(seeds: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """``{metric: mean_ci95(...)}`` for every metric in :data:`METRICS`."""
    return {m: mean_ci95(metric_values(seeds, m)) for m in METRICS}


def _by_seed(runs: Sequence[Mapping[str, Any]], who: str) -> dict[Any, Mapping[str, Any]]:
    out: dict[Any, Mapping[str, Any]] = {}
    for run in runs:
        if "seed" not in run:
            raise ValueError(f"a run of {who} has no 'seed' key; paired tests align runs by seed")
        if run["seed"] in out:
            # two runs on one seed make the pairing ambiguous; picking one would hide a harness bug
            raise ValueError(f"{who} has more than one run with seed {run['seed']!r}")
        out[run["seed"]] = run
    return out


def align_by_seed(runs: Sequence[Mapping[str, Any]], ref_runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Runs of two controllers lined up by their ``"seed"`` key, for paired tests.

    Returns ``{"seeds": [...], "runs": [...], "ref_runs": [...], "only_runs": [...], "only_ref": [...]}``:
    the seeds both have (in the order of ``runs``) with the matching runs of each side, and the seeds only
    one side has. Raises ``ValueError`` when a run has no ``"seed"`` or a seed occurs twice on one side.
    """
    mine, ref = _by_seed(runs, "the controller"), _by_seed(ref_runs, "the reference")
    seeds = [s for s in mine if s in ref]
    return {"seeds": seeds, "runs": [mine[s] for s in seeds], "ref_runs": [ref[s] for s in seeds],
            "only_runs": [s for s in mine if s not in ref], "only_ref": [s for s in ref if s not in mine]}


def _verdict(diff: float | None, p_adj: float | None, alpha: float, lower_is_better: bool) -> tuple[str, str]:
    if p_adj is None or diff is None:
        return "no_difference", "the paired t-test did not run"
    if p_adj >= alpha:
        return "no_difference", f"Holm-adjusted paired t p = {p_adj:.3g} >= {alpha:g}"
    if diff == 0:
        return "no_difference", "the mean difference is zero"
    good = (diff < 0) == lower_is_better
    return ("better" if good else "worse"), f"Holm-adjusted paired t p = {p_adj:.3g} < {alpha:g}"


def compare_to_reference(controllers: Mapping[str, Mapping[str, Any]], reference: str = "fixed",
                         metrics: Sequence[str] = COMPARE_METRICS, *, alpha: float = COMPARE_ALPHA
                         ) -> dict[str, Any]:
    """Every controller against ``reference`` on ``metrics``, paired by seed, with Holm-adjusted p-values.

    ``controllers`` maps a name to ``{"seeds": [per-run dicts with a "seed" key], "summary": ...}``. For
    each controller other than the reference, its runs are lined up with the reference's by ``"seed"``
    (:func:`align_by_seed`; seeds only one side has are left out and listed), and on those seeds, per
    metric, ``a`` = the controller and ``b`` = the reference:

    * ``paired``: :func:`paired_test` (paired t, Wilcoxon signed-rank, d_z, CIs of the difference);
    * ``welch``: :func:`welch_test` on the same seeds, the unpaired view (``1947_Welch_TTest``);
    * ``p_holm_paired_t``, ``p_holm_wilcoxon``, ``p_holm_welch``: :func:`holm` over the controllers compared
      on that metric, each kind of p-value its own family (``1979_Holm_StepDown``);
    * ``verdict``: ``better`` / ``worse`` when ``p_holm_paired_t < alpha`` and the mean difference goes the
      good / bad way for the metric (:data:`METRICS`), else ``no_difference``; ``verdict_reason`` says why;
    * ``seeds``: the seeds compared; ``unmatched_seeds``: ``{"controller": [...], "reference": [...]}``.

    Returns ``{"reference", "alpha", "metrics": {metric: {controller: {...}}}, "controllers_compared",
    "reference_summary": {metric: mean_ci95 over all the reference's runs}, "note"}``; ``note`` is None
    unless the reference was not evaluated (then ``metrics`` is empty).
    """
    out: dict[str, Any] = {"reference": reference, "alpha": alpha, "metrics": {}, "controllers_compared": [],
                           "reference_summary": {}, "note": None}
    if reference not in controllers:
        out["note"] = (f"the reference controller {reference!r} was not evaluated; "
                       "no comparisons against it")
        return out
    ref_runs = controllers[reference]["seeds"]
    names = [n for n in controllers if n != reference]
    aligned = {n: align_by_seed(controllers[n]["seeds"], ref_runs) for n in names}
    out["controllers_compared"] = names
    out["reference_summary"] = {m: mean_ci95(metric_values(ref_runs, m)) for m in metrics}
    for metric in metrics:
        block: dict[str, dict[str, Any]] = {}
        for n in names:
            al = aligned[n]
            a, b = metric_values(al["runs"], metric), metric_values(al["ref_runs"], metric)
            block[n] = {"seeds": al["seeds"],
                        "unmatched_seeds": {"controller": al["only_runs"], "reference": al["only_ref"]},
                        "paired": paired_test(a, b), "welch": welch_test(a, b)}
        adjusted = {key: holm({n: block[n][test][p] for n in names})
                    for key, test, p in (("p_holm_paired_t", "paired", "p"),
                                         ("p_holm_wilcoxon", "paired", "wilcoxon_p"),
                                         ("p_holm_welch", "welch", "p"))}
        for n in names:
            for key, adj in adjusted.items():
                block[n][key] = adj[n]
            block[n]["verdict"], block[n]["verdict_reason"] = _verdict(
                block[n]["paired"]["mean_diff"], block[n]["p_holm_paired_t"], alpha, METRICS.get(metric, True))
        out["metrics"][metric] = block
    return out


def reference_tests(controllers: Mapping[str, Mapping[str, Any]], reference: str = "fixed") -> dict[str, Any]:
    """Welch tests (``1947_Welch_TTest``) of every controller against ``reference`` on ``final_test_ppl``
    and ``model_events_per_100k_steps``, over all runs of each (``a`` = the controller, ``b`` = the
    reference): ``{name: {"final_test_ppl": welch_test(...), "model_events_per_100k_steps": ...}}``.

    The unpaired view; :func:`compare_to_reference` has the paired tests. Returns ``{}`` when the
    reference is not among the controllers.
    """
    if reference not in controllers:
        return {}
    ref = controllers[reference]["seeds"]
    return {name: {m: welch_test(metric_values(c["seeds"], m), metric_values(ref, m))
                   for m in ("final_test_ppl", "model_events_per_100k_steps")}
            for name, c in controllers.items() if name != reference}


def _summary_mean(controller: Mapping[str, Any], metric: str) -> float | None:
    return controller["summary"].get(metric, {}).get("mean")


def _criteria_against(controllers: Mapping[str, Mapping[str, Any]], method: str, ref: str) -> dict[str, Any]:
    """M1 and M2 of ``method`` against ``ref`` (see :func:`success_criteria`)."""
    ev_m, ev_r = (_summary_mean(controllers[x], "model_events_per_100k_steps") for x in (method, ref))
    wa_m, wa_r = (_summary_mean(controllers[x], "wasted_flops_fraction") for x in (method, ref))
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
    al = align_by_seed(controllers[method]["seeds"], controllers[ref]["seeds"])
    a, b = metric_values(al["runs"], "final_test_ppl"), metric_values(al["ref_runs"], "final_test_ppl")
    test, welch = paired_test(a, b), welch_test(a, b)
    lower = test["mean_diff"] is not None and test["mean_diff"] < 0
    m2 = {"holds": bool(lower and test["p"] is not None and test["p"] < M2_ALPHA), "test": "paired_t",
          "ppl_mean": test["mean_a"], "ppl_mean_ref": test["mean_b"], "ppl_change": test["rel_change"],
          "ppl_change_ci95": test["rel_change_ci95"], "mean_diff": test["mean_diff"],
          "diff_ci95": test["diff_ci95"], "cohen_dz": test["cohen_dz"], "n_pairs": test["n"],
          "n_dropped": test["n_dropped"], "seeds": al["seeds"], "p": test["p"], "t": test["t"], "df": test["df"],
          "wilcoxon_p": test["wilcoxon_p"], "alpha": M2_ALPHA, "reason": test["reason"],
          "welch": {k: welch[k] for k in ("t", "p", "df", "n_a", "n_b", "reason")}}
    return {"reference": ref, "M1": m1, "M2": m2}


#: The methods held to the success criteria, and all of STSO's own controllers (the branch method, its
#: ablations and the learned policy), which are never a method's "best single baseline".
METHODS = ("stso", "policy")
OURS = ("stso", "rule", "proxy_only", "single_trigger", "policy")


def ours(variants: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """:data:`OURS` and the labels of suite variants (label -> controller) of one of them."""
    return OURS + tuple(label for label, ctrl in (variants or {}).items() if ctrl in OURS)


def best_baseline(controllers: Mapping[str, Mapping[str, Any]], exclude: Iterable[str]) -> str | None:
    """The controller outside ``exclude`` with the lowest mean ``final_test_ppl`` (None if there is none)."""
    skip = set(exclude)
    scored = [(_summary_mean(c, "final_test_ppl"), name) for name, c in controllers.items() if name not in skip]
    scored = [(m, name) for m, name in scored if m is not None]
    return min(scored)[1] if scored else None


def success_criteria(controllers: Mapping[str, Mapping[str, Any]], method: str = "stso",
                     reference: str = "fixed", exclude: Iterable[str] = ()) -> dict[str, Any]:
    """The success criteria of ``method`` against ``reference`` and against the best single baseline.

    * **M1**: mean model-instability events per 100k steps (``model_events_per_100k_steps``) down by at
      least 30 % **and** mean wasted-FLOPs fraction down by at least 20 % (relative change of the means
      over all runs of each controller).
    * **M2**: mean final test perplexity (``final_test_ppl``) lower, with paired t-test p < 0.05 over the
      seeds both controllers ran (pairs with a missing perplexity dropped). Welch's unpaired test on the
      same seeds is reported beside it (``M2["welch"]``) but does not decide.

    The best single baseline is the controller other than ``method``, ``reference`` and ``exclude`` (the
    method's own ablations and sibling methods, which are not baselines) with the lowest mean final test
    perplexity. ``controllers`` maps names to ``{"seeds": [...], "summary": {...}}``; the
    per-run records need a ``"seed"`` key (see :func:`align_by_seed`).
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
    best = best_baseline(controllers, (method, reference, *exclude))
    out["best_baseline"] = best
    if best is not None:
        out["against_best_baseline"] = _criteria_against(controllers, method, best)
    else:
        notes.append("no other baseline with a finite mean perplexity was evaluated")
    out["note"] = "; ".join(notes) or None
    return out
