"""Paired comparisons of chosen controllers against a reference other than ``fixed``, from a suite's
committed ``results.json`` (no run is repeated).

A suite's report compares every controller with ``fixed`` only; a question such as "does the guard
help the policy" needs the policy with the guard against the policy without it, on the same seeds.
This reads the per-seed values of ``results.json`` and applies the report's own statistics
(:func:`stso_env.eval.stats.compare_to_reference`: paired t by seed, Holm over the controllers
listed, per cell) to ``final_test_ppl``, and writes one Markdown table per reference::

    python -m agents.pairwise --results assets/results/policy_skip_guard/results.json \\
        --pairs policy_skip_guard:policy_tuned_gates,policy_skip_guard:skip_step \\
        --out assets/results/policy_skip_guard/pairwise.md

Several ``--results`` files are pooled per cell, seeds side by side: five seeds answer only large
differences, and two suites that ran the same controllers on disjoint seeds answer smaller ones.
``--rename OLD=NEW`` gives a controller one name across files (a suite's variant name for the
controller another suite runs under its own). Pool only runs of the same settings; a seed that two
files hold for the same cell and controller is refused, not averaged::

    python -m agents.pairwise --results assets/results/policy_skip_guard/results.json \\
        assets/results/core_guard/results.json --rename policy_skip_guard=policy \\
        --pairs policy:skip_step,policy:fixed
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from stso_env.eval.stats import compare_to_reference
from stso_env.files import write_text_or_print

METRIC = "final_test_ppl"


def parse_pairs(text: str) -> list[tuple[str, str]]:
    pairs = []
    for item in text.split(","):
        a, sep, b = item.strip().partition(":")
        if not sep or not a or not b or a == b:
            raise ValueError(f"--pairs: {item.strip()!r} is not CONTROLLER:REFERENCE with two different names")
        pairs.append((a, b))
    return pairs


def parse_renames(text: str | None) -> dict[str, str]:
    renames = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        old, sep, new = item.strip().partition("=")
        if not sep or not old or not new:
            raise ValueError(f"--rename: {item.strip()!r} is not OLD=NEW")
        renames[old] = new
    return renames


def pool(results: list[dict[str, Any]], renames: dict[str, str] | None = None,
         required: set[str] | None = None) -> dict[str, Any]:
    """One results dict from several: per cell and controller (after ``renames``), the runs of every file
    side by side. A seed held twice for one cell and controller is an error: pooling is for disjoint
    seed sets, and the same seed twice would count one run as two pairs. Each controller in ``required``
    must be in every file that has the cell, so that a missing rename does not quietly pool one file."""
    renames, required = renames or {}, required or set()
    cells: dict[str, dict[str, Any]] = {}
    for index, res in enumerate(results):
        for cell, data in res["cells"].items():
            names = [renames.get(n, n) for n in data["controllers"]]
            if len(set(names)) < len(names):
                raise ValueError(f"results file {index + 1}, cell {cell}: --rename gives two controllers one name "
                                 f"({', '.join(names)})")
            absent = sorted(required - set(names))
            if absent:
                raise ValueError(f"results file {index + 1}, cell {cell}: no controller {', '.join(absent)} "
                                 f"(it has {', '.join(data['controllers'])}); give it one name with --rename OLD=NEW")
            pooled = cells.setdefault(cell, {"controllers": {}})["controllers"]
            for name, runs in data["controllers"].items():
                target = pooled.setdefault(renames.get(name, name), {"seeds": [], "summary": {}})
                held = {r["seed"] for r in target["seeds"]}
                twice = sorted(held & {r["seed"] for r in runs["seeds"]})
                if twice:
                    raise ValueError(f"cell {cell}, controller {renames.get(name, name)}: seed(s) "
                                     f"{', '.join(map(str, twice))} in more than one results file; pool disjoint "
                                     "seed sets")
                target["seeds"].extend(runs["seeds"])
    return {"suite": " + ".join(str(r.get("suite", "?")) for r in results), "cells": cells}


def pairwise_rows(results: dict[str, Any], pairs: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """One row per cell and pair: the relative change of the mean test perplexity, the unadjusted paired-t
    p and, where a reference has several controllers, Holm over them (as the report does per cell)."""
    rows = []
    for cell, data in results["cells"].items():
        controllers = data["controllers"]
        for ref in dict.fromkeys(b for _, b in pairs):
            names = [a for a, b in pairs if b == ref]
            missing = [n for n in [ref, *names] if n not in controllers]
            if missing:
                raise ValueError(f"cell {cell}: no controller {', '.join(missing)} in the results "
                                 f"(it has {', '.join(controllers)})")
            block = compare_to_reference({n: controllers[n] for n in [ref, *names]}, ref, (METRIC,))
            for name in names:
                r = block["metrics"][METRIC][name]
                rows.append({"cell": cell, "controller": name, "reference": ref, "n": r["paired"]["n"],
                             "rel_change": r["paired"]["rel_change"], "p": r["paired"]["p"],
                             "p_holm": r["p_holm_paired_t"]})
    return rows


def _fmt_p(p: float | None, n: int) -> str:
    # a paired t needs two pairs with both values (a diverged run has no test perplexity) and some spread
    if p is None:
        return "n/a (fewer than 2 complete pairs)" if n < 2 else "n/a (equal runs)"
    return f"{p:.3g}"


def table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| cell | controller | reference | n | test ppl change | paired t p | Holm p |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        change = "n/a" if r["rel_change"] is None else f"{100 * r['rel_change']:+.1f} %"
        lines.append(f"| `{r['cell']}` | `{r['controller']}` | `{r['reference']}` | {r['n']} | {change} | "
                     f"{_fmt_p(r['p'], r['n'])} | {_fmt_p(r['p_holm'], r['n'])} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m agents.pairwise", description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", required=True, type=Path, nargs="+",
                    help="a suite's results.json; several are pooled per cell (disjoint seeds)")
    ap.add_argument("--pairs", required=True, help="comma list of CONTROLLER:REFERENCE")
    ap.add_argument("--rename", help="comma list of OLD=NEW controller names, applied to every results file "
                                     "before pooling")
    ap.add_argument("--out", type=Path, help="write the Markdown here (default: print it)")
    args = ap.parse_args(argv)
    try:
        loaded = []
        for path in args.results:
            if not path.is_file():
                raise ValueError(f"--results: no such file {path}; run `python -m agents.evaluate --suite ...`")
            loaded.append(json.loads(path.read_text(encoding="utf-8")))
        renames, pairs = parse_renames(args.rename), parse_pairs(args.pairs)
        results = loaded[0] if len(loaded) == 1 and not renames else pool(
            loaded, renames, {name for pair in pairs for name in pair})
        rows = pairwise_rows(results, pairs)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    files = " ".join(str(p) for p in args.results)
    command = f"python -m agents.pairwise --results {files}"
    if args.rename:
        command += f" --rename {args.rename}"
    sources = "; ".join(f"`{p}` (commit `{r.get('meta', {}).get('commit', 'n/a')}`)"
                        for p, r in zip(args.results, loaded))
    text = "\n".join([
        f"# Paired comparisons: suite `{results.get('suite', args.results[0].parent.name)}`", "",
        f"Command: `{command} --pairs {args.pairs}`  ",
        f"From: {sources}; metric `{METRIC}` on the test split; "
        "paired t by seed, Holm over the controllers compared with one reference in a cell.", "",
        *table(rows), ""])
    write_text_or_print(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
