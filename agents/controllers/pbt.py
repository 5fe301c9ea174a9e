"""Population based training over in-process forks of the main run (exploit / explore)."""

from __future__ import annotations

import copy
import functools
import math
import random
from typing import Any

import gymnasium as gym
import numpy as np

from agents.controllers.base import Controller
from stso_env.envs.gpt2_env import LR_SCALE_LIMITS, NEUTRAL_ACTION, WD_SCALES, GPT2Env


@functools.cache
def _ray_explore() -> Any:
    """Ray Tune's PBT explore function, or None without the ``distributed`` extra."""
    try:
        from ray.tune.schedulers.pbt import _explore
    except ImportError:
        return None
    return _explore


class PBT(Controller):
    """Population based training (Jaderberg et al., "Population Based Training of Neural Networks",
    arXiv 1711.09846, 2017) with the exploit/explore rules of Ray Tune's
    ``PopulationBasedTraining`` scheduler (``ray/tune/schedulers/pbt.py``). References:
    2017_Jaderberg_PBT, 2018_Liaw_Tune (``assets/related_work.md``).

    Population: ``population`` members; member 0 is the main run (the env the harness steps), the
    others are forks of it made in ``reset`` (``env.unwrapped.fork()``, same state, same
    constructor arguments, hence the main run's current ``episode_steps``). Every member trains the
    same number of windows in lockstep: ``act`` steps each live fork one env step with its own
    action and returns member 0's action for the harness. The forks' training FLOPs are counted in
    ``extra_flops``; ``main_run_share = 1 / population`` tells the harness to shorten every
    member's schedule so the whole population fits the shared FLOPs budget.

    Hyper-parameters per member: the LR scale (set directly as ``trainer.knobs.lr_scale``; the
    action's LR choice is then the neutral x1.0, so it holds) and the weight-decay choice (action
    dimension 1: x0.5 / x1 / x2). Member 0 starts from the configured schedule (scale 1.0, weight
    decay x1) so the population contains the baseline; the forks start from values drawn from a
    numpy Generator seeded with ``reset``'s seed: LR scale log-uniform in ``lr_scale_range``,
    weight-decay choice uniform.

    Every ``ready_windows`` windows (Ray's ``perturbation_interval``) members are ranked by their
    latest probe loss (``info["probe_loss"]``, lower is better; a diverged member ranks last). As in
    Ray's ``_quantiles``, ``n = ceil(population * quantile)`` members, at most ``population // 2``
    (so at least one once ``population >= 2``), form the bottom and top quantiles; members that
    terminated (diverged) are added to the bottom. **Exploit**: each bottom member copies the whole
    state (model, optimizer, schedule, sampler, RNGs, monitor) of a top member chosen uniformly
    (``_load_env_state(deepcopy(_env_state()))``, timed as ``io_seconds``). **Explore** (Ray's
    ``_explore``): each hyper-parameter of the copied configuration is, with probability
    ``resample_p``, resampled from its initial distribution; otherwise the LR scale is multiplied by
    0.8 or 1.2 and the weight-decay choice shifts one place left or right (clamped). When member 0
    is exploited, the main run continues the better lineage: its state is overwritten by the
    source's, recorded as a decision of kind ``"exploit"``; every exploit/explore is listed in
    ``events`` and summarised by ``describe()``.

    Ray Tune: the members are in-process forks stepped in lockstep, not Ray trials, so Ray Tune's
    ``PopulationBasedTraining`` cannot schedule them; when the ``distributed`` extra is installed,
    its explore step itself (``ray.tune.schedulers.pbt._explore``, with ``mutations`` = LR scale:
    a resampling function, weight decay: the list of choices) perturbs the copied configuration.
    Ray draws from the process-global ``random`` module, so the call runs with ``random`` seeded
    from this controller's generator and restored afterwards: runs stay reproducible from their
    seed. Without ray the same rules run on the generator directly. ``describe()["explore"]``
    says which ran.

    Settings (defaults follow Ray: quantile 0.25, resample probability 0.25, factors 0.8 / 1.2):
        population: members, main run included (default 4).
        ready_windows: windows between exploit/explore rounds (default 5).
        quantile: bottom/top quantile fraction (default 0.25).
        resample_p: probability of resampling a hyper-parameter instead of perturbing it (0.25).
        lr_scale_range: initial/resampling range of the LR scale, log-uniform (default 0.5..2).
    """

    name = "pbt"

    def __init__(self, population: int = 4, ready_windows: int = 5, quantile: float = 0.25,
                 resample_p: float = 0.25, lr_scale_range: tuple[float, float] = (0.5, 2.0)) -> None:
        super().__init__()
        if population < 1 or ready_windows < 1:
            raise ValueError(f"PBT: population={population}, ready_windows={ready_windows}: both must be >= 1 "
                             "(defaults 4 and 5)")
        if not 0 < quantile <= 0.5 or not 0 <= resample_p <= 1:
            raise ValueError(f"PBT: quantile={quantile} must be in (0, 0.5] and resample_p={resample_p} in "
                             "[0, 1] (defaults 0.25, 0.25)")
        lo, hi = (float(x) for x in lr_scale_range)
        if not LR_SCALE_LIMITS[0] <= lo <= hi <= LR_SCALE_LIMITS[1]:
            raise ValueError(f"PBT: lr_scale_range={lr_scale_range!r} must satisfy {LR_SCALE_LIMITS[0]} <= low "
                             f"<= high <= {LR_SCALE_LIMITS[1]}")
        self.population = int(population)
        self.ready_windows = int(ready_windows)
        self.quantile = float(quantile)
        self.resample_p = float(resample_p)
        self.lr_scale_range = (lo, hi)
        self.perturbation_factors = (0.8, 1.2)
        self.main_run_share = 1.0 / self.population
        self.members: list[GPT2Env] = []
        self.hparams: list[dict[str, Any]] = []
        self.initial_hparams: list[dict[str, Any]] = []
        self.latest: list[dict[str, Any]] = []
        self.done: list[bool] = []
        self.member_flops: list[float] = []
        self.events: list[dict[str, Any]] = []
        self.windows_since_ready = 0
        self.rng = np.random.default_rng(0)

    # ------------------------------------------------------------------ interface

    def reset(self, env: gym.Env, *, seed: int, run_name: str) -> None:
        self.close()
        super().reset(env, seed=seed, run_name=run_name)
        base = self.base
        self.rng = np.random.default_rng([int(seed), 0x9B7])
        self.members = [base]
        with self.timed_io():
            for _ in range(self.population - 1):
                child = base.fork()
                # fork() rebuilds from the constructor arguments; keep a schedule the harness shortened.
                child.episode_steps = base.episode_steps
                self.members.append(child)
        self.hparams = [{"lr_scale": float(base.trainer.knobs.lr_scale), "wd": 1}]
        self.hparams += [{"lr_scale": self._sample_lr(), "wd": int(self.rng.integers(len(WD_SCALES)))}
                         for _ in range(self.population - 1)]
        self.initial_hparams = copy.deepcopy(self.hparams)
        for i in range(1, self.population):
            self._apply_lr(i)
        self.latest = [dict(base._last_info) for _ in range(self.population)]
        self.done = [False] * self.population
        self.member_flops = [0.0] * self.population
        self.events = []
        self.windows_since_ready = 0

    def act(self, obs: np.ndarray, info: dict[str, Any]) -> np.ndarray:
        # Members are in lockstep here: the main run's latest window is ``info``, the forks' is theirs.
        self.latest[0] = info
        self.done[0] = bool(info.get("diverged", False))
        if self.population >= 2 and self.windows_since_ready >= self.ready_windows:
            self._exploit_explore()
            self.windows_since_ready = 0
        for i in range(1, self.population):
            if self.done[i]:
                continue
            _, _, terminated, truncated, finfo = self.members[i].step(self._action(i))
            self.extra_flops += float(finfo["flops"])
            self.member_flops[i] += float(finfo["flops"])
            self.latest[i] = finfo
            self.done[i] = bool(terminated or truncated)
        self.windows_since_ready += 1
        return self._action(0)

    def close(self) -> None:
        for child in self.members[1:]:
            child.close()
        self.members = self.members[:1]

    # ------------------------------------------------------------------ PBT steps

    def _action(self, i: int) -> np.ndarray:
        action = np.asarray(NEUTRAL_ACTION, dtype=np.int64)
        action[1] = self.hparams[i]["wd"]
        return action

    def _apply_lr(self, i: int) -> None:
        lo, hi = LR_SCALE_LIMITS
        self.hparams[i]["lr_scale"] = min(hi, max(lo, float(self.hparams[i]["lr_scale"])))
        self.members[i].trainer.knobs.lr_scale = self.hparams[i]["lr_scale"]

    def _sample_lr(self) -> float:
        lo, hi = self.lr_scale_range
        return float(math.exp(self.rng.uniform(math.log(lo), math.log(hi))))

    def _score(self, i: int) -> float:
        loss = float(self.latest[i].get("probe_loss", math.inf))
        diverged = bool(self.latest[i].get("diverged", False))
        return math.inf if diverged or not math.isfinite(loss) else loss

    def _quantiles(self) -> tuple[list[int], list[int]]:
        """(bottom, top) member indices: Ray's quantile sizes, diverged members added to the bottom."""
        scores = [self._score(i) for i in range(self.population)]
        order = sorted(range(self.population), key=lambda i: (scores[i], i))
        n = int(math.ceil(self.population * self.quantile))
        n = min(n, self.population // 2)
        top = [i for i in order[:n] if math.isfinite(scores[i])]
        worst = order[len(order) - n:]
        bottom = [i for i in order if (i in worst or not math.isfinite(scores[i])) and i not in top]
        return bottom, top

    def _explore(self, config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
        ray_explore = _ray_explore()
        if ray_explore is not None:
            mutations = {"lr_scale": self._sample_lr, "wd": list(range(len(WD_SCALES)))}
            outer = random.getstate()
            random.seed(int(self.rng.integers(2**63)))
            try:
                new, ops = ray_explore(dict(config), mutations, self.resample_p,
                                       tuple(self.perturbation_factors), None)
            finally:
                random.setstate(outer)
            new["lr_scale"] = float(new["lr_scale"])
            return new, {k: str(v) for k, v in ops.items()}
        new, ops = dict(config), {}
        if self.rng.random() < self.resample_p:
            new["lr_scale"], ops["lr_scale"] = self._sample_lr(), "resample"
        else:
            factor = float(self.perturbation_factors[int(self.rng.integers(2))])
            new["lr_scale"], ops["lr_scale"] = config["lr_scale"] * factor, f"x{factor}"
        if self.rng.random() < self.resample_p:
            new["wd"], ops["wd"] = int(self.rng.integers(len(WD_SCALES))), "resample"
        else:
            shift = -1 if self.rng.integers(2) == 0 else 1
            new["wd"] = min(max(config["wd"] + shift, 0), len(WD_SCALES) - 1)
            ops["wd"] = f"shift {'left' if shift < 0 else 'right'}"
        return new, ops

    def _exploit_explore(self) -> None:
        bottom, top = self._quantiles()
        if not top:
            return
        scores = [self._score(i) for i in range(self.population)]
        for target in bottom:
            source = top[int(self.rng.integers(len(top)))]
            with self.timed_io():
                self.members[target]._load_env_state(copy.deepcopy(self.members[source]._env_state()))
            self.latest[target] = copy.deepcopy(self.latest[source])
            self.done[target] = self.done[source]
            self.hparams[target], ops = self._explore(self.hparams[source])
            self._apply_lr(target)
            event = {"global_step": int(self.base.trainer.global_step), "target": target, "source": source,
                     "target_score": scores[target], "source_score": scores[source],
                     "hparams": dict(self.hparams[target]), "explore": ops}
            self.events.append(event)
            if target == 0:
                self.record("exploit", self._action(0),
                            f"PBT: main run (probe {scores[0]:.4f}) copies member {source} (probe "
                            f"{scores[source]:.4f}); explore lr_scale {ops['lr_scale']} -> "
                            f"{self.hparams[0]['lr_scale']:.3f}, wd {ops['wd']} -> x{WD_SCALES[self.hparams[0]['wd']]}")

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(), "population": self.population, "ready_windows": self.ready_windows,
            "quantile": self.quantile, "resample_p": self.resample_p, "lr_scale_range": list(self.lr_scale_range),
            "perturbation_factors": list(self.perturbation_factors), "initial_hparams": self.initial_hparams,
            "final_hparams": self.hparams, "exploits": len(self.events),
            "main_exploits": sum(e["target"] == 0 for e in self.events),
            "explore": "ray.tune.schedulers.pbt._explore" if _ray_explore() is not None else "numpy re-implementation",
        }
