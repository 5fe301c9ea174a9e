"""STSO-Proxy-v0: STSO-GPT2-v0 simulated by the learned proxy world model.

References: 2019_Janner_MBPO, 2020_Yu_MOPO (keys in ``assets/related_work.md``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces

from stso_env.envs.gpt2_env import (ACTION_NVEC, OBS_LIMIT, OBSERVATION_NAMES, RewardWeights, action_mask,
                                    decode_action)
from stso_env.errors import ConfigError, DataError
from stso_env.proxy.dataset import PLAN_NVEC, as_plan
from stso_env.proxy.model import _N_SCALAR, ProxyEnsemble

#: Index of the probe-loss feature (probe loss / ln(vocab)) in the observation: the reward's loss.
PROBE_INDEX = OBSERVATION_NAMES.index("probe_loss")
#: Nats per unit of the loss feature when no log is there to measure it: ln(257), the byte vocabulary.
DEFAULT_NATS_PER_LOSS_UNIT = math.log(257)
#: A predicted divergence probability above this ends the episode.
DIVERGENCE_THRESHOLD = 0.5


def _weights(reward_weights: dict[str, float] | RewardWeights | None) -> RewardWeights:
    if isinstance(reward_weights, RewardWeights):
        return reward_weights
    try:
        return RewardWeights(**(reward_weights or {}))
    except TypeError as exc:
        raise ConfigError(f"reward_weights: {exc}; allowed keys: {', '.join(asdict(RewardWeights()))}") from None


class ProxyVecModel:
    """Batched transitions of the proxy: ``B`` (state, action) pairs in one ensemble forward pass.

    ``step_batch`` is the path for model-based RL and branch scoring; :class:`ProxyEnv` uses it with
    ``B = 1``, so a single env step and a row of a batch give the same numbers. See
    :class:`ProxyEnv` for the reward and termination rules.
    """

    def __init__(self, proxy: ProxyEnsemble | str | Path, *,
                 reward_weights: dict[str, float] | RewardWeights | None = None, allow_skip_batch: bool = False,
                 nats_per_loss_unit: float = DEFAULT_NATS_PER_LOSS_UNIT, uncertainty_penalty: float = 0.0) -> None:
        self.model = proxy if isinstance(proxy, ProxyEnsemble) else ProxyEnsemble.load(proxy)
        self.model.eval()
        if self.model.state_dim != len(OBSERVATION_NAMES) or tuple(self.model.nvec) not in (
                tuple(ACTION_NVEC), tuple(PLAN_NVEC)):
            raise ConfigError(f"proxy: state dim {self.model.state_dim}, actions {list(self.model.nvec)}; "
                              f"STSO-Proxy-v0 needs {len(OBSERVATION_NAMES)} features and {list(ACTION_NVEC)} "
                              f"(or plans, {list(PLAN_NVEC)}); train the proxy on a STSO-GPT2-v0 log database")
        # a plan proxy reads each action as "this now, then hold its settings" (dataset.as_plan)
        self.plans = tuple(self.model.nvec) == tuple(PLAN_NVEC)
        if not (nats_per_loss_unit > 0 and math.isfinite(nats_per_loss_unit)):
            raise ConfigError(f"nats_per_loss_unit: must be positive and finite, got {nats_per_loss_unit!r}")
        if not (uncertainty_penalty >= 0 and math.isfinite(uncertainty_penalty)):
            raise ConfigError(f"uncertainty_penalty: must be a finite number >= 0, got {uncertainty_penalty!r}")
        self.uncertainty_penalty = float(uncertainty_penalty)
        self.reward_weights = _weights(reward_weights)
        self.allow_skip_batch = bool(allow_skip_batch)
        self.nats_per_loss_unit = float(nats_per_loss_unit)
        self.horizon = int(self.model.config.horizon)
        self.n_members = int(self.model.config.ensemble)

    def _check(self, states: np.ndarray, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        s = np.asarray(states, dtype=np.float32)
        a = np.asarray(actions)
        if s.ndim != 2 or s.shape[1] != len(OBSERVATION_NAMES):
            raise DataError(f"states: expected shape (B, {len(OBSERVATION_NAMES)}), got {s.shape}")
        if a.shape != (s.shape[0], len(ACTION_NVEC)):
            raise DataError(f"actions: expected shape ({s.shape[0]}, {len(ACTION_NVEC)}), got {a.shape}")
        if not np.issubdtype(a.dtype, np.integer):
            if not np.all(a == np.round(a)):
                raise DataError("actions: expected integers (MultiDiscrete choices)")
        a = a.astype(np.int64)
        bad = (a < 0) | (a >= np.asarray(ACTION_NVEC))
        if bad.any():
            row, col = np.argwhere(bad)[0]
            raise DataError(f"actions[{row}, {col}] = {a[row, col]}: allowed 0..{ACTION_NVEC[col] - 1}")
        overridden = np.zeros(s.shape[0], dtype=bool)
        if not self.allow_skip_batch:
            # same rule as STSO-GPT2-v0: a masked skip runs as "no skip"
            overridden = a[:, 5] != 0
            a = a.copy()
            a[:, 5] = 0
        return s, a, overridden

    @torch.inference_mode()
    def heads(self, states: np.ndarray, actions: np.ndarray, members: np.ndarray | None = None,
              ) -> dict[str, np.ndarray]:
        """Proxy heads per row: the ensemble mean, or member ``members[i]`` for row ``i`` when given."""
        s, a, overridden = self._check(states, actions)
        m = self.model
        xt = m._encode(s, as_plan(a) if self.plans else a)
        out = m(xt) * m.y_std + m.y_mean  # (E, B, out), target units, as ProxyEnsemble.predict
        if members is None:
            sel = out.mean(0)
        else:
            idx = np.asarray(members, dtype=np.int64)
            if idx.shape != (s.shape[0],) or idx.min(initial=0) < 0 or idx.max(initial=0) >= self.n_members:
                raise DataError(f"members: expected {s.shape[0]} indices in 0..{self.n_members - 1}")
            sel = out[torch.from_numpy(idx), torch.arange(s.shape[0])]
        prob = torch.sigmoid(out[..., 1]).mean(0) if members is None else torch.sigmoid(sel[:, 1])
        # members' disagreement on the one-step probe-loss change (the reward's progress term), in nats
        spread = out[..., _N_SCALAR + PROBE_INDEX].std(0, unbiased=False) * self.nats_per_loss_unit
        # a tree loss head has no members: every member reads its mean
        trees = m.tree_loss(s, as_plan(a) if self.plans else a)
        loss = sel[:, 0].numpy() + m.loss_baseline(s) if trees is None else trees[0]
        div = m.tree_divergence(s, as_plan(a) if self.plans else a)  # likewise for a tree divergence head
        if div is not None:
            prob = torch.from_numpy(div[0])
        return {"next_state": (sel[:, _N_SCALAR:] + xt[:, : m.state_dim]).numpy(),
                "progress_spread": spread.numpy(),
                "loss_at_n": loss, "diverged_prob": prob.numpy(),
                "instability_risk": sel[:, 2].numpy(), "recovery_time": sel[:, 3].numpy(),
                "action": a, "action_overridden": overridden, "state": s}

    def step_batch(self, states: np.ndarray, actions: np.ndarray, members: np.ndarray | None = None,
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(next_states (B, 50) float32 clipped to the Box, rewards (B,) float64, terminated (B,) bool)``."""
        h = self.heads(states, actions, members)
        nxt, rewards, terminated = self._outcome(h)
        return nxt, rewards, terminated

    def _outcome(self, h: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        w = self.reward_weights
        state = np.nan_to_num(h["state"], nan=0.0, posinf=OBS_LIMIT, neginf=-OBS_LIMIT)
        nxt = np.clip(np.nan_to_num(h["next_state"], nan=0.0, posinf=OBS_LIMIT, neginf=-OBS_LIMIT),
                      -OBS_LIMIT, OBS_LIMIT).astype(np.float32)
        progress = self.nats_per_loss_unit * (state[:, PROBE_INDEX].astype(np.float64)
                                              - nxt[:, PROBE_INDEX].astype(np.float64))
        # the risk head counts events over the horizon: per env step that is risk / horizon
        events = np.clip(h["instability_risk"].astype(np.float64), 0.0, None) / self.horizon
        p_div = h["diverged_prob"].astype(np.float64)
        rewards = w.progress * progress - w.instability * events - w.divergence * p_div
        if self.uncertainty_penalty:
            # MOPO-style pessimism: where the members disagree the model is guessing, and a policy
            # trained on it would learn to exploit the guesses instead of real dynamics
            rewards = rewards - self.uncertainty_penalty * w.progress * h["progress_spread"].astype(np.float64)
        return nxt, rewards, p_div > DIVERGENCE_THRESHOLD


class ProxyEnv(gym.Env):
    """
    ## Description

    STSO-GPT2-v0 with the real training run replaced by the learned proxy world
    model (:class:`stso_env.proxy.model.ProxyEnsemble`): thousands of env steps
    per second, for pre-training controllers and model-based RL before they
    touch a real run. Same observation and action spaces as STSO-GPT2-v0.

    ## Action Space

    ``MultiDiscrete([4, 3, 4, 2, 2, 2])``, as STSO-GPT2-v0 (lr_change,
    weight_decay, clip_policy, momentum_reset, data_reorder, skip_batch).
    ``action_masks()`` is the same: skip batch is masked unless
    ``allow_skip_batch=True``; a masked skip sent anyway runs as 0 and is
    reported in ``info["action_overridden"]``.

    ## Observation Space

    ``Box(-100, 100, (53,), float32)``, the STSO-GPT2-v0 state vector
    (``env.unwrapped.observation_names``). Predicted states are clipped to the
    Box and NaN/inf mapped to its bounds, like the real monitor does.

    ## Transitions

    ``next_state`` is the proxy's next-state head, the **ensemble mean** by
    default. With ``sample_member=True`` one member is drawn per episode (with
    ``self.np_random``) at reset and drives the whole episode: trajectories then
    show the model's epistemic spread (as in PETS-style trajectory sampling)
    instead of the smoothed mean. ``info`` carries every head (``loss_at_n``,
    ``diverged_prob``, ``instability_risk``, ``recovery_time``).

    ## Rewards

    The STSO-GPT2-v0 formula with each term decoded from the proxy:

    ``r = w_progress * c * (probe_t - probe_t+1) - w_instability * risk / N - w_divergence * p_div``

    * progress: the decrease of the observation's ``probe_loss`` feature (probe
      loss / ln vocab) from the state to the predicted next state, converted to
      nats with ``c`` = median of ``probe_loss / next_state[probe_loss]`` over
      the logged rows (``ln(257)`` when the log gives no finite ratio): the
      quantity STSO-GPT2-v0 rewards, the probe loss, not a noisy single-batch
      training loss. ``loss_at_n`` looks ``N`` steps ahead and would mix
      horizons, so it is reported in ``info`` but not used here.
    * instability: ``instability_risk`` predicts the event *count* over the
      proxy's horizon ``N``; ``risk / N`` (clipped at 0) is the per-step rate.
    * wasted FLOPs: no proxy head predicts them, so the term is 0.
    * model uncertainty (``uncertainty_penalty`` = lambda, default 0): minus
      ``lambda * w_progress * spread``, where ``spread`` is the ensemble
      members' standard deviation of the predicted loss change, in nats
      (MOPO, Yu et al. 2020): a policy learned in the proxy is kept where the
      proxy knows the dynamics instead of exploiting its guesses elsewhere.
    * divergence: the expected penalty ``w_divergence * diverged_prob``
      every step (the probability is over the horizon, so this is cautious).

    Defaults ``w = (1.0, 0.5, 1.0, 10.0)`` (:class:`RewardWeights`).

    ## Starting State

    ``reset(seed=s)`` draws a logged ``state`` (a real observation from the
    log database) uniformly with ``self.np_random``.

    ## Episode End

    * Termination: predicted ``diverged_prob > 0.5``.
    * Truncation: ``episode_steps`` env steps (not optimizer steps).

    ## Arguments

    ``gym.make("STSO-Proxy-v0", proxy_dir=..., log_db=..., episode_steps=100,
    reward_weights=None, allow_skip_batch=False, sample_member=False, uncertainty_penalty=0.0,
    render_mode=None)``. ``proxy_dir`` is a folder written by
    ``ProxyEnsemble.save`` / ``agents.train_proxy``; ``log_db`` a log database
    folder (or Parquet file) of STSO-GPT2-v0 rows.

    ## Version History

    * v0: initial version.
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 4}

    def __init__(self, proxy_dir: str, log_db: str, episode_steps: int = 100,
                 reward_weights: dict[str, float] | RewardWeights | None = None, allow_skip_batch: bool = False,
                 sample_member: bool = False, uncertainty_penalty: float = 0.0,
                 render_mode: str | None = None) -> None:
        super().__init__()
        from stso_env.proxy.logdb import read_log_db

        if not isinstance(episode_steps, int) or episode_steps < 1:
            raise ConfigError(f"episode_steps={episode_steps!r}: must be an integer >= 1 (env steps)")
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ConfigError(f"render_mode={render_mode!r}: choose one of {self.metadata['render_modes']}")
        table = read_log_db(log_db)
        if table.num_rows == 0:
            raise DataError(f"log_db {log_db}: no rows; collect episodes first (python -m agents.collect)")
        col = table.column("state").combine_chunks()
        width = len(OBSERVATION_NAMES)
        starts = np.asarray(col.flatten().to_numpy(zero_copy_only=False), dtype=np.float32)
        if starts.size != table.num_rows * width:
            raise DataError(f"log_db {log_db}: states are not {width}-dimensional; log STSO-GPT2-v0 episodes")
        starts = starts.reshape(-1, width)
        self._starts = np.clip(np.nan_to_num(starts, nan=0.0, posinf=OBS_LIMIT, neginf=-OBS_LIMIT),
                               -OBS_LIMIT, OBS_LIMIT).astype(np.float32)
        nats = DEFAULT_NATS_PER_LOSS_UNIT
        loss_feat = np.asarray(table.column("next_state").combine_chunks().flatten()
                               .to_numpy(zero_copy_only=False), dtype=np.float64).reshape(-1, width)[:, PROBE_INDEX]
        probe = table.column("probe_loss").to_numpy(zero_copy_only=False).astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = probe / loss_feat
        ratio = ratio[np.isfinite(ratio) & (ratio > 0)]
        if ratio.size:
            nats = float(np.median(ratio))
        self.model = ProxyVecModel(proxy_dir, reward_weights=reward_weights, allow_skip_batch=allow_skip_batch,
                                   uncertainty_penalty=uncertainty_penalty,
                                   nats_per_loss_unit=nats)
        self.reward_weights = self.model.reward_weights
        self.episode_steps = episode_steps
        self.allow_skip_batch = bool(allow_skip_batch)
        self.sample_member = bool(sample_member)
        self.render_mode = render_mode
        self.observation_names = OBSERVATION_NAMES
        self.observation_space = spaces.Box(-OBS_LIMIT, OBS_LIMIT, (width,), np.float32)
        self.action_space = spaces.MultiDiscrete(ACTION_NVEC)
        self._obs: np.ndarray | None = None
        self._member: int | None = None
        self._t = 0
        self._done = False
        self._warned_override = False
        self._last: dict[str, Any] = {}

    def action_masks(self) -> np.ndarray:
        """Flat boolean mask, one entry per choice of each action dimension (17 entries)."""
        return action_mask(self.allow_skip_batch)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        i = int(self.np_random.integers(len(self._starts)))
        self._member = int(self.np_random.integers(self.model.n_members)) if self.sample_member else None
        self._obs = self._starts[i].copy()
        self._t = 0
        self._done = False
        self._last = {"start_row": i, "member": self._member}
        return self._obs.copy(), dict(self._last)

    def step(self, action: Any):
        if self._obs is None:
            raise RuntimeError("call reset() before step()")
        if self._done:
            raise RuntimeError("the episode has ended (terminated or truncated); call reset()")
        act = decode_action(action)  # same validation and error text as STSO-GPT2-v0
        members = None if self._member is None else np.array([self._member])
        h = self.model.heads(self._obs[None], np.asarray(act["raw"], dtype=np.int64)[None], members)
        nxt, rewards, terminated = self.model._outcome(h)
        overridden = bool(h["action_overridden"][0])
        if overridden and not self._warned_override:
            warnings.warn("STSO-Proxy-v0: skip_batch is masked (allow_skip_batch=False); the action ran with "
                          "skip_batch=0 (see info['action_overridden'])", stacklevel=2)
            self._warned_override = True
        self._t += 1
        term = bool(terminated[0])
        trunc = bool(not term and self._t >= self.episode_steps)
        self._done = term or trunc
        self._obs = nxt[0]
        info = {"env_step": self._t, "action_overridden": overridden, "member": self._member,
                "loss_at_n": float(h["loss_at_n"][0]), "diverged_prob": float(h["diverged_prob"][0]),
                "instability_risk": float(h["instability_risk"][0]), "recovery_time": float(h["recovery_time"][0])}
        self._last = info
        return self._obs.copy(), float(rewards[0]), term, trunc, info

    def render(self):
        if self.render_mode is None:
            gym.logger.warn("render() called without a render_mode; pass render_mode='ansi'")
            return None
        if self._obs is None:
            raise RuntimeError("render() needs a reset env")
        last = self._last
        return (f"proxy step {self._t}/{self.episode_steps} | probe feature {self._obs[PROBE_INDEX]:.3f} | "
                f"p_div {last.get('diverged_prob', 0.0):.3f} | risk {last.get('instability_risk', 0.0):.2f}")
