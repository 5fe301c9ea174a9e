"""Evaluation statistics, report, figures and the ``agents.evaluate`` harness on a tiny budget."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps

from agents import evaluate
from stso_env.eval.figures import make_figures
from stso_env.eval.report import render_report
from stso_env.eval.stats import (METRICS, compare_to_reference, mean_ci95, reference_tests, success_criteria,
                                 summarize_seeds, welch_test)

# ---------------------------------------------------------------------- statistics


def test_welch_matches_formula_and_scipy():
    a, b = [1, 2, 3, 4, 5], [2, 4, 6, 8, 10]
    # by hand: means 3 and 6, variances 2.5 and 10, n = 5
    se2 = 2.5 / 5 + 10 / 5
    t = (3 - 6) / math.sqrt(se2)
    df = se2**2 / ((2.5 / 5) ** 2 / 4 + (10 / 5) ** 2 / 4)
    p = 2 * sps.t.sf(abs(t), df)
    w = welch_test(a, b)
    assert w["t"] == pytest.approx(t) and w["t"] == pytest.approx(-1.8973666, rel=1e-6)
    assert w["df"] == pytest.approx(df) and w["df"] == pytest.approx(5.8823529, rel=1e-6)
    assert w["p"] == pytest.approx(p, rel=1e-9)
    assert w["p"] == pytest.approx(sps.ttest_ind(a, b, equal_var=False).pvalue, rel=1e-12)
    assert (w["mean_a"], w["mean_b"], w["n_a"], w["n_b"], w["reason"]) == (3.0, 6.0, 5, 5, None)


def test_welch_drops_missing_and_degenerate_cases():
    w = welch_test([1, 2, None, float("nan"), 3], [2, 4, 6, float("inf")])
    assert (w["n_a"], w["n_dropped_a"], w["n_b"], w["n_dropped_b"]) == (3, 2, 3, 1)
    assert w["p"] == pytest.approx(sps.ttest_ind([1, 2, 3], [2, 4, 6], equal_var=False).pvalue)
    same = welch_test([1, 1, 1], [1, 1])
    assert same["p"] is None and "equal means" in same["reason"]
    differ = welch_test([1, 1, 1], [2, 2])
    assert differ["p"] is None and "different means" in differ["reason"]
    few = welch_test([1], [1, 2])
    assert few["p"] is None and "at least 2" in few["reason"]


def test_mean_ci95_known_value():
    s = mean_ci95([1, 2, 3, 4, 5])
    half = 2.7764451 * math.sqrt(2.5) / math.sqrt(5)  # t(0.975, 4) * s / sqrt(n)
    assert s["mean"] == 3.0 and s["n"] == 5
    assert s["ci95"] == pytest.approx([3 - half, 3 + half], rel=1e-6)
    assert s["ci95"] == pytest.approx([1.0367568, 4.9632432], rel=1e-6)
    one = mean_ci95([7.0, None])
    assert one == {"mean": 7.0, "ci95": None, "n": 1, "n_dropped": 1}
    assert mean_ci95([None])["mean"] is None


# ---------------------------------------------------------------------- report and figures


def _synthetic_results() -> dict:
    data = {  # events per 100k, wasted fraction, final ppl
        "fixed": ([10, 12, 11], [0.10, 0.12, 0.11], [30.0, 31.0, 32.0]),
        "zclip": ([9, 10, 11], [0.10, 0.11, 0.10], [28.0, 29.0, 28.5]),
        "stso": ([5, 6, 5], [0.05, 0.06, 0.05], [25.0, 25.5, 26.0]),
    }
    controllers = {}
    for name, (ev, wa, ppl) in data.items():
        seeds = [{m: 1.0 for m in METRICS} | {"model_events_per_100k_steps": e, "wasted_flops_fraction": w,
                                               "final_test_ppl": p, "seed": i}
                 for i, (e, w, p) in enumerate(zip(ev, wa, ppl))]
        controllers[name] = {"seeds": seeds, "summary": summarize_seeds(seeds)}
    return {"settings": {"eval_name": "eval__spiky__0", "steps": 20, "seeds": 3}, "controllers": controllers,
            "tests": reference_tests(controllers), "criteria": success_criteria(controllers),
            "comparison": compare_to_reference(controllers),
            "figures": {"loss_curves": "figures/loss_curves.png"}}


def test_criteria_and_report_render():
    results = _synthetic_results()
    crit = results["criteria"]
    ref = crit["against_reference"]
    assert ref["M1"]["holds"] and ref["M1"]["events_change"] == pytest.approx(16 / 3 / 11 - 1)
    assert ref["M2"]["holds"] and ref["M2"]["p"] < 0.05
    assert crit["best_baseline"] == "zclip"
    md = render_report(results)
    assert "| **stso** | 3 |" in md and "| **fixed** | 3 |" in md
    assert "| **zclip** | `final_test_ppl` |" in md
    assert f"25.5 ± {(results['controllers']['stso']['summary']['final_test_ppl']['ci95'][1] - 25.5):.2g}" in md
    assert "## Paired comparison against `fixed`" in md and "### `final_test_ppl`" in md
    assert results["comparison"]["metrics"]["final_test_ppl"]["stso"]["verdict"] == "better"
    assert "- M1 vs `fixed` **holds**" in md and "- M2 vs `fixed` **holds**" in md
    assert "Best single baseline" in md and "- M1 vs `zclip`" in md
    assert "![loss_curves](figures/loss_curves.png)" in md
    # without the method, the criteria are skipped with a note
    del results["controllers"]["stso"]
    results["criteria"] = success_criteria(results["controllers"])
    assert "'stso' was not evaluated" in render_report(results)


def _cell(scenario: str, ppl: dict[str, list[float]], events: dict[str, list[float]]) -> dict:
    controllers = {}
    for name in ppl:
        seeds = [{m: 0.1 for m in METRICS} | {"final_test_ppl": p, "model_events_per_100k_steps": e,
                                              "wasted_flops_fraction": e / 100, "seed": i}
                 for i, (p, e) in enumerate(zip(ppl[name], events[name]))]
        controllers[name] = {"seeds": seeds, "summary": summarize_seeds(seeds)}
    return {"scenario": scenario, "controllers": controllers, "criteria": evaluate.criteria(controllers),
            "comparison": compare_to_reference(controllers), "headroom": {"available": False}}


def test_suite_criteria_per_method_with_known_answers():
    from stso_env.eval.published import criteria_lines, suite_summary

    fixed = [10.0, 10.5, 11.0, 10.2, 10.8]
    spiky = _cell("spiky", {"fixed": fixed, "zclip": [p - 0.3 for p in fixed],
                            "rule": [p - 2.0 for p in fixed],  # an ablation: never the best baseline
                            "stso": [p - 1.0 + 0.01 * i for i, p in enumerate(fixed)],
                            "policy": [p + 0.5 + 0.01 * i for i, p in enumerate(fixed)]},
                  {"fixed": [10.0] * 5, "zclip": [9.0] * 5, "rule": [9.0] * 5, "stso": [5.0] * 5,
                   "policy": [9.0] * 5})
    calm = _cell("calm", {"fixed": fixed, "zclip": fixed, "rule": fixed,
                          "stso": [p + d for p, d in zip(fixed, (0.02, -0.03, 0.01, -0.01, 0.0))],
                          "policy": [p + 1.0 + 0.01 * i for i, p in enumerate(fixed)]},
                 {n: [1.0] * 5 for n in ("fixed", "zclip", "rule", "stso", "policy")})
    assert [c["method"] for c in spiky["criteria"]] == ["stso", "policy"]
    assert spiky["criteria"][0]["best_baseline"] == "zclip"  # rule has lower perplexity, but is ours
    crit = suite_summary({"spiky": spiky, "calm": calm})["criteria"]
    stso, policy = crit["stso"], crit["policy"]
    assert stso["stress_cells"] == ["spiky"] and stso["calm_cells"] == ["calm"]
    assert stso["M1_cells"] == ["spiky"] and stso["M2_cells"] == ["spiky"] and stso["calm_harm"] == []
    assert stso["cells"]["spiky"]["events_change"] == pytest.approx(-0.5)
    # ranks by mean test ppl: rule, stso, zclip, fixed, policy on spiky; stso, then the tie fixed, rule, zclip
    # (by name), then policy on calm: fixed (4 + 2) / 2 = 3 is the best-ranked baseline, zclip 3.5
    assert stso["worse_than_best"] == [] and stso["best_baseline_by_rank"] == "fixed"
    assert stso["mean_rank"] == 1.5 and stso["best_baseline_mean_rank"] == 3.0
    assert stso["mean_rank"] < stso["best_baseline_mean_rank"] and stso["better_mean_rank"]
    assert policy["M1_cells"] == [] and policy["M2_cells"] == [] and policy["calm_harm"] == ["calm"]
    assert policy["worse_than_best"] == ["spiky", "calm"] and not policy["better_mean_rank"]
    md = "\n".join(criteria_lines(crit))
    assert "`stso`: M1 holds on 1/1 stress cells, M2 on 1/1; on `calm` no significant harm" in md
    assert "`policy`: M1 holds on 0/1 stress cells, M2 on 0/1; on `calm` significant harm" in md


def test_a_variant_of_a_method_is_held_to_the_criteria():
    from stso_env.eval.published import suite_summary

    fixed = [10.0, 10.5, 11.0, 10.2, 10.8]
    ppl = {"fixed": fixed, "zclip": [p - 0.3 for p in fixed],
           "policy_old": [p - 2.0 for p in fixed],  # a sibling variant: never the best baseline
           "policy_new": [p - 1.0 + 0.01 * i for i, p in enumerate(fixed)]}
    cell = _cell("spiky", ppl, {"fixed": [10.0] * 5, "zclip": [9.0] * 5, "policy_old": [5.0] * 5,
                                "policy_new": [6.0] * 5})
    variants = {"policy_old": "policy", "policy_new": "policy", "zclip_tight": "zclip"}
    cell["criteria"] = evaluate.criteria(cell["controllers"], variants)
    # no stso or policy ran: each policy variant is held to the criteria, in the variants' order
    assert [c["method"] for c in cell["criteria"]] == ["policy_old", "policy_new"]
    new = cell["criteria"][1]
    assert new["best_baseline"] == "zclip"
    assert new["against_reference"]["M1"]["events_change"] == pytest.approx(-0.4)
    assert new["against_reference"]["M2"]["holds"]
    crit = suite_summary({"spiky": cell}, variants)["criteria"]
    assert crit["policy_new"]["M2_cells"] == ["spiky"] and crit["policy_new"]["best_baseline_by_rank"] == "zclip"
    # without the variants named, only the methods themselves count
    assert [c["method"] for c in evaluate.criteria(cell["controllers"])] == ["stso"]


def test_ablation_steps_with_known_answers():
    from stso_env.eval.published import ablation_lines, ablation_step

    fixed = [10.0, 10.5, 11.0, 10.2, 10.8]
    ppl = {"fixed": fixed, "rule": fixed,
           "proxy_only": [p - 1.0 + 0.01 * i for i, p in enumerate(fixed)],  # the proxy helps: -1.0 vs the rule
           "stso": [p - 0.5 + 0.02 * i for i, p in enumerate(fixed)],  # forks give back half of it
           "single_trigger": fixed}
    cell = _cell("spiky", ppl, {n: [1.0] * 5 for n in ppl})
    step = ablation_step(cell, "proxy_only", "rule")
    assert step["mean_diff"] == pytest.approx(-1.0 + 0.02) and step["n"] == 5 and step["p"] < 1e-6
    forks = ablation_step(cell, "stso", "proxy_only")
    assert forks["mean_diff"] == pytest.approx(0.5 + 0.02) and forks["p"] < 1e-4
    assert ablation_step(cell, "stso", "pbt") is None  # not in the cell
    md = "\n".join(ablation_lines({"spiky": cell}, {"rule": 4.0, "proxy_only": 1.0, "stso": 2.0,
                                                    "single_trigger": 4.0}))
    assert "| `spiky` | +0.0 % (p n/a) | -9.3 % (p " in md  # rule equals fixed; proxy_only -0.98 on 10.5
    assert "| mean rank | 4.00 | 1.00 | 2.00 | 4.00 |" in md
    assert "(B vs A): lowers test perplexity significantly in 1 of 1 cells, raises it significantly in 0." in md
    assert "(C vs B): lowers test perplexity significantly in 0 of 1 cells, raises it significantly in 1." in md
    no_ablation = _cell("spiky", {"fixed": fixed, "zclip": fixed}, {"fixed": [1.0] * 5, "zclip": [1.0] * 5})
    assert ablation_lines({"spiky": no_ablation}, {}) == []


def test_variant_lines_compare_each_variant_with_its_controller():
    from stso_env.eval.published import variant_lines

    fixed = [10.0, 10.5, 11.0, 10.2, 10.8]
    ppl = {"fixed": fixed, "stso": fixed, "stso_b": [p - 1.0 + 0.01 * i for i, p in enumerate(fixed)]}
    cell = _cell("spiky", ppl, {n: [1.0] * 5 for n in ppl})
    variants = {"stso_b": {"controller": "stso", "proxy": "runs/b/proxy", "settings": {"top_k": 1},
                           "policy": "runs/b/policy.zip"},
                "hd_fast": {"controller": "hd", "settings": {"beta": 0.001}}}  # hd never ran: left out
    md = "\n".join(variant_lines({"spiky": cell}, variants))
    assert "| cell | `stso_b` vs `stso` |" in md and "hd_fast" not in md
    assert "| `spiky` | -9.3 % (p " in md  # -0.98 on a mean of 10.5
    assert "- `stso_b`: `stso` with top_k: 1, policy `runs/b/policy.zip`, proxy `runs/b/proxy`." in md
    assert variant_lines({"spiky": cell}, {}) == []


def test_figures_from_synthetic_curves(tmp_path: Path):
    results = _synthetic_results()
    steps = [10, 20, 30, 20, 30]  # a rollback from step 30 to step 10 and two windows re-run
    run = {"global_step": steps, "train_loss": [4.0, 3.5, None, 3.4, 3.2], "probe_loss": [4.1, 3.6, 9.0, 3.5, 3.3],
           "uncertainty_index": [0.0, 7.0, 8.0, 1.0, 0.5], "trigger": [False, True, True, False, False],
           "decisions": [{"global_step": 30, "kind": "branch"}]}
    curves = {"tau": 6.0, "controllers": {n: [dict(run, seed=s) for s in (0, 1)] for n in results["controllers"]}}
    paths = make_figures(results, curves, tmp_path / "figures")
    assert sorted(paths) == ["loss_curves", "metric_bars", "uncertainty_timeline"]
    for p in paths.values():
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------- the harness


def test_main_run_steps():
    assert evaluate.main_run_steps(100, 1.0, 10) == 100
    assert evaluate.main_run_steps(100, 0.25, 10) == 20  # 25 rounded down to whole windows
    assert evaluate.main_run_steps(100, 0.01, 10) == 20  # at least two windows (reset runs the first)


@pytest.mark.parametrize("args, message", [
    (["--controllers", "fixed,nope"], "unknown controller(s) nope; allowed: fixed"),
    (["--seeds", "0"], "--seeds must be >= 1"),
    (["--steps", "25", "--decision-interval", "10"], "multiple of --decision-interval (10)"),
    (["--steps", "10", "--decision-interval", "10"], "at least two windows"),
    (["--controllers", "fixed,stso"], "--proxy DIR is required for stso"),
    (["--controllers", "policy"], "--policy PATH is required"),
])
def test_cli_errors(args, message, capsys, tmp_path: Path):
    with pytest.raises(SystemExit) as exc:
        evaluate.main([*args, "--out", str(tmp_path / "out"), "--no-progress"])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_settings_come_from_a_file_or_inline_yaml(tmp_path: Path, capsys):
    _, parser = evaluate.parse_args([])
    f = tmp_path / "s.yaml"
    f.write_text("pbt: {population: 3}\nstso:\n")
    assert evaluate.load_settings(str(f), parser) == {"pbt": {"population": 3}, "stso": {}}
    assert evaluate.load_settings("stso: {top_k: 1, replan_schedule: true}", parser) == {
        "stso": {"top_k": 1, "replan_schedule": True}}
    for bad, message in [(str(tmp_path / "missing.yaml"), "no such file; give a YAML file or an inline mapping"),
                         ("nope: {a: 1}", "unknown controller(s) ['nope']"),
                         ("stso: 3", "expected a mapping"), ("stso: {top_k: [", "not valid YAML")]:
        with pytest.raises(SystemExit):
            evaluate.load_settings(bad, parser)
        assert message in capsys.readouterr().err


@pytest.fixture
def registered(monkeypatch) -> None:
    """Use the real ``fixed`` / ``zclip`` controllers; only when their module is not there yet, stand in the
    neutral base controller so the harness itself is still tested."""
    from agents import controllers

    for name in ("fixed", "zclip"):
        module, _ = controllers.CONTROLLERS[name]
        if importlib.util.find_spec(module) is None:
            monkeypatch.setitem(controllers.CONTROLLERS, name, ("agents.controllers.base", "Controller"))


@pytest.fixture
def one_thread():
    """One torch thread: on a shared two-core machine a two-thread pool under contention is many times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_harness_tiny_budget(tmp_path: Path, registered, one_thread):
    out = tmp_path / "eval"
    results = evaluate.main(["--controllers", "fixed,zclip", "--seeds", "2", "--steps", "20",
                             "--decision-interval", "10", "--preset", "tiny", "--tokenizer", "byte",
                             "--scenario", "spiky", "--corpus", "builtin", "--builtin-chars", "20000",
                             "--val-windows", "8", "--device", "cpu", "--seed-offset", "0", "--out", str(out),
                             "--no-progress"])
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["complete"] is True and on_disk == json.loads(json.dumps(results))
    budget = on_disk["settings"]["budget_flops"]
    assert budget > 0 and on_disk["settings"]["seed_list"] == [0, 1]
    for name in ("fixed", "zclip"):
        c = on_disk["controllers"][name]
        assert [s["seed"] for s in c["seeds"]] == [0, 1]
        for s in c["seeds"]:
            assert set(METRICS) <= set(s)
            assert s["total_flops"] == pytest.approx(budget)  # a full 20-step run is exactly the budget
            assert s["branch_invoke_rate"] == 0.0 and s["proxy_latency_ms"] is None
            assert 0.0 <= s["wasted_flops_fraction"] <= 1.0 and s["final_val_ppl"] > 1.0
            # The final score reads the whole (small) test split; the lineage is the 2 windows run.
            assert s["final_test_ppl"] > 1.0 and s["test_tokens"] == (s["split_tokens"]["test"] - 1) // 64 * 64
            assert s["lineage"]["lineage_steps"] == 20 and s["lineage"]["lineage_windows"] == 2
            assert s["accounting"]["main_steps"] == 20 and s["stop_reason"] == "schedule_end"
        for m in METRICS:
            assert set(c["summary"][m]) >= {"mean", "ci95", "n"}
        assert c["summary"]["final_test_ppl"]["n"] == 2 and len(c["summary"]["final_test_ppl"]["ci95"]) == 2
    assert set(on_disk["tests"]) == {"zclip"}
    assert set(on_disk["tests"]["zclip"]) == {"final_test_ppl", "model_events_per_100k_steps"}
    paired = on_disk["comparison"]["metrics"]["final_test_ppl"]["zclip"]
    assert paired["seeds"] == [0, 1] and paired["verdict"] in ("better", "worse", "no_difference")
    assert on_disk["headroom"]["available"] is False  # no oracle in this evaluation
    assert [c["method"] for c in on_disk["criteria"]] == ["stso"] and "not evaluated" in on_disk["criteria"][0]["note"]
    curves = json.loads((out / "curves.json").read_text())
    run = curves["controllers"]["fixed"][0]
    assert run["global_step"] == [10, 20] and len(run["uncertainty_index"]) == 2 and "decisions" in run
    md = (out / "report.md").read_text()
    assert "| **fixed** | 2 |" in md and "### `final_test_ppl`" in md
    for rel in on_disk["figures"].values():
        assert (out / rel).read_bytes()[:4] == b"\x89PNG"
    assert np.isfinite(on_disk["controllers"]["fixed"]["summary"]["total_flops"]["mean"])


def test_budget_use_known_answer():
    from stso_env.eval.published import budget_use

    def rec(main, ver, rb, branches, stop):
        return {"stop_reason": stop, "accounting": {
            "budget_flops": 100.0, "main_steps": main, "episode_steps": 600, "branch_invocations": branches,
            "tracker_wasted_by_reason": {"verification": ver, "rollback": rb}}}

    u = budget_use([rec(400, 30.0, 2.0, 1, "budget"), rec(500, 20.0, 0.0, 2, "schedule_end")])
    assert u["main_steps"] == 450 and u["episode_steps"] == 600 and u["branches_per_run"] == 1.5
    assert u["verification_share"] == pytest.approx(0.25) and u["rollback_share"] == pytest.approx(0.01)
    assert u["stop_reasons"] == {"budget": 1, "schedule_end": 1}
    assert budget_use([{"stop_reason": "x"}]) == {}
