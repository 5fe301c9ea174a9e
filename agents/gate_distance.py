"""How far the states a policy's outcome gates decide on lie from the runs the gates were fitted on, per
run of a suite, beside how each run ended against a reference.

A gate is a logistic regression fitted on a few dozen runs or fewer; it answers any state, and most confidently
far from them. This replays each run of one ``policy`` controller of a suite up to its gates' decision
(the same jobs, settings, seeds and envs as ``agents.evaluate``; only the first windows are trained,
so with the suite's tuning cache in ``runs/suites/<suite>/tuning`` it costs a few per cent of the
suite; without it ``tune_lr`` sweeps again) and tabulates, per run: each gate's probability and its
distance (:meth:`~agents.controllers.outcome_gate.OutcomeGate.extrapolation`: the largest absolute
standardised feature, and which), whether the policy was let through, and the run's test perplexity
against ``--reference`` from the suite's committed ``results.json``::

    python -m agents.gate_distance --suite core_guard --controller policy --reference tuned_fixed \\
        --out assets/results/core_guard/gate_distance.md

The replay is the run: a gate decision that differs from the one the suite's run recorded is an
error, not a row.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from agents.evaluate import job_controller, job_env, make_jobs
from stso_env.errors import ConfigError, DataError
from stso_env.files import write_text_or_print


def replay(job: dict[str, Any]) -> dict[str, Any]:
    """Train ``job``'s run until its policy's gates have decided; what they read and decided."""
    ctrl = job_controller(job)
    if getattr(ctrl, "gate", None) is None:
        raise ConfigError(f"controller {job['controller']!r} has no outcome gate (settings: gate)")
    env = job_env(job, ctrl)
    try:
        obs, info = env.reset(seed=int(job["seed"]))
        ctrl.reset(env, seed=int(job["seed"]), run_name=f"{job['controller']}__seed{job['seed']}")
        for _ in range(ctrl.gate.window + 1):
            action = ctrl.act(obs, info)
            if ctrl.gate_open is not None:
                break
            obs, _, terminated, truncated, info = env.step(action)
            if terminated or truncated:
                break
        return {key: value for key, value in ctrl.describe().items()
                if key.startswith(("gate", "early_gate")) or key == "extrapolation_refusals"}
    finally:
        ctrl.close()
        env.close()


def _ppl(results: dict[str, Any], cell: str, controller: str) -> dict[int, float | None]:
    try:
        runs = results["cells"][cell]["controllers"][controller]["seeds"]
    except KeyError:
        raise DataError(f"results.json: no controller {controller!r} in cell {cell!r}") from None
    return {int(r["seed"]): r.get("final_test_ppl") for r in runs}


def _z(value: float | None, feature: str | None) -> str:
    return "" if value is None else f"{value:.1f} ({feature})"


def table(rows: list[dict[str, Any]], reference: str) -> list[str]:
    lines = [f"| cell | seed | early gate P | early gate distance (feature) | gate P | gate distance (feature) | "
             f"let through at window | test ppl vs `{reference}` |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        g = r["gates"]
        p_early, p_late = g.get("early_gate_probability"), g.get("gate_probability")
        change = "n/a" if r["change"] is None else f"{100 * r['change']:+.1f} %"
        late_asked = g.get("gate_z") is not None
        lines.append(
            f"| `{r['cell']}` | {r['seed']} | {'' if p_early is None else f'{p_early:.3f}'} | "
            f"{_z(g.get('early_gate_z'), g.get('early_gate_z_feature'))} | "
            f"{f'{p_late:.3f}' if late_asked and p_late is not None else ''} | "
            f"{_z(g.get('gate_z'), g.get('gate_z_feature'))} | "
            f"{'closed' if not g.get('gate_open') else g.get('gate_window')} | {change} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m agents.gate_distance", description=__doc__.split("\n\n")[0])
    ap.add_argument("--suite", required=True, help="a suite: a name in configs/suites or a YAML path")
    ap.add_argument("--controller", required=True, help="the suite's policy controller (or variant) to replay")
    ap.add_argument("--reference", default="tuned_fixed", help="the controller its test ppl is compared with")
    ap.add_argument("--results", type=Path, help="the suite's results.json (default assets/results/<suite>/)")
    ap.add_argument("--cells", help="comma list of cells to replay (default: every cell)")
    ap.add_argument("--out", type=Path, help="write the Markdown here (default: print it)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    import torch

    from stso_env.eval.suite import load_suite

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what the suite's workers ran with; the replay must be the same run
    try:
        suite = load_suite(args.suite)
        if args.controller not in suite.controllers or suite.controller_of(args.controller) != "policy":
            raise ConfigError(f"--controller {args.controller!r}: not a policy controller of suite {suite.name} "
                              f"(it runs {', '.join(suite.controllers)})")
        path = args.results or Path("assets/results") / suite.name / "results.json"
        if not path.is_file():
            raise DataError(f"--results: no such file {path}; run `python -m agents.evaluate --suite {suite.name}`")
        results = json.loads(path.read_text(encoding="utf-8"))
        out = Path("runs/suites") / suite.name
        jobs = [j for j in make_jobs(suite, out) if j["controller"] == args.controller]
        if args.cells:
            wanted = set(args.cells.split(","))
            unknown = wanted - {j["cell"] for j in jobs}
            if unknown:
                raise ConfigError(f"--cells: no cell {', '.join(sorted(unknown))} in suite {suite.name}")
            jobs = [j for j in jobs if j["cell"] in wanted]
        jobs.sort(key=lambda j: ([c.name for c in suite.cells].index(j["cell"]), j["seed"]))
        rows = []
        for job in tqdm(jobs, desc="gate replays", unit="run", disable=args.no_progress):
            gates = replay(job)
            stored = out / "runs" / job["cell"] / f"{args.controller}__seed{job['seed']}.json"
            if stored.is_file():
                recorded = json.loads(stored.read_text())["setup"]["describe"]
                if (recorded.get("gate_open"), recorded.get("gate_window")) != (gates["gate_open"],
                                                                                 gates["gate_window"]):
                    raise DataError(f"{job['cell']} seed {job['seed']}: the replay's gate decision "
                                    f"{gates['gate_open']} at {gates['gate_window']} differs from the run's "
                                    f"{recorded.get('gate_open')} at {recorded.get('gate_window')} ({stored})")
            mine = _ppl(results, job["cell"], args.controller).get(job["seed"])
            ref = _ppl(results, job["cell"], args.reference).get(job["seed"])
            change = None if mine is None or ref is None else (mine - ref) / ref
            rows.append({"cell": job["cell"], "seed": job["seed"], "gates": gates, "change": change})
    except (ConfigError, DataError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)
    command = " ".join(["python -m agents.gate_distance", *(argv if argv is not None else sys.argv[1:])])
    text = "\n".join([
        f"# Gate distances: suite `{suite.name}`, controller `{args.controller}`", "",
        f"Command: `{command}`  ",
        f"From: `{path}` (commit `{results.get('meta', {}).get('commit', 'n/a')}`) and a replay of each run up to "
        "its gates' decision. Distance: the largest absolute feature of the state the gate read, in standard "
        "deviations of the gate's fitting runs (none of n fitting runs lies beyond sqrt(n - 1), 3.3 for 12); "
        "P: the gate's probability that the policy beats its reference. The test perplexity is the suite's.", "",
        *table(rows, args.reference), ""])
    write_text_or_print(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
