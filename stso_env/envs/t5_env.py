"""STSO-T5-v0: steer a real T5 pre-training run (span corruption)."""

from __future__ import annotations

from typing import Any

from stso_env.envs.gpt2_env import GPT2Env
from stso_env.errors import ConfigError
from stso_env.train.presets import T5_PRESETS, model_family


class T5Env(GPT2Env):
    """
    ## Description

    STSO-GPT2-v0's contract (:class:`~stso_env.envs.gpt2_env.GPT2Env`: the same action grid and masks,
    the same 53-entry observation, reward, termination, ``fork()``, ``snapshot()`` / ``restore()`` and
    logging) on a T5 instead of a GPT-2: each episode pre-trains a transformers
    ``T5ForConditionalGeneration`` from scratch on T5's span-corruption objective
    (:mod:`stso_env.train.span_corruption`: 15 % of each window masked in spans of mean length 3, the
    decoder predicting them), with the same scenarios of injected instability.

    What differs is what the numbers are of: the training, probe and held-out losses are the
    decoder's mean token loss on the masked spans (sentinels included), normalised by ``ln`` of the
    tokenizer's vocabulary as for GPT-2; the per-layer entropies run over the encoder blocks, then
    the decoder blocks, an encoder block's attention entropy over all input tokens (it attends both
    ways) and a decoder block's over its causal self-attention. The probe windows are masked with a
    fixed key, so every step and every run is scored on the same task.

    ## Arguments

    ``gym.make("STSO-T5-v0", preset="t5-tiny", ...)``: the arguments of STSO-GPT2-v0, with ``preset``
    one of ``t5-tiny``, ``t5-small``, ``t5-base`` (:data:`stso_env.train.presets.T5_PRESETS`).

    ## Version History

    * v0: initial version.
    """

    def __init__(self, preset: str = "t5-tiny", **kwargs: Any) -> None:
        if model_family(preset) != "t5":
            raise ConfigError(f"STSO-T5-v0: preset {preset!r} is not a T5 preset; choose one of "
                              f"{', '.join(T5_PRESETS)} (GPT-2 presets are STSO-GPT2-v0's)")
        super().__init__(preset=preset, **kwargs)
