"""Evaluate controllers of STSO-GPT2-v0 under one shared FLOPs budget, over several seeds.

    python -m agents.evaluate --controllers fixed,zclip,spam,arc,hd,pbt,rule,stso --seeds 5 \\
        --scenario spiky --corpus builtin --proxy runs/proxy --steps 2000 --decision-interval 10

For every controller and seed (seeds ``--seed-offset`` .. ``--seed-offset + --seeds - 1``, the same for
every controller) one main run is trained in a fresh env and steered by the controller until the episode
ends (divergence or the schedule's last step) or the budget is spent. Writes, under ``--out`` (default
``runs/eval__<scenario>__<unix time>/``):

* ``results.json``: ``settings``; ``controllers -> NAME -> {"seeds": [per-run metrics], "summary":
  {metric: {mean, ci95, n, n_dropped}}}``; ``tests -> NAME -> {final_val_ppl, instability_events}``
  (Welch t-tests against ``fixed``); ``criteria`` (M1/M2 of ``stso``). Rewritten atomically after every
  run, with ``"complete": false`` until the last one is done.
* ``curves.json``: per controller and seed, one entry per env window: global step, training loss, probe
  loss, uncertainty index, trigger; and the controller's decisions.
* ``report.md`` and ``figures/*.png``; decision folders of branching controllers under ``branches/``.

FLOPs accounting (training FLOPs only; the probe pass after each window and the final validation are
measurements, identical for every controller, and are not counted):

* Budget: every controller gets the FLOPs of a full ``--steps``-step run at the nominal cost,
  ``flops_per_token * seq_len * batch_size * steps``.
* Main run: ``env.unwrapped._total_flops``, the FLOPs of the windows on the main run's kept trajectory.
  It includes the window ``reset`` runs before the first observation (real training on the main run),
  and a restore to a snapshot rewinds it, so rolled-back steps leave it.
* Outside the main run: ``ctrl.extra_flops``, which by the controllers' convention holds everything
  trained off the kept trajectory: forks, verification rollouts, population members *and* rolled-back
  main-run steps. Two lower bounds guard it: the FLOPs the harness sees the main run lose while the
  controller acts (a restore), and what the controller charged to the run's event tracker
  (``add_wasted``, every reason but ``"recovery"``; these are the same FLOPs, never added twice).
  ``outside = max(extra_flops, rolled back, charged)``.
* ``total_flops = main + outside``; the run stops before a window once it reaches the budget, so a
  controller may overrun by the window that was started plus what its last ``act`` spent.
* ``wasted = recovery + outside``: ``recovery`` is the tracker's ``wasted_by_reason["recovery"]`` (steps of
  the kept trajectory spent above the pre-event loss while recovering); everything outside the main run
  is waste for the main run. ``wasted_flops_fraction = wasted / total_flops``.
* Controllers with ``main_run_share < 1`` (population methods) get a main-run schedule of
  ``steps * main_run_share`` steps, rounded down to a multiple of the decision interval (at least two
  windows: ``reset`` runs the first), and the same budget.

Per-run metrics (``results.json``, ``controllers -> NAME -> seeds``):

* ``instability_events_per_100k_steps``: every instability event (OLMo-core rule) the main run went
  through, rolled-back windows included (``accounting.instability_events_experienced``), per 100k
  optimizer steps it executed (``accounting.main_steps_executed``). A restore rewinds the tracker, so its
  ``n_events`` (``accounting.instability_events``) would hide spikes that a rollback undid.
* ``mean_time_to_recover_steps``: mean of the tracker's recovery times (None without a recovery).
* ``wasted_flops_fraction``, ``total_flops``: see above.
* ``final_val_ppl``: ``trainer.evaluate()["val_ppl"]`` on the validation split (None if the loss is not
  finite, e.g. after a divergence; ``diverged`` says so).
* ``branch_invoke_rate``: ``branch_invocations`` per ``env.step`` call.
* ``proxy_latency_ms``: mean of the controller's proxy scoring times (None without proxy calls).
* ``checkpoint_io_seconds``: the controller's ``io_seconds`` (save/restore/copy of run state).
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from tqdm import tqdm

ENV_ID = "STSO-GPT2-v0"
PROXY_CONTROLLERS = ("stso", "proxy_only", "single_trigger")
POLICY_CONTROLLERS = ("policy",)
REFERENCE = "fixed"
METHOD = "stso"
BUDGET_RTOL = 1e-9  # float sums of per-step FLOPs vs. the product formula


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, argparse.ArgumentParser]:
    from agents.controllers import CONTROLLERS

    p = argparse.ArgumentParser(prog="python -m agents.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--controllers", default="fixed,zclip",
                   help=f"comma-separated controller names (default %(default)s); allowed: {', '.join(CONTROLLERS)}")
    p.add_argument("--seeds", type=int, default=5, help="seeds per controller (default %(default)s)")
    p.add_argument("--seed-offset", type=int, default=0,
                   help="first seed; seeds are OFFSET .. OFFSET+SEEDS-1 (default %(default)s)")
    p.add_argument("--scenario", default="spiky",
                   help="instability scenario: a name in configs/scenarios or a YAML path (default %(default)s)")
    p.add_argument("--corpus", default="builtin",
                   help="corpus: 'builtin' or a text file/folder path (default %(default)s)")
    p.add_argument("--tokenizer", default="byte",
                   help="tokenizer: 'byte' or a GPT-2 tokenizer folder (default %(default)s)")
    p.add_argument("--preset", default="tiny", help="GPT-2 model size preset (default %(default)s)")
    p.add_argument("--steps", type=int, default=1000,
                   help="optimizer steps of a full run; the shared budget is their nominal FLOPs (default %(default)s)")
    p.add_argument("--decision-interval", type=int, default=10,
                   help="optimizer steps per env step, a window (default %(default)s)")
    p.add_argument("--policy", default=None, help="policy.zip for the 'policy' controller (agents.train_controller)")
    p.add_argument("--proxy", default=None,
                   help="trained proxy folder for stso / proxy_only / single_trigger (agents.train_proxy)")
    p.add_argument("--settings", default=None,
                   help="YAML mapping controller name -> constructor settings, e.g. 'pbt: {population: 4}'")
    p.add_argument("--out", default=None, help="output folder (default runs/eval__<scenario>__<unix time>)")
    p.add_argument("--builtin-chars", type=int, default=None,
                   help="characters of the built-in corpus (smaller starts faster; default from TrainConfig)")
    p.add_argument("--device", default=None, choices=("auto", "cpu", "cuda"),
                   help="training device (default from TrainConfig: auto)")
    p.add_argument("--val-windows", type=int, default=64,
                   help="validation windows of the final perplexity (default %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv), p


def check_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[str]:
    """Validate the arguments (``parser.error`` exits with status 2); returns the controller names."""
    from agents.controllers import CONTROLLERS

    names = list(dict.fromkeys(n.strip() for n in args.controllers.split(",") if n.strip()))
    if not names:
        parser.error(f"--controllers: give at least one name; allowed: {', '.join(CONTROLLERS)}")
    unknown = [n for n in names if n not in CONTROLLERS]
    if unknown:
        parser.error(f"--controllers: unknown controller(s) {', '.join(unknown)}; allowed: {', '.join(CONTROLLERS)}")
    if args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")
    if args.seed_offset < 0:
        parser.error(f"--seed-offset must be >= 0, got {args.seed_offset}")
    if args.decision_interval < 1:
        parser.error(f"--decision-interval must be >= 1, got {args.decision_interval}")
    if args.steps < 2 * args.decision_interval or args.steps % args.decision_interval:
        parser.error(f"--steps must be a multiple of --decision-interval ({args.decision_interval}) of at least two "
                     f"windows (reset runs the first), got {args.steps}")
    if args.val_windows < 1:
        parser.error(f"--val-windows must be >= 1, got {args.val_windows}")
    need_proxy = [n for n in names if n in PROXY_CONTROLLERS]
    if need_proxy and args.proxy is None:
        parser.error(f"--proxy DIR is required for {', '.join(need_proxy)}: train one with "
                     "`python -m agents.collect ...` then `python -m agents.train_proxy --log-db RUN/log_db.parquet "
                     "--out runs/proxy`, or use the proxy folder `python -m agents.train_controller` writes")
    if need_proxy and not Path(args.proxy).is_dir():
        parser.error(f"--proxy {args.proxy}: not a folder (expected proxy.json + proxy.safetensors from "
                     "agents.train_proxy or agents.train_controller)")
    need_policy = [n for n in names if n in POLICY_CONTROLLERS]
    if need_policy and args.policy is None:
        parser.error("--policy PATH is required for the 'policy' controller: train one with "
                     "`python -m agents.train_controller` (it writes policy.zip)")
    if need_policy and not Path(args.policy).is_file():
        parser.error(f"--policy {args.policy}: no such file")
    return names


def load_settings(path: str | None, parser: argparse.ArgumentParser) -> dict[str, dict[str, Any]]:
    """``--settings`` YAML: a mapping of controller name -> mapping of constructor settings."""
    from agents.controllers import CONTROLLERS

    if path is None:
        return {}
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as err:
        parser.error(f"--settings {path}: {err}")
    except yaml.YAMLError as err:
        parser.error(f"--settings {path}: not valid YAML ({err})")
    if not isinstance(data, dict) or not all(isinstance(v, dict) or v is None for v in data.values()):
        parser.error(f"--settings {path}: expected a mapping 'controller name: {{setting: value}}'")
    unknown = [k for k in data if k not in CONTROLLERS]
    if unknown:
        parser.error(f"--settings {path}: unknown controller(s) {unknown}; allowed: {', '.join(CONTROLLERS)}")
    return {k: dict(v or {}) for k, v in data.items()}


def main_run_steps(steps: int, share: float, decision_interval: int) -> int:
    """The main run's schedule: ``steps * share`` rounded down to whole windows, at least two windows
    (``reset`` runs the first; an env step after a reset that ended the schedule would train nothing)."""
    windows = int(math.floor(steps * share / decision_interval + 1e-9))
    return max(2, windows) * decision_interval


def versions() -> dict[str, str]:
    import gymnasium
    import scipy
    import torch
    import transformers

    import stso_env

    return {"python": platform.python_version(), "stso": stso_env.__version__, "torch": torch.__version__,
            "numpy": np.__version__, "scipy": scipy.__version__, "gymnasium": gymnasium.__version__,
            "transformers": transformers.__version__}


def _finite(x: Any) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


class Ledger:
    """The harness's own FLOPs and event accounting of one main run (see the module docstring).

    ``outside()`` is the FLOPs spent off the kept trajectory: the controller's ``extra_flops``, at least
    what the harness saw rolled back while the controller acted and what the controller charged to the
    event tracker for reasons other than recovery.
    """

    def __init__(self, env: Any, ctrl: Any) -> None:
        self.base, self.ctrl = env.unwrapped, ctrl
        self.rolled_back = 0.0  # main-run FLOPs that left the kept trajectory during act() (restores)
        self.act_trained = 0.0  # main-run FLOPs added during act() (a controller stepping the main run itself)
        self.window_flops = 0.0  # FLOPs of the windows the harness ran (reset + env.step)
        self.events = 0  # events the main run went through, rolled-back windows included
        self.steps = 0  # optimizer steps the main run ran, rolled-back ones included
        self._mark: tuple[float, int, int] | None = None

    def _state(self) -> tuple[float, int, int]:
        b = self.base
        return float(b._total_flops), int(b.monitor.events.n_events), int(b.trainer.global_step)

    def charged(self) -> dict[str, float]:
        """The tracker's wasted FLOPs by reason (restores rewind it: a lower bound of what was charged)."""
        return {k: float(v) for k, v in self.base.monitor.events.wasted_by_reason.items()}

    def outside(self) -> float:
        charged = sum(v for k, v in self.charged().items() if k != "recovery")
        return max(float(self.ctrl.extra_flops), self.rolled_back, charged)

    def main(self) -> float:
        return float(self.base._total_flops)

    def spent(self) -> float:
        return self.main() + self.outside()

    def before_act(self) -> None:
        self._mark = self._state()

    def after_act(self) -> None:
        (f0, e0, g0), (f1, e1, g1) = self._mark, self._state()
        self.rolled_back += max(0.0, f0 - f1)
        self.act_trained += max(0.0, f1 - f0)
        self.events += max(0, e1 - e0)
        self.steps += max(0, g1 - g0)

    def window(self, info: dict[str, Any], steps: int) -> None:
        if steps > 0:  # a step() after a divergence at reset repeats the reset's info without training
            self.window_flops += float(info["flops"])
            self.events += int(info["instability_events"])
            self.steps += steps


def run_one(name: str, seed: int, args: argparse.Namespace, settings: dict[str, Any], out: Path,
            config: Any) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """One controller on one seed; returns ``(per-run record, curve, setup)``."""
    import gymnasium as gym

    import stso_env  # noqa: F401  (registers the envs)
    from agents.controllers import make_controller
    from stso_env.errors import ConfigError

    t0 = time.perf_counter()
    try:
        ctrl = make_controller(name, settings=settings, proxy_dir=args.proxy, policy_path=args.policy,
                               branch_dir=out / "branches")
    except ValueError as err:  # unknown or invalid settings
        raise ConfigError(str(err)) from err
    env = None
    try:
        share = float(ctrl.main_run_share)
        if not 0.0 < share <= 1.0:
            raise ConfigError(f"controller {name!r}: main_run_share={share} must be in (0, 1]")
        episode_steps = main_run_steps(args.steps, share, args.decision_interval)
        env = gym.make(ENV_ID, preset=args.preset, scenario=args.scenario, corpus=args.corpus,
                       tokenizer=args.tokenizer, decision_interval=args.decision_interval,
                       episode_steps=episode_steps, config=config)
        obs, info = env.reset(seed=seed)
        base = env.unwrapped
        tr = base.trainer
        budget = float(tr.flops_per_token * tr.seq_len * tr.cfg.data.batch_size * args.steps)
        ctrl.reset(env, seed=seed, run_name=f"{name}__seed{seed}")
        ledger = Ledger(env, ctrl)
        ledger.window(info, int(info["global_step"]))
        curve: dict[str, Any] = {"seed": seed, "global_step": [], "train_loss": [], "probe_loss": [],
                                 "uncertainty_index": [], "trigger": []}

        def log(info: dict[str, Any]) -> None:
            curve["global_step"].append(int(info["global_step"]))
            for key in ("train_loss", "probe_loss", "uncertainty_index"):
                curve[key].append(_finite(info[key]))
            curve["trigger"].append(bool(info["trigger"]))

        log(info)
        env_steps = 0
        stop = "diverged" if info.get("diverged") else None
        while stop is None:
            if ledger.spent() >= budget * (1 - BUDGET_RTOL):
                stop = "budget"
                break
            ledger.before_act()
            action = ctrl.act(obs, info)
            ledger.after_act()
            before = int(base.trainer.global_step)
            obs, _, terminated, truncated, info = env.step(action)
            env_steps += 1
            ledger.window(info, int(info["global_step"]) - before)
            log(info)
            if terminated:
                stop = "diverged"
            elif truncated:
                stop = "schedule_end"

        with base._own_rng():  # evaluation draws nothing, but keep the env's RNG streams its own anyway
            val = base.trainer.evaluate(max_windows=args.val_windows)
        events = base.monitor.events
        kept_steps = int(base.trainer.global_step)
        main, outside = ledger.main(), ledger.outside()
        charged = ledger.charged()
        recovery = charged.get("recovery", 0.0)
        total = main + outside
        wasted = recovery + outside
        record = {
            "seed": seed,
            # every event the main run went through, also in windows a rollback later undid
            "instability_events_per_100k_steps": ledger.events / ledger.steps * 1e5 if ledger.steps else None,
            "mean_time_to_recover_steps": float(np.mean(events.recovery_times)) if events.recovery_times else None,
            "wasted_flops_fraction": wasted / total if total > 0 else None,
            "total_flops": total,
            "final_val_ppl": _finite(val["val_ppl"]) if math.isfinite(val["val_loss"]) else None,
            "branch_invoke_rate": ctrl.branch_invocations / env_steps if env_steps else None,
            "proxy_latency_ms": float(np.mean(ctrl.proxy_ms)) if ctrl.proxy_ms else None,
            "checkpoint_io_seconds": float(ctrl.io_seconds),
            "diverged": stop == "diverged",
            "stop_reason": stop,
            "final_val_loss": _finite(val["val_loss"]),
            "accounting": {
                "budget_flops": budget, "main_flops": main, "outside_flops": outside,
                "extra_flops_reported": float(ctrl.extra_flops), "rolled_back_flops": ledger.rolled_back,
                "act_trained_flops": ledger.act_trained, "window_flops": ledger.window_flops,
                "recovery_wasted_flops": recovery, "wasted_flops": wasted, "tracker_wasted_by_reason": charged,
                "budget_used": total / budget, "instability_events": int(events.n_events),
                "instability_events_experienced": ledger.events, "main_steps": kept_steps,
                "main_steps_executed": ledger.steps, "episode_steps": episode_steps, "env_steps": env_steps,
                "branch_invocations": int(ctrl.branch_invocations), "proxy_calls": len(ctrl.proxy_ms),
                "decisions": len(ctrl.decisions), "wall_seconds": time.perf_counter() - t0,
            },
        }
        curve["decisions"] = [dict(d) for d in ctrl.decisions]
        setup = {"main_run_share": share, "episode_steps": episode_steps, "budget_flops": budget,
                 "tau": float(base.uncertainty_config.tau), "describe": ctrl.describe()}
        return record, curve, setup
    finally:
        try:
            ctrl.close()
        finally:
            if env is not None:
                env.close()


def build_results(settings: dict[str, Any], names: list[str], seeds_done: dict[str, list[dict[str, Any]]],
                  complete: bool) -> dict[str, Any]:
    """The ``results.json`` dict from the per-run records so far."""
    from stso_env.eval.stats import reference_tests, success_criteria, summarize_seeds

    controllers = {n: {"seeds": seeds_done[n], "summary": summarize_seeds(seeds_done[n])}
                   for n in names if seeds_done.get(n)}
    tests = reference_tests(controllers, REFERENCE)
    results: dict[str, Any] = {"complete": complete, "settings": settings, "controllers": controllers,
                               "tests": tests, "criteria": success_criteria(controllers, METHOD, REFERENCE),
                               "curves": "curves.json"}
    if REFERENCE not in controllers:
        results["tests_note"] = (f"no tests: the fixed schedule ({REFERENCE!r}) is not among the evaluated "
                                 "controllers; add it to --controllers")
    return results


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the evaluation; returns the ``results.json`` dict."""
    from stso_env.config import TrainConfig, apply_overrides
    from stso_env.errors import STSOError
    from stso_env.eval.figures import make_figures
    from stso_env.eval.report import write_json_atomic, write_report

    args, parser = parse_args(argv)
    names = check_args(args, parser)
    ctrl_settings = load_settings(args.settings, parser)
    scenario_tag = Path(args.scenario).stem
    eval_name = f"eval__{scenario_tag}__{int(time.time())}"
    out = Path(args.out) if args.out is not None else Path("runs") / eval_name
    out.mkdir(parents=True, exist_ok=True)

    overrides: dict[str, Any] = {}
    if args.builtin_chars is not None:
        overrides["data.builtin_chars"] = args.builtin_chars
    if args.device is not None:
        overrides["device"] = args.device
    try:
        config = apply_overrides(TrainConfig(), overrides)
    except STSOError as err:
        parser.error(str(err))

    seed_list = [args.seed_offset + i for i in range(args.seeds)]
    settings: dict[str, Any] = {
        "eval_name": eval_name, **{k: v for k, v in vars(args).items()}, "controllers": names,
        "seed_list": seed_list, "budget_flops": None, "out": str(out),
        "controller_settings": {n: ctrl_settings.get(n, {}) for n in names}, "controller_setup": {},
        "accounting": ("budget = nominal FLOPs of a full --steps run; total = main-run FLOPs on the kept "
                       "trajectory (reset window included) + FLOPs outside it (max of the controller's "
                       "extra_flops, rolled-back FLOPs, tracker charges other than recovery); wasted = "
                       "recovery waste of the kept trajectory + FLOPs outside it; see agents/evaluate.py"),
        "versions": versions(),
    }
    seeds_done: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    curves: dict[str, Any] = {"tau": None, "controllers": {n: [] for n in names}}
    bar = tqdm(total=len(names) * len(seed_list), desc="evaluate", unit="run", file=sys.stderr,
               disable=args.no_progress)
    try:
        for name in names:
            for seed in seed_list:
                bar.set_postfix_str(f"{name} seed {seed}")
                try:
                    record, curve, setup = run_one(name, seed, args, ctrl_settings.get(name), out, config)
                except STSOError as err:
                    raise SystemExit(f"error: controller {name!r}, seed {seed}: {err}") from err
                if settings["budget_flops"] is None:
                    settings["budget_flops"] = setup["budget_flops"]
                elif not math.isclose(settings["budget_flops"], setup["budget_flops"], rel_tol=1e-12):
                    raise RuntimeError(f"{name} seed {seed}: budget {setup['budget_flops']} differs from "
                                       f"{settings['budget_flops']} of the first run; the model config changed")
                curves["tau"] = setup["tau"]
                settings["controller_setup"][name] = {k: v for k, v in setup.items() if k != "budget_flops"}
                seeds_done[name].append(record)
                curves["controllers"][name].append(curve)
                write_json_atomic(out / "results.json", build_results(settings, names, seeds_done, complete=False))
                bar.update(1)
                bar.set_postfix_str(f"{name} seed {seed}: ppl {record['final_val_ppl'] or float('nan'):.3g}, "
                                    f"events/100k {record['instability_events_per_100k_steps'] or 0:.3g}, "
                                    f"{record['stop_reason']}")
    finally:
        bar.close()

    results = build_results(settings, names, seeds_done, complete=True)
    write_json_atomic(out / "curves.json", curves)
    figures = make_figures(results, curves, out / "figures")
    results["figures"] = {k: str(p.relative_to(out)) for k, p in figures.items()}
    write_json_atomic(out / "results.json", results)
    write_report(results, out / "report.md")
    if not args.no_progress:
        print(f"wrote {out / 'results.json'}, {out / 'report.md'} and {len(figures)} figures", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
