"""``report.md`` of an evaluation, rendered from the ``results.json`` dict.

:func:`render_report` is a pure function (results dict -> markdown string);
:func:`write_report` writes it atomically. :func:`write_json_atomic` is the
JSON writer the harness uses for ``results.json`` and ``curves.json``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from stso_env.files import write_text_atomic
from stso_env.eval.stats import M1_EVENTS_DROP, M1_WASTED_DROP, M2_ALPHA, METRICS

#: The metrics of the Welch table (the keys of ``reference_tests`` per controller).
_WELCH_METRICS = ("final_test_ppl", "model_events_per_100k_steps")

#: Settings shown first in the settings table (the rest follow in key order).
_SETTING_ORDER = ("controllers", "seeds", "seed_list", "scenario", "corpus", "preset", "tokenizer", "steps",
                  "decision_interval", "budget_flops")


def json_ready(obj: Any) -> Any:
    """``obj`` with non-finite floats as None, paths as strings and tuples as lists (strict JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return json_ready(obj.item())
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    return str(obj)  # anything else a controller describes itself with (enums, dataclasses, ...)


def write_json_atomic(path: Path, obj: Any) -> Path:
    """Strict JSON (no NaN) of :func:`json_ready` ``(obj)``, written atomically."""
    return write_text_atomic(path, json.dumps(json_ready(obj), indent=2, allow_nan=False) + "\n")


def save_result(out: Path, name: str, meta: Mapping[str, Any], result: Mapping[str, Any],
                write_report: Callable[[Any, Path, Any], Path]) -> Path:
    """A report command's outputs: ``out/name`` (``{"meta": meta, **result}`` as JSON) and the report that
    ``write_report(result, out, meta)`` writes; returns the report's path."""
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / name, {"meta": meta, **result})
    return write_report(result, out, meta)


def provenance_lines(meta: Mapping[str, Any]) -> list[str]:
    """A report's header lines from :func:`agents.evaluate.provenance`'s fields: command, commit (and whether
    the tree had uncommitted changes), versions and machine."""
    return [f"Command: `{meta['command']}`  ", f"Commit: `{meta.get('commit')}`"
            + (" (with uncommitted changes)" if meta.get("dirty") else "") + "  ",
            "Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + "  ",
            f"Machine: {meta['machine']['cpu']}, {meta['machine']['cores']} cores"]


# ---------------------------------------------------------------------- formatting


def fmt(x: Any, digits: int = 4) -> str:
    """A number in ``digits`` significant digits; "n/a" for None."""
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        if not math.isfinite(x):
            return "n/a"
        return f"{x:.{digits}g}"
    return str(x)


def fmt_pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:+.1f} %"


def fmt_ci(ci: Any, pct: bool = False) -> str:
    """``[lo, hi]`` of an interval (percentages when ``pct``), "n/a" when there is none."""
    if not ci or ci[0] is None or ci[1] is None:
        return "n/a"
    if pct:
        return f"[{fmt_pct(ci[0])}, {fmt_pct(ci[1])}]"
    return f"[{fmt(ci[0], 3)}, {fmt(ci[1], 3)}]"


def fmt_p(p: Any, p_adj: Any) -> str:
    """A raw p-value and its Holm-adjusted value in brackets."""
    return f"{fmt(p, 3)} ({fmt(p_adj, 3)})"


def fmt_summary(s: Mapping[str, Any]) -> str:
    """``mean ± half-width`` of a summary cell (the CI is symmetric), ``mean`` alone when n < 2."""
    m, ci = s.get("mean"), s.get("ci95")
    if m is None:
        return "n/a"
    cell = fmt(m) if ci is None else f"{fmt(m)} ± {fmt((ci[1] - ci[0]) / 2, 2)}"
    if s.get("n_dropped"):
        cell += f" ({s['n_dropped']} dropped)"
    return cell


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
            *("| " + " | ".join(r) + " |" for r in rows)]


# ---------------------------------------------------------------------- sections


def _settings_section(settings: Mapping[str, Any]) -> list[str]:
    shown_apart = ("versions", "controller_settings", "controller_setup", "accounting")
    keys = [k for k in _SETTING_ORDER if k in settings] + sorted(
        k for k in settings if k not in _SETTING_ORDER and k not in shown_apart)
    rows = [[f"`{k}`", f"`{json.dumps(json_ready(settings[k]))}`" if not isinstance(settings[k], str)
             else f"`{settings[k]}`"] for k in keys]
    lines = ["## Settings", "", *_table(["setting", "value"], rows), ""]
    if settings.get("controller_settings"):
        lines += ["Controller settings:", "", "```json", json.dumps(json_ready(settings["controller_settings"]),
                                                                    indent=2), "```", ""]
    if settings.get("controller_setup"):
        lines += ["Controller setup (main-run share, main-run schedule, the controller's own description):", "",
                  "```json", json.dumps(json_ready(settings["controller_setup"]), indent=2), "```", ""]
    if settings.get("versions"):
        lines += ["Versions: " + ", ".join(f"{k} {v}" for k, v in settings["versions"].items()), ""]
    return lines


def _metrics_section(controllers: Mapping[str, Any]) -> list[str]:
    header = ["controller", "n"] + [f"`{m}`" for m in METRICS]
    rows = []
    for name, c in controllers.items():
        summ = c.get("summary", {})
        rows.append([f"**{name}**", str(len(c.get("seeds", [])))]
                    + [fmt_summary(summ.get(m, {})) for m in METRICS])
    lines = ["## Metrics", "", "Mean over seeds ± half-width of the 95 % t-interval (no interval with one seed). "
             "Lower is better for every metric.", "", *_table(header, rows), ""]
    diverged = {n: sum(bool(s.get("diverged")) for s in c.get("seeds", [])) for n, c in controllers.items()}
    if any(diverged.values()):
        lines += ["Diverged runs (their perplexity is undefined and dropped from the means): "
                  + ", ".join(f"{n}: {d}" for n, d in diverged.items() if d), ""]
    return lines


def _tests_section(results: Mapping[str, Any]) -> list[str]:
    tests = results.get("tests") or {}
    lines = ["## Welch t-tests against `fixed`", ""]
    if not tests:
        lines += [results.get("tests_note") or "No tests: the fixed schedule was not evaluated.", ""]
        return lines
    rows = []
    for name, t in tests.items():
        for metric in _WELCH_METRICS:
            w = t.get(metric)
            if not w:
                continue
            rows.append([f"**{name}**", f"`{metric}`", fmt(w["mean_a"]), fmt(w["mean_b"]), f"{w['n_a']}/{w['n_b']}",
                         fmt(w["t"], 3), fmt(w["df"], 3), fmt(w["p"], 3), w.get("reason") or ""])
    lines += ["Two-sided Welch t-test over all runs, controller (a) against fixed (b); df by Welch–Satterthwaite. "
              "Unpaired: it ignores that the controllers ran the same seeds.", "",
              *_table(["controller", "metric", "mean a", "mean fixed", "n a/b", "t", "df", "p", "note"], rows), ""]
    return lines


def _verdict(holds: bool) -> str:
    return "**holds**" if holds else "**does not hold**"


def _criteria_lines(block: Mapping[str, Any], method: str) -> list[str]:
    ref = block["reference"]
    m1, m2 = block["M1"], block["M2"]
    m1_line = (f"- M1 vs `{ref}` {_verdict(m1['holds'])}: model instability events per 100k steps "
               f"{fmt(m1['events_mean'])} vs {fmt(m1['events_mean_ref'])} ({fmt_pct(m1['events_change'])}, "
               f"needs <= -{100 * M1_EVENTS_DROP:.0f} %); wasted FLOPs fraction {fmt(m1['wasted_mean'])} vs "
               f"{fmt(m1['wasted_mean_ref'])} ({fmt_pct(m1['wasted_change'])}, needs <= -{100 * M1_WASTED_DROP:.0f} %)")
    if m1.get("reason"):
        m1_line += f"; {m1['reason']}"
    welch = m2.get("welch") or {}
    m2_line = (f"- M2 vs `{ref}` {_verdict(m2['holds'])}: final test perplexity {fmt(m2['ppl_mean'])} vs "
               f"{fmt(m2['ppl_mean_ref'])} over {m2.get('n_pairs', 'n/a')} paired seeds "
               f"({fmt_pct(m2['ppl_change'])}, 95 % CI {fmt_ci(m2.get('ppl_change_ci95'), pct=True)}), "
               f"paired t p = {fmt(m2['p'], 3)} (needs lower and p < {M2_ALPHA}); Welch p = {fmt(welch.get('p'), 3)}")
    if m2.get("reason"):
        m2_line += f"; {m2['reason']}"
    return [m1_line, m2_line]


def _criteria_section(criteria: Sequence[Mapping[str, Any]] | Mapping[str, Any] | None) -> list[str]:
    """The success criteria of each assessed method (one block per method; a single block is accepted too)."""
    lines = ["## Success criteria", ""]
    if not criteria:
        return lines + ["Not assessed.", ""]
    blocks = [criteria] if isinstance(criteria, Mapping) else list(criteria)
    lines += [f"**M1** = model instability events per 100k steps down by at least {100 * M1_EVENTS_DROP:.0f} % and "
              f"wasted FLOPs fraction down by at least {100 * M1_WASTED_DROP:.0f} % (relative change of the means); "
              f"**M2** = final test perplexity lower with paired t-test p < {M2_ALPHA} over the seeds both ran "
              "(Welch's unpaired p shown beside it). The best single baseline leaves out STSO's own controllers.", ""]
    for crit in blocks:
        method = crit.get("method", "stso")
        lines += [f"For `{method}`:", ""]
        if crit.get("against_reference"):
            lines += _criteria_lines(crit["against_reference"], method)
        if crit.get("against_best_baseline"):
            lines += [f"- Best single baseline (lowest mean perplexity apart from `{method}`, "
                      f"`{crit.get('reference', 'fixed')}` and STSO's own controllers): `{crit['best_baseline']}`"]
            lines += _criteria_lines(crit["against_best_baseline"], method)
        if crit.get("note"):
            lines += [f"- Note: {crit['note']}"]
        lines += [""]
    return lines


def _with_ci(value: str, ci: str) -> str:
    return value if ci == "n/a" else f"{value} {ci}"


def comparison_section(comparison: Mapping[str, Any] | None) -> list[str]:
    """Markdown lines of :func:`stso_env.eval.stats.compare_to_reference`'s dict: per metric, one table
    with a row per controller (controller | mean | mean diff vs the reference [95 % CI] | rel. change
    [95 % CI] | d_z | paired t p (Holm) | Wilcoxon p (Holm) | Welch p (Holm) | verdict), the reference's
    own row first, and below it the reasons a test did not run, dropped pairs and unmatched seeds."""
    if not comparison:
        return []
    ref = comparison.get("reference", "fixed")
    lines = [f"## Paired comparison against `{ref}`", ""]
    if comparison.get("note"):
        return lines + [comparison["note"], ""]
    alpha = comparison.get("alpha")
    lines += [f"Runs are paired by seed (only seeds both controllers ran; a pair with a missing value is "
              f"dropped). mean = the controller's mean over those seeds (for `{ref}`: over all its runs); "
              f"mean diff = controller - `{ref}` with its 95 % t-interval; rel. change = mean diff / |mean of "
              f"`{ref}`|; d_z = mean diff / SD of the differences. p-values are two-sided, raw (Holm-adjusted "
              f"over the controllers on that metric). Verdict from the Holm-adjusted paired t p at alpha = "
              f"{fmt(alpha)} and the sign of the difference; lower is better for every metric.", ""]
    header = ["controller", "mean", f"mean diff vs {ref} [95 % CI]", "rel. change [95 % CI]", "d_z",
              "paired t p (Holm)", "Wilcoxon p (Holm)", "Welch p (Holm)", "verdict"]
    for metric, block in comparison.get("metrics", {}).items():
        ref_summary = comparison.get("reference_summary", {}).get(metric, {})
        rows = [[f"`{ref}` (reference)", fmt_summary(ref_summary), "", "", "", "", "", "", ""]]
        notes = []
        for name, c in block.items():
            pt, w = c["paired"], c["welch"]
            rows.append([f"**{name}** (n={pt['n']})", fmt(pt["mean_a"]),
                         _with_ci(fmt(pt["mean_diff"]), fmt_ci(pt["diff_ci95"])),
                         _with_ci(fmt_pct(pt["rel_change"]), fmt_ci(pt["rel_change_ci95"], pct=True)),
                         fmt(pt["cohen_dz"], 3), fmt_p(pt["p"], c.get("p_holm_paired_t")),
                         fmt_p(pt["wilcoxon_p"], c.get("p_holm_wilcoxon")), fmt_p(w["p"], c.get("p_holm_welch")),
                         str(c.get("verdict", "n/a")).replace("_", " ")])
            why = []
            if pt["n_dropped"]:
                why.append(f"{pt['n_dropped']} pair(s) dropped (missing value)")
            unmatched = c.get("unmatched_seeds") or {}
            alone = [f"only {who} ran {unmatched[side]}" for who, side in ((name, "controller"), (ref, "reference"))
                     if unmatched.get(side)]
            if alone:
                why.append("seeds left out: " + ", ".join(alone))
            why += [f"{label}: {r}" for label, r in (("paired t", pt["reason"]), ("Wilcoxon", pt["wilcoxon_reason"]),
                                                     ("Welch", w["reason"])) if r]
            if why:
                notes.append(f"- {name}: " + "; ".join(why))
        lines += [f"### `{metric}`", "", *_table(header, rows), ""]
        if notes:
            lines += [*notes, ""]
    return lines


def _figures_section(figures: Mapping[str, str] | None) -> list[str]:
    if not figures:
        return []
    lines = ["## Figures", ""]
    for name, rel in figures.items():
        lines += [f"![{name}]({rel})", ""]
    return lines


def render_report(results: Mapping[str, Any]) -> str:
    """The markdown report of a ``results.json`` dict: settings, metrics table (mean ± CI per controller),
    the paired comparison against ``fixed`` (:func:`comparison_section`, when ``results`` has a
    ``"comparison"`` key), Welch tests against ``fixed``, success criteria and links to the figures
    (``results["figures"]``, paths relative to the report)."""
    settings = results.get("settings", {})
    title = settings.get("eval_name") or "Evaluation"
    lines = [f"# {title}", ""]
    if results.get("complete") is False:
        lines += ["**Incomplete**: not every (controller, seed) run has finished.", ""]
    if settings.get("accounting"):
        lines += ["## Accounting", "", str(settings["accounting"]), ""]
    lines += _settings_section(settings)
    lines += _metrics_section(results.get("controllers", {}))
    if "comparison" in results:
        lines += comparison_section(results["comparison"])
    lines += _tests_section(results)
    lines += _criteria_section(results.get("criteria"))
    lines += _figures_section(results.get("figures"))
    return "\n".join(lines).rstrip() + "\n"


def write_report(results: Mapping[str, Any], path: Path) -> Path:
    """Render ``results`` and write it to ``path`` atomically."""
    return write_text_atomic(Path(path), render_report(results))
