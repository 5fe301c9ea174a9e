"""STSO-RLHF-v0: steer a real GRPO fine-tune (TRL) of a GPT-2 policy against a learned reward model."""

from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from stso_env.config import ASSETS_DIR, apply_overrides, from_dict, instance_or_kwargs
from stso_env.envs.plumbing import checked_action, OwnRNG, TransitionLogs
from stso_env.errors import ConfigError
from stso_env.rlhf.monitor import OBS_LIMIT, OBSERVATION_NAMES, DivergenceRule, RLHFMonitor
from stso_env.rlhf.run import TINY_SETTINGS, GRPOSettings

LR_CHANGES = (0.5, 0.8, 1.0, 1.25)
KL_CHANGES = (0.5, 1.0, 2.0)
ENTROPY_COEFS = (0.0, 0.01, 0.05)
REF_ALPHAS = (0.0, 0.01, 0.1)
EPSILONS = (0.1, 0.2, 0.3)
ACTION_NVEC = (4, 3, 3, 3, 3, 2)
NEUTRAL_ACTION = (2, 1, 0, 0, 1, 0)
ACTION_FIELDS = ("lr_change", "kl_change", "entropy_bonus", "ref_follow", "clip_bound", "skip_step")
LR_SCALE_LIMITS = (1.0 / 64, 4.0)
BETA_LIMITS = (1e-4, 2.0)
HISTORY_KEYS = ("step", "proxy_reward", "gold_probe", "kl", "kl_max", "entropy", "index", "trigger", "lr_scale",
                "beta", "events", "diverged", "action")
RLHF_LOG_SCHEMA = ASSETS_DIR / "rlhf_log_schema.json"
SIZES = ("default", "tiny")


@dataclass
class RLHFRewardWeights:
    """Weights of the reward terms (see the env docstring)."""

    gold: float = 10.0  # per unit of probe gold gained over the window
    instability: float = 0.5  # per instability event that starts in the window
    divergence: float = 5.0  # once, on divergence


def decode_rlhf_action(action: Any) -> dict[str, Any]:
    """Validate a MultiDiscrete action and name its parts; a bad action is a clear error."""
    a = checked_action(action, ACTION_NVEC, ACTION_FIELDS)
    return {"lr_change": LR_CHANGES[a[0]], "kl_change": KL_CHANGES[a[1]], "entropy_coef": ENTROPY_COEFS[a[2]],
            "ref_alpha": REF_ALPHAS[a[3]], "epsilon": EPSILONS[a[4]], "skip": bool(a[5]), "raw": a.tolist()}


def rlhf_action_mask(lr_scale: float, beta: float, entropy_bonus: bool = True) -> np.ndarray:
    """Flat boolean mask (4+3+3+3+3+2 = 18 entries): LR and KL changes that would leave their limits are off,
    and so is a non-zero entropy bonus when the trainer has no entropy term (``entropy_bonus=False``: RLOO)."""
    mask = np.ones(sum(ACTION_NVEC), dtype=bool)
    if not entropy_bonus:
        mask[8:10] = False
    for i, f in enumerate(LR_CHANGES):
        mask[i] = f == 1.0 or LR_SCALE_LIMITS[0] <= lr_scale * f <= LR_SCALE_LIMITS[1]
    for i, f in enumerate(KL_CHANGES):
        mask[4 + i] = f == 1.0 or BETA_LIMITS[0] <= beta * f <= BETA_LIMITS[1]
    return mask


class RLHFEnv(OwnRNG, gym.Env):
    """
    ## Description

    Each episode is a real RLHF fine-tune: TRL's ``GRPOTrainer`` optimises a small GPT-2 policy
    (pre-trained by the project's trainer on the built-in corpus) against a reward model
    (``GPT2ForSequenceClassification`` trained with TRL's ``RewardTrainer`` on grammar preference
    pairs), with a reference model and a KL penalty ``beta > 0``. Both come from
    ``python -m agents.rlhf_prepare`` (built on first use if missing). The reward model is the
    *proxy*; a *gold* scorer, the grammar itself, measures what the policy really earns
    (:mod:`stso_env.rlhf.gold`). A scenario (``configs/rlhf_scenarios``) sets the starting LR,
    ``beta`` and temperature and may add reward noise. Every environment step the agent sets the
    knobs, the trainer runs ``decision_interval`` optimizer steps under them (TRL owns the loop;
    :class:`~stso_env.rlhf.bridge.SteppedGRPO` pauses it), and the agent observes the run.

    ## Action Space

    ``MultiDiscrete([4, 3, 3, 3, 3, 2])``:

    | index | name          | choices                                                            |
    |-------|---------------|--------------------------------------------------------------------|
    | 0     | lr_change     | 0: x0.5, 1: x0.8, 2: x1, 3: x1.25 (compounding LR scale)           |
    | 1     | kl_change     | 0: x0.5, 1: x1, 2: x2 of the KL coefficient beta (compounding)     |
    | 2     | entropy_bonus | 0: 0, 1: 0.01, 2: 0.05 (TRL's entropy_coef)                        |
    | 3     | ref_follow    | 0: frozen, 1: 0.01, 2: 0.1 (TRL's ref_model_mixup_alpha, each step)|
    | 4     | clip_bound    | 0: 0.1, 1: 0.2, 2: 0.3 (PPO clip epsilon)                          |
    | 5     | skip_step     | 0: no, 1: skip every optimizer step of the window                  |

    The LR scale stays within [1/64, 4] and beta within [1e-4, 2]; entropy bonus, reference
    following and clip bound hold until changed; skip acts on its window only (generation and
    scoring still run; weights and Adam's moments stay). ``action_masks()`` returns 18 booleans:
    an LR or KL change that would leave its limits is masked, and under RLOO (no entropy term) so
    is a non-zero entropy bonus. A masked choice sent anyway runs clamped (to the limit; the bonus
    to 0) and is reported in ``info["action_overridden"]``; an action outside the
    space raises ``ValueError``. The neutral action is ``[2, 1, 0, 0, 1, 0]``.

    ## Observation Space

    ``Box(-100, 100, (29,), float32)``; names in ``env.unwrapped.observation_names``, units in
    ``assets/rlhf_state_schema_v1.yaml``:

    | index | name                                   | unit                                    |
    |-------|----------------------------------------|-----------------------------------------|
    | 0-2   | proxy_reward, _std, _delta             | reward-model score (window mean)        |
    | 3-5   | gold_probe, _delta, gold_below_peak    | gold score in [0, 1] on probe prompts   |
    | 6-8   | kl, kl_max, kl_delta                   | nats per token to the reference model   |
    | 9-10  | entropy, entropy_ratio                 | nats per token; / first window's        |
    | 11-14 | clip_ratio, grad_norm, completion_length, zero_std_groups | share; log1p; / budget; share |
    | 15-20 | lr, beta, entropy_coef, ref_alpha, epsilon, skipped | log10(lr)+4; log10(beta)+2; raw |
    | 21-25 | u_reward_volatility, u_kl_growth, u_entropy_drop, u_grad_volatility, u_proxy_gold_gap | z |
    | 26-28 | uncertainty_index, trigger, progress   | sum of z; 0/1; steps / budget           |

    ## Rewards

    ``r = w_gold * (gold_after - gold_before) - w_instability * new_events
    - w_divergence * diverged`` with ``gold`` the gold score of greedy completions of the fixed
    *probe* prompts (never the test prompts of the final score), ``new_events`` 1 when the run
    enters the warning zone of :class:`~stso_env.rlhf.monitor.DivergenceRule` in the window, and
    ``diverged`` 1 on a KL blow-up, entropy collapse or gold collapse
    (:mod:`stso_env.rlhf.monitor`). Defaults ``w = (10, 0.5, 5)`` (:class:`RLHFRewardWeights`).

    ## Starting State

    ``reset(seed=s)`` builds a fresh GRPO run of the prepared policy (sampling seeded by ``s``),
    measures the probe gold of the untouched policy, then runs one window with the neutral action
    so the first observation describes real training.

    ## Episode End

    * Termination: divergence, with the divergence penalty.
    * Truncation: ``episode_steps`` optimizer steps are done.

    ## Arguments

    ``gym.make("STSO-RLHF-v0", scenario="overoptimize", size="default", prepared="runs/rlhf",
    decision_interval=8, episode_steps=None, settings=None, divergence=None, reward_weights=None,
    run_dir=None, snapshot_keep=8, test_prompts=200, render_mode=None)``. ``size`` picks the
    prepared models and the run's shape (``tiny``: seconds, for tests); ``settings`` and
    ``divergence`` are dicts of :class:`~stso_env.rlhf.run.GRPOSettings` and
    :class:`~stso_env.rlhf.monitor.DivergenceRule` fields; ``episode_steps`` defaults to
    ``settings.steps``; ``settings={"algorithm": "rloo"}`` runs TRL's ``RLOOTrainer`` (REINFORCE
    leave-one-out, KL in the reward) instead of GRPO under the same knobs. With ``run_dir`` every
    step is appended to ``run_dir/log_db.parquet`` (``assets/rlhf_log_schema.json``) and to
    TensorBoard (``run_dir/tb``).

    ``env.unwrapped.fork()`` returns an independent env in exactly this state (close it when
    done); ``snapshot()`` returns an id and ``restore(id)`` goes back to it, in memory. Restore
    plus the same actions gives identical observations and rewards, bit for bit on CPU,
    sampling included. ``what_if(actions)`` runs a few windows and comes back (the branch method's
    short real rollouts). ``test_gold()`` scores the current policy on the held-out *test* prompts
    (for evaluation harnesses; controllers must not read it).

    ## Version History

    * v0: initial version.
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 4}

    def __init__(self, scenario: str = "overoptimize", size: str = "default", prepared: str | None = "runs/rlhf",
                 decision_interval: int = 8, episode_steps: int | None = None,
                 settings: dict[str, Any] | None = None, divergence: dict[str, Any] | None = None,
                 reward_weights: dict[str, float] | RLHFRewardWeights | None = None, run_dir: str | None = None,
                 snapshot_keep: int = 8, test_prompts: int = 200, render_mode: str | None = None) -> None:
        super().__init__()
        from stso_env.rlhf.scenario import load_rlhf_scenario

        if size not in SIZES:
            raise ConfigError(f"size={size!r}: choose one of {', '.join(SIZES)}")
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ConfigError(f"render_mode={render_mode!r}: choose one of {self.metadata['render_modes']}")
        self._kwargs = dict(scenario=scenario, size=size, prepared=prepared, decision_interval=decision_interval,
                            episode_steps=episode_steps, settings=settings, divergence=divergence,
                            reward_weights=reward_weights, run_dir=run_dir, snapshot_keep=snapshot_keep,
                            test_prompts=test_prompts, render_mode=render_mode)
        base = GRPOSettings() if size == "default" else apply_overrides(GRPOSettings(), TINY_SETTINGS)
        self.settings = from_dict(GRPOSettings, {**asdict(base), **(settings or {})}, source="settings")
        if episode_steps is not None:
            self.settings = apply_overrides(self.settings, {"steps": episode_steps})
        if not 1 <= decision_interval <= self.settings.steps:
            raise ConfigError(f"decision_interval={decision_interval}, episode_steps={self.settings.steps}: need "
                              "1 <= decision_interval <= episode_steps")
        self.divergence = from_dict(DivergenceRule, divergence or {}, source="divergence")
        self.reward_weights = instance_or_kwargs(RLHFRewardWeights, reward_weights, "reward_weights")
        self.scenario = load_rlhf_scenario(scenario)
        self.size = size
        self.prepared = prepared
        self.decision_interval = decision_interval
        self.episode_steps = self.settings.steps
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.snapshot_keep = snapshot_keep
        self.n_test_prompts = test_prompts
        self.render_mode = render_mode
        self.observation_names = OBSERVATION_NAMES
        self.observation_space = spaces.Box(-OBS_LIMIT, OBS_LIMIT, (len(OBSERVATION_NAMES),), np.float32)
        self.action_space = spaces.MultiDiscrete(ACTION_NVEC)

        self.run = None
        self.monitor: RLHFMonitor | None = None
        self._assets: dict[str, Any] | None = None
        self._rng_state: dict[str, Any] | None = None
        self._episode = -1
        self._seed = 0
        self._done = False
        self._diverged_at_reset = False
        self._gold = math.nan
        self._obs = np.zeros(len(OBSERVATION_NAMES), dtype=np.float32)
        self._last_info: dict[str, Any] = {}
        self._history: dict[str, list] = {}
        self._snapshots: dict[int, dict[str, Any]] = {}
        self._logs = TransitionLogs(self.run_dir, OBSERVATION_NAMES, RLHF_LOG_SCHEMA) if self.run_dir else None

    # ------------------------------------------------------------------ building

    def _prepared(self) -> dict[str, Any]:
        """The policy and reward model folders and the prompt splits (built on first use)."""
        if self._assets is None:
            from stso_env.rlhf.config import load_prepare_config
            from stso_env.rlhf.prepare import prepared_models

            policy, reward, prefs = prepared_models(load_prepare_config(size=self.size), self.prepared)
            self._assets = {"policy": str(policy.path), "reward": str(reward.path),
                            "train": prefs.prompts("train"), "probe": prefs.prompts("probe"),
                            "test": prefs.prompts("test")}
        return self._assets

    def _build(self, seed: int) -> None:
        from stso_env.rlhf.run import RLHFRun

        a = self._prepared()
        if self.run is not None:
            self.run.close()
        self._rng_state = None
        with self._own_rng():
            self.run = RLHFRun(a["policy"], a["reward"], a["train"], a["probe"], self.settings, self.scenario,
                               seed, self.decision_interval)
        self.monitor = RLHFMonitor(budget_steps=self.episode_steps,
                                   max_completion_length=self.settings.max_completion_length, rule=self.divergence)

    # ------------------------------------------------------------------ gym API

    def action_masks(self) -> np.ndarray:
        """Flat boolean mask, one entry per choice of each action dimension (18 entries)."""
        if self.run is None:
            return rlhf_action_mask(1.0, self.scenario.beta, self._entropy_bonus)
        return rlhf_action_mask(self.run.knobs.lr_scale, self.run.knobs.beta, self._entropy_bonus)

    @property
    def _entropy_bonus(self) -> bool:
        return self.settings.algorithm == "grpo"

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        if seed is None:
            seed = int(self.np_random.integers(0, 2**31 - 1))
        self._seed = int(seed)
        self._episode += 1
        self._build(self._seed)
        if self._logs is not None:
            self._logs.flush()
        self._history = {k: [] for k in HISTORY_KEYS}
        self._snapshots = {}
        self._done = False
        with self._own_rng():
            self._gold = self.run.probe_gold()
        self.monitor.start(self._gold)
        obs, _, terminated, _, info = self._run_window(decode_rlhf_action(NEUTRAL_ACTION), log=False)
        self._diverged_at_reset = terminated  # such a run ends at the first step() call
        self._done = False
        self._obs, self._last_info = obs, info
        return obs.copy(), info

    def step(self, action: Any):
        if self.run is None:
            raise RuntimeError("call reset() before step()")
        if self._done:
            raise RuntimeError("the episode has ended (terminated or truncated); call reset()")
        act = decode_rlhf_action(action)
        prev_obs = self._obs
        if self._diverged_at_reset:
            self._done = True
            info = dict(self._last_info, diverged=True, action_overridden=False)
            return prev_obs.copy(), -float(self.reward_weights.divergence), True, False, info
        obs, reward, terminated, truncated, info = self._run_window(act, log=True, prev_obs=prev_obs)
        self._obs, self._last_info = obs, info
        return obs.copy(), reward, terminated, truncated, info

    def _apply(self, act: dict[str, Any]) -> bool:
        """Set the run's knobs from a decoded action; returns whether a limit clamped it."""
        k = self.run.knobs
        lr = k.lr_scale * act["lr_change"]
        beta = k.beta * act["kl_change"]
        k.lr_scale = min(max(lr, LR_SCALE_LIMITS[0]), LR_SCALE_LIMITS[1])
        k.beta = min(max(beta, BETA_LIMITS[0]), BETA_LIMITS[1])
        k.entropy_coef, k.ref_alpha, k.epsilon, k.skip = (act["entropy_coef"] if self._entropy_bonus else 0.0,
                                                          act["ref_alpha"], act["epsilon"], act["skip"])
        return ((k.lr_scale != lr and act["lr_change"] != 1.0) or (k.beta != beta and act["kl_change"] != 1.0)
                or k.entropy_coef != act["entropy_coef"])

    def _run_window(self, act: dict[str, Any], *, log: bool, prev_obs: np.ndarray | None = None):
        t0 = time.perf_counter()
        overridden = self._apply(act)
        if overridden:
            warnings.warn("STSO-RLHF-v0: a masked choice was clamped (an LR or KL change to its limit, an "
                          "entropy bonus under RLOO to 0) "
                          "(see info['action_overridden'])", stacklevel=3)
        gold_before = self._gold
        with self._own_rng():
            stats = self.run.advance()
            self._gold = self.run.probe_gold()
        k = self.run.knobs
        lr = self.scenario.lr * k.lr_scale
        reading = self.monitor.update(stats, self._gold, k, lr=lr, step=self.run.step)
        obs = self.monitor.observe()
        w = self.reward_weights
        diverged = reading["diverged"]
        events = int(reading["new_event"])
        reward = w.gold * (self._gold - gold_before) - w.instability * events - w.divergence * float(diverged)
        terminated = bool(diverged)
        truncated = bool(not terminated and self.run.step >= self.episode_steps)
        self._done = terminated or truncated
        info = {"step": self.run.step, "proxy_reward": stats.reward, "gold_probe": self._gold,
                "gold_probe_before": gold_before, "kl": stats.kl, "kl_max": stats.kl_max, "entropy": stats.entropy,
                "uncertainty_index": reading["index"], "trigger": reading["trigger"],
                "instability_events": events, "diverged": diverged, "divergence_reasons": list(reading["reasons"]),
                "gold_peak": reading["gold_peak"], "skipped_steps": stats.skipped, "noisy_steps": stats.noisy_steps,
                "lr": lr, "lr_scale": k.lr_scale, "beta": k.beta, "action_overridden": overridden,
                "action": {key: v for key, v in act.items() if key != "raw"}, "window": stats.as_dict()}
        h = self._history
        for key, val in (("step", self.run.step), ("proxy_reward", stats.reward), ("gold_probe", self._gold),
                         ("kl", stats.kl), ("kl_max", stats.kl_max), ("entropy", stats.entropy),
                         ("index", reading["index"]), ("trigger", bool(reading["trigger"])),
                         ("lr_scale", k.lr_scale), ("beta", k.beta), ("events", events), ("diverged", diverged),
                         ("action", list(act["raw"]))):
            h[key].append(val)
        if log:
            self._log(prev_obs, act, overridden, float(reward), obs, terminated, truncated, info, stats,
                      time.perf_counter() - t0)
        return obs, float(reward), terminated, truncated, info

    def test_gold(self, n: int | None = None) -> float:
        """Gold score of greedy completions of the first ``n`` *test* prompts (default ``test_prompts``)."""
        if self.run is None:
            raise RuntimeError("test_gold() needs a reset env")
        prompts = self._prepared()["test"][: n or self.n_test_prompts]
        with self._own_rng():
            return self.run.probe_gold(prompts)

    @property
    def episode_seed(self) -> int:
        """The seed of the current episode (``reset(seed=...)``, or the one drawn when none was given)."""
        return self._seed

    def what_if(self, actions: Any) -> list[tuple[np.ndarray, float, bool, bool, dict[str, Any]]]:
        """Run ``actions`` (one per window) from the current state without logging, then come back.

        Returns what ``step`` would have returned for each window, stopping early at the end of the
        episode; the env is afterwards exactly as before (a snapshot restored), so ``step`` with the
        same first action replays the first window bit for bit. This is the short real rollout of
        the branch method's verification.
        """
        if self.run is None:
            raise RuntimeError("what_if() needs a reset env")
        if self._done or self._diverged_at_reset:
            raise RuntimeError("what_if(): the episode has ended; call reset()")
        state = self._env_state()
        out = []
        try:
            for action in actions:
                obs, reward, terminated, truncated, info = self._run_window(decode_rlhf_action(action), log=False)
                out.append((obs.copy(), reward, terminated, truncated, info))
                if terminated or truncated:
                    break
        finally:
            self._load_env_state(state)
        return out

    def lineage(self) -> dict[str, list]:
        """The per-window record of the windows that produced the current policy (a restore rewinds it)."""
        return {k: list(v) for k, v in self._history.items()}

    # ------------------------------------------------------------------ logging

    def _log(self, prev_obs, act, overridden, reward, obs, terminated, truncated, info, stats, seconds) -> None:
        if self._logs is None:
            return
        step = info["step"]
        self._logs.append({
            "run_id": self.run_dir.name, "episode": self._episode, "env_step": len(self._history["action"]) - 2,
            "global_step": step, "seed": self._seed, "scenario": self.scenario.name, "state": prev_obs.tolist(),
            "action": list(act["raw"]), "action_overridden": overridden, "reward": reward,
            "next_state": obs.tolist(), "terminated": terminated, "truncated": truncated,
            "proxy_reward": stats.reward, "proxy_reward_std": stats.reward_std, "gold_probe": info["gold_probe"],
            "gold_probe_before": info["gold_probe_before"], "kl": stats.kl, "kl_max": stats.kl_max,
            "entropy": stats.entropy, "clip_ratio": stats.clip_ratio, "grad_norm": stats.grad_norm,
            "lr": info["lr"], "beta": info["beta"], "uncertainty_index": info["uncertainty_index"],
            "trigger": bool(info["trigger"]), "instability_events": info["instability_events"],
            "diverged": info["diverged"], "divergence_reasons": ",".join(info["divergence_reasons"]),
            "skipped_steps": stats.skipped, "noisy_steps": stats.noisy_steps, "wall_seconds": seconds,
        })
        self._logs.scalars(f"episode_{self._episode}", [
            ("env/reward", reward), ("rlhf/proxy_reward", stats.reward), ("rlhf/gold_probe", info["gold_probe"]),
            ("rlhf/kl", stats.kl), ("rlhf/entropy", stats.entropy), ("rlhf/beta", info["beta"]),
            ("train/lr", info["lr"]), ("train/grad_norm", stats.grad_norm),
            ("monitor/uncertainty_index", info["uncertainty_index"]),
            ("events/instability", info["instability_events"])], step)

    # ------------------------------------------------------------------ state, fork, snapshots

    def _env_state(self) -> dict[str, Any]:
        with self._own_rng():
            run_state = self.run.snapshot()
        return {"run": run_state, "monitor": copy.deepcopy(self.monitor.state_dict()), "rng": self._rng_state,
                "np_random": self.np_random.bit_generator.state, "obs": self._obs.copy(), "gold": self._gold,
                "episode": self._episode, "seed": self._seed, "done": self._done,
                "diverged_at_reset": self._diverged_at_reset, "last_info": copy.deepcopy(self._last_info),
                "history": {k: list(v) for k, v in self._history.items()}}

    def _load_env_state(self, state: dict[str, Any]) -> None:
        if self.run is None or self.run.seed != int(state["seed"]):
            self._build(int(state["seed"]))
        with self._own_rng():
            self.run.restore(state["run"])
        self._rng_state = state["rng"]  # the run restored the global RNGs inside _own_rng; keep the saved ones
        self.monitor.load_state_dict(copy.deepcopy(state["monitor"]))
        self.np_random.bit_generator.state = state["np_random"]
        self._obs = np.asarray(state["obs"], dtype=np.float32).copy()
        self._gold = float(state["gold"])
        self._episode, self._seed = int(state["episode"]), int(state["seed"])
        self._done, self._diverged_at_reset = bool(state["done"]), bool(state["diverged_at_reset"])
        self._last_info = copy.deepcopy(state["last_info"])
        self._history = {k: list(v) for k, v in state["history"].items()}

    def fork(self) -> RLHFEnv:
        """An independent env in exactly this state (no logging; close it when done)."""
        if self.run is None:
            raise RuntimeError("fork() needs a reset env")
        child = RLHFEnv(**dict(self._kwargs, run_dir=None))
        child._assets = self._assets
        _ = child.np_random  # materialise the generator so its state can be overwritten
        child._load_env_state(self._env_state())
        return child

    def snapshot(self) -> int:
        """Keep the whole env state in memory; returns its id (the optimizer step)."""
        if self.run is None:
            raise RuntimeError("snapshot() needs a reset env")
        sid = int(self.run.step)
        self._snapshots[sid] = self._env_state()
        for old in sorted(self._snapshots)[: max(0, len(self._snapshots) - max(1, self.snapshot_keep))]:
            del self._snapshots[old]
        return sid

    def restore(self, snapshot_id: int) -> np.ndarray:
        """Go back to a snapshot; returns the observation the env had then."""
        if snapshot_id not in self._snapshots:
            raise KeyError(f"snapshot {snapshot_id!r} is not kept (have {sorted(self._snapshots)}; the newest "
                           f"{self.snapshot_keep} are kept)")
        self._load_env_state(self._snapshots[snapshot_id])
        return self._obs.copy()

    # ------------------------------------------------------------------ render, close

    def render(self):
        if self.render_mode is None:
            gym.logger.warn("render() called without a render_mode; pass render_mode='ansi'")
            return None
        if self.run is None:
            raise RuntimeError("render() needs a reset env")
        h = self._history
        return (f"step {h['step'][-1]}/{self.episode_steps} | proxy {h['proxy_reward'][-1]:+.3f} | "
                f"gold {h['gold_probe'][-1]:.3f} | kl {h['kl'][-1]:.4f} | entropy {h['entropy'][-1]:.3f} | "
                f"index {h['index'][-1]:+.2f}{' TRIGGER' if h['trigger'][-1] else ''} | "
                f"lr x{h['lr_scale'][-1]:.3g} | beta {h['beta'][-1]:.3g} | action {h['action'][-1]}")

    def close(self) -> None:
        if self._logs is not None:
            self._logs.close()
        if self.run is not None:
            self.run.close()
            self.run = None
        super().close()
