"""Collect exploratory STSO-GPT2-v0 episodes into a run's log database.

``python -m agents.collect --episodes 8 --run-dir runs/collect [--scenario spiky,calm] [--policy mixed]``

Every env step lands in ``RUN_DIR/log_db.parquet`` through the env's own
:class:`~stso_env.proxy.logdb.LogDB` (``run_dir=RUN_DIR``), the data the proxy
world model is trained on (``agents.train_proxy``).

Policies (chosen per episode):

* ``random``: every dimension uniformly over the choices ``env.action_masks()``
  allows, independently each step;
* ``perturbed``: the neutral schedule ``[2, 1, 0, 0, 0, 0]``; with probability
  ``PERTURB_RATE`` per step a random valid action starts and is held for 1 to
  ``PERTURB_MAX_HOLD`` steps, so the log shows both steady training and the
  after-effects of a sustained intervention;
* ``mixed``: ``random`` on even episode numbers, ``perturbed`` on odd ones;
* ``learned`` (with ``--policy-path``): a saved policy (``policy.zip`` of ``agents.train_controller``)
  *samples* each action from its distribution over the choices the masks allow, with a numpy
  generator seeded per episode (the global torch RNG, which the training run uses, stays untouched),
  and with the LR drift bounded as ``agents.controllers.learned.LearnedPolicy`` bounds it: the data
  of a model-based iteration (collect with the current policy, refit the proxy, learn on), from the
  states the policy reaches, with the exploration of its own stochastic policy.

Numbering and resume: episode number ``k`` (the ``episode`` column, counted
over the whole log) runs with seed ``--seed + k``, scenario
``scenarios[k % len(scenarios)]`` and, for ``mixed``, the policy of ``k``.
When the log database already exists, its rows are read and collection
continues with ``k = max(episode) + 1``; ``--episodes`` is the number of
episodes *added* by this call. The env counts episodes from its private
``_episode`` field (-1 before the first reset, +1 per reset); the collector
sets it to ``k - 1`` before each reset so logged numbers continue the log
instead of restarting at 0, and checks afterwards that no ``(run_id,
episode)`` pair was written twice. A log database written with another schema
is refused before anything runs (exit code 2).

Parallel: ``--workers N`` runs episodes in N processes (``stso_env.eval.engine``), each with
``--threads`` torch threads (default: the cores shared out, at least 1). An episode depends on its
number alone and the log is read in episode order, so the rows equal those of a serial collection
with the same thread count (test); a different thread count changes the floating-point sums, so
two threads in one process and one thread in each of two workers log slightly different losses.
``make bench``'s ``collect`` benchmark measures the speed-up.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from tqdm import tqdm

from stso_env.errors import ConfigError, DataError, STSOError

NEUTRAL = np.array([2, 1, 0, 0, 0, 0], dtype=np.int64)
PERTURB_RATE = 0.25  # chance per step that a perturbation starts (when none is held)
PERTURB_MAX_HOLD = 4  # env steps a perturbation is held at most
POLICIES = ("random", "perturbed", "mixed", "learned")


def random_valid_action(rng: np.random.Generator, nvec: Sequence[int], mask: np.ndarray) -> np.ndarray:
    """One action drawn uniformly per dimension over the choices the flat ``mask`` allows."""
    out = np.zeros(len(nvec), dtype=np.int64)
    offset = 0
    for d, n in enumerate(nvec):
        allowed = np.flatnonzero(mask[offset:offset + n])
        if allowed.size == 0:
            raise ConfigError(f"action_masks(): dimension {d} has no allowed choice; the env's mask is broken")
        out[d] = rng.choice(allowed)
        offset += n
    return out


class PerturbedSchedule:
    """The neutral action with random valid perturbations held for a few steps (see the module docstring)."""

    def __init__(self, rng: np.random.Generator, nvec: Sequence[int]) -> None:
        self.rng = rng
        self.nvec = tuple(nvec)
        self._held: np.ndarray | None = None
        self._left = 0

    def __call__(self, mask: np.ndarray) -> np.ndarray:
        if self._left <= 0 and self.rng.random() < PERTURB_RATE:
            self._held = random_valid_action(self.rng, self.nvec, mask)
            self._left = int(self.rng.integers(1, PERTURB_MAX_HOLD + 1))
        if self._left > 0 and self._held is not None:
            self._left -= 1
            return self._held.copy()
        return NEUTRAL.copy()


class PolicySampler:
    """Actions sampled from a saved SB3 policy's distribution (the ``learned`` policy of the module docstring)."""

    def __init__(self, policy_path: str | Path) -> None:
        from agents.controllers.learned import LR_BOUNDS, load_policy, policy_algorithm

        try:
            self.masked = policy_algorithm(policy_path) == "maskable_ppo"
            self.model = load_policy(policy_path)
        except (FileNotFoundError, ValueError) as exc:
            raise ConfigError(f"--policy-path: {exc}") from None
        self.lr_bounds = LR_BOUNDS
        self.bounded = 0

    def probabilities(self, obs: np.ndarray, mask: np.ndarray) -> list[np.ndarray]:
        """Per action dimension, the policy's probability of each choice at ``obs``, zero where masked."""
        import torch

        policy = self.model.policy
        with torch.no_grad():
            obs_t, _ = policy.obs_to_tensor(np.asarray(obs, dtype=np.float32))
            dist = (policy.get_distribution(obs_t, action_masks=mask.reshape(1, -1)) if self.masked
                    else policy.get_distribution(obs_t))
            # sb3-contrib's masked distribution keeps its per-dimension Categoricals in ``distributions``
            parts = dist.distributions if self.masked else dist.distribution
            probs = [d.probs[0].double().numpy() for d in parts]
        out, offset = [], 0
        for p in probs:
            q = p * mask[offset:offset + len(p)]
            offset += len(p)
            if q.sum() <= 0:
                raise ConfigError("learned policy: it gives no probability to any allowed choice of a dimension")
            out.append(q / q.sum())
        return out

    def __call__(self, rng: np.random.Generator, obs: np.ndarray, mask: np.ndarray, lr_scale: float) -> np.ndarray:
        from agents.controllers.learned import bound_lr_change

        action = np.array([rng.choice(len(p), p=p) for p in self.probabilities(obs, mask)], dtype=np.int64)
        action, bounded = bound_lr_change(action, lr_scale, self.lr_bounds)
        self.bounded += int(bounded)
        return action


def episode_policy(policy: str, k: int) -> str:
    """The concrete policy of episode number ``k``."""
    if policy == "mixed":
        return "random" if k % 2 == 0 else "perturbed"
    return policy


def existing_episodes(log_db: Path) -> tuple[int, int]:
    """``(next episode number, rows already there)`` of a log database; ``(0, 0)`` when there is none.

    Opening a :class:`LogDB` on the folder runs its schema check, so a database written with
    another schema raises :class:`DataError` here, before any training starts.
    """
    from stso_env.monitor.monitor import OBSERVATION_NAMES
    from stso_env.proxy.logdb import LogDB, read_log_db

    if not log_db.exists():
        return 0, 0
    LogDB(log_db, observation_names=OBSERVATION_NAMES)  # validates only; writes nothing without rows
    if not any(log_db.glob("part-*.parquet")):
        return 0, 0
    table = read_log_db(log_db)
    if table.num_rows == 0:
        return 0, 0
    episodes = table.column("episode").to_numpy()
    return int(episodes.max()) + 1, int(table.num_rows)


def check_no_collisions(log_db: Path) -> None:
    """Refuse a log where one ``(run_id, episode, env_step)`` occurs twice (episodes were renumbered)."""
    from stso_env.proxy.logdb import read_log_db

    t = read_log_db(log_db)
    keys = list(zip(t.column("run_id").to_pylist(), t.column("episode").to_pylist(),
                    t.column("env_step").to_pylist()))
    if len(set(keys)) != len(keys):
        raise DataError(f"{log_db}: some (run_id, episode, env_step) rows occur twice; the episode numbering "
                        "collided, collect into a new --run-dir")


@dataclass(frozen=True)
class EpisodeJob:
    """One collected episode: everything :func:`run_episode` needs, picklable for a worker process."""

    k: int
    scenario: str
    kind: str
    seed: int
    run_dir: str
    corpus: str
    preset: str
    episode_steps: int
    decision_interval: int
    builtin_chars: int | None = None
    policy_path: str | None = None


def _episode_env(job: EpisodeJob, cache: dict[str, Any]):
    """The job's env, reused across jobs of one scenario in this process (they log into one run folder)."""
    from stso_env.config import TrainConfig, apply_overrides
    from stso_env.envs.gpt2_env import GPT2Env

    if job.scenario not in cache:
        config = TrainConfig()
        if job.builtin_chars is not None:
            config = apply_overrides(config, {"data.builtin_chars": job.builtin_chars})
        cache[job.scenario] = GPT2Env(preset=job.preset, scenario=job.scenario, corpus=job.corpus,
                                      decision_interval=job.decision_interval, episode_steps=job.episode_steps,
                                      run_dir=job.run_dir, config=config)
    return cache[job.scenario]


def run_episode(job: EpisodeJob, envs: dict[str, Any], sampler: PolicySampler | None = None,
                on_step: Callable[[], None] | None = None) -> dict[str, int]:
    """Run episode ``job.k`` into ``job.run_dir/log_db.parquet`` on the scenario's env in ``envs`` (created
    there when missing; the caller closes them); returns its env steps, divergences and bounded LR changes."""
    from stso_env.envs.gpt2_env import ACTION_NVEC

    if job.kind == "learned" and sampler is None:
        sampler = PolicySampler(job.policy_path)
    bounded_before = sampler.bounded if sampler is not None else 0
    steps = divergences = 0
    env = _episode_env(job, envs)
    env._episode = job.k - 1  # reset() increments it: the logged episode number is k
    obs, _ = env.reset(seed=job.seed + job.k)
    rng = np.random.default_rng([job.seed, job.k])
    schedule = PerturbedSchedule(rng, ACTION_NVEC)
    done = False
    while not done:
        mask = env.action_masks()
        if job.kind == "random":
            action = random_valid_action(rng, ACTION_NVEC, mask)
        elif job.kind == "learned":
            action = sampler(rng, obs, mask, env.trainer.knobs.lr_scale)
        else:
            action = schedule(mask)
        obs, _, terminated, truncated, info = env.step(action)
        steps += 1
        divergences += int(info["diverged"])
        if on_step is not None:
            on_step()
        done = terminated or truncated
    return {"env_steps": steps, "divergences": divergences,
            "bounded": (sampler.bounded - bounded_before) if sampler is not None else 0}


def _episode_in_worker(job: EpisodeJob) -> dict[str, int]:
    """A worker process's job: the episode on an env of its own, closed (its rows flushed) before returning."""
    envs: dict[str, Any] = {}
    try:
        return run_episode(job, envs)
    finally:
        for env in envs.values():
            env.close()


def collect(*, episodes: int, run_dir: Path, scenarios: list[str], corpus: str, seed: int, episode_steps: int,
            decision_interval: int, policy: str, preset: str = "tiny", builtin_chars: int | None = None,
            policy_path: str | Path | None = None, progress: bool = True, workers: int = 1,
            threads: int | None = None) -> dict[str, Any]:
    """Run ``episodes`` new episodes into ``run_dir/log_db.parquet``; returns the summary. ``policy_path``:
    the saved policy of the ``learned`` policy (required with it, refused without).

    ``workers`` > 1 runs episodes in that many processes (``stso_env.eval.engine``, ``threads`` torch
    threads each, by default the cores shared out); each episode depends on its number alone, and the
    log is read in episode order, so the rows equal a serial collection with the same thread count.
    ``workers`` 1 runs here with the process's own thread setting."""
    if policy not in POLICIES:
        raise ConfigError(f"policy: {policy!r} is not one of {', '.join(POLICIES)}")
    if (policy == "learned") != (policy_path is not None):
        raise ConfigError("policy 'learned' needs --policy-path (a policy.zip of agents.train_controller), and "
                          "--policy-path needs policy 'learned'")
    if workers < 1:
        raise ConfigError(f"workers: must be >= 1, got {workers}")
    if threads is not None and threads < 1:
        raise ConfigError(f"threads: must be >= 1, got {threads}")
    if threads is not None and workers == 1:
        raise ConfigError("threads: sets the torch threads of worker processes, and workers is 1 (episodes run in "
                          "this process with its own threads); give workers > 1, or set OMP_NUM_THREADS instead")
    sampler = PolicySampler(policy_path) if policy_path is not None else None
    from stso_env.eval.engine import run_jobs
    from stso_env.proxy.logdb import read_log_db

    log_db = run_dir / "log_db.parquet"
    first, rows_before = existing_episodes(log_db)
    jobs = [EpisodeJob(k=k, scenario=scenarios[k % len(scenarios)], kind=episode_policy(policy, k), seed=seed,
                       run_dir=str(run_dir), corpus=corpus, preset=preset, episode_steps=episode_steps,
                       decision_interval=decision_interval, builtin_chars=builtin_chars,
                       policy_path=None if policy_path is None else str(policy_path))
            for k in range(first, first + episodes)]
    per_episode = max(1, math.ceil((episode_steps - decision_interval) / decision_interval))
    steps = divergences = bounded = 0
    bar = tqdm(total=episodes * per_episode, desc=f"collect x{workers}" if workers > 1 else "collect",
               unit="step", file=sys.stderr, disable=not progress)
    envs: dict[str, Any] = {}
    try:
        if workers == 1:
            results = ((job, run_episode(job, envs, sampler, on_step=lambda: bar.update(1))) for job in jobs)
        else:
            results = run_jobs(_episode_in_worker, jobs, workers=workers, threads=threads, engine="local")
        for job, out in results:
            steps += out["env_steps"]
            divergences += out["divergences"]
            bounded += out["bounded"]
            if workers > 1:
                bar.update(out["env_steps"])
            bar.set_postfix(episode=job.k, divergences=divergences)
    finally:
        bar.close()
        for env in envs.values():
            env.close()
    if steps:
        check_no_collisions(log_db)
    rows = read_log_db(log_db).num_rows if log_db.exists() and any(log_db.glob("part-*.parquet")) else 0
    return {"episodes": episodes, "first_episode": first, "env_steps": steps, "rows_before": rows_before,
            "rows": rows, "divergences": divergences, "log_db": str(log_db), "policy": policy,
            "lr_changes_bounded": None if sampler is None else bounded, "workers": workers}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m agents.collect", description=__doc__.split("\n\n")[0])
    p.add_argument("--episodes", type=int, required=True, help="episodes to add in this call")
    p.add_argument("--run-dir", required=True, help="run folder; rows go to RUN_DIR/log_db.parquet")
    p.add_argument("--scenario", default="spiky", help="scenario name or YAML path; a comma list is cycled")
    p.add_argument("--corpus", default="builtin", help="corpus (builtin, a text file/folder, hf:...)")
    p.add_argument("--preset", default="tiny", help="GPT-2 preset (default tiny)")
    p.add_argument("--seed", type=int, default=0, help="episode k runs with seed SEED + k")
    p.add_argument("--episode-steps", type=int, default=200, help="optimizer steps per episode")
    p.add_argument("--decision-interval", type=int, default=10, help="optimizer steps per env step")
    p.add_argument("--policy", choices=POLICIES, default="mixed", help="exploration policy (default mixed)")
    p.add_argument("--policy-path", default=None,
                   help="policy.zip that the 'learned' policy samples from (agents.train_controller's)")
    p.add_argument("--builtin-chars", type=int, default=None,
                   help="characters of the built-in corpus (smaller starts faster; default from TrainConfig)")
    p.add_argument("--workers", type=int, default=1,
                   help="episodes run in parallel processes (default %(default)s: here, with this process's threads)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per worker with --workers > 1 (default: cores // workers, at least 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    try:
        if args.episodes < 1:
            raise ConfigError(f"--episodes: must be >= 1, got {args.episodes}")
        if args.decision_interval < 1 or args.episode_steps < 2 * args.decision_interval:
            raise ConfigError(f"--episode-steps {args.episode_steps} / --decision-interval "
                              f"{args.decision_interval}: need episode steps >= 2 x decision interval >= 2 "
                              "(reset runs one window, every logged env step another)")
        scenarios = [s.strip() for s in args.scenario.split(",") if s.strip()]
        if not scenarios:
            raise ConfigError("--scenario: give at least one scenario name, e.g. spiky or spiky,calm")
        summary = collect(episodes=args.episodes, run_dir=Path(args.run_dir), scenarios=scenarios,
                          corpus=args.corpus, seed=args.seed, episode_steps=args.episode_steps,
                          decision_interval=args.decision_interval, policy=args.policy, preset=args.preset,
                          builtin_chars=args.builtin_chars, policy_path=args.policy_path,
                          progress=not args.no_progress, workers=args.workers, threads=args.threads)
    except STSOError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"collected {summary['episodes']} episodes (numbers {summary['first_episode']}.."
          f"{summary['first_episode'] + summary['episodes'] - 1}), {summary['env_steps']} env steps, "
          f"{summary['divergences']} divergences; {summary['log_db']} now has {summary['rows']} rows "
          f"(was {summary['rows_before']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
