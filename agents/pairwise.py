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
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from stso_env.eval.stats import compare_to_reference

METRIC = "final_test_ppl"


def parse_pairs(text: str) -> list[tuple[str, str]]:
    pairs = []
    for item in text.split(","):
        a, sep, b = item.strip().partition(":")
        if not sep or not a or not b or a == b:
            raise ValueError(f"--pairs: {item.strip()!r} is not CONTROLLER:REFERENCE with two different names")
        pairs.append((a, b))
    return pairs


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
    ap.add_argument("--results", required=True, type=Path, help="a suite's results.json")
    ap.add_argument("--pairs", required=True, help="comma list of CONTROLLER:REFERENCE")
    ap.add_argument("--out", type=Path, help="write the Markdown here (default: print it)")
    args = ap.parse_args(argv)
    try:
        if not args.results.is_file():
            raise ValueError(f"--results: no such file {args.results}; run `python -m agents.evaluate --suite ...`")
        results = json.loads(args.results.read_text(encoding="utf-8"))
        rows = pairwise_rows(results, parse_pairs(args.pairs))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    meta = results.get("meta", {})
    text = "\n".join([
        f"# Paired comparisons: suite `{results.get('suite', args.results.parent.name)}`", "",
        f"Command: `python -m agents.pairwise --results {args.results} --pairs {args.pairs}`  ",
        f"From: `{args.results}` (commit `{meta.get('commit', 'n/a')}`); metric `{METRIC}` on the test split; "
        "paired t by seed, Holm over the controllers compared with one reference in a cell.", "",
        *table(rows), ""])
    if args.out:
        from stso_env.files import write_text_atomic

        write_text_atomic(args.out, text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
