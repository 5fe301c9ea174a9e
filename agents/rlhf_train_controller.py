"""Learn a controller for an RLHF run (STSO-RLHF-v0), then test it on held-out seeds and test prompts.

``python -m agents.train_controller --env STSO-RLHF-v0 [--scenario overoptimize] [--total-timesteps 80]
[--seed 0] [--eval-seeds 2] [--size default] [--run-name NAME] [--overwrite] [--no-progress]``

1. **prepare** the policy and the reward model (``agents.rlhf_prepare``; reused when cached);
2. **train MaskablePPO** (sb3-contrib) directly in the real env: every env step runs
   ``decision_interval`` GRPO steps of TRL, so the budget is small; episodes log to
   ``RUN/train/log_db.parquet`` and TensorBoard (``RUN/train/tb``, ``RUN/tb``), the policy goes to
   ``RUN/policy.zip``;
3. **evaluate** it against ``fixed`` and the adaptive KL controller on seeds from 2000 on (training
   resets draw from the seed given; the probe prompts feed the reward, the final score uses the
   test prompts) with ``agents.rlhf_evaluate`` into ``RUN/eval/``;
4. write ``RUN/report.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

EVAL_FIRST_SEED = 2000


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m agents.train_controller --env STSO-RLHF-v0",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--env", default="STSO-RLHF-v0", choices=("STSO-RLHF-v0",))
    p.add_argument("--algo", default="maskable_ppo", choices=("maskable_ppo",),
                   help="the learner (MaskablePPO in the real env)")
    p.add_argument("--scenario", default="overoptimize")
    p.add_argument("--size", default="default", choices=("default", "tiny"))
    p.add_argument("--prepared", default="runs/rlhf")
    p.add_argument("--total-timesteps", type=int, default=80,
                   help="env steps of PPO training (default 80: four episodes; SB3 rounds up to whole rollouts)")
    p.add_argument("--n-steps", type=int, default=20, help="PPO rollout length (default 20: one episode)")
    p.add_argument("--interval", type=int, default=8, help="decision interval in GRPO steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-seeds", type=int, default=2, help="held-out seeds per controller (default 2)")
    p.add_argument("--workers", type=int, default=2, help="evaluation worker processes of one thread (default 2)")
    p.add_argument("--runs-dir", default="runs/train-controller")
    p.add_argument("--run-name", default=None)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def learn(args: argparse.Namespace, run: Path) -> dict[str, Any]:
    """Step 2: MaskablePPO in the real env; saves ``run/policy.zip``."""
    import gymnasium as gym
    from sb3_contrib import MaskablePPO
    from stable_baselines3.common.env_util import make_vec_env

    import stso_env  # noqa: F401  (registers the env)

    kwargs = {"scenario": args.scenario, "size": args.size, "prepared": args.prepared,
              "decision_interval": args.interval, "run_dir": str(run / "train")}
    env = make_vec_env(lambda: gym.make("STSO-RLHF-v0", **kwargs), n_envs=1, seed=args.seed)
    n_steps = max(2, min(args.n_steps, args.total_timesteps))
    model = MaskablePPO("MlpPolicy", env, n_steps=n_steps, batch_size=max(2, n_steps // 2), n_epochs=5,
                        learning_rate=3e-4, gamma=0.95, ent_coef=0.01, seed=args.seed, device="cpu",
                        tensorboard_log=str(run / "tb"), verbose=0)
    t0 = time.perf_counter()
    model.learn(total_timesteps=args.total_timesteps, progress_bar=not args.no_progress, tb_log_name="maskable_ppo")
    model.save(str(run / "policy.zip"))
    env.close()
    return {"timesteps": int(model.num_timesteps), "seconds": time.perf_counter() - t0,
            "policy": str(run / "policy.zip")}


def main(argv: Sequence[str] | None = None) -> int:
    from agents import rlhf_evaluate
    from agents.train_controller import run_folder
    from stso_env.errors import ConfigError, STSOError
    from stso_env.files import write_text_atomic
    from stso_env.rlhf.config import load_prepare_config
    from stso_env.rlhf.prepare import prepare
    from stso_env.rlhf.scenario import load_rlhf_scenario

    args = parse_args(argv)
    t_all = time.perf_counter()
    try:
        load_rlhf_scenario(args.scenario)
        if args.total_timesteps < 2:
            raise ConfigError(f"--total-timesteps: need at least 2 env steps, got {args.total_timesteps}")
        name = args.run_name or f"STSO-RLHF-v0__maskable_ppo__{args.seed}__{int(time.time())}"
        run = run_folder(args.runs_dir, name, args.overwrite)
        print(f"run folder: {run}", file=sys.stderr)
        seconds: dict[str, float] = {}
        t0 = time.perf_counter()
        prepared = prepare(load_prepare_config(size=args.size), args.prepared, progress=not args.no_progress)
        seconds["prepare"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        rl = learn(args, run)
        seconds["policy"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        eval_argv = ["--scenarios", args.scenario, "--controllers", f"fixed,adaptive_kl,policy:{rl['policy']}",
                     "--seeds", str(args.eval_seeds), "--first-seed", str(EVAL_FIRST_SEED + args.seed),
                     "--size", args.size, "--prepared", args.prepared, "--interval", str(args.interval),
                     "--workers", str(args.workers),
                     "--out", str(run / "eval")] + (["--no-progress"] if args.no_progress else [])
        if rlhf_evaluate.main(eval_argv) != 0:
            raise STSOError("the evaluation of the learned policy failed (see the message above)")
        seconds["evaluation"] = time.perf_counter() - t0
        seconds["total"] = time.perf_counter() - t_all
        results = json.loads((run / "eval" / "results.json").read_text(encoding="utf-8"))
    except STSOError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    lines = [f"# {run.name}", "", f"STSO-RLHF-v0, scenario `{args.scenario}`, size `{args.size}`: MaskablePPO for "
             f"{rl['timesteps']} env steps ({rl['timesteps'] * args.interval} GRPO steps) in the real env, then "
             f"{args.eval_seeds} held-out seeds per controller.", "",
             f"Reward model held-out accuracy: {prepared['reward_model']['test_accuracy']:.3f}.", "",
             "Seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()), "",
             (run / "eval" / "report.md").read_text(encoding="utf-8").split("\n", 1)[1]]
    report = write_text_atomic(run / "report.md", "\n".join(lines))
    write_text_atomic(run / "summary.json", json.dumps({"rl": rl, "seconds": seconds, "m3": results["m3"]},
                                                       indent=1) + "\n")
    print(f"done in {seconds['total']:.0f}s: {rl['policy']}, {report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
