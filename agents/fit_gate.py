"""Fit the outcome gate of a learned policy on real runs: where does the policy beat the fixed schedule?

``python -m agents.fit_gate --policy runs/train-controller/policy.zip [--scenarios spiky,adam_v_lag]
[--seeds 3] [--window 1] [--corpus builtin,../shared/data/wikitext-2] --out runs/train-controller/gate.json``

For every corpus, scenario and seed: a real STSO-GPT2-v0 run trains ``--window`` windows under the neutral
action; the observation there is the gate's input. The run is then forked: one copy keeps the fixed
schedule to the end, the other plays the policy (unshielded, with its LR bounds) to the end. The
label is 1 where the policy's copy ends with the lower *probe* loss (the split controllers may
read; the validation and test splits are never touched). A logistic regression from the
observation to the label is the gate (:mod:`agents.controllers.outcome_gate`); ``LearnedPolicy``
reads it with the setting ``gate``.

Several corpora (a comma list) give one gate fitted on the runs of all of them: a gate fitted on one
corpus reads another's loss levels as a different state and can misfire there.

``--against tuned_fixed [--tuning-dir DIR]``: the gate of a policy that plays on top of
``tuned_fixed``'s LR (``tune_lr: true``). Each setting's sweep runs first (cached in ``DIR``, by
default ``tuning/`` beside ``--out``), both copies of every run start on the swept LR, and the
policy's copy keeps its LR bounds relative to it: the label says whether the policy beats
``tuned_fixed``, the question it is scored on.

Seeds default to 200000 and up: apart from the collection's (0 and up), ``make train``'s
evaluation (100000 and up) and the suites' (300000 and up).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from tqdm import tqdm

from stso_env.envs.gpt2_env import NEUTRAL_ACTION
from stso_env.errors import ConfigError, STSOError

NEUTRAL = np.asarray(NEUTRAL_ACTION, dtype=np.int64)


def play_to_end(env: Any, act: Any, obs: np.ndarray, info: dict[str, Any]) -> float:
    """Step ``env`` to the end of its run with ``act(obs, info)``; the last probe loss (``inf`` if it diverged)."""
    loss = float(info.get("probe_loss", math.inf))
    while True:
        obs, _, terminated, truncated, info = env.step(act(obs, info))
        loss = float(info.get("probe_loss", math.inf))
        if terminated or truncated:
            return loss if math.isfinite(loss) and not info.get("diverged", False) else math.inf


def gate_runs(policy: Path, scenarios: Sequence[str], seeds: Sequence[int], *, window: int, preset: str = "tiny",
              corpus: str | Sequence[str] = "builtin", episode_steps: int = 600, decision_interval: int = 10,
              builtin_chars: int | None = None, progress: bool = True, against: str = "fixed",
              tuning_dir: Path | None = None) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """The gate's training data: the observation after ``window`` neutral windows, one row per run, and
    per run the end probe loss of the fixed schedule and of the policy from there; ``corpus``: one corpus
    or several (every scenario and seed runs on each). ``against="tuned_fixed"``: every run starts on
    the LR of ``tuned_fixed``'s sweep (cached in ``tuning_dir``) and the policy plays on top of it."""
    import gymnasium as gym

    import stso_env  # noqa: F401  (registers the envs)
    from agents.controllers.learned import LearnedPolicy

    if window * decision_interval >= episode_steps:
        raise ConfigError(f"--window {window}: {window} windows of {decision_interval} steps leave nothing of a "
                          f"{episode_steps}-step run for the policy; lower it")
    from agents.controllers.outcome_gate import REFERENCES
    from stso_env.config import TrainConfig, apply_overrides

    if against not in REFERENCES:
        raise ConfigError(f"--against {against}: choose one of {', '.join(REFERENCES)}")
    tuned = against == "tuned_fixed"
    if tuned and tuning_dir is None:
        raise ConfigError("--against tuned_fixed needs a tuning directory (--tuning-dir) to cache the sweep in")

    config = TrainConfig()
    if builtin_chars is not None:
        config = apply_overrides(config, {"data.builtin_chars": builtin_chars})
    corpora = [corpus] if isinstance(corpus, str) else list(corpus)
    if not corpora:
        raise ConfigError("--corpus: name at least one corpus (builtin, a text file or folder, hf:...)")
    ctrl = LearnedPolicy(policy, shield=False, tune_lr=tuned, tuning_dir=tuning_dir)
    states, runs = [], []
    cases = [(c, sc, sd) for c in corpora for sc in scenarios for sd in seeds]
    bar = tqdm(total=len(cases), desc="gate runs", unit="run", file=sys.stderr, disable=not progress)
    for corpus_name, scenario, seed in cases:
        env = gym.make("STSO-GPT2-v0", preset=preset, scenario=scenario, corpus=corpus_name, config=config,
                       decision_interval=decision_interval, episode_steps=episode_steps).unwrapped
        obs, info = env.reset(seed=int(seed))
        if tuned:
            # the sweep's LR from the first step, as tuned_fixed plays it; the fork keeps it
            ctrl.tuner.reset(env, seed=int(seed), run_name=f"gate-{scenario}-{seed}")
        lr_scale = float(env.trainer.knobs.lr_scale)
        for _ in range(window):
            obs, _, terminated, truncated, info = env.step(NEUTRAL)
            if terminated or truncated:
                raise ConfigError(f"{corpus_name} {scenario} seed {seed}: the run ended within the gate's "
                                  f"{window} windows")
        fork = env.fork()
        try:
            fixed = play_to_end(fork, lambda o, i: NEUTRAL, obs, info)
        finally:
            fork.close()
        ctrl.reset(env, seed=int(seed), run_name=f"gate-{scenario}-{seed}")
        learned = play_to_end(env, ctrl.act, obs, info)
        env.close()
        states.append(np.asarray(obs, dtype=np.float64))
        runs.append({"corpus": corpus_name, "scenario": scenario, "seed": int(seed), "lr_scale": lr_scale,
                     "fixed_probe_loss": fixed, "policy_probe_loss": learned, "policy_wins": bool(learned < fixed)})
        bar.update(1)
        bar.set_postfix_str(f"{corpus_name} {scenario} {seed}: fixed {fixed:.3f}, policy {learned:.3f}")
    bar.close()
    return np.stack(states), runs


def runs_table(gate: Any, states: np.ndarray) -> list[str]:
    """The runs the gate was fitted on, as Markdown table lines, with the probability it gives each."""
    from stso_env.monitor.monitor import OBSERVATION_NAMES

    lines = [f"| corpus | scenario | seed | start LR scale | {gate.reference}: end probe loss | "
             "policy: end probe loss | policy wins | gate: P(policy wins) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r, x in zip(gate.runs, states):
        prob = gate.probability(np.asarray(x), OBSERVATION_NAMES)
        # gates written before runs named their corpus were fitted on one corpus, not named in the file
        # runs written before the start LR was recorded started on the schedule's own (x1)
        lines.append(f"| `{r.get('corpus', '?')}` | `{r['scenario']}` | {r['seed']} | x{r.get('lr_scale', 1.0):g} "
                     f"| {r['fixed_probe_loss']:.4f} "
                     f"| {r['policy_probe_loss']:.4f} "
                     f"| {'yes' if r['policy_wins'] else 'no'} | {prob:.2f} |")
    return lines


def write_report(gate: Any, out: Path, meta: dict[str, Any]) -> Path:
    """``gate.md`` beside the gate: the runs it was fitted on and what it says about each."""
    lines = ["# Outcome gate", "", f"Command: `{meta['command']}`  ", f"Commit: `{meta.get('commit')}`  ",
             f"Policy `{meta['policy']}` against {gate.reference_name}; the gate decides after {gate.window} "
             f"neutral windows; {meta['seconds']:.0f} s.", "", *runs_table(gate, meta["states"])]
    top = np.argsort(-np.abs(np.asarray(gate.coef)))[:5]
    if any(gate.coef):
        lines += ["", "Largest standardised coefficients: " + ", ".join(
            f"`{gate.features[i]}` {gate.coef[i]:+.3f}" for i in top if gate.coef[i] != 0) + "."]
    else:
        lines += ["", "Every run has the same label, so the gate is constant: always "
                      + ("open." if gate.intercept > 0 else "closed.")]
    path = out.with_suffix(".md")
    from stso_env.files import write_text_atomic

    write_text_atomic(path, "\n".join(lines) + "\n")
    return path


def fit_and_write(policy: Path, scenarios: Sequence[str], seeds: Sequence[int], out: Path, *, window: int,
                  command: str, c: float = 1.0, loss_levels: bool = True,
                  **run_settings: Any) -> tuple[Any, np.ndarray, Path]:
    """Run :func:`gate_runs`, fit the gate, write it to ``out`` and its report beside it (``run_settings``:
    the keyword arguments of :func:`gate_runs`; ``loss_levels=False``: the gate does not read the loss
    levels, :data:`~agents.controllers.outcome_gate.LOSS_LEVELS`); returns the gate, the states it was
    fitted on (every observation feature) and the report's path."""
    from agents.controllers.outcome_gate import fit_gate, gate_features
    from agents.evaluate import git_commit
    from stso_env.monitor.monitor import OBSERVATION_NAMES

    t0 = time.perf_counter()
    states, runs = gate_runs(policy, scenarios, seeds, window=window, **run_settings)
    wins = np.asarray([r["policy_wins"] for r in runs], dtype=np.int64)
    names = gate_features(OBSERVATION_NAMES, loss_levels)
    cols = [OBSERVATION_NAMES.index(n) for n in names]
    gate = fit_gate(states[:, cols], wins, names, window, runs, c=c, reference=run_settings.get("against", "fixed"))
    out.parent.mkdir(parents=True, exist_ok=True)
    gate.save(out)
    meta = {"policy": str(policy), "seconds": time.perf_counter() - t0, "states": states.tolist(),
            "command": command, **git_commit()}
    return gate, states, write_report(gate, out, meta)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m agents.fit_gate", description=__doc__.split("\n\n")[0])
    p.add_argument("--policy", required=True, help="policy.zip (agents.train_controller)")
    p.add_argument("--scenarios", default="spiky,adam_v_lag",
                   help="comma-separated scenarios (default: make train's collection scenarios)")
    p.add_argument("--seeds", type=int, default=3, help="runs per scenario")
    p.add_argument("--seed-offset", type=int, default=200_000, help="first seed (apart from collection and suites)")
    p.add_argument("--window", type=int, default=1, help="neutral windows before the gate decides")
    p.add_argument("--episode-steps", type=int, default=600, help="optimizer steps of a run")
    p.add_argument("--decision-interval", type=int, default=10, help="optimizer steps per env step")
    p.add_argument("--preset", default="tiny", help="GPT-2 preset")
    p.add_argument("--corpus", default="builtin",
                   help="corpus, or a comma list of corpora: one gate fitted on runs of each (builtin, a text "
                        "file or folder, hf:...)")
    p.add_argument("--builtin-chars", type=int, default=None, help="characters of the built-in corpus")
    p.add_argument("--c", type=float, default=1.0, help="inverse L2 strength of the logistic regression")
    p.add_argument("--no-loss-levels", dest="loss_levels", action="store_false",
                   help="the gate does not read the loss levels (loss, batch and probe loss and their EMAs), "
                        "which differ between corpora")
    p.add_argument("--against", default="fixed", choices=["fixed", "tuned_fixed"],
                   help="what the policy is compared with: the fixed schedule, or tuned_fixed (both copies start "
                        "on its swept LR and the policy plays on top of it, as with tune_lr: true)")
    p.add_argument("--tuning-dir", default=None,
                   help="cache of tuned_fixed's sweeps with --against tuned_fixed (default: tuning/ beside --out)")
    p.add_argument("--out", required=True, help="gate file to write (JSON); a .md report goes beside it")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.seeds < 1:
            raise ConfigError(f"--seeds {args.seeds}: need at least 1")
        if args.window < 1:
            raise ConfigError(f"--window {args.window}: at least 1 (the gate reads the state after that many windows)")
        if not (math.isfinite(args.c) and args.c > 0):
            raise ConfigError(f"--c {args.c}: a positive number (1.0 is scikit-learn's default)")
        policy = Path(args.policy)
        if not policy.is_file():
            raise ConfigError(f"--policy {policy}: no such file; train one with `python -m agents.train_controller`")
        scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
        corpora = [c.strip() for c in args.corpus.split(",") if c.strip()]
        seeds = [args.seed_offset + i for i in range(args.seeds)]
        _, _, report = fit_and_write(
            policy, scenarios, seeds, Path(args.out), window=args.window, c=args.c, loss_levels=args.loss_levels,
            command="python -m agents.fit_gate " + " ".join(sys.argv[1:] if argv is None else argv),
            preset=args.preset, corpus=corpora, episode_steps=args.episode_steps,
            decision_interval=args.decision_interval, builtin_chars=args.builtin_chars,
            progress=not args.no_progress, against=args.against,
            tuning_dir=None if args.against == "fixed" else Path(args.tuning_dir or Path(args.out).parent / "tuning"))
    except STSOError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report.read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
