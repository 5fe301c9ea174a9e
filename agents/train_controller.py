"""Learn a controller for a GPT-2 pre-training run, then test it on held-out real runs.

``python -m agents.train_controller`` (what ``make train`` runs) does, by default
(``--algo model_based``):

1. **collect** real STSO-GPT2-v0 episodes (tiny preset, built-in corpus, the
   ``spiky`` scenario) with exploratory policies into ``RUN/log_db.parquet``;
2. **fit the proxy** world model on them (ensemble of MLPs, early stopping,
   split by whole runs, MAPIE conformal calibration) into ``RUN/proxy/``;
3. **train MaskablePPO** (sb3-contrib) in STSO-Proxy-v0, the proxy as an env,
   with action masks, TensorBoard logs in ``RUN/tb/`` and a
   ``MaskableEvalCallback`` on a separate proxy env; with ``rl.iterations`` above 1
   (off by default; ``configs/controller/model_based_iterations.yaml``), MBPO's loop
   follows: collect ``collect.policy_episodes`` more real episodes with the policy's
   sampled actions (``agents.collect``'s ``learned`` policy), refit the proxy on the
   whole log with the first fit's test runs still held out, and learn on from the
   saved policy in the refitted proxy, once per further iteration;
4. **fit the outcome gate** (``agents.fit_gate``): on real runs of training seeds of
   the collected scenarios, the fixed schedule and the policy play from the same
   state after the gate's first window(s); a logistic regression from that state to
   "the policy ends the run with the lower probe loss" is ``RUN/gate.json``
   (:mod:`agents.controllers.outcome_gate`). The proxy's horizon favours the same
   LR cut everywhere; the gate lets the policy act only in runs that start like
   those where it won at the end;
5. **evaluate** the saved ``RUN/policy.zip`` (behind its gate, with the per-window
   shield off: the gate was fitted on the unshielded policy; with ``gate.enabled:
   false``, behind the conformal shield) on real episodes whose seeds were never
   collected, against the fixed schedule, with ``agents.evaluate`` (same FLOPs
   budget, paired tests, figures) into ``RUN/eval/``;
6. write ``RUN/report.md`` and ``RUN/config.yaml`` (the resolved settings).

``--algo ppo`` and ``--algo maskable_ppo`` are model-free: the policy learns
directly in ``--env`` (STSO-GPT2-v0 by default: real training runs, slow), or in
STSO-Proxy-v0, in which case steps 1-2 run first. ``model_based`` is
MaskablePPO in STSO-Proxy-v0.

Every setting lives in :class:`ControllerTrainConfig` (YAML through
``--config``, strict about unknown keys); the flags override it. Run folders are
named ``{env}__{algo}__{seed}__{time}`` unless ``--run-name`` is given.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import yaml

from stso_env.config import _f, describe, from_dict, load_yaml, to_dict
from stso_env.errors import ConfigError, DataError, STSOError
from stso_env.proxy.dataset import ACTION_ENCODINGS, DIVERGENCE_MODELS, LOSS_MODELS
from stso_env.train.corpus import check_spec

ALGOS = ("model_based", "maskable_ppo", "ppo")
ENVS = ("STSO-GPT2-v0", "STSO-Proxy-v0", "STSO-RLHF-v0")  # the last one: agents.rlhf_train_controller


# ---------------------------------------------------------------------- settings


@dataclass
class CollectSettings:
    """Real episodes logged for the proxy (step 1)."""

    episodes: int = _f(16, "real episodes to collect", range=(2, 100_000))
    episode_steps: int = _f(600, "optimizer steps per collected episode", range=(2, 10**9))
    scenarios: list[str] | None = _f(["spiky", "adam_v_lag"],
                                     "scenarios collected in turn (None: the run's scenario); the policy learns "
                                     "from all of them and is evaluated on the run's scenario")
    policy: str = _f("mixed", "exploration policy of agents.collect", choices=("random", "perturbed", "mixed"))
    policy_episodes: int = _f(8, "real episodes of each later model-based iteration (rl.iterations > 1), acting "
                                 "with the current policy (agents.collect --policy learned)", range=(1, 100_000))
    workers: int = _f(1, "episodes collected in parallel processes, one torch thread each by default (1: here, with "
                         "this process's threads; the rows depend on the thread count, so a change of it changes "
                         "the proxy and the policy)", range=(1, 256))


@dataclass
class ProxySettings:
    """The proxy world model (step 2)."""

    horizon: int = _f(5, "env steps ahead the proxy's loss/risk targets look", range=(1, 10_000))
    ensemble: int = _f(5, "ensemble members", range=(1, 64))
    hidden: int = _f(128, "hidden width", range=(4, 8192))
    epochs: int = _f(200, "maximum training epochs (early stopping ends sooner)", range=(1, 100_000))
    plans: bool = _f(True, "condition on plans (the first window's action, then the continuation of the horizon)")
    action_encoding: str = _f("one_hot", "how the proxy sees an action: one_hot (a column per choice) or ordered "
                              "(one number per ordered dimension, the log of its factor)", choices=ACTION_ENCODINGS)
    loss_model: str = _f("trees", "the loss@N head: trees on the state plus a linear plan term (trees) or the "
                         "MLP ensemble's (mlp); the other heads are the MLP's either way", choices=LOSS_MODELS)
    divergence_model: str = _f("mlp", "the divergence head: the MLP ensemble's logit (mlp) or trees on the state "
                               "and plan (trees)", choices=DIVERGENCE_MODELS)


@dataclass
class RLSettings:
    """The policy learner (step 3); PPO hyper-parameters are Stable-Baselines3's names."""

    algo: str = _f("model_based", "model_based (MaskablePPO in STSO-Proxy-v0), maskable_ppo or ppo",
                   choices=ALGOS)
    env: str = _f("STSO-Proxy-v0", "training env for maskable_ppo/ppo (model_based always uses the proxy)",
                  choices=ENVS)
    total_timesteps: int = _f(30_000, "env steps of policy learning", range=(1, 10**10))
    n_envs: int = _f(4, "parallel copies of the proxy env (the real env always uses 1)", range=(1, 256))
    n_steps: int = _f(256, "rollout length per env between updates", range=(2, 10**7))
    batch_size: int = _f(256, "minibatch size", range=(2, 10**7))
    n_epochs: int = _f(10, "optimisation epochs per update", range=(1, 1000))
    learning_rate: float = _f(3e-4, "Adam learning rate of the policy", range=(1e-8, 1.0))
    gamma: float = _f(0.95, "discount factor", range=(0.0, 1.0))
    ent_coef: float = _f(0.01, "entropy bonus", range=(0.0, 10.0))
    proxy_episode_steps: int = _f(30, "env steps per STSO-Proxy-v0 episode", range=(1, 10**7))
    uncertainty_penalty: float = _f(1.0, "MOPO-style penalty on the proxy ensemble's disagreement (STSO-Proxy-v0)",
                                    range=(0.0, 1e6))
    eval_freq: int = _f(2_000, "env steps between MaskableEvalCallback evaluations", range=(1, 10**10))
    iterations: int = _f(1, "model-based iterations, as in MBPO: after learning, collect collect.policy_episodes "
                            "real episodes with the policy, refit the proxy on the whole log (the same test runs) "
                            "and learn on for rl.total_timesteps more; 1: learn once", range=(1, 100))


@dataclass
class GateSettings:
    """The outcome gate (step 4, agents.fit_gate): where the policy may act, learned from real run ends."""

    enabled: bool = _f(True, "fit the gate and evaluate the policy behind it (false: behind the conformal shield)")
    seeds: int = _f(3, "real runs per collected scenario", range=(1, 1000))
    seed_offset: int = _f(200_000, "first seed of the gate's runs (apart from collection and evaluation)",
                          range=(0, 2**31 - 1))
    window: int = _f(1, "neutral windows before the gate reads the state", range=(1, 10**6))
    loss_levels: bool = _f(True, "the gate reads the loss levels too (false: only features that do not differ "
                                 "between corpora by level, agents.controllers.outcome_gate.LOSS_LEVELS)")
    corpora: list[str] = _f([], "corpora of the gate's runs, each with every scenario and seed (empty: the run's "
                                "corpus); a gate fitted on one corpus can misfire on another")


@dataclass
class EvalSettings:
    """The held-out real evaluation (step 4, through agents.evaluate)."""

    seeds: int = _f(5, "held-out real episodes per controller", range=(1, 1000))
    seed_offset: int = _f(100_000, "first evaluation seed (collection uses seed .. seed + episodes)",
                          range=(0, 2**31 - 1))
    steps: int = _f(600, "optimizer steps per evaluation episode", range=(1, 10**9))
    controllers: list[str] = _f(["fixed", "policy"], "controllers compared ('policy' is the learned one)")


@dataclass
class ControllerTrainConfig:
    """Everything ``agents.train_controller`` does; ``configs/controller/*.yaml`` hold presets."""

    run_name: str | None = _f(None, "run folder name under runs/; None: {env}__{algo}__{seed}__{time}")
    runs_dir: str = _f("runs", "parent folder of run folders")
    seed: int = _f(0, "seed of collection, proxy, policy and the held-out evaluation", range=(0, 2**31 - 1))
    preset: str = _f("tiny", "GPT-2 preset of the real runs", choices=("tiny", "bench10m", "small", "medium",
                                                                      "large"))
    scenario: str = _f("spiky", "scenario of the real runs (name or YAML path)")
    corpus: str = _f("builtin", "corpus of the real runs (builtin, a text file/folder, hf:...)")
    decision_interval: int = _f(10, "optimizer steps per env step", range=(1, 10**6))
    builtin_chars: int | None = _f(None, "characters of the built-in corpus (None: the TrainConfig default)",
                                   range=(10_000, 10**9))
    collect: CollectSettings = field(default_factory=CollectSettings)
    proxy: ProxySettings = field(default_factory=ProxySettings)
    rl: RLSettings = field(default_factory=RLSettings)
    gate: GateSettings = field(default_factory=GateSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)

    def validate(self, source: str = "<config>") -> None:
        if self.rl.iterations > 1 and not self.uses_proxy:
            raise ConfigError(f"{source}: rl.iterations: {self.rl.iterations} iterations refit a proxy; they need "
                              "rl.env STSO-Proxy-v0 (model_based), or set rl.iterations: 1")
        if self.rl.algo == "model_based" and self.rl.env != "STSO-Proxy-v0":
            raise ConfigError(f"{source}: rl.env: model_based learns in STSO-Proxy-v0, got {self.rl.env}; "
                              "use --algo maskable_ppo or ppo to learn in the real env")
        if self.collect.episode_steps < 2 * self.decision_interval:
            raise ConfigError(f"{source}: collect.episode_steps: {self.collect.episode_steps} must be at least "
                              f"2 x decision_interval = {2 * self.decision_interval}")
        if self.eval.steps % self.decision_interval:
            raise ConfigError(f"{source}: eval.steps: {self.eval.steps} must be a multiple of decision_interval "
                              f"{self.decision_interval}")
        if self.rl.batch_size > self.rl.n_steps * self.rl.n_envs:
            raise ConfigError(f"{source}: rl.batch_size: {self.rl.batch_size} is more than one rollout "
                              f"(n_steps x n_envs = {self.rl.n_steps * self.rl.n_envs}); lower it")
        if self.gate.enabled and self.gate.window * self.decision_interval >= self.eval.steps:
            raise ConfigError(f"{source}: gate.window: {self.gate.window} windows of {self.decision_interval} steps "
                              f"leave nothing of a {self.eval.steps}-step run for the policy; lower it")
        for corpus in self.gate.corpora:
            # checked here, not when step 4 starts after the collection and the policy's training
            try:
                check_spec(corpus)
            except DataError as err:
                raise ConfigError(f"{source}: gate.corpora: {err} (relative paths start at the working folder)") \
                    from None
        if "policy" not in self.eval.controllers or "fixed" not in self.eval.controllers:
            raise ConfigError(f"{source}: eval.controllers: {self.eval.controllers} must include 'policy' and "
                              "'fixed' (the learned policy is judged against the fixed schedule)")

    @property
    def uses_proxy(self) -> bool:
        return self.rl.env == "STSO-Proxy-v0"


def build_config(args: argparse.Namespace) -> ControllerTrainConfig:
    """Defaults <- ``--config`` YAML <- flags, validated strictly."""
    data: dict[str, Any] = load_yaml(args.config) if args.config else {}
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{args.config}: top level must be a mapping")
    source = str(args.config or "<defaults>")
    flags = {"seed": args.seed, "run_name": args.run_name, "scenario": args.scenario, "corpus": args.corpus,
             "rl.algo": args.algo, "rl.env": args.env, "rl.total_timesteps": args.total_timesteps,
             "collect.episodes": args.episodes, "eval.seeds": args.eval_seeds, "eval.steps": args.eval_steps}
    if args.algo in ("maskable_ppo", "ppo") and args.env is None and "env" not in data.get("rl", {}):
        flags["rl.env"] = "STSO-GPT2-v0"  # model-free means the real env unless told otherwise
    for dotted, value in flags.items():
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
        source = f"{source} + flags"
    return from_dict(ControllerTrainConfig, data, source=source)


# ---------------------------------------------------------------------- steps


def collect_episodes(cfg: ControllerTrainConfig, run: Path, progress: bool,
                     policy_path: Path | None = None) -> dict[str, Any]:
    """Step 1: ``collect.episodes`` exploratory episodes into the run's log; with ``policy_path`` (a
    model-based iteration) ``collect.policy_episodes`` more, each action sampled from that policy
    (``agents.collect``'s ``learned`` policy)."""
    from agents.collect import collect

    scenarios = list(cfg.collect.scenarios) if cfg.collect.scenarios else [cfg.scenario]
    episodes, policy = ((cfg.collect.episodes, cfg.collect.policy) if policy_path is None
                        else (cfg.collect.policy_episodes, "learned"))
    return collect(episodes=episodes, run_dir=run, scenarios=scenarios, corpus=cfg.corpus,
                   seed=cfg.seed, episode_steps=cfg.collect.episode_steps, decision_interval=cfg.decision_interval,
                   policy=policy, policy_path=policy_path, preset=cfg.preset, builtin_chars=cfg.builtin_chars,
                   progress=progress, workers=cfg.collect.workers)


def fit_world_model(cfg: ControllerTrainConfig, run: Path, progress: bool,
                    test_seeds: Sequence[int] | None = None) -> dict[str, Any]:
    """Step 2: the proxy on the run's log; ``test_seeds`` keeps a refit's held-out runs those of the first fit."""
    from agents.train_proxy import fit_proxy
    from stso_env.proxy.model import ProxyConfig

    pcfg = ProxyConfig(horizon=cfg.proxy.horizon, ensemble=cfg.proxy.ensemble, hidden=cfg.proxy.hidden,
                       epochs=cfg.proxy.epochs, seed=cfg.seed, action_encoding=cfg.proxy.action_encoding,
                       loss_model=cfg.proxy.loss_model, divergence_model=cfg.proxy.divergence_model)
    return fit_proxy(run / "log_db.parquet", run / "proxy", pcfg, test_seeds=test_seeds, progress=progress,
                     plans=cfg.proxy.plans)


def make_training_env(cfg: ControllerTrainConfig, run: Path, *, for_eval: bool = False):
    """The vectorised env the policy learns in (a Monitor wrapper records episode returns for TensorBoard)."""
    import gymnasium as gym
    from stable_baselines3.common.env_util import make_vec_env

    import stso_env  # noqa: F401  (registers the envs)

    if cfg.uses_proxy:
        kwargs = {"proxy_dir": str(run / "proxy"), "log_db": str(run / "log_db.parquet"),
                  "episode_steps": cfg.rl.proxy_episode_steps, "sample_member": True,
                  "uncertainty_penalty": cfg.rl.uncertainty_penalty}
        n_envs = 1 if for_eval else cfg.rl.n_envs
    else:
        kwargs = {"preset": cfg.preset, "scenario": cfg.scenario, "corpus": cfg.corpus,
                  "decision_interval": cfg.decision_interval, "episode_steps": cfg.collect.episode_steps}
        if cfg.builtin_chars is not None:
            from stso_env.config import TrainConfig, apply_overrides

            kwargs["config"] = apply_overrides(TrainConfig(), {"data.builtin_chars": cfg.builtin_chars})
        n_envs = 1
    seed = cfg.seed + (10_000 if for_eval else 0)
    return make_vec_env(lambda: gym.make(cfg.rl.env, **kwargs), n_envs=n_envs, seed=seed)


def learn_policy(cfg: ControllerTrainConfig, run: Path, progress: bool, *, resume: bool = False) -> dict[str, Any]:
    """Step 3: PPO or MaskablePPO; saves ``run/policy.zip`` and returns the learning curve. ``resume``: go on
    from the saved ``policy.zip`` (weights, optimizer state and step count) in envs built anew, e.g. on a
    refitted proxy (a model-based iteration)."""
    from sb3_contrib import MaskablePPO
    from sb3_contrib.common.maskable.callbacks import MaskableEvalCallback
    from stable_baselines3 import PPO
    from stable_baselines3.common.callbacks import EvalCallback

    masked = cfg.rl.algo in ("model_based", "maskable_ppo")
    env = make_training_env(cfg, run)
    eval_env = make_training_env(cfg, run, for_eval=True)
    algo_cls = MaskablePPO if masked else PPO
    n_steps = cfg.rl.n_steps
    if resume:
        model = algo_cls.load(str(run / "policy.zip"), env=env, device="cpu", tensorboard_log=str(run / "tb"))
        model.set_random_seed(cfg.seed + model.num_timesteps)  # loading restores no RNG state: seed it anew
    else:
        model = algo_cls("MlpPolicy", env, n_steps=n_steps, batch_size=cfg.rl.batch_size,
                         n_epochs=cfg.rl.n_epochs, learning_rate=cfg.rl.learning_rate, gamma=cfg.rl.gamma,
                         ent_coef=cfg.rl.ent_coef, seed=cfg.seed, device="cpu", tensorboard_log=str(run / "tb"),
                         verbose=0)
    # Plain EvalCallback ignores action masks; MaskableEvalCallback passes them.
    cb_cls = MaskableEvalCallback if masked else EvalCallback
    eval_every = max(1, cfg.rl.eval_freq // env.num_envs)
    callback = cb_cls(eval_env, n_eval_episodes=5 if cfg.uses_proxy else 1, eval_freq=eval_every,
                      log_path=str(run / "rl_eval"), best_model_save_path=None, deterministic=True, verbose=0)
    t0 = time.perf_counter()
    # resumed: the step count and the TensorBoard run go on where they stopped
    model.learn(total_timesteps=cfg.rl.total_timesteps, callback=callback, progress_bar=progress,
                tb_log_name=f"{cfg.rl.algo}", reset_num_timesteps=not resume)
    seconds = time.perf_counter() - t0
    model.save(str(run / "policy.zip"))
    env.close()
    eval_env.close()
    curve = {"timesteps": [int(t) for t in getattr(callback, "evaluations_timesteps", [])],
             "mean_reward": [float(np.mean(r)) for r in getattr(callback, "evaluations_results", [])]}
    return {"algo": cfg.rl.algo, "env": cfg.rl.env, "timesteps": int(model.num_timesteps), "seconds": seconds,
            "curve": curve, "policy": str(run / "policy.zip")}


def model_based_iterations(cfg: ControllerTrainConfig, run: Path, parts: dict[str, Any],
                           progress: bool) -> list[dict[str, Any]]:
    """Iterations 2..``rl.iterations`` (MBPO's loop): collect with the current policy, refit the proxy on the
    whole log with the first fit's test runs held out, learn on in the refitted proxy. Updates ``parts``'
    ``collect``, ``proxy`` and ``rl`` in place (the learning curve runs on across iterations) and returns
    one row per iteration, the first included."""
    def row(i: int, proxy: dict[str, Any], rl: dict[str, Any], collected: dict[str, Any],
            seconds: float | None) -> dict[str, Any]:
        curve = rl["curve"]["mean_reward"]
        first = i == 1  # the first collection is exploratory: no episode of the policy
        return {"iteration": i, "episodes": None if first else collected["episodes"],
                "lr_changes_bounded": None if first else collected["lr_changes_bounded"],
                "rows": collected["rows"],
                "loss_r2": proxy.get("loss_r2"), "loss_r2_late": proxy.get("loss_r2_late"),
                "loss_change_r2": proxy.get("loss_change_r2"), "coverage": proxy.get("coverage"),
                "timesteps": rl["timesteps"], "last_eval_return": curve[-1] if curve else None,
                "seconds": seconds}

    test_seeds = parts["proxy"]["test_seeds"]
    rows = [row(1, parts["proxy"], parts["rl"], parts["collect"], None)]
    for i in range(2, cfg.rl.iterations + 1):
        t0 = time.perf_counter()
        collected = collect_episodes(cfg, run, progress, policy_path=run / "policy.zip")
        proxy = fit_world_model(cfg, run, progress, test_seeds=test_seeds)
        rl = learn_policy(cfg, run, progress, resume=True)
        rows.append(row(i, proxy, rl, collected, time.perf_counter() - t0))
        parts["collect"] = {**collected, "episodes": parts["collect"]["episodes"] + collected["episodes"],
                            "env_steps": parts["collect"]["env_steps"] + collected["env_steps"],
                            "divergences": parts["collect"]["divergences"] + collected["divergences"]}
        parts["proxy"] = proxy
        parts["rl"] = {**rl, "seconds": parts["rl"]["seconds"] + rl["seconds"],
                       "curve": {k: parts["rl"]["curve"][k] + rl["curve"][k] for k in rl["curve"]}}
    return rows


def fit_outcome_gate(cfg: ControllerTrainConfig, run: Path, progress: bool) -> dict[str, Any]:
    """Step 4: real runs of the fixed schedule and the policy from the same early state, on training seeds of
    the collected scenarios; the gate learned from their ends is ``run/gate.json`` (report: ``run/gate.md``)."""
    from agents.fit_gate import fit_and_write, runs_table

    scenarios = list(cfg.collect.scenarios) if cfg.collect.scenarios else [cfg.scenario]
    seeds = [cfg.gate.seed_offset + cfg.seed + i for i in range(cfg.gate.seeds)]
    gate, states, _ = fit_and_write(run / "policy.zip", scenarios, seeds, run / "gate.json", window=cfg.gate.window,
                                    loss_levels=cfg.gate.loss_levels,
                                    command="python -m agents.train_controller (step 4)", preset=cfg.preset,
                                    corpus=list(cfg.gate.corpora) or cfg.corpus, episode_steps=cfg.eval.steps,
                                    decision_interval=cfg.decision_interval, builtin_chars=cfg.builtin_chars,
                                    progress=progress)
    return {"path": str(run / "gate.json"), "scenarios": scenarios, "seeds": seeds, "window": cfg.gate.window,
            "runs": gate.runs, "table": runs_table(gate, states)}


def evaluate_policy_real(cfg: ControllerTrainConfig, run: Path, progress: bool,
                         ray_address: str | None = None) -> dict[str, Any]:
    """Step 4: the learned policy and the baselines on held-out real episodes (``agents.evaluate``);
    ``ray_address``: a Ray cluster for the controllers that use one (branch verification, PBT)."""
    from agents.evaluate import main as evaluate_main

    argv = ["--controllers", ",".join(cfg.eval.controllers), "--seeds", str(cfg.eval.seeds),
            "--seed-offset", str(cfg.eval.seed_offset + cfg.seed), "--scenario", cfg.scenario,
            "--corpus", cfg.corpus, "--preset", cfg.preset, "--steps", str(cfg.eval.steps),
            "--decision-interval", str(cfg.decision_interval), "--policy", str(run / "policy.zip"),
            "--out", str(run / "eval")]
    if cfg.uses_proxy:
        argv += ["--proxy", str(run / "proxy")]
    if cfg.gate.enabled:
        # the gate was fitted on the unshielded policy: it replaces the per-window shield
        argv += ["--settings", json.dumps({"policy": {"shield": False, "gate": str(run / "gate.json")}})]
    if cfg.builtin_chars is not None:
        argv += ["--builtin-chars", str(cfg.builtin_chars)]
    if ray_address is not None:
        argv += ["--ray-address", ray_address]
    if not progress:
        argv.append("--no-progress")
    try:
        return evaluate_main(argv)
    except SystemExit as exc:  # the harness reports bad input by exiting with its message
        raise STSOError(f"evaluation failed: {exc}") from None


# ---------------------------------------------------------------------- report


def learning_curve_figure(curve: dict[str, list], path: Path, iterations: Sequence[dict[str, Any]] = ()) -> Path | None:
    """The evaluation return against env steps; with model-based ``iterations`` (their rows), one segment per
    iteration, since each is scored in its own refitted proxy."""
    if not curve["timesteps"]:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps, returns = np.asarray(curve["timesteps"]), np.asarray(curve["mean_reward"])
    ends = [r["timesteps"] for r in iterations] or [int(steps.max())]
    start = 0
    for i, end in enumerate(ends, 1):
        k = (steps > start) & (steps <= end)
        ax.plot(steps[k], returns[k], marker="o", label=f"iteration {i}" if len(ends) > 1 else None)
        if i < len(ends):
            ax.axvline(end, color="0.6", lw=0.8, ls="--")
        start = end
    if len(ends) > 1:
        ax.legend(fontsize=8)
    ax.set_xlabel("env steps")
    ax.set_ylabel("mean episode return (eval env)")
    ax.set_title("policy learning curve" + (" (each iteration in its own proxy)" if len(ends) > 1 else ""))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def levers(cfg: ControllerTrainConfig) -> list[tuple[str, bool, str]]:
    """The levers of a better-than-nothing policy, which of them this configuration uses, and how."""
    proxy = cfg.uses_proxy
    scen = cfg.collect.scenarios or [cfg.scenario]
    return [
        ("proxy-env reward on the probe loss, the quantity the real env rewards", proxy,
         "progress = decrease of the probe_loss feature (STSO-Proxy-v0 docstring)"),
        ("plans: the proxy conditions on the first window's action and the continuation", proxy and cfg.proxy.plans,
         f"horizon {cfg.proxy.horizon} env steps"),
        ("MOPO-style penalty on the ensemble's disagreement", proxy and cfg.rl.uncertainty_penalty > 0,
         f"lambda {cfg.rl.uncertainty_penalty}"),
        ("outcome gate: real runs on training seeds decide in which runs the policy acts (agents.fit_gate)",
         cfg.gate.enabled, f"{cfg.gate.seeds} seeds per collected scenario on "
                           f"{', '.join(cfg.gate.corpora) or cfg.corpus}, decides after {cfg.gate.window} "
                           "window(s); the per-window shield is off behind it"),
        ("conformal shield: the neutral action unless the policy's choice is better beyond both conformal "
         "intervals", proxy and not cfg.gate.enabled,
         "LearnedPolicy with the run's proxy and calibration.json, level 0.9, dominance rule"),
        ("collection over several scenarios", len(scen) > 1, ", ".join(scen)),
        ("more and longer collected episodes", proxy, f"{cfg.collect.episodes} x {cfg.collect.episode_steps} steps"),
        ("model-based iterations (collect with the policy, refit, retrain)", proxy and cfg.rl.iterations > 1,
         f"{cfg.rl.iterations} iterations, {cfg.collect.policy_episodes} episodes with the policy in each after "
         "the first" if cfg.rl.iterations > 1 else "rl.iterations 1"),
        ("fine-tuning in the real env with vector envs", False, "not implemented yet"),
        ("a bounded LR drift", True, "LearnedPolicy keeps the LR scale within 0.5-2.0 of the schedule"),
    ]


def shield_counts(eval_dir: Path) -> dict[str, Any] | None:
    """How many of the policy's proposed changes its shield let run, over the evaluation's runs."""
    proposed = shielded = 0
    rule = level = None
    for path in sorted(eval_dir.glob("runs/*/policy__seed*.json")):
        d = json.loads(path.read_text(encoding="utf-8"))["setup"]["describe"]
        if not d.get("shield"):
            return None
        proposed += int(d["proposed_changes"])
        shielded += int(d["shielded_changes"])
        rule, level = d.get("shield_rule"), d.get("shield_level")
    if rule is None:
        return None
    return {"rule": rule, "level": level, "proposed": proposed, "ran": proposed - shielded}



def gate_counts(eval_dir: Path) -> dict[str, Any] | None:
    """In how many of the policy's evaluation runs its outcome gate opened."""
    opened = total = 0
    for path in sorted(eval_dir.glob("runs/*/policy__seed*.json")):
        d = json.loads(path.read_text(encoding="utf-8"))["setup"]["describe"]
        if d.get("gate") is None:
            return None
        total += 1
        opened += int(bool(d.get("gate_open")))
    return {"opened": opened, "runs": total} if total else None


def _skill_lines(p: dict[str, Any]) -> list[str]:
    """The proxy report's per-run R² spread and the persistence yardstick, as bullet lines (none when absent)."""
    lines = []
    if p.get("loss_r2_heldout") is not None:
        runs = p.get("loss_r2_by_run", {})
        lines.append(f"- loss@N R² over all {p['heldout_runs']} held-out runs (calibration and test; none trained on): "
                     f"{_fmt(p['loss_r2_heldout'])}; each run alone: " + ", ".join(
                         f"seed {k} {_fmt(v)}" for k, v in runs.items()))
    if p.get("loss_r2_late") is not None:
        from agents.train_proxy import LATE_PROGRESS

        lines.append(f"- loss@N R² on the test rows from {LATE_PROGRESS:.0%} of each run on, where a controller acts: "
                     f"{_fmt(p['loss_r2_late'])} (persistence {_fmt(p.get('persistence_r2_late'))})")
    if p.get("persistence_r2") is not None:
        lines.append(f"- the forecast \"the probe loss stays where it is\" on the test runs: R² "
                     f"{_fmt(p['persistence_r2'])}, MAE {_fmt(p['persistence_mae'], 4)}: the yardstick the proxy "
                     "has to beat")
    return lines


def write_report(cfg: ControllerTrainConfig, run: Path, parts: dict[str, Any]) -> Path:
    """``run/report.md``: what ran, the proxy's accuracy, the learning curve and the held-out comparison."""
    lines = [f"# Controller training: `{run.name}`", "",
             f"Algorithm **{cfg.rl.algo}** in **{cfg.rl.env}**; real runs: preset `{cfg.preset}`, scenario "
             f"`{cfg.scenario}`, corpus `{cfg.corpus}`, seed {cfg.seed}. Settings: `config.yaml`.", ""]
    times = parts["seconds"]
    lines += ["## Time", "", "| step | seconds |", "| --- | --- |"]
    lines += [f"| {k} | {v:.1f} |" for k, v in times.items()] + [""]
    if "collect" in parts:
        c = parts["collect"]
        lines += ["## 1. Collection", "",
                  f"{c['episodes']} real episodes, {c['env_steps']} env steps, {c['divergences']} divergences, "
                  f"into `log_db.parquet` ({c['rows']} rows).", ""]
    if "proxy" in parts:
        p = parts["proxy"]
        cov = ", ".join(f"{k}: {_fmt(v)} (single split {_fmt(p['coverage_single_split'][k])})"
                        for k, v in p["coverage"].items())
        lines += ["## 2. Proxy world model", "",
                  f"Horizon {p['horizon']} env steps; {p['n_train']} training rows ({p['n_train_runs']} runs), "
                  f"{p['n_calib_runs']} calibration runs, {p['n_test_runs']} test runs (seeds never trained on).",
                  "", f"- loss@N: R² {_fmt(p['loss_r2'])}, MAE {_fmt(p['loss_mae'], 4)}; R² of the change of the "
                      f"probe loss over the horizon {_fmt(p.get('loss_change_r2'))} (the part an intervention "
                      "can move; the level's R² is small where the held-out runs' loss is flat)",
                  *_skill_lines(p),
                  f"- divergence: AUROC {_fmt(p['divergence_auroc'])}, Brier {_fmt(p['divergence_brier'], 4)}",
                  f"- conformal coverage, nominal -> empirical (mean over run-level re-partitions of the "
                  f"held-out runs): {cov}", "",
                  "Full report: `proxy/proxy_report.json`.", ""]
        fx = p.get("action_effects")
        if fx:
            lines += [f"Ranking across {fx['n_states']} held-out states (`stso_env.proxy.effects`): the best single "
                      f"change is `{fx['modal_best']}` in {fx['modal_best_share']:.0%} of them, "
                      f"{fx['distinct_best']} distinct best choice(s). At 100 % the proxy ranks interventions the "
                      "same in every state, and a policy learned in it cannot condition its choice on the state.",
                      "", "| change | predicted effect on loss@N vs neutral | sd across states | share predicted "
                      "to help |", "| --- | --- | --- | --- |"]
            lines += [f"| `{k}` | {v['mean']:+.4f} | {v['sd']:.4f} | {v['share_helps']:.0%} |"
                      for k, v in fx["per_action"].items()]
            lines += [""]
    rl = parts["rl"]
    gate_part = parts.get("gate")
    lines += ["## Levers", "", "What this run used to make the policy better than doing nothing:", ""]
    lines += [f"- {name}: **{'on' if on else 'off'}**{': ' + note if note else ''}" for name, on, note in levers(cfg)]
    lines += [""]
    lines += ["## 3. Policy learning", "",
              f"{rl['timesteps']} env steps in {rl['seconds']:.1f} s; policy saved to `policy.zip`; TensorBoard "
              "logs in `tb/` (`tensorboard --logdir " + str(run / "tb") + "`).", ""]
    if rl["curve"]["timesteps"]:
        across = " (over all iterations, each scored in its own proxy: see the table below)" \
            if parts.get("iterations") else ""
        lines += [f"Evaluation return{across}: first {rl['curve']['mean_reward'][0]:.3f}, last "
                  f"{rl['curve']['mean_reward'][-1]:.3f}, best {max(rl['curve']['mean_reward']):.3f}.", "",
                  "![learning curve](figures/learning_curve.png)", ""]
    its = parts.get("iterations")
    if its:
        lines += ["Model-based iterations (`rl.iterations`): after the first, each collected "
                  f"{cfg.collect.policy_episodes} real episodes with the policy's sampled actions, refitted the proxy "
                  "on the whole log (the same test runs held out) and learned on in it. The evaluation returns are "
                  "each iteration's own proxy env, so they compare the policy's progress within an iteration, not "
                  "across.", "",
                  "| iteration | episodes with the policy | log rows | proxy loss@N R² | R² from 20 % of each run | "
                  "R² of the change | policy env steps | last evaluation return | seconds |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {r['iteration']} | {_fmt(r['episodes']) if r['episodes'] is not None else '- (collection 1)'} "
                  f"| {r['rows']} | {_fmt(r['loss_r2'])} | "
                  f"{_fmt(r['loss_r2_late'])} | {_fmt(r['loss_change_r2'])} | {r['timesteps']} | "
                  f"{_fmt(r['last_eval_return'])} | {_fmt(r['seconds'], 1) if r['seconds'] is not None else '-'} |"
                  for r in its]
        lines += [""]
    if gate_part:
        lines += ["## 4. Outcome gate", "",
                  f"Real runs on seeds {gate_part['seeds'][0]}-{gate_part['seeds'][-1]} of "
                  f"{', '.join(gate_part['scenarios'])} ({cfg.eval.steps} steps; the fixed schedule and the policy "
                  f"from the same state after {gate_part['window']} window(s)); the gate is `gate.json`, its report "
                  "`gate.md`.", "", *gate_part["table"], ""]
    ev = parts["eval"]
    lines += [f"## {5 if gate_part else 4}. Held-out real episodes", "",
              f"{cfg.eval.seeds} seeds from {cfg.eval.seed_offset + cfg.seed} (never collected), {cfg.eval.steps} "
              "optimizer steps each, the same FLOPs budget for every controller. Full report: `eval/report.md`.",
              "", "| controller | final test ppl | model events / 100k steps | wasted FLOPs | total FLOPs |",
              "| --- | --- | --- | --- | --- |"]
    for name, block in ev["controllers"].items():
        s = block["summary"]

        def m(key: str, digits: int = 3, s: dict[str, Any] = s) -> str:
            v = s.get(key, {})
            return f"{_fmt(v.get('mean'), digits)}" if isinstance(v, dict) else "n/a"
        lines.append(f"| {name} | {m('final_test_ppl')} | {m('model_events_per_100k_steps', 1)} | "
                     f"{m('wasted_flops_fraction', 4)} | {m('total_flops', 0)} |")
    lines.append("")
    cmp = ev.get("comparison", {}).get("metrics", {}).get("final_test_ppl", {}).get("policy")
    if cmp:
        paired = cmp["paired"]
        verdict = cmp["verdict"]
        lines += [f"Learned policy vs fixed schedule, final test perplexity (paired by seed): "
                  f"{_fmt(paired.get('mean_a'))} vs {_fmt(paired.get('mean_b'))} "
                  f"(paired t p = {_fmt(paired.get('p'))}, "
                  f"Holm-adjusted {_fmt(cmp.get('p_holm_paired_t'))}). "
                  + {"better": "The policy is significantly better.",
                     "worse": "The policy is significantly **worse** than the fixed schedule."}.get(
                      verdict, "The policy is **not** significantly better than the fixed schedule on these seeds."),
                  ""]
    gated = gate_counts(run / "eval")
    if gated is not None:
        lines += [f"Outcome gate: open in {gated['opened']} of {gated['runs']} of the policy's runs (the policy "
                  "acted after the gate's window); closed in the others, which ran the fixed schedule.", ""]
    shield = shield_counts(run / "eval")
    if shield is not None:
        lines += [f"Shield (rule `{shield['rule']}`, level {shield['level']}): {shield['ran']} of "
                  f"{shield['proposed']} changes the policy proposed ran; the others ran as the neutral action.", ""]
    lines += ["Loss curves per controller, and the uncertainty index with every decision on one timeline "
              "(from the evaluation):", "", "![loss curves](eval/figures/loss_curves.png)", "",
              "![index and decisions](eval/figures/uncertainty_timeline.png)", ""]
    path = run / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


# ---------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    settings = "\n".join(f"  {k} = {d}: {h}" for k, d, h in describe(ControllerTrainConfig))
    p = argparse.ArgumentParser(
        prog="python -m agents.train_controller", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Settings (YAML keys for --config; flags override them):\n" + settings)
    p.add_argument("--algo", choices=ALGOS, default=None,
                   help="model_based (default): collect real episodes, fit the proxy, MaskablePPO in "
                        "STSO-Proxy-v0; maskable_ppo / ppo: model-free in --env")
    p.add_argument("--env", choices=ENVS, default=None,
                   help="env the policy learns in (default: STSO-Proxy-v0 for model_based, STSO-GPT2-v0 for the "
                        "model-free algorithms)")
    p.add_argument("--total-timesteps", type=int, default=None,
                   help="env steps of policy learning (rl.total_timesteps)")
    p.add_argument("--config", default=None, help="YAML file of ControllerTrainConfig settings")
    p.add_argument("--seed", type=int, default=None, help="seed of everything (held-out eval seeds are offset)")
    p.add_argument("--run-name", default=None,
                   help="run folder name under runs/ (default {env}__{algo}__{seed}__{time})")
    p.add_argument("--scenario", default=None, help="scenario of the real runs (default spiky)")
    p.add_argument("--corpus", default=None, help="corpus of the real runs (default builtin)")
    p.add_argument("--episodes", type=int, default=None, help="real episodes to collect (collect.episodes)")
    p.add_argument("--eval-seeds", type=int, default=None, help="held-out real episodes per controller")
    p.add_argument("--eval-steps", type=int, default=None, help="optimizer steps per evaluation episode")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing run folder (its previous contents are deleted first)")
    p.add_argument("--ray-address", default=None,
                   help="a running Ray cluster (host:port of its head) for the held-out evaluation's branch "
                        "verification and PBT population (agents.evaluate --ray-address)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def run_folder(runs_dir: str | Path, name: str, overwrite: bool) -> Path:
    """``runs_dir/name``, created empty; an existing non-empty one is an error unless ``overwrite``."""
    if any(s in name for s in ("/", "\\")) or name in (".", ".."):
        raise ConfigError(f"--run-name {name!r}: must be a plain folder name")
    run = Path(runs_dir) / name
    if run.exists() and any(run.iterdir()) and not overwrite:
        raise ConfigError(f"run folder {run} exists and is not empty; choose another --run-name or pass "
                          "--overwrite")
    if run.exists() and overwrite:
        # outputs of the previous run must not mix with this one's (a stale report would look current)
        shutil.rmtree(run)
    run.mkdir(parents=True, exist_ok=True)
    return run


def main(argv: Sequence[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    if "STSO-RLHF-v0" in raw and ("--env" in raw or "--env=STSO-RLHF-v0" in raw):
        from agents.rlhf_train_controller import main as rlhf_main  # Phase 2: a program of its own

        return rlhf_main(raw)
    args = parse_args(argv)
    progress = not args.no_progress
    try:
        cfg = build_config(args)
        name = cfg.run_name or f"{cfg.rl.env}__{cfg.rl.algo}__{cfg.seed}__{int(time.time())}"
        run = run_folder(cfg.runs_dir, name, args.overwrite)
        (run / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
        print(f"run folder: {run}", file=sys.stderr)
        parts: dict[str, Any] = {"seconds": {}}
        t_all = time.perf_counter()
        if cfg.uses_proxy:
            t0 = time.perf_counter()
            parts["collect"] = collect_episodes(cfg, run, progress)
            parts["seconds"]["collect"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            parts["proxy"] = fit_world_model(cfg, run, progress)
            parts["seconds"]["proxy"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        parts["rl"] = learn_policy(cfg, run, progress)
        parts["seconds"]["policy"] = time.perf_counter() - t0
        if cfg.rl.iterations > 1:
            t0 = time.perf_counter()
            parts["iterations"] = model_based_iterations(cfg, run, parts, progress)
            parts["seconds"]["iterations"] = time.perf_counter() - t0
        learning_curve_figure(parts["rl"]["curve"], run / "figures" / "learning_curve.png",
                              parts.get("iterations", ()))
        if cfg.gate.enabled:
            t0 = time.perf_counter()
            parts["gate"] = fit_outcome_gate(cfg, run, progress)
            parts["seconds"]["gate"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        parts["eval"] = evaluate_policy_real(cfg, run, progress, args.ray_address)
        parts["seconds"]["evaluation"] = time.perf_counter() - t0
        parts["seconds"]["total"] = time.perf_counter() - t_all
        report = write_report(cfg, run, parts)
        (run / "summary.json").write_text(json.dumps(
            {k: v for k, v in parts.items() if k != "eval"}, indent=1, default=str), encoding="utf-8")
    except STSOError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"done in {parts['seconds']['total']:.0f}s: {run / 'policy.zip'}, {report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
