"""Monitored GPT-2 pre-training from the command line.

    python -m stso_env.train --preset tiny --steps 2000 --run-dir runs/demo \\
        --checkpoint-every 500 --seed 0 --scenario spiky [--corpus builtin|PATH] [--resume]

Writes into ``--run-dir``:

* ``config.yaml``: the resolved configuration;
* ``checkpoints/cp_{step}.ptz`` (+ ``seed_manifest.json``): quantum checkpoints;
* ``metrics.jsonl``: one JSON object per optimizer step (``"kind": "step"``)
  and per validation (``"kind": "eval"``).

``--resume`` continues from the newest intact checkpoint in the run folder
(damaged newer ones are skipped with a warning) and drops metric rows past it,
so the metrics file matches the resumed trajectory. A ``--config`` YAML file
gives every setting; command-line flags override it.

Data-parallel on several processes, with the same arguments (``data.batch_size`` is the
global batch; gloo on CPU, NCCL on GPUs; :mod:`stso_env.train.distributed`)::

    torchrun --nproc-per-node 2 -m stso_env.train --preset tiny --steps 200 --run-dir runs/ddp

Every rank trains; rank 0 alone writes the run folder (config, metrics, checkpoints with every
rank's RNG state). A resume must use the same number of processes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from stso_env import cp
from stso_env.config import TrainConfig, apply_overrides, config_hash, load_config, to_dict
from stso_env.errors import STSOError
from stso_env.train.distributed import init_from_env, shutdown
from stso_env.train.trainer import Trainer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m stso_env.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file with a TrainConfig (flags below override it)")
    p.add_argument("--preset", help="model preset: GPT-2 tiny, bench10m, small, medium, large; T5 t5-tiny, "
                   "t5-small, t5-base")
    p.add_argument("--steps", type=int, help="optimizer steps of the whole run")
    p.add_argument("--run-dir", required=True, help="output folder (created if missing)")
    p.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (0: only the final one)")
    p.add_argument("--keep", type=int, help="checkpoints kept (>= 2)")
    p.add_argument("--quantize", choices=("none", "int8", "bf16"), help="Adam moment storage in checkpoints")
    p.add_argument("--seed", type=int, help="run seed")
    p.add_argument("--scenario", help="instability scenario: calm, spiky, edge or a YAML path")
    p.add_argument("--corpus", help="'builtin', a text file or folder, or 'hf:<dataset>[:<config>]'")
    p.add_argument("--tokenizer", help="'byte', a folder with vocab.json+merges.txt, or 'hf:<id>'")
    p.add_argument("--precision", choices=("fp32", "bf16"), help="bf16 = bf16 autocast")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"))
    p.add_argument("--eval-every", type=int, default=0, help="steps between validations (0: at the end only)")
    p.add_argument("--resume", action="store_true", help="continue from the newest intact checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="start from step 0 in a run folder that already has checkpoints (deletes them)")
    p.add_argument("--gradient-checkpointing", action="store_true", default=None,
                   help="activation checkpointing (model.gradient_checkpointing): less memory, more compute")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the training passes (a speed option for GPUs; not bit-identical to eager)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def build_config(args: argparse.Namespace) -> TrainConfig:
    cfg = load_config(TrainConfig, args.config) if args.config else TrainConfig()
    flags = {
        "model.preset": args.preset, "steps": args.steps, "checkpoint.every": args.checkpoint_every,
        "checkpoint.keep": args.keep, "checkpoint.quantize": args.quantize, "seed": args.seed,
        "scenario": args.scenario, "data.corpus": args.corpus, "data.tokenizer": args.tokenizer,
        "precision": args.precision, "device": args.device,
        "model.gradient_checkpointing": args.gradient_checkpointing,
    }
    return apply_overrides(cfg, {k: v for k, v in flags.items() if v is not None})


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep only metric rows of steps before ``step`` (rows past a resume point belong to a lost future)."""
    if not path.exists():
        return
    kept = []
    with path.open("r", encoding="utf-8") as fh:
        for line in fh:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a half-written last line from a killed run
            if row.get("step", 0) < step:
                kept.append(line if line.endswith("\n") else line + "\n")
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    os.replace(tmp, path)


def _json_row(row: dict) -> str:
    # JSON has no inf/nan: write them as null so every reader can parse the file.
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
    return json.dumps(clean, separators=(",", ":")) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = build_config(args)
        world = init_from_env(cfg.device)
        try:
            return _train(args, cfg, world.is_main)
        finally:
            shutdown()
    except STSOError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _train(args: argparse.Namespace, cfg: TrainConfig, writer: bool) -> int:
    """Train (every rank); ``writer`` (rank 0) writes the run folder, prints and saves checkpoints."""
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(cfg, compile_model=args.compile)
    store = cp.CheckpointStore(run_dir / "checkpoints", keep=cfg.checkpoint.keep,
                               async_write=cfg.checkpoint.async_write, quantize=cfg.checkpoint.quantize,
                               level=cfg.checkpoint.level, config_hash=config_hash(cfg))
    if writer:
        # Overlapped snapshots: the copy runs during the next forward/backward pass and the
        # trainer waits for it only before its next in-place update.
        trainer.mutation_barriers.append(store.barrier)
    metrics_path = run_dir / "metrics.jsonl"
    if args.resume:
        step = store.latest_intact()
        if step is None:
            if writer:
                print(f"--resume: no intact checkpoint in {store.directory}; starting from step 0", file=sys.stderr)
                metrics_path.unlink(missing_ok=True)
        else:
            trainer.load_state_dict(store.load(step))
            if writer:
                _truncate_metrics(metrics_path, trainer.global_step)
                print(f"resumed from {cp.checkpoint_path(store.directory, step)} (step {trainer.global_step})",
                      file=sys.stderr)
    else:
        existing = store.list()
        if existing and not args.overwrite:
            raise STSOError(
                f"{store.directory} already holds checkpoints (steps {existing[0]}..{existing[-1]}); "
                "pass --resume to continue that run, --overwrite to delete them and start over, "
                "or choose another --run-dir"
            )
        if writer:
            for step in existing:
                store.path(step).unlink()
            metrics_path.unlink(missing_ok=True)
    if writer:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
        store.write_seed_manifest({
            "seed": cfg.seed, "noise_seed": trainer.noise_seed, "sampler_seed": trainer.sampler.seed,
            "scenario": trainer.scenario.name, "corpus": trainer.splits.source,
            "corpus_fingerprint": trainer.splits.fingerprint, "tokenizer": trainer.tokenizer.spec,
            "config_hash": config_hash(cfg), "torch": torch.__version__, "python": platform.python_version(),
            "world_size": trainer.world.size,
        })
    every = cfg.checkpoint.every
    t_start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        mf = stack.enter_context(metrics_path.open("a", encoding="utf-8")) if writer else None
        bar = stack.enter_context(tqdm(total=cfg.steps, initial=trainer.global_step,
                                       disable=args.no_progress or not writer, unit="step",
                                       desc=f"{cfg.model.preset}/{trainer.scenario.name}", dynamic_ncols=True))
        while trainer.global_step < cfg.steps:
            s = trainer.train_step()
            bar.update(1)
            bar.set_postfix(loss=f"{s.loss:.3f}", gnorm=f"{s.grad_norm:.2f}", lr=f"{s.lr:.2e}")
            step = trainer.global_step
            if mf is not None:
                mf.write(_json_row({"kind": "step", **s.to_dict()}))
            if args.eval_every and step % args.eval_every == 0 and step < cfg.steps:
                ev = trainer.evaluate()  # every rank evaluates its identical replica (no communication)
                if mf is not None:
                    mf.write(_json_row({"kind": "eval", "step": step, **ev}))
            if (every and step % every == 0) or step == cfg.steps:
                state = trainer.state_dict()  # a collective in a distributed run: every rank takes part
                if mf is not None:
                    mf.flush()
                    store.save(step, state, overlap=cfg.checkpoint.async_write,
                               extras={"activations": trainer.activation_summary(),
                                       "loss": s.loss, "ema": trainer.ema})
        ev = trainer.evaluate()
        if mf is not None:
            mf.write(_json_row({"kind": "eval", "step": trainer.global_step, **ev}))
    store.close()
    if writer:
        print(f"done: {trainer.global_step} steps in {time.perf_counter() - t_start:.1f}s, "
              f"val_loss {ev['val_loss']:.4f}, val_ppl {ev['val_ppl']:.2f}; run folder {run_dir}"
              + (f" ({trainer.world.size} processes)" if trainer.world.distributed else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
