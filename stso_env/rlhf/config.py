"""Typed configuration of the RLHF preparation (policy, preference pairs, reward model, evaluation).

Same conventions as :mod:`stso_env.config`: dataclass fields carry their help text and
constraints, :func:`~stso_env.config.from_dict` loads YAML strictly (unknown keys and
out-of-range values raise :class:`~stso_env.errors.ConfigError` naming the dotted key).
Two sizes exist: the defaults (a run of a few minutes on two CPU cores) and
:func:`tiny_config` (seconds, for tests).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stso_env.config import _f, apply_overrides, from_dict, load_yaml_mapping, to_dict
from stso_env.errors import ConfigError

SIZES = ("default", "tiny")


@dataclass
class PolicyConfig:
    """The GPT-2 policy, pre-trained from scratch on the built-in corpus with the project's trainer."""

    preset: str = _f("tiny", "model size preset (stso_env.train.presets)", choices=("tiny", "bench10m"))
    steps: int = _f(1500, "pre-training optimizer steps", range=(1, 10**7))
    batch_size: int = _f(8, "sequences per step", range=(1, 4096))
    seq_len: int = _f(256, "tokens (bytes) per training sequence; also the model's context, so it bounds "
                      "prompt + completion lengths", range=(32, 4096))
    lr: float = _f(3e-3, "peak learning rate (warm-up then cosine)", range=(1e-7, 1.0))
    warmup_steps: int = _f(50, "linear warm-up steps", range=(0, 10**7))
    builtin_chars: int = _f(2_000_000, "characters of built-in corpus to pre-train on", range=(10_000, 10**9))
    corpus_seed: int = _f(0, "seed of the built-in corpus text", range=(0, 2**32 - 1))


@dataclass
class PreferenceConfig:
    """Preference pairs from the built-in grammar (stso_env.rlhf.preferences)."""

    n_train: int = _f(3000, "pairs the reward model is trained on", range=(1, 10**7))
    n_probe: int = _f(200, "pairs of the probe split (what a controller of the RLHF run may read)",
                      range=(0, 10**7))
    n_test: int = _f(400, "held-out pairs for the final accuracy; their prompts also score the policy",
                     range=(1, 10**7))
    prompt_words_min: int = _f(2, "fewest words in a prompt", range=(1, 50))
    prompt_words_max: int = _f(4, "most words in a prompt", range=(1, 50))
    max_chars: int = _f(200, "longest sentence (prompt + continuation) used; must fit the policy's context",
                        range=(20, 100_000))
    weight_agreement: float = _f(1.0, "relative frequency of verb-agreement corruptions", range=(0.0, 1e6))
    weight_shuffle: float = _f(1.0, "relative frequency of shuffled-word corruptions", range=(0.0, 1e6))
    weight_foreign: float = _f(1.0, "relative frequency of out-of-lexicon word corruptions", range=(0.0, 1e6))

    @property
    def weights(self) -> tuple[float, float, float]:
        return (self.weight_agreement, self.weight_shuffle, self.weight_foreign)

    def validate(self, source: str) -> None:
        if self.prompt_words_max < self.prompt_words_min:
            raise ConfigError(f"{source}: preferences.prompt_words_max: {self.prompt_words_max} is below "
                              f"prompt_words_min {self.prompt_words_min}")
        if sum(self.weights) <= 0:
            raise ConfigError(f"{source}: preferences.weight_agreement: the three corruption weights are all 0; "
                              "give at least one a positive weight")


@dataclass
class RewardModelConfig:
    """The reward model: GPT2ForSequenceClassification trained with TRL's RewardTrainer."""

    init: str = _f("policy", "'policy' starts from the pre-trained policy's weights, 'scratch' from a random "
                   "model of the policy's preset", choices=("policy", "scratch"))
    epochs: float = _f(2.0, "passes over the training pairs", range=(0.01, 1000.0))
    batch_size: int = _f(16, "pairs per optimizer step", range=(1, 4096))
    lr: float = _f(1e-4, "peak learning rate (linear decay); 1e-3 leaves a well pre-trained policy at chance",
                   range=(1e-8, 1.0))
    warmup_ratio: float = _f(0.05, "share of steps of linear warm-up", range=(0.0, 0.9))
    weight_decay: float = _f(0.0, "AdamW weight decay", range=(0.0, 10.0))


@dataclass
class EvaluationConfig:
    """What the preparation measures on the test split."""

    n_prompts: int = _f(200, "test prompts the policy completes greedily for its gold score (at most "
                        "preferences.n_test)", range=(1, 10**6))
    max_new_tokens: int = _f(160, "token budget of a greedy completion (cut to the context)", range=(1, 4096))
    batch_size: int = _f(64, "sequences per forward pass when scoring and generating", range=(1, 4096))


@dataclass
class RLHFPrepareConfig:
    """Everything :func:`stso_env.rlhf.prepare.prepare` needs; YAML files hold overrides of it."""

    seed: int = _f(0, "seed of the policy init and data order, the preference pairs and the reward model",
                   range=(0, 2**32 - 1))
    policy: PolicyConfig = field(default_factory=PolicyConfig, metadata={"help": "policy section"})
    preferences: PreferenceConfig = field(default_factory=PreferenceConfig,
                                          metadata={"help": "preference pairs section"})
    reward: RewardModelConfig = field(default_factory=RewardModelConfig, metadata={"help": "reward model section"})
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig, metadata={"help": "evaluation section"})

    def validate(self, source: str) -> None:
        if self.preferences.max_chars + 1 > self.policy.seq_len:
            raise ConfigError(
                f"{source}: preferences.max_chars: {self.preferences.max_chars} characters plus the end-of-text "
                f"token do not fit policy.seq_len {self.policy.seq_len}; lower max_chars or raise seq_len")
        if self.evaluation.n_prompts > self.preferences.n_test:
            raise ConfigError(
                f"{source}: evaluation.n_prompts: {self.evaluation.n_prompts} is more than the "
                f"{self.preferences.n_test} test prompts (preferences.n_test)")


#: Overrides that make :func:`tiny_config`: 300 policy steps and 600 training pairs.
TINY_OVERRIDES: dict[str, Any] = {
    "policy.steps": 300,
    "policy.batch_size": 8,
    "policy.seq_len": 128,
    "policy.warmup_steps": 10,
    "policy.builtin_chars": 200_000,
    "preferences.n_train": 600,
    "preferences.n_probe": 20,
    "preferences.n_test": 200,
    "preferences.max_chars": 120,
    "reward.epochs": 2.0,
    "reward.lr": 1e-3,
    "reward.batch_size": 16,
    "evaluation.n_prompts": 16,
    "evaluation.max_new_tokens": 48,
}


def tiny_config(**overrides: Any) -> RLHFPrepareConfig:
    """The test size; keyword names use ``__`` for dots (``reward__lr=1e-3``)."""
    ov = dict(TINY_OVERRIDES)
    ov.update({k.replace("__", "."): v for k, v in overrides.items()})
    return apply_overrides(RLHFPrepareConfig(), ov)


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_prepare_config(path: str | Path | None = None, *, size: str = "default",
                        overrides: dict[str, Any] | None = None) -> RLHFPrepareConfig:
    """The config of ``size`` (default or tiny), with a YAML file's values and then dotted ``overrides`` on top.

    Raises:
        ConfigError: unknown size, a missing or malformed file, an unknown key or a bad value; the
            message names the file and the dotted key.
    """
    if size not in SIZES:
        raise ConfigError(f"size: {size!r} is not allowed; choose one of {', '.join(SIZES)}")
    data = to_dict(tiny_config() if size == "tiny" else RLHFPrepareConfig())
    source = f"<{size}>"
    if path is not None:
        data, source = _merge(data, load_yaml_mapping(path)), str(path)
    cfg = from_dict(RLHFPrepareConfig, data, source=source)
    return apply_overrides(cfg, overrides) if overrides else cfg

