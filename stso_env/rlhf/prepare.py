"""Build what an RLHF fine-tune needs, offline and deterministically: a policy and a reward model.

An RLHF run (GRPO/RLOO in TRL) starts from a pre-trained policy and a reward model,
both loadable from folders (TRL tries the hub for in-memory models, GUIDE section 3).
:func:`prepare` makes them from nothing but the project:

1. **Policy**: a GPT-2 pre-trained from scratch on the built-in corpus with the project's
   own :class:`~stso_env.train.trainer.Trainer` (byte tokenizer), saved with
   ``save_pretrained`` together with the byte tokenizer as a Hugging Face tokenizer
   (:mod:`stso_env.rlhf.hf_tokenizer`).
2. **Preferences**: pairs from the grammar (:mod:`stso_env.rlhf.preferences`).
3. **Reward model**: ``GPT2ForSequenceClassification`` (one label, pad = eos) trained
   with TRL's ``RewardTrainer`` on the train pairs, from the policy's weights or from
   scratch, saved with ``save_pretrained``. Its accuracy (chosen scored above rejected)
   is measured on the held-out *test* pairs, whose prompts it never saw.
4. **Gold check**: the policy's greedy completions of test prompts scored by the gold
   scorer (:mod:`stso_env.rlhf.gold`), the baseline an RLHF run should improve on.

Caching: the policy lives in ``ROOT/policy-<hash>`` and the reward model in
``ROOT/reward-<hash>``, each hash over every setting that changes the result (the
reward model's includes the policy's). A folder is built under a temporary name and
renamed when complete, with ``prepare.json`` inside, so a finished folder is reused
and a half-written one never is.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from stso_env.config import TrainConfig, apply_overrides, config_hash, to_dict
from stso_env.rlhf.config import RLHFPrepareConfig
from stso_env.rlhf.gold import completion_score
from stso_env.rlhf.hf_tokenizer import byte_hf_tokenizer
from stso_env.rlhf.preferences import PreferencePair, PreferenceSplits, build_preferences, pairs_as_columns

log = logging.getLogger(__name__)

#: Bump when what a cached folder holds changes, so old folders are not reused.
PREPARE_FORMAT_VERSION = 1
MARKER = "prepare.json"


@dataclass
class Built:
    """A cached artefact: its folder, whether it was reused, and the facts recorded when it was built."""

    path: Path
    reused: bool
    info: dict[str, Any]


def default_root() -> Path:
    """``$STSO_CACHE/rlhf`` if ``STSO_CACHE`` is set, else ``~/.cache/stso/rlhf``."""
    root = os.environ.get("STSO_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "stso") / "rlhf"


def policy_key(cfg: RLHFPrepareConfig) -> str:
    """Hash of everything the policy depends on."""
    return config_hash({"format": PREPARE_FORMAT_VERSION, "seed": cfg.seed, "policy": to_dict(cfg.policy)})


def reward_key(cfg: RLHFPrepareConfig) -> str:
    """Hash of everything the reward model depends on (the policy's key included)."""
    return config_hash({"format": PREPARE_FORMAT_VERSION, "seed": cfg.seed, "policy": policy_key(cfg),
                        "preferences": to_dict(cfg.preferences), "reward": to_dict(cfg.reward)})


def _cached(path: Path) -> dict[str, Any] | None:
    marker = path / MARKER
    if not marker.is_file():
        return None
    try:
        return json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable %s (%s); rebuilding", marker, exc)
        return None


def _publish(tmp: Path, path: Path, info: dict[str, Any]) -> None:
    """Write the marker last, then move the finished folder into place (replacing a stale one)."""
    (tmp / MARKER).write_text(json.dumps(info, indent=2, sort_keys=True), encoding="utf-8")
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)


def _scratch_dir(root: Path, name: str) -> Path:
    tmp = root / f".{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir(parents=True)
    return tmp


# ------------------------------------------------------------------------------------------- policy


def policy_train_config(cfg: RLHFPrepareConfig) -> TrainConfig:
    """The project's :class:`TrainConfig` for pre-training the policy (CPU, calm, no checkpoints)."""
    p = cfg.policy
    return apply_overrides(TrainConfig(), {
        "seed": cfg.seed, "steps": p.steps, "device": "cpu", "scenario": "calm",
        "model.preset": p.preset, "data.tokenizer": "byte", "data.corpus": "builtin",
        "data.seq_len": p.seq_len, "data.batch_size": p.batch_size, "data.builtin_chars": p.builtin_chars,
        "data.corpus_seed": p.corpus_seed, "optim.lr": p.lr, "optim.warmup_steps": min(p.warmup_steps, p.steps),
        "checkpoint.every": 0,
    })


def build_policy(cfg: RLHFPrepareConfig, root: Path, *, progress: bool = True) -> Built:
    """Pre-train the policy on the built-in corpus, or reuse ``root/policy-<hash>`` when it exists."""
    from stso_env.train.corpus import load_corpus
    from stso_env.train.tokenizer import build_tokenizer
    from stso_env.train.trainer import Trainer

    path = root / f"policy-{policy_key(cfg)}"
    info = _cached(path)
    if info is not None:
        return Built(path, True, info)
    t0 = time.perf_counter()
    tcfg = policy_train_config(cfg)
    d = tcfg.data
    splits = load_corpus(d.corpus, build_tokenizer(d.tokenizer), seed=d.corpus_seed,
                         builtin_chars=d.builtin_chars, valid_fraction=d.valid_fraction, cache_dir=root / "tokens")
    trainer = Trainer(tcfg, splits=splits)
    losses: list[float] = []
    with tqdm(total=tcfg.steps, desc="policy", unit="step", file=sys.stderr, disable=not progress) as bar:
        for _ in range(tcfg.steps):
            stats = trainer.train_step()
            losses.append(float(stats.loss))
            bar.update(1)
            if len(losses) % 50 == 0:
                bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")
    val = trainer.evaluate(max_windows=64)
    model = trainer.model
    model.eval()
    model.config.pad_token_id = trainer.tokenizer.eos_id
    tmp = _scratch_dir(root, "policy")
    model.save_pretrained(tmp)
    byte_hf_tokenizer().save_pretrained(tmp)
    info = {
        "kind": "policy", "format": PREPARE_FORMAT_VERSION, "key": policy_key(cfg), "config": to_dict(cfg.policy),
        "seed": cfg.seed, "steps": tcfg.steps, "parameters": int(trainer.n_params),
        "context": int(model.config.n_positions), "final_train_loss": float(np.mean(losses[-20:])),
        "val_loss": float(val["val_loss"]), "seconds": time.perf_counter() - t0,
    }
    _publish(tmp, path, info)
    return Built(path, False, info)


# ------------------------------------------------------------------------------------- reward model


def make_preferences(cfg: RLHFPrepareConfig) -> PreferenceSplits:
    """The preference pairs of ``cfg`` (deterministic from ``cfg.seed``)."""
    p = cfg.preferences
    return build_preferences(cfg.seed, p.n_train, p.n_probe, p.n_test,
                             prompt_words=(p.prompt_words_min, p.prompt_words_max), weights=p.weights,
                             max_chars=p.max_chars)


@torch.no_grad()
def reward_scores(model: Any, tokenizer: Any, texts: Sequence[str], *, batch_size: int = 64) -> np.ndarray:
    """Reward of each text, tokenized as ``RewardTrainer`` does (text + eos, right-padded with pad = eos)."""
    was = model.training
    model.eval()
    out: list[np.ndarray] = []
    try:
        for i in range(0, len(texts), batch_size):
            chunk = [t + tokenizer.eos_token for t in texts[i:i + batch_size]]
            enc = tokenizer(chunk, padding=True, return_tensors="pt")
            logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], use_cache=False).logits
            out.append(logits[:, 0].float().numpy())
    finally:
        model.train(was)
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


def pair_accuracy(model: Any, tokenizer: Any, pairs: Sequence[PreferencePair], *,
                  batch_size: int = 64) -> dict[str, Any]:
    """Share of pairs whose chosen text gets the higher reward, overall and per corruption kind."""
    if not pairs:
        return {"accuracy": None, "pairs": 0, "by_corruption": {}, "mean_margin": None}
    chosen = reward_scores(model, tokenizer, [p.prompt + p.chosen for p in pairs], batch_size=batch_size)
    rejected = reward_scores(model, tokenizer, [p.prompt + p.rejected for p in pairs], batch_size=batch_size)
    wins = chosen > rejected
    groups: dict[str, list[bool]] = defaultdict(list)
    for pair, win in zip(pairs, wins.tolist()):
        groups[pair.corruption].append(win)
    return {"accuracy": float(wins.mean()), "pairs": len(pairs),
            "by_corruption": {k: float(np.mean(v)) for k, v in sorted(groups.items())},
            "mean_margin": float((chosen - rejected).mean())}


def build_reward_model(cfg: RLHFPrepareConfig, policy: Built, prefs: PreferenceSplits, root: Path, *,
                       progress: bool = True) -> Built:
    """Train the reward model with TRL's ``RewardTrainer``, or reuse ``root/reward-<hash>`` when it exists."""
    from datasets import Dataset
    from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    path = root / f"reward-{reward_key(cfg)}"
    info = _cached(path)
    if info is not None:
        return Built(path, True, info)
    t0 = time.perf_counter()
    r = cfg.reward
    tokenizer = AutoTokenizer.from_pretrained(str(policy.path), local_files_only=True)
    torch.manual_seed(cfg.seed)
    if r.init == "policy":
        model = GPT2ForSequenceClassification.from_pretrained(str(policy.path), num_labels=1, local_files_only=True)
    else:
        model_cfg = GPT2Config.from_pretrained(str(policy.path), local_files_only=True)
        model_cfg.num_labels = 1
        model = GPT2ForSequenceClassification(model_cfg)
    model.config.pad_token_id = tokenizer.pad_token_id
    tmp = _scratch_dir(root, "reward")
    args = RewardConfig(
        output_dir=str(tmp / "trainer"), use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
        report_to="none", save_strategy="no", disable_tqdm=not progress, logging_steps=10**9,
        per_device_train_batch_size=r.batch_size, num_train_epochs=r.epochs, learning_rate=r.lr,
        warmup_steps=r.warmup_ratio,  # transformers 5: a float in [0, 1) is a share of the steps
        weight_decay=r.weight_decay, lr_scheduler_type="linear",
        max_length=int(model.config.n_positions), seed=cfg.seed, data_seed=cfg.seed, dataloader_num_workers=0,
    )
    train = Dataset.from_dict(pairs_as_columns(prefs.train)).remove_columns("corruption")
    trainer = RewardTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer)
    result = trainer.train()
    model = trainer.model
    model.eval()
    shutil.rmtree(tmp / "trainer", ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    batch = cfg.evaluation.batch_size
    info = {
        "kind": "reward_model", "format": PREPARE_FORMAT_VERSION, "key": reward_key(cfg),
        "policy_key": policy_key(cfg), "config": to_dict(cfg.reward), "preferences": to_dict(cfg.preferences),
        "seed": cfg.seed, "train_pairs": len(prefs.train), "optimizer_steps": int(result.global_step),
        "train_loss": float(result.training_loss),
        "train": pair_accuracy(model, tokenizer, prefs.train[: len(prefs.test)], batch_size=batch),
        "probe": pair_accuracy(model, tokenizer, prefs.probe, batch_size=batch),
        "test": pair_accuracy(model, tokenizer, prefs.test, batch_size=batch),
        "seconds": time.perf_counter() - t0,
    }
    _publish(tmp, path, info)
    return Built(path, False, info)


# --------------------------------------------------------------------------------------- gold check


@torch.no_grad()
def greedy_completions(model: Any, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int,
                       batch_size: int = 64, progress: bool = False) -> list[str]:
    """Greedy continuations of ``prompts``, each cut at the end of text.

    Prompts of equal token length are batched together, so no padding is needed and the
    result equals one-by-one decoding.
    """
    was = model.training
    model.eval()
    context = int(model.config.n_positions)
    eos = tokenizer.eos_token_id
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    by_len: dict[int, list[int]] = defaultdict(list)
    for i, ids in enumerate(encoded):
        by_len[len(ids)].append(i)
    out: list[str] = [""] * len(prompts)
    try:
        with tqdm(total=len(prompts), desc="gold", unit="prompt", file=sys.stderr, disable=not progress) as bar:
            for length, idx in sorted(by_len.items()):
                budget = max(0, min(max_new_tokens, context - length))
                for j in range(0, len(idx), batch_size):
                    part = idx[j:j + batch_size]
                    ids = torch.tensor([encoded[i] for i in part], dtype=torch.long)
                    if budget:
                        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                             max_new_tokens=budget, pad_token_id=eos, eos_token_id=eos)
                    else:
                        gen = ids
                    for row, i in zip(gen[:, length:].tolist(), part):
                        if eos in row:
                            row = row[: row.index(eos)]
                        out[i] = tokenizer.decode(row)
                    bar.update(len(part))
    finally:
        model.train(was)
    return out


def policy_gold(cfg: RLHFPrepareConfig, policy: Built, prefs: PreferenceSplits, *,
                progress: bool = True) -> dict[str, Any]:
    """Gold score of the policy's greedy completions of the first ``evaluation.n_prompts`` test prompts."""
    from transformers import AutoTokenizer, GPT2LMHeadModel

    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(policy.path), local_files_only=True)
    model = GPT2LMHeadModel.from_pretrained(str(policy.path), local_files_only=True)
    prompts = prefs.prompts("test")[: cfg.evaluation.n_prompts]
    completions = greedy_completions(model, tokenizer, prompts, max_new_tokens=cfg.evaluation.max_new_tokens,
                                     batch_size=cfg.evaluation.batch_size, progress=progress)
    scores = [completion_score(p, c) for p, c in zip(prompts, completions)]
    return {"mean": float(np.mean(scores)), "prompts": len(prompts),
            "finished_sentences": float(np.mean(["." in c for c in completions])),
            "examples": [{"prompt": p, "completion": c, "gold": s}
                         for p, c, s in list(zip(prompts, completions, scores))[:3]],
            "seconds": time.perf_counter() - t0}


# ------------------------------------------------------------------------------------------ pipeline


def prepare(cfg: RLHFPrepareConfig, root: str | Path | None = None, *, progress: bool = True) -> dict[str, Any]:
    """Build (or reuse) the policy and the reward model under ``root`` and measure them.

    Returns a JSON-ready summary: the folders, whether each was reused, the reward model's
    accuracy on held-out pairs, the gold score of the policy's greedy completions, seconds.
    """
    t0 = time.perf_counter()
    base = Path(root).expanduser() if root is not None else default_root()
    base.mkdir(parents=True, exist_ok=True)
    policy = build_policy(cfg, base, progress=progress)
    t_prefs = time.perf_counter()
    prefs = make_preferences(cfg)
    prefs_seconds = time.perf_counter() - t_prefs
    reward = build_reward_model(cfg, policy, prefs, base, progress=progress)
    gold = policy_gold(cfg, policy, prefs, progress=progress)
    return {
        "root": str(base),
        "config_hash": config_hash(cfg),
        "config": to_dict(cfg),
        "policy": {"path": str(policy.path), "reused": policy.reused, **_pick(policy.info, (
            "parameters", "steps", "context", "final_train_loss", "val_loss", "seconds"))},
        "preferences": {"train": len(prefs.train), "probe": len(prefs.probe), "test": len(prefs.test),
                        "seconds": prefs_seconds},
        "reward_model": {"path": str(reward.path), "reused": reward.reused,
                         "test_accuracy": reward.info["test"]["accuracy"], **_pick(reward.info, (
                             "train_pairs", "optimizer_steps", "train_loss", "train", "probe", "test", "seconds"))},
        "policy_gold": gold,
        "threads": torch.get_num_threads(),
        "seconds": time.perf_counter() - t0,
    }


def prepared_models(cfg: RLHFPrepareConfig, root: str | Path | None = None, *,
                    progress: bool = True) -> tuple[Built, Built, PreferenceSplits]:
    """The policy, the reward model and the preference splits, built when missing; unlike
    :func:`prepare` it measures nothing when both are cached (what an env needs at every construction)."""
    base = Path(root).expanduser() if root is not None else default_root()
    base.mkdir(parents=True, exist_ok=True)
    policy = build_policy(cfg, base, progress=progress)
    prefs = make_preferences(cfg)
    return policy, build_reward_model(cfg, policy, prefs, base, progress=progress), prefs


def _pick(info: dict[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    return {k: info[k] for k in keys if k in info}
