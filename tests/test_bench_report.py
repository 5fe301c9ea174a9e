"""The README's benchmark table is rendered from the committed benchmark JSON, never typed by hand."""

from __future__ import annotations

import json
from pathlib import Path

from agents.bench import BENCHES, report
from stso_env.eval.published import readme_block

REPO = Path(__file__).resolve().parent.parent
PUBLISHED = REPO / "assets" / "results" / "bench"


def test_readme_bench_table_is_the_committed_run_and_each_file_says_where_it_ran():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert readme_block(readme, "bench") == report(PUBLISHED, label="assets/results/bench")
    for name in BENCHES:
        meta = json.loads((PUBLISHED / f"{name}.json").read_text())["meta"]
        assert meta["commit"]["commit"] and meta["torch"] and meta["threads"] >= 1 and meta["device"] == "cpu"
