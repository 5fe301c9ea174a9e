"""Population based training over forks of the main run (exploit / explore), in this process or on Ray."""

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


class _Member:
    """A population member in a Ray actor: the main run's fork, rebuilt there from its constructor arguments
    and state (:meth:`GPT2Env.from_state`), stepped with the driver's torch thread count."""

    def __init__(self, env_kwargs: dict[str, Any], state: dict[str, Any], episode_steps: int,
                 warned_override: Any, threads: int) -> None:
        from stso_env.eval.engine import set_threads

        set_threads(threads)
        self.env = GPT2Env.from_state(env_kwargs, state)
        self.env.episode_steps = episode_steps
        self.env._warned_override = warned_override

    def step(self, action: np.ndarray) -> tuple[dict[str, Any], bool]:
        _, _, terminated, truncated, info = self.env.step(action)
        return info, bool(terminated or truncated)

    def set_lr_scale(self, value: float) -> None:
        self.env.trainer.knobs.lr_scale = value

    def state(self) -> dict[str, Any]:
        return self.env._env_state()

    def load_state(self, state: dict[str, Any]) -> None:
        self.env._load_env_state(copy.deepcopy(state))  # a task's arrays are read-only

    def where(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def close(self) -> None:
        self.env.close()


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

    Ray: with ``ray_address`` (a running cluster, ``host:port`` of its head; ``agents.evaluate
    --ray-address`` passes it) the forks live in Ray actors placed round robin over the cluster's
    nodes, starting after the main run's (they hold no CPU, so a population larger than the cluster
    still runs), each rebuilt from the main run's state and stepped with this process's torch thread
    count; every window steps them in parallel and the results are taken in member order, and an
    exploit moves the whole state between actors (or to the main run). Results equal the in-process
    population's exactly. A process already connected to Ray (a Ray worker running an evaluation job)
    keeps its connection.

    Ray Tune: the members are forks stepped in lockstep, not Ray trials, so Ray Tune's
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
        ray_address: run the forks as Ray actors on this cluster (default None: in this process).
    """

    name = "pbt"

    def __init__(self, population: int = 4, ready_windows: int = 5, quantile: float = 0.25,
                 resample_p: float = 0.25, lr_scale_range: tuple[float, float] = (0.5, 2.0),
                 ray_address: str | None = None) -> None:
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
        if ray_address is not None and (not isinstance(ray_address, str) or not ray_address.strip()):
            raise ValueError(f"PBT: ray_address={ray_address!r} must be a Ray cluster address such as "
                             "'10.0.0.1:6379' (or None for in-process members)")
        self.ray_address = ray_address
        self.population = int(population)
        self.ready_windows = int(ready_windows)
        self.quantile = float(quantile)
        self.resample_p = float(resample_p)
        self.lr_scale_range = (lo, hi)
        self.perturbation_factors = (0.8, 1.2)
        self.main_run_share = 1.0 / self.population
        self.members: list[Any] = []  # the main run, then forks (GPT2Env) or their Ray actors
        self.member_nodes: list[str] = []  # Ray node of each fork's actor
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
            if self.ray_address is not None:
                self.members += self._ray_members(base)
            else:
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
        live = [i for i in range(1, self.population) if not self.done[i]]
        if self.ray_address is not None:  # all in parallel, results taken in member order
            import ray

            outcomes = ray.get([self.members[i].step.remote(self._action(i)) for i in live])
        else:
            outcomes = []
            for i in live:
                _, _, terminated, truncated, finfo = self.members[i].step(self._action(i))
                outcomes.append((finfo, bool(terminated or truncated)))
        for i, (finfo, ended) in zip(live, outcomes):
            self.extra_flops += float(finfo["flops"])
            self.member_flops[i] += float(finfo["flops"])
            self.latest[i] = finfo
            self.done[i] = ended
        self.windows_since_ready += 1
        return self._action(0)

    def close(self) -> None:
        children = self.members[1:]
        self.members = self.members[:1]
        if children and self.ray_address is not None:
            import ray

            try:
                ray.get([actor.close.remote() for actor in children])
            finally:
                for actor in children:
                    ray.kill(actor)
            return
        for child in children:
            child.close()

    # ------------------------------------------------------------------ members on Ray

    def _ray_members(self, base: GPT2Env) -> list[Any]:
        """The forks as Ray actors on the cluster at ``ray_address``, built from the main run's state."""
        import torch

        from stso_env.eval.engine import ray_init

        try:
            import ray
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        except ImportError as err:
            raise ImportError(f"PBT: ray_address={self.ray_address!r} needs Ray (the `distributed` extra: "
                              "pip install -e '.[distributed]')") from err

        threads = torch.get_num_threads()  # what in-process members would train with: the same results
        ray_init(self.ray_address, threads=threads)
        # Round robin over the nodes with CPUs, starting after this process's node (which trains the main
        # run). The actors hold no CPU (a population larger than the cluster's CPUs must not wait forever),
        # and Ray's SPREAD does not spread actors that hold nothing, so each is pinned to its node (a soft
        # pin falls back to another node while the target is still returning a task's CPU).
        nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0)
        here = ray.get_runtime_context().get_node_id()
        start = nodes.index(here) + 1 if here in nodes else 0
        state = ray.put(base._env_state())
        members = []
        for k in range(self.population - 1):
            where = NodeAffinitySchedulingStrategy(nodes[(start + k) % len(nodes)], soft=False) if nodes else None
            actor = ray.remote(_Member).options(num_cpus=0, scheduling_strategy=where)
            members.append(actor.remote(base._kwargs, state, base.episode_steps, base._warned_override, threads))
        self.member_nodes = ray.get([m.where.remote() for m in members])  # also waits until they are built
        return members

    def _copy_state(self, source: int, target: int) -> None:
        """Member ``target`` becomes a copy of member ``source`` (whole state)."""
        if self.ray_address is None:
            self.members[target]._load_env_state(copy.deepcopy(self.members[source]._env_state()))
            return
        import ray

        state = self.base._env_state() if source == 0 else self.members[source].state.remote()
        if target == 0:
            self.base._load_env_state(copy.deepcopy(ray.get(state)))  # arrays from Ray are read-only
        else:
            ray.get(self.members[target].load_state.remote(state))

    # ------------------------------------------------------------------ PBT steps

    def _action(self, i: int) -> np.ndarray:
        action = np.asarray(NEUTRAL_ACTION, dtype=np.int64)
        action[1] = self.hparams[i]["wd"]
        return action

    def _apply_lr(self, i: int) -> None:
        lo, hi = LR_SCALE_LIMITS
        self.hparams[i]["lr_scale"] = min(hi, max(lo, float(self.hparams[i]["lr_scale"])))
        if i and self.ray_address is not None:  # an actor runs its calls in the order they were made
            self.members[i].set_lr_scale.remote(self.hparams[i]["lr_scale"])
        else:
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
                self._copy_state(source, target)
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
            "members": "ray" if self.ray_address is not None else "in-process",
            "explore": "ray.tune.schedulers.pbt._explore" if _ray_explore() is not None else "numpy re-implementation",
        }
