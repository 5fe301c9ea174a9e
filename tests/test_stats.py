"""Paired tests, Holm adjustment and the comparison against the reference controller (known answers)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from stso_env.eval.report import comparison_section
from stso_env.eval.stats import (COMPARE_METRICS, METRICS, align_by_seed, compare_to_reference, holm, paired_test,
                                 success_criteria, summarize_seeds, welch_test)

# ---------------------------------------------------------------------- paired_test


def test_paired_test_known_answer():
    a, b = [1.0, 2.0, 3.0, 4.0], [0.0, 1.0, 2.5, 2.0]
    d = np.array([1.0, 1.0, 0.5, 2.0])  # a - b
    # by hand: mean 1.125, squared deviations 0.015625 + 0.015625 + 0.390625 + 0.765625 = 1.1875 over 3
    sd = math.sqrt(1.1875 / 3)
    assert sd == pytest.approx(d.std(ddof=1), rel=1e-12)
    t = 1.125 / (sd / 2)
    half = sps.t.ppf(0.975, 3) * sd / 2
    r = paired_test(a, b)
    assert (r["n"], r["n_dropped"], r["mean_a"], r["mean_b"], r["mean_diff"]) == (4, 0, 2.5, 1.375, 1.125)
    assert r["sd_diff"] == pytest.approx(sd, rel=1e-12)
    assert r["diff_ci95"] == pytest.approx([1.125 - half, 1.125 + half], rel=1e-12)
    assert r["diff_ci95"] == pytest.approx([0.1238774, 2.1261226], rel=1e-6)  # t(0.975, 3) = 3.1824463
    assert r["rel_change"] == pytest.approx(1.125 / 1.375)
    assert r["rel_change_ci95"] == pytest.approx([(1.125 - half) / 1.375, (1.125 + half) / 1.375], rel=1e-12)
    assert r["cohen_dz"] == pytest.approx(1.125 / sd, rel=1e-12) and r["cohen_dz"] == pytest.approx(1.7881187)
    assert r["t"] == pytest.approx(t, rel=1e-12) and r["t"] == pytest.approx(3.5762374, rel=1e-7)
    assert r["df"] == 3
    assert r["p"] == pytest.approx(2 * sps.t.sf(t, 3), rel=1e-9)
    assert r["p"] == pytest.approx(sps.ttest_rel(a, b).pvalue, rel=1e-12)
    # all four differences positive: the exact signed-rank null puts 1/16 on "no negative rank", two-sided 2/16
    assert r["wilcoxon_stat"] == 0.0 and r["wilcoxon_p"] == pytest.approx(0.125)
    assert r["wilcoxon_p"] == pytest.approx(sps.wilcoxon(a, b).pvalue)
    assert r["reason"] is None and r["wilcoxon_reason"] is None


def test_paired_test_sign_and_symmetry():
    a, b = [5.0, 7.0, 6.5, 9.0, 4.0], [5.5, 6.0, 8.0, 9.5, 5.0]
    r, s = paired_test(a, b), paired_test(b, a)
    assert r["mean_diff"] == pytest.approx(-s["mean_diff"]) and r["t"] == pytest.approx(-s["t"])
    assert r["p"] == pytest.approx(s["p"]) and r["wilcoxon_p"] == pytest.approx(s["wilcoxon_p"])
    assert r["diff_ci95"] == pytest.approx([-s["diff_ci95"][1], -s["diff_ci95"][0]])


def test_paired_test_drops_pairs():
    a = [1.0, None, 3.0, float("nan"), 5.0, 2.0, "x"]
    b = [0.0, 1.0, float("inf"), 2.0, 4.0, 2.5, 1.0]
    r = paired_test(a, b)
    assert (r["n"], r["n_dropped"]) == (3, 4)  # only (1, 0), (5, 4), (2, 2.5) are complete
    kept_a, kept_b = [1.0, 5.0, 2.0], [0.0, 4.0, 2.5]
    assert r["mean_a"] == pytest.approx(np.mean(kept_a)) and r["mean_b"] == pytest.approx(np.mean(kept_b))
    assert r["p"] == pytest.approx(sps.ttest_rel(kept_a, kept_b).pvalue, rel=1e-12)
    assert r["wilcoxon_p"] == pytest.approx(sps.wilcoxon(kept_a, kept_b).pvalue)
    empty = paired_test([None, 1.0], [2.0, None])
    assert empty["n"] == 0 and empty["n_dropped"] == 2 and empty["mean_diff"] is None
    assert empty["p"] is None and empty["wilcoxon_p"] is None and "no pair" in empty["reason"]


def test_paired_test_unequal_lengths():
    with pytest.raises(ValueError, match="a has 3 values, b has 2"):
        paired_test([1, 2, 3], [1, 2])


def test_paired_test_degenerate_cases():
    zero = paired_test([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    assert zero["mean_diff"] == 0.0 and zero["diff_ci95"] == [0.0, 0.0] and zero["cohen_dz"] is None
    assert zero["t"] is None and zero["p"] is None and "no difference" in zero["reason"]
    assert zero["wilcoxon_p"] is None and "all differences are zero" in zero["wilcoxon_reason"]
    # a constant non-zero shift: t undefined (no p = 0 from three runs), the rank test still runs: 2 / 2**3
    shift = paired_test([2.0, 3.0, 4.0], [1.0, 2.0, 3.0])
    assert shift["t"] is None and shift["cohen_dz"] is None and "non-zero" in shift["reason"]
    assert shift["wilcoxon_p"] == pytest.approx(0.25) and shift["wilcoxon_reason"] is None
    # the same shift through float rounding (differences 0.1 +- 1 ulp) is still a constant shift
    noisy = paired_test([1.1, 2.2, 3.3], [1.0, 2.1, 3.2])
    assert noisy["t"] is None and noisy["cohen_dz"] is None and noisy["sd_diff"] == 0.0
    one = paired_test([2.0], [1.0])
    assert one["mean_diff"] == 1.0 and one["diff_ci95"] is None and one["p"] is None
    assert "at least 2" in one["reason"] and "at least 2" in one["wilcoxon_reason"]
    ref_zero = paired_test([1.0, 2.0], [0.0, 0.0])
    assert ref_zero["rel_change"] is None and ref_zero["rel_change_ci95"] is None and ref_zero["p"] is not None


# ---------------------------------------------------------------------- holm


def test_holm_known_answers():
    # by hand, m = 4 sorted: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 = 0.04 -> max(0.06, 0.04)
    adj = holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.005})
    assert list(adj) == ["a", "b", "c", "d"]
    assert [adj[k] for k in "abcd"] == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # None (and NaN) entries stay None and do not count in m
    with_none = holm({"a": 0.01, "x": None, "b": 0.04, "y": float("nan"), "c": 0.03, "d": 0.005})
    assert with_none["x"] is None and with_none["y"] is None
    assert [with_none[k] for k in "abcd"] == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # capped at 1: 0.4*3 and 0.5*2 would exceed it
    assert holm({"a": 0.4, "b": 0.5, "c": 0.9}) == {"a": 1.0, "b": 1.0, "c": 1.0}
    assert holm({"only": 0.2}) == {"only": 0.2}
    assert holm({}) == {} and holm({"a": None}) == {"a": None}
    # ties share one adjusted value
    assert holm({"a": 0.01, "b": 0.01, "c": 0.5}) == pytest.approx({"a": 0.03, "b": 0.03, "c": 0.5})
    with pytest.raises(ValueError, match="outside"):
        holm({"a": 1.5})


def test_holm_monotone_and_matches_definition():
    rng = np.random.default_rng(0)
    p = rng.uniform(0, 0.2, size=12) ** 2
    adj = holm({str(i): float(v) for i, v in enumerate(p)})
    order = np.argsort(p, kind="stable")
    adjusted = np.array([adj[str(i)] for i in order])
    assert np.all(np.diff(adjusted) >= 0) and np.all(adjusted <= 1.0) and np.all(adjusted >= p[order])
    m = p.size
    definition = np.maximum.accumulate(np.minimum(1.0, (m - np.arange(m)) * p[order]))
    assert adjusted == pytest.approx(definition, rel=1e-12)


# ---------------------------------------------------------------------- compare_to_reference


def _runs(values: dict[int, tuple[float | None, float | None]], order: list[int]) -> list[dict]:
    """Per-run records (ppl, model events) by seed, in ``order``; wasted FLOPs left out on purpose."""
    return [{"seed": s, "final_test_ppl": values[s][0], "model_events_per_100k_steps": values[s][1]} for s in order]


@pytest.fixture
def controllers() -> dict:
    # the seed sets the level (20 / 30 / 40): between-seed spread that pairing removes and Welch cannot
    fixed = {0: (20.0, 10.0), 1: (30.0, 12.0), 2: (40.0, 11.0), 3: (100.0, 50.0)}
    good = {0: (18.0, 9.0), 1: (28.2, 13.0), 2: (37.9, 11.5)}   # ppl diffs -2, -1.8, -2.1
    bad = {0: (22.0, None), 1: (32.1, 12.0), 2: (41.9, 10.0)}   # ppl diffs +2, +2.1, +1.9
    meh = {0: (21.0, 10.5), 1: (29.0, 12.5), 2: (40.5, 11.5)}   # ppl diffs +1, -1, +0.5
    out = {"fixed": _runs(fixed, [2, 3, 0, 1]), "good": _runs(good, [0, 1, 2]), "bad": _runs(bad, [1, 0, 2]),
           "meh": _runs(meh, [0, 1, 2])}
    return {name: {"seeds": runs, "summary": summarize_seeds(runs)} for name, runs in out.items()}


def test_metrics_lists():
    assert list(METRICS)[:2] == ["final_test_ppl", "model_events_per_100k_steps"] and len(METRICS) == 12
    assert all(METRICS.values()) and set(COMPARE_METRICS) <= set(METRICS)
    assert "instability_events_per_100k_steps" not in METRICS


def test_align_by_seed(controllers):
    al = align_by_seed(controllers["bad"]["seeds"], controllers["fixed"]["seeds"])
    assert al["seeds"] == [1, 0, 2] and al["only_runs"] == [] and al["only_ref"] == [3]
    assert [r["seed"] for r in al["ref_runs"]] == [1, 0, 2]
    with pytest.raises(ValueError, match="no 'seed'"):
        align_by_seed([{"final_test_ppl": 1.0}], controllers["fixed"]["seeds"])
    with pytest.raises(ValueError, match="more than one run with seed 0"):
        align_by_seed([{"seed": 0}, {"seed": 0}], controllers["fixed"]["seeds"])


def test_compare_to_reference_aligns_by_seed(controllers):
    cmp = compare_to_reference(controllers)
    assert cmp["reference"] == "fixed" and cmp["alpha"] == 0.05 and cmp["note"] is None
    assert cmp["controllers_compared"] == ["good", "bad", "meh"]
    assert list(cmp["metrics"]) == list(COMPARE_METRICS)
    assert cmp["reference_summary"]["final_test_ppl"]["mean"] == pytest.approx(47.5)  # all four fixed runs
    ppl = cmp["metrics"]["final_test_ppl"]
    good = ppl["good"]
    assert good["seeds"] == [0, 1, 2] and good["unmatched_seeds"] == {"controller": [], "reference": [3]}
    # the reference's seed 3 (ppl 100) is left out and its runs are matched by seed, not by position
    assert good["paired"] == paired_test([18.0, 28.2, 37.9], [20.0, 30.0, 40.0])
    assert good["paired"]["mean_b"] == pytest.approx(30.0)
    assert good["paired"]["mean_diff"] == pytest.approx(-5.9 / 3)
    assert good["welch"] == welch_test([18.0, 28.2, 37.9], [20.0, 30.0, 40.0])
    assert ppl["bad"]["paired"] == paired_test([22.0, 32.1, 41.9], [20.0, 30.0, 40.0])
    # pairing is what finds it: Welch on the same runs sees nothing through the seed-to-seed spread
    assert good["paired"]["p"] < 0.01 and good["welch"]["p"] > 0.5
    # the bad controller's missing event count drops its seed-0 pair only
    ev = cmp["metrics"]["model_events_per_100k_steps"]["bad"]["paired"]
    assert (ev["n"], ev["n_dropped"]) == (2, 1) and ev["mean_b"] == pytest.approx(11.5)


def test_compare_to_reference_holm_and_verdicts(controllers):
    cmp = compare_to_reference(controllers)
    ppl = cmp["metrics"]["final_test_ppl"]
    for key, test, p in (("p_holm_paired_t", "paired", "p"), ("p_holm_wilcoxon", "paired", "wilcoxon_p"),
                         ("p_holm_welch", "welch", "p")):
        raw = {n: ppl[n][test][p] for n in ("good", "bad", "meh")}
        assert {n: ppl[n][key] for n in raw} == pytest.approx(holm(raw))
    # Holm by hand over three controllers: smallest raw p times 3, next times 2 (monotone), largest times 1
    raw = sorted((ppl[n]["paired"]["p"], n) for n in ("good", "bad", "meh"))
    assert [n for _, n in raw] == ["bad", "good", "meh"]
    assert ppl["bad"]["p_holm_paired_t"] == pytest.approx(3 * raw[0][0])
    assert ppl["good"]["p_holm_paired_t"] == pytest.approx(max(3 * raw[0][0], 2 * raw[1][0]))
    assert ppl["meh"]["p_holm_paired_t"] == pytest.approx(max(ppl["good"]["p_holm_paired_t"], raw[2][0]))
    assert [ppl[n]["verdict"] for n in ("good", "bad", "meh")] == ["better", "worse", "no_difference"]
    assert ">= 0.05" in ppl["meh"]["verdict_reason"]
    # three positive differences: exact Wilcoxon p is 2 / 2**3 and Holm makes it 0.75 for bad and good
    assert ppl["bad"]["paired"]["wilcoxon_p"] == pytest.approx(0.25)
    assert ppl["bad"]["p_holm_wilcoxon"] == pytest.approx(0.75)
    # no record has the wasted-FLOPs fraction: nothing to test, p stays None through Holm
    wasted = cmp["metrics"]["wasted_flops_fraction"]["good"]
    assert wasted["paired"]["n"] == 0 and wasted["p_holm_paired_t"] is None and wasted["p_holm_welch"] is None
    assert wasted["verdict"] == "no_difference" and "did not run" in wasted["verdict_reason"]


def test_compare_to_reference_without_reference(controllers):
    del controllers["fixed"]
    cmp = compare_to_reference(controllers)
    assert cmp["metrics"] == {} and cmp["controllers_compared"] == [] and "'fixed' was not evaluated" in cmp["note"]
    assert comparison_section(cmp)[-2] == cmp["note"]


def test_success_criteria_m2_is_paired(controllers):
    crit = success_criteria(controllers, method="good")
    m2 = crit["against_reference"]["M2"]
    paired = paired_test([18.0, 28.2, 37.9], [20.0, 30.0, 40.0])
    assert m2["holds"] and m2["test"] == "paired_t" and m2["p"] == pytest.approx(paired["p"])
    assert m2["n_pairs"] == 3 and m2["seeds"] == [0, 1, 2] and m2["ppl_change"] == pytest.approx(-5.9 / 90)
    assert m2["welch"]["p"] == pytest.approx(sps.ttest_ind([18.0, 28.2, 37.9], [20.0, 30.0, 40.0],
                                                           equal_var=False).pvalue)
    assert crit["best_baseline"] == "meh"  # lowest mean final_test_ppl apart from good and fixed (30.17)
    # against meh the differences are -3, -0.8, -2.6: lower on average but paired p = 0.088, so M2 fails
    vs_meh = crit["against_best_baseline"]["M2"]
    assert not vs_meh["holds"] and vs_meh["mean_diff"] == pytest.approx(-6.4 / 3)
    assert vs_meh["p"] == pytest.approx(sps.ttest_rel([18.0, 28.2, 37.9], [21.0, 29.0, 40.5]).pvalue)
    assert vs_meh["p"] == pytest.approx(0.0877, abs=5e-4)
    # M1 uses the summaries (all runs): no record has the wasted fraction, so it cannot hold
    m1 = crit["against_reference"]["M1"]
    assert not m1["holds"] and m1["events_change"] == pytest.approx((33.5 / 3) / 20.75 - 1)
    assert "wasted-FLOPs change undefined" in m1["reason"]


def test_comparison_section_renders(controllers):
    cmp = compare_to_reference(controllers)
    md = "\n".join(comparison_section(cmp))
    assert "## Paired comparison against `fixed`" in md
    assert md.count("### `") == len(COMPARE_METRICS)
    assert ("| controller | mean | mean diff vs fixed [95 % CI] | rel. change [95 % CI] | d_z | paired t p (Holm) "
            "| Wilcoxon p (Holm) | Welch p (Holm) | verdict |") in md
    g = cmp["metrics"]["final_test_ppl"]["good"]
    lo, hi = g["paired"]["diff_ci95"]
    assert f"| **good** (n=3) | 28.03 | -1.967 [{lo:.3g}, {hi:.3g}] | -6.6 % [" in md
    assert f"[{lo:.3g}, {hi:.3g}]" == "[-2.35, -1.59]"
    row = next(line for line in md.splitlines() if line.startswith("| **good** (n=3) | 28.03 |"))
    assert row.endswith("| better |")
    assert "| **bad** (n=3) |" in md and "| worse |" in md and "| no difference |" in md
    assert "| `fixed` (reference) | 47.5 ± " in md
    assert "- bad: 1 pair(s) dropped (missing value); seeds left out: only fixed ran [3]" in md
    assert "| **good** (n=0) | n/a | n/a | n/a | n/a |" in md
