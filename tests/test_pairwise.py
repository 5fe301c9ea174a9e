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


def test_pooling_two_seed_sets_pairs_them_side_by_side_and_refuses_a_seed_twice(tmp_path, capsys):
    def suite(name, seeds, guarded, plain, guarded_name):
        def runs(values):
            return {"seeds": [{"seed": s, "final_test_ppl": v} for s, v in zip(seeds, values)], "summary": {}}

        return {"suite": name, "meta": {"commit": name}, "cells": {"c1": {"controllers": {
            guarded_name: runs(guarded), "plain": runs(plain)}}}}

    first = suite("s1", (1, 2, 3), [10.0, 11.0, 12.5], [10.4, 11.1, 12.6], "guarded_variant")
    second = suite("s2", (7, 8, 9), [9.0, 9.6, 10.0], [9.5, 9.9, 10.1], "guarded")
    paths = []
    for res in (first, second):
        paths.append(tmp_path / f"{res['suite']}.json")
        paths[-1].write_text(json.dumps(res))
    out = tmp_path / "pooled.md"
    assert main(["--results", *map(str, paths), "--rename", "guarded_variant=guarded", "--pairs", "guarded:plain",
                 "--out", str(out)]) == 0
    a, b = [10.0, 11.0, 12.5, 9.0, 9.6, 10.0], [10.4, 11.1, 12.6, 9.5, 9.9, 10.1]
    text = out.read_text()
    # six pairs from two files of three: the paired t of all six, not of either file
    assert "| `c1` | `guarded` | `plain` | 6 | " in text
    assert f"{stats.ttest_rel(a, b).pvalue:.3g}" in text and f"{100 * (sum(a) - sum(b)) / sum(b):+.1f} %" in text
    assert "commit `s1`" in text and "commit `s2`" in text and "--rename guarded_variant=guarded" in text
    # without the rename the first file has no "guarded": refused, not pooled from the second file alone;
    # the same seeds twice are refused, not averaged
    assert main(["--results", *map(str, paths), "--pairs", "guarded:plain"]) == 2
    assert "results file 1, cell c1: no controller guarded" in capsys.readouterr().err
    assert main(["--results", str(paths[1]), str(paths[1]), "--pairs", "guarded:plain"]) == 2
    assert "seed(s) 7, 8, 9 in more than one results file" in capsys.readouterr().err
    assert main(["--results", str(paths[0]), "--rename", "guarded_variant", "--pairs", "guarded:plain"]) == 2
    assert "is not OLD=NEW" in capsys.readouterr().err
