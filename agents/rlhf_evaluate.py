"""Compare controllers of STSO-RLHF-v0 runs on held-out seeds and test prompts; calibrate the scenarios.

``python -m agents.rlhf_evaluate [--scenarios overoptimize,collapse,noisy_reward] [--controllers
fixed,adaptive_kl,rule] [--seeds 10] [--first-seed 1000] [--workers 2] [--size default] [--out DIR]
[--log-dir DIR]``
(also reached as ``python -m agents.evaluate --env STSO-RLHF-v0 ...``).

Runs whole episodes, one per (scenario, controller, seed), in worker processes of one thread
each; every controller of a seed starts from the same policy, reward model and sampling seed.
Controllers (:mod:`agents.rlhf_controllers`) read only the observation and the probe prompts'
gold score; the final score is the gold score of greedy completions of the held-out **test**
prompts (disjoint from the probe prompts by construction, :mod:`stso_env.rlhf.preferences`) at
the end of the episode. A run that diverged keeps the policy it had when it stopped.

Writes ``OUT/results.json`` (every episode, the summary, the M3 verdicts, with commit, versions
and machine) and ``OUT/report.md``: per scenario and controller the share of seeds that diverged
(by rule) and the test gold, and **M3** for each controller against ``fixed`` and against
``adaptive_kl``: it holds when the divergence rate falls by at least half and the mean test gold
is no worse (paired over seeds; the paired t and Wilcoxon tests are reported beside it). With
``--controllers fixed`` the report is the scenarios' calibration: the issue asks each failure
scenario to make ``fixed`` fail on 30-70 % of seeds.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SCENARIOS = "overoptimize,collapse,noisy_reward"
M3_DIVERGENCE_CUT = 0.5  # the candidate's divergence rate must be at most half the reference's


def run_episode(job: dict[str, Any]) -> dict[str, Any]:
    """One episode under one controller; returns its record (runs in a worker process)."""
    import warnings

    import gymnasium as gym

    import stso_env  # noqa: F401  (registers the env)
    from agents.rlhf_controllers import make_rlhf_controller
    from stso_env.envs.rlhf_env import NEUTRAL_ACTION

    warnings.filterwarnings("ignore")
    t0 = time.perf_counter()
    name, _, path = job["controller"].partition(":")
    ctrl = make_rlhf_controller(name, path=path, target=job["kl_target"], horizon=job["kl_horizon"])
    run_dir = None
    if job.get("log_dir"):
        run_dir = str(Path(job["log_dir"]) / f"{Path(job['scenario']).stem}-{name}-{job['seed']}")
    env = gym.make("STSO-RLHF-v0", scenario=job["scenario"], size=job["size"], prepared=job["prepared"],
                   decision_interval=job["interval"], run_dir=run_dir)
    u = env.unwrapped
    obs, info = env.reset(seed=job["seed"])
    ctrl.reset(u, info)
    golds, ret, done, reasons, step_div = [info["gold_probe"]], 0.0, False, [], None
    while not done:
        obs, r, term, trunc, info = env.step(ctrl.act(obs, info))
        ret += r
        done = term or trunc
        golds.append(info["gold_probe"])
        if term:
            reasons, step_div = info["divergence_reasons"], info["step"]
    test_gold = u.test_gold()
    if getattr(ctrl, "decisions", None) is not None and job.get("branches_dir"):
        from stso_env.files import write_text_atomic

        why = {"scenario": job["scenario"], "seed": job["seed"], "controller": job["controller"],
               "decisions": ctrl.decisions}
        write_text_atomic(Path(job["branches_dir"]) / f"{Path(job['scenario']).stem}-{job['seed']}.json",
                          json.dumps(why, indent=1) + "\n")
    record = {**{k: job[k] for k in ("scenario", "controller", "seed")}, "diverged": bool(reasons),
              "reasons": reasons, "diverged_at": step_div, "steps": info["step"], "return": ret,
              "test_gold": test_gold, "probe_gold_start": u.monitor.gold0, "probe_gold_end": golds[-1],
              "probe_gold_peak": max(golds), "kl_end": info["kl"], "beta_end": u.run.knobs.beta,
              "lr_scale_end": u.run.knobs.lr_scale, "seconds": time.perf_counter() - t0}
    if getattr(ctrl, "decisions", None) is not None:
        record["branch_decisions"] = len(ctrl.decisions)
        record["verifications"] = int(ctrl.verified)
        record["interventions"] = sum(d["committed"] != list(NEUTRAL_ACTION) for d in ctrl.decisions)
    env.close()
    return record


def summarise(records: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per scenario and controller: divergence share and rules, test gold."""
    cells: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        cells[r["scenario"]][r["controller"]].append(r)
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for sc, by in cells.items():
        out[sc] = {}
        for ctrl, rows in by.items():
            gold = [r["test_gold"] for r in rows]
            out[sc][ctrl] = {"episodes": len(rows), "diverged": sum(r["diverged"] for r in rows),
                             "divergence_rate": sum(r["diverged"] for r in rows) / len(rows),
                             "reasons": dict(Counter(x for r in rows for x in r["reasons"])),
                             "test_gold_mean": sum(gold) / len(gold), "test_gold_min": min(gold),
                             "test_gold_max": max(gold), "seconds_mean": sum(r["seconds"] for r in rows) / len(rows)}
    return out


def m3(records: list[dict[str, Any]], candidate: str, reference: str) -> dict[str, Any] | None:
    """M3 of ``candidate`` against ``reference`` over all scenarios, paired by (scenario, seed)."""
    from stso_env.eval.stats import paired_test

    by = {(r["scenario"], r["seed"], r["controller"]): r for r in records}
    keys = sorted({(s, d) for s, d, c in by if c == candidate} & {(s, d) for s, d, c in by if c == reference})
    if not keys:
        return None
    cand = [by[(s, d, candidate)] for s, d in keys]
    ref = [by[(s, d, reference)] for s, d in keys]
    rate_c = sum(r["diverged"] for r in cand) / len(keys)
    rate_r = sum(r["diverged"] for r in ref) / len(keys)
    test = paired_test([r["test_gold"] for r in cand], [r["test_gold"] for r in ref])
    # with a reference that never diverged there is nothing to halve: M3 cannot be shown there
    divergence_ok = rate_c <= M3_DIVERGENCE_CUT * rate_r if rate_r > 0 else None
    gold_ok = test["mean_a"] >= test["mean_b"]
    return {"pairs": len(keys), "divergence_rate": rate_c, "reference_divergence_rate": rate_r,
            "test_gold": test["mean_a"], "reference_test_gold": test["mean_b"], "gold_diff_ci95": test["diff_ci95"],
            "t_p": test["p"], "wilcoxon_p": test["wilcoxon_p"], "divergence_halved": divergence_ok,
            "gold_no_worse": gold_ok, "holds": bool(divergence_ok and gold_ok)}


def _fmt(x: Any, spec: str = ".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def report(summary: dict[str, Any], verdicts: dict[str, Any], meta: dict[str, Any]) -> str:
    c = meta["commit"]
    v = meta["versions"]
    lines = ["# STSO-RLHF-v0: controllers on held-out seeds", "",
             f"Command: `{meta['command']}`  ",
             f"Commit: {c['commit']}{' (uncommitted changes)' if c['dirty'] else ''}  ",
             f"Machine: {meta['machine']['cpu']}, {meta['workers']} workers of 1 thread; python {v['python']}, "
             f"torch {v['torch']}, transformers {v['transformers']}, trl {v['trl']}; {meta['seconds']:.0f} s", ""]
    if meta.get("merged"):
        mg = meta["merged"]
        lines[-1:-1] = ["", f"Episodes of {', '.join(mg['controllers'])} ({mg['episodes']}) from `{mg['path']}` "
                        f"(commit {mg['commit']['commit'][:12]}), same scenarios and seeds.  "]
    lines += [
             "Divergence: KL blow-up, entropy collapse or gold collapse (`stso_env.rlhf.monitor.DivergenceRule`). "
             "Test gold: gold score of greedy completions of the held-out test prompts when the episode ended "
             "(controllers only see probe prompts).", "",
             "| scenario | controller | episodes | diverged | rate | rules | test gold mean [min, max] |",
             "|---|---|---|---|---|---|---|"]
    for sc in sorted(summary):
        for ctrl in sorted(summary[sc]):
            s = summary[sc][ctrl]
            rules = ", ".join(f"{k} {n}" for k, n in sorted(s["reasons"].items())) or "-"
            gold = f"{s['test_gold_mean']:.3f} [{s['test_gold_min']:.3f}, {s['test_gold_max']:.3f}]"
            lines.append(f"| {sc} | {ctrl} | {s['episodes']} | {s['diverged']} | {s['divergence_rate']:.0%} | "
                         f"{rules} | {gold} |")
    if verdicts:
        lines += ["", f"## M3: divergence down {1 - M3_DIVERGENCE_CUT:.0%} at a test gold no worse", "",
                  "Pooled over the scenarios above, paired by (scenario, seed).", "",
                  "| controller | against | pairs | divergence rate (vs ref) | test gold (vs ref) | gold diff 95% CI | "
                  "t p | Wilcoxon p | M3 |", "|---|---|---|---|---|---|---|---|---|"]
        for key, m in sorted(verdicts.items()):
            cand, ref = key.split(" vs ")
            ci = m["gold_diff_ci95"]
            ci_txt = f"[{_fmt(ci[0], '+.3f')}, {_fmt(ci[1], '+.3f')}]" if ci else "-"
            verdict = ("holds" if m["holds"] else "fails") if m["divergence_halved"] is not None else \
                "n/a (the reference never diverged)"
            lines.append(f"| {cand} | {ref} | {m['pairs']} | {m['divergence_rate']:.0%} "
                         f"({m['reference_divergence_rate']:.0%}) | {m['test_gold']:.3f} "
                         f"({m['reference_test_gold']:.3f}) | {ci_txt} | {_fmt(m['t_p'])} | "
                         f"{_fmt(m['wilcoxon_p'])} | {verdict} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m agents.rlhf_evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--env", default="STSO-RLHF-v0", choices=("STSO-RLHF-v0",), help=argparse.SUPPRESS)
    p.add_argument("--scenarios", default=SCENARIOS, help=f"comma-separated names or YAML paths (default {SCENARIOS})")
    p.add_argument("--controllers", default="fixed,adaptive_kl,rule",
                   help="comma-separated: fixed, adaptive_kl, rule, explore[:P], branch:LOGDIR (the proxy's "
                        "logs), policy:PATH (a saved SB3 model)")
    p.add_argument("--seeds", type=int, default=10, help="seeds per scenario and controller")
    p.add_argument("--first-seed", type=int, default=1000, help="first seed (calibration used 0..)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--size", default="default", choices=("default", "tiny"))
    p.add_argument("--prepared", default="runs/rlhf", help="folder of agents.rlhf_prepare (default runs/rlhf)")
    p.add_argument("--interval", type=int, default=8, help="decision interval in optimizer steps")
    p.add_argument("--kl-target", type=float, default=0.1, help="adaptive_kl: target KL (nats per token)")
    p.add_argument("--kl-horizon", type=float, default=400.0, help="adaptive_kl: horizon in optimizer steps")
    p.add_argument("--out", default="runs/rlhf_eval")
    p.add_argument("--merge", default=None, metavar="RESULTS",
                   help="add the episodes of other controllers on the same scenarios and seeds from an earlier "
                        "results.json (the env is deterministic; the report names the file and its commit)")
    p.add_argument("--log-dir", default=None, metavar="DIR",
                   help="log every episode's steps to DIR/SCENARIO-CONTROLLER-SEED/log_db.parquet and TensorBoard "
                        "(the proxy's training data: --controllers explore --log-dir runs/rlhf_logs)")
    p.add_argument("--readme-block", default=None, metavar="NAME",
                   help="also write the report's tables between README's results:NAME markers")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    import transformers
    import trl
    from tqdm import tqdm

    from agents.evaluate import git_commit, machine
    from agents.rlhf_controllers import RLHF_CONTROLLERS
    from stso_env.errors import STSOError
    from stso_env.eval.engine import run_jobs
    from stso_env.files import write_text_atomic
    from stso_env.rlhf.config import load_prepare_config
    from stso_env.rlhf.prepare import prepare
    from stso_env.rlhf.scenario import load_rlhf_scenario

    scenarios = [s for s in args.scenarios.split(",") if s]
    controllers = [c for c in args.controllers.split(",") if c]
    try:
        for s in scenarios:
            load_rlhf_scenario(s)
        for c in controllers:
            name, _, path = c.partition(":")
            if name not in RLHF_CONTROLLERS:
                raise STSOError(f"--controllers: unknown {name!r}; choose from {', '.join(RLHF_CONTROLLERS)}")
            if name == "policy" and not Path(path).is_file():
                raise STSOError(f"--controllers: policy:{path}: no such file (give the saved SB3 model's .zip)")
            if name == "branch" and not Path(path).is_dir():
                raise STSOError(f"--controllers: branch:{path}: no such folder (give the proxy's log folder, "
                                "e.g. branch:runs/rlhf_logs from --controllers explore --log-dir runs/rlhf_logs)")
        if args.seeds < 1:
            raise STSOError(f"--seeds: need at least 1, got {args.seeds}")
        prepare(load_prepare_config(size=args.size), args.prepared, progress=not args.no_progress)  # once
    except STSOError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    jobs = [{"scenario": s, "controller": c, "seed": args.first_seed + i, "size": args.size,
             "prepared": args.prepared, "interval": args.interval, "kl_target": args.kl_target,
             "kl_horizon": args.kl_horizon, "log_dir": args.log_dir, "branches_dir": str(Path(args.out) / "branches")}
            for s in scenarios for i in range(args.seeds) for c in controllers]
    commit = git_commit()  # the code the episodes run (the tree may change while they do)
    t0 = time.perf_counter()
    records = [rec for _, rec in tqdm(run_jobs(run_episode, jobs, workers=args.workers, threads=1),
                                      total=len(jobs), desc="episodes", file=sys.stderr,
                                      disable=args.no_progress)]
    merged = None
    if args.merge:
        old = json.loads(Path(args.merge).read_text(encoding="utf-8"))
        cells = {(j["scenario"], j["seed"]) for j in jobs}
        extra = [r for r in old["episodes"]
                 if (r["scenario"], r["seed"]) in cells and r["controller"] not in controllers]
        merged = {"path": args.merge, "commit": old["meta"]["commit"], "episodes": len(extra),
                  "controllers": sorted({r["controller"] for r in extra})}
        records += extra
        controllers += merged["controllers"]
    records.sort(key=lambda r: (r["scenario"], r["controller"], r["seed"]))
    summary = summarise(records)
    verdicts = {f"{c} vs {ref}": m3(records, c, ref) for c in controllers for ref in ("fixed", "adaptive_kl")
                if c not in (ref, "fixed") and ref in controllers}
    meta = {"command": "python -m agents.rlhf_evaluate " + " ".join(argv if argv is not None else sys.argv[1:]),
            "commit": commit, "machine": machine(), "workers": args.workers,
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "transformers": transformers.__version__, "trl": trl.__version__},
            "seconds": time.perf_counter() - t0, "args": vars(args), "merged": merged}
    out = Path(args.out)
    write_text_atomic(out / "results.json", json.dumps({"meta": meta, "summary": summary, "m3": verdicts,
                                                        "episodes": records}, indent=2) + "\n")
    text = report(summary, verdicts, meta)
    write_text_atomic(out / "report.md", text)
    if args.readme_block:
        from stso_env.config import REPO_ROOT
        from stso_env.eval.published import replace_readme_block

        block = f"From `{out / 'report.md'}` (commit {meta['commit']['commit']}):\n\n" + text.split("\n", 2)[2]
        replace_readme_block(REPO_ROOT / "README.md", args.readme_block, block.replace("\n## ", "\n#### "))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
