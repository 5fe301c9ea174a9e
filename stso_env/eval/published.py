"""The committed results of a suite (``assets/results/<suite>/``) and the README tables made from them.

:func:`publish_suite` writes, from the per-cell results of ``agents.evaluate --suite``:

* ``results.json``: compact and committed: the command, commit, versions, thread count, workers and
  machine; per cell the split sizes, per-controller summaries and per-seed headline metrics, the
  paired comparison against ``fixed`` (Holm-corrected), the oracle's headroom; a suite summary
  (per cell: headroom, which baselines beat or lose to ``fixed`` significantly; mean ranks; the success
  criteria of ``stso`` and ``policy``, :func:`criteria_summary`).
* ``report.md`` and ``figures/`` (suite figures plus each cell's loss curves and metric bars).

:func:`readme_tables` renders the README's result block from ``results.json``; the README holds it
between ``<!-- results:<suite>:begin -->`` and ``<!-- results:<suite>:end -->``, and
``python -m agents.evaluate --update-readme`` (or :func:`update_readme`) rewrites it. A test fails
when the two differ, so no result is ever typed by hand.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from stso_env.eval.report import _table, comparison_section, fmt, fmt_pct, fmt_summary, write_json_atomic
from stso_env.eval.stats import COMPARE_METRICS, METRICS, ours
from stso_env.files import write_text_atomic

REFERENCE = "fixed"
ORACLE = "oracle"
#: The cell scenario where no control is needed: the criterion there is "no significant harm".
CALM = "calm"
#: Per-seed values kept in the compact results (the full records stay in the runs folder).
HEADLINE = ("final_test_ppl", "model_events_per_100k_steps", "data_events_per_100k_steps",
            "mean_time_to_recover_steps", "recovery_flops_fraction", "wasted_flops_fraction", "tuning_flops",
            "final_val_ppl", "had_model_event", "diverged")


def budget_use(records: list[Mapping[str, Any]]) -> dict[str, Any]:
    """Where a controller's budget went, mean over its runs: optimizer steps of the main run, shares of the
    budget spent on verification forks and on rolled-back steps, branch invocations per run, stop reasons."""
    acc = [r.get("accounting") or {} for r in records]
    if not acc or any("budget_flops" not in a for a in acc):
        return {}

    def share(a: Mapping[str, Any], reason: str) -> float:
        return float((a.get("tracker_wasted_by_reason") or {}).get(reason, 0.0)) / float(a["budget_flops"])

    stops = Counter(str(r.get("stop_reason")) for r in records)
    return {"main_steps": float(np.mean([a.get("main_steps", 0) for a in acc])),
            "episode_steps": float(np.mean([a.get("episode_steps", 0) for a in acc])),
            "verification_share": float(np.mean([share(a, "verification") for a in acc])),
            "rollback_share": float(np.mean([share(a, "rollback") for a in acc])),
            "branches_per_run": float(np.mean([a.get("branch_invocations", 0) for a in acc])),
            "stop_reasons": dict(sorted(stops.items()))}


def _compact_cell(results: Mapping[str, Any]) -> dict[str, Any]:
    settings = results["settings"]
    return {
        "scenario": settings["scenario"], "corpus": settings["corpus"], "tokenizer": settings["tokenizer"],
        "split_tokens": settings.get("split_tokens"), "budget_flops": settings.get("budget_flops"),
        "test_tokens_scored": next(iter(results["controllers"].values()))["seeds"][0].get("test_tokens"),
        "controllers": {n: {"summary": c["summary"],
                            "seeds": [{"seed": r["seed"], **{k: r.get(k) for k in HEADLINE}} for r in c["seeds"]],
                            "describe": settings["controller_setup"].get(n, {}).get("describe"),
                            "budget_use": budget_use(c["seeds"])}
                        for n, c in results["controllers"].items()},
        "comparison": results["comparison"], "headroom": results["headroom"], "criteria": results["criteria"],
    }


def _mean(cell: Mapping[str, Any], name: str, metric: str) -> float | None:
    c = cell["controllers"].get(name)
    return None if c is None else c["summary"][metric]["mean"]


def suite_summary(cells: Mapping[str, Mapping[str, Any]], variants: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Per cell: headroom and the controllers significantly better / worse than ``fixed`` (Holm-corrected
    paired t) per compared metric; across cells: mean rank of each controller by mean test perplexity and
    by mean model events (1 = best; the oracle is left out)."""
    per_cell: dict[str, Any] = {}
    ranks: dict[str, dict[str, list[float]]] = {m: {} for m in ("final_test_ppl", "model_events_per_100k_steps")}
    for cname, cell in cells.items():
        verdicts = {}
        for metric, block in cell["comparison"].get("metrics", {}).items():
            verdicts[metric] = {v: sorted(n for n, r in block.items() if r["verdict"] == v)
                                for v in ("better", "worse")}
        per_cell[cname] = {"headroom": cell["headroom"], "verdicts": verdicts,
                           "fixed_test_ppl": _mean(cell, REFERENCE, "final_test_ppl"),
                           "fixed_event_rate": _fraction_with_event(cell, REFERENCE)}
        for metric in ranks:
            vals = {n: _mean(cell, n, metric) for n in cell["controllers"] if n != ORACLE}
            order = sorted((v if v is not None else math.inf, n) for n, v in vals.items())
            for pos, (_, n) in enumerate(order, start=1):
                ranks[metric].setdefault(n, []).append(pos)
    mean_rank = {m: {n: float(np.mean(r)) for n, r in sorted(v.items(), key=lambda kv: np.mean(kv[1]))}
                 for m, v in ranks.items()}
    return {"cells": per_cell, "mean_rank": mean_rank, "criteria": criteria_summary(cells, mean_rank, variants)}


def _criteria_blocks(cell: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    crit = cell.get("criteria")
    if not crit:
        return []
    return [crit] if isinstance(crit, Mapping) else list(crit)


def _significantly_higher(m2: Mapping[str, Any]) -> bool:
    """Whether an M2 block finds the method's test perplexity higher, with paired p below its alpha."""
    return bool(m2["mean_diff"] is not None and m2["mean_diff"] > 0 and m2["p"] is not None
                and m2["p"] < m2["alpha"])


def criteria_summary(cells: Mapping[str, Mapping[str, Any]], mean_rank: Mapping[str, Mapping[str, float]],
                     variants: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The research guide's success criteria per method across the suite.

    Per stress cell (every scenario but ``calm``): M1 and M2 against ``fixed``; on ``calm``: no significant
    harm (test perplexity not higher with paired p < 0.05); in every cell: not significantly worse than the
    cell's best single baseline (same test). Across cells: the method's mean rank by test perplexity against
    the best mean rank of any baseline (STSO's own controllers, their suite ``variants`` (label -> controller)
    and the oracle left out).
    """
    out: dict[str, Any] = {}
    methods = [b["method"] for c in cells.values() for b in _criteria_blocks(c) if b.get("against_reference")]
    for method in dict.fromkeys(methods):
        rows, stress = {}, []
        for cname, cell in cells.items():
            block = next((b for b in _criteria_blocks(cell) if b["method"] == method), None)
            if block is None or not block.get("against_reference"):
                continue
            ref, best = block["against_reference"], block.get("against_best_baseline")
            m2 = ref["M2"]
            harm = _significantly_higher(m2)
            worse_best = bool(best) and _significantly_higher(best["M2"])
            is_calm = cell["scenario"] == CALM
            rows[cname] = {"calm": is_calm, "M1": ref["M1"]["holds"], "M2": m2["holds"], "harm": harm,
                           "events_change": ref["M1"]["events_change"], "wasted_change": ref["M1"]["wasted_change"],
                           "ppl_change": m2["ppl_change"], "p": m2["p"], "best_baseline": block.get("best_baseline"),
                           "best_ppl_change": best["M2"]["ppl_change"] if best else None,
                           "best_p": best["M2"]["p"] if best else None, "worse_than_best": worse_best}
            if not is_calm:
                stress.append(cname)
        ranks = mean_rank.get("final_test_ppl", {})
        baselines = {n: r for n, r in ranks.items() if n not in (method, *ours(variants))}
        best_rank = min(baselines.items(), key=lambda kv: kv[1]) if baselines else None
        calm = [n for n, r in rows.items() if r["calm"]]
        out[method] = {
            "cells": rows, "stress_cells": stress,
            "M1_cells": [n for n in stress if rows[n]["M1"]], "M2_cells": [n for n in stress if rows[n]["M2"]],
            "calm_harm": [n for n in calm if rows[n]["harm"]], "calm_cells": calm,
            "worse_than_best": [n for n, r in rows.items() if r["worse_than_best"]],
            "mean_rank": ranks.get(method), "best_baseline_by_rank": best_rank[0] if best_rank else None,
            "best_baseline_mean_rank": best_rank[1] if best_rank else None,
            "better_mean_rank": bool(best_rank and ranks.get(method) is not None and ranks[method] < best_rank[1]),
        }
    return out


def _fraction_with_event(cell: Mapping[str, Any], name: str) -> float | None:
    c = cell["controllers"].get(name)
    if not c or not c["seeds"]:
        return None
    return float(np.mean([bool(s.get("had_model_event")) for s in c["seeds"]]))


# ---------------------------------------------------------------------- figures


def headroom_figure(cells: Mapping[str, Mapping[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(cells)
    ppl = [100 * (cells[n]["headroom"].get("ppl_gain") or 0.0) for n in names]
    ev = [100 * (cells[n]["headroom"].get("events_drop") or 0.0) for n in names]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(names) + 2), 4))
    ax.bar(x - 0.2, ppl, 0.4, label="test perplexity gain (%)")
    ax.bar(x + 0.2, ev, 0.4, label="model events drop (%)")
    ax.axhline(100 * 0.10, color="grey", ls="--", lw=0.8, label="10 %")
    ax.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("oracle over fixed (%)")
    ax.set_title("Headroom per cell: what a hindsight oracle gains over the fixed schedule")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def comparison_heatmap(cells: Mapping[str, Mapping[str, Any]], path: Path, metric: str = "final_test_ppl") -> Path:
    """Controllers x cells: relative change of the metric's mean against ``fixed``; * marks a Holm-significant
    paired difference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({n for c in cells.values() for n in c["comparison"].get("metrics", {}).get(metric, {})})
    cols = list(cells)
    table = np.full((len(names), len(cols)), np.nan)
    marks = [["" for _ in cols] for _ in names]
    for j, c in enumerate(cols):
        block = cells[c]["comparison"].get("metrics", {}).get(metric, {})
        for i, n in enumerate(names):
            r = block.get(n)
            if r and r["paired"]["rel_change"] is not None:
                table[i, j] = 100 * r["paired"]["rel_change"]
                marks[i][j] = "*" if r["verdict"] in ("better", "worse") else ""
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(cols) + 3), 0.45 * len(names) + 2))
    lim = np.nanmax(np.abs(table)) if np.isfinite(table).any() else 1.0
    im = ax.imshow(table, cmap="RdYlGn_r", vmin=-lim, vmax=lim, aspect="auto")
    for i in range(len(names)):
        for j in range(len(cols)):
            if np.isfinite(table[i, j]):
                ax.text(j, i, f"{table[i, j]:+.1f}{marks[i][j]}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    fig.colorbar(im, ax=ax, label=f"{metric} vs fixed (%)")
    ax.set_title(f"{metric}: change against fixed (* = significant after Holm, paired t)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------- report


def _headroom_rows(cells: Mapping[str, Mapping[str, Any]], summary: Mapping[str, Any]) -> list[list[str]]:
    rows = []
    for n, cell in cells.items():
        h = cell["headroom"]
        s = summary["cells"][n]
        if not h.get("available"):
            rows.append([f"`{n}`", fmt(s["fixed_test_ppl"]), "n/a", "n/a", "n/a", "n/a (no oracle)"])
            continue
        rows.append([f"`{n}`", fmt(s["fixed_test_ppl"]), fmt_pct(s["fixed_event_rate"]).lstrip("+"),
                     f"{fmt_pct(h['ppl_gain'])} (p {fmt(h['ppl_p'], 2)})",
                     f"{fmt_pct(h['events_drop'])} (p {fmt(h.get('events_p'), 2)})",
                     "yes" if h["has_headroom"] else "**no: cannot rank controllers**"])
    return rows


def _verdict_rows(cells: Mapping[str, Mapping[str, Any]], summary: Mapping[str, Any]) -> list[list[str]]:
    rows = []
    for n in cells:
        v = summary["cells"][n]["verdicts"]
        ppl, ev = v.get("final_test_ppl", {}), v.get("model_events_per_100k_steps", {})
        rows.append([f"`{n}`", ", ".join(ppl.get("better", [])) or "none", ", ".join(ppl.get("worse", [])) or "none",
                     ", ".join(ev.get("better", [])) or "none", ", ".join(ev.get("worse", [])) or "none"])
    return rows


def _yes(flag: bool) -> str:
    return "**yes**" if flag else "no"


def criteria_lines(crit: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The success-criteria table and verdicts of each method (markdown lines)."""
    lines: list[str] = []
    for method, m in crit.items():
        rows = []
        for cname, r in m["cells"].items():
            if r["calm"]:
                m1 = m2 = "n/a (calm)"
                verdict = _yes(r["harm"])
            else:
                m1, m2 = _yes(r["M1"]), _yes(r["M2"])
                verdict = "n/a"
            rows.append([f"`{cname}`", fmt_pct(r["events_change"]), fmt_pct(r["wasted_change"]), m1,
                         f"{fmt_pct(r['ppl_change'])} (p {fmt(r['p'], 2)})", m2, verdict,
                         f"`{r['best_baseline']}`: {fmt_pct(r['best_ppl_change'])} (p {fmt(r['best_p'], 2)})"
                         if r["best_baseline"] else "n/a (no baseline besides the reference)",
                         _yes(r["worse_than_best"])])
        n = len(m["stress_cells"])
        rank = m["mean_rank"]
        lines += [f"Success criteria for `{method}` (M1: model events -30 % and wasted FLOPs -20 % vs `fixed`; "
                  "M2: test perplexity lower, paired p < 0.05; changes are relative to the mean of `fixed`, or of "
                  "the cell's best single baseline, which is never one of STSO's own controllers):", ""]
        lines += _table(["cell", "model events vs fixed", "wasted FLOPs vs fixed", "M1", "test ppl vs fixed", "M2",
                         "calm: significant harm", "vs best baseline: test ppl", "significantly worse than it"], rows)
        lines += ["", f"`{method}`: M1 holds on {len(m['M1_cells'])}/{n} stress cells, M2 on {len(m['M2_cells'])}/{n}; "
                  f"on `calm` {'significant harm' if m['calm_harm'] else 'no significant harm'}; significantly "
                  f"worse than the best baseline in {len(m['worse_than_best'])} cell(s)"
                  + (f" ({', '.join(m['worse_than_best'])})" if m["worse_than_best"] else "")
                  + f"; mean rank by test perplexity {fmt(rank, 3)} against {fmt(m['best_baseline_mean_rank'], 3)} "
                  f"for the best-ranked baseline `{m['best_baseline_by_rank']}` "
                  f"({'better' if m['better_mean_rank'] else 'not better'}).", ""]
    return lines


#: The research guide's ablations of the branch method (label, controller): A the rule-based trigger and
#: action, B the proxy's choice without verification forks, C the full method, D the full method on a
#: single indicator (the loss z-score) instead of the uncertainty index.
ABLATIONS = (("A: rule", "rule"), ("B: proxy only", "proxy_only"), ("C: full", "stso"),
             ("D: single indicator", "single_trigger"))
#: What each step between two ablations adds, as (label, with it, without it).
ABLATION_STEPS = (("the proxy's choice instead of the rule (B vs A)", "proxy_only", "rule"),
                  ("verification forks and rollback choice (C vs B)", "stso", "proxy_only"),
                  ("the uncertainty index instead of one indicator (C vs D)", "stso", "single_trigger"))


def ablation_step(cell: Mapping[str, Any], with_it: str, without: str,
                  metric: str = "final_test_ppl") -> dict[str, Any] | None:
    """Paired t-test (by seed) of ``metric`` between two controllers of a compact cell: the change made by the
    step from ``without`` to ``with_it``; None when either controller is missing from the cell."""
    from stso_env.eval.stats import align_by_seed, paired_test

    ctl = cell["controllers"]
    if with_it not in ctl or without not in ctl:
        return None
    pairs = align_by_seed(ctl[with_it]["seeds"], ctl[without]["seeds"])
    return paired_test([r.get(metric) for r in pairs["runs"]], [r.get(metric) for r in pairs["ref_runs"]])


def _change(test: Mapping[str, Any] | None) -> str:
    if test is None:
        return "n/a"
    return f"{fmt_pct(test['rel_change'])} (p {fmt(test['p'], 2)})"


def ablation_lines(cells: Mapping[str, Mapping[str, Any]], mean_rank: Mapping[str, float]) -> list[str]:
    """The ablation section (markdown lines): each ablation's test perplexity against ``fixed`` per cell,
    what each step between ablations changes (paired t by seed, unadjusted), and how often a step helps or
    hurts significantly; empty when the suite ran none of the ablations."""
    present = [(label, n) for label, n in ABLATIONS if any(n in c["controllers"] for c in cells.values())]
    if not present:
        return []
    lines = ["Ablations of the branch method (test perplexity against `fixed`, paired t, Holm-adjusted across "
             "the cell's controllers; mean rank by test perplexity across cells in the last row):", ""]
    rows = []
    for cname, cell in cells.items():
        block = cell["comparison"].get("metrics", {}).get("final_test_ppl", {})
        row = [f"`{cname}`"]
        for _, n in present:
            r = block.get(n)
            row.append("n/a" if r is None else
                       f"{fmt_pct(r['paired']['rel_change'])} (p {fmt(r.get('p_holm_paired_t'), 2)})")
        rows.append(row)
    rows.append(["mean rank", *("n/a" if mean_rank.get(n) is None else f"{mean_rank[n]:.2f}" for _, n in present)])
    lines += _table(["cell", *(f"{label} (`{n}`)" for label, n in present)], rows)
    steps = [s for s in ABLATION_STEPS if all(any(n in c["controllers"] for c in cells.values()) for n in s[1:])]
    if not steps:
        return lines + [""]
    tests = {s: {cname: ablation_step(cell, s[1], s[2]) for cname, cell in cells.items()} for s in steps}
    lines += ["", "Where the gain comes from: the change in test perplexity that each step of the method makes "
              "(mean of the step's controller against the one without it, paired t by seed, unadjusted):", ""]
    lines += _table(["cell", *(s[0] for s in steps)],
                    [[f"`{cname}`", *(_change(tests[s][cname]) for s in steps)] for cname in cells])
    lines.append("")
    for s in steps:
        done = [t for t in tests[s].values() if t is not None and t["p"] is not None]
        helps = sum(t["p"] < 0.05 and t["mean_diff"] < 0 for t in done)
        hurts = sum(t["p"] < 0.05 and t["mean_diff"] > 0 for t in done)
        lines.append(f"- {s[0]}: lowers test perplexity significantly in {helps} of {len(tests[s])} cells, "
                     f"raises it significantly in {hurts}.")
    return lines + [""]


def variant_lines(cells: Mapping[str, Mapping[str, Any]], variants: Mapping[str, Any]) -> list[str]:
    """Each variant against the controller it varies (markdown lines): the change in test perplexity per cell,
    paired t by seed, unadjusted, and what the variant changes (its settings, its own proxy); empty when no
    variant ran beside its controller."""
    pairs = [(label, v["controller"]) for label, v in variants.items()
             if any(label in c["controllers"] and v["controller"] in c["controllers"] for c in cells.values())]
    if not pairs:
        return []

    def what(v: Mapping[str, Any]) -> str:
        parts = [f"{k}: {json.dumps(x)}" for k, x in (v.get("settings") or {}).items()]
        parts += [f"{key} `{v[key]}`" for key in ("policy", "proxy") if v.get(key)]
        return ", ".join(parts) or "the same settings"

    lines = ["Variants against the controller they vary (test perplexity of the variant against its controller, "
             "paired t by seed, unadjusted):", ""]
    lines += _table(["cell", *(f"`{label}` vs `{base}`" for label, base in pairs)],
                    [[f"`{cname}`", *(_change(ablation_step(cell, label, base)) for label, base in pairs)]
                     for cname, cell in cells.items()])
    lines += ["", *(f"- `{label}`: `{base}` with {what(variants[label])}." for label, base in pairs)]
    return lines + [""]


def readme_tables(results: Mapping[str, Any]) -> str:
    """The README's result block for a published suite (markdown, no markers)."""
    cells, summary = results["cells"], results["summary"]
    meta = results["meta"]
    lines = [f"Generated from `assets/results/{results['suite']}/results.json` (`{meta['command']}`, commit "
             f"`{(meta.get('commit') or 'unknown')[:10]}`{' with uncommitted changes' if meta.get('dirty') else ''}, "
             f"torch {meta['versions']['torch']}, {meta['workers']} workers x {meta['threads']} threads on "
             f"{meta['machine']['cores']} cores of {meta['machine']['cpu']}; {results['settings']['seeds']} seeds, "
             f"{results['settings']['steps']} steps, preset `{results['settings']['preset']}`). "
             f"Full report: `assets/results/{results['suite']}/report.md`.", "",
             "Headroom (the hindsight oracle against the fixed schedule, test split):", ""]
    lines += _table(["cell", "fixed test ppl", "fixed runs with a model event", "oracle: test ppl gain",
                     "oracle: model events drop", "headroom"], _headroom_rows(cells, summary))
    lines += ["", "Controllers significantly better or worse than `fixed` (paired t-test, Holm-corrected across "
              "controllers, alpha 0.05):", ""]
    lines += _table(["cell", "test ppl: better", "test ppl: worse", "model events: better", "model events: worse"],
                    _verdict_rows(cells, summary))
    if summary.get("criteria"):
        lines += [""] + criteria_lines(summary["criteria"])[:-1]
    ranks = summary["mean_rank"]
    ablations = ablation_lines(cells, ranks["final_test_ppl"])
    if ablations:
        lines += [""] + ablations[:-1]
    variants = variant_lines(cells, results.get("settings", {}).get("variants") or {})
    if variants:
        lines += [""] + variants[:-1]
    lines += ["", "Mean rank across cells (1 = best; by mean test perplexity, and by mean model events):", ""]
    lines += _table(["controller", "rank: test ppl", "rank: model events"],
                    [[f"`{n}`", f"{r:.2f}", f"{ranks['model_events_per_100k_steps'].get(n, math.nan):.2f}"]
                     for n, r in ranks["final_test_ppl"].items()])
    return "\n".join(lines) + "\n"


def _budget_section(cells: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Per cell, where the budget of each controller that forks or rolls back went (what a method that
    loses on perplexity paid for)."""
    rows = []
    for n, cell in cells.items():
        for c, b in cell["controllers"].items():
            u = b.get("budget_use") or {}
            if not u or (u["verification_share"] == 0 and u["rollback_share"] == 0 and u["branches_per_run"] == 0):
                continue
            rows.append([f"`{n}`", f"`{c}`", f"{u['main_steps']:.0f} / {u['episode_steps']:.0f}",
                         fmt_pct(u["verification_share"]).lstrip("+"), fmt_pct(u["rollback_share"]).lstrip("+"),
                         f"{u['branches_per_run']:.2f}", ", ".join(f"{k} {v}" for k, v in u["stop_reasons"].items())])
    if not rows:
        return []
    return ["## Where the budget went", "",
            "Controllers that fork or roll back, mean over seeds: optimizer steps of the main run (of the "
            "schedule's), budget shares spent on verification forks and on rolled-back steps, branch invocations "
            "per run, and why runs stopped (`budget`: the shared FLOPs budget ran out before the schedule ended, "
            "so the learning rate never finished its decay).", "",
            *_table(["cell", "controller", "main steps", "verification", "rollback", "branches / run", "stops"],
                    rows), ""]


def render_suite_report(results: Mapping[str, Any]) -> str:
    cells, meta, st = results["cells"], results["meta"], results["settings"]
    lines = [f"# Suite `{results['suite']}`", "", st.get("description") or "", "",
             f"Command: `{meta['command']}`  ", f"Commit: `{meta.get('commit')}`"
             + (" (with uncommitted changes)" if meta.get("dirty") else "") + "  ",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + "  ",
             f"Machine: {meta['machine']['cpu']}, {meta['machine']['cores']} cores, "
             f"{meta['machine']['memory_gib']} GiB; "
             f"engine {meta['engine']}, {meta['workers']} workers x {meta['threads']} torch threads; "
             f"{meta.get('run_seconds', 0) / 3600:.2f} h of runs (summed over runs, also those kept by --resume), "
             f"{meta['wall_seconds'] / 3600:.2f} h wall time of the last invocation.", "",
             "## Coverage", "",
             f"{len(cells)} cells x {len(st['controllers'])} controllers x {st['seeds']} seeds (seeds "
             f"{st['seed_offset']}..{st['seed_offset'] + st['seeds'] - 1}, the same for every controller); preset "
             f"`{st['preset']}`, {st['steps']} optimizer steps per run, decision interval {st['decision_interval']}. "
             "Controllers: " + ", ".join(f"`{c}`" for c in st["controllers"]) + ".", "",
             "Held-out data: controllers, rewards and branch selection see only the probe split; selection "
             "(tuned_fixed's sweep, the oracle) reads the validation split; the final perplexity is the test split. "
             "Tokens per split:", ""]
    lines += _table(["cell", "train", "probe", "validation", "test", "test tokens scored"],
                    [[f"`{n}`", *(str(c["split_tokens"].get(k, "n/a"))
                                  for k in ("train", "probe", "validation", "test")),
                      str(c.get("test_tokens_scored", "n/a"))] for n, c in cells.items()])
    lines += ["", "## Summary", "", readme_tables(results), "",
              "![headroom](figures/headroom.png)", "", "![test perplexity vs fixed](figures/test_ppl_vs_fixed.png)",
              "", "![model events vs fixed](figures/model_events_vs_fixed.png)", ""]
    lines += _budget_section(cells)
    for n, cell in cells.items():
        h = cell["headroom"]
        lines += [f"## Cell `{n}`", "", f"Scenario `{cell['scenario']}`, corpus `{Path(cell['corpus']).name}`, "
                  f"tokenizer `{Path(cell['tokenizer']).name}`.", ""]
        if h.get("available") and not h["has_headroom"]:
            lines += ["**No headroom**: the hindsight oracle does not beat the fixed schedule here "
                      f"({h['rule']}), so this cell cannot rank controllers.", ""]
        header = ["controller", "n"] + [f"`{m}`" for m in METRICS]
        rows = [[f"**{c}**", str(len(b["seeds"]))] + [fmt_summary(b["summary"].get(m, {})) for m in METRICS]
                for c, b in cell["controllers"].items()]
        lines += ["Mean over seeds ± half-width of the 95 % t-interval; lower is better.", "",
                  *_table(header, rows), ""]
        lines += comparison_section(cell["comparison"])
        lines += [f"![loss curves](figures/{n}/loss_curves.png)", "", f"![metrics](figures/{n}/metric_bars.png)", ""]
    return "\n".join(lines).rstrip() + "\n"


def write_reports(results_dir: Path, repo_root: Path) -> list[Path]:
    """Render ``report.md`` (and the suite's ``report_copy`` at the repository root, if it names one) from
    ``results_dir/results.json``; returns the files written. Rerunnable: a new report layout reaches the
    committed reports without rerunning a suite."""
    results = json.loads((Path(results_dir) / "results.json").read_text(encoding="utf-8"))
    report = render_suite_report(results)
    written = [Path(results_dir) / "report.md"]
    write_text_atomic(written[0], report)
    copy = results["settings"].get("report_copy")
    if copy:
        # The copy sits at the repository root: its figure links point into the results folder.
        written.append(Path(repo_root) / copy)
        write_text_atomic(written[1], report.replace("](figures/", f"](assets/results/{results['suite']}/figures/"))
    return written


def publish_suite(suite: Any, cells_full: Mapping[str, Mapping[str, Any]], meta: Mapping[str, Any],
                  results_dir: Path) -> dict[str, Any]:
    """Write the committed results of a suite to ``results_dir``; returns the compact results dict."""
    from stso_env.config import REPO_ROOT, to_dict
    from stso_env.eval.figures import make_figures

    results_dir = Path(results_dir)
    cells = {n: _compact_cell(r) for n, r in cells_full.items()}
    results = {"suite": suite.name, "meta": dict(meta), "settings": to_dict(suite), "cells": cells,
               "summary": suite_summary(cells, suite.variant_controllers), "compare_metrics": list(COMPARE_METRICS)}
    fig_dir = results_dir / "figures"
    headroom_figure(cells, fig_dir / "headroom.png")
    comparison_heatmap(cells, fig_dir / "test_ppl_vs_fixed.png", "final_test_ppl")
    comparison_heatmap(cells, fig_dir / "model_events_vs_fixed.png", "model_events_per_100k_steps")
    for n, full in cells_full.items():
        figs = make_figures(full, full["_curves"], fig_dir / n)
        for extra in set(figs) - {"loss_curves", "metric_bars"}:
            Path(figs[extra]).unlink(missing_ok=True)  # the timeline per cell stays in the runs folder
    write_json_atomic(results_dir / "results.json", results)
    write_reports(results_dir, REPO_ROOT)
    if suite.readme:
        update_readme(REPO_ROOT / "README.md", suite.name, results_dir / "results.json")
    return results


# ---------------------------------------------------------------------- README


def _markers(suite: str) -> tuple[str, str]:
    return f"<!-- results:{suite}:begin -->", f"<!-- results:{suite}:end -->"


def readme_block(readme_text: str, suite: str) -> str | None:
    """The text between the suite's markers in the README (None when the markers are missing)."""
    begin, end = _markers(suite)
    if begin not in readme_text or end not in readme_text:
        return None
    return readme_text.split(begin, 1)[1].split(end, 1)[0].strip("\n") + "\n"


def update_readme(readme: Path, suite: str, results_json: Path) -> bool:
    """Rewrite the suite's block of ``readme`` from ``results_json``; returns whether it changed. The
    markers must already be in the README (a clear error says where to put them)."""
    return replace_readme_block(readme, suite, readme_tables(json.loads(Path(results_json).read_text())))


def replace_readme_block(readme: Path, name: str, block: str) -> bool:
    """Put ``block`` between the ``results:<name>`` markers of ``readme``; returns whether it changed."""
    text = Path(readme).read_text(encoding="utf-8")
    begin, end = _markers(name)
    if readme_block(text, name) is None:
        raise ValueError(f"{readme}: no '{begin}' ... '{end}' block; add both markers where the tables go")
    head, rest = text.split(begin, 1)
    tail = rest.split(end, 1)[1]
    new = f"{head}{begin}\n{block}{end}{tail}"
    if new != text:
        write_text_atomic(readme, new)
    return new != text
