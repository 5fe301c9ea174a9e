"""STSO-GPT2-v0: steer a real GPT-2 pre-training run."""

from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from stso_env.config import TrainConfig, apply_overrides, instance_or_kwargs, load_config
from stso_env.envs.plumbing import checked_action, OwnRNG, TransitionLogs
from stso_env.errors import ConfigError
from stso_env.monitor.monitor import OBS_LIMIT, OBSERVATION_NAMES, Monitor
from stso_env.monitor.uncertainty import load_uncertainty_config

LR_CHANGES = (0.8, 0.9, 1.0, 1.1)
WD_SCALES = (0.5, 1.0, 2.0)
CLIP_POLICIES = ("off", "zclip", "arc", "spam")
ACTION_NVEC = (4, 3, 4, 2, 2, 2)
NEUTRAL_ACTION = (2, 1, 0, 0, 0, 0)
ACTION_FIELDS = ("lr_change", "weight_decay", "clip_policy", "momentum_reset", "data_reorder", "skip_batch")
LR_SCALE_LIMITS = (1e-2, 1e2)
#: Per-window record of the env (``lineage()``); snapshots, forks and adopted states carry it.
#: Where ``snapshot()`` keeps states: the checkpoint store, memory, or memory on CUDA / distributed.
SNAPSHOT_MODES = ("auto", "store", "memory")
HISTORY_KEYS = ("global_step", "train_loss", "probe_loss", "index", "index_max", "trigger", "lr_scale", "clip_policy",
                "events", "data_events", "olmo_events", "flops", "steps", "action")


@dataclass
class RewardWeights:
    """Weights of the reward terms (see the env docstring)."""

    progress: float = 1.0  # per nat of probe-loss decrease over the window
    instability: float = 0.5  # per instability event that starts in the window
    wasted: float = 1.0  # per window's worth of wasted FLOPs
    divergence: float = 10.0  # once, on divergence


def decode_action(action: Any) -> dict[str, Any]:
    """Validate a MultiDiscrete action and name its parts; a bad action is a clear error."""
    a = checked_action(action, ACTION_NVEC, ACTION_FIELDS)
    return {
        "lr_change": LR_CHANGES[a[0]], "weight_decay_scale": WD_SCALES[a[1]], "clip_policy": CLIP_POLICIES[a[2]],
        "momentum_reset": bool(a[3]), "data_reorder": "shuffle_block" if a[4] else "none",
        "skip_batch": bool(a[5]), "raw": a.tolist(),
    }


def action_mask(allow_skip_batch: bool) -> np.ndarray:
    """Flat boolean mask, one entry per choice of each action dimension (17 entries); skipping a batch
    biases the data, so it is only offered when allowed."""
    mask = np.ones(sum(ACTION_NVEC), dtype=bool)
    if not allow_skip_batch:
        mask[-1] = False
    return mask


class GPT2Env(OwnRNG, gym.Env):
    """
    ## Description

    Each episode is a real GPT-2 pre-training run (Hugging Face transformers,
    AdamW, warm-up + cosine LR) on a corpus with injected instability (a
    scenario). Every environment step the agent picks an intervention, the
    trainer runs ``decision_interval`` optimizer steps under it, and the agent
    observes the monitor's state vector: loss and gradient statistics, the
    learning rate, clip bound, per-sequence loss spread, activation and
    attention entropy (measured once per window, in the same eval pass that
    gives the probe loss), the components of the uncertainty index and progress
    through the budget. The goal is to lower held-out loss while avoiding loss
    spikes, divergence and wasted compute.

    ## Action Space

    ``MultiDiscrete([4, 3, 4, 2, 2, 2])``:

    | index | name            | choices                                                    |
    |-------|-----------------|------------------------------------------------------------|
    | 0     | lr_change       | 0: x0.8, 1: x0.9, 2: x1.0, 3: x1.1 (compounding LR scale)  |
    | 1     | weight_decay    | 0: x0.5, 1: x1, 2: x2 of the configured weight decay       |
    | 2     | clip_policy     | 0: off, 1: ZClip, 2: ARC, 3: SPAM spike-aware clipping     |
    | 3     | momentum_reset  | 0: no, 1: zero Adam's first moment before the window       |
    | 4     | data_reorder    | 0: none, 1: shuffle the next block of training windows     |
    | 5     | skip_batch      | 0: no, 1: drop the window's first batch (masked by default)|

    The LR scale compounds and is kept within [0.01, 100]. Weight decay and clip
    policy hold until changed; momentum reset, reorder and skip act on the
    window's first step. ``action_masks()`` returns 17 booleans (4+3+4+2+2+2):
    skip batch is masked off unless ``allow_skip_batch=True``, because skipping
    batches biases the data. A masked choice sent anyway (plain PPO and the env
    checkers sample without masks) runs as skip 0, is reported in
    ``info["action_overridden"]`` and warned about once; an action outside the
    space raises ``ValueError``.

    ## Observation Space

    ``Box(-100, 100, (53,), float32)``; names in ``env.unwrapped.observation_names``,
    units and normalisation in ``assets/state_schema_v1.yaml`` (observation section).

    | index | name                   | unit / normalisation                          |
    |-------|------------------------|-----------------------------------------------|
    | 0-2   | loss, _ema, _delta     | training loss / ln(vocab)                     |
    | 3-5   | grad_norm, _ema, _delta| log1p(mean raw grad norm in the window)       |
    | 6-8   | lr, _ema, _delta       | log10(lr) + 3                                 |
    | 9-11  | weight_decay, ...      | AdamW coefficient                             |
    | 12-14 | clip_bound, ...        | log1p(bound), no bound = log1p(100)           |
    | 15-17 | momentum_reset_flag,...| 0/1                                           |
    | 18-20 | batch_loss_mean, ...   | mean per-sequence loss / ln(vocab)            |
    | 21-23 | batch_loss_var, ...    | log1p(within-batch variance of seq. loss)     |
    | 24-32 | act_entropy_{mean,min,max}, ... | softmax entropy over hidden / ln d   |
    | 33-41 | attn_entropy_{mean,min,max}, ...| attention entropy / ln(visible keys) |
    | 42-46 | u_loss_volatility, u_grad_volatility, | z-scores of the uncertainty components |
    |       | u_attention_entropy, u_activation_entropy, u_disagreement |          |
    | 47    | uncertainty_index      | weighted sum of the z-scores                  |
    | 48    | trigger                | 1 while the index is above tau (hysteresis)   |
    | 49    | progress               | training steps done / budget                  |
    | 50-52 | probe_loss, _ema, _delta | probe-batch loss after the window / ln(vocab) |

    ## Rewards

    ``r = w_progress * (probe_before - probe_after) - w_instability * new_events
    - w_wasted * wasted_flops / window_flops - w_divergence * diverged``, where
    the probe is a fixed batch of the *probe* split (loss in nats, measured in
    eval mode; never the validation or test split), ``new_events`` is 1 when a
    model instability event starts in the window (the probe loss rises above its
    running best by more than the rule of
    :func:`stso_env.monitor.events.model_instability_events`), ``wasted_flops``
    are the FLOPs of the window when it is spent inside such an event (from its
    start until the probe is back near the pre-event best), and ``window_flops``
    is the nominal cost of the window. Defaults ``w = (1.0, 0.5, 1.0, 10.0)``
    (:class:`RewardWeights`). A skipped batch makes no progress, so skipping
    never earns reward by itself. Steps whose own batch loss is far above the
    recent median are *data events* (``info["data_events"]``): reported, never
    penalised, since no intervention can lower the loss of a garbage batch.

    ## Info

    Besides the reward's terms (``probe_loss``, ``instability_events``,
    ``wasted_flops``, ``flops``, ``diverged``): ``uncertainty_index`` and
    ``trigger`` at the window's last step, ``index_max`` and ``trigger_in_window``
    over all its steps (a spike can push the index over tau and back under
    ``tau - hysteresis`` within one window), ``data_events``, ``olmo_events``,
    ``global_step``, ``steps``, ``lr_scale``, ``noise`` and ``action_overridden``.

    ## Starting State

    ``reset(seed=s)`` builds a fresh model (initialised from ``s``), optimizer
    and data order, then runs one window with the neutral action
    ``[2, 1, 0, 0, 0, 0]`` so the first observation describes real training.

    ## Episode End

    * Termination: divergence (non-finite training loss, or training loss above
      ``divergence_factor`` x the first loss), with the divergence penalty.
    * Truncation: ``episode_steps`` optimizer steps are done.

    ## Arguments

    ``gym.make("STSO-GPT2-v0", preset="tiny", scenario="spiky", corpus="builtin",
    tokenizer="byte", decision_interval=10, episode_steps=1000, reward_weights=None,
    run_dir=None, allow_skip_batch=False, divergence_factor=3.0, config=None, uncertainty_config=None, snapshot_keep=8,
    snapshots="auto", render_mode=None)``. ``config`` is a ``TrainConfig`` or YAML path whose values
    the other arguments override; ``reward_weights`` a dict of
    :class:`RewardWeights` fields. With ``run_dir`` every step is appended to
    ``run_dir/log_db.parquet`` (``assets/log_schema.json``) and to TensorBoard
    (``run_dir/tb``), and snapshots go to ``run_dir/snapshots``.

    ``env.unwrapped.fork()`` returns an independent env in exactly the same
    state (close it when done): an in-memory copy, tensors copied on their device
    (GPU to GPU on CUDA). ``snapshot()`` returns an id and ``restore(id)`` goes
    back to it: restore plus the same actions gives identical observations and
    rewards, bit for bit on CPU. ``snapshots`` says where the newest
    ``snapshot_keep`` snapshots live: ``"store"``, the checkpoint store (files
    under ``run_dir/snapshots``, or a temporary folder); ``"memory"``, deep copies
    in this process, on the model's device; ``"auto"`` (default), memory when the
    trainer runs on CUDA or distributed, the store otherwise.

    Distributed (every rank of a ``torchrun`` job builds the env and sends it
    the same actions): the monitor's statistics are those of the global batch,
    so every rank observes the same vector and trigger and a deterministic policy
    picks the same action on every rank; ``fork()``, ``snapshot()`` and
    ``restore()`` are collective (every rank calls them together), and each rank
    keeps the copy of its own replica and RNG.

    ## Version History

    * v0: initial version.
    """

    metadata = {"render_modes": ["ansi", "rgb_array"], "render_fps": 4}

    def __init__(self, preset: str = "tiny", scenario: str = "spiky", corpus: str = "builtin",
                 tokenizer: str = "byte", decision_interval: int = 10, episode_steps: int = 1000,
                 reward_weights: dict[str, float] | RewardWeights | None = None, run_dir: str | None = None,
                 allow_skip_batch: bool = False, divergence_factor: float = 3.0,
                 config: TrainConfig | str | None = None, uncertainty_config: str | None = None, snapshot_keep: int = 8,
                 snapshots: str = "auto", render_mode: str | None = None) -> None:
        super().__init__()
        if decision_interval < 1 or episode_steps < decision_interval:
            raise ConfigError(f"decision_interval={decision_interval}, episode_steps={episode_steps}: need "
                              "1 <= decision_interval <= episode_steps")
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ConfigError(f"render_mode={render_mode!r}: choose one of {self.metadata['render_modes']}")
        self._kwargs = dict(preset=preset, scenario=scenario, corpus=corpus, tokenizer=tokenizer,
                            decision_interval=decision_interval, episode_steps=episode_steps,
                            reward_weights=reward_weights, run_dir=run_dir, allow_skip_batch=allow_skip_batch,
                            divergence_factor=divergence_factor, config=config,
                            uncertainty_config=uncertainty_config, snapshot_keep=snapshot_keep, snapshots=snapshots,
                            render_mode=render_mode)
        base = config if isinstance(config, TrainConfig) else (
            load_config(TrainConfig, config) if config is not None else TrainConfig())
        self.base_config = apply_overrides(base, {
            "model.preset": preset, "scenario": scenario, "data.corpus": corpus, "data.tokenizer": tokenizer,
            "steps": episode_steps, "checkpoint.every": 0,
        })
        self.reward_weights = instance_or_kwargs(RewardWeights, reward_weights, "reward_weights")
        self.uncertainty_config = load_uncertainty_config(uncertainty_config)
        self.decision_interval = decision_interval
        self.episode_steps = episode_steps
        self.allow_skip_batch = allow_skip_batch
        self.divergence_factor = divergence_factor
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.snapshot_keep = snapshot_keep
        if snapshots not in SNAPSHOT_MODES:
            raise ConfigError(f"snapshots={snapshots!r}: choose one of {', '.join(SNAPSHOT_MODES)}")
        self.snapshots = snapshots
        self._memory_snapshots: dict[int, dict[str, Any]] = {}
        self.render_mode = render_mode
        self.observation_names = OBSERVATION_NAMES
        self.observation_space = spaces.Box(-OBS_LIMIT, OBS_LIMIT, (len(OBSERVATION_NAMES),), np.float32)
        self.action_space = spaces.MultiDiscrete(ACTION_NVEC)

        self.trainer = None
        self.monitor: Monitor | None = None
        self._rng_state: dict[str, Any] | None = None
        self._episode = -1
        self._seed = 0
        self._warned_override = False
        self._done = False
        self._diverged_at_reset = False
        self._last_info: dict[str, Any] = {}
        self._store = None
        self._logs = TransitionLogs(self.run_dir, OBSERVATION_NAMES) if self.run_dir is not None else None
        self._history: dict[str, list] = {}
        self._total_flops = 0.0

    # ------------------------------------------------------------------ gym API

    def action_masks(self) -> np.ndarray:
        """Flat boolean mask, one entry per choice of each action dimension (17 entries)."""
        return action_mask(self.allow_skip_batch)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        from stso_env.train.trainer import Trainer, load_splits

        if seed is None:
            seed = int(self.np_random.integers(0, 2**31 - 1))
        self._seed = int(seed)
        self._episode += 1
        cfg = apply_overrides(self.base_config, {"seed": self._seed})
        self._rng_state = None
        with self._own_rng():
            self.trainer = Trainer(cfg, splits=load_splits(cfg))
        self.monitor = Monitor(vocab_size=self.trainer.tokenizer.vocab_size, budget_steps=self.episode_steps,
                               uncertainty=self.uncertainty_config, divergence_factor=self.divergence_factor)
        self._done = False
        self._total_flops = 0.0
        self._history = {k: [] for k in HISTORY_KEYS}
        self._flush_logs()
        with self._own_rng():
            self._probe, rows = self.trainer.probe()
        self.monitor.set_layer_stats(rows)
        obs, _, terminated, _, info = self._run_window(dict(decode_action(NEUTRAL_ACTION)), log=False)
        # A run that diverges already in the opening window ends at the first step() call.
        self._diverged_at_reset = terminated
        self._done = False
        self._obs = obs
        self._last_info = info
        return obs.copy(), info

    def step(self, action: Any):
        if self.trainer is None:
            raise RuntimeError("call reset() before step()")
        if self._done:
            raise RuntimeError("the episode has ended (terminated or truncated); call reset()")
        act = decode_action(action)
        overridden = False
        if act["skip_batch"] and not self.allow_skip_batch:
            act["skip_batch"] = False
            act["raw"][5] = 0
            overridden = True
            if not self._warned_override:
                warnings.warn("STSO-GPT2-v0: skip_batch is masked (allow_skip_batch=False); the action ran "
                              "with skip_batch=0 (see info['action_overridden'])", stacklevel=2)
                self._warned_override = True
        prev_obs = self._obs
        if self._diverged_at_reset:
            self._done = True
            info = dict(self._last_info, diverged=True, action_overridden=overridden, flops=0.0, wasted_flops=0.0,
                        action={k: v for k, v in act.items() if k != "raw"})
            return prev_obs.copy(), -float(self.reward_weights.divergence), True, False, info
        obs, reward, terminated, truncated, info = self._run_window(act, log=True, prev_obs=prev_obs,
                                                                    overridden=overridden)
        self._obs = obs
        self._last_info = info
        return obs.copy(), reward, terminated, truncated, info

    def _run_window(self, act: dict[str, Any], *, log: bool, prev_obs: np.ndarray | None = None,
                    overridden: bool = False):
        t0 = time.perf_counter()
        tr, mon = self.trainer, self.monitor
        lo, hi = LR_SCALE_LIMITS
        tr.set_knobs(lr_scale=min(hi, max(lo, tr.knobs.lr_scale * act["lr_change"])),
                     wd_scale=act["weight_decay_scale"], clip_policy=act["clip_policy"],
                     momentum_reset=act["momentum_reset"], reorder=act["data_reorder"] != "none",
                     skip_batch=act["skip_batch"])
        olmo = data_events = flops = 0.0
        steps = 0
        diverged = False
        # the trigger and index of any step in the window, not only the last: a spike can push the index
        # over tau and back under tau - hysteresis within one window, and the controller decides per window
        in_window, index_max = False, -math.inf
        noise: set[str] = set()
        last = None
        probe_before = self._probe
        with self._own_rng():
            for _ in range(self.decision_interval):
                if tr.global_step >= self.episode_steps:
                    break
                s = tr.train_step()
                ev = mon.update(s)
                in_window = in_window or bool(ev["trigger"])
                index_max = max(index_max, float(ev["index"]))
                olmo += ev["new_event"]
                data_events += ev["data_event"]
                flops += s.flops
                steps += 1
                noise.update(s.noise)
                last = s
                if ev["diverged"]:
                    diverged = True
                    break
            # One eval pass on the probe batch gives the reward's probe loss and the entropy
            # statistics of the next observation (hooks on a sub-sample, once per window).
            self._probe, rows = tr.probe()
        mon.set_layer_stats(rows)
        model = mon.update_probe(self._probe, flops, steps)
        events, wasted = int(model["new_event"]), float(model["recovery_flops"])
        obs = mon.observe()
        w = self.reward_weights
        window_flops = tr.step_flops * self.decision_interval
        progress = probe_before - self._probe if math.isfinite(self._probe) else -OBS_LIMIT
        reward = (w.progress * progress - w.instability * events - w.wasted * wasted / window_flops
                  - w.divergence * float(diverged))
        terminated = bool(diverged)
        truncated = bool(not terminated and tr.global_step >= self.episode_steps)
        self._done = terminated or truncated
        reading = mon.latest
        info = {
            "global_step": tr.global_step, "train_loss": last.loss, "probe_loss": self._probe,
            "uncertainty_index": reading["index"], "trigger": reading["trigger"],
            "trigger_in_window": in_window, "index_max": index_max,
            "instability_event": bool(events), "instability_events": events, "model_event_open": model["in_event"],
            "data_events": int(data_events), "olmo_events": int(olmo), "diverged": diverged,
            "flops": float(flops), "wasted_flops": wasted, "steps": steps,
            "total_flops": float(self._total_flops + flops),
            "total_wasted_flops": float(mon.model_events.recovery_flops),
            "action": {k: v for k, v in act.items() if k != "raw"}, "action_overridden": overridden,
            "lr_scale": tr.knobs.lr_scale, "noise": sorted(noise),
        }
        self._total_flops += flops
        h = self._history
        h["global_step"].append(tr.global_step)
        h["train_loss"].append(last.loss)
        h["probe_loss"].append(self._probe)
        h["index"].append(reading["index"])
        h["index_max"].append(index_max)
        h["trigger"].append(bool(reading["trigger"]))
        h["lr_scale"].append(tr.knobs.lr_scale)
        h["clip_policy"].append(act["clip_policy"])
        h["events"].append(int(events))
        h["data_events"].append(int(data_events))
        h["olmo_events"].append(int(olmo))
        h["flops"].append(float(flops))
        h["steps"].append(int(steps))
        h["action"].append(list(act["raw"]))
        if log:
            self._log(prev_obs, act, overridden, float(reward), obs, terminated, truncated, info, last,
                      probe_before, noise, time.perf_counter() - t0)
        return obs, float(reward), terminated, truncated, info

    def lineage(self) -> dict[str, list]:
        """The per-window record of the windows that produced the current weights.

        A restore rewinds it, and an adopted fork's or a PBT exploit's state brings the record of
        the run it came from, so at the end of an episode this is the lineage of the final model,
        stitched across rollbacks, adoptions and exploits
        (:func:`stso_env.monitor.events.lineage_metrics` scores it)."""
        return {k: list(v) for k, v in self._history.items()}

    # ------------------------------------------------------------------ logging

    def _log(self, prev_obs, act, overridden, reward, obs, terminated, truncated, info, last, probe_before,
             noise, seconds) -> None:
        if self._logs is None:
            return
        gs = info["global_step"]
        self._logs.append({
            "run_id": self.run_dir.name, "episode": self._episode, "env_step": len(self._history["action"]) - 2,
            "global_step": gs, "seed": self._seed, "scenario": self.trainer.scenario.name,
            "state": prev_obs.tolist(), "action": list(act["raw"]), "action_overridden": overridden,
            "reward": reward, "next_state": obs.tolist(), "terminated": terminated, "truncated": truncated,
            "train_loss": last.loss, "probe_loss": info["probe_loss"], "probe_loss_before": probe_before,
            "grad_norm": last.grad_norm, "lr": last.lr, "uncertainty_index": info["uncertainty_index"],
            "trigger": bool(info["trigger"]), "instability_events": info["instability_events"],
            "diverged": info["diverged"], "flops": info["flops"], "wasted_flops": info["wasted_flops"],
            "noise": ",".join(sorted(noise)), "wall_seconds": seconds,
        })
        self._logs.scalars(f"episode_{self._episode}", [
            ("env/reward", reward), ("train/loss", last.loss), ("probe/loss", info["probe_loss"]),
            ("monitor/uncertainty_index", info["uncertainty_index"]), ("monitor/trigger", float(info["trigger"])),
            ("train/lr", last.lr), ("train/grad_norm", last.grad_norm),
            ("events/instability", info["instability_events"]), ("events/wasted_flops", info["wasted_flops"])], gs)

    def _flush_logs(self) -> None:
        if self._logs is not None:
            self._logs.flush()

    # ------------------------------------------------------------------ state, fork, snapshots

    def _env_state(self) -> dict[str, Any]:
        with self._own_rng():  # so the trainer's RNG field is this env's own stream
            trainer_state = self.trainer.state_dict()
        return {
            "trainer": trainer_state,
            "monitor": self.monitor.state_dict(),
            "rng": self._rng_state,
            "np_random": self.np_random.bit_generator.state,
            "obs": self._obs.copy(),
            "probe": self._probe,
            "episode": self._episode,
            "seed": self._seed,
            "done": self._done,
            "diverged_at_reset": self._diverged_at_reset,
            "last_info": copy.deepcopy(self._last_info),
            "history": {k: list(v) for k, v in self._history.items()},
            "total_flops": self._total_flops,
        }

    def _load_env_state(self, state: dict[str, Any]) -> None:
        from stso_env.train.trainer import Trainer, load_splits

        cfg = apply_overrides(self.base_config, {"seed": int(state["seed"])})
        if self.trainer is None or self.trainer.cfg.seed != cfg.seed:
            with self._own_rng():
                self.trainer = Trainer(cfg, splits=load_splits(cfg))
        if self.monitor is None:
            self.monitor = Monitor(vocab_size=self.trainer.tokenizer.vocab_size, budget_steps=self.episode_steps,
                                   uncertainty=self.uncertainty_config, divergence_factor=self.divergence_factor)
        with self._own_rng():
            self.trainer.load_state_dict(state["trainer"])
        # The trainer restored the global RNGs inside _own_rng; the env's own streams are the saved ones.
        self._rng_state = state["rng"]
        self.monitor.load_state_dict(state["monitor"])
        self.np_random.bit_generator.state = state["np_random"]
        self._obs = np.asarray(state["obs"], dtype=np.float32).copy()
        self._probe = float(state["probe"])
        self._episode = int(state["episode"])
        self._seed = int(state["seed"])
        self._done = bool(state["done"])
        self._diverged_at_reset = bool(state["diverged_at_reset"])
        self._last_info = copy.deepcopy(state["last_info"])
        self._history = {k: list(v) for k, v in state["history"].items()}
        # states saved before the window maximum was recorded: the end-of-window index stands in
        self._history.setdefault("index_max", list(self._history.get("index", [])))
        self._total_flops = float(state["total_flops"])

    def fork(self) -> GPT2Env:
        """An independent env in exactly this state (no logging; close it when done)."""
        if self.trainer is None:
            raise RuntimeError("fork() needs a reset env")
        child = type(self).from_state(self._kwargs, self._env_state())
        child._warned_override = self._warned_override
        return child

    @classmethod
    def from_state(cls, env_kwargs: dict[str, Any], state: dict[str, Any]) -> GPT2Env:
        """An env built from another's constructor arguments (``_kwargs``) and a copy of its whole state
        (``_env_state()``), without logging: what :meth:`fork` makes, in any process (a Ray worker, where the
        arrays of a task's arguments are read-only, hence the copy)."""
        env = cls(**dict(env_kwargs, run_dir=None))
        _ = env.np_random  # materialise the generator so its state can be overwritten
        env._load_env_state(copy.deepcopy(state))
        return env

    def _snapshot_store(self):
        from stso_env import cp

        if self._store is None:
            if self.run_dir is not None:
                directory = self.run_dir / "snapshots"
            else:
                import tempfile

                self._tmpdir = tempfile.TemporaryDirectory(prefix="stso-snapshots-")
                directory = Path(self._tmpdir.name)
            self._store = cp.CheckpointStore(directory, keep=max(2, self.snapshot_keep),
                                             config_hash=self.trainer.config_hash)
        return self._store

    @property
    def snapshot_mode(self) -> str:
        """``"store"`` or ``"memory"``: where :meth:`snapshot` keeps states (``snapshots`` resolved)."""
        if self.snapshots != "auto":
            return self.snapshots
        t = self.trainer
        return "memory" if t is not None and (t.world.distributed or t.device.type == "cuda") else "store"

    def snapshot(self) -> int:
        """Save the whole env state (in the checkpoint store or in memory, see ``snapshots``); returns its id
        (the global step)."""
        if self.trainer is None:
            raise RuntimeError("snapshot() needs a reset env")
        sid = int(self.trainer.global_step)
        if self.snapshot_mode == "memory":
            # deepcopy clones every tensor on its own device: GPU to GPU, no host round trip
            self._memory_snapshots[sid] = copy.deepcopy(self._env_state())
            for old in sorted(self._memory_snapshots)[:-max(2, self.snapshot_keep)]:
                del self._memory_snapshots[old]
            return sid
        self._snapshot_store().save(sid, self._env_state())
        return sid

    def snapshot_ids(self) -> list[int]:
        """Ids of the snapshots that :meth:`restore` can go back to, oldest first."""
        if self._memory_snapshots:
            return sorted(self._memory_snapshots)
        if self._store is None:
            return []
        self._store.wait()
        return sorted(self._store.list())

    def restore(self, snapshot_id: int) -> np.ndarray:
        """Go back to a snapshot; returns the observation the env had then."""
        if self.snapshot_mode == "memory":
            if snapshot_id not in self._memory_snapshots:
                raise KeyError(f"snapshot {snapshot_id!r} is not in memory (have {sorted(self._memory_snapshots)}; "
                               f"the newest {max(2, self.snapshot_keep)} are kept)")
            # a copy again: loading hands tensors to the optimizer, which must not alias the snapshot
            self._load_env_state(copy.deepcopy(self._memory_snapshots[snapshot_id]))
            return self._obs.copy()
        store = self._snapshot_store()
        store.wait()
        if snapshot_id not in store.list():
            raise KeyError(f"snapshot {snapshot_id!r} is not in {store.directory} (have {store.list()}; the "
                           f"newest {store.keep} are kept)")
        self._load_env_state(store.load(snapshot_id))
        return self._obs.copy()

    # ------------------------------------------------------------------ render, close

    def render(self):
        if self.render_mode is None:
            gym.logger.warn("render() called without a render_mode; pass render_mode='ansi' or 'rgb_array'")
            return None
        if self.trainer is None:
            raise RuntimeError("render() needs a reset env")
        h = self._history
        if self.render_mode == "ansi":
            a = h["action"][-1]
            return (f"step {h['global_step'][-1]}/{self.episode_steps} | loss {h['train_loss'][-1]:.3f} | "
                    f"probe {h['probe_loss'][-1]:.3f} | index {h['index'][-1]:+.2f}"
                    f"{' TRIGGER' if h['trigger'][-1] else ''} | lr x{h['lr_scale'][-1]:.2f} | "
                    f"clip {h['clip_policy'][-1]} | action {a}")
        from stso_env.envs.render import timeline_rgb

        return timeline_rgb(h, tau=self.uncertainty_config.tau, budget=self.episode_steps)

    def close(self) -> None:
        if self._logs is not None:
            self._logs.close()
        if self._store is not None:
            self._store.close()
            self._store = None
        self._memory_snapshots.clear()
        super().close()
