"""agents.pairwise: paired comparisons against any reference, from a results.json, with known answers."""

from __future__ import annotations

import json

import pytest
from scipy import stats

from agents.pairwise import main, pairwise_rows, parse_pairs


def _results() -> dict:
    def runs(values):
        return {"seeds": [{"seed": s, "final_test_ppl": v} for s, v in zip((1, 2, 3, 4), values)], "summary": {}}

    a, b = [10.0, 11.0, 12.0, 13.5], [10.5, 11.2, 12.9, 13.6]
    return {"suite": "toy", "meta": {"commit": "abc"},
            "cells": {"c1": {"controllers": {"guarded": runs(a), "plain": runs(b), "other": runs(b),
                                             "diverged": runs([None, None, None, 14.0])}}}}, a, b


def test_known_answer_and_errors(tmp_path, capsys):
    results, a, b = _results()
    rows = pairwise_rows(results, parse_pairs("guarded:plain,other:plain"))
    first = rows[0]
    assert (first["cell"], first["controller"], first["reference"], first["n"]) == ("c1", "guarded", "plain", 4)
    assert first["rel_change"] == pytest.approx((sum(a) - sum(b)) / sum(b))
    assert first["p"] == pytest.approx(stats.ttest_rel(a, b).pvalue)
    # Holm over the two compared with "plain": "other" equals it (no test), so guarded's p stays as it is
    assert rows[1]["p"] is None and first["p_holm"] == pytest.approx(first["p"])
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    out = tmp_path / "pairwise.md"
    assert main(["--results", str(path), "--pairs", "guarded:plain", "--out", str(out)]) == 0
    text = out.read_text()
    assert f"{100 * first['rel_change']:+.1f} %" in text and "commit `abc`" in text
    # runs that diverged have no test perplexity: one complete pair is no test, and the table says so
    assert main(["--results", str(path), "--pairs", "diverged:plain", "--out", str(out)]) == 0
    assert "| `c1` | `diverged` | `plain` | 1 | " in out.read_text()
    assert "n/a (fewer than 2 complete pairs)" in out.read_text()
    assert main(["--results", str(path), "--pairs", "guarded:nope"]) == 2
    assert "no controller nope" in capsys.readouterr().err
    assert main(["--results", str(path), "--pairs", "guarded"]) == 2
    assert "CONTROLLER:REFERENCE" in capsys.readouterr().err
    assert main(["--results", str(tmp_path / "none.json"), "--pairs", "a:b"]) == 2
