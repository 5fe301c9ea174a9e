"""Build the policy and the reward model that an RLHF fine-tune starts from, offline.

``python -m agents.rlhf_prepare [--out DIR] [--seed N] [--config YAML] [--size default|tiny] [--no-progress]``

Pre-trains a small GPT-2 policy on the built-in corpus with the project's trainer, makes
preference pairs from the built-in grammar, trains a reward model on them with TRL's
``RewardTrainer`` and measures both (:mod:`stso_env.rlhf.prepare`). Folders are cached
under ``OUT`` by a hash of their settings and reused by a later call with the same
settings. Prints a JSON summary (folders, the reward model's accuracy on held-out
pairs, the gold score of the policy's greedy completions, seconds) and writes it to
``OUT/summary.json``. A bad config value stops the program with exit code 2 and a
message naming the key. The default size takes a few minutes on two CPU cores.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from stso_env.errors import STSOError
from stso_env.files import write_text_atomic


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m agents.rlhf_prepare", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/rlhf", help="cache folder for the policy and the reward model, and "
                   "where summary.json goes (default runs/rlhf)")
    p.add_argument("--seed", type=int, default=None, help="seed (overrides the config's seed)")
    p.add_argument("--config", default=None, help="YAML file with values of RLHFPrepareConfig (stso_env.rlhf.config)")
    p.add_argument("--size", default="default", choices=("default", "tiny"),
                   help="base size the YAML file overrides (default %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    try:
        from stso_env.rlhf.config import load_prepare_config
        from stso_env.rlhf.prepare import prepare

        overrides = {"seed": args.seed} if args.seed is not None else None
        cfg = load_prepare_config(args.config, size=args.size, overrides=overrides)
        out = Path(args.out).expanduser()
        summary = prepare(cfg, out, progress=not args.no_progress)
        text = json.dumps(summary, indent=2)
        write_text_atomic(out / "summary.json", text + "\n")
    except STSOError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(text)
    print(f"reward model: {summary['reward_model']['test_accuracy']:.3f} held-out pair accuracy; policy gold score "
          f"{summary['policy_gold']['mean']:.3f}; {summary['seconds']:.0f} s on {summary['threads']} thread(s); "
          f"summary in {out / 'summary.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
