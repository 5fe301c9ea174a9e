"""GPT-2 pre-training: presets, data, scenarios, clip policies and the resumable Trainer.

``Trainer``, ``Knobs`` and ``StepStats`` are imported lazily so that light
submodules (sampler, scenario, clipping) load without pulling in transformers.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Knobs", "StepStats", "Trainer"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from stso_env.train import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'stso_env.train' has no attribute {name!r}")
