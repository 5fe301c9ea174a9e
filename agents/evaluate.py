"""Evaluate controllers of STSO-GPT2-v0 under one shared FLOPs budget, over several seeds.

One setting::

    python -m agents.evaluate --controllers fixed,zclip,skip_step,oracle --seeds 5 \\
        --scenario spiky --corpus builtin --steps 600 --decision-interval 10

A suite (``configs/suites/NAME.yaml``: scenarios x corpora x seeds x controllers), in parallel::

    python -m agents.evaluate --suite core --workers 2 [--resume]

For every (scenario, corpus) *cell*, controller and seed (the same seeds for every controller) one
main run is trained in a fresh env and steered by the controller until the episode ends (divergence
or the schedule's last step) or the budget is spent. Runs are independent jobs: ``--workers N`` runs
them in parallel (Ray when the ``distributed`` extra is installed, else local processes;
:mod:`stso_env.eval.engine`), each worker with ``--threads`` torch threads (default: cores //
workers), and the results equal a serial run with the same thread count. With ``--ray-address
HOST:PORT`` (a cluster started by ``ray start --head`` and joined by ``ray start --address`` on other
machines) the runs, the branch verification rollouts and the PBT population run on the cluster's
nodes, again with the results of a serial run. Each finished run is written to
``<out>/runs/<cell>/<controller>__seed<k>.json`` at once, so ``--resume`` continues a suite after a
crash without redoing finished runs (a run made under other settings is refused).

Outputs. One setting: ``--out`` (default ``runs/eval__<scenario>__<unix time>/``) gets
``results.json``, ``curves.json``, ``report.md`` and ``figures/``. A suite: ``--out`` (default
``runs/suites/<name>/``) gets the per-run files and one such folder per cell, and ``--results-dir``
(default ``assets/results/<name>/``, committed) gets the compact ``results.json`` (with the command,
commit, versions, thread count and machine), ``report.md`` and its figures.

Held-out data (GUIDE section 6): controllers, rewards and branch selection see only the *probe*
split (the env's probe batch); selection steps (``tuned_fixed``'s sweep, the oracle's choice) read
the *validation* split; the final score is the *test* split, read once after the run: at least
``--test-tokens`` tokens (65,536 or more; the whole split when smaller).

FLOPs accounting (training FLOPs only; the probe pass after each window and the final evaluations
are measurements, identical for every controller, and are not counted):

* Budget: every controller gets the FLOPs of a full ``--steps``-step run at the nominal cost,
  ``flops_per_token * seq_len * batch_size * steps``. The ``oracle`` is exempt and reported apart.
* Main run: ``env.unwrapped._total_flops``, the FLOPs of the windows on the main run's kept trajectory.
* Outside the main run: ``ctrl.extra_flops`` (forks, verification rollouts, population members and
  rolled-back main-run steps), at least what the harness saw the main run lose while the controller
  acted and what the controller charged to the run's tracker (``add_wasted``, every reason but
  ``"recovery"``): ``outside = max(extra_flops, rolled back, charged)``.
* ``total_flops = main + outside``; the run stops before a window once it reaches the budget.
* ``wasted = recovery + outside``: ``recovery`` is the FLOPs the final model's lineage spent inside
  model instability events; everything outside the main run is waste for the main run.
* ``tuning_flops``: FLOPs spent once per setting before any run (``tuned_fixed``'s LR sweep),
  reported beside the budget, not charged to it.
* Controllers with ``main_run_share < 1`` (population methods) get a main-run schedule of
  ``steps * main_run_share`` steps, rounded down to whole windows (at least two), and the same budget.

Per-run metrics (:data:`stso_env.eval.stats.METRICS`), all on the *lineage* of the final model (the
windows that produced the final weights, stitched across rollbacks, adopted forks and PBT exploits;
:func:`stso_env.monitor.events.lineage_metrics`) and normalised by its length:

* ``final_test_ppl``: perplexity on the test split (None after a divergence; ``diverged`` says so).
* ``model_events_per_100k_steps``: model instability events (the probe loss rising above its running
  best; :mod:`stso_env.monitor.events`) per 100k lineage steps; ``had_model_event`` per run.
* ``data_events_per_100k_steps``: batches whose own loss was far above the recent median, apart.
* ``mean_time_to_recover_steps``, ``recovery_flops_fraction``: over the recovered events.
* ``wasted_flops_fraction`` (``wasted / total_flops``), ``total_flops``, ``tuning_flops``.
* ``final_val_ppl``: on ``--val-windows`` windows of the validation split (for selection studies).
* ``branch_invoke_rate``, ``proxy_latency_ms``, ``checkpoint_io_seconds``: controller cost.

Statistics per cell (:func:`stso_env.eval.stats.compare_to_reference`): every controller against
``fixed`` on the same seeds, paired t and Wilcoxon signed-rank beside Welch, Holm-corrected across
the controllers compared, with effect sizes and 95 % intervals. The oracle's gain over ``fixed`` is
the cell's *headroom*; a cell without headroom cannot rank controllers and the report says so.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from tqdm import tqdm

ENV_ID = "STSO-GPT2-v0"
PROXY_CONTROLLERS = ("stso", "proxy_only", "single_trigger")
POLICY_CONTROLLERS = ("policy",)
REFERENCE = "fixed"
ORACLE = "oracle"
BUDGET_RTOL = 1e-9  # float sums of per-step FLOPs vs. the product formula
#: Headroom: the oracle must lower test perplexity by this share (significantly) or events by this share.
HEADROOM_PPL = 0.01
HEADROOM_EVENTS = 0.10
#: Jobs that cost most start first, so parallel workers finish together.
_COST_ORDER = ("oracle", "tuned_fixed", "pbt", "stso", "single_trigger", "proxy_only", "arc")


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, argparse.ArgumentParser]:
    from agents.controllers import CONTROLLERS
    from stso_env.eval.engine import ENGINES

    p = argparse.ArgumentParser(prog="python -m agents.evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", default=None,
                   help="run a suite: a name in configs/suites or a YAML path (the setting flags below are then "
                        "ignored; the suite holds them)")
    p.add_argument("--controllers", default="fixed,zclip",
                   help=f"comma-separated controller names (default %(default)s); allowed: {', '.join(CONTROLLERS)}")
    p.add_argument("--seeds", type=int, default=5, help="seeds per controller (default %(default)s)")
    p.add_argument("--seed-offset", type=int, default=100_000,
                   help="first seed; seeds are OFFSET .. OFFSET+SEEDS-1 (default %(default)s)")
    p.add_argument("--scenario", default="spiky",
                   help="instability scenario: a name in configs/scenarios or a YAML path (default %(default)s)")
    p.add_argument("--corpus", default="builtin",
                   help="corpus: 'builtin' or a text file/folder path (default %(default)s)")
    p.add_argument("--tokenizer", default="byte",
                   help="tokenizer: 'byte' or a GPT-2 tokenizer folder (default %(default)s)")
    p.add_argument("--preset", default="tiny", help="GPT-2 model size preset (default %(default)s)")
    p.add_argument("--steps", type=int, default=600,
                   help="optimizer steps of a full run; the shared budget is their nominal FLOPs (default %(default)s)")
    p.add_argument("--decision-interval", type=int, default=10,
                   help="optimizer steps per env step, a window (default %(default)s)")
    p.add_argument("--policy", default=None, help="policy.zip for the 'policy' controller (agents.train_controller)")
    p.add_argument("--proxy", default=None,
                   help="trained proxy folder for stso / proxy_only / single_trigger (agents.train_proxy)")
    p.add_argument("--settings", default=None,
                   help="controller name -> constructor settings: a YAML file, or inline YAML such as "
                        "'pbt: {population: 4}'")
    p.add_argument("--out", default=None,
                   help="output folder (default runs/eval__<scenario>__<unix time>, or runs/suites/<name>)")
    p.add_argument("--results-dir", default=None,
                   help="suite only: where the committed results go (default assets/results/<name>)")
    p.add_argument("--builtin-chars", type=int, default=None,
                   help="characters of the built-in corpus (smaller starts faster; default from TrainConfig)")
    p.add_argument("--device", default=None, choices=("auto", "cpu", "cuda"),
                   help="training device (default from TrainConfig: auto)")
    p.add_argument("--val-windows", type=int, default=64,
                   help="validation windows of final_val_ppl (default %(default)s)")
    p.add_argument("--test-tokens", type=int, default=131_072,
                   help="tokens of the final test perplexity, at least 65536; the whole test split when smaller "
                        "(default %(default)s)")
    p.add_argument("--workers", type=int, default=1, help="runs in parallel (default %(default)s)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per worker (default: cores // workers, at least 1)")
    p.add_argument("--engine", default="auto", choices=ENGINES,
                   help="parallel engine: auto (ray if installed, else local processes), ray, local, serial")
    p.add_argument("--ray-address", default=None,
                   help="a running Ray cluster (host:port of its head, from `ray start --head`): the runs of "
                        "--workers (engine ray), the branch verification of stso/single_trigger and the PBT "
                        "population run on it")
    p.add_argument("--resume", action="store_true",
                   help="keep the finished runs found in --out and run only the missing ones")
    p.add_argument("--update-readme", default=None, metavar="SUITE",
                   help="run nothing: rewrite assets/results/SUITE/report.md (and the suite's report copy) and, "
                        "for a suite with readme: true, README.md's result block, from "
                        "assets/results/SUITE/results.json")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv), p


def check_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Validate the flags shared by both modes (``parser.error`` exits with status 2)."""
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.val_windows < 1:
        parser.error(f"--val-windows must be >= 1, got {args.val_windows}")
    if args.test_tokens < 65_536:
        parser.error(f"--test-tokens must be >= 65536 (the final score needs a large test sample), got "
                     f"{args.test_tokens}")


def setting_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Any:
    """The one-cell suite a plain (non ``--suite``) invocation describes."""
    from agents.controllers import CONTROLLERS
    from stso_env.eval.suite import CellConfig, SuiteConfig

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
    return SuiteConfig(name=f"eval__{Path(args.scenario).stem}", preset=args.preset, steps=args.steps,
                       decision_interval=args.decision_interval, seeds=args.seeds, seed_offset=args.seed_offset,
                       controllers=names, builtin_chars=args.builtin_chars, test_tokens=args.test_tokens,
                       proxy=args.proxy, policy=args.policy, settings=load_settings(args.settings, parser),
                       cells=[CellConfig(scenario=args.scenario, corpus=args.corpus, tokenizer=args.tokenizer)])


def check_resources(suite: Any, parser: argparse.ArgumentParser) -> None:
    need_proxy = [n for n in suite.controllers if suite.controller_of(n) in PROXY_CONTROLLERS]
    if any(suite.proxy_of(n) is None for n in need_proxy):
        parser.error(f"--proxy DIR is required for {', '.join(need_proxy)}: train one with "
                     "`python -m agents.collect ...` then `python -m agents.train_proxy --log-db RUN/log_db.parquet "
                     "--out runs/proxy`, or use the proxy folder `python -m agents.train_controller` writes")
    for proxy in dict.fromkeys(suite.proxy_of(n) for n in need_proxy):
        if not Path(proxy).is_dir():
            parser.error(f"--proxy {proxy}: not a folder (expected proxy.json + proxy.safetensors from "
                         "agents.train_proxy or agents.train_controller)")
    need_policy = [n for n in suite.controllers if suite.controller_of(n) in POLICY_CONTROLLERS]
    if any(suite.policy_of(n) is None for n in need_policy):
        parser.error("--policy PATH is required for the 'policy' controller: train one with "
                     "`python -m agents.train_controller` (it writes policy.zip)")
    for policy in dict.fromkeys(suite.policy_of(n) for n in need_policy):
        if not Path(policy).is_file():
            parser.error(f"--policy {policy}: no such file")


def load_settings(path: str | None, parser: argparse.ArgumentParser) -> dict[str, dict[str, Any]]:
    """``--settings``: a YAML file, or inline YAML, mapping controller name -> constructor settings."""
    from agents.controllers import CONTROLLERS

    if path is None:
        return {}
    import yaml

    inline = not Path(path).is_file()
    if inline and ":" not in path:
        parser.error(f"--settings {path}: no such file; give a YAML file or an inline mapping such as "
                     "'pbt: {population: 4}'")
    try:
        data = yaml.safe_load(path if inline else Path(path).read_text()) or {}
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


def machine() -> dict[str, Any]:
    """What ran the suite: CPU model, cores, memory, OS (GPU when one was used)."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        mem = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": mem, "os": platform.platform(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def provenance(program: str, argv: Sequence[str] | None) -> dict[str, Any]:
    """What a committed result records about how it was made: the command line of ``program`` (a module
    name, with ``argv`` or the process's own arguments), the commit, versions and machine."""
    return {"command": f"python -m {program} " + " ".join(sys.argv[1:] if argv is None else list(argv)),
            **git_commit(), "versions": versions(), "machine": machine()}


def publish(program: str, argv: Sequence[str] | None, compute: Callable[[], tuple[dict[str, Any], dict[str, Any]]],
            out: Path, name: str, write_report: Callable[[Any, Path, Any], Path]) -> int:
    """The body of a report command's ``main``: ``compute()`` returns ``(meta, result)``; the result is saved
    as ``out/name`` with ``meta``, the run's seconds and its :func:`provenance`, the report written and printed.
    Returns the exit status: 0, or 2 with the error on stderr for a project error (bad input, missing data)."""
    from stso_env.errors import STSOError
    from stso_env.eval.report import save_result

    try:
        t0 = time.perf_counter()
        meta, result = compute()
        meta = {**meta, "seconds": time.perf_counter() - t0, **provenance(program, argv)}
        report = save_result(out, name, meta, result, write_report)
    except STSOError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report.read_text(encoding="utf-8"))
    return 0


def git_commit() -> dict[str, Any]:
    """The commit the code ran at and whether the tree had uncommitted changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                    capture_output=True, text=True, check=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}
    return {"commit": head, "dirty": dirty}


def _finite(x: Any) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


class Ledger:
    """The harness's own FLOPs accounting of one main run (see the module docstring); events come from the
    final model's lineage instead.

    ``outside()`` is the FLOPs spent off the kept trajectory: the controller's ``extra_flops``, at least
    what the harness saw rolled back while the controller acted and what the controller charged to the
    event tracker for reasons other than recovery.
    """

    def __init__(self, env: Any, ctrl: Any) -> None:
        self.base, self.ctrl = env.unwrapped, ctrl
        self.rolled_back = 0.0  # main-run FLOPs that left the kept trajectory during act() (restores)
        self.act_trained = 0.0  # main-run FLOPs added during act() (a controller stepping the main run itself)
        self.window_flops = 0.0  # FLOPs of the windows the harness ran (reset + env.step)
        self.steps = 0  # optimizer steps the main run ran, rolled-back ones included
        self._mark: tuple[float, int] | None = None

    def _state(self) -> tuple[float, int]:
        b = self.base
        return float(b._total_flops), int(b.trainer.global_step)

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
        (f0, g0), (f1, g1) = self._mark, self._state()
        self.rolled_back += max(0.0, f0 - f1)
        self.act_trained += max(0.0, f1 - f0)
        self.steps += max(0, g1 - g0)

    def window(self, info: dict[str, Any], steps: int) -> None:
        if steps > 0:  # a step() after a divergence at reset repeats the reset's info without training
            self.window_flops += float(info["flops"])
            self.steps += steps


# ---------------------------------------------------------------------- one run


def make_jobs(suite: Any, out: Path, *, val_windows: int = 64, device: str | None = None,
              ray_address: str | None = None) -> list[dict[str, Any]]:
    """Every (cell, controller, seed) of ``suite`` as a plain, picklable job dict, costly ones first.
    ``ray_address``: the Ray cluster the controllers that can (branch verification, PBT members) use."""
    from stso_env.files import content_digest

    # what the proxy and the policy *are*: a proxy retrained into the same folder must not pass as the old one
    digests = {"proxy_sha256": content_digest(suite.proxy), "policy_sha256": content_digest(suite.policy)}
    # a variant's own proxy or policy replaces the suite's in its jobs, path and digest
    own = {name: {**({"proxy": suite.proxy_of(name), "proxy_sha256": content_digest(suite.proxy_of(name))}
                     if suite.proxy_of(name) != suite.proxy else {}),
                  **({"policy": suite.policy_of(name), "policy_sha256": content_digest(suite.policy_of(name))}
                     if suite.policy_of(name) != suite.policy else {})}
           for name in suite.controllers}
    jobs = []
    for ci, cell in enumerate(suite.cells):
        res = cell.resolved()
        for name in suite.controllers:
            cls = suite.controller_of(name)
            # a variant's job names its controller (other jobs keep the keys their stored runs have)
            variant = {"variant_of": cls} if cls != name else {}
            # an outcome gate the settings name is an artefact like the policy: its content, not its path
            named = suite.settings_of(name) or {}
            gate_digest = {f"{k}_sha256": content_digest(named[k]) for k in ("gate", "early_gate") if named.get(k)}
            for si, seed in enumerate(suite.seed_list):
                jobs.append({
                    "cell": cell.name, "scenario": res.scenario, "corpus": res.corpus, "tokenizer": res.tokenizer,
                    "controller": name, "seed": seed, "preset": suite.preset, "steps": suite.steps,
                    "decision_interval": suite.decision_interval, "builtin_chars": suite.builtin_chars,
                    "test_tokens": suite.test_tokens, "val_windows": val_windows, "device": device,
                    "settings": suite.settings_of(name), **variant,
                    "proxy": suite.proxy, "policy": suite.policy, **digests, **own[name],
                    **gate_digest,
                    "branch_dir": str(out / cell.name / "branches"), "tuning_dir": str(out / "tuning"),
                    "ray_address": ray_address,
                    "_order": (_COST_ORDER.index(cls) if cls in _COST_ORDER else len(_COST_ORDER), si, ci),
                })
    jobs.sort(key=lambda j: j["_order"])
    for j in jobs:
        del j["_order"]
    return jobs


def job_controller(job: dict[str, Any]) -> Any:
    """The controller of ``job`` (a :func:`make_jobs` dict), built from its settings and resources."""
    from agents.controllers import make_controller
    from stso_env.errors import ConfigError

    try:
        return make_controller(job.get("variant_of", job["controller"]), settings=job["settings"],
                               proxy_dir=job["proxy"], policy_path=job["policy"],
                               branch_dir=Path(job["branch_dir"]), tuning_dir=Path(job["tuning_dir"]),
                               ray_address=job.get("ray_address"))
    except ValueError as err:  # unknown or invalid settings
        raise ConfigError(str(err)) from err


def job_env(job: dict[str, Any], ctrl: Any) -> Any:
    """The main run's env of ``job`` for ``ctrl`` (its episode shortened by the controller's main-run share)."""
    import gymnasium as gym

    import stso_env  # noqa: F401  (registers the envs)
    from stso_env.config import TrainConfig, apply_overrides
    from stso_env.errors import ConfigError

    overrides: dict[str, Any] = {}
    if job["builtin_chars"] is not None:
        overrides["data.builtin_chars"] = job["builtin_chars"]
    if job.get("device") is not None:
        overrides["device"] = job["device"]
    share = float(ctrl.main_run_share)
    if not 0.0 < share <= 1.0:
        raise ConfigError(f"controller {job['controller']!r}: main_run_share={share} must be in (0, 1]")
    return gym.make(ENV_ID, preset=job["preset"], scenario=job["scenario"], corpus=job["corpus"],
                    tokenizer=job["tokenizer"], decision_interval=job["decision_interval"],
                    episode_steps=main_run_steps(job["steps"], share, job["decision_interval"]),
                    config=apply_overrides(TrainConfig(), overrides))


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """One controller on one seed of one cell; returns ``{"record", "curve", "setup"}`` (plain data).

    Module-level and driven by its argument alone, so parallel workers run exactly what a serial
    run would."""
    from stso_env.monitor.events import lineage_metrics

    t0 = time.perf_counter()
    name, seed = job["controller"], int(job["seed"])
    ctrl = job_controller(job)
    env = None
    try:
        env = job_env(job, ctrl)
        obs, info = env.reset(seed=seed)
        base = env.unwrapped
        share, episode_steps = float(ctrl.main_run_share), int(base.episode_steps)  # as job_env set them
        tr = base.trainer
        budget = float(tr.step_flops * job["steps"])
        ctrl.reset(env, seed=seed, run_name=f"{name}__seed{seed}")
        exempt = bool(getattr(ctrl, "budget_exempt", False))
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
            if not exempt and ledger.spent() >= budget * (1 - BUDGET_RTOL):
                stop = "budget"
                break
            ledger.before_act()
            action = ctrl.act(obs, info)
            ledger.after_act()
            if base._done:  # the controller ran the main run to its end itself (an adopted fork)
                stop = "diverged" if base._last_info.get("diverged") else "schedule_end"
                break
            before = int(base.trainer.global_step)
            obs, _, terminated, truncated, info = env.step(action)
            env_steps += 1
            ledger.window(info, int(info["global_step"]) - before)
            log(info)
            if terminated:
                stop = "diverged"
            elif truncated:
                stop = "schedule_end"

        # The final score: the test split, read once, after the run (nothing during a run reads it).
        n_test = max(1, math.ceil(job["test_tokens"] / tr.seq_len))
        with base._own_rng():  # evaluation draws nothing, but keep the env's RNG streams its own anyway
            test = base.trainer.evaluate(max_windows=n_test, split="test")
            val = base.trainer.evaluate(max_windows=job["val_windows"], split="validation")
        lineage = lineage_metrics(base.lineage())
        main, outside = ledger.main(), ledger.outside()
        total = main + outside
        wasted = lineage["recovery_flops"] + outside
        diverged = stop == "diverged"
        record = {
            "seed": seed,
            "final_test_ppl": _finite(test["val_ppl"]) if math.isfinite(test["val_loss"]) and not diverged else None,
            "model_events_per_100k_steps": lineage["model_events_per_100k_steps"],
            "data_events_per_100k_steps": lineage["data_events_per_100k_steps"],
            "mean_time_to_recover_steps": lineage["mean_time_to_recover_steps"],
            "recovery_flops_fraction": lineage["recovery_flops_fraction"],
            "wasted_flops_fraction": wasted / total if total > 0 else None,
            "total_flops": total,
            "tuning_flops": float(getattr(ctrl, "tuning_flops", 0.0)),
            "final_val_ppl": _finite(val["val_ppl"]) if math.isfinite(val["val_loss"]) and not diverged else None,
            "branch_invoke_rate": ctrl.branch_invocations / env_steps if env_steps else None,
            "proxy_latency_ms": float(np.mean(ctrl.proxy_ms)) if ctrl.proxy_ms else None,
            "checkpoint_io_seconds": float(ctrl.io_seconds),
            "had_model_event": lineage["model_events"] > 0,
            "diverged": diverged,
            "stop_reason": stop,
            "final_test_loss": _finite(test["val_loss"]),
            "test_tokens": int(test["val_tokens"]),
            "final_val_loss": _finite(val["val_loss"]),
            "lineage": lineage,
            "split_tokens": base.trainer.splits.sizes(),
            "accounting": {
                "budget_flops": budget, "budget_exempt": exempt, "main_flops": main, "outside_flops": outside,
                "extra_flops_reported": float(ctrl.extra_flops), "rolled_back_flops": ledger.rolled_back,
                "act_trained_flops": ledger.act_trained, "window_flops": ledger.window_flops,
                "recovery_flops": lineage["recovery_flops"], "wasted_flops": wasted,
                "tracker_wasted_by_reason": ledger.charged(), "budget_used": total / budget,
                "main_steps": int(base.trainer.global_step), "main_steps_executed": ledger.steps,
                "episode_steps": episode_steps, "env_steps": env_steps,
                "branch_invocations": int(ctrl.branch_invocations), "proxy_calls": len(ctrl.proxy_ms),
                "decisions": len(ctrl.decisions), "wall_seconds": time.perf_counter() - t0,
            },
        }
        curve["decisions"] = [dict(d) for d in ctrl.decisions]
        setup = {"main_run_share": share, "episode_steps": episode_steps, "budget_flops": budget,
                 "tau": float(base.uncertainty_config.tau), "describe": ctrl.describe()}
        return {"record": record, "curve": curve, "setup": setup}
    finally:
        try:
            ctrl.close()
        finally:
            if env is not None:
                env.close()


# ---------------------------------------------------------------------- aggregation


def headroom(controllers: dict[str, Any]) -> dict[str, Any]:
    """The oracle's gain over ``fixed``: what any controller could win in this cell."""
    from stso_env.eval.stats import align_by_seed, metric_values, paired_test, relative_change

    if ORACLE not in controllers or REFERENCE not in controllers:
        return {"available": False, "note": f"needs both {ORACLE!r} and {REFERENCE!r}"}
    al = align_by_seed(controllers[ORACLE]["seeds"], controllers[REFERENCE]["seeds"])
    ppl = paired_test(metric_values(al["runs"], "final_test_ppl"), metric_values(al["ref_runs"], "final_test_ppl"))
    ev = paired_test(metric_values(al["runs"], "model_events_per_100k_steps"),
                     metric_values(al["ref_runs"], "model_events_per_100k_steps"))
    ev_o = controllers[ORACLE]["summary"]["model_events_per_100k_steps"]["mean"]
    ev_f = controllers[REFERENCE]["summary"]["model_events_per_100k_steps"]["mean"]
    ppl_gain = -ppl["rel_change"] if ppl["rel_change"] is not None else None
    ev_drop = -relative_change(ev_o, ev_f) if relative_change(ev_o, ev_f) is not None else None
    # Both gains must be significant (paired t over the shared seeds): one event in five runs is noise.
    ppl_ok = ppl_gain is not None and ppl_gain >= HEADROOM_PPL and ppl["p"] is not None and ppl["p"] < 0.05
    ev_ok = ev_drop is not None and ev_drop >= HEADROOM_EVENTS and ev["p"] is not None and ev["p"] < 0.05
    return {"available": True, "ppl_gain": ppl_gain, "ppl_gain_ci95": ppl["rel_change_ci95"], "ppl_p": ppl["p"],
            "events_drop": ev_drop, "events_p": ev["p"], "events_oracle": ev_o, "events_fixed": ev_f,
            "has_headroom": bool(ppl_ok or ev_ok),
            "rule": (f"headroom when the oracle lowers test perplexity by >= {HEADROOM_PPL:.0%} or model instability "
                     f"events by >= {HEADROOM_EVENTS:.0%}, each with a paired t-test p < 0.05 over the seeds")}


def criteria(compared: dict[str, Any], variants: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """The success criteria of each evaluated method of :data:`stso_env.eval.stats.METHODS` and of each
    suite variant (label -> controller) of one (of ``stso`` with a note when none was evaluated); a
    method's best baseline is never one of :data:`stso_env.eval.stats.OURS`, nor a variant of one of them."""
    from stso_env.eval.stats import METHODS, ours, success_criteria

    # a variant of a method is the method with other settings: it is held to the same criteria
    held = [*METHODS, *(label for label, ctrl in (variants or {}).items() if ctrl in METHODS)]
    methods = [m for m in held if m in compared] or [METHODS[0]]
    return [success_criteria(compared, m, REFERENCE, exclude=ours(variants)) for m in methods]


def build_results(settings: dict[str, Any], names: list[str], seeds_done: dict[str, list[dict[str, Any]]],
                  complete: bool) -> dict[str, Any]:
    """One cell's results dict from the per-run records so far."""
    from stso_env.eval.stats import compare_to_reference, reference_tests, summarize_seeds

    controllers = {n: {"seeds": sorted(seeds_done[n], key=lambda r: r["seed"]),
                       "summary": summarize_seeds(seeds_done[n])} for n in names if seeds_done.get(n)}
    # The oracle looks ahead and ignores the budget: it is reported apart, outside the Holm family.
    compared = {n: c for n, c in controllers.items() if n != ORACLE}
    results: dict[str, Any] = {"complete": complete, "settings": settings, "controllers": controllers,
                               "comparison": compare_to_reference(compared, REFERENCE),
                               "tests": reference_tests(compared, REFERENCE), "headroom": headroom(controllers),
                               "criteria": criteria(compared, settings.get("variants")), "curves": "curves.json"}
    if REFERENCE not in controllers:
        results["tests_note"] = (f"no tests: the fixed schedule ({REFERENCE!r}) is not among the evaluated "
                                 "controllers; add it to --controllers")
    return results


def _run_path(out: Path, job: dict[str, Any]) -> Path:
    return out / "runs" / job["cell"] / f"{job['controller']}__seed{job['seed']}.json"


def _job_key(job: dict[str, Any]) -> str:
    """What identifies a run's result: paths of outputs and the Ray cluster excluded (a run on Ray equals
    the in-process one), and the proxy and policy (path and content digest) only for the controllers that
    read them (a baseline's run does not change when the suite's proxy does). A stored job without the
    digests (written before runs recorded them) is matched on the paths alone."""
    keep = {k: v for k, v in job.items() if k not in ("branch_dir", "tuning_dir", "ray_address")}
    name = job.get("variant_of", job.get("controller"))
    if name not in PROXY_CONTROLLERS + POLICY_CONTROLLERS:
        keep.pop("proxy", None)
        keep.pop("proxy_sha256", None)
    if name not in POLICY_CONTROLLERS:
        keep.pop("policy", None)
        keep.pop("policy_sha256", None)
    return json.dumps(keep, sort_keys=True, default=str)


DIGEST_KEYS = ("proxy_sha256", "policy_sha256", "gate_sha256", "early_gate_sha256")


def _artefact(job: dict[str, Any], key: str) -> tuple[str, Any]:
    """The artefact a digest key names and its path in ``job`` (the gates' live in the settings)."""
    what = key.removesuffix("_sha256")
    return what, job[what] if what in job else job.get("settings", {}).get(what)


def _with_every_byte_digests(stored: dict[str, Any], job: dict[str, Any]) -> dict[str, Any]:
    """``job`` with each artefact digest that ``stored`` recorded under the every-byte rule taken over where
    the artefact still has it: runs recorded before ``content_digest`` left out reports and SB3's bookkeeping
    still match the artefact they were made with."""
    from stso_env.files import content_digest

    out = dict(job)
    for key in DIGEST_KEYS:
        if key in stored and key in job and stored[key] != job[key] \
                and stored[key] == content_digest(_artefact(job, key)[1], every_byte=True):
            out[key] = stored[key]
    return out


def execute(suite: Any, out: Path, args: argparse.Namespace) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Run (or, with ``--resume``, finish) every job; returns ``{(cell, controller): [run files]}``."""
    from stso_env.eval.engine import resolve_engine, run_jobs
    from stso_env.eval.report import write_json_atomic

    jobs = make_jobs(suite, out, val_windows=args.val_windows, device=args.device, ray_address=args.ray_address)
    done: dict[str, dict[str, Any]] = {}
    todo = []
    for job in jobs:
        path = _run_path(out, job)
        if path.is_file():
            if not args.resume:
                raise SystemExit(f"error: {out} already holds finished runs (e.g. {path.relative_to(out)}); pass "
                                 "--resume to keep them and run the rest, or choose another --out")
            data = json.loads(path.read_text())
            stored = data.get("job", {})
            # recomputed from the stored job, so runs kept under an older key rule still match
            current = job if "proxy_sha256" in stored else {k: v for k, v in job.items() if not k.endswith("_sha256")}
            if _job_key(stored) != _job_key(current):
                current = _with_every_byte_digests(stored, current)
            if _job_key(stored) != _job_key(current):
                changed = [k for k in DIGEST_KEYS if k in stored
                           and _job_key(stored) == _job_key(dict(current, **{k: stored[k]}))]
                if changed:
                    what, where = _artefact(job, changed[0])
                    raise SystemExit(f"error: {path} was made with another {what} than {where} holds now (its "
                                     "contents changed: retrained in place?); delete that controller's runs to "
                                     "rerun them with it, or choose another --out")
                raise SystemExit(f"error: {path} was made under other settings than this run's; --resume only "
                                 "continues the same suite (use another --out, or delete the folder)")
            done[str(path)] = data
        else:
            todo.append(job)
    engine = resolve_engine(args.engine, args.workers)
    bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc=f"{suite.name} [{engine} x{args.workers}]",
               unit="run", file=sys.stderr, disable=args.no_progress, dynamic_ncols=True)
    try:
        for job, result in run_jobs(run_job, todo, workers=args.workers, threads=args.threads, engine=engine,
                                    address=args.ray_address):
            data = {"job_key": _job_key(job), "job": job, **result}
            path = _run_path(out, job)
            write_json_atomic(path, data)
            done[str(path)] = data
            rec = result["record"]
            bar.update(1)
            bar.set_postfix_str(f"{job['cell']} {job['controller']} seed {job['seed']}: test ppl "
                                f"{rec['final_test_ppl'] or float('nan'):.3g}, model events/100k "
                                f"{rec['model_events_per_100k_steps'] or 0:.3g}, {rec['stop_reason']}")
    finally:
        bar.close()
    grouped: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for job in jobs:
        grouped.setdefault((job["cell"], job["controller"]), []).append(done[str(_run_path(out, job))])
    return grouped


def cell_outputs(suite: Any, cell: Any, grouped: dict[tuple[str, str], list[dict[str, Any]]], out: Path,
                 base_settings: dict[str, Any]) -> dict[str, Any]:
    """Aggregate one cell: results.json, curves.json, report.md and figures in ``out``; returns the results."""
    from stso_env.eval.figures import make_figures
    from stso_env.eval.report import write_json_atomic, write_report

    names = list(suite.controllers)
    runs = {n: grouped[(cell.name, n)] for n in names}
    first = runs[names[0]][0]
    settings = {**base_settings, "eval_name": f"{suite.name}: {cell.name}", "scenario": cell.scenario,
                "corpus": cell.corpus, "tokenizer": cell.tokenizer, "controllers": names,
                "seed_list": suite.seed_list, "budget_flops": first["setup"]["budget_flops"],
                "split_tokens": first["record"]["split_tokens"],
                "controller_setup": {n: {k: v for k, v in runs[n][0]["setup"].items() if k != "budget_flops"}
                                     for n in names}}
    budgets = {r["setup"]["budget_flops"] for n in names for r in runs[n]}
    if max(budgets) - min(budgets) > 1e-9 * max(budgets):
        raise RuntimeError(f"{cell.name}: runs have different budgets {sorted(budgets)}; the model config changed")
    results = build_results(settings, names, {n: [r["record"] for r in runs[n]] for n in names}, complete=True)
    curves = {"tau": first["setup"]["tau"], "controllers": {n: [r["curve"] for r in runs[n]] for n in names}}
    write_json_atomic(out / "curves.json", curves)
    figures = make_figures(results, curves, out / "figures")
    results["figures"] = {k: str(p.relative_to(out)) for k, p in figures.items()}
    write_json_atomic(out / "results.json", results)
    write_report(results, out / "report.md")
    results["_curves"] = curves
    return results


def prepare_artefacts(suite: Any, out: Path, progress: bool) -> None:
    """Train the proxy and policy a suite needs (``agents.train_controller`` with its defaults, whose
    collection and evaluation seeds never meet the suite's) unless the suite names them."""
    # a policy is trained only for a suite that runs one: a proxy-only suite that names its proxy needs nothing
    need_proxy = [n for n in suite.controllers if suite.controller_of(n) in PROXY_CONTROLLERS + POLICY_CONTROLLERS]
    need_policy = [n for n in suite.controllers if suite.controller_of(n) in POLICY_CONTROLLERS]
    if all(suite.proxy_of(n) is not None for n in need_proxy) and all(suite.policy_of(n) is not None
                                                                    for n in need_policy):
        return
    runs_dir = out / "prepare"
    run = runs_dir / "train-controller"
    if not (run / "policy.zip").is_file() or not (run / "proxy").is_dir():
        from agents.train_controller import main as train_main

        cfg = out / "prepare.yaml"
        cfg.parent.mkdir(parents=True, exist_ok=True)
        cfg.write_text(f"runs_dir: {json.dumps(str(runs_dir))}\nrun_name: train-controller\n")
        train_main(["--config", str(cfg), "--overwrite"] + ([] if progress else ["--no-progress"]))
    suite.proxy = suite.proxy or str(run / "proxy")
    suite.policy = suite.policy or str(run / "policy.zip")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the evaluation (one setting or a suite); returns the results dict (a cell's, or the suite's).

    ``--env STSO-RLHF-v0`` hands the arguments to :mod:`agents.rlhf_evaluate` (the RLHF controllers and M3)."""
    raw = list(sys.argv[1:] if argv is None else argv)
    if "STSO-RLHF-v0" in raw and ("--env" in raw or "--env=STSO-RLHF-v0" in raw):
        from agents import rlhf_evaluate

        code = rlhf_evaluate.main(raw)
        if code:
            raise SystemExit(code)
        out = Path(rlhf_evaluate.parse_args(raw).out) / "results.json"
        return json.loads(out.read_text(encoding="utf-8"))
    from agents.controllers import CONTROLLERS
    from stso_env.config import REPO_ROOT
    from stso_env.errors import STSOError
    from stso_env.eval.suite import load_suite

    args, parser = parse_args(argv)
    if args.update_readme is not None:
        from stso_env.eval.published import update_readme, write_reports

        results = REPO_ROOT / "assets" / "results" / args.update_readme / "results.json"
        if not results.is_file():
            parser.error(f"--update-readme {args.update_readme}: {results} does not exist; run the suite first")
        written = write_reports(results.parent, REPO_ROOT)
        changed = False
        if json.loads(results.read_text(encoding="utf-8"))["settings"].get("readme"):
            try:
                changed = update_readme(REPO_ROOT / "README.md", args.update_readme, results)
            except ValueError as err:
                parser.error(str(err))
            print(f"README.md {'updated' if changed else 'already up to date'} from {results}", file=sys.stderr)
        print("rewrote " + ", ".join(str(w) for w in written), file=sys.stderr)
        return {"readme_changed": changed, "reports": [str(w) for w in written]}
    check_args(args, parser)
    command = "python -m agents.evaluate " + " ".join(sys.argv[1:] if argv is None else list(argv))
    if args.suite is not None:
        try:
            suite = load_suite(args.suite, tuple(CONTROLLERS))
        except STSOError as err:
            parser.error(str(err))
        out = Path(args.out) if args.out is not None else Path("runs") / "suites" / suite.name
        results_dir = Path(args.results_dir) if args.results_dir else REPO_ROOT / "assets" / "results" / suite.name
    else:
        suite = setting_from_args(args, parser)
        out = Path(args.out) if args.out is not None else Path("runs") / f"{suite.name}__{int(time.time())}"
        results_dir = None
    if args.suite is not None:  # a suite trains the proxy/policy it lacks into its own folder
        out.mkdir(parents=True, exist_ok=True)
        prepare_artefacts(suite, out, not args.no_progress)
    check_resources(suite, parser)
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.time()
    try:
        grouped = execute(suite, out, args)
    except STSOError as err:
        raise SystemExit(f"error: {err}") from err
    from stso_env.eval.engine import default_threads, resolve_engine

    base_settings = {
        "preset": suite.preset, "steps": suite.steps, "decision_interval": suite.decision_interval,
        "seeds": suite.seeds, "controller_settings": {n: suite.settings_of(n) for n in suite.controllers},
        "test_tokens": suite.test_tokens, "val_windows": args.val_windows, "out": str(out),
        "accounting": ("budget = nominal FLOPs of a full --steps run; total = main-run FLOPs on the kept trajectory "
                       "+ FLOPs outside it; wasted = recovery FLOPs of the final model's lineage + FLOPs outside the "
                       "main run; events on that lineage; see agents/evaluate.py"),
        "versions": versions(),
    }
    if suite.variants:
        base_settings["variants"] = suite.variant_controllers
    if args.suite is None:
        cell = suite.cells[0]
        results = cell_outputs(suite, cell, grouped, out, base_settings)
        results.pop("_curves")
        if not args.no_progress:
            print(f"wrote {out / 'results.json'}, {out / 'report.md'} and {len(results['figures'])} figures",
                  file=sys.stderr)
        return results

    from stso_env.eval.published import publish_suite

    cells = {cell.name: cell_outputs(suite, cell, grouped, out / cell.name, base_settings) for cell in suite.cells}
    meta = {"command": command, **git_commit(), "versions": versions(), "machine": machine(),
            "workers": args.workers, "threads": args.threads or default_threads(args.workers),
            "engine": resolve_engine(args.engine, args.workers), "wall_seconds": time.time() - t0,
            # Summed over every run, also those a --resume kept from earlier invocations.
            "run_seconds": sum(r["record"]["accounting"]["wall_seconds"] for runs in grouped.values() for r in runs),
            "runs_folder": str(out)}
    summary = publish_suite(suite, cells, meta, results_dir)
    if not args.no_progress:
        print(f"wrote {results_dir / 'results.json'} and {results_dir / 'report.md'}", file=sys.stderr)
    return summary


if __name__ == "__main__":
    main()
