"""Small builders shared by tests (tiny configs that train fast on CPU)."""

from __future__ import annotations

from typing import Any

from stso_env.config import TrainConfig, apply_overrides

TINY = {
    "model.preset": "tiny",
    "data.builtin_chars": 200_000,
    "data.batch_size": 8,
    "steps": 400,
    "optim.warmup_steps": 20,
    "device": "cpu",
}


def tiny_config(**overrides: Any) -> TrainConfig:
    """A tiny-preset config; keyword names use '__' for dots (optim__lr=...)."""
    ov = dict(TINY)
    ov.update({k.replace("__", "."): v for k, v in overrides.items()})
    return apply_overrides(TrainConfig(), ov)
